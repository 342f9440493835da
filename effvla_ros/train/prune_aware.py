"""Pruning-aware training: train on the prefix the runtime's token pruning will produce.

The token compressor prunes visual tokens at inference with a training-free rule
(:func:`effvla_ros.core.compression.pruning.select_tokens`: LightVLA's parameter-free task-relevance
queries, plus the coverage guard). A policy trained only on full prefixes has never seen a pruned one:
measured on the bundled checkpoints, pruning half the tokens took closed-loop success from 7/50 to 0/50
(9000 steps), from 16/50 to 0/50 (18000 steps) and from 36/50 to 0/50 (the current one, 2600 demos).
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
checkpoint of that recipe trained without it; too few successes to conclude.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from effvla_ros.core.compression.pruning import PruningConfig, instruction_queries, keep_mask_batch
from effvla_ros.core.smolvla.policy import VisualTokens


def task_embeddings(policy: Any, tasks: Sequence[str]) -> list[torch.Tensor]:
    """Per instruction: the compressor's relevance query set (:func:`instruction_queries`), each distinct
    instruction computed once."""
    out = {text: instruction_queries(policy, text) for text in dict.fromkeys(tasks)}
    return [out[t] for t in tasks]


def pruned_visual_tokens(policy: Any, tokens: Mapping[str, torch.Tensor], grid: tuple[int, int],
                         tasks: Sequence[str], apply: torch.Tensor, cfg: PruningConfig
                         ) -> dict[str, VisualTokens]:
    """camera -> :class:`VisualTokens` whose mask keeps, for the samples where ``apply`` (B,) is True, only the
    tokens the runtime pruning (``cfg``) selects for that sample's image and instruction; the other samples
    keep every token. ``tokens``: camera -> (B, N, D) connector tokens (the gradient flows through them).
    The selections of a batch are made together (:func:`keep_mask_batch`, equal to the runtime's per-image
    :func:`select_tokens`)."""
    idx = torch.nonzero(apply.cpu()).flatten()
    out: dict[str, VisualTokens] = {}
    task_emb = task_mask = None
    if len(idx):  # the instructions' token embeddings, padded: instruction_queries of each, in one call
        ids, lmask = policy.tokenize([tasks[int(i)] for i in idx])
        with torch.no_grad():
            task_emb = policy.weights.text.embed_tokens(ids).float()  # (B', L, D)
        task_mask = lmask.bool()  # (B', L)
    for cam, tok in tokens.items():
        b, n, _ = tok.shape
        mask = torch.ones((b, n), dtype=torch.bool, device=tok.device)
        if task_emb is not None and task_mask is not None:
            mask[idx.to(tok.device)] = keep_mask_batch(tok[idx.to(tok.device)].detach(), task_emb, task_mask, grid, cfg)
        out[cam] = VisualTokens(tok, mask=mask)
    return out
