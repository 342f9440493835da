"""``effvla check-target``: estimate memory and compute of a checkpoint + configuration on a target."""
from __future__ import annotations

import argparse

from effvla_ros.core.target_check import TARGETS, check, check_checkpoint


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", required=True, choices=sorted(TARGETS), help="hardware target")
    p.add_argument("--checkpoint", help="LeRobot SmolVLA checkpoint directory (default: the real SmolVLA-450M shapes)")
    p.add_argument("--vlm-dir", help="VLM config + tokenizer directory, when not inside the checkpoint")
    p.add_argument("--cameras", type=int, help="number of cameras (default: the checkpoint's)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="dtype of every stage")
    p.add_argument("--vision-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--vlm-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--expert-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--num-steps", type=int, help="denoising steps (default: the checkpoint's)")
    p.add_argument("--keep-ratio", type=float, default=1.0, help="fraction of visual tokens kept")
    p.add_argument("--fps", type=float, default=30.0, help="control rate of the actions")
    p.add_argument("--execution-horizon", type=int, default=25, help="actions executed per chunk")
    p.add_argument("--memory-budget-gb", type=float, help="override the target's memory budget")


def run(args: argparse.Namespace) -> int:
    dt = dict(vision_dtype=args.dtype or args.vision_dtype, vlm_dtype=args.dtype or args.vlm_dtype,
              expert_dtype=args.dtype or args.expert_dtype)
    kw = dict(cameras=args.cameras, num_steps=args.num_steps, keep_ratio=args.keep_ratio, fps=args.fps,
              execution_horizon=args.execution_horizon, memory_budget_gb=args.memory_budget_gb, **dt)
    if args.checkpoint:
        est = check_checkpoint(args.checkpoint, args.target, args.vlm_dir, **kw)
    else:
        from effvla_ros.core.smolvla import smolvla_450m_arch

        est = check(smolvla_450m_arch(), args.target, **kw)
    print(est.table())
    return 1 if est.problems else 0
