"""Joint-trajectory following as ros2_control's ``joint_trajectory_controller`` does it (ROS-free).

:class:`JointTrajectoryFollower` turns ``trajectory_msgs/JointTrajectory``-like input into a position
command at any time ``t`` (float seconds in the same time base as the trajectory stamps — the node
uses simulated time with ``use_sim_time``, ROS time otherwise):

* a trajectory has a start time (``header.stamp``; **0 means "now"**, the time it is received) and
  points with ``time_from_start`` (strictly increasing), ``positions`` and optionally
  ``velocities`` (all points or none). Accelerations are ignored;
* between two points the command is the **cubic Hermite** spline through positions and velocities
  when both points have velocities, else **linear** in the positions (the JTC's spline rule without
  the quintic case);
* a new trajectory **replaces the current one from its start time on** (``max(start, now)``): until
  then the old trajectory keeps running; from there the command moves from the old trajectory's
  state at that instant (positions, and velocities where the new points carry them) to the first
  new point. Points whose absolute time is not after ``now`` are **dropped**; a trajectory with no
  point left is rejected (:class:`TrajectoryError`), and so is a malformed one (unknown or
  duplicate joint names, wrong vector lengths, non-increasing times, non-finite values);
* joints missing from a trajectory keep the value they have at the splice time (partial goals);
* after the last point the command **holds** the last point's positions (velocity zero).
"""
from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike


class TrajectoryError(ValueError):
    """A trajectory that cannot be executed (the reason is the message)."""


@dataclasses.dataclass(frozen=True)
class TrajectoryPoint:
    """A point as in ``trajectory_msgs/JointTrajectoryPoint`` (``time_from_start`` in seconds)."""

    time_from_start: float
    positions: Sequence[float] | np.ndarray
    velocities: Sequence[float] | np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class _Knot:
    t: float
    q: np.ndarray
    v: np.ndarray | None


class JointTrajectoryFollower:
    """Position command of ``joint_names`` over time; see the module docstring for the rules."""

    def __init__(self, joint_names: Sequence[str], initial_positions: ArrayLike, now: float = 0.0) -> None:
        self.joint_names: tuple[str, ...] = tuple(joint_names)
        if len(set(self.joint_names)) != len(self.joint_names):
            raise ValueError("joint_names: duplicate name")
        self._index = {n: i for i, n in enumerate(self.joint_names)}
        self._knots: list[_Knot] = []
        self.hold(initial_positions, now)

    # -- state ------------------------------------------------------------------------------
    def hold(self, positions: ArrayLike, now: float = 0.0) -> None:
        """Drop any trajectory and hold ``positions`` from ``now`` on."""
        q = self._vector(positions, "positions")
        self._knots = [_Knot(float(now), q, None)]

    @property
    def end_time(self) -> float:
        """Time of the last point (the command is constant afterwards)."""
        return self._knots[-1].t

    @property
    def goal(self) -> np.ndarray:
        """Positions of the last point (what the command holds at the end)."""
        return self._knots[-1].q.copy()

    def done(self, t: float) -> bool:
        return t >= self._knots[-1].t

    def sample(self, t: float) -> tuple[np.ndarray, np.ndarray]:
        """(positions, velocities) commanded at time ``t``."""
        k = self._knots
        if t <= k[0].t or len(k) == 1:
            v0 = np.zeros_like(k[0].q) if len(k) == 1 or t < k[0].t or k[0].v is None else k[0].v.copy()
            return k[0].q.copy(), v0
        if t >= k[-1].t:
            return k[-1].q.copy(), np.zeros_like(k[-1].q)
        i = bisect.bisect_right([x.t for x in k], t) - 1
        a, b = k[i], k[i + 1]
        h = b.t - a.t
        s = (t - a.t) / h
        if a.v is not None and b.v is not None:
            s2, s3 = s * s, s * s * s
            q = (2 * s3 - 3 * s2 + 1) * a.q + (s3 - 2 * s2 + s) * h * a.v + (-2 * s3 + 3 * s2) * b.q + (s3 - s2) * h * b.v
            v = (6 * s2 - 6 * s) / h * a.q + (3 * s2 - 4 * s + 1) * a.v + (-6 * s2 + 6 * s) / h * b.q + (3 * s2 - 2 * s) * b.v
            return q, v
        return a.q + s * (b.q - a.q), (b.q - a.q) / h

    # -- input ------------------------------------------------------------------------------
    def set_trajectory(
        self,
        joint_names: Sequence[str],
        points: Sequence[TrajectoryPoint],
        now: float,
        start_time: float = 0.0,
    ) -> int:
        """Splice in a trajectory; returns the number of points kept (not in the past).

        ``start_time`` is the header stamp in seconds (0: ``now``). Raises :class:`TrajectoryError`.
        """
        names = list(joint_names)
        if not names:
            raise TrajectoryError("no joint names")
        if len(set(names)) != len(names):
            raise TrajectoryError("duplicate joint names")
        unknown = [n for n in names if n not in self._index]
        if unknown:
            raise TrajectoryError(f"unknown joint {unknown[0]!r} (known: {', '.join(self.joint_names)})")
        if not points:
            raise TrajectoryError("no points")
        pos = [np.asarray(p.positions, dtype=np.float64).reshape(-1) for p in points]
        vel = [None if p.velocities is None else np.asarray(p.velocities, dtype=np.float64).reshape(-1) for p in points]
        has_vel = [v is not None and v.size > 0 for v in vel]
        if any(has_vel) and not all(has_vel):
            raise TrajectoryError("velocities must be given for all points or none")
        with_vel = all(has_vel)
        prev = -np.inf
        for i, p in enumerate(points):
            tfs = float(p.time_from_start)
            if not np.isfinite(tfs) or tfs < 0:
                raise TrajectoryError(f"point {i}: invalid time_from_start {tfs}")
            if tfs <= prev:
                raise TrajectoryError(f"point {i}: time_from_start must be strictly increasing")
            prev = tfs
            if pos[i].size != len(names):
                raise TrajectoryError(f"point {i}: {pos[i].size} positions for {len(names)} joints")
            vi = vel[i]
            if with_vel and vi is not None and vi.size != len(names):
                raise TrajectoryError(f"point {i}: {vi.size} velocities for {len(names)} joints")
            if not np.all(np.isfinite(pos[i])) or (vi is not None and not np.all(np.isfinite(vi))):
                raise TrajectoryError(f"point {i}: non-finite value")

        start = float(now) if start_time == 0.0 else float(start_time)
        future = [p for p in points if start + float(p.time_from_start) > now]
        if not future:
            last = start + max(float(p.time_from_start) for p in points)
            raise TrajectoryError(f"every point is in the past (the last one by {now - last:.3f} s)")
        splice = max(start, float(now))
        q_s, v_s = self.sample(splice)
        idx = np.asarray([self._index[n] for n in names])

        new: list[_Knot] = []
        for i, p in enumerate(points):
            t = start + float(p.time_from_start)
            if t <= now:
                continue
            q = q_s.copy()
            q[idx] = pos[i]
            v = None
            if with_vel:
                v = np.zeros_like(q)
                v[idx] = vel[i]
            new.append(_Knot(t, q, v))

        # Keep the old trajectory before the splice (and only the last knot already in the past).
        old = [k for k in self._knots if k.t < splice]
        past = [i for i, k in enumerate(old) if k.t <= now]
        if len(past) > 1:
            old = old[past[-1]:]
        knots = old
        if new[0].t > splice:
            old_hermite = self._segment_is_hermite(splice)
            knots.append(_Knot(splice, q_s, v_s if (with_vel or old_hermite) else None))
        knots.extend(new)
        self._knots = knots
        return len(future)

    # -- helpers ----------------------------------------------------------------------------
    def _segment_is_hermite(self, t: float) -> bool:
        k = self._knots
        if t <= k[0].t or t >= k[-1].t or len(k) == 1:
            return False
        i = bisect.bisect_right([x.t for x in k], t) - 1
        return k[i].v is not None and k[i + 1].v is not None

    def _vector(self, values: ArrayLike, what: str) -> np.ndarray:
        q = np.asarray(values, dtype=np.float64).reshape(-1)
        if q.shape != (len(self.joint_names),):
            raise ValueError(f"{what}: expected {len(self.joint_names)} values, got {q.size}")
        return q.copy()
