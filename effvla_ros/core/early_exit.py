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
diffusion/flow action head across denoising steps): per expert layer and denoising step, when the
layer's input changed little since the step at which the layer was last computed (relative L2
change below that layer's threshold), the layer is not run: its residual update (output - input)
is predicted from the cache instead, by default extrapolated linearly from the layer's last two
computed updates (``extrapolate``; else the last update is reused as is). The first
``full_steps`` and the last ``final_steps`` steps are always computed, and a layer is recomputed
after at most ``max_consecutive`` reuses. A step at which every layer is reused costs only the
suffix embedding and the output projection: whole-step velocity reuse with the cheap, exact parts
(the new x_t and t) kept.

Measured on an earlier bundled checkpoint (``benchmarks/bench_policy.py``, docs/benchmarks.md): a layer's
input changes by 12-37 % (relative L2) from one step to the next, so a fixed small threshold never
fires, while the layers' residual updates mostly stay within cosine 0.95-0.998 of the previous
step's. The updates drift smoothly (hence the linear prediction, which cut the action error of
plain reuse by about a quarter at the same compute) and the last step shapes the actions most
(hence ``final_steps``). The per-layer thresholds are calibrated from data
(:func:`calibrate_expert_thresholds`) so that a target fraction of layer evaluations is reused,
like the VLM thresholds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from effvla_ros.core.params import ConfigBase, param
from effvla_ros.core.stages import ExpertLayerContext, ExpertPlan, PrefixCache

if TYPE_CHECKING:
    from effvla_ros.core.backends.base import StageBackend


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

    enabled: bool = param(False, description="reuse/predict expert layers' residual updates across denoising steps")
    threshold: float = param(0.3, min=0.0, max=10.0,
                             description="reuse a layer when its input's relative L2 change since the layer was last "
                                         "computed is below this (all layers; thresholds/calibration_file override)")
    thresholds: list[float] = param(min=0.0, max=10.0, default_factory=list,
                                    description="per expert layer threshold (in layer order; one value = all); empty = "
                                                "from calibration_file, else threshold")
    calibration_file: str = param("", description="YAML written by `effvla calibrate-exit` (expert_thresholds); may be "
                                                  "the same file as early_exit.calibration_file")
    max_consecutive: int = param(4, min=1, max=100, description="recompute a layer after N consecutive reuses")
    full_steps: int = param(1, min=1, max=100, description="denoising steps always computed fully at the start")
    final_steps: int = param(1, min=0, max=100, description="denoising steps always computed fully at the end "
                                                          "(the last steps shape the actions most)")
    extrapolate: bool = param(True, description="predict a reused layer's update linearly from its last two computed "
                                                "updates (false: reuse the last update as is)")

    def resolved(self, num_layers: int) -> list[float]:
        """Per expert layer thresholds (in layer order) after the calibration file and defaults."""
        thr = list(self.thresholds)
        if not thr and self.calibration_file:
            cal = load_calibration(self.calibration_file, expert=True)
            thr = [float(x) for x in cal["expert_thresholds"]]
        if not thr:
            thr = [self.threshold]
        if len(thr) == 1:
            thr = thr * num_layers
        if len(thr) != num_layers:
            raise ValueError(f"expert thresholds: {len(thr)} values for {num_layers} expert layers")
        return thr


def token_similarity(a: Tensor, b: Tensor, valid: Tensor) -> Tensor:
    """Mean cosine similarity of matching tokens, a 0-d fp32 tensor on the tokens' device (no host sync;
    1.0 when no token is valid). a, b: (B, P, D); valid: (B, P) bool."""
    cos = torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)  # (B, P)
    w = valid.to(cos.dtype)
    n = w.sum()
    return torch.where(n > 0, (cos * w).sum() / n.clamp(min=1.0), torch.ones_like(n))


def _layout_key(cache: PrefixCache, lang: Tensor) -> tuple[Any, ...]:
    idx = tuple((k, tuple(v.flatten().tolist())) for k, v in sorted(cache.token_index.items()))
    return (cache.length, tuple(sorted(cache.segments.items())), idx, tuple(cache.pad_mask.flatten().tolist()),
            tuple(lang.flatten().tolist()))


class PrefixReuse:
    """State of VLM early exit: the last fully computed prefix and its hidden states at exit layers.

    :meth:`prefill` runs a backend's prefill in segments that end at the exit layers; at each boundary the
    similarity is computed on the device and compared with the threshold, the one host synchronization per
    exit point (never inside a segment, so a compiled or graph-captured segment runs uninterrupted).
    """

    def __init__(self, cfg: EarlyExitConfig, num_layers: int) -> None:
        self.num_layers = num_layers
        self.configure(cfg)
        self.full: PrefixCache | None = None
        self._hidden: dict[int, Tensor] = {}
        self._layout: tuple[Any, ...] | None = None
        self.consecutive = 0
        self.last_similarities: dict[int, Tensor] = {}

    def configure(self, cfg: EarlyExitConfig) -> None:
        layers, thresholds = cfg.resolved(self.num_layers)  # raises before anything changes
        self.cfg = cfg
        self.exit_layers, self.thresholds = layers, thresholds
        self._thr = dict(zip(self.exit_layers, self.thresholds))

    def reset(self) -> None:
        self.full, self._hidden, self._layout, self.consecutive = None, {}, None, 0

    def segments(self, exit_points: tuple[int, ...] | None = None) -> list[tuple[int, int]]:
        """Layer segments [start, stop) of one prefill: they end after every exit layer (those in
        ``exit_points``, the backend's, when given) while early exit is enabled; one segment otherwise."""
        cuts = sorted(k + 1 for k in self._thr if exit_points is None or k in exit_points) if self.cfg.enabled else []
        bounds = [0, *cuts, self.num_layers]
        return list(zip(bounds[:-1], bounds[1:]))

    def prefill(self, backend: StageBackend, cache: PrefixCache, lang_tokens: Tensor) -> None:
        """Fill ``cache`` (from :meth:`StageBackend.begin_prefill`) segment by segment; exit early (the later
        layers' K/V from the last full prefix) when the hidden states at an exit layer are similar enough to that
        prefix's. A full computation becomes the new reference."""
        self.last_similarities = {}
        layout = _layout_key(cache, lang_tokens)
        can_exit = (self.cfg.enabled and self.full is not None and layout == self._layout
                    and self.consecutive < self.cfg.max_consecutive_reuses)
        hidden: dict[int, Tensor] = {}
        for start, stop in self.segments(backend.caps.exit_layers):
            backend.prefill(cache, start, stop)
            k = stop - 1
            if stop == self.num_layers or k not in self._thr or cache.hidden is None:
                continue
            hidden[k] = cache.hidden.detach()
            if can_exit and k in self._hidden:
                sim = token_similarity(cache.hidden, self._hidden[k], cache.pad_mask)
                self.last_similarities[k] = sim
                if bool(sim >= self._thr[k]):  # the decision: one host sync per exit point
                    assert self.full is not None
                    self.consecutive += 1
                    cache.reuse_from(self.full, k)
                    return
        self.full, self._hidden, self._layout, self.consecutive = cache, hidden, layout, 0


@dataclass
class _LayerCache:
    hidden: Tensor  # input at the last computed step
    step: int  # that step
    delta: Tensor  # its residual update (output - input)
    prev_step: int | None = None  # the computed step before (for the linear prediction)
    prev_delta: Tensor | None = None
    consecutive: int = 0  # reuses since the last computation


def relative_change(h: Tensor, ref: Tensor) -> Tensor:
    """||h - ref|| / ||ref|| over the whole tensor (the expert reuse criterion), a 0-d fp32 tensor on the device."""
    return (h - ref).float().norm() / (ref.float().norm() + 1e-12)


class ExpertReuse(ExpertPlan):
    """Per-denoise state of expert feature reuse: the :class:`ExpertPlan` of every denoising step.

    ``layers``: the VLM layer indices that have an expert layer (``policy.expert_layer_indices()``), in
    order; thresholds are given per position in that list. Which layers a step may reuse (``full_steps``,
    ``final_steps``, ``max_consecutive``) is known before the step; whether it does is the threshold test on
    the layer's input, computed on the device and read once per eligible layer (a host sync on a GPU).
    """

    def __init__(self, cfg: ExpertReuseConfig, layers: list[int] | None = None) -> None:
        self.layers = list(layers) if layers is not None else []
        self.configure(cfg)
        self.reset()

    def configure(self, cfg: ExpertReuseConfig) -> None:
        n = len(self.layers) or 1
        thr = cfg.resolved(n) if self.layers else [cfg.threshold]  # raises before anything changes
        self.cfg = cfg
        self._thr = dict(zip(self.layers, thr)) if self.layers else {}
        self._default_thr = thr[0]

    def reset(self, num_steps: int = 0) -> None:
        """Before each denoising run; ``num_steps`` (0 = unknown) places the final full steps."""
        self.num_steps = num_steps
        self._cache: dict[int, _LayerCache] = {}
        self.computed = 0
        self.reused = 0
        self.steps_with_reuse: set[int] = set()
        self.changes: dict[tuple[int, int], Tensor] = {}  # (step, layer) -> relative input change tested

    def plan(self, step: int) -> ExpertPlan | None:
        """The plan of denoising step ``step``: this object while reuse is enabled, None (compute all) otherwise."""
        return self if self.cfg.enabled else None

    def predict(self, c: _LayerCache, step: int) -> Tensor:
        if self.cfg.extrapolate and c.prev_delta is not None and c.prev_step is not None and c.step != c.prev_step:
            return c.delta + (c.delta - c.prev_delta) * ((step - c.step) / (c.step - c.prev_step))
        return c.delta

    def eligible(self, layer_idx: int, step: int) -> bool:
        """Whether the rule allows reusing ``layer_idx`` at ``step`` (before its threshold test)."""
        c = self._cache.get(layer_idx)
        return (self.cfg.enabled and c is not None and step >= self.cfg.full_steps
                and (self.num_steps <= 0 or step < self.num_steps - self.cfg.final_steps)
                and c.consecutive < self.cfg.max_consecutive)

    def layer(self, ctx: ExpertLayerContext) -> Tensor:
        i, h, s = ctx.layer_idx, ctx.hidden, ctx.step
        c = self._cache.get(i)
        if c is not None and self.eligible(i, s):
            rel = relative_change(h, c.hidden)
            self.changes[(s, i)] = rel
            if bool(rel < self._thr.get(i, self._default_thr)):
                c.consecutive += 1
                self.reused += 1
                self.steps_with_reuse.add(s)
                return h + self.predict(c, s)
        out = ctx.run(h)
        delta = (out - h).detach()
        if c is None:
            self._cache[i] = _LayerCache(h.detach(), s, delta)
        else:
            c.prev_step, c.prev_delta = c.step, c.delta
            c.hidden, c.step, c.delta, c.consecutive = h.detach(), s, delta, 0
        self.computed += 1
        return out

    hook = layer  # the name of the expert-layer hook this replaced (tests, calibration)


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


def expert_reuse_fraction(changes: Tensor, threshold: float, full_steps: int = 1, max_consecutive: int = 2,
                          final_steps: int = 0) -> float:
    """Fraction of one layer's evaluations that :class:`ExpertReuse` would reuse on recorded data.

    changes: (N, n, n) for N chunks of n denoising steps: ``changes[c, a, b]`` = relative L2 change of
    the layer's input from step a to step b (a < b), recorded with every step computed. The decision
    rule is simulated exactly (the change is measured against the last computed step; at most
    ``max_consecutive`` reuses in a row; the first ``full_steps`` and the last ``final_steps`` steps
    computed); the recorded inputs
    stand in for the ones a run with reuse would see.
    """
    n_chunks, n = changes.shape[0], changes.shape[1]
    reused = 0
    for c in range(n_chunks):
        last, run = min(full_steps, n) - 1, 0
        for s in range(full_steps, n):
            if s < n - final_steps and run < max_consecutive and float(changes[c, last, s]) < threshold:
                reused += 1
                run += 1
            else:
                last, run = s, 0
    return reused / max(n_chunks * n, 1)


def calibrate_expert_thresholds(changes: list[Tensor], reuse_fraction: float, full_steps: int = 1,
                                max_consecutive: int = 2, final_steps: int = 0) -> list[float]:
    """Per-layer expert reuse thresholds from recorded changes (see :func:`expert_reuse_fraction`).

    For each layer, the smallest threshold (among the recorded changes) at which the simulated
    fraction of reused evaluations reaches ``reuse_fraction`` (of all steps, the forced full steps
    included); the largest reachable fraction is about (n - full_steps - final_steps) *
    max_consecutive / (max_consecutive + 1) / n, above it the threshold saturates at 10.0 (the
    parameter's maximum: reuse whenever the rule allows, a fixed schedule).
    """
    if not 0.0 <= reuse_fraction <= 1.0:
        raise ValueError("reuse_fraction: must be in [0, 1]")
    out: list[float] = []
    for ch in changes:
        if ch.ndim != 3 or ch.shape[1] != ch.shape[2]:
            raise ValueError("changes: need (N, n, n) per layer")
        n = ch.shape[1]
        iu = torch.triu_indices(n, n, offset=1)
        cand = torch.unique(ch[:, iu[0], iu[1]].double().flatten())
        cand = torch.cat([cand + 1e-9, torch.tensor([10.0], dtype=torch.float64)])  # reuse iff change < thr
        if reuse_fraction <= 0.0:
            out.append(0.0)
            continue
        lo, hi = 0, cand.numel() - 1
        if expert_reuse_fraction(ch, float(cand[hi]), full_steps, max_consecutive, final_steps) < reuse_fraction:
            out.append(10.0)
            continue
        while lo < hi:  # the fraction grows with the threshold (up to path effects of the rule)
            mid = (lo + hi) // 2
            if expert_reuse_fraction(ch, float(cand[mid]), full_steps, max_consecutive, final_steps) >= reuse_fraction:
                hi = mid
            else:
                lo = mid + 1
        out.append(min(float(cand[lo]), 10.0))
    return out


def save_calibration(path: str | Path, exit_layers: list[int], thresholds: list[float], **info: Any) -> None:
    """VLM exit layers/thresholds and any extra keys (``expert_thresholds`` ...) as YAML."""
    import yaml

    data = {"exit_layers": [int(x) for x in exit_layers], "thresholds": [float(x) for x in thresholds], **info}
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))


def load_calibration(path: str | Path, expert: bool = False) -> dict[str, Any]:
    """The calibration YAML; checks the VLM section, or with ``expert`` the ``expert_thresholds`` list."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"calibration_file: {p} does not exist (write it with `effvla calibrate-exit`)")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"calibration_file: {p} is not a YAML file ({type(e).__name__}); write it with "
                         "`effvla calibrate-exit`") from None
    if not isinstance(data, dict):
        raise ValueError(f"calibration_file: {p} holds a {type(data).__name__}, not the mapping `effvla "
                         "calibrate-exit` writes (exit_layers, thresholds, expert_thresholds)")

    def numbers(key: str, kind: type) -> None:
        bad = [v for v in data[key] if isinstance(v, bool) or not isinstance(v, (int, float) if kind is float else int)]
        if bad:
            raise ValueError(f"calibration_file: {p}: {key} must hold {'numbers' if kind is float else 'integers'}, "
                             f"got {bad[:3]!r}")

    if expert:
        if not isinstance(data.get("expert_thresholds"), list) or not data["expert_thresholds"]:
            raise ValueError(f"calibration_file: {p} lacks an expert_thresholds list (recalibrate with "
                             "`effvla calibrate-exit`)")
        numbers("expert_thresholds", float)
        return data
    if not isinstance(data.get("exit_layers"), list) or not isinstance(data.get("thresholds"), list):
        raise ValueError(f"calibration_file: {p} lacks exit_layers/thresholds lists")
    numbers("exit_layers", int)
    numbers("thresholds", float)
    if len(data["exit_layers"]) != len(data["thresholds"]):
        raise ValueError(f"calibration_file: {p} has {len(data['exit_layers'])} exit layers but "
                         f"{len(data['thresholds'])} thresholds")
    return data
