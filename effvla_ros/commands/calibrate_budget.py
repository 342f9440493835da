"""``effvla calibrate-budget``: the table of the latency-budget mode, measured on your own recording.

    effvla calibrate-budget BAG --checkpoint CKPT --out table.yaml [--grid pruning.keep_ratio=1.0,0.5,0.25 ...]

Replays BAG (as ``effvla replay`` does) under every combination of the grid's settings and writes, per setting, its
p95 latency on this machine and how far its actions move from the unconstrained policy. Run it on the robot's
computer (latencies are the machine's); the policy then uses it with ``latency_budget_ms`` and
``latency_budget_table`` (core/budget.py).
"""
from __future__ import annotations

import argparse
import datetime
import platform
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    from effvla_ros.core.budget import DEFAULT_GRID

    p.add_argument("bag", help="rosbag2 directory or .mcap/.db3 file of your robot (cameras, joint states, instruction)")
    p.add_argument("--checkpoint", required=True, help="LeRobot SmolVLA checkpoint directory")
    p.add_argument("--vlm-dir", default=None)
    p.add_argument("--out", required=True, help="the table (YAML) to write")
    p.add_argument("--grid", action="append", default=None,
                   help="one axis of the grid, in the --sweep grammar (repeat; the product is measured). Default: "
                        + " ".join(DEFAULT_GRID))
    p.add_argument("--target", default=None, help="deployment target (joint names and limits as replay takes them)")
    p.add_argument("--max-steps", type=int, default=0, help="observations replayed at most (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=2,
                   help="first observations of each setting left out of its latency (first calls allocate)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default): as the nodes run")
    from effvla_ros.commands.replay import add_backend_arguments

    add_backend_arguments(p)


def run(args: argparse.Namespace) -> int:
    import torch

    from effvla_ros.core.budget import DEFAULT_GRID, BudgetTable, entries_from_replay, grid_sweep
    from effvla_ros.replay.pipeline import ReplayConfig, run_replay

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    grid = grid_sweep(args.grid or list(DEFAULT_GRID))
    cfg = ReplayConfig(bag=args.bag, checkpoint=args.checkpoint, vlm_dir=args.vlm_dir, target=args.target,
                       sweep=grid, sweep_mode="product", max_steps=args.max_steps, seed=args.seed, flops="off",
                       progress=not args.quiet, backend=args.backend, dtype=args.dtype)
    result = run_replay(cfg)
    report = result.report

    entries = entries_from_replay(report, result.runs, args.warmup)
    table = BudgetTable(entries, {
        "bag": str(Path(args.bag)), "checkpoint": str(args.checkpoint), "grid": grid,
        "observations": len(result.episode.observations), "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "backend": args.backend, "dtypes": report["replay"]["dtypes"],
        "warmup": args.warmup, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "deviation": "normalized RMSE of the actions vs the first (unconstrained) setting, by the action std"})
    out = table.save(args.out)
    print("| setting | p95 latency [ms] | deviation (nRMSE) | max |Δa| |")
    print("|---|---:|---:|---:|")
    for e in sorted(entries, key=lambda e: e.latency_ms):
        print(f"| {e.name} | {e.latency_ms:.1f} | {e.deviation:.4f} | {e.max_abs:.4f} |")
    print(f"wrote {out} ({len(entries)} settings, {len(result.episode.observations)} observations)")
    return 0
