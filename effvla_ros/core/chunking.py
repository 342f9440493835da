"""Issued action chunks and the real-time chunking (RTC) target of the next one (ROS-free).

One bookkeeping for every caller of :meth:`~effvla_ros.core.runner.PolicyRunner.infer` that guides a
chunk toward the previous one: the policy node, offline replay (``replay/evaluate.py``), simulation
evaluation (``train/evaluate.py``) and ``scripts/emulate_graph.py``. Each keeps the chunks it issued as
:class:`IssuedChunk` (row 0 at its observation's stamp) and asks :func:`guidance_toward` (or
:meth:`ChunkHistory.guidance`) for the :class:`~effvla_ros.core.rtc.GuidanceTarget` of an observation:
the previous chunk aligned to the observation's time (``align_previous_chunk``), the rows it still has
(``valid``) and the inference delay ``d`` in control steps.

Where ``d`` comes from (a :class:`DelaySource`):

* the robot (policy node, emulate_graph): :class:`~effvla_ros.core.rtc.DelayEstimator` - a high
  percentile of measured latency, raised to cover what the executor reports committed, capped by
  ``rtc.max_delay_steps``;
* replay and eval-sim: :class:`FixedDelay` - a fixed number of steps (``--rtc-delay-steps``; eval-sim's
  emulated delay ``exec.delay_steps``, during which the previous chunk really keeps executing), clamped
  to ``0..valid`` and not capped (no latency is measured offline).
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from effvla_ros.core.rtc import GuidanceTarget, align_previous_chunk


class DelaySource(Protocol):
    """Gives the RTC delay d (control steps) of the next chunk."""

    def delay_steps(self, step_period: float, available: int, committed_steps: int = 0) -> int:
        """d for a control period ``step_period`` (s), at most ``available`` (the previous chunk's rows
        left), at least ``committed_steps`` (what the executor already committed)."""
        ...


@dataclass(frozen=True)
class FixedDelay:
    """A fixed delay of ``steps`` control steps (no latency measured: replay, eval-sim)."""

    steps: int

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"delay steps: must be >= 0, got {self.steps}")

    def delay_steps(self, step_period: float, available: int, committed_steps: int = 0) -> int:
        """``steps``, at least ``committed_steps``, at most ``available``."""
        return int(max(0, min(max(self.steps, committed_steps), available)))


@dataclass
class IssuedChunk:
    """A chunk the policy issued, kept as the RTC target of the next ones."""

    chunk_id: int
    stamp: float  # its observation's stamp = the time of row 0 (s)
    x_final: torch.Tensor  # (H, max_action_dim) normalized actions
    state: torch.Tensor | None = None  # (state_dim,) raw state it was predicted from (relative actions)


def guidance_toward(prev: IssuedChunk, obs_stamp: float, step_period: float, horizon: int, delay: DelaySource,
                    committed_until: float | None = None) -> GuidanceTarget | None:
    """The RTC target of a chunk observed at ``obs_stamp``: ``prev`` aligned to it, d from ``delay`` and
    raised to cover what the executor reports committed up to ``committed_until`` (None: no report).
    None when ``prev`` has no action left at ``obs_stamp`` (or is newer than it)."""
    if obs_stamp < prev.stamp:
        return None
    aligned, valid = align_previous_chunk(prev.x_final, prev.stamp, obs_stamp, step_period, horizon)  # (H, D)
    if valid <= 0:
        return None
    committed = 0
    if committed_until is not None:
        committed = max(0, math.ceil((committed_until - obs_stamp) / step_period - 1e-6))
    d = delay.delay_steps(step_period, available=valid, committed_steps=committed)
    return GuidanceTarget(aligned, valid, d, prev.chunk_id, ref_state=prev.state)


@dataclass(frozen=True)
class ExecutionReport:
    """What the chunk executor reports (``effvla_ros/ExecutionFeedback``, ``ChunkExecutorCore.feedback``)."""

    chunk_id: int  # the chunk it executes (0: none)
    committed_until: float | None = None  # s; its commands up to here are already sent (frozen)
    holding: bool = False  # it holds position: nothing of any chunk will run


class ChunkHistory:
    """The chunks issued lately (oldest first), the source of the next chunk's RTC target."""

    def __init__(self, maxlen: int = 8) -> None:
        self._chunks: deque[IssuedChunk] = deque(maxlen=maxlen)

    def add(self, chunk: IssuedChunk) -> None:
        self._chunks.append(chunk)

    def clear(self) -> None:
        self._chunks.clear()

    def __len__(self) -> int:
        return len(self._chunks)

    def __iter__(self) -> Iterator[IssuedChunk]:
        return iter(self._chunks)

    @property
    def last(self) -> IssuedChunk | None:
        """The newest issued chunk."""
        return self._chunks[-1] if self._chunks else None

    def get(self, chunk_id: int) -> IssuedChunk | None:
        return next((c for c in self._chunks if c.chunk_id == chunk_id), None)

    def guidance(self, obs_stamp: float, step_period: float, horizon: int, delay: DelaySource,
                 report: ExecutionReport | None = None) -> GuidanceTarget | None:
        """The RTC target of a chunk observed at ``obs_stamp`` (:func:`guidance_toward`).

        Toward the chunk the executor reports executing (when still kept; else, and without a report,
        the newest issued one), with d covering what it reports committed. None when nothing was issued,
        when the executor holds (nothing of the old chunk will run), or when no action is left.
        """
        prev = self.last
        if prev is None:
            return None
        committed_until = None
        if report is not None and report.chunk_id != 0:
            if report.holding:
                return None
            prev = self.get(report.chunk_id) or prev
            committed_until = report.committed_until
        return guidance_toward(prev, obs_stamp, step_period, horizon, delay, committed_until)


__all__ = ["ChunkHistory", "DelaySource", "ExecutionReport", "FixedDelay", "IssuedChunk", "guidance_toward"]
