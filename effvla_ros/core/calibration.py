"""Data-driven calibration of the VLM early-exit thresholds (DeeR-VLA style, see
:mod:`effvla_ros.core.early_exit`).

On a calibration sequence (consecutive observations of real or simulated episodes), every
observation's prefix is computed fully; at each candidate exit layer the similarity of its hidden
states with the previous observation's (the quantity the exit criterion tests at run time) is
collected, and :func:`~effvla_ros.core.early_exit.calibrate_thresholds` picks per-exit thresholds so
that the target fractions of steps would exit at each layer.

In the same pass, each observation's chunk is denoised fully (fixed per-observation noise) and every
expert layer's input is recorded at every step; :func:`~effvla_ros.core.early_exit.calibrate_expert_thresholds`
then picks per-layer expert reuse thresholds so that the target fraction of layer evaluations would
be reused under the run-time rule (``full_steps``, ``max_consecutive``). Both go into one YAML.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from effvla_ros.core.early_exit import (
    ExpertReuseConfig,
    calibrate_expert_thresholds,
    calibrate_thresholds,
    expert_reuse_fraction,
    relative_change,
    token_similarity,
)
from effvla_ros.core.smolvla.policy import SmolVLAPolicy
from effvla_ros.core.stages import ExpertLayerContext, PrefillLayerInfo

Observation = tuple[Mapping[str, torch.Tensor], torch.Tensor, str]  # images (3,H,W) [0,1], state, instruction


@torch.no_grad()
def collect(policy: SmolVLAPolicy, observations: Iterable[Observation], exit_layers: list[int], *,
            expert_steps: int = 0, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One pass over the calibration observations.

    Returns (similarities (N-1, E) between consecutive observations at each exit layer (same
    instruction), expert changes: per expert layer (M, n, n) relative input changes between every
    pair of denoising steps of each observation's chunk (empty when ``expert_steps`` is 0)).
    """
    rows: list[list[float]] = []
    prev: dict[int, torch.Tensor] | None = None
    prev_instr: str | None = None
    prev_mask: torch.Tensor | None = None
    expert_layers = policy.expert_layer_indices()
    changes: dict[int, list[torch.Tensor]] = {i: [] for i in expert_layers}
    for k, (images, state, instruction) in enumerate(observations):
        enc = policy.encode_images({c: img[None] for c, img in images.items()})
        lang, lmask = policy.tokenize(instruction)
        hidden: dict[int, torch.Tensor] = {}

        def cb(info: PrefillLayerInfo, hidden: dict[int, torch.Tensor] = hidden) -> None:
            if info.layer_idx in exit_layers:
                hidden[info.layer_idx] = info.hidden_out.detach().clone()

        cache = policy.prefill(enc.tokens, lang, lmask, policy.prepare_state(state.reshape(1, -1)), layer_callback=cb)
        if prev is not None and instruction == prev_instr and prev_mask is not None \
                and prev_mask.shape == cache.pad_mask.shape:
            valid = cache.pad_mask & prev_mask
            rows.append([float(token_similarity(hidden[k], prev[k], valid)) for k in exit_layers])
        prev, prev_instr, prev_mask = hidden, instruction, cache.pad_mask
        if expert_steps > 0:
            inputs: dict[int, list[torch.Tensor]] = {i: [] for i in expert_layers}

            def hook(ctx: ExpertLayerContext, inputs: dict[int, list[torch.Tensor]] = inputs) -> torch.Tensor:
                inputs[ctx.layer_idx].append(ctx.hidden.detach().clone())
                return ctx.run(ctx.hidden)

            noise = torch.randn((1, policy.arch.chunk_size, policy.arch.max_action_dim),
                                generator=torch.Generator().manual_seed(seed + k))
            policy.denoise(cache, noise, expert_steps, expert_layer_hook=hook)
            for i, hs in inputs.items():
                m = torch.zeros(expert_steps, expert_steps, dtype=torch.float64)
                for a in range(expert_steps):
                    for b in range(a + 1, expert_steps):
                        m[a, b] = float(relative_change(hs[b], hs[a]))
                changes[i].append(m)
    if exit_layers and not rows:
        raise ValueError("calibration data: need at least two consecutive observations with the same instruction")
    sims = torch.tensor(rows, dtype=torch.float64) if rows else torch.zeros(0, len(exit_layers), dtype=torch.float64)
    return sims, [torch.stack(v) for v in changes.values() if v]


def exit_similarities(policy: SmolVLAPolicy, observations: Iterable[Observation],
                      exit_layers: list[int]) -> torch.Tensor:
    """(N-1, E) similarities between consecutive observations at each exit layer (same instruction)."""
    return collect(policy, observations, exit_layers)[0]


def calibrate(policy: SmolVLAPolicy, observations: Iterable[Observation], exit_layers: list[int] | None = None,
              *, ratio: float = 0.5, exit_fraction: float = 0.6, expert_reuse_fraction: float | None = 0.65,
              expert: ExpertReuseConfig | None = None, num_steps: int | None = None) -> dict[str, Any]:
    """VLM exit thresholds and (unless ``expert_reuse_fraction`` is None) expert reuse thresholds.

    ``expert``: the run-time rule the expert thresholds are calibrated for (``full_steps``,
    ``max_consecutive``; default :class:`ExpertReuseConfig`); ``num_steps``: denoising steps (default:
    the checkpoint's) — the per-step input changes depend on it, calibrate with the value you run.
    """
    layers = exit_layers or list(range(1, policy.arch.num_vlm_layers - 1))
    steps = (num_steps or policy.num_steps) if expert_reuse_fraction is not None else 0
    sims, changes = collect(policy, observations, layers, expert_steps=steps)
    return thresholds_from(sims, changes, layers, ratio=ratio, exit_fraction=exit_fraction,
                           expert_reuse_fraction=expert_reuse_fraction, expert=expert, num_steps=steps)


def thresholds_from(sims: torch.Tensor, changes: list[torch.Tensor], exit_layers: list[int], *, ratio: float = 0.5,
                    exit_fraction: float = 0.6, expert_reuse_fraction: float | None = 0.65,
                    expert: ExpertReuseConfig | None = None, num_steps: int = 0) -> dict[str, Any]:
    """The calibration result (the YAML's content) from :func:`collect`'s output."""
    cfg = expert or ExpertReuseConfig()
    thr = calibrate_thresholds(sims, ratio=ratio, exit_fraction=exit_fraction)
    res: dict[str, Any] = {
        "exit_layers": list(exit_layers), "thresholds": thr, "samples": int(sims.shape[0]), "ratio": ratio,
        "exit_fraction": exit_fraction,
        "similarity_mean": [float(x) for x in sims.mean(0)], "similarity_min": [float(x) for x in sims.min(0).values]}
    if expert_reuse_fraction is not None and changes:
        ethr = calibrate_expert_thresholds(changes, expert_reuse_fraction, cfg.full_steps, cfg.max_consecutive,
                                           cfg.final_steps)
        res.update({
            "expert_thresholds": ethr,
            "expert_reuse_fraction": float(expert_reuse_fraction),
            "expert_reuse_fraction_per_layer": [expert_reuse_fraction_of(ch, t, cfg) for ch, t in zip(changes, ethr)],
            "expert_full_steps": cfg.full_steps, "expert_final_steps": cfg.final_steps,
            "expert_max_consecutive": cfg.max_consecutive,
            "expert_num_steps": num_steps, "expert_samples": int(changes[0].shape[0])})
    return res


def expert_reuse_fraction_of(changes: torch.Tensor, threshold: float, cfg: ExpertReuseConfig) -> float:
    """Simulated reuse fraction of one layer on the calibration data at ``threshold``."""
    return float(expert_reuse_fraction(changes, threshold, cfg.full_steps, cfg.max_consecutive, cfg.final_steps))
