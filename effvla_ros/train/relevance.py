"""Relevance alignment: teach the runtime's task-relevance pruning where the task is (training only).

The token compressor keeps the visual tokens that score highest against the instruction's token
embeddings (LightVLA's parameter-free queries, :func:`effvla_ros.core.compression.pruning.select_tokens`).
In a VLM trained from scratch nothing relates a connector token to the words "blue block" or "plate":
the ranking is arbitrary, and pruning-aware training (:mod:`effvla_ros.train.prune_aware`) can only
teach the policy to cope with whatever survives. LightVLA learns its selection end to end; here the
selection rule stays the runtime's own, and a training-only loss makes its scores meaningful: with the
simulator's privileged positions (the instructed cube in every frame, the instructed place) projected
through the fixed scene camera onto the connector's token grid, a cross-entropy over the scene
camera's tokens, with each token's selection score (:func:`~effvla_ros.core.compression.pruning.token_scores_batch`)
as logits, pulls the score of the token that shows the instructed cube, and of the one that shows the
place, to the top. The gradient reaches the vision tower, the connector and the text embeddings; the
checkpoint holds no new parameter, and the compressor runs unchanged. ``--prune-align-wrist`` does the same
for the wrist camera, which moves with the arm: its pose in each frame comes from forward kinematics of the
frame's recorded joint positions (:meth:`CameraModel.along`), and its targets are the tokens showing the
instructed cube (in the jaws once grasped) and the place when they are in view.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from effvla_ros.core.compression.pruning import token_scores_batch
from effvla_ros.train.data import Episode
from effvla_ros.train.layout import episode_layout


@dataclass(frozen=True)
class CameraModel:
    """A MuJoCo pinhole camera: world position ``pos`` (3,), orientation ``mat`` (3, 3) (columns = the camera's
    x right, y up, z backwards, in world coordinates) and vertical field of view ``fovy_deg``. A moving camera
    (:meth:`along`) has one pose per frame: ``pos`` (T, 3), ``mat`` (T, 3, 3), projecting points (T, 3)."""

    pos: np.ndarray
    mat: np.ndarray
    fovy_deg: float

    @classmethod
    def from_env(cls, env: Any, camera: str = "scene") -> CameraModel:
        """The camera ``camera`` of a :class:`~effvla_ros.sim.env.TwoCubePickPlaceEnv` as placed now."""
        d, m = env._data, env._model
        return cls(np.array(d.cam(camera).xpos, dtype=np.float64),
                   np.array(d.cam(camera).xmat, dtype=np.float64).reshape(3, 3), float(m.cam(camera).fovy[0]))

    @classmethod
    def along(cls, env: Any, joint_positions: np.ndarray, camera: str = "wrist") -> CameraModel:
        """The camera ``camera`` of a :class:`~effvla_ros.sim.env.TwoCubePickPlaceEnv` at each of the arm's
        (T, 6) joint positions (forward kinematics: the wrist camera of a recorded episode, frame by frame)."""
        pos, mat = env.camera_poses(joint_positions, camera)
        return cls(pos, mat, float(env._model.cam(camera).fovy[0]))

    def pixels(self, points: np.ndarray, size: int) -> np.ndarray:
        """World points (..., 3) -> (..., 2) image coordinates (column u, row v; row 0 at the top, as rendered)
        in a ``size`` x ``size`` image; NaN for points behind the camera."""
        pc = np.einsum("...i,...ij->...j", np.asarray(points, dtype=np.float64) - self.pos, self.mat)  # camera frame
        depth = -pc[..., 2]
        f = (size / 2) / np.tan(np.deg2rad(self.fovy_deg) / 2)
        with np.errstate(divide="ignore", invalid="ignore"):
            u = np.where(depth > 0, f * pc[..., 0] / depth + size / 2, np.nan)
            v = np.where(depth > 0, -f * pc[..., 1] / depth + size / 2, np.nan)
        return np.stack([u, v], axis=-1)

    def token_index(self, points: np.ndarray, size: int, grid: tuple[int, int]) -> np.ndarray:
        """World points (...,  3) -> (...) index of the connector token (row-major ``grid``, the order of the
        connector's pixel shuffle) whose image cell holds the point; -1 outside the image."""
        uv = self.pixels(points, size)
        gh, gw = grid
        ok = np.isfinite(uv).all(-1) & (uv[..., 0] >= 0) & (uv[..., 0] < size) & (uv[..., 1] >= 0) & (uv[..., 1] < size)
        uv = np.where(ok[..., None], uv, 0.0)
        row = np.floor(uv[..., 1] * gh / size).astype(np.int64)
        col = np.floor(uv[..., 0] * gw / size).astype(np.int64)
        return np.where(ok, row * gw + col, -1)


def relevance_token_targets(ep: Episode, camera: CameraModel, size: int, grid: tuple[int, int]) -> np.ndarray | None:
    """(T, 2) int64 of an episode: per frame, the token of ``camera`` (fixed, or one pose per frame) showing
    the instructed cube and the one showing the instructed place (-1: outside the image), or None when the
    episode has no recorded cube positions or its seed does not reproduce its task."""
    layout = episode_layout(ep)
    if layout is None:
        return None
    spec, cubes = layout  # cubes (T, 2, 3)
    cube = camera.token_index(cubes[:, spec.target_cube], size, grid)  # (T,)
    goal = np.array([*spec.goal_xy, cubes[0, spec.target_cube, 2]])
    place = camera.token_index(np.broadcast_to(goal, (ep.length, 3)), size, grid)  # (T,)
    return np.stack([cube, place], axis=1)


class RelevanceTargets:
    """Per-episode :func:`relevance_token_targets` of a :class:`~effvla_ros.train.data.ChunkDataset`'s
    episodes, batched by sample (episodes without: -1, no loss). ``camera``: the fixed camera, or a function
    of the episode giving its camera frame by frame (:meth:`CameraModel.along` its recorded joint positions)."""

    def __init__(self, episodes: Sequence[Episode], camera: CameraModel | Callable[[Episode], CameraModel],
                 size: int, grid: tuple[int, int]) -> None:
        self.targets: list[np.ndarray] = []
        self.num_with_targets = 0
        for ep in episodes:
            cam = camera if isinstance(camera, CameraModel) else camera(ep)
            r = relevance_token_targets(ep, cam, size, grid)
            if r is None:
                r = np.full((ep.length, 2), -1, dtype=np.int64)
            else:
                self.num_with_targets += 1
            self.targets.append(r)

    def batch(self, index_pairs: np.ndarray) -> torch.Tensor:
        """index_pairs (B, 2) of (episode, frame) -> (B, 2) int64 token indices."""
        return torch.from_numpy(np.stack([self.targets[ei][t] for ei, t in index_pairs]))


def stat_name(stat: str, camera: str) -> str:
    """The training-log name of a relevance statistic (``relevance_loss``, ``relevance_kept``) of ``camera``:
    unsuffixed for the scene camera (the logs before the wrist alignment), ``<stat>_<camera>`` otherwise."""
    return stat if camera == "scene" else f"{stat}_{camera}"


def relevance_loss(visual: torch.Tensor, task: torch.Tensor, task_mask: torch.Tensor,
                   targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the selection scores of one camera's tokens toward the target tokens.

    visual (B, N, d) connector tokens; task (B, M, d) the instructions' token embeddings (zero-padded, valid
    where task_mask (B, M)); targets (B, K) token indices, -1 ignored. 0 when no target is valid."""
    score, _ = token_scores_batch(visual, task, task_mask)  # (B, N)
    k = targets.shape[1]
    logits = score[:, None, :].expand(-1, k, -1).reshape(-1, score.shape[1])  # (B * K, N)
    tg = targets.to(score.device).reshape(-1)
    total = F.cross_entropy(logits, tg, ignore_index=-1, reduction="sum")
    return total / (tg >= 0).sum().clamp_min(1)


def kept_fraction(keep: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Fraction of the valid targets (B, K) whose token the keep mask (B, N) keeps (a 0-d tensor; 0 if none)."""
    targets = targets.to(keep.device)
    valid = targets >= 0
    hit = torch.gather(keep, 1, targets.clamp_min(0)) & valid
    return hit.sum() / valid.sum().clamp_min(1)
