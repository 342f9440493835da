"""Offline replay (issue 8): bags written with rosbags (MCAP + sqlite3), observations, settings, reports.

Uses the tiny random SmolVLA checkpoint (cameras camera1/camera2, 48x64 images, chunk 10 x 6).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from effvla_ros.replay.bagio import BagError, open_bag
from effvla_ros.replay.observations import ObservationOptions, build_episode
from effvla_ros.replay.pipeline import ReplayConfig, run_replay, strip_timings
from effvla_ros.replay.settings import build_settings, make_setting, parse_replay_sweep
from effvla_ros.replay.synthetic import frame_image, write_episode_bag

CAMS = ["camera1", "camera2"]
START = 100.0


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):  # type: ignore[no-untyped-def]
    """One torch thread (conftest.py)."""


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model_fixtures import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def policy(ckpt: Path):  # type: ignore[no-untyped-def]
    from effvla_ros.core.smolvla import RuntimeConfig, load_policy

    return load_policy(str(ckpt), runtime=RuntimeConfig())


@pytest.fixture(scope="module")
def bags(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bags")
    return {
        "mcap": write_episode_bag(d / "mcap", storage="mcap", out_of_order=True, chunks={"rate": 2.0}),
        "sqlite3": write_episode_bag(d / "sqlite3", storage="sqlite3"),
    }


def test_mcap_and_sqlite3_two_rates_out_of_order(bags: dict[str, Path]) -> None:
    episodes = {}
    for kind, path in bags.items():
        bag = open_bag(path)
        assert bag.storage == kind and not bag.recovered
        assert bag.topics["/camera/camera1/image_raw"].count == 20  # 10 Hz
        assert bag.topics["/camera/camera2/image_raw"].count == 10  # 5 Hz
        ep = build_episode(bag, CAMS, 6, ObservationOptions(mode="frames"))
        episodes[kind] = ep
        assert ep.stats["anchor_camera"] == "camera2"  # the slower camera defines the observations
        assert ep.stats["observations"] == 10
        stamps = [o.stamp_ns for o in ep.observations]
        assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
        for o in ep.observations:
            fs = [f.stamp_ns for f in o.frames.values()]
            assert o.stamp_ns == max(fs) and max(fs) - min(fs) <= 0.05e9
            for ci, cam in enumerate(CAMS):  # the matched image is the frame of that stamp
                fr = o.frames[cam]
                expect = frame_image(fr.stamp_ns * 1e-9 - START - 0.003 * ci, 48, 64, ci)
                np.testing.assert_array_equal(ep.image(fr), expect)
            # newest joint state at or before the observation (states at START - 0.05 + k / 20)
            k = int(np.floor((o.stamp + 0.05 - START) * 20 + 1e-9))
            t_js = START - 0.05 + k / 20
            assert t_js <= o.stamp + 1e-9
            np.testing.assert_allclose(o.state, [0.2 * np.sin(0.7 * (t_js - START) + i) for i in range(6)], atol=1e-6)
            assert o.instruction == "pick up the red cube"
    assert episodes["mcap"].stats["out_of_order"]["/camera/camera1/image_raw"] > 0
    assert episodes["sqlite3"].stats["out_of_order"]["/camera/camera1/image_raw"] == 0
    assert sum(o.recorded is not None for o in episodes["mcap"].observations) == 4  # chunks of those frames
    assert [o.stamp_ns for o in episodes["mcap"].observations] == [o.stamp_ns for o in episodes["sqlite3"].observations]
    # chunks mode: the recorded ActionChunks' stamps are the observation times
    ep = build_episode(open_bag(bags["mcap"]), CAMS, 6, ObservationOptions())
    assert ep.stats["mode"] == "chunks" and ep.stats["observations"] == 4
    assert all(o.recorded is not None and o.recorded.stamp_ns == o.stamp_ns for o in ep.observations)


def test_joint_state_paired_as_the_policy_node_does(tmp_path: Path) -> None:
    """The state is the newest JointState at or before the images and at most state_stamp_tolerance_s
    older (the node's rule, core.observation.state_at); before, replay took any older one."""
    bag = write_episode_bag(tmp_path / "slow_js", storage="sqlite3", joint_rate=5.0)  # a state every 0.2 s
    # observations at camera2's frames START + j/5 + 0.003; the newest state before each is 0.053 s older
    with pytest.raises(BagError, match="'unsynced_state': 10.*--state-stamp-tolerance"):
        build_episode(open_bag(bag), CAMS, 6, ObservationOptions(mode="frames"))
    for tol in (0.06, 0.0):  # 0: no limit
        ep = build_episode(open_bag(bag), CAMS, 6, ObservationOptions(mode="frames", state_stamp_tolerance_s=tol))
        assert ep.stats["observations"] == 10 and ep.stats["skipped"]["unsynced_state"] == 0
        assert ep.stats["state_stamp_tolerance_s"] == tol
        for o in ep.observations:
            t_js = o.stamp - 0.053
            np.testing.assert_allclose(o.state, [0.2 * np.sin(0.7 * (t_js - START) + i) for i in range(6)], atol=1e-6)
    # joints picked by name, as the node: a missing one is named
    names = ["shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "x"]
    with pytest.raises(BagError, match=r"lack joints \['x'\] of the state .* they have \['elbow_flex', 'gripper', "):
        build_episode(open_bag(bag), CAMS, 6, ObservationOptions(mode="frames", state_joint_names=names))


def test_clear_errors(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a bag")
    with pytest.raises(BagError, match="not a rosbag2"):
        open_bag(text)
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(BagError, match="not a rosbag2 directory"):
        open_bag(tmp_path / "emptydir")
    with pytest.raises(FileNotFoundError):
        open_bag(tmp_path / "nope")
    no_img = write_episode_bag(tmp_path / "noimg", cameras={})
    with pytest.raises(BagError, match=r"no camera topic \(sensor_msgs/msg/Image or sensor_msgs/msg/CompressedImage\)"):
        build_episode(open_bag(no_img), CAMS, 6, ObservationOptions())
    bare = write_episode_bag(tmp_path / "bare", instruction=None, include_joint_states=False)
    with pytest.raises(BagError, match="--state"):
        build_episode(open_bag(bare), CAMS, 6, ObservationOptions())
    with pytest.raises(BagError, match="--instruction"):
        build_episode(open_bag(bare), CAMS, 6, ObservationOptions(state=[0.0] * 6))
    ep = build_episode(open_bag(bare), CAMS, 6, ObservationOptions(state=[0.1] * 6, instruction="stack"))
    assert ep.observations and all(o.instruction == "stack" for o in ep.observations)
    other = write_episode_bag(tmp_path / "other", cameras={"/front/image_raw": 5.0})
    with pytest.raises(BagError, match="--camera"):
        build_episode(open_bag(other), CAMS, 6, ObservationOptions())
    ep = build_episode(open_bag(other), CAMS, 6, ObservationOptions(cameras={"camera1": "/front/image_raw"}))
    assert ep.missing_cameras == ["camera2"] and ep.stats["observations"] == 10


def test_cli_errors(tmp_path: Path, bags: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    from effvla_ros.cli import main

    text = tmp_path / "x.bag"
    text.write_text("hello")
    with pytest.raises(SystemExit) as e:
        main(["replay", str(text), "--checkpoint", str(tmp_path)])
    assert e.value.code == 2
    assert "not a rosbag2" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["replay", str(bags["sqlite3"]), "--checkpoint", str(tmp_path), "--sweep", "pruning.bogus=1"])
    assert e.value.code == 2
    assert "pruning.bogus: unknown parameter" in capsys.readouterr().err


def test_settings_parsing() -> None:
    """Replay's side of the shared grammar (test_settings_core.py has the rest)."""
    sw = parse_replay_sweep(["pruning.keep_ratio=0.25,0.5", "reuse.enabled=true,false",
                             "early_exit.thresholds=0.9:0.95"])
    assert [[c for _, c in item] for item in sw] == [
        [{"pruning.keep_ratio": 0.25}, {"pruning.keep_ratio": 0.5}], [{"reuse.enabled": True}, {"reuse.enabled": False}],
        [{"early_exit.thresholds": [0.9, 0.95]}]]
    one = build_settings(sw, defaults={"num_steps": 10})
    assert [s.name for s in one][:3] == ["baseline", "pruning.keep_ratio=0.25", "pruning.keep_ratio=0.5"]
    assert len(one) == 1 + 2 + 2 + 1
    assert len(build_settings(sw, defaults={"num_steps": 10}, mode="product")) == 1 + 2 * 2 * 1
    base = one[0]
    assert base.pruning.method == "none" and not base.reuse.enabled and not base.rtc.enabled
    assert not base.early_exit.enabled and not base.expert_reuse.enabled and base.inference.num_steps == 10
    s = make_setting("x", {"pruning.keep_ratio": 0.25}, {"num_steps": 10})
    assert s.pruning.method == "task" and s.implied == ["pruning.method=task"]
    assert make_setting("y", {"rtc.schedule": "linear"}).rtc.enabled
    for bad in ("pruning.bogus=1", "nothing=1", "pruning.keep_ratio=abc", "pruning.keep_ratio", "delay_steps=1"):
        with pytest.raises(ValueError):
            parse_replay_sweep([bad])
    with pytest.raises(ValueError, match="keep_ratio"):
        make_setting("z", {"pruning.keep_ratio": 7.0})  # validated by PruningConfig
    from effvla_ros.replay.settings import target_overrides

    over, pol, execp = target_overrides("orin_nano_8gb")  # config/base.yaml < config/targets/orin_nano_8gb.yaml
    assert {"pruning.keep_ratio", "reuse.enabled", "early_exit.enabled", "num_steps"} <= set(over)
    t = make_setting("target:orin_nano_8gb", over, {"num_steps": 10})
    assert t.pruning.keep_ratio == over["pruning.keep_ratio"] and t.inference.num_steps == over["num_steps"]
    assert execp["joint_names"] and "fps" in pol


def _cfg(bag: Path, ckpt: Path, sweep: list[str], steps: int, flops: str = "off") -> ReplayConfig:
    return ReplayConfig(bag=str(bag), checkpoint=str(ckpt), sweep=sweep, flops=flops, progress=False, num_steps=2,
                        observations=ObservationOptions(max_steps=steps, mode="frames"))


def test_golden_determinism(bags: dict[str, Path], ckpt: Path, policy, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from effvla_ros.replay.report import write_outputs

    sweep = ["reuse.enabled=true", "rtc.enabled=true"]
    r1 = run_replay(_cfg(bags["mcap"], ckpt, sweep, 2), policy=policy)
    r2 = run_replay(_cfg(bags["mcap"], ckpt, sweep, 2), policy=policy)
    j1 = json.loads(json.dumps(strip_timings(r1.report)))
    j2 = json.loads(json.dumps(strip_timings(r2.report)))
    assert j1 == j2
    for a, b in zip(r1.runs, r2.runs):
        np.testing.assert_array_equal(a.actions, b.actions)
    assert "latency_ms" not in j1["settings"][0] and "latency_ms" in r1.report["settings"][0]
    names = [s["name"] for s in r1.report["settings"]]
    assert r1.report["settings"][0]["denoising_steps"]["mean"] == 2
    assert names == ["baseline", "reuse.enabled=true", "rtc.enabled=true"]
    rtc = r1.report["settings"][2]
    assert rtc["rtc"]["guided_chunks"] == 1  # every chunk after the first is guided
    assert r1.report["settings"][1]["tokens"]["reused_per_step"] > 0  # reuse happened on later frames
    paths = write_outputs(r1, tmp_path / "out", plots=False)
    assert json.loads(paths["json"].read_text())["settings"][0]["name"] == "baseline"
    md = paths["md"].read_text()
    assert "| baseline |" in md and "| rtc.enabled=true |" in md


def test_sweep_changes_what_it_should(bags: dict[str, Path], ckpt: Path, policy, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from effvla_ros.replay.report import write_outputs

    res = run_replay(_cfg(bags["sqlite3"], ckpt, ["pruning.keep_ratio=0.25,1.0"], 2, flops="separate"), policy=policy)
    by = {s["name"]: s for s in res.report["settings"]}
    base, low, full = by["baseline"], by["pruning.keep_ratio=0.25"], by["pruning.keep_ratio=1.0"]
    assert base["deviation_vs_baseline"]["nrmse"] == 0.0 and base["deviation_vs_baseline"]["max_abs"] == 0.0
    assert low["implied"] == ["pruning.method=task"]
    assert low["tokens"]["kept_per_step"] < full["tokens"]["kept_per_step"] == full["tokens"]["total_per_step"]
    assert low["deviation_vs_baseline"]["nrmse"] > full["deviation_vs_baseline"]["nrmse"]
    assert len(low["deviation_vs_baseline"]["nrmse_per_joint"]) == 6
    assert low["flops_per_step"]["prefill"] < base["flops_per_step"]["prefill"]
    assert 0 < low["flops_per_step"]["fraction_of_baseline"] < 1.0
    assert all(s["flops_pass_identical"] for s in res.report["settings"])
    assert base["smoothness"]["samples"] > 0 and base["smoothness"]["verdicts"].get("accepted") == 2
    assert res.report["settings"][0]["deviation_vs_recorded"] is None  # no ActionChunks in this bag
    paths = write_outputs(res, tmp_path / "out", plots=True)
    assert (tmp_path / "out" / "compute_vs_deviation.png").stat().st_size > 1000
    assert any(p.name.startswith("actions_pruning.keep_ratio=0.25") for p in (tmp_path / "out").iterdir())
    assert "pruning.keep_ratio=0.25" in paths["md"].read_text()


def test_replay_on_another_backend(bags: dict[str, Path], ckpt: Path, policy) -> None:  # type: ignore[no-untyped-def]
    """--backend: the replay (and so calibrate-budget) measures on the stage backend the nodes run; the packed
    backend's fp32 actions match the eager ones, and the report names the backend and dtypes; a backend that
    cannot run a setting is refused naming the parameter."""
    import dataclasses

    from effvla_ros.core.backends.base import CapabilityError

    cfg = _cfg(bags["sqlite3"], ckpt, ["pruning.keep_ratio=0.5"], 2)
    eager = run_replay(cfg, policy=policy)
    packed = run_replay(dataclasses.replace(cfg, backend="packed"), policy=policy)
    assert packed.report["replay"]["backend"] == "packed" and eager.report["replay"]["backend"] == "eager"
    assert packed.report["replay"]["dtypes"] == {"vision": "float32", "vlm": "float32", "expert": "float32"}
    for a, b in zip(eager.runs, packed.runs, strict=True):
        np.testing.assert_allclose(b.actions, a.actions, atol=1e-4)
    with pytest.raises(CapabilityError, match="expert_reuse"):
        run_replay(dataclasses.replace(cfg, backend="cudagraph", sweep=["expert_reuse.enabled=true"]), policy=policy)
