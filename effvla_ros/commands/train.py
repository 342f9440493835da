"""``effvla train``: train a small SmolVLA-architecture policy on ``effvla gen-demos`` demonstrations.

Builds the chunk dataset (every frame, the next ``chunk_size`` actions with a padding mask), the
normalization statistics, a tokenizer covering every task instruction and a randomly initialised
small SmolVLA (:func:`effvla_ros.train.small_arch`), then trains everything with LeRobot's
flow-matching loss (AdamW, warmup + cosine). Writes a LeRobot-layout checkpoint (``save_policy``,
incl. ``vlm/``) to ``--out`` every ``--save-every`` steps and at the end, plus ``train_log.json``
(configuration, loss curve, wall time).

``--recipe NAME`` (:mod:`effvla_ros.train.recipes`) takes the demonstrations and settings of a named
recipe: ``effvla train --recipe so101 --out DIR`` generates the recipe's demos into ``--demos-root``
(when not already there) and trains the bundled ``so101_pickplace`` checkpoint; options given
explicitly override the recipe's values. A recipe in stages (``so101_pruned``) runs one training per stage,
each starting from the one before (``recipes.stage_plan``).
"""
from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from effvla_ros.train.recipes import RECIPES
    from effvla_ros.train.trainer import ATTENTION_CHOICES, TrainConfig

    d = TrainConfig(data="", out="")
    # options that a recipe can set default to None here; resolved in run()
    parser.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                        help="named recipe: its demos (generated into --demos-root if missing) and settings")
    parser.add_argument("--demos-root", default="/tmp/effvla_demos",
                        help="where a recipe's demo sets are kept / generated (default /tmp/effvla_demos)")
    parser.add_argument("--gen-workers", type=int, default=2, help="worker processes for a recipe's missing demos")
    parser.add_argument("--data", nargs="+", default=None,
                        help="demo directory written by `effvla gen-demos` (several: all their episodes); "
                             "required unless --recipe")
    parser.add_argument("--out", required=True, help="checkpoint directory (created)")
    parser.add_argument("--steps", type=int, default=None, help=f"optimizer steps (default {d.steps})")
    parser.add_argument("--batch", type=int, default=None, help=f"batch size (default {d.batch})")
    parser.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default {d.lr})")
    parser.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay")
    parser.add_argument("--warmup", type=int, default=None, help=f"warmup steps (default {d.warmup})")
    parser.add_argument("--image-size", type=int, default=None,
                        help=f"image size of the demos and the model (default {d.image_size})")
    parser.add_argument("--seed", type=int, default=None, help="seed of initialisation, batches, noise")
    parser.add_argument("--shift", type=int, default=None,
                        help=f"random-shift augmentation in pixels (0: off; default {d.shift})")
    parser.add_argument("--state-dropout", type=float, default=None,
                        help="probability of replacing a sample's state by the data mean (default 0)")
    parser.add_argument("--ema", type=float, default=None, help=f"EMA decay of the saved weights (0: off; default {d.ema})")
    parser.add_argument("--save-every", type=int, default=None, help="checkpoint period in steps")
    parser.add_argument("--max-episodes", type=int, default=None, help="use only the first N episodes")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop and save after this wall time")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (0: torch's default; 1 is faster on a loaded machine)")
    parser.add_argument("--save-dtype", default=None, choices=("float32", "float16", "bfloat16"),
                        help="dtype of the saved weights (default float32)")
    parser.add_argument("--init", default=None,
                        help="start from this checkpoint (weights + normalization statistics) instead of random")
    parser.add_argument("--aux-weight", type=float, default=None,
                        help="weight of the training-only grounding loss on simulator object positions "
                             "(needs demos with env.cube_positions; 0: off, the default; the heads are not saved)")
    parser.add_argument("--aux-pose", action="store_const", const=True, default=None,
                        help="the grounding loss also regresses the grasp / release joint poses")
    parser.add_argument("--aux-wrist", action="store_const", const=True, default=None,
                        help="the grounding loss also regresses the instructed cube relative to the jaw point from "
                             "the wrist camera's tokens (forward kinematics of the recorded joints; needs MuJoCo)")
    parser.add_argument("--aux-layer", type=int, default=None,
                        help=f"VLM layer feeding the prefix grounding head (<0: from the end; default {d.aux_layer})")
    parser.add_argument("--decision-weight", type=float, default=None,
                        help="sampling weight of decision frames (episode start, grasp) vs the others (default 1)")
    parser.add_argument("--color-swap", type=float, default=None,
                        help="fraction of samples whose red / green / blue cube colours are permuted in the images "
                             "and the instruction alike (training-only augmentation; default 0)")
    parser.add_argument("--prune-train", type=float, default=None,
                        help="fraction of samples trained on the prefix the runtime token pruning keeps "
                             "(pruning-aware training; default 0)")
    parser.add_argument("--prune-keep-ratio", type=float, default=None,
                        help="pruning.keep_ratio for those samples (default 0.5, the runtime default)")
    parser.add_argument("--patch-size", type=int, default=None,
                        help="vision patch size (default: small_arch's 8; with --init: the checkpoint's)")
    parser.add_argument("--pixel-shuffle", type=int, default=None,
                        help="connector pixel-shuffle factor (default: small_arch's 2); tokens per camera = "
                             "(image_size / patch_size / pixel_shuffle)^2")
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="actions per predicted chunk (default: small_arch's 10 = 1 s at 10 Hz)")
    parser.add_argument("--n-action-steps", type=int, default=None,
                        help="actions executed per inference, the checkpoint's default horizon (default: small_arch's 5)")
    parser.add_argument("--relative-actions", action="store_true",
                        help="predict the 5 arm joints relative to the observed state (openpi DeltaActions; the "
                             "gripper stays absolute); the policy adds the state back")
    parser.add_argument("--decision-window", type=int, default=None,
                        help="frames oversampled at each decision point (default 0: the chunk size)")
    parser.add_argument("--attention", choices=ATTENTION_CHOICES, default=None,
                        help="attention while training: eager (LeRobot's path, default) or fused (torch SDPA, "
                             "faster; the checkpoint is the same kind and runs eager at inference)")
    parser.add_argument("--prune-align", type=float, default=None,
                        help="weight of the training-only relevance alignment loss: the pruning's scores of the scene "
                             "tokens showing the instructed cube and place pulled to the top (0: off, default)")
    parser.add_argument("--prune-align-wrist", type=float, default=None,
                        help="the same alignment on the wrist camera's tokens (the camera placed at each frame's "
                             "recorded joint positions by forward kinematics; 0: off, default)")
    parser.add_argument("--rtc-train-max-delay", type=int, default=None,
                        help="training-time real-time chunking (arXiv 2512.05964): each sample's first d ~ U{0..N} "
                             "actions given clean as a committed prefix, out of the loss; the checkpoint declares N "
                             "and serves rtc.mode=trained (0: off, default)")
    parser.add_argument("--device", default=None,
                        help="torch device of the training step: cpu (default) or cuda[:N] (a GPU; not needed)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


_FIELDS = ("steps", "batch", "lr", "weight_decay", "warmup", "image_size", "seed", "shift", "state_dropout", "ema",
           "save_every", "max_episodes", "max_minutes", "threads", "save_dtype", "init", "aux_weight", "aux_pose",
           "aux_layer", "aux_wrist", "decision_weight", "color_swap", "prune_train", "prune_keep_ratio",
           "decision_window", "attention", "prune_align", "prune_align_wrist", "device", "rtc_train_max_delay")


def run(args: argparse.Namespace) -> int:
    from effvla_ros.train.recipes import RECIPES, ensure_demos, stage_plan
    from effvla_ros.train.trainer import TrainConfig, train

    recipe = RECIPES[args.recipe] if args.recipe else None
    defaults = TrainConfig(data="", out="")
    explicit = {f: getattr(args, f) for f in _FIELDS if getattr(args, f) is not None}
    plan = stage_plan(recipe, {f: getattr(defaults, f) for f in _FIELDS}, explicit, args.out)
    if any(v["steps"] < 1 or v["batch"] < 1 for v, _ in plan):
        print("effvla train: --steps and --batch must be positive", file=sys.stderr)
        return 2
    data = args.data
    if data is None:
        if recipe is None:
            print("effvla train: --data (or --recipe) is required", file=sys.stderr)
            return 2
        data = ensure_demos(recipe, args.demos_root, workers=args.gen_workers, progress=not args.no_progress)
    arch = dict(recipe.arch) if recipe is not None else {}
    if args.patch_size is not None:
        arch["patch_size"] = args.patch_size
    if args.pixel_shuffle is not None:
        arch["scale_factor"] = args.pixel_shuffle
    if args.chunk_size is not None:
        arch["chunk_size"] = args.chunk_size
    if args.n_action_steps is not None:
        arch["n_action_steps"] = args.n_action_steps
    if args.relative_actions:
        arch["relative_action_dims"] = (0, 1, 2, 3, 4)
    for k, (values, out) in enumerate(plan):
        values["warmup"] = max(1, min(values["warmup"], values["steps"] // 10))
        if len(plan) > 1:
            print(f"effvla train: stage {k + 1} of {len(plan)} (init {values['init']}) -> {out}")
        cfg = TrainConfig(data=",".join(str(d) for d in data), out=str(out), arch_changes=dict(arch), **values)
        try:
            train(cfg, progress=not args.no_progress)
        except (ValueError, FileNotFoundError) as e:
            print(f"effvla train: {e}", file=sys.stderr)
            return 2
    return 0
