"""``effvla record``: record the pipeline's topics to a rosbag2 (MCAP) with the ``recorder`` node.

Examples::

    effvla record --out runs/pick_01                       # default topics, until Ctrl-C
    effvla record --out runs/pick_02 --duration 30 --use-sim-time
    effvla record --out runs/cams --topics '/camera/*/image_raw' /joint_states /instruction

The bag is a standard rosbag2 directory (``metadata.yaml`` + ``<name>.mcap``, CDR, message
definitions embedded, channel metadata ``offered_qos_profiles`` and ``topic_type_hash`` as rosbag2
writes them): ``ros2 bag info/play``, rosbags, the ``mcap`` readers and ``effvla replay`` read it.
Ctrl-C (SIGINT) and SIGTERM finish the bag (summary, footer, metadata.yaml). Killed with SIGKILL, the
MCAP has no summary/footer: ``effvla replay`` still reads it up to the last flush (``--flush-period``,
default 1 s), and ``effvla record --repair BAG`` (= ``effvla bag repair BAG``) rewrites it into a complete
bag that every reader opens.
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", "-o", default="", help="output bag directory (must not exist; default "
                        "./effvla_<date>_<time>)")
    parser.add_argument("--topics", nargs="+", default=None, metavar="TOPIC",
                        help="topics or shell patterns to record (default: cameras, instruction, joint states, "
                             "visual tokens, action chunks, execution feedback, trajectories, diagnostics, sim)")
    parser.add_argument("--duration", type=float, default=0.0, help="stop after S seconds (default: until Ctrl-C)")
    parser.add_argument("--flush-period", type=float, default=1.0,
                        help="flush to disk this often (s): what a crash can lose (default 1)")
    parser.add_argument("--strip-token-data", action="store_true",
                        help="record VisualTokens without their token payload (indices/stats/timing only)")
    parser.add_argument("--queue-mb", type=float, default=256.0,
                        help="memory for messages waiting for the disk; beyond, messages are dropped (counted)")
    parser.add_argument("--use-sim-time", action="store_true", help="stamp receive times with /clock")
    parser.add_argument("--namespace", default="", help="namespace for relative topic patterns")
    parser.add_argument("--fsync", action="store_true", help="fsync at every flush")
    parser.add_argument("--repair", default=None, metavar="BAG",
                        help="do not record: rewrite the interrupted recording BAG into a complete bag at --out "
                             "(default <BAG>_repaired), as `effvla bag repair`")


def run(args: argparse.Namespace) -> int:
    from rclpy.parameter import Parameter

    from effvla_ros.nodes.recorder import run_recorder

    if args.repair:
        from effvla_ros.replay.bagio import repair_bag

        res = repair_bag(args.repair, args.out or None)
        print(f"repaired {res.source} -> {res.out}: {res.messages} messages on {len(res.topics)} topics"
              + (f" (the source was interrupted: {res.reason})" if res.reason else " (the source was complete)"))
        return 0
    if args.duration < 0:
        raise ValueError("--duration: must be >= 0")
    overrides = [
        Parameter("out", value=str(args.out)),
        Parameter("max_duration_s", value=float(args.duration)),
        Parameter("flush_period_s", value=float(args.flush_period)),
        Parameter("strip_token_data", value=bool(args.strip_token_data)),
        Parameter("queue_bytes", value=int(args.queue_mb * (1 << 20))),
        Parameter("fsync", value=bool(args.fsync)),
        Parameter("use_sim_time", value=bool(args.use_sim_time)),
    ]
    if args.topics:
        overrides.append(Parameter("topics", value=list(args.topics)))
    ros_args = ["effvla_record"]
    if args.namespace:
        ros_args += ["--ros-args", "-r", f"__ns:=/{args.namespace.strip('/')}"]
    return run_recorder(ros_args, parameter_overrides=overrides)
