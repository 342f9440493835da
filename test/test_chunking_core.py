"""Issued chunks and the RTC target (effvla_ros.core.chunking): one bookkeeping for node, replay, eval-sim."""
from __future__ import annotations

import itertools

import pytest
import torch

from effvla_ros.core.chunking import ChunkHistory, ExecutionReport, FixedDelay, IssuedChunk, guidance_toward
from effvla_ros.core.rtc import DelayEstimator, GuidanceTarget, RTCConfig, align_previous_chunk


def _chunk(chunk_id: int, stamp: float, h: int = 10) -> IssuedChunk:
    return IssuedChunk(chunk_id, stamp, torch.arange(float(h))[:, None].repeat(1, 2) + 100 * chunk_id,
                       torch.full((6,), float(chunk_id)))


def test_guidance_toward_aligns_the_issued_chunk_and_covers_committed_actions() -> None:
    prev = IssuedChunk(3, 10.0, torch.arange(10.0)[:, None].repeat(1, 2))
    est = DelayEstimator(RTCConfig())  # no latency measured yet: d = 0 unless actions are committed
    g = guidance_toward(prev, 10.2, 0.1, 10, est, committed_until=10.5)
    assert g is not None and g.source_chunk_id == 3 and g.valid == 8 and g.delay == 3
    assert float(g.actions[0, 0]) == 2.0  # row 0 of the new chunk = row 2 of the issued one
    g0 = guidance_toward(prev, 10.2, 0.1, 10, est)
    assert g0 is not None and g0.delay == 0
    assert guidance_toward(prev, 9.9, 0.1, 10, est) is None  # observed before the issued chunk
    assert guidance_toward(prev, 11.0, 0.1, 10, est) is None  # nothing of it left


def test_fixed_delay_is_clamped_to_what_is_left_and_covers_committed_steps() -> None:
    assert FixedDelay(3).delay_steps(0.1, available=8) == 3
    assert FixedDelay(3).delay_steps(0.1, available=2) == 2
    assert FixedDelay(3).delay_steps(0.1, available=8, committed_steps=5) == 5
    assert FixedDelay(0).delay_steps(0.1, available=0) == 0
    assert FixedDelay(60).delay_steps(0.1, available=100) == 60  # not capped by rtc.max_delay_steps (50)
    with pytest.raises(ValueError, match="delay"):
        FixedDelay(-1)


def test_history_follows_the_executors_report() -> None:
    hist = ChunkHistory(maxlen=3)
    delay = FixedDelay(1)
    assert hist.guidance(1.0, 0.1, 10, delay) is None  # nothing issued yet
    for i in range(1, 5):
        hist.add(_chunk(i, 1.0 + 0.1 * i))
    assert len(hist) == 3 and [c.chunk_id for c in hist] == [2, 3, 4]  # the oldest dropped
    assert hist.last is not None and hist.last.chunk_id == 4
    g = hist.guidance(1.6, 0.1, 10, delay)  # no report: toward the newest
    assert g is not None and g.source_chunk_id == 4 and g.valid == 8 and g.delay == 1
    assert torch.equal(g.ref_state, torch.full((6,), 4.0))
    g = hist.guidance(1.6, 0.1, 10, delay, ExecutionReport(3, committed_until=1.9))  # the executing one
    assert g is not None and g.source_chunk_id == 3 and g.valid == 7 and g.delay == 3  # 0.3 s committed
    assert float(g.actions[0, 0]) == 300.0 + 3.0
    g = hist.guidance(1.6, 0.1, 10, delay, ExecutionReport(1))  # no longer kept: the newest
    assert g is not None and g.source_chunk_id == 4
    assert hist.guidance(1.6, 0.1, 10, delay, ExecutionReport(3, 1.9, holding=True)) is None  # nothing will run
    g = hist.guidance(1.6, 0.1, 10, delay, ExecutionReport(0, holding=True))  # chunk 0: no report
    assert g is not None and g.source_chunk_id == 4
    hist.clear()
    assert hist.last is None and hist.guidance(1.6, 0.1, 10, delay) is None


# The targets replay/evaluate.py and train/evaluate.py built by hand before they called guidance_toward
# (kept here, verbatim in effect, to show the shared function gives the runner the same inputs).
def _replay_by_hand(prev: IssuedChunk | None, stamp: float, dt: float, h: int, d: int) -> GuidanceTarget | None:
    if prev is not None and stamp >= prev.stamp:
        aligned, valid = align_previous_chunk(prev.x_final, prev.stamp, stamp, dt, h)
        if valid > 0:
            return GuidanceTarget(aligned, valid, min(int(d), valid), prev.chunk_id, ref_state=prev.state)
    return None


def _eval_by_hand(cur: IssuedChunk, k: int, dt: float, h: int, d: int) -> GuidanceTarget:
    aligned, valid = align_previous_chunk(cur.x_final, cur.stamp, k * dt, dt, h)
    return GuidanceTarget(aligned, valid, d, ref_state=cur.state)


def _runner_inputs(g: GuidanceTarget | None) -> tuple | None:
    """What PolicyRunner.infer uses of a target: nothing unless valid > 0, then the rows, valid,
    min(delay, valid) and the reference state."""
    if g is None or g.valid <= 0:
        return None
    return (g.actions.tolist(), g.valid, min(g.delay, g.valid), g.ref_state)


def test_shared_target_equals_the_hand_built_ones_of_replay_and_eval_sim() -> None:
    h = 10
    for dt, d, start, offset in itertools.product((0.1, 1 / 30), (0, 1, 3, 12), (0, 5, 17), range(0, 13)):
        # eval-sim: the executing chunk started at step `start`, observed at step start + offset
        cur = _chunk(7, start * dt, h)
        k = start + offset
        old = _runner_inputs(_eval_by_hand(cur, k, dt, h, d))
        new = _runner_inputs(guidance_toward(cur, k * dt, dt, h, FixedDelay(d)))
        assert new == old, (dt, d, start, offset)
        # replay: the previous observation's chunk, observed `offset` steps (+ jitter) later
        for jitter in (0.0, 0.3 * dt, -0.3 * dt):
            stamp = 100.0 + start * dt
            obs = stamp + offset * dt + (jitter if offset else abs(jitter))
            hist = ChunkHistory(maxlen=1)
            hist.add(IssuedChunk(cur.chunk_id, stamp, cur.x_final, cur.state))
            old_r = _runner_inputs(_replay_by_hand(hist.last, obs, dt, h, d))
            new_r = _runner_inputs(hist.guidance(obs, dt, h, FixedDelay(d)))
            assert new_r == old_r, (dt, d, start, offset, jitter)
    # replay before any chunk, or an observation older than the chunk: no guidance either way
    assert _replay_by_hand(None, 1.0, 0.1, h, 1) is None and ChunkHistory().guidance(1.0, 0.1, h, FixedDelay(1)) is None
    late = _chunk(1, 2.0, h)
    assert _replay_by_hand(late, 1.0, 0.1, h, 1) is None and guidance_toward(late, 1.0, 0.1, h, FixedDelay(1)) is None
