"""Per-step chunk correction: A2C2 (Sendai et al., "Leave No Observation Behind: Real-time Correction for VLA
Action Chunks", arXiv 2509.23224).

A chunk is planned from one observation and executed open loop for several control steps, more under an inference
delay: its row ``i`` is ``i`` steps old when it is executed. A2C2 adds a small head that runs at *every* control
step, after the chunk was chosen, and adds a residual to that step's action from what is new since the chunk's
observation::

    a_k = base[i] + clip(scale * head(base[i], base, i, q_k, q_obs, v_k))

* ``base``: the executing chunk (its H actions; the plan is the base policy's feature of the paper), ``base[i]``
  the action it holds for this step, ``i`` the row (= steps since its observation, the delay included; rows past
  the chunk's end are the held last action, index H);
* ``q_k``: the joint positions measured now, ``q_obs``: those of the chunk's observation;
* ``v_k`` (heads with ``visual``): the newest camera frames through the policy's own vision encoder and connector
  (:meth:`SmolVLAPolicy.encode_images`, every token, no pruning), projected per token and flattened.

The head is an MLP whose last layer starts at zero (a new head returns the base action). It is trained on
demonstrations without touching the base policy (``effvla train-correction``, :mod:`effvla_ros.train.correction`):
the base policy plans a chunk from the frame ``t0``, and for each row ``j`` the target is the demonstrator's action
at ``t0 + j`` minus ``base[j]``, from the frame at ``t0 + j``. All inputs and the output are in the units of the
head's own statistics (mean / std of the demonstrations' actions, which also normalize the joint positions: both
are joint angles), stored with it.

Files (beside a checkpoint, or anywhere): ``correction_head.safetensors`` (weights and statistics) and
``correction_head.json`` (the architecture and how it was trained). No ROS here: eval-sim applies it per step; in the
graph the ``chunk_corrector`` node runs it on every new frame set for the rows of the executing chunk that are not
yet committed and the chunk executor adds the residuals (``effvla_ros/ActionCorrection``). A row is committed before
it runs, so there its residual comes from an observation a step or more older than the row (eval-sim's
``exec.correction_lag`` emulates that; the executor reports the age it measured).
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from effvla_ros.core.params import ConfigBase, param

HEAD_WEIGHTS = "correction_head.safetensors"
HEAD_META = "correction_head.json"
FORMAT = "effvla-correction-head"
VERSION = 1


@dataclass
class CorrectionConfig(ConfigBase):
    """Per-step chunk correction (A2C2; ``correction.`` parameters)."""

    enabled: bool = param(False, description="add the correction head's residual to every executed action (A2C2, "
                                             "arXiv 2509.23224; needs correction_head.* beside the checkpoint)")
    scale: float = param(1.0, min=0.0, max=2.0, description="multiplies the head's residual (0: the base actions)")
    max_correction: float = param(3.0, min=0.0, max=100.0,
                                  description="cap on the residual per dimension, in standard deviations of the "
                                              "demonstrations' actions")


@dataclass
class HeadSpec:
    """The architecture of a head and the shapes it was trained for."""

    action_dim: int
    chunk_size: int
    hidden: int = 256
    layers: int = 3
    cameras: list[str] = field(default_factory=list)  # empty: no visual input
    visual_tokens: int = 0  # per camera
    visual_dim: int = 0  # the connector's width
    visual_width: int = 8  # per token after the projection
    use_state: bool = True  # the measured joint positions (now and at the chunk's observation) as inputs
    max_lag: int = 0  # > 0: trained on observations 0..max_lag steps older than the corrected row, told which
    dims: list[int] = field(default_factory=list)  # the action dimensions corrected (empty: all); others pass
    state_dims: list[int] = field(default_factory=list)  # joints whose measured positions are inputs (empty: all)
    members: int = 1  # > 1: an ensemble of that many MLPs (trained from different seeds), residuals averaged
    trained: dict[str, Any] = field(default_factory=dict)  # how (for the record)

    @property
    def visual(self) -> bool:
        return bool(self.cameras)

    def input_dim(self) -> int:
        a, h = self.action_dim, self.chunk_size
        # base row, chunk, row one-hot (H rows + past the end) and i/H; q now, q at the observation, base row - q now
        n = a + h * a + (h + 1) + 1 + (3 * a if self.use_state else 0)
        if self.visual:
            n += len(self.cameras) * self.visual_tokens * self.visual_width
        if self.max_lag > 0:
            n += self.max_lag + 1  # the lag one-hot
        return n

    def validate(self) -> None:
        for name in ("action_dim", "chunk_size", "hidden", "layers", "members"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"correction head: {name} {getattr(self, name)!r} must be at least 1")
        if self.visual and (self.visual_tokens < 1 or self.visual_dim < 1 or self.visual_width < 1):
            raise ValueError("correction head: cameras given without visual_tokens / visual_dim / visual_width")
        if int(self.max_lag) < 0:
            raise ValueError(f"correction head: max_lag {self.max_lag} must be >= 0")
        if any(not 0 <= int(d) < self.action_dim for d in self.state_dims):
            raise ValueError(f"correction head: state_dims {self.state_dims} must lie in 0..{self.action_dim - 1}")
        if any(not 0 <= int(d) < self.action_dim for d in self.dims):
            raise ValueError(f"correction head: dims {self.dims} must lie in 0..{self.action_dim - 1}")


class _Member(nn.Module):
    """One MLP of an ensemble: the visual projection (heads with cameras), the body and the output layer."""

    def __init__(self, spec: HeadSpec) -> None:
        super().__init__()
        self.vis_proj = nn.Linear(spec.visual_dim, spec.visual_width) if spec.visual else None
        dims = [spec.input_dim()] + [spec.hidden] * (spec.layers - 1)
        mods: list[nn.Module] = []
        for i in range(len(dims) - 1):
            mods += [nn.Linear(dims[i], dims[i + 1]), nn.LayerNorm(dims[i + 1]), nn.SiLU()]
        self.body = nn.Sequential(*mods)
        self.out = nn.Linear(dims[-1], spec.action_dim)
        nn.init.zeros_(self.out.weight)  # a new head corrects nothing
        nn.init.zeros_(self.out.bias)

    def residual(self, before: list[Tensor], visual: Tensor | None, after: list[Tensor]) -> Tensor:
        """The member's output from the shared input features around its own visual projection: (B, A)."""
        parts = list(before)
        if self.vis_proj is not None:
            if visual is None:
                raise ValueError("correction head: this head takes the newest camera frames (visual)")
            parts.append(self.vis_proj(visual).flatten(1))                  # (B, C * N * W)
        return self.out(self.body(torch.cat(parts + after, dim=1)))


class CorrectionHead(_Member):
    """The residual MLP (shapes in comments: B samples, A action dims, H chunk rows, C cameras, N tokens, D width).

    The head is its ensemble's member 0 (its ``vis_proj``, ``body`` and ``out`` keep a single head's parameter
    names, so a one-member file loads as before); members 1.. are ``extra``."""

    mean: Tensor
    std: Tensor
    mask: Tensor
    state_keep: Tensor

    def __init__(self, spec: HeadSpec) -> None:
        spec.validate()
        super().__init__(spec)
        self.spec = spec
        a = spec.action_dim
        # statistics of the demonstrations' actions (also for joint positions), filled by training or loading
        self.register_buffer("mean", torch.zeros(a))
        self.register_buffer("std", torch.ones(a))
        mask = torch.zeros(a) if spec.dims else torch.ones(a)
        mask[list(spec.dims)] = 1.0
        self.register_buffer("mask", mask)  # 1 on the corrected dimensions
        keep = torch.zeros(a) if spec.state_dims else torch.ones(a)
        keep[list(spec.state_dims)] = 1.0
        self.register_buffer("state_keep", keep, persistent=False)  # 1 on the joints whose measurements it sees
        self.extra = nn.ModuleList(_Member(spec) for _ in range(spec.members - 1))

    def member_modules(self) -> list[_Member]:
        """Each ensemble member (the head alone for a single head)."""
        return [self, *self.extra]

    def member_parameters(self, k: int) -> list[nn.Parameter]:
        """The parameters of member ``k`` (what one training run fits)."""
        m = self.member_modules()[k]
        return [p for mod in (m.vis_proj, m.body, m.out) if mod is not None for p in mod.parameters()]

    def norm(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def _shared(self, chunk: Tensor, index: Tensor, q_now: Tensor, q_obs: Tensor,
                lag: Tensor | None) -> tuple[list[Tensor], list[Tensor]]:
        """The input features every member shares: those before its visual projection and those after."""
        h = self.spec.chunk_size
        b = chunk.shape[0]
        row = index.clamp(0, h - 1)
        cn = self.norm(chunk)                                                # (B, H, A)
        base = cn[torch.arange(b), row]                                      # (B, A)
        onehot = torch.nn.functional.one_hot(index.clamp(0, h), h + 1).to(cn.dtype)  # (B, H + 1)
        frac = (index.to(cn.dtype) / h).unsqueeze(1)                         # (B, 1)
        before = [base, cn.flatten(1), onehot, frac]
        if self.spec.use_state:
            # joints outside state_dims hidden (0 = their mean)
            qn, qo = self.norm(q_now) * self.state_keep, self.norm(q_obs) * self.state_keep  # (B, A)
            before += [qn, qo, base - qn]
        after: list[Tensor] = []
        if self.spec.max_lag > 0:
            lag = torch.zeros_like(index) if lag is None else lag
            after.append(torch.nn.functional.one_hot(lag.clamp(0, self.spec.max_lag),
                                                     self.spec.max_lag + 1).to(cn.dtype))  # (B, L + 1)
        return before, after

    def forward(self, chunk: Tensor, index: Tensor, q_now: Tensor, q_obs: Tensor,
                visual: Tensor | None = None, lag: Tensor | None = None, member: int | None = None) -> Tensor:
        """The residual in normalized units (B, A): the mean over the ensemble's members, or member ``member``'s.

        chunk (B, H, A) raw actions; index (B,) long rows (>= H: past the end); q_now, q_obs (B, A) raw joint
        positions; visual (B, C, N, D) connector tokens of the newest frames; lag (B,) long: how many steps older
        than the row ``q_now`` and ``visual`` are (heads with ``max_lag``; None: 0)."""
        before, after = self._shared(chunk, index, q_now, q_obs, lag)    # once, whatever the member count
        members = self.member_modules() if member is None else [self.member_modules()[int(member)]]
        r = torch.stack([m.residual(before, visual, after) for m in members]).mean(0)
        return r * self.mask

    # ------------------------------------------------------------------------------------------ files
    def save(self, directory: str | Path) -> Path:
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(d / HEAD_WEIGHTS))
        (d / HEAD_META).write_text(json.dumps({"format": FORMAT, "version": VERSION, **asdict(self.spec)}, indent=1))
        return d

    @classmethod
    def load(cls, directory: str | Path) -> CorrectionHead:
        """The head in ``directory``; ValueError naming the file when it is missing or does not fit."""
        from safetensors.torch import load_file

        d = Path(directory)
        meta_p, w_p = d / HEAD_META, d / HEAD_WEIGHTS
        if not meta_p.is_file() or not w_p.is_file():
            raise ValueError(f"no correction head in {d} ({HEAD_META} and {HEAD_WEIGHTS}; train one with "
                             "`effvla train-correction`)")
        meta = json.loads(meta_p.read_text())
        if meta.pop("format", None) != FORMAT or meta.pop("version", None) != VERSION:
            raise ValueError(f"{meta_p}: not a version-{VERSION} {FORMAT} file")
        try:
            head = cls(HeadSpec(**meta))
            head.load_state_dict(load_file(str(w_p)))
        except (TypeError, RuntimeError) as e:
            raise ValueError(f"{w_p}: does not match {meta_p}: {e}") from None
        head.eval()
        return head


class ChunkCorrector:
    """A loaded head with its config, applied to one control step (what eval-sim and a node call)."""

    def __init__(self, head: CorrectionHead, cfg: CorrectionConfig | None = None) -> None:
        self.head = head.eval()
        self.cfg = cfg or CorrectionConfig(enabled=True)

    @property
    def needs_visual(self) -> bool:
        return self.head.spec.visual

    def check(self, chunk_size: int, action_dim: int, cameras: list[str] | None = None) -> None:
        """ValueError when the head was trained for another chunk, action or camera layout."""
        s = self.head.spec
        if s.chunk_size != chunk_size or s.action_dim != action_dim:
            raise ValueError(f"correction head: trained for chunks of {s.chunk_size} x {s.action_dim}, the policy "
                             f"gives {chunk_size} x {action_dim}")
        if s.visual and cameras is not None and list(cameras) != list(s.cameras):
            raise ValueError(f"correction head: trained on cameras {s.cameras}, the policy has {list(cameras)}")

    def _inputs(self, chunk: Tensor, n: int, q_now: Any, q_obs: Any,
                visual: Mapping[str, Tensor] | None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """The head's inputs for ``n`` rows of one chunk (H, A) from one observation: chunk (n, H, A), q_now and
        q_obs (n, A), visual (n, C, N, D) or None."""
        h = self.head
        hs, a = h.spec.chunk_size, h.spec.action_dim
        ch = torch.as_tensor(chunk, dtype=torch.float32).reshape(1, hs, a).expand(n, hs, a)
        qn = torch.as_tensor(np.asarray(q_now, dtype=np.float32)).reshape(1, -1).expand(n, -1)
        qo = torch.as_tensor(np.asarray(q_obs, dtype=np.float32)).reshape(1, -1).expand(n, -1)
        vis = None
        if h.spec.visual:
            if visual is None:
                raise ValueError("correction head: needs the newest camera frames")
            vis = torch.stack([visual[c].float().reshape(h.spec.visual_tokens, h.spec.visual_dim)
                               for c in h.spec.cameras]).unsqueeze(0).expand(n, -1, -1, -1)  # (n, C, N, D)
        return ch, qn, qo, vis

    def _scaled(self, r: Tensor) -> Tensor:
        """A normalized residual scaled, capped (``scale``, ``max_correction``) and in the actions' units."""
        cap = float(self.cfg.max_correction)
        return (float(self.cfg.scale) * r).clamp(-cap, cap) * self.head.std

    @torch.no_grad()
    def residual(self, chunk: Tensor, row: int, q_now: Any, q_obs: Any,
                 visual: Mapping[str, Tensor] | None = None, lag: int = 0) -> Tensor:
        """The raw residual (A,) for the action at ``row`` of ``chunk`` (H, A), joint positions now and at the
        chunk's observation; ``visual``: camera -> connector tokens (N, D) or (1, N, D) of the newest frames;
        ``lag``: how many steps before ``row``'s step those were observed."""
        ch, qn, qo, vis = self._inputs(chunk, 1, q_now, q_obs, visual)
        return self._scaled(self.head(ch, torch.tensor([int(row)]), qn, qo, vis, torch.tensor([int(lag)]))[0])

    @torch.no_grad()
    def row_residuals(self, chunk: Tensor, first: int, q_now: Any, q_obs: Any,
                      visual: Mapping[str, Tensor] | None = None, obs_row: int | None = None) -> Tensor | None:
        """The raw residuals (R, A) of rows ``first .. H - 1`` of ``chunk`` (H, A), all from one observation (the
        chunk_corrector node's call: the executor uses each row's newest residual when it commits that row), made
        at the chunk's row ``obs_row`` (None: ``first``; row i's lag is ``i - obs_row``); None when the head gives a
        non-finite value (nothing is corrected then)."""
        rows = torch.arange(int(first), self.head.spec.chunk_size)
        n = int(rows.numel())
        if n == 0:
            return torch.zeros(0, self.head.spec.action_dim)
        ch, qn, qo, vis = self._inputs(chunk, n, q_now, q_obs, visual)
        if not self.cfg.enabled or self.cfg.scale == 0.0:
            return torch.zeros(n, self.head.spec.action_dim)
        lag = (rows - (int(first) if obs_row is None else int(obs_row))).clamp(min=0)
        r = self._scaled(self.head(ch, rows, qn, qo, vis, lag))            # (R, A)
        return r if bool(torch.isfinite(r).all()) else None

    def correct(self, chunk: Tensor, row: int, q_now: Any, q_obs: Any,
                visual: Mapping[str, Tensor] | None = None, lag: int = 0) -> Tensor:
        """The corrected raw action for this step: ``chunk[min(row, H - 1)]`` + :meth:`residual`."""
        chunk = torch.as_tensor(chunk, dtype=torch.float32)
        base = chunk[min(int(row), chunk.shape[0] - 1)]
        if not self.cfg.enabled or self.cfg.scale == 0.0:
            return base.clone()
        r = self.residual(chunk, row, q_now, q_obs, visual, lag)
        if not bool(torch.isfinite(r).all()):  # never let a bad head move the arm: the base action stands
            return base.clone()
        return base + r


@torch.no_grad()
def encode_frames(policy: Any, frames: Mapping[str, Any]) -> dict[str, Tensor]:
    """What a head with camera input sees of RGB ``frames`` (camera -> HxWx3 uint8): each through the policy's own
    vision encoder and connector, every token, no pruning (camera -> (N, D)). Training and eval-sim both call this."""
    from effvla_ros.core.observation import rgb_to_tensor

    enc = policy.encode_images({c: rgb_to_tensor(f).unsqueeze(0) for c, f in frames.items()})
    return {c: enc.tokens[c][0] for c in frames}


_LOADED: dict[str, CorrectionHead] = {}


def load_corrector(directory: str | Path, cfg: CorrectionConfig) -> ChunkCorrector:
    """A corrector for the head in ``directory`` (loaded once per process)."""
    key = str(Path(directory).resolve())
    if key not in _LOADED:
        _LOADED[key] = CorrectionHead.load(directory)
    return ChunkCorrector(_LOADED[key], cfg)


__all__ = ["HEAD_META", "HEAD_WEIGHTS", "ChunkCorrector", "CorrectionConfig", "CorrectionHead", "HeadSpec",
           "encode_frames", "load_corrector"]
