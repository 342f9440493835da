"""The one --sweep grammar of `effvla replay` and `effvla eval-sim` (effvla_ros.core.settings)."""
from __future__ import annotations

import argparse

import pytest

from effvla_ros.core.settings import BASELINE_OFF, build_settings, make_setting, parse_item, parse_sweep


def test_values_lists_and_joined_changes() -> None:
    assert parse_item("pruning.keep_ratio=0.25,0.5") == [("pruning.keep_ratio=0.25", {"pruning.keep_ratio": 0.25}),
                                                          ("pruning.keep_ratio=0.5", {"pruning.keep_ratio": 0.5})]
    assert parse_item("early_exit.thresholds=0.9:0.95") == [
        ("early_exit.thresholds=0.9:0.95", {"early_exit.thresholds": [0.9, 0.95]})]
    assert parse_item("early_exit.thresholds=0.9;0.95")[0][1] == {"early_exit.thresholds": [0.9, 0.95]}  # old ';'
    assert parse_item("early_exit.exit_layers=2:4")[0][1] == {"early_exit.exit_layers": [2, 4]}  # ints stay ints
    assert parse_item("early_exit.thresholds=0.9:0.95,0.8")[1][1] == {"early_exit.thresholds": [0.8]}
    assert parse_item(" rtc.enabled = true + delay_steps = 2 ") == [
        ("rtc.enabled=true+delay_steps=2", {"rtc.enabled": True, "exec.delay_steps": 2})]
    assert parse_item("rtc.max_guidance_weight=1e+1")[0][1] == {"rtc.max_guidance_weight": 10.0}  # '+' of a number
    assert parse_item("num_steps=5")[0][1] == {"inference.num_steps": 5}  # short names
    assert parse_item("reuse.enabled=on,no")[1][1] == {"reuse.enabled": False}


@pytest.mark.parametrize("item, match", [
    ("pruning.bogus=1", "pruning.bogus: unknown parameter of PruningConfig"),
    ("nothing=1", "unknown setting"),
    ("bogus.field=1", "unknown setting"),
    ("pruning.keep_ratio=abc", "not a valid float"),
    ("rtc.enabled=maybe", "not a boolean"),
    ("num_steps=2.5", "not a valid int"),
    ("pruning.keep_ratio", "expected NAME=V1,V2"),
    ("pruning.keep_ratio=", "expected NAME=V1,V2"),
    ("rtc.enabled=true+reuse.threshold=0.1,0.2", "one value per name"),
])
def test_bad_items_say_what_is_wrong(item: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_sweep([item])


def test_baseline_defaults_implied_switches_and_validation() -> None:
    base = make_setting("baseline", {}, {"num_steps": 3, "count_flops": True})
    assert base.is_baseline and base.inference.num_steps == 3 and base.inference.count_flops
    assert base.pruning.method == "none" and not base.reuse.enabled and not base.rtc.enabled
    assert not base.early_exit.enabled and not base.expert_reuse.enabled and base.exec_params() == (0, 0)
    s = make_setting("x", {"pruning.keep_ratio": "0.25"}, {"num_steps": 3})
    assert s.pruning.method == "task" and s.implied == ["pruning.method=task"]
    assert s.overrides == {"pruning.keep_ratio": 0.25, "pruning.method": "task"}  # defaults are no overrides
    assert s.effective_changes() == {**BASELINE_OFF, "pruning.method": "task", "pruning.keep_ratio": 0.25}
    off = make_setting("y", {"reuse.threshold": 0.1, "reuse.enabled": False})
    assert not off.reuse.enabled and off.reuse.threshold == 0.1 and off.implied == []
    assert make_setting("z", {"exec.horizon": 3}).exec_params() == (3, 0)
    assert make_setting("n", {"num_steps": 7}, {"num_steps": 3}).inference.num_steps == 7  # a change beats a default
    with pytest.raises(ValueError, match="keep_ratio"):
        make_setting("bad", {"pruning.keep_ratio": 7.0})  # validated by PruningConfig
    with pytest.raises(ValueError, match="delay_steps"):
        make_setting("bad", {"exec.delay_steps": -1})


def test_one_at_a_time_product_names_and_duplicates() -> None:
    items = ["pruning.keep_ratio=0.25,0.5", "reuse.enabled=true", "rtc.enabled=true+delay_steps=2"]
    one = build_settings(items, defaults={"num_steps": 4})
    assert [s.name for s in one] == ["baseline", "pruning.keep_ratio=0.25", "pruning.keep_ratio=0.5",
                                     "reuse.enabled=true", "rtc.enabled=true+delay_steps=2"]
    assert all(s.inference.num_steps == 4 for s in one)
    prod = build_settings(parse_sweep(items), mode="product")
    assert [s.name for s in prod][1:] == [
        "pruning.keep_ratio=0.25+reuse.enabled=true+rtc.enabled=true+delay_steps=2",
        "pruning.keep_ratio=0.5+reuse.enabled=true+rtc.enabled=true+delay_steps=2"]
    assert prod[2].pruning.keep_ratio == 0.5 and prod[2].reuse.enabled and prod[2].rtc.enabled
    assert prod[2].exec_params() == (0, 2)
    dup = build_settings(["reuse.enabled=true", "reuse.enabled=true,false"])
    assert [s.name for s in dup] == ["baseline", "reuse.enabled=true", "reuse.enabled=false"]
    extra = build_settings([], extra=[("target:x", {"num_steps": 2, "pruning.keep_ratio": 0.5})])
    assert [s.name for s in extra] == ["baseline", "target:x"] and extra[1].pruning.method == "task"
    with pytest.raises(ValueError, match="sweep mode"):
        build_settings(items, mode="all")


def test_replay_rejects_eval_sim_only_names() -> None:
    from effvla_ros.replay.settings import parse_replay_sweep

    assert parse_replay_sweep(["num_steps=2,3"])[0][1][1] == {"inference.num_steps": 3}
    with pytest.raises(ValueError, match="exec.delay_steps: eval-sim only"):
        parse_replay_sweep(["rtc.enabled=true+delay_steps=2"])
    with pytest.raises(ValueError, match="--flops"):
        parse_replay_sweep(["count_flops=true"])


def test_eval_settings_apply_the_run_defaults() -> None:
    from effvla_ros.core.runner import InferenceConfig
    from effvla_ros.train.evaluate import eval_settings

    settings = eval_settings(["num_steps=5", "horizon=3"], horizon=4, delay_steps=1, count_flops=True)
    base, steps, horizon = settings
    assert base.inference.num_steps == InferenceConfig().num_steps  # 0: the config's default, as before
    assert base.exec_params() == (4, 1) and base.inference.count_flops
    assert steps.name == "num_steps=5" and steps.inference.num_steps == 5 and steps.exec_params() == (4, 1)
    assert horizon.exec_params() == (3, 1) and horizon.effective_changes() == {**BASELINE_OFF, "exec.horizon": 3}
    assert eval_settings([], num_steps=2)[0].inference.num_steps == 2


@pytest.mark.parametrize("module", ["effvla_ros.commands.replay", "effvla_ros.commands.eval_sim"])
def test_both_commands_document_the_same_grammar(module: str) -> None:
    import importlib

    p = argparse.ArgumentParser()
    importlib.import_module(module).add_arguments(p)
    sweep = next(a for a in p._actions if a.dest == "sweep")
    assert "a:b:c" in sweep.help and "NAME=V+NAME=V" in sweep.help
    extra = ["BAG", "--checkpoint", "C"] if module.endswith("replay") else ["--checkpoint", "C"]
    args = p.parse_args([*extra, "--sweep", "a=1", "b=2", "--sweep", "c=3", "--sweep-mode", "product"])
    assert args.sweep == ["a=1", "b=2", "c=3"] and args.sweep_mode == "product"
