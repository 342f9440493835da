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
  rest is denoised; the velocity gets a per-token time (B, S) then.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Velocity = Callable[[Tensor, Tensor, int], Tensor]      # (x_t (B,S,A) fp32, t (B,) or (B,S) fp32, step) -> v
Guide = Callable[[int, float, Tensor, Tensor], Tensor]  # (step, t, x_t, v_t) -> replacement velocity


def euler_integrate(velocity: Velocity, noise: Tensor, num_steps: int, *, guide: Guide | None = None,
                    prefix: Tensor | None = None, trace: dict[str, list[Tensor]] | None = None) -> Tensor:
    """Integrate ``velocity`` from ``noise`` (B, S, A) at t = 1 to t = 0 in ``num_steps`` Euler steps; returns x_0
    (B, S, A) fp32. ``trace`` (when given) receives x_t, t and v_t of every step (the velocity used)."""
    if num_steps < 1:
        raise ValueError(f"num_steps: must be >= 1, got {num_steps}")
    x = noise.to(torch.float32)
    b, s = x.shape[:2]
    dt = -1.0 / num_steps
    d = 0 if prefix is None else int(prefix.shape[-2])
    if prefix is not None:
        if d > s:
            raise ValueError(f"prefix: {d} committed actions for a chunk of {s}")
        prefix = prefix.to(x.device, torch.float32).expand(b, d, x.shape[-1])
    for step in range(num_steps):
        t_now = 1.0 + step * dt
        t = torch.full((b,), t_now, dtype=torch.float32, device=x.device)
        if prefix is not None and d > 0:
            x = torch.cat([prefix, x[:, d:]], dim=1)
            t = t[:, None].repeat(1, s)                                        # (B, S) per-token time
            t[:, :d] = 0.0                                                      # the prefix is data
        v = velocity(x, t, step)
        if guide is not None:
            v = guide(step, t_now, x, v).detach().to(torch.float32)
        if trace is not None:
            trace.setdefault("x_t", []).append(x)
            trace.setdefault("t", []).append(t)
            trace.setdefault("v_t", []).append(v)
        x = x + dt * v
    if prefix is not None and d > 0:
        x = torch.cat([prefix, x[:, d:]], dim=1)
    return x
