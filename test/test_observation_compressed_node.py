"""The token compressor node over real DDS takes image_transport's ``<topic>/compressed``
(sensor_msgs/CompressedImage) per camera (issue 26): PNG tokens are those of the raw pixels, JPEG tokens
those of OpenCV's decode; compressedDepth frames are refused naming the cause."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from effvla_ros.msg import VisualTokens

from model_fixtures import write_tiny_checkpoint
from ros_helpers import node_process, spinner, wait_for


def test_compressed_camera_topics(tmp_path: Path) -> None:
    import torch
    from sensor_msgs.msg import CompressedImage
    from std_msgs.msg import String

    from effvla_ros.core.compression.compressor import ReuseConfig, TokenCompressor
    from effvla_ros.core.compression.pruning import PruningConfig
    from effvla_ros.core.observation import encode_tokens, rgb_to_tensor
    from effvla_ros.core.smolvla import RuntimeConfig, load_policy
    from effvla_ros.nodes.common import LATCHED_QOS, SENSOR_QOS

    ckpt = write_tiny_checkpoint(tmp_path / "tiny")
    rng = np.random.default_rng(3)
    rgb = {c: rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for c in ("camera1", "camera2")}
    ok, png = cv2.imencode(".png", rgb["camera1"][..., ::-1])
    ok2, jpg = cv2.imencode(".jpg", rgb["camera2"][..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 85])
    assert ok and ok2
    payload = {"camera1": ("rgb8; png compressed bgr8", png.tobytes()),
               "camera2": ("rgb8; jpeg compressed bgr8", jpg.tobytes())}
    # what the node must publish: the encoder's tokens of the decoded pixels (float16 on the wire)
    torch.set_num_threads(1)
    comp = TokenCompressor(load_policy(str(ckpt), runtime=RuntimeConfig()), PruningConfig(method="none"),
                           ReuseConfig(enabled=False))
    decoded = {"camera1": rgb["camera1"], "camera2": cv2.imdecode(jpg, cv2.IMREAD_COLOR)[..., ::-1]}
    expect = {c: encode_tokens(comp.process(c, rgb_to_tensor(decoded[c])).tokens, "float16").tobytes()
              for c in decoded}

    argv = ["-m", "effvla_ros.nodes.token_compressor", "--ros-args", "-p", f"checkpoint:={ckpt}",
            "-p", "cameras:=[camera1,camera2]", "-p", "pruning.method:=none", "-p", "reuse.enabled:=false",
            "-p", "camera_timeout_s:=30.0"]
    got: list[VisualTokens] = []
    with node_process(argv, tmp_path, "compressor_compressed") as proc, spinner() as sp:
        node = sp.node("compressed_tester")
        node.create_subscription(VisualTokens, "/token_compressor/visual_tokens", got.append, 50)
        pubs = {c: node.create_publisher(CompressedImage, f"/camera/{c}/image_raw/compressed", SENSOR_QOS)
                for c in ("camera1", "camera2")}
        node.create_publisher(String, "/instruction", LATCHED_QOS).publish(String(data="pick up the red cube"))
        stamp = 10

        def step() -> bool:
            nonlocal stamp
            stamp += 1
            for cam, (fmt, data) in payload.items():
                m = CompressedImage(format=fmt, data=data)
                m.header.stamp.sec = stamp
                pubs[cam].publish(m)
            return all(any(m.camera_name == c and not m.camera_missing for m in got) for c in payload)

        try:
            wait_for(step, timeout=90, period=0.3)
        except TimeoutError:
            pytest.fail(f"no tokens from compressed images; node log:\n{proc.log()}")
        for cam in payload:
            m = next(m for m in got if m.camera_name == cam and not m.camera_missing)
            assert bytes(m.data) == expect[cam], cam
        # compressedDepth: refused, naming it
        d = CompressedImage(format="16UC1; compressedDepth png", data=png.tobytes())
        d.header.stamp.sec = stamp + 100
        try:
            wait_for(lambda: pubs["camera1"].publish(d) or "compressedDepth" in proc.log(), timeout=30, period=0.3)
        except TimeoutError:
            pytest.fail(f"compressedDepth not reported; node log:\n{proc.log()}")
        assert "is not a camera image the policy can use" in proc.log()
