"""The data that flows between the three inference stages, shared by every backend.

    encode   one camera image          -> visual tokens (B, N, D_vlm)            :class:`ImageEncoding`
    prefill  visual + language + state -> per-layer VLM K/V                       :class:`PrefixCache`
    denoise  PrefixCache + noise       -> actions (Euler flow, :mod:`effvla_ros.core.flow`)  :class:`DenoiseResult`

The eager reference (:class:`~effvla_ros.core.smolvla.policy.SmolVLAPolicy`) and the backends of
:mod:`effvla_ros.core.backends` produce and consume these types, so that the efficiency techniques
(early exit, expert reuse, real-time chunking) are written once, against this module, and never import
a particular backend.

Layouts: B batch, P prefix length, S suffix length (= chunk_size), H heads, Hkv KV heads, D head dim.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor


# ------------------------------------------------------------------------------------------------ timing
class StageStats:
    """Wall time of a stage and its FLOPs (None unless counting was on).

    On CUDA the time comes from a pair of CUDA events recorded around the stage and is read (one wait, on the
    end event) when ``wall_s`` is first accessed - after the stage's result is needed anyway - instead of
    synchronizing the device before and after every stage.
    """

    __slots__ = ("_events", "_wall", "flops")

    def __init__(self, wall_s: float = 0.0, flops: int | None = None, *,
                 events: tuple[torch.cuda.Event, torch.cuda.Event] | None = None) -> None:
        self._wall = wall_s
        self.flops = flops
        self._events = events

    @property
    def wall_s(self) -> float:
        if self._events is not None:
            start, end = self._events
            end.synchronize()
            self._wall, self._events = start.elapsed_time(end) / 1000.0, None
        return self._wall

    def __repr__(self) -> str:
        return f"StageStats(wall_s={self.wall_s!r}, flops={self.flops!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StageStats) and (self.wall_s, self.flops) == (other.wall_s, other.flops)


class StageTimer:
    """Times one stage: ``perf_counter`` on a CPU, CUDA events on the current stream on CUDA (see :class:`StageStats`)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._t0 = 0.0
        self._t1: float | None = None
        self._events: tuple[torch.cuda.Event, torch.cuda.Event] | None = None

    def start(self) -> StageTimer:
        if self.device.type == "cuda":
            self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self._events[0].record()
        self._t0 = time.perf_counter()
        return self

    def stop(self) -> None:
        if self._events is not None:
            self._events[1].record()
        self._t1 = time.perf_counter()

    def stats(self, flops: int | None = None) -> StageStats:
        if self._t1 is None:
            raise RuntimeError("StageTimer.stats() before stop()")
        if self._events is not None:
            return StageStats(flops=flops, events=self._events)
        return StageStats(self._t1 - self._t0, flops)


@contextlib.contextmanager
def measure(device: torch.device, out: list[StageStats], count_flops: bool = False) -> Iterator[None]:
    """Time (and with ``count_flops`` count the FLOPs of, ``torch.utils.flop_counter``) the enclosed stage;
    appends its :class:`StageStats` to ``out``."""
    counter = None
    if count_flops:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        counter.__enter__()
    timer = StageTimer(device).start()
    try:
        yield
    finally:
        timer.stop()
        flops = None
        if counter is not None:
            counter.__exit__(None, None, None)
            flops = int(counter.get_total_flops())
        out.append(timer.stats(flops))


# ------------------------------------------------------------------------------------------------ stage 1
@dataclass
class ImageEncoding:
    tokens: dict[str, Tensor]          # camera -> (B, N, D_vlm) connector output, BEFORE x sqrt(D_vlm)
    grid: tuple[int, int]              # token grid (rows, cols); token n is at (n // cols, n % cols)
    patch_grid: tuple[int, int]        # vision patch grid before the pixel shuffle
    stats: dict[str, StageStats]       # per camera


# ------------------------------------------------------------------------------------------------ stage 2
@dataclass
class VisualTokens:
    """One camera's visual tokens for the prefill.

    ``keep`` (K,) or (B, K) long: grid indices to keep (pruned tokens are removed; masking a token in
    LeRobot is equivalent because masked tokens consume no RoPE position). ``mask`` (B, N) bool:
    LeRobot-style masking (False = masked) of the kept tokens. ``camera_mask`` (B,): False = camera absent.
    """

    tokens: Tensor
    keep: Tensor | None = None
    mask: Tensor | None = None
    camera_mask: Tensor | None = None


@dataclass
class PrefixCache:
    """The prefix's per-layer K/V and its layout; filled segment by segment by a backend's prefill."""

    keys: list[Tensor]                 # per VLM layer (B, Hkv, P, D), post-RoPE, VLM dtype
    values: list[Tensor]               # per VLM layer (B, Hkv, P, D)
    pad_mask: Tensor                   # (B, P) bool, False = padding / masked token
    att_mask: Tensor                   # (B, P) bool, True where a new causal block starts (state token)
    position_ids: Tensor               # (B, P) long = cumsum(pad_mask) - 1
    embeddings: Tensor                 # (B, P, D_vlm) prefix input embeddings (images scaled)
    segments: dict[str, tuple[int, int]]   # camera / "language" / "state" -> [start, end) in the prefix
    token_index: dict[str, Tensor]     # camera -> grid indices of its prefix tokens ((N,), (K,) or (B, K))
    hidden: Tensor | None = None       # output of the last computed VLM layer (B, P, D_vlm)
    exit_layer: int | None = None      # early exit: last layer computed (None = all)
    attn_probs: dict[int, Tensor] = field(default_factory=dict)   # layer -> (B, H, P, P) fp32
    stats: StageStats | None = None
    att_2d: Tensor | None = None       # (B, P, P) bool attention mask of the prefix
    expert_kv: dict[int, tuple[Tensor, Tensor]] | None = None  # expert cross-attention K/V per layer (per chunk)

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def length(self) -> int:
        return self.pad_mask.shape[1]  # no int(): a symbolic length stays symbolic when traced (ONNX export)

    @property
    def num_valid(self) -> Tensor:
        return self.pad_mask.sum(dim=1)

    def reuse_from(self, full: PrefixCache, after_layer: int) -> None:
        """Early exit after ``after_layer``: the later layers' K/V are taken from ``full``, a complete cache of
        the same prefix layout (the last fully computed observation)."""
        if full.length != self.length or len(self.keys) != after_layer + 1:
            raise ValueError("reuse_from: needs a full cache of the same prefix length, and this cache computed "
                             f"up to layer {after_layer}")
        self.keys.extend(full.keys[after_layer + 1:])
        self.values.extend(full.values[after_layer + 1:])
        self.exit_layer = after_layer


@dataclass
class PrefillLayerInfo:
    """What a prefill layer callback sees after each VLM layer (training-time probes, calibration)."""

    layer_idx: int
    hidden_in: Tensor                  # (B, P, D_vlm) input of the layer
    hidden_out: Tensor                 # (B, P, D_vlm) output of the layer
    keys: Tensor                       # (B, Hkv, P, D) this layer's post-RoPE keys
    values: Tensor                     # (B, Hkv, P, D)
    attn_probs: Tensor | None          # (B, H, P, P) fp32 when requested for this layer
    cache: PrefixCache                 # partial: layers 0..layer_idx filled


@dataclass
class PrefillStop:
    """Returned by a prefill layer callback: stop after this layer, take later layers' K/V from ``reuse``."""

    reuse: PrefixCache


# ------------------------------------------------------------------------------------------------ stage 3
@dataclass
class ExpertLayerContext:
    step: int                          # denoising step index (-1 outside a denoising loop)
    t: Tensor                          # (B,) or (B, S) fp32 flow time
    layer_idx: int
    cross: bool                        # cross-attention layer (else self-attention over [prefix; suffix])
    hidden: Tensor                     # (B, S, D_expert) input of the layer
    run: Callable[[Tensor], Tensor]    # run(hidden) -> the layer's normal output


class ExpertPlan:
    """How one velocity evaluation runs its expert layers: per layer, compute it or replace it.

    The runner builds one per denoising step (expert feature reuse, :class:`~effvla_ros.core.early_exit.
    ExpertReuse`); a backend that declares ``Capabilities.expert_plans`` calls :meth:`layer` for every
    expert layer. The base plan computes every layer.
    """

    step: int = -1

    def layer(self, ctx: ExpertLayerContext) -> Tensor:
        return ctx.run(ctx.hidden)


@dataclass
class StepInfo:
    step: int
    t: float                           # flow time of this step (1, 1 - 1/n, ...)
    dt: float                          # -1 / num_steps
    x_t: Tensor                        # (B, S, max_action_dim) fp32
    v_t: Tensor                        # (B, S, max_action_dim) fp32 velocity from the model
    cache: PrefixCache
    velocity_fn: Callable[[Tensor, Tensor], Tensor]   # (x_t, t (B,)) -> v, differentiable in x_t


@dataclass
class DenoiseResult:
    actions: Tensor                    # (B, S, action_dim) unnormalized, in the model's space (to_absolute)
    actions_normalized: Tensor         # (B, S, action_dim)
    x_final: Tensor                    # (B, S, max_action_dim) fp32
    trace: dict[str, list[Tensor]] = field(default_factory=dict)  # x_t, t, v_t per step when recorded
    stats: StageStats | None = None


@dataclass
class ChunkResult:
    actions: Tensor                    # (B, S, action_dim) unnormalized, absolute (the state added back)
    actions_normalized: Tensor
    stats: dict[str, StageStats]       # "vision.<camera>", "prefill", "denoise", "total"
    images: ImageEncoding
    cache: PrefixCache
    denoise: DenoiseResult


PrefillLayerCallback = Callable[[PrefillLayerInfo], "PrefillStop | None"]
StepCallback = Callable[[StepInfo], "Tensor | None"]
ExpertLayerHook = Callable[[ExpertLayerContext], Tensor]
