"""Contention-aware torch threads: use no more threads than the cores other processes leave free.

On a robot computer the policy shares the CPU with drivers, planners and the simulator. With as many OpenMP
threads as cores, a thread that reaches a barrier spins while the thread it waits for is descheduled by another
process: ``benchmarks/bench_contention.py`` measured chunks of 5-11 s (median 0.54 s) with 2 threads and 2 busy
processes on 2 cores, against at most 0.53 s with one thread. No static setting is best both ways (one thread on a
quiet CPU is ~1.5x slower; OpenMP's passive wait makes the quiet chunk ~2x slower), so the thread count follows
the load: before each stage call, :class:`ThreadGovernor` reads how many cores *other* processes kept busy since its
last call (``/proc/stat``'s busy time minus this process's CPU time) and sets ``torch.set_num_threads`` to the cores
left, between 1 and the configured maximum.

Where ``/proc/stat`` cannot be read (not Linux), the governor keeps the maximum and says so once
(:attr:`ThreadGovernor.available` False).
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

_log = logging.getLogger(__name__)
# /proc/stat's aggregate "cpu" line: user nice system idle iowait irq softirq steal ...; busy = all but idle, iowait.
# steal counts as busy: time the hypervisor gave another guest is not ours either.
_BUSY_FIELDS = (0, 1, 2, 5, 6, 7)
_TICKS_PER_S = float(os.sysconf("SC_CLK_TCK")) if hasattr(os, "sysconf") else 100.0


@dataclass(frozen=True)
class CpuSample:
    wall_s: float
    busy_s: float  # CPU seconds every process used, summed over the machine's cores (/proc/stat)
    own_s: float   # CPU seconds this process used (all its threads)


def read_cpu_sample(stat_path: str | Path = "/proc/stat") -> CpuSample | None:
    """Now's wall clock, the machine's busy CPU seconds (``/proc/stat``) and this process's CPU seconds; None where
    ``/proc/stat`` cannot be read."""
    try:
        with open(stat_path) as f:
            first = f.readline().split()
    except OSError:
        return None
    if not first or first[0] != "cpu":
        return None
    try:
        ticks = [int(x) for x in first[1:]]
    except ValueError:
        return None
    busy = sum(ticks[i] for i in _BUSY_FIELDS if i < len(ticks)) / _TICKS_PER_S
    return CpuSample(time.monotonic(), busy, time.process_time())


def other_busy_cores(a: CpuSample, b: CpuSample) -> float:
    """Cores other processes kept busy on average between samples ``a`` and ``b`` (never below 0)."""
    dt = b.wall_s - a.wall_s
    if dt <= 0:
        return 0.0
    return max(0.0, ((b.busy_s - a.busy_s) - (b.own_s - a.own_s)) / dt)


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), else ``os.cpu_count()``."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class ThreadGovernor:
    """Sets torch's intra-op threads before each stage call to the cores other processes leave free.

    ``max_threads``: the most threads (the configured ``num_threads``, else the usable cores); ``margin``: a
    fraction of a core another process may use before a thread is given up (ROS executors, loggers); ``min_interval_s``:
    a shorter interval than this since the last reading keeps the current count (the reading would be noise: /proc/stat
    counts in 10 ms ticks). ``read`` is the sampler and ``cores`` the cores to share (default: this process's CPU
affinity); tests pass synthetic ones.
    """

    def __init__(self, max_threads: int = 0, *, margin: float = 0.3, min_interval_s: float = 0.05,
                 read: Callable[[], CpuSample | None] | None = None, cores: int = 0) -> None:
        self.cores = int(cores) if cores > 0 else usable_cores()
        self.max_threads = int(max_threads) if max_threads > 0 else self.cores
        self.margin = float(margin)
        self.min_interval_s = float(min_interval_s)
        self._read = read or read_cpu_sample
        self._last: CpuSample | None = self._read()
        self.available = self._last is not None
        if not self.available:
            _log.warning("adaptive_threads: /proc/stat cannot be read here; torch keeps %d threads", self.max_threads)
        self.threads = self.max_threads
        self.others = 0.0  # the last reading: cores other processes kept busy
        self.changes = 0
        torch.set_num_threads(self.threads)

    def threads_for(self, others: float) -> int:
        """The thread count for ``others`` busy cores: the cores left (a ``margin`` of a core forgiven), 1..max."""
        return max(1, min(self.max_threads, int(self.cores - others + self.margin)))

    def update(self) -> int:
        """Read the load since the last call and set torch's threads; returns the count in use."""
        if not self.available:
            return self.threads
        now = self._read()
        if now is None or self._last is None:
            return self.threads
        if now.wall_s - self._last.wall_s < self.min_interval_s:
            return self.threads
        self.others = other_busy_cores(self._last, now)
        self._last = now
        n = self.threads_for(self.others)
        if n != self.threads:
            _log.info("adaptive_threads: other processes keep %.1f of %d cores busy: %d -> %d torch threads",
                      self.others, self.cores, self.threads, n)
            self.threads = n
            self.changes += 1
            torch.set_num_threads(n)
        return self.threads
