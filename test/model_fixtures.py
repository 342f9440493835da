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


def random_episode(t: int, seed: int, task: str, size: int = 32):  # type: ignore[no-untyped-def]
    """A training episode of ``t`` random frames (scene and wrist cameras at ``size`` px, a random-walk state, actions
    0.1 above it) for the trainer's tests."""
    import numpy as np

    from effvla_ros.train.data import Episode

    rng = np.random.default_rng(seed)
    state = np.cumsum(rng.normal(scale=0.05, size=(t, 6)), axis=0).astype(np.float32)
    return Episode(images={c: rng.integers(0, 256, (t, size, size, 3), dtype=np.uint8) for c in ("scene", "wrist")},
                   state=state, action=(state + 0.1).astype(np.float32), task=task, seed=seed)


def camera_tokens(policy, seed: int = 0):  # type: ignore[no-untyped-def]
    """Every camera's full token grid of a random 48 x 64 image, as the runner takes it (``CameraTokens``)."""
    from effvla_ros.core.runner import CameraTokens

    g = torch.Generator().manual_seed(seed)
    imgs = {c: torch.rand(1, 3, 48, 64, generator=g) for c in policy.cameras}
    enc = policy.encode_images(imgs)
    return {c: CameraTokens(t[0], torch.arange(t.shape[1]), enc.grid) for c, t in enc.tokens.items()}


def chunk_noise(policy, seed: int = 0) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Seeded flow noise of one chunk (1, chunk_size, max_action_dim)."""
    return torch.randn(1, policy.arch.chunk_size, policy.arch.max_action_dim,
                       generator=torch.Generator().manual_seed(seed))
