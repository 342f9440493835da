"""Patch-level temporal reuse inside the SmolVLM/SigLIP vision transformer.

After Eventful Transformers (M. Dutson, Y. Li, M. Gupta, "Eventful Transformers: Leveraging
Temporal Redundancy in Vision Transformers", ICCV 2023): per camera, the encoder keeps, for every
layer, the input tokens and the keys/values of the last computed frame. On a new frame only the
patches whose pixels changed ("events") are recomputed:

* patch embedding and position embedding of the changed patches only;
* in every layer, the changed tokens' queries/keys/values are recomputed (the cached keys/values of
  the others are reused), the changed tokens attend to ALL tokens, and only their attention output
  and MLP are computed; unchanged tokens keep their cached outputs;
* post-layernorm and the connector's projection only for the visual tokens whose 4x4 pixel-shuffle
  group contains a changed patch.

Compute therefore scales with the number of changed patches (FLOPs are counted on the operations
actually run). Unchanged tokens do not see the changed ones (their outputs are stale by that much);
a periodic full pass (keyframe) bounds that drift — the error against a full encode is reported by
``encode(..., reference=True)`` and by the compressor benchmark.

Inputs are model-ready pixels (after resize-with-pad and scaling to [-1, 1]) of one camera, batch 1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from effvla_ros.core.smolvla.layers import EAGER, Projections, siglip_layer


@dataclass
class _LayerCache:
    x_in: torch.Tensor  # (N, d) layer input
    k: torch.Tensor  # (1, H, N, hd)
    v: torch.Tensor  # (1, H, N, hd)


@dataclass
class EventfulState:
    layers: list[_LayerCache]
    final: torch.Tensor  # (N, d) encoder output before post-layernorm
    tokens: torch.Tensor  # (T, D) connector output
    grid: tuple[int, int]  # patch grid


class EventfulVisionEncoder:
    """Vision transformer + connector of SmolVLM, run layer by layer with per-token reuse."""

    def __init__(self, vision_model: Any, connector: Any, proj: Projections = EAGER) -> None:
        # transformers modules with dynamic attributes (SmolVLMVisionTransformer, SmolVLMConnector)
        self.proj = proj  # how the layers' weights are applied (a backend's pre-packed ones, or the modules')
        self.vm = vision_model
        self.connector = connector
        emb = vision_model.embeddings
        self.patch = int(emb.patch_size)
        self.side = int(emb.num_patches_per_side)
        self.scale_factor = int(connector.scale_factor)

    # ------------------------------------------------------------------ helpers
    def patch_grid(self, image: torch.Tensor) -> tuple[int, int]:
        h, w = image.shape[-2:]
        return h // self.patch, w // self.patch

    def _embed(self, pixels: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        """Patch + position embeddings of the patches ``idx`` (all when None): (n, d)."""
        emb = self.vm.embeddings
        conv = emb.patch_embedding
        gh, gw = self.patch_grid(pixels)
        if gh != self.side or gw != self.side:
            raise ValueError(f"image: expected {self.side * self.patch} px square model input, got {tuple(pixels.shape[-2:])}")
        if idx is None:
            x = conv(pixels.to(conv.weight.dtype)).flatten(2).transpose(1, 2)[0]  # (N, d)
            pos = torch.arange(gh * gw, device=pixels.device)
        else:
            p = self.patch
            cols = nn.functional.unfold(pixels.to(conv.weight.dtype), kernel_size=p, stride=p)[0].T  # (N, 3*p*p)
            w = conv.weight.reshape(conv.weight.shape[0], -1)  # (d, 3*p*p)
            x = nn.functional.linear(cols[idx], w, conv.bias)
            pos = idx
        return x + emb.position_embedding(pos)

    def _layer(self, layer: Any, x: torch.Tensor, cache: _LayerCache | None,
               idx: torch.Tensor | None, inplace: bool = False) -> tuple[torch.Tensor, _LayerCache]:
        """One encoder layer (:func:`~effvla_ros.core.smolvla.layers.siglip_layer`, the full encode's code). Full
        when idx is None, else only rows idx (x holds those rows; their queries attend to every token); ``inplace``:
        the rows are written into ``cache``'s tensors instead of copies of them."""
        if idx is None or cache is None:
            y, k, v = siglip_layer(layer, x[None], proj=self.proj)
            x_in = x
        else:
            y, k, v = siglip_layer(layer, x[None], rows=idx, cached_k=cache.k, cached_v=cache.v, proj=self.proj,
                                   inplace=inplace)
            x_in = cache.x_in if inplace else cache.x_in.clone()
            x_in.index_copy_(0, idx, x.to(x_in.dtype))
        return y[0], _LayerCache(x_in, k, v)

    def _connector_rows(self, final: torch.Tensor, grid: tuple[int, int], rows: torch.Tensor | None,
                        prev_tokens: torch.Tensor | None) -> torch.Tensor:
        normed = self.vm.post_layernorm(final)
        shuffled = self.connector.pixel_shuffle(normed[None], self.scale_factor)[0]  # (T, d*s^2)
        proj = self.connector.modality_projection
        if rows is None or prev_tokens is None:
            return proj(shuffled)
        tokens = prev_tokens.clone()
        tokens[rows] = proj(shuffled[rows])
        return tokens

    def _token_rows(self, patch_idx: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        gh, gw = grid
        s = self.scale_factor
        r, c = patch_idx // gw, patch_idx % gw
        return torch.unique((r // s) * (gw // s) + (c // s))

    # ------------------------------------------------------------------ API
    @torch.no_grad()
    def encode_full(self, pixels: torch.Tensor) -> tuple[torch.Tensor, EventfulState]:
        """Full pass; pixels (1, 3, S, S) model input. Returns tokens (T, D) and the new cache."""
        grid = self.patch_grid(pixels)
        x = self._embed(pixels, None)
        caches = []
        for layer in self.vm.encoder.layers:
            x, c = self._layer(layer, x, None, None)
            caches.append(c)
        tokens = self._connector_rows(x, grid, None, None)
        return tokens, EventfulState(caches, x, tokens, grid)

    @torch.no_grad()
    def encode_partial(self, pixels: torch.Tensor, changed: torch.Tensor, state: EventfulState,
                       inplace: bool = False) -> tuple[torch.Tensor, EventfulState, torch.Tensor]:
        """Recompute only the patches where ``changed`` (gh, gw) is True, reusing ``state``.

        Returns tokens (T, D), the updated cache and the indices of visual tokens recomputed. ``inplace``: the
        per-layer inputs, K/V and final states of ``state`` are updated in place and shared by the returned cache
        (``state`` is consumed: for a caller that keeps only the newest frame's cache, as the compressor does; it
        saves copying ~3 x N x d values per layer, which at real size cost as much as the recomputed rows at small
        changed fractions). The tokens are always a new tensor.
        """
        grid = self.patch_grid(pixels)
        if grid != state.grid or tuple(changed.shape) != grid:
            raise ValueError("changed mask / image do not match the cached state's grid")
        idx = changed.flatten().nonzero().flatten().to(pixels.device)
        if idx.numel() == 0:
            return state.tokens, state, torch.empty(0, dtype=torch.long)
        x = self._embed(pixels, idx)
        caches = []
        for layer, cache in zip(self.vm.encoder.layers, state.layers):
            x, c = self._layer(layer, x, cache, idx, inplace)
            caches.append(c)
        final = state.final if inplace else state.final.clone()
        final.index_copy_(0, idx, x.to(final.dtype))
        rows = self._token_rows(idx, grid)
        tokens = self._connector_rows(final, grid, rows, state.tokens)
        return tokens, EventfulState(caches, final, tokens, grid), rows


def dilate(changed: torch.Tensor, radius: int) -> torch.Tensor:
    """Grow a (gh, gw) bool mask by ``radius`` patches (context around moving objects)."""
    if radius <= 0:
        return changed
    k = 2 * radius + 1
    out = nn.functional.max_pool2d(changed[None, None].float(), kernel_size=k, stride=1, padding=radius)
    return out[0, 0] > 0


def full_encode_flops(num_patches: int, dim: int, mlp_dim: int, layers: int, patch: int, tokens: int,
                      token_in: int, token_out: int) -> int:
    """Analytic FLOPs (2 per multiply-add) of one full encode, for reporting when no counter ran."""
    emb = 2 * num_patches * (3 * patch * patch) * dim
    per_layer = 2 * num_patches * dim * dim * 4 + 2 * 2 * num_patches * num_patches * dim + 2 * 2 * num_patches * dim * mlp_dim
    conn = 2 * tokens * token_in * token_out
    return int(emb + layers * per_layer + conn)

