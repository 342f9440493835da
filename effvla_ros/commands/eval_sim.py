"""``effvla eval-sim``: closed-loop success rate of a checkpoint in simulation, under several settings.

Runs ``--episodes`` episodes (seeds ``--seed``, ``--seed`` + 1, ...) of the two-cube task with the
policy driven through the same core path as the ROS nodes (TokenCompressor -> PolicyRunner) and
reports per setting the success rate, the episode length, and per inference the encoder FLOPs, the
kept / reused visual tokens, the stage times (and FLOPs with ``--count-flops``). The first setting is
the baseline with every optimization off; each ``--sweep name=v1,v2`` adds one setting per value on
top of it (``group.field``: pruning.*, reuse.*, early_exit.*, expert_reuse.*, rtc.*, correction.*, num_steps,
horizon, delay_steps, correction_lag; list values ``a:b:c``; join several changes of one setting with ``+``) - the
grammar of ``effvla replay`` too, see :mod:`effvla_ros.core.settings`. Each failed episode is classified
(wrong cube / missed / not lifted / not placed / no grasp, from where the gripper first closed:
:func:`effvla_ros.train.evaluate.classify_outcome`). Prints a table; ``--out`` writes the full report
(incl. every episode) as JSON. See :mod:`effvla_ros.train.evaluate`.

``--latency-budget-ms B --latency-budget-table T.yaml`` (both or neither) runs every setting under the
latency-budget mode of the policy node: each inference takes the entry of the table (``effvla calibrate-budget``)
that the budget controller chooses, on top of the setting's own configs; the report adds per setting the fraction
of inferences measured within B, their p95 latency and the entries chosen.
"""
from __future__ import annotations

import argparse
import math
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="LeRobot-layout checkpoint directory")
    parser.add_argument("--episodes", type=int, default=20, help="episodes per setting (default 20)")
    parser.add_argument("--seed", type=int, default=100_000,
                        help="seed of the first episode (default 100000, disjoint from gen-demos' default seeds)")
    parser.add_argument("--sweep", action="extend", nargs="+", default=[], metavar="NAME=V1,V2",
                        help="add one setting per value on top of the baseline (repeatable), by group.field: "
                             "pruning.*, reuse.*, early_exit.*, expert_reuse.*, rtc.*, correction.*, num_steps, "
                             "horizon, delay_steps, correction_lag; list values a:b:c; NAME=V+NAME=V: one setting with several changes")
    parser.add_argument("--sweep-mode", default="one-at-a-time", choices=["one-at-a-time", "product"],
                        help="each sweep item's settings alone on the baseline (default) or every combination")
    parser.add_argument("--delay-steps", type=int, default=0,
                        help="emulated inference delay in control steps, for every setting (default 0)")
    parser.add_argument("--horizon", type=int, default=0,
                        help="actions executed per chunk (default: the checkpoint's n_action_steps)")
    parser.add_argument("--num-steps", type=int, default=0, help="denoising steps (default: the checkpoint's)")
    parser.add_argument("--max-steps", type=int, default=150, help="control steps per episode at most (10 Hz)")
    parser.add_argument("--count-flops", action="store_true", help="also count prefill/denoise FLOPs (slower)")
    parser.add_argument("--backend", default="eager",
                        help="stage backend: eager (default), packed, compiled, cudagraph, or an exported one: "
                             "onnxruntime, tensorrt (with --export-dir)")
    parser.add_argument("--export-dir", default=None, help="the directory `effvla export` wrote (exported backends)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16", "auto"],
                        help="dtype of vision, VLM and expert (auto: bfloat16 where the CPU computes it natively; "
                             "default: as LeRobot runs the checkpoint)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default; per worker)")
    parser.add_argument("--workers", type=int, default=1,
                        help="episode worker processes (default 1; the episodes and results are the same)")
    parser.add_argument("--latency-budget-ms", type=float, default=None, metavar="MS",
                        help="run every setting under this latency budget per inference (encoder + prefill + "
                             "denoising, ms), choosing each inference's settings from --latency-budget-table")
    parser.add_argument("--latency-budget-table", default=None, metavar="TABLE.yaml",
                        help="the budget table written by `effvla calibrate-budget` (with --latency-budget-ms)")
    parser.add_argument("--latency-budget-window", type=int, default=20, metavar="N",
                        help="recent inferences whose measured / calibrated latency sets the controller's "
                             "slowdown (default 20, as the policy node's latency_budget_window)")
    parser.add_argument("--latency-budget-margin", type=float, default=None, metavar="F",
                        help="fraction of the budget kept free when choosing (default: the policy node's "
                             "latency_budget_margin default)")
    parser.add_argument("--out", default=None, help="write the JSON report here")
    parser.add_argument("--quiet", action="store_true", help="no per-episode lines")


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("MUJOCO_GL", "egl")
    import torch

    from effvla_ros.core.backends import BACKENDS
    from effvla_ros.core.budget import BudgetTable, backend_mismatch
    from effvla_ros.core.smolvla import CheckpointError, RuntimeConfig, load_policy
    from effvla_ros.train.evaluate import (
        EvalBudget,
        eval_settings,
        evaluate,
        evaluate_parallel,
        format_table,
        write_report,
    )

    if args.episodes < 1:
        print("effvla eval-sim: --episodes must be at least 1", file=sys.stderr)
        return 2
    budget = None
    if (args.latency_budget_ms is None) != (args.latency_budget_table is None):
        missing = "--latency-budget-table" if args.latency_budget_table is None else "--latency-budget-ms"
        given = "--latency-budget-ms" if args.latency_budget_table is None else "--latency-budget-table"
        print(f"effvla eval-sim: {given} needs {missing} (both or neither)", file=sys.stderr)
        return 2
    if args.latency_budget_ms is not None:
        if not (args.latency_budget_ms > 0 and math.isfinite(args.latency_budget_ms)):
            print(f"effvla eval-sim: --latency-budget-ms {args.latency_budget_ms!r} must be a positive number of ms",
                  file=sys.stderr)
            return 2
        if args.latency_budget_window < 1:
            print("effvla eval-sim: --latency-budget-window must be at least 1", file=sys.stderr)
            return 2
        from effvla_ros.core.budget import BudgetConfig
        margin = BudgetConfig().latency_budget_margin if args.latency_budget_margin is None else args.latency_budget_margin
        if not 0.0 <= margin < 1.0:
            print(f"effvla eval-sim: --latency-budget-margin {margin!r} must be in [0, 1)", file=sys.stderr)
            return 2
        try:  # the table's ValueError names the file and what is wrong with it
            budget = EvalBudget(BudgetTable.load(args.latency_budget_table), args.latency_budget_ms,
                                window=args.latency_budget_window, table_path=str(args.latency_budget_table),
                                margin=margin)
        except ValueError as e:
            print(f"effvla eval-sim: --latency-budget-table: {e}", file=sys.stderr)
            return 2
        note = backend_mismatch(budget.table, args.backend)
        if note:
            print(f"effvla eval-sim: warning: {args.latency_budget_table}: {note}", file=sys.stderr)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        settings = eval_settings(args.sweep, num_steps=args.num_steps, horizon=args.horizon,
                                 delay_steps=args.delay_steps, count_flops=args.count_flops, mode=args.sweep_mode)
    except ValueError as e:
        print(f"effvla eval-sim: {e}", file=sys.stderr)
        return 2
    if args.backend not in BACKENDS:
        print(f"effvla eval-sim: --backend {args.backend!r} is not one of {sorted(BACKENDS)}", file=sys.stderr)
        return 2
    runtime = (RuntimeConfig(vision_dtype=args.dtype, vlm_dtype=args.dtype, expert_dtype=args.dtype)
               if args.dtype else None)
    try:
        policy = load_policy(args.checkpoint, runtime=runtime)
    except CheckpointError as e:
        print(f"effvla eval-sim: {e}", file=sys.stderr)
        return 2
    seeds = list(range(args.seed, args.seed + args.episodes))

    def progress(name: str, i: int, n: int, r) -> None:  # type: ignore[no-untyped-def]
        if not args.quiet:
            print(f"[{name}] episode {i + 1}/{n} seed {r.seed}: {'success' if r.success else 'failure'} "
                  f"after {r.steps} steps ({r.instruction!r})", flush=True)

    try:
        if args.workers > 1:
            report = evaluate_parallel(args.checkpoint, settings, seeds, workers=args.workers,
                                       max_steps=args.max_steps, threads=max(1, args.threads), progress=progress,
                                       backend=args.backend, runtime=runtime, export_dir=args.export_dir,
                                       budget=budget)
        else:
            report = evaluate(policy, settings, seeds, max_steps=args.max_steps, progress=progress,
                              backend=args.backend, export_dir=args.export_dir, budget=budget)
    except ValueError as e:
        print(f"effvla eval-sim: {e}", file=sys.stderr)
        return 2
    report["checkpoint"] = str(args.checkpoint)
    print(format_table(report))
    if args.out:
        write_report(report, args.out)
        print(f"report written to {args.out}")
    return 0
