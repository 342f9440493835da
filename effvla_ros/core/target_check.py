"""Startup check: will this checkpoint and configuration fit the target, and keep up with it?

Estimates, from the architecture alone (no weights are loaded):

* memory — weights per stage in the configured dtype (parameters counted on a meta-device build of
  the real module tree), vision activations for the configured cameras (one layer alive at a
  time, attention scores included), the VLM prefix KV cache, expert activations, the token
  compressor's per-layer reuse cache, and a fixed runtime overhead (CUDA context / allocator);
* compute — FLOPs per chunk with every optimization off (analytic counts of the matmuls, within
  a few % of ``torch.utils.flop_counter``; the benchmarks measure the real numbers), and the
  resulting latency at the target's *effective* throughput, against the time the executor has
  before it needs the next chunk (``execution_horizon / fps``).

Target figures are published peak numbers where they exist (NVIDIA Jetson data sheets) multiplied
by an efficiency factor that is an ESTIMATE (PyTorch eager on Jetson reaches a fraction of peak);
every number says which it is. ``check(...)`` returns a report; ``enforce(...)`` raises
``ValueError`` naming the parameter to change.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from effvla_ros.core.smolvla.config import SmolVLAArch, resolve_dtype

GB = 1024**3
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class TargetSpec:
    name: str
    memory_gb: float  # physical memory (Jetson: shared by CPU and GPU)
    memory_budget_gb: float  # what the policy stack may use (OS, ROS, drivers, cameras take the rest)
    peak_tflops: float  # dense FP16/BF16 tensor throughput (CPU: measured)
    efficiency: float  # fraction of peak PyTorch eager reaches on this model (estimate)
    runtime_overhead_gb: float  # CUDA context, allocator slack, Python/ROS processes
    source: str


TARGETS: dict[str, TargetSpec] = {
    # Orin Nano 8GB (Super mode): 8 GB LPDDR5 shared; 67 INT8 TOPS sparse -> ~17 FP16 TFLOPS dense
    # tensor (published peak / 4). Budget: ~3 GB go to Ubuntu + ROS 2 + camera drivers (estimate).
    "orin_nano_8gb": TargetSpec("orin_nano_8gb", 8.0, 5.0, 17.0, 0.25, 0.8,
                                "NVIDIA Jetson Orin Nano Super data sheet (67 TOPS sparse INT8); budget and "
                                "efficiency are estimates"),
    "orin_nx_16gb": TargetSpec("orin_nx_16gb", 16.0, 12.0, 25.0, 0.25, 0.8,
                               "Jetson Orin NX 16GB data sheet (100 TOPS sparse INT8); estimates for the rest"),
    "agx_orin_64gb": TargetSpec("agx_orin_64gb", 64.0, 48.0, 85.0, 0.25, 1.0,
                                "Jetson AGX Orin 64GB data sheet (275 TOPS sparse INT8); estimates for the rest"),
    "agx_thor": TargetSpec("agx_thor", 128.0, 100.0, 250.0, 0.2, 1.0,
                           "Jetson AGX Thor data sheet (2070 FP4 TFLOPS sparse -> ~250 dense FP16, estimate)"),
    # x86 CPU as in this project's CI: 2 cores with AMX, measured 2.4 TFLOP/s bf16 / 0.37 fp32 on a
    # 2048^2 matmul at 2 threads; efficiency on the whole model measured ~0.4 (LeRobot fp32 2.94 s
    # for 521 GFLOP -> 0.18 TFLOP/s of 0.37).
    "x86_cpu": TargetSpec("x86_cpu", 24.0, 16.0, 0.37, 0.45, 0.5,
                          "measured on the 2-core CI machine (fp32 peak); bf16 is ~6x faster there"),
}


@dataclass
class Estimate:
    target: TargetSpec
    rows: list[tuple[str, float, str]] = field(default_factory=list)  # (item, GB, note)
    memory_gb: float = 0.0
    gflops_per_chunk: dict[str, float] = field(default_factory=dict)
    latency_s: float = 0.0
    deadline_s: float = 0.0
    problems: list[str] = field(default_factory=list)  # "<parameter>: reason"

    def table(self) -> str:
        t = self.target
        lines = [f"target {t.name}: {t.memory_gb:g} GB memory, budget {t.memory_budget_gb:g} GB "
                 "(memory_budget_gb), "
                 f"peak {t.peak_tflops:g} TFLOP/s x efficiency {t.efficiency:g} (estimate)",
                 f"{'item':<34}{'GB':>9}  note"]
        for item, gb, note in self.rows:
            lines.append(f"{item:<34}{gb:>9.3f}  {note}")
        lines.append(f"{'total memory':<34}{self.memory_gb:>9.3f}  budget {t.memory_budget_gb:g} GB")
        lines.append(f"{'stage':<34}{'GFLOP':>9}")
        for k, v in self.gflops_per_chunk.items():
            lines.append(f"{k:<34}{v:>9.1f}")
        lines.append(f"{'estimated latency per chunk':<34}{self.latency_s:>9.3f}  s (deadline {self.deadline_s:.3f} s"
                     " = execution_horizon / fps)")
        lines.append("verdict: " + ("OK" if not self.problems else "REFUSED\n  " + "\n  ".join(self.problems)))
        return "\n".join(lines)


_PREFIXES = {
    "vision": "model.vlm_with_expert.vlm.model.vision_model.",
    "connector": "model.vlm_with_expert.vlm.model.connector.",
    "text": "model.vlm_with_expert.vlm.model.text_model.",
    "lm_head": "model.vlm_with_expert.vlm.lm_head.",
    "expert": "model.vlm_with_expert.lm_expert.",
}


def _bucket(name: str) -> str:
    for k, pre in _PREFIXES.items():
        if name.startswith(pre):
            return k
    return "expert"  # state/action projections and time MLP run with the expert


def param_counts(arch: SmolVLAArch, weights_file: str | None = None) -> dict[str, int]:
    """Parameters per stage: from a checkpoint's safetensors header (exact, instant) or from a
    meta-device build of the real module tree (no memory, a few seconds at real size)."""
    counts = dict.fromkeys(_PREFIXES, 0)
    if weights_file:
        from safetensors import safe_open

        with safe_open(weights_file, framework="pt") as f:
            for name in f.keys():
                counts[_bucket(name)] += math.prod(f.get_slice(name).get_shape())
        return counts
    import torch

    from effvla_ros.core.smolvla.model import build_weights

    with torch.device("meta"):
        w = build_weights(arch)
    for name, p in w.state_dict().items():
        counts[_bucket(name)] += p.numel()
    return counts


def _flops(arch: SmolVLAArch, cameras: int, num_steps: int, keep_ratio: float) -> dict[str, float]:
    """Analytic GFLOP per chunk (2 FLOP per multiply-add), every optimization off except keep_ratio."""
    d, m, lv = arch.vision_hidden_size, arch.vision_intermediate_size, arch.vision_num_layers
    side = (arch.resize_imgs_with_padding[0] if arch.resize_imgs_with_padding else arch.image_size) // arch.patch_size
    npatch = side * side
    vis = lv * (2 * npatch * (4 * d * d + 2 * d * m) + 4 * npatch * npatch * d) + 2 * npatch * 3 * arch.patch_size**2 * d
    tokens = arch.tokens_per_camera
    conn = 2 * tokens * d * arch.scale_factor**2 * arch.text_hidden_size
    per_cam = vis + conn
    p = int(round(cameras * tokens * keep_ratio)) + arch.tokenizer_max_length + 1
    dt, mt, kv = arch.text_hidden_size, arch.text_intermediate_size, arch.num_key_value_heads * arch.head_dim
    q = arch.num_attention_heads * arch.head_dim
    layer_lin = 2 * (dt * q + 2 * dt * kv + q * dt + 3 * dt * mt)
    prefill = arch.num_vlm_layers * (p * layer_lin + 4 * p * p * q)
    de, me, s = arch.expert_hidden_size, arch.expert_intermediate_size, arch.chunk_size
    e_lin = 2 * (de * q + 2 * de * kv + q * de + 3 * de * me)
    expert_step = arch.n_expert_layers * (s * e_lin + 4 * s * (p + s) * q) + 2 * s * 4 * de * de
    return {"vision": cameras * per_cam / 1e9, "prefill": prefill / 1e9, "denoise": num_steps * expert_step / 1e9}


def check(arch: SmolVLAArch, target: str, *, cameras: int | None = None, vision_dtype: str = "float32",
          vlm_dtype: str = "float32", expert_dtype: str = "float32", num_steps: int | None = None,
          keep_ratio: float = 1.0, fps: float = 30.0, execution_horizon: int = 25,
          memory_budget_gb: float | None = None, reuse_cache: bool = True,
          weights_file: str | None = None) -> Estimate:
    if target not in TARGETS:
        raise ValueError(f"target: {target!r} is not one of {sorted(TARGETS)}")
    spec = TARGETS[target]
    device = "cpu" if target == "x86_cpu" else "cuda"  # "auto" dtypes as the target's device resolves them
    vision_dtype, vlm_dtype, expert_dtype = (resolve_dtype(d, device) for d in (vision_dtype, vlm_dtype, expert_dtype))
    if memory_budget_gb is not None:
        spec = TargetSpec(**{**spec.__dict__, "memory_budget_gb": memory_budget_gb})
    ncam = len(arch.cameras) if cameras is None else cameras
    steps = num_steps or arch.num_steps
    est = Estimate(spec)
    counts = param_counts(arch, weights_file)
    bv, bt, be = _BYTES[vision_dtype], _BYTES[vlm_dtype], _BYTES[expert_dtype]
    rows = est.rows
    rows.append(("weights: vision + connector", (counts["vision"] + counts["connector"]) * bv / GB,
                 f"{(counts['vision'] + counts['connector']) / 1e6:.1f} M params, {vision_dtype} (vision_dtype)"))
    rows.append(("weights: VLM text layers", counts["text"] * bt / GB,
                 f"{counts['text'] / 1e6:.1f} M params incl. embeddings, {vlm_dtype} (vlm_dtype)"))
    rows.append(("weights: action expert + projections", counts["expert"] * be / GB,
                 f"{counts['expert'] / 1e6:.1f} M params, {expert_dtype} (expert_dtype)"))
    if counts["lm_head"]:
        rows.append(("weights: lm_head (loaded, unused)", counts["lm_head"] * bt / GB,
                     f"{counts['lm_head'] / 1e6:.1f} M params kept for checkpoint interchange"))
    side = (arch.resize_imgs_with_padding[0] if arch.resize_imgs_with_padding else arch.image_size) // arch.patch_size
    npatch = side * side
    act_vis = (npatch * (3 * arch.vision_hidden_size + arch.vision_intermediate_size) * bv
               + arch.vision_num_heads * npatch * npatch * 4)  # fp32 softmax of one layer
    rows.append(("activations: vision (1 layer live)", act_vis / GB, f"{side}x{side} patches, attention in fp32"))
    p = int(round(ncam * arch.tokens_per_camera * keep_ratio)) + arch.tokenizer_max_length + 1
    kv = 2 * arch.num_vlm_layers * p * arch.num_key_value_heads * arch.head_dim * bt
    rows.append(("KV cache of the prefix", kv / GB, f"{p} tokens x {arch.num_vlm_layers} layers ({ncam} cameras)"))
    if reuse_cache:
        cache = ncam * arch.vision_num_layers * npatch * 3 * arch.vision_hidden_size * bv
        rows.append(("reuse cache (per-layer x, K, V)", cache / GB, f"{ncam} cameras x {arch.vision_num_layers} layers"))
    act_exp = (arch.chunk_size * (p + arch.chunk_size) * arch.num_attention_heads * 4
               + arch.chunk_size * 4 * arch.expert_intermediate_size * be)
    rows.append(("activations: expert", act_exp / GB, f"chunk {arch.chunk_size}"))
    rows.append(("runtime overhead", spec.runtime_overhead_gb, "CUDA context / allocator / processes (estimate)"))
    est.memory_gb = sum(r[1] for r in rows)
    est.gflops_per_chunk = _flops(arch, ncam, steps, keep_ratio)
    total = sum(est.gflops_per_chunk.values())
    speed = spec.peak_tflops * spec.efficiency * (6.0 if target == "x86_cpu" and vlm_dtype != "float32" else 1.0)
    est.latency_s = total / (speed * 1e3)
    est.deadline_s = execution_horizon / fps
    if est.memory_gb > spec.memory_budget_gb:
        fix = ("vision_dtype/vlm_dtype: use float16 or bfloat16" if "float32" in (vision_dtype, vlm_dtype)
               else "cameras: use fewer cameras, or memory_budget_gb if the target has more free memory")
        est.problems.append(f"memory_budget_gb: estimated {est.memory_gb:.2f} GB exceeds the budget of "
                            f"{spec.memory_budget_gb:g} GB on {target}; {fix}")
    problem = latency_problem(est.latency_s, fps, execution_horizon, arch.chunk_size, "estimate")
    if problem:
        est.problems.append(problem)
    return est


def latency_problem(latency_s: float, fps: float, execution_horizon: int, chunk_size: int, source: str) -> str | None:
    """The startup check's latency rule: a chunk must arrive before the executor runs out of the previous one
    (``execution_horizon`` actions at ``fps``). ``source``: "estimate" (FLOPs / throughput) or "measured" (warm-up)."""
    deadline = execution_horizon / fps
    if latency_s <= deadline:
        return None
    return (f"execution_horizon: a chunk takes ~{latency_s:.2f} s ({source}) but the executor needs the next one after "
            f"{execution_horizon} actions at {fps:g} Hz = {deadline:.2f} s; raise execution_horizon to >= "
            f"{math.ceil(latency_s * fps)} (<= chunk_size {chunk_size}), lower num_steps, the keep ratio "
            "(pruning.keep_ratio), use a faster backend or target")


def enforce(est: Estimate) -> None:
    if est.problems:
        raise ValueError("startup check refused this configuration:\n  " + "\n  ".join(est.problems)
                         + "\n(run `effvla check-target` for the full estimate)")


def read_arch(checkpoint: str, vlm_dir: str | None = None) -> SmolVLAArch:
    """The architecture of a checkpoint directory without loading its weights."""
    import json
    from pathlib import Path

    from effvla_ros.core.smolvla.checkpoint import CheckpointError, load_vlm_files, resolve_vlm_dir

    d = Path(checkpoint)
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"checkpoint: {d} has no config.json (not a LeRobot SmolVLA checkpoint directory)")
    cfg = json.loads(cfg_path.read_text())
    vlm_path = resolve_vlm_dir(cfg.get("vlm_model_name", SmolVLAArch.vlm_model_name), vlm_dir=vlm_dir, checkpoint_dir=d)
    vlm_cfg, _ = load_vlm_files(vlm_path)
    return SmolVLAArch.from_vlm_config(vlm_cfg, **SmolVLAArch.policy_fields_from_lerobot(cfg))


def check_checkpoint(checkpoint: str, target: str, vlm_dir: str | None = None, **kw: Any) -> Estimate:
    from pathlib import Path

    arch = read_arch(checkpoint, vlm_dir)
    weights = Path(checkpoint) / "model.safetensors"
    return check(arch, target, weights_file=str(weights) if weights.is_file() else None, **kw)


def device_problem(device: str, target: str | None = None) -> str | None:
    """Why torch ``device`` cannot run here (None: it can), naming ``device``, the target and how to override.

    Checked at node start, before any weight or tensor touches the device: torch's own failure for a
    missing accelerator is an ``AssertionError: Torch not compiled with CUDA enabled`` deep in the
    model load, naming neither the parameter nor the target that asked for it."""
    import torch

    on = f" (target {target})" if target else ""
    fix = ("override with device:=cpu" + (" (and target:=x86_cpu for the CPU startup check)"
                                         if target and target != "x86_cpu" else "")
           + ", or run on a machine with that accelerator")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        return f"device: {device!r} is not a torch device ({e}); use cpu, cuda or cuda:<index>"
    if dev.type == "cuda":
        if not torch.backends.cuda.is_built():
            why = f"this torch ({torch.__version__}) is built without CUDA"
        elif not torch.cuda.is_available():
            why = "CUDA finds no GPU on this machine"
        elif dev.index is not None and dev.index >= torch.cuda.device_count():
            why = f"this machine has {torch.cuda.device_count()} CUDA device(s)"
        else:
            return None
        return f"device: {device!r}{on} cannot be used: {why}; {fix}"
    if dev.type == "mps" and not torch.backends.mps.is_available():
        return f"device: {device!r}{on} cannot be used: MPS is not available on this machine; {fix}"
    if dev.type not in ("cpu", "cuda", "mps"):
        return f"device: {device!r}{on} is not supported by effvla_ros (cpu, cuda, cuda:<index>, mps)"
    return None


def check_device(device: str, target: str | None = None) -> None:
    """Raise ``ValueError`` with :func:`device_problem`'s reason when ``device`` cannot run here."""
    problem = device_problem(device, target)
    if problem:
        raise ValueError(problem)
