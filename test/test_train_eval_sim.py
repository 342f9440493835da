"""`effvla eval-sim` / effvla_ros.train.evaluate with the committed checkpoint (structure, not success)."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch

from effvla_ros.core.settings import make_setting
from effvla_ros.train.evaluate import BASELINE, OUTCOMES, classify_outcome, eval_settings

CKPT = Path(__file__).resolve().parents[1] / "effvla_ros" / "assets" / "so101_pickplace"


def test_sweep_parsing_types_and_baseline():
    settings = eval_settings(["pruning.keep_ratio=0.5,0.25", "rtc.enabled=true+delay_steps=2", "num_steps=5"])
    assert [s.name for s in settings] == ["baseline", "pruning.keep_ratio=0.5", "pruning.keep_ratio=0.25",
                                          "rtc.enabled=true+delay_steps=2", "num_steps=5"]  # as written
    base = settings[0].configs()
    assert base["pruning"].method == "none" and base["reuse"].enabled is False
    assert base["early_exit"].enabled is False and base["expert_reuse"].enabled is False and not base["rtc"].enabled
    assert settings[2].configs()["pruning"].keep_ratio == 0.25
    assert settings[3].configs()["rtc"].enabled is True and settings[3].exec_params() == (0, 2)
    assert settings[4].configs()["inference"].num_steps == 5
    assert settings[1].configs()["pruning"].method == "task"  # changing a pruning field switches pruning on
    assert set(BASELINE) <= set(settings[1].effective_changes())
    off = eval_settings(["reuse.threshold=0.1+reuse.enabled=false"])[1].configs()["reuse"]
    assert off.enabled is False and off.threshold == 0.1
    with pytest.raises(ValueError, match="keep_ratio"):
        eval_settings(["pruning.keep_ratio=2"])
    with pytest.raises(ValueError):
        eval_settings(["bogus.field=1"])
    with pytest.raises(ValueError, match="boolean"):
        eval_settings(["rtc.enabled=maybe"])
    assert make_setting("x", {"exec.horizon": 3}).exec_params() == (3, 0)
    assert eval_settings(["early_exit.thresholds=0.9;0.95"])[1].early_exit.thresholds == [0.9, 0.95]  # old ';'
    assert eval_settings(["early_exit.thresholds=0.9:0.95"])[1].early_exit.thresholds == [0.9, 0.95]


def test_eval_sim_one_short_episode_reports_and_moves_the_arm(tmp_path):
    from effvla_ros.commands import eval_sim

    p = argparse.ArgumentParser()
    eval_sim.add_arguments(p)
    out = tmp_path / "report.json"
    args = p.parse_args(["--checkpoint", str(CKPT), "--episodes", "1", "--max-steps", "8", "--quiet",
                         "--sweep", "pruning.method=task", "--sweep", "rtc.enabled=true+delay_steps=2",
                         "--threads", "1", "--out", str(out)])
    threads = torch.get_num_threads()
    try:
        assert eval_sim.run(args) == 0
    finally:
        torch.set_num_threads(threads)
    rep = json.loads(out.read_text())
    names = [s["name"] for s in rep["settings"]]
    assert names == ["baseline", "pruning.method=task", "rtc.enabled=true+delay_steps=2"]
    assert rep["seeds"] == [100000]
    for s in rep["settings"]:
        assert s["episodes"] == 1 and 0 <= s["successes"] <= 1 and s["horizon"] == 5
        ep = s["episode_results"][0]
        assert 1 <= ep["steps"] <= 8
        assert ep["arm_motion"] > 0.01  # the policy's joint targets moved the arm
        assert ep["inferences"] == (ep["steps"] + 4) // 5  # one inference per 5 executed actions
        assert ep["outcome"] in OUTCOMES and s["outcomes"][ep["outcome"]] == 1 and sum(s["outcomes"].values()) == 1
        assert (ep["outcome"] == "success") == ep["success"]
        assert (ep["closes"] == 0) == (ep["outcome"] == "no_grasp" or math.isnan(ep["grasp_dist_target_cm"]))
        assert s["regrasp_episodes"] == int(ep["closes"] >= 2) and s["regrasp_successes"] <= s["regrasp_episodes"]
        per = s["per_inference"]
        assert per["total_tokens"] == 32 and per["encoder_flops"] > 0 and per["policy_s"] > 0
    base, pruned, rtc = rep["settings"]
    assert base["per_inference"]["kept_tokens"] == 32
    assert pruned["per_inference"]["kept_tokens"] < 32
    assert base["per_inference"]["guided"] == 0
    if rtc["episode_results"][0]["inferences"] > 1:
        assert rtc["per_inference"]["guided"] > 0  # every inference after the first is guided


def test_outcome_classification():
    nan = float("nan")
    assert classify_outcome(True, nan, nan, 0.0) == "success"
    assert classify_outcome(False, nan, nan, 0.0) == "no_grasp"  # the gripper never closed
    assert classify_outcome(False, 9.0, 1.5, 0.0) == "wrong_cube"
    assert classify_outcome(False, 2.0, 2.5, 0.0) == "not_lifted"  # at the instructed cube (nearer to it)
    assert classify_outcome(False, 5.0, 6.0, 0.0) == "missed"
    assert classify_outcome(False, 1.0, 8.0, 0.5) == "not_lifted"
    assert classify_outcome(False, 1.0, 8.0, 4.0) == "not_placed"


def test_eval_sim_on_another_backend_and_dtype(tmp_path):
    """--backend / --dtype: the same short episode on the packed backend in fp32 follows the eager one (same
    outcome, joint motion within float noise); in bf16 the report records the dtypes; an unknown backend is
    refused with exit 2."""
    from effvla_ros.commands import eval_sim

    p = argparse.ArgumentParser()
    eval_sim.add_arguments(p)
    reports = {}
    threads = torch.get_num_threads()
    try:
        for backend, dtype in (("eager", "float32"), ("packed", "float32"), ("packed", "bfloat16")):
            out = tmp_path / f"{backend}_{dtype}.json"
            args = p.parse_args(["--checkpoint", str(CKPT), "--episodes", "1", "--max-steps", "6", "--quiet",
                                 "--threads", "1", "--backend", backend, "--dtype", dtype, "--out", str(out)])
            assert eval_sim.run(args) == 0
            reports[backend, dtype] = json.loads(out.read_text())
        assert eval_sim.run(p.parse_args(["--checkpoint", str(CKPT), "--backend", "nope"])) == 2
    finally:
        torch.set_num_threads(threads)
    eager, packed, bf16 = (reports[k]["settings"][0]["episode_results"][0] for k in
                           (("eager", "float32"), ("packed", "float32"), ("packed", "bfloat16")))
    assert reports["packed", "float32"]["backend"] == "packed"
    assert reports["packed", "bfloat16"]["dtypes"] == ["bfloat16"] * 3
    assert packed["steps"] == eager["steps"] and packed["outcome"] == eager["outcome"]
    assert abs(packed["arm_motion"] - eager["arm_motion"]) < 1e-3
    assert bf16["steps"] >= 1 and bf16["arm_motion"] > 0.01


def test_eval_sim_delay_at_or_past_the_horizon_runs_back_to_back_and_holds_the_chunk_end():
    """A delay of E steps or more (the checkpoint's chunk: 10, horizon 5): inferences run back to back, one per
    delay, each chunk executed from row d; where row 2d - 1 is past the chunk's end, its last action is held."""
    from effvla_ros.core.smolvla import load_policy
    from effvla_ros.sim.env import SimConfig, TwoCubePickPlaceEnv
    from effvla_ros.train.evaluate import run_episode

    policy = load_policy(CKPT)
    env = TwoCubePickPlaceEnv(SimConfig(image_size=64, cameras=list(policy.arch.cameras)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = {d: run_episode(policy, env, 100000, make_setting(f"d{d}", {"exec.delay_steps": d}), max_steps=20)
                for d in (2, 5, 7)}
    finally:
        torch.set_num_threads(threads)
        env.close()
    for d, r in runs.items():
        assert r.steps == 20  # no success this early: every run is 20 steps long
        assert r.inferences == math.ceil(20 / max(5, d))
    assert runs[2].held_steps == 0 and runs[5].held_steps == 0  # rows up to 2d - 1 = 9 exist
    # d = 7: observations at 0, 7, 14. Chunk 0 (the first, from row 0) runs steps 0..13 = rows 0..13: rows 10..13
    # held (4 steps); chunk 1 arrives at step 14 and runs rows 7..12 until the episode ends at 19: rows 10..12
    # held (3 steps); chunk 2 would arrive at step 21
    assert runs[7].held_steps == 4 + 3
