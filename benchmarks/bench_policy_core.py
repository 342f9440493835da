"""Per-stage wall time and FLOPs of the SmolVLA policy core at the real SmolVLA-450M size.

Random weights (no download), two cameras at 256x256 (resized with padding to 512), a 48-token task,
chunk 50, 10 denoising steps. Wall time is the median of ``--runs`` runs after one warm-up; FLOPs come
from one extra run under ``torch.utils.flop_counter.FlopCounterMode``.

usage: python benchmarks/bench_policy_core.py [--threads 2] [--runs 3] [--device cpu]
                                              [--modes fp32,lerobot-bf16,bf16] [--json OUT.json]
A mode suffixed ``+fused`` (e.g. ``fp32+fused``) runs the VLM/expert attention through torch SDPA
(``RuntimeConfig.attention="fused"``) instead of LeRobot's eager path.
Reference (LeRobot 0.6.1, this kind of CPU, 2 threads, fp32): vision 0.89 s per camera, prefill 0.27 s,
0.088 s per denoising step, 2.98 s per chunk.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from effvla_ros.core.smolvla import RuntimeConfig, build_random_policy, smolvla_450m_arch  # noqa: E402

MODES = {
    "fp32": dict(vision_dtype="float32", vlm_dtype="float32", expert_dtype="float32"),
    "lerobot-bf16": dict(vision_dtype="bfloat16", vlm_dtype="bfloat16", expert_dtype="float32"),
    "bf16": dict(vision_dtype="bfloat16", vlm_dtype="bfloat16", expert_dtype="bfloat16"),
    "fp16": dict(vision_dtype="float16", vlm_dtype="float16", expert_dtype="float16"),
}


def run_once(policy, obs, noise, lang, lmask):
    with torch.no_grad():
        images, state, _ = policy.split_observation(obs)
        enc = policy.encode_images(images)
        cache = policy.prefill(enc.tokens, lang, lmask, policy.prepare_state(state))
        den = policy.denoise(cache, noise)
    return {"vision/cam": sum(s.wall_s for s in enc.stats.values()) / len(enc.stats),
            "prefill": cache.stats.wall_s, "denoise": den.stats.wall_s,
            "step": den.stats.wall_s / policy.num_steps,
            "chunk": sum(s.wall_s for s in enc.stats.values()) + cache.stats.wall_s + den.stats.wall_s}, \
        {"vision/cam": sum(s.flops or 0 for s in enc.stats.values()) / len(enc.stats),
         "prefill": cache.stats.flops or 0, "denoise": den.stats.flops or 0,
         "step": (den.stats.flops or 0) / policy.num_steps,
         "chunk": sum(s.flops or 0 for s in enc.stats.values()) + (cache.stats.flops or 0) + (den.stats.flops or 0)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3, help="timed runs per mode (after one warm-up)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--modes", default="fp32,lerobot-bf16,bf16")
    ap.add_argument("--no-flops", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    arch = smolvla_450m_arch()
    t0 = time.perf_counter()
    policy = build_random_policy(arch, seed=0, init="transformers", runtime=RuntimeConfig(device=args.device))
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in policy.weights.parameters())
    n_used = n_params - policy.weights.model.vlm_with_expert.vlm.lm_head.weight.numel()
    g = torch.Generator().manual_seed(0)
    obs = {f"observation.images.{c}": torch.rand(1, 3, 256, 256, generator=g) for c in arch.cameras}
    obs["observation.state"] = torch.randn(1, arch.state_dim, generator=g)
    noise = torch.randn(1, arch.chunk_size, arch.max_action_dim, generator=g)
    lang = torch.randint(0, 49000, (1, arch.tokenizer_max_length), generator=g)
    lmask = torch.zeros(1, arch.tokenizer_max_length, dtype=torch.bool)
    lmask[:, :12] = True  # a typical task: 12 valid tokens, padded to 48
    print(f"# SmolVLA-450M random weights: {n_params / 1e6:.1f} M parameters ({n_used / 1e6:.1f} M without lm_head), "
          f"built in {build_s:.1f} s; device {args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"prefix {2 * arch.tokens_per_camera + arch.tokenizer_max_length + 1} tokens, chunk {arch.chunk_size}, "
          f"{arch.num_steps} steps; median of {args.runs} runs")
    rows: dict = {}
    cols = ["vision/cam", "prefill", "step", "denoise", "chunk"]
    flops = None
    for mode in args.modes.split(","):
        t_mode = time.perf_counter()
        dtypes, _, attn = mode.partition("+")
        if dtypes not in MODES or attn not in ("", "fused"):
            ap.error(f"--modes: unknown mode {mode!r} (one of {sorted(MODES)}, optionally suffixed +fused)")
        policy.apply_runtime(RuntimeConfig(device=args.device, attention=attn or "eager", **MODES[dtypes]))
        run_once(policy, obs, noise, lang, lmask)  # warm-up
        times = [run_once(policy, obs, noise, lang, lmask)[0] for _ in range(args.runs)]
        rows[mode] = {k: statistics.median(t[k] for t in times) for k in times[0]}
        print(f"# {mode}: " + ", ".join(f"{k} {v:.3f} s" for k, v in rows[mode].items())
              + f" ({time.perf_counter() - t_mode:.0f} s)", file=sys.stderr, flush=True)
    if not args.no_flops:  # FLOPs do not depend on the dtype: count once, fp32
        policy.apply_runtime(RuntimeConfig(device=args.device, count_flops=True))
        flops = run_once(policy, obs, noise, lang, lmask)[1]
    print("\n| mode | " + " | ".join(f"{c} [s]" for c in cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for mode, r in rows.items():
        print(f"| {mode} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |")
    if flops is not None:
        print("\n| stage | " + " | ".join(cols) + " |")
        print("|---|" + "---:|" * len(cols))
        print("| GFLOP | " + " | ".join(f"{flops[c] / 1e9:.2f}" for c in cols) + " |")
        print("\n(FlopCounterMode: matmul/conv/attention FLOPs, 2 per multiply-add; the same for every dtype)")
    if args.json:
        Path(args.json).write_text(json.dumps({"time_s": rows, "flops": flops}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
