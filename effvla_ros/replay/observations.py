"""Observations from a bag: camera images matched by stamp, joint state, instruction, recorded chunks.

Rules (the policy node's, applied offline):

* every stream is sorted by its stamp (``header.stamp``; the receive/log time when the header stamp
  is zero); messages whose stamp goes back relative to the one before (in recording order) are
  counted as ``out_of_order`` per topic, and duplicate stamps of one camera keep the first frame;
* observation times: with ``mode="chunks"`` (default ``auto`` when the bag has ActionChunks) the
  recorded chunks' stamps, i.e. exactly the observations the live policy used; with ``"frames"``
  every frame of the anchor camera (the camera with the fewest frames, or ``anchor``);
* at each time, every mapped camera contributes its frame nearest in stamp within
  ``stamp_tolerance_s`` (else the observation is skipped: ``unmatched``); the observation stamp is
  the newest of those frame stamps (as in the node); an observation using exactly the frames of the
  previous one is skipped (``duplicate``);
* state: the policy node's pairing (:func:`effvla_ros.core.observation.state_at`): the newest JointState
  stamped at or before the observation and at most ``state_stamp_tolerance_s`` older (0: no limit);
  none at or before it: skipped (``before_first_state``), the newest one older than the tolerance:
  skipped (``unsynced_state``), unless a fixed ``--state`` is given. The state vector is assembled by
  joint name (:class:`~effvla_ros.core.observation.StateSpec`, the node's rule): the names given, else
  the checkpoint's, else the target's, after renaming the bag's names with the joint map; by position
  only when asked for. JointStates lacking a joint or holding NaN/Inf are dropped and counted by reason;
  when none is usable the error names the reason (missing joints with the names the bag has, NaN);
* images: ``sensor_msgs/Image`` and ``sensor_msgs/CompressedImage`` (JPEG/PNG, decoded by OpenCV;
  ``compressedDepth`` refused); warnings for mono images fed to the colour policy and for image sizes
  that change within a camera's stream;
* instruction: the newest ``std_msgs/String`` on the instruction topic received (log time) at or
  before the observation's newest frame was received; observations before the first instruction
  use the first one (counted as ``instruction_backfilled``); ``--instruction`` overrides the bag.
"""
from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from effvla_ros.core.observation import (
    DEFAULT_STATE_STAMP_TOLERANCE_S,
    STAMP_EPS,
    ImageError,
    StateError,
    StateSpec,
    decode_compressed,
    is_mono,
    resolve_state_spec,
    state_at_sorted,
)
from effvla_ros.core.observation import image_to_rgb as _raw_image_to_rgb
from effvla_ros.replay.bagio import Bag, BagError, cdr_header_stamp_ns

RAW_IMAGE_TYPE = "sensor_msgs/msg/Image"
COMPRESSED_IMAGE_TYPE = "sensor_msgs/msg/CompressedImage"
IMAGE_TYPES = (RAW_IMAGE_TYPE, COMPRESSED_IMAGE_TYPE)
JOINT_STATE_TYPE = "sensor_msgs/msg/JointState"
STRING_TYPE = "std_msgs/msg/String"
CHUNK_TYPE = "effvla_ros/msg/ActionChunk"


@dataclass
class Frame:
    topic: str
    seq: int  # index of the message among this topic's messages in recording order
    log_ns: int
    stamp_ns: int


@dataclass
class RecordedChunk:
    stamp_ns: int
    chunk_id: int
    step_period_s: float
    joint_names: list[str]
    actions: np.ndarray  # (H, A)
    latency_ms: float
    exit_layers: list[int]
    denoising_steps: int
    rtc_delay_steps: int


@dataclass
class Observation:
    index: int
    stamp_ns: int
    frames: dict[str, Frame]  # checkpoint camera -> frame
    state: np.ndarray  # (state_dim,) float32
    instruction: str
    recorded: RecordedChunk | None = None

    @property
    def stamp(self) -> float:
        return self.stamp_ns * 1e-9


@dataclass
class Episode:
    observations: list[Observation]
    camera_topics: dict[str, str]  # checkpoint camera -> topic
    missing_cameras: list[str]
    state_topic: str | None
    instruction_topic: str | None
    chunk_topic: str | None
    chunks: list[RecordedChunk]
    instructions: list[str]
    stats: dict[str, Any] = field(default_factory=dict)
    images: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)  # (topic, seq) -> (H, W, 3) uint8

    def image(self, frame: Frame) -> np.ndarray:
        return self.images[(frame.topic, frame.seq)]


@dataclass
class ObservationOptions:
    cameras: dict[str, str] = field(default_factory=dict)  # checkpoint camera -> topic (explicit)
    joint_states_topic: str | None = None
    instruction_topic: str | None = None
    action_chunk_topic: str | None = None
    instruction: str | None = None
    state: list[float] | None = None
    state_joint_names: list[str] = field(default_factory=list)  # explicit (else the checkpoint's / target's)
    joint_map: dict[str, str] = field(default_factory=dict)  # bag joint name (or PREFIX*) -> policy name
    state_by_position: bool = False  # the first state_dim positions, names ignored (only when asked for)
    state_spec: StateSpec | None = None  # resolved rule (run_replay sets it); None: from the fields above
    stamp_tolerance_s: float = 0.05
    state_stamp_tolerance_s: float = DEFAULT_STATE_STAMP_TOLERANCE_S  # the policy node's parameter (0: no limit)
    mode: str = "auto"  # auto | chunks | frames
    anchor: str | None = None
    max_steps: int = 0


# ------------------------------------------------------------------------------------------ images
def image_to_rgb(msg: Any) -> np.ndarray:
    """A rosbags ``sensor_msgs/msg/Image`` or ``CompressedImage`` -> (H, W, 3) uint8 RGB
    (:func:`effvla_ros.core.observation.image_to_rgb` / :func:`~effvla_ros.core.observation.compressed_to_rgb`)."""
    return _decode_image(msg)[0]


def _decode_image(msg: Any) -> tuple[np.ndarray, bool]:
    """(RGB image, whether the source was single-channel)."""
    try:
        if hasattr(msg, "format"):  # CompressedImage
            img = decode_compressed(str(msg.format), msg.data)
            if img.ndim == 2:
                return np.repeat(img[..., None], 3, axis=2), True
            return img, False
        return (_raw_image_to_rgb(str(msg.encoding), int(msg.height), int(msg.width), int(msg.step), msg.data),
                is_mono(str(msg.encoding)))
    except ImageError as e:
        raise BagError(f"image: {e}") from None


# ------------------------------------------------------------------------------------------ topics
def _pick(bag: Bag, explicit: str | None, msgtype: str, preferred: tuple[str, ...], what: str, hint: str) -> str | None:
    if explicit:
        if explicit not in bag.topics:
            raise BagError(f"{what} topic {explicit} is not in the bag (topics: {sorted(bag.topics)}); {hint}")
        return explicit
    cands = bag.topics_of_type(msgtype)
    cands = [c for c in cands if bag.topics[c].count > 0] or cands
    for p in preferred:
        for c in cands:
            if c.rstrip("/").endswith(p):
                return c
    return cands[0] if cands else None


def map_cameras(bag: Bag, cameras: list[str], explicit: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """checkpoint camera -> image topic (explicit mapping, else a topic with the camera's name as a
    path segment, e.g. /camera/<cam>/image_raw); cameras without a topic are replayed as missing."""
    all_image_topics = bag.topics_of_type(*IMAGE_TYPES)
    image_topics = [t for t in all_image_topics if bag.topics[t].count > 0]
    if not image_topics:
        raise BagError(no_images_reason(bag, all_image_topics))
    unknown = [c for c in explicit if c not in cameras]
    if unknown:
        raise BagError(f"--camera {unknown[0]}=...: not a camera of the checkpoint {cameras}")
    mapping: dict[str, str] = {}
    for cam in cameras:
        if cam in explicit:
            t = explicit[cam]
            if t not in bag.topics:
                raise BagError(f"--camera {cam}={t}: topic not in the bag (image topics: {image_topics})")
            mapping[cam] = t
            continue
        hits = [t for t in image_topics if cam in t.strip("/").split("/")]
        if len(hits) == 1:
            mapping[cam] = hits[0]
        elif len(hits) > 1:  # raw image_raw first, then image_transport's image_raw/compressed, then the rest
            exact = [t for t in hits if t.rstrip("/").endswith(f"/{cam}/image_raw")]
            comp = [t for t in hits if t.rstrip("/").endswith(f"/{cam}/image_raw/compressed")]
            mapping[cam] = (exact or comp or hits)[0]
    if not mapping:
        raise BagError(f"no image topic matches the checkpoint's cameras {cameras} (image topics in the bag: "
                       f"{image_topics}); map them with --camera CAMERA=TOPIC, e.g. "
                       f"--camera {cameras[0]}={image_topics[0]}")
    return mapping, [c for c in cameras if c not in mapping]


def no_images_reason(bag: Bag, image_topics: list[str] | None = None) -> str:
    """Why a bag has no usable camera images, naming the cause (truncated file, empty topics, no topic)."""
    image_topics = bag.topics_of_type(*IMAGE_TYPES) if image_topics is None else image_topics
    others = ", ".join(f"{t} [{i.msgtype}]" for t, i in sorted(bag.topics.items())) or "none"
    if bag.recovered and bag.message_count == 0:
        why = "; ".join(bag.notes) or "incomplete MCAP"
        return f"the bag is truncated: no complete message could be read ({why})"
    if image_topics:
        what = ", ".join(f"{t} [{bag.topics[t].msgtype}]" for t in image_topics)
        cut = f" (the file is truncated: {'; '.join(bag.notes)})" if bag.recovered else ""
        return f"the bag's image topics {what} have no messages{cut}: nothing to replay"
    cut = f"; the file is truncated ({'; '.join(bag.notes)})" if bag.recovered else ""
    return ("the bag has no camera topic (sensor_msgs/msg/Image or sensor_msgs/msg/CompressedImage): nothing to "
            f"replay (topics: {others}){cut}")


def state_spec_for(dim: int, opts: ObservationOptions, checkpoint_names: Sequence[str], target: str | None,
                   policy_params: dict[str, Any]) -> StateSpec:
    """The state rule of a replay: ``--state-joint-names``, else the checkpoint's declared names, else the
    target's (``--target``) or the deployment default's (config/base.yaml) policy ``state_joint_names``;
    ``--state-by-position`` only when given. Raises BagError naming what is wrong."""
    tnames = list(policy_params.get("state_joint_names") or [])
    tsrc = f"target {target}'s policy state_joint_names" if target else ""
    if not tnames and not target:
        try:
            from effvla_ros.graph import share_dir
            from effvla_ros.replay.settings import node_params

            tnames = list(node_params([share_dir() / "config" / "base.yaml"], "policy").get("state_joint_names") or [])
            tsrc = "config/base.yaml's policy state_joint_names (the deployment default; --target for another)"
        except (OSError, ValueError):
            tnames = []
    try:
        return resolve_state_spec(dim, explicit=opts.state_joint_names, checkpoint=checkpoint_names, target=tnames,
                                  target_source=tsrc, joint_map=opts.joint_map, by_position=opts.state_by_position)
    except StateError as e:
        raise BagError(str(e)) from None


def _state_reason(err: str) -> str:
    """A StateError message -> its reason key (for counting dropped JointStates)."""
    if "NaN" in err:
        return "nan"
    if "Inf" in err or "float32 range" in err:
        return "inf"
    if "lacks joints" in err:
        return "missing_joints"
    return "malformed"


def _no_state_reason(topic: str, n: int, rejected: dict[str, int], first: dict[str, str],
                     seen: dict[tuple[str, ...], int], spec: StateSpec) -> str:
    """One line naming why no JointState of ``topic`` could form the state."""
    if n == 0:
        return (f"the joint state topic {topic} has no messages: the policy needs the robot state "
                "(pass a fixed --state v1,v2,... or another --joint-states-topic)")
    if rejected.get("nan", 0) + rejected.get("inf", 0) == n:
        what = "NaN" if rejected.get("nan") else "Inf"
        return f"all {n} JointStates on {topic} contain {what} positions (the first: JointState {first.get('nan') or first.get('inf')})"
    if "missing_joints" in rejected:
        have = sorted({x for names in seen for x in names})
        want = list(spec.joint_names)
        mapped = f" after --joint-map {dict(spec.joint_map)}" if spec.joint_map else ""
        from effvla_ros.core.observation import map_joint_names

        have_m = sorted(set(map_joint_names(have, dict(spec.joint_map))))
        missing = [j for j in want if j not in have_m]
        return (f"the JointStates on {topic} lack joints {missing} of the state {want} ({spec.source}); they have "
                f"{have}{mapped}: rename them with --joint-map OLD=NEW,... (or PREFIX*= to strip a prefix), name the "
                "state's joints with --state-joint-names, or take positions explicitly with --state-by-position")
    k = max(rejected, key=lambda r: rejected[r])
    return f"none of the {n} JointStates on {topic} is usable: {rejected[k]} {k} (the first: JointState {first[k]})"


def _sorted_stream(items: list[tuple[int, Any]]) -> tuple[list[tuple[int, Any]], int]:
    """Sort (stamp, payload) by stamp (stable); count stamps that went back in recording order."""
    back = 0
    hi = -(2**63)
    for s, _ in items:
        if s < hi:
            back += 1
        hi = max(hi, s)
    return sorted(items, key=lambda x: x[0]), back


def _stamp(raw: bytes, log_ns: int) -> int:
    s = cdr_header_stamp_ns(raw)
    return log_ns if not s else s


def build_episode(bag: Bag, cameras: list[str], state_dim: int, opts: ObservationOptions) -> Episode:
    """Observations of a bag for a checkpoint with ``cameras`` and ``state_dim`` (see the module docstring)."""
    cam_topics, missing = map_cameras(bag, cameras, opts.cameras)
    state_topic = _pick(bag, opts.joint_states_topic, JOINT_STATE_TYPE, ("joint_states",), "joint state",
                        "pass --joint-states-topic TOPIC or a fixed --state")
    instr_topic = _pick(bag, opts.instruction_topic, STRING_TYPE, ("instruction",), "instruction",
                        "pass --instruction-topic TOPIC or --instruction TEXT")
    chunk_topic = _pick(bag, opts.action_chunk_topic, CHUNK_TYPE, ("action_chunk",), "action chunk",
                        "pass --action-chunk-topic TOPIC")
    if state_topic is None and opts.state is None:
        raise BagError(f"the bag has no sensor_msgs/msg/JointState topic (topics: {sorted(bag.topics)}): the "
                       f"policy needs the robot state; pass a fixed state with --state v1,v2,... ({state_dim} "
                       "values) or the topic with --joint-states-topic")
    if opts.state is not None and len(opts.state) != state_dim:
        raise BagError(f"--state: {len(opts.state)} values, the checkpoint's state has {state_dim}")
    spec = opts.state_spec
    if spec is None and opts.state is None:
        spec = state_spec_for(state_dim, opts, [], None, {})
    if opts.instruction is None and instr_topic is None:
        raise BagError(f"the bag has no std_msgs/msg/String instruction topic (topics: {sorted(bag.topics)}): "
                       "pass the task with --instruction TEXT (or its topic with --instruction-topic)")

    # ---- pass 1: stamps of images, decoded small messages
    frames: dict[str, list[tuple[int, Frame]]] = {t: [] for t in set(cam_topics.values())}
    seqs: dict[str, int] = {t: 0 for t in frames}
    states: list[tuple[int, np.ndarray]] = []
    instr: list[tuple[int, str]] = []
    chunks: list[tuple[int, RecordedChunk]] = []
    rejected: dict[str, int] = {}  # reason -> JointStates dropped
    first_rejection: dict[str, str] = {}
    seen_names: dict[tuple[str, ...], int] = {}  # joint name lists the bag's JointStates have
    state_msgs = 0
    wanted = set(frames) | {t for t in (state_topic, instr_topic, chunk_topic) if t}
    for topic, log_ns, raw in bag.messages(wanted):
        if topic in frames:
            s = _stamp(raw, log_ns)
            frames[topic].append((s, Frame(topic, seqs[topic], log_ns, s)))
            seqs[topic] += 1
        elif topic == state_topic:
            if spec is None:  # a fixed --state replaces the bag's
                continue
            msg = bag.decode(topic, raw)
            state_msgs += 1
            names = tuple(str(n) for n in msg.name)
            seen_names[names] = seen_names.get(names, 0) + 1
            try:
                vec = spec.vector(names, msg.position)
            except StateError as e:
                reason = _state_reason(str(e))
                rejected[reason] = rejected.get(reason, 0) + 1
                first_rejection.setdefault(reason, str(e))
                continue
            states.append((_stamp(raw, log_ns), vec))
        elif topic == instr_topic:
            instr.append((log_ns, str(bag.decode(topic, raw).data).strip()))
        elif topic == chunk_topic:
            m = bag.decode(topic, raw)
            n, a = int(m.num_actions), int(m.action_dim)
            acts = np.asarray(m.actions, dtype=np.float64)
            if n <= 0 or a <= 0 or acts.size != n * a:
                continue
            dt = float(m.step_period.sec) + 1e-9 * float(m.step_period.nanosec)
            rc = RecordedChunk(_stamp(raw, log_ns), int(m.chunk_id), dt, list(m.joint_names), acts.reshape(n, a),
                               float(m.inference_latency_ms), [int(x) for x in m.exit_layers],
                               int(m.denoising_steps), int(m.rtc_delay_steps))
            chunks.append((rc.stamp_ns, rc))

    out_of_order: dict[str, int] = {}
    sorted_frames: dict[str, list[Frame]] = {}
    duplicates = 0
    for t, items in frames.items():
        srt, back = _sorted_stream(items)
        out_of_order[t] = back
        uniq: list[Frame] = []
        for s, fr in srt:
            if uniq and uniq[-1].stamp_ns == s:
                duplicates += 1
                continue
            uniq.append(fr)
        sorted_frames[t] = uniq
    if state_topic:
        states, out_of_order[state_topic] = _sorted_stream(states)
    if chunk_topic:
        chunks, out_of_order[chunk_topic] = _sorted_stream(chunks)
    instr.sort(key=lambda x: x[0])
    if opts.instruction is None and not instr:
        raise BagError(f"the instruction topic {instr_topic} has no messages: pass the task with --instruction TEXT")
    if state_topic and not states and spec is not None:
        raise BagError(_no_state_reason(state_topic, state_msgs, rejected, first_rejection, seen_names, spec))
    for cam, t in cam_topics.items():
        if not sorted_frames[t]:
            raise BagError(f"camera {cam}: topic {t} has no messages")
    warnings: list[str] = []
    if rejected:
        warnings.append(f"{sum(rejected.values())} of {state_msgs} JointStates on {state_topic} dropped: "
                        + "; ".join(f"{n} {k} (the first: {first_rejection[k]})" for k, n in sorted(rejected.items())))

    # ---- observation times
    mode = opts.mode
    if mode == "auto":
        mode = "chunks" if chunks else "frames"
    if mode == "chunks" and not chunks:
        raise BagError("--observations chunks: the bag has no ActionChunk messages (use --observations frames)")
    if mode not in ("chunks", "frames"):
        raise BagError(f"--observations: {mode!r} is not one of auto, chunks, frames")
    anchor = opts.anchor
    if anchor is not None and anchor not in cam_topics:
        raise BagError(f"--anchor-camera {anchor}: not a mapped camera {sorted(cam_topics)}")
    if anchor is None:
        anchor = min(cam_topics, key=lambda c: (len(sorted_frames[cam_topics[c]]), cameras.index(c)))
    times: list[tuple[int, RecordedChunk | None]]
    if mode == "chunks":
        times = [(s, c) for s, c in chunks]
    else:
        times = [(f.stamp_ns, None) for f in sorted_frames[cam_topics[anchor]]]

    tol = int(round(opts.stamp_tolerance_s * 1e9))
    stamp_lists = {t: [f.stamp_ns for f in fl] for t, fl in sorted_frames.items()}
    state_secs = [s * 1e-9 for s, _ in states]  # sorted (s)
    state_tol = opts.state_stamp_tolerance_s if opts.state_stamp_tolerance_s > 0 else math.inf
    instr_logs = [t for t, _ in instr]
    chunk_by_stamp = {s: c for s, c in chunks} if mode == "frames" else {}
    chunk_stamps = sorted(chunk_by_stamp)
    skipped = {"unmatched": 0, "duplicate": 0, "before_first_state": 0, "unsynced_state": 0}
    backfilled = 0
    obs: list[Observation] = []
    last_key: tuple[int, ...] | None = None
    for t_ns, rec in times:
        chosen: dict[str, Frame] = {}
        for cam, topic in cam_topics.items():
            sl = stamp_lists[topic]
            i = bisect.bisect_left(sl, t_ns)
            best = None
            for j in (i - 1, i):
                if 0 <= j < len(sl) and abs(sl[j] - t_ns) <= tol and (best is None or abs(sl[j] - t_ns) < abs(sl[best] - t_ns)):
                    best = j
            if best is None:
                break
            chosen[cam] = sorted_frames[topic][best]
        if len(chosen) != len(cam_topics):
            skipped["unmatched"] += 1
            continue
        key = tuple(chosen[c].seq for c in sorted(chosen))
        if key == last_key:
            skipped["duplicate"] += 1
            continue
        stamp = max(f.stamp_ns for f in chosen.values())
        if opts.state is not None:
            state = np.asarray(opts.state, dtype=np.float32)
        else:
            k = state_at_sorted(state_secs, stamp * 1e-9, state_tol)  # as the policy node pairs
            if k is None or k < 0:
                before = bisect.bisect_right(state_secs, stamp * 1e-9 + STAMP_EPS) > 0  # one, but too old
                skipped["unsynced_state" if before else "before_first_state"] += 1
                continue
            state = states[k][1]
        if opts.instruction is not None:
            text = opts.instruction
        else:
            log = max(f.log_ns for f in chosen.values())
            k = bisect.bisect_right(instr_logs, log) - 1
            if k < 0:
                backfilled += 1
                k = 0
            text = instr[k][1]
        last_key = key
        if rec is None and chunk_by_stamp:  # frames mode: a recorded chunk of this very observation
            k = bisect.bisect_left(chunk_stamps, stamp - 1_000_000)
            if k < len(chunk_stamps) and abs(chunk_stamps[k] - stamp) <= 1_000_000:
                rec = chunk_by_stamp[chunk_stamps[k]]
        obs.append(Observation(len(obs), stamp, chosen, state, text, rec))
        if opts.max_steps and len(obs) >= opts.max_steps:
            break
    if not obs:
        raise BagError(f"no observation could be built: {skipped} (cameras {cam_topics}, stamp tolerance "
                       f"{opts.stamp_tolerance_s} s, state stamp tolerance {opts.state_stamp_tolerance_s} s; try "
                       "--stamp-tolerance, --state-stamp-tolerance or --observations frames)")

    # ---- pass 2: the images the observations use
    need = {(f.topic, f.seq) for o in obs for f in o.frames.values()}
    images: dict[tuple[str, int], np.ndarray] = {}
    counters = {t: 0 for t in frames}
    sizes: dict[str, dict[tuple[int, int], int]] = {t: {} for t in frames}  # topic -> (H, W) -> images used
    mono: dict[str, int] = {}
    for topic, _log, raw in bag.messages(set(frames)):
        seq = counters[topic]
        counters[topic] += 1
        if (topic, seq) in need:
            msg = bag.decode(topic, raw)
            try:
                img, is_gray = _decode_image(msg)
            except BagError as e:
                raise BagError(f"{topic} message {seq}: {e}") from None
            images[(topic, seq)] = img
            hw = (int(img.shape[0]), int(img.shape[1]))
            sizes[topic][hw] = sizes[topic].get(hw, 0) + 1
            if is_gray:
                mono[topic] = mono.get(topic, 0) + 1
    for topic, n in sorted(mono.items()):
        warnings.append(f"{topic}: {n} single-channel (mono) images fed to a colour policy (the grey level is "
                        "repeated to R, G and B; the policy was trained on colour)")
    for topic, by_size in sorted(sizes.items()):
        if len(by_size) > 1:
            desc = ", ".join(f"{w}x{h} ({n})" for (h, w), n in sorted(by_size.items(), key=lambda x: -x[1]))
            warnings.append(f"{topic}: the image size changes within the stream: {desc} (each image is resized "
                            "to the policy's input)")

    stats = {
        "mode": mode,
        "anchor_camera": anchor if mode == "frames" else None,
        "observations": len(obs),
        "skipped": skipped,
        "duplicate_frames": duplicates,
        "out_of_order": out_of_order,
        "instruction_backfilled": backfilled,
        "rejected_joint_states": sum(rejected.values()),
        "dropped": {"joint_states": dict(sorted(rejected.items()))},
        "state": {"rule": spec.describe() if spec is not None else "fixed --state",
                  "joint_names": list(spec.joint_names) if spec is not None else [],
                  "by_position": bool(spec.by_position) if spec is not None else False,
                  "source": spec.source if spec is not None else "--state",
                  "joint_map": dict(spec.joint_map) if spec is not None else {},
                  "bag_joint_names": [list(n) for n in sorted(seen_names, key=lambda k: -seen_names[k])][:4]},
        "image_types": {t: bag.topics[t].msgtype for t in sorted(frames)},
        "image_sizes": {t: [[w, h] for (h, w) in sorted(v)] for t, v in sorted(sizes.items())},
        "warnings": warnings,
        "frames": {t: len(v) for t, v in sorted_frames.items()},
        "joint_states": len(states),
        "recorded_chunks": len(chunks),
        "stamp_tolerance_s": opts.stamp_tolerance_s,
        "state_stamp_tolerance_s": opts.state_stamp_tolerance_s,
        "truncated_by_max_steps": bool(opts.max_steps and len(obs) >= opts.max_steps),
    }
    return Episode(obs, cam_topics, missing, state_topic, instr_topic, chunk_topic, [c for _, c in chunks],
                   sorted({o.instruction for o in obs}), stats, images)
