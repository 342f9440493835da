"""``effvla demo``: the closed-loop demo through the real ROS 2 graph.

The SO-101 MuJoCo simulation (``sim_bridge``) publishes cameras, joint states and a language
instruction; ``token_compressor`` → ``policy`` → ``chunk_executor`` close the loop on its
``joint_trajectory`` controller topic. All nodes run in this process (the ``effvla run --sim``
bringup) over real DDS (loopback only). A monitor node resets the simulation to a new seed per
episode, waits for ``/sim/success`` or a timeout in simulated time, and reports per episode:
success, duration, chunks, policy latency (observation stamp → chunk published), encoder compute
actually spent vs full, visual tokens kept and reused, and why a failed episode failed (eval-sim's classes: wrong cube,
missed, not lifted, not placed, no grasp). A progress bar per episode (simulated time, chunks, the
episode's state) stays one line on a terminal and prints plain lines in a log.

Video (``--video mp4``, the default; ``gif``; ``off``): the monitor records, per ``--video-stride``-th
frame of the first camera, a ``qpos`` snapshot of the simulation and the policy cameras' images with
their VisualTokens (kept indices, reused flags, encoder FLOPs), plus every ActionChunk and JointState.
After each episode (never while it runs) it renders an extra viewer camera from the snapshots
(:class:`effvla_ros.sim.viewer.ViewerCamera`: a model copy with its own data, so the simulation is
untouched) and draws the frames (:mod:`effvla_ros.viz.episode`): the viewer beside both policy cameras
upscaled with kept tokens outlined, pruned ones dimmed and recomputed ones tinted, a strip with the
instruction, success so far, inference latency and encoder compute fraction, and the executed
trajectory with each chunk per joint. ``out/demo.mp4`` holds every episode, ``out/demo.gif`` the first
at half size.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from effvla_ros.commands.run import add_graph_arguments, graph_from_args
from effvla_ros.graph import DEFAULT_CHECKPOINT


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_graph_arguments(p)
    p.set_defaults(sim=True)
    p.add_argument("--episodes", type=int, default=3, help="episodes to run")
    p.add_argument("--seed", type=int, default=1000, help="seed of the first episode (then +1 per episode)")
    p.add_argument("--episode-timeout", type=float, default=25.0, help="simulated seconds per episode")
    p.add_argument("--video", default="mp4", choices=["off", "gif", "mp4"],
                   help="mp4: --video-path with every episode and --gif with the first one; gif: only --gif; off: none "
                        "(frames are drawn after each episode, not during it)")
    p.add_argument("--video-path", default="out/demo.mp4", help="MP4 of every episode (--video mp4)")
    p.add_argument("--gif", default="out/demo.gif", help="small GIF of the first episode ('' = none)")
    p.add_argument("--video-stride", type=int, default=1,
                   help="record every n-th frame of the first camera (camera_rate / n frames per simulated second)")
    p.add_argument("--video-size", type=int, default=320, help="pixels per view in the video (viewer and cameras)")
    p.add_argument("--json", default="out/demo.json", help="per-episode results as JSON ('' = none)")


class _Monitor:
    """Test-side ROS node of the demo: resets episodes and collects what the graph does.

    ``sim``: the in-process ``sim_bridge`` node; the monitor reads its simulation state (under the
    bridge's lock, copies only) for the failure reason and the video's viewer camera."""

    def __init__(self, context: Any, cameras: list[str], sim: Any = None) -> None:
        from rclpy.node import Node
        from rclpy.parameter import Parameter
        from sensor_msgs.msg import Image, JointState
        from std_msgs.msg import Bool, Empty, Int64, String

        from effvla_ros.msg import ActionChunk, VisualTokens
        from effvla_ros.nodes.common import LATCHED_QOS, PIPELINE_QOS, SENSOR_QOS

        self.node = Node("effvla_demo", context=context,
                         parameter_overrides=[Parameter("use_sim_time", Parameter.Type.BOOL, True)])
        self.lock = threading.Lock()
        self.sim = sim
        self.cameras = list(cameras)
        self.success = False
        self.episode: dict[str, Any] = {}
        self.chunks: list[Any] = []
        self.tokens: list[Any] = []
        # video / outcome state of the running episode (see begin_recording)
        self.rec: Any = None  # viz.episode.EpisodeRecording while frames are recorded
        self.tracker: Any = None  # viz.episode.OutcomeTracker
        self.colors: tuple[str, str] | None = None
        self.stride = 1
        self.t0 = 0.0  # simulated time of the episode start
        self._n_frames = 0
        self._images: dict[str, OrderedDict[int, np.ndarray]] = {c: OrderedDict() for c in self.cameras}
        self._latest_tokens: dict[str, Any] = {}
        self._last_inference_ms: float | None = None
        self._spent = self._full = 0
        self.reset_pub = self.node.create_publisher(Int64, "/sim/reset", 10)
        self.pipeline_reset_pub = self.node.create_publisher(Empty, "reset", 10)
        self.node.create_subscription(Bool, "/sim/success", self._on_success, LATCHED_QOS)
        self.node.create_subscription(String, "/sim/episode", self._on_episode, LATCHED_QOS)
        self.node.create_subscription(ActionChunk, "action_chunk", self._on_chunk, PIPELINE_QOS)
        self.node.create_subscription(VisualTokens, "visual_tokens", self._on_tokens, PIPELINE_QOS)
        self.node.create_subscription(JointState, "/joint_states", self._on_joint_states, 10)
        for cam in self.cameras:
            self.node.create_subscription(Image, f"/camera/{cam}/image_raw",
                                          lambda msg, cam=cam: self._on_image(cam, msg), SENSOR_QOS)
        self._empty = Empty
        self._int64 = Int64

    def _on_success(self, msg: Any) -> None:
        with self.lock:
            self.success = bool(msg.data)

    def _on_episode(self, msg: Any) -> None:
        with self.lock:
            try:
                self.episode = json.loads(msg.data)
            except ValueError:
                pass

    def _on_chunk(self, msg: Any) -> None:
        from effvla_ros.viz.overlay import Chunk

        now = self.node.get_clock().now().nanoseconds * 1e-9
        stamp = msg.header.stamp.sec + 1e-9 * msg.header.stamp.nanosec
        with self.lock:
            self.chunks.append((now - stamp, msg.inference_latency_ms, list(msg.exit_layers), msg.rtc_delay_steps))
            self._last_inference_ms = float(msg.inference_latency_ms)
            if self.rec is not None and msg.num_actions and msg.action_dim:
                a = np.asarray(msg.actions, dtype=np.float64).reshape(int(msg.num_actions), int(msg.action_dim))
                a = _reorder(a, list(msg.joint_names), self.rec.joint_names)
                dt = msg.step_period.sec + 1e-9 * msg.step_period.nanosec
                self.rec.chunks.append(Chunk(now - self.t0, stamp - self.t0, dt, a))

    def _on_joint_states(self, msg: Any) -> None:
        with self.lock:
            if self.rec is None or not len(msg.position):
                return
            t = msg.header.stamp.sec + 1e-9 * msg.header.stamp.nanosec - self.t0
            q = _reorder(np.asarray(msg.position, dtype=np.float64)[None], list(msg.name), self.rec.joint_names)[0]
            self.rec.joint_t.append(t)
            self.rec.joint_q.append(q)

    def _on_tokens(self, msg: Any) -> None:
        from effvla_ros.viz.overlay import TokenView

        if msg.camera_missing:
            return
        stamp = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        view = TokenView((int(msg.grid_height), int(msg.grid_width)), [int(i) for i in msg.kept_indices],
                         [bool(r) for r in msg.reused])
        with self.lock:
            self.tokens.append((msg.encoder_flops, msg.encoder_flops_full, len(msg.kept_indices),
                                sum(bool(r) for r in msg.reused), msg.grid_height * msg.grid_width, msg.encode_time_ms))
            self._spent += int(msg.encoder_flops)
            self._full += int(msg.encoder_flops_full)
            self._latest_tokens[msg.camera_name] = (stamp, view, int(msg.encoder_flops), int(msg.encoder_flops_full))

    def _on_image(self, cam: str, msg: Any) -> None:
        from effvla_ros.nodes.common import image_to_rgb

        stamp = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        with self.lock:
            recording = self.rec is not None
        if recording:
            ring = self._images[cam]
            ring[stamp] = image_to_rgb(msg).copy()
            while len(ring) > 40:
                ring.popitem(last=False)
        if cam == self.cameras[0]:
            self._snapshot()

    def _snapshot(self) -> None:
        """Per frame of the first camera: the simulation state (outcome tracking; for the video also a frame)."""
        from effvla_ros.viz.episode import CameraFrame, FrameRecord

        sim = self.sim
        with self.lock:
            tracker, rec = self.tracker, self.rec
        if sim is None or tracker is None:
            return
        with sim.snapshot() as (env, t):  # a consistent state between two physics steps
            seed = env.seed
            grip = float(env.joint_targets()[-1])
            jaw = np.array(env.ik_point_pos, dtype=np.float64)[:2]
            cubes = env.cube_positions()
            success = bool(env.success)
            want_frame = rec is not None and self._n_frames % self.stride == 0
            qpos = env._data.qpos.copy() if want_frame else None
        with self.lock:
            if self.tracker is not tracker or seed != self.episode.get("seed"):
                return
            tracker.update(grip, jaw, cubes)
            if rec is None:
                return
            self._n_frames += 1
            if not want_frame:
                return
            cams = {}
            for cam in self.cameras:
                tok = self._latest_tokens.get(cam)
                ring = self._images[cam]
                if tok is not None and tok[0] in ring:
                    cams[cam] = CameraFrame(ring[tok[0]], tok[1], tok[2], tok[3])
                elif ring:
                    cams[cam] = CameraFrame(next(reversed(ring.values())), None)
            rec.frames.append(FrameRecord(
                t - self.t0, qpos, success, tracker.stage(success), cams, len(self.chunks), self._last_inference_ms,
                self._spent / self._full if self._full else None))

    def now(self) -> float:
        return self.node.get_clock().now().nanoseconds * 1e-9

    def start_episode(self, seed: int, timeout: float = 60.0, repeat: float = 5.0, rec: Any = None,
                      stride: int = 1) -> None:
        """Reset the simulation to ``seed``; once it reports that episode, reset the pipeline.

        The request is repeated every ``repeat`` s until the simulation reports the episode (a reset
        to the episode's own seed before it started is harmless). ``rec``: an EpisodeRecording to fill
        (every ``stride``-th frame), or None."""
        from effvla_ros.viz.episode import OutcomeTracker

        with self.lock:
            self.success, self.episode, self.chunks, self.tokens = False, {}, [], []
            self.rec = self.tracker = None
        t0 = time.monotonic()
        t_sent = -math.inf
        while time.monotonic() - t0 < timeout:
            if time.monotonic() - t_sent >= repeat:
                self.reset_pub.publish(self._int64(data=seed))
                t_sent = time.monotonic()
            with self.lock:
                if self.episode.get("seed") == seed:
                    break
            time.sleep(0.02)
        else:
            raise RuntimeError(f"the simulation did not reset to seed {seed} within {timeout} s")
        tracker = None
        if self.sim is not None:
            with self.sim.snapshot() as (env, _):
                tracker = OutcomeTracker(float(np.mean(env.ctrl_range[-1])), int(env.task.target_cube))
                cc = env.task.cube_colors
                self.colors = (cc[env.task.target_cube], cc[1 - env.task.target_cube])
        with self.lock:
            self.chunks, self.tokens = [], []
            self.t0 = self.now()
            self._spent = self._full = 0
            self._latest_tokens, self._last_inference_ms, self._n_frames = {}, None, 0
            for ring in self._images.values():
                ring.clear()
            self.stride = max(int(stride), 1)
            if rec is not None:
                rec.instruction = str(self.episode.get("instruction", ""))
            self.rec, self.tracker = rec, tracker
        self.pipeline_reset_pub.publish(self._empty())

    def stop_recording(self) -> Any:
        with self.lock:
            rec, self.rec = self.rec, None
        return rec


def _reorder(a: np.ndarray, names: list[str], want: list[str]) -> np.ndarray:
    """Columns of ``a`` (named ``names``) in the order ``want`` (NaN where missing); unchanged when names are
    missing or already in that order."""
    if not want or not names or names == want or len(names) != a.shape[1]:
        return a
    out = np.full((a.shape[0], len(want)), np.nan)
    for j, n in enumerate(want):
        if n in names:
            out[:, j] = a[:, names.index(n)]
    return out


def _episode_result(ep: int, seed: int, done: bool, elapsed: float, wall: float, chunks: list[Any], toks: list[Any],
                    info: dict[str, Any], outcome: str, reason: str) -> dict[str, Any]:
    lat = [c[0] for c in chunks]
    spent = sum(t[0] for t in toks)
    full = sum(t[1] for t in toks)
    return {
        "episode": ep, "seed": seed, "instruction": info.get("instruction", ""), "success": bool(done),
        "outcome": outcome, "failure_reason": reason,
        "sim_seconds": round(elapsed, 2), "wall_seconds": round(wall, 2),
        "chunks": len(chunks),
        "latency_p50_ms": round(1e3 * statistics.median(lat), 1) if lat else None,
        "inference_ms_mean": round(statistics.mean(c[1] for c in chunks), 1) if chunks else None,
        "encoder_compute_fraction": round(spent / full, 3) if full else None,
        "tokens_kept_fraction": round(sum(t[2] for t in toks) / max(sum(t[4] for t in toks), 1), 3),
        "tokens_reused_fraction": round(sum(t[3] for t in toks) / max(sum(t[2] for t in toks), 1), 3),
    }


class _Video:
    """The demo's video outputs: an MP4 of every episode and/or a small GIF of the first; the viewer camera."""

    def __init__(self, args: argparse.Namespace, sim: Any, fps: float) -> None:
        from effvla_ros.viz.video import VideoWriter

        self.size = int(args.video_size)
        self.mp4 = VideoWriter(args.video_path, fps) if args.video == "mp4" and args.video_path else None
        self.gif = (VideoWriter(args.gif, fps, gif_scale=0.5, gif_stride=2)
                    if args.video in ("mp4", "gif") and args.gif else None)
        self.sim = sim
        self.viewer: Any = None
        self.render_s = 0.0
        self.frames = 0

    @property
    def enabled(self) -> bool:
        return self.mp4 is not None or self.gif is not None

    def add_episode(self, rec: Any) -> None:
        from effvla_ros.viz.episode import render_episode

        t = time.perf_counter()
        viewer = None
        if self.sim is not None:
            from effvla_ros.sim.viewer import ViewerCamera

            with self.sim.snapshot() as (env, _):  # the episode's cube colours and marker positions (set at reset)
                if self.viewer is None:
                    self.viewer = ViewerCamera(env._model, self.size, self.size)
                self.viewer.sync_model(env._model)
            viewer = self.viewer.render
        sinks = [w for w in (self.mp4, self.gif if rec.episode == 0 else None) if w is not None]
        self.frames += render_episode(rec, viewer, sinks, self.size)
        self.render_s += time.perf_counter() - t

    def close(self) -> list[str]:
        out = []
        for w in (self.mp4, self.gif):
            if w is not None:
                p = w.close()
                if p is not None:
                    out.append(f"{p} ({w.frames} frames)")
        if self.viewer is not None:
            self.viewer.close()
            self.viewer = None
        return out


def run(args: argparse.Namespace) -> int:
    from effvla_ros.bringup import Bringup
    from effvla_ros.viz.episode import EpisodeRecording
    from effvla_ros.viz.progress import ProgressLine

    if args.video_stride < 1:
        raise ValueError("--video-stride: must be >= 1")
    if args.video_size < 64 or args.video_size > 480:
        raise ValueError("--video-size: must be in 64..480")
    graph = graph_from_args(args)
    if "checkpoint" not in graph.overrides:
        raise ValueError("checkpoint: no --checkpoint given and the bundled checkpoint "
                         f"effvla_ros/assets/{DEFAULT_CHECKPOINT} is missing")
    print(f"effvla demo: {args.episodes} episodes, target {args.target}, checkpoint {graph.overrides['checkpoint']}")
    print("  graph: " + " -> ".join(n.name for n in graph.nodes) + " (one process, real DDS on loopback)")
    t_start = time.perf_counter()
    b = Bringup(graph, log_level=args.log_level if args.log_level != "info" else "warn")
    sim = next((n for n in b.nodes if n.get_name() == "sim_bridge"), None)
    if sim is not None and not all(hasattr(sim, a) for a in ("_lock", "_env", "_t_ns")):
        print("  note: this sim_bridge does not expose its simulation state: no failure reasons, no viewer camera")
        sim = None
    cameras = [c for c in args.cameras.split(",") if c]
    mon = _Monitor(b.context, cameras, sim)
    b.add_node(mon.node)
    b.start()
    video: _Video | None = None
    if args.video != "off":
        rate = float(sim.config.camera_rate) if sim is not None else 10.0
        video = _Video(args, sim, max(rate / args.video_stride, 0.5))
        if not video.enabled:
            video = None
    results: list[dict[str, Any]] = []
    try:
        # wait for the simulation clock
        t0 = time.monotonic()
        while mon.now() <= 0.0:
            if time.monotonic() - t0 > 60:
                raise RuntimeError("no /clock from the simulation within 60 s")
            time.sleep(0.05)
        print(f"  graph up in {time.perf_counter() - t_start:.1f} s", flush=True)
        for ep in range(args.episodes):
            seed = args.seed + ep
            rec = None
            if video is not None and (video.mp4 is not None or ep == 0):
                from effvla_ros.sim.env import JOINT_NAMES

                rec = EpisodeRecording(ep, args.episodes, seed, joint_names=list(JOINT_NAMES), cameras=cameras)
            mon.start_episode(seed, rec=rec, stride=args.video_stride)
            t_sim0, t_wall0 = mon.now(), time.monotonic()
            bar = ProgressLine(f"  episode {ep} seed {seed}", args.episode_timeout, unit="s sim")
            while True:
                time.sleep(0.05)
                with mon.lock:
                    done = mon.success
                    n_chunks = len(mon.chunks)
                    stage = mon.tracker.stage(done) if mon.tracker is not None else ("SUCCESS" if done else "running")
                elapsed = mon.now() - t_sim0
                bar.update(min(elapsed, args.episode_timeout), f"{n_chunks} chunks", stage)
                if done or elapsed > args.episode_timeout or time.monotonic() - t_wall0 > 10 * args.episode_timeout:
                    break
            rec = mon.stop_recording()
            with mon.lock:
                chunks, toks, info, tracker = list(mon.chunks), list(mon.tokens), dict(mon.episode), mon.tracker
            outcome = tracker.outcome(done) if tracker is not None else ("success" if done else "failure")
            reason = tracker.reason(done, mon.colors) if tracker is not None else ""
            res = _episode_result(ep, seed, done, elapsed, time.monotonic() - t_wall0, chunks, toks, info, outcome,
                                  reason)
            results.append(res)
            bar.close(
                f"  episode {ep} seed {seed}: {'SUCCESS' if done else 'failure'} in {elapsed:.1f} s sim "
                f"({res['wall_seconds']:.1f} s wall) | {res['chunks']} chunks, latency p50 {res['latency_p50_ms']} ms "
                f"| encoder compute {res['encoder_compute_fraction']} of full, tokens kept "
                f"{res['tokens_kept_fraction']}, reused {res['tokens_reused_fraction']} | \"{res['instruction']}\""
                + (f"\n    failed: {reason}" if reason else ""))
            if video is not None and rec is not None and rec.frames:
                t_r = time.perf_counter()
                video.add_episode(rec)
                print(f"    video: {len(rec.frames)} frames drawn in {time.perf_counter() - t_r:.1f} s", flush=True)
    finally:
        written = video.close() if video is not None else []
        b.shutdown()
    n_ok = sum(r["success"] for r in results)
    print(f"effvla demo: {n_ok}/{len(results)} successful episodes")
    fails = [r["outcome"] for r in results if not r["success"]]
    if fails:
        print("  failures: " + ", ".join(f"{o} x{fails.count(o)}" for o in sorted(set(fails))))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))
    for w in written:
        print(f"  wrote {w}")
    if video is not None and video.frames:
        print(f"  video: {video.frames} frames drawn in {video.render_s:.1f} s (after the episodes, not during them)")
    sys.stdout.flush()
    return 0
