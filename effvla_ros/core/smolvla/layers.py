"""SmolVLA's per-layer computations as pure functions of (module, tensors).

These are what every backend runs or traces (eager reference, compiled path, ONNX export): the vision
encoder layer (shared by the full encode and the Eventful partial encode), the VLM decoder layer over the
prefix, the expert's self- and cross-attention layers and the suffix embedding. They hold no state and
make no decision; hooks (reuse, pruning, early exit, guidance) live in the runner and in the core
modules that call them. Numerically equal to LeRobot 0.6.1 (golden files, ``test/test_policy_core_fidelity.py``).

Layouts: B batch, N vision patches, P prefix length, S suffix length, H heads, Hkv KV heads, D head dim.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

from .functional import apply_rope, eager_attention, fused_attention, sinusoidal_time_embedding


# ------------------------------------------------------------------------------------------------ projections
class Projections:
    """How a layer's weights are applied: the modules' own ``forward`` (LeRobot's computation, bit for bit).

    A backend can substitute its own (``effvla_ros.core.backends.packed``: oneDNN pre-packed weights, fused Q/K/V
    and gate/up matmuls, the GELU fused into the matmul) without touching the layer functions below: every
    weight of a layer goes through one of these four methods.
    """

    def qkv(self, attn: Any, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Q, K, V projections of x (B, n, D) -> each (B, n, heads * head_dim)."""
        return attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)

    def q(self, attn: Any, x: Tensor) -> Tensor:
        return attn.q_proj(x)

    def linear(self, module: Any, x: Tensor) -> Tensor:
        return module(x)

    def mlp(self, mlp: Any, x: Tensor) -> Tensor:
        """SigLIP's fc1-GELU-fc2 or Llama's down(silu(gate) * up)."""
        return mlp(x)


EAGER = Projections()


def _heads(attn: Any, x: Tensor, proj: Projections) -> tuple[Tensor, Tensor, Tensor]:
    """Q, K, V of x (B, n, D) split into heads: (B, H, n, hd), (B, Hkv, n, hd), (B, Hkv, n, hd)."""
    b, n, _ = x.shape
    return tuple(y.view(b, n, -1, attn.head_dim).transpose(1, 2) for y in proj.qkv(attn, x))  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------ vision
def siglip_layer(layer: Any, x: Tensor, *, rows: Tensor | None = None, cached_k: Tensor | None = None,
                 cached_v: Tensor | None = None, proj: Projections = EAGER,
                 inplace: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """One SigLIP encoder layer (``SmolVLMEncoderLayer``'s computation with sdpa attention).

    Full: x (B, N, d) -> (y (B, N, d), K, V (B, H, N, hd)). Partial (Eventful patch reuse): x holds only the
    tokens ``rows`` (n,) of a frame whose K/V of every token are ``cached_k`` / ``cached_v`` (B, H, N, hd): those
    rows' K/V are replaced, their queries attend to ALL tokens, and y (B, n, d) is their output; the returned
    K/V are the updated full ones — written into ``cached_k`` / ``cached_v`` themselves when ``inplace`` (the
    caller gives up the old frame's cache: no copy of the N-token K/V per layer), else into copies.
    """
    attn = layer.self_attn
    b, n, _ = x.shape
    q, k, v = _heads(attn, layer.layer_norm1(x), proj)                         # (B, H, n, hd)
    if rows is not None:
        if cached_k is None or cached_v is None:
            raise ValueError("siglip_layer: rows need the cached K/V of the frame")
        k_full, v_full = (cached_k, cached_v) if inplace else (cached_k.clone(), cached_v.clone())
        k_full.index_copy_(2, rows, k.to(k_full.dtype))
        v_full.index_copy_(2, rows, v.to(v_full.dtype))
        k, v = k_full, v_full                                                   # (B, H, N, hd)
    o = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)              # (B, H, n, hd)
    o = o.transpose(1, 2).reshape(b, n, -1)
    y = x + proj.linear(attn.out_proj, o)
    return y + proj.mlp(layer.mlp, layer.layer_norm2(y)), k, v


# ------------------------------------------------------------------------------------------------ attention
def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, *, fused: bool = False, want_probs: bool = False
           ) -> tuple[Tensor, Tensor | None]:
    """Attention of every VLM / expert layer: fused SDPA (``fused``) unless probabilities are asked for, else
    LeRobot's eager path. q (B, H, Lq, D), k/v (B, Hkv, Lk, D), mask (B, Lq, Lk) -> (B, Lq, H*D), probs."""
    if fused and not want_probs:
        return fused_attention(q, k, v, mask), None
    return eager_attention(q, k, v, mask, return_probs=want_probs)


def residual_mlp(layer: Any, attn_out: Tensor, h: Tensor, proj: Projections = EAGER) -> Tensor:
    """o_proj + residual (in o_proj's dtype, as LeRobot's in-place add), then norm + MLP + residual."""
    o = proj.linear(layer.self_attn.o_proj, attn_out.to(layer.self_attn.o_proj.weight.dtype))
    h = (o + h).to(o.dtype)
    return h + proj.mlp(layer.mlp, layer.post_attention_layernorm(h))


# ------------------------------------------------------------------------------------------------ VLM
def vlm_layer(layer: Any, h: Tensor, pos: Tensor, mask: Tensor, *, fused: bool = False, want_probs: bool = False,
              proj: Projections = EAGER) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """One VLM decoder layer over the prefix. h (B, P, D) -> (h_out, K, V (B, Hkv, P, D) post-RoPE, probs)."""
    attn = layer.self_attn
    q, k, v = _heads(attn, layer.input_layernorm(h).to(attn.q_proj.weight.dtype), proj)  # (B, H|Hkv, P, D)
    q, k = apply_rope(q, pos), apply_rope(k, pos)
    a, probs = attend(q, k, v, mask, fused=fused, want_probs=want_probs)      # (B, P, H*D)
    return residual_mlp(layer, a, h, proj), k, v, probs


# ------------------------------------------------------------------------------------------------ expert
def embed_suffix(model: Any, x_t: Tensor, t: Tensor, min_period: float, max_period: float) -> Tensor:
    """MLP(cat[action_in_proj(x_t), sinusoidal(t)]): x_t (B, S, max_action_dim), t (B,) or per token (B, S)
    -> (B, S, D_expert). ``model`` is the ``FlowMatchingModule`` (``weights.model``)."""
    a = model.action_in_proj(x_t.to(model.action_in_proj.weight.dtype))       # (B, S, De)
    if t.ndim == 2:                                                             # per-token time (B, S)
        te = sinusoidal_time_embedding(t.reshape(-1), a.shape[-1], min_period, max_period)
        te = te.reshape(*t.shape, -1).to(a.dtype)
    else:
        te = sinusoidal_time_embedding(t, a.shape[-1], min_period, max_period).to(a.dtype)
        te = te[:, None, :].expand_as(a)
    at = model.action_time_mlp_in(torch.cat([a, te], dim=2))
    return model.action_time_mlp_out(F.silu(at))


def expert_self_layer(layer: Any, h: Tensor, pk: Tensor, pv: Tensor, pos: Tensor, mask: Tensor, *,
                      fused: bool = False, proj: Projections = EAGER) -> Tensor:
    """Expert self-attention over [prefix K/V; suffix K/V]. h (B, S, De); pk/pv (B, Hkv, P, D)."""
    attn = layer.self_attn
    q, k, v = _heads(attn, layer.input_layernorm(h).to(attn.q_proj.weight.dtype), proj)  # (B, H|Hkv, S, D)
    q, k = apply_rope(q, pos), apply_rope(k, pos)
    k = torch.cat([pk, k], dim=2)                                              # (B, Hkv, P + S, D)
    v = torch.cat([pv, v], dim=2)
    a, _ = attend(q, k, v, mask, fused=fused)
    return residual_mlp(layer, a, h, proj)


def expert_cross_kv(layer: Any, pk: Tensor, pv: Tensor, proj: Projections = EAGER) -> tuple[Tensor, Tensor]:
    """A cross-attention layer's K/V from the VLM's cached (post-RoPE) K/V through the expert's k/v_proj:
    (B, Hkv, P, D) each. They depend on the prefix only, not on x_t or t: a backend may compute them once per
    chunk instead of once per denoising step."""
    attn = layer.self_attn
    b, _, p, _ = pk.shape
    kin = pk.transpose(1, 2).reshape(b, p, -1).to(attn.k_proj.weight.dtype)    # (B, P, Hkv*D)
    vin = pv.transpose(1, 2).reshape(b, p, -1).to(attn.v_proj.weight.dtype)
    k = proj.linear(attn.k_proj, kin).view(b, p, -1, attn.head_dim).transpose(1, 2)  # (B, Hkv, P, D)
    v = proj.linear(attn.v_proj, vin).view(b, p, -1, attn.head_dim).transpose(1, 2)
    return k, v


def expert_cross_layer(layer: Any, h: Tensor, k: Tensor, v: Tensor, pos: Tensor, mask: Tensor, *,
                       fused: bool = False, proj: Projections = EAGER) -> Tensor:
    """Expert cross-attention to the prefix: h (B, S, De); k/v (B, Hkv, P, D) from :func:`expert_cross_kv`."""
    attn = layer.self_attn
    b, s, _ = h.shape
    x = layer.input_layernorm(h).to(attn.q_proj.weight.dtype)
    q = proj.q(attn, x).view(b, s, -1, attn.head_dim).transpose(1, 2)         # (B, H, S, D)
    q = apply_rope(q, pos)
    a, _ = attend(q, k, v, mask, fused=fused)
    return residual_mlp(layer, a, h, proj)
