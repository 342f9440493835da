"""Token compressor: per-camera vision encoding with temporal reuse, then task-relevance pruning.

For each new camera frame::

    image (3,H,W) in [0,1] ──► change detection vs the cached frame (patch grid of the ViT)
        reuse   : tokens of the cached frame, no encoder compute
        partial : Eventful pass, only changed patches (+ dilation) through the ViT
        full    : whole encoder (keyframe / first frame / large change)
    tokens (N, D) ──► pruning (LightVLA task relevance + coverage guard, or none) ──► kept indices

Every call reports kept and reused tokens, the encoder FLOPs actually spent (counted with
``torch.utils.flop_counter`` on the operations run) against a full encode, and the wall time.
With reuse off, the full encode is the stage backend's ``encode`` (for the eager backend the policy
core's own encoder, bit-exact with the policy's in-process path); with patch-level reuse on, keyframes run through the Eventful encoder
so that its per-layer cache is filled (equal to the policy's encoder within float rounding).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from effvla_ros.core import flops as _flops  # noqa: F401  (counts CPU SDPA attention too)
from effvla_ros.core.backends.base import StageBackend, make_backend
from effvla_ros.core.compression.change import ChangeDecision, ChangeDetector, fill_to_bucket
from effvla_ros.core.compression.eventful import EventfulState, dilate
from effvla_ros.core.compression.pruning import PruningConfig, instruction_queries, select_tokens
from effvla_ros.core.params import ConfigBase, param
from effvla_ros.core.smolvla.policy import SmolVLAPolicy
from effvla_ros.core.warmup import time_encode


@dataclass
class ReuseConfig(ConfigBase):
    """Temporal reuse at the encoder (ROS parameters of the token compressor under ``reuse.``)."""

    enabled: bool = param(True, description="reuse encoder work across frames of the same camera")
    patch_level: bool = param(True, description="recompute only changed patches (Eventful); off: frame level only")
    threshold: float = param(0.02, min=0.0, max=1.0,
                             description="a patch changed when its mean absolute pixel difference (0..1) exceeds this")
    max_age: int = param(15, min=1, max=1000, description="frames a reused frame's tokens may be kept before a refresh")
    keyframe_interval: int = param(8, min=1, max=1000,
                                   description="full encoder pass at least every N frames (bounds patch-reuse drift)")
    dilation: int = param(1, min=0, max=8, description="changed patches grow by this many patches (context)")
    max_changed_fraction: float = param(0.6, min=0.0, max=1.0,
                                        description="above this fraction of changed patches, run a full pass")
    refresh: str = param("keyframe", choices=("keyframe", "rolling"),
                         description="how patch reuse bounds its drift: keyframe = a full pass every keyframe_interval "
                                     "frames; rolling = each partial pass also recomputes 1/keyframe_interval of the "
                                     "patches in turn (no full-pass spikes: a flat per-frame latency)")
    keep_cache: bool = param(False, description="while reuse is off, full passes still build the patch cache (about "
                                                "a plain encode's time on packed, ~120 MB per real-size camera) so "
                                                "that turning reuse on (live, or by the latency budget) starts with a "
                                                "partial pass instead of a full one")
    partial_shapes: int = param(16, min=0, max=4096,
                                description="a partial pass recomputes a multiple of 1/N of the patches (the most-"
                                            "changed unchanged ones fill up): at most N matmul shapes, whose kernels "
                                            "stay cached; 0 = exactly the changed patches")


@dataclass
class CompressedCamera:
    camera: str
    tokens: torch.Tensor  # (K, D) kept tokens (unscaled connector outputs), in kept order
    kept: torch.Tensor  # (K,) long, grid indices, ascending
    reused: torch.Tensor  # (K,) bool, token taken from an earlier frame
    grid: tuple[int, int]  # token grid
    kind: str  # "full" | "partial" | "reuse"
    encoder_flops: int
    encoder_flops_full: int
    time_s: float
    max_change: float
    all_tokens: torch.Tensor  # (N, D) before pruning (for error measurement)


class _CameraState:
    def __init__(self) -> None:
        self.detector = ChangeDetector()
        self.tokens: torch.Tensor | None = None  # (N, D)
        self.eventful: EventfulState | None = None
        self.full_flops: dict[tuple[int, int], int] = {}


class TokenCompressor:
    """Per-camera encoder with temporal reuse + token pruning, on a :class:`SmolVLAPolicy`'s weights."""

    def __init__(self, policy: SmolVLAPolicy, pruning: PruningConfig | None = None,
                 reuse: ReuseConfig | None = None, *, count_flops: bool = True,
                 backend: StageBackend | str = "eager") -> None:
        """``count_flops``: count every encode with ``torch.utils.flop_counter`` (exact, slower: its
        dispatch overhead is ~5x a tiny encode). Off, the first full pass per camera is counted and
        later passes are accounted analytically: full passes as that count, partial passes as that
        count times the fraction of patches recomputed (the per-token share of the layers).
        ``backend``: the stage backend whose ``encode`` runs full passes (patch-level reuse needs
        ``caps.partial_encode``; refused otherwise, naming ``reuse.patch_level``)."""
        self.policy = policy
        self.backend = make_backend(backend, policy) if isinstance(backend, str) else backend
        self.count_flops = count_flops
        self.pruning = pruning or PruningConfig()
        self.reuse = reuse or ReuseConfig()
        self._check(self.reuse)
        self._cams: dict[str, _CameraState] = {}
        self._task: torch.Tensor | None = None
        self.instruction: str | None = None

    # ------------------------------------------------------------------ configuration
    def _check(self, reuse: ReuseConfig) -> None:
        self.backend.caps.check(patch_reuse=reuse.enabled and reuse.patch_level)

    @property
    def eventful(self) -> Any:
        """The backend's patch-reuse encoder (:class:`~effvla_ros.core.compression.eventful.EventfulVisionEncoder`)."""
        return self.backend.eventful_encoder()

    def configure(self, pruning: PruningConfig | None = None, reuse: ReuseConfig | None = None) -> None:
        """Apply new settings from the next frame on (live tuning)."""
        if reuse is not None:
            self._check(reuse)
        if pruning is not None:
            self.pruning = pruning
        if reuse is not None:
            kept = reuse.keep_cache and reuse.patch_level and self.reuse.patch_level
            if (not reuse.enabled and not kept) or reuse.patch_level != self.reuse.patch_level:
                self.reset()  # caches of the other mode are not valid
            self.reuse = reuse

    def warm_up(self, repeats: int = 2) -> float:
        """Encode a dummy model-size frame through the backend (the first call compiles a compiled backend), then
        time it warm; returns the fastest warm full encode (s). The camera caches are untouched."""
        return time_encode(self.policy, self.backend.encode, repeats)

    def reset(self, camera: str | None = None) -> None:
        for name in [camera] if camera else list(self._cams):
            self._cams.pop(name, None)

    @torch.no_grad()
    def set_instruction(self, text: str | None) -> None:
        """Task tokens for relevance scoring: the instruction's token embeddings (valid tokens only)."""
        self.instruction = text
        if not text:
            self._task = None
            return
        self._task = instruction_queries(self.policy, text)

    # ------------------------------------------------------------------ encoding
    def _count(self, fn, estimate: int | None = None):  # type: ignore[no-untyped-def]
        """Run ``fn``; FLOPs counted, or ``estimate`` when counting is off and one is known."""
        if not self.count_flops and estimate is not None:
            return fn(), estimate
        with FlopCounterMode(display=False) as fc:
            out = fn()
        return out, int(fc.get_total_flops())

    @torch.no_grad()
    def process(self, camera: str, image: torch.Tensor) -> CompressedCamera:
        """image: (3, H, W) float in [0, 1] (any size; resized with padding to the model's input)."""
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"image: expected (3, H, W), got {tuple(image.shape)}")
        if not torch.isfinite(image).all():
            raise ValueError("image: contains NaN or Inf")
        st = self._cams.setdefault(camera, _CameraState())
        self.policy.adapt_threads()  # RuntimeConfig.adaptive_threads: the cores other processes leave free
        t0 = time.perf_counter()
        pixels = self.policy.preprocess_image(image[None])  # (1, 3, S, S) in [-1, 1]
        vision: Any = self.policy.weights.vision
        vdtype = vision.embeddings.patch_embedding.weight.dtype
        pixels = pixels.to(vdtype)
        p = self.policy.arch.patch_size
        patch_grid = (pixels.shape[-2] // p, pixels.shape[-1] // p)
        s = self.policy.arch.scale_factor
        grid = (patch_grid[0] // s, patch_grid[1] // s)
        n_tokens = grid[0] * grid[1]
        cfg = self.reuse
        model_img = (pixels[0].float() + 1.0) / 2.0  # compare in model space (after resize/pad)
        if cfg.enabled and st.tokens is not None:
            decision = st.detector.decide(
                model_img, patch_grid, threshold=cfg.threshold, max_age=cfg.max_age,
                patch_level=cfg.patch_level and st.eventful is not None, keyframe_interval=cfg.keyframe_interval,
                max_changed_fraction=cfg.max_changed_fraction, rolling=cfg.refresh == "rolling")
            kind = decision.kind
        else:
            decision, kind = None, "full"
        reused = torch.zeros(n_tokens, dtype=torch.bool)
        flops = 0
        if kind == "reuse":
            assert st.tokens is not None
            tokens = st.tokens
            reused[:] = True
        elif kind == "partial":
            assert decision is not None and st.eventful is not None
            changed = dilate(decision.changed, cfg.dilation)
            if cfg.partial_shapes:  # e.g. 16 shapes of 1024 patches: multiples of 64
                changed = fill_to_bucket(changed, decision.change, -(-changed.numel() // cfg.partial_shapes))
            known = st.full_flops.get(patch_grid)
            est = None if known is None else int(known * float(changed.float().mean()))
            state, st.eventful = st.eventful, None  # consumed in place: a failed pass leaves no half-updated cache
            (tokens, st.eventful, rows), flops = self._count(
                lambda: self.eventful.encode_partial(pixels, changed.to(pixels.device), state, inplace=True), est)
            reused[:] = True
            reused[rows.cpu()] = False
        else:
            known = st.full_flops.get(patch_grid)
            if cfg.patch_level and (cfg.enabled or (cfg.keep_cache and self.backend.caps.partial_encode)):
                (tokens, state), flops = self._count(lambda: self.eventful.encode_full(pixels), known)
                st.eventful = state
            else:
                enc, flops = self._count(lambda: self.backend.encode(pixels), known)
                tokens = enc[0]
                st.eventful = None
            st.full_flops.setdefault(patch_grid, flops)
        st.detector.commit(model_img, decision if decision is not None and kind != "full"
                           else ChangeDecision("full", torch.ones(patch_grid, dtype=torch.bool), float("inf")))
        st.tokens = tokens
        full = st.full_flops[patch_grid]  # set by the full pass every camera (and image size) starts with
        kept = select_tokens(tokens, self._task, grid, self.pruning).cpu()  # grid indices on the host, any device
        return CompressedCamera(
            camera=camera, tokens=tokens[kept.to(tokens.device)], kept=kept, reused=reused[kept], grid=grid,
            kind=kind, encoder_flops=flops, encoder_flops_full=full, time_s=time.perf_counter() - t0,
            max_change=decision.max_change if decision is not None else float("inf"), all_tokens=tokens)
