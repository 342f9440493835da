"""The rclpy differences between the ROS 2 distributions this package runs on, in one place.

Tested on Kilted (rclpy 9) and Jazzy (rclpy 7) by ``test/test_compat.py`` (CI runs it on both); Humble
(rclpy 3) is covered by the fallbacks named below, which the tests exercise with stand-in objects.

| what | Kilted | Jazzy | Humble |
|---|---|---|---|
| ``Parameter.Type`` | ``IntEnum`` (``int(t)`` works) | plain ``Enum`` (``int(t)`` raises ``TypeError``) | plain ``Enum`` |
| ``rclpy.init()`` | returns a context manager | returns ``None`` | returns ``None`` |
| ``with Node(...)`` | supported | not supported | not supported |
| ``Executor.spin()`` | yes | yes | use ``spin_once`` in a loop |
| ``create_timer(autostart=)`` | yes | yes | no (create, then ``cancel()``) |

Use :func:`parameter_type_code`, :func:`ros_context`, :func:`node_scope`, :func:`spin` and
:func:`create_timer` instead of the distribution-specific forms.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


def parameter_type_code(param: Any) -> int:
    """The ``rcl_interfaces/ParameterType`` code of an ``rclpy.parameter.Parameter``.

    ``int(param.type_)`` works only where ``Parameter.Type`` is an ``IntEnum`` (Kilted); on Jazzy and
    Humble it is a plain ``Enum`` whose ``value`` is the code."""
    t = param.type_
    return int(getattr(t, "value", t))


@contextmanager
def ros_context(args: list[str] | None = None, *, context: Any = None, domain_id: int | None = None,
                signal_handler_options: Any = None) -> Iterator[Any]:
    """``rclpy.init`` for a ``with`` block, yielding the initialized context and shutting it down after.

    Replaces ``with rclpy.init(...):`` (Kilted only: Jazzy's and Humble's ``rclpy.init`` return ``None``).
    The shutdown is ``try_shutdown``: the block may have shut the context down itself."""
    import rclpy

    kwargs: dict[str, Any] = {"args": args, "context": context}
    if domain_id is not None:
        kwargs["domain_id"] = domain_id
    if signal_handler_options is not None:
        kwargs["signal_handler_options"] = signal_handler_options
    rclpy.init(**kwargs)
    ctx = context if context is not None else rclpy.get_default_context()
    try:
        yield ctx
    finally:
        rclpy.try_shutdown(context=context)


@contextmanager
def node_scope(node: Any) -> Iterator[Any]:
    """``with node_scope(Node(...)) as node:`` destroys the node at the end of the block.

    Replaces ``with Node(...) as node:`` (Kilted only: Jazzy's and Humble's ``Node`` is no context manager)."""
    try:
        yield node
    finally:
        node.destroy_node()


def spin(executor: Any) -> None:
    """``executor.spin()``, or on an rclpy without ``Executor.spin`` (Humble) the loop it stands for:
    ``spin_once`` until the executor's context is no longer ok or the executor is shut down."""
    method = getattr(executor, "spin", None)
    if callable(method):
        method()
        return
    while executor.context.ok() and not getattr(executor, "_is_shutdown", False):
        executor.spin_once()


def _accepts(func: Callable[..., Any], name: str) -> bool:
    try:
        return name in inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False


def create_timer(node: Any, period_s: float, callback: Callable[..., Any], *, callback_group: Any = None,
                 clock: Any = None, autostart: bool = True) -> Any:
    """``node.create_timer(...)`` with ``autostart`` also where rclpy lacks it (Humble): there a timer that
    should not start is created and cancelled at once (``timer.reset()`` starts it, as with autostart)."""
    kwargs: dict[str, Any] = {"callback_group": callback_group}
    if clock is not None:
        kwargs["clock"] = clock
    if _accepts(node.create_timer, "autostart"):
        return node.create_timer(period_s, callback, autostart=autostart, **kwargs)
    timer = node.create_timer(period_s, callback, **kwargs)
    if not autostart:
        timer.cancel()
    return timer
