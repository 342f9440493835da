"""SmolVLA inference in three stages, numerically equal to LeRobot 0.6.1.

    encode_images  images (B,3,H,W) in [0,1]  -> per camera visual tokens (B, N=64, D_vlm), unscaled
    prefill        visual tokens (any kept subset) + language + state -> per-layer VLM K/V (PrefixCache)
    denoise        PrefixCache + noise -> Euler flow from t=1 to 0 -> normalized / unnormalized actions

Everything is computed layer by layer, with explicit hook points:

* vision:   ``vision_layer_hook(ctx: VisionLayerContext) -> Tensor`` replaces one encoder layer's
            computation (``ctx.run()`` computes it normally) - patch-level temporal reuse.
* prefill:  ``layer_callback(info: PrefillLayerInfo) -> PrefillStop | None`` after every VLM layer, with
            the layer's input/output hidden states, K/V and (on request) attention probabilities;
            returning ``PrefillStop(reuse=old_cache)`` stops and copies the remaining layers' K/V from
            ``old_cache`` - early exit.
* denoise:  ``step_callback(info: StepInfo) -> Tensor | None`` may return a modified velocity (real-time
            chunking guidance; ``info.velocity_fn`` recomputes v(x, t) differentiably for a VJP);
            ``expert_layer_hook(ctx: ExpertLayerContext) -> Tensor`` replaces one expert layer's
            computation at one step (feature reuse across steps).

Layouts: B batch, P prefix length, S suffix length (= chunk_size), H heads, Hkv KV heads, D head dim.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from effvla_ros.core import flops as _flops  # noqa: F401  (counts CPU SDPA attention too)

from .config import RuntimeConfig, SmolVLAArch, to_dtype
from .functional import (
    apply_rope,
    eager_attention,
    fused_attention,
    make_att_2d_masks,
    pad_last_dim,
    resize_with_pad,
    sinusoidal_time_embedding,
)
from .model import SmolVLAWeights
from .normalize import Normalizer

IMAGE_PREFIX = "observation.images."


# ------------------------------------------------------------------------------------------------ results
@dataclass
class StageStats:
    """Wall time of a stage (CUDA-synchronized) and its FLOPs (None unless counting was on)."""

    wall_s: float
    flops: int | None = None


@dataclass
class ImageEncoding:
    tokens: dict[str, Tensor]          # camera -> (B, N, D_vlm) connector output, BEFORE x sqrt(D_vlm)
    grid: tuple[int, int]              # token grid (rows, cols); token n is at (n // cols, n % cols)
    patch_grid: tuple[int, int]        # vision patch grid before the pixel shuffle
    stats: dict[str, StageStats]       # per camera


@dataclass
class VisualTokens:
    """One camera's visual tokens for :meth:`SmolVLAPolicy.prefill`.

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

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def length(self) -> int:
        return int(self.pad_mask.shape[1])

    @property
    def num_valid(self) -> Tensor:
        return self.pad_mask.sum(dim=1)


@dataclass
class PrefillLayerInfo:
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


@dataclass
class PrefillLayerContext:
    layer_idx: int
    layer: nn.Module
    hidden: Tensor                     # (B, P, D_vlm) input of the layer
    position_ids: Tensor               # (B, P)
    att_2d: Tensor                     # (B, P, P) bool attention mask
    want_probs: bool
    run: Callable[[Tensor], tuple[Tensor, Tensor, Tensor, Tensor | None]]  # -> (h_out, K, V, probs)


@dataclass
class VisionLayerContext:
    camera: str
    layer_idx: int
    layer: nn.Module
    hidden: Tensor                     # (B, N_patches, D_vision) input of the layer
    run: Callable[[Tensor], Tensor]    # run(hidden) -> the layer's normal output


@dataclass
class ExpertLayerContext:
    step: int                          # denoising step index (-1 outside denoise())
    t: Tensor                          # (B,) fp32 flow time
    layer_idx: int
    cross: bool                        # cross-attention layer (else self-attention over [prefix; suffix])
    hidden: Tensor                     # (B, S, D_expert) input of the layer
    run: Callable[[Tensor], Tensor]    # run(hidden) -> the layer's normal output


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


VisionLayerHook = Callable[[VisionLayerContext], Tensor]
PrefillLayerCallback = Callable[[PrefillLayerInfo], "PrefillStop | None"]
PrefillLayerHook = Callable[[PrefillLayerContext], "tuple[Tensor, Tensor, Tensor, Tensor | None]"]
StepCallback = Callable[[StepInfo], "Tensor | None"]
ExpertLayerHook = Callable[[ExpertLayerContext], Tensor]


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
        # True: the VLM and expert layers attend through torch's fused SDPA (:func:`~.functional.fused_attention`)
        # instead of LeRobot's eager path, except where attention probabilities are asked for. Set from
        # ``RuntimeConfig.attention`` (eager by default) and by ``effvla train --attention fused`` while training.
        self.fused_attention = False
        self.apply_runtime(self.runtime)
        weights.eval()
        self._flops_enabled = self.runtime.count_flops

    # -- runtime ---------------------------------------------------------------------------------------
    def apply_runtime(self, runtime: RuntimeConfig) -> None:
        """Move/cast the weights per the runtime config (device, per-stage dtypes)."""
        self.runtime = runtime
        self.device = torch.device(runtime.device)
        if runtime.num_threads > 0:
            torch.set_num_threads(runtime.num_threads)
        self.weights.to(self.device)
        self.weights.set_dtypes(to_dtype(runtime.vision_dtype), to_dtype(runtime.vlm_dtype),
                                to_dtype(runtime.expert_dtype))
        self._flops_enabled = runtime.count_flops
        self.fused_attention = runtime.attention == "fused"

    @property
    def num_steps(self) -> int:
        return self.runtime.num_steps or self.arch.num_steps

    @property
    def cameras(self) -> list[str]:
        return list(self.arch.cameras)

    # -- measurement -------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _measure(self, out: list[StageStats]) -> Iterator[None]:
        counter = None
        if self._flops_enabled:
            from torch.utils.flop_counter import FlopCounterMode

            counter = FlopCounterMode(display=False)
            counter.__enter__()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            wall = time.perf_counter() - t0
            flops = None
            if counter is not None:
                counter.__exit__(None, None, None)
                flops = int(counter.get_total_flops())
            out.append(StageStats(wall, flops))

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
        t ~ Beta(1.5, 1) * 0.999 + 0.001 (B,) unless given. Every training loss samples through this."""
        a = self.action_targets(actions, state)
        if noise is None:
            noise = torch.randn_like(a)
        if t is None:
            beta = torch.distributions.Beta(torch.tensor(1.5), torch.tensor(1.0))
            t = (beta.sample((a.shape[0],)) * 0.999 + 0.001).to(self.device)
        tt = t[:, None, None]
        return tt * noise + (1 - tt) * a, noise - a, t

    def preprocess_image(self, img: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> resized with left/top padding, scaled to [-1, 1]."""
        img = img.to(self.device, torch.float32)
        if self.arch.resize_imgs_with_padding is not None:
            w, h = self.arch.resize_imgs_with_padding
            img = resize_with_pad(img, h, w, pad_value=0.0)
        return img * 2.0 - 1.0

    # ======================================================================================= stage 1
    def encode_images(self, images: Mapping[str, Tensor], *, vision_layer_hook: VisionLayerHook | None = None,
                      grad: bool = False) -> ImageEncoding:
        """Per camera: resize-with-pad, [-1, 1], vision transformer layer by layer, post-LN, connector.

        images: camera (or ``observation.images.<camera>``) -> float (B, 3, H, W) in [0, 1].
        Returns the connector outputs (B, N, D_vlm) BEFORE the sqrt(D_vlm) scaling (prefill applies it).
        """
        vision, connector = self.weights.vision, self.weights.connector
        vdtype = vision.embeddings.patch_embedding.weight.dtype
        p = self.arch.patch_size
        tokens: dict[str, Tensor] = {}
        stats: dict[str, StageStats] = {}
        patch_grid = (0, 0)
        with torch.set_grad_enabled(grad):
            for key, img in images.items():
                cam = key[len(IMAGE_PREFIX):] if key.startswith(IMAGE_PREFIX) else key
                out: list[StageStats] = []
                with self._measure(out):
                    x = self.preprocess_image(img).to(vdtype)                     # (B, 3, H, W)
                    b, _, hh, ww = x.shape
                    patch_grid = (hh // p, ww // p)
                    full = torch.ones((b, *patch_grid), dtype=torch.bool, device=x.device)
                    h = vision.embeddings(pixel_values=x, patch_attention_mask=full)   # (B, Np, Dv)
                    for i, layer in enumerate(vision.encoder.layers):
                        run = _vision_layer_runner(layer)
                        if vision_layer_hook is None:
                            h = run(h)
                        else:
                            h = vision_layer_hook(VisionLayerContext(cam, i, layer, h, run))
                    h = vision.post_layernorm(h)
                    tokens[cam] = connector(h)                                   # (B, N, D_vlm)
                stats[cam] = out[0]
        s = self.arch.scale_factor
        return ImageEncoding(tokens, (patch_grid[0] // s, patch_grid[1] // s), patch_grid, stats)

    # ======================================================================================= stage 2
    def embed_prefix(self, visual: Mapping[str, VisualTokens | Tensor], lang_tokens: Tensor, lang_mask: Tensor,
                     state: Tensor) -> tuple[Tensor, Tensor, Tensor, dict[str, tuple[int, int]], dict[str, Tensor]]:
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
        if 0 < emb.shape[1] < self.arch.prefix_length:
            extra = self.arch.prefix_length - emb.shape[1]
            emb = F.pad(emb, (0, 0, 0, extra))
            pad_mask = F.pad(pad_mask.long(), (0, extra)).bool()
            att_mask = F.pad(att_mask.long(), (0, extra)).bool()
        return emb, pad_mask, att_mask, segments, token_index

    def prefill(self, visual: Mapping[str, VisualTokens | Tensor], lang_tokens: Tensor, lang_mask: Tensor,
                state: Tensor, *, layer_callback: PrefillLayerCallback | None = None,
                layer_hook: PrefillLayerHook | None = None, attn_layers: bool | Collection[int] = False,
                grad: bool = False) -> PrefixCache:
        """Run the VLM over the prefix layer by layer and return its per-layer K/V cache.

        visual: camera -> unscaled tokens (B, N, D) or :class:`VisualTokens` (kept subset / masks).
        lang_tokens (B, L) long, lang_mask (B, L) bool; state (B, max_state_dim) normalized and padded
        (see :meth:`prepare_state`). ``attn_layers``: True / layer indices whose attention probabilities
        are stored in ``cache.attn_probs`` and passed to ``layer_callback``. ``layer_hook(ctx)`` replaces a
        layer's computation: it returns ``(h_out, K, V, probs)`` like ``ctx.run(ctx.hidden)`` (e.g. reuse
        K/V of unchanged tokens from a previous frame, VLA-Cache style).
        """
        out: list[StageStats] = []
        with torch.set_grad_enabled(grad), self._measure(out):
            emb, pad_mask, att_mask, segments, token_index = self.embed_prefix(visual, lang_tokens, lang_mask, state)
            att_2d = make_att_2d_masks(pad_mask, att_mask)                       # (B, P, P)
            position_ids = torch.cumsum(pad_mask.long(), dim=1) - 1              # (B, P)
            cache = PrefixCache([], [], pad_mask, att_mask, position_ids, emb, segments, token_index)
            h = emb
            layers = self.weights.text.layers
            for i, layer in enumerate(layers):
                want = attn_layers is True or (not isinstance(attn_layers, bool) and i in attn_layers)
                if layer_hook is None:
                    h_out, k, v, probs = self.vlm_layer(layer, h, position_ids, att_2d, want)
                else:
                    def run(hh: Tensor, layer: Any = layer, want: bool = want
                            ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
                        return self.vlm_layer(layer, hh, position_ids, att_2d, want)
                    h_out, k, v, probs = layer_hook(PrefillLayerContext(i, layer, h, position_ids, att_2d, want, run))
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
                        cache.keys.extend(reuse.keys[i + 1:])
                        cache.values.extend(reuse.values[i + 1:])
                        cache.exit_layer = i
                        break
                h = h_out
        cache.stats = out[0]
        return cache

    def vlm_layer(self, layer: Any, h: Tensor, pos: Tensor, mask: Tensor, want_probs: bool
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """One VLM decoder layer over the prefix. h (B, P, D) -> (h_out, K, V (B, Hkv, P, D), probs)."""
        attn = layer.self_attn
        b, p, _ = h.shape
        x = layer.input_layernorm(h).to(attn.q_proj.weight.dtype)
        q = attn.q_proj(x).view(b, p, -1, attn.head_dim).transpose(1, 2)        # (B, H, P, D)
        k = attn.k_proj(x).view(b, p, -1, attn.head_dim).transpose(1, 2)        # (B, Hkv, P, D)
        v = attn.v_proj(x).view(b, p, -1, attn.head_dim).transpose(1, 2)
        q, k = apply_rope(q, pos), apply_rope(k, pos)
        a, probs = self._attend(q, k, v, mask, want_probs)                       # (B, P, H*D)
        h_out = self.residual_mlp(layer, a, h)
        return h_out, k, v, probs

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, want_probs: bool = False
                ) -> tuple[Tensor, Tensor | None]:
        """Attention of every VLM / expert layer: fused (``fused_attention``) unless probabilities are
        asked for, else eager (LeRobot's path). Returns (B, Lq, H*D) and the probabilities if asked."""
        if self.fused_attention and not want_probs:
            return fused_attention(q, k, v, mask), None
        return eager_attention(q, k, v, mask, return_probs=want_probs)

    @staticmethod
    def residual_mlp(layer: Any, attn_out: Tensor, h: Tensor) -> Tensor:
        """o_proj + residual (in o_proj's dtype, as LeRobot's in-place add), then norm + MLP + residual."""
        o = layer.self_attn.o_proj(attn_out.to(layer.self_attn.o_proj.weight.dtype))
        h = (o + h).to(o.dtype)
        return h + layer.mlp(layer.post_attention_layernorm(h))

    # ======================================================================================= stage 3
    def embed_suffix(self, x_t: Tensor, t: Tensor) -> Tensor:
        """MLP(cat[action_in_proj(x_t), sinusoidal(t)]): (B, S, max_action_dim), (B,) -> (B, S, D_expert)."""
        w = self.weights.model
        a = w.action_in_proj(x_t.to(w.action_in_proj.weight.dtype))             # (B, S, De)
        te = sinusoidal_time_embedding(t, a.shape[-1], self.arch.min_period, self.arch.max_period).to(a.dtype)
        te = te[:, None, :].expand_as(a)
        at = w.action_time_mlp_in(torch.cat([a, te], dim=2))
        return w.action_time_mlp_out(F.silu(at))

    def expert_layer_map(self) -> list[int | None]:
        """VLM layer index -> expert layer index (None where the expert skips that VLM layer)."""
        n_vlm, n_exp = self.arch.num_vlm_layers, self.arch.n_expert_layers
        mult = n_vlm // n_exp
        return [None if (mult > 0 and i > 0 and i % mult != 0) else (i // mult if mult > 0 else i)
                for i in range(n_vlm)]

    def expert_layer_indices(self) -> list[int]:
        """The VLM layer indices that have an expert layer, in order (the ``layer_idx`` of expert hooks)."""
        return [i for i, e in enumerate(self.expert_layer_map()) if e is not None]

    def velocity(self, cache: PrefixCache, x_t: Tensor, t: float | Tensor, *, step: int = -1,
                 expert_layer_hook: ExpertLayerHook | None = None) -> Tensor:
        """v(x_t, t) given the prefix cache: (B, S, max_action_dim) fp32 -> same shape, fp32.

        Runs in the caller's grad mode, so under ``torch.enable_grad()`` it is differentiable w.r.t. x_t
        (vector-Jacobian products for real-time-chunking guidance).
        """
        b, s = x_t.shape[:2]
        if not isinstance(t, Tensor):
            t = torch.tensor(float(t), dtype=torch.float32, device=x_t.device)
        t = t.to(torch.float32).reshape(-1).expand(b)
        h = self.embed_suffix(x_t, t)                                            # (B, S, De)
        n_valid = cache.num_valid[:, None]                                       # (B, 1)
        suffix_pos = n_valid + torch.arange(s, device=h.device)[None, :]         # (B, S)
        cross_pos = suffix_pos - suffix_pos.min(dim=1, keepdim=True).values      # (B, S) starts at 0
        prefix_mask = cache.pad_mask[:, None, :].expand(b, s, cache.length)      # (B, S, P)
        causal = torch.ones((s, s), dtype=torch.bool, device=h.device).tril()[None].expand(b, s, s)
        self_mask = torch.cat([prefix_mask, causal], dim=2)                      # (B, S, P + S)
        expert_layers = self.weights.expert.layers
        for i, ei in enumerate(self.expert_layer_map()):
            if ei is None:
                continue
            layer = expert_layers[ei]
            cross = self.arch.is_cross_attn_layer(i)
            if cross:
                def run(hh: Tensor, layer: Any = layer, i: int = i) -> Tensor:
                    return self.expert_cross_layer(layer, hh, cache.keys[i], cache.values[i], cross_pos, prefix_mask)
            else:
                def run(hh: Tensor, layer: Any = layer, i: int = i) -> Tensor:
                    return self.expert_self_layer(layer, hh, cache.keys[i], cache.values[i], suffix_pos, self_mask)
            if expert_layer_hook is None:
                h = run(h)
            else:
                h = expert_layer_hook(ExpertLayerContext(step, t, i, cross, h, run))
        h = self.weights.expert.norm(h)[:, -self.arch.chunk_size:]
        out_proj = self.weights.model.action_out_proj
        return out_proj(h.float().to(out_proj.weight.dtype)).float()

    def expert_self_layer(self, layer: Any, h: Tensor, pk: Tensor, pv: Tensor, pos: Tensor,
                           mask: Tensor) -> Tensor:
        """Expert self-attention over [prefix K/V; suffix K/V]. h (B, S, De); pk/pv (B, Hkv, P, D)."""
        attn = layer.self_attn
        b, s, _ = h.shape
        x = layer.input_layernorm(h).to(attn.q_proj.weight.dtype)
        q = attn.q_proj(x).view(b, s, -1, attn.head_dim).transpose(1, 2)        # (B, H, S, D)
        k = attn.k_proj(x).view(b, s, -1, attn.head_dim).transpose(1, 2)        # (B, Hkv, S, D)
        v = attn.v_proj(x).view(b, s, -1, attn.head_dim).transpose(1, 2)
        q, k = apply_rope(q, pos), apply_rope(k, pos)
        k = torch.cat([pk, k], dim=2)                                            # (B, Hkv, P + S, D)
        v = torch.cat([pv, v], dim=2)
        a, _ = self._attend(q, k, v, mask)
        return self.residual_mlp(layer, a, h)

    def expert_cross_layer(self, layer: Any, h: Tensor, pk: Tensor, pv: Tensor, pos: Tensor,
                            mask: Tensor) -> Tensor:
        """Expert cross-attention to the VLM's cached (post-RoPE) K/V through the expert's k/v_proj."""
        attn = layer.self_attn
        b, s, _ = h.shape
        p = pk.shape[2]
        x = layer.input_layernorm(h).to(attn.q_proj.weight.dtype)
        q = attn.q_proj(x).view(b, s, -1, attn.head_dim).transpose(1, 2)        # (B, H, S, D)
        q = apply_rope(q, pos)
        kin = pk.transpose(1, 2).reshape(b, p, -1).to(attn.k_proj.weight.dtype)  # (B, P, Hkv*D)
        vin = pv.transpose(1, 2).reshape(b, p, -1).to(attn.v_proj.weight.dtype)
        k = attn.k_proj(kin).view(b, p, -1, attn.head_dim).transpose(1, 2)      # (B, Hkv, P, D)
        v = attn.v_proj(vin).view(b, p, -1, attn.head_dim).transpose(1, 2)
        a, _ = self._attend(q, k, v, mask)
        return self.residual_mlp(layer, a, h)

    def denoise(self, cache: PrefixCache, noise: Tensor | None = None, num_steps: int | None = None, *,
                step_callback: StepCallback | None = None, expert_layer_hook: ExpertLayerHook | None = None,
                record: bool = False, generator: torch.Generator | None = None) -> DenoiseResult:
        """Euler integration of the flow from t = 1 (noise) to 0: x <- x + dt * v, dt = -1 / num_steps.

        noise: (B, chunk_size, max_action_dim) (drawn from N(0, 1) when None). ``step_callback`` gets a
        :class:`StepInfo` after v_t is computed and may return a replacement velocity (runs with grad
        disabled; use ``torch.enable_grad()`` and ``info.velocity_fn`` for a VJP). ``record`` keeps
        x_t / t / v_t of every step in ``result.trace``.
        """
        n = num_steps or self.num_steps
        b = cache.pad_mask.shape[0]
        if noise is None:
            noise = torch.randn((b, self.arch.chunk_size, self.arch.max_action_dim), generator=generator,
                                dtype=torch.float32, device=self.device if generator is None else "cpu")
        x = noise.to(self.device, torch.float32)
        dt = -1.0 / n
        trace: dict[str, list[Tensor]] = {"x_t": [], "t": [], "v_t": []} if record else {}
        out: list[StageStats] = []

        def velocity_fn(x_in: Tensor, t_in: Tensor) -> Tensor:
            return self.velocity(cache, x_in, t_in)

        with torch.no_grad(), self._measure(out):
            for step in range(n):
                t_now = 1.0 + step * dt
                t_vec = torch.tensor(t_now, dtype=torch.float32, device=self.device).expand(b)
                v = self.velocity(cache, x, t_vec, step=step, expert_layer_hook=expert_layer_hook)
                if step_callback is not None:
                    new_v = step_callback(StepInfo(step, t_now, dt, x, v, cache, velocity_fn))
                    if new_v is not None:
                        v = new_v.detach().to(torch.float32)
                if record:
                    trace["x_t"].append(x)
                    trace["t"].append(t_vec)
                    trace["v_t"].append(v)
                x = x + dt * v
        norm = x[:, :, : self.arch.action_dim]
        actions = self.normalizer.unnormalize("action", norm)
        return DenoiseResult(actions, norm, x, trace, out[0])

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

    def predict_action_chunk(self, observation: Mapping[str, Any], noise: Tensor | None = None, *,
                             step_callback: StepCallback | None = None, record: bool = False,
                             vision_layer_hook: VisionLayerHook | None = None,
                             prefill_callback: PrefillLayerCallback | None = None,
                             prefill_layer_hook: PrefillLayerHook | None = None,
                             expert_layer_hook: ExpertLayerHook | None = None) -> ChunkResult:
        """LeRobot's ``predict_action_chunk`` + postprocessor, stage by stage (hooks passed to the stages).

        observation: ``observation.images.<camera>`` (B, 3, H, W) in [0, 1], ``observation.state``
        (B, state_dim) raw, ``task`` str or list of B str (or ``observation.language.tokens`` /
        ``observation.language.attention_mask`` already tokenized). noise: (B, chunk, max_action_dim).
        """
        t0 = time.perf_counter()
        images, state, task = self.split_observation(observation)
        if "observation.language.tokens" in observation:
            lang = observation["observation.language.tokens"].to(self.device)
            lmask = observation["observation.language.attention_mask"].to(self.device).bool()
        else:
            b = state.shape[0]
            tasks = [task] * b if isinstance(task, str) else list(task)
            lang, lmask = self.tokenize(tasks)
        with torch.no_grad():
            enc = self.encode_images(images, vision_layer_hook=vision_layer_hook)
            cache = self.prefill(enc.tokens, lang, lmask, self.prepare_state(state), layer_callback=prefill_callback,
                                 layer_hook=prefill_layer_hook)
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
        if "observation.language.tokens" in observation:
            lang = observation["observation.language.tokens"].to(self.device)
            lmask = observation["observation.language.attention_mask"].to(self.device).bool()
        else:
            lang, lmask = self.tokenize([task] * b if isinstance(task, str) else list(task))
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


def _vision_layer_runner(layer: nn.Module) -> Callable[[Tensor], Tensor]:
    def run(h: Tensor) -> Tensor:
        out = layer(h, None)
        return out[0] if isinstance(out, tuple) else out
    return run
