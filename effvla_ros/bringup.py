"""Single-process bringup of the graph (``effvla run``): every node of ``describe_graph`` in one
process (an executor thread per node, see :class:`Bringup`), with the same parameter files,
overrides and remappings as ``launch/manipulation.launch.py`` (each node gets them as its own
``--ros-args``)."""
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
    """The graph running in this process: every node is spun by a ``SingleThreadedExecutor`` of its
    own, in a thread of its own (``start()``).

    Not one ``MultiThreadedExecutor`` for all: while a callback it handed to its pool has not started,
    rclpy's MultiThreadedExecutor re-polls the still-ready entity in a loop that holds the GIL most of
    the time, and the other Python threads of the process starve (measured with the chunk executor's
    control thread: 100 Hz ticks late by up to 1.3 s; one SingleThreadedExecutor per node: max 3 ms).
    The heavy work of the policy and the compressor runs in their own worker threads, so callbacks
    are short; one node's callbacks never wait for another node's.
    """

    def __init__(self, graph: Graph, log_level: str | None = None) -> None:
        import rclpy

        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        try:
            self.nodes = create_nodes(graph, self.context, log_level)
        except BaseException:
            rclpy.try_shutdown(context=self.context)
            raise
        self._executors: list[Any] = []
        self._threads: list[threading.Thread] = []
        self._started = False
        for n in self.nodes:
            self._add_executor(n)

    def _add_executor(self, node: Any) -> None:
        from rclpy.executors import SingleThreadedExecutor

        ex = SingleThreadedExecutor(context=self.context)
        ex.add_node(node)
        self._executors.append(ex)
        if self._started:
            self._start(ex)

    def _start(self, ex: Any) -> None:
        from rclpy.executors import ExternalShutdownException

        def spin() -> None:
            try:
                ex.spin()
            except ExternalShutdownException:
                pass

        t = threading.Thread(target=spin, name=f"spin-{len(self._threads)}", daemon=True)
        self._threads.append(t)
        t.start()

    def add_node(self, node: Any) -> None:
        """Run one more node (created in :attr:`context`) with the graph."""
        self.nodes.append(node)
        self._add_executor(node)

    def node(self, name: str) -> Any:
        return next(n for n in self.nodes if n.get_name() == name)

    def start(self) -> None:
        if self._started:
            return
        self._started = True
        for ex in self._executors:
            self._start(ex)

    def spin(self, duration: float | None = None) -> None:
        """Run until Ctrl-C, the context's shutdown, or ``duration`` seconds."""
        self.start()
        t_end = None if duration is None else time.monotonic() + duration
        try:
            while self.context.ok() and (t_end is None or time.monotonic() < t_end):
                time.sleep(0.1)
        except KeyboardInterrupt:
            pass

    def shutdown(self) -> None:
        import rclpy

        for ex in self._executors:
            ex.shutdown(timeout_sec=2.0)
        for n in self.nodes:
            n.destroy_node()
        rclpy.try_shutdown(context=self.context)
        for t in self._threads:
            t.join(timeout=5.0)
