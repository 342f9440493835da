"""``effvla train``: train a small SmolVLA-architecture policy on ``effvla gen-demos`` demonstrations.

Builds the chunk dataset (every frame, the next ``chunk_size`` actions with a padding mask), the
normalization statistics, a tokenizer covering every task instruction and a randomly initialised
small SmolVLA (:func:`effvla_ros.train.small_arch`), then trains everything with LeRobot's
flow-matching loss (AdamW, warmup + cosine). Writes a LeRobot-layout checkpoint (``save_policy``,
incl. ``vlm/``) to ``--out`` every ``--save-every`` steps and at the end, plus ``train_log.json``
(configuration, loss curve, wall time).
"""
from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from effvla_ros.train.trainer import TrainConfig

    d = TrainConfig(data="", out="")
    parser.add_argument("--data", required=True, nargs="+",
                        help="demo directory written by `effvla gen-demos` (several: all their episodes)")
    parser.add_argument("--out", required=True, help="checkpoint directory (created)")
    parser.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default {d.steps})")
    parser.add_argument("--batch", type=int, default=d.batch, help=f"batch size (default {d.batch})")
    parser.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    parser.add_argument("--warmup", type=int, default=d.warmup, help=f"warmup steps (default {d.warmup})")
    parser.add_argument("--image-size", type=int, default=d.image_size,
                        help=f"image size of the demos and the model (default {d.image_size})")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of initialisation, batches, noise")
    parser.add_argument("--shift", type=int, default=d.shift, help="random-shift augmentation in pixels (0: off)")
    parser.add_argument("--state-dropout", type=float, default=d.state_dropout,
                        help="probability of replacing a sample's state by the data mean (default 0)")
    parser.add_argument("--ema", type=float, default=d.ema, help="EMA decay of the saved weights (0: off)")
    parser.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint period in steps")
    parser.add_argument("--max-episodes", type=int, default=None, help="use only the first N episodes")
    parser.add_argument("--max-minutes", type=float, default=0.0, help="stop and save after this wall time")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default; 1 is faster on a loaded machine)")
    parser.add_argument("--save-dtype", default=d.save_dtype, choices=("float32", "float16", "bfloat16"),
                        help="dtype of the saved weights")
    parser.add_argument("--init", default=None,
                        help="start from this checkpoint (weights + normalization statistics) instead of random")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from effvla_ros.train.trainer import TrainConfig, train

    if args.steps < 1 or args.batch < 1:
        print("effvla train: --steps and --batch must be positive", file=sys.stderr)
        return 2
    cfg = TrainConfig(
        data=",".join(str(d) for d in args.data), out=str(args.out), steps=args.steps, batch=args.batch, lr=args.lr,
        weight_decay=args.weight_decay, warmup=max(1, min(args.warmup, args.steps // 10)),
        image_size=args.image_size, seed=args.seed, shift=args.shift, ema=args.ema, save_every=args.save_every,
        max_episodes=args.max_episodes, max_minutes=args.max_minutes, threads=args.threads,
        save_dtype=args.save_dtype, init=args.init, state_dropout=args.state_dropout,
    )
    try:
        train(cfg, progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as e:
        print(f"effvla train: {e}", file=sys.stderr)
        return 2
    return 0
