"""Training-free visual token pruning for the VLM prefix.

``task`` — task relevance after LightVLA (Jiang et al., "The Better You Learn, The Smarter You
Prune: Towards Efficient Vision-language-action Models via Differentiable Token Pruning",
arXiv 2509.12594), parameter-free query selection: with weightless RMSNorm on the N visual tokens
P (N, d) and the task tokens T (M, d) (instruction embeddings, optionally the state token), each
visual token becomes a query by attending to the task tokens,
``Q = RMSNorm(softmax(P T^T / sqrt(d)) T)``, and scores every visual token,
``S = Q P^T / sqrt(d)`` (N x N). The ``adaptive`` mode keeps the union of each query's best token
(the count adapts to the scene, LightVLA's inference rule); the ``ratio`` mode keeps a fixed
fraction ranked by each token's best score over all queries (ties broken by vote count).

``coverage`` — a spatial guard: the token grid is split into ``regions x regions`` blocks and every
block keeps at least its best-scoring token, so no region of the image disappears.

``none`` keeps everything. Kept tokens keep their grid indices; the prefix places them at their
original positions semantics (masked = removed in SmolVLA, see the policy core).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from effvla_ros.core.params import ConfigBase, param


@dataclass
class PruningConfig(ConfigBase):
    """Token pruning settings (ROS parameters of the token compressor under ``pruning.``)."""

    method: str = param("task", choices=("task", "none"), description="pruning method: task relevance or none")
    mode: str = param("ratio", choices=("ratio", "adaptive"),
                      description="ratio: keep keep_ratio of the tokens; adaptive: LightVLA's union of each "
                                  "query's best token (count adapts to the scene)")
    keep_ratio: float = param(0.5, min=0.05, max=1.0, description="fraction of visual tokens kept (ratio mode)")
    min_tokens: int = param(4, min=1, max=4096, description="never keep fewer tokens per camera")
    coverage_regions: int = param(2, min=0, max=16,
                                  description="coverage guard: the grid is split in regions x regions blocks "
                                              "that each keep at least one token (0 = off)")


def _rms(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def relevance_scores(visual: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
    """LightVLA query-token scores S (N, N): row = query (from visual token i), column = candidate j."""
    p = _rms(visual.float())  # (N, d)
    t = _rms(task.float())  # (M, d)
    d = p.shape[-1]
    attn = torch.softmax(p @ t.T / math.sqrt(d), dim=-1)  # (N, M)
    q = _rms(attn @ t)  # (N, d)
    return q @ p.T / math.sqrt(d)  # (N, N)


@torch.no_grad()
def instruction_queries(policy: Any, text: str) -> torch.Tensor:
    """The task tokens T (M, d) of an instruction for :func:`relevance_scores`: its token embeddings (valid
    tokens only, fp32) from the policy's VLM embedding table, the space of the connector tokens."""
    ids, mask = policy.tokenize(text)
    emb = policy.weights.text.embed_tokens(ids)[0]  # (L, D)
    return emb[mask[0]].float()


def _coverage(keep: torch.Tensor, token_score: torch.Tensor, grid: tuple[int, int], regions: int) -> torch.Tensor:
    gh, gw = grid
    if regions <= 0:
        return keep
    rows = torch.arange(gh, device=keep.device).repeat_interleave(gw)
    cols = torch.arange(gw, device=keep.device).repeat(gh)
    region = (rows * regions // gh) * regions + (cols * regions // gw)
    keep = keep.clone()
    for r in torch.unique(region).tolist():
        members = (region == r).nonzero().flatten()
        if not keep[members].any():
            keep[members[token_score[members].argmax()]] = True
    return keep


def select_tokens(
    visual: torch.Tensor,
    task: torch.Tensor | None,
    grid: tuple[int, int],
    cfg: PruningConfig,
) -> torch.Tensor:
    """Indices (ascending, int64) of the visual tokens to keep for one camera.

    visual: (N, d) connector tokens of one camera (N = grid h x w); task: (M, d) task-token
    embeddings in the same space (None: no instruction yet -> keep everything).
    """
    n = visual.shape[0]
    if n != grid[0] * grid[1]:
        raise ValueError(f"grid: {grid} does not match {n} tokens")
    if cfg.method == "none" or task is None or task.shape[0] == 0 or n <= cfg.min_tokens:
        return torch.arange(n, device=visual.device)
    s = relevance_scores(visual, task.to(visual.device))  # (N, N)
    best = s.argmax(dim=1)  # each query's best token
    votes = torch.bincount(best, minlength=n).float()
    token_score = s.max(dim=0).values  # best score any query gives token j
    keep = torch.zeros(n, dtype=torch.bool, device=visual.device)
    if cfg.mode == "adaptive":
        keep[best] = True
    else:
        k = max(cfg.min_tokens, int(round(cfg.keep_ratio * n)))
        rank = token_score + 1e-3 * votes  # votes only break near-ties
        keep[torch.topk(rank, min(k, n)).indices] = True
    if int(keep.sum()) < cfg.min_tokens:
        keep[torch.topk(token_score, cfg.min_tokens).indices] = True
    keep = _coverage(keep, token_score, grid, cfg.coverage_regions)
    return keep.nonzero().flatten()


def token_scores_batch(visual: torch.Tensor, task: torch.Tensor, task_mask: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`relevance_scores` for a batch, reduced as the selection uses them: (token_score (B, N), each
    token's best score over all queries; best (B, N), each query's best token). visual (B, N, d); task (B, M, d)
    zero-padded with task_mask (B, M) bool. Differentiable in ``visual`` and ``task`` (training-only relevance
    alignment, :mod:`effvla_ros.train.relevance`)."""
    p = _rms(visual.float())  # (B, N, d)
    t = _rms(task.float())  # (B, M, d)
    d = p.shape[-1]
    logits = (p @ t.transpose(1, 2) / math.sqrt(d)).masked_fill(~task_mask[:, None, :], float("-inf"))
    attn = torch.nan_to_num(torch.softmax(logits, dim=-1))  # (B, N, M); a row without task: 0
    q = _rms(attn @ t)  # (B, N, d)
    s = q @ p.transpose(1, 2) / math.sqrt(d)  # (B, N, N): row = query i, column = candidate j
    return s.max(dim=1).values, s.argmax(dim=2)


def keep_mask_batch(
    visual: torch.Tensor,
    task: torch.Tensor,
    task_mask: torch.Tensor,
    grid: tuple[int, int],
    cfg: PruningConfig,
) -> torch.Tensor:
    """:func:`select_tokens` for a batch, as a keep mask (B, N) bool, in a fixed number of tensor operations
    (pruning-aware training on a GPU: no per-sample loop, no wait for the device).

    visual: (B, N, d) connector tokens of one camera; task: (B, M, d) task-token embeddings, zero-padded,
    with task_mask (B, M) bool marking the valid ones (a row without any keeps every token).
    """
    b, n, _ = visual.shape
    if n != grid[0] * grid[1]:
        raise ValueError(f"grid: {grid} does not match {n} tokens")
    dev = visual.device
    has_task = task_mask.any(dim=1)  # (B,)
    if cfg.method == "none" or n <= cfg.min_tokens or task.shape[1] == 0:
        return torch.ones((b, n), dtype=torch.bool, device=dev)
    token_score, best = token_scores_batch(visual, task.to(dev), task_mask.to(dev))
    votes = torch.zeros((b, n), device=dev).scatter_add_(1, best, torch.ones((b, n), device=dev))
    keep = torch.zeros((b, n), dtype=torch.bool, device=dev)
    if cfg.mode == "adaptive":
        keep.scatter_(1, best, True)
    else:
        k = max(cfg.min_tokens, int(round(cfg.keep_ratio * n)))
        keep.scatter_(1, torch.topk(token_score + 1e-3 * votes, min(k, n), dim=1).indices, True)
    short = keep.sum(dim=1) < cfg.min_tokens  # (B,)
    extra = torch.zeros_like(keep).scatter_(1, torch.topk(token_score, cfg.min_tokens, dim=1).indices, True)
    keep |= extra & short[:, None]
    if cfg.coverage_regions > 0:
        gh, gw = grid
        rows = torch.arange(gh, device=dev).repeat_interleave(gw)
        cols = torch.arange(gw, device=dev).repeat(gh)
        region = (rows * cfg.coverage_regions // gh) * cfg.coverage_regions + (cols * cfg.coverage_regions // gw)
        for r in torch.unique(region).tolist():
            members = region == r  # (N,)
            empty = ~(keep & members).any(dim=1)  # (B,)
            top = token_score.masked_fill(~members, float("-inf")).argmax(dim=1)  # (B,)
            keep[torch.arange(b, device=dev)[empty], top[empty]] = True
    return keep | ~has_task[:, None]
