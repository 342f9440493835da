"""Data-driven calibration of the VLM early-exit thresholds (DeeR-VLA style, see
:mod:`effvla_ros.core.early_exit`).

On a calibration sequence (consecutive observations of real or simulated episodes), every
observation's prefix is computed fully; at each candidate exit layer the similarity of its hidden
states with the previous observation's (the quantity the exit criterion tests at run time) is
collected, and :func:`~effvla_ros.core.early_exit.calibrate_thresholds` picks per-exit thresholds so
that the target fractions of steps would exit at each layer.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from effvla_ros.core.early_exit import calibrate_thresholds, token_similarity
from effvla_ros.core.smolvla.policy import PrefillLayerInfo, SmolVLAPolicy

Observation = tuple[Mapping[str, torch.Tensor], torch.Tensor, str]  # images (3,H,W) [0,1], state, instruction


@torch.no_grad()
def exit_similarities(policy: SmolVLAPolicy, observations: Iterable[Observation],
                      exit_layers: list[int]) -> torch.Tensor:
    """(N-1, E) similarities between consecutive observations at each exit layer (same instruction)."""
    rows: list[list[float]] = []
    prev: dict[int, torch.Tensor] | None = None
    prev_instr: str | None = None
    prev_mask: torch.Tensor | None = None
    for images, state, instruction in observations:
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
            rows.append([token_similarity(hidden[k], prev[k], valid) for k in exit_layers])
        prev, prev_instr, prev_mask = hidden, instruction, cache.pad_mask
    if not rows:
        raise ValueError("calibration data: need at least two consecutive observations with the same instruction")
    return torch.tensor(rows, dtype=torch.float64)


def calibrate(policy: SmolVLAPolicy, observations: Iterable[Observation], exit_layers: list[int] | None = None,
              *, ratio: float = 0.5, exit_fraction: float = 0.6) -> dict[str, Any]:
    layers = exit_layers or list(range(1, policy.arch.num_vlm_layers - 1))
    sims = exit_similarities(policy, observations, layers)
    thr = calibrate_thresholds(sims, ratio=ratio, exit_fraction=exit_fraction)
    return {"exit_layers": layers, "thresholds": thr, "samples": int(sims.shape[0]), "ratio": ratio,
            "exit_fraction": exit_fraction,
            "similarity_mean": [float(x) for x in sims.mean(0)], "similarity_min": [float(x) for x in sims.min(0).values]}
