"""The compiled backend: the eager reference's loops with their layer functions compiled by ``torch.compile``.

After gpt-fast (pytorch-labs): compile the per-step work over static shapes, keep the control flow in
Python. Here the unit compiled is one layer (:mod:`effvla_ros.core.smolvla.layers`: the VLM layer, the
expert's self- and cross-attention layers) and the whole full-frame vision encoder; the loops that call
them stay the policy's own (:meth:`SmolVLAPolicy.prefill_layers`, :meth:`SmolVLAPolicy.velocity`), so every
hook keeps its semantics on this backend: early exit cuts the prefill between layers, expert reuse decides
per layer between compiled calls, RTC guidance wraps the velocity in the shared integrator, pruning only
changes the prefix length.

Static shapes: the prefix is padded with masked tokens up to a multiple of ``prefix_bucket`` (exact: padding
tokens are masked for every query and key and take no position), so a change of the kept-token count
recompiles only when it crosses a bucket. Graphs are specialised per shape; inductor's FX graph cache on disk
makes a restart's compilation a cache lookup: it lives in ``$XDG_CACHE_HOME/effvla_ros/inductor`` (default
``~/.cache/...``, kept across reboots, unlike inductor's default under /tmp) unless ``TORCHINDUCTOR_CACHE_DIR``
is set.

Not on this backend: the Eventful partial encode runs eager (its changed-row count varies every frame);
VJP guidance (autograd through a compiled layer is not what this path is for) and attention probabilities
(training probes) are refused by the capabilities. Weights are switched to ``requires_grad=False`` (the
compiled graphs treat them as constants).
"""
from __future__ import annotations

import functools
import os
import types
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from effvla_ros.core.smolvla import layers as L  # noqa: N812
from effvla_ros.core.smolvla.policy import SmolVLAPolicy
from effvla_ros.core.stages import ExpertPlan, PrefixCache

from .base import Capabilities, observed
from .eager import EagerBackend


def compile_cache_dir() -> Path:
    """Where inductor's caches go (``TORCHINDUCTOR_CACHE_DIR`` if set, else under the user's cache directory)."""
    env = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "effvla_ros" / "inductor"


def _compile(fn: Any, device: torch.device) -> Any:
    # freezing: weights become constants (on CPU: oneDNN weight prepacking and fused epilogues)
    compiled = torch.compile(fn, dynamic=False, options={"freezing": device.type == "cpu"})

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        # FLOP counting watches the reference ops: compiled code hides them, and a compiled function called under
        # the counter recompiles each time until its limit leaves it eager for good (measured on an H200: the
        # compiled denoising loop ran at the eager speed after one counted step)
        return fn(*args, **kwargs) if observed() else compiled(*args, **kwargs)

    return call


class CompiledBackend(EagerBackend):
    caps = Capabilities("compiled", vjp=False, attention_probs=False)
    prefix_bucket = 16

    def __init__(self, policy: SmolVLAPolicy) -> None:
        super().__init__(policy)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(compile_cache_dir())  # compiled graphs survive restarts
        policy.weights.requires_grad_(False)
        n_graphs = 8 * (policy.arch.num_vlm_layers + policy.arch.n_expert_layers)
        for name in ("recompile_limit", "cache_size_limit"):  # one graph per layer and prefix bucket
            if getattr(torch._dynamo.config, name, n_graphs) < n_graphs:
                setattr(torch._dynamo.config, name, n_graphs)
        dev = policy.device
        self.ops = types.SimpleNamespace(
            siglip_layer=L.siglip_layer,  # the Eventful partial encode: eager (dynamic row count)
            vlm_layer=_compile(L.vlm_layer, dev),
            expert_self_layer=_compile(L.expert_self_layer, dev),
            expert_cross_layer=_compile(L.expert_cross_layer, dev),
            expert_cross_kv=L.expert_cross_kv,  # once per chunk
        )
        self._encode = _compile(policy.encode_pixels, dev)

    def encode(self, pixels: Tensor) -> Tensor:
        return self._encode(pixels)  # type: ignore[no-any-return]

    def begin_prefill(self, visual: Any, lang_tokens: Tensor, lang_mask: Tensor, state: Tensor) -> PrefixCache:
        return self.policy.begin_prefill(visual, lang_tokens, lang_mask, state, pad_multiple=self.prefix_bucket)

    def prefill(self, cache: PrefixCache, start: int, stop: int) -> None:
        self.policy.prefill_layers(cache, start, stop, ops=self.ops)

    def velocity(self, cache: PrefixCache, x_t: Tensor, t: Tensor, *, step: int = -1,
                 plan: ExpertPlan | None = None) -> Tensor:
        return self.policy.velocity(cache, x_t, t, step=step, plan=plan, ops=self.ops)
