"""When the policy starts its next chunk.

A chunk stamped with its observation's time executes ``execution_horizon`` actions at ``fps`` before the next
chunk should take over, so the next one is due to *start* its latency earlier::

    due = last_chunk_stamp + execution_horizon / fps - latency

(``latency``: a high percentile of observation-to-publication times, :class:`effvla_ros.core.rtc.DelayEstimator`;
the asynchronous execution of real-time chunking: K. Black, M. Y. Galliker, S. Levine, "Real-Time Execution
of Action Chunking Flow Policies", 2025, arXiv 2506.07339.)

Observations arrive at the camera rate. Starting at ``due`` on the newest observation uses one that is up to one
camera period old (100 ms at 10 Hz), and that age enters the measured latency, which moves the next due time
earlier again: the schedule settles on an observation age set by its phase relative to the frames, not by the
compute. With ``align`` the next chunk starts on the arrival of an observation when the next observation (one
period later) would arrive after the due time: the chunk starts up to one period earlier than needed, on an
observation as fresh as the pipeline delivers. ``test/test_schedule.py`` simulates both rules (10 Hz frames,
tokens 12 ms after the frame, 35 ms inference, horizon 0.5 s): observation-to-chunk latency p50 115 ms at the
due time against 48 ms aligned, and, since the smaller latency estimate moves the due time later, one chunk every
0.4 s instead of every 0.3 s.

ROS-free; the policy node calls it with its clock's time (simulated time under ``use_sim_time``).
"""
from __future__ import annotations

import statistics
from collections import deque


class ChunkScheduler:
    """Decides, for the newest complete observation, whether the next chunk starts now.

    ``observe(stamp, now)`` is called with every complete observation the policy sees (repeats are fine); it
    records when each new stamp was first seen and estimates the observation period (median of the last
    ``window`` stamp differences). ``should_start`` applies the rule above.
    """

    def __init__(self, window: int = 16) -> None:
        if window < 2:
            raise ValueError("window: at least 2 stamps are needed for a period")
        self._stamps: deque[float] = deque(maxlen=window)
        self._first_seen: float | None = None  # when the newest stamp was first seen (node clock)

    def reset(self) -> None:
        self._stamps.clear()
        self._first_seen = None

    def observe(self, stamp: float, now: float) -> None:
        if self._stamps and stamp <= self._stamps[-1]:
            return  # seen before (or older): nothing new arrived
        self._stamps.append(stamp)
        self._first_seen = now

    def period(self) -> float | None:
        """Median difference between consecutive observation stamps; None before two were seen."""
        if len(self._stamps) < 2:
            return None
        xs = list(self._stamps)
        return statistics.median(b - a for a, b in zip(xs, xs[1:]))

    @staticmethod
    def due(last_chunk_stamp: float, horizon_s: float, latency_s: float) -> float:
        return last_chunk_stamp + horizon_s - latency_s

    def should_start(self, now: float, last_chunk_stamp: float | None, horizon_s: float, latency_s: float,
                     align: bool = True) -> bool:
        """True when the next chunk should start now on the newest observation.

        Without a previous chunk: at once. Otherwise at the due time, or (``align``) already when the newest
        observation was seen less than one observation period before the due time, so that waiting would
        only make it older: the next one would come after the due time.
        """
        if last_chunk_stamp is None:
            return True
        due = self.due(last_chunk_stamp, horizon_s, latency_s)
        if now >= due:
            return True
        if not align or self._first_seen is None:
            return False
        period = self.period()
        return period is not None and self._first_seen + period >= due
