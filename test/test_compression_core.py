"""Compression core: task-relevance pruning (LightVLA), coverage guard, change detection."""
from __future__ import annotations

import math

import pytest
import torch

from effvla_ros.core.compression.change import ChangeDetector, patch_change
from effvla_ros.core.compression.pruning import PruningConfig, relevance_scores, select_tokens


def _tokens(seed: int, n: int = 64, d: int = 32) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def test_task_pruning_prefers_tokens_aligned_with_the_task() -> None:
    vis = _tokens(0)
    task_dir = torch.randn(32, generator=torch.Generator().manual_seed(9))
    # make tokens 5, 17, 40 strongly aligned with the instruction
    for i in (5, 17, 40):
        vis[i] = 4 * task_dir + 0.1 * vis[i]
    task = torch.stack([task_dir, task_dir + 0.05 * torch.randn(32, generator=torch.Generator().manual_seed(3))])
    cfg = PruningConfig(method="task", mode="ratio", keep_ratio=0.25, coverage_regions=0, min_tokens=1)
    kept = select_tokens(vis, task, (8, 8), cfg)
    assert len(kept) == 16
    assert {5, 17, 40} <= set(kept.tolist())
    assert torch.all(kept[1:] > kept[:-1])  # ascending, unique


def _reference_scores(vis: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
    """LightVLA's parameter-free queries written out token by token (the module docstring's formula)."""
    def rms(x: torch.Tensor) -> torch.Tensor:
        return x / torch.sqrt((x * x).mean() + 1e-6)

    d = vis.shape[1]
    p = [rms(v) for v in vis]
    t = [rms(x) for x in task]
    s = torch.zeros(len(p), len(p))
    for i, pi in enumerate(p):
        w = torch.softmax(torch.stack([torch.dot(pi, tj) / math.sqrt(d) for tj in t]), 0)
        q = rms(sum(wj * tj for wj, tj in zip(w, t, strict=True)))
        for j, pj in enumerate(p):
            s[i, j] = torch.dot(q, pj) / math.sqrt(d)
    return s


def _reference_select(vis: torch.Tensor, task: torch.Tensor, grid: tuple[int, int], cfg: PruningConfig) -> list[int]:
    """The selection rule in plain Python: top-k by best score (votes break near-ties) or the union of each
    query's best token, at least min_tokens, then every coverage block keeps its best token."""
    n = vis.shape[0]
    s = _reference_scores(vis, task)
    best = [int(s[i].argmax()) for i in range(n)]
    score = [float(s[:, j].max()) for j in range(n)]
    if cfg.mode == "adaptive":
        keep = set(best)
    else:
        k = max(cfg.min_tokens, round(cfg.keep_ratio * n))
        keep = set(sorted(range(n), key=lambda j: -(score[j] + 1e-3 * best.count(j)))[:k])
    if len(keep) < cfg.min_tokens:
        keep |= set(sorted(range(n), key=lambda j: -score[j])[:cfg.min_tokens])
    r, (gh, gw) = cfg.coverage_regions, grid
    for block in range(r * r):
        members = [j for j in range(n) if (j // gw * r // gh) * r + (j % gw * r // gw) == block]
        if members and not keep & set(members):
            keep.add(max(members, key=lambda j: score[j]))
    return sorted(keep)


@pytest.mark.parametrize("cfg", [PruningConfig(keep_ratio=0.5), PruningConfig(keep_ratio=0.1, min_tokens=6),
                                 PruningConfig(keep_ratio=0.25, coverage_regions=3), PruningConfig(mode="adaptive"),
                                 PruningConfig(mode="adaptive", coverage_regions=0, min_tokens=12),
                                 PruningConfig(keep_ratio=0.5, coverage_regions=0),
                                 PruningConfig(keep_ratio=0.1, min_tokens=1, coverage_regions=8)])  # empty blocks
def test_selection_follows_the_written_out_rule(cfg) -> None:
    for seed in range(6):
        vis, task = _tokens(10 + seed, n=36, d=16), _tokens(40 + seed, n=1 + seed, d=16)
        torch.testing.assert_close(relevance_scores(vis, task), _reference_scores(vis, task), atol=1e-5, rtol=1e-5)
        kept = select_tokens(vis, task, (6, 6), cfg).tolist()
        assert kept == _reference_select(vis, task, (6, 6), cfg), seed
        assert len(kept) >= cfg.min_tokens


def test_adaptive_mode_keeps_union_of_argmax() -> None:
    vis, task = _tokens(1), _tokens(2, n=6)
    cfg = PruningConfig(mode="adaptive", coverage_regions=0, min_tokens=1)
    kept = select_tokens(vis, task, (8, 8), cfg)
    expected = torch.unique(_reference_scores(vis, task).argmax(1))
    assert kept.tolist() == expected.tolist()
    assert 1 <= len(kept) < 64


def test_coverage_guard_keeps_every_region() -> None:
    vis = _tokens(3)
    task_dir = torch.randn(32, generator=torch.Generator().manual_seed(4))
    for i in range(0, 4):  # all relevant tokens in the top-left corner (rows 0, cols 0..3)
        vis[i] = 5 * task_dir
    task = task_dir[None]
    no_guard = select_tokens(vis, task, (8, 8), PruningConfig(keep_ratio=0.0625, coverage_regions=0, min_tokens=1))
    guard = select_tokens(vis, task, (8, 8), PruningConfig(keep_ratio=0.0625, coverage_regions=2, min_tokens=1))
    quadrant = lambda i: (i // 8 >= 4) * 2 + (i % 8 >= 4)  # noqa: E731
    assert {quadrant(i) for i in no_guard.tolist()} == {0}
    assert {quadrant(i) for i in guard.tolist()} == {0, 1, 2, 3}


def test_none_method_or_no_instruction_keeps_all() -> None:
    vis = _tokens(5)
    assert select_tokens(vis, _tokens(6, 4), (8, 8), PruningConfig(method="none")).tolist() == list(range(64))
    assert select_tokens(vis, None, (8, 8), PruningConfig()).tolist() == list(range(64))
    with pytest.raises(ValueError, match="grid"):
        select_tokens(vis, None, (4, 4), PruningConfig())
    with pytest.raises(ValueError, match="keep_ratio"):
        PruningConfig(keep_ratio=0.0)


def test_patch_change_localizes_motion() -> None:
    a = torch.zeros(3, 64, 64)
    b = a.clone()
    b[:, 40:48, 8:16] = 1.0  # a block moves in patch row 5, col 1 of an 8x8 grid
    pc = patch_change(a, b, (8, 8))
    assert pc[5, 1] == pytest.approx(1.0)
    assert float(pc.sum() - pc[5, 1]) == pytest.approx(0.0)


def test_change_detector_reuse_partial_full_and_ages() -> None:
    det = ChangeDetector()
    kw = dict(threshold=0.05, max_age=3, patch_level=True, keyframe_interval=4)
    img = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    d = det.decide(img, (4, 4), **kw)
    assert d.kind == "full"
    det.commit(img, d)
    d = det.decide(img + 0.01, (4, 4), **kw)  # below threshold
    assert d.kind == "reuse"
    det.commit(img, d)
    d = det.decide(img, (4, 4), **kw)
    assert d.kind == "reuse"
    det.commit(img, d)
    d = det.decide(img, (4, 4), **kw)  # max_age reached: must recompute (keyframe also due)
    assert d.kind == "full"
    det.commit(img, d)
    moved = img.clone()
    moved[:, 0:8, 0:8] = 0.0
    d = det.decide(moved, (4, 4), **kw)
    assert d.kind == "partial" and int(d.changed.sum()) == 1 and bool(d.changed[0, 0])
    det.commit(moved, d)
    assert torch.equal(det.reference, moved)  # reference follows the recomputed patch
    d = det.decide(moved, (4, 4), **kw)
    assert d.kind == "reuse"
    # no patch-level reuse: any change is a full pass
    d = det.decide(img, (4, 4), **{**kw, "patch_level": False})
    assert d.kind == "full"
