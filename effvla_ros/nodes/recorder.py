"""Node ``recorder``: the pipeline's topics -> a rosbag2 (MCAP), without rosbag2.

Subscribes, generically by type, every topic of the graph that matches one of ``topics`` (shell-style
patterns; relative ones are resolved in the node's namespace; the graph is polled every
``discovery_period_s`` so topics that appear later are picked up) with ``raw=True`` subscriptions: the
CDR bytes are written unchanged (except VisualTokens' payload with ``strip_token_data``). Default
topics: camera images, instruction, joint states, visual tokens, action chunks, execution feedback,
the published trajectories, diagnostics and the simulation's episode/success topics.

QoS adapts to the publishers like ``ros2 bag record``: best effort when any publisher is best
effort, transient local when every publisher is (latched instruction), the offered profiles are
stored in the bag so a player can re-offer them.

Bounded memory: callbacks only put (topic, receive time, bytes) into a queue bounded in messages and
bytes; a writer thread writes them. When the disk cannot keep up, new messages are dropped and
counted per topic (diagnostics, the log on exit and the bag's ``custom_data``).

Crash safety: the bag's MCAP chunks are closed and flushed every ``flush_period_s`` (or when a chunk
reaches ``max_chunk_bytes``) and ``metadata.yaml`` is rewritten (atomic rename) each time with what
is on disk, so a recorder killed with SIGKILL leaves a bag that ``effvla replay`` (and readers that
scan an MCAP without summary) read up to the last flushed chunk. A clean stop (Ctrl-C, SIGTERM,
``max_duration_s``) writes the MCAP summary and the final metadata.yaml.

Timestamps are receive times on the node's clock (``use_sim_time`` follows /clock).
"""
from __future__ import annotations

import fnmatch
import json
import queue
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

from effvla_ros.core.params import ConfigBase, param
from effvla_ros.nodes.param_bridge import ConfigParameters
from effvla_ros.replay.bagio import McapBagWriter, make_typestore, to_rosbags_qos

#: What a session of the pipeline needs for `effvla replay` and debugging.
DEFAULT_TOPICS = [
    "camera/*/image_raw",
    "instruction",
    "joint_states",
    "visual_tokens",
    "action_chunk",
    "execution_feedback",
    "/*/joint_trajectory",
    "/*/gripper_trajectory",
    "/diagnostics",
    "/sim/episode",
    "/sim/success",
]
VISUAL_TOKENS_TYPE = "effvla_ros/msg/VisualTokens"


@dataclass
class RecorderConfig(ConfigBase):
    """Parameters of the recorder node (no prefix)."""

    out: str = param("", read_only=True,
                     description="output bag directory (must not exist); empty: ./effvla_<date>_<time>")
    topics: list[str] = param(default_factory=lambda: list(DEFAULT_TOPICS), read_only=True,
                              description="topic names or shell patterns (* ?); relative ones are resolved in "
                                          "the node's namespace")
    max_duration_s: float = param(0.0, min=0.0, max=1e7, read_only=True,
                                  description="stop after this many seconds (wall time; 0 = until stopped)")
    flush_period_s: float = param(1.0, min=0.05, max=60.0, read_only=True,
                                  description="close + flush the MCAP chunk and update metadata.yaml this often: "
                                              "what a SIGKILL can lose")
    max_chunk_bytes: int = param(1 << 20, min=1024, max=1 << 30, read_only=True,
                                 description="close + flush the MCAP chunk earlier when it reaches this size "
                                             "(rosbags' writer closes chunks at 1 MiB by itself)")
    queue_messages: int = param(2000, min=1, max=10_000_000, read_only=True,
                                description="messages waiting for the disk; beyond, new ones are dropped (counted)")
    queue_bytes: int = param(256 << 20, min=1024, max=1 << 40, read_only=True,
                             description="bytes waiting for the disk; beyond, new messages are dropped (counted)")
    discovery_period_s: float = param(0.5, min=0.05, max=60.0, read_only=True,
                                      description="how often the graph is polled for new matching topics")
    strip_token_data: bool = param(False, read_only=True,
                                   description="record VisualTokens without their token payload (data): keeps "
                                               "indices, stats and timing; replay recomputes tokens from images")
    fsync: bool = param(False, read_only=True, description="fsync at every flush (survives power loss; slower)")
    depth: int = param(100, min=1, max=100_000, read_only=True, description="subscription queue depth")

    def validate(self) -> None:
        if not self.topics:
            raise ValueError("topics: at least one topic or pattern is needed")


def message_class(msgtype: str) -> Any:
    """``pkg/msg/Name`` -> the generated Python class (what rosidl_runtime_py's get_message does)."""
    import importlib

    parts = msgtype.split("/")
    if len(parts) == 2:
        parts = [parts[0], "msg", parts[1]]
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"{msgtype!r} is not a message type name (pkg/msg/Name)")
    module = importlib.import_module(f"{parts[0]}.{parts[1]}")
    return getattr(module, parts[2])


def default_out() -> str:
    return datetime.now().strftime("effvla_%Y_%m_%d-%H_%M_%S")


class RecorderNode(Node):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__("recorder", **kwargs)
        self.params = ConfigParameters(self, RecorderConfig(), on_change=lambda c, n: None)
        cfg = self.params.config
        self.out = Path(cfg.out or default_out()).expanduser().resolve()
        if self.out.exists():
            raise ValueError(f"out: {self.out} exists already; rosbag2 bags are never overwritten (choose a new path)")
        self._patterns = [self._resolve(p) for p in cfg.topics]
        self._typestore = make_typestore()
        self.writer = McapBagWriter(self.out, self._typestore, max_chunk_bytes=cfg.max_chunk_bytes, fsync=cfg.fsync)
        self._queue: queue.Queue[tuple[str, Any, Any]] = queue.Queue()
        self._lock = threading.Lock()
        self._queued_msgs = 0
        self._queued_bytes = 0
        self.counts: dict[str, int] = {}
        self.dropped: dict[str, int] = {}
        self._subs: dict[str, Any] = {}
        self._types: dict[str, str] = {}
        self._error: str | None = None
        self._running = True
        self._started = time.monotonic()
        self._closed = False
        self.done = False
        self._strip_cls: Any = None
        self._writer_thread = threading.Thread(target=self._write_loop, name="recorder_writer", daemon=True)
        self._writer_thread.start()
        group = MutuallyExclusiveCallbackGroup()
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.create_timer(cfg.discovery_period_s, self._discover, callback_group=group)
        self.create_timer(1.0, self._publish_diagnostics, callback_group=group)
        self._discover()
        self.get_logger().info(f"recording to {self.out} (MCAP): topics {self._patterns}")

    # ------------------------------------------------------------------ discovery
    def _resolve(self, pattern: str) -> str:
        if pattern.startswith("/"):
            return pattern
        ns = self.get_namespace().rstrip("/")
        return f"{ns}/{pattern}"

    def _matches(self, topic: str) -> bool:
        return any(fnmatch.fnmatchcase(topic, p) for p in self._patterns)

    def _qos_for(self, topic: str) -> tuple[QoSProfile, list[Any]]:
        infos = self.get_publishers_info_by_topic(topic)
        offered = [i.qos_profile for i in infos]
        best_effort = any(q.reliability == ReliabilityPolicy.BEST_EFFORT for q in offered)
        latched = bool(offered) and all(q.durability == DurabilityPolicy.TRANSIENT_LOCAL for q in offered)
        depth = self.params.config.depth
        qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth,
                         reliability=ReliabilityPolicy.BEST_EFFORT if best_effort else ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL if latched else DurabilityPolicy.VOLATILE)
        return qos, offered

    def _discover(self) -> None:
        if self.done:
            return
        cfg = self.params.config
        if cfg.max_duration_s > 0 and time.monotonic() - self._started >= cfg.max_duration_s:
            self.get_logger().info(f"max_duration_s {cfg.max_duration_s} reached: stopping")
            self.done = True
            return
        for topic, types in self.get_topic_names_and_types():
            if topic in self._subs or not self._matches(topic):
                continue
            if not self.get_publishers_info_by_topic(topic):
                continue  # only subscribers so far: the type is known, the QoS to match is not
            msgtype = types[0]
            if len(types) > 1:
                self.get_logger().warning(f"{topic}: several types {types}; recording {msgtype}")
            try:
                self._subscribe(topic, msgtype)
            except Exception as e:  # noqa: BLE001 - a topic we cannot record must not stop the others
                self.get_logger().error(f"{topic}: cannot record {msgtype}: {e}")
                self._subs[topic] = None

    def _subscribe(self, topic: str, msgtype: str) -> None:
        cls = message_class(msgtype)
        qos, offered = self._qos_for(topic)
        typ = msgtype if msgtype.count("/") == 2 else msgtype.replace("/", "/msg/", 1)
        hashes = {str(i.topic_type_hash) for i in self.get_publishers_info_by_topic(topic)}
        self._types[topic] = typ
        self._queue.put(("topic", topic, (typ, to_rosbags_qos(offered), hashes)))  # before its first message
        strip = self.params.config.strip_token_data and typ == VISUAL_TOKENS_TYPE
        if strip:
            self._strip_cls = cls
        self._subs[topic] = self.create_subscription(
            cls, topic, lambda data, t=topic, s=strip: self._on_message(t, data, s), qos, raw=True)
        self.counts.setdefault(topic, 0)
        self.dropped.setdefault(topic, 0)
        self.get_logger().info(f"recording {topic} [{typ}] ({'best effort' if qos.reliability == ReliabilityPolicy.BEST_EFFORT else 'reliable'}"
                               f"{', transient local' if qos.durability == DurabilityPolicy.TRANSIENT_LOCAL else ''})")

    # ------------------------------------------------------------------ data path
    def _on_message(self, topic: str, data: bytes, strip: bool) -> None:
        if not self._running:
            return
        stamp = self.get_clock().now().nanoseconds
        if strip:
            data = self._strip(data)
        n = len(data)
        cfg = self.params.config
        with self._lock:
            if self._queued_msgs + 1 > cfg.queue_messages or self._queued_bytes + n > cfg.queue_bytes:
                self.dropped[topic] = self.dropped.get(topic, 0) + 1
                return
            self._queued_msgs += 1
            self._queued_bytes += n
        self._queue.put(("msg", topic, (stamp, data)))

    def _strip(self, data: bytes) -> bytes:
        from rclpy.serialization import deserialize_message, serialize_message

        msg = deserialize_message(data, self._strip_cls)
        msg.data = b""
        return bytes(serialize_message(msg))

    def _write_loop(self) -> None:
        cfg = self.params.config
        last_flush = time.monotonic()
        while True:
            try:
                kind, topic, payload = self._queue.get(timeout=0.05)
            except queue.Empty:
                kind = ""
            try:
                if kind == "topic":
                    typ, offered, hashes = payload
                    known = [h for h in hashes if h.startswith("RIHS01_")]
                    self.writer.add_topic(topic, typ, qos=offered, fallback_rihs01=known[0] if known else None)
                elif kind == "msg":
                    stamp, data = payload
                    with self._lock:
                        self._queued_msgs -= 1
                        self._queued_bytes -= len(data)
                    self.writer.write(topic, stamp, data)
                    self.counts[topic] = self.counts.get(topic, 0) + 1
                elif kind == "stop":
                    return
                now = time.monotonic()
                if now - last_flush >= cfg.flush_period_s:
                    self.writer.flush()
                    last_flush = now
            except Exception as e:  # noqa: BLE001 - keep the bag consistent, report once
                if self._error is None:
                    self._error = f"{type(e).__name__}: {e}"
                    self.get_logger().error(f"writing the bag failed: {self._error}")

    # ------------------------------------------------------------------ diagnostics / shutdown
    def stats(self) -> dict[str, Any]:
        return {"out": str(self.out), "messages": dict(self.counts), "dropped": dict(self.dropped),
                "queued": self._queued_msgs, "flushes": self.writer.flushes, "error": self._error}

    def _publish_diagnostics(self) -> None:
        arr = DiagnosticArray()
        arr.header.stamp = self.get_clock().now().to_msg()
        dropped = sum(self.dropped.values())
        st = DiagnosticStatus(name="effvla/recorder", hardware_id="recorder")
        st.level = DiagnosticStatus.ERROR if self._error else (DiagnosticStatus.WARN if dropped else DiagnosticStatus.OK)
        st.message = self._error or (f"{dropped} messages dropped (disk too slow)" if dropped else "recording")
        vals = {"out": str(self.out), "topics": str(len([s for s in self._subs.values() if s is not None])),
                "messages": str(sum(self.counts.values())), "dropped": str(dropped),
                "queued_messages": str(self._queued_msgs), "queued_bytes": str(self._queued_bytes)}
        st.values = [KeyValue(key=k, value=v) for k, v in vals.items()]
        arr.status.append(st)
        self.diag_pub.publish(arr)

    def close(self) -> dict[str, Any]:
        """Stop recording and finish the bag (idempotent). Returns the statistics."""
        if self._closed:
            return self.stats()
        self._closed = True
        self._running = False
        self._queue.put(("stop", "", None))
        self._writer_thread.join(timeout=60.0)
        custom = {"effvla.dropped": json.dumps(self.dropped, sort_keys=True),
                  "effvla.recorder": "effvla_ros recorder"}
        try:
            self.writer.close(custom)
        except Exception as e:  # noqa: BLE001 - the flushed part stays readable
            self._error = self._error or f"closing the bag failed: {e}"
        st = self.stats()
        dropped = sum(self.dropped.values())
        # not a ROS logger: the context may already be shut down (its /rosout publisher is gone)
        print(f"[recorder] bag {self.out}: {sum(self.counts.values())} messages on {len(self.counts)} topics"
              + (f", {dropped} dropped" if dropped else ""), file=sys.stderr, flush=True)
        return st

    def destroy_node(self) -> None:
        if hasattr(self, "writer"):
            self.close()
        super().destroy_node()


def run_recorder(args: list[str] | None = None, parameter_overrides: list[Any] | None = None) -> int:
    """Init rclpy, record until Ctrl-C / SIGTERM / max_duration_s, finish the bag. Exit code."""
    from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor

    rclpy.init(args=args)
    node = None
    code = 0
    try:
        node = RecorderNode(parameter_overrides=parameter_overrides or [])
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        while rclpy.ok() and not node.done:
            executor.spin_once(timeout_sec=0.1)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except (ValueError, FileNotFoundError) as e:
        rclpy.logging.get_logger("recorder").fatal(f"{type(e).__name__}: {e}")
        code = 2
    finally:
        if node is not None:
            stats = node.close()
            if stats.get("error"):
                code = code or 1
            node.destroy_node()
        rclpy.try_shutdown()
    return code


def main(args: list[str] | None = None) -> None:
    code = run_recorder(args)
    if code:
        raise SystemExit(code)


if __name__ == "__main__":
    main()
