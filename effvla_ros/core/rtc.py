"""Real-time chunking (RTC): guided inpainting of a new action chunk toward the still-unexecuted
part of the previous one, during flow-matching denoising.

Reference: K. Black, M. Y. Galliker, S. Levine, "Real-Time Execution of Action Chunking Flow
Policies", 2025 (arXiv 2506.07339), and its code (real-time-chunking-kinetix). LeRobot 0.6.1 ships a
Jacobian-free variant; both are provided here.

Conventions (LeRobot/SmolVLA): flow time ``t`` runs from 1 (noise) to 0 (actions); Euler steps
``x <- x + dt * v`` with ``dt = -1/num_steps``; the velocity points from actions to noise, so the
clean-action estimate is ``A_hat = x - t * v``. With ``tau = 1 - t`` (the paper's time):

* soft mask ``W_i`` (chunk index i, length H): 1 for ``i < d`` (actions that will execute while
  this chunk is computed: the inference delay), decaying over ``d <= i < end`` with
  ``c_i = (end - i) / (end - d + 1)`` (``exp``: ``c_i (e^{c_i} - 1)/(e - 1)``, ``linear``: ``c_i``),
  0 for ``i >= end`` where ``end`` is where the previous chunk's actions run out (the paper's
  ``H - s``), never past the real leftover (no zero padding);
* guidance weight ``w = min(beta, ((1 - tau)/tau) * (tau^2 + (1 - tau)^2) / (1 - tau)^2)``
  (``inf`` at ``tau = 0`` becomes ``beta``);
* weighted error ``e = (Y - A_hat) * W``;
* correction ``g``: ``vjp`` — the vector-Jacobian product ``(dA_hat/dx)^T e`` through the action
  expert (one backward pass per step, as in the paper's code); ``jacobian_free`` — ``g = e``
  (LeRobot 0.6.1: its autograd correction reduces to the weighted error because the velocity is
  computed before the input requires grad);
* guided velocity ``v - w * g`` (the paper's ``v + w g`` with time reversed).

The target's bookkeeping (issued chunks, :func:`~effvla_ros.core.chunking.guidance_toward`) is in
:mod:`effvla_ros.core.chunking`.
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from effvla_ros.core.params import ConfigBase, param

VelocityFn = Callable[[torch.Tensor, float], torch.Tensor]


@dataclass
class RTCConfig(ConfigBase):
    """Real-time chunking settings (ROS parameters of the policy node under ``rtc.``)."""

    enabled: bool = param(True, description="guide each new chunk toward the previous chunk's unexecuted actions")
    mode: str = param("guided", choices=("guided", "trained"),
                      description="guided: inference-time guidance toward the previous chunk (arXiv 2506.07339); "
                                  "trained: condition on its committed first d actions (training-time RTC, arXiv "
                                  "2512.05964; needs a checkpoint trained so)")
    guidance: str = param("jacobian_free", choices=("jacobian_free", "vjp"),
                          description="correction: weighted error (LeRobot, no backward pass) or the true "
                                      "vector-Jacobian product through the action expert (paper)")
    max_guidance_weight: float = param(10.0, min=0.0, max=100.0,
                                       description="beta: clamp of the guidance weight (paper 5 for 5 steps, "
                                                   "LeRobot 10 for 10 steps)")
    schedule: str = param("exp", choices=("exp", "linear"), description="decay of the soft mask over the overlap")
    delay_percentile: float = param(95.0, min=50.0, max=100.0,
                                    description="percentile of measured inference latency used for the delay d")
    latency_window: int = param(20, min=1, max=1000, description="number of recent latencies kept")
    cold_start_calls: int = param(2, min=0, max=100,
                                  description="first inferences excluded from the latency statistics (warm-up)")
    max_delay_steps: int = param(50, min=0, max=1000, description="upper bound of d in control steps")


def guidance_weight(tau: float, beta: float) -> float:
    """min(beta, ((1-tau)/tau) * (tau^2 + (1-tau)^2) / (1-tau)^2), with tau the paper's flow time."""
    if tau <= 0.0:
        return float(beta)
    if tau >= 1.0:
        return 0.0
    w = ((1.0 - tau) / tau) * (tau * tau + (1.0 - tau) ** 2) / (1.0 - tau) ** 2
    return float(min(beta, w))


def soft_mask(horizon: int, delay: int, end: int, schedule: str = "exp") -> torch.Tensor:
    """Per-action guidance mask of shape (horizon,): 1 before ``delay``, decaying to ``end``, then 0."""
    if horizon <= 0:
        raise ValueError("horizon: must be positive")
    end = max(0, min(int(end), horizon))
    d = max(0, min(int(delay), end))
    w = torch.zeros(horizon, dtype=torch.float32)
    w[:d] = 1.0
    if end > d:
        i = torch.arange(d, end, dtype=torch.float32)
        c = (end - i) / (end - d + 1)
        if schedule == "exp":
            w[d:end] = c * (torch.exp(c) - 1.0) / (math.e - 1.0)
        elif schedule == "linear":
            w[d:end] = c
        else:
            raise ValueError(f"schedule: {schedule!r} is not one of ['exp', 'linear']")
    return w


@dataclass
class GuidanceTarget:
    """What the new chunk is guided toward, in the new chunk's time frame.

    ``actions``: (H, D_max) previous chunk's actions aligned so that row i targets the new chunk's
    action i (normalized, same padding as the model's action space); rows past ``valid`` repeat
    the last valid row (never zeros) and are masked out. ``delay``: d in steps. ``ref_state``: the raw
    state the previous chunk was predicted from; needed (and used to re-base ``actions`` onto the new
    observation's state) only by checkpoints with relative actions (``SmolVLAArch.relative_action_dims``).
    """

    actions: torch.Tensor
    valid: int
    delay: int
    source_chunk_id: int = 0
    ref_state: torch.Tensor | None = None


def align_previous_chunk(
    prev_actions: torch.Tensor,
    prev_stamp: float,
    new_stamp: float,
    step_period: float,
    horizon: int,
) -> tuple[torch.Tensor, int]:
    """Shift the previous chunk (H_prev, D) to the new chunk's frame: row i <-> time new_stamp + i*dt.

    Returns (aligned (horizon, D), number of valid rows). Rows after the previous chunk's end hold
    its last action (masked out by the caller through ``valid``).
    """
    if step_period <= 0:
        raise ValueError("step_period: must be positive")
    offset = int(round((new_stamp - prev_stamp) / step_period))
    n_prev = prev_actions.shape[0]
    if offset < 0:
        raise ValueError("new_stamp: older than the previous chunk's stamp")
    valid = max(0, min(horizon, n_prev - offset))
    idx = torch.clamp(torch.arange(horizon) + offset, max=n_prev - 1)
    return prev_actions[idx].clone(), valid


class DelayEstimator:
    """Inference delay d in control steps from measured latencies (a high percentile).

    Cold-start latencies (the first ``cold_start_calls``) are excluded; d is clamped to what the
    executor actually has left of the previous chunk and raised to cover actions already committed.
    """

    def __init__(self, cfg: RTCConfig) -> None:
        self.cfg = cfg
        self._lat: deque[float] = deque(maxlen=cfg.latency_window)
        self._seen = 0

    def reconfigure(self, cfg: RTCConfig) -> None:
        self.cfg = cfg
        self._lat = deque(self._lat, maxlen=cfg.latency_window)

    def record(self, latency_s: float) -> None:
        self._seen += 1
        if self._seen > self.cfg.cold_start_calls and math.isfinite(latency_s) and latency_s >= 0:
            self._lat.append(latency_s)

    @property
    def samples(self) -> int:
        return len(self._lat)

    def latency(self) -> float | None:
        if not self._lat:
            return None
        xs = sorted(self._lat)
        k = (len(xs) - 1) * self.cfg.delay_percentile / 100.0
        lo, hi = math.floor(k), math.ceil(k)
        return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)

    def delay_steps(self, step_period: float, available: int, committed_steps: int = 0) -> int:
        """d = ceil(p-latency / dt), at least the committed steps, at most ``available`` (and the cap)."""
        lat = self.latency()
        d = 0 if lat is None else math.ceil(lat / step_period - 1e-9)
        d = max(d, committed_steps)
        return int(max(0, min(d, available, self.cfg.max_delay_steps)))


def guided_velocity(
    x_t: torch.Tensor,
    t: float,
    velocity_fn: VelocityFn,
    target: torch.Tensor,
    mask: torch.Tensor,
    cfg: RTCConfig,
    v_t: torch.Tensor | None = None,
) -> torch.Tensor:
    """RTC-guided velocity at flow time ``t`` (1 = noise).

    x_t: (B, H, D); target: (H, D) or (B, H, D); mask: (H,). ``velocity_fn(x, t)`` must be
    differentiable in x for ``guidance='vjp'``. ``v_t`` (the unguided velocity) may be passed to save
    a forward pass in the Jacobian-free mode.
    """
    tau = 1.0 - float(t)
    w = guidance_weight(tau, cfg.max_guidance_weight)
    W = mask.to(x_t.dtype).view(1, -1, 1)
    Y = target.to(x_t.dtype)
    if Y.dim() == 2:
        Y = Y.unsqueeze(0)
    if cfg.guidance == "vjp":
        with torch.enable_grad():
            x = x_t.detach().requires_grad_(True)
            v = velocity_fn(x, t)
            a_hat = x - t * v
            err = (Y - a_hat) * W
            (g,) = torch.autograd.grad(a_hat, x, grad_outputs=err.detach())
        return (v.detach() - w * g).to(x_t.dtype)
    v = velocity_fn(x_t, t) if v_t is None else v_t
    a_hat = x_t - t * v
    err = (Y - a_hat) * W
    return v - w * err
