"""``effvla calibrate-exit``: early-exit thresholds from demonstration data, written to a YAML that
the policy node loads (``early_exit.calibration_file``)."""
from __future__ import annotations

import argparse
from collections.abc import Iterator


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="LeRobot SmolVLA checkpoint directory")
    p.add_argument("--vlm-dir", help="VLM config + tokenizer directory, when not inside the checkpoint")
    p.add_argument("--demos", required=True, help="demonstration directory written by `effvla gen-demos`")
    p.add_argument("--out", required=True, help="YAML file to write")
    p.add_argument("--episodes", type=int, default=4, help="episodes used for calibration")
    p.add_argument("--stride", type=int, default=1, help="use every k-th frame (the policy's inference period)")
    p.add_argument("--exit-layers", help="comma-separated candidate exit layers (default: 1 .. L-2)")
    p.add_argument("--ratio", type=float, default=0.5, help="exit fractions p_k ~ ratio^k (DeeR)")
    p.add_argument("--exit-fraction", type=float, default=0.6, help="fraction of steps that should exit early")
    p.add_argument("--expert-reuse-fraction", type=float, default=0.65,
                   help="target fraction of action-expert layer evaluations to skip (negative: no expert thresholds)")
    p.add_argument("--num-steps", type=int,
                   help="denoising steps the node runs (default: the checkpoint's); expert thresholds depend on it")


def _observations(demos: str, episodes: int, stride: int, cameras: list[str]) -> Iterator[tuple]:  # type: ignore[type-arg]
    from pathlib import Path

    import torch

    from effvla_ros.sim.dataset import iter_episodes

    for i, (_, ep) in enumerate(iter_episodes(Path(demos))):
        if i >= episodes:
            break
        task = str(ep["task"])
        n = ep["observation.state"].shape[0]
        for t in range(0, n, stride):
            imgs = {c: torch.from_numpy(ep[f"observation.images.{c}"][t].copy()).permute(2, 0, 1).float() / 255.0
                    for c in cameras}
            yield imgs, torch.from_numpy(ep["observation.state"][t]).float(), task


def run(args: argparse.Namespace) -> int:
    from effvla_ros.core.calibration import calibrate
    from effvla_ros.core.early_exit import save_calibration
    from effvla_ros.core.smolvla import load_policy

    policy = load_policy(args.checkpoint, vlm_dir=args.vlm_dir)
    layers = [int(x) for x in args.exit_layers.split(",")] if args.exit_layers else None
    res = calibrate(policy, _observations(args.demos, args.episodes, args.stride, list(policy.cameras)), layers,
                    ratio=args.ratio, exit_fraction=args.exit_fraction,
                    expert_reuse_fraction=None if args.expert_reuse_fraction < 0 else args.expert_reuse_fraction,
                    num_steps=args.num_steps)
    save_calibration(args.out, res.pop("exit_layers"), res.pop("thresholds"), checkpoint=str(args.checkpoint), **res)
    print(open(args.out).read())
    return 0
