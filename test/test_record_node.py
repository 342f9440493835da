"""Recorder node (issue 8) over real DDS: records what the test publishes, then the bag is replayed;
killed with SIGKILL mid-recording, the bag stays readable up to the last flush, and ``effvla bag repair``
turns it into a complete bag that rosbags and the ``mcap`` package's seeking reader open (issue 26);
SIGINT and SIGTERM finish the bag (summary, footer, metadata.yaml) as rosbag2 writes it."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from effvla_ros.replay.bagio import MCAP_MAGIC, open_bag
from effvla_ros.replay.observations import ObservationOptions, build_episode
from effvla_ros.replay.synthetic import frame_image

from ros_helpers import node_process, spinner, wait_for

H, W = 48, 64
JOINTS = ["shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper"]
TOPICS = ["/camera/camera1/image_raw", "/camera/camera2/image_raw", "/joint_states", "/instruction", "/action_chunk"]


def _stamp(t: float):  # type: ignore[no-untyped-def]
    from builtin_interfaces.msg import Time

    sec = int(np.floor(t))
    return Time(sec=sec, nanosec=int(round((t - sec) * 1e9)) % 1_000_000_000)


class Publisher:
    """Cameras (10 Hz and 5 Hz, best effort), joint states (reliable), latched instruction, chunks."""

    def __init__(self, sp) -> None:  # type: ignore[no-untyped-def]
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
        from sensor_msgs.msg import Image, JointState
        from std_msgs.msg import String

        from effvla_ros.msg import ActionChunk

        self.node = sp.node("test_publisher")
        self.img = {c: self.node.create_publisher(Image, f"/camera/{c}/image_raw", qos_profile_sensor_data)
                    for c in ("camera1", "camera2")}
        self.js = self.node.create_publisher(JointState, "/joint_states", 10)
        latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self.instr = self.node.create_publisher(String, "/instruction", latched)
        self.chunk = self.node.create_publisher(ActionChunk, "/action_chunk", 10)
        self.Image, self.JointState, self.String, self.ActionChunk = Image, JointState, String, ActionChunk
        self.t = 100.0
        self.k = 0
        self.sent_images = 0

    def instruction(self, text: str) -> None:
        self.instr.publish(self.String(data=text))

    def tick(self) -> None:
        """One 10 Hz tick: camera1 every tick, camera2 every other tick, joint states twice."""
        from builtin_interfaces.msg import Duration

        t = self.t + self.k * 0.1
        for ci, cam in enumerate(("camera1", "camera2")):
            if cam == "camera2" and self.k % 2:
                continue
            msg = self.Image(height=H, width=W, encoding="rgb8", step=W * 3)
            msg.header.stamp = _stamp(t)
            msg.header.frame_id = cam
            msg.data = frame_image(t - 100.0, H, W, ci).tobytes()
            self.img[cam].publish(msg)
            self.sent_images += 1
        for dt in (0.0, 0.05):
            js = self.JointState(name=JOINTS, position=[0.1 * i + 0.01 * self.k for i in range(6)])
            js.header.stamp = _stamp(t + dt - 0.01)
            self.js.publish(js)
        if self.k % 4 == 0:
            c = self.ActionChunk(chunk_id=self.k // 4 + 1, joint_names=JOINTS, num_actions=10, action_dim=6,
                                 actions=[0.01 * i for i in range(60)], step_period=Duration(sec=0, nanosec=100_000_000))
            c.header.stamp = _stamp(t)
            self.chunk.publish(c)
        self.k += 1


def _recorder(bag: Path, tmp_path: Path, name: str):  # type: ignore[no-untyped-def]
    return node_process(["-m", "effvla_ros.nodes.recorder", "--ros-args", "-p", f"out:={bag}",
                         "-p", "flush_period_s:=0.2", "-p", "discovery_period_s:=0.1"], tmp_path, name)


def _subscribed(node, topics: list[str]) -> bool:  # type: ignore[no-untyped-def]
    return all(node.count_subscribers(t) >= 1 for t in topics)


def _flushed_count(bag: Path) -> int:
    meta = bag / "metadata.yaml"
    if not meta.is_file():
        return 0
    return int(yaml.safe_load(meta.read_text())["rosbag2_bagfile_information"]["message_count"])


def test_record_real_dds_then_replay(tmp_path: Path) -> None:
    from effvla_ros.replay.pipeline import ReplayConfig, run_replay

    from model_fixtures import write_tiny_checkpoint

    bag = tmp_path / "rec"
    with spinner() as sp:
        pub = Publisher(sp)
        pub.instruction("put the cube in the bowl")  # latched, published before the recorder starts
        with _recorder(bag, tmp_path, "recorder") as rec:
            try:
                wait_for(lambda: _subscribed(pub.node, TOPICS), timeout=30)
            except TimeoutError:
                pytest.fail("recorder did not subscribe:\n" + rec.log())
            time.sleep(0.3)
            for _ in range(12):
                pub.tick()
                time.sleep(0.1)
            time.sleep(0.5)
            assert rec.stop() == 0, rec.log()
    data = (bag / "rec.mcap").read_bytes()
    assert data.endswith(MCAP_MAGIC)  # clean stop: summary + footer
    meta = yaml.safe_load((bag / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    assert meta["custom_data"]["effvla.recording"] == "complete"
    b = open_bag(bag)
    assert not b.recovered
    assert b.topics["/instruction"].msgtype == "std_msgs/msg/String" and b.topics["/instruction"].count == 1
    assert b.topics["/action_chunk"].msgtype == "effvla_ros/msg/ActionChunk" and b.topics["/action_chunk"].count == 3
    # best-effort images (sensor QoS) on loopback: all arrive in practice; allow a rare loss
    assert 10 <= b.topics["/camera/camera1/image_raw"].count <= 12
    assert 5 <= b.topics["/camera/camera2/image_raw"].count <= 6
    assert b.topics["/joint_states"].count == 24
    assert "uint64 chunk_id" in b.topics["/action_chunk"].msgdef  # definition embedded for ros2 bag / readers
    for _, _, raw in b.messages(["/camera/camera2/image_raw"]):  # the bytes published, unchanged
        img = b.decode("/camera/camera2/image_raw", raw)
        t = img.header.stamp.sec + 1e-9 * img.header.stamp.nanosec
        np.testing.assert_array_equal(np.asarray(img.data).reshape(H, W, 3), frame_image(t - 100.0, H, W, 1))
    # ...and replayed: the recorded chunks' stamps are the observations
    ckpt = write_tiny_checkpoint(tmp_path / "ckpt")
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model is much faster on one thread of a loaded machine
    try:
            res = run_replay(ReplayConfig(bag=str(bag), checkpoint=str(ckpt), sweep=["pruning.keep_ratio=0.5"], flops="off",
                                      num_steps=2, progress=False, observations=ObservationOptions()))
    finally:
        torch.set_num_threads(threads)
    rep = res.report
    assert rep["episode"]["mode"] == "chunks" and rep["episode"]["observations"] == 3
    assert rep["episode"]["instructions"] == ["put the cube in the bowl"]
    assert rep["settings"][0]["deviation_vs_baseline"]["nrmse"] == 0.0
    assert rep["settings"][1]["deviation_vs_recorded"]["n"] == 3


def test_sigkill_leaves_readable_bag(tmp_path: Path) -> None:
    bag = tmp_path / "killed"
    with spinner() as sp:
        pub = Publisher(sp)
        pub.instruction("stack the blocks")
        with _recorder(bag, tmp_path, "recorder_killed") as rec:
            try:
                wait_for(lambda: _subscribed(pub.node, TOPICS[:4]), timeout=30)
            except TimeoutError:
                pytest.fail("recorder did not subscribe:\n" + rec.log())
            time.sleep(0.3)
            for _ in range(6):
                pub.tick()
                time.sleep(0.1)
            wait_for(lambda: _flushed_count(bag) >= 10, timeout=10)
            for _ in range(3):
                pub.tick()
                time.sleep(0.05)
            os.killpg(rec.proc.pid, signal.SIGKILL)
            rec.proc.wait(10)
            assert rec.proc.returncode == -signal.SIGKILL
    flushed = _flushed_count(bag)
    data = (bag / "killed.mcap").read_bytes()
    assert data.startswith(MCAP_MAGIC) and not data.endswith(MCAP_MAGIC)  # no summary, no footer
    from rosbags.rosbag2 import Reader

    with pytest.raises(Exception):  # noqa: B017 - the stock reader refuses it
        with Reader(bag) as r:
            list(r.messages())
    b = open_bag(bag)
    assert b.recovered and b.notes
    assert b.message_count >= flushed >= 10
    imgs = [b.decode(t, raw) for t, _, raw in b.messages(["/camera/camera1/image_raw"])]
    assert len(imgs) >= 3 and all(len(i.data) == H * W * 3 for i in imgs)
    ep = build_episode(b, ["camera1", "camera2"], 6, ObservationOptions(mode="frames"))
    assert ep.observations and ep.instructions == ["stack the blocks"]


def _mcap_summary(path: Path):  # type: ignore[no-untyped-def]
    """The mcap package's seeking reader: (summary, messages per topic) - raises on an unfinished file."""
    from mcap.reader import SeekingReader

    with open(path, "rb") as f:
        r = SeekingReader(f)
        summary = r.get_summary()
        assert summary is not None and summary.chunk_indexes  # indexed
        counts: dict[str, int] = {}
        for _schema, channel, _msg in r.iter_messages():
            counts[channel.topic] = counts.get(channel.topic, 0) + 1
    return summary, counts


def _rosbags_counts(bag: Path) -> dict[str, int]:
    from rosbags.rosbag2 import Reader

    counts: dict[str, int] = {}
    with Reader(bag) as r:
        for conn, _t, _raw in r.messages():
            counts[conn.topic] = counts.get(conn.topic, 0) + 1
        assert {c.topic: c.msgcount for c in r.connections if c.msgcount} == counts  # metadata.yaml agrees
    return counts


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_finish_the_bag_as_rosbag2_does(tmp_path: Path, sig: signal.Signals) -> None:
    from effvla_ros.replay.bagio import ros_distro

    bag = tmp_path / "stopped"
    with spinner() as sp:
        pub = Publisher(sp)
        pub.instruction("stack the blocks")
        with _recorder(bag, tmp_path, f"recorder_{sig.name}") as rec:
            try:
                wait_for(lambda: _subscribed(pub.node, TOPICS[:4]), timeout=30)
            except TimeoutError:
                pytest.fail("recorder did not subscribe:\n" + rec.log())
            time.sleep(0.3)
            for _ in range(4):
                pub.tick()
                time.sleep(0.1)
            time.sleep(0.5)
            os.killpg(rec.proc.pid, sig)
            rec.proc.wait(30)
            assert rec.proc.returncode == 0, rec.log()
    data = (bag / "stopped.mcap").read_bytes()
    assert data.endswith(MCAP_MAGIC)  # summary + footer
    summary, counts = _mcap_summary(bag / "stopped.mcap")
    assert counts == _rosbags_counts(bag) and counts["/joint_states"] == 8
    assert summary.statistics.message_count == sum(counts.values())
    meta = yaml.safe_load((bag / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    assert meta["custom_data"]["effvla.recording"] == "complete" and meta["message_count"] == sum(counts.values())
    assert meta["ros_distro"] == ros_distro() != "rosbags"
    # channel metadata as rosbag2 writes it
    from effvla_ros.replay.bagio import make_typestore

    ts = make_typestore()
    by_topic = {c.topic: c for c in summary.channels.values()}
    js = by_topic["/joint_states"]
    assert js.metadata["topic_type_hash"] == ts.hash_rihs01("sensor_msgs/msg/JointState")
    assert "reliability" in js.metadata["offered_qos_profiles"]
    assert "transient_local" in by_topic["/instruction"].metadata["offered_qos_profiles"]


def test_sigkill_then_bag_repair(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A recording killed with SIGKILL: no reader but ours opens it; ``effvla bag repair`` rewrites it into a
    complete, indexed bag that rosbags and the mcap seeking reader open, with every flushed message."""
    from mcap.reader import SeekingReader

    from effvla_ros.cli import main
    from effvla_ros.replay.bagio import scan_mcap

    bag = tmp_path / "killed"
    with spinner() as sp:
        pub = Publisher(sp)
        pub.instruction("stack the blocks")
        with _recorder(bag, tmp_path, "recorder_killed2") as rec:
            try:
                wait_for(lambda: _subscribed(pub.node, TOPICS), timeout=30)
            except TimeoutError:
                pytest.fail("recorder did not subscribe:\n" + rec.log())
            time.sleep(0.3)
            for _ in range(8):
                pub.tick()
                time.sleep(0.1)
            wait_for(lambda: _flushed_count(bag) >= 20, timeout=10)
            os.killpg(rec.proc.pid, signal.SIGKILL)
            rec.proc.wait(10)
            assert rec.proc.returncode == -signal.SIGKILL
    flushed = _flushed_count(bag)
    scan = scan_mcap(bag / "killed.mcap")
    on_disk = sum(scan.counts.values())
    assert not scan.complete and on_disk >= flushed >= 20
    with open(bag / "killed.mcap", "rb") as f, pytest.raises(Exception):  # noqa: B017 - no footer: refused
        SeekingReader(f).get_summary()
    with pytest.raises(SystemExit) as e:
        main(["bag", "repair", str(bag)])
    assert e.value.code == 0
    out = capsys.readouterr().out
    fixed = tmp_path / "killed_repaired"
    assert f"repaired {bag} -> {fixed}: {on_disk} messages" in out and "the source was interrupted" in out
    summary, counts = _mcap_summary(fixed / "killed_repaired.mcap")
    with capsys.disabled():
        print(f"\nSIGKILL: {flushed} messages flushed per metadata.yaml, {on_disk} complete on disk; repaired: "
              f"mcap seeking reader {sum(counts.values())}, rosbags {sum(_rosbags_counts(fixed).values())}")
    assert counts == _rosbags_counts(fixed)
    assert sum(counts.values()) == on_disk == summary.statistics.message_count
    scan_counts = {scan.channels[c][1]: n for c, n in scan.counts.items()}
    assert counts == {t: n for t, n in scan_counts.items() if n}
    meta = yaml.safe_load((fixed / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    assert meta["message_count"] == on_disk and meta["custom_data"]["effvla.repaired_from"] == str(bag.resolve())
    assert meta["custom_data"]["effvla.recording"] == "complete"
    # the same bytes under the same log times, the offered QoS and type hashes kept
    orig = open_bag(bag)
    rep = open_bag(fixed)
    assert not rep.recovered
    assert [(t, ts, bytes(r)) for t, ts, r in orig.messages(["/camera/camera1/image_raw"])] == \
        [(t, ts, bytes(r)) for t, ts, r in rep.messages(["/camera/camera1/image_raw"])]
    for t in ("/joint_states", "/instruction", "/action_chunk"):
        assert rep.topics[t].digest == orig.topics[t].digest and rep.topics[t].digest.startswith("RIHS01_")
        assert rep.topics[t].qos == orig.topics[t].qos and rep.topics[t].qos
    # `effvla record --repair` is the same, and an existing output is never overwritten
    with pytest.raises(SystemExit) as e:
        main(["record", "--repair", str(bag), "--out", str(fixed)])
    assert e.value.code == 2 and "exists already" in capsys.readouterr().err
