"""The eager reference backend: :class:`~effvla_ros.core.smolvla.policy.SmolVLAPolicy`'s layer loops.

Every capability, LeRobot 0.6.1's numerics (golden files). Other backends are tested against it.
"""
from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from effvla_ros.core.compression.eventful import EventfulVisionEncoder
from effvla_ros.core.smolvla.policy import SmolVLAPolicy
from effvla_ros.core.stages import ExpertPlan, PrefixCache, VisualTokens

from .base import Capabilities


class EagerBackend:
    caps = Capabilities("eager")

    def __init__(self, policy: SmolVLAPolicy) -> None:
        self.policy = policy
        self._eventful: EventfulVisionEncoder | None = None

    def encode(self, pixels: Tensor) -> Tensor:
        return self.policy.encode_pixels(pixels)

    def eventful_encoder(self) -> EventfulVisionEncoder:
        if self._eventful is None:
            self._eventful = EventfulVisionEncoder(self.policy.weights.vision, self.policy.weights.connector)
        return self._eventful

    def begin_prefill(self, visual: Mapping[str, VisualTokens | Tensor], lang_tokens: Tensor, lang_mask: Tensor,
                      state: Tensor) -> PrefixCache:
        return self.policy.begin_prefill(visual, lang_tokens, lang_mask, state)

    def prefill(self, cache: PrefixCache, start: int, stop: int) -> None:
        self.policy.prefill_layers(cache, start, stop)

    def velocity(self, cache: PrefixCache, x_t: Tensor, t: Tensor, *, step: int = -1,
                 plan: ExpertPlan | None = None) -> Tensor:
        return self.policy.velocity(cache, x_t, t, step=step, plan=plan)
