"""Single-process bringup of the graph (``effvla run``): every node of ``describe_graph`` in one
process and one ``MultiThreadedExecutor``, with the same parameter files, overrides and remappings
as ``launch/manipulation.launch.py`` (each node gets them as its own ``--ros-args``)."""
from __future__ import annotations

import importlib
import threading
import time
from typing import Any

from effvla_ros.graph import Graph

_LEVELS = {"debug": 10, "info": 20, "warn": 30, "error": 40, "fatal": 50}


def create_nodes(graph: Graph, context: Any, log_level: str | None = None) -> list[Any]:
    """Instantiate the graph's nodes in ``context`` (an initialized rclpy Context)."""
    import rclpy.logging

    nodes: list[Any] = []
    try:
        for spec in graph.nodes:
            cls = getattr(importlib.import_module(spec.module), spec.node_class)
            node = cls(context=context, cli_args=graph.ros_args(spec), use_global_arguments=False)
            if log_level:
                rclpy.logging.set_logger_level(node.get_logger().name, _LEVELS[log_level])
            nodes.append(node)
    except BaseException:
        for n in nodes:
            n.destroy_node()
        raise
    return nodes


class Bringup:
    """The graph running in this process; ``start()`` spins it in a background thread."""

    def __init__(self, graph: Graph, log_level: str | None = None, threads: int = 6) -> None:
        import rclpy
        from rclpy.executors import MultiThreadedExecutor

        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        try:
            self.nodes = create_nodes(graph, self.context, log_level)
        except BaseException:
            rclpy.try_shutdown(context=self.context)
            raise
        self.executor = MultiThreadedExecutor(num_threads=threads, context=self.context)
        for n in self.nodes:
            self.executor.add_node(n)
        self._thread: threading.Thread | None = None

    def node(self, name: str) -> Any:
        return next(n for n in self.nodes if n.get_name() == name)

    def spin(self, duration: float | None = None) -> None:
        from rclpy.executors import ExternalShutdownException

        t_end = None if duration is None else time.monotonic() + duration
        try:
            while self.context.ok() and (t_end is None or time.monotonic() < t_end):
                self.executor.spin_once(timeout_sec=0.1)
        except (KeyboardInterrupt, ExternalShutdownException):
            pass

    def start(self) -> None:
        self._thread = threading.Thread(target=self.executor.spin, daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        import rclpy

        self.executor.shutdown(timeout_sec=2.0)
        for n in self.nodes:
            n.destroy_node()
        rclpy.try_shutdown(context=self.context)
        if self._thread is not None:
            self._thread.join(timeout=5.0)
