"""Pruning-aware training: train on the prefix the runtime's token pruning will produce.

The token compressor prunes visual tokens at inference with a training-free rule
(:func:`effvla_ros.core.compression.pruning.select_tokens`: LightVLA's parameter-free task-relevance
queries, plus the coverage guard). A policy trained only on full prefixes has never seen a pruned one:
measured on the bundled checkpoints, pruning half the tokens took closed-loop success from 7/50 to 0/50
(9000 steps), from 16/50 to 0/50 (18000 steps) and from 36/50 to 0/50 (``rg``, 2600 demos).
LightVLA (Jiang et al., arXiv 2509.12594) learns its pruning *during* fine-tuning so that the policy
adapts to the reduced prefix. Here the selection stays the runtime's own rule, and a fraction of the
training samples is pruned with it, so the model learns to act from exactly the prefix it will get, and
the vision tower can learn to spread what matters over the tokens that survive.

For a pruned sample the dropped tokens are masked in the prefix (``VisualTokens.mask``: masked tokens
take no RoPE position and are not attended to), which equals removing them as the compressor does
(``test/test_train_prune_aware.py`` checks this on the policy's velocity). The relevance scores are
computed as :class:`~effvla_ros.core.compression.TokenCompressor` does (instruction token embeddings,
no gradient through the selection).

Measured (``effvla_ros/assets/so101_pickplace/README.md``): with half of the samples pruned, 4/50 and 2/50
closed-loop successes under ``pruning.keep_ratio=0.5`` in two runs (baselines 7/50), against 0/50 for the
checkpoint of that recipe trained without it. With the relevance alignment (:mod:`effvla_ros.train.relevance`)
on both cameras, fine-tuning the bundled checkpoint, ``effvla_ros/assets/so101_pickplace_pruned``: 81/100 under
the default compression and 81/100 with every optimization off (its README).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from effvla_ros.core.compression.pruning import PruningConfig, keep_mask_batch
from effvla_ros.core.smolvla import VisualTokens


def pruned_visual_tokens(tokens: Mapping[str, torch.Tensor], grid: tuple[int, int], task_emb: torch.Tensor,
                         task_mask: torch.Tensor, apply: torch.Tensor, cfg: PruningConfig) -> dict[str, VisualTokens]:
    """camera -> :class:`VisualTokens` whose mask keeps, for the samples where ``apply`` (B,) is True, only the
    tokens the runtime pruning (``cfg``) selects for that sample's image and instruction; the other samples
    keep every token. ``tokens``: camera -> (B, N, D) connector tokens (the gradient flows through them);
    ``task_emb`` (B, L, D) the instructions' token embeddings (the batch's tokenized instructions through the
    VLM's embedding table, as the compressor's :func:`~effvla_ros.core.compression.pruning.instruction_queries`),
    valid where ``task_mask`` (B, L) bool. The selections of a batch are made together
    (:func:`keep_mask_batch`, the rule the runtime's per-image ``select_tokens`` calls); no gradient flows
    through them."""
    idx = torch.nonzero(apply).flatten()
    out: dict[str, VisualTokens] = {}
    for cam, tok in tokens.items():
        b, n, _ = tok.shape
        mask = torch.ones((b, n), dtype=torch.bool, device=tok.device)
        if len(idx):
            i = idx.to(tok.device)
            mask[i] = keep_mask_batch(tok[i].detach(), task_emb[i].detach().float(), task_mask[i].bool(), grid, cfg)
        out[cam] = VisualTokens(tok, mask=mask)
    return out
