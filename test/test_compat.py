"""effvla_ros.nodes.compat against the real rclpy of the venv it runs in (CI: Kilted and Jazzy), and its
Humble fallbacks against stand-ins that lack what Humble's rclpy lacks."""
from __future__ import annotations

import importlib.metadata
import os
import threading
import time

import pytest

rclpy = pytest.importorskip("rclpy")
from rclpy.context import Context  # noqa: E402
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor  # noqa: E402
from rclpy.node import Node  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402

from effvla_ros.nodes import compat  # noqa: E402

RCLPY_MAJOR = int(importlib.metadata.version("rclpy").split(".")[0])
DISTRO = os.environ.get("EFFVLA_ROS_DISTRO", "")


def test_venv_runs_the_distro_it_claims() -> None:
    """The Jazzy run really runs Jazzy's rclpy (7.x), the Kilted run Kilted's (9.x)."""
    expected = {"kilted": 9, "jazzy": 7}
    if DISTRO not in expected:
        pytest.skip(f"EFFVLA_ROS_DISTRO={DISTRO!r}: not one of this repo's venvs")
    assert RCLPY_MAJOR == expected[DISTRO], f"{DISTRO} venv has rclpy {importlib.metadata.version('rclpy')}"


@pytest.mark.parametrize("value, code", [
    (True, 1), (3, 2), (1.5, 3), ("a", 4), ([True], 6), ([1, 2], 7), ([1.0], 8), (["a"], 9),
])
def test_parameter_type_code(value: object, code: int) -> None:
    from rcl_interfaces.msg import ParameterType

    p = Parameter("x", value=value)
    assert compat.parameter_type_code(p) == code
    assert compat.parameter_type_code(Parameter("x")) == ParameterType.PARAMETER_NOT_SET


def test_parameter_type_is_an_int_enum_only_on_kilted() -> None:
    """The difference compat.parameter_type_code covers (if a distro changes, the table in compat.py must)."""
    if RCLPY_MAJOR >= 9:
        assert int(Parameter.Type.INTEGER) == 2
    else:
        with pytest.raises(TypeError):
            int(Parameter.Type.INTEGER)  # type: ignore[call-overload]


def test_ros_context_inits_and_shuts_down() -> None:
    ctx = Context()
    with compat.ros_context(context=ctx) as got:
        assert got is ctx and ctx.ok()
        node = Node("compat_ctx", context=ctx)
        assert node.get_name() == "compat_ctx"
        node.destroy_node()
    assert not ctx.ok()
    ctx2 = Context()
    with compat.ros_context(context=ctx2):  # shut down inside the block: no error at its end
        rclpy.try_shutdown(context=ctx2)
    assert not ctx2.ok()


def test_ros_context_shuts_down_on_error() -> None:
    ctx = Context()
    with pytest.raises(RuntimeError, match="boom"), compat.ros_context(context=ctx):
        raise RuntimeError("boom")
    assert not ctx.ok()


def test_node_scope_destroys_the_node() -> None:
    from std_msgs.msg import String

    with compat.ros_context(context=Context()) as ctx:
        with compat.node_scope(Node("compat_scope", context=ctx)) as node:
            assert node.create_publisher(String, "compat_topic", 1) is not None
        with pytest.raises(Exception):  # noqa: B017 - InvalidHandle lives in rclpy's private extension
            node.create_publisher(String, "compat_topic", 1)


def test_spin_runs_callbacks_until_the_context_shuts_down() -> None:
    with compat.ros_context(context=Context()) as ctx:
        node = Node("compat_spin", context=ctx)
        ticks: list[float] = []

        def tick() -> None:
            ticks.append(time.monotonic())
            if len(ticks) == 3:
                rclpy.try_shutdown(context=ctx)

        node.create_timer(0.01, tick)
        executor = SingleThreadedExecutor(context=ctx)
        executor.add_node(node)
        done = threading.Event()

        def run() -> None:
            try:
                compat.spin(executor)
            except ExternalShutdownException:
                pass
            done.set()

        threading.Thread(target=run, daemon=True).start()
        assert done.wait(10.0), "spin did not return after the context was shut down"
        assert len(ticks) >= 3
        executor.shutdown()
        node.destroy_node()


def test_spin_fallback_without_executor_spin() -> None:
    """Humble's Executor has no spin(): compat.spin loops spin_once while the context is ok."""

    class Ctx:
        def __init__(self) -> None:
            self.left = 4

        def ok(self) -> bool:
            return self.left > 0

    class OldExecutor:
        def __init__(self) -> None:
            self.context = Ctx()
            self.calls = 0

        def spin_once(self, timeout_sec: float | None = None) -> None:
            self.calls += 1
            self.context.left -= 1

    ex = OldExecutor()
    compat.spin(ex)
    assert ex.calls == 4


def test_create_timer_autostart() -> None:
    with compat.ros_context(context=Context()) as ctx, compat.node_scope(Node("compat_timer", context=ctx)) as node:
        started = compat.create_timer(node, 0.05, lambda: None)
        held = compat.create_timer(node, 0.05, lambda: None, autostart=False)
        assert not started.is_canceled()
        assert held.is_canceled()
        held.reset()
        assert not held.is_canceled()


def test_create_timer_fallback_without_autostart() -> None:
    """Humble's create_timer has no autostart: the timer is created and cancelled."""

    class Timer:
        canceled = False

        def cancel(self) -> None:
            self.canceled = True

    class OldNode:
        def create_timer(self, period, callback, callback_group=None, clock=None):  # type: ignore[no-untyped-def]
            self.args = (period, callback, callback_group, clock)
            return Timer()

    node = OldNode()
    assert compat.create_timer(node, 0.1, print, autostart=False).canceled
    assert not compat.create_timer(node, 0.1, print).canceled
    assert node.args[0] == 0.1
