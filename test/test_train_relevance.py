"""effvla_ros.train.relevance and --prune-align: the pruning's scores aligned with where the task is."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from effvla_ros.core.compression.pruning import PruningConfig, keep_mask_batch, token_scores_batch
from effvla_ros.sim.env import SimConfig, TwoCubePickPlaceEnv
from effvla_ros.sim.task import sample_task
from effvla_ros.train.data import Episode, write_demos
from effvla_ros.train.relevance import CameraModel, RelevanceTargets, kept_fraction, relevance_loss
from effvla_ros.train.trainer import TrainConfig, train

SIZE = 32

# RGB of the cube colours as rendered (dominant channel): the projection must land on the cube
DOMINANT = {"red": 0, "green": 1, "blue": 2}


@pytest.fixture(scope="module")
def env():
    e = TwoCubePickPlaceEnv(SimConfig(image_size=64, cameras=["scene"]), seed=0)
    yield e
    e.close()


def test_projection_lands_on_the_rendered_cubes(env):
    cam = CameraModel.from_env(env, "scene")
    checked = 0
    for seed in range(12):
        env.reset(seed=seed)
        img = env.render("scene").astype(int)
        for k, color in enumerate(env.task.cube_colors):
            u, v = cam.pixels(env.cube_positions()[k], 64)
            px = img[int(v), int(u)]
            if color in DOMINANT:
                assert int(np.argmax(px)) == DOMINANT[color], (seed, color, px)
                checked += 1
            idx = cam.token_index(env.cube_positions()[k], 64, (4, 4))
            assert idx == (int(v) // 16) * 4 + int(u) // 16
    assert checked >= 6
    assert cam.token_index(cam.pos + cam.mat[:, 2], 64, (4, 4)) == -1  # behind the camera: no token
    assert np.isnan(cam.pixels(cam.pos + cam.mat[:, 2], 64)).all()


def test_wrist_camera_along_recorded_joint_positions():
    """The wrist camera placed by forward kinematics at recorded joint positions is the camera MuJoCo renders
    from there, and the instructed cube projected through it lands on the cube in the wrist image."""
    import mujoco
    from lerobot_env_so101.scripted import PickPlaceController

    env = TwoCubePickPlaceEnv(SimConfig(image_size=64, cameras=["scene", "wrist"]), seed=0)
    try:
        env.reset(seed=3)  # the red cube
        ctrl = PickPlaceController()
        qs, poses, images, cubes, both = [], [], [], [], []
        for _ in range(40):
            env.step(env.expert_action(ctrl))
            mujoco.mj_forward(env._model, env._data)  # derived quantities (camera poses) of the state reached
            qs.append(env.joint_positions())
            poses.append(CameraModel.from_env(env, "wrist"))
            images.append(env.render("wrist").astype(int))
            both.append(env.cube_positions())
            cubes.append(both[-1][env.task.target_cube])
        q = np.stack(qs)
        cam = CameraModel.along(env, q, "wrist")
        assert cam.pos.shape == (40, 3) and cam.mat.shape == (40, 3, 3)
        np.testing.assert_allclose(cam.pos, np.stack([p.pos for p in poses]), atol=1e-9)
        np.testing.assert_allclose(cam.mat, np.stack([p.mat for p in poses]), atol=1e-9)
        np.testing.assert_array_equal(env.joint_positions(), q[-1])  # the simulation state is restored
        assert np.ptp(cam.pos, axis=0).max() > 0.02  # it moved with the arm
        scene_pos, _ = env.camera_poses(q, "scene")
        np.testing.assert_allclose(scene_pos, np.broadcast_to(CameraModel.from_env(env, "scene").pos, (40, 3)))
        uv = cam.pixels(np.stack(cubes), 64)  # (40, 2): frame t's cube through frame t's camera
        color = DOMINANT.get(env.task.cube_colors[env.task.target_cube])
        inside = [t for t in range(40) if np.isfinite(uv[t]).all() and (2 <= uv[t]).all() and (uv[t] < 62).all()]
        assert len(inside) >= 10
        assert color is not None  # the instructed cube has a dominant channel
        hits = sum(int(np.argmax(images[t][int(uv[t, 1]), int(uv[t, 0])])) == color for t in inside)
        assert hits >= 0.8 * len(inside), (hits, len(inside))
        idx = cam.token_index(np.stack(cubes), 64, (4, 4))
        assert [int(i) for i in idx[inside]] == [int(uv[t, 1]) // 16 * 4 + int(uv[t, 0]) // 16 for t in inside]
        # the targets of a moving camera: one pose per frame, from the episode (a function of it)
        ep = Episode(images={}, state=q.astype(np.float32), action=q.astype(np.float32), task=env.task.instruction,
                     seed=3, cube_pos=np.stack(both).astype(np.float32))
        tg = RelevanceTargets([ep], lambda e: CameraModel.along(env, e.state, "wrist"), 64, (4, 4))
        assert tg.num_with_targets == 1
        np.testing.assert_array_equal(tg.targets[0][:, 0], idx)
    finally:
        env.close()


def test_alignment_loss_moves_the_target_token_into_the_kept_set():
    g = torch.Generator().manual_seed(0)
    b, n, d = 16, 16, 32
    vis = torch.randn(b, n, d, generator=g, requires_grad=True)
    task = torch.randn(b, 6, d, generator=g)
    mask = torch.ones(b, 6, dtype=torch.bool)
    targets = torch.randint(0, n, (b, 2), generator=g)
    targets[0, 1] = -1  # ignored
    cfg = PruningConfig(keep_ratio=0.25, coverage_regions=0)
    before = kept_fraction(keep_mask_batch(vis.detach(), task, mask, (4, 4), cfg), targets)
    opt = torch.optim.Adam([vis], lr=0.05)
    losses = []
    for _ in range(60):
        loss = relevance_loss(vis, task, mask, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    after = kept_fraction(keep_mask_batch(vis.detach(), task, mask, (4, 4), cfg), targets)
    assert losses[-1] < 0.5 * losses[0]
    assert float(after) == 1.0 and float(before) < 0.7
    score, _ = token_scores_batch(vis.detach(), task, mask)
    assert bool((score.argmax(1)[:, None] == targets).any(1).all())  # a target token scores highest in every row
    # no valid target: zero loss, still differentiable
    none = relevance_loss(vis, task, mask, torch.full((b, 2), -1))
    none.backward()
    assert float(none.detach()) == 0.0


def _episode(t: int, seed: int) -> Episode:
    spec = sample_task(seed)
    rng = np.random.default_rng(seed)
    state = np.cumsum(rng.normal(scale=0.05, size=(t, 6)), axis=0).astype(np.float32)
    cubes = np.zeros((t, 2, 3), np.float32)
    cubes[:, :, :2] = np.asarray(spec.cube_xy, np.float32)
    cubes[:, :, 2] = 0.02
    return Episode(images={c: rng.integers(0, 256, (t, SIZE, SIZE, 3), dtype=np.uint8) for c in ("scene", "wrist")},
                   state=state, action=(state + 0.1).astype(np.float32), task=spec.instruction, seed=seed,
                   cube_pos=cubes)


def test_targets_and_training_with_alignment(env, tmp_path):
    cam = CameraModel.from_env(env, "scene")
    eps = [_episode(12, s) for s in range(3)]
    tg = RelevanceTargets(eps + [Episode(eps[0].images, eps[0].state, eps[0].action, eps[0].task, seed=0)],
                          cam, SIZE, (2, 2))
    assert tg.num_with_targets == 3  # the last has no cube positions
    b = tg.batch(np.array([[0, 0], [3, 5]]))
    spec = sample_task(0)
    assert int(b[0, 0]) == int(cam.token_index(eps[0].cube_pos[0, spec.target_cube], SIZE, (2, 2))) >= 0
    assert b[1].tolist() == [-1, -1]

    root = tmp_path / "demos"
    write_demos(root, eps)
    with pytest.raises(ValueError, match="prune_align"):
        TrainConfig(data="x", out="y", prune_align=-1.0)
    with pytest.raises(ValueError, match="prune_align_wrist"):
        TrainConfig(data="x", out="y", prune_align_wrist=-0.1)
    threads = torch.get_num_threads()
    try:
        res = train(TrainConfig(data=str(root), out=str(tmp_path / "al"), steps=4, batch=8, warmup=1, image_size=SIZE,
                                ema=0.0, save_every=0, threads=1, prune_train=0.5, prune_align=0.5, log_every=2,
                                prune_align_wrist=0.25),
                    progress=False, log=lambda s: None)
    finally:
        torch.set_num_threads(threads)
    assert all(np.isfinite(h["relevance_loss"]) and h["relevance_loss"] > 0 for h in res.history)
    assert all(0.0 <= h["relevance_kept"] <= 1.0 for h in res.history)
    assert all(np.isfinite(h["relevance_loss_wrist"]) and 0.0 <= h["relevance_kept_wrist"] <= 1.0 for h in res.history)
    cfg = json.loads((tmp_path / "al" / "train_log.json").read_text())["config"]
    assert cfg["prune_align"] == 0.5 and cfg["prune_align_wrist"] == 0.25


def test_pruned_recipe_and_its_checkpoint():
    from pathlib import Path

    from effvla_ros.core.smolvla import load_policy
    from effvla_ros.train.recipes import RECIPES

    base, pruned = RECIPES["so101"], RECIPES["so101_pruned"]
    assert pruned.demos == base.demos and sum(d.episodes for d in pruned.demos) == 3200  # what it was trained on
    assert sum(d.regrasp for d in base.demos) == 2
    assets = Path(__file__).resolve().parents[1] / "effvla_ros" / "assets"
    # a fine-tune of the bundled default checkpoint, in two stages
    assert pruned.train == {**base.train, "init": str(assets / "so101_pickplace"), "steps": 6000, "warmup": 100,
                            "prune_train": 0.75, "prune_align": 0.2, "prune_align_wrist": 0.2}
    assert pruned.stages == ({"lr": 2e-4}, {"lr": 1e-4})
    assert (assets / "so101_pickplace" / "model.safetensors").is_file()
    d = assets / "so101_pickplace_pruned"
    # each stage's training log holds the recipe's settings for that stage (the runs' own checkouts and
    # output directories lay elsewhere: the first stage's init is compared by its asset name)
    stage1 = json.loads((d / "train_log_stage1.json").read_text())["config"]
    assert Path(stage1["init"]).parent.name == "assets" and Path(stage1["init"]).name == "so101_pickplace"
    tlog = json.loads((d / "train_log.json").read_text())
    log = tlog["config"]
    assert log["init"] and Path(log["init"]).name != "so101_pickplace"  # the first stage's output
    for cfg, stage in ((stage1, pruned.stages[0]), (log, pruned.stages[1])):
        want = {**pruned.train, **stage}
        assert all(cfg[k] == v for k, v in want.items() if k != "init"), {k: cfg[k] for k in want}
    assert tlog["episodes"] == 3200
    assert sorted(Path(p).name for p in log["data"].split(",")) == sorted(ds.name for ds in pruned.demos)
    policy = load_policy(d)
    assert tuple(policy.arch.cameras) == ("scene", "wrist")


def test_stage_plan_chains_the_stages():
    from effvla_ros.train.recipes import DemoSet, Recipe, stage_plan

    base = {"lr": 5e-4, "steps": 100, "init": None, "prune_train": 0.0}
    single = Recipe(name="one", demos=(DemoSet(0, 2),), train={"steps": 50})
    assert stage_plan(single, base, {}, "/o") == [({"lr": 5e-4, "steps": 50, "init": None, "prune_train": 0.0}, "/o")]
    assert stage_plan(None, base, {"steps": 7}, "/o") == [({**base, "steps": 7}, "/o")]
    staged = Recipe(name="two", demos=(DemoSet(0, 2),), train={"init": "/ckpt", "prune_train": 0.75},
                    stages=({"lr": 2e-4}, {"lr": 1e-4}))
    plan = stage_plan(staged, base, {"steps": 9}, "/o")
    assert [out for _, out in plan] == ["/o_stage1", "/o"]
    assert plan[0][0] == {"lr": 2e-4, "steps": 9, "init": "/ckpt", "prune_train": 0.75}
    assert plan[1][0] == {"lr": 1e-4, "steps": 9, "init": "/o_stage1", "prune_train": 0.75}  # from stage 1
    # the command line overrides every stage's value; an explicit init starts the first stage only
    plan = stage_plan(staged, base, {"lr": 3e-4, "init": "/mine"}, "/o")
    assert [v["lr"] for v, _ in plan] == [3e-4, 3e-4] and [v["init"] for v, _ in plan] == ["/mine", "/o_stage1"]
