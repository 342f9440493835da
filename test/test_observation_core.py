"""The one observation path (effvla_ros.core.observation): images, stamp pairing, state vector, tokens."""
from __future__ import annotations

import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from effvla_ros.core.observation import (
    SUPPORTED_ENCODINGS,
    ImageError,
    StateError,
    TokenError,
    decode_tokens,
    encode_tokens,
    image_to_rgb,
    missing_camera,
    observation_stamp,
    rgb_to_tensor,
    state_at,
    state_at_sorted,
    state_vector,
)


def test_core_modules_import_without_rclpy_and_images_without_torch() -> None:
    code = ("import sys\n"
            "import effvla_ros.core.observation\n"
            "assert 'torch' not in sys.modules, 'observation imports torch at import time'\n"
            "import effvla_ros.core.chunking, effvla_ros.core.settings\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('rclpy', 'sensor_msgs')\n"
            "             or m.startswith(('effvla_ros.msg', 'effvla_ros.nodes')))\n"
            "assert not bad, bad\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr


# ------------------------------------------------------------------------------------------ stamps
def test_state_at_pairs_the_joint_state_of_the_images_instant() -> None:
    stamps = [0.0, 0.02, 0.04, 0.06]
    assert state_at(stamps, 0.04, 0.05) == 2  # same instant
    assert state_at(stamps, 0.05, 0.05) == 2  # the newest at or before the images, not the nearest (0.06)
    assert state_at([0.06, 0.0, 0.04], 0.05, 0.05) == 2  # arrival order does not matter
    assert state_at([0.1, 0.3], 0.2, 0.15) == 0
    assert state_at(stamps, 0.2, 0.05) is None  # all too old, a newer one may still arrive: wait
    assert state_at([], 0.2, 0.05) is None
    assert state_at([0.0, 0.5], 0.2, 0.05) == -1  # too old before, newer after: skip this observation
    assert state_at([0.1, 0.1], 0.1, 0.05) == 1  # equal stamps: the later one
    assert state_at([0.1000005], 0.1, 0.0) == 0  # float rounding of one instant is the same instant


def test_node_module_reexports_the_core_state_at() -> None:
    from effvla_ros.nodes import policy

    assert policy.state_at is state_at


def test_state_at_sorted_equals_state_at_on_random_streams() -> None:
    rng = random.Random(3)
    for _ in range(400):
        n = rng.randrange(0, 8)
        stamps = sorted(round(rng.uniform(0.0, 1.0), rng.choice((1, 2, 3))) for _ in range(n))  # duplicates too
        obs = round(rng.uniform(-0.1, 1.1), rng.choice((1, 2, 3)))
        tol = rng.choice((0.0, 0.01, 0.05, 0.2, float("inf")))
        assert state_at_sorted(stamps, obs, tol) == state_at(stamps, obs, tol), (stamps, obs, tol)


def test_observation_stamp_is_the_newest_of_one_instant() -> None:
    assert observation_stamp([1.00, 1.02], 0.05) == 1.02
    assert observation_stamp([1.00, 1.08], 0.05) is None  # not one instant: wait
    assert observation_stamp([], 0.05) is None


# ------------------------------------------------------------------------------------------ images
def _rgb(h: int = 5, w: int = 7, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _raw(rgb: np.ndarray, enc: str) -> np.ndarray:
    """An image in ``enc`` whose RGB reading is ``rgb`` (mono: the first channel)."""
    if enc in ("mono8", "8UC1"):
        return rgb[..., :1]
    if enc in ("rgb8", "8UC3"):
        return rgb
    if enc == "bgr8":
        return rgb[..., ::-1]
    alpha = np.full(rgb.shape[:2] + (1,), 77, np.uint8)
    return np.concatenate([rgb[..., ::-1] if enc == "bgra8" else rgb, alpha], axis=2)


@pytest.mark.parametrize("enc", SUPPORTED_ENCODINGS)
def test_every_encoding_reads_as_rgb_with_or_without_row_padding(enc: str) -> None:
    rgb = _rgb()
    raw = _raw(rgb, enc)
    h, w, c = raw.shape
    expect = np.repeat(rgb[..., :1], 3, axis=2) if c == 1 else rgb
    for pad in (0, 3):
        rows = np.concatenate([raw.reshape(h, w * c), np.full((h, pad), 9, np.uint8)], axis=1)
        for data in (rows.tobytes(), rows.reshape(-1), list(rows.reshape(-1))):
            out = image_to_rgb(enc, h, w, w * c + pad, data)
            assert out.dtype == np.uint8 and out.shape == (h, w, 3) and out.flags.c_contiguous
            np.testing.assert_array_equal(out, expect)


@pytest.mark.parametrize("enc", SUPPORTED_ENCODINGS)
def test_conversion_matches_rosbags_image(enc: str) -> None:
    """The former node conversion (rosbags-image, i.e. cv_bridge's rules) gives the same pixels."""
    import types

    pytest.importorskip("cv2")
    from rosbags.image import image_to_cvimage

    raw = np.ascontiguousarray(_raw(_rgb(seed=5), enc))
    h, w, c = raw.shape
    msg = types.SimpleNamespace(encoding=enc, height=h, width=w, step=w * c, is_bigendian=0, data=raw.reshape(-1))
    if enc in ("mono8", "8UC1"):
        ref = np.repeat(np.asarray(image_to_cvimage(msg))[..., None], 3, axis=2)
    elif enc.startswith("8UC"):
        ref = np.asarray(image_to_cvimage(msg))[..., :3]
    else:
        ref = np.asarray(image_to_cvimage(msg, "rgb8"))
    np.testing.assert_array_equal(image_to_rgb(enc, h, w, w * c, raw.tobytes()), ref)


def test_bad_images_say_what_is_wrong() -> None:
    good = _rgb().tobytes()
    with pytest.raises(ImageError, match="unsupported encoding 'yuv422'"):
        image_to_rgb("yuv422", 5, 7, 21, good)
    with pytest.raises(ImageError, match="zero-size"):
        image_to_rgb("rgb8", 0, 7, 21, b"")
    with pytest.raises(ImageError, match="step 20 is smaller"):
        image_to_rgb("rgb8", 5, 7, 20, good)
    with pytest.raises(ImageError, match="data length 104 != step\\*height = 105"):
        image_to_rgb("rgb8", 5, 7, 21, good[:-1])
    with pytest.raises(ImageError, match="data length 106"):
        image_to_rgb("rgb8", 5, 7, 21, good + b"\0")


def test_rgb_to_tensor_is_channels_first_in_unit_range_and_copies() -> None:
    rgb = _rgb(4, 6)
    rgb.setflags(write=False)  # a render or a message buffer
    t = rgb_to_tensor(rgb)
    assert t.dtype == torch.float32 and tuple(t.shape) == (3, 4, 6)
    assert torch.equal(t, torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255.0)
    assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0
    with pytest.raises(ImageError, match="\\(H, W, 3\\)"):
        rgb_to_tensor(rgb[..., :2])


# ------------------------------------------------------------------------------------------ state
def test_state_vector_by_names_or_first_positions() -> None:
    names = ["a", "b", "c", "d"]
    pos = [0.1, 0.2, 0.3, 0.4]
    v = state_vector(names, pos, ["c", "a"], 2)
    assert v.dtype == np.float32 and v.tolist() == pytest.approx([0.3, 0.1])
    assert state_vector(names, np.asarray(pos), [], 3).tolist() == pytest.approx([0.1, 0.2, 0.3])
    assert state_vector([], pos, [], 4).tolist() == pytest.approx(pos)  # unnamed positions


def test_state_vector_reasons_name_what_is_wrong() -> None:
    with pytest.raises(StateError, match=r"lacks joints \['x', 'y'\]"):
        state_vector(["a", "b"], [0.0, 0.0], ["a", "x", "y"], 3)
    with pytest.raises(StateError, match="has 3 names but 2 positions"):
        state_vector(["a", "b", "c"], [0.0, 0.0], ["a", "b"], 2)
    with pytest.raises(StateError, match="has 2 positions, the checkpoint's state needs 3"):
        state_vector(["a", "b"], [0.0, 0.0], [], 3)
    with pytest.raises(StateError, match=r"contains NaN \(joints \['b'\]\)"):
        state_vector(["a", "b"], [0.0, float("nan")], ["a", "b"], 2)
    with pytest.raises(StateError, match=r"contains Inf \(joints \['a'\]\)"):
        state_vector(["a", "b"], [float("inf"), 0.0], [], 2)
    with pytest.raises(StateError, match="beyond the float32 range"):
        state_vector(["a"], [1e300], [], 1)
    with pytest.raises(StateError, match="2 state joint names, the state has 3"):
        state_vector(["a", "b"], [0.0, 0.0], ["a", "b"], 3)


# ------------------------------------------------------------------------------------------ tokens
def test_tokens_round_trip_through_the_wire_format() -> None:
    tokens = torch.randn(5, 8)
    kept = [0, 3, 4, 9, 15]
    for dtype, expect in (("float32", tokens), ("float16", tokens.half().float())):
        payload = encode_tokens(tokens, dtype)
        assert payload.shape == (5, 8) and payload.dtype == np.dtype(dtype)
        ct = decode_tokens(dtype, payload.tobytes(), kept, (4, 4), 8, [False] * 5)
        assert torch.equal(ct.tokens, expect) and ct.tokens.dtype == torch.float32
        assert ct.kept.tolist() == kept and ct.kept.dtype == torch.long and ct.grid == (4, 4) and not ct.missing
    m = missing_camera((4, 4))
    assert m.missing and m.tokens.numel() == 0 and m.grid == (4, 4)


def test_malformed_tokens_say_what_is_wrong() -> None:
    data = encode_tokens(torch.randn(2, 4), "float16").tobytes()
    with pytest.raises(TokenError, match="dtype 'float64' is not one of float16, float32"):
        decode_tokens("float64", data, [0, 1], (2, 2), 4)
    with pytest.raises(TokenError, match="no kept tokens"):
        decode_tokens("float16", b"", [], (2, 2), 4)
    with pytest.raises(TokenError, match="1 reused flags for 2 tokens"):
        decode_tokens("float16", data, [0, 1], (2, 2), 4, [True])
    with pytest.raises(TokenError, match="2 tokens x 8 float16 need 32 bytes, got 16"):
        decode_tokens("float16", data, [0, 1], (2, 2), 8)
    nan = np.full((2, 4), np.nan, np.float32).tobytes()
    with pytest.raises(TokenError, match="NaN"):
        decode_tokens("float32", nan, [0, 1], (2, 2), 4)
    with pytest.raises(TokenError, match="dtype"):
        encode_tokens(torch.randn(2, 4), "int8")
