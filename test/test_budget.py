"""Latency-budget mode (core/budget.py, `effvla calibrate-budget`): the controller's choice on a synthetic
latency model, the table file, the overrides applied to the node's configs, and the calibration on a real bag."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from effvla_ros.core.budget import BudgetController, BudgetEntry, BudgetTable, apply_overrides
from effvla_ros.core.compression.pruning import PruningConfig
from effvla_ros.core.early_exit import EarlyExitConfig, ExpertReuseConfig
from effvla_ros.core.rtc import RTCConfig
from effvla_ros.core.runner import InferenceConfig

TABLE = BudgetTable([
    BudgetEntry("baseline", {}, latency_ms=400.0, deviation=0.0),
    BudgetEntry("keep0.5", {"pruning.keep_ratio": 0.5}, latency_ms=250.0, deviation=0.05),
    BudgetEntry("steps5", {"num_steps": 5}, latency_ms=260.0, deviation=0.04),
    BudgetEntry("keep0.25+steps5", {"pruning.keep_ratio": 0.25, "num_steps": 5}, latency_ms=120.0, deviation=0.15),
])


def _run(controller: BudgetController, load: list[float], rng: np.random.Generator) -> list[tuple[str, float, bool]]:
    """Closed loop on a latency model: measured = calibrated x load x noise (lognormal, 5 %)."""
    out = []
    for f in load:
        c = controller.choose()
        measured = c.entry.latency_ms * f * float(rng.lognormal(0.0, 0.05))
        controller.observe(c.entry.name, measured)
        out.append((c.entry.name, measured, c.feasible))
    return out


def test_least_deviation_within_the_budget_and_tracking_a_slowdown() -> None:
    ctl = BudgetController(TABLE, 300.0)
    first = ctl.choose()
    assert first.feasible and first.entry.name == "steps5" and first.margin_ms == pytest.approx(40.0)  # least deviation
    # a competing load doubles every latency from step 40 on, then goes away at step 120
    load = [1.0] * 40 + [2.0] * 80 + [1.0] * 80
    steps = _run(ctl, load, np.random.default_rng(0))
    measured = np.array([m for _, m, _ in steps])
    assert {n for n, _, _ in steps[5:40]} == {"steps5"}
    assert {n for n, _, _ in steps[45:120]} == {"keep0.25+steps5"}  # the only one within 300 ms at x2
    assert np.mean(measured <= 300.0) >= 0.95  # p95 within budget: the step that meets the slowdown first is over
    assert all(n == "steps5" for n, _, _ in steps[-20:])  # back to the better setting once the load is gone


def test_when_no_setting_can_meet_the_budget_it_says_so_and_takes_the_fastest() -> None:
    ctl = BudgetController(TABLE, 300.0)
    steps = _run(ctl, [3.0] * 30, np.random.default_rng(1))
    assert not steps[-1][2] and steps[-1][0] == "keep0.25+steps5"
    assert "no setting meets 300 ms" in ctl.last.describe() and "keep0.25+steps5" in ctl.last.describe()
    assert ctl.slowdown == pytest.approx(3.0, rel=0.15)
    with pytest.raises(ValueError, match="latency_budget_ms"):
        BudgetController(TABLE, 0.0)


def test_a_planning_margin_chooses_below_the_budget() -> None:
    # steps5 (260 ms) is within 300 ms but not within 300 x (1 - 0.2) = 240 ms: the margin moves to keep0.25+steps5
    assert BudgetController(TABLE, 300.0).choose().entry.name == "steps5"
    ctl = BudgetController(TABLE, 300.0, margin=0.2)
    c = ctl.choose()
    assert ctl.target_ms == pytest.approx(240.0) and c.feasible and c.entry.name == "keep0.25+steps5"
    assert c.margin_ms == pytest.approx(180.0)  # still reported against the budget itself
    assert not BudgetController(TABLE, 130.0, margin=0.1).choose().feasible  # 120 ms > 117 ms
    with pytest.raises(ValueError, match="latency_budget_margin"):
        BudgetController(TABLE, 300.0, margin=1.0)


def test_overrides_change_only_the_budget_fields() -> None:
    configs = {"pruning": PruningConfig(keep_ratio=0.7, min_tokens=6), "early_exit": EarlyExitConfig(),
               "expert_reuse": ExpertReuseConfig(threshold=0.2), "inference": InferenceConfig(num_steps=10),
               "rtc": RTCConfig(max_guidance_weight=5.0)}
    out = apply_overrides(configs, {"pruning.keep_ratio": 0.25, "num_steps": 5, "expert_reuse.enabled": True})
    assert out["pruning"].keep_ratio == 0.25 and out["pruning"].min_tokens == 6
    assert out["inference"].num_steps == 5 and out["expert_reuse"].enabled and out["expert_reuse"].threshold == 0.2
    assert out["rtc"] is configs["rtc"] and out["early_exit"] is configs["early_exit"]
    with pytest.raises(ValueError, match="keep_ratio"):
        apply_overrides(configs, {"pruning.keep_ratio": 7.0})


def test_table_file_round_trip_and_errors_name_the_file(tmp_path: Path) -> None:
    p = TABLE.save(tmp_path / "t.yaml")
    back = BudgetTable.load(p)
    assert [(e.name, e.latency_ms, e.overrides) for e in back.entries] == [
        (e.name, e.latency_ms, e.overrides) for e in TABLE.entries]
    with pytest.raises(ValueError, match=r"latency_budget_table: .*missing\.yaml does not exist"):
        BudgetTable.load(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("entries: [unclosed")
    with pytest.raises(ValueError, match="is not YAML"):
        BudgetTable.load(tmp_path / "bad.yaml")
    (tmp_path / "rtc.yaml").write_text("version: 1\nentries:\n- {name: a, overrides: {rtc.enabled: true}, "
                                       "latency_ms: 10, deviation: 0}\n")
    with pytest.raises(ValueError, match=r"rtc\.enabled.*not a budget setting"):
        BudgetTable.load(tmp_path / "rtc.yaml")
    with pytest.raises(ValueError, match="latency_ms"):
        BudgetTable([BudgetEntry("a", {}, latency_ms=-1.0, deviation=0.0)])


def test_calibrate_budget_on_a_recorded_bag(tmp_path: Path) -> None:
    """`effvla calibrate-budget` (a real process) on a rosbag2 recording: one row per grid combination plus the
    unconstrained baseline, whose deviation is 0; pruning and fewer steps move the actions; the table loads and
    drives a controller."""
    sys.path.insert(0, str(Path(__file__).parent))
    from effvla_ros.replay.synthetic import write_episode_bag

    from model_fixtures import write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(tmp_path / "ckpt")
    bag = write_episode_bag(tmp_path / "bag", storage="mcap", cameras={"/camera/camera1/image_raw": 5.0,
                                                                       "/camera/camera2/image_raw": 5.0},
                            duration=1.2)
    out = tmp_path / "table.yaml"
    proc = subprocess.run([sys.executable, "-m", "effvla_ros.cli", "calibrate-budget", str(bag), "--checkpoint",
                           str(ckpt), "--out", str(out), "--grid", "pruning.keep_ratio=0.5,0.25", "--grid",
                           "num_steps=10,3", "--quiet"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    table = BudgetTable.load(out)
    names = [e.name for e in table.entries]
    assert names[0] == "baseline" and len(names) == 5
    base = table.entries[0]
    assert base.deviation == 0.0 and base.overrides == {}
    assert all(e.latency_ms > 0 and math.isfinite(e.latency_ms) for e in table.entries)
    assert all(e.deviation > 0 for e in table.entries[1:])  # pruning / fewer steps change the actions
    few = [e for e in table.entries if e.overrides.get("inference.num_steps") == 3]
    assert len(few) == 2 and table.source["observations"] >= 3
    ctl = BudgetController(table, max(e.latency_ms for e in table.entries) * 2)
    assert ctl.choose().entry.name == "baseline"  # a loose budget keeps the unconstrained policy


def test_entries_apply_from_the_baseline_they_were_calibrated_on() -> None:
    """An entry that does not turn a technique on runs without it, whatever the node's parameters enable (the table
    was measured so); the fields it does not set keep the node's values."""
    configs = {"pruning": PruningConfig(method="task", keep_ratio=0.4), "early_exit": EarlyExitConfig(),
               "expert_reuse": ExpertReuseConfig(enabled=True, threshold=0.2), "inference": InferenceConfig(num_steps=8)}
    base = apply_overrides(configs, {}, from_baseline=True)
    assert base["pruning"].method == "none" and not base["expert_reuse"].enabled and base["inference"].num_steps == 8
    on = apply_overrides(configs, {"pruning.method": "task", "pruning.keep_ratio": 0.25, "expert_reuse.enabled": True},
                         from_baseline=True)
    assert on["pruning"].method == "task" and on["pruning"].keep_ratio == 0.25 and on["expert_reuse"].threshold == 0.2


def test_a_field_implies_its_groups_switch_and_values_are_checked_at_load(tmp_path: Path) -> None:
    """A hand-written entry {pruning.keep_ratio: 0.25} prunes (the switch is implied, as in a --sweep) unless the
    entry sets the switch itself; an out-of-range value is refused when the table loads, naming the entry."""
    from effvla_ros.core.compression.compressor import ReuseConfig

    configs = {"pruning": PruningConfig(), "reuse": ReuseConfig(enabled=True, keyframe_interval=8),
               "inference": InferenceConfig(num_steps=10)}
    out = apply_overrides(configs, {"pruning.keep_ratio": 0.25, "reuse.keyframe_interval": 30}, from_baseline=True)
    assert out["pruning"].method == "task" and out["pruning"].keep_ratio == 0.25
    assert out["reuse"].enabled and out["reuse"].keyframe_interval == 30
    off = apply_overrides(configs, {"reuse.enabled": False, "reuse.keyframe_interval": 30}, from_baseline=True)
    assert not off["reuse"].enabled and off["pruning"].method == "none"
    (tmp_path / "range.yaml").write_text("version: 1\nentries:\n- {name: tiny, overrides: {pruning.keep_ratio: 0.001}, "
                                         "latency_ms: 10, deviation: 0}\n")
    with pytest.raises(ValueError, match=r"entries\[tiny\].*keep_ratio"):
        BudgetTable.load(tmp_path / "range.yaml")


def test_the_last_measurement_moves_the_next_choice() -> None:
    """One inference slower than the window's percentile (a load that just began) changes the very next choice."""
    table = BudgetTable([BudgetEntry("full", {}, latency_ms=100.0, deviation=0.0),
                         BudgetEntry("fast", {"num_steps": 3}, latency_ms=40.0, deviation=0.1)])
    ctl = BudgetController(table, 120.0, window=20)
    for _ in range(19):
        ctl.observe("full", 100.0)
    assert ctl.choose().entry.name == "full"
    ctl.observe("full", 250.0)  # 2.5x: one of 20, below the 95th percentile's reach
    assert float(np.percentile([1.0] * 19 + [2.5], 95)) < 1.2
    choice = ctl.choose()
    assert choice.entry.name == "fast" and choice.slowdown == pytest.approx(2.5)
    for _ in range(20):
        ctl.observe("fast", 40.0)  # the load left: the window forgets it
    assert ctl.choose().entry.name == "full"
