"""One observation path for the robot, replay and simulation (ROS-free): images, state, tokens, stamps.

The policy node (``nodes/policy.py``), the token compressor node, offline replay
(``replay/observations.py``, ``replay/evaluate.py``) and simulation evaluation (``train/evaluate.py``,
``scripts/emulate_graph.py``) turn what they receive into policy inputs with these functions only, so
that an observation cannot mean one thing on the robot and another offline. Everything here works on
plain values (encodings as strings, raw bytes, lists of joint names and positions, stamps as float
seconds); the node layer only unpacks messages into them.

* images: :func:`image_to_rgb` (encoding + raw rows -> RGB ``uint8`` ``(H, W, 3)``), then
  :func:`rgb_to_tensor` (-> ``float32`` ``(3, H, W)`` in [0, 1], the compressor's input);
* state: :func:`state_at` pairs an observation with the newest joint state stamped at or before it and
  at most ``tolerance`` older (:func:`state_at_sorted`: the same rule on a stamp-sorted list, for
  offline streams); :func:`state_vector` picks the state's joints by name (or the first ``dim``);
* tokens on the wire (``effvla_ros/VisualTokens``): :func:`encode_tokens` / :func:`decode_tokens`;
* cameras of one instant: :func:`observation_stamp`.

Errors are :class:`ObservationError` subclasses (``ValueError``) whose message is the reason, meant to
be logged or counted as is. torch (and the runner's :class:`~effvla_ros.core.runner.CameraTokens`) are
imported only by the functions that make tensors: ``nodes/common.py`` re-exports the image conversion to
every node, the chunk executor included, which must not load torch.
"""
from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

    from effvla_ros.core.runner import CameraTokens

# Bytes per pixel of the supported sensor_msgs/Image encodings (8 bits per channel).
BYTES_PER_PIXEL: dict[str, int] = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1,
                                   "8UC3": 3, "8UC1": 1, "8UC4": 4}
SUPPORTED_ENCODINGS: tuple[str, ...] = tuple(BYTES_PER_PIXEL)
# Token dtypes on the wire (VisualTokens.dtype).
WIRE_DTYPES: dict[str, type[np.floating]] = {"float16": np.float16, "float32": np.float32}
# Slack of stamp comparisons (s): stamps of one instant may differ by float rounding.
STAMP_EPS = 1e-6
# Default of the policy node's ``state_stamp_tolerance_s`` (and of replay's pairing).
DEFAULT_STATE_STAMP_TOLERANCE_S = 0.05


class ObservationError(ValueError):
    """An input that cannot be used; the message is the reason."""


class ImageError(ObservationError):
    """An image that cannot be used (reason in the message)."""


class StateError(ObservationError):
    """A joint state that cannot form the policy's state vector (reason in the message)."""


class TokenError(ObservationError):
    """Visual tokens that cannot be decoded (reason in the message)."""


# ------------------------------------------------------------------------------------------ images
def image_to_rgb(encoding: str, height: int, width: int, step: int, data: bytes | bytearray | memoryview | np.ndarray
                 | Sequence[int]) -> np.ndarray:
    """Raw image rows (a sensor_msgs/Image's fields) -> ``(H, W, 3)`` ``uint8`` RGB, a new array.

    Checks the size, ``step`` and the data length (exactly ``step * height`` bytes), drops row padding
    (``step`` > ``width`` * bytes per pixel), then converts: ``bgr8``/``bgra8`` are reversed to RGB, alpha and
    the 4th channel of ``8UC4`` dropped, ``mono8``/``8UC1`` repeated to 3 channels; untyped ``8UC3``/``8UC4``
    are taken as RGB order (the same result as cv_bridge / rosbags-image for these encodings).
    """
    enc = str(encoding)
    bpp = BYTES_PER_PIXEL.get(enc)
    if bpp is None:
        raise ImageError(f"unsupported encoding {enc!r} (supported: {', '.join(SUPPORTED_ENCODINGS)})")
    h, w, step = int(height), int(width), int(step)
    if h <= 0 or w <= 0:
        raise ImageError(f"zero-size image {w}x{h}")
    row = w * bpp
    if step < row:
        raise ImageError(f"step {step} is smaller than width*bytes_per_pixel = {row}")
    if isinstance(data, np.ndarray):
        buf = data.reshape(-1).astype(np.uint8, copy=False)
    elif isinstance(data, (bytes, bytearray, memoryview)):
        buf = np.frombuffer(data, dtype=np.uint8)
    else:  # a list of ints (rclpy's array.array / sequence types)
        buf = np.frombuffer(bytes(data), dtype=np.uint8)
    if buf.size != step * h:
        raise ImageError(f"data length {buf.size} != step*height = {step * h}")
    px = buf.reshape(h, step)[:, :row].reshape(h, w, bpp)  # (H, W, bpp), a view
    if bpp == 1:
        return np.repeat(px, 3, axis=2)  # (H, W, 3), a copy
    if enc.startswith("bgr"):
        return np.ascontiguousarray(px[..., 2::-1])  # B, G, R -> R, G, B
    return np.ascontiguousarray(px[..., :3])


def rgb_to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` ``uint8`` RGB -> ``float32`` ``(3, H, W)`` in [0, 1] (the compressor's image input).

    The array is copied (a read-only render or a message buffer may back it)."""
    import torch

    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ImageError(f"expected an (H, W, 3) RGB image, got shape {tuple(rgb.shape)}")
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)  # (3, H, W)


# ------------------------------------------------------------------------------------------ stamps
def observation_stamp(stamps: Sequence[float], tolerance: float) -> float | None:
    """The stamp of an observation made of camera frames stamped ``stamps``: the newest, when all are
    within ``tolerance`` of each other (one instant); None when there is none or they are further apart."""
    if not stamps:
        return None
    if max(stamps) - min(stamps) > tolerance:
        return None
    return float(max(stamps))


def state_at(stamps: Sequence[float], obs_stamp: float, tolerance: float) -> int | None:
    """Index of the joint state that goes with an observation stamped ``obs_stamp``: the newest one
    stamped at or before it and at most ``tolerance`` older (images and state of one instant, as in the
    training data and in ``effvla replay``). None: none yet, and no state newer than the observation
    either (it may still arrive: wait); -1: none fits (skip the observation). ``stamps`` in any order
    (arrival order on the robot); of equal stamps the later index wins.

    The newest state at inference time would not do: it is ahead of the images by the encoder's and
    the queue's latency, tenths of a second of arm motion the policy never saw in training.
    """
    best = -1
    for i, st in enumerate(stamps):
        if st <= obs_stamp + STAMP_EPS and (best < 0 or st >= stamps[best]):
            best = i
    if best >= 0 and obs_stamp - stamps[best] <= tolerance + STAMP_EPS:
        return best
    if not stamps or max(stamps) <= obs_stamp + STAMP_EPS:
        return None
    return -1


def state_at_sorted(stamps: Sequence[float], obs_stamp: float, tolerance: float) -> int | None:
    """:func:`state_at` on stamps sorted ascending (an offline stream), in O(log n): the same result.

    Only the newest stamp at or before the observation and whether any later one exists decide
    :func:`state_at`; both are found by bisection, then :func:`state_at` decides on those two."""
    k = bisect.bisect_right(stamps, obs_stamp + STAMP_EPS)  # stamps[:k] are at or before the observation
    lo = max(0, k - 1)
    i = state_at(stamps[lo:k + 1], obs_stamp, tolerance)
    return i if i is None or i < 0 else lo + i


def newest_before(stamps: Sequence[float], obs_stamp: float) -> float | None:
    """The newest of ``stamps`` at or before ``obs_stamp`` (for messages about a skipped pairing)."""
    before = [st for st in stamps if st <= obs_stamp + STAMP_EPS]
    return max(before) if before else None


# ------------------------------------------------------------------------------------------ state
def state_vector(names: Sequence[str], positions: Sequence[float] | np.ndarray, joint_names: Sequence[str],
                 dim: int) -> np.ndarray:
    """The policy's raw state ``(dim,)`` ``float32`` from a joint state's ``names`` and ``positions``.

    ``joint_names`` given: those joints, in that order (there must be ``dim`` of them); empty: the first
    ``dim`` positions. Raises :class:`StateError` naming what is wrong (missing joints, too few positions,
    NaN or Inf at which joint) - the reason is meant to be logged as is.
    """
    pos = np.asarray(positions, dtype=np.float64).reshape(-1)  # (n,)
    if joint_names:
        if len(joint_names) != dim:
            raise StateError(f"{len(joint_names)} state joint names, the state has {dim} dimensions")
        index = {n: i for i, n in enumerate(names)}
        missing = [n for n in joint_names if n not in index]
        if missing:
            raise StateError(f"lacks joints {missing} (has {list(names)})")
        if pos.size != len(names):
            raise StateError(f"has {len(names)} names but {pos.size} positions")
        picked = [index[n] for n in joint_names]
        labels = list(joint_names)
    else:
        if pos.size < dim:
            raise StateError(f"has {pos.size} positions, the checkpoint's state needs {dim}")
        picked = list(range(dim))
        labels = [names[i] if i < len(names) else f"position {i}" for i in picked]
    raw = pos[picked]  # (dim,) float64
    with np.errstate(over="ignore"):  # beyond float32: Inf, reported below
        state = raw.astype(np.float32)  # (dim,)
    bad = ~np.isfinite(state)
    if bad.any():
        where = [labels[i] for i in np.flatnonzero(bad)]
        if np.isnan(raw).any():
            raise StateError(f"contains NaN (joints {where})")
        if np.isinf(raw).any():
            raise StateError(f"contains Inf (joints {where})")
        raise StateError(f"positions beyond the float32 range (joints {where})")
    return state


# ------------------------------------------------------------------------------------------ tokens
def encode_tokens(tokens: torch.Tensor, dtype: str) -> np.ndarray:
    """Kept tokens ``(K, D)`` -> the wire payload ``(K, D)`` in ``dtype`` (``float16``/``float32``), C order;
    ``payload.tobytes()`` is ``VisualTokens.data``."""
    nd = WIRE_DTYPES.get(dtype)
    if nd is None:
        raise TokenError(f"dtype {dtype!r} is not one of {', '.join(WIRE_DTYPES)}")
    import torch

    td = torch.float16 if dtype == "float16" else torch.float32
    return np.ascontiguousarray(tokens.detach().to("cpu", td).numpy().astype(nd, copy=False))


def decode_tokens(dtype: str, data: bytes | bytearray | memoryview, kept_indices: Sequence[int],
                  grid: tuple[int, int], token_dim: int, reused: Sequence[bool] = ()) -> CameraTokens:
    """Wire tokens (``VisualTokens`` fields) -> :class:`CameraTokens` (``float32`` ``(K, D)`` tokens, ``(K,)``
    kept grid indices). Raises :class:`TokenError` with the reason: unknown dtype, no tokens, a ``reused``
    list of another length, a byte count that is not ``K * token_dim * itemsize``, NaN/Inf values.
    Index ranges and the checkpoint's grid and dimension are checked by the runner."""
    import torch

    from effvla_ros.core.runner import CameraTokens

    nd = WIRE_DTYPES.get(dtype)
    if nd is None:
        raise TokenError(f"dtype {dtype!r} is not one of {', '.join(WIRE_DTYPES)}")
    n, d = len(kept_indices), int(token_dim)
    if n == 0:
        raise TokenError("no kept tokens")
    if len(reused) not in (0, n):
        raise TokenError(f"{len(reused)} reused flags for {n} tokens")
    raw = bytes(data)
    need = n * d * np.dtype(nd).itemsize
    if d <= 0 or len(raw) != need:
        raise TokenError(f"{n} tokens x {d} {dtype} need {need} bytes, got {len(raw)}")
    arr = np.frombuffer(raw, dtype=nd).reshape(n, d).astype(np.float32)  # (K, D)
    if not np.isfinite(arr).all():
        what = "NaN" if np.isnan(arr).any() else "Inf"
        raise TokenError(f"tokens contain {what}")
    return CameraTokens(torch.from_numpy(arr), torch.tensor(list(kept_indices), dtype=torch.long),
                        (int(grid[0]), int(grid[1])))


def missing_camera(grid: tuple[int, int] = (0, 0)) -> CameraTokens:
    """A camera without a frame: no tokens, masked out by the runner."""
    import torch

    from effvla_ros.core.runner import CameraTokens

    return CameraTokens(torch.zeros(0), torch.zeros(0, dtype=torch.long), (int(grid[0]), int(grid[1])), missing=True)


def camera_tokens_equal(a: CameraTokens, b: CameraTokens) -> bool:
    """Same kept indices, grid, missing flag and bit-identical tokens."""
    import torch

    return (a.missing == b.missing and tuple(a.grid) == tuple(b.grid) and torch.equal(a.kept, b.kept)
            and a.tokens.shape == b.tokens.shape and torch.equal(a.tokens, b.tokens))


__all__ = [
    "BYTES_PER_PIXEL", "DEFAULT_STATE_STAMP_TOLERANCE_S", "STAMP_EPS", "SUPPORTED_ENCODINGS", "WIRE_DTYPES",
    "ImageError", "ObservationError", "StateError", "TokenError", "camera_tokens_equal", "decode_tokens",
    "encode_tokens", "image_to_rgb", "missing_camera", "newest_before", "observation_stamp", "rgb_to_tensor",
    "state_at", "state_at_sorted", "state_vector",
]
