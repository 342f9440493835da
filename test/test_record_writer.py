"""The recorder's bag writer (issue 8): metadata.yaml from the start, flushes, readable when cut short;
the recorder node's bounded queue and the ``effvla record`` command."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from effvla_ros.replay.bagio import MCAP_MAGIC, McapBagWriter, make_typestore, open_bag, scan_mcap

from ros_helpers import REPO, spinner, wait_for


def _meta(bag: Path) -> dict:  # type: ignore[type-arg]
    return yaml.safe_load((bag / "metadata.yaml").read_text())["rosbag2_bagfile_information"]


def _js(ts, k: int) -> bytes:  # type: ignore[no-untyped-def]
    JS = ts.types["sensor_msgs/msg/JointState"]
    H = ts.types["std_msgs/msg/Header"]
    T = ts.types["builtin_interfaces/msg/Time"]
    msg = JS(header=H(stamp=T(sec=10 + k, nanosec=0), frame_id=""), name=["a"], position=np.array([float(k)]),
             velocity=np.zeros(0), effort=np.zeros(0))
    return bytes(ts.serialize_cdr(msg, "sensor_msgs/msg/JointState"))


def test_writer_flushes_and_cut_files_stay_readable(tmp_path: Path) -> None:
    ts = make_typestore()
    bag = tmp_path / "b"
    w = McapBagWriter(bag, ts)
    assert _meta(bag)["message_count"] == 0  # a valid, empty bag from the first moment
    w.add_topic("/joint_states", "sensor_msgs/msg/JointState")
    w.add_topic("/action_chunk", "effvla_ros/msg/ActionChunk")
    for k in range(5):
        w.write("/joint_states", 1_000 + k, _js(ts, k))
    assert _meta(bag)["message_count"] == 0  # not flushed yet
    w.flush()
    m = _meta(bag)
    assert m["message_count"] == 5 and m["custom_data"]["effvla.recording"] == "in_progress"
    types = {t["topic_metadata"]["name"]: t["topic_metadata"]["type_description_hash"]
             for t in m["topics_with_message_count"]}
    assert types["/action_chunk"] == ts.hash_rihs01("effvla_ros/msg/ActionChunk")
    size_after_flush = (bag / "b.mcap").stat().st_size
    for k in range(5, 8):
        w.write("/joint_states", 1_000 + k, _js(ts, k))
    w.flush()
    data = (bag / "b.mcap").read_bytes()
    # the process dies here: cut the file inside the second chunk, no footer
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "cut.mcap").write_bytes(data[: size_after_flush + (len(data) - size_after_flush) // 2])
    scan = scan_mcap(cut / "cut.mcap")
    assert not scan.complete and scan.truncated_at is not None
    b = open_bag(cut)
    assert b.recovered and any("interrupted" in n for n in b.notes)
    states = [float(b.decode(t, raw).position[0]) for t, _, raw in b.messages(["/joint_states"])]
    assert states == [0.0, 1.0, 2.0, 3.0, 4.0]  # everything up to the last complete chunk
    # the stock rosbags reader accepts the metadata but refuses the footer-less file: hence the scan
    from rosbags.rosbag2 import Reader

    (cut / "metadata.yaml").write_text((bag / "metadata.yaml").read_text().replace("b.mcap", "cut.mcap"))
    with pytest.raises(Exception, match="magic"):
        Reader(cut).open()
    assert open_bag(cut).recovered
    w.close()
    assert (bag / "b.mcap").read_bytes().endswith(MCAP_MAGIC)
    with Reader(bag) as r:  # complete bag: the stock reader is happy, definitions embedded
        assert r.message_count == 8
        assert {c.topic: c.msgdef.data != "" for c in r.connections} == {"/joint_states": True, "/action_chunk": True}
    assert _meta(bag)["custom_data"]["effvla.recording"] == "complete"


def test_recorder_queue_is_bounded(tmp_path: Path) -> None:
    from rclpy.parameter import Parameter

    from effvla_ros.nodes.recorder import RecorderNode

    with spinner() as sp:
        node = RecorderNode(context=sp.context, parameter_overrides=[
            Parameter("out", value=str(tmp_path / "q")), Parameter("queue_bytes", value=4096),
            Parameter("topics", value=["/nothing_here"])])
        try:
            node._on_message("/x", b"\0" * 5000, False)  # larger than the whole queue: dropped, counted
            assert node.dropped["/x"] == 1
            with pytest.raises(ValueError, match="exists already"):
                RecorderNode(context=sp.context, parameter_overrides=[Parameter("out", value=str(tmp_path / "q"))])
        finally:
            stats = node.close()
            node.destroy_node()
    assert stats["dropped"] == {"/x": 1}
    assert yaml.safe_load((tmp_path / "q" / "metadata.yaml").read_text())["rosbag2_bagfile_information"][
        "custom_data"]["effvla.dropped"] == '{"/x": 1}'


def test_record_command_duration_and_strip(tmp_path: Path) -> None:
    from effvla_ros.msg import VisualTokens

    bag = tmp_path / "cmd"
    with spinner() as sp:
        node = sp.node("tokens_pub")
        pub = node.create_publisher(VisualTokens, "/visual_tokens", 10)
        proc = subprocess.Popen([sys.executable, "-m", "effvla_ros.cli", "record", "--out", str(bag), "--duration",
                                 "4", "--topics", "visual_tokens", "--strip-token-data", "--flush-period", "0.2"],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: node.count_subscribers("/visual_tokens") >= 1, timeout=30)
            time.sleep(0.3)
            for k in range(3):
                vt = VisualTokens(camera_name="camera1", frame_seq=k, grid_height=4, grid_width=4, token_dim=8,
                                  dtype="float16", kept_indices=[0, 5, 9], reused=[False, True, False],
                                  data=bytes(range(48)), encoder_flops=123, encoder_flops_full=456)
                pub.publish(vt)
                time.sleep(0.05)
            out, _ = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, out.decode(errors="replace")
    b = open_bag(bag)
    assert not b.recovered and b.topics["/visual_tokens"].count == 3
    msgs = [b.decode("/visual_tokens", raw) for _, _, raw in b.messages(["/visual_tokens"])]
    assert [len(m.data) for m in msgs] == [0, 0, 0]  # payload stripped
    assert [list(m.kept_indices) for m in msgs] == [[0, 5, 9]] * 3 and msgs[0].encoder_flops == 123
