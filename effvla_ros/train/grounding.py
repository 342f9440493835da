"""Training-only auxiliary grounding loss from privileged simulator information.

A policy trained from scratch on a few hundred demonstrations learns the motions from the joint state
long before it learns to *look*: at the decision points (first chunk: which cube, where; start of the
transport: where is the plate / mat) it predicts the data mean. Regressing object positions from the
model's own intermediate features gives the vision tower and the VLM a dense, direct grounding signal.

Targets per frame (:func:`grounding_targets`, from the episode's seed via
:func:`effvla_ros.sim.task.sample_task` and the recorded ``env.cube_positions``), table-plane (x, y)
normalized as ``((x - 0.225) / 0.05, y / 0.05)``; :data:`TARGET_NAMES` lists them:

* ``<colour>`` x/y for the four cube colours (masked where that colour is absent), ``plate``, ``mat``
  (instruction-free: what the scene camera shows);
* ``target`` (the instructed cube, current position) and ``goal`` (the instructed place);
* with ``pose=True`` also the arm's 5 joint targets at the grasp (the action where the commanded gripper
  angle first drops) and at the release (where it next rises), normalized with the action statistics:
  the same targets for every frame of the episode, i.e. "where will the arm have to go";
* with jaw points (``aux_wrist``) also the instructed cube's (x, y) relative to the jaw point (the point
  the expert closes the jaws on), normalized by the same 5 cm: what the wrist camera sees up close.

Heads (:class:`GroundingHeads`; small MLPs, trained alongside, **never saved with the checkpoint** — the
inference model and its LeRobot layout are unchanged):

* ``visual``: flattened connector tokens of the scene camera -> the instruction-free targets;
* ``wrist`` (with ``aux_wrist``): flattened connector tokens of the wrist camera -> the jaw-relative target;
* ``prefix``: hidden state of the state token (the last prefix token, which attends to every image and
  language token) at the output of VLM layer ``layer`` -> all targets. That hidden state feeds the next
  layer's keys / values, which the action expert reads.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from effvla_ros.core.compression.pruning import PruningConfig
from effvla_ros.core.smolvla import PrefillLayerInfo, SmolVLAPolicy, VisualTokens
from effvla_ros.train.data import Episode
from effvla_ros.train.layout import episode_layout
from effvla_ros.train.losses import flow_pass
from effvla_ros.train.relevance import kept_fraction, relevance_loss, stat_name

XY_CENTER = (0.225, 0.0)
XY_SCALE = 0.05
COLOR_NAMES: tuple[str, ...] = ("red", "green", "blue", "yellow")  # order of the per-colour targets
TARGET_NAMES: tuple[str, ...] = (*COLOR_NAMES, "plate", "mat", "target", "goal")
N_VISUAL = 6  # the first 6 names (x, y each) are instruction-free
N_XY = 2 * len(TARGET_NAMES)
N_POSE = 10  # grasp pose (5 joints), release pose (5 joints)
N_REL = 2  # the instructed cube's (x, y) relative to the jaw point (with jaw points, see grounding_targets)
N_TARGETS = N_XY + N_POSE + N_REL


def _norm_xy(xy: np.ndarray) -> np.ndarray:
    xy = np.asarray(xy, dtype=np.float32)
    return np.stack([(xy[..., 0] - XY_CENTER[0]) / XY_SCALE, (xy[..., 1] - XY_CENTER[1]) / XY_SCALE], axis=-1)


def _pose_targets(ep: Episode, mean: np.ndarray, std: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    out = np.zeros(N_POSE, np.float32)
    mask = np.zeros(N_POSE, bool)
    c, r = ep.grasp_frame(), ep.release_frame()
    if c is not None:
        out[:5] = (ep.action[c, :5] - mean[:5]) / std[:5]
        mask[:5] = True
    if r is not None:
        out[5:] = (ep.action[r, :5] - mean[:5]) / std[:5]
        mask[5:] = True
    return out, mask


def grounding_targets(ep: Episode, action_stats: tuple[np.ndarray, np.ndarray] | None = None,
                      jaw: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """(targets (T, N_TARGETS) float32, mask (T, N_TARGETS) bool) of an episode, or None when the episode
    has no recorded cube positions / seed or its seed does not reproduce its instruction and layout.
    The pose targets are filled (and unmasked) only with ``action_stats`` = (mean, std) of the actions, the
    relative targets only with ``jaw`` (T, 3), the jaw point of every frame (forward kinematics of the
    recorded joint positions, :meth:`~effvla_ros.sim.env.TwoCubePickPlaceEnv.jaw_points`)."""
    layout = episode_layout(ep)
    if layout is None:
        return None
    spec, cubes = layout[0], layout[1][:, :, :2].astype(np.float32)    # (T, 2, 2)
    t = ep.length
    tgt = np.zeros((t, len(TARGET_NAMES), 2), dtype=np.float32)
    mask = np.zeros((t, len(TARGET_NAMES)), dtype=bool)
    for k, color in enumerate(spec.cube_colors):
        ci = COLOR_NAMES.index(color)
        tgt[:, ci] = _norm_xy(cubes[:, k])
        mask[:, ci] = True
    for name in ("plate", "mat"):
        i = TARGET_NAMES.index(name)
        tgt[:, i] = _norm_xy(np.asarray(spec.place_xy[name]))[None]
        mask[:, i] = True
    tgt[:, TARGET_NAMES.index("target")] = _norm_xy(cubes[:, spec.target_cube])
    tgt[:, TARGET_NAMES.index("goal")] = _norm_xy(np.asarray(spec.goal_xy))[None]
    mask[:, -2:] = True
    pose = np.zeros((t, N_POSE), np.float32)
    pmask = np.zeros((t, N_POSE), bool)
    if action_stats is not None:
        p, m = _pose_targets(ep, np.asarray(action_stats[0]), np.asarray(action_stats[1]))
        pose[:], pmask[:] = p, m
    rel = np.zeros((t, N_REL), np.float32)
    rmask = np.zeros((t, N_REL), bool)
    if jaw is not None:
        rel[:] = (cubes[:, spec.target_cube] - np.asarray(jaw, np.float32)[:, :2]) / XY_SCALE
        rmask[:] = True
    return (np.concatenate([tgt.reshape(t, -1), pose, rel], axis=1),
            np.concatenate([np.repeat(mask, 2, axis=1), pmask, rmask], axis=1))


class GroundingTargets:
    """Per-episode targets of a :class:`~effvla_ros.train.data.ChunkDataset`'s episodes, batched by sample."""

    def __init__(self, episodes: Sequence[Episode], *, pose: bool = False,
                 jaw_fn: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        """``jaw_fn``: (T, 6) joint positions -> (T, 3) jaw points; fills the relative targets."""
        self.targets: list[np.ndarray] = []
        self.masks: list[np.ndarray] = []
        self.num_with_targets = 0
        stats = None
        if pose:
            acts = np.concatenate([e.action for e in episodes]).astype(np.float64)
            stats = (acts.mean(0), np.maximum(acts.std(0), 1e-3))
        for ep in episodes:
            r = grounding_targets(ep, stats, jaw_fn(ep.state) if jaw_fn is not None else None)
            if r is None:
                r = (np.zeros((ep.length, N_TARGETS), np.float32), np.zeros((ep.length, N_TARGETS), bool))
            else:
                self.num_with_targets += 1
            self.targets.append(r[0])
            self.masks.append(r[1])

    def batch(self, index_pairs: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """index_pairs (B, 2) of (episode, frame) -> (targets (B, N_TARGETS), mask (B, N_TARGETS) bool)."""
        tg = np.stack([self.targets[ei][t] for ei, t in index_pairs])
        mk = np.stack([self.masks[ei][t] for ei, t in index_pairs])
        return torch.from_numpy(tg), torch.from_numpy(mk)


class GroundingHeads(nn.Module):
    """The training-only regression heads (see the module docstring); ``wrist_tokens > 0`` adds the wrist head
    (flattened wrist-camera tokens -> the instructed cube relative to the jaw point)."""

    def __init__(self, n_visual_tokens: int, d_vlm: int, hidden: int = 128, wrist_tokens: int = 0) -> None:
        super().__init__()
        self.wrist: nn.Module | None = None
        if wrist_tokens > 0:
            self.wrist = nn.Sequential(nn.LayerNorm(wrist_tokens * d_vlm), nn.Linear(wrist_tokens * d_vlm, hidden),
                                       nn.GELU(), nn.Linear(hidden, N_REL))
        self.visual = nn.Sequential(nn.LayerNorm(n_visual_tokens * d_vlm), nn.Linear(n_visual_tokens * d_vlm, hidden),
                                    nn.GELU(), nn.Linear(hidden, 2 * N_VISUAL))
        self.prefix = nn.Sequential(nn.LayerNorm(d_vlm), nn.Linear(d_vlm, hidden), nn.GELU(),
                                    nn.Linear(hidden, N_TARGETS))


def _masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(pred.dtype)
    return ((pred - target) ** 2 * m).sum() / m.sum().clamp_min(1.0)


def flow_and_grounding_loss(policy: SmolVLAPolicy, batch: Mapping[str, Any], heads: GroundingHeads | None,
                            targets: torch.Tensor | None, mask: torch.Tensor | None, *, layer: int, camera: str,
                            noise: torch.Tensor | None = None, t: torch.Tensor | None = None,
                            prune: tuple[PruningConfig, torch.Tensor] | None = None, wrist_camera: str | None = None,
                            relevance: Mapping[str, torch.Tensor] | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(masked flow-matching loss as :func:`~effvla_ros.train.losses.masked_loss`, grounding loss, stats).

    One forward pass (:func:`~effvla_ros.train.losses.flow_pass`: the computation of
    ``SmolVLAPolicy.flow_matching_loss``, vision trained), with the scene camera's connector tokens and the
    state token's hidden state at the output of VLM layer ``layer`` fed to the heads. stats: ``aux_visual`` /
    ``aux_prefix`` / ``aux_target_goal`` / ``aux_pose`` mean squared errors as 0-d tensors (normalized units;
    ``aux_target_goal`` = the prefix head on the instructed cube and place, ``aux_pose`` on the grasp / release
    poses, NaN where masked out). ``heads`` None: no grounding loss (0). ``prune`` = (PruningConfig, apply (B,)
    bool): the samples where ``apply`` is set see only the visual tokens the runtime pruning keeps
    (:mod:`effvla_ros.train.prune_aware`); the visual head still reads every scene token. ``wrist_camera``: the
    camera whose tokens feed ``heads.wrist`` (``aux_wrist``: its MSE on the jaw-relative targets).
    ``relevance``: camera -> (B, K) token indices of that camera (:mod:`effvla_ros.train.relevance`, -1: none):
    per camera, stats gets ``relevance_loss`` (named by :func:`~effvla_ros.train.relevance.stat_name`:
    ``relevance_loss_<camera>`` but for the scene camera), the relevance alignment loss *with* its gradient
    (the caller weights it and adds it), and ``relevance_kept`` (``relevance_kept_<camera>``), the fraction of
    those tokens that the pruning keeps in the pruned samples.
    """
    hidden: dict[str, torch.Tensor] = {}

    def grab(info: PrefillLayerInfo) -> None:
        if info.layer_idx == layer:
            hidden["h"] = info.hidden_out

    want_hidden = heads is not None and targets is not None and mask is not None
    fp = flow_pass(policy, batch, noise=noise, t=t, prune=prune, embed_language=relevance is not None,
                   layer_callback=grab if want_hidden else None)
    flow, tokens = fp.loss, fp.encoding.tokens
    rel_stats: dict[str, torch.Tensor] = {}
    if relevance is not None and fp.lang_emb is not None:
        for cam, rel in relevance.items():
            rel_stats[stat_name("relevance_loss", cam)] = relevance_loss(tokens[cam], fp.lang_emb, fp.lang_mask.bool(),
                                                                         rel)
            vis = fp.visual[cam]
            if prune is not None and isinstance(vis, VisualTokens) and vis.mask is not None:
                applied = prune[1].to(rel.device)
                rel_stats[stat_name("relevance_kept", cam)] = kept_fraction(vis.mask[applied], rel[applied])

    if heads is None or targets is None or mask is None:
        return flow, torch.zeros((), dtype=flow.dtype, device=flow.device), rel_stats
    s0, _ = fp.cache.segments["state"]
    state_h = hidden["h"][:, s0]                                                # (B, D)
    pv = heads.visual(tokens[camera].flatten(1))                               # (B, N * D) -> visual targets
    pp = heads.prefix(state_h)
    nv = 2 * N_VISUAL
    l_vis = _masked_mse(pv, targets[:, :nv], mask[:, :nv])
    l_pre = _masked_mse(pp, targets, mask)
    aux = l_vis + l_pre
    # stats stay tensors (no wait for a GPU each step); the trainer averages them when it logs
    stats = {"aux_visual": l_vis.detach(), "aux_prefix": l_pre.detach(), **rel_stats}
    if heads.wrist is not None and wrist_camera is not None:
        pw = heads.wrist(tokens[wrist_camera].flatten(1))
        l_wr = _masked_mse(pw, targets[:, -N_REL:], mask[:, -N_REL:])
        aux = aux + l_wr
        stats["aux_wrist"] = l_wr.detach()
    with torch.no_grad():
        stats["aux_target_goal"] = _masked_mse(pp[:, nv:N_XY], targets[:, nv:N_XY], mask[:, nv:N_XY])
        pose_mask = mask[:, N_XY:N_XY + N_POSE]
        stats["aux_pose"] = torch.where(pose_mask.any(), _masked_mse(pp[:, N_XY:N_XY + N_POSE],
                                                                     targets[:, N_XY:N_XY + N_POSE], pose_mask),
                                        torch.full((), float("nan"), device=pp.device))
    return flow, aux, stats
