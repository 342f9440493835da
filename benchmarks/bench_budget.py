"""Latency-budget mode under a competing CPU load: does the controller keep each inference under the budget?

    python benchmarks/bench_budget.py [--checkpoint DIR] [--budget-ms B] [--load-at 30] [--load-procs 2]
                                      [--steps 90] [--threads 2] [--backend packed --dtype auto]
                                      [--adaptive-threads] [--grid AXIS ...] [--json out.json]

1. A recording: the simulation's cameras at the checkpoint's size written as a rosbag2 (MCAP) by the test bag writer
   (``replay/synthetic.py``: moving patterns, 10 Hz).
2. Calibration, as ``effvla calibrate-budget`` does (``run_replay`` over the product of the default grid: kept-token
   ratio x denoising steps x expert reuse, or ``--grid``; each setting's first 2 observations left out), on the quiet
   machine, on ``--backend`` in ``--dtype``: each setting's p95 latency and action deviation.
3. A control loop over the recording's observations, cycled to ``--steps``: each step the controller
   (``core/budget.py``) picks a setting, the token compressor and the runner are configured with it
   (``apply_overrides``, as the policy node does) and one inference runs; its measured latency (encoder + prefill +
   denoising) goes back to the controller. From step ``--load-at`` on, ``--load-procs`` processes burn the CPU.
   The same loop without the controller (the unconstrained setting) runs beside it for the deviation and the
   latency without budget. ``--adaptive-threads``: both loops run with ``RuntimeConfig.adaptive_threads`` (torch
   threads follow the cores the load leaves free, ``core/threads.py``), the calibration with all threads.

Printed: the fraction of steps within the budget (all, before and after the load starts), the p95 latency, the
settings chosen, and each loop's mean action deviation from the unconstrained actions of the same observation.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


GRID = ("pruning.keep_ratio=1.0,0.5,0.25", "num_steps=10,5,3", "expert_reuse.enabled=false,true")


def _burn(stop: Any) -> None:
    x = 1.0
    while not stop.is_set():
        for _ in range(100_000):
            x = x * 1.0000001 + 1e-9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="default: the bundled so101_pickplace_pruned")
    ap.add_argument("--budget-ms", type=float, default=0.0,
                    help="budget (default: 1.1 x the unconstrained setting's calibrated p95: met without compression "
                         "on the quiet machine, not under the load)")
    ap.add_argument("--grid", action="append", default=None,
                    help="calibration grid axes (--sweep grammar); default " + " ".join(GRID))
    ap.add_argument("--steps", type=int, default=90)
    ap.add_argument("--load-at", type=int, default=30)
    ap.add_argument("--load-procs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backend", default="eager", help="stage backend of calibration and loops (x86_cpu: packed)")
    ap.add_argument("--dtype", default="float32", help="vision / VLM / expert dtype (x86_cpu: auto)")
    ap.add_argument("--adaptive-threads", action="store_true",
                    help="the loops lower torch's threads to the cores the load leaves free (RuntimeConfig.adaptive_threads)")
    ap.add_argument("--duration", type=float, default=3.0, help="seconds of the synthetic recording (10 Hz)")
    ap.add_argument("--keep-cache", action="store_true",
                    help="the controlled loop's compressor keeps its patch cache while reuse is off (reuse.keep_cache)")
    ap.add_argument("--margin", type=float, default=None,
                    help="the controller's planning margin, a fraction of the budget (default: the policy node's "
                         "latency_budget_margin)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from bench_e2e_realsize import cpu_model  # this script's folder is on sys.path

    from effvla_ros.core.backends import make_backend
    from effvla_ros.core.budget import (
        BudgetConfig,
        BudgetController,
        BudgetTable,
        apply_overrides,
        configure_changed,
        entries_from_replay,
    )
    from effvla_ros.core.compression.compressor import ReuseConfig, TokenCompressor
    from effvla_ros.core.compression.pruning import PruningConfig
    from effvla_ros.core.early_exit import EarlyExitConfig, ExpertReuseConfig
    from effvla_ros.core.observation import rgb_to_tensor
    from effvla_ros.core.runner import InferenceConfig, PolicyRunner, compressed_to_camera_tokens
    from effvla_ros.core.smolvla import RuntimeConfig, load_policy
    from effvla_ros.core.threads import ThreadGovernor
    from effvla_ros.graph import default_checkpoint
    from effvla_ros.replay.evaluate import action_std, noise_for
    from effvla_ros.replay.pipeline import ReplayConfig, run_replay
    from effvla_ros.replay.synthetic import write_episode_bag

    ckpt = args.checkpoint or default_checkpoint()
    rt = RuntimeConfig(num_threads=args.threads, vision_dtype=args.dtype, vlm_dtype=args.dtype, expert_dtype=args.dtype)
    policy = load_policy(ckpt, runtime=rt)
    backend = make_backend(args.backend, policy)
    size = tuple(policy.arch.camera_shape[1:])
    tmp = tempfile.TemporaryDirectory()
    bag = write_episode_bag(Path(tmp.name) / "bag", cameras={f"/camera/{c}/image_raw": 10.0 for c in policy.cameras},
                            duration=args.duration, image_size=size)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    cal = run_replay(ReplayConfig(bag=str(bag), checkpoint=str(ckpt), sweep=list(args.grid or GRID), sweep_mode="product",
                                  flops="off", progress=False, backend=args.backend), policy=policy)
    table = BudgetTable(entries_from_replay(cal.report, cal.runs, warmup=2))
    base = next(e for e in table.entries if not e.overrides)
    budget = args.budget_ms or 1.1 * base.latency_ms
    margin = BudgetConfig().latency_budget_margin if args.margin is None else args.margin
    print(f"# {cpu_model()}; {Path(ckpt).name} on {args.backend} {'/'.join(policy.runtime.resolved_dtypes())}, "
          f"{args.threads} threads{' (adaptive in the loops)' if args.adaptive_threads else ''}, calibration {time.perf_counter() - t0:.0f} s on "
          f"{len(cal.episode.observations)} observations; budget {budget:.1f} ms, planning margin {margin:.0%}")
    print("\n| setting | calibrated p95 [ms] | deviation (nRMSE) |\n|---|---:|---:|")
    for e in sorted(table.entries, key=lambda e: e.latency_ms):
        print(f"| {e.name} | {e.latency_ms:.1f} | {e.deviation:.4f} |")

    episode = cal.episode
    obs_list = [episode.observations[i % len(episode.observations)] for i in range(args.steps)]
    std = action_std(policy)

    def loop(controlled: bool, stop_load: Any) -> dict[str, Any]:
        torch.set_num_threads(args.threads)
        policy.thread_governor = ThreadGovernor(args.threads) if args.adaptive_threads else None
        comp = TokenCompressor(policy, PruningConfig(method="none"), ReuseConfig(enabled=False), count_flops=False,
                               backend=backend)
        runner = PolicyRunner(policy, inference=InferenceConfig(num_steps=policy.num_steps), backend=backend,
                              early_exit=EarlyExitConfig(enabled=False), expert_reuse=ExpertReuseConfig(enabled=False))
        own = {"pruning": PruningConfig(method="none"), "reuse": ReuseConfig(keep_cache=args.keep_cache),
               "early_exit": EarlyExitConfig(enabled=False),
               "expert_reuse": ExpertReuseConfig(enabled=False),
               "inference": InferenceConfig(num_steps=policy.num_steps)}
        ctl = BudgetController(table, budget, margin=margin)
        procs: list[Any] = []
        out: dict[str, Any] = {"measured_ms": [], "chosen": [], "actions": [], "predicted_ms": [], "threads": []}
        try:
            for i, obs in enumerate(obs_list):
                if i == args.load_at:
                    procs = [multiprocessing.Process(target=_burn, args=(stop_load,), daemon=True)
                             for _ in range(args.load_procs)]
                    for p in procs:
                        p.start()
                if controlled:
                    choice = ctl.choose()
                    configure_changed(apply_overrides(own, choice.entry.overrides, from_baseline=True), runner, comp)
                    out["chosen"].append(choice.entry.name)
                    out["predicted_ms"].append(choice.predicted_ms)
                if obs.instruction != comp.instruction:
                    comp.set_instruction(obs.instruction)
                runner.set_instruction(obs.instruction)
                enc = 0.0
                cams = {}
                for cam in policy.cameras:
                    o = comp.process(cam, rgb_to_tensor(episode.image(obs.frames[cam])))
                    cams[cam] = compressed_to_camera_tokens(o)
                    enc += o.time_s
                res = runner.infer(cams, torch.from_numpy(np.asarray(obs.state, dtype=np.float32)),
                                   noise=noise_for(obs.index, 0, (1, policy.arch.chunk_size, policy.arch.max_action_dim)))
                ms = (enc + res.times["total_s"]) * 1e3
                if controlled:
                    ctl.observe(choice.entry.name, ms)
                out["measured_ms"].append(ms)
                out["threads"].append(torch.get_num_threads())
                out["actions"].append(res.actions.detach().cpu().double().numpy())
        finally:
            stop_load.set()
            for p in procs:
                p.join(timeout=5)
            stop_load.clear()
        return out

    stop = multiprocessing.Event()
    free = loop(False, stop)
    ctl_run = loop(True, stop)

    def summary(name: str, run: dict[str, Any]) -> dict[str, Any]:
        m = np.array(run["measured_ms"])
        la = args.load_at
        dev = [float(np.sqrt(np.mean(((a - b) / std) ** 2))) for a, b in zip(run["actions"], free["actions"])]
        s = {"within_all": float(np.mean(m <= budget)), "within_before_load": float(np.mean(m[:la] <= budget)),
             "within_under_load": float(np.mean(m[la:] <= budget)),
             "within_under_load_after_first": float(np.mean(m[la + 1:] <= budget)),
             "p95_ms_before": float(np.percentile(m[:la], 95)), "p95_ms_under_load": float(np.percentile(m[la:], 95)),
             "median_ms_under_load": float(statistics.median(m[la:])), "mean_deviation_nrmse": float(np.mean(dev)),
             "chosen_before": dict(Counter(run["chosen"][:la])), "chosen_under_load": dict(Counter(run["chosen"][la:])),
             "threads_before": dict(Counter(run["threads"][:la])), "threads_under_load": dict(Counter(run["threads"][la:])),
             "measured_ms": [float(x) for x in m]}
        print(f"\n{name}: within {budget:.1f} ms on {s['within_all']:.0%} of {len(m)} steps (before the load "
              f"{s['within_before_load']:.0%}, under it {s['within_under_load']:.0%}, after its first step "
              f"{s['within_under_load_after_first']:.0%}); p95 {s['p95_ms_before']:.1f} ms before, "
              f"{s['p95_ms_under_load']:.1f} ms under load; mean action deviation from unconstrained "
              f"{s['mean_deviation_nrmse']:.4f} (nRMSE)")
        if run["chosen"]:
            print(f"  chosen before the load: {s['chosen_before']}; under it: {s['chosen_under_load']}")
        print(f"  torch threads before the load: {s['threads_before']}; under it: {s['threads_under_load']}")
        return s

    rows = {"unconstrained": summary("unconstrained (no budget)", free),
            "budget": summary("latency budget", ctl_run)}
    print(f"\n(competing load: {args.load_procs} busy processes from step {args.load_at} of {args.steps}; "
          f"{args.threads} torch threads)")
    if args.json:
        Path(args.json).write_text(json.dumps({"budget_ms": budget, "margin": margin, "table": table.to_dict(), **rows}, indent=1))
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
