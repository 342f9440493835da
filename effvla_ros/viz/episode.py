"""What the demo records of an episode, and how a frame of its video is drawn (ROS-free).

The demo's monitor fills an :class:`EpisodeRecording` while the episode runs (cheap: a ``qpos`` copy of
the simulation and references to the 64 px camera images and token messages it receives anyway);
:func:`render_episode` draws the frames afterwards, so rendering never competes with the closed loop.
A frame (:func:`compose_frame`): a text strip (episode, instruction, success so far, inference latency,
encoder compute fraction), the viewer camera beside both policy cameras with their token overlay, the
colour key, and the per-joint chunk panel.

:class:`OutcomeTracker` classifies the episode as ``effvla eval-sim`` does
(:func:`effvla_ros.train.evaluate.classify_outcome`: where the gripper was first commanded closed,
how high the instructed cube rose).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from effvla_ros.viz.overlay import (
    Chunk,
    TokenView,
    chunk_panel,
    hstack,
    joint_ranges,
    label,
    legend,
    text_strip,
    token_overlay,
    vstack,
)

STRIP_H, LEGEND_H, PANEL_H = 56, 24, 224
OK_COLOR, BAD_COLOR, WARN_COLOR = (110, 230, 110), (255, 110, 90), (255, 210, 90)

# eval-sim's thresholds (effvla_ros.train.evaluate.NEAR_CM / LIFT_CM), kept equal by test_viz
NEAR_CM = 3.0
LIFT_CM = 2.0

FAILURE_TEXT = {
    "no_grasp": "no grasp: the gripper was never commanded closed",
    "wrong_cube": "wrong cube: the gripper first closed at the other cube",
    "missed": "missed: the gripper first closed away from both cubes",
    "not_lifted": "not lifted: closed at the instructed cube, which never rose {lift_cm:.0f} cm",
    "not_placed": "not placed: the instructed cube was lifted but not placed as instructed",
}


def classify(success: bool, dist_target_cm: float, dist_other_cm: float, lift_cm: float) -> str:
    """eval-sim's outcome classes (``effvla_ros.train.evaluate.classify_outcome``, imported from there)."""
    from effvla_ros.train.evaluate import classify_outcome

    return str(classify_outcome(success, dist_target_cm, dist_other_cm, lift_cm))


def failure_reason(outcome: str, dist_target_cm: float = math.nan, dist_other_cm: float = math.nan,
                   lift_cm: float = math.nan, colors: tuple[str, str] | None = None) -> str:
    """A sentence for an outcome of :data:`FAILURE_TEXT` with the measured distances ('' for success)."""
    if outcome == "success":
        return ""
    text = FAILURE_TEXT.get(outcome, outcome).format(lift_cm=LIFT_CM)
    details = []
    if not math.isnan(dist_target_cm):
        tgt = f"the {colors[0]} cube" if colors else "the instructed cube"
        oth = f"the {colors[1]} cube" if colors else "the other cube"
        details.append(f"closed {dist_target_cm:.1f} cm from {tgt}, {dist_other_cm:.1f} cm from {oth}")
    if not math.isnan(lift_cm):
        details.append(f"highest lift {max(lift_cm, 0.0):.1f} cm")
    return text + (f" ({'; '.join(details)})" if details else "")


@dataclass
class OutcomeTracker:
    """Follows one episode from simulation snapshots (as eval-sim's run_episode does per control step)."""

    grip_mid: float  # commanded jaw angle below this = closing
    target: int  # index of the instructed cube
    z0: float | None = None
    lift_cm: float = 0.0
    grasp: tuple[float, float] | None = None  # (cm to the instructed cube, cm to the other) at the first close

    def update(self, grip_cmd: float, jaw_xy: np.ndarray, cubes: np.ndarray) -> None:
        """``cubes``: (2, 3) cube centres; ``jaw_xy``: the jaw point (x, y)."""
        z = float(cubes[self.target][2])
        if self.z0 is None:
            self.z0 = z
        self.lift_cm = max(self.lift_cm, 100 * (z - self.z0))
        if self.grasp is None and grip_cmd < self.grip_mid:
            d = [100 * float(np.linalg.norm(np.asarray(jaw_xy)[:2] - cubes[k][:2])) for k in (0, 1)]
            self.grasp = (d[self.target], d[1 - self.target])

    def outcome(self, success: bool) -> str:
        dt, do = self.grasp if self.grasp is not None else (math.nan, math.nan)
        return classify(success, dt, do, self.lift_cm)

    def stage(self, success: bool) -> str:
        """Where the episode stands now, in words (the progress bar's state)."""
        if success:
            return "SUCCESS"
        if self.lift_cm >= LIFT_CM:
            return "lifted, placing"
        if self.grasp is None:
            return "reaching"
        dt, do = self.grasp
        if do < NEAR_CM and do < dt:
            return "closed at the other cube"
        if dt >= NEAR_CM:
            return "closed, missed"
        return "grasping"

    def reason(self, success: bool, colors: tuple[str, str] | None = None) -> str:
        dt, do = self.grasp if self.grasp is not None else (math.nan, math.nan)
        return failure_reason(self.outcome(success), dt, do, self.lift_cm, colors)


@dataclass
class CameraFrame:
    image: np.ndarray  # the policy camera image the tokens were computed from (64 px)
    tokens: TokenView | None
    flops: int = 0
    flops_full: int = 0


@dataclass
class FrameRecord:
    t: float  # simulated seconds since the episode start
    qpos: np.ndarray | None  # simulation state for the viewer camera (None: no viewer frame)
    success: bool
    stage: str
    cams: dict[str, CameraFrame]
    chunks: int = 0
    inference_ms: float | None = None
    encoder_fraction: float | None = None  # of the episode so far


@dataclass
class EpisodeRecording:
    episode: int
    episodes: int
    seed: int
    instruction: str = ""
    frames: list[FrameRecord] = field(default_factory=list)
    chunks: list[Chunk] = field(default_factory=list)  # times in simulated seconds since the episode start
    joint_names: list[str] = field(default_factory=list)
    joint_t: list[float] = field(default_factory=list)
    joint_q: list[np.ndarray] = field(default_factory=list)
    cameras: list[str] = field(default_factory=list)


def frame_strip(rec: EpisodeRecording, fr: FrameRecord, width: int) -> np.ndarray:
    toks = [c.tokens for c in fr.cams.values() if c.tokens is not None]
    kept = sum(len(t.kept) for t in toks)
    total = sum(t.grid[0] * t.grid[1] for t in toks)
    recomputed = sum(sum(not r for r in t.reused) for t in toks if t.reused is not None)
    spent = sum(c.flops for c in fr.cams.values())
    full = sum(c.flops_full for c in fr.cams.values())
    state_color = OK_COLOR if fr.success else (WARN_COLOR if fr.stage not in ("reaching",) else (235, 235, 235))
    line1 = f"episode {rec.episode + 1}/{rec.episodes}  seed {rec.seed}  t {fr.t:5.1f} s   \"{rec.instruction}\""
    parts = [f"success: {'YES' if fr.success else 'not yet'} ({fr.stage})",
             f"chunks {fr.chunks}",
             f"inference {fr.inference_ms:.0f} ms" if fr.inference_ms is not None else "inference -",
             f"encoder compute {spent / full:.2f} of full (episode {fr.encoder_fraction:.2f})"
             if full and fr.encoder_fraction is not None else "encoder compute -",
             f"tokens kept {kept}/{total}, recomputed {recomputed}"]
    return text_strip(width, STRIP_H, [line1, ("  |  ".join(parts), state_color)], scale=0.45)


def compose_frame(rec: EpisodeRecording, fr: FrameRecord, viewer: np.ndarray | None, size: int = 320,
                  ranges: np.ndarray | None = None) -> np.ndarray:
    """One video frame (see the module doc); ``viewer``: the viewer camera image (None: left out)."""
    views: list[np.ndarray] = []
    if viewer is not None:
        v = viewer if viewer.shape[:2] == (size, size) else _resize(viewer, size)
        views.append(label(v.copy(), "viewer (not seen by the policy)"))
    for cam in rec.cameras or list(fr.cams):
        cf = fr.cams.get(cam)
        if cf is None:
            img = np.zeros((size, size, 3), dtype=np.uint8)
            views.append(label(img, f"{cam}: no frame yet"))
            continue
        img = token_overlay(cf.image, cf.tokens, size)
        h, w = cf.image.shape[:2]
        views.append(label(img, f"policy camera '{cam}' ({w} px)"))
    row = hstack(views)
    width = row.shape[1]
    t_exec = np.asarray([t for t in rec.joint_t if t <= fr.t])
    q_exec = np.stack(rec.joint_q[:len(t_exec)]) if len(t_exec) else np.zeros((0, len(rec.joint_names)))
    names = rec.joint_names or ([f"joint_{i}" for i in range(rec.chunks[0].actions.shape[1])] if rec.chunks else [])
    panel = chunk_panel(width, PANEL_H, fr.t, t_exec, q_exec, rec.chunks, names, ranges)
    return vstack([frame_strip(rec, fr, width), row, legend(width, LEGEND_H), panel])


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    import cv2

    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)


def episode_ranges(rec: EpisodeRecording) -> np.ndarray:
    q = np.stack(rec.joint_q) if rec.joint_q else np.zeros((0, len(rec.joint_names) or 1))
    return joint_ranges(q, rec.chunks)


def render_episode(rec: EpisodeRecording, viewer: Callable[[np.ndarray], np.ndarray] | None,
                   sinks: Sequence[Any], size: int = 320) -> int:
    """Draw every frame of ``rec`` (``viewer(qpos)`` renders the viewer camera) into every sink (``append(frame)``);
    returns the number of frames."""
    ranges = episode_ranges(rec)
    n = 0
    for fr in rec.frames:
        img = viewer(fr.qpos) if viewer is not None and fr.qpos is not None else None
        frame = compose_frame(rec, fr, img, size, ranges)
        for s in sinks:
            s.append(frame)
        n += 1
    return n
