"""Second-order command limiter: tracks a reference within position, velocity and acceleration limits.

One step advances the command by one control period ``dt``. With a feasible reference and no
tracking error the command *is* the reference sampled on the grid (``q[k+1] = r(t[k+1])``). Otherwise
the velocity command is the reference's velocity plus a time-optimal-style correction
``sign(e) * min(|e|/dt, k*sqrt(2*a*|e|))`` (it brakes in time, so no overshoot), then clamped, in order:
to ``[-vmax, vmax]``, to ``v_prev +- a*dt`` (acceleration) and to the discrete braking bound that
lets the joint stop before its position limit. Positions are ``q[k+1] = q[k] + v[k+1]*dt``, so the
published positions, velocities and their finite differences all respect the limits. Each active
clamp is counted per joint.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from numpy.typing import NDArray

from effvla_ros.core.executor.limits import JointLimits

FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]

#: fraction of the acceleration limit used by the corrections and the braking bound (margin for the
#: reference's own acceleration and for discretization).
BRAKE_FRACTION = 0.8


@dataclasses.dataclass
class ClampFlags:
    position: BoolArray
    velocity: BoolArray
    acceleration: BoolArray


class Limiter:
    def __init__(self, limits: JointLimits, dt: float) -> None:
        self.limits = limits
        self.dt = float(dt)
        self._ab = BRAKE_FRACTION * limits.acceleration
        self._2ab = 2.0 * self._ab
        self._vmax = limits.velocity
        self._adt = limits.acceleration * self.dt
        # braking bound 0.5 * (-ab*dt + sqrt((ab*dt)^2 + 8*ab*d)) for [upper, lower] distances
        abdt = np.concatenate((self._ab, self._ab)) * self.dt
        self._c1 = -abdt
        self._c2 = abdt**2
        self._c3 = 8.0 * np.concatenate((self._ab, self._ab))

    def braking_bound(self, dist: FloatArray) -> FloatArray:
        """Largest speed toward a limit ``dist`` away that can still stop before it (discrete)."""
        ab, dt = self._ab, self.dt
        d = np.maximum(dist, 0.0)
        return np.asarray(np.maximum(0.0, 0.5 * (-ab * dt + np.sqrt((ab * dt) ** 2 + 8.0 * ab * d))), dtype=np.float64)

    def step(
        self,
        q: FloatArray,
        v: FloatArray,
        r_now: FloatArray | None,
        r_next: FloatArray | None,
    ) -> tuple[FloatArray, FloatArray, ClampFlags]:
        """Next (position, velocity). ``r_now``/``r_next`` None: hold (decelerate to rest)."""
        lim, dt = self.limits, self.dt
        lo_lim, hi_lim = lim.lower, lim.upper
        if r_now is None or r_next is None:
            v_des = np.zeros_like(v)
        else:
            rn = np.minimum(np.maximum(r_now, lo_lim), hi_lim)
            rx = np.minimum(np.maximum(r_next, lo_lim), hi_lim)
            e = rn - q
            ae = np.abs(e)
            v_des = (rx - rn) / dt + np.sign(e) * np.minimum(ae / dt, np.sqrt(self._2ab * ae))
        v1 = np.minimum(np.maximum(v_des, -self._vmax), self._vmax)
        v_lo = v - self._adt
        v_hi = v + self._adt
        v2 = np.minimum(np.maximum(v1, v_lo), v_hi)
        # braking bounds toward both position limits (computed together)
        d = np.maximum(np.concatenate((hi_lim - q, q - lo_lim)), 0.0)
        b = np.maximum(0.0, 0.5 * (self._c1 + np.sqrt(self._c2 + self._c3 * d)))
        n = q.shape[0]
        v3 = np.minimum(np.maximum(v2, -b[n:]), b[:n])
        # the braking bound uses BRAKE_FRACTION * a, so it binds before the acceleration limit would;
        # never decelerate harder than the limit for it: the position clip below is the backstop.
        v3 = np.minimum(np.maximum(v3, v_lo), v_hi)
        q_next = q + v3 * dt
        q_clip = np.minimum(np.maximum(q_next, np.minimum(lo_lim, q)), np.maximum(hi_lim, q))
        pos_hit = q_clip != q_next
        if pos_hit.any():
            v3 = np.where(pos_hit, (q_clip - q) / dt, v3)
            q_next = q_clip
        tol = 1e-12
        flags = ClampFlags(
            position=(np.abs(v3 - v2) > tol) | pos_hit,
            velocity=np.abs(v1 - v_des) > tol,
            acceleration=np.abs(v2 - v1) > tol,
        )
        return q_next, v3, flags
