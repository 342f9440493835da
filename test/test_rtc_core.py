"""Real-time chunking core: mask, weight, both corrections, delay estimation, alignment (the RTC target's
bookkeeping, ``guidance_toward``: test_chunking_core.py)."""
from __future__ import annotations

import math

import pytest
import torch

from effvla_ros.core.rtc import (
    DelayEstimator,
    RTCConfig,
    align_previous_chunk,
    guidance_weight,
    guided_velocity,
    soft_mask,
)


def test_soft_mask_shape_and_values() -> None:
    w = soft_mask(10, delay=3, end=8, schedule="linear")
    assert w[:3].tolist() == [1.0, 1.0, 1.0]
    assert w[8:].tolist() == [0.0, 0.0]
    # linear: c_i = (end - i) / (end - d + 1)
    for i in range(3, 8):
        assert w[i].item() == pytest.approx((8 - i) / (8 - 3 + 1))
    we = soft_mask(10, delay=3, end=8, schedule="exp")
    c = (8 - 4) / 6
    assert we[4].item() == pytest.approx(c * (math.exp(c) - 1) / (math.e - 1))
    assert torch.all(we[3:8] <= w[3:8] + 1e-7)  # exp decays faster than linear
    assert torch.all(torch.diff(we) <= 1e-7)  # non-increasing
    # delay beyond the available overlap is clamped, never padded
    w2 = soft_mask(10, delay=12, end=5)
    assert w2.tolist() == [1.0] * 5 + [0.0] * 5
    with pytest.raises(ValueError, match="schedule"):
        soft_mask(5, 1, 3, schedule="cosine")


def test_guidance_weight_formula_and_clamp() -> None:
    assert guidance_weight(0.0, 5.0) == 5.0
    assert guidance_weight(1.0, 5.0) == 0.0
    tau = 0.6
    expected = ((1 - tau) / tau) * (tau**2 + (1 - tau) ** 2) / (1 - tau) ** 2
    assert guidance_weight(tau, 100.0) == pytest.approx(expected)
    assert guidance_weight(0.05, 3.0) == 3.0  # large raw weight is clamped to beta


def _linear_field(A: torch.Tensor, b: torch.Tensor):  # type: ignore[no-untyped-def]
    return lambda x, t: x @ A + b


def test_jacobian_free_correction_is_weighted_error() -> None:
    g = torch.Generator().manual_seed(0)
    H, D = 6, 3
    A, b = torch.randn(D, D, generator=g), torch.randn(D, generator=g)
    x = torch.randn(2, H, D, generator=g)
    Y = torch.randn(H, D, generator=g)
    W = soft_mask(H, 2, 5)
    cfg = RTCConfig(guidance="jacobian_free", max_guidance_weight=10.0)
    t = 0.7
    v = x @ A + b
    w = guidance_weight(1 - t, 10.0)
    expected = v - w * (Y - (x - t * v)) * W.view(1, -1, 1)
    out = guided_velocity(x, t, _linear_field(A, b), Y, W, cfg)
    torch.testing.assert_close(out, expected)


def test_vjp_correction_matches_analytic_jacobian() -> None:
    g = torch.Generator().manual_seed(1)
    H, D = 5, 4
    A, b = torch.randn(D, D, generator=g, dtype=torch.float64), torch.randn(D, generator=g, dtype=torch.float64)
    x = torch.randn(1, H, D, generator=g, dtype=torch.float64)
    Y = torch.randn(H, D, generator=g, dtype=torch.float64)
    W = soft_mask(H, 1, 4)
    cfg = RTCConfig(guidance="vjp", max_guidance_weight=10.0)
    t = 0.4
    v = x @ A + b
    err = (Y - (x - t * v)) * W.view(1, -1, 1).double()
    # A_hat = x (I - t A) + ...  => dA_hat/dx^T e = e (I - t A)^T
    g_analytic = err @ (torch.eye(D, dtype=torch.float64) - t * A).T
    expected = v - guidance_weight(1 - t, 10.0) * g_analytic
    out = guided_velocity(x, t, _linear_field(A, b), Y, W, cfg)
    torch.testing.assert_close(out, expected)
    # and it differs from the Jacobian-free variant (A is not zero)
    jf = guided_velocity(x, t, _linear_field(A, b), Y, W, RTCConfig(guidance="jacobian_free"))
    assert (jf - out).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["jacobian_free", "vjp"])
def test_guided_denoising_pulls_frozen_actions_to_previous_chunk(mode: str) -> None:
    """Toy flow with Gaussian data N(A0, s^2) and its exact velocity field v = (x - E[a|x]) / t.
    With RTC the first d actions end near the previous chunk Y; actions past the overlap are
    exactly those of the unguided run (the field acts per element, the mask is zero there)."""
    g = torch.Generator().manual_seed(2)
    H, D, steps, s2 = 10, 2, 10, 4.0
    A0 = torch.randn(H, D, generator=g)
    Y = A0 + 3.0  # previous chunk disagrees strongly
    noise = torch.randn(1, H, D, generator=g)

    def vfn(x: torch.Tensor, t: float) -> torch.Tensor:
        a_mean = A0 + (1 - t) * s2 / (t * t + (1 - t) ** 2 * s2) * (x - (1 - t) * A0)
        return (x - a_mean) / t

    def run(guided: bool) -> torch.Tensor:
        x, dt = noise.clone(), -1.0 / steps
        W = soft_mask(H, 3, 7)
        cfg = RTCConfig(guidance=mode, max_guidance_weight=5.0)
        for k in range(steps):
            t = 1.0 + k * dt
            v = guided_velocity(x, t, vfn, Y, W, cfg) if guided else vfn(x, t)
            x = x + dt * v
        return x[0]

    plain, guided = run(False), run(True)
    d_plain = (plain[:3] - Y[:3]).abs().mean()
    d_guided = (guided[:3] - Y[:3]).abs().mean()
    assert d_guided < 0.25 * d_plain, (d_guided, d_plain)
    torch.testing.assert_close(guided[7:], plain[7:], atol=1e-6, rtol=0)


def test_delay_estimator_percentile_cold_start_and_clamps() -> None:
    cfg = RTCConfig(delay_percentile=100.0, cold_start_calls=2, latency_window=5)
    est = DelayEstimator(cfg)
    assert est.delay_steps(0.1, available=20) == 0  # nothing measured yet
    est.record(5.0)  # cold start: excluded
    est.record(4.0)
    assert est.samples == 0
    for lat in (0.21, 0.25, 0.18):
        est.record(lat)
    assert est.latency() == pytest.approx(0.25)
    assert est.delay_steps(0.1, available=20) == 3  # ceil(0.25 / 0.1)
    assert est.delay_steps(0.1, available=2) == 2  # clamped to what is left
    assert est.delay_steps(0.1, available=20, committed_steps=6) == 6  # committed actions are frozen
    est.record(float("nan"))
    assert est.samples == 3
    for _ in range(10):
        est.record(0.05)
    assert est.samples == 5 and est.latency() == pytest.approx(0.05)


def test_align_previous_chunk_shifts_and_holds_last() -> None:
    prev = torch.arange(10, dtype=torch.float32).view(10, 1)
    aligned, valid = align_previous_chunk(prev, prev_stamp=1.0, new_stamp=1.3, step_period=0.1, horizon=10)
    assert valid == 7
    assert aligned[:7, 0].tolist() == [3, 4, 5, 6, 7, 8, 9]
    assert aligned[7:, 0].tolist() == [9, 9, 9]  # held, not zero-padded
    with pytest.raises(ValueError, match="new_stamp"):
        align_previous_chunk(prev, 1.0, 0.5, 0.1, 10)


def test_config_rejects_bad_values_naming_field() -> None:
    with pytest.raises(ValueError, match="max_guidance_weight"):
        RTCConfig(max_guidance_weight=-1.0)
    with pytest.raises(ValueError, match="guidance"):
        RTCConfig(guidance="magic")
