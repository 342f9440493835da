"""A rosbag2 recording of the simulated task (``effvla_ros/sim/bag.py``): read back by an independent MCAP reader,
and calibrated by ``effvla calibrate-budget`` with the bundled checkpoint whose cameras it records."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mujoco")


def test_demo_bag_round_trip_and_calibration(tmp_path: Path) -> None:
    from mcap.reader import make_reader

    from effvla_ros.core.budget import BudgetTable
    from effvla_ros.graph import default_checkpoint
    from effvla_ros.sim.bag import write_demo_bag

    bag = write_demo_bag(tmp_path / "bag", [5000], image_size=64, max_steps=12)
    files = list(bag.glob("*.mcap"))
    assert len(files) == 1 and (bag / "metadata.yaml").is_file()
    counts: dict[str, int] = {}
    stamps: dict[str, list[int]] = {}
    with files[0].open("rb") as f:
        reader = make_reader(f)
        for _schema, channel, message in reader.iter_messages():
            counts[channel.topic] = counts.get(channel.topic, 0) + 1
            stamps.setdefault(channel.topic, []).append(message.log_time)
    assert counts["/camera/scene/image_raw"] == counts["/camera/wrist/image_raw"] == counts["/joint_states"] == 12
    assert counts["/instruction"] == 1
    cam = stamps["/camera/scene/image_raw"]
    assert cam == sorted(cam) and all(95e6 < b - a < 105e6 for a, b in zip(cam, cam[1:]))  # 10 Hz
    table = tmp_path / "table.yaml"
    proc = subprocess.run([sys.executable, "-m", "effvla_ros.cli", "calibrate-budget", str(bag), "--checkpoint",
                           str(default_checkpoint()), "--out", str(table), "--grid", "num_steps=10,3", "--quiet",
                           "--warmup", "1"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    t = BudgetTable.load(table)
    assert [e.name for e in t.entries][0] == "baseline" and len(t.entries) == 3
    assert t.source["observations"] >= 10 and t.source["backend"] == "eager"
    few = next(e for e in t.entries if e.overrides.get("inference.num_steps") == 3)
    assert few.deviation > 0  # 3 steps move the real task's actions
