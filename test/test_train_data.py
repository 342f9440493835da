"""effvla_ros.train.data: chunk samples, padding mask, alignment with frames, normalization stats."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from effvla_ros.train.data import ChunkDataset, Episode, compute_stats, load_demos, random_shift, write_demos


def _episode(t: int, seed: int, size: int = 16) -> Episode:
    rng = np.random.default_rng(seed)
    return Episode(
        images={"scene": rng.integers(0, 256, (t, size, size, 3), dtype=np.uint8),
                "wrist": rng.integers(0, 256, (t, size, size, 3), dtype=np.uint8)},
        state=rng.normal(size=(t, 6)).astype(np.float32),
        # action value encodes (episode, frame) so that alignment is checkable
        action=(100 * seed + np.arange(t, dtype=np.float32))[:, None].repeat(6, 1) + np.arange(6, dtype=np.float32) / 10,
        task=f"pick up the red cube {seed}",
        seed=seed,
    )


def test_chunks_are_aligned_with_frames_and_padded_at_the_end():
    eps = [_episode(7, 1), _episode(4, 2)]
    ds = ChunkDataset(eps, chunk_size=5)
    assert len(ds) == 11
    item = ds[2]  # episode 0, frame 2
    assert item["episode_index"] == 0 and item["frame_index"] == 2
    np.testing.assert_allclose(item["action"][:, 0].numpy(), [102, 103, 104, 105, 106])
    assert not item["action_is_pad"].any()
    torch.testing.assert_close(item["observation.state"], torch.from_numpy(eps[0].state[2]))
    torch.testing.assert_close(item["observation.images.wrist"],
                               torch.from_numpy(eps[0].images["wrist"][2]).permute(2, 0, 1).float() / 255)
    last = ds[7 + 2]  # episode 1, frame 2 of 4: actions 2, 3 then padding
    assert last["task"] == "pick up the red cube 2"
    assert last["action_is_pad"].tolist() == [False, False, True, True, True]
    np.testing.assert_allclose(last["action"][:, 0].numpy(), [202, 203, 203, 203, 203])  # padded with the last
    np.testing.assert_allclose(last["action"][0, :].numpy(), eps[1].action[2])


def test_batch_equals_items_and_shift_keeps_shape():
    eps = [_episode(6, 3), _episode(5, 4)]
    ds = ChunkDataset(eps, chunk_size=4)
    b = ds.batch([0, 10, 5])
    for j, i in enumerate([0, 10, 5]):
        item = ds[i]
        for k in ("observation.images.scene", "observation.state", "action", "action_is_pad"):
            torch.testing.assert_close(b[k][j], item[k])
        assert b["task"][j] == item["task"]
    shifted = ds.batch([0, 10, 5], shift=3, rng=np.random.default_rng(0))
    assert shifted["observation.images.scene"].shape == (3, 3, 16, 16)
    assert not torch.equal(shifted["observation.images.scene"], b["observation.images.scene"])
    torch.testing.assert_close(shifted["action"], b["action"])  # only images are augmented


def test_random_shift_translates_content():
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 4, 4] = 1.0
    y = random_shift(x, 2, np.random.default_rng(1))
    assert y.shape == x.shape and float(y.sum()) == 1.0  # the bright pixel is moved, not lost (edge fill)
    assert torch.equal(random_shift(x, 0 + 1, np.random.default_rng(5)).sum(), torch.tensor(1.0))


def test_stats_are_mean_std_over_all_frames():
    eps = [_episode(6, 5), _episode(3, 6)]
    st = compute_stats(eps)
    allx = np.concatenate([e.action for e in eps])
    np.testing.assert_allclose(st["action"]["mean"].numpy(), allx.mean(0), rtol=1e-5)
    np.testing.assert_allclose(st["action"]["std"].numpy(), allx.std(0), rtol=1e-5)
    alls = np.concatenate([e.state for e in eps])
    np.testing.assert_allclose(st["observation.state"]["mean"].numpy(), alls.mean(0), rtol=1e-5, atol=1e-6)
    const = [Episode(e.images, np.zeros_like(e.state), e.action, e.task) for e in eps]
    assert float(compute_stats(const)["observation.state"]["std"].min()) > 0  # floored, no division by 0


def test_write_then_load_demos_round_trip(tmp_path):
    eps = [_episode(5, 7), _episode(3, 8)]
    write_demos(tmp_path, eps)
    loaded, index = load_demos(tmp_path)
    assert index["cameras"] == ["scene", "wrist"] and len(loaded) == 2
    for a, b in zip(eps, loaded, strict=True):
        np.testing.assert_array_equal(a.action, b.action)
        np.testing.assert_array_equal(a.images["wrist"], b.images["wrist"])
        assert a.task == b.task
    assert len(load_demos(tmp_path, max_episodes=1)[0]) == 1
    with pytest.raises(ValueError, match="not recorded"):
        load_demos(tmp_path, cameras=["top"])


def test_grasp_and_release_frames_follow_the_gripper_command():
    grip = np.array([0.8, 0.8, 0.8, 0.5, 0.2, 0.2, 0.2, 0.5, 0.8], np.float32)  # open, close at 3, reopen at 7
    ep = Episode(images={}, state=np.zeros((9, 6), np.float32), action=np.zeros((9, 6), np.float32), task="t")
    ep.action[:, -1] = grip
    assert ep.grasp_frame() == 3  # first frame below the previous one
    assert ep.release_frame() == 6  # last closed frame before the command rises
    ep.action[7:, -1] = 0.2  # never reopens
    assert ep.grasp_frame() == 3 and ep.release_frame() is None
    ep.action[:, -1] = 0.8 + 1e-4 * np.arange(9) * -1  # drifts by less than 1e-3 rad per frame: no grasp
    assert ep.grasp_frame() is None and ep.release_frame() is None


def test_failed_grasp_prefix_is_never_trained_on(tmp_path):
    """Frames before ``train_start`` (a --regrasp episode's failed attempt) are no samples, count in no
    statistics, hold no decision frames and no grasp; ``failed_grasp`` survives a write/load round trip."""
    from effvla_ros.train.trainer import decision_frames

    ep = _episode(12, 3)
    ep.action[:, -1] = [0.8, 0.8, 0.2, 0.2, 0.8, 0.8, 0.8, 0.2, 0.2, 0.2, 0.8, 0.8]  # failed close at 2, regrasp at 7
    ep.train_start = 4
    other = _episode(6, 4)
    write_demos(tmp_path, [ep, other])
    (back, plain), _ = load_demos(tmp_path)
    assert back.train_start == 4 and plain.train_start == 0
    assert np.load(tmp_path / "episodes" / "episode_000000.npz")["failed_grasp"].tolist() == [True] * 4 + [False] * 8
    assert back.grasp_frame() == 7 and back.release_frame() == 9  # the failed close at frame 2 is not the grasp
    ds = ChunkDataset([back, plain], chunk_size=3)
    assert len(ds) == 8 + 6 and ds.index[0].tolist() == [0, 4]
    stats = compute_stats([back])
    torch.testing.assert_close(stats["observation.state"]["mean"],
                               torch.from_numpy(back.state[4:].astype(np.float64).mean(0)).float())
    dec = decision_frames(ds)
    assert ds.index[dec][ds.index[dec][:, 0] == 0, 1].tolist() == [4, 5, 6, 7, 8]  # start (4-6) + grasp (6-8)
    bad = _episode(5, 5)
    write_demos(tmp_path / "bad", [bad])
    f = tmp_path / "bad" / "episodes" / "episode_000000.npz"
    arrays = dict(np.load(f))
    arrays["failed_grasp"] = np.array([True, False, True, False, False])
    np.savez_compressed(f, **arrays)
    with pytest.raises(ValueError, match="prefix"):
        load_demos(tmp_path / "bad")
