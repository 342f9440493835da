"""token_compressor node over real DDS: tokens out, live tuning, bad input, missing camera."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from effvla_ros.msg import VisualTokens

from model_fixtures import write_tiny_checkpoint
from ros_helpers import node_process, set_parameter, spinner, wait_for


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


def _image(w: int, h: int, seed: int, encoding: str = "rgb8", pad: int = 0):  # type: ignore[no-untyped-def]
    from sensor_msgs.msg import Image

    rgb = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    m = Image(height=h, width=w, encoding=encoding)
    rows = np.concatenate([rgb.reshape(h, w * 3), np.zeros((h, pad), np.uint8)], axis=1)
    m.step = w * 3 + pad
    m.data = rows.tobytes()
    return m, rgb


def _set(node, name: str, **value):  # type: ignore[no-untyped-def]
    return set_parameter(node, "/token_compressor", name, **value)


def test_compressor_node_end_to_end(tmp_path: Path, ckpt: Path) -> None:
    from rcl_interfaces.msg import ParameterType
    from sensor_msgs.msg import Image
    from std_msgs.msg import String

    from effvla_ros.nodes.common import LATCHED_QOS, SENSOR_QOS

    argv = ["-m", "effvla_ros.nodes.token_compressor", "--ros-args", "-p", f"checkpoint:={ckpt}",
            "-p", "cameras:=[camera1,camera2]", "-p", "pruning.keep_ratio:=0.5", "-p", "camera_timeout_s:=1.5",
            "-p", "reuse.threshold:=0.01", "-p", "pruning.coverage_regions:=0"]
    got: list[VisualTokens] = []
    with node_process(argv, tmp_path, "compressor") as proc, spinner() as sp:
        node = sp.node("compressor_tester")
        node.create_subscription(VisualTokens, "/token_compressor/visual_tokens", got.append, 50)
        pubs = {c: node.create_publisher(Image, f"/camera/{c}/image_raw", SENSOR_QOS) for c in ("camera1", "camera2")}
        instr = node.create_publisher(String, "/instruction", LATCHED_QOS)
        instr.publish(String(data="pick up the red cube"))
        frame1, _ = _image(64, 48, 1, pad=8)  # padded rows
        frame2, _ = _image(64, 48, 2)

        def send(stamp_s: int, msg1=frame1) -> None:  # type: ignore[no-untyped-def]
            for cam, m in (("camera1", msg1), ("camera2", frame2)):
                m.header.stamp.sec = stamp_s
                m.header.frame_id = cam
                pubs[cam].publish(m)

        def n_for(cam: str) -> list[VisualTokens]:
            return [m for m in got if m.camera_name == cam and not m.camera_missing]

        try:
            stamp = 10
            def pump_until(pred, timeout=60.0):  # type: ignore[no-untyped-def]
                nonlocal stamp
                def step():  # type: ignore[no-untyped-def]
                    nonlocal stamp
                    stamp += 1
                    send(stamp)
                    return pred()
                return wait_for(step, timeout=timeout, period=0.2)
            pump_until(lambda: len(n_for("camera1")) >= 3 and len(n_for("camera2")) >= 3)
        except TimeoutError:
            pytest.fail(f"no tokens; node log:\n{proc.log()}")
        m = n_for("camera1")[-1]
        assert (m.grid_height, m.grid_width, m.token_dim, m.dtype) == (4, 4, 64, "float16")
        assert len(m.kept_indices) == 8  # keep_ratio 0.5 of 16 (instruction latched before start)
        assert len(bytes(m.data)) == 8 * 64 * 2
        assert np.isfinite(np.frombuffer(bytes(m.data), np.float16)).all()
        assert m.header.frame_id == "camera1" and m.header.stamp.sec > 10
        # identical frames after the first: reused, no encoder FLOPs
        assert all(m.reused) and m.encoder_flops == 0 and m.encoder_flops_full > 0

        # live tuning through the real parameter service
        res = _set(node, "pruning.keep_ratio", type=ParameterType.PARAMETER_DOUBLE, double_value=0.25)
        assert res.successful, res.reason
        pump_until(lambda: len(n_for("camera1")[-1].kept_indices) == 4, timeout=30)
        bad = _set(node, "pruning.keep_ratio", type=ParameterType.PARAMETER_DOUBLE, double_value=2.0)
        assert not bad.successful and "keep_ratio" in bad.reason
        bad = _set(node, "pruning.method", type=ParameterType.PARAMETER_STRING, string_value="magic")
        assert not bad.successful and "method" in bad.reason
        ro = _set(node, "checkpoint", type=ParameterType.PARAMETER_STRING, string_value="/tmp/x")
        assert not ro.successful

        # bad input: unsupported encoding and wrong data length are dropped, node keeps running
        before = len(n_for("camera1"))
        weird = Image(height=48, width=64, encoding="yuv422", step=128, data=bytes(48 * 128))
        short = Image(height=48, width=64, encoding="rgb8", step=192, data=bytes(100))
        strip = Image(height=1, width=4000, encoding="rgb8", step=12000, data=bytes(12000))  # refused before torch
        for bad_msg, expected in ((weird, "unsupported encoding 'yuv422'"), (short, "data length 100"),
                                  (strip, "image 4000x1 (width x height) has an aspect ratio above 8:1")):
            def send_bad(bad_msg=bad_msg, expected=expected) -> bool:  # type: ignore[no-untyped-def]
                nonlocal stamp
                stamp += 1
                bad_msg.header.stamp.sec = stamp
                pubs["camera1"].publish(bad_msg)
                return expected in proc.log()
            wait_for(send_bad, timeout=20, period=0.3)
        assert len(n_for("camera1")) == before
        pump_until(lambda: len(n_for("camera1")) > before + 1, timeout=30)  # still alive

        # camera2 stops: published as missing after the timeout
        def only_cam1() -> bool:
            nonlocal stamp
            stamp += 1
            frame1.header.stamp.sec = stamp
            pubs["camera1"].publish(frame1)
            return any(x.camera_name == "camera2" and x.camera_missing for x in got)
        wait_for(only_cam1, timeout=30, period=0.2)
        assert proc.alive()
