"""``effvla demo``: the closed-loop demo through the real ROS 2 graph.

The SO-101 MuJoCo simulation (``sim_bridge``) publishes cameras, joint states and a language
instruction; ``token_compressor`` → ``policy`` → ``chunk_executor`` close the loop on its
``joint_trajectory`` controller topic. All nodes run in this process (the ``effvla run --sim``
bringup) over real DDS (loopback only). A monitor node resets the simulation to a new seed per
episode, waits for ``/sim/success`` or a timeout in simulated time, and reports per episode:
success, duration, chunks, policy latency (observation stamp → chunk published), encoder compute
actually spent vs full, visual tokens kept and reused. The scene camera of the first episode is
written as a GIF.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from effvla_ros.commands.run import add_graph_arguments, graph_from_args
from effvla_ros.graph import DEFAULT_CHECKPOINT


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_graph_arguments(p)
    p.set_defaults(sim=True)
    p.add_argument("--episodes", type=int, default=3, help="episodes to run")
    p.add_argument("--seed", type=int, default=1000, help="seed of the first episode (then +1 per episode)")
    p.add_argument("--episode-timeout", type=float, default=25.0, help="simulated seconds per episode")
    p.add_argument("--gif", default="out/demo.gif", help="GIF of the scene camera of the first episode ('' = none)")
    p.add_argument("--json", default="out/demo.json", help="per-episode results as JSON ('' = none)")


class _Monitor:
    """Test-side ROS node of the demo: resets episodes and collects what the graph does."""

    def __init__(self, context: Any) -> None:
        from rclpy.node import Node
        from rclpy.parameter import Parameter
        from sensor_msgs.msg import Image
        from std_msgs.msg import Bool, Empty, Int64, String

        from effvla_ros.msg import ActionChunk, VisualTokens
        from effvla_ros.nodes.common import LATCHED_QOS, PIPELINE_QOS, SENSOR_QOS

        self.node = Node("effvla_demo", context=context,
                         parameter_overrides=[Parameter("use_sim_time", Parameter.Type.BOOL, True)])
        self.lock = threading.Lock()
        self.success = False
        self.episode: dict[str, Any] = {}
        self.chunks: list[Any] = []
        self.tokens: list[Any] = []
        self.frames: list[Any] = []
        self.record_frames = False
        self.reset_pub = self.node.create_publisher(Int64, "/sim/reset", 10)
        self.pipeline_reset_pub = self.node.create_publisher(Empty, "reset", 10)
        self.node.create_subscription(Bool, "/sim/success", self._on_success, LATCHED_QOS)
        self.node.create_subscription(String, "/sim/episode", self._on_episode, LATCHED_QOS)
        self.node.create_subscription(ActionChunk, "action_chunk", self._on_chunk, PIPELINE_QOS)
        self.node.create_subscription(VisualTokens, "visual_tokens", self._on_tokens, PIPELINE_QOS)
        self.node.create_subscription(Image, "/camera/scene/image_raw", self._on_image, SENSOR_QOS)
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
        now = self.node.get_clock().now().nanoseconds * 1e-9
        stamp = msg.header.stamp.sec + 1e-9 * msg.header.stamp.nanosec
        with self.lock:
            self.chunks.append((now - stamp, msg.inference_latency_ms, list(msg.exit_layers), msg.rtc_delay_steps))

    def _on_tokens(self, msg: Any) -> None:
        if msg.camera_missing:
            return
        with self.lock:
            self.tokens.append((msg.encoder_flops, msg.encoder_flops_full, len(msg.kept_indices),
                                sum(bool(r) for r in msg.reused), msg.grid_height * msg.grid_width, msg.encode_time_ms))

    def _on_image(self, msg: Any) -> None:
        if not self.record_frames or len(self.frames) >= 400:
            return
        from effvla_ros.nodes.common import image_to_rgb

        with self.lock:
            self.frames.append(image_to_rgb(msg).copy())

    def now(self) -> float:
        return self.node.get_clock().now().nanoseconds * 1e-9

    def start_episode(self, seed: int, timeout: float = 60.0, repeat: float = 5.0) -> None:
        """Reset the simulation to ``seed``; once it reports that episode, reset the pipeline.

        The request is repeated every ``repeat`` s until the simulation reports the episode (a reset
        to the episode's own seed before it started is harmless)."""
        with self.lock:
            self.success, self.episode, self.chunks, self.tokens = False, {}, [], []
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
        with self.lock:
            self.chunks, self.tokens, self.frames = [], [], [] if self.record_frames else self.frames
        self.pipeline_reset_pub.publish(self._empty())


def run(args: argparse.Namespace) -> int:
    from effvla_ros.bringup import Bringup

    graph = graph_from_args(args)
    if "checkpoint" not in graph.overrides:
        raise ValueError("checkpoint: no --checkpoint given and the bundled checkpoint "
                         f"effvla_ros/assets/{DEFAULT_CHECKPOINT} is missing")
    print(f"effvla demo: {args.episodes} episodes, target {args.target}, checkpoint {graph.overrides['checkpoint']}")
    print("  graph: " + " -> ".join(n.name for n in graph.nodes) + " (one process, real DDS on loopback)")
    t_start = time.perf_counter()
    b = Bringup(graph, log_level=args.log_level if args.log_level != "info" else "warn")
    mon = _Monitor(b.context)
    b.add_node(mon.node)
    b.start()
    results: list[dict[str, Any]] = []
    try:
        # wait for the simulation clock
        t0 = time.monotonic()
        while mon.now() <= 0.0:
            if time.monotonic() - t0 > 60:
                raise RuntimeError("no /clock from the simulation within 60 s")
            time.sleep(0.05)
        print(f"  graph up in {time.perf_counter() - t_start:.1f} s")
        for ep in range(args.episodes):
            seed = args.seed + ep
            mon.record_frames = ep == 0 and bool(args.gif)
            mon.start_episode(seed)
            t_sim0, t_wall0 = mon.now(), time.monotonic()
            while True:
                time.sleep(0.05)
                with mon.lock:
                    done = mon.success
                elapsed = mon.now() - t_sim0
                if done or elapsed > args.episode_timeout or time.monotonic() - t_wall0 > 10 * args.episode_timeout:
                    break
            mon.record_frames = False
            with mon.lock:
                chunks, toks, info = list(mon.chunks), list(mon.tokens), dict(mon.episode)
            lat = [c[0] for c in chunks]
            spent = sum(t[0] for t in toks)
            full = sum(t[1] for t in toks)
            res = {
                "episode": ep, "seed": seed, "instruction": info.get("instruction", ""), "success": bool(done),
                "sim_seconds": round(elapsed, 2), "wall_seconds": round(time.monotonic() - t_wall0, 2),
                "chunks": len(chunks),
                "latency_p50_ms": round(1e3 * statistics.median(lat), 1) if lat else None,
                "inference_ms_mean": round(statistics.mean(c[1] for c in chunks), 1) if chunks else None,
                "encoder_compute_fraction": round(spent / full, 3) if full else None,
                "tokens_kept_fraction": round(sum(t[2] for t in toks) / max(sum(t[4] for t in toks), 1), 3),
                "tokens_reused_fraction": round(sum(t[3] for t in toks) / max(sum(t[2] for t in toks), 1), 3),
            }
            results.append(res)
            print(f"  episode {ep} seed {seed}: {'SUCCESS' if done else 'failure'} in {elapsed:.1f} s sim "
                  f"({res['wall_seconds']:.1f} s wall) | {res['chunks']} chunks, latency p50 {res['latency_p50_ms']} ms "
                  f"| encoder compute {res['encoder_compute_fraction']} of full, tokens kept "
                  f"{res['tokens_kept_fraction']}, reused {res['tokens_reused_fraction']} | \"{res['instruction']}\"")
    finally:
        b.shutdown()
    n_ok = sum(r["success"] for r in results)
    print(f"effvla demo: {n_ok}/{len(results)} successful episodes")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.gif and mon.frames:
        from PIL import Image as PILImage

        Path(args.gif).parent.mkdir(parents=True, exist_ok=True)
        imgs = [PILImage.fromarray(f) for f in mon.frames[::2]]
        imgs[0].save(args.gif, save_all=True, append_images=imgs[1:], duration=200, loop=0)
        print(f"  wrote {args.gif} ({len(imgs)} frames of the scene camera, episode 0)")
    return 0
