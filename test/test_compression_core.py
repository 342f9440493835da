"""Compression core: task-relevance pruning (LightVLA), coverage guard, change detection."""
from __future__ import annotations

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


def test_adaptive_mode_keeps_union_of_argmax() -> None:
    vis, task = _tokens(1), _tokens(2, n=6)
    cfg = PruningConfig(mode="adaptive", coverage_regions=0, min_tokens=1)
    kept = select_tokens(vis, task, (8, 8), cfg)
    expected = torch.unique(relevance_scores(vis, task).argmax(1))
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
