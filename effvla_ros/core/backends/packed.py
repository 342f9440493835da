"""The packed backend: the eager loops with every matmul on oneDNN weights packed once (x86 CPUs).

gpt-fast's "weights prepared once", for a CPU. At start every linear layer's weight is reordered into
oneDNN's blocked layout for the row counts it will see (``torch.ops.mkldnn._reorder_linear_weight``), and
the layers are regrouped so that fewer, larger matmuls run:

* Q, K and V of every attention layer in one matmul (their weights concatenated);
* gate and up of every Llama MLP in one matmul, then ``silu(gate) * up``;
* SigLIP's fc1 with its tanh-GELU fused into the matmul's epilogue (no separate pass over the 4x wider
  activation, which alone took ~3.8 ms per layer at 1024 tokens in bf16);
* biases added inside the matmul (``addmm`` first copies the bias into the output).

Measured on the 2-core AMX machine at real size in bf16 (docs/benchmarks.md): fused Q/K/V 1.04 ms against
~3 ms for three matmuls; a 50-row expert matmul on cold weights 0.227 ms against 0.316 ms.

The layer functions, the loops and so every hook are the reference's (:mod:`effvla_ros.core.smolvla.layers`
with these :class:`PackedProjections`); the Eventful partial encode runs on the same packed weights. Numerics:
fp32 within ~1e-6 relative of the reference (another summation order), bf16 the same kernels' rounding.
Weights are packed for the policy's dtypes at construction: build the backend again after ``apply_runtime``.
"""
from __future__ import annotations

import functools
import types
from typing import Any

import torch
from torch import Tensor, nn

from effvla_ros.core.compression.eventful import EventfulVisionEncoder
from effvla_ros.core.smolvla import layers as L  # noqa: N812
from effvla_ros.core.smolvla.policy import SmolVLAPolicy
from effvla_ros.core.stages import ExpertPlan, PrefixCache

from .base import Capabilities, CapabilityError
from .eager import EagerBackend

_MK = torch.ops.mkldnn


class _Packed:
    """One packed matmul: x (..., K) -> (..., N), optionally with a fused pointwise epilogue."""

    def __init__(self, weight: Tensor, bias: Tensor | None, rows: int, attr: str = "none", algorithm: str = "") -> None:
        self.weight = _MK._reorder_linear_weight(weight.detach().contiguous(), rows)
        self.bias = None if bias is None else bias.detach().contiguous()
        self.attr, self.algorithm = attr, algorithm
        self.out_features = int(weight.shape[0])

    def __call__(self, x: Tensor) -> Tensor:
        return _MK._linear_pointwise(x, self.weight, self.bias, self.attr, [], self.algorithm)


def _is_tanh_gelu(act: Any) -> bool:
    """transformers' ``gelu_pytorch_tanh`` activation (SigLIP's)."""
    return type(act).__name__ in ("PytorchGELUTanh", "GELUTanh") or (
        isinstance(act, nn.GELU) and act.approximate == "tanh")


class PackedProjections(L.Projections):
    """Pre-packed weights of every layer of a policy, applied through the :class:`~.layers.Projections` interface."""

    def __init__(self) -> None:
        self._qkv: dict[int, tuple[_Packed, tuple[int, int]]] = {}
        self._lin: dict[int, _Packed] = {}
        self._mlp: dict[int, tuple[str, _Packed, _Packed, Any]] = {}

    # -- preparation -----------------------------------------------------------------------------
    def add_attention(self, attn: Any, rows: int, *, qkv: bool = True) -> None:
        """Q/K/V fused (``qkv``; else Q alone, for cross-attention) and the output projection."""
        if qkv:
            mods = (attn.q_proj, attn.k_proj, attn.v_proj)
            biases = [m.bias for m in mods]
            bias = torch.cat(biases) if all(b is not None for b in biases) else None
            nq, nk = mods[0].out_features, mods[1].out_features
            self._qkv[id(attn)] = (_Packed(torch.cat([m.weight for m in mods]), bias, rows), (nq, nk))
        else:
            self.add_linear(attn.q_proj, rows)
        self.add_linear(attn.o_proj if hasattr(attn, "o_proj") else attn.out_proj, rows)

    def add_linear(self, mod: nn.Linear, rows: int) -> None:
        self._lin[id(mod)] = _Packed(mod.weight, mod.bias, rows)

    def add_mlp(self, mlp: Any, rows: int) -> None:
        if hasattr(mlp, "fc1"):  # SigLIP: fc2(act(fc1(x)))
            fuse = _is_tanh_gelu(mlp.activation_fn)
            fc1 = _Packed(mlp.fc1.weight, mlp.fc1.bias, rows, *(("gelu", "tanh") if fuse else ("none", "")))
            self._mlp[id(mlp)] = ("siglip", fc1, _Packed(mlp.fc2.weight, mlp.fc2.bias, rows),
                                  None if fuse else mlp.activation_fn)
        else:  # Llama: down(act(gate(x)) * up(x)), gate and up in one matmul
            gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
            self._mlp[id(mlp)] = ("llama", _Packed(gate_up, None, rows), _Packed(mlp.down_proj.weight, None, rows),
                                  mlp.act_fn)

    # -- Projections -----------------------------------------------------------------------------
    def qkv(self, attn: Any, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        packed = self._qkv.get(id(attn))
        if packed is None:
            return super().qkv(attn, x)
        mm, (nq, nk) = packed
        out = mm(x)
        return out[..., :nq], out[..., nq:nq + nk], out[..., nq + nk:]

    def q(self, attn: Any, x: Tensor) -> Tensor:
        return self.linear(attn.q_proj, x)

    def linear(self, module: Any, x: Tensor) -> Tensor:
        mm = self._lin.get(id(module))
        return module(x) if mm is None else mm(x)

    def mlp(self, mlp: Any, x: Tensor) -> Tensor:
        packed = self._mlp.get(id(mlp))
        if packed is None:
            return super().mlp(mlp, x)
        kind, first, second, act = packed
        h = first(x)
        if kind == "siglip":
            return second(h if act is None else act(h))
        gate, up = h.chunk(2, dim=-1)
        return second(act(gate) * up)


def pack_policy(policy: SmolVLAPolicy) -> PackedProjections:
    """Pack every layer of ``policy`` for the row counts it sees: 1024 vision patches per camera, the prefix, the
    chunk."""
    arch = policy.arch
    proj = PackedProjections()
    n_patches = arch.patches_per_side ** 2
    for layer in policy.weights.vision.encoder.layers:
        proj.add_attention(layer.self_attn, n_patches)
        proj.add_mlp(layer.mlp, n_patches)
    prefix = 2 * arch.tokens_per_camera + arch.tokenizer_max_length + 1
    for layer in policy.weights.text.layers:
        proj.add_attention(layer.self_attn, prefix)
        proj.add_mlp(layer.mlp, prefix)
    expert_layers = policy.weights.expert.layers
    for i, ei in enumerate(policy.expert_layer_map()):
        if ei is None:
            continue
        layer = expert_layers[ei]
        cross = arch.is_cross_attn_layer(i)
        proj.add_attention(layer.self_attn, arch.chunk_size, qkv=not cross)
        if cross:  # K/V of the prefix, once per chunk
            proj.add_linear(layer.self_attn.k_proj, prefix)
            proj.add_linear(layer.self_attn.v_proj, prefix)
        proj.add_mlp(layer.mlp, arch.chunk_size)
    return proj


class PackedBackend(EagerBackend):
    caps = Capabilities("packed", vjp=False)  # the oneDNN packed matmul has no usable backward (VJP guidance)

    def __init__(self, policy: SmolVLAPolicy) -> None:
        if policy.device.type != "cpu" or not torch.backends.mkldnn.is_available():
            raise CapabilityError(f"backend: 'packed' needs a CPU with oneDNN (mkldnn); the policy runs on "
                                  f"{policy.device} (use eager or compiled)")
        super().__init__(policy)
        with torch.no_grad():
            self.proj = pack_policy(policy)
        p = self.proj
        self.ops = types.SimpleNamespace(
            siglip_layer=functools.partial(L.siglip_layer, proj=p),
            vlm_layer=functools.partial(L.vlm_layer, proj=p),
            expert_self_layer=functools.partial(L.expert_self_layer, proj=p),
            expert_cross_layer=functools.partial(L.expert_cross_layer, proj=p),
            expert_cross_kv=functools.partial(L.expert_cross_kv, proj=p),
        )

    def encode(self, pixels: Tensor) -> Tensor:
        return self.policy.encode_pixels(pixels, ops=self.ops)

    def eventful_encoder(self) -> EventfulVisionEncoder:
        if self._eventful is None:
            self._eventful = EventfulVisionEncoder(self.policy.weights.vision, self.policy.weights.connector,
                                                   proj=self.proj)
        return self._eventful

    def prefill(self, cache: PrefixCache, start: int, stop: int) -> None:
        self.policy.prefill_layers(cache, start, stop, ops=self.ops)

    def velocity(self, cache: PrefixCache, x_t: Tensor, t: Tensor, *, step: int = -1,
                 plan: ExpertPlan | None = None) -> Tensor:
        return self.policy.velocity(cache, x_t, t, step=step, plan=plan, ops=self.ops)


__all__ = ["PackedBackend", "PackedProjections", "pack_policy"]
