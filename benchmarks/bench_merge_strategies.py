"""Closed-loop success of the chunk executor's merge strategies under inference delay, without RTC (issue #31).

    python benchmarks/bench_merge_strategies.py [--checkpoint DIR] [--episodes 40] [--seed 100000]
                                                [--latencies 0,0.2,0.5] [--strategies rtc,temporal_ensemble,...]
                                                [--setting pruning.keep_ratio=0.5+reuse.enabled=true]
                                                [--workers 2] [--out REPORT.json]

``effvla eval-sim`` switches chunks directly (what the executor's ``rtc`` / ``latest`` merge does with
``blend_time: 0``). The other merges - ``temporal_ensemble`` (ACT's exponential weights over the overlapping
chunks) and ``crossfade`` - exist only in the chunk executor, so this runs ``scripts/emulate_graph.py``'s episode:
the policy node's schedule (a new chunk when the horizon minus the measured latency has elapsed), the real
:class:`~effvla_ros.core.executor.ChunkExecutorCore` (limits and rolling trajectories of ``config/sim.yaml``) and
the simulated joint_trajectory_controller at 100 Hz, in simulated time, each chunk delivered ``latency`` seconds
after its observation (0.1 s = one control step at 10 Hz). Every strategy sees the same seeds and noise.
Prints successes per strategy and latency, writes the JSON report.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MUJOCO_GL", "egl")

_W: dict[str, Any] = {}


def _emulator() -> Any:
    spec = importlib.util.spec_from_file_location("emulate_graph", ROOT / "scripts" / "emulate_graph.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _init(checkpoint: str, target: str, setting: str) -> None:
    import torch

    from effvla_ros.core.settings import build_settings
    from effvla_ros.core.smolvla import load_policy
    from effvla_ros.sim.env import SimConfig, TwoCubePickPlaceEnv

    torch.set_num_threads(1)
    emu = _emulator()
    policy = load_policy(checkpoint)
    _W.update(emu=emu, policy=policy, target=target,
              env=TwoCubePickPlaceEnv(SimConfig(image_size=int(policy.arch.camera_shape[-1]),
                                                cameras=list(policy.arch.cameras))),
              setting=build_settings([setting])[1] if setting else build_settings([])[0])


def _job(job: tuple[str, float, int]) -> tuple[str, float, int, bool]:
    strategy, latency, seed = job
    emu = _W["emu"]
    ecfg = emu.executor_config(_W["target"], f"merge_strategy={strategy}")
    ok, _ = emu.run_episode(_W["policy"], _W["env"], seed, _W["setting"], ecfg, mode="executor", latency=latency,
                            horizon=_W["policy"].arch.n_action_steps, max_steps=150)
    return strategy, latency, seed, bool(ok)


def main() -> int:
    from effvla_ros.core.executor.config import STRATEGIES
    from effvla_ros.graph import default_checkpoint

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default=default_checkpoint())
    ap.add_argument("--target", default="x86_cpu")
    ap.add_argument("--episodes", type=int, default=40)
    ap.add_argument("--seed", type=int, default=100_000)
    ap.add_argument("--latencies", default="0,0.2,0.5", help="observation to chunk arrival, simulated s")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--setting", default="pruning.keep_ratio=0.5+reuse.enabled=true",
                    help="eval-sim setting on its baseline (RTC stays off unless set here)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=None, help="JSON report (default <checkpoint>/eval_merge_strategies.json)")
    args = ap.parse_args()
    strategies = args.strategies.split(",")
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad:
        raise SystemExit(f"bench_merge_strategies: unknown strategies {bad}; known: {list(STRATEGIES)}")
    latencies = [float(x) for x in args.latencies.split(",")]
    seeds = list(range(args.seed, args.seed + args.episodes))
    jobs = [(s, lat, seed) for s in strategies for lat in latencies for seed in seeds]
    t0 = time.perf_counter()
    results: dict[str, dict[str, dict[int, bool]]] = {s: {str(lat): {} for lat in latencies} for s in strategies}
    with multiprocessing.get_context("spawn").Pool(args.workers, _init,
                                                   (str(args.checkpoint), args.target, args.setting)) as pool:
        for strategy, lat, seed, ok in pool.imap_unordered(_job, jobs):
            results[strategy][str(lat)][seed] = ok
    wall = time.perf_counter() - t0
    table = {s: {lat: sum(v.values()) for lat, v in r.items()} for s, r in results.items()}
    print("strategy".ljust(20) + "".join(f"{lat} s".rjust(10) for lat in latencies))
    for s in strategies:
        print(s.ljust(20) + "".join(f"{table[s][str(lat)]}/{len(seeds)}".rjust(10) for lat in latencies))
    out = Path(args.out or Path(args.checkpoint) / "eval_merge_strategies.json")
    out.write_text(json.dumps({"checkpoint": Path(args.checkpoint).resolve().name, "seeds": seeds,
                               "setting": args.setting, "target": args.target, "latencies_s": latencies,
                               "successes": table, "episodes": {s: {lat: {str(k): v for k, v in sorted(r.items())}
                                                                    for lat, r in rr.items()}
                                                                for s, rr in results.items()},
                               "wall_s": wall}, indent=1))
    print(f"report: {out} ({wall:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
