"""``effvla export`` and the exported backends: stage graphs written by torch's dynamo exporter, run by the real
ONNX Runtime (CPU execution provider here), against the eager reference and LeRobot's golden files.

Parity (fp32, <= 1e-4): every stage on its own (vision, prefill at several prefix lengths = the dynamic axis,
expert K/V + velocity), the golden observations end to end, and every hook the exported backends keep (pruning,
early exit at the exported segment ends, Jacobian-free and trained RTC). Refusals name the parameter or the file.
TensorRT runs only where a GPU and the tensorrt package are present.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model_fixtures import camera_tokens as _cams
from model_fixtures import chunk_noise as _noise

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from safetensors.torch import load_file  # noqa: E402

from effvla_ros.core.backends import make_backend  # noqa: E402
from effvla_ros.core.backends.base import CapabilityError  # noqa: E402
from effvla_ros.core.backends.exported import ExportError, load_manifest  # noqa: E402
from effvla_ros.core.backends.onnx_export import export_policy  # noqa: E402
from effvla_ros.core.compression.compressor import ReuseConfig, TokenCompressor  # noqa: E402
from effvla_ros.core.early_exit import EarlyExitConfig, ExpertReuseConfig  # noqa: E402
from effvla_ros.core.flow import euler_integrate  # noqa: E402
from effvla_ros.core.rtc import GuidanceTarget, RTCConfig  # noqa: E402
from effvla_ros.core.runner import CameraTokens, PolicyRunner, backend_chunk  # noqa: E402
from effvla_ros.core.smolvla import RuntimeConfig, load_policy  # noqa: E402
from effvla_ros.core.stages import VisualTokens  # noqa: E402

GOLDEN = Path(__file__).parent / "data" / "golden_tiny"
BUNDLED = Path(__file__).resolve().parents[1] / "effvla_ros" / "assets" / "so101_pickplace_pruned"
TOL = 1e-4
TASK = "pick up the red cube"


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="module")
def golden(tmp_path_factory):  # type: ignore[no-untyped-def]
    """The golden tiny checkpoint (LeRobot-made), exported with one prefill graph per layer."""
    ckpt = tmp_path_factory.mktemp("ckpt") / "golden"
    shutil.copytree(GOLDEN / "fp32", ckpt)
    policy = load_policy(ckpt, vlm_dir=GOLDEN / "vlm", runtime=RuntimeConfig())
    out = tmp_path_factory.mktemp("export")
    manifest = export_policy(policy, out, targets={"x86_cpu": {"keep_ratio": 0.5, "min_tokens": 4,
                                                               "coverage_regions": 2}}, log=lambda *_: None)
    backend = make_backend("onnxruntime", policy, export_dir=str(out))
    return policy, backend, manifest, out




# ------------------------------------------------------------------------------------------------ the export
def test_manifest_describes_every_stage_and_its_dynamic_prefix(golden) -> None:  # type: ignore[no-untyped-def]
    import onnx

    policy, backend, manifest, out = golden
    n = policy.arch.num_vlm_layers
    assert manifest.segments == [[i, i + 1] for i in range(n)]  # "all": exit after any layer
    assert backend.caps.exit_layers == tuple(range(n - 1))
    assert set(manifest.stages) == {"vision", "expert_kv", "velocity", *(f"prefill_{i}_{i + 1}" for i in range(n))}
    data = json.loads((out / "manifest.json").read_text())
    assert data["opset"] >= 18 and data["dtype"] == "float32" and len(data["checkpoint_sha256"]) == 64
    assert set(data["normalizer"]) and data["tokenizer"]["dir"]
    prof = data["targets"]["x86_cpu"]
    assert prof["min"] < prof["opt"] < prof["max"] == 2 * policy.arch.tokens_per_camera + policy.arch.tokenizer_max_length + 1
    for name, spec in manifest.stages.items():
        model = onnx.load(str(out / spec.file), load_external_data=False)
        assert model.opset_import[0].version == manifest.opset
        graph_inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
                        for i in model.graph.input}
        assert graph_inputs == {k: v[0] for k, v in spec.inputs.items()}, name  # "P" is a real dynamic axis
    assert manifest.stages["velocity"].inputs["keys"][0][3] == "P"
    script = (out / "build_engines_x86_cpu.sh").read_text()
    assert f"hidden:1x{prof['min']}x{policy.arch.text_hidden_size}" in script
    assert f"att_2d:1x{prof['max']}x{prof['max']}" in script and script.count("--saveEngine=") == len(manifest.stages)


def test_prefill_runs_only_whole_segments(golden) -> None:  # type: ignore[no-untyped-def]
    """A prefill [start, stop) must be a union of exported segments: early exit only at the exported exits."""
    import dataclasses

    manifest = golden[2]
    m = dataclasses.replace(manifest, segments=[[0, 2], [2, 3], [3, 4]])
    assert m.segments_between(0, 4) == [(0, 2), (2, 3), (3, 4)]
    assert m.segments_between(2, 3) == [(2, 3)] and m.segments_between(3, 3) == []
    for start, stop in [(0, 1), (1, 4), (0, 5), (1, 2)]:
        with pytest.raises(ValueError, match=rf"prefill \[{start}, {stop}\): not a union of the exported segments"):
            m.segments_between(start, stop)


def test_each_stage_equals_the_eager_reference(golden) -> None:  # type: ignore[no-untyped-def]
    """Vision, prefill at three prefix lengths (pruned to 4, 9 and all 16 tokens per camera) and the velocity, each
    fed the same inputs as the eager stage: <= 1e-4 in fp32."""
    policy, backend, _, _ = golden
    px = policy.preprocess_image(torch.rand(1, 3, 48, 64, generator=torch.Generator().manual_seed(1)))
    assert _maxdiff(backend.encode(px), policy.encode_pixels(px)) <= TOL
    tokens = policy.encode_pixels(px)
    lang, lmask = policy.tokenize(TASK)
    state = policy.prepare_state(torch.zeros(1, 6))
    lengths = []
    for k in (4, 9, 16):
        visual = {c: VisualTokens(tokens, keep=torch.arange(0, 16, 16 // k)[:k]) for c in policy.cameras}
        ref = policy.prefill(visual, lang, lmask, state)
        cache = backend.begin_prefill(visual, lang, lmask, state)
        backend.prefill(cache, 0, policy.arch.num_vlm_layers)
        lengths.append(cache.length)
        assert _maxdiff(cache.hidden, ref.hidden) <= TOL
        for a, b in zip(cache.keys + cache.values, ref.keys + ref.values, strict=True):
            assert _maxdiff(a, b) <= TOL
        x = _noise(policy, k)
        for t in (torch.tensor([1.0]), torch.linspace(0.2, 0.9, policy.arch.chunk_size)[None]):  # shared, per token
            v_ref = policy.velocity(ref, x, t)
            assert 0 < v_ref.abs().max() and _maxdiff(backend.velocity(cache, x, t), v_ref) <= TOL
    assert len(set(lengths)) == 3  # three prefix lengths through one graph


def test_golden_actions_on_onnxruntime(golden) -> None:  # type: ignore[no-untyped-def]
    """LeRobot's golden observations (batch 2, run one row at a time: the graphs take a batch of one) through the
    exported stages (``backend_chunk``, what ``effvla infer --backend onnxruntime`` runs): LeRobot's actions, within
    1e-4."""
    policy, backend, _, _ = golden
    ref = load_file(str(GOLDEN / "fp32" / "reference.safetensors"))
    info = json.loads((GOLDEN / "fp32" / "reference_info.json").read_text())
    obs = {f"observation.images.{c}": ref[f"observation.images.{c}"] for c in policy.cameras}
    obs.update({"observation.state": ref["observation.state.raw"], "task": info["tasks"]})
    actions, norm = backend_chunk(backend, obs, ref["noise"])
    assert _maxdiff(norm, ref["actions_normalized"]) <= TOL
    assert _maxdiff(actions, ref["actions_unnormalized"]) <= TOL
    assert ref["actions_unnormalized"].abs().max() > 0.5


def test_infer_command_on_the_exported_backend(golden, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`effvla infer --backend onnxruntime --export-dir` (a real process) equals `effvla infer` on eager."""
    from safetensors.torch import save_file

    policy, _, _, out = golden
    ref = load_file(str(GOLDEN / "fp32" / "reference.safetensors"))
    info = json.loads((GOLDEN / "fp32" / "reference_info.json").read_text())
    obs = {f"observation.images.{c}": ref[f"observation.images.{c}"][:1].contiguous() for c in policy.cameras}
    obs["observation.state"] = ref["observation.state.raw"][:1].contiguous()
    save_file(obs, str(tmp_path / "obs.safetensors"), metadata={"task": info["tasks"][0]})
    save_file({"noise": ref["noise"][:1].contiguous()}, str(tmp_path / "noise.safetensors"))
    results = []
    for backend in ("eager", "onnxruntime"):
        dst = tmp_path / f"{backend}.safetensors"
        proc = subprocess.run([sys.executable, "-m", "effvla_ros.cli", "infer", "--checkpoint", str(policy.source),
                               "--vlm-dir", str(GOLDEN / "vlm"), "--dtype", "float32", "--observation",
                               str(tmp_path / "obs.safetensors"), "--noise", str(tmp_path / "noise.safetensors"),
                               "--backend", backend, "--export-dir", str(out), "--out", str(dst)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        results.append(load_file(str(dst))["action"])
    assert _maxdiff(results[0], results[1]) <= TOL and _maxdiff(results[0], ref["actions_unnormalized"][:1]) <= TOL


def _two_chunks(policy, backend, **settings):  # type: ignore[no-untyped-def]
    runner = PolicyRunner(policy, backend=backend, **settings)
    runner.set_instruction(TASK)
    cams = _cams(policy)
    keep = torch.tensor([0, 2, 3, 7, 9, 12])  # camera1 pruned to 6 of 16 tokens
    cams["camera1"] = CameraTokens(cams["camera1"].tokens[keep], keep, cams["camera1"].grid)
    first = runner.infer(cams, torch.zeros(6), noise=_noise(policy))
    target = GuidanceTarget(first.x_final, delay=2, valid=policy.arch.chunk_size, ref_state=torch.zeros(6))
    return first, runner.infer(cams, torch.zeros(6), noise=_noise(policy, 1), guidance=target)


def test_every_hook_it_keeps_equals_eager(golden) -> None:  # type: ignore[no-untyped-def]
    """Pruning, early exit (the second chunk exits after layer 1 on both) and Jacobian-free RTC guidance between
    steps on the exported stages: eager's actions. Trained RTC (a committed prefix held clean, per-token time)
    through the shared integrator likewise."""
    policy, backend, _, _ = golden
    settings = dict(early_exit=EarlyExitConfig(enabled=True, exit_layers=[1], thresholds=[0.5], min_layers=1),
                    rtc=RTCConfig(enabled=True))
    runs = [_two_chunks(policy, b, **settings) for b in ("eager", backend)]
    for a, b in zip(*runs, strict=True):
        assert _maxdiff(a.actions, b.actions) <= TOL and a.actions.abs().max() > 0.05
        assert (a.exit_layer, a.guided, a.rtc_delay) == (b.exit_layer, b.guided, b.rtc_delay)
    assert runs[1][1].exit_layer == 2 and runs[1][1].guided  # the hooks did act

    lang, lmask = policy.tokenize(TASK)
    tokens = {c: t[None] for c, t in ((c, ct.tokens) for c, ct in _cams(policy).items())}
    prefix = torch.randn(1, 3, policy.arch.max_action_dim, generator=torch.Generator().manual_seed(7))
    outs = []
    for be in (make_backend("eager", policy), backend):
        cache = be.begin_prefill(tokens, lang, lmask, policy.prepare_state(torch.zeros(1, 6)))
        be.prefill(cache, 0, policy.arch.num_vlm_layers)
        outs.append(euler_integrate(lambda x, t, s, be=be, cache=cache: be.velocity(cache, x, t), _noise(policy, 3),
                                    policy.num_steps, prefix=prefix))
    assert torch.equal(outs[1][:, :3], prefix) and _maxdiff(outs[0], outs[1]) <= TOL


def test_what_is_not_exported_is_refused_by_name(golden) -> None:  # type: ignore[no-untyped-def]
    policy, backend, _, _ = golden
    with pytest.raises(CapabilityError, match=r"expert_reuse\.enabled.*'onnxruntime'"):
        PolicyRunner(policy, backend=backend, expert_reuse=ExpertReuseConfig(enabled=True))
    with pytest.raises(CapabilityError, match=r"rtc\.guidance.*'onnxruntime'"):
        PolicyRunner(policy, backend=backend, rtc=RTCConfig(enabled=True, guidance="vjp"))
    with pytest.raises(CapabilityError, match=r"reuse\.patch_level.*'onnxruntime'"):
        TokenCompressor(policy, reuse=ReuseConfig(enabled=True, patch_level=True), backend=backend)
    comp = TokenCompressor(policy, reuse=ReuseConfig(enabled=True, patch_level=False), backend=backend, count_flops=False)
    img = torch.rand(3, 48, 64, generator=torch.Generator().manual_seed(2))
    comp.set_instruction(TASK)
    a, b = comp.process("camera1", img), comp.process("camera1", img)  # frame-level reuse on the exported encoder
    assert a.tokens.shape[0] > 0 and b.tokens.shape == a.tokens.shape


def test_a_mismatched_export_is_refused_naming_the_file(golden, tmp_path) -> None:  # type: ignore[no-untyped-def]
    policy, _, _, out = golden
    with pytest.raises(ExportError, match="export_dir"):
        make_backend("onnxruntime", policy, export_dir=str(tmp_path))
    other = tmp_path / "other"
    shutil.copytree(out, other)
    data = json.loads((other / "manifest.json").read_text())
    data["checkpoint_sha256"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ExportError, match=r"manifest\.json.*another checkpoint"):
        make_backend("onnxruntime", policy, export_dir=str(other))
    data = json.loads((out / "manifest.json").read_text())
    data["arch"]["cameras"] = ["front"]
    (other / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ExportError, match=r"cameras"):
        make_backend("onnxruntime", policy, export_dir=str(other))
    (other / "manifest.json").write_text(json.dumps(json.loads((out / "manifest.json").read_text())))
    (other / "velocity.onnx").unlink()
    with pytest.raises(ExportError, match=r"velocity\.onnx.*missing"):
        make_backend("onnxruntime", policy, export_dir=str(other))
    (other / "manifest.json").write_text("{not json")
    with pytest.raises(ExportError, match="not a valid"):
        load_manifest(other)
    bf16 = load_policy(policy.source, vlm_dir=GOLDEN / "vlm", runtime=RuntimeConfig.lerobot_bf16())
    with pytest.raises(ExportError, match="float32.*dtype"):
        make_backend("onnxruntime", bf16, export_dir=str(out))


@pytest.mark.skipif(not BUNDLED.is_dir(), reason="bundled simulation checkpoint not present")
def test_bundled_checkpoint_exports_and_runs_an_episode_on_onnxruntime(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The bundled simulation checkpoint through the real command line (`effvla export`), then parity with its
    target's pruning, and one short closed-loop episode of the simulation on backend onnxruntime."""
    out = tmp_path / "exp"
    proc = subprocess.run([sys.executable, "-m", "effvla_ros.cli", "export", "--checkpoint", str(BUNDLED), "--out",
                           str(out), "--target", "x86_cpu", "--exit-layers", "none"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "build_engines_x86_cpu.sh" in proc.stdout and (out / "build_engines_x86_cpu.sh").is_file()
    policy = load_policy(BUNDLED, runtime=RuntimeConfig())
    backend = make_backend("onnxruntime", policy, export_dir=str(out))
    assert backend.caps.exit_layers == ()
    with pytest.raises(CapabilityError, match=r"early_exit\.enabled"):
        PolicyRunner(policy, backend=backend, early_exit=EarlyExitConfig(enabled=True))
    a, b = (_two_chunks_any(policy, be) for be in ("eager", backend))
    assert _maxdiff(a, b) <= TOL

    from effvla_ros.core.settings import make_setting
    from effvla_ros.sim.env import SimConfig, TwoCubePickPlaceEnv
    from effvla_ros.train.evaluate import run_episode

    env = TwoCubePickPlaceEnv(SimConfig(image_size=int(policy.arch.camera_shape[-1]), cameras=list(policy.arch.cameras)))
    try:
        r = run_episode(policy, env, 100000, make_setting("pruned+rtc", {"pruning.method": "task", "rtc.enabled": True,
                                                                   "delay_steps": 1}),
                        max_steps=12, backend=backend)
    finally:
        env.close()
    assert r.steps >= 1 and r.arm_motion > 0.01 and r.inferences >= 2


def _two_chunks_any(policy, backend) -> torch.Tensor:  # type: ignore[no-untyped-def]
    runner = PolicyRunner(policy, backend=backend, rtc=RTCConfig(enabled=True))
    runner.set_instruction("put the red cube in the bowl")
    g = torch.Generator().manual_seed(5)
    imgs = {c: torch.rand(1, 3, *policy.arch.camera_shape[1:], generator=g) for c in policy.cameras}
    enc = policy.encode_images(imgs)
    cams = {c: CameraTokens(t[0, ::2], torch.arange(0, t.shape[1], 2), enc.grid) for c, t in enc.tokens.items()}
    first = runner.infer(cams, torch.zeros(policy.arch.state_dim), noise=_noise(policy))
    target = GuidanceTarget(first.x_final, delay=1, valid=policy.arch.chunk_size,
                            ref_state=torch.zeros(policy.arch.state_dim))
    second = runner.infer(cams, torch.zeros(policy.arch.state_dim), noise=_noise(policy, 1), guidance=target)
    return torch.stack([first.actions, second.actions])


def test_export_command_refuses_bad_options(tmp_path) -> None:  # type: ignore[no-untyped-def]
    proc = subprocess.run([sys.executable, "-m", "effvla_ros.cli", "export", "--checkpoint", str(GOLDEN / "fp32"),
                           "--vlm-dir", str(GOLDEN / "vlm"), "--out", str(tmp_path / "x"), "--exit-layers", "9"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "exit layers [9]" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="TensorRT needs a CUDA GPU")
def test_tensorrt_engines_equal_eager(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """On a GPU with TensorRT: build the engines with the written script and compare with eager on CUDA."""
    pytest.importorskip("tensorrt")
    if shutil.which("trtexec") is None:
        pytest.skip("trtexec not on PATH")
    ckpt = tmp_path / "golden"
    shutil.copytree(GOLDEN / "fp32", ckpt)
    policy = load_policy(ckpt, vlm_dir=GOLDEN / "vlm", runtime=RuntimeConfig(device="cuda"))
    out = tmp_path / "exp"
    export_policy(policy, out, targets={"agx_thor": {"keep_ratio": 0.5}}, log=lambda *_: None)
    subprocess.run(["bash", str(out / "build_engines_agx_thor.sh")], check=True, timeout=1200)
    backend = make_backend("tensorrt", policy, export_dir=str(out))
    a = _two_chunks(policy, "eager", rtc=RTCConfig(enabled=True))
    b = _two_chunks(policy, backend, rtc=RTCConfig(enabled=True))
    for x, y in zip(a, b, strict=True):
        assert _maxdiff(x.actions, y.actions) <= 1e-3  # TF32 on the GPU


def test_half_precision_exports(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """An fp16 export runs on ONNX Runtime CPU within half precision's error of LeRobot's fp32 actions (measured
    1.9e-3 here); a bf16 export is written (for TensorRT) and refused by the onnxruntime backend with the reason."""
    ref = load_file(str(GOLDEN / "fp32" / "reference.safetensors"))
    info = json.loads((GOLDEN / "fp32" / "reference_info.json").read_text())
    obs = {f"observation.images.{c}": ref[f"observation.images.{c}"] for c in ("camera1", "camera2")}
    obs.update({"observation.state": ref["observation.state.raw"], "task": info["tasks"]})
    for dt in ("float16", "bfloat16"):
        policy = load_policy(GOLDEN / "fp32", vlm_dir=GOLDEN / "vlm",
                             runtime=RuntimeConfig(vision_dtype=dt, vlm_dtype=dt, expert_dtype=dt))
        manifest = export_policy(policy, tmp_path / dt, exit_layers="none", log=lambda *_: None)
        assert manifest.dtype == dt and manifest.stages["prefill_0_4"].inputs["hidden"][1] == dt
        if dt == "bfloat16":
            with pytest.raises(ExportError, match="bfloat16 export is for TensorRT"):
                make_backend("onnxruntime", policy, export_dir=str(tmp_path / dt))
            continue
        actions, _ = backend_chunk(make_backend("onnxruntime", policy, export_dir=str(tmp_path / dt)), obs, ref["noise"])
        err = _maxdiff(actions, ref["actions_unnormalized"])
        print(f"fp16 export on ONNX Runtime CPU: max |action - LeRobot fp32| = {err:.2e}")
        assert 0 < err <= 1e-2
