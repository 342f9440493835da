"""Frame pieces drawn with OpenCV (numpy ``uint8`` RGB images).

* :func:`token_overlay`: a policy camera image upscaled (nearest neighbour: what the policy saw) with
  its token grid: **pruned** tokens dimmed to :data:`DIM`, **kept** tokens outlined in
  :data:`KEPT_COLOR`, kept tokens **recomputed** by the encoder this frame (not taken from the
  temporal-reuse cache) tinted with :data:`RECOMPUTED_COLOR` (alpha :data:`TINT_ALPHA`); kept tokens
  reused from an earlier frame keep their pixels.
* :func:`chunk_panel`: per joint, the executed trajectory and every action chunk received so far
  (older ones faded, the newest bold) against time, with a "now" line.
* :func:`text_strip`, :func:`label`, :func:`hstack` / :func:`vstack`: layout.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

DIM = 0.3  # brightness factor of pruned tokens
KEPT_COLOR = (80, 255, 80)  # outline of kept tokens (RGB)
RECOMPUTED_COLOR = (255, 120, 0)  # tint of recomputed kept tokens (RGB)
TINT_ALPHA = 0.4
BG = (24, 24, 28)
FG = (235, 235, 235)
EXEC_COLOR = (240, 240, 240)
CHUNK_COLOR = np.array([90, 170, 255], dtype=np.float64)  # newest chunk; older chunks fade toward the background
FONT = cv2.FONT_HERSHEY_SIMPLEX


@dataclass
class TokenView:
    """The token state of one camera frame: the grid, kept indices (into the row-major grid), and per kept
    token whether it was reused from an earlier frame (``None``: unknown, nothing tinted)."""

    grid: tuple[int, int]
    kept: Sequence[int]
    reused: Sequence[bool] | None = None


def cell_bounds(grid: tuple[int, int], size: tuple[int, int], index: int) -> tuple[int, int, int, int]:
    """Pixel box (y0, y1, x0, x1) of token ``index`` of a row-major ``grid`` in an image of ``size`` (h, w)."""
    gh, gw = grid
    h, w = size
    r, c = divmod(int(index), gw)
    return r * h // gh, (r + 1) * h // gh, c * w // gw, (c + 1) * w // gw


def token_overlay(image: np.ndarray, tokens: TokenView | None, size: int = 320, outline: int = 2) -> np.ndarray:
    """``image`` (H, W, 3) uint8 upscaled to ``size`` x ``size`` with the token overlay (see the module doc).
    ``tokens`` None (no token message for this frame): the image alone."""
    out = cv2.resize(np.ascontiguousarray(image[..., :3]), (size, size), interpolation=cv2.INTER_NEAREST)
    if tokens is None:
        return out
    gh, gw = tokens.grid
    n = gh * gw
    if n <= 0:
        return out
    kept = [int(i) for i in tokens.kept if 0 <= int(i) < n]
    reused = list(tokens.reused) if tokens.reused is not None else None
    kept_mask = np.zeros(n, dtype=bool)
    kept_mask[kept] = True
    f = out.astype(np.float32)
    for p in np.flatnonzero(~kept_mask).tolist():
        y0, y1, x0, x1 = cell_bounds((gh, gw), (size, size), p)
        f[y0:y1, x0:x1] *= DIM
    if reused is not None and len(reused) == len(kept):
        tint = np.asarray(RECOMPUTED_COLOR, dtype=np.float32)
        for k, r in zip(kept, reused):
            if not r:
                y0, y1, x0, x1 = cell_bounds((gh, gw), (size, size), k)
                f[y0:y1, x0:x1] = (1 - TINT_ALPHA) * f[y0:y1, x0:x1] + TINT_ALPHA * tint
    out = np.clip(f + 0.5, 0, 255).astype(np.uint8)
    for i in kept:
        y0, y1, x0, x1 = cell_bounds((gh, gw), (size, size), i)
        cv2.rectangle(out, (x0, y0), (x1 - 1, y1 - 1), KEPT_COLOR, outline)
    return out


def label(img: np.ndarray, text: str, org: tuple[int, int] = (6, 18), scale: float = 0.5,
          color: tuple[int, int, int] = FG, shadow: bool = True) -> np.ndarray:
    """Draw ``text`` at ``org`` (x, y of the baseline) in place (``shadow``: on a dark box for contrast); returns
    ``img``."""
    if shadow:
        (w, h), base = cv2.getTextSize(text, FONT, scale, 1)
        y0, y1 = max(org[1] - h - 3, 0), min(org[1] + base + 1, img.shape[0])
        x0, x1 = max(org[0] - 3, 0), min(org[0] + w + 3, img.shape[1])
        img[y0:y1, x0:x1] = (img[y0:y1, x0:x1].astype(np.float32) * 0.35).astype(np.uint8)
    cv2.putText(img, text, org, FONT, scale, color, 1, cv2.LINE_AA)
    return img


def text_strip(width: int, height: int, lines: Sequence[str | tuple[str, tuple[int, int, int]]],
               scale: float = 0.5) -> np.ndarray:
    """A ``height`` x ``width`` strip with one text line per entry (str, or (str, RGB colour))."""
    img = np.full((height, width, 3), BG, dtype=np.uint8)
    step = max(int(height / max(len(lines), 1)), 1)
    for k, item in enumerate(lines):
        text, color = (item, FG) if isinstance(item, str) else item
        label(img, text, (8, k * step + int(step * 0.72)), scale, color, shadow=False)
    return img


def legend(width: int, height: int) -> np.ndarray:
    """The token colour key: kept (outlined), recomputed (tinted), pruned (dimmed)."""
    img = np.full((height, width, 3), BG, dtype=np.uint8)
    y = height // 2
    x = 8
    for name, kind in (("kept token", "kept"), ("recomputed (not reused)", "tint"), ("pruned", "dim")):
        box = (x, y - 7, x + 14, y + 7)
        if kind == "kept":
            cv2.rectangle(img, box[:2], box[2:], KEPT_COLOR, 2)
        elif kind == "tint":
            cv2.rectangle(img, box[:2], box[2:], RECOMPUTED_COLOR, -1)
            cv2.rectangle(img, box[:2], box[2:], KEPT_COLOR, 2)
        else:
            cv2.rectangle(img, box[:2], box[2:], (60, 60, 60), -1)
        label(img, name, (x + 20, y + 5), 0.45, FG, shadow=False)
        x += 20 + cv2.getTextSize(name, FONT, 0.45, 1)[0][0] + 24
    key = "panel: executed (white), chunks (blue, newest bold), now (grey)"
    kw = cv2.getTextSize(key, FONT, 0.4, 1)[0][0]
    if x + kw + 8 <= width:
        label(img, key, (width - kw - 8, y + 5), 0.4, (170, 170, 170), shadow=False)
    return img


@dataclass
class Chunk:
    """One action chunk for the panel: received at ``t_recv``; action i is the target for ``t0 + i * dt``."""

    t_recv: float
    t0: float
    dt: float
    actions: np.ndarray  # (H, J)


def joint_ranges(executed: np.ndarray, chunks: Sequence[Chunk], pad: float = 0.08) -> np.ndarray:
    """(J, 2) y-range per joint covering the executed values and every chunk (fixed over an episode)."""
    cols = [np.asarray(executed, dtype=np.float64).reshape(-1, executed.shape[-1])] if np.size(executed) else []
    cols += [np.asarray(c.actions, dtype=np.float64) for c in chunks]
    if not cols:
        return np.zeros((0, 2))
    allv = np.concatenate(cols, axis=0)
    lo, hi = np.nanmin(allv, axis=0), np.nanmax(allv, axis=0)
    span = np.maximum(hi - lo, 1e-3)
    return np.stack([lo - pad * span, hi + pad * span], axis=1)


def chunk_panel(width: int, height: int, t_now: float, t_exec: np.ndarray, q_exec: np.ndarray,
                chunks: Sequence[Chunk], names: Sequence[str], ranges: np.ndarray | None = None,
                window: tuple[float, float] = (6.0, 2.0), cols: int = 3, max_chunks: int = 8) -> np.ndarray:
    """Per joint (a grid of ``cols`` columns): the executed trajectory ``q_exec`` (T, J) at times ``t_exec`` up to
    ``t_now`` (white) and the chunks received by ``t_now`` (the newest bold, the ``max_chunks - 1`` before it
    fading), over ``[t_now - window[0], t_now + window[1]]``; a vertical line at ``t_now``."""
    img = np.full((height, width, 3), BG, dtype=np.uint8)
    n = len(names)
    if n == 0:
        return img
    rows = (n + cols - 1) // cols
    cw, ch = width // cols, height // rows
    t_exec = np.asarray(t_exec, dtype=np.float64)
    q_exec = np.asarray(q_exec, dtype=np.float64).reshape(len(t_exec), -1) if len(t_exec) else np.zeros((0, n))
    seen = [c for c in chunks if c.t_recv <= t_now][-max_chunks:]
    if ranges is None:
        ranges = joint_ranges(q_exec, seen)
    t_lo, t_hi = t_now - window[0], t_now + window[1]
    m = 6  # margin (px)
    for j, name in enumerate(names):
        r, c = divmod(j, cols)
        x0, y0 = c * cw + m, r * ch + 16
        x1, y1 = (c + 1) * cw - m, (r + 1) * ch - m
        cv2.rectangle(img, (x0, y0), (x1, y1), (60, 60, 66), 1)
        label(img, name, (x0 + 2, r * ch + 12), 0.4, FG, shadow=False)
        lo, hi = (ranges[j] if j < len(ranges) else (-1.0, 1.0))

        def px(t: np.ndarray, v: np.ndarray, lo: float = lo, hi: float = hi, x0: int = x0, x1: int = x1,
               y0: int = y0, y1: int = y1) -> np.ndarray:
            x = x0 + (t - t_lo) / (t_hi - t_lo) * (x1 - x0)
            y = y1 - (v - lo) / max(hi - lo, 1e-9) * (y1 - y0)
            return np.stack([x, y], axis=1).round().astype(np.int32)

        xn = int(round(x0 + (t_now - t_lo) / (t_hi - t_lo) * (x1 - x0)))
        cv2.line(img, (xn, y0), (xn, y1), (110, 110, 120), 1)
        for k, chk in enumerate(seen):
            a = np.asarray(chk.actions, dtype=np.float64)
            if a.ndim != 2 or j >= a.shape[1]:
                continue
            t = chk.t0 + chk.dt * np.arange(a.shape[0])
            newest = k == len(seen) - 1
            fade = 1.0 if newest else 0.25 + 0.5 * (k + 1) / len(seen)
            color = tuple(int(v) for v in (np.asarray(BG) * (1 - fade) + CHUNK_COLOR * fade))
            pts = px(t, a[:, j])
            cv2.polylines(img, [pts.reshape(-1, 1, 2)], False, color, 2 if newest else 1, cv2.LINE_AA)
        sel = (t_exec >= t_lo - 0.1) & (t_exec <= t_now)
        if sel.sum() >= 2 and j < q_exec.shape[1]:
            pts = px(t_exec[sel], q_exec[sel, j])
            cv2.polylines(img, [pts.reshape(-1, 1, 2)], False, EXEC_COLOR, 2, cv2.LINE_AA)
    return img


def hstack(images: Sequence[np.ndarray]) -> np.ndarray:
    h = max(i.shape[0] for i in images)
    return np.concatenate([np.pad(i, ((0, h - i.shape[0]), (0, 0), (0, 0))) for i in images], axis=1)


def vstack(images: Sequence[np.ndarray]) -> np.ndarray:
    w = max(i.shape[1] for i in images)
    return np.concatenate([np.pad(i, ((0, 0), (0, w - i.shape[1]), (0, 0))) for i in images], axis=0)
