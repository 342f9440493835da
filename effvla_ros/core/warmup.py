"""Warm-up at start: run every shape a backend will meet once, then measure the stages.

A compiled backend compiles on the first call of each shape (prefix length bucket, image size); an eager
one allocates and selects kernels. Without a warm-up the first chunks of a robot run would be seconds late.
:func:`warm_up` runs one dummy inference per kept-token count the pipeline will send (the full grid and the
pruning's count) and one dummy full encode, then times each stage once more, warm. The measured times feed
the startup check (:func:`effvla_ros.core.target_check.latency_problem`): a real latency, not a FLOP estimate.

The runner's state is left as it was: the instruction is restored and the early-exit reference dropped.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from effvla_ros.core.runner import CameraTokens, PolicyRunner
from effvla_ros.core.smolvla.policy import SmolVLAPolicy

WARMUP_INSTRUCTION = "warm up"


@dataclass
class WarmupReport:
    seconds: float                 # wall time of the whole warm-up (compilation included)
    encode_s: float                # one full camera encode, warm, fastest of the repeats (0: not measured)
    prefill_s: float               # prefill of the largest prefix warmed, warm, fastest of the repeats
    denoise_s: float               # one chunk's denoising, warm, fastest of the repeats
    buckets: tuple[int, ...]       # visual tokens per camera warmed

    def chunk_latency_s(self, cameras: int) -> float:
        """Measured latency of one chunk: every camera encoded, then prefill and denoising."""
        return cameras * self.encode_s + self.prefill_s + self.denoise_s

    def describe(self, cameras: int) -> str:
        return (f"warm-up {self.seconds:.1f} s ({len(self.buckets)} prefix shapes: {list(self.buckets)} tokens/camera); "
                f"measured per chunk {self.chunk_latency_s(cameras):.3f} s = {cameras} x encode {self.encode_s:.3f} + "
                f"prefill {self.prefill_s:.3f} + denoise {self.denoise_s:.3f}")


def keep_counts(tokens_per_camera: int, keep_ratios: Sequence[float]) -> list[int]:
    """Kept-token counts per camera to warm: the full grid and each ratio's count (rounded as the pruning does,
    at least one token)."""
    counts = {tokens_per_camera}
    counts.update(max(1, min(tokens_per_camera, round(r * tokens_per_camera))) for r in keep_ratios)
    return sorted(counts)


@torch.no_grad()
def time_encode(policy: SmolVLAPolicy, encode: Callable[[Tensor], Tensor], repeats: int = 2) -> float:
    """Run ``encode`` (a backend's full-frame encoder) on a dummy model-size frame in the vision dtype, as the
    token compressor sends them (the first call compiles / allocates), then time it warm: the fastest of
    ``repeats`` calls (s)."""
    arch = policy.arch
    dtype = policy.weights.vision.embeddings.patch_embedding.weight.dtype
    pixels = torch.zeros(1, 3, arch.image_size, arch.image_size, device=policy.device, dtype=dtype)
    encode(pixels)
    walls = []
    for _ in range(repeats):
        t = time.perf_counter()
        encode(pixels)
        walls.append(time.perf_counter() - t)
    return min(walls)


def warm_up(runner: PolicyRunner, counts: Sequence[int], *, encode: Callable[[Tensor], Tensor] | None = None,
            repeats: int = 2) -> WarmupReport:
    """Run ``runner`` (and ``encode``, a backend's full-frame encoder) on dummy inputs for each kept-token count in
    ``counts``, then time each stage warm ``repeats`` times. Each stage's time is the fastest of its repeats (what
    the hardware can do: a transient load elsewhere on the machine does not count), of the largest prefix."""
    pol = runner.policy
    arch = pol.arch
    t0 = time.perf_counter()
    instruction, lang = runner.instruction, runner._lang
    runner.set_instruction(WARMUP_INSTRUCTION)
    side = arch.patches_per_side // arch.scale_factor
    grid = (side, side)
    state = torch.zeros(arch.state_dim)
    noise = torch.zeros(1, arch.chunk_size, arch.max_action_dim)
    prefill_s = denoise_s = encode_s = 0.0
    try:
        for k in sorted(set(counts)):
            cams = {c: CameraTokens(torch.zeros(k, arch.text_hidden_size), torch.arange(k), grid) for c in pol.cameras}
            times = []
            for i in range(1 + repeats):
                res = runner.infer(cams, state, noise=noise)
                runner.prefix_reuse.reset()
                if i > 0:  # the first call compiles / allocates
                    times.append(res.times)
            prefill_s = max(prefill_s, min(t["prefill_s"] for t in times))
            denoise_s = max(denoise_s, min(t["denoise_s"] for t in times))
        if encode is not None:
            encode_s = time_encode(pol, encode, repeats)
    finally:
        runner.prefix_reuse.reset()
        runner.instruction, runner._lang = instruction, lang
    return WarmupReport(time.perf_counter() - t0, encode_s, prefill_s, denoise_s, tuple(sorted(set(counts))))
