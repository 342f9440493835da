"""The training objective: LeRobot's flow-matching loss, masked on padded chunk steps (ROS-free).

* :func:`masked_flow_loss` - the mean of a per-element loss over the real action dimensions of the chunk
  steps that are not padding;
* :func:`masked_loss` - :meth:`SmolVLAPolicy.flow_matching_loss` masked so (the plain training step);
* :func:`flow_pass` - the same forward pass opened at its stages (the policy's public ``tokenize`` ->
  ``encode_images`` -> ``prefill`` -> ``velocity``), for the training-only losses that read its
  intermediates (the connector tokens, the language embeddings, a VLM layer's hidden state) and for
  pruning-aware training, which replaces the visual tokens the prefix gets
  (:mod:`effvla_ros.train.grounding`, :mod:`effvla_ros.train.relevance`, :mod:`effvla_ros.train.prune_aware`).
  With neither pruning nor a layer callback its loss is :func:`masked_loss`'s (``test/test_train_loop.py``).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from effvla_ros.core.compression.pruning import PruningConfig
from effvla_ros.core.smolvla import ImageEncoding, PrefillLayerInfo, PrefixCache, SmolVLAPolicy, VisualTokens
from effvla_ros.train.prune_aware import pruned_visual_tokens


def observation_of(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The observation part of a training batch (``observation.*`` and ``task``)."""
    return {k: v for k, v in batch.items() if k.startswith("observation.") or k == "task"}


def masked_flow_loss(per: torch.Tensor, action_is_pad: torch.Tensor, action_dim: int) -> torch.Tensor:
    """Mean of the per-element loss (B, S, max_action_dim) over the first ``action_dim`` dims of the chunk
    steps that are not padding (``action_is_pad`` (B, S))."""
    per = per[:, :, :action_dim]
    valid = (~action_is_pad).to(per.dtype)[:, :, None]
    return (per * valid).sum() / (valid.sum() * per.shape[-1]).clamp_min(1.0)


def masked_loss(policy: SmolVLAPolicy, batch: Mapping[str, Any], *, noise: torch.Tensor | None = None,
                t: torch.Tensor | None = None) -> torch.Tensor:
    """Mean flow-matching loss over the real action dimensions of the non-padded chunk steps (vision trained)."""
    per = policy.flow_matching_loss(observation_of(batch), batch["action"], noise=noise, t=t, train_vision=True)
    return masked_flow_loss(per, batch["action_is_pad"], policy.arch.action_dim)


@dataclass
class FlowPass:
    """One flow-matching forward pass (:func:`flow_pass`) and the intermediates the auxiliary losses read."""

    loss: torch.Tensor                              # 0-d masked flow-matching loss, as masked_loss
    encoding: ImageEncoding                         # connector tokens per camera (B, N, D), with their gradient
    visual: dict[str, VisualTokens | torch.Tensor]  # what the prefix got per camera (pruned: VisualTokens.mask)
    lang: torch.Tensor                              # (B, L) instruction tokens
    lang_mask: torch.Tensor                         # (B, L) bool
    lang_emb: torch.Tensor | None                   # (B, L, D) their token embeddings (with embed_language / pruning)
    cache: PrefixCache


def flow_pass(policy: SmolVLAPolicy, batch: Mapping[str, Any], *, noise: torch.Tensor | None = None,
              t: torch.Tensor | None = None, prune: tuple[PruningConfig, torch.Tensor] | None = None,
              embed_language: bool = False,
              layer_callback: Callable[[PrefillLayerInfo], None] | None = None) -> FlowPass:
    """The computation of :meth:`SmolVLAPolicy.flow_matching_loss` (vision trained) masked as :func:`masked_loss`,
    stage by stage through the policy's public methods.

    ``prune`` = (PruningConfig, apply (B,) bool): the samples where ``apply`` is set see only the visual tokens
    the runtime pruning keeps (:func:`~effvla_ros.train.prune_aware.pruned_visual_tokens`; its relevance
    queries are the instructions' token embeddings). ``embed_language``: also return those embeddings
    (``lang_emb``, with their gradient: the relevance alignment loss trains them). ``layer_callback`` is passed
    to :meth:`SmolVLAPolicy.prefill` (it reads a layer's hidden state; it must not stop the prefill)."""
    images, state, task = policy.split_observation(observation_of(batch))
    b = state.shape[0]
    x_t, u_t, t = policy.flow_training_sample(batch["action"], state, noise, t)
    lang, lmask = policy.language(batch, task, b)
    enc = policy.encode_images(images, grad=True)
    pruning = prune is not None and bool(prune[1].any())
    # the prefix embeds its language tokens itself; these feed the pruning's queries and the alignment loss
    emb = policy.weights.text.embed_tokens(lang) if pruning or embed_language else None  # (B, L, D)
    visual: dict[str, VisualTokens | torch.Tensor] = dict(enc.tokens)
    if prune is not None and pruning and emb is not None:
        visual = dict(pruned_visual_tokens(enc.tokens, enc.grid, emb, lmask, prune[1], prune[0]))
    cache = policy.prefill(visual, lang, lmask, policy.prepare_state(state), grad=True, layer_callback=layer_callback)
    v_t = policy.velocity(cache, x_t, t)
    loss = masked_flow_loss(F.mse_loss(u_t, v_t, reduction="none"), batch["action_is_pad"], policy.arch.action_dim)
    return FlowPass(loss, enc, visual, lang, lmask, emb, cache)
