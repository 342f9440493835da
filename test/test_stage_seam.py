"""The stage seam: the shared Euler integrator, the backend protocol and capabilities, hooks written once.

A recording backend (the eager one with its calls logged) and a restricted one (declaring fewer
capabilities) stand in for the compiled / exported backends to come: the runner and the compressor must
drive any backend through the protocol only, cut the prefill at the backend's exit points, and refuse a
setting the backend cannot apply with the parameter named.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from effvla_ros.core.backends import Capabilities, EagerBackend, make_backend
from effvla_ros.core.backends.base import CapabilityError
from effvla_ros.core.compression.compressor import ReuseConfig, TokenCompressor
from effvla_ros.core.early_exit import EarlyExitConfig, ExpertReuseConfig, PrefixReuse, token_similarity
from effvla_ros.core.flow import euler_integrate
from effvla_ros.core.rtc import GuidanceTarget, RTCConfig
from effvla_ros.core.runner import CameraTokens, PolicyRunner
from effvla_ros.core.smolvla import build_random_policy, tiny_arch
from effvla_ros.core.smolvla.tokenizer import build_tiny_tokenizer
from effvla_ros.core.stages import StageStats, StageTimer

from model_fixtures import camera_tokens as _cams
from model_fixtures import chunk_noise as _noise

TASK = "pick up the red cube"


@pytest.fixture(scope="module")
def policy():  # type: ignore[no-untyped-def]
    return build_random_policy(tiny_arch(), tokenizer=build_tiny_tokenizer(), seed=3)


class RecordingBackend(EagerBackend):
    """The eager backend with every stage call logged."""

    def __init__(self, policy, caps: Capabilities | None = None) -> None:  # type: ignore[no-untyped-def]
        super().__init__(policy)
        if caps is not None:
            self.caps = caps
        self.calls: list[tuple] = []

    def encode(self, pixels):  # type: ignore[no-untyped-def]
        self.calls.append(("encode", tuple(pixels.shape)))
        return super().encode(pixels)

    def prefill(self, cache, start, stop):  # type: ignore[no-untyped-def]
        self.calls.append(("prefill", start, stop))
        super().prefill(cache, start, stop)

    def velocity(self, cache, x_t, t, *, step=-1, plan=None):  # type: ignore[no-untyped-def]
        self.calls.append(("velocity", step, plan is not None))
        return super().velocity(cache, x_t, t, step=step, plan=plan)




def _every_hook_runs(policy, backend):  # type: ignore[no-untyped-def]
    """Two chunks on ``backend`` with pruning, expert reuse, early exit and Jacobian-free RTC (the second guided
    toward the first and exiting early on the same observation)."""
    settings = dict(expert_reuse=ExpertReuseConfig(enabled=True, threshold=10.0),
                    early_exit=EarlyExitConfig(enabled=True, exit_layers=[1], thresholds=[0.5], min_layers=1),
                    rtc=RTCConfig(enabled=True))
    runner = PolicyRunner(policy, backend=backend, **settings)  # type: ignore[arg-type]
    runner.set_instruction(TASK)
    cams = _cams(policy)
    keep = torch.tensor([0, 2, 3, 7, 9, 12])  # pruned: 6 of 16 tokens of camera1
    cams["camera1"] = CameraTokens(cams["camera1"].tokens[keep], keep, cams["camera1"].grid)
    first = runner.infer(cams, torch.zeros(6), noise=_noise(policy))
    target = GuidanceTarget(first.x_final, delay=2, valid=policy.arch.chunk_size, ref_state=torch.zeros(6))
    return first, runner.infer(cams, torch.zeros(6), noise=_noise(policy, 1), guidance=target)


# ------------------------------------------------------------------------------------------------ integrator
def test_euler_integrate_is_the_euler_rule() -> None:
    a = torch.randn(2, 5, 3)
    seen: list[tuple[float, int]] = []

    def vel(x: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        seen.append((float(t[0]), step))
        return x * a + t[:, None, None]

    x0 = torch.randn(2, 5, 3)
    out = euler_integrate(vel, x0, 4)
    x = x0.clone()
    for k in range(4):  # written out: t = 1, 0.75, 0.5, 0.25; dt = -0.25
        t = 1.0 - 0.25 * k
        x = x - 0.25 * (x * a + t)
    torch.testing.assert_close(out, x, rtol=0, atol=0)
    assert seen == [(1.0, 0), (0.75, 1), (0.5, 2), (0.25, 3)]
    with pytest.raises(ValueError, match="num_steps"):
        euler_integrate(vel, x0, 0)


def test_euler_guide_replaces_the_velocity_and_trace_records_it() -> None:
    trace: dict[str, list[torch.Tensor]] = {}
    out = euler_integrate(lambda x, t, s: torch.ones_like(x), torch.zeros(1, 4, 2), 5,
                          guide=lambda step, t, x, v: v * 0.0 + step, trace=trace)
    # guided velocity = step index: x_0 = -(0 + 1 + 2 + 3 + 4) / 5
    torch.testing.assert_close(out, torch.full((1, 4, 2), -2.0))
    assert [float(v[0, 0, 0]) for v in trace["v_t"]] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert len(trace["x_t"]) == len(trace["t"]) == 5


def test_trained_rtc_prefix_is_held_clean_with_per_token_time() -> None:
    """Training-time RTC (arXiv 2512.05964): the committed prefix is data (t = 0) at every step and is
    reproduced exactly; the rest follows the flow."""
    prefix = torch.randn(1, 3, 2)
    times: list[torch.Tensor] = []

    def vel(x: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        times.append(t.clone())
        torch.testing.assert_close(x[:, :3], prefix, rtol=0, atol=0)  # the model sees the prefix clean
        return x - x.mean(dim=1, keepdim=True)  # couples the tokens

    noise = torch.randn(1, 8, 2)
    out = euler_integrate(vel, noise, 4, prefix=prefix)
    torch.testing.assert_close(out[:, :3], prefix, rtol=0, atol=0)
    assert all(t.shape == (1, 8) and bool((t[:, :3] == 0).all()) for t in times)
    assert [float(t[0, 5]) for t in times] == [1.0, 0.75, 0.5, 0.25]
    free = euler_integrate(lambda x, t, s: x - x.mean(dim=1, keepdim=True), noise, 4)
    assert not torch.allclose(out[:, 3:], free[:, 3:])  # the suffix is conditioned on the prefix
    with pytest.raises(ValueError, match="prefix"):
        euler_integrate(vel, noise, 4, prefix=torch.zeros(1, 9, 2))


def test_velocity_with_per_token_time_equals_a_shared_time(policy) -> None:  # type: ignore[no-untyped-def]
    runner = PolicyRunner(policy)
    runner.set_instruction(TASK)
    lang, lmask = runner._lang  # type: ignore[misc]
    with torch.no_grad():
        cache = policy.prefill(runner.visual_inputs(_cams(policy)), lang, lmask,
                               policy.prepare_state(torch.zeros(1, 6)))
        x = _noise(policy)
        v_shared = policy.velocity(cache, x, torch.full((1,), 0.4))
        v_tokens = policy.velocity(cache, x, torch.full((1, x.shape[1]), 0.4))
        t_mixed = torch.full((1, x.shape[1]), 0.4)
        t_mixed[:, :2] = 0.0
        v_mixed = policy.velocity(cache, x, t_mixed)
    torch.testing.assert_close(v_tokens, v_shared, rtol=0, atol=0)
    assert not torch.allclose(v_mixed, v_shared)


# ------------------------------------------------------------------------------------------------ backends
def test_runner_drives_the_backend_through_the_protocol(policy) -> None:  # type: ignore[no-untyped-def]
    rec = RecordingBackend(policy)
    runner = PolicyRunner(policy, backend=rec, expert_reuse=ExpertReuseConfig(enabled=True, threshold=10.0))
    ref = PolicyRunner(policy, expert_reuse=ExpertReuseConfig(enabled=True, threshold=10.0))
    assert isinstance(ref.backend, EagerBackend) and ref.backend.caps.name == "eager"
    for r in (runner, ref):
        r.set_instruction(TASK)
    a = runner.infer(_cams(policy), torch.zeros(6), noise=_noise(policy))
    b = ref.infer(_cams(policy), torch.zeros(6), noise=_noise(policy))
    torch.testing.assert_close(a.actions, b.actions, rtol=0, atol=0)
    assert a.reused_expert_layers > 0
    n = policy.arch.num_vlm_layers
    assert rec.calls[0] == ("prefill", 0, n)  # early exit off: one segment
    assert [c for c in rec.calls if c[0] == "velocity"] == [("velocity", s, True) for s in range(10)]


def test_prefill_segments_end_at_the_backends_exit_points(policy) -> None:  # type: ignore[no-untyped-def]
    n = policy.arch.num_vlm_layers
    reuse = PrefixReuse(EarlyExitConfig(enabled=True, exit_layers=[0, 1, 2], thresholds=[0.5], min_layers=1), n)
    assert reuse.segments() == [(0, 1), (1, 2), (2, 3), (3, n)]
    assert reuse.segments((1,)) == [(0, 2), (2, n)]  # a backend built with one exit point
    assert PrefixReuse(EarlyExitConfig(enabled=False, exit_layers=[1]), n).segments() == [(0, n)]

    caps = dataclasses.replace(EagerBackend.caps, name="one-exit", exit_layers=(1,))
    rec = RecordingBackend(policy, caps)
    runner = PolicyRunner(policy, backend=rec,
                          early_exit=EarlyExitConfig(enabled=True, exit_layers=[0, 1, 2], thresholds=[0.5], min_layers=1))
    runner.set_instruction(TASK)
    first = runner.infer(_cams(policy), torch.zeros(6), noise=_noise(policy))
    second = runner.infer(_cams(policy), torch.zeros(6), noise=_noise(policy))  # same observation: exits
    prefills = [c for c in rec.calls if c[0] == "prefill"]
    assert prefills == [("prefill", 0, 2), ("prefill", 2, n), ("prefill", 0, 2)]
    assert first.exit_layer == n and second.exit_layer == 2
    torch.testing.assert_close(second.actions, first.actions, rtol=0, atol=0)  # same K/V, reused
    assert second.similarities == {1: pytest.approx(1.0, abs=1e-5)}


def test_a_setting_the_backend_cannot_apply_is_refused_by_name(policy) -> None:  # type: ignore[no-untyped-def]
    bare = RecordingBackend(policy, Capabilities("bare", exit_layers=(), expert_plans=False, partial_encode=False,
                                                 vjp=False))
    with pytest.raises(CapabilityError, match=r"expert_reuse\.enabled.*'bare'"):
        PolicyRunner(policy, backend=bare, expert_reuse=ExpertReuseConfig(enabled=True))
    with pytest.raises(CapabilityError, match=r"early_exit\.enabled"):
        PolicyRunner(policy, backend=bare, early_exit=EarlyExitConfig(enabled=True))
    runner = PolicyRunner(policy, backend=bare, rtc=RTCConfig(enabled=True))
    with pytest.raises(CapabilityError, match=r"rtc\.guidance"):
        runner.configure(rtc=RTCConfig(enabled=True, guidance="vjp"))
    with pytest.raises(CapabilityError, match=r"reuse\.patch_level"):
        TokenCompressor(policy, backend=bare)  # patch-level reuse is on by default
    comp = TokenCompressor(policy, reuse=ReuseConfig(patch_level=False), backend=bare)
    with pytest.raises(CapabilityError, match=r"reuse\.patch_level"):
        comp.configure(reuse=ReuseConfig(patch_level=True))
    assert comp.reuse.patch_level is False  # nothing half-applied
    with pytest.raises(CapabilityError, match="backend"):
        make_backend("tensorrt-nonexistent", policy)


def test_compressor_full_encodes_go_through_the_backend(policy) -> None:  # type: ignore[no-untyped-def]
    rec = RecordingBackend(policy)
    comp = TokenCompressor(policy, reuse=ReuseConfig(enabled=False), backend=rec, count_flops=False)
    img = torch.rand(3, 48, 64, generator=torch.Generator().manual_seed(1))
    out = comp.process("camera1", img)
    assert [c[0] for c in rec.calls] == ["encode"]
    ref = policy.encode_images({"camera1": img[None]}).tokens["camera1"][0]
    torch.testing.assert_close(out.all_tokens, ref, rtol=0, atol=0)


def test_rtc_guidance_runs_as_the_integrators_guide(policy) -> None:  # type: ignore[no-untyped-def]
    rec = RecordingBackend(policy)
    runner = PolicyRunner(policy, backend=rec, rtc=RTCConfig(enabled=True, guidance="vjp"))
    runner.set_instruction(TASK)
    first = runner.infer(_cams(policy), torch.zeros(6), noise=_noise(policy))
    target = GuidanceTarget(first.x_final, delay=2, valid=policy.arch.chunk_size, ref_state=torch.zeros(6))
    rec.calls.clear()
    guided = runner.infer(_cams(policy), torch.zeros(6), noise=_noise(policy, 1), guidance=target)
    free = runner.infer(_cams(policy), torch.zeros(6), noise=_noise(policy, 1))
    assert guided.guided and guided.rtc_delay == 2 and not free.guided
    steps = [c for c in rec.calls if c[0] == "velocity"]
    assert len(steps) >= 20  # VJP guidance: one more (differentiable) evaluation per step
    d_guided = (guided.actions[:2] - first.actions[:2]).abs().max()
    d_free = (free.actions[:2] - first.actions[:2]).abs().max()
    assert d_guided < d_free  # pulled toward the committed actions


# ------------------------------------------------------------------------------------------------ decisions, timing
def test_decision_values_stay_tensors_on_the_device() -> None:
    a, b = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    valid = torch.tensor([[True, True, False, True, False], [False, True, True, True, True]])
    sim = token_similarity(a, b, valid)
    assert isinstance(sim, torch.Tensor) and sim.ndim == 0
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    torch.testing.assert_close(sim, cos[valid].mean())
    assert float(token_similarity(a, b, torch.zeros(2, 5, dtype=torch.bool))) == 1.0


def test_stage_stats_on_cpu() -> None:
    timer = StageTimer(torch.device("cpu")).start()
    torch.ones(100).sum()
    timer.stop()
    st = timer.stats(123)
    assert st.wall_s >= 0.0 and st.flops == 123
    assert StageStats(0.5, 2) == StageStats(0.5, 2) and StageStats(0.5) != StageStats(0.25)
    with pytest.raises(RuntimeError):
        StageTimer(torch.device("cpu")).start().stats()


# ------------------------------------------------------------------------------------------------ compiled backend
def test_compiled_backend_equals_eager_with_every_hook(policy) -> None:  # type: ignore[no-untyped-def]
    """torch.compile'd layers behind the same loops: fp32 actions within 1e-4 of the eager reference with pruning
    (bucketed prefix), expert reuse, early exit and Jacobian-free RTC guidance; full encodes likewise."""
    from effvla_ros.core.backends.compiled import CompiledBackend

    compiled = CompiledBackend(policy)
    assert compiled.caps.name == "compiled" and not compiled.caps.vjp
    runs = [_every_hook_runs(policy, backend) for backend in ("eager", compiled)]
    for a, b in zip(runs[0], runs[1], strict=True):
        assert (a.actions - b.actions).abs().max() <= 1e-4
        assert (a.exit_layer, a.reused_expert_layers, a.guided) == (b.exit_layer, b.reused_expert_layers, b.guided)
    assert runs[1][1].exit_layer == 2 and runs[1][1].guided and runs[1][0].reused_expert_layers > 0
    px = policy.preprocess_image(torch.rand(1, 3, 48, 64, generator=torch.Generator().manual_seed(4)))
    assert (compiled.encode(px) - policy.encode_pixels(px)).abs().max() <= 1e-4
    with pytest.raises(CapabilityError, match=r"rtc\.guidance"):
        PolicyRunner(policy, backend=compiled, rtc=RTCConfig(enabled=True, guidance="vjp"))


# ------------------------------------------------------------------------------------------------ warm-up, startup check
def test_warm_up_runs_every_prefix_shape_and_restores_the_runner(policy) -> None:  # type: ignore[no-untyped-def]
    from effvla_ros.core.warmup import keep_counts, warm_up

    assert keep_counts(16, [0.5, 0.5, 0.01]) == [1, 8, 16]
    rec = RecordingBackend(policy)
    runner = PolicyRunner(policy, backend=rec)
    runner.set_instruction(TASK)
    lang = runner._lang
    report = warm_up(runner, [8, 16], encode=rec.encode, repeats=2)
    assert report.buckets == (8, 16)
    assert report.prefill_s > 0 and report.denoise_s > 0 and report.encode_s > 0 and report.seconds > 0
    assert report.chunk_latency_s(2) == pytest.approx(2 * report.encode_s + report.prefill_s + report.denoise_s)
    n = policy.arch.num_vlm_layers
    assert [c for c in rec.calls if c[0] == "prefill"] == [("prefill", 0, n)] * 6  # 2 shapes x (1 + 2 repeats)
    assert [c for c in rec.calls if c[0] == "encode"] == [("encode", (1, 3, 64, 64))] * 3
    assert runner.instruction == TASK and runner._lang is lang and runner.prefix_reuse.full is None
    assert "measured per chunk" in report.describe(2)


def test_warm_up_compiles_every_shape_the_pipeline_sends(policy) -> None:  # type: ignore[no-untyped-def]
    """After the warm-up, chunks with the warmed kept-token counts compile nothing more."""
    from torch._dynamo.utils import counters

    from effvla_ros.core.backends.compiled import CompiledBackend
    from effvla_ros.core.warmup import warm_up

    runner = PolicyRunner(policy, backend=CompiledBackend(policy))
    warm_up(runner, [16], repeats=1)
    runner.set_instruction(TASK)
    cams = _cams(policy)
    keep = torch.tensor([1, 2, 3, 5, 8, 13])
    pruned = {c: CameraTokens(ct.tokens[keep], keep, ct.grid) for c, ct in cams.items()}
    before = counters["stats"]["unique_graphs"]
    runner.infer(cams, torch.zeros(6), noise=_noise(policy))  # the warmed shape
    assert counters["stats"]["unique_graphs"] == before
    runner.infer(pruned, torch.zeros(6), noise=_noise(policy))  # 6 tokens/camera: a prefix bucket not warmed
    compiled = counters["stats"]["unique_graphs"]
    assert compiled > before
    warm_up(runner, [6, 16], repeats=1)
    runner.infer(pruned, torch.zeros(6), noise=_noise(policy))
    runner.infer(cams, torch.zeros(6), noise=_noise(policy))
    assert counters["stats"]["unique_graphs"] == compiled


def test_measured_latency_against_the_executor_deadline() -> None:
    from effvla_ros.core.target_check import latency_problem

    assert latency_problem(0.09, fps=20.0, execution_horizon=2, chunk_size=50, source="measured") is None
    msg = latency_problem(0.25, fps=20.0, execution_horizon=2, chunk_size=50, source="measured")
    assert msg is not None and msg.startswith("execution_horizon:") and "(measured)" in msg and ">= 5" in msg


# ------------------------------------------------------------------------------------------------ packed backend
def test_packed_backend_equals_eager_with_every_hook(policy) -> None:  # type: ignore[no-untyped-def]
    """oneDNN pre-packed weights (fused Q/K/V, gate/up, GELU epilogue) behind the same loops: fp32 actions within
    1e-4 of the eager reference with pruning, expert reuse, early exit, Jacobian-free RTC; the full and the
    Eventful partial encode on the packed weights likewise; VJP guidance refused (no usable backward)."""
    from effvla_ros.core.backends.packed import PackedBackend

    packed = PackedBackend(policy)
    runs = [_every_hook_runs(policy, backend) for backend in ("eager", packed)]
    for a, b in zip(runs[0], runs[1], strict=True):
        assert 0 < (a.actions - b.actions).abs().max() <= 1e-4  # other kernels, same math
        assert (a.exit_layer, a.reused_expert_layers, a.guided) == (b.exit_layer, b.reused_expert_layers, b.guided)
    img = torch.rand(1, 3, 48, 64, generator=torch.Generator().manual_seed(4))
    px = policy.preprocess_image(img)
    assert (packed.encode(px) - policy.encode_pixels(px)).abs().max() <= 1e-4
    ev, ref = packed.eventful_encoder(), EagerBackend(policy).eventful_encoder()
    assert ev.proj is packed.proj
    changed = torch.zeros(8, 8, dtype=torch.bool)
    changed[2:5, 1:4] = True
    px2 = policy.preprocess_image(img.flip(-1))
    outs = [enc.encode_partial(px2, changed, enc.encode_full(px)[1])[0] for enc in (ev, ref)]
    assert (outs[0] - outs[1]).abs().max() <= 1e-4
    with pytest.raises(CapabilityError, match=r"rtc\.guidance.*'packed'"):
        PolicyRunner(policy, backend=packed, rtc=RTCConfig(enabled=True, guidance="vjp"))
    comp = TokenCompressor(policy, backend="packed", count_flops=False)  # by name; patch reuse on packed weights
    comp.process("camera1", img[0])
    comp.process("camera1", img[0].flip(-1))
    assert comp.eventful.proj is comp.backend.proj  # type: ignore[attr-defined]


def test_packed_backend_flops_are_counted_as_the_reference(policy) -> None:  # type: ignore[no-untyped-def]
    """FlopCounterMode counts the oneDNN packed matmuls (core/flops.py) as torch counts mm."""
    from effvla_ros.core.backends.packed import PackedBackend
    from effvla_ros.core.runner import InferenceConfig

    flops = []
    for backend in ("eager", PackedBackend(policy)):
        runner = PolicyRunner(policy, backend=backend, inference=InferenceConfig(count_flops=True))  # type: ignore[arg-type]
        runner.set_instruction(TASK)
        flops.append(runner.infer(_cams(policy), torch.zeros(6), noise=_noise(policy)).flops)
    assert flops[0]["prefill"] > 0 and flops[0]["denoise"] > 0
    assert flops[0] == flops[1]


# ------------------------------------------------------------------------------------------------ dtype "auto"
def test_auto_dtype_is_bf16_only_where_the_cpu_computes_it_natively(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from effvla_ros.core.smolvla import RuntimeConfig
    from effvla_ros.core.smolvla.config import native_bf16, resolve_dtype
    from effvla_ros.core.target_check import check

    for amx, avx512_bf16, expected in ((True, False, "bfloat16"), (False, True, "bfloat16"), (False, False, "float32")):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        assert native_bf16("cpu") is (expected == "bfloat16")
        assert resolve_dtype("auto", "cpu") == expected
        assert RuntimeConfig(vision_dtype="auto", vlm_dtype="auto", expert_dtype="bfloat16").resolved_dtypes() == \
            (expected, expected, "bfloat16")
    assert resolve_dtype("float16", "cpu") == "float16"
    with pytest.raises(ValueError, match="vision_dtype"):
        RuntimeConfig(vision_dtype="int8")
    policy = build_random_policy(tiny_arch(), seed=1, runtime=RuntimeConfig(vision_dtype="auto", vlm_dtype="auto",
                                                                            expert_dtype="auto"))
    assert policy.weights.vision.embeddings.patch_embedding.weight.dtype == torch.float32  # the last case: no bf16
    est = check(tiny_arch(), "x86_cpu", vision_dtype="auto", vlm_dtype="auto", expert_dtype="auto")
    assert est.memory_gb > 0  # "auto" sized as the target's device resolves it


# ------------------------------------------------------------------------------------------------ CUDA-graph backend
def _first_and_guided(policy, backend):  # type: ignore[no-untyped-def]
    """A runner with Jacobian-free RTC on ``backend``: a plain chunk, then one guided toward it (another input)."""
    runner = PolicyRunner(policy, backend=backend, rtc=RTCConfig(enabled=True))
    runner.set_instruction(TASK)
    first = runner.infer(_cams(policy), torch.zeros(6), noise=_noise(policy))
    target = GuidanceTarget(first.x_final, delay=2, valid=policy.arch.chunk_size, ref_state=torch.zeros(6))
    return runner, first, runner.infer(_cams(policy, 1), torch.zeros(6), noise=_noise(policy, 1), guidance=target)


def test_cudagraph_backend_loop_over_static_buffers(policy) -> None:  # type: ignore[no-untyped-def]
    """The denoising loop of the cudagraph backend (captured on CUDA; here its CPU fallback over the same static
    buffers): the same actions as the eager runner with and without Jacobian-free RTC, one graph per prefix shape
    whose buffers are reused chunk after chunk, and what it cannot capture refused by name."""
    from effvla_ros.core.backends.graphs import GraphBackend

    graph_be = GraphBackend(policy)
    runs = {}
    for name, backend in (("eager", "eager"), ("graph", graph_be)):
        runner, first, guided = _first_and_guided(policy, backend)
        keep = torch.arange(0, 16, 2)
        pruned = {c: CameraTokens(ct.tokens[keep], keep, ct.grid) for c, ct in _cams(policy).items()}
        other = runner.infer(pruned, torch.zeros(6), noise=_noise(policy, 2))
        runs[name] = (first, guided, other)
    for a, b in zip(runs["eager"], runs["graph"], strict=True):  # the graphs' prefix is padded to a bucket: the
        torch.testing.assert_close(b.actions, a.actions, rtol=1e-5, atol=1e-5)  # same math, another summation order
    assert runs["graph"][1].guided and not torch.equal(runs["graph"][1].actions, runs["graph"][0].actions)
    assert len(graph_be.graphs) == 2  # the full prefix and the pruned one
    full = next(g for g in graph_be.graphs.values() if g.replays == 2)  # first + guided: the same graph, replayed
    ptr = full.cache.keys[0].data_ptr()
    runner = PolicyRunner(policy, backend=graph_be)
    runner.set_instruction(TASK)
    runner.infer(_cams(policy), torch.zeros(6), noise=_noise(policy))
    assert full.replays == 3 and full.cache.keys[0].data_ptr() == ptr  # static buffers, no reallocation
    with pytest.raises(CapabilityError, match=r"expert_reuse\.enabled.*'cudagraph'"):
        PolicyRunner(policy, backend=graph_be, expert_reuse=ExpertReuseConfig(enabled=True))
    with pytest.raises(CapabilityError, match=r"rtc\.guidance"):
        runner.configure(rtc=RTCConfig(enabled=True, guidance="vjp"))
    from effvla_ros.core.backends.graphs import DenoiseGraph

    short = PolicyRunner(policy, backend="eager")
    short.set_instruction(TASK)
    lang, lmask = short._lang  # type: ignore[misc]
    cache = policy.prefill(short.visual_inputs(_cams(policy)), lang, lmask, policy.prepare_state(torch.zeros(1, 6)))
    small = policy.prefill(short.visual_inputs(pruned), lang, lmask, policy.prepare_state(torch.zeros(1, 6)))
    with pytest.raises(ValueError, match="prefix"):
        DenoiseGraph(policy, cache, 10, 10.0).run(small, _noise(policy))


def test_cudagraph_backend_encode_and_prefill_graphs_equal_eager(policy) -> None:  # type: ignore[no-untyped-def]
    """The encode graph (per image shape) and the prefill graphs (per prefix shape and layer segment; an early
    exit boundary splits the prefill) give the eager backend's tensors exactly, reuse their static buffers, and
    hand out copies: a later replay does not change a cache already returned."""
    from effvla_ros.core.backends.graphs import GraphBackend

    graph_be, eager = GraphBackend(policy), EagerBackend(policy)
    g = torch.Generator().manual_seed(5)
    size = policy.arch.image_size
    px = [torch.rand(1, 3, size, size, generator=g) * 2 - 1 for _ in range(2)]
    first = graph_be.encode(px[0])
    second = graph_be.encode(px[1])
    assert torch.equal(first, eager.encode(px[0])) and torch.equal(second, eager.encode(px[1]))
    assert len(graph_be.encode_graphs) == 1 and next(iter(graph_be.encode_graphs.values())).replays == 2
    assert not torch.equal(first, second)  # the first result was copied out before the second replay

    runner = PolicyRunner(policy, backend="eager")
    runner.set_instruction(TASK)
    lang, lmask = runner._lang  # type: ignore[misc]
    n = policy.arch.num_vlm_layers

    def filled(backend, cams, segments):  # type: ignore[no-untyped-def]  (one layout: the graph backend's bucket)
        cache = policy.begin_prefill(runner.visual_inputs(cams), lang, lmask, policy.prepare_state(torch.zeros(1, 6)),
                                     pad_multiple=graph_be.prefix_bucket)
        for a, b in segments:
            backend.prefill(cache, a, b)
        return cache

    with torch.no_grad():
        for segments in ([(0, n)], [(0, 1), (1, n)]):
            ref = filled(eager, _cams(policy), segments)
            got = filled(graph_be, _cams(policy), segments)
            other = filled(graph_be, _cams(policy, 1), segments)  # replays the same graphs with other inputs
            assert got.num_layers == n and not torch.equal(got.keys[-1], other.keys[-1])
            for a, b in zip(ref.keys + ref.values + [ref.hidden], got.keys + got.values + [got.hidden], strict=True):
                assert torch.equal(a, b)
    assert len(graph_be.prefill_graphs) == 3  # [0, n), [0, 1) and [1, n) of one prefix shape
    assert all(gr.replays == 2 for gr in graph_be.prefill_graphs.values())
    with pytest.raises(ValueError, match="start at 1"):
        graph_be.prefill(filled(graph_be, _cams(policy), []), 1, n)


def test_compiled_graph_backend_equals_eager(policy) -> None:  # type: ignore[no-untyped-def]
    """``cudagraph_compiled``: the same graphs over inductor-compiled layers (here the CPU fallback: compiled calls
    over the static buffers) - one chunk plain and one RTC-guided equal the eager runner's within compiled fp32
    rounding; the capabilities are the graph backend's."""
    from effvla_ros.core.backends.graphs import CompiledGraphBackend

    be = make_backend("cudagraph_compiled", policy)
    assert isinstance(be, CompiledGraphBackend) and not be.caps.expert_plans and not be.caps.vjp
    runs = {name: _first_and_guided(policy, backend)[1:] for name, backend in (("eager", "eager"), ("compiled", be))}
    for a, b in zip(runs["eager"], runs["compiled"], strict=True):
        torch.testing.assert_close(b.actions, a.actions, rtol=1e-4, atol=1e-4)
    px = torch.rand(1, 3, policy.arch.image_size, policy.arch.image_size) * 2 - 1
    torch.testing.assert_close(be.encode(px), policy.encode_pixels(px), rtol=1e-4, atol=1e-4)
    assert len(be.graphs) == 1 and len(be.prefill_graphs) == 1 and len(be.encode_graphs) == 1


def test_flop_counting_runs_the_reference_ops_on_compiled_backends(policy) -> None:  # type: ignore[no-untyped-def]
    """Under FlopCounterMode (``observed()``) a compiled layer runs its reference function: the counter sees every
    op, bit for bit the reference's, and the compiled function is not called under it (on an H200 one counted
    step under the compiler left the compiled denoising loop at the eager speed for the rest of the run)."""
    from torch.utils.flop_counter import FlopCounterMode

    from effvla_ros.core.backends.base import observed

    be = make_backend("compiled", policy)
    assert not observed()
    runner = PolicyRunner(policy, backend="eager")
    runner.set_instruction(TASK)
    lang, lmask = runner._lang  # type: ignore[misc]
    cache = policy.begin_prefill(runner.visual_inputs(_cams(policy)), lang, lmask, policy.prepare_state(torch.zeros(1, 6)))
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        assert observed()
        be.prefill(cache, 0, policy.arch.num_vlm_layers)
    ref = policy.begin_prefill(runner.visual_inputs(_cams(policy)), lang, lmask, policy.prepare_state(torch.zeros(1, 6)))
    with torch.no_grad(), FlopCounterMode(display=False) as fr:
        policy.prefill_layers(ref, 0, policy.arch.num_vlm_layers)
    assert fc.get_total_flops() == fr.get_total_flops() > 0
    assert torch.equal(cache.keys[-1], ref.keys[-1])  # the reference ops ran, bit for bit


def test_vision_position_ids_are_transformers_own(policy) -> None:  # type: ignore[no-untyped-def]
    """The encode computes the patch position ids once per grid (no host round trip: capturable); they are what
    transformers' SmolVLM vision embeddings compute from a full patch mask, for the native and other grids."""
    emb = policy.weights.vision.embeddings
    p = policy.arch.patch_size
    for rows, cols in ((policy.arch.image_size // p,) * 2, (3, 4), (5, 2)):
        x = torch.rand(1, 3, rows * p, cols * p)
        full = torch.ones((1, rows, cols), dtype=torch.bool)
        with torch.no_grad():
            ref = emb(pixel_values=x, patch_attention_mask=full)
            ours = emb.patch_embedding(x).flatten(2).transpose(1, 2) + emb.position_embedding(
                policy.vision_position_ids(rows, cols, x.device))
        assert torch.equal(ref, ours)
    assert policy.vision_position_ids(3, 4, torch.device("cpu")) is policy.vision_position_ids(3, 4, torch.device("cpu"))


def test_compiled_backend_keeps_its_compile_cache_across_restarts(policy, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from effvla_ros.core.backends.compiled import CompiledBackend, compile_cache_dir

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache_dir() == tmp_path / "effvla_ros" / "inductor"
    backend = CompiledBackend(policy)
    import os

    from torch._inductor.runtime.cache_dir_utils import cache_dir

    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "effvla_ros" / "inductor")
    assert backend.caps.name == "compiled"
    assert cache_dir() == str(tmp_path / "effvla_ros" / "inductor")  # where inductor writes and looks up graphs
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert compile_cache_dir() == tmp_path / "mine"  # an explicit choice wins
