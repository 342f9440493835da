"""Node ``token_compressor``: camera images -> compressed visual tokens (effvla_ros/VisualTokens).

Subscribes ``camera/<camera>/image_raw`` (sensor_msgs/Image, sensor-data QoS, depth 1) for every
configured camera, and image_transport's ``<image_topic>/compressed`` (sensor_msgs/CompressedImage, JPEG
or PNG, decoded with OpenCV; used while no raw frame of that camera arrived in the last second, so a
camera publishing both is encoded once; compressedDepth is refused), and ``instruction``
(std_msgs/String, latched and volatile); publishes
``~/visual_tokens`` (one message per camera frame) and ``/diagnostics``.

The encoder runs in a worker thread, never in a subscription callback: each camera keeps only its
newest frame (latest wins), so frames never queue behind inference. All compression settings
(``pruning.*``, ``reuse.*``) are live parameters applied from the next frame on.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Empty, String

from effvla_ros.core.backends import BACKENDS, make_backend
from effvla_ros.core.compression.compressor import CompressedCamera, ReuseConfig, TokenCompressor
from effvla_ros.core.compression.pruning import PruningConfig
from effvla_ros.core.observation import WIRE_DTYPES, compressed_to_rgb, encode_tokens, rgb_to_tensor
from effvla_ros.core.params import ConfigBase, param
from effvla_ros.core.smolvla.config import DTYPE_CHOICES, RuntimeConfig
from effvla_ros.core.target_check import check_device
from effvla_ros.msg import VisualTokens
from effvla_ros.nodes.common import (
    INSTRUCTION_VOLATILE_QOS,
    LATCHED_QOS,
    PIPELINE_QOS,
    SENSOR_QOS,
    ImageError,
    NodeWorker,
    Throttle,
    WorkerNode,
    clean_instruction,
    describe_text,
    image_to_rgb,
    run_node,
    shared_policy,
    stamp_to_sec,
)
from effvla_ros.nodes.param_bridge import ConfigParameters


@dataclass
class CompressorNodeConfig(ConfigBase):
    """Node-level parameters of the token compressor (no prefix)."""

    checkpoint: str = param("", read_only=True, description="local LeRobot SmolVLA checkpoint directory")
    vlm_dir: str = param("", read_only=True,
                         description="directory with the VLM config + tokenizer (empty: checkpoint's vlm/ or HF cache)")
    cameras: list[str] = param(read_only=True, default_factory=lambda: ["scene", "wrist"],
                               description="camera names (= the checkpoint's observation.images.<name>)")
    image_topic: str = param("camera/{camera}/image_raw", read_only=True,
                             description="image topic per camera; {camera} is replaced by the name")
    instruction_topic: str = param("instruction", read_only=True, description="task instruction topic")
    device: str = param("cpu", read_only=True, description="torch device of the encoder")
    vision_dtype: str = param("float32", choices=DTYPE_CHOICES, read_only=True,
                              description="encoder dtype (auto: bfloat16 where the device computes it natively, else float32 / float16 on CUDA)")
    wire_dtype: str = param("float16", choices=tuple(WIRE_DTYPES), read_only=True,
                            description="element type of the published token payload")
    num_threads: int = param(0, min=0, max=64, read_only=True, description="torch CPU threads (0 = default)")
    adaptive_threads: bool = param(False, read_only=True,
                                   description="lower the torch threads before each stage call to the cores other processes leave free (/proc/stat), at most num_threads: no OpenMP spinning against a busy CPU")
    publish_all_tokens: bool = param(False, description="also publish every token of each frame, before pruning, "
                                                        "on ~/all_tokens (what the chunk_corrector's visual_source "
                                                        "'compressor' reads instead of encoding the frames again)")
    backend: str = param("eager", choices=tuple(BACKENDS), read_only=True,
                         description="stage backend of the encoder: eager, packed (x86 oneDNN pre-packed weights, also "
                                     "for patch reuse), compiled (torch.compile, full frames), cudagraph / "
                                     "cudagraph_compiled (full frames as CUDA graphs, eager / compiled layers; "
                                     "partial passes eager), or the exported vision "
                                     "graph run by onnxruntime or tensorrt (export_dir); patch-level reuse needs a "
                                     "backend with partial encode")
    export_dir: str = param("", read_only=True,
                            description="directory written by `effvla export` (backend onnxruntime / tensorrt)")
    warmup: bool = param(True, read_only=True,
                         description="at start, encode a dummy frame twice (compiles a compiled backend) and log the "
                                     "measured encode time")
    count_flops: bool = param(False, read_only=True,
                              description="count every encode's FLOPs with torch.utils.flop_counter (exact, slower); "
                                          "off: first full pass counted, later passes accounted analytically")
    camera_timeout_s: float = param(1.0, min=0.05, max=60.0,
                                    description="a camera without a valid frame for this long is published as missing")
    max_stamp_skew_s: float = param(0.5, min=0.0, max=60.0,
                                    description="stamps going backwards by more than this reset the camera's cache "
                                                "(clock reset); smaller steps back are dropped")

    def validate(self) -> None:
        if not self.cameras:
            raise ValueError("cameras: at least one camera is needed")
        if "{camera}" not in self.image_topic:
            raise ValueError("image_topic: must contain '{camera}'")


class _Slot:
    """Newest frame of one camera plus its bookkeeping."""

    def __init__(self) -> None:
        self.msg: Image | CompressedImage | None = None
        self.raw_wall = -1e9  # when the last raw Image arrived (compressed frames are ignored while raw ones come)
        self.last_valid_wall = time.monotonic()
        self.last_stamp: float | None = None
        self.seq = 0
        self.rates: deque[float] = deque(maxlen=30)
        self.last: dict[str, float] = {}
        self.counts = {"frames": 0, "dropped_invalid": 0, "dropped_backwards": 0, "missing_published": 0}
        self.missing = False


class TokenCompressorNode(WorkerNode):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__("token_compressor", **kwargs)
        started = time.monotonic()
        self.node_params = ConfigParameters(self, CompressorNodeConfig(), on_change=lambda c, n: None)
        self.pruning_params = ConfigParameters(self, PruningConfig(), prefix="pruning.", on_change=self._on_pruning)
        self.reuse_params = ConfigParameters(self, ReuseConfig(), prefix="reuse.", on_change=self._on_reuse)
        cfg = self.node_params.config
        if not cfg.checkpoint:
            raise ValueError("checkpoint: parameter is empty; set it to a local LeRobot SmolVLA checkpoint directory")
        check_device(cfg.device)  # before anything touches the device: say what to change
        runtime = RuntimeConfig(device=cfg.device, vision_dtype=cfg.vision_dtype, num_threads=cfg.num_threads,
                                adaptive_threads=cfg.adaptive_threads)
        policy = shared_policy(cfg.checkpoint, cfg.vlm_dir or None, runtime)
        unknown = [c for c in cfg.cameras if c not in policy.cameras]
        if unknown:
            raise ValueError(f"cameras: {unknown} not in the checkpoint's cameras {policy.cameras}")
        self.compressor = TokenCompressor(policy, self.pruning_params.config, self.reuse_params.config,
                                          count_flops=cfg.count_flops,
                                          backend=make_backend(cfg.backend, policy, export_dir=cfg.export_dir or None))
        self.reuse_params.check = lambda c: self.compressor.backend.caps.check(patch_reuse=c.enabled and c.patch_level)
        warm = ""
        if cfg.warmup:
            t0 = time.monotonic()
            encode_s = self.compressor.warm_up()
            warm = f", warm-up {time.monotonic() - t0:.1f} s (full encode {encode_s:.3f} s per camera, measured)"
        self._lock = threading.Condition()
        self._slots = {c: _Slot() for c in cfg.cameras}
        self._instruction: str | None = None
        self._instruction_dirty = False
        self._settings_dirty = False
        self._reset_pending = False
        self._log_throttle = Throttle(2.0)

        self.pub = self.create_publisher(VisualTokens, "~/visual_tokens", PIPELINE_QOS)
        self.all_pub = self.create_publisher(VisualTokens, "~/all_tokens", PIPELINE_QOS)
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        for cam in cfg.cameras:
            topic = cfg.image_topic.format(camera=cam)
            self.create_subscription(Image, topic, lambda m, c=cam: self._on_image(c, m), SENSOR_QOS)
            self.create_subscription(CompressedImage, f"{topic}/compressed",
                                     lambda m, c=cam: self._on_compressed(c, m), SENSOR_QOS)
        for qos in (LATCHED_QOS, INSTRUCTION_VOLATILE_QOS):
            self.create_subscription(String, cfg.instruction_topic, self._on_instruction, qos)
        self.create_subscription(Empty, "reset", self._on_reset, 10)
        self.create_timer(1.0, self._publish_diagnostics, callback_group=MutuallyExclusiveCallbackGroup())
        self._worker = NodeWorker(self, "token_compressor_worker", self._step, self._lock, "encoding")
        self._worker.start()
        self.get_logger().info(
            f"token compressor ready: cameras {cfg.cameras}, {policy.arch.tokens_per_camera} tokens/camera, "
            f"pruning={self.pruning_params.config.method} keep_ratio={self.pruning_params.config.keep_ratio}, "
            f"reuse={'on' if self.reuse_params.config.enabled else 'off'}, backend={cfg.backend}{warm}, "
            f"startup {time.monotonic() - started:.1f} s")

    # ------------------------------------------------------------------ parameter changes
    def _on_pruning(self, cfg: PruningConfig, names: set[str]) -> None:
        with self._lock:
            self._settings_dirty = True

    def _on_reuse(self, cfg: ReuseConfig, names: set[str]) -> None:
        with self._lock:
            self._settings_dirty = True

    # ------------------------------------------------------------------ subscriptions (cheap)
    def _on_image(self, camera: str, msg: Image) -> None:
        with self._lock:
            self._slots[camera].msg = msg  # latest wins
            self._slots[camera].raw_wall = time.monotonic()
            self._lock.notify()

    def _on_compressed(self, camera: str, msg: CompressedImage) -> None:
        with self._lock:
            slot = self._slots[camera]
            if time.monotonic() - slot.raw_wall < 1.0:  # the raw stream of this camera is live: use it
                return
            slot.msg = msg  # latest wins
            self._lock.notify()

    def _on_reset(self, _msg: Empty) -> None:
        """A new episode: drop the temporal-reuse caches (the scene changed completely)."""
        with self._lock:
            self._reset_pending = True
            self._lock.notify()

    def _on_instruction(self, msg: String) -> None:
        text, problem = clean_instruction(msg.data)
        if problem:
            self.get_logger().warning(problem, throttle_duration_sec=5.0)
        with self._lock:
            if text != self._instruction:
                self._instruction = text
                self._instruction_dirty = True
                self._lock.notify()

    # ------------------------------------------------------------------ worker
    def _step(self) -> None:
        with self._lock:
            pending = [c for c, s in self._slots.items() if s.msg is not None]
            if not pending:
                self._lock.wait(timeout=0.05)
                pending = [c for c, s in self._slots.items() if s.msg is not None]
            jobs = [(c, self._slots[c].msg) for c in pending]
            for c in pending:
                self._slots[c].msg = None
            instruction = self._instruction if self._instruction_dirty else None
            self._instruction_dirty = False
            settings = self._settings_dirty
            self._settings_dirty = False
            reset, self._reset_pending = self._reset_pending, False
        if reset:
            self.compressor.reset()
        if settings:
            self.compressor.configure(self.pruning_params.config, self.reuse_params.config)
        if instruction is not None:
            try:
                self.compressor.set_instruction(instruction)
                # once per change, shortened, at most one line per 2 s (a flood of changes is counted)
                line = self._log_throttle("instruction", f"instruction: {describe_text(instruction)}")
                if line:
                    self.get_logger().info(line)
            except Exception as e:  # noqa: BLE001 - keep running
                self.get_logger().error(f"cannot tokenize instruction {describe_text(instruction)}: {e}",
                                        throttle_duration_sec=2.0)
        for cam, msg in jobs:
            try:
                self._process(cam, msg)
            except Exception as e:  # noqa: BLE001 - a bad frame must not stop the node
                self._slots[cam].counts["dropped_invalid"] += 1
                self.get_logger().error(f"camera {cam}: frame dropped: {e}", throttle_duration_sec=2.0)
        self._check_missing()

    def _process(self, cam: str, msg: Image | CompressedImage) -> None:
        cfg = self.node_params.config
        slot = self._slots[cam]
        stamp = stamp_to_sec(msg.header.stamp)
        if slot.last_stamp is not None and stamp < slot.last_stamp:
            if slot.last_stamp - stamp > cfg.max_stamp_skew_s:
                self.get_logger().warning(
                    f"camera {cam}: stamp jumped back {slot.last_stamp - stamp:.3f} s (clock reset?); "
                    "resetting its cache", throttle_duration_sec=2.0)
                self.compressor.reset(cam)
            else:
                slot.counts["dropped_backwards"] += 1
                self.get_logger().warning(f"camera {cam}: stamp went backwards by {slot.last_stamp - stamp:.3f} s; "
                                       "frame dropped", throttle_duration_sec=2.0)
                return
        try:
            rgb = (compressed_to_rgb(msg.format, msg.data) if isinstance(msg, CompressedImage)
                   else image_to_rgb(msg))
            img = rgb_to_tensor(rgb)  # (3, H, W) in [0, 1]
        except ImageError as e:
            slot.counts["dropped_invalid"] += 1
            self.get_logger().warning(f"camera {cam}: invalid image: {e}", throttle_duration_sec=2.0)
            return
        out = self.compressor.process(cam, img)
        payload = encode_tokens(out.tokens, cfg.wire_dtype)  # (K, D) in the wire dtype
        if not np.isfinite(payload).all():
            slot.counts["dropped_invalid"] += 1
            self.get_logger().error(f"camera {cam}: encoder produced NaN/Inf; not published", throttle_duration_sec=2.0)
            return
        vt = self._tokens_msg(msg, cam, slot.seq, out, payload, out.kept.to(torch.int64).tolist(), out.reused.tolist())
        self.pub.publish(vt)
        if cfg.publish_all_tokens:  # every token of the grid, in grid order (the kept ones as published above)
            n = int(out.all_tokens.shape[0])
            self.all_pub.publish(self._tokens_msg(msg, cam, slot.seq, out, encode_tokens(out.all_tokens, cfg.wire_dtype),
                                                  list(range(n)), []))
        now = time.monotonic()
        slot.rates.append(now)
        slot.seq += 1
        slot.last_stamp = stamp
        slot.last_valid_wall = now
        slot.missing = False
        slot.counts["frames"] += 1
        slot.last = {"kept": len(vt.kept_indices), "reused": int(out.reused.sum()), "time_ms": vt.encode_time_ms,
                     "flops_fraction": out.encoder_flops / max(out.encoder_flops_full, 1),
                     "tokens": out.grid[0] * out.grid[1]}

    def _tokens_msg(self, msg: Image | CompressedImage, cam: str, seq: int, out: CompressedCamera, payload: np.ndarray,
                    kept: list[int], reused: list[bool]) -> VisualTokens:
        """A VisualTokens of frame ``msg`` (its header): ``payload`` (K, D) in the wire dtype at grid indices ``kept``."""
        vt = VisualTokens()
        vt.header = msg.header
        vt.camera_name = cam
        vt.camera_missing = False
        vt.frame_seq = seq
        vt.grid_height, vt.grid_width = out.grid
        vt.token_dim = int(payload.shape[1])
        vt.dtype = self.node_params.config.wire_dtype
        vt.kept_indices = kept
        vt.reused = reused
        vt.data = payload.tobytes()
        vt.encoder_flops = int(out.encoder_flops)
        vt.encoder_flops_full = int(out.encoder_flops_full)
        vt.encode_time_ms = float(out.time_s * 1e3)
        return vt

    def _check_missing(self) -> None:
        cfg = self.node_params.config
        now = time.monotonic()
        for cam, slot in self._slots.items():
            if now - slot.last_valid_wall > cfg.camera_timeout_s:
                if not slot.missing:
                    self.get_logger().warning(f"camera {cam}: no valid frame for {cfg.camera_timeout_s} s; "
                                           "publishing it as missing", throttle_duration_sec=5.0)
                slot.missing = True
                slot.last_valid_wall = now  # re-publish the marker every timeout period
                vt = VisualTokens()
                vt.header.stamp = self.get_clock().now().to_msg()
                vt.camera_name = cam
                vt.camera_missing = True
                vt.frame_seq = slot.seq
                vt.dtype = cfg.wire_dtype
                self.pub.publish(vt)
                slot.seq += 1
                slot.counts["missing_published"] += 1

    # ------------------------------------------------------------------ diagnostics
    def _publish_diagnostics(self) -> None:
        arr = DiagnosticArray()
        arr.header.stamp = self.get_clock().now().to_msg()
        for cam, slot in self._slots.items():
            st = DiagnosticStatus(name=f"effvla/token_compressor/{cam}", hardware_id=cam)
            rate = 0.0
            if len(slot.rates) >= 2 and slot.rates[-1] > slot.rates[0]:
                rate = (len(slot.rates) - 1) / (slot.rates[-1] - slot.rates[0])
            if slot.missing:
                st.level, st.message = DiagnosticStatus.WARN, "camera missing"
            elif slot.counts["dropped_invalid"] or slot.counts["dropped_backwards"]:
                st.level, st.message = DiagnosticStatus.WARN, "frames dropped (invalid or stamps backwards)"
            else:
                st.level, st.message = DiagnosticStatus.OK, "ok"
            vals = {"rate_hz": f"{rate:.2f}", **{k: str(v) for k, v in slot.counts.items()},
                    **{k: (f"{v:.3f}" if isinstance(v, float) else str(v)) for k, v in slot.last.items()}}
            st.values = [KeyValue(key=k, value=v) for k, v in vals.items()]
            arr.status.append(st)
        self.diag_pub.publish(arr)


def main(args: list[str] | None = None) -> None:
    run_node(TokenCompressorNode, "token_compressor", args)


if __name__ == "__main__":
    main()

