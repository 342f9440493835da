"""A rosbag2 recording of the simulated task: the scripted expert's episodes as a robot would record them.

``effvla calibrate-budget`` and ``effvla replay`` take a recording of the robot's own task; in simulation that is
what this writes - each camera's ``sensor_msgs/Image`` (``/camera/<camera>/image_raw``, rgb8), ``/joint_states``
and the latched ``/instruction`` of the episodes of ``seeds`` played one after the other by the scripted expert
(:func:`effvla_ros.sim.dataset.record_episode`) at the simulation's control period, in MCAP.

    python -m effvla_ros.sim.bag OUT_DIR [--seeds 5000,5001] [--image-size 64] [--max-steps 120]
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def write_demo_bag(path: str | Path, seeds: Sequence[int], *, image_size: int = 64, max_steps: int = 120,
                   cameras: Sequence[str] | None = None, start: float = 100.0) -> Path:
    """Record the scripted expert on ``seeds`` and write the episodes one after the other; returns the bag directory."""
    from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime
    from rosbags.rosbag2 import StoragePlugin, Writer

    from effvla_ros.replay.bagio import make_typestore
    from effvla_ros.replay.synthetic import _header
    from effvla_ros.sim.dataset import record_episode
    from effvla_ros.sim.env import JOINT_NAMES, SimConfig, TwoCubePickPlaceEnv

    kw: dict[str, Any] = {"image_size": int(image_size)}
    if cameras:
        kw["cameras"] = list(cameras)
    env = TwoCubePickPlaceEnv(SimConfig(**kw), seed=int(seeds[0]) if seeds else 0)
    ts = make_typestore()
    Image, JS, Str = (ts.types[t] for t in ("sensor_msgs/msg/Image", "sensor_msgs/msg/JointState", "std_msgs/msg/String"))
    msgs: list[tuple[float, str, str, Any]] = []  # (time, topic, type, message)
    t0 = float(start)
    try:
        for seed in seeds:
            ep = record_episode(env, int(seed), max_steps=max_steps)
            dt = float(env.control_dt)
            msgs.append((t0 - 0.05, "/instruction", "std_msgs/msg/String", Str(data=str(ep["task"]))))
            n = len(ep["observation.state"])
            for k in range(n):
                t = t0 + k * dt
                for cam in env.config.cameras:
                    img = ep[f"observation.images.{cam}"][k]
                    h, w = img.shape[:2]
                    msgs.append((t, f"/camera/{cam}/image_raw", "sensor_msgs/msg/Image", Image(
                        header=_header(ts, t, cam), height=h, width=w, encoding="rgb8", is_bigendian=0, step=w * 3,
                        data=np.ascontiguousarray(img).reshape(-1))))
                msgs.append((t, "/joint_states", "sensor_msgs/msg/JointState", JS(
                    header=_header(ts, t), name=list(JOINT_NAMES),
                    position=ep["observation.state"][k].astype(np.float64), velocity=np.zeros(0), effort=np.zeros(0))))
            t0 += n * dt + 1.0
    finally:
        env.close()
    inf = QosTime(2147483647, 4294967295)
    latched = Qos(QosHistory.KEEP_LAST, 1, QosReliability.RELIABLE, QosDurability.TRANSIENT_LOCAL, inf, inf,
                  QosLiveliness.AUTOMATIC, inf, False)
    msgs.sort(key=lambda m: m[0])
    path = Path(path)
    with Writer(path, version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        conns: dict[str, Any] = {}
        for t, topic, typ, msg in msgs:
            if topic not in conns:
                conns[topic] = writer.add_connection(topic, typ, typestore=ts,
                                                     offered_qos_profiles=[latched] if topic == "/instruction" else [])
            writer.write(conns[topic], int(round((t + 0.001) * 1e9)), ts.serialize_cdr(msg, typ))
    return path


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="bag directory to write (must not exist)")
    ap.add_argument("--seeds", default="5000", help="comma-separated episode seeds")
    ap.add_argument("--image-size", type=int, default=64, help="camera size in pixels (the bundled checkpoints: 64)")
    ap.add_argument("--max-steps", type=int, default=120)
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    out = write_demo_bag(args.out, seeds, image_size=args.image_size, max_steps=args.max_steps)
    print(f"wrote {out} ({len(seeds)} episodes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
