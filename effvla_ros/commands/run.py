"""``effvla run``: the graph in one process (bringup without ``launch``), Ctrl-C to stop."""
from __future__ import annotations

import argparse

from effvla_ros.graph import DEFAULT_CAMERAS, DEFAULT_CONTROLLER, DEFAULT_TARGET, TARGETS, describe_graph


def add_graph_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=DEFAULT_TARGET, choices=TARGETS, help="hardware target (config/targets)")
    p.add_argument("--checkpoint", help="LeRobot SmolVLA checkpoint directory (default: the bundled sim checkpoint)")
    p.add_argument("--params-file", help="your parameter YAML, over the target's")
    p.add_argument("--namespace", default="", help="namespace of every node")
    p.add_argument("--cameras", default=",".join(DEFAULT_CAMERAS), help="comma-separated camera names")
    p.add_argument("--controller", default=DEFAULT_CONTROLLER, help="joint_trajectory_controller name")
    p.add_argument("--use-sim-time", choices=["auto", "true", "false"], default="auto")
    p.add_argument("--log-level", choices=["debug", "info", "warn", "error", "fatal"], default="info")
    p.add_argument("--sim", action="store_true", help="start the SO-101 MuJoCo simulation too")


def graph_from_args(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    ust = None if args.use_sim_time == "auto" else args.use_sim_time == "true"
    return describe_graph(args.target, sim=args.sim, cameras=[c for c in args.cameras.split(",") if c],
                          controller=args.controller, namespace=args.namespace, checkpoint=args.checkpoint,
                          params_file=args.params_file, use_sim_time=ust, single_process=True)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_graph_arguments(p)
    p.add_argument("--duration", type=float, help="stop after this many seconds (default: run until Ctrl-C)")


def run(args: argparse.Namespace) -> int:
    from effvla_ros.bringup import Bringup

    graph = graph_from_args(args)
    print("effvla run: nodes " + ", ".join(n.name for n in graph.nodes) + "; parameters "
          + " < ".join(str(f) for f in graph.params_files))
    from effvla_ros.nodes.common import ShutdownSignals

    # Ctrl-C / SIGTERM end the spin once; a second one (terminal + launch) must not interrupt the shutdown
    signals = ShutdownSignals().install()
    try:
        b = Bringup(graph, log_level=args.log_level)
    except KeyboardInterrupt:
        signals.shutting_down()
        return 0
    try:
        b.spin(args.duration)
    except KeyboardInterrupt:
        pass
    finally:
        signals.shutting_down()
        b.shutdown()
        signals.shutting_down()  # again: rclpy's shutdown may have put its saved handlers back
    return 0
