"""``effvla train-correction``: the per-step correction head (A2C2, arXiv 2509.23224) of a checkpoint.

The base policy stays frozen. It is run over demonstrations (``effvla gen-demos`` sets) with the setting it is
deployed with (``--setting``, the ``--sweep`` grammar: by default the default compression), and a small head learns
the demonstrator's action minus the executing chunk's row from the joint positions and camera frames of the step it
is executed at (:mod:`effvla_ros.train.correction`). Writes ``correction_head.safetensors`` and
``correction_head.json`` (architecture, data, held-out errors before and after) into ``--out`` (default: the
checkpoint directory, where ``effvla eval-sim --sweep correction.enabled=true`` finds it).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="the base policy's checkpoint directory")
    parser.add_argument("--demos", action="append", required=True, metavar="DIR",
                        help="a demonstration set of `effvla gen-demos` (repeatable)")
    parser.add_argument("--out", default=None, help="where the head is written (default: --checkpoint)")
    parser.add_argument("--setting", default="pruning.keep_ratio=0.5+reuse.enabled=true",
                        help="the base policy's setting while collecting (--sweep grammar; default: the default "
                             "compression, as config/base.yaml)")
    parser.add_argument("--stride", type=int, default=5, help="frames between inferences (default 5: the horizon)")
    parser.add_argument("--offsets", default="0,2", help="first inference frames, one pass each (default 0,2)")
    parser.add_argument("--no-visual", action="store_true", help="no camera input (joint positions and chunk only)")
    parser.add_argument("--no-state", action="store_true",
                        help="no joint positions as input (the chunk, its row and the camera frames only)")
    parser.add_argument("--dims", default="", help="comma-separated action dimensions to correct (default: all)")
    parser.add_argument("--max-lag", type=int, default=0,
                        help="train on joints and frames 0..N steps older than the corrected row, the lag given to "
                             "the head (the graph commits a row before it runs: chunk_corrector; default 0)")
    parser.add_argument("--min-lag", type=int, default=0, help="smallest lag trained on (default 0)")
    parser.add_argument("--max-episodes", type=int, default=0, help="use at most this many episodes (0: all)")
    parser.add_argument("--steps", type=int, default=4000, help="optimizer steps (default 4000)")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--workers", type=int, default=1, help="collection processes (default 1)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads for training (0: torch's default)")
    parser.add_argument("--data", default=None, metavar="NPZ",
                        help="cache of the collected samples: read if it exists, else written")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--state-dims", default="",
                        help="comma-separated joints whose measured positions the head sees (default: all)")
    parser.add_argument("--members", type=int, default=1,
                        help="an ensemble of N heads, each trained from its own seed, residuals averaged (default 1)")
    parser.add_argument("--on-policy", type=int, default=0, metavar="N",
                        help="also train on N closed-loop episodes of the checkpoint with its current correction "
                             "head, each step labelled by the scripted expert (DAgger; default 0: demonstrations "
                             "only)")
    parser.add_argument("--on-policy-delays", default="0,1,2,3,4,5",
                        help="emulated inference delays of those episodes, in turn (default 0,1,2,3,4,5)")
    parser.add_argument("--on-policy-seed", type=int, default=400000,
                        help="first sim seed of those episodes (default 400000; keep them off the evaluation's)")
    parser.add_argument("--on-policy-lag", type=int, default=-1,
                        help="the correction lag of those episodes (default: --min-lag, the graph's)")
    parser.add_argument("--on-policy-data", default=None, metavar="NPZ",
                        help="cache of the on-policy samples: read if it exists, else written")
    parser.add_argument("--state-noise", type=float, default=0.0,
                        help="std of Gaussian noise added to the joint-position inputs while training, in units of "
                             "each joint's action std (the closed loop's joints are not the demonstrations'; "
                             "default 0)")


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("MUJOCO_GL", "egl")
    import torch

    from effvla_ros.core.settings import make_setting, parse_sweep
    from effvla_ros.core.smolvla import load_policy
    from effvla_ros.train.correction import collect, load_data, save_data, train_head

    for d in args.demos:
        if not (Path(d) / "index.json").is_file():
            print(f"effvla train-correction: --demos {d}: no index.json (make one with `effvla gen-demos`)",
                  file=sys.stderr)
            return 2
    if args.stride < 1:
        print("effvla train-correction: --stride must be at least 1", file=sys.stderr)
        return 2
    try:
        offsets = [int(x) for x in args.offsets.split(",") if x.strip()]
        dims = [int(d) for d in args.dims.split(",") if d.strip()]
        state_dims = [int(d) for d in args.state_dims.split(",") if d.strip()]
    except ValueError:
        print(f"effvla train-correction: --offsets {args.offsets!r} / --dims {args.dims!r} / --state-dims "
              f"{args.state_dims!r}: comma-separated integers", file=sys.stderr)
        return 2
    if args.members < 1:
        print(f"effvla train-correction: --members {args.members} must be at least 1", file=sys.stderr)
        return 2
    if not args.state_noise >= 0.0:
        print(f"effvla train-correction: --state-noise {args.state_noise} must be >= 0", file=sys.stderr)
        return 2
    if not 0 <= args.min_lag <= args.max_lag:  # before minutes of collection, not after
        print(f"effvla train-correction: --min-lag {args.min_lag} must lie in 0..--max-lag ({args.max_lag})",
              file=sys.stderr)
        return 2
    try:
        on_delays = [int(d) for d in args.on_policy_delays.split(",") if d.strip()]
    except ValueError:
        on_delays = []
    if args.on_policy < 0 or (args.on_policy and (not on_delays or min(on_delays) < 0)):
        print(f"effvla train-correction: --on-policy {args.on_policy} / --on-policy-delays "
              f"{args.on_policy_delays!r}: a count >= 0 and comma-separated delays >= 0", file=sys.stderr)
        return 2
    on_lag = args.min_lag if args.on_policy_lag < 0 else args.on_policy_lag
    if args.on_policy and not (Path(args.checkpoint) / "correction_head.json").is_file() \
            and not (args.on_policy_data and Path(args.on_policy_data).is_file()):
        print(f"effvla train-correction: --on-policy runs the head beside --checkpoint ({args.checkpoint} has none: "
              "train one from the demonstrations first)", file=sys.stderr)
        return 2
    demo_sets = [_demo_set(d) for d in args.demos]  # how each set was generated (index.json, read once)
    aims = [_aim(ds) for ds in demo_sets]
    if args.on_policy and len(set(aims)) != 1:
        print("effvla train-correction: --on-policy labels with the demonstrations' expert, but the --demos sets aim "
              f"differently ({aims})", file=sys.stderr)
        return 2
    policy = load_policy(args.checkpoint)  # CheckpointError (a ValueError) names the file
    items = parse_sweep([args.setting])
    if len(items) != 1 or len(items[0]) != 1:
        print(f"effvla train-correction: --setting {args.setting!r} must be one setting (join changes with +)",
              file=sys.stderr)
        return 2
    name, changes = items[0][0]
    setting = make_setting(name, changes, {"num_steps": policy.num_steps})
    if args.data and Path(args.data).is_file():
        data = load_data(args.data)
        print(f"samples from {args.data}: {len(data)}")
    else:
        def progress(k: int, n: int) -> None:
            if k % 20 == 0 or k == n:
                print(f"  collected {k}/{n} episodes", flush=True)

        data = collect(args.checkpoint, args.demos, setting, stride=args.stride, offsets=offsets,
                       visual=not args.no_visual, max_episodes=args.max_episodes, workers=args.workers,
                       progress=progress)
        if args.data:
            save_data(data, args.data)
        print(f"collected {len(data)} samples from {len(set(data.episode.tolist()))} episodes, "
              f"{data.chunks.shape[0]} chunks under {setting.name}")
    on_policy: dict[str, Any] = {}
    if args.on_policy:
        data, on_policy = _add_on_policy(args, data, (name, changes, policy.num_steps), on_delays, on_lag, aims[0])
    if args.no_visual:  # a cache collected with frames trains a head without them too
        data.visual = None
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    head, record = train_head(data, chunk_size=policy.arch.chunk_size, steps=args.steps, batch=args.batch, lr=args.lr,
                              hidden=args.hidden, seed=args.seed, use_state=not args.no_state,
                              dims=dims, max_lag=args.max_lag, min_lag=args.min_lag,
                              state_noise=args.state_noise, members=args.members,
                              state_dims=state_dims, log=print)
    head.spec.trained = {"checkpoint": str(args.checkpoint), "demos": [str(d) for d in args.demos],
                         "demo_sets": demo_sets,
                         "setting": setting.name, "stride": args.stride, "offsets": offsets, **record,
                         **({"on_policy": on_policy} if on_policy else {})}
    out = head.save(args.out or args.checkpoint)
    for lag, r in record["held_out_by_lag"].items():
        b, a = r["before"], r["after"]
        print(f"held-out RMSE (normalized) at lag {lag}, base -> corrected: arm {b['base_rmse_arm']:.3f} -> "
              f"{a['corrected_rmse_arm']:.3f}, gripper {b['base_rmse_gripper']:.3f} -> "
              f"{a['corrected_rmse_gripper']:.3f}")
    print(f"wrote {out}/correction_head.safetensors, correction_head.json")
    print(json.dumps({k: v for k, v in record.items() if k != "held_out_episodes"}))
    return 0


def _add_on_policy(args: argparse.Namespace, data: Any, setting: tuple[str, dict[str, Any], int], delays: list[int],
                   lag: int, aim: tuple[float, float]) -> tuple[Any, dict[str, Any]]:
    """The demonstrations' samples plus those of ``--on-policy`` closed-loop episodes (DAgger) of the base policy
    under ``setting`` (name, changes, denoising steps) with its correction on, labelled by the expert aimed at
    ``aim`` (the demonstrations'), and their record."""
    import numpy as np

    from effvla_ros.core.settings import make_setting
    from effvla_ros.train.correction import CorrectionData, collect_on_policy, load_data, save_data

    first = int(data.episode.max()) + 1 if len(data.episode) else 0
    if args.on_policy_data and Path(args.on_policy_data).is_file():
        onp = load_data(args.on_policy_data)
        onp.episode = onp.episode - int(onp.episode.min()) + first  # after the demonstrations'
        print(f"on-policy samples from {args.on_policy_data}: {len(onp)}")
        infos: list[dict[str, Any]] = []
    else:
        name, changes, num_steps = setting
        changes = {**changes, "correction.enabled": True, "exec.correction_lag": lag}
        rollouts = [make_setting(f"{name}+correction.enabled=true+correction_lag={lag}+delay_steps={d}",
                                 {**changes, "exec.delay_steps": d}, {"num_steps": num_steps}) for d in delays]

        def progress(k: int, n: int, info: dict[str, Any]) -> None:
            if k % 20 == 0 or k == n:
                print(f"  on-policy {k}/{n} episodes", flush=True)

        seeds = list(range(int(args.on_policy_seed), int(args.on_policy_seed) + int(args.on_policy)))
        onp, infos = collect_on_policy(args.checkpoint, rollouts, seeds, first_episode=first, workers=args.workers,
                                       progress=progress, aim_offset=aim)
        if args.on_policy_data:
            save_data(onp, args.on_policy_data)
        ok = sum(i["success"] for i in infos)
        print(f"on-policy: {len(onp)} samples from {len(infos)} episodes ({ok} successful), "
              f"{sum(i['valid_steps'] for i in infos)} of {sum(i['steps'] for i in infos)} steps labelled")
    record = {"episodes": int(len(np.unique(onp.episode))), "samples": len(onp), "delays": delays, "lag": lag,
              "first_seed": int(args.on_policy_seed),
              "successes": int(sum(i["success"] for i in infos)) if infos else None}
    return CorrectionData.concat([data, onp]), record


def _demo_set(directory: str) -> dict[str, Any]:
    """How a demonstration set was generated (its index.json), for the head's record: the expert's aim above all
    (the head learns the demonstrator's grasp point, not the base policy's)."""
    idx = json.loads((Path(directory) / "index.json").read_text())
    gen = idx.get("generator", {})
    return {"dir": str(directory), "episodes": len(idx.get("episodes", [])), "base_seed": gen.get("base_seed"),
            "aim_offset": gen.get("aim_offset"), "perturb": gen.get("perturb") is not None,
            "regrasp": gen.get("regrasp") is not None}


def _aim(demo_set: dict[str, Any]) -> tuple[float, float]:
    """The expert's aim of a :func:`_demo_set` record (gen-demos --aim-offset; the labels of --on-policy use it)."""
    aim = demo_set["aim_offset"] or (0.0, 0.0)
    return float(aim[0]), float(aim[1])
