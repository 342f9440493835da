"""The stage seam: what a runtime of SmolVLA's three stages provides, and what it declares it can do.

A backend runs the model's math; it makes no decision. The efficiency techniques are written once, in the
core, against this protocol:

* token compressor (:mod:`effvla_ros.core.compression.compressor`): ``encode`` per camera image; patch-level
  temporal reuse through ``eventful_encoder`` where ``caps.partial_encode``;
* runner (:mod:`effvla_ros.core.runner`): ``begin_prefill`` then ``prefill`` in layer segments, VLM early exit
  deciding at the segment boundaries (``caps.exit_layers``); ``velocity`` once per denoising step inside the
  shared Euler integrator (:mod:`effvla_ros.core.flow`), with an :class:`~effvla_ros.core.stages.ExpertPlan`
  per step (expert feature reuse, ``caps.expert_plans``) and real-time chunking as the integrator's guide
  (VJP guidance needs ``caps.vjp``); a backend may instead run that same loop itself through an
  ``integrate(cache, noise, num_steps, rtc, target, mask)`` method (the CUDA-graph backend replays it).

A setting that needs a capability the backend lacks is refused when the runner or compressor is configured,
with the parameter named (:meth:`Capabilities.check`), never silently ignored.
"""
from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from torch import Tensor

from effvla_ros.core.stages import ExpertPlan, PrefixCache, VisualTokens

if TYPE_CHECKING:
    from effvla_ros.core.compression.eventful import EventfulVisionEncoder
    from effvla_ros.core.smolvla.policy import SmolVLAPolicy

BACKENDS: dict[str, str] = {  # backend name -> "module:class"
    "eager": "effvla_ros.core.backends.eager:EagerBackend",
    "compiled": "effvla_ros.core.backends.compiled:CompiledBackend",
    "packed": "effvla_ros.core.backends.packed:PackedBackend",
    "cudagraph": "effvla_ros.core.backends.graphs:GraphBackend",
    "cudagraph_compiled": "effvla_ros.core.backends.graphs:CompiledGraphBackend",
    "onnxruntime": "effvla_ros.core.backends.ort:OnnxRuntimeBackend",
    "tensorrt": "effvla_ros.core.backends.trt:TensorRTBackend",
}
#: backends that run the stage graphs of ``effvla export`` (they need its ``export_dir``)
EXPORTED_BACKENDS = ("onnxruntime", "tensorrt")


def observed() -> bool:
    """A dispatch mode watches the ops (``torch.utils.flop_counter.FlopCounterMode`` counting a stage's FLOPs).
    A compiled function or a graph replay would hide the ops from it (and a compiled function called under it
    recompiles, and past its recompile limit stays eager for good), so a backend then runs the reference ops."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    return bool(_get_current_dispatch_mode_stack())


class CapabilityError(ValueError):
    """A setting the backend cannot apply; the message names the parameter."""


@dataclass(frozen=True)
class Capabilities:
    """What a backend supports. ``exit_layers``: layers after which its prefill can stop (None = after any);
    ``token_budgets``: the kept-token counts per camera it was built for (() = any); ``expert_plans``: its
    ``velocity`` honours an :class:`ExpertPlan`; ``partial_encode``: Eventful patch reuse; ``vjp``: autograd
    through ``velocity``; ``attention_probs``: attention probabilities on request (training probes);
    ``committed_prefix``: its denoising holds a committed prefix clean (training-time RTC, ``rtc.mode: trained``)."""

    name: str
    exit_layers: tuple[int, ...] | None = None
    token_budgets: tuple[int, ...] = ()
    expert_plans: bool = True
    partial_encode: bool = True
    vjp: bool = True
    attention_probs: bool = True
    committed_prefix: bool = True

    def check(self, *, early_exit: bool = False, expert_reuse: bool = False, patch_reuse: bool = False,
              vjp: bool = False, committed_prefix: bool = False) -> None:
        """Raise :class:`CapabilityError` naming the parameter of the first requested feature not supported."""
        wanted = [("early_exit.enabled", early_exit, self.exit_layers is None or bool(self.exit_layers)),
                  ("expert_reuse.enabled", expert_reuse, self.expert_plans),
                  ("reuse.patch_level", patch_reuse, self.partial_encode),
                  ("rtc.guidance", vjp, self.vjp),
                  ("rtc.mode", committed_prefix, self.committed_prefix)]
        for param, asked, supported in wanted:
            if asked and not supported:
                raise CapabilityError(f"{param}: not supported by the {self.name!r} backend")


class StageBackend(Protocol):
    """One runtime of the three stages (see the module docstring). ``policy`` holds what every backend shares:
    architecture, tokenizer, normalizer, device, and the weights it was built from."""

    caps: Capabilities
    policy: SmolVLAPolicy

    def encode(self, pixels: Tensor) -> Tensor:
        """Model-ready pixels (B, 3, S, S) in [-1, 1] of one camera -> connector tokens (B, N, D_vlm)."""
        ...

    def eventful_encoder(self) -> EventfulVisionEncoder:
        """The patch-reuse encoder over the same weights (only where ``caps.partial_encode``)."""
        ...

    def begin_prefill(self, visual: Mapping[str, VisualTokens | Tensor], lang_tokens: Tensor, lang_mask: Tensor,
                      state: Tensor) -> PrefixCache:
        """The prefix's embeddings and masks; no layer computed."""
        ...

    def prefill(self, cache: PrefixCache, start: int, stop: int) -> None:
        """Run VLM layers [start, stop) on ``cache.hidden``, appending their K/V to ``cache``."""
        ...

    def velocity(self, cache: PrefixCache, x_t: Tensor, t: Tensor, *, step: int = -1,
                 plan: ExpertPlan | None = None) -> Tensor:
        """One expert evaluation: x_t (B, S, A) fp32, t (B,) or per token (B, S) -> v (B, S, A) fp32."""
        ...


def make_backend(name: str, policy: SmolVLAPolicy, *, export_dir: str | None = None,
                 target: str | None = None) -> StageBackend:
    """The backend called ``name`` (one of :data:`BACKENDS`) over ``policy``'s weights; the exported ones
    (:data:`EXPORTED_BACKENDS`) run the graphs in ``export_dir`` (TensorRT: the engines built for ``target``)."""
    if name not in BACKENDS:
        raise CapabilityError(f"backend: {name!r} is not one of {sorted(BACKENDS)}")
    module, cls = BACKENDS[name].split(":")
    factory = getattr(importlib.import_module(module), cls)
    if name == "tensorrt":
        return factory(policy, export_dir=export_dir, target=target)  # type: ignore[no-any-return]
    if name in EXPORTED_BACKENDS:
        return factory(policy, export_dir=export_dir)  # type: ignore[no-any-return]
    backend: StageBackend = factory(policy)
    return backend
