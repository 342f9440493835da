"""``sim_bridge``: the simulated SO-101 two-cube task as a ROS 2 robot (MuJoCo, ros2_control-like).

Steps :class:`effvla_ros.sim.env.TwoCubePickPlaceEnv` at a fixed physics rate (``physics_dt``) in
simulated time, from a physics thread on the monotonic clock, ``real_time_factor`` simulated
seconds per wall second (0: as fast as possible, at most ``max_steps_per_tick`` physics steps per
timer tick). It behaves like a robot driven by ros2_control's ``joint_trajectory_controller``:

Topics
======
=====================================  ===============================  =====================================
topic                                  type                             notes
=====================================  ===============================  =====================================
``/clock``                             rosgraph_msgs/Clock              sim time, ``clock_rate`` Hz (sim time)
``/camera/<name>/image_raw``           sensor_msgs/Image ``rgb8``       per camera in ``cameras``,
                                                                        ``camera_rate`` Hz, sensor-data QoS
``/joint_states``                      sensor_msgs/JointState           5 arm joints + ``gripper``: position
                                                                        [rad], velocity [rad/s];
                                                                        ``joint_state_rate`` Hz
``/<controller>/joint_trajectory``     trajectory_msgs/JointTrajectory  subscribed, reliable; executed by
                                                                        :mod:`effvla_ros.sim.follower`
                                                                        (partial goals: other joints hold)
``/<gripper_controller>/...``          trajectory_msgs/JointTrajectory  only if ``gripper_controller`` is
                                                                        set: the ``gripper`` joint
``/instruction``                       std_msgs/String                  the episode's instruction, latched
``/sim/success``                       std_msgs/Bool                    task success of the episode (latched
                                                                        flag), latched; sent on reset/change
``/sim/episode``                       std_msgs/String                  JSON: seed, instruction, target_color,
                                                                        place, success, sim_time; latched;
                                                                        sent on reset and on success
``/sim/reset``                         std_msgs/Int64                   subscribed: reset to that seed
                                                                        (negative: current seed + 1); sets the
                                                                        ``seed`` parameter
=====================================  ===============================  =====================================

Time: message stamps and trajectory ``header.stamp`` are in simulated time when the node's
``use_sim_time`` parameter is true (recommended: all nodes with ``use_sim_time:=true``), else in
ROS (wall) time. The trajectory controller updates the position targets at ``controller_rate`` Hz
(simulated), holding them in between, like a ros2_control update loop. Simulated time runs on
across resets (``/clock`` never goes back).

Parameters: the fields of :class:`SimBridgeConfig` (``ros2 param describe`` shows ranges and
descriptions); setting ``seed`` resets the simulation to that episode.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import numpy as np
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rclpy.time import Time
from rosgraph_msgs.msg import Clock as ClockMsg
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import Bool, Int64, String
from trajectory_msgs.msg import JointTrajectory

from effvla_ros.core.params import param
from effvla_ros.nodes.common import Deadlines, join_thread, run_node
from effvla_ros.nodes.param_bridge import ConfigParameters
from effvla_ros.sim.env import JOINT_NAMES, SimConfig, TwoCubePickPlaceEnv
from effvla_ros.sim.follower import JointTrajectoryFollower, TrajectoryError, TrajectoryPoint

_NS = 1_000_000_000
# a trajectory whose first point lies this far (s) ahead of the bridge's clock is executed when due, like
# joint_trajectory_controller does, but with a warning: usually a wrong clock (wall vs simulated) at the sender
FUTURE_STAMP_WARN_S = 1.0


@dataclasses.dataclass
class SimBridgeConfig(SimConfig):
    """Parameters of the ``sim_bridge`` node (the simulation's own settings are inherited)."""

    seed: int = param(0, description="episode seed; setting it resets the simulation to that episode", min=0,
                      max=2**31 - 1)
    controller: str = param("arm_controller", description=(
        "name of the simulated joint_trajectory_controller; trajectories are read from /<controller>/joint_trajectory"),
        read_only=True)
    real_time_factor: float = param(1.0, description="simulated seconds per wall second; 0 = as fast as possible",
                                    min=0.0, max=100.0)
    tick_period: float = param(0.01, description="wall-clock period of the physics loop in seconds", min=0.001,
                               max=0.1, read_only=True)
    max_steps_per_tick: int = param(50, description=(
        "physics steps per tick at most (the step budget with real_time_factor 0; bounds catching up)"),
        min=1, max=5000)
    gripper_controller: str = param("", description=(
        "if set, a second joint_trajectory_controller owning the 'gripper' joint, on "
        "/<gripper_controller>/joint_trajectory (the arm controller then owns the 5 arm joints); '' = the arm "
        "controller owns all 6 joints"), read_only=True)
    controller_rate: float = param(100.0, description="trajectory controller update rate in Hz of simulated time",
                                   min=1.0, max=1000.0)
    camera_rate: float = param(10.0, description="camera image rate in Hz of simulated time (0: no images)",
                               min=0.0, max=60.0)
    joint_state_rate: float = param(50.0, description="/joint_states rate in Hz of simulated time", min=1.0,
                                    max=500.0)
    clock_rate: float = param(100.0, description="/clock rate in Hz of simulated time", min=1.0, max=1000.0)

    def validate(self) -> None:
        super().validate()
        if not self.controller.strip("/") or "/" in self.controller.strip("/"):
            raise ValueError("controller: must be a single non-empty name")
        if "/" in self.gripper_controller.strip("/"):
            raise ValueError("gripper_controller: must be a single name or empty")
        if self.gripper_controller.strip("/") and self.gripper_controller.strip("/") == self.controller.strip("/"):
            raise ValueError("gripper_controller: must differ from controller")


def _sim_config(cfg: SimBridgeConfig) -> SimConfig:
    names = {f.name for f in dataclasses.fields(SimConfig)}
    return SimConfig(**{k: v for k, v in cfg.to_dict().items() if k in names})


class _Every:
    """Fires every ``period`` simulated nanoseconds (``period`` 0: never)."""

    def __init__(self, rate_hz: float) -> None:
        self.period = int(round(_NS / rate_hz)) if rate_hz > 0 else 0
        self.next = 0

    def due(self, t_ns: int) -> bool:
        if not self.period or t_ns < self.next:
            return False
        self.next = (t_ns // self.period + 1) * self.period
        return True


class SimBridge(Node):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__("sim_bridge", **kwargs)
        self._lock = threading.RLock()
        self._params = ConfigParameters(self, SimBridgeConfig(), on_change=self._on_params)
        cfg = self._params.config
        self._gl = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sim_gl")  # one thread owns the GL context
        self._env = self._gl.submit(TwoCubePickPlaceEnv, _sim_config(cfg), cfg.seed).result()
        self._dt_ns = int(round(self._env.physics_dt * _NS))
        self._t_ns = 0  # simulated time since start; runs on across resets
        # One follower per simulated controller, each owning its joints (like ros2_control).
        controller = cfg.controller.strip("/")
        gripper_controller = cfg.gripper_controller.strip("/")
        owned = {controller: list(JOINT_NAMES)}
        if gripper_controller:
            owned = {controller: list(JOINT_NAMES[:-1]), gripper_controller: [JOINT_NAMES[-1]]}
        self._followers: dict[str, tuple[JointTrajectoryFollower, np.ndarray]] = {}
        for name, joints in owned.items():
            idx = np.asarray([JOINT_NAMES.index(j) for j in joints])
            self._followers[name] = (JointTrajectoryFollower(joints, self._env.joint_targets()[idx], now=0.0), idx)
        # requests from the subscription / parameter threads, applied by the physics thread in arrival
        # order at its next tick: a reset (seed) or a trajectory (controller, joint names, points, start)
        self._inbox: collections.deque[int | tuple[str, list[str], list[TrajectoryPoint], float]] = collections.deque()
        self._debt_s = 0.0
        self._last_wall = time.monotonic()
        self._last_success: bool | None = None
        self._episode = 0
        self._sim_time_mode = bool(self.get_parameter("use_sim_time").value)
        self._rates(cfg)

        latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self._pub_clock = self.create_publisher(ClockMsg, "/clock", QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE))
        self._pub_js = self.create_publisher(JointState, "/joint_states", 10)
        self._pub_img = {
            c: self.create_publisher(Image, f"/camera/{c}/image_raw", qos_profile_sensor_data) for c in cfg.cameras
        }
        self._pub_instr = self.create_publisher(String, "/instruction", latched)
        self._pub_success = self.create_publisher(Bool, "/sim/success", latched)
        self._pub_episode = self.create_publisher(String, "/sim/episode", latched)

        self._io_group = MutuallyExclusiveCallbackGroup()
        for name in self._followers:
            self.create_subscription(
                JointTrajectory, f"/{name}/joint_trajectory", lambda msg, name=name: self._on_trajectory(name, msg),
                QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE), callback_group=self._io_group,
            )
        self.create_subscription(Int64, "/sim/reset", self._on_reset, 10, callback_group=self._io_group)

        # physics: a thread of its own on the monotonic clock, not an rclpy timer (see _physics_loop)
        self._stop_physics = threading.Event()
        self._physics = threading.Thread(target=self._physics_loop, name="physics", daemon=True)
        self._announce()
        self._physics.start()
        self.get_logger().info(
            f"sim_bridge: episode seed {cfg.seed} '{self._env.instruction}', physics {1 / self._env.physics_dt:.0f} Hz, "
            f"real_time_factor {cfg.real_time_factor or 'max'}, cameras {list(cfg.cameras)} {cfg.image_size}px, "
            "trajectories on " + ", ".join(f"/{n}/joint_trajectory ({len(f.joint_names)} joints)"
                                           for n, (f, _) in self._followers.items())
        )

    # -- configuration -----------------------------------------------------------------------
    def _rates(self, cfg: SimBridgeConfig) -> None:
        self._every_ctrl = _Every(cfg.controller_rate)
        self._every_cam = _Every(cfg.camera_rate)
        self._every_js = _Every(cfg.joint_state_rate)
        self._every_clock = _Every(cfg.clock_rate)
        for e in (self._every_ctrl, self._every_cam, self._every_js, self._every_clock):
            e.next = getattr(self, "_t_ns", 0)

    def _on_params(self, cfg: SimBridgeConfig, changed: set[str]) -> None:
        if "seed" in changed:
            self._inbox.append(cfg.seed)  # no lock: see _on_trajectory
        if not changed & {"controller_rate", "camera_rate", "joint_state_rate", "clock_rate", "paraphrase"}:
            return
        with self._lock:
            if changed & {"controller_rate", "camera_rate", "joint_state_rate", "clock_rate"}:
                self._rates(cfg)
            if "paraphrase" in changed:
                self._env.config = self._env.config.replace(paraphrase=cfg.paraphrase)

    @property
    def config(self) -> SimBridgeConfig:
        return self._params.config

    @contextmanager
    def snapshot(self) -> Iterator[tuple[Any, float]]:
        """``with bridge.snapshot() as (env, t):`` the environment and its simulated time (s) while the
        physics tick is held: a consistent state between two physics steps, for an in-process observer
        (the demo's outcome tracking and video). Read only; keep the block short, the physics waits."""
        with self._lock:
            yield self._env, self._t_ns / _NS

    def _stamp(self) -> Time:
        if self._sim_time_mode:
            return Time(nanoseconds=self._t_ns)
        return self.get_clock().now()

    def _time_base(self) -> str:
        return "simulated" if self._sim_time_mode else "ROS (wall)"

    def _now_s(self) -> float:
        """Current time in the trajectory time base (seconds)."""
        return self._stamp().nanoseconds / _NS

    # -- callbacks ---------------------------------------------------------------------------
    def _on_trajectory(self, controller: str, msg: JointTrajectory) -> None:
        points = [
            TrajectoryPoint(
                time_from_start=p.time_from_start.sec + p.time_from_start.nanosec / _NS,
                positions=list(p.positions),
                velocities=list(p.velocities) if len(p.velocities) else None,
            )
            for p in msg.points
        ]
        start = msg.header.stamp.sec + msg.header.stamp.nanosec / _NS
        # handed to the physics thread (applied at its next tick, before stepping): waiting for the
        # simulation lock here starves while the physics thread runs behind real time, since a
        # released lock goes back to the thread that holds the GIL
        self._inbox.append((controller, list(msg.joint_names), points, start))

    def _apply_requests(self) -> None:
        while self._inbox:
            req = self._inbox.popleft()
            if isinstance(req, int):
                self._reset(req)
                continue
            controller, names, points, start = req
            now = self._now_s()
            if start - now > FUTURE_STAMP_WARN_S:
                self.get_logger().warning(
                    f"{controller}: trajectory stamped {start - now:.1f} s ahead of the {self._time_base()} clock; "
                    "the joints hold their targets until then (is the sender on the same clock / use_sim_time?)",
                    throttle_duration_sec=2.0)
            try:
                self._followers[controller][0].set_trajectory(names, points, now=now, start_time=start)
            except TrajectoryError as e:
                self.get_logger().warning(f"{controller}: trajectory rejected: {e}", throttle_duration_sec=1.0)

    def _on_reset(self, msg: Int64) -> None:
        seed = int(msg.data) if msg.data >= 0 else self.config.seed + 1
        unchanged = seed == self.config.seed
        result = self.set_parameters([Parameter("seed", value=seed)])[0]
        if not result.successful:
            self.get_logger().warning(f"reset to seed {seed} refused: {result.reason}")
        elif unchanged:  # the parameter did not change (no _on_params): reset anyway
            self._inbox.append(seed)

    def _physics_loop(self) -> None:
        """Tick every ``tick_period`` of the monotonic clock until the node is destroyed.

        A thread of its own, like the chunk executor's control loop: an rclpy timer under a
        MultiThreadedExecutor stalled for up to a second here, and under a SingleThreadedExecutor the
        trajectory callbacks would wait for each tick. A failing tick is logged and the loop goes on.
        """
        deadlines = Deadlines(self.config.tick_period)
        while True:
            deadlines.wait()
            if self._stop_physics.is_set() or not self.context.ok():
                return
            try:
                self._tick_locked()
            except Exception as e:  # noqa: BLE001 - shutting down (publishers gone), or logged
                if self._stop_physics.is_set() or not self.context.ok():
                    return
                self.get_logger().error(f"physics tick failed: {type(e).__name__}: {e}", throttle_duration_sec=2.0)

    def _tick_locked(self) -> None:
        cfg = self.config
        with self._lock:
            self._sim_time_mode = bool(self.get_parameter("use_sim_time").value)
            self._apply_requests()
            wall = time.monotonic()
            if cfg.real_time_factor > 0:
                self._debt_s += (wall - self._last_wall) * cfg.real_time_factor
                n = int(self._debt_s * _NS // self._dt_ns)
                if n > cfg.max_steps_per_tick:
                    n = cfg.max_steps_per_tick
                    self._debt_s = 0.0  # fell behind: drop the backlog instead of racing to catch up
                else:
                    self._debt_s -= n * self._dt_ns / _NS
            else:
                n = cfg.max_steps_per_tick
            self._last_wall = wall
            for _ in range(n):
                if self._inbox:  # arrived during this tick: applied at the current simulated time
                    self._apply_requests()
                self._step_once()
            success = self._env.success
            if success != self._last_success:
                self._last_success = success
                self._pub_success.publish(Bool(data=success))
                if success:
                    self._publish_episode()

    def _step_once(self) -> None:
        t = self._t_ns
        if self._every_ctrl.due(t):
            now = self._now_s()
            q = self._env.joint_targets()
            for follower, idx in self._followers.values():
                q[idx] = follower.sample(now)[0]
            self._env.set_joint_targets(q)
        if self._every_clock.due(t):
            self._pub_clock.publish(ClockMsg(clock=Time(nanoseconds=t).to_msg()))
        if self._every_js.due(t):
            self._publish_joint_states()
        if self._every_cam.due(t):
            self._publish_images()
        self._env.step_physics(1)
        self._t_ns += self._dt_ns

    # -- episode -----------------------------------------------------------------------------
    def _reset(self, seed: int) -> None:
        self._gl.submit(self._env.reset, seed).result()
        for follower, idx in self._followers.values():
            follower.hold(self._env.joint_targets()[idx], now=self._now_s())
        self._last_success = None
        self._episode += 1
        self._announce()
        self.get_logger().info(f"reset: seed {seed} '{self._env.instruction}'")

    def _announce(self) -> None:
        self._pub_instr.publish(String(data=self._env.instruction))
        self._pub_success.publish(Bool(data=self._env.success))
        self._last_success = self._env.success
        self._publish_episode()

    def _publish_episode(self) -> None:
        task = self._env.task
        self._pub_episode.publish(String(data=json.dumps({
            "seed": task.seed,
            "episode": self._episode,
            "instruction": task.instruction,
            "target_color": task.target_color,
            "place": task.place,
            "success": self._env.success,
            "sim_time": self._t_ns / _NS,
        })))

    # -- publishing --------------------------------------------------------------------------
    def _publish_joint_states(self) -> None:
        msg = JointState()
        msg.header.stamp = self._stamp().to_msg()
        msg.name = list(JOINT_NAMES)
        msg.position = self._env.joint_positions().tolist()
        msg.velocity = self._env.joint_velocities().tolist()
        self._pub_js.publish(msg)

    def _publish_images(self) -> None:
        stamp = self._stamp().to_msg()
        for cam, pub in self._pub_img.items():
            img: np.ndarray = self._gl.submit(self._env.render, cam).result()
            msg = Image()
            msg.header.stamp = stamp
            msg.header.frame_id = f"{cam}_camera"
            msg.height, msg.width = int(img.shape[0]), int(img.shape[1])
            msg.encoding = "rgb8"
            msg.is_bigendian = 0
            msg.step = 3 * msg.width
            msg.data = img.tobytes()
            pub.publish(msg)

    def destroy_node(self) -> None:
        """Stop the physics thread (joined, 5 s at most), close the renderer, destroy the node; idempotent, and
        safe after a failed ``__init__`` (rclpy's context shutdown destroys a half-built node too)."""
        stop = getattr(self, "_stop_physics", None)
        if stop is not None:
            stop.set()
        if not join_thread(getattr(self, "_physics", None), 5.0):
            self.get_logger().warning("physics thread did not stop within 5 s")
        gl = getattr(self, "_gl", None)
        env = getattr(self, "_env", None)
        if gl is not None and not getattr(self, "_gl_closed", False):
            self._gl_closed = True
            try:
                if env is not None and not isinstance(env, Exception):
                    gl.submit(env.close).result(timeout=5)
            except (Exception, KeyboardInterrupt):  # noqa: BLE001 - best effort at shutdown
                pass
            gl.shutdown(wait=False)
        if getattr(self, "_destroyed", False):
            return
        self._destroyed = True
        super().destroy_node()


def main(args: list[str] | None = None) -> None:
    run_node(SimBridge, "sim_bridge", args)


if __name__ == "__main__":
    main()
