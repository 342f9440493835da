"""Issue 26 on the one observation path (effvla_ros.core.observation): the state by joint name (checkpoint-
declared names, joint maps, position only when asked for) as the policy node applies it, and
sensor_msgs/CompressedImage (JPEG, PNG) decoded with OpenCV."""
from __future__ import annotations

import json
import types
from pathlib import Path

import cv2
import numpy as np
import pytest

from effvla_ros.core.observation import (
    ImageError,
    StateError,
    StateSpec,
    checkpoint_joint_names,
    compressed_format,
    compressed_to_rgb,
    decode_compressed,
    map_joint_names,
    parse_joint_map,
    resolve_state_spec,
)

SO101 = ["shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper"]


def test_state_spec_by_name_in_any_order_with_extra_joints() -> None:
    spec = resolve_state_spec(6, checkpoint=SO101)
    pos = {n: 0.1 * (i + 1) for i, n in enumerate(SO101)}
    canon = spec.vector(SO101, [pos[n] for n in SO101])
    for names in (sorted(SO101), ["wheel", *SO101[::-1], "camera_tilt"]):
        vals = [pos.get(n, 9.0) for n in names]
        assert np.array_equal(spec.vector(names, vals), canon)
    assert spec.source == "declared by the checkpoint" and not spec.by_position
    with pytest.raises(StateError, match=r"lacks joints \['gripper'\] \(it has \['shoulder_pan'"):
        spec.vector(SO101[:5], [0.0] * 5)


def test_resolution_order_and_errors() -> None:
    other = [f"j{i}" for i in range(6)]
    assert resolve_state_spec(6, explicit=other, checkpoint=SO101, target=SO101).joint_names == tuple(other)
    assert resolve_state_spec(6, checkpoint=SO101, target=other).source == "declared by the checkpoint"
    assert resolve_state_spec(6, target=other, target_source="T").source == "T"
    assert resolve_state_spec(6, by_position=True).by_position
    with pytest.raises(StateError, match="no state joint names.*--state-joint-names.*--state-by-position"):
        resolve_state_spec(6)
    with pytest.raises(StateError, match=r"5 state joint names .* \(given explicitly\), the checkpoint's state has 6"):
        resolve_state_spec(6, explicit=SO101[:5])
    with pytest.raises(StateError, match="duplicate"):
        resolve_state_spec(2, explicit=["a", "a"])
    with pytest.raises(StateError, match="exclude each other"):
        resolve_state_spec(6, explicit=SO101, by_position=True)


def test_joint_maps() -> None:
    assert parse_joint_map("so101_*=") == {"so101_*": ""}
    assert parse_joint_map(["a=b,c=d", "e=f"]) == {"a": "b", "c": "d", "e": "f"}
    assert map_joint_names(["so101_gripper", "x", "arm_joint_1.pos"], {"so101_*": "", "*.pos": "", "x": "y"}) == \
        ["gripper", "y", "arm_joint_1"]
    for bad in ("a", "=b", "a*b=", "*a*=", "pre*=x"):
        with pytest.raises(StateError, match="joint map item"):
            parse_joint_map(bad)
    spec = resolve_state_spec(6, checkpoint=SO101, joint_map=parse_joint_map("so101_*="))
    names = [f"so101_{n}" for n in sorted(SO101)]
    pos = {n: float(i) for i, n in enumerate(SO101)}
    assert spec.vector(names, [pos[n[6:]] for n in names]).tolist() == [0, 1, 2, 3, 4, 5]


def test_checkpoint_declares_its_names(tmp_path: Path) -> None:
    assert checkpoint_joint_names(tmp_path) == ([], [])
    (tmp_path / "config.json").write_text(json.dumps({"input_features": {
        "observation.state": {"type": "STATE", "shape": [6], "names": {"motors": SO101}}},
        "output_features": {"action": {"type": "ACTION", "shape": [6], "names": SO101[::-1]}}}))
    assert checkpoint_joint_names(tmp_path) == (SO101, SO101[::-1])
    (tmp_path / "joint_names.json").write_text(json.dumps({"state": ["a"] * 2}))
    assert checkpoint_joint_names(tmp_path) == (["a", "a"], SO101[::-1])  # the sidecar first
    (tmp_path / "joint_names.json").write_text("{oops")
    with pytest.raises(StateError, match="joint_names.json: not readable JSON"):
        checkpoint_joint_names(tmp_path)


def test_policy_node_uses_the_same_rule() -> None:
    """PolicyNode._state_vector goes through the StateSpec the node resolved (resolve_state_spec), so a
    reordered JointState gives the canonical state and a missing joint is rejected naming it."""
    from sensor_msgs.msg import JointState

    from effvla_ros.nodes.policy import PolicyNode, state_from_msg

    lines: list[str] = []
    logger = types.SimpleNamespace(error=lambda m, **_k: lines.append(m))
    me = types.SimpleNamespace(state_spec=resolve_state_spec(6, checkpoint=SO101), counts={"rejected_state": 0},
                               policy=types.SimpleNamespace(arch=types.SimpleNamespace(state_dim=6)),
                               get_logger=lambda: logger)
    pos = {n: 0.1 * i for i, n in enumerate(SO101)}
    canon = PolicyNode._state_vector(me, JointState(name=SO101, position=[pos[n] for n in SO101]))  # type: ignore[arg-type]
    names = ["extra", *sorted(SO101)]
    other = PolicyNode._state_vector(me, JointState(name=names, position=[pos.get(n, 7.0) for n in names]))  # type: ignore[arg-type]
    assert canon is not None and other is not None and canon.tolist() == other.tolist()
    assert canon.numpy().tolist() == me.state_spec.vector(SO101, [pos[n] for n in SO101]).tolist()
    assert PolicyNode._state_vector(me, JointState(name=SO101[:5], position=[0.0] * 5)) is None  # type: ignore[arg-type]
    assert me.counts["rejected_state"] == 1 and "lacks joints ['gripper']" in lines[0]
    # the plain-list form (older callers): names, or positions when empty
    assert state_from_msg(JointState(name=names, position=[pos.get(n, 7.0) for n in names]), SO101, 6).tolist() == \
        canon.tolist()
    assert state_from_msg(JointState(name=names, position=[float(i) for i in range(7)]), [], 6).tolist() == \
        [0, 1, 2, 3, 4, 5]
    assert isinstance(me.state_spec, StateSpec)


# ------------------------------------------------------------------------------------------ images
def _img() -> np.ndarray:
    yy, xx = np.mgrid[0:24, 0:32]
    return np.stack([xx * 8, yy * 10, (xx + yy) * 4], axis=-1).astype(np.uint8)


def test_png_is_exact_and_jpeg_is_opencvs_decode() -> None:
    rgb = _img()
    ok, png = cv2.imencode(".png", rgb[..., ::-1])
    assert ok
    assert np.array_equal(compressed_to_rgb("rgb8; png compressed bgr8", png.tobytes()), rgb)
    ok, jpg = cv2.imencode(".jpg", rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 80])
    out = compressed_to_rgb("jpeg", bytes(jpg))
    assert np.array_equal(out, cv2.imdecode(jpg, cv2.IMREAD_COLOR)[..., ::-1])
    assert 0 < np.abs(out.astype(int) - rgb.astype(int)).max() < 64  # lossy, close
    ok, grey = cv2.imencode(".jpg", rgb[..., 0])
    assert decode_compressed("mono8; jpeg compressed mono8", grey).ndim == 2
    assert compressed_to_rgb("mono8; jpeg compressed mono8", grey).shape == (24, 32, 3)
    ok, rgba = cv2.imencode(".png", np.dstack([rgb[..., ::-1], np.full((24, 32), 255, np.uint8)]))
    assert np.array_equal(compressed_to_rgb("png", rgba), rgb)


def test_compressed_errors_name_the_cause() -> None:
    with pytest.raises(ImageError, match="compressedDepth .* not a camera image"):
        compressed_format("16UC1; compressedDepth png")
    with pytest.raises(ImageError, match="not JPEG or PNG"):
        compressed_format("theora")
    with pytest.raises(ImageError, match="could not be decoded"):
        compressed_to_rgb("jpeg", b"\xff\xd8 not really a jpeg")
    with pytest.raises(ImageError, match="empty jpeg"):
        compressed_to_rgb("jpeg", b"")
    ok, deep = cv2.imencode(".png", np.zeros((4, 4), np.uint16))
    with pytest.raises(ImageError, match="uint16"):
        compressed_to_rgb("png", deep)
    assert compressed_format("rgb8; jpeg compressed bgr8") == ("jpeg", "rgb8")
