"""Synthetic rosbag2 episodes written with ``rosbags`` (tests, demos, trying ``effvla replay`` without a robot).

:func:`write_episode_bag` writes a short episode in the layout of the pipeline: camera images at their
own rates (a moving bright square so consecutive frames differ a little), joint states, a latched
instruction and, optionally, ActionChunks, in MCAP or sqlite3, with options to shuffle stamps (out of
order) or to leave topics out.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from effvla_ros.replay.bagio import make_typestore


def _time(ts: Any, t: float) -> Any:
    sec = int(np.floor(t))
    return ts.types["builtin_interfaces/msg/Time"](sec=sec, nanosec=int(round((t - sec) * 1e9)) % 1_000_000_000)


def _header(ts: Any, t: float, frame: str = "") -> Any:
    return ts.types["std_msgs/msg/Header"](stamp=_time(ts, t), frame_id=frame)


def frame_image(t: float, h: int, w: int, seed: int = 0) -> np.ndarray:
    """(h, w, 3) uint8: a gradient background and a square moving with t."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)),
                    np.full((h, w), (seed * 53) % 256)], axis=-1).astype(np.uint8)
    s = max(4, h // 5)
    cx = int((0.5 + 0.35 * np.sin(1.3 * t + seed)) * (w - s))
    cy = int((0.5 + 0.35 * np.cos(0.9 * t + seed)) * (h - s))
    img[cy:cy + s, cx:cx + s] = (250, 240, 30)
    return img


def write_episode_bag(
    path: str | Path,
    *,
    storage: str = "mcap",
    cameras: dict[str, float] | None = None,  # topic -> rate (Hz)
    duration: float = 2.0,
    image_size: tuple[int, int] = (48, 64),
    start: float = 100.0,
    joint_rate: float = 20.0,
    joint_names: Sequence[str] = ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper"),
    instruction: str | None = "pick up the red cube",
    include_joint_states: bool = True,
    chunks: dict[str, Any] | None = None,  # {"rate": Hz, "num_actions": H, "step_period": s}
    out_of_order: bool = False,
    encoding: str = "rgb8",
    seed: int = 0,
) -> Path:
    """Write the episode; returns the bag directory. ``out_of_order`` swaps the recording order of
    pairs of images (their stamps then go back in the file)."""
    from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime
    from rosbags.rosbag2 import StoragePlugin, Writer

    ts = make_typestore()
    path = Path(path)
    cameras = cameras if cameras is not None else {"/camera/camera1/image_raw": 10.0, "/camera/camera2/image_raw": 5.0}
    h, w = image_size
    inf = QosTime(2147483647, 4294967295)
    latched = Qos(QosHistory.KEEP_LAST, 1, QosReliability.RELIABLE, QosDurability.TRANSIENT_LOCAL, inf, inf,
                  QosLiveliness.AUTOMATIC, inf, False)
    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
    msgs: list[tuple[float, str, Any]] = []  # (log time, topic, message)
    Image = ts.types["sensor_msgs/msg/Image"]
    for ci, (topic, rate) in enumerate(cameras.items()):
        n = int(duration * rate)
        for k in range(n):
            t = start + k / rate + 0.003 * ci  # cameras are not synchronized
            img = frame_image(t - start, h, w, seed + ci)
            data = img[..., ::-1] if encoding == "bgr8" else img
            msgs.append((t + 0.002, topic, Image(header=_header(ts, t, topic.split("/")[-2]), height=h, width=w,
                                                 encoding=encoding, is_bigendian=0, step=w * 3,
                                                 data=np.ascontiguousarray(data).reshape(-1))))
    if include_joint_states:
        JS = ts.types["sensor_msgs/msg/JointState"]
        for k in range(int(duration * joint_rate) + 1):
            t = start - 0.05 + k / joint_rate
            pos = np.array([0.2 * np.sin(0.7 * (t - start) + i) for i in range(len(joint_names))], dtype=np.float64)
            msgs.append((t + 0.001, "/joint_states", JS(header=_header(ts, t), name=list(joint_names), position=pos,
                                                         velocity=np.zeros(len(joint_names)),
                                                         effort=np.zeros(0))))
    if instruction is not None:
        msgs.append((start - 0.2, "/instruction", ts.types["std_msgs/msg/String"](data=instruction)))
    if chunks:
        AC = ts.types["effvla_ros/msg/ActionChunk"]
        Dur = ts.types["builtin_interfaces/msg/Duration"]
        rate = float(chunks.get("rate", 2.0))
        hz = int(chunks.get("num_actions", 10))
        sp = float(chunks.get("step_period", 0.1))
        slow = min(cameras, key=lambda c: cameras[c])  # chunks at frames of the slowest camera
        cam_rate = cameras[slow]
        offset = 0.003 * list(cameras).index(slow)
        rng = np.random.default_rng(seed)
        for k in range(int(duration * rate)):
            # stamp = a frame of the slowest camera (the newest camera stamp, as the policy node does)
            j = int(round((k / rate) * cam_rate))
            t = start + j / cam_rate + offset
            acts = rng.normal(0.0, 0.3, size=(hz, len(joint_names)))
            msgs.append((t + 0.2, "/action_chunk", AC(
                header=_header(ts, t, "policy"), chunk_id=k + 1, step_period=Dur(sec=0, nanosec=int(sp * 1e9)),
                joint_names=list(joint_names), num_actions=hz, action_dim=len(joint_names),
                actions=acts.reshape(-1), inference_latency_ms=150.0, exit_layers=np.array([4], dtype=np.uint32),
                denoising_steps=10, reused_denoising_steps=0, rtc_delay_steps=0, rtc_prefix_chunk_id=0)))
    msgs.sort(key=lambda m: m[0])
    if out_of_order:  # swap neighbours of each camera (log times stay): header stamps go back in the file
        for topic in cameras:
            idx = [i for i, m in enumerate(msgs) if m[1] == topic]
            for a, b in zip(idx[1::4], idx[2::4]):
                msgs[a], msgs[b] = (msgs[a][0], topic, msgs[b][2]), (msgs[b][0], topic, msgs[a][2])
    with Writer(path, version=9, storage_plugin=plugin) as writer:
        conns: dict[str, Any] = {}
        types = {"/joint_states": "sensor_msgs/msg/JointState", "/instruction": "std_msgs/msg/String",
                 "/action_chunk": "effvla_ros/msg/ActionChunk", **{t: "sensor_msgs/msg/Image" for t in cameras}}
        for log, topic, msg in msgs:
            if topic not in conns:
                conns[topic] = writer.add_connection(topic, types[topic], typestore=ts,
                                                     offered_qos_profiles=[latched] if topic == "/instruction" else [])
            writer.write(conns[topic], int(round(log * 1e9)), ts.serialize_cdr(msg, types[topic]))
    return path
