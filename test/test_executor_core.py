"""Unit tests of the ROS-free chunk executor core (effvla_ros.core.executor)."""
from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from effvla_ros.core.executor import (
    Chunk,
    ChunkExecutorCore,
    ExecState,
    ExecutorConfig,
    JointLimits,
    Limiter,
    PeriodJitter,
    Reference,
    Verdict,
    ensemble_weights,
    hermite_tangents,
    merge,
    parse_urdf_limits,
    smoothstep5,
)

J3 = ["a", "b", "c"]


def cfg(**kw: object) -> ExecutorConfig:
    base: dict[str, object] = dict(
        joint_names=list(J3), position_lower=[-2.0], position_upper=[2.0], velocity_limits=[1.5],
        acceleration_limits=[8.0], control_rate=100.0, stamp_lead=0.01, watchdog_timeout=0.3,
    )
    base.update(kw)
    return ExecutorConfig(**base)  # type: ignore[arg-type]


def raw(cid: int, t0: float, acts: np.ndarray, dt: float = 0.05, names: list[str] | None = None, **kw: object) -> dict:
    return dict(chunk_id=cid, t0=t0, dt=dt, joint_names=list(J3 if names is None else names),
                num_actions=acts.shape[0], action_dim=acts.shape[1], actions=acts.ravel(), **kw)


def sine(ts: np.ndarray, amp: float = 0.3, w: float = 2.0) -> np.ndarray:
    return np.stack([amp * np.sin(w * ts + j) for j in range(3)], axis=1)


def started(c: ExecutorConfig | None = None, q0: float = 0.0) -> ChunkExecutorCore:
    core = ChunkExecutorCore(c or cfg())
    assert core.on_joint_state(J3, [q0] * 3, 0.0)
    return core


def run(core: ChunkExecutorCore, t_from: float, t_to: float, period: float = 0.01,
        policy: object = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tick the core; optionally call policy(core, now) each tick. Returns (t, q, v) of all points."""
    ts, qs, vs = [], [], []
    n = int(round((t_to - t_from) / period))
    for i in range(1, n + 1):
        now = t_from + i * period
        if policy is not None:
            policy(core, now)  # type: ignore[operator]
        cmd = core.tick(now)
        if cmd is None:
            continue
        for k in range(cmd.positions.shape[0]):
            ts.append(cmd.stamp + cmd.time_from_start[k])
            qs.append(cmd.positions[k])
            vs.append(cmd.velocities[k])
    return np.array(ts), np.array(qs), np.array(vs)


def assert_within_limits(core: ChunkExecutorCore, t: np.ndarray, q: np.ndarray, v: np.ndarray) -> None:
    lim = core.limits
    tol = 1e-9
    assert np.all(np.isfinite(q)) and np.all(np.isfinite(v))
    assert np.all(q >= lim.lower - tol) and np.all(q <= lim.upper + tol)
    assert np.all(np.abs(v) <= lim.velocity + tol)
    u, idx = np.unique(np.round(t, 9), return_index=True)
    t, q, v = t[idx], q[idx], v[idx]
    dt = np.diff(t)[:, None]
    assert np.all(np.abs(np.diff(q, axis=0)) <= lim.velocity * dt * (1 + 1e-7) + tol)
    assert np.all(np.abs(np.diff(v, axis=0)) <= lim.acceleration * dt * (1 + 1e-7) + tol)


def assert_safe_across_gaps(core: ChunkExecutorCore, t: np.ndarray, q: np.ndarray, v: np.ndarray) -> None:
    """What the controller is asked for, point by point: within the limits along the published stream, and
    after an interval that no published point covered (the controller held the last point, at rest: its own
    stop, not a commanded one), the next point reachable from that held point at rest within one control
    period."""
    lim, dt = core.limits, core.dt
    u, idx = np.unique(np.round(t, 9), return_index=True)
    t, q, v = t[idx], q[idx], v[idx]
    spacing = np.diff(t)
    gaps = np.nonzero(spacing > 1.5 * np.median(spacing))[0]
    bounds = [0, *(gaps + 1).tolist(), len(t)]
    for a, b in zip(bounds[:-1], bounds[1:]):
        assert_within_limits(core, t[a:b], q[a:b], v[a:b])
    for i in gaps:
        assert np.all(np.abs(q[i + 1] - q[i]) <= lim.acceleration * dt ** 2 * (1 + 1e-7) + 1e-12), (t[i], t[i + 1])
        assert np.all(np.abs(v[i + 1]) <= lim.acceleration * dt * (1 + 1e-7) + 1e-12)


# -- config -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(merge_strategy="nope"), "merge_strategy"),
        (dict(velocity_limits=[1.0, 2.0]), "velocity_limits"),
        (dict(position_lower=[1.0], position_upper=[0.5]), "position_upper"),
        (dict(acceleration_limits=[-1.0]), "acceleration_limits"),
        (dict(joint_names=[]), "joint_names"),
        (dict(joint_names=["a", "a"]), "joint_names"),
        (dict(output_mode="rolling", rolling_rate=10.0, rolling_horizon=0.05), "rolling_horizon"),
        (dict(watchdog_timeout=0.0), "watchdog_timeout"),
        (dict(crossfade_window=math.nan), "crossfade_window"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(kw: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        cfg(**kw)


def test_config_defaults_and_broadcast() -> None:
    c = ExecutorConfig()
    assert c.merge_strategy == "rtc" and c.ensemble_m == 0.01 and c.output_mode == "stream"
    lim = JointLimits.from_config(c)
    assert lim.velocity.shape == (6,) and np.all(lim.velocity == 2.0)
    meta = ExecutorConfig.field_meta()
    assert meta["joint_names"]["read_only"] and meta["control_rate"]["read_only"]
    assert not meta["merge_strategy"]["read_only"] and not meta["watchdog_timeout"]["read_only"]


def test_urdf_limits(tmp_path: Path) -> None:
    p = tmp_path / "r.urdf"
    p.write_text(
        """<robot name="r">
  <joint name="a" type="revolute"><limit lower="-1" upper="1.5" velocity="0.7" effort="1"/></joint>
  <joint name="b" type="continuous"><limit velocity="3" effort="1"/></joint>
  <joint name="other" type="revolute"><limit lower="-9" upper="9" velocity="9"/></joint>
</robot>"""
    )
    parsed = parse_urdf_limits(p, J3)
    assert set(parsed) == {"a", "b"}
    assert parsed["a"].lower == -1 and parsed["a"].upper == 1.5 and parsed["a"].velocity == 0.7
    assert parsed["b"].lower is None and parsed["b"].velocity == 3
    lim = JointLimits.from_config(cfg(urdf_path=str(p)))
    np.testing.assert_array_equal(lim.lower, [-1, -2, -2])
    np.testing.assert_array_equal(lim.upper, [1.5, 2, 2])
    np.testing.assert_array_equal(lim.velocity, [0.7, 3, 1.5])
    np.testing.assert_array_equal(lim.acceleration, [8, 8, 8])  # acceleration: parameters only
    with pytest.raises(ValueError, match="urdf_path"):
        parse_urdf_limits(tmp_path / "missing.urdf", J3)


# -- interpolation ------------------------------------------------------------------------------
def test_hermite_reference_passes_knots_is_c1_and_holds() -> None:
    rng = np.random.default_rng(1)
    t = np.cumsum(rng.uniform(0.02, 0.1, 12))
    p = rng.normal(size=(12, 3))
    ref = Reference(t, p, hermite_tangents(t, p, np.zeros(3)))
    for ti, pi in zip(t, p):
        np.testing.assert_allclose(ref(float(ti)), pi, atol=1e-12)
    for ti in t[1:-1]:  # velocity continuous across knots
        _, vl = ref.eval(float(ti) - 1e-9)
        _, vr = ref.eval(float(ti) + 1e-9)
        np.testing.assert_allclose(vl, vr, atol=1e-4)
    q_end, v_end = ref.eval(float(t[-1]) + 1.0)
    np.testing.assert_allclose(q_end, p[-1])
    assert np.all(v_end == 0)


def test_hermite_no_overshoot_on_monotone_and_extrema() -> None:
    t = np.arange(6, dtype=float)
    p = np.array([[0.0], [0.0], [1.0], [1.0], [0.5], [0.5]])
    ref = Reference(t, p, hermite_tangents(t, p, np.zeros(1)))
    vals = np.array([ref(x)[0] for x in np.linspace(0, 5, 501)])
    assert vals.min() >= -1e-12 and vals.max() <= 1 + 1e-12


def test_linear_motion_is_exact() -> None:
    t = np.arange(5, dtype=np.float64) * 0.1
    p = np.stack([2 * t, -t], axis=1).astype(np.float64)
    ref = Reference(t, p, hermite_tangents(t, p, np.array([2.0, -1.0])))
    for x in np.linspace(0, 0.3, 31):
        q, v = ref.eval(float(x))
        np.testing.assert_allclose(q, [2 * x, -x], atol=1e-12)
        np.testing.assert_allclose(v, [2, -1], atol=1e-9)


def test_blend_and_weights() -> None:
    assert smoothstep5(0.0) == 0 and smoothstep5(1.0) == 1 and smoothstep5(0.5) == pytest.approx(0.5)
    w = ensemble_weights(3, 0.5)
    np.testing.assert_allclose(w, np.exp(-0.5 * np.arange(3)) / np.exp(-0.5 * np.arange(3)).sum())
    assert w[0] > w[1] > w[2]  # i = 0 is the oldest prediction, weighted most (ACT)


# -- merge strategies ---------------------------------------------------------------------------
def _chunk(cid: int, t0: float, value: float, h: int = 10, dt: float = 0.1, **kw: object) -> Chunk:
    return Chunk(cid, t0, dt, np.full((h, 1), value), **kw)  # type: ignore[arg-type]


def _merge(strategy: str, new: Chunk, history: list[Chunk], old: Reference, t_c: float, **kw: object):
    kw.setdefault("blend_time", 0.0)
    return merge(strategy=strategy, new=new, history=history, old=old, t_c=t_c, q_c=np.zeros(1),
                 v_c=np.zeros(1), min_gap=0.01, **kw)  # type: ignore[arg-type]


def test_merge_latest_drops_past_and_takes_new() -> None:
    old = Reference.hold(0.0, np.zeros(1))
    res = _merge("latest", _chunk(1, 0.0, 1.0), [], old, t_c=0.25, blend_time=0.2)
    assert res.dropped_actions == 3  # actions at 0.0, 0.1, 0.2 are at/before the commit time
    ref = res.reference
    q, v = ref.eval(0.25)  # starts exactly at the committed command (q_c = 0, v_c = 0)
    assert q[0] == pytest.approx(0.0) and v[0] == pytest.approx(0.0)
    for t in (0.3, 0.35, 0.4):  # the disagreement fades out monotonically over blend_time
        assert ref(t - 0.05)[0] < ref(t)[0] < 1.0
    for t in (0.45, 0.6, 0.9, 2.0):
        assert ref(t)[0] == pytest.approx(1.0)
    # C1 at the boundary and inside the blend
    for t in (0.25, 0.3, 0.44):
        _, vl = ref.eval(t - 1e-7)
        _, vr = ref.eval(t + 1e-7)
        assert abs(vl[0] - vr[0]) < 1e-4


def test_merge_rtc_keeps_old_plan_until_boundary() -> None:
    old_chunk = _chunk(1, 0.0, 1.0)
    old = _merge("latest", old_chunk, [], Reference.hold(0.0, np.zeros(1)), t_c=0.0).reference
    new = _chunk(2, 0.2, 5.0, rtc_delay_steps=3, rtc_prefix_chunk_id=1)
    res = _merge("rtc", new, [old_chunk], old, t_c=0.25, rtc_boundary=new.t0 + 3 * new.dt)
    ref = res.reference
    kept = (ref.times > 0.25) & (ref.times <= 0.5 + 1e-9)
    assert np.all(ref.pos[kept] == 1.0) and kept.sum() == 3  # old knots 0.3, 0.4, 0.5
    assert np.all(ref.pos[ref.times > 0.5 + 1e-9] == 5.0)
    assert res.boundary == pytest.approx(0.5)
    # without an rtc boundary, rtc behaves like latest
    res2 = _merge("rtc", new, [old_chunk], old, t_c=0.25)
    assert np.all(res2.reference.pos[1:] == 5.0)


def test_merge_temporal_ensemble_is_act_weighted_average() -> None:
    c1, c2 = _chunk(1, 0.0, 1.0), _chunk(2, 0.1, 2.0)
    c3 = _chunk(3, 0.2, 4.0)
    m = 0.7
    res = _merge("temporal_ensemble", c3, [c1, c2], Reference.hold(0.0, np.zeros(1)), t_c=0.0, ensemble_m=m)
    ref = res.reference
    w = np.exp(-m * np.arange(3))
    at = dict(zip(np.round(ref.times, 6), ref.pos[:, 0]))
    assert at[0.3] == pytest.approx((w @ [1.0, 2.0, 4.0]) / w.sum())  # all three chunks cover t = 0.3
    w2 = np.exp(-m * np.arange(2))
    assert at[1.0] == pytest.approx((w2 @ [2.0, 4.0]) / w2.sum())  # c1 ended at 0.9
    assert at[1.1] == pytest.approx(4.0)  # only the newest left


def test_merge_crossfade_blends_over_window() -> None:
    old = Reference.hold(0.0, np.zeros(1))
    res = _merge("crossfade", _chunk(1, 0.0, 1.0, h=20), [], old, t_c=0.0, crossfade_window=0.5)
    at = dict(zip(np.round(res.reference.times, 6), res.reference.pos[:, 0]))
    assert at[0.1] == pytest.approx(float(smoothstep5(0.2)))
    assert 0 < at[0.2] < at[0.3] < at[0.4] < 1
    assert at[0.5] == pytest.approx(1.0) and at[1.0] == pytest.approx(1.0)
    res0 = _merge("crossfade", _chunk(1, 0.0, 1.0, h=20), [], old, t_c=0.0, crossfade_window=0.0)
    assert np.all(res0.reference.pos[1:] == 1.0)


# -- limiter --------------------------------------------------------------------------------------
def test_limiter_tracks_feasible_reference_exactly_and_counts_no_clamp() -> None:
    c = cfg()
    lim = JointLimits.from_config(c)
    lm = Limiter(lim, 0.01)
    q, v = sine(np.array([0.0]))[0], np.array([0.6 * np.cos(j) for j in range(3)])
    for k in range(1, 200):
        r0, r1 = sine(np.array([(k - 1) * 0.01]))[0], sine(np.array([k * 0.01]))[0]
        q, v, fl = lm.step(q, v, r0, r1)
        np.testing.assert_allclose(q, r1, atol=1e-12)
        assert not (fl.position.any() or fl.velocity.any() or fl.acceleration.any())


@pytest.mark.parametrize("seed", range(5))
def test_limiter_never_exceeds_limits_on_random_references(seed: int) -> None:
    rng = np.random.default_rng(seed)
    lim = JointLimits(("a", "b"), np.array([-1.0, -0.2]), np.array([1.0, 3.0]), np.array([1.0, 4.0]),
                      np.array([5.0, 40.0]))
    dt = 0.004
    lm = Limiter(lim, dt)
    q, v = np.array([0.0, 0.0]), np.zeros(2)
    qs, vs = [q], [v]
    r = rng.normal(0, 5, 2)
    for k in range(3000):
        if k % 37 == 0:
            r = rng.normal(0, 5, 2)  # huge jumps, far outside the position limits
        q, v, _ = lm.step(q, v, r, r + rng.normal(0, 0.5, 2))
        qs.append(q)
        vs.append(v)
    Q, V = np.array(qs), np.array(vs)
    assert np.all(Q >= lim.lower - 1e-12) and np.all(Q <= lim.upper + 1e-12)
    assert np.all(np.abs(V) <= lim.velocity + 1e-12)
    assert np.all(np.abs(np.diff(V, axis=0)) <= lim.acceleration * dt * (1 + 1e-9))
    np.testing.assert_allclose(np.diff(Q, axis=0), V[1:] * dt, atol=1e-12)


# -- executor core --------------------------------------------------------------------------------
def test_waits_for_joint_state_and_starts_from_it() -> None:
    core = ChunkExecutorCore(cfg())
    assert core.tick(1.0) is None and core.state is ExecState.WAITING_FOR_JOINT_STATE
    res = core.on_chunk(1.0, **raw(1, 1.0, sine(1.0 + 0.05 * np.arange(20))))
    assert res.verdict is Verdict.WAITING and core.stats.counts["waiting"] == 1
    assert not core.on_joint_state(["a", "b"], [0.0, 0.0], 1.0)  # incomplete
    assert not core.on_joint_state(J3, [0.0, math.nan, 0.0], 1.0)
    assert core.on_joint_state(["x", *J3], [9.0, 0.4, -0.3, 0.2], 1.0) and core.state is ExecState.IDLE
    assert core.tick(1.01) is None  # nothing is commanded before a chunk
    assert core.on_chunk(1.02, **raw(2, 1.0, sine(1.0 + 0.05 * np.arange(20)))).accepted
    cmd = core.tick(1.02)
    assert cmd is not None and core.state is ExecState.EXECUTING
    np.testing.assert_allclose(cmd.positions[0], [0.4, -0.3, 0.2])
    np.testing.assert_allclose(cmd.velocities[0], 0.0)
    assert cmd.stamp == pytest.approx(1.03)  # now + stamp_lead


def test_first_point_is_measured_position_even_if_first_tick_is_late() -> None:
    core = started(q0=0.3)
    assert core.on_chunk(1.0, **raw(1, 1.0, np.ones((20, 3)))).accepted
    cmd = core.tick(1.2)  # 200 ms after the chunk: the start is shifted, never stamped in the past
    assert cmd is not None and cmd.stamp == pytest.approx(1.21)
    np.testing.assert_allclose(cmd.positions[0], 0.3)
    np.testing.assert_allclose(cmd.velocities[0], 0.0)


def test_joint_order_mapping_by_name() -> None:
    core = started(cfg(watchdog_timeout=5.0))
    acts = np.tile([[0.1, 0.2, 0.3]], (20, 1))
    assert core.on_chunk(0.0, **raw(1, 0.0, acts[:, ::-1], names=J3[::-1])).accepted
    _, q, _ = run(core, 0.0, 2.0)
    np.testing.assert_allclose(q[-1], [0.1, 0.2, 0.3], atol=1e-9)


@pytest.mark.parametrize(
    "mutate, verdict",
    [
        (lambda r: r.update(actions=np.where(np.arange(60) == 7, np.nan, r["actions"])), Verdict.NONFINITE),
        (lambda r: r.update(actions=np.where(np.arange(60) == 7, np.inf, r["actions"])), Verdict.NONFINITE),
        (lambda r: r.update(joint_names=["a", "b", "z"]), Verdict.JOINT_MISMATCH),
        (lambda r: r.update(joint_names=["a", "b"], action_dim=2, actions=r["actions"][:40]), Verdict.JOINT_MISMATCH),
        (lambda r: r.update(joint_names=[], action_dim=2, actions=r["actions"][:40]), Verdict.JOINT_MISMATCH),
        (lambda r: r.update(num_actions=21), Verdict.INVALID),
        (lambda r: r.update(dt=0.0), Verdict.INVALID),
        (lambda r: r.update(chunk_id=0), Verdict.INVALID),
        (lambda r: r.update(t0=100.0), Verdict.EARLY),
        (lambda r: r.update(t0=-5.0), Verdict.LATE),
    ],
)
def test_bad_chunks_rejected_whole_and_counted(mutate: object, verdict: Verdict) -> None:
    core = started()
    r = raw(1, 0.0, sine(0.05 * np.arange(20)))
    mutate(r)  # type: ignore[operator]
    res = core.on_chunk(0.0, **r)
    assert res.verdict is verdict and res.reason
    assert core.stats.counts[verdict.value] == 1 and core.stats.counts["rejected"] == 1
    assert core.state is ExecState.IDLE  # nothing merged
    assert core.tick(0.01) is None


def test_duplicate_out_of_order_and_partially_late() -> None:
    core = started()
    f = lambda t0: sine(t0 + 0.05 * np.arange(20))  # noqa: E731
    assert core.on_chunk(1.0, **raw(1, 1.0, f(1.0))).accepted
    run(core, 1.0, 1.2)
    assert core.on_chunk(1.2, **raw(1, 1.0, f(1.0))).verdict is Verdict.DUPLICATE
    res = core.on_chunk(1.2, **raw(2, 1.1, f(1.1)))  # arrives 100 ms after its observation
    assert res.accepted and res.dropped_actions >= 2
    assert core.on_chunk(1.21, **raw(3, 1.05, f(1.05))).verdict is Verdict.OUT_OF_ORDER
    assert core.on_chunk(1.22, **raw(2, 1.3, f(1.3))).accepted  # id reused with a newer stamp: policy restart
    c = core.stats.counts
    assert (c["received"], c["accepted"], c["duplicate"], c["out_of_order"]) == (5, 3, 1, 1)
    assert c["actions_dropped"] >= res.dropped_actions


def test_stream_commands_continuous_within_limits_all_strategies() -> None:
    for strategy in ("rtc", "temporal_ensemble", "crossfade", "latest"):
        core = started(cfg(merge_strategy=strategy), q0=0.0)
        nid = iter(range(1, 10_000))

        def policy(core: ChunkExecutorCore, now: float, nid: Iterator[int] = nid) -> None:
            if round(now * 100) % 10 == 0:  # 10 Hz, 60 ms latency, noisy predictions
                t0 = now - 0.06
                acts = sine(t0 + 0.05 * np.arange(20)) + np.random.default_rng(int(now * 100)).normal(0, 0.002, (20, 3))
                fb = core.feedback(now)
                assert core.on_chunk(now, **raw(next(nid), t0, acts, rtc_prefix_chunk_id=fb.chunk_id,
                                                 rtc_delay_steps=2)).accepted

        t, q, v = run(core, 0.0, 3.0, policy=policy)
        assert_within_limits(core, t, q, v)
        np.testing.assert_allclose(np.diff(t), 0.01, atol=1e-9)  # one point per control period, no gap
        np.testing.assert_allclose(q[-50:], sine(t[-50:]), atol=0.03)


@pytest.mark.parametrize("resume, sent_during_stall", [(1.9, (1.85,)), (2.3, (1.6, 1.7, 1.8, 1.9, 2.0, 2.1, 2.2))])
def test_executor_stall_restarts_from_the_held_point_and_rejoins_the_motion(
        resume: float, sent_during_stall: tuple[float, ...]) -> None:
    """The executor's process stalls (0.4 s, 0.8 s) while the policy keeps sending chunks (observed after the
    commit time): the controller has held the last published point since, so the stream restarts there at rest
    (no jump), the queued chunks merge before the next tick, and the limited stream rejoins the policy's motion,
    for every strategy (a burst of several: the old knots at or before the commit time must not hide the gap)."""
    for strategy in ("rtc", "temporal_ensemble", "crossfade", "latest"):
        core = started(cfg(merge_strategy=strategy, crossfade_window=0.1, watchdog_timeout=2.0),
                       q0=float(sine(np.zeros(1))[0, 0]))
        nid = iter(range(1, 10_000))

        def send(core: ChunkExecutorCore, now: float, nid: Iterator[int] = nid, sent: float | None = None) -> None:
            t0 = (now if sent is None else sent) - 0.05
            assert core.on_chunk(now, **raw(next(nid), t0, sine(t0 + 0.05 * np.arange(40)))).accepted

        def policy(core: ChunkExecutorCore, now: float) -> None:
            if round(now * 100) % 10 == 0:
                send(core, now)

        t0, q0, v0 = run(core, 0.0, 1.5, policy=policy)  # converged on the sine
        for sent in sent_during_stall:  # chunks observed during the stall arrive together,
            send(core, resume - 0.01, sent=sent)  # then the ticks resume
        t, q, v = run(core, resume, resume + 1.6, policy=policy)
        assert core.stats.counts["reanchored"] == 1, strategy
        assert core.stats.last_gap_s == pytest.approx(resume - 1.5 - 0.01, abs=0.011)
        assert_safe_across_gaps(core, np.concatenate([t0, t]), np.concatenate([q0, q]), np.concatenate([v0, v]))
        lim = core.limits
        assert np.all(np.abs(q[0] - q0[-1]) <= lim.acceleration * core.dt ** 2 * (1 + 1e-7) + 1e-12)  # from rest
        np.testing.assert_allclose(q[t > resume + 1.0], sine(t[t > resume + 1.0]), atol=0.01)  # motion rejoined


@pytest.mark.parametrize("mode", ["stream", "rolling"])
@pytest.mark.parametrize("stall", [0.05, 0.3, 1.0, 2.0])
def test_no_jump_after_a_stall_in_any_strategy_or_output_mode(mode: str, stall: float) -> None:
    """Issue #27: a stalled control thread (0.05-2 s; chunks still arriving, or none) must not make the next
    command jump to where the plan is by now: every published point is reachable from the previous commanded
    point within the limits, the held point after a gap included."""
    extra = dict(output_mode="rolling", rolling_rate=20.0, rolling_horizon=0.2, rolling_points=5) if mode == "rolling" else {}
    for strategy in ("rtc", "temporal_ensemble", "crossfade", "latest"):
        for chunks_during_stall in (True, False):
            core = started(cfg(merge_strategy=strategy, watchdog_timeout=0.5, **extra), q0=0.0)
            nid = iter(range(1, 10_000))

            def policy(core: ChunkExecutorCore, now: float, nid: Iterator[int] = nid) -> None:
                if round(now * 100) % 10 == 0:  # fast motion: 1.2 rad/s peaks
                    t0 = now - 0.05
                    core.on_chunk(now, **raw(next(nid), t0, sine(t0 + 0.05 * np.arange(20), amp=0.6)))

            period = 0.05 if mode == "rolling" else 0.01
            t0, q0, v0 = run(core, 0.0, 1.0, period=period, policy=policy)
            if chunks_during_stall:  # merged by another thread while the control loop is stalled
                for k in range(1, int(round(stall / 0.1)) + 1):
                    policy(core, 1.0 + 0.1 * k - 1e-9 + 0.0)
            resume = round(1.0 + stall, 6)
            t1, q1, v1 = run(core, resume, resume + 1.0, period=period, policy=policy)
            assert_safe_across_gaps(core, np.concatenate([t0, t1]), np.concatenate([q0, q1]),
                                    np.concatenate([v0, v1]))
            covered = 0.2 if mode == "rolling" else 0.0
            if stall > covered + 0.05:
                assert core.stats.counts["reanchored"] >= 1, (strategy, mode, stall)
                assert core.stats.max_gap_s > 0.0


def test_burst_of_chunks_merged_at_every_tick_does_not_accumulate_error() -> None:
    """After a stall, queued chunks (all samples of one smooth motion) merge one per control tick:
    the merged plan must stay on the motion (no boundary correction fed back into the targets)."""
    for strategy in ("rtc", "temporal_ensemble", "crossfade", "latest"):
        core = started(cfg(merge_strategy=strategy, crossfade_window=0.1, blend_time=0.2),
                       q0=float(sine(np.zeros(1))[0, 0]))
        nid = iter(range(1, 10_000))
        rng = np.random.default_rng(0)

        def policy(core: ChunkExecutorCore, now: float, nid: Iterator[int] = nid,
                   rng: np.random.Generator = rng) -> None:
            if now > 1.0 or round(now * 100) % 10 == 0:  # 10 Hz, then a burst: one chunk per tick
                t0 = now - float(rng.uniform(0.05, 0.4))  # observed at scattered times
                assert core.on_chunk(now, **raw(next(nid), t0, sine(t0 + 0.05 * np.arange(60)))).verdict in (
                    Verdict.ACCEPTED, Verdict.OUT_OF_ORDER)

        run(core, 0.0, 1.0, policy=policy)
        before = int(core.stats.clamps_total().sum())
        t, q, v = run(core, 1.0, 2.0, policy=policy)
        assert_within_limits(core, t, q, v)
        assert int(core.stats.clamps_total().sum()) == before, strategy
        assert float(np.abs(q - sine(t)).max()) < 2e-3, strategy


def test_rolling_points_never_change_once_published() -> None:
    core = started(cfg(output_mode="rolling", rolling_rate=20.0, rolling_horizon=0.2, rolling_points=5))
    rng = np.random.default_rng(3)
    seen: dict[int, np.ndarray] = {}
    for i in range(60):
        now = 0.05 * i
        if i % 2 == 0:
            core.on_chunk(now, **raw(i + 1, now - 0.02, rng.normal(0, 3, (20, 3))))
        cmd = core.tick(now)
        if cmd is None:
            continue
        assert cmd.positions.shape == (5, 3) and cmd.time_from_start[0] == 0.0
        assert np.all(np.diff(cmd.time_from_start) > 0) and cmd.time_from_start[-1] == pytest.approx(0.2)
        assert cmd.stamp >= now + 0.01 - 1e-9
        for k in range(5):
            key = int(round((cmd.stamp + cmd.time_from_start[k]) * 1000))
            if key in seen:
                np.testing.assert_array_equal(seen[key], cmd.positions[k])
            seen[key] = cmd.positions[k]
    assert core.stats.clamps_total().sum() > 0


def test_watchdog_decelerates_to_hold_within_limits_and_time() -> None:
    c = cfg(watchdog_timeout=0.3)
    core = started(c)
    ts = 0.05 * np.arange(40)
    fast = np.stack([1.4 * np.sin(1.0 * ts)] * 3, axis=1)  # ~1.4 rad/s at t = 0
    assert core.on_chunk(0.0, **raw(1, 0.0, fast)).accepted
    t, q, v = run(core, 0.0, 1.5)
    assert core.state is ExecState.HOLDING and core.stats.watchdog_trips == 1
    assert core.hold_reached and core.feedback(1.5).state is ExecState.HOLDING
    assert_within_limits(core, t, q, v)
    moving = np.nonzero(np.any(v != 0, axis=1))[0]
    t_rest = t[moving[-1] + 1]
    v_at_trip = np.abs(v[np.searchsorted(t, 0.3)]).max()
    assert t_rest <= 0.3 + 0.02 + v_at_trip / 8.0 + 0.02  # timeout + lead/tick + braking at a_max
    assert np.ptp(q[t >= t_rest], axis=0).max() == 0.0
    # a fresh chunk resumes smoothly from the hold
    assert core.on_chunk(1.5, **raw(2, 1.5, np.zeros((20, 3)))).accepted and core.state is ExecState.EXECUTING


def test_feedback_reports_commit_and_rtc_uses_it() -> None:
    core = started()
    assert core.feedback(0.0).chunk_id == 0
    acts = np.zeros((20, 3))
    assert core.on_chunk(0.0, **raw(1, 0.0, acts)).accepted
    run(core, 0.0, 0.2)
    fb = core.feedback(0.2)
    assert fb.state is ExecState.EXECUTING and fb.chunk_id == 1 and fb.step_period == 0.05
    t_c = core.committed_until
    assert fb.committed_index == math.floor(t_c / 0.05 + 1e-6) + 1
    assert fb.committed_until == pytest.approx(fb.committed_index * 0.05)
    assert fb.remaining_actions == 20 - fb.committed_index and fb.next_action_index <= fb.committed_index
    # rtc: the new chunk (guided by chunk 1, d = 6) only takes over after what the policy was told
    new = np.ones((20, 3))
    assert core.on_chunk(0.2, **raw(2, 0.15, new, rtc_prefix_chunk_id=1, rtc_delay_steps=6)).accepted
    ref = core._ref
    assert ref is not None
    boundary = 0.15 + 6 * 0.05
    assert np.all(ref.pos[(ref.times > t_c) & (ref.times <= boundary + 1e-9)] == 0.0)
    assert np.all(ref.pos[ref.times > boundary + 1e-9] == 1.0)


def test_live_config_change_applies_only_live_fields() -> None:
    core = started()
    core.set_config(cfg(merge_strategy="crossfade", crossfade_window=0.4, control_rate=10.0))
    assert core.cfg.merge_strategy == "crossfade" and core.cfg.crossfade_window == 0.4
    assert core.cfg.control_rate == 100.0


def test_period_jitter() -> None:
    j = PeriodJitter(0.01)
    for i, e in enumerate([0, 0, 0.001, 0, -0.002]):
        j.tick(i * 0.01 + e)
    s = j.summary()
    assert s["n"] == 4 and s["max_ms"] == pytest.approx(2.0) and s["p50_ms"] == pytest.approx(1.0)


def test_core_imports_no_ros() -> None:
    import subprocess

    code = ("import sys, effvla_ros.core.executor; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('rclpy', 'torch')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
