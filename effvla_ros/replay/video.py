"""``effvla replay --video``: the bag's cameras with each setting's token overlay, side by side.

Per observation of the replay, one frame: a column per setting (baseline first), a row per camera;
each cell is the camera image upscaled with that setting's kept tokens outlined, pruned tokens dimmed
and recomputed (not reused) tokens tinted (:func:`effvla_ros.viz.overlay.token_overlay`), under a strip
with the observation, its time and instruction, and per setting the tokens kept / recomputed and the
encoder compute fraction of the frame.

The token decisions come from a fresh :class:`~effvla_ros.core.compression.compressor.TokenCompressor`
per setting fed the episode's images in order, as :func:`effvla_ros.replay.evaluate.run_setting` does
(same configs, same inputs, so the same kept indices and reuse decisions; only the encoder runs again,
not the VLM or the expert).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from effvla_ros.viz.overlay import BG, TokenView, hstack, label, text_strip, token_overlay, vstack
from effvla_ros.viz.video import VideoWriter

STRIP_H = 44


def setting_tokens(policy: Any, episode: Any, setting: Any) -> list[dict[str, tuple[TokenView, int, int]]]:
    """Per observation, per camera: (TokenView, encoder FLOPs spent, FLOPs of a full encode) under ``setting``."""
    from effvla_ros.core.compression.compressor import TokenCompressor
    from effvla_ros.core.observation import rgb_to_tensor

    comp = TokenCompressor(policy, setting.pruning, setting.reuse)
    out: list[dict[str, tuple[TokenView, int, int]]] = []
    for obs in episode.observations:
        if obs.instruction != comp.instruction:
            comp.set_instruction(obs.instruction)
        per: dict[str, tuple[TokenView, int, int]] = {}
        for cam in policy.cameras:
            fr = obs.frames.get(cam)
            if fr is None:
                continue
            c = comp.process(cam, rgb_to_tensor(episode.image(fr)))
            view = TokenView(tuple(c.grid), c.kept.tolist(), [bool(r) for r in c.reused.tolist()])  # type: ignore[arg-type]
            per[cam] = (view, int(c.encoder_flops), int(c.encoder_flops_full))
        out.append(per)
    return out


def replay_fps(episode: Any, default: float = 10.0) -> float:
    """Frames per second of the video: the observations' median rate (real time), else ``default``."""
    stamps = np.asarray([o.stamp for o in episode.observations], dtype=np.float64)
    d = np.diff(stamps)
    d = d[d > 0]
    return float(min(max(1.0 / np.median(d), 0.5), 60.0)) if len(d) else default


def render_replay_video(result: Any, policy: Any, path: str | Path, *, size: int = 224,
                        fps: float | None = None) -> dict[str, Any]:
    """Write the video of a :class:`~effvla_ros.replay.pipeline.ReplayResult` to ``path`` (.mp4 or .gif);
    returns {path, frames, settings, cameras, size}."""
    episode = result.episode
    runs = result.runs
    names = [r.setting.name for r in runs]
    tokens = [setting_tokens(policy, episode, r.setting) for r in runs]
    cams = list(policy.cameras)
    writer = VideoWriter(path, fps or replay_fps(episode))
    t0 = episode.observations[0].stamp if episode.observations else 0.0
    n = len(episode.observations)
    for i, obs in enumerate(episode.observations):
        cols = []
        for k, name in enumerate(names):
            cells = []
            per = tokens[k][i]
            spent = sum(v[1] for v in per.values())
            full = sum(v[2] for v in per.values())
            kept = sum(len(v[0].kept) for v in per.values())
            total = sum(v[0].grid[0] * v[0].grid[1] for v in per.values())
            recomputed = sum(sum(not r for r in (v[0].reused or [])) for v in per.values())
            head = text_strip(size, STRIP_H, [name[:max(size // 8, 8)],
                                              f"kept {kept}/{total} recomp {recomputed}"
                                              + (f" enc {spent / full:.2f}" if full else "")], scale=0.4)
            cells.append(head)
            for cam in cams:
                fr = obs.frames.get(cam)
                if fr is None:
                    cell = np.full((size, size, 3), BG, dtype=np.uint8)
                    cells.append(label(cell, f"{cam}: missing"))
                    continue
                view = per.get(cam, (None, 0, 0))[0]
                cells.append(label(token_overlay(episode.image(fr), view, size), cam))
            cols.append(vstack(cells))
        body = hstack(cols)
        top = text_strip(body.shape[1], 24, [f"observation {i + 1}/{n}  t {obs.stamp - t0:.2f} s  "
                                            f"\"{obs.instruction}\""], scale=0.4)
        writer.append(vstack([top, body]))
    out = writer.close()
    return {"path": str(out) if out else None, "frames": writer.frames, "settings": names, "cameras": cams,
            "size": size}
