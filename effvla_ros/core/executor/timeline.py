"""Action timeline keyed by time: chunk merging strategies and C1 (cubic Hermite) interpolation.

A chunk stamped at observation time ``t0`` with step ``dt`` targets action ``i`` at ``t0 + i*dt``.
The reference is a cubic Hermite spline ``S`` through target knots (C1) plus a *boundary correction*.
Everything up to the *commit time* ``t_c`` (the end of what the executor already sent) is frozen: a
merge rebuilds the target knots (per strategy) and the correction: a quintic blend that starts at the
committed command ``(q_c, v_c) - (S(t_c), S'(t_c))`` and fades to zero (with zero velocity and
acceleration) over ``blend_time``, so the reference is C1 with what the controller already has and a
disagreement between chunks is absorbed smoothly instead of in one control step.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One policy chunk, already reordered to the executor's joints: ``actions`` is (H, D)."""

    chunk_id: int
    t0: float
    dt: float
    actions: FloatArray
    rtc_delay_steps: int = 0
    rtc_prefix_chunk_id: int = 0
    arrival: float = math.nan

    @property
    def times(self) -> FloatArray:
        return self.t0 + self.dt * np.arange(self.actions.shape[0], dtype=np.float64)

    @property
    def end(self) -> float:
        return self.t0 + self.dt * (self.actions.shape[0] - 1)

    def value_at(self, t: float) -> FloatArray | None:
        """Linear interpolation of this chunk's actions at ``t`` (None outside its span)."""
        h = self.actions.shape[0]
        x = (t - self.t0) / self.dt
        if x < -1e-9 or x > h - 1 + 1e-9:
            return None
        i = min(max(int(math.floor(x + 1e-9)), 0), h - 1)
        if i >= h - 1:
            return np.asarray(self.actions[h - 1], dtype=np.float64)
        a = x - i
        return np.asarray((1.0 - a) * self.actions[i] + a * self.actions[i + 1], dtype=np.float64)


def hermite_tangents(times: FloatArray, pos: FloatArray, v0: FloatArray | None = None) -> FloatArray:
    """Knot tangents for a C1 cubic Hermite spline that does not overshoot at extrema.

    Interior knots: weighted average of the adjacent secants (exact for linear motion), zero where
    the secants change sign (a local extremum stays an extremum: no overshoot beyond the targets).
    First knot: ``v0`` when given, else the first secant; last knot: zero (the motion comes to rest at
    the last target, so running out of actions is a smooth stop).
    """
    k = times.shape[0]
    m = np.zeros_like(pos)
    if k >= 2:
        h = np.diff(times)[:, None]
        sec = np.diff(pos, axis=0) / h
        m[0] = sec[0]
        if k >= 3:
            left, right = sec[:-1], sec[1:]
            hl, hr = h[:-1], h[1:]
            avg = (left * hr + right * hl) / (hl + hr)
            same = (left * right) > 0
            # keep |m| <= 3 min(|secant|) (Fritsch-Carlson bound): monotone between monotone knots
            bound = 3.0 * np.minimum(np.abs(left), np.abs(right))
            m[1:-1] = np.where(same, np.clip(avg, -bound, bound), 0.0)
    if v0 is not None:
        m[0] = v0
    m[-1] = 0.0
    return m


@dataclasses.dataclass(frozen=True)
class Correction:
    """Quintic fade of a boundary offset: (p0, v0, a=0) at t0 -> (0, 0, 0) at t0 + duration."""

    t0: float
    duration: float
    p0: FloatArray
    v0: FloatArray

    def eval(self, t: float) -> tuple[FloatArray, FloatArray] | None:
        if self.duration <= 0.0 or t >= self.t0 + self.duration or t < self.t0:
            return None
        T = self.duration
        s = (t - self.t0) / T
        s2 = s * s
        s3 = s2 * s
        h0 = 1.0 - 10.0 * s3 + 15.0 * s3 * s - 6.0 * s3 * s2
        h1 = s - 6.0 * s3 + 8.0 * s3 * s - 3.0 * s3 * s2
        d0 = -30.0 * s2 + 60.0 * s3 - 30.0 * s3 * s
        d1 = 1.0 - 18.0 * s2 + 32.0 * s3 - 15.0 * s3 * s
        return h0 * self.p0 + h1 * T * self.v0, (d0 * self.p0 + d1 * T * self.v0) / T


class Reference:
    """A cubic Hermite spline through knots (+ an optional boundary correction); holds after the end."""

    def __init__(
        self, times: FloatArray, pos: FloatArray, tangents: FloatArray, correction: Correction | None = None
    ) -> None:
        if times.ndim != 1 or times.shape[0] < 1 or pos.shape[0] != times.shape[0]:
            raise ValueError("Reference: need >= 1 knot with matching positions")
        if times.shape[0] > 1 and not np.all(np.diff(times) > 0):
            raise ValueError("Reference: knot times must be strictly increasing")
        self.times = times
        self.pos = pos
        self.tangents = tangents
        self.correction = correction

    @classmethod
    def hold(cls, t: float, q: FloatArray) -> Reference:
        return cls(np.array([t]), np.asarray(q, dtype=np.float64)[None, :].copy(), np.zeros((1, q.shape[0])))

    @property
    def end(self) -> float:
        return float(self.times[-1])

    def __call__(self, t: float) -> FloatArray:
        return self.eval(t)[0]

    def eval(self, t: float) -> tuple[FloatArray, FloatArray]:
        """(position, velocity) at time ``t``."""
        p, v = self.spline(t)
        if self.correction is not None:
            c = self.correction.eval(t)
            if c is not None:
                p = p + c[0]
                v = v + c[1]
        return p, v

    def spline(self, t: float) -> tuple[FloatArray, FloatArray]:
        """(position, velocity) of the spline alone (no boundary correction)."""
        times = self.times
        if t >= times[-1]:
            return self.pos[-1].copy(), np.zeros_like(self.pos[-1])
        if t <= times[0]:  # before the first knot: hold it
            return self.pos[0].copy(), (self.tangents[0].copy() if t == times[0] else np.zeros_like(self.pos[0]))
        i = int(np.searchsorted(times, t, side="right")) - 1
        t0, t1 = float(times[i]), float(times[i + 1])
        h = t1 - t0
        s = (t - t0) / h
        p0, p1 = self.pos[i], self.pos[i + 1]
        m0, m1 = self.tangents[i] * h, self.tangents[i + 1] * h
        s2, s3 = s * s, s * s * s
        h00, h10, h01, h11 = 2 * s3 - 3 * s2 + 1, s3 - 2 * s2 + s, -2 * s3 + 3 * s2, s3 - s2
        d00, d10, d01, d11 = 6 * s2 - 6 * s, 3 * s2 - 4 * s + 1, -6 * s2 + 6 * s, 3 * s2 - 2 * s
        p = h00 * p0 + h10 * m0 + h01 * p1 + h11 * m1
        v = (d00 * p0 + d10 * m0 + d01 * p1 + d11 * m1) / h
        return p, v


def smoothstep5(x: FloatArray | float) -> FloatArray:
    """Minimum-jerk blend 10x^3 - 15x^4 + 6x^5 on [0, 1] (zero slope and curvature at both ends)."""
    x = np.clip(np.asarray(x, dtype=np.float64), 0.0, 1.0)
    return np.asarray(x * x * x * (10.0 + x * (-15.0 + 6.0 * x)), dtype=np.float64)


def ensemble_weights(n: int, m: float) -> FloatArray:
    """ACT temporal-ensemble weights for ``n`` predictions, oldest first: exp(-m*i), normalized."""
    w = np.exp(-m * np.arange(n, dtype=np.float64))
    return np.asarray(w / w.sum(), dtype=np.float64)


@dataclasses.dataclass
class MergeResult:
    reference: Reference
    boundary: float  # time after which the new chunk decides the motion
    dropped_actions: int  # actions of the new chunk at or before the boundary (already committed / past)


def _knots_between(ref: Reference, lo: float, hi: float) -> tuple[list[float], list[FloatArray]]:
    """The reference's own knots (times, positions) with ``lo < t <= hi``."""
    keep = [i for i, t in enumerate(ref.times) if lo < t <= hi]
    return [float(ref.times[i]) for i in keep], [np.asarray(ref.pos[i]) for i in keep]


def merge(
    *,
    strategy: str,
    new: Chunk,
    history: Sequence[Chunk],
    old: Reference,
    t_c: float,
    q_c: FloatArray,
    v_c: FloatArray,
    min_gap: float,
    blend_time: float = 0.1,
    crossfade_window: float = 0.1,
    ensemble_m: float = 0.01,
    rtc_boundary: float | None = None,
) -> MergeResult:
    """The reference after the commit time ``t_c`` with ``new`` merged in.

    Target knots per strategy: ``latest``: the new chunk; ``rtc``: the old reference's knots up to
    ``rtc_boundary`` (what the policy was told is committed), then the new chunk; ``crossfade``: the
    new chunk's times with ``(1-a)*old(t) + a*new(t)`` (``old`` = the old knots' spline: its boundary
    correction is not carried into new knots, the merge makes its own), ``a`` a minimum-jerk ramp over
    ``crossfade_window`` from ``t_c``; ``temporal_ensemble``: the new chunk's times with the ACT
    weighted average of every chunk of ``history`` (oldest first) + ``new`` predicting that time.
    Where those targets start later than ``t_c``, the old reference's knots fill the gap. Then a
    boundary correction from the committed command ``(q_c, v_c)`` fading over ``blend_time``.
    Knots closer than ``min_gap`` to the previous one are dropped (a very short Hermite segment would
    need a huge acceleration).
    """
    times = new.times
    boundary = t_c
    if strategy == "rtc" and rtc_boundary is not None:
        boundary = max(t_c, rtc_boundary)
    dropped = int(np.count_nonzero(times <= boundary + 1e-9))
    kt: list[float] = []
    kp: list[FloatArray] = []
    if strategy == "rtc":
        cut = boundary if rtc_boundary is not None else -math.inf
        kt, kp = _knots_between(old, -math.inf, cut + 1e-9)
        for t, p in zip(times, new.actions):
            if t > cut + 1e-9:
                kt.append(float(t))
                kp.append(np.asarray(p, dtype=np.float64))
    elif strategy == "latest":
        for t, p in zip(times, new.actions):
            kt.append(float(t))
            kp.append(np.asarray(p, dtype=np.float64))
    elif strategy == "crossfade":
        # the old plan's own knots up to t_c (not resampled: a burst of merges must not smooth them
        # over and over), then the new chunk's knots, blended with the old plan
        # (the ramp starts at the commit time, or where the new chunk starts if that is later: a
        # chunk observed after t_c fades in from the old plan instead of stepping onto it)
        kt, kp = _knots_between(old, -math.inf, t_c + 1e-9)
        fade_start = max(t_c, float(times[0]))
        for t, p in zip(times, new.actions):
            if t <= t_c + 1e-9:
                continue
            if crossfade_window > 0.0:
                a = float(smoothstep5((t - fade_start) / crossfade_window))
                p = (1.0 - a) * old.spline(float(t))[0] + a * p
            kt.append(float(t))
            kp.append(np.asarray(p, dtype=np.float64))
    elif strategy == "temporal_ensemble":
        chunks = [*history, new]
        for t in times:
            preds = [v for v in (c.value_at(float(t)) for c in chunks) if v is not None]
            w = ensemble_weights(len(preds), ensemble_m)
            kt.append(float(t))
            kp.append(np.asarray(np.tensordot(w, np.stack(preds), axes=1), dtype=np.float64))
    else:
        raise ValueError(f"merge_strategy: unknown strategy {strategy!r}")

    after = next((i for i, t in enumerate(kt) if t > t_c + 1e-9), len(kt))
    if after < len(kt) and kt[after] > t_c + min_gap:
        # the new targets start after the commit time (a chunk observed after t_c, e.g. a burst of
        # chunks merged once the executor resumed from a stall): the old reference keeps going until
        # they start, instead of a spline bridge from the old knots at or before t_c (rtc, crossfade)
        # or from the committed command (latest, temporal_ensemble) straight to the first new target
        gt, gp = _knots_between(old, t_c + 1e-9, float(np.nextafter(kt[after] - min_gap, -math.inf)))
        kt, kp = [*kt[:after], *gt, *kt[after:]], [*kp[:after], *gp, *kp[after:]]
    return MergeResult(rebuild(kt, kp, t_c=t_c, q_c=q_c, v_c=v_c, min_gap=min_gap, blend_time=blend_time),
                       boundary, dropped)


def rebuild(kt: Sequence[float], kp: Sequence[FloatArray], *, t_c: float, q_c: FloatArray, v_c: FloatArray,
            min_gap: float, blend_time: float) -> Reference:
    """The reference through target knots ``(kt, kp)`` (ascending times) that continues the committed command
    ``(q_c, v_c)`` at the commit time ``t_c``: knots closer than ``min_gap`` dropped, one knot at or before ``t_c``
    kept, and the boundary correction fading over ``blend_time`` (what :func:`merge` ends with; the chunk executor's
    per-step corrections rebuild with it too)."""
    ft: list[float] = []
    fp: list[FloatArray] = []
    for t, p in zip(kt, kp):
        if not ft or t - ft[-1] >= min_gap:
            ft.append(float(t))
            fp.append(np.asarray(p, dtype=np.float64))
    # keep one knot at or before t_c (the spline's shape at the boundary), drop older ones; the
    # tangents are computed before dropping them (centred at that knot, not a one-sided secant)
    first = max(0, int(np.searchsorted(np.array(ft), t_c, side="right")) - 1)
    all_tangents = hermite_tangents(np.array(ft, dtype=np.float64), np.stack(fp)) if first > 0 else None
    ft, fp = ft[first:], fp[first:]
    q_c = np.asarray(q_c, dtype=np.float64)
    v_c = np.asarray(v_c, dtype=np.float64)
    if ft[0] > t_c + 1e-9:
        # every target lies after t_c (early chunk, first chunk): start a segment at the committed
        # command itself, with its velocity; no correction needed
        while ft and ft[0] - t_c < min_gap:
            ft, fp = ft[1:], fp[1:]
        tarr = np.array([t_c, *ft], dtype=np.float64)
        parr = np.stack([q_c, *fp])
        return Reference(tarr, parr, hermite_tangents(tarr, parr, v_c))
    tarr = np.array(ft, dtype=np.float64)
    parr = np.stack(fp)
    tangents = all_tangents[first:] if all_tangents is not None else hermite_tangents(tarr, parr)
    spline = Reference(tarr, parr, tangents)
    s_p, s_v = spline.spline(t_c)
    if blend_time > 0.0:
        corr = Correction(t_c, blend_time, q_c - s_p, v_c - s_v)
        return Reference(tarr, parr, spline.tangents, corr)
    return spline  # no blending: start exactly at the committed command (the limiter absorbs the rest)
