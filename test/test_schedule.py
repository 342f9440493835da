"""The policy's chunk schedule (effvla_ros.core.schedule): the due time, the observation period and the
aligned start; and, in a simulation of the node's loop in simulated time (no wall clock), that the aligned
start computes chunks from fresher observations than starting at the due time."""
from __future__ import annotations

import random
import statistics

import pytest

from effvla_ros.core.rtc import DelayEstimator, RTCConfig
from effvla_ros.core.schedule import ChunkScheduler


def test_first_chunk_starts_at_once_and_due_time_without_alignment() -> None:
    s = ChunkScheduler()
    assert s.should_start(0.0, None, 0.5, 0.0)
    assert ChunkScheduler.due(1.0, 0.5, 0.1) == pytest.approx(1.4)
    s.observe(1.3, now=1.31)
    s.observe(1.2, now=1.32)  # older: ignored
    assert s.period() is None  # one stamp only
    assert not s.should_start(1.39, 1.0, 0.5, 0.1, align=False)
    assert s.should_start(1.40, 1.0, 0.5, 0.1, align=False)
    with pytest.raises(ValueError, match="window"):
        ChunkScheduler(window=1)


def test_period_is_the_median_stamp_difference() -> None:
    s = ChunkScheduler(window=5)
    for k, st in enumerate([0.0, 0.1, 0.2, 0.35, 0.4, 0.5]):  # one late frame
        s.observe(st, now=st + 0.01)
        s.observe(st, now=st + 0.03)  # repeats do not count
        assert (s.period() is None) == (k == 0)
    assert s.period() == pytest.approx(0.1)
    s.reset()
    assert s.period() is None


def test_aligned_start_on_the_last_observation_before_the_due_time() -> None:
    s = ChunkScheduler()
    for st in (0.0, 0.1, 0.2, 0.3):
        s.observe(st, now=st + 0.012)
    # previous chunk stamped 0.0, horizon 0.5 s, latency 0.115: due at 0.385
    # the frame of 0.3 was seen at 0.312; the next one would come at 0.412 > due: start now
    assert s.should_start(0.312, 0.0, 0.5, 0.115, align=True)
    assert not s.should_start(0.312, 0.0, 0.5, 0.115, align=False)
    # with the frame of 0.2 as the newest (seen at 0.212), the 0.3 one still comes before the due time: wait
    s2 = ChunkScheduler()
    for st in (0.0, 0.1, 0.2):
        s2.observe(st, now=st + 0.012)
    assert not s2.should_start(0.25, 0.0, 0.5, 0.115, align=True)
    # no period yet: only the due time counts
    s3 = ChunkScheduler()
    s3.observe(0.3, now=0.312)
    assert not s3.should_start(0.312, 0.0, 0.5, 0.115, align=True)


def _simulate(align: bool, inference_s: float, *, period: float = 0.1, token_delay: float = 0.012,
              horizon_s: float = 0.5, chunks: int = 200, seed: int = 0) -> list[tuple[float, float]]:
    """The policy node's loop in simulated time (1 ms ticks): camera frames every ``period``, their tokens
    usable ``token_delay`` later, inference of ``inference_s`` +-20 %, the latency estimate of the node
    (DelayEstimator, 95th percentile). Returns (observation stamp, chunk arrival) per chunk after the first 20."""
    rnd = random.Random(seed)
    sched, delay = ChunkScheduler(), DelayEstimator(RTCConfig())
    last_stamp: float | None = None
    used, busy_until, out, tick = -1, 0.0, [], 0
    while len(out) < chunks:
        tick += 1
        now = tick / 1000.0
        if now < busy_until:
            continue
        k = int((now - token_delay) // period)  # newest frame whose tokens have arrived
        if k < 0:
            continue
        sched.observe(k * period, now)
        if k <= used or not sched.should_start(now, last_stamp, horizon_s, delay.latency() or 0.0, align=align):
            continue
        busy_until = now + inference_s * rnd.uniform(0.8, 1.2)
        lat = busy_until - k * period
        delay.record(lat)
        out.append((k * period, busy_until))
        last_stamp, used = k * period, k
    return out[20:]


@pytest.mark.parametrize("inference_s", [0.028, 0.042, 0.06])
def test_aligned_start_uses_fresher_observations(inference_s: float) -> None:
    at_due, aligned = _simulate(False, inference_s), _simulate(True, inference_s)
    lat_due = statistics.median(arr - st for st, arr in at_due)
    lat_aligned = statistics.median(arr - st for st, arr in aligned)
    # aligned: the chunk's observation is only as old as the token delay plus the inference
    assert lat_aligned < 0.012 + inference_s * 1.2 + 0.005
    # at the due time the observation is older by a large part of the camera period
    assert lat_due > lat_aligned + 0.03
    # both bring each chunk before the previous one's horizon has run out (no gap in the actions)
    for chunks in (at_due, aligned):
        assert all(nxt[1] <= prev[0] + 0.5 + 1e-9 for prev, nxt in zip(chunks, chunks[1:]))
