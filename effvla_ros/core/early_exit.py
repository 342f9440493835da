"""Training-free early exit for SmolVLA: VLM prefix reuse across observations and action-expert
feature reuse across denoising steps.

VLM (after DeeR-VLA, Yue et al., "DeeR-VLA: Dynamic Inference of Multimodal Large Language Models
for Efficient Robot Execution", NeurIPS 2024, arXiv 2411.02359): at candidate exit layers k, the
hidden states of the current prefix are compared with those of the last fully computed observation
at the same layer (mean per-token cosine similarity over the valid tokens). Above the exit's
threshold, the remaining layers are not computed: their K/V are taken from that observation's
cache. DeeR decides with an action-space criterion; with a training-free VLM there is no
intermediate action head, so the hidden-state similarity is used, with the thresholds calibrated
on data exactly as DeeR does (see :func:`calibrate_thresholds`). A full computation is forced after
``max_consecutive_reuses`` exits, when the instruction or the prefix layout (kept tokens) changes.

Action expert (after EfficientVLA, Yang et al. 2025, which caches intermediate features of the
diffusion/flow action head across denoising steps): per expert layer, when the layer's input
changed little since the last step at which it was computed (relative L2 change below
``threshold``), the layer's residual update from that step is reused instead of running it; a
layer is recomputed after at most ``max_consecutive`` reuses.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from effvla_ros.core.params import ConfigBase, param
from effvla_ros.core.smolvla.policy import ExpertLayerContext, PrefillLayerInfo, PrefillStop, PrefixCache


@dataclass
class EarlyExitConfig(ConfigBase):
    """VLM early exit (ROS parameters of the policy node under ``early_exit.``)."""

    enabled: bool = param(False, description="stop the VLM prefix early and reuse the last full observation's K/V")
    exit_layers: list[int] = param(min=0, max=1000, default_factory=list,
                                   description="candidate exit layers (0-based, after that layer); empty = every "
                                               "layer from min_layers-1 to the second-to-last")
    thresholds: list[float] = param(min=-1.0, max=1.0, default_factory=list,
                                    description="cosine-similarity threshold per exit layer (one value = all); "
                                                "empty = from calibration_file")
    calibration_file: str = param("", description="YAML written by `effvla calibrate-exit` (exit_layers, thresholds)")
    min_layers: int = param(2, min=1, max=1000, description="never exit before this many layers")
    max_consecutive_reuses: int = param(3, min=0, max=1000, description="force a full prefix after N early exits")

    def validate(self) -> None:
        if self.exit_layers and len(self.thresholds) not in (0, 1, len(self.exit_layers)):
            raise ValueError(f"thresholds: {len(self.thresholds)} values for {len(self.exit_layers)} exit layers")

    def resolved(self, num_layers: int) -> tuple[list[int], list[float]]:
        """(exit layers, thresholds) after defaults and the calibration file are applied."""
        layers, thr = list(self.exit_layers), list(self.thresholds)
        if not thr and self.calibration_file:
            cal = load_calibration(self.calibration_file)
            layers = layers or cal["exit_layers"]
            thr = cal["thresholds"]
        if not layers:
            layers = list(range(max(self.min_layers - 1, 0), num_layers - 1))
        layers = [k for k in layers if self.min_layers - 1 <= k < num_layers - 1]
        if not thr:
            thr = [0.999] * len(layers)
        if len(thr) == 1:
            thr = thr * len(layers)
        if len(thr) != len(layers):
            raise ValueError(f"thresholds: {len(thr)} values for {len(layers)} exit layers {layers}")
        return layers, thr


@dataclass
class ExpertReuseConfig(ConfigBase):
    """Action-expert feature reuse across denoising steps (ROS parameters under ``expert_reuse.``)."""

    enabled: bool = param(False, description="reuse expert layers' residual updates across denoising steps")
    threshold: float = param(0.05, min=0.0, max=10.0,
                             description="reuse when the layer input's relative L2 change is below this")
    max_consecutive: int = param(2, min=1, max=100, description="recompute a layer after N consecutive reuses")


def token_similarity(a: Tensor, b: Tensor, valid: Tensor) -> float:
    """Mean cosine similarity of matching tokens. a, b: (B, P, D); valid: (B, P) bool."""
    cos = torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)  # (B, P)
    return float(cos[valid].mean()) if bool(valid.any()) else 1.0


def _layout_key(cache: PrefixCache, lang: Tensor) -> tuple[Any, ...]:
    idx = tuple((k, tuple(v.flatten().tolist())) for k, v in sorted(cache.token_index.items()))
    return (cache.length, tuple(sorted(cache.segments.items())), idx, tuple(cache.pad_mask.flatten().tolist()),
            tuple(lang.flatten().tolist()))


class PrefixReuse:
    """State of VLM early exit: the last fully computed prefix and its hidden states at exit layers."""

    def __init__(self, cfg: EarlyExitConfig, num_layers: int) -> None:
        self.num_layers = num_layers
        self.configure(cfg)
        self.full: PrefixCache | None = None
        self._hidden: dict[int, Tensor] = {}
        self._layout: tuple[Any, ...] | None = None
        self.consecutive = 0
        self.last_similarities: dict[int, float] = {}

    def configure(self, cfg: EarlyExitConfig) -> None:
        self.cfg = cfg
        self.exit_layers, self.thresholds = cfg.resolved(self.num_layers)
        self._thr = dict(zip(self.exit_layers, self.thresholds))

    def reset(self) -> None:
        self.full, self._hidden, self._layout, self.consecutive = None, {}, None, 0

    def callback(self, lang_tokens: Tensor, record_only: bool = False):  # type: ignore[no-untyped-def]
        """A ``layer_callback`` for :meth:`SmolVLAPolicy.prefill` for one observation."""
        self.last_similarities = {}
        hidden: dict[int, Tensor] = {}
        state: dict[str, Any] = {"layout": None}

        def cb(info: PrefillLayerInfo) -> PrefillStop | None:
            k = info.layer_idx
            if state["layout"] is None:
                state["layout"] = _layout_key(info.cache, lang_tokens)
            if k in self._thr or record_only:
                hidden[k] = info.hidden_out.detach()
            can_exit = (self.cfg.enabled and not record_only and self.full is not None and k in self._thr
                        and k in self._hidden and state["layout"] == self._layout
                        and self.consecutive < self.cfg.max_consecutive_reuses)
            if can_exit:
                sim = token_similarity(info.hidden_out, self._hidden[k], info.cache.pad_mask)
                self.last_similarities[k] = sim
                if sim >= self._thr[k]:
                    self.consecutive += 1
                    assert self.full is not None
                    return PrefillStop(reuse=self.full)
            if k == self.num_layers - 1:  # full computation: becomes the reference
                self.full = info.cache
                self._hidden = hidden
                self._layout = state["layout"]
                self.consecutive = 0
            return None

        return cb


class ExpertReuse:
    """Per-denoise state of expert feature reuse; ``hook`` is an ``expert_layer_hook``."""

    def __init__(self, cfg: ExpertReuseConfig) -> None:
        self.cfg = cfg
        self.reset()

    def reset(self) -> None:
        self._in: dict[int, Tensor] = {}
        self._delta: dict[int, Tensor] = {}
        self._count: dict[int, int] = {}
        self.computed = 0
        self.reused = 0
        self.steps_with_reuse: set[int] = set()

    def hook(self, ctx: ExpertLayerContext) -> Tensor:
        i, h = ctx.layer_idx, ctx.hidden
        if self.cfg.enabled and i in self._in and self._count.get(i, 0) < self.cfg.max_consecutive:
            prev = self._in[i]
            rel = float((h - prev).float().norm() / (prev.float().norm() + 1e-12))
            if rel < self.cfg.threshold:
                self._count[i] = self._count.get(i, 0) + 1
                self.reused += 1
                self.steps_with_reuse.add(ctx.step)
                return h + self._delta[i]
        out = ctx.run(h)
        self._in[i], self._delta[i], self._count[i] = h.detach(), (out - h).detach(), 0
        self.computed += 1
        return out


# ---------------------------------------------------------------------------------- calibration
def calibrate_thresholds(similarities: Tensor, ratio: float = 0.5, exit_fraction: float = 0.6) -> list[float]:
    """DeeR-style thresholds from a calibration set.

    similarities: (N, E) similarity at each of E exit layers (in order) for N calibration steps.
    Target fractions p_k of steps exiting at exit k follow p_k ∝ ratio^k, scaled so that
    ``exit_fraction`` of all steps exit early (the rest run fully). Going through the exits in order,
    the threshold of exit k is chosen so that floor(N * p_k) of the remaining steps (most similar
    first) exit there. An exit that takes no step gets a threshold above any similarity (+inf is
    not representable in a ROS double array, 2.0 > any cosine).
    """
    n, e = similarities.shape
    if n == 0 or e == 0:
        raise ValueError("similarities: need at least one step and one exit")
    if not 0.0 <= exit_fraction <= 1.0:
        raise ValueError("exit_fraction: must be in [0, 1]")
    w = torch.tensor([ratio**k for k in range(e)], dtype=torch.float64)
    p = w / w.sum() * exit_fraction
    remaining = torch.ones(n, dtype=torch.bool)
    thresholds: list[float] = []
    for k in range(e):
        take = math.floor(n * float(p[k]))
        sims = similarities[:, k].double()
        cand = sims[remaining]
        if take <= 0 or cand.numel() == 0:
            thresholds.append(2.0)
            continue
        take = min(take, cand.numel())
        thr = float(torch.sort(cand, descending=True).values[take - 1])
        thresholds.append(thr)
        remaining &= ~(sims >= thr)
    return thresholds


def save_calibration(path: str | Path, exit_layers: list[int], thresholds: list[float], **info: Any) -> None:
    import yaml

    data = {"exit_layers": [int(x) for x in exit_layers], "thresholds": [float(x) for x in thresholds], **info}
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))


def load_calibration(path: str | Path) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"calibration_file: {p} does not exist (write it with `effvla calibrate-exit`)")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data.get("exit_layers"), list) or not isinstance(data.get("thresholds"), list):
        raise ValueError(f"calibration_file: {p} lacks exit_layers/thresholds lists")
    if len(data["exit_layers"]) != len(data["thresholds"]):
        raise ValueError(f"calibration_file: {p} has {len(data['exit_layers'])} exit layers but "
                         f"{len(data['thresholds'])} thresholds")
    return data
