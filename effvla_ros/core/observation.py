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
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
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


def compressed_format(fmt: str) -> tuple[str, str]:
    """A sensor_msgs/CompressedImage ``format`` -> (codec ``jpeg``/``png``, the source encoding or "").

    image_transport writes ``"<encoding>; jpeg compressed <target>"`` (or ``png``), older drivers just
    ``"jpeg"``/``"png"``; ``compressedDepth`` (depth PNG with a quantization header) is refused."""
    f = str(fmt).strip()
    low = f.lower()
    if "compresseddepth" in low:
        raise ImageError(f"CompressedImage format {f!r}: compressedDepth (depth images) is not a camera image the "
                         "policy can use; record the colour stream (<topic>/compressed or image_raw)")
    enc = f.split(";", 1)[0].strip() if ";" in f else ""
    for codec, keys in (("jpeg", ("jpeg", "jpg")), ("png", ("png",))):
        if any(k in low for k in keys):
            return codec, enc
    raise ImageError(f"CompressedImage format {f!r}: not JPEG or PNG")


def decode_compressed(fmt: str, data: bytes | bytearray | memoryview | np.ndarray | Sequence[int]) -> np.ndarray:
    """A sensor_msgs/CompressedImage (``format``, ``data``) -> the decoded image as OpenCV returns it:
    ``(H, W)`` mono or ``(H, W, 3)`` RGB ``uint8`` (alpha dropped). Decoded by OpenCV's ``imdecode``."""
    import cv2

    codec, _enc = compressed_format(fmt)
    if isinstance(data, np.ndarray):
        buf = data.reshape(-1).astype(np.uint8, copy=False)
    elif isinstance(data, (bytes, bytearray, memoryview)):
        buf = np.frombuffer(data, dtype=np.uint8)
    else:
        buf = np.frombuffer(bytes(data), dtype=np.uint8)
    if buf.size == 0:
        raise ImageError(f"empty {codec} image")
    img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ImageError(f"{codec} data ({buf.size} bytes) could not be decoded (corrupt?)")
    if img.dtype != np.uint8:
        raise ImageError(f"{codec} image of {img.dtype} (16-bit?); a camera image of 8 bits per channel is needed")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    if img.ndim == 2:
        return np.ascontiguousarray(img)
    if img.shape[2] == 4:
        return np.ascontiguousarray(img[..., 2::-1])  # BGRA -> RGB
    return np.ascontiguousarray(img[..., ::-1])  # BGR -> RGB


def compressed_to_rgb(fmt: str, data: bytes | bytearray | memoryview | np.ndarray | Sequence[int]) -> np.ndarray:
    """A sensor_msgs/CompressedImage (``format``, ``data``) -> ``(H, W, 3)`` ``uint8`` RGB (mono repeated to 3
    channels, as :func:`image_to_rgb` does for ``mono8``). Raises :class:`ImageError` with the reason."""
    img = decode_compressed(fmt, data)
    return np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img


def is_mono(encoding_or_format: str) -> bool:
    """Whether an Image ``encoding`` or a CompressedImage ``format`` says the image is single-channel."""
    e = str(encoding_or_format).split(";", 1)[0].strip().lower()
    return e in ("mono8", "8uc1", "mono16", "16uc1")


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
            raise StateError(f"lacks joints {missing} (it has {list(names)})")
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


# ------------------------------------------------------------------------------------------ joint names
#: Sidecar of a checkpoint directory declaring its joint names (LeRobot's config.json has no field for
#: them): ``{"state": [...], "action": [...]}``. ``config.json``'s ``input_features["observation.state"]``
#: / ``output_features["action"]`` ``names`` (the LeRobot dataset feature layout) are read too.
JOINT_NAMES_FILE = "joint_names.json"


def _names_of(feature: object) -> list[str]:
    names = feature.get("names") if isinstance(feature, dict) else None
    if isinstance(names, dict):  # LeRobot datasets: {"motors": [...]}
        names = next((v for v in names.values() if isinstance(v, list)), None)
    return [str(n) for n in names] if isinstance(names, list) else []


def checkpoint_joint_names(checkpoint: str | os.PathLike[str]) -> tuple[list[str], list[str]]:
    """(state joint names, action names) a checkpoint directory declares (empty lists: none).

    ``<checkpoint>/joint_names.json`` (``{"state": [...], "action": [...]}``) first, then ``names`` of
    ``config.json``'s ``observation.state`` / ``action`` features."""
    import json

    d = Path(checkpoint)
    state: list[str] = []
    action: list[str] = []
    side = d / JOINT_NAMES_FILE
    if side.is_file():
        try:
            data = json.loads(side.read_text())
        except (OSError, ValueError) as e:
            raise StateError(f"{side}: not readable JSON ({e})") from None
        if not isinstance(data, dict):
            raise StateError(f"{side}: expected {{\"state\": [...], \"action\": [...]}}")
        state = [str(n) for n in data.get("state") or []]
        action = [str(n) for n in data.get("action") or []]
    cfg = d / "config.json"
    if (not state or not action) and cfg.is_file():
        try:
            c = json.loads(cfg.read_text())
        except (OSError, ValueError):
            c = {}
        state = state or _names_of((c.get("input_features") or {}).get("observation.state"))
        action = action or _names_of((c.get("output_features") or {}).get("action"))
    return state, action


def parse_joint_map(text: str | Sequence[str] | None) -> dict[str, str]:
    """``"old=new,old2=new2"`` (or a list of such items) -> {old: new}: bag/robot joint name -> policy name.
    An item ``prefix*=`` strips ``prefix`` from every name that starts with it, ``*suffix=`` a suffix
    (e.g. ``so101_*=`` for ``so101_shoulder_pan`` -> ``shoulder_pan``)."""
    items: list[str] = []
    if isinstance(text, str):
        items = [x for x in text.split(",")]
    elif text:
        for t in text:
            items.extend(t.split(","))
    out: dict[str, str] = {}
    for raw in items:
        item = raw.strip()
        if not item:
            continue
        old, eq, new = item.partition("=")
        old, new = old.strip(), new.strip()
        if not eq or not old or (not new and "*" not in old):
            raise StateError(f"joint map item {item!r}: expected OLD=NEW (or PREFIX*= / *SUFFIX= to strip)")
        if "*" in old and (old.count("*") != 1 or new or not (old.startswith("*") or old.endswith("*"))):
            raise StateError(f"joint map item {item!r}: a pattern is PREFIX*= or *SUFFIX= (strips it)")
        out[old] = new
    return out


def map_joint_names(names: Sequence[str], joint_map: dict[str, str]) -> list[str]:
    """The robot's joint names renamed by :func:`parse_joint_map`'s mapping (exact names first, then
    prefix/suffix strips); names the map does not mention are kept."""
    if not joint_map:
        return list(names)
    out = []
    for n in names:
        if n in joint_map:
            out.append(joint_map[n])
            continue
        m = n
        for pat in joint_map:
            if pat.endswith("*") and m.startswith(pat[:-1]):
                m = m[len(pat) - 1:]
            elif pat.startswith("*") and m.endswith(pat[1:]) and len(pat) > 1:
                m = m[: len(m) - len(pat) + 1]
        out.append(m)
    return out


@dataclass(frozen=True)
class StateSpec:
    """How the policy's state vector is assembled from a JointState: by joint name (``joint_names`` in
    order, after renaming the message's names with ``joint_map``) or, only when asked for
    (``by_position``), the first ``dim`` positions. ``source`` says where the names came from. The policy
    node, replay and evaluation all go through :meth:`vector`."""

    dim: int
    joint_names: tuple[str, ...] = ()
    joint_map: tuple[tuple[str, str], ...] = ()
    by_position: bool = False
    source: str = ""

    def vector(self, names: Sequence[str], positions: Sequence[float] | np.ndarray) -> np.ndarray:
        return state_vector(map_joint_names(list(names), dict(self.joint_map)), positions,
                            [] if self.by_position else list(self.joint_names), self.dim)

    def describe(self) -> str:
        if self.by_position:
            return f"the first {self.dim} JointState positions (by position, {self.source})"
        return f"joints {list(self.joint_names)} by name ({self.source})"


def resolve_state_spec(dim: int, *, explicit: Sequence[str] = (), checkpoint: Sequence[str] = (),
                       target: Sequence[str] = (), target_source: str = "the target's state_joint_names",
                       joint_map: dict[str, str] | None = None, by_position: bool = False) -> StateSpec:
    """The state rule: names given explicitly (``--state-joint-names`` / the node's ``state_joint_names``),
    else the checkpoint's declared names, else the deployment target's; positions only with
    ``by_position``. Raises :class:`StateError` when a list has the wrong length or there is no rule."""
    jm = tuple(sorted((joint_map or {}).items()))
    if by_position:
        if explicit:
            raise StateError("state by position and explicit state joint names exclude each other")
        return StateSpec(int(dim), (), jm, True, "asked for explicitly")
    for names, src in ((explicit, "given explicitly"), (checkpoint, "declared by the checkpoint"),
                       (target, target_source)):
        if names:
            if len(names) != dim:
                raise StateError(f"{len(names)} state joint names {list(names)} ({src}), the checkpoint's state has "
                                 f"{dim} dimensions")
            if len(set(names)) != len(names):
                raise StateError(f"duplicate state joint names {list(names)} ({src})")
            return StateSpec(int(dim), tuple(str(n) for n in names), jm, False, src)
    raise StateError(f"no state joint names: the checkpoint declares none ({JOINT_NAMES_FILE}) and no target gives "
                     f"them; name the {dim} joints forming the state (--state-joint-names a,b,...) or take the "
                     "first positions explicitly (--state-by-position)")


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
    "BYTES_PER_PIXEL", "DEFAULT_STATE_STAMP_TOLERANCE_S", "JOINT_NAMES_FILE", "STAMP_EPS", "SUPPORTED_ENCODINGS",
    "WIRE_DTYPES", "ImageError", "ObservationError", "StateError", "StateSpec", "TokenError", "camera_tokens_equal",
    "checkpoint_joint_names", "compressed_format", "compressed_to_rgb", "decode_compressed", "decode_tokens",
    "encode_tokens", "image_to_rgb", "is_mono", "map_joint_names", "missing_camera", "newest_before",
    "observation_stamp", "parse_joint_map", "resolve_state_spec", "rgb_to_tensor", "state_at", "state_at_sorted",
    "state_vector",
]
