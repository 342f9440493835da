"""Shared pieces of the node layer: QoS profiles, image messages, stamps, the per-process model cache."""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
from builtin_interfaces.msg import Time as TimeMsg
from rclpy.node import Node
from rclpy.qos import (
    DurabilityPolicy,
    HistoryPolicy,
    QoSProfile,
    ReliabilityPolicy,
    qos_profile_sensor_data,
)

from effvla_ros.core.observation import SUPPORTED_ENCODINGS, ImageError  # noqa: F401 - re-exported for the nodes
from effvla_ros.core.observation import image_to_rgb as _image_to_rgb

# Camera images: best effort, keep only the newest frame (sensor data).
SENSOR_QOS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.BEST_EFFORT,
    durability=DurabilityPolicy.VOLATILE,
)
assert qos_profile_sensor_data.reliability == ReliabilityPolicy.BEST_EFFORT
# Pipeline messages (tokens, chunks, feedback): reliable, shallow (latest wins downstream).
PIPELINE_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=2, reliability=ReliabilityPolicy.RELIABLE)
# Instructions: latched so a node that starts later still gets the current instruction.
LATCHED_QOS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
    durability=DurabilityPolicy.TRANSIENT_LOCAL,
)
# Volatile twin of LATCHED_QOS: a transient-local subscription does not match volatile publishers
# (e.g. `ros2 topic pub`), so instruction topics are subscribed with both.
INSTRUCTION_VOLATILE_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1,
                                      reliability=ReliabilityPolicy.RELIABLE)


# The model resizes every image into a square with padding: a strip such as 1x4000 would shrink to
# nothing in torch. Camera images beyond this aspect ratio are refused before any conversion.
MAX_IMAGE_ASPECT = 8.0


def image_to_rgb(msg: Any) -> np.ndarray:
    """sensor_msgs/Image -> (H, W, 3) uint8 RGB (:func:`effvla_ros.core.observation.image_to_rgb`: size,
    step and data length checked, row padding removed; raises :class:`ImageError` with the reason).
    Images more elongated than :data:`MAX_IMAGE_ASPECT` are refused here, before they reach torch."""
    h, w = int(msg.height), int(msg.width)
    if h > 0 and w > 0 and max(h, w) > MAX_IMAGE_ASPECT * min(h, w):
        raise ImageError(f"image {w}x{h} (width x height) has an aspect ratio above {MAX_IMAGE_ASPECT:g}:1; "
                         "not a camera image the model can use")
    return _image_to_rgb(msg.encoding, msg.height, msg.width, msg.step, msg.data)


def describe_text(text: str, limit: int = 120) -> str:
    """``text`` for a log line: its first ``limit`` characters (repr) and, when cut, its length."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def clean_instruction(raw: str) -> tuple[str, str | None]:
    """An instruction as received -> (the text used, a problem to log or None).

    A NUL character cuts the string for the tokenizer's C side and for every C consumer: the text is
    kept up to the first NUL and the rest reported (never dropped silently)."""
    text, problem = raw, None
    if "\x00" in text:
        cut = text.index("\x00")
        problem = (f"instruction contains a NUL character at position {cut}: the {len(text) - cut - 1} "
                   "characters after it are ignored")
        text = text[:cut]
    return text.strip(), problem


class Throttle:
    """At most one log line per ``period`` seconds per kind; lines held back are counted and the count is
    appended to the next line of that kind."""

    def __init__(self, period: float = 2.0) -> None:
        self.period = float(period)
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def __call__(self, kind: str, msg: str) -> str | None:
        """The line to log now (with the held-back count), or None: throttled."""
        import time

        now = time.monotonic()
        with self._lock:
            if now - self._last.get(kind, -1e18) < self.period:
                self._held[kind] = self._held.get(kind, 0) + 1
                return None
            self._last[kind] = now
            n = self._held.pop(kind, 0)
        return msg + (f" ({n} more since the last such message)" if n else "")


def stamp_to_sec(stamp: TimeMsg) -> float:
    return float(stamp.sec) + 1e-9 * float(stamp.nanosec)


def sec_to_stamp(t: float) -> TimeMsg:
    sec, nanosec = divmod(int(round(t * 1e9)), 1_000_000_000)
    return TimeMsg(sec=sec, nanosec=nanosec)


# ------------------------------------------------------------------------------------- model cache
_models: dict[tuple[Any, ...], Any] = {}
_models_lock = threading.Lock()


def shared_policy(checkpoint: str, vlm_dir: str | None, runtime: Any) -> Any:
    """Load a SmolVLA checkpoint once per process (nodes composed in one process share the weights)."""
    from effvla_ros.core.smolvla import load_policy

    key = (checkpoint, vlm_dir or "", tuple(sorted(runtime.to_dict().items())))
    with _models_lock:
        if key not in _models:
            _models[key] = load_policy(checkpoint, vlm_dir=vlm_dir or None, runtime=runtime)
        return _models[key]


# ------------------------------------------------------------------------------------- loop threads
class Deadlines:
    """Fixed-period deadlines for a node's own loop thread (the chunk executor's control loop, the
    simulation's physics): a loop that fell more than a period behind resumes from now instead of
    running a burst of late iterations.

    Default clock: the monotonic one (immune to system clock steps), one sleep to each deadline. With
    ``clock`` (seconds, e.g. the ROS clock under ``use_sim_time``) the wait polls it in wall-clock
    ``nap`` sleeps, and a clock that jumps back by more than two periods (a simulation reset)
    restarts the grid from its new time.
    """

    def __init__(self, period: float, clock: Callable[[], float] | None = None, nap: float = 0.002) -> None:
        self.period = float(period)
        self._clock = clock
        self._nap = min(self.period, float(nap))
        self.reset()

    def _now(self) -> float:
        import time

        return self._clock() if self._clock is not None else time.monotonic()

    def reset(self) -> None:
        """The next deadline is one period from now."""
        self._next = self._now() + self.period

    def wait(self, cancel: Callable[[], bool] | None = None) -> bool:
        """Sleep until the next deadline, then set the one after it. With a ``clock``: False, without
        advancing, as soon as ``cancel()`` is true while waiting."""
        import time

        if self._clock is None:
            delay = self._next - self._now()
            if delay > 0:
                time.sleep(delay)
        else:
            while True:
                now = self._now()
                if now < self._next - 2.0 * self.period:
                    self._next = now + self.period
                if now >= self._next:
                    break
                if cancel is not None and cancel():
                    return False
                time.sleep(self._nap)
        self._next += self.period
        now = self._now()
        if self._next <= now:
            self._next = now + self.period
        return True


# ------------------------------------------------------------------------------------- worker thread
class NodeWorker:
    """The heavy-compute thread of a node (encoder, inference): subscriptions only store the newest
    message and notify ``cond``; this thread runs ``step()`` (one iteration, which may wait on
    ``cond``) until the node is destroyed. An exception in a step is logged (throttled) and counted;
    the node keeps running."""

    def __init__(self, node: Any, name: str, step: Any, cond: threading.Condition, what: str) -> None:
        self._node, self._step, self._cond, self._what = node, step, cond, what
        self.errors = 0
        self._running = True
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        import time

        import rclpy

        while self._running and rclpy.ok(context=self._node.context):
            try:
                self._step()
            except Exception as e:  # noqa: BLE001 - the node keeps running
                if not self._running or not rclpy.ok(context=self._node.context):
                    break  # shutting down
                self.errors += 1
                self._node.get_logger().error(f"{self._what} failed: {type(e).__name__}: {e}",
                                              throttle_duration_sec=2.0)
                time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop the loop and join the thread (at most ``timeout`` s); True when it ended. Idempotent."""
        self._running = False
        if self._cond.acquire(timeout=1.0):  # a step holding the lock for long must not block shutdown
            try:
                self._cond.notify_all()
            finally:
                self._cond.release()
        if threading.current_thread() is self._thread:
            return False
        return join_thread(self._thread, timeout)


class WorkerNode(Node):
    """A node whose heavy work runs in a :class:`NodeWorker` kept as ``self._worker`` (policy, token compressor,
    chunk corrector): destroying it stops and joins that thread first (10 s at most)."""

    def destroy_node(self) -> None:
        """Stop the worker and destroy the node; idempotent, and safe after a failed ``__init__`` (rclpy's context
        shutdown destroys a half-built node too)."""
        worker = getattr(self, "_worker", None)  # absent when the constructor failed
        if worker is not None and not worker.stop():
            self.get_logger().warning("worker thread did not stop within 10 s")
        if getattr(self, "_destroyed", False):
            return
        self._destroyed = True
        super().destroy_node()


def join_thread(thread: threading.Thread | None, timeout: float) -> bool:
    """Join ``thread`` for at most ``timeout`` seconds (a never-started or absent thread counts as ended);
    True when it ended. A KeyboardInterrupt while joining (a second Ctrl-C) does not abort the join."""
    import time

    if thread is None or thread is threading.current_thread() or thread.ident is None:
        return True
    deadline = time.monotonic() + timeout
    while thread.is_alive():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        try:
            thread.join(min(left, 0.1))
        except KeyboardInterrupt:
            continue
    return True


# ------------------------------------------------------------------------------------- entry points
class ShutdownSignals:
    """SIGINT and SIGTERM for a node process: the first one ends the spin (``KeyboardInterrupt`` in the main
    thread, after rclpy's own handler has woken the executors and shut the context down), every later one is
    ignored, as is any that arrives once :meth:`shutting_down` was called (the node being destroyed).

    Ctrl-C in a terminal under ``ros2 launch`` delivers SIGINT twice (from the terminal and from launch);
    without this the second one interrupted ``destroy_node`` (a thread join, a future) with a traceback and
    a non-zero exit. Install before ``rclpy.init`` (rclpy chains its handlers to the ones installed before
    it) and from the main thread; :meth:`restore` puts the previous handlers back.
    """

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self) -> None:
        self.received: list[int] = []
        self._stopping = False
        self._previous: dict[int, Any] = {}

    def install(self) -> ShutdownSignals:
        import signal

        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread
        for name in self.SIGNALS:
            sig = getattr(signal, name)
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        self.received.append(signum)
        if self._stopping or len(self.received) > 1:
            return  # shutdown already under way
        self._stopping = True
        raise KeyboardInterrupt

    def shutting_down(self) -> None:
        """From now on every SIGINT/SIGTERM is ignored (the process is already shutting down).

        Ignored at the OS level, not only by this handler: Python's finalization puts SIG_DFL back for
        signals with a Python handler, and a SIGINT arriving then (the second Ctrl-C, a few ms late) killed
        the process with exit code -2."""
        import signal

        self._stopping = True
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                try:
                    signal.signal(getattr(signal, name), signal.SIG_IGN)
                except (ValueError, OSError):
                    pass

    def restore(self) -> None:
        import signal

        for sig, handler in self._previous.items():
            try:
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
            except (ValueError, TypeError):  # not the main thread / interpreter finalizing
                pass
        self._previous.clear()


def _stop_node(node: Any, signals: ShutdownSignals) -> None:
    signals.shutting_down()
    if node is not None:
        try:
            node.destroy_node()
        except KeyboardInterrupt:
            pass


def run_node(node_cls: Any, name: str, args: list[str] | None = None) -> None:
    """``main()`` of a node: init, spin a SingleThreadedExecutor, shut down cleanly on Ctrl-C / SIGTERM.

    Single-threaded on purpose: the heavy work runs in the node's worker thread (:class:`NodeWorker`),
    the callbacks only store messages; rclpy's MultiThreadedExecutor would re-poll entities it has
    handed to its pool in a loop that holds the GIL and slows that worker down (see
    :class:`effvla_ros.bringup.Bringup`).

    One or two SIGINTs, or SIGTERM, end the process with exit code 0 and no traceback
    (:class:`ShutdownSignals`); the node's threads are joined with a timeout in ``destroy_node``.
    Configuration errors (bad parameters, missing checkpoint, an impossible device) end the process
    with a fatal log that names what to change, and exit code 2.
    """
    import os
    import sys

    import rclpy
    from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor

    signals = ShutdownSignals().install()
    node = None
    code = 0
    try:
        rclpy.init(args=args)
        node = node_cls()
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        signals.shutting_down()
        rclpy.logging.get_logger(name).fatal(f"{type(e).__name__}: {e}")
        code = 2
    finally:
        _stop_node(node, signals)
        try:
            rclpy.try_shutdown()
        except KeyboardInterrupt:
            pass
        signals.shutting_down()  # again: rclpy's shutdown may have put its saved handlers back
    others = [t for t in threading.enumerate() if t is not threading.main_thread()]
    leftover = [t.name for t in others if not join_thread(t, 1.0)]
    if leftover:  # e.g. a worker still inside a long inference: exiting under it can abort (SIGABRT) in C++
        print(f"[{name}] threads still running at exit: {leftover}; exiting without waiting for them",
              file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code:
        raise SystemExit(code)
