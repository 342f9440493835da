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

import functools
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
    """LightVLA query-token scores S (N, N) of one camera: row = query (from visual token i), column =
    candidate j. visual (N, d), task (M, d); :func:`relevance_scores_batch` for a batch of one."""
    ones = torch.ones((1, task.shape[0]), dtype=torch.bool, device=visual.device)
    return relevance_scores_batch(visual[None], task[None].to(visual.device), ones)[0]


def relevance_scores_batch(visual: torch.Tensor, task: torch.Tensor, task_mask: torch.Tensor) -> torch.Tensor:
    """S (B, N, N) for a batch (module docstring): visual (B, N, d); task (B, M, d) zero-padded, valid where
    task_mask (B, M) bool (a row without any task token scores 0 everywhere). Differentiable."""
    p = _rms(visual.float())  # (B, N, d)
    t = _rms(task.float())  # (B, M, d)
    d = p.shape[-1]
    logits = (p @ t.transpose(1, 2) / math.sqrt(d)).masked_fill(~task_mask[:, None, :], float("-inf"))
    attn = torch.nan_to_num(torch.softmax(logits, dim=-1))  # (B, N, M); a row without task: 0
    q = _rms(attn @ t)  # (B, N, d)
    return q @ p.transpose(1, 2) / math.sqrt(d)  # (B, N, N): row = query i, column = candidate j


@torch.no_grad()
def instruction_queries(policy: Any, text: str) -> torch.Tensor:
    """The task tokens T (M, d) of an instruction for :func:`relevance_scores`: its token embeddings (valid
    tokens only, fp32) from the policy's VLM embedding table, the space of the connector tokens."""
    ids, mask = policy.tokenize(text)
    emb = policy.weights.text.embed_tokens(ids)[0]  # (L, D)
    return emb[mask[0]].float()


@functools.lru_cache(maxsize=32)
def _blocks(grid: tuple[int, int], regions: int, device: torch.device) -> torch.Tensor:
    """(regions^2, N) bool: which tokens of the row-major grid lie in each block of the coverage guard."""
    gh, gw = grid
    rows = torch.arange(gh, device=device).repeat_interleave(gw)
    cols = torch.arange(gw, device=device).repeat(gh)
    block = (rows * regions // gh) * regions + (cols * regions // gw)  # (N,)
    return block[None, :] == torch.arange(regions * regions, device=device)[:, None]


def select_tokens(
    visual: torch.Tensor,
    task: torch.Tensor | None,
    grid: tuple[int, int],
    cfg: PruningConfig,
) -> torch.Tensor:
    """Indices (ascending, int64) of the visual tokens to keep for one camera: :func:`keep_mask_batch` for a
    batch of one (the token compressor's call; the rule is written once, there).

    visual: (N, d) connector tokens of one camera (N = grid h x w); task: (M, d) task-token
    embeddings in the same space (None: no instruction yet -> keep everything).
    """
    n = visual.shape[0]
    if n != grid[0] * grid[1]:
        raise ValueError(f"grid: {grid} does not match {n} tokens")
    if task is None or task.shape[0] == 0:
        return torch.arange(n, device=visual.device)
    task_mask = torch.ones((1, task.shape[0]), dtype=torch.bool, device=visual.device)
    keep = keep_mask_batch(visual[None], task[None].to(visual.device), task_mask, grid, cfg)[0]  # (N,)
    return keep.nonzero().flatten()


def token_scores_batch(visual: torch.Tensor, task: torch.Tensor, task_mask: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`relevance_scores_batch` reduced as the selection uses them: (token_score (B, N), each token's best
    score over all queries; best (B, N), each query's best token). Differentiable in ``visual`` and ``task``
    (training-only relevance alignment, :mod:`effvla_ros.train.relevance`)."""
    s = relevance_scores_batch(visual, task, task_mask)  # (B, N, N)
    return s.max(dim=1).values, s.argmax(dim=2)


def keep_mask_batch(
    visual: torch.Tensor,
    task: torch.Tensor,
    task_mask: torch.Tensor,
    grid: tuple[int, int],
    cfg: PruningConfig,
) -> torch.Tensor:
    """The selection rule (module docstring) for a batch, as a keep mask (B, N) bool, in a fixed number of
    tensor operations: the runtime's :func:`select_tokens` is this with B = 1, pruning-aware training calls it
    on whole batches (no per-sample loop, no wait for a GPU).

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
    if cfg.coverage_regions > 0:  # every block of the grid keeps at least its best-scoring token
        members = _blocks(grid, cfg.coverage_regions, dev)  # (R, N)
        top = token_score[:, None, :].masked_fill(~members, float("-inf")).argmax(dim=2)  # (B, R)
        empty = ~(keep[:, None, :] & members).any(dim=2) & members.any(dim=1)  # (B, R)
        keep |= torch.zeros((b, n), device=dev).scatter_add_(1, top, empty.float()) > 0  # (a block without tokens adds 0)
    return keep | ~has_task[:, None]
