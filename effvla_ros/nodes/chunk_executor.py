"""chunk_executor: policy action chunks -> limited, continuous JointTrajectory commands.

Subscribes ``effvla_ros/ActionChunk`` (``~/action_chunk``, reliable), ``effvla_ros/ActionCorrection``
(``~/action_correction``, reliable: the ``chunk_corrector``'s per-step residuals, added to rows of the executing
chunk not yet committed) and ``sensor_msgs/JointState`` (``/joint_states``, best effort: matches reliable and
best-effort publishers). Publishes
``trajectory_msgs/JointTrajectory`` on ``~/joint_trajectory`` (remap it to
``/<controller>/joint_trajectory``) and, when ``gripper_joints`` is set, the gripper joints on
``~/gripper_trajectory``; ``effvla_ros/ExecutionFeedback`` on ``~/feedback`` (every publishing tick);
``diagnostic_msgs/DiagnosticArray`` on ``/diagnostics``.

Trajectory stamping: ``header.stamp`` is the absolute time of the FIRST point, slightly in the future
(``now + stamp_lead`` rounded up to the control grid), and that point has ``time_from_start = 0``;
later points have strictly increasing ``time_from_start``. A zero stamp would make the
joint_trajectory_controller start the trajectory at its reception time (shifting every point by
the transport delay); an explicit stamp in the past would make it drop the points already due. All
points are on one fixed grid (``control_period``), and a point, once published, is never changed:
successive rolling trajectories agree exactly where they overlap.

Threads: the control loop (tick, watchdog, publishing) is a thread of its own that sleeps until each
deadline of the node clock (wall or /clock time), not an rclpy timer: after the process had been
descheduled for a while (a loaded machine; reproduced here with SIGSTOP/SIGCONT), rclpy's
MultiThreadedExecutor left a 100 Hz timer silent for up to 1.3 s, watchdog included. The
subscriptions, parameter services and the diagnostics timer are spun by a SingleThreadedExecutor
(``main()``): a MultiThreadedExecutor busy-polls entities it has handed to its pool and starved the
control thread of the GIL (ticks up to 1.3 s late; see ``benchmarks/bench_executor.py``). The core is
guarded by a lock. The control thread gets ``realtime_priority`` (SCHED_FIFO) when allowed.
"""
from __future__ import annotations

import dataclasses
import math
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from builtin_interfaces.msg import Duration as DurationMsg
from builtin_interfaces.msg import Time as TimeMsg
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.clock import ROSClock
from rclpy.node import Node
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import JointState
from std_msgs.msg import Empty
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from effvla_ros.core.executor import (
    ChunkExecutorCore,
    Command,
    ExecState,
    ExecutorConfig,
    Feedback,
    JointLimits,
    PeriodJitter,
)
from effvla_ros.core.params import ConfigBase, param
from effvla_ros.msg import ActionChunk, ActionCorrection, ExecutionFeedback
from effvla_ros.nodes.common import Deadlines, join_thread, run_node
from effvla_ros.nodes.param_bridge import ConfigParameters

_STATE_NAMES = {s: s.name.lower() for s in ExecState}


@dataclasses.dataclass
class ChunkExecutorNodeConfig(ConfigBase):
    """Node-level parameters (topics, gripper split, diagnostics); the core's are ExecutorConfig."""

    action_chunk_topic: str = param(
        "~/action_chunk", description="ActionChunk input topic (reliable).", read_only=True
    )
    joint_states_topic: str = param(
        "/joint_states", description="sensor_msgs/JointState input topic (best effort).", read_only=True
    )
    gripper_joints: list[str] = param(
        default_factory=lambda: [""],
        description="Joints (of joint_names) published on ~/gripper_trajectory instead of "
        "~/joint_trajectory; [''] = none (everything on ~/joint_trajectory).",
        read_only=True,
    )
    diagnostics_period: float = param(
        1.0, description="Period (s) of the /diagnostics status.", min=0.05, max=60.0, read_only=True
    )
    feedback_rate: float = param(
        50.0,
        description="Rate (Hz) of ~/feedback (capped at the publishing rate); also sent after each accepted chunk.",
        min=0.1,
        max=2000.0,
        read_only=True,
    )
    realtime_priority: int = param(
        0,
        description="SCHED_FIFO priority (1-99) of the control thread (tick, watchdog, publishing) "
        "(0 = normal scheduling). Needs CAP_SYS_NICE or an rtprio limit; on failure: a warning, normal "
        "scheduling.",
        min=0,
        max=99,
        read_only=True,
    )
    log_throttle: float = param(
        2.0, description="Minimum time (s) between two log lines of the same kind of bad input.", min=0.0, max=600.0
    )

    @property
    def grippers(self) -> list[str]:
        return [g for g in self.gripper_joints if g]


def make_thread_realtime(priority: int) -> str | None:
    """Give the calling thread SCHED_FIFO ``priority``; returns an error string on failure."""
    if priority <= 0:
        return None
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))  # 0: the calling thread
    except (AttributeError, OSError) as e:
        return str(e)
    return None


def to_time_msg(t: float, epoch_ns: int = 0) -> TimeMsg:
    ns = int(round(t * 1e9)) + epoch_ns
    return TimeMsg(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)


def to_duration_msg(t: float) -> DurationMsg:
    ns = int(round(t * 1e9))
    return DurationMsg(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)


def stamp_to_sec(msg: Any, epoch_ns: int = 0) -> float:
    return (int(msg.sec) * 1_000_000_000 + int(msg.nanosec) - epoch_ns) * 1e-9


def joint_state_problem(msg: JointState, joints: Sequence[str]) -> str:
    """Why a JointState cannot give the executor's joints, in words (for the log line)."""
    names, pos = list(msg.name), list(msg.position)
    if len(names) != len(pos):
        return f"it has {len(names)} names but {len(pos)} positions"
    index = {n: i for i, n in enumerate(names)}
    missing = [n for n in joints if n not in index]
    if missing:
        return f"it lacks joints {missing} (it has {names})"
    bad = [n for n in joints if not math.isfinite(pos[index[n]])]
    if bad:
        return f"non-finite positions (NaN/Inf) for {bad}"
    return "rejected by the executor"


class ChunkExecutorNode(Node):
    def __init__(self, node_name: str = "chunk_executor", **kwargs: Any) -> None:
        super().__init__(node_name, **kwargs)
        self._lock = threading.Lock()
        # The core works in float seconds relative to this epoch (whole seconds at start): float64
        # at ~1.7e9 s (Unix time) only resolves ~0.24 us, relative times keep the grid ns-exact.
        self._epoch_ns = self.get_clock().now().nanoseconds // 1_000_000_000 * 1_000_000_000
        self._node_params = ConfigParameters(self, ChunkExecutorNodeConfig())
        self._params = ConfigParameters(self, ExecutorConfig(), on_change=self._on_config)
        cfg = self._params.config
        ncfg = self._node_params.config
        limits = JointLimits.from_config(cfg)
        self._core = ChunkExecutorCore(cfg, limits)
        unknown = [g for g in ncfg.grippers if g not in cfg.joint_names]
        if unknown:
            raise ValueError(f"gripper_joints: {unknown} are not in joint_names {cfg.joint_names}")
        grip = set(ncfg.grippers)
        self._arm_idx = [i for i, n in enumerate(cfg.joint_names) if n not in grip]
        self._grip_idx = [i for i, n in enumerate(cfg.joint_names) if n in grip]
        self._arm_names = [cfg.joint_names[i] for i in self._arm_idx]
        self._grip_names = [cfg.joint_names[i] for i in self._grip_idx]
        self._jitter = PeriodJitter(cfg.publish_period)
        self._last_log: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._reanchored_seen = 0  # core.stats.counts["reanchored"] already logged
        self._last_state = self._core.state
        self._rt_error: str | None = None
        self._fb_every = max(1, int(round((1.0 / cfg.publish_period) / ncfg.feedback_rate)))
        self._ticks = 0

        self._io_group = MutuallyExclusiveCallbackGroup()
        reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST)
        best_effort = QoSProfile(depth=10, reliability=ReliabilityPolicy.BEST_EFFORT, history=HistoryPolicy.KEEP_LAST)
        self._traj_pub = self.create_publisher(JointTrajectory, "~/joint_trajectory", reliable)
        self._grip_pub = (
            self.create_publisher(JointTrajectory, "~/gripper_trajectory", reliable) if self._grip_idx else None
        )
        self._fb_pub = self.create_publisher(ExecutionFeedback, "~/feedback", reliable)
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", reliable)
        self.create_subscription(
            ActionChunk, ncfg.action_chunk_topic, self._on_chunk, reliable, callback_group=self._io_group
        )
        self.create_subscription(
            ActionCorrection, "~/action_correction", self._on_correction, reliable, callback_group=self._io_group
        )
        self.create_subscription(
            JointState, ncfg.joint_states_topic, self._on_joint_state, best_effort, callback_group=self._io_group
        )
        self.create_subscription(Empty, "reset", self._on_reset, 10, callback_group=self._io_group)
        self._diag_timer = self.create_timer(
            ncfg.diagnostics_period, self._publish_diagnostics, callback_group=self._io_group
        )
        self._stop = threading.Event()
        self._control = threading.Thread(target=self._control_loop, name="control", daemon=True)
        self._control.start()
        self.get_logger().info(
            f"chunk_executor: {len(cfg.joint_names)} joints {cfg.joint_names}, mode={cfg.output_mode} "
            f"@ {1.0 / cfg.publish_period:g} Hz, strategy={cfg.merge_strategy}; waiting for JointState on "
            f"{ncfg.joint_states_topic}"
        )

    # -- helpers -----------------------------------------------------------------------------
    def _now(self) -> float:
        return (self.get_clock().now().nanoseconds - self._epoch_ns) * 1e-9

    def _throttled(self, kind: str, msg: str, level: str = "warning") -> None:
        t = time.monotonic()
        if t - self._last_log.get(kind, -math.inf) < self._node_params.config.log_throttle:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return
        n = self._suppressed.pop(kind, 0)
        self._last_log[kind] = t
        suffix = f" ({n} similar suppressed)" if n else ""
        if level == "error":  # one call site per severity: rclpy refuses to mix them
            self.get_logger().error(msg + suffix)
        else:
            self.get_logger().warning(msg + suffix)

    def _on_config(self, cfg: ExecutorConfig, changed: set[str]) -> None:
        with self._lock:
            self._core.set_config(cfg)
        self.get_logger().info("parameters changed: " + ", ".join(f"{n}={getattr(cfg, n)!r}" for n in sorted(changed)))

    @property
    def core(self) -> ChunkExecutorCore:
        return self._core

    @property
    def jitter(self) -> PeriodJitter:
        return self._jitter

    @property
    def realtime_priority(self) -> int:
        return int(self._node_params.config.realtime_priority)

    def reset_jitter(self) -> None:
        """Restart the publication period statistics (e.g. after a warm-up)."""
        self._jitter = PeriodJitter(self._jitter.nominal)

    # -- callbacks ---------------------------------------------------------------------------
    def _on_reset(self, _msg: Empty) -> None:
        """New episode / robot re-homed: drop every chunk, wait for a fresh JointState, start from it."""
        with self._lock:
            self._core.reset()
            self._last_state = self._core.state
        self.get_logger().info("reset: timeline cleared; waiting for JointState to restart from the measured position")

    def _on_joint_state(self, msg: JointState) -> None:
        with self._lock:
            ok = self._core.on_joint_state(list(msg.name), list(msg.position), stamp_to_sec(msg.header.stamp, self._epoch_ns))
            state = self._core.state
        if not ok:
            self._throttled("joint_state", f"JointState ignored: {joint_state_problem(msg, self._core.names)}")
        self._log_state(state)

    def _on_chunk(self, msg: ActionChunk) -> None:
        now = self._now()
        with self._lock:
            res = self._core.on_chunk(
                now,
                chunk_id=int(msg.chunk_id),
                t0=stamp_to_sec(msg.header.stamp, self._epoch_ns),
                dt=stamp_to_sec(msg.step_period),
                joint_names=list(msg.joint_names),
                num_actions=int(msg.num_actions),
                action_dim=int(msg.action_dim),
                actions=np.asarray(msg.actions, dtype=np.float64),
                rtc_delay_steps=int(msg.rtc_delay_steps),
                rtc_prefix_chunk_id=int(msg.rtc_prefix_chunk_id),
            )
            state = self._core.state
            fb = self._core.feedback(now) if res.accepted else None
        if fb is not None:
            self._fb_pub.publish(self._feedback_msg(fb))
        if not res.accepted:
            self._throttled(res.verdict.value, f"chunk {msg.chunk_id} rejected ({res.verdict.value}): {res.reason}")
        self._log_state(state)

    def _on_correction(self, msg: ActionCorrection) -> None:
        now = self._now()
        with self._lock:
            res = self._core.on_correction(
                now,
                chunk_id=int(msg.chunk_id),
                first_index=int(msg.first_index),
                joint_names=list(msg.joint_names),
                action_dim=int(msg.action_dim),
                residuals=np.asarray(msg.residuals, dtype=np.float64),
                stamp=stamp_to_sec(msg.header.stamp, self._epoch_ns),
            )
        if res.dropped and not res.stale:  # a correction for the chunk just replaced is normal, not logged
            self._throttled("correction", f"correction for chunk {msg.chunk_id} dropped: {res.reason}")

    def _log_state(self, state: ExecState) -> None:
        if state is self._last_state:
            return
        self._last_state = state
        msg = {
            ExecState.IDLE: "JointState received; waiting for the first chunk",
            ExecState.EXECUTING: "executing chunks",
            ExecState.HOLDING: "watchdog: no fresh chunk in time, decelerating to a hold",
        }.get(state, state.name)
        if state is ExecState.HOLDING:  # one call site per severity: rclpy refuses to mix them
            self.get_logger().warning(msg)
        else:
            self.get_logger().info(msg)

    def destroy_node(self) -> None:
        """Stop the control loop (joined, 2 s at most) and destroy the node; idempotent, and safe after a failed
        ``__init__`` (rclpy's context shutdown destroys a half-built node too)."""
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
        if not join_thread(getattr(self, "_control", None), 2.0):
            self.get_logger().warning("control thread did not stop within 2 s")
        if getattr(self, "_destroyed", False):
            return
        self._destroyed = True
        super().destroy_node()

    def _control_loop(self) -> None:
        """Run :meth:`_on_timer` once per control period until the node is destroyed.

        Wall time: sleep until the next deadline of the monotonic clock (immune to system clock
        steps). Simulated time (``use_sim_time`` and /clock): wait in short wall-clock naps until the
        ROS clock passes the deadline; a /clock that jumps back (simulation reset) restarts the grid.
        A loop that falls more than a period behind resumes from now (the core itself catches up: it
        publishes the point of the current grid time, never a burst of stale ones).
        """
        err = make_thread_realtime(self._node_params.config.realtime_priority)
        if err:
            self._rt_error = err
            self.get_logger().warning(f"realtime_priority: cannot use SCHED_FIFO ({err}); normal scheduling")
        clock = self.get_clock()
        period = self._core.cfg.publish_period
        wall = Deadlines(period)
        sim = Deadlines(period, clock=lambda: clock.now().nanoseconds * 1e-9)
        on_sim = False

        def sim_time() -> bool:  # /clock drives the node (use_sim_time): a ROSClock with ROS time active
            return isinstance(clock, ROSClock) and clock.ros_time_is_active

        def leave_sim_wait() -> bool:
            return self._stop.is_set() or not self.context.ok() or not sim_time()

        while not self._stop.is_set() and self.context.ok():
            if sim_time():
                if not on_sim:
                    sim.reset()
                    on_sim = True
                if not sim.wait(leave_sim_wait):
                    continue
            else:
                on_sim = False
                wall.wait()
                if self._stop.is_set() or not self.context.ok():
                    return
            try:
                self._on_timer()
            except Exception as e:  # noqa: BLE001 - a publisher gone at shutdown; anything else is logged
                if self._stop.is_set() or not self.context.ok():
                    return
                self._throttled("control_loop", f"control loop error: {e!r}", "error")

    def _on_timer(self) -> None:
        self._jitter.tick(time.perf_counter())
        now = self._now()
        self._ticks += 1
        send_fb = self._ticks % self._fb_every == 0
        with self._lock:
            cmd = self._core.tick(now)
            fb = self._core.feedback(now) if send_fb else None
            state = self._core.state
            reanchored, gap = self._core.stats.counts["reanchored"], self._core.stats.last_gap_s
        if reanchored != self._reanchored_seen:
            self._reanchored_seen = reanchored
            if gap >= 3 * self._core.dt:  # a stall; one or two late ticks are only counted (diagnostics gap.*)
                self._throttled("reanchor", f"output stalled: nothing covered {gap * 1e3:.0f} ms, the controller "
                                            "held the last point; restarting from it within the limits "
                                            f"({reanchored} restarts so far)")
        if cmd is not None:
            self._publish_command(cmd)
        if fb is not None:
            self._fb_pub.publish(self._feedback_msg(fb))
        self._log_state(state)

    # -- output ------------------------------------------------------------------------------
    def _trajectory(self, cmd: Command, idx: list[int], names: list[str]) -> JointTrajectory:
        msg = JointTrajectory()
        msg.header.stamp = to_time_msg(cmd.stamp, self._epoch_ns)
        msg.joint_names = names
        pos = cmd.positions[:, idx]
        vel = cmd.velocities[:, idx]
        for j in range(pos.shape[0]):
            p = JointTrajectoryPoint()
            p.positions = pos[j].tolist()
            p.velocities = vel[j].tolist()
            p.time_from_start = to_duration_msg(float(cmd.time_from_start[j]))
            msg.points.append(p)
        return msg

    def _publish_command(self, cmd: Command) -> None:
        # the core never produces NaN/Inf; this is the last line of defence before the robot
        if not (np.all(np.isfinite(cmd.positions)) and np.all(np.isfinite(cmd.velocities))):
            self._throttled("nonfinite_output", "internal error: non-finite command suppressed", "error")
            return
        if self._arm_idx:
            self._traj_pub.publish(self._trajectory(cmd, self._arm_idx, self._arm_names))
        if self._grip_pub is not None:
            self._grip_pub.publish(self._trajectory(cmd, self._grip_idx, self._grip_names))

    def _feedback_msg(self, fb: Feedback) -> ExecutionFeedback:
        m = ExecutionFeedback()
        m.header.stamp = to_time_msg(fb.stamp, self._epoch_ns)
        m.state = int(fb.state)
        m.chunk_id = int(fb.chunk_id)
        m.chunk_stamp = to_time_msg(fb.chunk_stamp, self._epoch_ns) if fb.chunk_id else TimeMsg()
        m.step_period = to_duration_msg(fb.step_period)
        m.next_action_index = int(fb.next_action_index)
        m.committed_index = int(fb.committed_index)
        m.committed_until = to_time_msg(fb.committed_until, self._epoch_ns) if fb.chunk_id else TimeMsg()
        m.remaining_actions = int(fb.remaining_actions)
        return m

    def diagnostics_values(self) -> tuple[int, str, dict[str, str]]:
        """(level, message, key/values) of the diagnostics status (also used by the benchmark)."""
        with self._lock:
            core = self._core
            st = core.stats
            counts = dict(st.counts)
            state = core.state
            hold_reached = core.hold_reached
            trips = st.watchdog_trips
            max_gap_s = st.max_gap_s
            ages = np.asarray(st.correction_age_steps, dtype=np.float64)
            clamps = {
                n: (int(st.clamp_position[i]), int(st.clamp_velocity[i]), int(st.clamp_acceleration[i]))
                for i, n in enumerate(core.names)
            }
            cfg = core.cfg
        jit = self._jitter.summary()
        values: dict[str, str] = {"state": _STATE_NAMES[state]}
        for k in ("received", "accepted", "rejected", "late", "early", "duplicate", "out_of_order",
                  "invalid", "joint_mismatch", "nonfinite", "waiting", "actions_dropped", "joint_state_rejected"):
            values[f"chunks.{k}" if k not in ("actions_dropped", "joint_state_rejected") else k] = str(counts.get(k, 0))
        if state is ExecState.HOLDING:
            wd = "holding" if hold_reached else "decelerating"
        else:
            wd = "armed" if state is ExecState.EXECUTING else "inactive"
        values["watchdog.state"] = wd
        values["gap.reanchored"] = str(counts.get("reanchored", 0))  # restarts from the held point after a stall
        values["gap.max_ms"] = f"{max_gap_s * 1e3:.1f}"
        values["watchdog.trips"] = str(trips)
        values["watchdog.timeout_s"] = f"{cfg.watchdog_timeout:g}"
        for n, (cp, cv, ca) in clamps.items():
            values[f"clamp.{n}"] = str(cp + cv + ca)
            values[f"clamp.{n}.position"] = str(cp)
            values[f"clamp.{n}.velocity"] = str(cv)
            values[f"clamp.{n}.acceleration"] = str(ca)
        values["period.nominal_ms"] = f"{self._jitter.nominal * 1e3:.3f}"
        values["period.samples"] = str(int(jit["n"]))
        values["period.error_p50_ms"] = f"{jit['p50_ms']:.4f}"
        values["period.error_p99_ms"] = f"{jit['p99_ms']:.4f}"
        values["period.error_max_ms"] = f"{jit['max_ms']:.4f}"
        for key, k in (("received", "corrections_received"), ("dropped", "corrections_dropped"),
                       ("rows", "corrected_rows"), ("rows_late", "corrected_rows_late")):
            values[f"correction.{key}"] = str(counts.get(k, 0))
        if ages.size:  # how old the observation of a committed row's residual was, in the chunk's steps
            values["correction.age_steps_mean"] = f"{float(ages.mean()):.2f}"
            values["correction.age_steps_max"] = f"{float(ages.max()):.2f}"
        values["merge_strategy"] = cfg.merge_strategy
        values["output_mode"] = cfg.output_mode
        level = 0  # DiagnosticStatus.OK
        message = _STATE_NAMES[state]
        if state in (ExecState.WAITING_FOR_JOINT_STATE, ExecState.HOLDING):
            level = 1  # DiagnosticStatus.WARN
            message = {ExecState.WAITING_FOR_JOINT_STATE: "waiting for JointState"}.get(state, f"watchdog: {wd}")
        return level, message, values

    def _publish_diagnostics(self) -> None:
        level, message, values = self.diagnostics_values()
        st = DiagnosticStatus()
        st.level = bytes([level]) if isinstance(DiagnosticStatus.OK, bytes) else level  # bytes on Jazzy+
        st.name = f"{self.get_name()}: chunk executor"
        st.message = message
        st.hardware_id = self.get_fully_qualified_name()
        st.values = [KeyValue(key=k, value=v) for k, v in values.items()]
        arr = DiagnosticArray()
        arr.header.stamp = self.get_clock().now().to_msg()
        arr.status = [st]
        self._diag_pub.publish(arr)


def main(args: list[str] | None = None) -> None:
    run_node(ChunkExecutorNode, "chunk_executor", args)


if __name__ == "__main__":
    main()
