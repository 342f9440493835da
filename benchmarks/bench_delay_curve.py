"""Closed-loop success against emulated inference delay, one line per real-time chunking method (issue #31).

    python benchmarks/bench_delay_curve.py [--checkpoint DIR] [--episodes 100] [--seed 100000]
                                           [--delays 0,1,2,3,5] [--methods all|name,name] [--workers 2]
                                           [--out REPORT.json] [--plot docs/delay_curve.png]

Every (method, delay d) is one ``effvla eval-sim`` setting (:mod:`effvla_ros.train.evaluate`): the same seeds, the
same noise, the default compression (task pruning 0.5 + token reuse, as ``config/base.yaml``), the checkpoint's
execution horizon E, and d emulated as eval-sim does it: the previous chunk keeps executing for d steps (from
``d >= E`` on, inferences run back to back and a chunk that runs out holds its last action). The methods are those
of :mod:`effvla_ros.train.delay_curve` (``trained`` is skipped for a checkpoint not trained for it, ``a2c2`` for one
without a correction head).

The report (eval-sim's, every episode included, plus ``curve``: method -> delay -> successes) is merged into
``--out`` (default: ``<checkpoint>/eval_delay_curve.json``), so that methods and delays can be run in parts;
``--plot`` draws success vs delay with 95 % Wilson intervals. Runs ``--workers`` processes of one torch thread.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("MUJOCO_GL", "egl")

from effvla_ros.core.correction import HEAD_META  # noqa: E402
from effvla_ros.train.delay_curve import (  # noqa: E402
    A2C2_LAG,
    COMPRESSION,
    METHODS,
    curve_of,
    format_curve,
    setting_name,
    wilson,
)


def merge(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """``new``'s settings replace those of the same name in ``old`` (same seeds and checkpoint only)."""
    if old is None:
        return new
    for key in ("seeds", "checkpoint", "max_steps"):
        if old.get(key) != new.get(key):
            raise SystemExit(f"bench_delay_curve: {key} differs from the report being merged into; use another --out")
    names = {s["name"] for s in new["settings"]}
    merged = dict(new)
    merged["settings"] = [s for s in old["settings"] if s["name"] not in names] + new["settings"]
    merged["wall_s"] = float(old.get("wall_s", 0.0)) + float(new["wall_s"])
    return merged


def plot(reports: list[tuple[str, dict[str, Any]]], path: str, title: str) -> None:
    """Success vs delay, one line per (checkpoint, method); the first report solid, the others dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 5.0), dpi=110)
    lines = [(label, m, report["curve"][m], r) for r, (label, report) in enumerate(reports)
             for m in [m for m in METHODS if m in report["curve"]] + [m for m in report["curve"] if m not in METHODS]]
    for i, (label, method, pts_raw, r) in enumerate(lines):
        pts = sorted((int(d), int(v["successes"]), int(v["episodes"])) for d, v in pts_raw.items())
        xs = [d + 0.05 * (i - (len(lines) - 1) / 2) for d, _, _ in pts]  # side by side, not on top of each other
        ys = [100 * k / n for _, k, n in pts]
        lo = [100 * (k / n - wilson(k, n)[0]) for _, k, n in pts]
        hi = [100 * (wilson(k, n)[1] - k / n) for _, k, n in pts]
        color = f"C{list(METHODS).index(method) % 10}" if method in METHODS else None  # one colour per method
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o" if r == 0 else "s", capsize=2, label=f"{label}: {method}",
                    color=color,
                    linestyle="-" if r == 0 else "--", linewidth=2.2 if method in ("no_rtc", "trained", "a2c2", "a2c2_compressor") else 1.0,
                    markersize=4)
    ax.set_xlabel("emulated inference delay d [control steps at 10 Hz]")
    ax.set_ylabel("success [%] (95 % Wilson interval)")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left", ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    from effvla_ros.core.settings import make_setting
    from effvla_ros.core.smolvla import load_policy
    from effvla_ros.graph import default_checkpoint
    from effvla_ros.train.evaluate import evaluate_parallel

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default=default_checkpoint())
    ap.add_argument("--episodes", type=int, default=100)
    ap.add_argument("--seed", type=int, default=100_000)
    ap.add_argument("--delays", default="0,1,2,3,5")
    ap.add_argument("--methods", default="all", help=f"comma-separated of {list(METHODS)} (default all)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--max-steps", type=int, default=150)
    ap.add_argument("--out", default=None, help="report (merged into); default <checkpoint>/eval_delay_curve.json")
    ap.add_argument("--plot", default=None, help="PNG of success vs delay (e.g. docs/delay_curve.png)")
    ap.add_argument("--plot-only", action="store_true", help="draw --plot from --out without running")
    ap.add_argument("--correction-lag", type=int, default=A2C2_LAG,
                    help=f"a2c2: the observation lag of each step's correction (default {A2C2_LAG}: the graph's)")
    ap.add_argument("--compare", action="append", default=[], metavar="REPORT",
                    help="also draw this report's curve (another checkpoint's), dashed")
    args = ap.parse_args()

    out = Path(args.out or Path(args.checkpoint) / "eval_delay_curve.json")
    old = json.loads(out.read_text()) if out.exists() else None
    arch = load_policy(args.checkpoint).arch
    title = (f"eval-sim, pruning 0.5 + reuse, horizon {arch.n_action_steps}, 100 episodes per point (seeds "
             f"{args.seed}..); {Path(args.checkpoint).name}: chunk {arch.chunk_size}")

    def draw(report: dict[str, Any]) -> None:
        others = [json.loads(Path(c).read_text()) for c in args.compare]
        plot([(report.get("checkpoint", Path(args.checkpoint).name), report)]
             + [(o.get("checkpoint", Path(c).parent.name), o) for o, c in zip(others, args.compare, strict=True)],
             args.plot, title)
    if args.plot_only:
        if old is None:
            raise SystemExit(f"bench_delay_curve: no report at {out}")
        draw(old)
        print(format_curve(old["curve"]))
        return 0
    methods = list(METHODS) if args.methods == "all" else args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"bench_delay_curve: unknown methods {unknown}; known: {list(METHODS)}")
    if "trained" in methods and not arch.rtc_trained_max_delay:
        print(f"bench_delay_curve: {args.checkpoint} was not trained with training-time RTC: 'trained' skipped")
        methods.remove("trained")
    for m in [m for m in methods if METHODS[m].get("correction.enabled")]:
        if not (Path(args.checkpoint) / HEAD_META).is_file():
            print(f"bench_delay_curve: {args.checkpoint} has no correction head: {m!r} skipped")
            methods.remove(m)
    delays = [int(d) for d in args.delays.split(",")]
    lag = {"exec.correction_lag": args.correction_lag}
    settings = [make_setting(setting_name(m, d), {**COMPRESSION, **METHODS[m], "exec.delay_steps": d,
                                                  **(lag if METHODS[m].get("correction.enabled") else {})})
                for m in methods for d in delays]
    seeds = list(range(args.seed, args.seed + args.episodes))
    t0 = time.perf_counter()
    done: dict[str, int] = {}

    def progress(name: str, i: int, n: int, r: Any) -> None:
        done[name] = done.get(name, 0) + 1
        if done[name] == n:
            print(f"  {name}: {n} episodes ({time.perf_counter() - t0:.0f} s)", flush=True)

    print(f"bench_delay_curve: {len(settings)} settings x {len(seeds)} episodes, {args.workers} workers")
    report = evaluate_parallel(args.checkpoint, settings, seeds, workers=args.workers, max_steps=args.max_steps,
                               threads=1, progress=progress)
    report["checkpoint"] = str(Path(args.checkpoint).resolve().name)
    report["machine"] = f"{os.cpu_count()} CPUs, {args.workers} workers x 1 torch thread"
    report = merge(old, report)
    report["curve"] = curve_of(report)
    out.write_text(json.dumps(report, indent=1, default=float))
    print(format_curve(report["curve"]))
    print(f"report: {out} ({time.perf_counter() - t0:.0f} s)")
    if args.plot:
        draw(report)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
