"""The chunk executor core: validation, merging, limiting, watchdog, output points and feedback.

Time is a float in seconds on the clock of the chunk stamps (the node's ROS clock). The core keeps a
*command buffer* on a fixed grid ``origin + k * control_period``: sample ``k`` is the limited command
(position, velocity) for that time. Samples are computed once, in order, only when they are about to
be published, and never change afterwards; the time of the last computed sample is the commit time
``committed_until``: a new chunk can only change the motion after it. Thread-safety is the caller's
job (the node guards the core with a lock).

Gaps. A trajectory controller (ros2_control's JTC) holds the last point of a trajectory that has run out.
When the output stalls longer than what was published covers (a delayed control thread, a stopped process,
a flood of callbacks), the arm stands at that point, at rest, by the time the next command arrives. The
command stream is then re-anchored there: the next points start from the held point with zero velocity and
reach the plan again within the velocity and acceleration limits, instead of continuing where the command
would be by now (which would ask the arm to cover the stalled interval at once). Counted in
``stats.counts["reanchored"]`` with the longest uncovered interval in ``stats.max_gap_s``.
"""
from __future__ import annotations

import collections
import dataclasses
import enum
import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from effvla_ros.core.executor.config import ExecutorConfig
from effvla_ros.core.executor.limiter import Limiter
from effvla_ros.core.executor.limits import JointLimits
from effvla_ros.core.executor.timeline import Chunk, Reference, merge, rebuild

FloatArray = NDArray[np.float64]

MAX_ACTIONS = 100_000
_EPS = 1e-9


class ExecState(enum.IntEnum):
    """Same values as ``effvla_ros/ExecutionFeedback.STATE_*``."""

    WAITING_FOR_JOINT_STATE = 0
    IDLE = 1
    EXECUTING = 2
    HOLDING = 3


class Verdict(str, enum.Enum):
    ACCEPTED = "accepted"
    WAITING = "waiting"  # no JointState yet
    INVALID = "invalid"  # inconsistent sizes, bad step_period, chunk_id 0
    JOINT_MISMATCH = "joint_mismatch"  # wrong action_dim / joint names
    NONFINITE = "nonfinite"  # NaN or Inf in the actions
    DUPLICATE = "duplicate"  # same chunk_id and stamp as an accepted chunk
    OUT_OF_ORDER = "out_of_order"  # older stamp than the current chunk
    EARLY = "early"  # stamp more than max_future in the future
    LATE = "late"  # no action after the commit time: the whole content is in the past


@dataclasses.dataclass(frozen=True)
class ChunkResult:
    verdict: Verdict
    reason: str = ""
    dropped_actions: int = 0

    @property
    def accepted(self) -> bool:
        return self.verdict is Verdict.ACCEPTED


@dataclasses.dataclass(frozen=True)
class CorrectionResult:
    """What became of one per-step correction message (:meth:`ChunkExecutorCore.on_correction`)."""

    applied: int = 0  # rows whose target now carries this message's residual
    late: int = 0  # rows already committed when it arrived (too late to change)
    reason: str = ""  # non-empty: the whole message was dropped, and why
    stale: bool = False  # dropped because another chunk runs now (normal while a new chunk takes over)

    @property
    def dropped(self) -> bool:
        return bool(self.reason)


@dataclasses.dataclass
class Command:
    """Points to publish: absolute time of the first point (= header.stamp), offsets, (N, D) arrays."""

    stamp: float
    time_from_start: FloatArray
    positions: FloatArray
    velocities: FloatArray


@dataclasses.dataclass
class Feedback:
    """Contents of ``effvla_ros/ExecutionFeedback`` (times in seconds, 0.0 = none)."""

    stamp: float
    state: ExecState
    chunk_id: int = 0
    chunk_stamp: float = 0.0
    step_period: float = 0.0
    next_action_index: int = 0
    committed_index: int = 0
    committed_until: float = 0.0
    remaining_actions: int = 0


@dataclasses.dataclass
class ExecutorStats:
    """Counters for diagnostics (monotonic since start)."""

    joint_names: tuple[str, ...]
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    clamp_position: NDArray[np.int64] = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    clamp_velocity: NDArray[np.int64] = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    clamp_acceleration: NDArray[np.int64] = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    samples: int = 0
    watchdog_trips: int = 0
    max_gap_s: float = 0.0  # longest interval no published command covered (the controller held)
    last_gap_s: float = 0.0
    # per-step corrections: for each corrected row once committed, how old its residual's observation was, in the
    # chunk's steps (what eval-sim's exec.correction_lag emulates)
    correction_age_steps: collections.deque[float] = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=1000))

    def __post_init__(self) -> None:
        d = len(self.joint_names)
        for key in ("received", "accepted", "rejected", "actions_dropped", "joint_state_rejected", "reanchored",
                    "corrections_received", "corrections_dropped", "corrected_rows", "corrected_rows_late"):
            self.counts.setdefault(key, 0)
        for v in Verdict:
            if v is not Verdict.ACCEPTED:
                self.counts.setdefault(v.value, 0)
        if self.clamp_position.shape[0] != d:
            self.clamp_position = np.zeros(d, dtype=np.int64)
            self.clamp_velocity = np.zeros(d, dtype=np.int64)
            self.clamp_acceleration = np.zeros(d, dtype=np.int64)

    def clamps_total(self) -> NDArray[np.int64]:
        return np.asarray(self.clamp_position + self.clamp_velocity + self.clamp_acceleration, dtype=np.int64)


class PeriodJitter:
    """Publication period error statistics over the last ``window`` periods (seconds in, ms out)."""

    def __init__(self, nominal: float, window: int = 2000) -> None:
        self.nominal = float(nominal)
        self._last: float | None = None
        self._err: collections.deque[float] = collections.deque(maxlen=window)

    def tick(self, t: float) -> None:
        if self._last is not None:
            self._err.append(abs((t - self._last) - self.nominal))
        self._last = t

    def summary(self) -> dict[str, float]:
        if not self._err:
            return {"n": 0, "p50_ms": math.nan, "p99_ms": math.nan, "max_ms": math.nan}
        e = np.fromiter(self._err, dtype=np.float64) * 1e3
        return {
            "n": float(e.shape[0]),
            "p50_ms": float(np.percentile(e, 50)),
            "p99_ms": float(np.percentile(e, 99)),
            "max_ms": float(e.max()),
        }


class ChunkExecutorCore:
    """Turns policy chunks into a limited, continuous command stream. See the module docstring."""

    def __init__(self, cfg: ExecutorConfig, limits: JointLimits | None = None) -> None:
        self.cfg = cfg
        self.limits = limits if limits is not None else JointLimits.from_config(cfg)
        if tuple(self.limits.names) != tuple(cfg.joint_names):
            raise ValueError("joint_names: limits are for different joints")
        self.names = tuple(cfg.joint_names)
        self.dof = len(self.names)
        self._index = {n: i for i, n in enumerate(self.names)}
        self.dt = cfg.control_period
        self.limiter = Limiter(self.limits, self.dt)
        self.stats = ExecutorStats(self.names)
        self.state = ExecState.WAITING_FOR_JOINT_STATE
        self.measured: FloatArray | None = None
        self.measured_stamp = math.nan
        # command buffer
        self._origin = 0.0
        self._k_last = -1
        self._q = np.zeros(self.dof)
        self._v = np.zeros(self.dof)
        self._samples: dict[int, tuple[FloatArray, FloatArray]] = {}
        self._k_pub_last = -1
        self._k_pub_first = -1
        self._k_pub_end = -1  # last sample of the last published command: what the controller holds after it
        # timeline
        self._ref: Reference | None = None
        self._r_cache: tuple[int, Reference, FloatArray] | None = None
        self._history: list[Chunk] = []
        self.current: Chunk | None = None
        self._hold = False
        self._last_accept = -math.inf
        self._seen: collections.OrderedDict[int, float] = collections.OrderedDict()
        self._advertised: collections.OrderedDict[int, float] = collections.OrderedDict()
        # per-step corrections of the current chunk: knot time -> (its target before any correction, the stamp of
        # the observation of the residual it carries now)
        self._corrected: dict[float, tuple[FloatArray, float]] = {}

    def reset(self) -> None:
        """Forget every chunk and the command stream (new episode, robot re-homed, clock reset):
        wait for a fresh JointState and start again from the measured position. Counters persist."""
        stats = self.stats
        self.__init__(self.cfg, self.limits)  # type: ignore[misc]
        self.stats = stats

    # -- configuration ---------------------------------------------------------------------------
    def set_config(self, cfg: ExecutorConfig) -> None:
        """Apply a new config. Only live fields take effect; read-only ones need a restart."""
        self.cfg = dataclasses.replace(
            self.cfg,
            merge_strategy=cfg.merge_strategy,
            blend_time=cfg.blend_time,
            crossfade_window=cfg.crossfade_window,
            ensemble_m=cfg.ensemble_m,
            max_future=cfg.max_future,
            watchdog_timeout=cfg.watchdog_timeout,
        )

    # -- time grid -----------------------------------------------------------------------------
    def _t(self, k: int) -> float:
        return self._origin + k * self.dt

    @property
    def committed_until(self) -> float:
        return self._t(self._k_last) if self._k_last >= 0 else 0.0

    @property
    def commanding(self) -> bool:
        return self.state in (ExecState.EXECUTING, ExecState.HOLDING)

    @property
    def hold_reached(self) -> bool:
        return self.state is ExecState.HOLDING and bool(np.all(self._v == 0.0))

    @property
    def reference(self) -> Reference | None:
        """The current C1 reference (None before the first chunk)."""
        return self._ref

    @property
    def last_command(self) -> tuple[FloatArray, FloatArray]:
        return self._q.copy(), self._v.copy()

    # -- inputs --------------------------------------------------------------------------------
    def on_joint_state(self, names: Sequence[str], positions: Sequence[float], stamp: float) -> bool:
        """Record a measured joint state; the first complete one leaves WAITING_FOR_JOINT_STATE."""
        q = np.full(self.dof, np.nan)
        pos = list(positions)
        if len(pos) != len(names):
            self.stats.counts["joint_state_rejected"] += 1
            return False
        for n, p in zip(names, pos):
            i = self._index.get(n)
            if i is not None:
                q[i] = p
        if not np.all(np.isfinite(q)):
            self.stats.counts["joint_state_rejected"] += 1
            return False
        self.measured = q
        self.measured_stamp = stamp
        if self.state is ExecState.WAITING_FOR_JOINT_STATE:
            self.state = ExecState.IDLE
        return True

    def _reject(self, verdict: Verdict, reason: str) -> ChunkResult:
        self.stats.counts["rejected"] += 1
        self.stats.counts[verdict.value] += 1
        return ChunkResult(verdict, reason)

    def build_chunk(
        self,
        *,
        chunk_id: int,
        t0: float,
        dt: float,
        joint_names: Sequence[str],
        num_actions: int,
        action_dim: int,
        actions: Sequence[float] | FloatArray,
        rtc_delay_steps: int = 0,
        rtc_prefix_chunk_id: int = 0,
        arrival: float = math.nan,
    ) -> Chunk | ChunkResult:
        """Validate a raw chunk and reorder it to the executor's joints (or say why not)."""
        flat = np.asarray(actions, dtype=np.float64).reshape(-1)
        if chunk_id <= 0:
            return self._reject(Verdict.INVALID, "chunk_id 0 is reserved for 'none'")
        if not (math.isfinite(dt) and dt > 0.0):
            return self._reject(Verdict.INVALID, f"step_period must be > 0, got {dt}")
        if not math.isfinite(t0):
            return self._reject(Verdict.INVALID, "non-finite stamp")
        if num_actions < 1 or num_actions > MAX_ACTIONS or flat.shape[0] != num_actions * action_dim:
            return self._reject(
                Verdict.INVALID,
                f"len(actions)={flat.shape[0]} != num_actions*action_dim={num_actions}*{action_dim}",
            )
        names = list(joint_names)
        if names:
            if len(names) != action_dim:
                return self._reject(
                    Verdict.JOINT_MISMATCH, f"action_dim={action_dim} but {len(names)} joint_names"
                )
            if sorted(names) != sorted(self.names):
                return self._reject(
                    Verdict.JOINT_MISMATCH, f"joint_names {names} do not match the executor's {list(self.names)}"
                )
            order = [names.index(n) for n in self.names]
        else:
            if action_dim != self.dof:
                return self._reject(Verdict.JOINT_MISMATCH, f"action_dim={action_dim}, expected {self.dof}")
            order = list(range(self.dof))
        if not np.all(np.isfinite(flat)):
            return self._reject(Verdict.NONFINITE, f"{int(np.count_nonzero(~np.isfinite(flat)))} NaN/Inf values")
        acts = flat.reshape(num_actions, action_dim)[:, order].copy()
        return Chunk(int(chunk_id), float(t0), float(dt), acts, int(rtc_delay_steps), int(rtc_prefix_chunk_id), arrival)

    def on_chunk(self, now: float, **raw: object) -> ChunkResult:
        """Validate (see :meth:`build_chunk` for the fields) and merge a chunk received at ``now``."""
        self.stats.counts["received"] += 1
        built = self.build_chunk(arrival=now, **raw)  # type: ignore[arg-type]
        if isinstance(built, ChunkResult):
            return built
        return self.merge_chunk(built, now)

    def merge_chunk(self, c: Chunk, now: float) -> ChunkResult:
        """Merge an already validated chunk (counts as received only through :meth:`on_chunk`)."""
        if self.state is ExecState.WAITING_FOR_JOINT_STATE or self.measured is None:
            return self._reject(Verdict.WAITING, "no JointState received yet")
        seen_t0 = self._seen.get(c.chunk_id)
        cur = self.current
        if seen_t0 is not None and abs(seen_t0 - c.t0) < _EPS:
            return self._reject(Verdict.DUPLICATE, f"chunk {c.chunk_id} already received")
        starting = not self.commanding
        t_c = (now + self.cfg.stamp_lead) if starting else self.committed_until
        if c.end <= max(t_c, now) + _EPS:
            return self._reject(
                Verdict.LATE,
                f"all {c.actions.shape[0]} actions are in the past / committed "
                f"(last action {c.end - now:+.3f} s from now)",
            )
        if cur is not None and c.t0 < cur.t0 - _EPS:
            return self._reject(
                Verdict.OUT_OF_ORDER,
                f"chunk {c.chunk_id} stamped {c.t0 - cur.t0:.3f} s before the current chunk {cur.chunk_id}",
            )
        if c.t0 > now + self.cfg.max_future:
            return self._reject(Verdict.EARLY, f"stamp {c.t0 - now:.3f} s in the future (max_future)")
        if starting:  # first chunk: the command starts at the measured position, at rest
            self._origin = t_c
            self._k_last = 0
            self._q = self.measured.copy()
            self._v = np.zeros(self.dof)
            self._samples = {0: (self._q.copy(), self._v.copy())}
            self._k_pub_last = -1
            self._k_pub_end = -1
            self._ref = Reference.hold(t_c, self._q)
        assert self._ref is not None
        rtc_boundary = None
        if c.rtc_prefix_chunk_id and any(h.chunk_id == c.rtc_prefix_chunk_id for h in self._history):
            rtc_boundary = max(c.t0 + c.rtc_delay_steps * c.dt, self._advertised.get(c.rtc_prefix_chunk_id, -math.inf))
        # the new plan continues the committed command; where the command is exactly on the old
        # plan (no limit active) its velocity is the old plan's, not the limiter's secant (which lags
        # by a*dt/2 and, fed into every merge of a burst of chunks, would add up to a drift)
        v_c = self._commit_velocity()
        self._settle_corrections()
        self._corrected = {}
        res = merge(
            strategy=self.cfg.merge_strategy,
            new=c,
            history=self._history,
            old=self._ref,
            t_c=self.committed_until,
            q_c=self._q,
            v_c=v_c,
            min_gap=max(0.25 * c.dt, 0.5 * self.dt),
            blend_time=self.cfg.blend_time,
            crossfade_window=self.cfg.crossfade_window,
            ensemble_m=self.cfg.ensemble_m,
            rtc_boundary=rtc_boundary,
        )
        self._ref = res.reference
        self.current = c
        self._history = [h for h in self._history if h.end > self.committed_until][-31:] + [c]
        self._seen[c.chunk_id] = c.t0
        while len(self._seen) > 256:
            self._seen.popitem(last=False)
        self._last_accept = now
        self._hold = False
        self.state = ExecState.EXECUTING
        self.stats.counts["accepted"] += 1
        self.stats.counts["actions_dropped"] += res.dropped_actions
        return ChunkResult(Verdict.ACCEPTED, "", res.dropped_actions)

    def _commit_velocity(self) -> FloatArray:
        """The velocity a new plan continues at the commit time: the old plan's where the command is exactly on it
        (no limit active), not the limiter's secant (which lags by a*dt/2 and, fed into every merge of a burst of
        chunks, would add up to a drift); else the command's."""
        if not self._hold and self._ref is not None:
            r_p, r_v = self._ref.eval(self.committed_until)
            if np.all(np.abs(r_p - self._q) <= 1e-9):
                return r_v
        return self._v

    def on_correction(self, now: float, *, chunk_id: int, first_index: int, joint_names: Sequence[str],
                      action_dim: int, residuals: Sequence[float] | FloatArray, stamp: float) -> CorrectionResult:
        """Per-step corrections (A2C2; ``effvla_ros/ActionCorrection``): row ``first_index + r`` of the executing chunk
        ``chunk_id`` is executed as its target plus ``residuals[r]``, for every row not yet committed (a later
        message for a row replaces an earlier one's residual); the reference is rebuilt from the committed command
        as a merge does, and the limiter still bounds every sample. Dropped whole (with the reason) when it is for
        another chunk, while holding, or malformed."""
        st = self.stats.counts
        st["corrections_received"] += 1

        def drop(reason: str, stale: bool = False) -> CorrectionResult:
            st["corrections_dropped"] += 1
            return CorrectionResult(reason=reason, stale=stale)

        c = self.current
        if c is None or int(chunk_id) != c.chunk_id:
            return drop(f"chunk {chunk_id} is not the executing chunk ({c.chunk_id if c else 'none'})", stale=True)
        if self._hold or self.state is not ExecState.EXECUTING or self._ref is None:
            return drop("not executing a chunk (holding or idle)")
        flat = np.asarray(residuals, dtype=np.float64).reshape(-1)
        if action_dim != self.dof or flat.shape[0] % max(action_dim, 1):
            return drop(f"{flat.shape[0]} residual values for action_dim {action_dim} (the executor has {self.dof})")
        names = list(joint_names)
        if names and sorted(names) != sorted(self.names):
            return drop(f"joint_names {names} do not match the executor's {list(self.names)}")
        if not np.all(np.isfinite(flat)) or not math.isfinite(stamp):
            return drop("non-finite residuals or stamp")
        res = flat.reshape(-1, action_dim)
        if names:
            res = res[:, [names.index(n) for n in self.names]]
        times = list(self._ref.times)
        pos = np.array(self._ref.pos, dtype=np.float64)
        t_c = self.committed_until
        applied = late = 0
        for r, row in enumerate(res):
            i = int(first_index) + r
            if i >= c.actions.shape[0]:
                break
            t = c.t0 + i * c.dt
            if t <= t_c + _EPS:
                late += 1
                continue
            j = next((j for j, tj in enumerate(times) if abs(tj - t) < 1e-6), None)
            if j is None:  # no target at that time (dropped as too close to the commit time)
                late += 1
                continue
            base = self._corrected.get(times[j], (pos[j].copy(), stamp))[0]
            pos[j] = base + row
            self._corrected[times[j]] = (base, stamp)
            applied += 1
        st["corrected_rows"] += applied
        st["corrected_rows_late"] += late
        if applied:
            self._ref = rebuild(times, list(pos), t_c=t_c, q_c=self._q, v_c=self._commit_velocity(),
                                min_gap=max(0.25 * c.dt, 0.5 * self.dt), blend_time=max(self.cfg.blend_time, c.dt))
        return CorrectionResult(applied, late)

    def _settle_corrections(self) -> None:
        """Record how old the residual of each corrected row that is now committed was."""
        c, t_c = self.current, self.committed_until
        if c is None:
            return
        for t in [t for t in self._corrected if t <= t_c + _EPS]:
            self.stats.correction_age_steps.append((t - self._corrected.pop(t)[1]) / c.dt)

    # -- output --------------------------------------------------------------------------------
    def _extend(self, k_target: int) -> None:
        st = self.stats
        while self._k_last < k_target:
            k = self._k_last + 1
            if self._hold or self._ref is None:
                q, v, fl = self.limiter.step(self._q, self._v, None, None)
            else:
                cached = self._r_cache
                if cached is not None and cached[0] == k - 1 and cached[1] is self._ref:
                    r_now = cached[2]
                else:
                    r_now = self._ref(self._t(k - 1))
                r_next = self._ref(self._t(k))
                self._r_cache = (k, self._ref, r_next)
                q, v, fl = self.limiter.step(self._q, self._v, r_now, r_next)
            if self._hold:
                v = np.where(np.abs(v) < 1e-9, 0.0, v)
            st.clamp_position += fl.position
            st.clamp_velocity += fl.velocity
            st.clamp_acceleration += fl.acceleration
            st.samples += 1
            self._q, self._v, self._k_last = q, v, k
            self._samples[k] = (q, v)

    def _reanchor(self, k0: int) -> None:
        """Nothing published covered the samples after ``_k_pub_end`` up to ``k0``: the controller has held the
        last published point (the last computed sample) at rest since. Continue from there: that point becomes
        sample ``k0 - 1`` with zero velocity, and the limiter takes the stream back to the plan within limits."""
        gap = (k0 - self._k_pub_end - 1) * self.dt
        q = self._samples[self._k_pub_end][0] if self._k_pub_end in self._samples else self._q
        self._q, self._v = q.copy(), np.zeros(self.dof)
        self._k_last = k0 - 1
        self._samples = {self._k_last: (self._q.copy(), self._v.copy())}
        self._r_cache = None
        st = self.stats
        st.counts["reanchored"] += 1
        st.last_gap_s = gap
        st.max_gap_s = max(st.max_gap_s, gap)

    def check_watchdog(self, now: float) -> bool:
        """Enter HOLDING when no chunk was accepted within ``watchdog_timeout``; True if it just tripped."""
        if self.state is ExecState.EXECUTING and now - self._last_accept > self.cfg.watchdog_timeout:
            self.state = ExecState.HOLDING
            self._hold = True
            self.stats.watchdog_trips += 1
            return True
        return False

    def tick(self, now: float) -> Command | None:
        """Advance to ``now`` and return the points to publish (None while not commanding)."""
        self.check_watchdog(now)
        if not self.commanding:
            return None
        cfg = self.cfg
        if self._k_pub_last < 0 and self._k_last == 0:
            # first point = the measured position at rest; keep its time in the future even if this
            # tick comes late (the reference then simply starts a little later)
            self._origin = max(self._origin, now + cfg.stamp_lead)
        k0 = int(math.ceil((now + cfg.stamp_lead - self._origin) / self.dt - 1e-6))
        k0 = max(k0, self._k_pub_last + 1, 0)
        if self._k_pub_end >= 0 and k0 > self._k_pub_end + 1:
            self._reanchor(k0)
        if cfg.output_mode == "stream":
            ks = [k0]
        else:
            span = max(1, int(round(cfg.rolling_horizon / self.dt)))
            ks = sorted({k0 + int(round(j * span / (cfg.rolling_points - 1))) for j in range(cfg.rolling_points)})
        self._extend(ks[-1])
        self._settle_corrections()
        for k in [k for k in self._samples if k < k0]:
            del self._samples[k]
        self._k_pub_last = k0
        self._k_pub_first = k0
        self._k_pub_end = ks[-1]
        pos = np.stack([self._samples[k][0] for k in ks])
        vel = np.stack([self._samples[k][1] for k in ks])
        tfs = np.array([(k - k0) * self.dt for k in ks], dtype=np.float64)
        return Command(self._t(k0), tfs, pos, vel)

    def feedback(self, now: float) -> Feedback:
        """What is committed, from when (and remember what the policy was told, for rtc)."""
        fb = Feedback(stamp=now, state=self.state)
        c = self.current
        if c is None:
            return fb
        h = c.actions.shape[0]
        t_c = self.committed_until
        first_sent = self._t(self._k_pub_first) if self._k_pub_first >= 0 else c.t0 - c.dt

        def count_upto(t: float) -> int:
            return int(min(max(math.floor((t - c.t0) / c.dt + 1e-6) + 1, 0), h))

        fb.chunk_id = c.chunk_id
        fb.chunk_stamp = c.t0
        fb.step_period = c.dt
        fb.committed_index = count_upto(t_c)
        fb.next_action_index = min(count_upto(first_sent), fb.committed_index)
        fb.committed_until = c.t0 + fb.committed_index * c.dt
        fb.remaining_actions = h - fb.committed_index
        self._advertised[c.chunk_id] = max(self._advertised.get(c.chunk_id, -math.inf), t_c)
        while len(self._advertised) > 64:
            self._advertised.popitem(last=False)
        return fb
