"""Per-step chunk correction (A2C2, arXiv 2509.23224): the head against its definition, its files and refusals,
training on a residual it can learn, collection from real demonstrations, and eval-sim applying it per step."""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from effvla_ros.core.correction import (
    HEAD_META,
    ChunkCorrector,
    CorrectionConfig,
    CorrectionHead,
    HeadSpec,
    load_corrector,
)
from effvla_ros.core.settings import make_setting
from effvla_ros.train.correction import CorrectionData, collect, load_data, save_data, train_head

CKPT = Path(__file__).resolve().parents[1] / "effvla_ros" / "assets" / "so101_pickplace_pruned"


def _head(visual: bool = False, **kw) -> CorrectionHead:  # type: ignore[no-untyped-def]
    spec = HeadSpec(action_dim=6, chunk_size=10, hidden=32, layers=2,
                    cameras=["scene", "wrist"] if visual else [], visual_tokens=4 if visual else 0,
                    visual_dim=8 if visual else 0, **kw)
    return CorrectionHead(spec)


def test_a_new_head_returns_the_base_action_and_rows_past_the_end_hold_the_last():
    g = torch.Generator().manual_seed(0)
    chunk = torch.randn(10, 6, generator=g)
    c = ChunkCorrector(_head(visual=True))
    vis = {cam: torch.randn(4, 8, generator=g) for cam in ("scene", "wrist")}
    for row in (0, 3, 9):
        assert torch.equal(c.correct(chunk, row, np.zeros(6), np.ones(6), vis), chunk[row])
    assert torch.equal(c.correct(chunk, 14, np.zeros(6), np.ones(6), vis), chunk[9])  # held past the end
    with pytest.raises(ValueError, match="camera frames"):
        c.correct(chunk, 0, np.zeros(6), np.zeros(6), None)


def test_residual_scale_cap_and_a_non_finite_head_leaves_the_base_action():
    head = _head()
    head.std.copy_(torch.full((6,), 0.5))
    with torch.no_grad():
        head.out.bias.copy_(torch.tensor([1.0, -2.0, 5.0, 0.0, 0.0, 0.1]))
    chunk = torch.zeros(10, 6)
    q = np.zeros(6)
    out = ChunkCorrector(head, CorrectionConfig(enabled=True, scale=1.0, max_correction=3.0)).correct(chunk, 2, q, q)
    assert torch.allclose(out, torch.tensor([0.5, -1.0, 1.5, 0.0, 0.0, 0.05]))  # 5 capped at 3 std = 1.5
    half = ChunkCorrector(head, CorrectionConfig(enabled=True, scale=0.5)).correct(chunk, 2, q, q)
    assert torch.allclose(half, torch.tensor([0.25, -0.5, 1.25, 0.0, 0.0, 0.025]))
    off = ChunkCorrector(head, CorrectionConfig(enabled=False)).correct(chunk, 2, q, q)
    assert torch.equal(off, chunk[2])
    with torch.no_grad():
        head.out.bias[0] = float("nan")
    assert torch.equal(ChunkCorrector(head).correct(chunk, 2, q, q), chunk[2])
    with pytest.raises(ValueError, match="max_correction"):
        CorrectionConfig(max_correction=-1.0)


def test_files_round_trip_and_refusals(tmp_path):
    head = _head(visual=True)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.1 * torch.randn_like(p))
    head.save(tmp_path)
    back = CorrectionHead.load(tmp_path)
    g = torch.Generator().manual_seed(1)
    chunk, vis = torch.randn(10, 6, generator=g), {c: torch.randn(4, 8, generator=g) for c in ("scene", "wrist")}
    a = ChunkCorrector(head).correct(chunk, 3, np.ones(6), np.zeros(6), vis)
    b = load_corrector(tmp_path, CorrectionConfig(enabled=True)).correct(chunk, 3, np.ones(6), np.zeros(6), vis)
    assert torch.equal(a, b) and not torch.equal(a, chunk[3])
    with pytest.raises(ValueError, match="trained for chunks of 10 x 6"):
        ChunkCorrector(back).check(20, 6)
    with pytest.raises(ValueError, match="cameras"):
        ChunkCorrector(back).check(10, 6, ["front"])
    with pytest.raises(ValueError, match=HEAD_META):
        CorrectionHead.load(tmp_path / "missing")
    meta = json.loads((tmp_path / HEAD_META).read_text())
    meta["hidden"] = 64
    (tmp_path / HEAD_META).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="does not match"):
        CorrectionHead.load(tmp_path)


def test_an_ensemble_averages_its_members_and_round_trips(tmp_path):
    head = _head(visual=True, members=3)
    assert len(head.member_modules()) == 3
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.1 * torch.randn_like(p))
    g = torch.Generator().manual_seed(2)
    chunk, vis = torch.randn(4, 10, 6, generator=g), torch.randn(4, 2, 4, 8, generator=g)
    rows, q = torch.tensor([0, 3, 9, 10]), torch.randn(4, 6, generator=g)
    each = [head(chunk, rows, q, q, vis, member=k) for k in range(3)]
    assert not torch.allclose(each[0], each[1])  # the members differ ...
    assert torch.allclose(head(chunk, rows, q, q, vis), torch.stack(each).mean(0))  # ... and are averaged
    head.save(tmp_path)
    assert json.loads((tmp_path / HEAD_META).read_text())["members"] == 3
    back = CorrectionHead.load(tmp_path)
    assert torch.equal(back(chunk, rows, q, q, vis), head(chunk, rows, q, q, vis))
    # member 0 keeps a single head's parameter names: its weights load into a one-member head
    single = _head(visual=True)
    single.load_state_dict({k: v for k, v in head.state_dict().items() if not k.startswith("extra.")})
    assert torch.equal(single(chunk, rows, q, q, vis), each[0])
    with pytest.raises(ValueError, match="members"):
        _head(members=0)


def test_ensemble_training_fits_every_member_and_member_0_is_the_single_heads():
    data = _synthetic(n_eps=20)
    single, _ = train_head(data, chunk_size=10, steps=80, batch=64, hidden=16, seed=3)
    ens, rec = train_head(data, chunk_size=10, steps=80, batch=64, hidden=16, seed=3, members=2)
    assert rec["members"] == 2 and ens.spec.members == 2
    q = torch.from_numpy(data.q[:5])
    chunk, rows = torch.from_numpy(data.chunks[:5]), torch.arange(5)
    assert torch.allclose(ens(chunk, rows, q, q, member=0), single(chunk, rows, q, q))
    m1 = ens(chunk, rows, q, q, member=1)
    assert m1.abs().sum() > 0 and not torch.allclose(m1, single(chunk, rows, q, q))  # trained, from its own seed
    assert rec["held_out_after"]["corrected_rmse_arm"] < rec["held_out_before"]["base_rmse_arm"]


def _synthetic(n_eps: int = 40, t: int = 30, seed: int = 0) -> CorrectionData:
    """Chunks whose rows drift from where the arm really is; the demonstrator's action pulls half the way back
    toward the measured joints: target residual = 0.5 * (q_now - base[j])."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(n_eps * t, 6)).astype(np.float32)
    chunks, cf, samples = [], [], []
    action = np.zeros_like(q)
    for e in range(n_eps):
        for t0 in range(0, t - 10, 5):
            f0 = e * t + t0
            chunk = (q[f0] + rng.normal(scale=0.5, size=(10, 6))).astype(np.float32)
            for j in range(10):
                samples.append((len(chunks), j))
            chunks.append(chunk)
            cf.append(f0)
    for ci, j in samples:  # the action the demonstrator takes where the chunk's row j is executed
        f = cf[ci] + j
        action[f] = chunks[ci][j] + 0.5 * (q[f] - chunks[ci][j])
    # one frame is labelled once per chunk covering it: keep the last label, and the samples that agree with it
    keep = [(ci, j) for ci, j in samples if np.allclose(action[cf[ci] + j], chunks[ci][j] + 0.5 * (q[cf[ci] + j] - chunks[ci][j]))]
    return CorrectionData(q, action, None, np.repeat(np.arange(n_eps), t), np.asarray(chunks), np.asarray(cf),
                          np.asarray(keep, dtype=np.int64), [])


def test_training_learns_a_residual_from_the_measured_joints(tmp_path):
    data = _synthetic()
    save_data(data, tmp_path / "d.npz")
    back = load_data(tmp_path / "d.npz")
    assert len(back) == len(data) and back.visual is None
    head, rec = train_head(back, chunk_size=10, steps=600, batch=256, lr=3e-3, hidden=64, seed=0)
    before, after = rec["held_out_before"], rec["held_out_after"]
    assert after["corrected_rmse_arm"] < 0.35 * before["base_rmse_arm"]  # held-out episodes
    assert rec["held_out_samples"] > 0 and rec["samples"] > rec["held_out_samples"]


def test_collect_runs_the_base_policy_over_real_demonstrations(tmp_path):
    from effvla_ros.sim import dataset as sim_dataset

    demos = tmp_path / "demos"
    sim_dataset.generate(demos, 1, image_size=64, seed=7, max_steps=40, keep_failed=True)
    setting = make_setting("pruning.keep_ratio=0.5", {"pruning.keep_ratio": 0.5}, {"num_steps": 2})
    data = collect(str(CKPT), [str(demos)], setting, stride=5, offsets=(0,), visual=True)
    n = data.q.shape[0]
    assert data.visual is not None and data.visual.shape[:2] == (n, 2) and data.cameras == ["scene", "wrist"]
    assert data.chunks.shape[1:] == (10, 6) and data.chunk_frame.tolist() == list(range(0, n, 5))
    f = data.chunk_frame[data.samples[:, 0]] + data.samples[:, 1]
    assert f.max() < n and len(data) == sum(min(10, n - t0) for t0 in range(0, n, 5))
    ep = sim_dataset.load_episode(demos, 0)
    assert np.array_equal(data.action, ep["action"]) and np.array_equal(data.q, ep["observation.state"])


def test_eval_sim_applies_the_head_at_every_step(tmp_path, capsys):
    from effvla_ros.commands import eval_sim

    ckpt = tmp_path / "ckpt"
    shutil.copytree(CKPT, ckpt, ignore=shutil.ignore_patterns("eval_*.json", "train_log*.json"))
    from effvla_ros.core.smolvla import load_policy

    arch = load_policy(ckpt).arch
    enc = load_policy(ckpt).encode_images({c: torch.zeros(1, 3, 64, 64) for c in arch.cameras})
    n, d = enc.tokens[arch.cameras[0]].shape[1:]
    head = CorrectionHead(HeadSpec(action_dim=6, chunk_size=arch.chunk_size, hidden=16, layers=2,
                                   cameras=list(arch.cameras), visual_tokens=int(n), visual_dim=int(d)))
    with torch.no_grad():
        head.std.copy_(torch.full((6,), 0.1))
        head.out.bias.copy_(torch.tensor([0.5, 0.0, 0.0, 0.0, 0.0, 0.0]))  # +0.05 rad on the first joint
    head.save(ckpt)
    p = argparse.ArgumentParser()
    eval_sim.add_arguments(p)
    out = tmp_path / "r.json"
    args = p.parse_args(["--checkpoint", str(ckpt), "--episodes", "1", "--max-steps", "6", "--quiet", "--threads", "1",
                         "--sweep", "correction.enabled=true", "--sweep", "correction.scale=0.5+delay_steps=2",
                         "--out", str(out)])
    threads = torch.get_num_threads()
    try:
        assert eval_sim.run(args) == 0
    finally:
        torch.set_num_threads(threads)
    rep = {s["name"]: s for s in json.loads(out.read_text())["settings"]}
    per = {name: s["episode_results"][0]["per_inference"] for name, s in rep.items()}
    assert "correction_abs_arm" not in per["baseline"]
    assert per["correction.enabled=true"]["correction_abs_arm"] == pytest.approx(0.05 / 5, rel=1e-4)  # mean of 5
    assert per["correction.scale=0.5+delay_steps=2"]["correction_abs_arm"] == pytest.approx(0.025 / 5, rel=1e-4)
    assert per["correction.enabled=true"]["correction_abs_gripper"] == 0.0
    # a checkpoint without a head is refused, naming the file
    args = p.parse_args(["--checkpoint", str(CKPT.parent / "so101_pickplace"), "--episodes", "1", "--max-steps", "2", "--quiet", "--threads", "1",
                         "--sweep", "correction.enabled=true"])
    assert eval_sim.run(args) == 2
    assert "no correction head" in capsys.readouterr().err


def test_eval_sim_with_compressor_tokens_runs_the_compressor_on_every_frame(tmp_path, monkeypatch):
    """correction_tokens=compressor emulates the chunk_corrector's visual_source compressor: the compressor encodes
    every frame and the head gets its tokens before pruning; no separate encode of the frames."""
    from effvla_ros.commands import eval_sim
    from effvla_ros.core.compression.compressor import TokenCompressor
    from effvla_ros.train import evaluate

    ckpt = tmp_path / "ckpt"
    shutil.copytree(CKPT, ckpt, ignore=shutil.ignore_patterns("eval_*.json", "train_log*.json"))
    calls = {"process": 0, "encode_frames": 0}
    real_process, real_encode = TokenCompressor.process, evaluate.encode_frames

    def process(self, *a, **kw):  # type: ignore[no-untyped-def]
        calls["process"] += 1
        return real_process(self, *a, **kw)

    def encode(*a, **kw):  # type: ignore[no-untyped-def]
        calls["encode_frames"] += 1
        return real_encode(*a, **kw)

    monkeypatch.setattr(TokenCompressor, "process", process)
    monkeypatch.setattr(evaluate, "encode_frames", encode)
    p = argparse.ArgumentParser()
    eval_sim.add_arguments(p)
    threads = torch.get_num_threads()
    counts = {}
    try:
        for tokens in ("fresh", "compressor"):
            calls.update(process=0, encode_frames=0)
            out = tmp_path / f"{tokens}.json"
            args = p.parse_args(["--checkpoint", str(ckpt), "--episodes", "1", "--max-steps", "6", "--quiet",
                                 "--threads", "1", "--sweep",
                                 f"correction.enabled=true+correction_lag=1+correction_tokens={tokens}",
                                 "--out", str(out)])
            assert eval_sim.run(args) == 0
            rep = json.loads(out.read_text())["settings"][-1]
            assert rep["episode_results"][0]["per_inference"]["correction_abs_arm"] > 0.0  # the head acted
            counts[tokens] = dict(calls)
    finally:
        torch.set_num_threads(threads)
    # the baseline (no correction) runs first in both: 2 observations x 2 cameras; then the corrected setting
    assert counts["fresh"]["encode_frames"] == 6 and counts["fresh"]["process"] == 4 + 4
    assert counts["compressor"]["encode_frames"] == 0 and counts["compressor"]["process"] == 4 + 2 * 6


def test_lag_aware_training_takes_the_observation_lag_frames_before_the_row():
    from effvla_ros.train.correction import _batch

    data = _synthetic(n_eps=4)
    idx = np.arange(len(data))
    lag = np.full(len(idx), 2)
    chunk, j, qn, qo, _, target, lg = _batch(data, idx, lag)
    f0 = data.chunk_frame[data.samples[:, 0]]
    f = f0 + data.samples[:, 1]
    assert np.array_equal(lg.numpy(), np.minimum(2, data.samples[:, 1]))  # never before the chunk's observation
    assert np.array_equal(qn.numpy(), data.q[f - lg.numpy()]) and np.array_equal(qo.numpy(), data.q[f0])
    _, _, qn0, _, _, target0, lg0 = _batch(data, idx)
    assert np.array_equal(target.numpy(), target0.numpy()) and np.array_equal(qn0.numpy(), data.q[f])
    assert not lg0.any()
    head, rec = train_head(data, chunk_size=10, steps=50, batch=64, hidden=16, max_lag=1, seed=0)
    assert head.spec.max_lag == 1 and set(rec["held_out_by_lag"]) == {"0", "1"}
    assert rec["held_out_after"] == rec["held_out_by_lag"]["0"]["after"]


def test_a_lag_aware_head_is_told_each_rows_lag(tmp_path):
    head = _head(max_lag=2)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.2 * torch.randn_like(p))
    head.save(tmp_path)
    c = load_corrector(tmp_path, CorrectionConfig(enabled=True))
    assert c.head.spec.max_lag == 2
    g = torch.Generator().manual_seed(2)
    chunk, q1, q2 = torch.randn(10, 6, generator=g), np.ones(6), np.zeros(6)
    r = [c.residual(chunk, 5, q1, q2, lag=lag) for lag in (0, 1, 2, 7)]
    assert not torch.allclose(r[0], r[1]) and not torch.allclose(r[1], r[2])
    assert torch.allclose(r[2], r[3])  # lags past max_lag count as max_lag
    assert torch.equal(c.residual(chunk, 5, q1, q2), r[0])
    rows = c.row_residuals(chunk, 4, q1, q2, obs_row=3)  # rows 4..9 from an observation at row 3: lags 1..6
    assert rows is not None and rows.shape == (6, 6)
    for i in range(4, 10):
        assert torch.allclose(rows[i - 4], c.residual(chunk, i, q1, q2, lag=i - 3), atol=1e-6)


# ------------------------------------------------------------------------------------------ on-policy (DAgger)
def _sim_env():  # type: ignore[no-untyped-def]
    from effvla_ros.sim.env import SimConfig, TwoCubePickPlaceEnv

    return TwoCubePickPlaceEnv(SimConfig(image_size=64, cameras=["scene", "wrist"]))


def test_the_shadow_expert_completes_the_task_when_its_labels_are_executed():
    """The labels are the demonstrator's joint targets from the state it is shown: fed back through the joint
    interface the closed loop uses, they pick and place the cube, every step labelled, grasping where the
    demonstrations' expert aims (gen-demos --aim-offset)."""
    from effvla_ros.sim.env import GRASP_AIM_OFFSET
    from effvla_ros.train.correction import ShadowExpert

    env = _sim_env()
    try:
        n_phys = int(round(env.control_dt / env.physics_dt))
        env.reset(seed=500000)
        shadow = ShadowExpert(env, aim_offset=GRASP_AIM_OFFSET)
        cube = env.cube_positions()[env.task.target_cube].copy()
        aimed = env.aim_point(cube, GRASP_AIM_OFFSET)
        executed = env.joint_targets().astype(np.float32)
        usable, at_close = [], None
        for _ in range(200):
            executed, ok = shadow.label(executed)
            usable.append(ok)
            if at_close is None and float(executed[-1]) < shadow.grip_mid:
                at_close = np.asarray(env.ik_point_pos)[:2].copy()
            env.set_joint_targets(executed.astype(np.float64))
            env.step_physics(n_phys)
            if env.success:
                break
        assert env.success and all(usable) and at_close is not None
        # closed at the aimed point (0.8 cm off the centre), not at the centre
        assert np.linalg.norm(at_close - aimed[:2]) < 0.5 * np.linalg.norm(at_close - cube[:2])
    finally:
        env.close()


def test_the_shadow_expert_follows_the_executed_jaw_and_refuses_what_it_cannot_label():
    from lerobot_env_so101.scripted.pick_place import Phase

    from effvla_ros.train.correction import ShadowExpert

    env = _sim_env()
    try:
        env.reset(seed=500001)
        shadow = ShadowExpert(env)
        cmd = env.joint_targets().astype(np.float32)
        n_phys = int(round(env.control_dt / env.physics_dt))
        for _ in range(3):  # the expert's own approach for a while
            cmd, ok = shadow.label(cmd)
            env.set_joint_targets(cmd.astype(np.float64))
            env.step_physics(n_phys)
        assert ok and shadow.ctrl.phase is Phase.HOVER
        moving, _ = ShadowExpert(env).label(cmd)  # (a fresh expert's next target: still moving)
        closed = cmd.copy()
        closed[-1] = float(env.ctrl_range[-1][0])  # the jaw commanded shut in the approach
        lab, ok = shadow.label(closed)
        assert ok and shadow.ctrl.phase is Phase.CLOSE  # the expert holds still while the jaw closes
        assert float(lab[-1]) < shadow.grip_mid
        here = np.asarray(env.ik_point_pos)  # where the labels' grasp points lie, by forward kinematics:
        hold, move = (float(np.linalg.norm(env.jaw_points(x)[0] - here)) for x in (lab, moving))
        assert hold < 0.4 * move  # (one IK solve per step: a hold is not exact) vs a step of the approach
        lab, ok = shadow.label(cmd)  # opened again before anything was lifted: back to the approach
        assert ok and shadow.ctrl.phase in (Phase.DESCEND, Phase.CLOSE)
        shadow._set(Phase.RETREAT)
        _, ok = shadow.label(closed)  # shut again after the release: nothing to label
        assert not ok
    finally:
        env.close()


def test_on_policy_collection_labels_every_step_of_the_closed_loop():
    """collect_on_policy runs the policy with its correction head (eval-sim's episode) and pairs every row of every
    chunk with the shadow expert's label of its step, as collect pairs them with the demonstrator's action."""
    from effvla_ros.train.correction import collect_on_policy

    base = {"correction.enabled": True, "exec.correction_lag": 1}
    settings = [make_setting(f"d{d}", {**base, "exec.delay_steps": d}, {"num_steps": 2}) for d in (0, 3)]
    data, infos = collect_on_policy(str(CKPT), settings, [410000, 410001], first_episode=7, max_steps=12)
    assert [i["steps"] for i in infos] == [12, 12] and [i["setting"] for i in infos] == ["d0", "d3"]
    assert data.q.shape == (24, 6) and data.action.shape == (24, 6) and sorted(set(data.episode)) == [7, 8]
    assert data.visual is not None and data.visual.shape[:2] == (24, 2)
    # the chunks executed, each at its observation's frame (every 5 steps; frames numbered across episodes): at
    # d = 3 the one observed at step 10 arrives after the 12th step
    assert data.chunk_frame.tolist() == [0, 5, 10, 12 + 0, 12 + 5]
    f = data.chunk_frame[data.samples[:, 0]] + data.samples[:, 1]
    assert f.max() < 24 and np.array_equal(data.episode[f], data.episode[data.chunk_frame[data.samples[:, 0]]])
    assert len(data) == sum(i["samples"] for i in infos) > 0
    # the labels move the arm toward the cube from where the policy put it: not the executed chunk's rows
    assert np.abs(data.action[:, :5] - data.chunks[0, 0, :5]).max() > 1e-3


def test_train_correction_records_the_demonstrations_and_refuses_on_policy_without_a_head(tmp_path, capsys):
    """The head's record names how each demonstration set was generated (the expert's aim: the head learns the
    demonstrator's grasp point); --on-policy needs a head to roll out and says so."""
    from effvla_ros.commands import train_correction
    from effvla_ros.sim import dataset as sim_dataset

    demos = tmp_path / "demos"
    sim_dataset.generate(demos, 1, image_size=64, seed=9, max_steps=30, keep_failed=True, aim_offset=(0.0, -0.008))
    p = argparse.ArgumentParser()
    train_correction.add_arguments(p)
    threads = torch.get_num_threads()
    try:
        args = p.parse_args(["--checkpoint", str(CKPT), "--demos", str(demos), "--out", str(tmp_path / "head"),
                             "--steps", "3", "--batch", "16", "--dims", "0,1,2,3,4", "--threads", "1",
                             "--setting", "pruning.keep_ratio=0.5+num_steps=2"])
        assert train_correction.run(args) == 0
        rec = json.loads((tmp_path / "head" / HEAD_META).read_text())["trained"]
        assert rec["demo_sets"] == [{"dir": str(demos), "episodes": 1, "base_seed": 9, "aim_offset": [0.0, -0.008],
                                     "perturb": False, "regrasp": False}]
        bare = tmp_path / "bare"  # a checkpoint without a head
        shutil.copytree(CKPT, bare, ignore=shutil.ignore_patterns("eval_*.json", "train_log*.json", "correction_head*"))
        args = p.parse_args(["--checkpoint", str(bare), "--demos", str(demos), "--on-policy", "2"])
        assert train_correction.run(args) == 2
        assert "--on-policy runs the head beside --checkpoint" in capsys.readouterr().err
    finally:
        torch.set_num_threads(threads)
