"""Contention-aware torch threads (``core/threads.py``, ``RuntimeConfig.adaptive_threads``): the governor reads the
cores other processes keep busy and gives up threads to them; real busy processes are seen through /proc/stat."""
from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from effvla_ros.core.threads import CpuSample, ThreadGovernor, other_busy_cores, read_cpu_sample, usable_cores


@pytest.fixture(autouse=True)
def _keep_threads() -> Iterator[None]:
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


class FakeCpu:
    """A synthetic /proc/stat: ``advance(dt, others, own)`` moves the clock with that many busy cores."""

    def __init__(self) -> None:
        self.s = CpuSample(0.0, 0.0, 0.0)

    def advance(self, dt: float, others: float, own: float = 1.0) -> None:
        self.s = CpuSample(self.s.wall_s + dt, self.s.busy_s + dt * (others + own), self.s.own_s + dt * own)

    def __call__(self) -> CpuSample:
        return self.s


def test_other_busy_cores_subtracts_this_process() -> None:
    a, b = CpuSample(10.0, 100.0, 5.0), CpuSample(12.0, 104.0, 6.0)   # 4 busy core-seconds in 2 s, 1 of them ours
    assert other_busy_cores(a, b) == pytest.approx(1.5)
    assert other_busy_cores(a, CpuSample(12.0, 100.5, 6.0)) == 0.0    # tick rounding never goes negative
    assert other_busy_cores(a, a) == 0.0


def test_governor_follows_the_load_with_a_margin() -> None:
    cpu = FakeCpu()
    gov = ThreadGovernor(4, read=cpu, cores=4, margin=0.3)
    assert gov.threads == 4 and torch.get_num_threads() == 4
    cpu.advance(0.5, others=0.2)          # a ROS executor's worth: forgiven
    assert gov.update() == 4
    cpu.advance(0.5, others=2.0)          # two busy processes: two cores left
    assert gov.update() == 2 and torch.get_num_threads() == 2
    cpu.advance(0.5, others=3.9)          # never below one thread
    assert gov.update() == 1 and torch.get_num_threads() == 1
    cpu.advance(0.01, others=0.0)         # too short an interval to read: kept
    assert gov.update() == 1
    cpu.advance(0.5, others=0.0)          # quiet again: back to the maximum
    assert gov.update() == 4 and torch.get_num_threads() == 4
    assert gov.changes == 3


def test_governor_without_proc_stat_keeps_the_maximum(tmp_path: Path) -> None:
    missing = tmp_path / "no_stat"
    assert read_cpu_sample(missing) is None
    bad = tmp_path / "stat"
    bad.write_text("intr 1 2 3\n")
    assert read_cpu_sample(bad) is None
    gov = ThreadGovernor(3, read=lambda: None, cores=8)
    assert not gov.available and gov.update() == 3 and torch.get_num_threads() == 3


def _burn(stop) -> None:  # type: ignore[no-untyped-def]
    x = 1.0
    while not stop.is_set():
        for _ in range(50_000):
            x = x * 1.0000001 + 1e-9


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs Linux /proc/stat")
def test_real_busy_processes_are_seen_and_given_the_cores() -> None:
    """Fault injection: as many busy-loop processes as this process has cores. The governor, reading the real
    /proc/stat, drops to one thread while they run and gives the threads back after they stop (all of them on a
    quiet machine)."""
    cores = usable_cores()
    if cores < 2 or cores > 16:
        pytest.skip(f"{cores} cores: needs 2..16 to load every core")
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    gov = ThreadGovernor(cores, min_interval_s=0.2)
    time.sleep(0.6)
    gov.update()
    before = gov.others        # whatever else this machine runs
    procs = [ctx.Process(target=_burn, args=(stop,), daemon=True) for _ in range(cores)]
    for p in procs:
        p.start()
    try:
        time.sleep(1.0)            # the processes started (spawn imports) and ran
        gov.update()               # the interval since construction holds their start-up
        time.sleep(0.6)
        assert gov.update() == 1, f"others {gov.others:.2f} of {cores} cores"
        assert gov.others > cores - 1.0
    finally:
        stop.set()
        for p in procs:
            p.join(timeout=5)
    time.sleep(0.3)
    gov.update()               # the interval that held their ending
    time.sleep(0.6)
    after = gov.update()
    assert gov.others < before + 0.5, f"others {gov.others:.2f} after the load stopped, {before:.2f} before it"
    assert after == gov.threads_for(gov.others) and after > 1 or before > 0.5 + gov.margin


def test_runner_and_compressor_adapt_before_each_call() -> None:
    """``adaptive_threads`` on: the policy's governor is consulted by the compressor and the runner (here a synthetic
    load of all but one core), and the results equal the ones with fixed threads."""
    from effvla_ros.core.compression.compressor import ReuseConfig, TokenCompressor
    from effvla_ros.core.compression.pruning import PruningConfig
    from effvla_ros.core.runner import PolicyRunner, compressed_to_camera_tokens
    from effvla_ros.core.smolvla import RuntimeConfig, build_random_policy, tiny_arch
    from effvla_ros.core.smolvla.tokenizer import build_tiny_tokenizer

    policy = build_random_policy(tiny_arch(), tokenizer=build_tiny_tokenizer(), seed=0)
    policy.apply_runtime(RuntimeConfig(num_threads=2, adaptive_threads=True))
    assert policy.thread_governor is not None
    cpu = FakeCpu()
    policy.thread_governor = ThreadGovernor(2, read=cpu, cores=2)

    def step() -> torch.Tensor:
        comp = TokenCompressor(policy, PruningConfig(method="none"), ReuseConfig(enabled=False))
        comp.set_instruction("pick the red cube")
        g = torch.Generator().manual_seed(3)
        cams = {c: compressed_to_camera_tokens(comp.process(c, torch.rand(3, 48, 64, generator=g)))
                for c in policy.cameras}
        runner = PolicyRunner(policy)
        runner.set_instruction("pick the red cube")
        noise = torch.randn(1, policy.arch.chunk_size, policy.arch.max_action_dim, generator=g)
        return runner.infer(cams, torch.zeros(6), noise=noise).actions

    quiet = step()
    assert torch.get_num_threads() == 2
    cpu.advance(1.0, others=1.5)
    loaded = step()
    assert torch.get_num_threads() == 1 and policy.thread_governor.changes == 1
    torch.testing.assert_close(loaded, quiet, rtol=1e-5, atol=1e-5)
    policy.apply_runtime(RuntimeConfig(num_threads=2))
    assert policy.thread_governor is None
