"""Node ``chunk_corrector``: per-step corrections of the executing chunk (A2C2, arXiv 2509.23224).

A chunk is planned from one observation and runs open loop for several control steps, more under an inference
delay. This node adds what is new since: on every new frame set (all cameras, matched by stamp within
``stamp_tolerance_s``) it runs the checkpoint's correction head (:mod:`effvla_ros.core.correction`) on the newest
frames (through the policy's own vision encoder and connector), the joint positions measured with them and the
executing chunk, for every row of that chunk the executor has not committed yet, and publishes the residuals
(``~/action_correction``, effvla_ros/ActionCorrection). The chunk executor adds each row's newest residual to that
row when it commits it, within its limits (``ChunkExecutorCore.on_correction``).

``visual_source``: ``images`` (default) encodes the camera images itself, one full vision pass per frame set;
``compressor`` reads every token the token compressor already computed for those frames (``~/all_tokens``, published
with its ``publish_all_tokens``), so a frame set costs the head alone and the node holds no model weights (only the
checkpoint's shapes are read). The compressor's tokens carry its patch reuse
(unchanged patches' tokens come from earlier frames) and its dtype; the head was trained on fresh float32 encodes.

Subscribes the camera images (``image_topic``, sensor-data QoS) or ``~/all_tokens``, ``joint_states``, the policy's ``~/action_chunk``
(the chunks, their actions and observation stamps) and the executor's ``~/execution_feedback`` (which chunk runs,
what is committed); publishes ``~/action_correction`` and ``/diagnostics``.

With ``correction.enabled: false`` (config/base.yaml) the node loads nothing and publishes nothing. Enabled, it
refuses to start without a head that fits the checkpoint (``correction_head.*`` beside it: ``effvla
train-correction``), naming the parameter. The joint state of an observation is the newest one stamped at or before
its images (``state_stamp_tolerance_s``), the rule of the policy node; that of the chunk's observation likewise.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import Empty

from effvla_ros.core.correction import ChunkCorrector, CorrectionConfig, encode_frames, load_corrector
from effvla_ros.core.observation import (
    DEFAULT_STATE_STAMP_TOLERANCE_S,
    ImageError,
    StateError,
    StateSpec,
    TokenError,
    checkpoint_joint_names,
    decode_tokens,
    resolve_state_spec,
    state_at,
)
from effvla_ros.core.params import ConfigBase, param
from effvla_ros.core.smolvla import read_arch
from effvla_ros.core.smolvla.config import DTYPE_CHOICES, RuntimeConfig
from effvla_ros.core.target_check import check_device
from effvla_ros.msg import ActionChunk, ActionCorrection, ExecutionFeedback, VisualTokens
from effvla_ros.nodes.common import (
    PIPELINE_QOS,
    SENSOR_QOS,
    NodeWorker,
    WorkerNode,
    image_to_rgb,
    run_node,
    shared_policy,
    stamp_to_sec,
)
from effvla_ros.nodes.param_bridge import ConfigParameters

__all__ = ["ChunkCorrectorNode", "CorrectorNodeConfig", "main"]


@dataclass
class CorrectorNodeConfig(ConfigBase):
    """Node-level parameters of the chunk corrector (no prefix)."""

    checkpoint: str = param("", read_only=True, description="local LeRobot SmolVLA checkpoint directory (its "
                                                              "correction_head.* is loaded)")
    vlm_dir: str = param("", read_only=True, description="VLM config + tokenizer directory (empty: checkpoint's vlm/)")
    device: str = param("cpu", read_only=True, description="torch device")
    vision_dtype: str = param("float32", choices=DTYPE_CHOICES, read_only=True,
                              description="vision tower dtype (the head was trained on the float32 encoder's tokens)")
    num_threads: int = param(0, min=0, max=64, read_only=True, description="torch CPU threads (0 = default)")
    cameras: list[str] = param(read_only=True, default_factory=lambda: ["scene", "wrist"],
                               description="camera names (= the checkpoint's observation.images.<name>)")
    image_topic: str = param("camera/{camera}/image_raw", read_only=True, description="image topic per camera")
    visual_source: str = param("images", choices=("images", "compressor"), read_only=True,
                               description="images: encode the camera images (a full vision pass per frame set); "
                                           "compressor: every token the token compressor computed for them "
                                           "(~/all_tokens; its publish_all_tokens must be true)")
    joint_states_topic: str = param("joint_states", read_only=True, description="sensor_msgs/JointState topic")
    state_joint_names: list[str] = param(read_only=True, default_factory=list,
                                         description="joints forming the state, in order (empty: the checkpoint's)")
    stamp_tolerance_s: float = param(0.05, min=0.0, max=5.0, description="max stamp spread across cameras")
    state_stamp_tolerance_s: float = param(
        DEFAULT_STATE_STAMP_TOLERANCE_S, min=0.0, max=5.0,
        description="the state of an observation is the newest JointState stamped at or before it, at most this "
                    "much older")

    def validate(self) -> None:
        if not self.cameras:
            raise ValueError("cameras: at least one camera is needed")
        if "{camera}" not in self.image_topic:
            raise ValueError("image_topic: must contain '{camera}'")


class ChunkCorrectorNode(WorkerNode):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__("chunk_corrector", **kwargs)
        started = time.monotonic()
        self.node_params = ConfigParameters(self, CorrectorNodeConfig(), on_change=lambda c, n: None)
        self.params = ConfigParameters(self, CorrectionConfig(), prefix="correction.", on_change=self._on_change)
        cfg = self.node_params.config
        self._cv = threading.Condition()
        self._frames: dict[str, Image | VisualTokens] = {}  # per camera, the newest (images or all tokens)
        self._states: deque[tuple[float, JointState]] = deque(maxlen=1024)
        self._chunks: OrderedDict[int, ActionChunk] = OrderedDict()
        self._feedback: ExecutionFeedback | None = None
        self._last_stamp = -1.0
        self.counts = {"published": 0, "frame_sets": 0, "no_chunk": 0, "unknown_chunk": 0, "nothing_left": 0,
                       "no_state": 0, "nonfinite": 0, "bad_image": 0, "bad_tokens": 0}
        self._last: dict[str, float] = {}
        self._tokens_seen = False
        self._started = time.monotonic()
        self.corrector: ChunkCorrector | None = None
        self.params.check = self._check
        if not self.params.config.enabled:
            self.get_logger().info("chunk corrector idle: correction.enabled is false")
            return
        if not cfg.checkpoint:
            raise ValueError("checkpoint: parameter is empty; set it to a local LeRobot SmolVLA checkpoint directory")
        check_device(cfg.device)
        self.policy: Any = None
        if cfg.visual_source == "images":  # the vision encoder runs here
            self.policy = shared_policy(cfg.checkpoint, cfg.vlm_dir or None,
                                        RuntimeConfig(device=cfg.device, vision_dtype=cfg.vision_dtype,
                                                      num_threads=cfg.num_threads))
            arch = self.policy.arch
        else:  # the compressor's tokens: only the shapes are needed, no weight is read
            arch = read_arch(cfg.checkpoint, vlm_dir=cfg.vlm_dir or None)
        unknown = [c for c in cfg.cameras if c not in arch.cameras]
        if unknown:
            raise ValueError(f"cameras: {unknown} not in the checkpoint's cameras {list(arch.cameras)}")
        try:
            self.corrector = load_corrector(cfg.checkpoint, self.params.config)
            self.corrector.check(arch.chunk_size, int(arch.action_dim), list(cfg.cameras))
        except ValueError as e:
            raise ValueError(f"correction.enabled: {e}") from None
        ckpt_state = checkpoint_joint_names(cfg.checkpoint)[0]
        self.state_spec = (resolve_state_spec(arch.state_dim, explicit=cfg.state_joint_names, checkpoint=ckpt_state)
                           if cfg.state_joint_names or ckpt_state else
                           StateSpec(arch.state_dim, (), by_position=True, source="no state_joint_names"))
        self.pub = self.create_publisher(ActionCorrection, "~/action_correction", PIPELINE_QOS)
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        if cfg.visual_source == "compressor":
            self.create_subscription(VisualTokens, "~/all_tokens", self._on_tokens, PIPELINE_QOS)
        else:
            for cam in cfg.cameras:
                self.create_subscription(Image, cfg.image_topic.format(camera=cam),
                                         lambda m, c=cam: self._on_image(c, m), SENSOR_QOS)
        self.create_subscription(JointState, cfg.joint_states_topic, self._on_state, 10)
        self.create_subscription(ActionChunk, "~/action_chunk", self._on_chunk, PIPELINE_QOS)
        self.create_subscription(ExecutionFeedback, "~/execution_feedback", self._on_feedback, PIPELINE_QOS)
        self.create_subscription(Empty, "reset", self._on_reset, 10)
        self.create_timer(1.0, self._publish_diagnostics, callback_group=MutuallyExclusiveCallbackGroup())
        self._worker = NodeWorker(self, "chunk_corrector_worker", self._step, self._cv, "correction")
        self._worker.start()
        spec = self.corrector.head.spec
        self.get_logger().info(
            f"chunk corrector ready: head for {spec.chunk_size} x {spec.action_dim} chunks, cameras {spec.cameras}, "
            f"dims {spec.dims or 'all'}, scale {self.params.config.scale}, startup {time.monotonic() - started:.1f} s")

    # ------------------------------------------------------------------ callbacks (cheap)
    def _check(self, c: CorrectionConfig) -> None:
        if c.enabled and self.corrector is None:
            raise ValueError("correction.enabled: this node started with it off and loaded no head; restart it with "
                             "correction.enabled: true")

    def _on_change(self, cfg: CorrectionConfig, names: set[str]) -> None:
        if self.corrector is not None:
            self.corrector.cfg = cfg

    def _on_image(self, cam: str, msg: Image) -> None:
        with self._cv:
            self._frames[cam] = msg
            self._cv.notify()

    def _on_tokens(self, msg: VisualTokens) -> None:
        self._tokens_seen = True
        if msg.camera_name not in self.node_params.config.cameras or msg.camera_missing:
            return  # a missing camera: no frame set until it is back
        with self._cv:
            self._frames[msg.camera_name] = msg
            self._cv.notify()

    def _on_state(self, msg: JointState) -> None:
        with self._cv:
            self._states.append((stamp_to_sec(msg.header.stamp), msg))

    def _on_chunk(self, msg: ActionChunk) -> None:
        with self._cv:
            self._chunks[int(msg.chunk_id)] = msg
            while len(self._chunks) > 8:
                self._chunks.popitem(last=False)

    def _on_feedback(self, msg: ExecutionFeedback) -> None:
        with self._cv:
            self._feedback = msg

    def _on_reset(self, _msg: Empty) -> None:
        with self._cv:
            self._frames.clear()
            self._states.clear()
            self._chunks.clear()
            self._feedback = None
            self._last_stamp = -1.0

    # ------------------------------------------------------------------ worker
    def _frame_set(self) -> tuple[float, dict[str, Image | VisualTokens]] | None:
        """The newest frames of every camera when they are one new observation (stamps within the tolerance)."""
        cfg = self.node_params.config
        if any(c not in self._frames for c in cfg.cameras):
            return None
        frames = {c: self._frames[c] for c in cfg.cameras}
        stamps = [stamp_to_sec(m.header.stamp) for m in frames.values()]
        if max(stamps) - min(stamps) > cfg.stamp_tolerance_s + 1e-9 or max(stamps) <= self._last_stamp:
            return None
        return max(stamps), frames

    def _state(self, stamp: float) -> np.ndarray | None:
        i = state_at([s for s, _ in self._states], stamp, self.node_params.config.state_stamp_tolerance_s)
        if i is None or i < 0:
            return None
        msg = self._states[i][1]
        try:
            return self.state_spec.vector(list(msg.name), msg.position)
        except StateError as e:
            self.get_logger().warning(f"joint state unusable: {e}", throttle_duration_sec=5.0)
            return None

    def _step(self) -> None:
        assert self.corrector is not None
        with self._cv:
            got = self._frame_set()
            if got is None:
                self._cv.wait(timeout=0.05)
                got = self._frame_set()
            if got is None:
                return
            stamp, frames = got
            self._last_stamp = stamp
            if not self.params.config.enabled:  # turned off live: nothing published
                return
            arrived = time.monotonic()
            self.counts["frame_sets"] += 1
            fb = self._feedback
            chunk = self._chunks.get(int(fb.chunk_id)) if fb is not None and fb.chunk_id else None
            if fb is None or fb.state != ExecutionFeedback.STATE_EXECUTING or not fb.chunk_id:
                self.counts["no_chunk"] += 1
                return
            if chunk is None:
                self.counts["unknown_chunk"] += 1
                return
            q_now = self._state(stamp)
            q_obs = self._state(stamp_to_sec(chunk.header.stamp))
        h, a = int(chunk.num_actions), int(chunk.action_dim)
        first = int(fb.committed_index)
        if first >= h:
            self.counts["nothing_left"] += 1
            return
        if q_now is None or q_obs is None:
            self.counts["no_state"] += 1
            self.get_logger().warning("no joint state stamped with the frames or the chunk's observation; no "
                                      "correction", throttle_duration_sec=5.0)
            return
        visual = self._visual(frames) if self.corrector.needs_visual else None
        if self.corrector.needs_visual and visual is None:
            return
        actions = torch.as_tensor(np.asarray(chunk.actions, dtype=np.float32)).reshape(h, a)
        # the frames' own row of the chunk: row i's residual comes from an observation i - obs_row steps older
        # (a lag-aware head is told so; the executor reports the age it measured when it commits the row)
        t0, dt = stamp_to_sec(chunk.header.stamp), stamp_to_sec(chunk.step_period)
        obs_row = max(0, int(round((stamp - t0) / dt))) if dt > 0 else first
        res = self.corrector.row_residuals(actions, first, q_now, q_obs, visual, obs_row=min(obs_row, first))
        if res is None:
            self.counts["nonfinite"] += 1
            self.get_logger().error("correction head gave NaN/Inf; nothing corrected", throttle_duration_sec=5.0)
            return
        msg = ActionCorrection()
        # the stamp the residuals were computed for (the newest of the frame set's, as its state and row)
        msg.header.stamp = max((m.header.stamp for m in frames.values()), key=stamp_to_sec)
        msg.chunk_id = chunk.chunk_id
        msg.first_index = first
        msg.num_rows = int(res.shape[0])
        msg.joint_names = list(chunk.joint_names)
        msg.action_dim = a
        msg.residuals = res.double().reshape(-1).tolist()
        msg.compute_ms = float((time.monotonic() - arrived) * 1e3)
        self.pub.publish(msg)
        self.counts["published"] += 1
        self._last = {"compute_ms": msg.compute_ms, "rows": float(msg.num_rows),
                      "mean_abs_residual": float(res.abs().mean()) if res.numel() else 0.0}

    def _visual(self, frames: dict[str, Image | VisualTokens]) -> dict[str, torch.Tensor] | None:
        """camera -> the head's tokens (N, D) of a frame set: encoded here, or the compressor's (every token of the
        grid, in grid order); None (counted, logged) when a frame or a token message is unusable."""
        if self.node_params.config.visual_source == "images":
            try:
                rgb = {c: image_to_rgb(m) for c, m in frames.items()}  # type: ignore[arg-type]
            except ImageError as e:
                self.counts["bad_image"] += 1
                self.get_logger().warning(f"invalid image: {e}", throttle_duration_sec=5.0)
                return None
            return encode_frames(self.policy, rgb)
        assert self.corrector is not None
        out: dict[str, torch.Tensor] = {}
        n = int(self.corrector.head.spec.visual_tokens)
        for c, m in frames.items():
            try:
                tok = decode_tokens(m.dtype, bytes(m.data), list(m.kept_indices),  # type: ignore[union-attr]
                                    (int(m.grid_height), int(m.grid_width)), int(m.token_dim))  # type: ignore[union-attr]
                if tok.tokens.shape[0] != n or not torch.equal(tok.kept, torch.arange(n)):
                    raise TokenError(f"{tok.tokens.shape[0]} tokens, the head takes all {n} of the grid in order "
                                     "(the compressor's ~/all_tokens, not its pruned ~/visual_tokens)")
            except TokenError as e:
                self.counts["bad_tokens"] += 1
                self.get_logger().warning(f"camera {c}: unusable tokens: {e}", throttle_duration_sec=5.0)
                return None
            out[c] = tok.tokens
        return out

    # ------------------------------------------------------------------ diagnostics
    def _publish_diagnostics(self) -> None:
        arr = DiagnosticArray()
        arr.header.stamp = self.get_clock().now().to_msg()
        st = DiagnosticStatus(name="effvla/chunk_corrector", hardware_id="policy")
        st.level, st.message = DiagnosticStatus.OK, "ok" if self.params.config.enabled else "off (correction.enabled)"
        if self.counts["nonfinite"] or self.counts["no_state"]:
            st.level, st.message = DiagnosticStatus.WARN, "corrections skipped (no state or non-finite head output)"
        if (self.corrector is not None and self.node_params.config.visual_source == "compressor"
                and not self._tokens_seen and time.monotonic() - self._started > 5.0):
            st.level, st.message = DiagnosticStatus.WARN, "no tokens on ~/all_tokens"
            self.get_logger().warning(
                "visual_source is 'compressor' but nothing arrived on ~/all_tokens: set the token compressor's "
                "publish_all_tokens: true (or visual_source: images); nothing is corrected", throttle_duration_sec=10.0)
        vals = {**{k: str(v) for k, v in self.counts.items()}, **{k: f"{v:.4f}" for k, v in self._last.items()}}
        st.values = [KeyValue(key=k, value=v) for k, v in vals.items()]
        arr.status.append(st)
        self.diag_pub.publish(arr)


def main(args: list[str] | None = None) -> None:
    run_node(ChunkCorrectorNode, "chunk_corrector", args)


if __name__ == "__main__":
    main()
