"""Issue 28: the demo's failure reasons, its episode video (frames drawn from a recording), the viewer
camera (does not touch the simulation), and ``effvla replay --video`` on a tiny synthetic bag."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from effvla_ros.viz.episode import (
    FAILURE_TEXT,
    LIFT_CM,
    NEAR_CM,
    PANEL_H,
    STRIP_H,
    CameraFrame,
    EpisodeRecording,
    FrameRecord,
    OutcomeTracker,
    failure_reason,
    render_episode,
)
from effvla_ros.viz.overlay import Chunk, TokenView


def test_thresholds_are_eval_sims() -> None:
    from effvla_ros.train.evaluate import LIFT_CM as E_LIFT
    from effvla_ros.train.evaluate import NEAR_CM as E_NEAR
    from effvla_ros.train.evaluate import OUTCOMES

    assert (NEAR_CM, LIFT_CM) == (E_NEAR, E_LIFT)
    assert set(FAILURE_TEXT) == set(OUTCOMES) - {"success"}


def _cubes(z_target: float = 0.02) -> np.ndarray:
    return np.array([[0.20, 0.05, z_target], [0.20, -0.05, 0.02]])  # cube 0 = the instructed one


@pytest.mark.parametrize("case,closes_at,lift,success,want,phrase", [
    ("never closed", None, 0.0, False, "no_grasp", "never commanded closed"),
    ("other cube", (0.20, -0.045), 0.0, False, "wrong_cube", "wrong cube"),
    ("between", (0.30, 0.0), 0.0, False, "missed", "missed"),
    ("at target, not up", (0.20, 0.05), 0.01, False, "not_lifted", "never rose"),
    ("lifted", (0.20, 0.05), 0.06, False, "not_placed", "not placed"),
    ("placed", (0.20, 0.05), 0.06, True, "success", ""),
])
def test_outcome_tracker_classifies_like_eval_sim(case: str, closes_at: tuple[float, float] | None, lift: float,
                                                  success: bool, want: str, phrase: str) -> None:
    tr = OutcomeTracker(grip_mid=0.5, target=0)
    tr.update(1.0, np.array([0.1, 0.0]), _cubes())  # open, far away
    if closes_at is not None:
        tr.update(0.0, np.asarray(closes_at), _cubes())
        tr.update(0.0, np.array([0.0, 0.0]), _cubes())  # later closes do not move the grasp point
    tr.update(0.0 if closes_at else 1.0, np.array([0.2, 0.05]), _cubes(0.02 + lift))
    assert tr.outcome(success) == want, case
    text = tr.reason(success, ("red", "blue"))
    if want == "success":
        assert text == ""
    else:
        assert phrase in text
        if closes_at is not None:  # the measured distances are named
            d = 100 * math.dist(closes_at, (0.20, 0.05))
            assert f"closed {d:.1f} cm from the red cube" in text


def test_failure_reason_without_measurements() -> None:
    assert failure_reason("no_grasp").startswith("no grasp")
    assert "(" not in failure_reason("no_grasp")


def _recording(n_frames: int = 5) -> EpisodeRecording:
    rng = np.random.default_rng(0)
    rec = EpisodeRecording(0, 2, 1000, "pick up the red cube and place it on the plate",
                           joint_names=["a", "b", "c", "d", "e", "gripper"], cameras=["scene", "wrist"])
    for k in range(20):
        rec.joint_t.append(0.1 * k)
        rec.joint_q.append(np.sin(0.1 * k + np.arange(6)))
    rec.chunks = [Chunk(0.3 * k + 0.05, 0.3 * k, 0.1, rng.normal(size=(10, 6))) for k in range(6)]
    for k in range(n_frames):
        cams = {c: CameraFrame(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8),
                               TokenView((4, 4), [0, 3, 5, 9, 12], [k % 2 == 0] * 5), 10 + k, 100)
                for c in rec.cameras}
        rec.frames.append(FrameRecord(0.4 * k, np.zeros(3), k == n_frames - 1, "reaching", cams, 2 * k, 25.0, 0.4))
    return rec


def test_episode_video_mp4_frames_and_size(tmp_path: Path) -> None:
    import imageio.v3 as iio

    from effvla_ros.viz.video import VideoWriter

    rec = _recording(5)
    calls: list[np.ndarray] = []

    def viewer(qpos: np.ndarray) -> np.ndarray:
        calls.append(qpos)
        return np.full((320, 320, 3), 200, dtype=np.uint8)

    w = VideoWriter(tmp_path / "demo.mp4", fps=10)
    g = VideoWriter(tmp_path / "demo.gif", fps=10, gif_scale=0.5, gif_stride=2)
    assert render_episode(rec, viewer, [w, g], size=320) == 5
    w.close()
    g.close()
    assert len(calls) == 5
    mp4 = iio.imread(tmp_path / "demo.mp4")
    h = STRIP_H + 320 + 24 + PANEL_H
    assert mp4.shape == (5, h + (-h) % 16, 960, 3)  # viewer + 2 cameras, 320 px each
    gif = iio.imread(tmp_path / "demo.gif")
    assert gif.shape[0] == 3 and gif.shape[2] == 480
    # the viewer is the left third (grey 200), the cameras' pruned tokens are dimmed: darker than the viewer
    view_row = mp4[0, STRIP_H + 40: STRIP_H + 300]
    assert abs(float(view_row[:, 20:300].mean()) - 200) < 25
    assert float(view_row[:, 340:940].mean()) < 150


def test_viewer_camera_leaves_the_simulation_alone() -> None:
    pytest.importorskip("mujoco")
    from effvla_ros.sim.env import SimConfig, TwoCubePickPlaceEnv
    from effvla_ros.sim.viewer import ViewerCamera

    env = TwoCubePickPlaceEnv(SimConfig(image_size=32, cameras=["scene"]), seed=3)
    v = ViewerCamera(env._model, 160, 200)
    try:
        env.set_joint_targets(env.joint_targets() + 0.2)
        env.step_physics(50)
        qpos, qvel, before = env._data.qpos.copy(), env._data.qvel.copy(), env.render("scene")
        v.sync_model(env._model)
        img = v.render(qpos)
        assert img.shape == (160, 200, 3) and img.std() > 10
        assert np.array_equal(env._data.qpos, qpos) and np.array_equal(env._data.qvel, qvel)
        assert np.array_equal(env.render("scene"), before)
        # the viewer follows the snapshot: another arm pose, another picture
        q2 = qpos.copy()
        q2[0] += 0.8
        assert np.abs(v.render(q2).astype(int) - img.astype(int)).mean() > 1.0
        # and the next physics steps are those of an untouched simulation
        env.step_physics(20)
        a = env._data.qpos.copy()
        env2 = TwoCubePickPlaceEnv(SimConfig(image_size=32, cameras=["scene"]), seed=3)
        try:
            env2.set_joint_targets(env2.joint_targets() + 0.2)
            env2.step_physics(70)
            assert np.array_equal(env2._data.qpos, a)
        finally:
            env2.close()
    finally:
        v.close()
        env.close()


def test_replay_video_tiny_bag(tmp_path: Path) -> None:
    import imageio.v3 as iio
    import torch

    from effvla_ros.cli import main
    from effvla_ros.replay.synthetic import write_episode_bag

    from model_fixtures import write_tiny_checkpoint

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ckpt = write_tiny_checkpoint(tmp_path / "tiny")
        bag = write_episode_bag(tmp_path / "bag", storage="mcap", duration=1.0, chunks={"rate": 4.0})
        out = tmp_path / "rep"
        with pytest.raises(SystemExit) as exc:
            main(["replay", str(bag), "--checkpoint", str(ckpt), "--sweep", "pruning.keep_ratio=0.25",
                  "--flops", "off", "--no-plots", "--quiet", "--video", "--video-size", "96", "--out", str(out)])
        assert exc.value.code == 0
    finally:
        torch.set_num_threads(n)
    import json

    rep = json.loads((out / "report.json").read_text())
    frames = iio.imread(out / "replay.mp4")
    n_obs = rep["episode"]["observations"]
    assert frames.shape[0] == n_obs >= 2
    names = [s["name"] for s in rep["settings"]]
    assert len(names) == 2 and frames.shape[2] == 2 * 96  # a column per setting
    # the pruned setting dims tokens: its column is darker than the baseline's (every token kept)
    body = frames[:, 24 + 44:]
    base_col, pruned_col = body[:, :, :96].astype(float), body[:, :, 96:].astype(float)
    assert pruned_col.mean() < 0.85 * base_col.mean()
    kept = rep["settings"][1]["tokens"]["kept_per_step"]
    total = rep["settings"][1]["tokens"]["total_per_step"]
    assert kept < total


def test_demo_reorders_joints_by_name() -> None:
    from effvla_ros.commands.demo import _reorder

    a = np.array([[1.0, 2.0, 3.0]])
    assert np.array_equal(_reorder(a, ["b", "c", "a"], ["a", "b", "c"]), [[3.0, 1.0, 2.0]])
    out = _reorder(a, ["b", "c", "a"], ["a", "x", "c"])
    assert out[0, 0] == 3.0 and math.isnan(out[0, 1]) and out[0, 2] == 2.0
    assert _reorder(a, [], ["a", "b", "c"]) is a  # no names: as sent
