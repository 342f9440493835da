"""Shared pieces of the node layer: QoS profiles, image messages, stamps, the per-process model cache."""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
from builtin_interfaces.msg import Time as TimeMsg
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


def image_to_rgb(msg: Any) -> np.ndarray:
    """sensor_msgs/Image -> (H, W, 3) uint8 RGB (:func:`effvla_ros.core.observation.image_to_rgb`: size,
    step and data length checked, row padding removed; raises :class:`ImageError` with the reason)."""
    return _image_to_rgb(msg.encoding, msg.height, msg.width, msg.step, msg.data)


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

    def stop(self, timeout: float = 10.0) -> None:
        self._running = False
        with self._cond:
            self._cond.notify_all()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=timeout)


# ------------------------------------------------------------------------------------- entry points
def run_node(node_cls: Any, name: str, args: list[str] | None = None) -> None:
    """``main()`` of a node: init, spin a SingleThreadedExecutor, shut down cleanly on Ctrl-C.

    Single-threaded on purpose: the heavy work runs in the node's worker thread (:class:`NodeWorker`),
    the callbacks only store messages; rclpy's MultiThreadedExecutor would re-poll entities it has
    handed to its pool in a loop that holds the GIL and slows that worker down (see
    :class:`effvla_ros.bringup.Bringup`).

    Configuration errors (bad parameters, missing checkpoint) end the process with a fatal log
    that names what to change, and exit code 2.
    """
    import rclpy
    from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor

    rclpy.init(args=args)
    node = None
    code = 0
    try:
        node = node_cls()
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        rclpy.logging.get_logger(name).fatal(f"{type(e).__name__}: {e}")
        code = 2
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    if code:
        raise SystemExit(code)
