"""Pruning-aware training's token selection: one image at a time (the runtime's ``select_tokens``, the
compressor's call per camera and inference; ``--prune-train`` looped over it until 2026-11-23) against the
whole batch at once (``keep_mask_batch``, what training calls now, and what ``select_tokens`` calls with a
batch of one) — side by side in one run, same inputs, and the kept sets compared.

    python benchmarks/bench_prune_selection.py [--batch 16] [--tokens 16] [--rounds 5] [--reps 20] [--threads 1]

Inputs are the recipe's shapes: ``--batch`` pruned samples (half of the recipe's batch of 32), two cameras of
``--tokens`` connector tokens of 64 dims each, instructions of 6-8 token embeddings. Each round times ``--reps``
selections of each way in turn; the table reports the median per selection of the batch over all rounds.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from effvla_ros.core.compression.pruning import PruningConfig, keep_mask_batch, select_tokens

    g = torch.Generator().manual_seed(0)
    side = int(math.isqrt(args.tokens))
    grid = (side, side)
    cams = [torch.randn(args.batch, side * side, 64, generator=g) for _ in range(2)]
    lens = torch.randint(6, 9, (args.batch,), generator=g)
    mask = torch.arange(8)[None, :] < lens[:, None]
    task = torch.randn(args.batch, 8, 64, generator=g) * mask[..., None]
    cfg = PruningConfig(keep_ratio=0.5)

    def per_image() -> list[torch.Tensor]:
        out = []
        for vis in cams:
            m = torch.zeros(vis.shape[:2], dtype=torch.bool)
            for i in range(args.batch):
                m[i, select_tokens(vis[i], task[i][mask[i]], grid, cfg)] = True
            out.append(m)
        return out

    def batched() -> list[torch.Tensor]:
        return [keep_mask_batch(vis, task, mask, grid, cfg) for vis in cams]

    same = all(torch.equal(a, b) for a, b in zip(per_image(), batched(), strict=True))
    times: dict[str, list[float]] = {"per image (select_tokens)": [], "batch (keep_mask_batch)": []}
    fns = dict(zip(times, (per_image, batched), strict=True))
    for _ in range(args.rounds):
        for name, fn in fns.items():
            fn()
            t0 = time.perf_counter()
            for _ in range(args.reps):
                fn()
            times[name].append((time.perf_counter() - t0) / args.reps)
    base = statistics.median(times["per image (select_tokens)"])
    print(f"batch {args.batch} pruned samples x 2 cameras x {side * side} tokens, {args.threads} thread(s); "
          f"kept sets identical: {same}")
    print(f"{'selection':<28} {'ms per batch':>12} {'ratio':>7}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<28} {1e3 * med:>12.2f} {med / base:>7.3f}")


if __name__ == "__main__":
    main()
