"""Action-chunk training samples from ``effvla gen-demos`` episodes (in memory).

For every frame ``t`` of every episode a sample holds the observation of frame ``t`` (both cameras,
the joint state, the instruction) and the action chunk ``action[t : t + chunk_size]``. Where the
episode ends before the chunk does, the chunk is padded with the episode's last action and
``action_is_pad`` is True there (LeRobot's convention: the loss is masked on padded steps).

Normalization statistics (mean / std over all frames) of ``observation.state`` and ``action`` are
computed from the data (:func:`compute_stats`) in the layout :class:`~effvla_ros.core.smolvla.Normalizer`
takes.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from effvla_ros.sim.dataset import FEATURES, FORMAT, VERSION, load_index


@dataclass
class Episode:
    images: dict[str, np.ndarray]  # camera -> (T, S, S, 3) uint8
    state: np.ndarray  # (T, state_dim) float32
    action: np.ndarray  # (T, action_dim) float32
    task: str
    seed: int = -1
    cube_pos: np.ndarray | None = None  # (T, 2, 3) float32 cube centres [m] (``env.cube_positions``), if recorded
    # first frame that is a demonstration: the frames before it are a deliberately failed grasp (``failed_grasp``
    # in the demo files, ``effvla gen-demos --regrasp``) and are never trained on
    train_start: int = 0

    @property
    def length(self) -> int:
        return int(self.action.shape[0])

    def grasp_frame(self) -> int | None:
        """The first frame from :attr:`train_start` on whose commanded gripper angle (last action dim) is more
        than 1e-3 rad below the previous frame's: the grasp starts closing. None when the gripper command
        never drops."""
        closing = np.nonzero(np.diff(self.action[self.train_start:, -1]) < -1e-3)[0]
        return self.train_start + int(closing[0]) + 1 if closing.size else None

    def release_frame(self) -> int | None:
        """The last frame (from :meth:`grasp_frame` on) before the commanded gripper angle first rises by more
        than 1e-3 rad: the release is decided there. None without a grasp or without a release."""
        c = self.grasp_frame()
        if c is None:
            return None
        opening = np.nonzero(np.diff(self.action[c:, -1]) > 1e-3)[0]
        return c + int(opening[0]) if opening.size else None


def load_demos(root: str | Path, *, max_episodes: int | None = None,
               cameras: Sequence[str] | None = None) -> tuple[list[Episode], dict]:
    """All (or the first ``max_episodes``) episodes of a demo directory, and its index."""
    root = Path(root)
    index = load_index(root)
    cams = list(cameras or index["cameras"])
    missing = [c for c in cams if c not in index["cameras"]]
    if missing:
        raise ValueError(f"{root}: cameras {missing} were not recorded (have {index['cameras']})")
    episodes: list[Episode] = []
    for e in index["episodes"][: max_episodes if max_episodes else None]:
        with np.load(root / e["file"]) as z:
            episodes.append(Episode(
                images={c: z[f"observation.images.{c}"] for c in cams},
                state=z["observation.state"].astype(np.float32),
                action=z["action"].astype(np.float32),
                task=str(z["task"]),
                seed=int(e.get("seed", -1)),
                cube_pos=z["env.cube_positions"].astype(np.float32) if "env.cube_positions" in z else None,
                train_start=_train_start(z["failed_grasp"]) if "failed_grasp" in z else 0,
            ))
    if not episodes:
        raise ValueError(f"{root}: no episodes")
    return episodes, index


def _train_start(failed_grasp: np.ndarray) -> int:
    """The first frame after the failed-grasp prefix (the marked frames must be a prefix of the episode)."""
    f = np.asarray(failed_grasp, dtype=bool)
    n = int(np.argmin(f)) if not f.all() else len(f)
    if f[n:].any():
        raise ValueError("failed_grasp: the marked frames are not a prefix of the episode")
    return n


def relative_chunks(ep: Episode, chunk_size: int, dims: Sequence[int]) -> np.ndarray:
    """(N, action_dim): every in-episode action ``action[t + i]`` (``i < chunk_size``, ``t + i < T``) of every
    frame's chunk, with the frame's state subtracted on ``dims`` (what a relative-action policy predicts)."""
    t = np.arange(ep.train_start, ep.length)[:, None] + np.arange(chunk_size)[None, :]
    valid = t < ep.length
    rel = ep.action[np.minimum(t, ep.length - 1)].copy()  # (T', H, A)
    d = list(dims)
    rel[:, :, d] -= ep.state[ep.train_start:, None, d]
    return rel[valid]


def compute_stats(episodes: Sequence[Episode], *, min_std: float = 1e-3, relative_dims: Sequence[int] = (),
                  chunk_size: int = 1) -> dict[str, dict[str, torch.Tensor]]:
    """Mean / std / min / max of ``observation.state`` and ``action`` over every trained frame (from each
    episode's ``train_start`` on).

    With ``relative_dims``, the action statistics are those of what the policy predicts: every chunk row
    (``chunk_size``) of every frame, minus the frame's state on those dims (:func:`relative_chunks`).
    ``std`` is floored at ``min_std`` so that a constant dimension does not blow up the normalization.
    """
    out: dict[str, dict[str, torch.Tensor]] = {}
    acts = ([relative_chunks(e, chunk_size, relative_dims) for e in episodes] if relative_dims
            else [e.action[e.train_start:] for e in episodes])
    for key, arrs in (("observation.state", [e.state[e.train_start:] for e in episodes]), ("action", acts)):
        x = np.concatenate(arrs, axis=0).astype(np.float64)
        out[key] = {
            "mean": torch.tensor(x.mean(0), dtype=torch.float32),
            "std": torch.tensor(np.maximum(x.std(0), min_std), dtype=torch.float32),
            "min": torch.tensor(x.min(0), dtype=torch.float32),
            "max": torch.tensor(x.max(0), dtype=torch.float32),
        }
    return out


class ChunkDataset:
    """Samples (frame t, actions t .. t+chunk_size-1) over every trained frame (``t >= train_start``) of every
    episode.

    ``dataset[i]`` returns a dict with ``observation.images.<camera>`` (3, S, S) float in [0, 1],
    ``observation.state`` (state_dim,), ``action`` (chunk_size, action_dim), ``action_is_pad``
    (chunk_size,) bool, ``task`` str, ``episode_index``, ``frame_index``. :meth:`batch` builds a batch
    directly (faster than collating items), optionally with random-shift augmentation.
    """

    def __init__(self, episodes: Sequence[Episode], chunk_size: int) -> None:
        if chunk_size < 1:
            raise ValueError("chunk_size must be at least 1")
        self.episodes = list(episodes)
        self.chunk_size = int(chunk_size)
        self.cameras = list(self.episodes[0].images)
        self.index = np.asarray([(ei, t) for ei, e in enumerate(self.episodes) for t in range(e.train_start, e.length)],
                                dtype=np.int64).reshape(-1, 2)
        # per episode: actions padded with the last action, and the pad mask, for fast slicing
        self._act = [np.concatenate([e.action, np.repeat(e.action[-1:], self.chunk_size - 1, axis=0)])
                     for e in self.episodes]
        self._pad = [np.arange(e.length + self.chunk_size - 1) >= e.length for e in self.episodes]

    def __len__(self) -> int:
        return int(self.index.shape[0])

    @property
    def tasks(self) -> list[str]:
        return sorted({e.task for e in self.episodes})

    def chunk(self, ei: int, t: int) -> tuple[np.ndarray, np.ndarray]:
        """(actions (chunk_size, action_dim), is_pad (chunk_size,)) of episode ``ei`` from frame ``t``."""
        h = self.chunk_size
        return self._act[ei][t: t + h], self._pad[ei][t: t + h]

    def __getitem__(self, i: int) -> dict:
        ei, t = (int(v) for v in self.index[i])
        e = self.episodes[ei]
        act, pad = self.chunk(ei, t)
        item: dict = {f"observation.images.{c}": torch.from_numpy(e.images[c][t]).permute(2, 0, 1).float() / 255.0
                      for c in self.cameras}
        item.update({
            "observation.state": torch.from_numpy(e.state[t].copy()),
            "action": torch.from_numpy(act.copy()),
            "action_is_pad": torch.from_numpy(pad.copy()),
            "task": e.task,
            "episode_index": ei,
            "frame_index": t,
        })
        return item

    def batch(self, indices: Sequence[int] | np.ndarray, *, shift: int = 0,
              rng: np.random.Generator | None = None) -> dict:
        """A batch of samples; ``shift > 0``: each image is shifted by up to ``shift`` pixels (edge padding,
        random crop back to the original size, independently per image), DrQ-style."""
        idx = self.index[np.asarray(indices, dtype=np.int64)]
        out: dict = {}
        for c in self.cameras:
            imgs = np.stack([self.episodes[ei].images[c][t] for ei, t in idx])  # (B, S, S, 3) uint8
            x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0
            if shift > 0:
                x = random_shift(x, shift, rng or np.random.default_rng())
            out[f"observation.images.{c}"] = x
        out["observation.state"] = torch.from_numpy(np.stack([self.episodes[ei].state[t] for ei, t in idx]))
        chunks = [self.chunk(int(ei), int(t)) for ei, t in idx]
        out["action"] = torch.from_numpy(np.stack([a for a, _ in chunks]))
        out["action_is_pad"] = torch.from_numpy(np.stack([p for _, p in chunks]))
        out["task"] = [self.episodes[ei].task for ei, _ in idx]
        return out


def random_shift(x: torch.Tensor, pad: int, rng: np.random.Generator) -> torch.Tensor:
    """(B, C, H, W) -> same shape, each image translated by an integer offset in [-pad, pad] (edge fill)."""
    b, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="replicate")
    offs = rng.integers(0, 2 * pad + 1, size=(b, 2))
    return torch.stack([padded[i, :, oy: oy + h, ox: ox + w] for i, (oy, ox) in enumerate(offs)])


def write_demos(root: str | Path, episodes: Sequence[Episode], *, fps: float = 10.0) -> dict:
    """Write ``episodes`` in the ``effvla gen-demos`` format (index.json + per-episode npz); return the index.

    Only the keys training reads are written (images, state, action, timestamp, frame_index, task)
    plus the index fields :func:`effvla_ros.sim.dataset.load_index` and :func:`load_demos` need: for
    converted or synthetic data (tests).
    """
    root = Path(root)
    (root / "episodes").mkdir(parents=True, exist_ok=True)
    cams = list(episodes[0].images)
    size = int(episodes[0].images[cams[0]].shape[1])
    entries = []
    for i, e in enumerate(episodes):
        t = e.length
        rel = f"episodes/episode_{i:06d}.npz"
        arrays: dict[str, np.ndarray] = {f"observation.images.{c}": np.asarray(e.images[c], dtype=np.uint8)
                                         for c in cams}
        arrays.update({
            "observation.state": np.asarray(e.state, dtype=np.float32),
            "action": np.asarray(e.action, dtype=np.float32),
            "timestamp": (np.arange(t) / fps).astype(np.float32),
            "frame_index": np.arange(t, dtype=np.int64),
            "task": np.asarray(e.task),
        })
        if e.cube_pos is not None:
            arrays["env.cube_positions"] = np.asarray(e.cube_pos, dtype=np.float32)
        if e.train_start:
            arrays["failed_grasp"] = np.arange(t) < e.train_start
        np.savez_compressed(root / rel, **arrays)  # type: ignore[arg-type]
        entries.append({"index": i, "file": rel, "seed": e.seed, "instruction": e.task, "success": True,
                        "length": t, "duration_s": t / fps})
    index = {"format": FORMAT, "version": VERSION, "fps": fps, "control_dt": 1.0 / fps, "image_size": size,
             "cameras": cams, "features": FEATURES, "episodes": entries,
             "stats": {"kept": len(entries), "frames": int(sum(e.length for e in episodes))}}
    (root / "index.json").write_text(json.dumps(index, indent=1))
    return index
