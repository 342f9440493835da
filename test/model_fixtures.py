"""A tiny SmolVLA checkpoint in LeRobot's layout, written by our own save_policy (random weights)."""
from __future__ import annotations

from pathlib import Path

import torch


def write_tiny_checkpoint(out: Path, seed: int = 0, cameras: tuple[str, ...] = ("camera1", "camera2")) -> Path:
    from effvla_ros.core.smolvla import build_random_policy, save_policy, tiny_arch
    from effvla_ros.core.smolvla.tokenizer import build_tiny_tokenizer

    stats = {"observation.state": {"mean": torch.zeros(6), "std": torch.ones(6)},
             "action": {"mean": torch.zeros(6), "std": torch.ones(6) * 0.5}}
    arch = tiny_arch(cameras=cameras) if cameras != ("camera1", "camera2") else tiny_arch()
    policy = build_random_policy(arch, tokenizer=build_tiny_tokenizer(), seed=seed, stats=stats)
    save_policy(policy, out)
    return out
