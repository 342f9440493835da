"""The one Euler integrator of the flow-matching action expert, shared by every backend.

SmolVLA / pi0 (Black et al., arXiv 2410.24164; LeRobot ``policies/common/flow_matching.py``) sample an
action chunk by integrating the learned velocity from t = 1 (noise) to t = 0 (actions)::

    x <- x + dt * v(x, t),   dt = -1 / num_steps,   t = 1, 1 - 1/n, ..., 1/n

The velocity is an opaque function (a backend's expert evaluation); what changes the sampling is
written here once:

* ``guide(step, t, x, v) -> v'`` replaces the velocity after it is computed: inference-time real-time
  chunking (guided inpainting, :func:`effvla_ros.core.rtc.guided_velocity`, arXiv 2506.07339);
* ``prefix`` (B, d, A): training-time real-time chunking (arXiv 2512.05964): the first d actions are the
  committed prefix, held clean (their flow time 0, their x reset to the prefix at every step) while the
  rest is denoised; the velocity gets a per-token time (B, S) then. Training gives the same prefix
  (:func:`rtc_training_time`): d ~ U{0..max_delay} per sample, the first d actions at t = 0 (clean, x_t = a)
  and out of the loss, so the policy learns to continue a committed prefix.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Velocity = Callable[[Tensor, Tensor, int], Tensor]      # (x_t (B,S,A) fp32, t (B,) or (B,S) fp32, step) -> v
Guide = Callable[[int, float, Tensor, Tensor], Tensor]  # (step, t, x_t, v_t) -> replacement velocity


def sample_flow_time(batch: int) -> Tensor:
    """Training flow times (B,): Beta(1.5, 1) * 0.999 + 0.001 (LeRobot's ``sample_time``)."""
    beta = torch.distributions.Beta(torch.tensor(1.5), torch.tensor(1.0))
    return beta.sample((batch,)) * 0.999 + 0.001


def rtc_training_time(t: Tensor, delays: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """Training-time RTC (arXiv 2512.05964): per-token flow time (B, S) from a per-sample time ``t`` (B,) and
    committed-prefix lengths ``delays`` (B,) - the first d_b actions of sample b at t = 0 (clean) - and the
    prefix mask (B, S) bool (True: committed, left out of the loss)."""
    pos = torch.arange(chunk, device=t.device)[None, :]
    prefix = pos < delays.to(t.device)[:, None]
    return torch.where(prefix, torch.zeros((), dtype=t.dtype, device=t.device), t[:, None].expand(-1, chunk)), prefix


def euler_integrate(velocity: Velocity, noise: Tensor, num_steps: int, *, guide: Guide | None = None,
                    prefix: Tensor | None = None, prefix_mask: Tensor | None = None,
                    trace: dict[str, list[Tensor]] | None = None) -> Tensor:
    """Integrate ``velocity`` from ``noise`` (B, S, A) at t = 1 to t = 0 in ``num_steps`` Euler steps; returns x_0
    (B, S, A) fp32. ``trace`` (when given) receives x_t, t and v_t of every step (the velocity used).

    ``prefix``: the committed actions (training-time RTC), either the first d (B, d, A), or - static shapes, a CUDA
    graph's buffers - all S rows (B or 1, S, A) with ``prefix_mask`` (S,) bool marking the committed ones."""
    if num_steps < 1:
        raise ValueError(f"num_steps: must be >= 1, got {num_steps}")
    x = noise.to(torch.float32)
    b, s = x.shape[:2]
    dt = -1.0 / num_steps
    held: tuple[Tensor, Tensor, Tensor] | None = None  # (values (B, S, A), mask (1, S, 1), free-time factor (1, S))
    if prefix is not None:
        prefix = prefix.to(x.device, torch.float32)
        if prefix_mask is None:
            d = int(prefix.shape[-2])
            if d > s:
                raise ValueError(f"prefix: {d} committed actions for a chunk of {s}")
            prefix_mask = torch.arange(s, device=x.device) < d
            prefix = torch.cat([prefix.expand(b, d, x.shape[-1]), x.new_zeros(b, s - d, x.shape[-1])], dim=1)
        elif prefix.shape[-2] != s or prefix_mask.shape != (s,):
            raise ValueError(f"prefix: {tuple(prefix.shape)} with a mask of {tuple(prefix_mask.shape)} for a chunk of {s}")
        m = prefix_mask.to(x.device, torch.bool)
        held = (prefix.expand(b, s, x.shape[-1]), m.view(1, s, 1), (~m).to(torch.float32)[None])
    for step in range(num_steps):
        t_now = 1.0 + step * dt
        t = torch.full((b,), t_now, dtype=torch.float32, device=x.device)
        if held is not None:
            x = torch.where(held[1], held[0], x)                               # the prefix is data ...
            t = t[:, None] * held[2]                                            # ... at t = 0: (B, S) per-token time
        v = velocity(x, t, step)
        if guide is not None:
            v = guide(step, t_now, x, v).detach().to(torch.float32)
        if trace is not None:
            trace.setdefault("x_t", []).append(x)
            trace.setdefault("t", []).append(t)
            trace.setdefault("v_t", []).append(v)
        x = x + dt * v
    if held is not None:
        x = torch.where(held[1], held[0], x)
    return x
