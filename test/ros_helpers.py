"""Helpers for tests with real rclpy over real DDS: node subprocesses and an in-test spinner."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def wait_for(pred: Callable[[], Any], timeout: float = 10.0, period: float = 0.02) -> Any:
    """Poll ``pred`` until it returns a truthy value; return it, or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout} s")
        time.sleep(period)


class NodeProcess:
    """A node (or any Python module/script) in its own process and process group.

    Stopped with SIGINT (rclpy shuts down cleanly), then SIGKILL of the whole group after a grace
    period, so nothing a test starts outlives it. stdout+stderr go to a log file kept for failures.
    """

    def __init__(self, argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, *argv],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            cwd=REPO,
            start_new_session=True,
        )

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace: float = 5.0) -> int | None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGINT)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        try:  # the group may hold children even if the leader exited
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()
        return self.proc.returncode


@contextmanager
def node_process(argv: Sequence[str], tmp_path: Path, name: str = "node", **kw: Any) -> Iterator[NodeProcess]:
    p = NodeProcess(argv, tmp_path / f"{name}.log", **kw)
    try:
        yield p
    finally:
        p.stop()


class Spinner:
    """An rclpy context + SingleThreadedExecutor spinning in a background thread, for test-side nodes.

    Single-threaded: the test callbacks only record messages, and rclpy's MultiThreadedExecutor
    busy-polls (holding the GIL) while its pool picks up a callback, which starves the test's own
    threads (publishers, pollers) on a loaded machine."""

    def __init__(self) -> None:
        import rclpy
        from rclpy.executors import SingleThreadedExecutor

        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._nodes: list[Any] = []
        self._thread.start()

    def _spin(self) -> None:
        from rclpy.executors import ExternalShutdownException

        try:
            self.executor.spin()
        except (ExternalShutdownException, Exception):  # noqa: BLE001 - shutdown races
            pass

    def node(self, name: str, **kw: Any) -> Any:
        from rclpy.node import Node

        n = Node(name, context=self.context, **kw)
        self._nodes.append(n)
        self.executor.add_node(n)
        return n

    def add(self, node: Any) -> Any:
        self._nodes.append(node)
        self.executor.add_node(node)
        return node

    def shutdown(self) -> None:
        import rclpy

        self.executor.shutdown(timeout_sec=2.0)
        for n in self._nodes:
            n.destroy_node()
        rclpy.try_shutdown(context=self.context)
        self._thread.join(timeout=5)


@contextmanager
def spinner() -> Iterator[Spinner]:
    s = Spinner()
    try:
        yield s
    finally:
        s.shutdown()


def set_parameter(client_node: Any, server: str, name: str, **value: Any) -> Any:
    """Set one parameter of node ``server`` through its real SetParameters service (what
    ``ros2 param set`` calls); returns the SetParametersResult. ``value``: ParameterValue fields."""
    from rcl_interfaces.msg import Parameter, ParameterValue
    from rcl_interfaces.srv import SetParameters

    cli = client_node.create_client(SetParameters, f"{server}/set_parameters")
    assert cli.wait_for_service(timeout_sec=20), f"{server}/set_parameters is not available"
    fut = cli.call_async(SetParameters.Request(parameters=[Parameter(name=name, value=ParameterValue(**value))]))
    wait_for(fut.done, 10)
    return fut.result().results[0]
