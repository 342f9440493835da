"""Training-only colour-permutation augmentation: recolour the cubes and rename them in the instruction.

Why. The most frequent failure of the policy trained on a few hundred layouts is picking the *other*
cube: with every layout seen under one colour pairing, the colour word is not reliably bound to the cube
of that colour (diagnosis in ``effvla_ros/assets/so101_pickplace/README.md``). Permuting the cube
colours of a sample, in its images and in its instruction together, keeps every action label valid (the
instructed cube is the same object at the same place) while the colour-word <-> cube pairing changes:
the only way to fit all variants of a sample is to read the colour word and find that colour. This is
the standard label-preserving augmentation for language-conditioned policies (cf. the colour / object
re-labelling augmentations of CLIPort, Shridhar et al. 2021, and ROSIE, Yu et al. 2023), done here in
pixel space because the scene is simple enough to segment by colour.

How. The recolourable colours are :data:`RECOLORABLE` (``red``, ``green``, ``blue``): nothing else in
the scene has their hue at high saturation (measured on the demos: 0 such pixels per scene frame, and only a
dark, less saturated steel blue in the wrist camera, excluded by :data:`MIN_SATURATION`). ``yellow`` is
never recoloured: the SO-101 arm is yellow. A pixel of cube colour ``a`` (hue window, saturation and
value thresholds) is modelled as the renderer's shading of its base colour, ``p = clip(k * a)`` (``k``:
the light reaching the pixel, above 1 on brightly lit faces, which clips the dominant channel; fitted by
least squares on the channels that are not clipped) and rewritten as ``clip(k * b)`` for the new base
colour ``b`` (:data:`effvla_ros.sim.task.COLORS`). Checked against MuJoCo renders of the same scene with
the cube colours exchanged (``test/test_train_color_swap.py``).

A permutation is drawn uniformly over the 6 permutations of :data:`RECOLORABLE` (identity included) and
applied to both cameras' images, the instruction's colour word (:func:`rename_instruction`) and the
per-colour grounding targets (:func:`permute_grounding`).

Measured (``effvla_ros/assets/so101_pickplace/README.md``): on the bundled checkpoint's data, training
with ``color_swap=0.75`` gave 2/50 closed-loop successes against 7/50 without, and did not reduce the
wrong-cube grasps; the bundled policy's failures are mostly imprecise grasps, not the colour binding.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from effvla_ros.sim.task import COLORS

RECOLORABLE: tuple[str, ...] = ("red", "green", "blue")
# hue windows in degrees (half-open), measured on 64 px renders of the scene and wrist cameras
HUE_WINDOWS: dict[str, tuple[tuple[float, float], ...]] = {
    "red": ((0.0, 20.0), (340.0, 360.0)),
    "green": ((90.0, 170.0),),
    "blue": ((190.0, 260.0),),
}
MIN_SATURATION = 0.65
MIN_VALUE = 0.12
CLIP_LEVEL = 254.5 / 255  # a channel at or above this is taken as clipped by the renderer


def _base_rgb(color: str) -> torch.Tensor:
    return torch.tensor(COLORS[color][:3], dtype=torch.float32)


def _hsv(img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(3, H, W) in [0, 1] -> hue (degrees), saturation, value, each (H, W)."""
    r, g, b = img[0], img[1], img[2]
    mx, _ = img.max(0)
    mn, _ = img.min(0)
    d = (mx - mn).clamp_min(1e-6)
    h = torch.where(mx == r, torch.remainder((g - b) / d, 6.0),
                    torch.where(mx == g, (b - r) / d + 2.0, (r - g) / d + 4.0)) * 60.0
    s = torch.where(mx > 0, (mx - mn) / mx.clamp_min(1e-6), torch.zeros_like(mx))
    return h, s, mx


def color_mask(img: torch.Tensor, color: str) -> torch.Tensor:
    """(3, H, W) float image in [0, 1] -> (H, W) bool: pixels of a cube of ``color`` (one of RECOLORABLE)."""
    if color not in HUE_WINDOWS:
        raise ValueError(f"color {color!r} is not recolourable (have {RECOLORABLE})")
    h, s, v = _hsv(img)
    m = torch.zeros_like(h, dtype=torch.bool)
    for lo, hi in HUE_WINDOWS[color]:
        m |= (h >= lo) & (h < hi)
    return m & (s > MIN_SATURATION) & (v > MIN_VALUE)


def recolor(img: torch.Tensor, mapping: Mapping[str, str]) -> torch.Tensor:
    """(3, H, W) float image in [0, 1] -> a recoloured copy: pixels of colour ``a`` become colour
    ``mapping[a]`` (shading kept, see the module docstring). All masks are taken from the input image, so
    a swap ``{red: blue, blue: red}`` does not chain."""
    moves = {a: b for a, b in mapping.items() if a != b}
    if not moves:
        return img
    out = img.clone()
    masks = {a: color_mask(img, a) for a in moves}
    for a, b in moves.items():
        m = masks[a]
        if not bool(m.any()):
            continue
        p = img[:, m]                                                 # (3, N)
        av, bv = _base_rgb(a), _base_rgb(b)
        # p = clip(k a): least squares for k over the channels that are not clipped at 1
        free = (p < CLIP_LEVEL).to(p.dtype)                            # (3, N)
        num = (free * av[:, None] * p).sum(0)
        den = (free * av[:, None] ** 2).sum(0)
        k = torch.where(den > 0, num / den.clamp_min(1e-9), torch.full_like(num, 1.0 / float(av.min())))
        out[:, m] = (k[None] * bv[:, None]).clamp(0.0, 1.0)
    return out


def random_permutation(rng: np.random.Generator) -> dict[str, str]:
    """A uniformly drawn permutation of RECOLORABLE (identity included) as {old colour: new colour}."""
    perm = rng.permutation(len(RECOLORABLE))
    return {a: RECOLORABLE[int(j)] for a, j in zip(RECOLORABLE, perm, strict=True)}


def rename_instruction(instruction: str, mapping: Mapping[str, str]) -> str:
    """Replace every colour word of ``instruction`` by its image under ``mapping`` (simultaneously)."""
    if not mapping:
        return instruction
    pattern = re.compile(r"\b(" + "|".join(re.escape(c) for c in mapping) + r")\b")
    return pattern.sub(lambda mt: mapping[mt.group(1)], instruction)


def permute_grounding(targets: torch.Tensor, mask: torch.Tensor, mapping: Mapping[str, str],
                      colors: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-colour (x, y) grounding targets of one sample moved to their new colours.

    ``targets`` / ``mask``: (N_TARGETS,) as :func:`effvla_ros.train.grounding.grounding_targets`, whose first
    ``2 * len(colors)`` entries are the (x, y) of each colour in ``colors`` order."""
    t, m = targets.clone(), mask.clone()
    for a, b in mapping.items():
        ia, ib = 2 * colors.index(a), 2 * colors.index(b)
        t[ib: ib + 2], m[ib: ib + 2] = targets[ia: ia + 2], mask[ia: ia + 2]
    return t, m
