"""Stateless tensor functions of SmolVLA, written to match LeRobot 0.6.1 numerically.

Layouts: B batch, L / Lq / Lk sequence lengths, H attention heads, Hkv key/value heads, D head dim.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

ROPE_BASE = 10_000  # SmolVLA's RoPE base (the VLM config's rope_theta is NOT used)


def apply_rope(x: Tensor, positions: Tensor, base: float = ROPE_BASE) -> Tensor:
    """Split-half rotary embedding computed in fp32, result in x's dtype.

    x: (B, H, L, D); positions: (B, L) integer. Frequencies: base ** (2i / D), i < D/2; the angle is
    position / timescale (a division, as LeRobot computes it).
    """
    dtype = x.dtype
    d_half = x.shape[-1] // 2
    xf = x.float()
    exponents = (2.0 / x.shape[-1]) * torch.arange(d_half, dtype=torch.float32, device=x.device)
    timescale = base ** exponents                                            # (D/2,)
    radians = positions[..., None].float() / timescale[None, None, :]        # (B, L, D/2)
    radians = radians[:, None]                                               # (B, 1, L, D/2)
    sin, cos = torch.sin(radians), torch.cos(radians)
    x1, x2 = xf[..., :d_half], xf[..., d_half:]
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(dtype)


def eager_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, *, return_probs: bool = False
                    ) -> tuple[Tensor, Tensor | None]:
    """Grouped-query attention with Q, K upcast to fp32 and an fp32 softmax (LeRobot's eager path).

    q: (B, H, Lq, D); k, v: (B, Hkv, Lk, D); mask: (B, Lq, Lk) bool (True = may attend).
    Returns (B, Lq, H*D) in v's dtype, and the (B, H, Lq, Lk) fp32 probabilities if asked.
    A fully masked row gets uniform weights (every logit equals finfo.min), as in LeRobot.
    """
    b, h, lq, d = q.shape
    groups = h // k.shape[1]
    if groups > 1:  # head j uses key/value head j // groups
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * (d ** -0.5)   # (B, H, Lq, Lk)
    logits = torch.where(mask[:, None], logits, torch.finfo(torch.float32).min)
    probs = F.softmax(logits, dim=-1)
    out = torch.matmul(probs.to(v.dtype), v)                                  # (B, H, Lq, D)
    out = out.transpose(1, 2).reshape(b, lq, h * d)
    return out, (probs if return_probs else None)


def fused_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """:func:`eager_attention` through torch's fused ``scaled_dot_product_attention``.

    Same inputs, output and semantics: fp32 logits and softmax (q, k, v upcast), a fully masked row gets
    uniform weights (the mask is an additive fp32 bias of ``finfo.min``, not a boolean mask, whose fully
    masked rows would give NaN). Differs from the eager path only in summation order (about 1e-6 in fp32),
    and in one gradient: through a fully masked row, ``where`` gives q and k none, the bias does. In the
    policy such rows are padded tokens, which no token attends to, so they receive no gradient either way.
    No probabilities. A training step of the ``so101`` recipe takes 0.87 of the eager step time on this
    CPU (``benchmarks/bench_train_step.py``); at inference (``RuntimeConfig.attention``) this CPU showed no
    measurable gain (docs/benchmarks.md).
    """
    b, h, lq, d = q.shape
    bias = torch.zeros(mask.shape, dtype=torch.float32, device=q.device)
    bias = bias.masked_fill(~mask, torch.finfo(torch.float32).min)[:, None]   # (B, 1, Lq, Lk)
    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=bias,
                                         enable_gqa=h != k.shape[1])          # (B, H, Lq, D)
    return out.to(v.dtype).transpose(1, 2).reshape(b, lq, h * d)


def make_att_2d_masks(pad_masks: Tensor, att_masks: Tensor) -> Tensor:
    """big_vision prefix-LM masks: token i attends to valid j with cumsum(att)[j] <= cumsum(att)[i].

    pad_masks, att_masks: (B, L) -> (B, L, L) bool.
    """
    cumsum = torch.cumsum(att_masks.long(), dim=1)
    allowed = cumsum[:, None, :] <= cumsum[:, :, None]
    valid = pad_masks[:, None, :] & pad_masks[:, :, None]
    return allowed & valid


def sinusoidal_time_embedding(t: Tensor, dim: int, min_period: float, max_period: float) -> Tensor:
    """Sine-cosine embedding of flow time t (B,) -> (B, dim), computed in float64 (float32 on MPS)."""
    dtype = torch.float32 if t.device.type == "mps" else torch.float64
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=dtype, device=t.device)
    period = min_period * (max_period / min_period) ** fraction
    angle = (1.0 / period * 2 * math.pi)[None, :] * t[:, None]
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=1)


def resize_with_pad(img: Tensor, height: int, width: int, pad_value: float = 0.0) -> Tensor:
    """Aspect-preserving bilinear resize of (B, C, h, w) into (height, width), padding LEFT and TOP."""
    cur_h, cur_w = img.shape[2:]
    if cur_h == height and cur_w == width:
        return img
    ratio = max(cur_w / width, cur_h / height)
    new_h, new_w = int(cur_h / ratio), int(cur_w / ratio)
    resized = F.interpolate(img, size=(new_h, new_w), mode="bilinear", align_corners=False)
    return F.pad(resized, (max(0, width - new_w), 0, max(0, height - new_h), 0), value=pad_value)


def pad_last_dim(x: Tensor, size: int) -> Tensor:
    """Zero-pad the last dimension up to ``size`` (unchanged when already >= size)."""
    if x.shape[-1] >= size:
        return x
    return F.pad(x, (0, size - x.shape[-1]))
