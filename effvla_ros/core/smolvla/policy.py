"""SmolVLA inference in three stages, numerically equal to LeRobot 0.6.1: the eager reference.

    encode_images  images (B,3,H,W) in [0,1]  -> per camera visual tokens (B, N=64, D_vlm), unscaled
    prefill        visual tokens (any kept subset) + language + state -> per-layer VLM K/V (PrefixCache)
    denoise        PrefixCache + noise -> Euler flow from t=1 to 0 -> normalized / unnormalized actions

The per-layer math lives in :mod:`.layers` (pure functions, shared with the Eventful encoder and the other
backends), the stage data in :mod:`effvla_ros.core.stages`, the Euler loop in :mod:`effvla_ros.core.flow`.
This class owns the weights, the device/dtype handling, normalization and tokenization, and composes the
stages; :class:`~effvla_ros.core.backends.eager.EagerBackend` exposes it behind the backend seam.

Where the efficiency techniques plug in:

* prefill:  ``begin_prefill`` + ``prefill_layers(cache, start, stop)`` run the VLM in layer segments (early
            exit is a segment boundary, :class:`~effvla_ros.core.early_exit.PrefixReuse`); ``prefill`` runs all
            layers, with an optional ``layer_callback(info: PrefillLayerInfo) -> PrefillStop | None`` after
            every layer (probes, calibration; ``PrefillStop(reuse=old_cache)`` stops and copies the remaining
            layers' K/V from ``old_cache``);
* denoise:  ``velocity(cache, x_t, t, plan=)`` is one expert evaluation; an :class:`ExpertPlan` decides per
            layer to compute it or replace it (feature reuse across steps); ``denoise`` integrates it with
            ``step_callback(info: StepInfo) -> Tensor | None`` as the guide (real-time chunking; ``info.
            velocity_fn`` recomputes v(x, t) differentiably for a VJP).

Layouts: B batch, P prefix length, S suffix length (= chunk_size), H heads, Hkv KV heads, D head dim.
"""
from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

from effvla_ros.core import flops as _flops  # noqa: F401  (counts CPU SDPA attention too)
from effvla_ros.core.flow import euler_integrate, sample_flow_time
from effvla_ros.core.stages import (
    ChunkResult,
    DenoiseResult,
    ExpertLayerContext,
    ExpertLayerHook,
    ExpertPlan,
    ImageEncoding,
    PrefillLayerCallback,
    PrefillLayerInfo,
    PrefillStop,
    PrefixCache,
    StageStats,
    StepCallback,
    StepInfo,
    VisualTokens,
    measure,
)
from effvla_ros.core.threads import ThreadGovernor

from . import layers as L  # noqa: N812
from .config import RuntimeConfig, SmolVLAArch, to_dtype
from .functional import make_att_2d_masks, pad_last_dim, resize_with_pad
from .model import SmolVLAWeights
from .normalize import Normalizer

IMAGE_PREFIX = "observation.images."

__all__ = [  # the stage types are defined in effvla_ros.core.stages and re-exported here
    "IMAGE_PREFIX", "ChunkResult", "DenoiseResult", "ExpertLayerContext", "ExpertLayerHook", "ExpertPlan",
    "ImageEncoding", "PrefillLayerCallback", "PrefillLayerInfo", "PrefillStop", "PrefixCache", "SmolVLAPolicy",
    "StageStats", "StepCallback", "StepInfo", "VisualTokens",
]


class _HookPlan(ExpertPlan):
    """An ``expert_layer_hook`` (a function of :class:`ExpertLayerContext`) as an :class:`ExpertPlan`."""

    def __init__(self, hook: ExpertLayerHook) -> None:
        self.hook = hook

    def layer(self, ctx: ExpertLayerContext) -> Tensor:
        return self.hook(ctx)


# -------------------------------------------------------------------------------------------- the policy
class SmolVLAPolicy:
    """SmolVLA inference core. Build with :func:`~effvla_ros.core.smolvla.checkpoint.load_policy` or
    :func:`~effvla_ros.core.smolvla.checkpoint.build_random_policy`."""

    def __init__(self, weights: SmolVLAWeights, arch: SmolVLAArch, *, tokenizer: Any = None,
                 normalizer: Normalizer | None = None, runtime: RuntimeConfig | None = None,
                 vlm_config: Any = None, tokenizer_options: Mapping[str, Any] | None = None):
        self.arch = arch
        self.weights = weights
        self.tokenizer = tokenizer
        self.normalizer = normalizer or Normalizer(norm_map=dict(arch.normalization_mapping))
        self.vlm_config = vlm_config
        self.tokenizer_options = dict(tokenizer_options or {})
        self.runtime = runtime or RuntimeConfig()
        # where the weights / the VLM's tokenizer files were loaded from (set by load_policy; exports record them)
        self.source: Any = None
        self.vlm_dir: Any = None
        # True: the VLM and expert layers attend through torch's fused SDPA (:func:`~.functional.fused_attention`)
        # instead of LeRobot's eager path, except where attention probabilities are asked for. Set from
        # ``RuntimeConfig.attention`` (eager by default) and by ``effvla train --attention fused`` while training.
        self.fused_attention = False
        # count FLOPs per stage (torch.utils.flop_counter); from ``RuntimeConfig.count_flops``, or set per call
        self.count_flops = False
        self._vision_pos: dict[tuple[int, int, str], Tensor] = {}  # (rows, cols, device) -> vision position ids
        self.apply_runtime(self.runtime)
        weights.eval()

    # -- runtime ---------------------------------------------------------------------------------------
    def apply_runtime(self, runtime: RuntimeConfig) -> None:
        """Move/cast the weights per the runtime config (device, per-stage dtypes)."""
        self.runtime = runtime
        self.device = torch.device(runtime.device)
        if runtime.num_threads > 0:
            torch.set_num_threads(runtime.num_threads)
        self.thread_governor: ThreadGovernor | None = None
        if runtime.adaptive_threads and runtime.device == "cpu":
            self.thread_governor = ThreadGovernor(runtime.num_threads)
        self.weights.to(self.device)
        self.weights.set_dtypes(*(to_dtype(d) for d in runtime.resolved_dtypes()))  # "auto": native bf16 or fp32
        self.count_flops = runtime.count_flops
        self.fused_attention = runtime.attention == "fused"

    def adapt_threads(self) -> int:
        """Before a stage call: with ``RuntimeConfig.adaptive_threads``, set torch's threads to the cores other
        processes leave free (:class:`~effvla_ros.core.threads.ThreadGovernor`); returns the threads in use."""
        if self.thread_governor is None:
            return torch.get_num_threads()
        return self.thread_governor.update()

    @property
    def num_steps(self) -> int:
        return self.runtime.num_steps or self.arch.num_steps

    @property
    def cameras(self) -> list[str]:
        return list(self.arch.cameras)

    # -- measurement -------------------------------------------------------------------------------------
    def _measure(self, out: list[StageStats]) -> contextlib.AbstractContextManager[None]:
        """Time (and with ``count_flops`` count) the enclosed stage (:func:`effvla_ros.core.stages.measure`)."""
        return measure(self.device, out, self.count_flops)

    def draw_noise(self, batch: int, generator: torch.Generator | None = None) -> Tensor:
        """The flow's starting point x_1 ~ N(0, 1): (B, chunk_size, max_action_dim) fp32 (on the CPU when drawn
        from a ``generator``, so that a seeded chunk is the same on every device)."""
        return torch.randn((batch, self.arch.chunk_size, self.arch.max_action_dim), generator=generator,
                           dtype=torch.float32, device=self.device if generator is None else "cpu")

    def decode_actions(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The flow's end point x_0 (B, S, max_action_dim) -> (unnormalized actions in the model's space, normalized
        actions), both (B, S, action_dim)."""
        norm = x[:, :, : self.arch.action_dim]
        return self.normalizer.unnormalize("action", norm), norm

    # ======================================================================================= inputs
    def tokenize(self, tasks: str | Sequence[str]) -> tuple[Tensor, Tensor]:
        """Task text(s) -> (tokens (B, L) long, mask (B, L) bool) as LeRobot's preprocessor does:
        a trailing newline is added, padding/truncation per the checkpoint's tokenizer step."""
        if self.tokenizer is None:
            raise RuntimeError("this policy has no tokenizer: pass language tokens to prefill() directly")
        texts = [tasks] if isinstance(tasks, str) else list(tasks)
        texts = [t if t.endswith("\n") else f"{t}\n" for t in texts]
        opts = {"max_length": self.arch.tokenizer_max_length, "padding": self.arch.pad_language_to,
                "padding_side": "right", "truncation": True}
        opts.update(self.tokenizer_options)
        enc = self.tokenizer(texts, return_tensors="pt", **opts)
        return enc["input_ids"].to(self.device), enc["attention_mask"].bool().to(self.device)

    def prepare_state(self, state: Tensor) -> Tensor:
        """Raw state (B, state_dim) -> normalized, zero-padded to (B, max_state_dim), fp32."""
        state = state.to(self.device, torch.float32)
        state = self.normalizer.normalize("observation.state", state)
        return pad_last_dim(state, self.arch.max_state_dim)

    def _relative_offset(self, actions: Tensor, state: Tensor) -> Tensor:
        """(B, 1, action_dim): the raw state on ``arch.relative_action_dims``, zero elsewhere."""
        off = torch.zeros((state.shape[0], 1, actions.shape[-1]), dtype=actions.dtype, device=actions.device)
        dims = list(self.arch.relative_action_dims)
        off[:, 0, dims] = state.to(actions.device, actions.dtype)[:, dims]
        return off

    def to_relative(self, actions: Tensor, state: Tensor) -> Tensor:
        """Absolute (B, S, action_dim) actions -> the model's action space (``relative_action_dims`` minus the
        observation's raw state (B, state_dim)); unchanged for an absolute-action checkpoint."""
        if not self.arch.relative_action_dims:
            return actions
        return actions - self._relative_offset(actions, state)

    def to_absolute(self, actions: Tensor, state: Tensor) -> Tensor:
        """Inverse of :meth:`to_relative`: unnormalized model actions + the observation's raw state."""
        if not self.arch.relative_action_dims:
            return actions
        return actions + self._relative_offset(actions, state)

    def action_targets(self, actions: Tensor, state: Tensor) -> Tensor:
        """Raw absolute (B, S, action_dim) actions -> the flow's target a_0: (B, S, max_action_dim), in the model's
        space (:meth:`to_relative`), normalized and zero-padded. Every training loss goes through this."""
        b = actions.shape[0]
        rel = self.to_relative(actions.to(self.device, torch.float32), state.reshape(b, -1))
        return pad_last_dim(self.normalizer.normalize("action", rel), self.arch.max_action_dim)

    def flow_training_sample(self, actions: Tensor, state: Tensor, noise: Tensor | None = None,
                             t: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(x_t, u_t, t) of LeRobot's flow-matching objective for raw absolute actions (B, S, action_dim):
        a = :meth:`action_targets`, x_t = t * noise + (1 - t) * a, u_t = noise - a; noise ~ N(0, 1) and
        t ~ Beta(1.5, 1) * 0.999 + 0.001 (B,) unless given. t may be per token (B, S): training-time real-time
        chunking gives the committed prefix t = 0 (x_t = a there, :func:`~effvla_ros.core.flow.rtc_training_time`). Every training
        loss samples through this."""
        a = self.action_targets(actions, state)
        if noise is None:
            noise = torch.randn_like(a)
        if t is None:
            t = sample_flow_time(a.shape[0]).to(self.device)
        tt = t[:, :, None] if t.ndim == 2 else t[:, None, None]
        return tt * noise + (1 - tt) * a, noise - a, t

    def preprocess_image(self, img: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> resized with left/top padding, scaled to [-1, 1]."""
        img = img.to(self.device, torch.float32)
        if self.arch.resize_imgs_with_padding is not None:
            w, h = self.arch.resize_imgs_with_padding
            img = resize_with_pad(img, h, w, pad_value=0.0)
        return img * 2.0 - 1.0

    # ======================================================================================= stage 1
    def encode_images(self, images: Mapping[str, Tensor], *, grad: bool = False) -> ImageEncoding:
        """Per camera: resize-with-pad, [-1, 1], then :meth:`encode_pixels`.

        images: camera (or ``observation.images.<camera>``) -> float (B, 3, H, W) in [0, 1].
        Returns the connector outputs (B, N, D_vlm) BEFORE the sqrt(D_vlm) scaling (prefill applies it).
        """
        tokens: dict[str, Tensor] = {}
        stats: dict[str, StageStats] = {}
        patch_grid = (0, 0)
        with torch.set_grad_enabled(grad):
            for key, img in images.items():
                cam = key[len(IMAGE_PREFIX):] if key.startswith(IMAGE_PREFIX) else key
                out: list[StageStats] = []
                with self._measure(out):
                    x = self.preprocess_image(img)                              # (B, 3, H, W)
                    patch_grid = (x.shape[2] // self.arch.patch_size, x.shape[3] // self.arch.patch_size)
                    tokens[cam] = self.encode_pixels(x)                         # (B, N, D_vlm)
                stats[cam] = out[0]
        s = self.arch.scale_factor
        return ImageEncoding(tokens, (patch_grid[0] // s, patch_grid[1] // s), patch_grid, stats)

    def encode_pixels(self, pixels: Tensor, ops: Any = L) -> Tensor:
        """Model-ready pixels (B, 3, H, W) in [-1, 1] -> connector tokens (B, N, D_vlm): patch + position
        embeddings, the SigLIP layers (:func:`.layers.siglip_layer`), post-LN, pixel shuffle + projection.
        ``ops``: where the per-layer functions come from (:mod:`.layers`, or a backend's compiled versions)."""
        vision, connector = self.weights.vision, self.weights.connector
        emb = vision.embeddings
        x = pixels.to(emb.patch_embedding.weight.dtype)
        _, _, hh, ww = x.shape
        p = self.arch.patch_size
        h = emb.patch_embedding(x).flatten(2).transpose(1, 2)                    # (B, Np, Dv)
        h = h + emb.position_embedding(self.vision_position_ids(hh // p, ww // p, x.device))
        for layer in vision.encoder.layers:
            h = ops.siglip_layer(layer, h)[0]
        return connector(vision.post_layernorm(h))                               # (B, N, D_vlm)

    def vision_position_ids(self, rows: int, cols: int, device: torch.device) -> Tensor:
        """(1, rows * cols) position ids of a full (unmasked) patch grid, as transformers' SmolVLM vision
        embeddings compute them for an all-True ``patch_attention_mask`` (fractional coordinates bucketized
        onto the ``num_patches_per_side`` grid), computed once per grid and device. Cached: the encode does not
        rebuild them from a mask on every call as the module does, so a captured encode (CUDA graph) does not
        depend on how a transformers version builds them."""
        key = (rows, cols, str(device))
        ids = self._vision_pos.get(key)
        if ids is None:
            side = self.weights.vision.embeddings.num_patches_per_side
            boundaries = torch.arange(1 / side, 1.0, 1 / side, device=device)
            coords = []
            for n in (rows, cols):
                step = 1.0 / torch.tensor([n], device=device)                  # float32, as 1.0 / mask.sum()
                frac = torch.arange(n, device=device, dtype=torch.float32)[None, :] * step[:, None]
                coords.append(torch.bucketize(torch.clamp(frac, max=1.0 - 1e-6), boundaries, right=True))
            ids = self._vision_pos[key] = (coords[0][:, :, None] * side + coords[1][:, None, :]).reshape(1, -1)
        return ids

    # ======================================================================================= stage 2
    def embed_prefix(self, visual: Mapping[str, VisualTokens | Tensor], lang_tokens: Tensor, lang_mask: Tensor,
                     state: Tensor, pad_multiple: int = 1
                     ) -> tuple[Tensor, Tensor, Tensor, dict[str, tuple[int, int]], dict[str, Tensor]]:
        """[images x sqrt(D) per camera; language x sqrt(D); state_proj(state)] with pad/att masks.

        Returns embeddings (B, P, D), pad_mask (B, P), att_mask (B, P), segments, token_index.
        """
        w = self.weights.model
        embs, pads, atts = [], [], []
        segments: dict[str, tuple[int, int]] = {}
        token_index: dict[str, Tensor] = {}
        pos = 0
        b = lang_tokens.shape[0]
        for cam, vt in visual.items():
            vt = vt if isinstance(vt, VisualTokens) else VisualTokens(vt)
            tok = vt.tokens.to(self.device)                                       # (B, N, D)
            n = tok.shape[1]
            idx = torch.arange(n, device=tok.device)
            mask = vt.mask.to(self.device).bool() if vt.mask is not None else None
            if vt.keep is not None:
                keep = vt.keep.to(self.device).long()
                if keep.ndim == 1:                                               # shared subset
                    tok, idx = tok[:, keep], keep
                    mask = mask[:, keep] if mask is not None else None
                else:                                                            # per-sample subset (B, K)
                    tok = torch.gather(tok, 1, keep[..., None].expand(-1, -1, tok.shape[-1]))
                    idx = keep
                    mask = torch.gather(mask, 1, keep) if mask is not None else None
            # the scale is a tensor of the embedding dtype (rounded to bf16 when the tokens are bf16)
            tok = tok * torch.tensor(tok.shape[-1] ** 0.5, dtype=tok.dtype, device=tok.device)
            k = tok.shape[1]
            pad = torch.ones((b, k), dtype=torch.bool, device=tok.device) if mask is None else mask
            if vt.camera_mask is not None:
                pad = pad & vt.camera_mask.to(self.device).bool()[:, None]
            embs.append(tok)
            pads.append(pad)
            atts.append(torch.zeros((b, k), dtype=torch.bool, device=tok.device))
            segments[cam] = (pos, pos + k)
            token_index[cam] = idx
            pos += k
        embed = self.weights.text.embed_tokens
        lang = embed(lang_tokens.to(self.device))
        lang = lang * math.sqrt(lang.shape[-1])                                  # python-float scale
        embs.append(lang)
        pads.append(lang_mask.to(self.device).bool())
        atts.append(torch.zeros_like(pads[-1]))
        segments["language"] = (pos, pos + lang.shape[1])
        pos += lang.shape[1]
        sp = w.state_proj
        st = sp(state.to(self.device, sp.weight.dtype))
        st = st[:, None, :] if st.ndim == 2 else st                              # (B, 1, D)
        embs.append(st)
        pads.append(torch.ones((b, st.shape[1]), dtype=torch.bool, device=st.device))
        atts.append(torch.ones((b, st.shape[1]), dtype=torch.bool, device=st.device))
        segments["state"] = (pos, pos + st.shape[1])
        emb = torch.cat(embs, dim=1)                                              # type promotion as LeRobot
        pad_mask = torch.cat(pads, dim=1)
        att_mask = torch.cat(atts, dim=1)
        target = max(self.arch.prefix_length, -(-emb.shape[1] // pad_multiple) * pad_multiple)
        if 0 < emb.shape[1] < target:  # padding tokens: masked for every query and key, no position
            extra = target - emb.shape[1]
            emb = F.pad(emb, (0, 0, 0, extra))
            pad_mask = F.pad(pad_mask.long(), (0, extra)).bool()
            att_mask = F.pad(att_mask.long(), (0, extra)).bool()
        return emb, pad_mask, att_mask, segments, token_index

    def begin_prefill(self, visual: Mapping[str, VisualTokens | Tensor], lang_tokens: Tensor, lang_mask: Tensor,
                      state: Tensor, pad_multiple: int = 1) -> PrefixCache:
        """The prefix's embeddings and masks, no layer computed yet (``cache.hidden`` = the embeddings).
        ``pad_multiple``: pad the prefix with masked tokens up to a multiple of this length (static shapes for
        compiled backends; the valid tokens' K/V and the actions are unchanged, as with the checkpoint's
        ``prefix_length``)."""
        emb, pad_mask, att_mask, segments, token_index = self.embed_prefix(visual, lang_tokens, lang_mask, state,
                                                                           pad_multiple)
        att_2d = make_att_2d_masks(pad_mask, att_mask)                           # (B, P, P)
        position_ids = torch.cumsum(pad_mask.long(), dim=1) - 1                  # (B, P)
        return PrefixCache([], [], pad_mask, att_mask, position_ids, emb, segments, token_index, hidden=emb,
                           att_2d=att_2d)

    def prefill_layers(self, cache: PrefixCache, start: int, stop: int, *,
                       attn_layers: bool | Collection[int] = False,
                       layer_callback: PrefillLayerCallback | None = None, ops: Any = L) -> bool:
        """Run VLM layers [start, stop) on ``cache.hidden`` (the output of layer start - 1), appending their K/V.

        ``attn_layers``: True / layer indices whose attention probabilities are kept in ``cache.attn_probs``.
        Returns True when ``layer_callback`` stopped the prefill with :class:`PrefillStop` (the remaining layers'
        K/V then come from its cache, ``cache.exit_layer`` is set).
        """
        if start != cache.num_layers or cache.hidden is None or cache.att_2d is None:
            raise ValueError(f"prefill_layers: the cache holds {cache.num_layers} layers, asked to start at {start}")
        layers = self.weights.text.layers
        h = cache.hidden
        for i in range(start, stop):
            want = attn_layers is True or (not isinstance(attn_layers, bool) and i in attn_layers)
            h_out, k, v, probs = (L if want else ops).vlm_layer(layers[i], h, cache.position_ids, cache.att_2d,
                                             fused=self.fused_attention, want_probs=want)
            cache.keys.append(k)
            cache.values.append(v)
            if probs is not None:
                cache.attn_probs[i] = probs
            cache.hidden = h_out
            if layer_callback is not None:
                action = layer_callback(PrefillLayerInfo(i, h, h_out, k, v, probs, cache))
                if isinstance(action, PrefillStop):
                    reuse = action.reuse
                    if reuse.num_layers != len(layers) or reuse.length != cache.length:
                        raise ValueError("PrefillStop.reuse must be a full cache of the same prefix length")
                    cache.reuse_from(reuse, i)
                    return True
            h = h_out
        return False

    def prefill(self, visual: Mapping[str, VisualTokens | Tensor], lang_tokens: Tensor, lang_mask: Tensor,
                state: Tensor, *, layer_callback: PrefillLayerCallback | None = None,
                attn_layers: bool | Collection[int] = False, grad: bool = False) -> PrefixCache:
        """Run the VLM over the prefix and return its per-layer K/V cache (:meth:`begin_prefill` +
        :meth:`prefill_layers` over every layer).

        visual: camera -> unscaled tokens (B, N, D) or :class:`VisualTokens` (kept subset / masks).
        lang_tokens (B, L) long, lang_mask (B, L) bool; state (B, max_state_dim) normalized and padded
        (see :meth:`prepare_state`). ``attn_layers`` and ``layer_callback``: see :meth:`prefill_layers`.
        """
        out: list[StageStats] = []
        with torch.set_grad_enabled(grad), self._measure(out):
            cache = self.begin_prefill(visual, lang_tokens, lang_mask, state)
            self.prefill_layers(cache, 0, self.arch.num_vlm_layers, attn_layers=attn_layers,
                                layer_callback=layer_callback)
        cache.stats = out[0]
        return cache

    # ======================================================================================= stage 3
    def expert_layer_map(self) -> list[int | None]:
        """VLM layer index -> expert layer index (None where the expert skips that VLM layer)."""
        n_vlm, n_exp = self.arch.num_vlm_layers, self.arch.n_expert_layers
        mult = n_vlm // n_exp
        return [None if (mult > 0 and i > 0 and i % mult != 0) else (i // mult if mult > 0 else i)
                for i in range(n_vlm)]

    def expert_layer_indices(self) -> list[int]:
        """The VLM layer indices that have an expert layer, in order (the ``layer_idx`` of expert plans)."""
        return [i for i, e in enumerate(self.expert_layer_map()) if e is not None]

    def cross_kv(self, cache: PrefixCache, ops: Any = L) -> dict[int, tuple[Tensor, Tensor]]:
        """The expert's cross-attention K/V per VLM layer index (:func:`.layers.expert_cross_kv`). They depend on the
        prefix only: computed once per chunk and kept in ``cache.expert_kv`` (unless they carry a graph)."""
        if cache.expert_kv is not None:
            return cache.expert_kv
        layers = self.weights.expert.layers
        kv = {i: ops.expert_cross_kv(layers[ei], cache.keys[i], cache.values[i])
              for i, ei in enumerate(self.expert_layer_map()) if ei is not None and self.arch.is_cross_attn_layer(i)}
        if not any(k.requires_grad for k, _ in kv.values()):
            cache.expert_kv = kv
        return kv

    def velocity(self, cache: PrefixCache, x_t: Tensor, t: float | Tensor, *, step: int = -1,
                 plan: ExpertPlan | None = None, ops: Any = L) -> Tensor:
        """v(x_t, t) given the prefix cache: (B, S, max_action_dim) fp32 -> same shape, fp32.

        t: a float, (B,) or per token (B, S). ``plan`` decides per expert layer to compute it or replace it
        (feature reuse); ``step`` is passed to it. ``ops``: where the layer functions come from (:mod:`.layers`, or
        a backend's compiled versions). Runs in the caller's grad mode, so under
        ``torch.enable_grad()`` it is differentiable w.r.t. x_t (vector-Jacobian products for RTC guidance).
        """
        b, s = x_t.shape[:2]
        if not isinstance(t, Tensor):
            t = torch.tensor(float(t), dtype=torch.float32, device=x_t.device)
        t = t.to(torch.float32)
        t = t if t.ndim == 2 else t.reshape(-1).expand(b)
        h = L.embed_suffix(self.weights.model, x_t, t, self.arch.min_period, self.arch.max_period)  # (B, S, De)
        n_valid = cache.num_valid[:, None]                                       # (B, 1)
        suffix_pos = n_valid + torch.arange(s, device=h.device)[None, :]         # (B, S)
        cross_pos = suffix_pos - suffix_pos.min(dim=1, keepdim=True).values      # (B, S) starts at 0
        prefix_mask = cache.pad_mask[:, None, :].expand(b, s, cache.length)      # (B, S, P)
        causal = torch.ones((s, s), dtype=torch.bool, device=h.device).tril()[None].expand(b, s, s)
        self_mask = torch.cat([prefix_mask, causal], dim=2)                      # (B, S, P + S)
        cross_kv = self.cross_kv(cache, ops)
        expert_layers = self.weights.expert.layers
        fused = self.fused_attention
        for i, ei in enumerate(self.expert_layer_map()):
            if ei is None:
                continue
            layer = expert_layers[ei]
            run: Callable[[Tensor], Tensor]
            if i in cross_kv:
                run = functools.partial(ops.expert_cross_layer, layer, k=cross_kv[i][0], v=cross_kv[i][1], pos=cross_pos,
                                        mask=prefix_mask, fused=fused)
            else:
                run = functools.partial(ops.expert_self_layer, layer, pk=cache.keys[i], pv=cache.values[i],
                                        pos=suffix_pos, mask=self_mask, fused=fused)
            h = run(h) if plan is None else plan.layer(ExpertLayerContext(step, t, i, i in cross_kv, h, run))
        h = self.weights.expert.norm(h)[:, -self.arch.chunk_size:]
        out_proj = self.weights.model.action_out_proj
        return out_proj(h.float().to(out_proj.weight.dtype)).float()

    def denoise(self, cache: PrefixCache, noise: Tensor | None = None, num_steps: int | None = None, *,
                step_callback: StepCallback | None = None, expert_layer_hook: ExpertLayerHook | None = None,
                plan: ExpertPlan | None = None, record: bool = False,
                generator: torch.Generator | None = None) -> DenoiseResult:
        """Euler integration of the flow from t = 1 (noise) to 0 (:func:`effvla_ros.core.flow.euler_integrate`).

        noise: (B, chunk_size, max_action_dim) (drawn from N(0, 1) when None). ``step_callback`` gets a
        :class:`StepInfo` after v_t is computed and may return a replacement velocity (runs with grad
        disabled; use ``torch.enable_grad()`` and ``info.velocity_fn`` for a VJP). ``plan`` (or an
        ``expert_layer_hook``, a function of :class:`ExpertLayerContext`) runs the expert layers. ``record``
        keeps x_t / t / v_t of every step in ``result.trace``.
        """
        n = num_steps or self.num_steps
        b = cache.pad_mask.shape[0]
        if noise is None:
            noise = self.draw_noise(b, generator)
        if expert_layer_hook is not None:
            plan = _HookPlan(expert_layer_hook)
        trace: dict[str, list[Tensor]] | None = {"x_t": [], "t": [], "v_t": []} if record else None
        out: list[StageStats] = []

        def velocity(x: Tensor, t: Tensor, step: int) -> Tensor:
            return self.velocity(cache, x, t, step=step, plan=plan)

        guide = None
        if step_callback is not None:
            def velocity_fn(x_in: Tensor, t_in: Tensor) -> Tensor:
                return self.velocity(cache, x_in, t_in)

            def guide(step: int, t_now: float, x: Tensor, v: Tensor) -> Tensor:
                new_v = step_callback(StepInfo(step, t_now, -1.0 / n, x, v, cache, velocity_fn))
                return v if new_v is None else new_v

        with torch.no_grad(), self._measure(out):
            x = euler_integrate(velocity, noise.to(self.device), n, guide=guide, trace=trace)
        actions, norm = self.decode_actions(x)
        return DenoiseResult(actions, norm, x, trace or {}, out[0])

    # ======================================================================================= composed
    def split_observation(self, observation: Mapping[str, Any]) -> tuple[dict[str, Tensor], Tensor, Any]:
        """LeRobot-style observation -> (images per camera in config order, raw state, task)."""
        images = {}
        for cam in self.arch.cameras:
            key = IMAGE_PREFIX + cam
            if key not in observation:
                raise KeyError(f"observation is missing {key!r} (the policy's cameras: {self.arch.cameras})")
            images[cam] = observation[key]
        if "observation.state" not in observation:
            raise KeyError("observation is missing 'observation.state'")
        return images, observation["observation.state"], observation.get("task", "")

    def language(self, observation: Mapping[str, Any], task: Any, batch: int) -> tuple[Tensor, Tensor]:
        """(tokens (B, L) long, mask (B, L) bool): ``observation.language.tokens`` / ``.attention_mask`` when the
        observation is already tokenized (LeRobot's preprocessor output), else ``task`` (one str for the whole
        batch, or B of them) through :meth:`tokenize`."""
        if "observation.language.tokens" in observation:
            return (observation["observation.language.tokens"].to(self.device),
                    observation["observation.language.attention_mask"].to(self.device).bool())
        return self.tokenize([task] * batch if isinstance(task, str) else list(task))

    def predict_action_chunk(self, observation: Mapping[str, Any], noise: Tensor | None = None, *,
                             step_callback: StepCallback | None = None, record: bool = False,
                             prefill_callback: PrefillLayerCallback | None = None,
                             expert_layer_hook: ExpertLayerHook | None = None) -> ChunkResult:
        """LeRobot's ``predict_action_chunk`` + postprocessor, stage by stage (callbacks passed to the stages).

        observation: ``observation.images.<camera>`` (B, 3, H, W) in [0, 1], ``observation.state``
        (B, state_dim) raw, ``task`` str or list of B str (or ``observation.language.tokens`` /
        ``observation.language.attention_mask`` already tokenized). noise: (B, chunk, max_action_dim).
        """
        t0 = time.perf_counter()
        images, state, task = self.split_observation(observation)
        lang, lmask = self.language(observation, task, state.shape[0])
        with torch.no_grad():
            enc = self.encode_images(images)
            cache = self.prefill(enc.tokens, lang, lmask, self.prepare_state(state), layer_callback=prefill_callback)
            den = self.denoise(cache, noise, step_callback=step_callback, record=record,
                               expert_layer_hook=expert_layer_hook)
        stats = {f"vision.{c}": s for c, s in enc.stats.items()}
        assert cache.stats is not None and den.stats is not None
        stats["prefill"], stats["denoise"] = cache.stats, den.stats
        stats["total"] = StageStats(time.perf_counter() - t0)
        actions = self.to_absolute(den.actions, state.reshape(den.actions.shape[0], -1))
        return ChunkResult(actions, den.actions_normalized, stats, enc, cache, den)

    def flow_matching_loss(self, observation: Mapping[str, Any], actions: Tensor, noise: Tensor | None = None,
                           t: Tensor | None = None, *, train_vision: bool = False) -> Tensor:
        """Training loss of LeRobot's ``VLAFlowMatching.forward``: per element, (B, S, max_action_dim).

        actions: raw (B, S, action_dim) (normalized and zero-padded here). x_t = t * noise + (1 - t) * a,
        target u = noise - a; t defaults to Beta(1.5, 1) * 0.999 + 0.001. LeRobot's joint prefix/suffix
        pass equals prefill + velocity (the prefix never attends to the suffix), which is what runs here.
        Gradients reach whatever parameters require grad (see :meth:`freeze_like_lerobot`); the vision
        tower runs without grad unless ``train_vision``. Mask padded actions yourself (``action_is_pad``).
        """
        images, state, task = self.split_observation(observation)
        b = state.shape[0]
        x_t, u_t, t = self.flow_training_sample(actions, state, noise, t)
        lang, lmask = self.language(observation, task, b)
        enc = self.encode_images(images, grad=train_vision)
        cache = self.prefill(enc.tokens, lang, lmask, self.prepare_state(state), grad=True)
        v_t = self.velocity(cache, x_t, t)
        return F.mse_loss(u_t, v_t, reduction="none")

    def freeze_like_lerobot(self, train_expert_only: bool = True, freeze_vision_encoder: bool = True) -> None:
        """requires_grad as LeRobot's defaults: the VLM frozen (train_expert_only), lm_head frozen;
        the expert, state_proj and the action/time projections trainable."""
        vwe = self.weights.model.vlm_with_expert
        for p in vwe.vlm.parameters():
            p.requires_grad_(not train_expert_only)
        if freeze_vision_encoder:
            for p in self.weights.vision.parameters():
                p.requires_grad_(False)
        for p in vwe.vlm.lm_head.parameters():
            p.requires_grad_(False)
        for m in (vwe.lm_expert, self.weights.model.state_proj, self.weights.model.action_in_proj,
                  self.weights.model.action_out_proj, self.weights.model.action_time_mlp_in,
                  self.weights.model.action_time_mlp_out):
            for p in m.parameters():
                p.requires_grad_(True)
