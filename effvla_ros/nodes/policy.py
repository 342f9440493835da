"""Node ``policy``: visual tokens (or images) + instruction + joint state -> action chunks.

Subscribes ``~/visual_tokens`` (effvla_ros/VisualTokens, all cameras, matched by source stamp
within ``stamp_tolerance_s``) — or, with ``input_mode: images``, the camera images directly with an
in-process token compressor — plus ``instruction`` (std_msgs/String), ``joint_states``
(sensor_msgs/JointState) and the executor's ``~/execution_feedback``; publishes
``~/action_chunk`` (effvla_ros/ActionChunk) and ``/diagnostics``.

Inference runs in its own thread; subscriptions only store the newest message (stale observations
are dropped: latest wins). The state of an observation is the newest JointState stamped at or before
its images (within ``state_stamp_tolerance_s``), as in the training data and in ``effvla replay``: the
newest JointState at inference time is ahead of the images by the encoder's latency. A new chunk is started when ``execution_horizon`` actions of the current
one will have elapsed by the time it arrives (measured latency), or back to back when inference is
slower; with ``align_to_observations`` already on the arrival of the last observation before that time
(``core/schedule.py``), so that the chunk is computed from a fresh observation, not one up to a camera period
old. Real-time chunking guides every chunk toward the still-unexecuted part of the one the
executor is running, with the delay d measured from latency (a high percentile, in control steps)
and the actions the executor reports as committed.
"""
from __future__ import annotations

import functools
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from builtin_interfaces.msg import Duration
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import Empty, String

from effvla_ros.core.backends import BACKENDS, make_backend
from effvla_ros.core.budget import (
    BudgetChoice,
    BudgetConfig,
    BudgetController,
    BudgetTable,
    apply_overrides,
    backend_mismatch,
    check_runnable,
    configure_changed,
)
from effvla_ros.core.chunking import ChunkHistory, ExecutionReport, IssuedChunk
from effvla_ros.core.compression.compressor import ReuseConfig, TokenCompressor
from effvla_ros.core.compression.pruning import PruningConfig
from effvla_ros.core.early_exit import EarlyExitConfig, ExpertReuseConfig
from effvla_ros.core.observation import (
    DEFAULT_STATE_STAMP_TOLERANCE_S,
    ImageError,
    StateError,
    StateSpec,
    TokenError,
    checkpoint_joint_names,
    decode_tokens,
    missing_camera,
    newest_before,
    observation_stamp,
    resolve_state_spec,
    rgb_to_tensor,
    state_at,
)
from effvla_ros.core.params import ConfigBase, param
from effvla_ros.core.rtc import DelayEstimator, GuidanceTarget, RTCConfig
from effvla_ros.core.runner import CameraTokens, InferenceConfig, PolicyRunner, compressed_to_camera_tokens
from effvla_ros.core.schedule import ChunkScheduler
from effvla_ros.core.settings import canonical
from effvla_ros.core.smolvla.config import ATTENTION_IMPLS, DTYPE_CHOICES, RuntimeConfig, resolve_dtype
from effvla_ros.core.target_check import TARGETS, check_checkpoint, check_device, enforce, latency_problem
from effvla_ros.core.warmup import keep_counts, warm_up
from effvla_ros.msg import ActionChunk, ExecutionFeedback, VisualTokens
from effvla_ros.nodes.common import (
    INSTRUCTION_VOLATILE_QOS,
    LATCHED_QOS,
    PIPELINE_QOS,
    SENSOR_QOS,
    NodeWorker,
    Throttle,
    WorkerNode,
    clean_instruction,
    describe_text,
    image_to_rgb,
    run_node,
    sec_to_stamp,
    shared_policy,
    stamp_to_sec,
)
from effvla_ros.nodes.param_bridge import ConfigParameters

# Causes of "no chunk published" that the node reports (log + diagnostics ``stall.<cause>``).
STALL_CAUSES = ("no_instruction", "no_joint_state", "camera_missing", "stamp_mismatch", "state_stale",
                "observation_stale")
STALL_LOG_AFTER_S = 1.0  # a cause is logged once it has lasted this long (a camera period or two is normal)

__all__ = ["PolicyNode", "PolicyNodeConfig", "camera_tokens_from_msg", "execution_report", "image_tensor_from_msg",
           "main", "state_at", "state_from_msg"]  # state_at: effvla_ros.core.observation's, re-exported


@dataclass
class PolicyNodeConfig(ConfigBase):
    """Node-level parameters of the policy (no prefix)."""

    checkpoint: str = param("", read_only=True, description="local LeRobot SmolVLA checkpoint directory")
    vlm_dir: str = param("", read_only=True, description="VLM config + tokenizer directory (empty: checkpoint's vlm/)")
    device: str = param("cpu", read_only=True, description="torch device")
    vision_dtype: str = param("float32", choices=DTYPE_CHOICES, read_only=True,
                              description="vision tower dtype (auto: bfloat16 where the device computes it natively, else float32 / float16 on CUDA)")
    vlm_dtype: str = param("float32", choices=DTYPE_CHOICES, read_only=True, description="VLM layers dtype (auto: as vision_dtype)")
    expert_dtype: str = param("float32", choices=DTYPE_CHOICES, read_only=True, description="action expert dtype (auto: as vision_dtype)")
    num_threads: int = param(0, min=0, max=64, read_only=True, description="torch CPU threads (0 = default)")
    adaptive_threads: bool = param(False, read_only=True,
                                   description="lower the torch threads before each stage call to the cores other processes leave free (/proc/stat), at most num_threads: no OpenMP spinning against a busy CPU")
    attention: str = param("eager", choices=ATTENTION_IMPLS, read_only=True,
                           description="VLM/expert attention: eager (LeRobot's path) or fused (torch SDPA, same result)")
    backend: str = param("eager", choices=tuple(BACKENDS), read_only=True,
                         description="stage backend: eager (the reference), packed (x86 oneDNN pre-packed weights), "
                                     "compiled (torch.compile'd layers), cudagraph / cudagraph_compiled (prefill and "
                                     "the whole denoising loop replayed as CUDA graphs over eager / compiled layers; "
                                     "no expert reuse, no VJP guidance), or the stage graphs of `effvla export` run by "
                                     "onnxruntime or tensorrt (with export_dir); a setting the backend cannot apply is "
                                     "refused naming it")
    export_dir: str = param("", read_only=True,
                            description="directory written by `effvla export` (backend onnxruntime / tensorrt); its "
                                        "manifest must match the checkpoint")
    warmup: bool = param(True, read_only=True,
                         description="at start, run every prefix shape once (compiles a compiled backend) and measure "
                                     "the stages; the startup check then uses the measured latency")
    input_mode: str = param("tokens", choices=("tokens", "images"), read_only=True,
                            description="tokens: from the token compressor; images: encoder in this process")
    cameras: list[str] = param(read_only=True, default_factory=lambda: ["scene", "wrist"],
                               description="camera names (= the checkpoint's observation.images.<name>)")
    image_topic: str = param("camera/{camera}/image_raw", read_only=True, description="images mode: topic per camera")
    instruction_topic: str = param("instruction", read_only=True, description="task instruction topic")
    joint_states_topic: str = param("joint_states", read_only=True, description="sensor_msgs/JointState topic")
    state_joint_names: list[str] = param(read_only=True, default_factory=list,
                                         description="joints forming observation.state, in order (empty: the first "
                                                     "state_dim positions of JointState)")
    action_joint_names: list[str] = param(read_only=True, default_factory=list,
                                          description="names of the action dimensions (empty: state_joint_names)")
    fps: float = param(30.0, min=1.0, max=1000.0, read_only=True,
                       description="control rate the policy was trained at: action i targets stamp + i/fps")
    execution_horizon: int = param(25, min=1, max=1000,
                                   description="actions of a chunk executed before the next chunk should take over")
    align_to_observations: bool = param(
        True, description="start the next chunk on an observation's arrival when the next observation would come "
                          "after the chunk is due, instead of at the due time on an observation up to one camera "
                          "period old (core/schedule.py)")
    stamp_tolerance_s: float = param(0.05, min=0.0, max=5.0, description="max stamp spread across cameras")
    state_stamp_tolerance_s: float = param(
        DEFAULT_STATE_STAMP_TOLERANCE_S, min=0.0, max=5.0,
        description="the state is the newest JointState stamped at or before the observation (as in training and "
                    "replay) and at most this much older; 0: the newest JointState whatever its stamp")
    max_observation_age_s: float = param(1.0, min=0.01, max=60.0,
                                         description="observations older than this at inference start are dropped")
    target: str = param("x86_cpu", choices=tuple(TARGETS), read_only=True,
                        description="hardware target of the startup memory/compute check")
    memory_budget_gb: float = param(0.0, min=0.0, max=1024.0, read_only=True,
                                    description="memory the policy stack may use (0 = the target's default budget)")
    startup_check: bool = param(True, read_only=True,
                                description="refuse to start when the estimate exceeds the target's budget")
    real_time_factor: float = param(
        1.0, min=0.001, max=1000.0, read_only=True,
        description="clock seconds per wall second (on a simulation's /clock: its real_time_factor); the startup "
                    "check compares the warm-up's wall latency times this with the deadline, which is in clock time")

    def validate(self) -> None:
        if not self.cameras:
            raise ValueError("cameras: at least one camera is needed")


# ------------------------------------------------------------------ message -> core values
# The node's whole observation path: messages unpacked into effvla_ros.core.observation's functions
# (the ones replay and evaluation call); the node adds only logging, counting and publishing.
def image_tensor_from_msg(msg: Image) -> torch.Tensor:
    """sensor_msgs/Image -> (3, H, W) float32 in [0, 1], the compressor's input (raises ImageError)."""
    return rgb_to_tensor(image_to_rgb(msg))


def camera_tokens_from_msg(msg: VisualTokens) -> CameraTokens:
    """effvla_ros/VisualTokens -> CameraTokens (a missing camera: masked; raises TokenError)."""
    if msg.camera_missing:
        return missing_camera((int(msg.grid_height), int(msg.grid_width)))
    return decode_tokens(msg.dtype, bytes(msg.data), list(msg.kept_indices),
                         (int(msg.grid_height), int(msg.grid_width)), int(msg.token_dim), list(msg.reused))


def state_from_msg(msg: JointState, joint_names: list[str] | StateSpec, dim: int) -> torch.Tensor:
    """sensor_msgs/JointState -> the raw state (dim,) float32 by :class:`StateSpec` (replay's rule): the
    joints by name in the spec's order (a plain name list: those joints; empty: the first ``dim`` positions);
    raises StateError naming what is wrong."""
    spec = joint_names if isinstance(joint_names, StateSpec) else StateSpec(
        dim, tuple(joint_names), by_position=not joint_names, source="state_joint_names")
    return torch.from_numpy(spec.vector(list(msg.name), msg.position))


def execution_report(fb: ExecutionFeedback | None) -> ExecutionReport | None:
    """effvla_ros/ExecutionFeedback -> what the RTC target needs of it (None: no feedback yet)."""
    if fb is None or fb.chunk_id == 0:
        return None
    return ExecutionReport(int(fb.chunk_id), stamp_to_sec(fb.committed_until),
                           fb.state == ExecutionFeedback.STATE_HOLDING)


class CompressorParameters:
    """The token compressor node's pruning and reuse parameters, set by the latency budget through its ``set_parameters``
    service (asynchronously: an inference never waits for it). The values it had before the first change are read
    once and restored when the budget is turned off."""

    def __init__(self, node: Node, name: str, remember: list[str] | None = None) -> None:
        from rcl_interfaces.srv import GetParameters, SetParameters

        base = name if name.startswith("/") else f"{node.get_namespace().rstrip('/')}/{name}"
        self.node, self.name = node, base
        self._set: Any = node.create_client(SetParameters, f"{base}/set_parameters")
        self._get: Any = node.create_client(GetParameters, f"{base}/get_parameters")
        self.original: dict[str, Any] | None = None
        self._asked_original = False
        self._remember = list(remember or [])  # parameters whose values to read before the first change

    def set(self, values: dict[str, Any]) -> None:
        from rcl_interfaces.srv import GetParameters, SetParameters
        from rclpy.parameter import Parameter

        if not self._set.service_is_ready():
            self.node.get_logger().warning(f"latency budget: {self.name}/set_parameters is not available; the kept-token "
                                           "ratio and reuse are not applied (latency_budget_compressor)",
                                           throttle_duration_sec=5.0)
            return
        if not self._asked_original and self._get.service_is_ready():
            self._asked_original = True
            names = list(dict.fromkeys([*self._remember, *values]))
            self._get.call_async(GetParameters.Request(names=names)).add_done_callback(
                functools.partial(self._got, names))
        req = SetParameters.Request(parameters=[Parameter(k, value=v).to_parameter_msg() for k, v in values.items()])
        self._set.call_async(req).add_done_callback(self._done)

    def _got(self, names: list[str], future: Any) -> None:
        from rclpy.parameter import parameter_value_to_python

        try:
            self.original = {n: parameter_value_to_python(v) for n, v in zip(names, future.result().values)}
        except Exception as e:  # noqa: BLE001 - reported, the budget still works
            self.node.get_logger().warning(f"latency budget: could not read {self.name}'s parameters: {e}")

    def _done(self, future: Any) -> None:
        try:
            bad = [r.reason for r in future.result().results if not r.successful]
        except Exception as e:  # noqa: BLE001
            bad = [str(e)]
        if bad:
            self.node.get_logger().warning(f"latency budget: {self.name} refused the compressor change: {bad}",
                                           throttle_duration_sec=5.0)

    def restore(self) -> None:
        if self.original:
            self.set(dict(self.original))


class PolicyNode(WorkerNode):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__("policy", **kwargs)
        started = time.monotonic()
        self.node_params = ConfigParameters(self, PolicyNodeConfig(), on_change=self._on_change)
        self.inference_params = ConfigParameters(self, InferenceConfig(), on_change=self._on_change)
        self.exit_params = ConfigParameters(self, EarlyExitConfig(), prefix="early_exit.", on_change=self._on_change)
        self.expert_params = ConfigParameters(self, ExpertReuseConfig(), prefix="expert_reuse.",
                                              on_change=self._on_change)
        self.rtc_params = ConfigParameters(self, RTCConfig(), prefix="rtc.", on_change=self._on_change)
        self.budget_params = ConfigParameters(self, BudgetConfig(), on_change=self._on_change)
        cfg = self.node_params.config
        if not cfg.checkpoint:
            raise ValueError("checkpoint: parameter is empty; set it to a local LeRobot SmolVLA checkpoint directory")
        check_device(cfg.device, cfg.target)  # before anything touches the device: say what to change
        if cfg.startup_check:  # before any weight is loaded: fail with what to change, not OOM later
            est = check_checkpoint(
                cfg.checkpoint, cfg.target, cfg.vlm_dir or None, cameras=len(cfg.cameras),
                vision_dtype=resolve_dtype(cfg.vision_dtype, cfg.device), vlm_dtype=resolve_dtype(cfg.vlm_dtype, cfg.device),
                expert_dtype=resolve_dtype(cfg.expert_dtype, cfg.device),
                num_steps=self.inference_params.config.num_steps, fps=cfg.fps, execution_horizon=cfg.execution_horizon,
                memory_budget_gb=cfg.memory_budget_gb or None,
                keep_ratio=1.0 if cfg.input_mode == "tokens" else 0.5)
            enforce(est)
            self.get_logger().info(f"startup check on {cfg.target}: ~{est.memory_gb:.2f} GB, "
                                   f"~{est.latency_s:.3f} s per chunk (estimates; measured after the warm-up)")
        runtime = RuntimeConfig(device=cfg.device, vision_dtype=cfg.vision_dtype, vlm_dtype=cfg.vlm_dtype,
                                expert_dtype=cfg.expert_dtype, num_threads=cfg.num_threads, attention=cfg.attention,
                                adaptive_threads=cfg.adaptive_threads)
        self.policy = shared_policy(cfg.checkpoint, cfg.vlm_dir or None, runtime)
        arch = self.policy.arch
        unknown = [c for c in cfg.cameras if c not in self.policy.cameras]
        if unknown:
            raise ValueError(f"cameras: {unknown} not in the checkpoint's cameras {self.policy.cameras}")
        if cfg.state_joint_names and len(cfg.state_joint_names) != arch.state_dim:
            raise ValueError(f"state_joint_names: {len(cfg.state_joint_names)} names, the checkpoint's state has "
                             f"{arch.state_dim} dimensions")
        # the state by joint name, as replay: state_joint_names, else the checkpoint's declared names
        ckpt_state = checkpoint_joint_names(cfg.checkpoint)[0]
        if cfg.state_joint_names or ckpt_state:
            self.state_spec = resolve_state_spec(arch.state_dim, explicit=cfg.state_joint_names, checkpoint=ckpt_state)
        else:
            self.state_spec = StateSpec(arch.state_dim, (), by_position=True, source="no state_joint_names")
            self.get_logger().warning(f"state_joint_names is empty and the checkpoint declares no joint names: the "
                                      f"state is the first {arch.state_dim} JointState positions, whatever their "
                                      "names (set state_joint_names)")
        names = list(cfg.action_joint_names or cfg.state_joint_names or [f"joint_{i}" for i in range(arch.action_dim)])
        if len(names) != arch.action_dim:
            raise ValueError(f"action_joint_names: {len(names)} names, the checkpoint's action has {arch.action_dim} "
                             "dimensions")
        self.action_names = names
        self.runner = PolicyRunner(self.policy, inference=self.inference_params.config,
                                   early_exit=self.exit_params.config, expert_reuse=self.expert_params.config,
                                   rtc=self.rtc_params.config,
                                   backend=make_backend(cfg.backend, self.policy, export_dir=cfg.export_dir or None,
                                                        target=cfg.target))
        # live changes that cannot be applied (the backend lacks the feature, a calibration file that does not
        # load or does not fit the model) are rejected on set, naming the parameter
        self.exit_params.check = self._check_early_exit
        self.expert_params.check = self._check_expert_reuse
        self.rtc_params.check = self.runner.check_rtc
        self.delay = DelayEstimator(self.rtc_params.config)
        self.compressor: TokenCompressor | None = None
        if cfg.input_mode == "images":
            self.pruning_params = ConfigParameters(self, PruningConfig(), prefix="pruning.", on_change=self._on_change)
            self.reuse_params = ConfigParameters(self, ReuseConfig(), prefix="reuse.", on_change=self._on_change)
            self.compressor = TokenCompressor(self.policy, self.pruning_params.config, self.reuse_params.config,
                                              count_flops=False, backend=self.runner.backend)
            self.reuse_params.check = lambda c: self.runner.backend.caps.check(patch_reuse=c.enabled and c.patch_level)
        # latency-budget mode: the table is loaded and checked against the backend at start and on set
        self._budget_sent: dict[str, Any] = {}  # the compressor node's parameters the budget last set
        self._budget_compressor: CompressorParameters | None = None
        self.budget: BudgetController | None = self._make_budget(self.budget_params.config)
        self.budget_params.check = self._check_budget
        self._image_encode_s: dict[str, float] = {}
        if cfg.warmup:
            self._warm_up(cfg)

        self._cv = threading.Condition()
        self._tokens: dict[str, VisualTokens] = {}
        self._images: dict[str, Image] = {}
        self._image_tokens: dict[str, tuple[float, CameraTokens]] = {}
        self._states: deque[tuple[float, JointState]] = deque(maxlen=1024)  # (stamp, msg), arrival order
        self._instruction: str | None = None
        self._feedback: ExecutionFeedback | None = None
        self._dirty = False
        self._reset_pending = False
        self._last_obs_stamp: float | None = None
        self._chunks = ChunkHistory(maxlen=8)
        self._schedule = ChunkScheduler()
        self._chunk_id = 0
        self._lat_hist: deque[float] = deque(maxlen=100)
        self._last: dict[str, Any] = {}
        self.counts = {"chunks": 0, "dropped_stale": 0, "rejected_tokens": 0, "rejected_state": 0,
                       "unsynced_state": 0, "nonfinite_output": 0, "errors": 0, "settings_not_applied": 0}
        self._log_throttle = Throttle(2.0)
        # why no chunk is being published (cause, message with the numbers, since when: monotonic s);
        # each cause is logged (throttled) once it lasts STALL_LOG_AFTER_S, and shown in the diagnostics
        self._stall: tuple[str, str, float] | None = None
        self._stall_counted = False  # the current stall reached STALL_LOG_AFTER_S and is in stall_counts
        self.stall_counts = {cause: 0 for cause in STALL_CAUSES}
        self._stall_log = Throttle(5.0)
        self._last_chunk_wall: float | None = None

        self.pub = self.create_publisher(ActionChunk, "~/action_chunk", PIPELINE_QOS)
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        if cfg.input_mode == "tokens":
            self.create_subscription(VisualTokens, "~/visual_tokens", self._on_tokens, 10)
        else:
            for cam in cfg.cameras:
                self.create_subscription(Image, cfg.image_topic.format(camera=cam),
                                         lambda m, c=cam: self._on_image(c, m), SENSOR_QOS)
        for qos in (LATCHED_QOS, INSTRUCTION_VOLATILE_QOS):
            self.create_subscription(String, cfg.instruction_topic, self._on_instruction, qos)
        self.create_subscription(JointState, cfg.joint_states_topic, self._on_state, 10)
        self.create_subscription(ExecutionFeedback, "~/execution_feedback", self._on_feedback, PIPELINE_QOS)
        self.create_subscription(Empty, "reset", self._on_reset, 10)
        self.create_timer(1.0, self._publish_diagnostics, callback_group=MutuallyExclusiveCallbackGroup())
        self._worker = NodeWorker(self, "policy_inference", self._step, self._cv, "inference")
        self._worker.start()
        self.get_logger().info(
            f"policy ready: {cfg.input_mode} in, cameras {cfg.cameras}, chunk {arch.chunk_size} x {arch.action_dim} "
            f"at {cfg.fps} Hz, rtc={'on' if self.rtc_params.config.enabled else 'off'}, "
            f"early_exit={'on' if self.exit_params.config.enabled else 'off'}, "
            f"attention={'fused' if self.policy.fused_attention else 'eager'}, backend={cfg.backend}, "
            f"dtypes vision/vlm/expert {'/'.join(runtime.resolved_dtypes())}, "
            f"startup {time.monotonic() - started:.1f} s")

    def _warm_up(self, cfg: PolicyNodeConfig) -> None:
        """Every prefix shape once, then the stages timed warm; refuse to start when the measured latency misses the
        executor's deadline (``startup_check``)."""
        ratios = [self.pruning_params.config.keep_ratio] if self.compressor is not None else [0.5]
        counts = keep_counts(self.policy.arch.tokens_per_camera, ratios)
        report = warm_up(self.runner, counts, encode=self.runner.backend.encode)
        latency = report.chunk_latency_s(len(cfg.cameras))
        self.get_logger().info(f"{report.describe(len(cfg.cameras))} ({cfg.backend} backend)")
        # the deadline is in the clock's time: on a simulation at a quarter of real time, 1 s of wall is 0.25 s of it
        source = "measured" if cfg.real_time_factor == 1.0 else f"measured, x real_time_factor {cfg.real_time_factor:g}"
        problem = latency_problem(latency * cfg.real_time_factor, cfg.fps, cfg.execution_horizon,
                                  self.policy.arch.chunk_size, source)
        if problem and cfg.startup_check:
            raise ValueError(f"startup check refused this configuration: {problem}")
        if problem:
            self.get_logger().warning(f"startup_check is off: {problem}")

    def _check_early_exit(self, c: EarlyExitConfig) -> None:
        """On set: the backend supports it and the exit layers / thresholds resolve (the calibration file is
        loaded and checked now, not at the next inference)."""
        self.runner.backend.caps.check(early_exit=c.enabled)
        c.resolved(self.runner.prefix_reuse.num_layers)

    def _check_expert_reuse(self, c: ExpertReuseConfig) -> None:
        self.runner.backend.caps.check(expert_reuse=c.enabled)
        layers = self.runner.expert_reuse.layers
        if layers:
            c.resolved(len(layers))

    # ------------------------------------------------------------------ callbacks (cheap)
    def _on_change(self, cfg: Any, names: set[str]) -> None:
        with self._cv:
            self._dirty = True
            self._cv.notify()

    def _on_tokens(self, msg: VisualTokens) -> None:
        if msg.camera_name not in self._tokens and msg.camera_name not in self.node_params.config.cameras:
            self.get_logger().warning(f"tokens for unknown camera {msg.camera_name!r} ignored",
                                      throttle_duration_sec=5.0)
            return
        with self._cv:
            self._tokens[msg.camera_name] = msg
            self._cv.notify()

    def _on_image(self, cam: str, msg: Image) -> None:
        with self._cv:
            self._images[cam] = msg
            self._cv.notify()

    def _on_instruction(self, msg: String) -> None:
        text, problem = clean_instruction(msg.data)
        if problem:
            self.get_logger().warning(problem, throttle_duration_sec=5.0)
        with self._cv:
            changed = text != self._instruction
            self._instruction = text
            self._cv.notify()
        if changed:  # once per change, shortened, at most one line per 2 s (a flood of changes is counted)
            line = self._log_throttle("instruction", f"instruction: {describe_text(text)}")
            if line:
                self.get_logger().info(line)

    def _on_state(self, msg: JointState) -> None:
        with self._cv:
            self._states.append((stamp_to_sec(msg.header.stamp), msg))

    def _on_feedback(self, msg: ExecutionFeedback) -> None:
        with self._cv:
            self._feedback = msg

    def _on_reset(self, _msg: Empty) -> None:
        """A new episode: forget the previous chunks (no RTC guidance across it) and reuse caches."""
        with self._cv:
            self._reset_pending = True
            self._tokens.clear()
            self._images.clear()
            self._states.clear()
            self._feedback = None
            self._cv.notify()

    # ------------------------------------------------------------------ worker
    def _apply_settings(self) -> None:
        """Apply the current parameters, one group at a time (checked on set; a group that still fails, e.g. a
        calibration file changed on disk since, keeps its previous settings and is logged, the others apply)."""
        groups: list[tuple[str, Any]] = [
            ("inference", lambda: self.runner.configure(inference=self.inference_params.config)),
            ("early_exit", lambda: self.runner.configure(early_exit=self.exit_params.config)),
            ("expert_reuse", lambda: self.runner.configure(expert_reuse=self.expert_params.config)),
            ("rtc", lambda: self.runner.configure(rtc=self.rtc_params.config)),
            ("rtc", lambda: self.delay.reconfigure(self.rtc_params.config)),
            ("latency_budget", self._reconfigure_budget),
        ]
        if self.compressor is not None:
            groups.append(("pruning/reuse", lambda: self.compressor.configure(  # type: ignore[union-attr]
                self.pruning_params.config, self.reuse_params.config)))
        for name, apply in groups:
            try:
                apply()
            except (ValueError, RuntimeError) as e:
                self.counts["settings_not_applied"] += 1
                self.get_logger().error(f"{name}.* settings not applied, the previous ones stay: {e}",
                                        throttle_duration_sec=2.0)

    def _step(self) -> None:
        cfg = self.node_params.config
        with self._cv:
            self._cv.wait(timeout=0.05)
            reset, self._reset_pending = self._reset_pending, False
            dirty, self._dirty = self._dirty, False
            instruction = self._instruction
            states = list(self._states)
            feedback = self._feedback
            tokens = dict(self._tokens)
            images = dict(self._images)
            self._images.clear()
        if reset:
            self._chunks.clear()
            self._schedule.reset()
            self._image_tokens.clear()
            self.runner.prefix_reuse.reset()
            if self.compressor is not None:
                self.compressor.reset()
            self.get_logger().info("reset: previous chunks and caches cleared")
            return
        if dirty:
            self._apply_settings()
        if self.compressor is not None:
            if images and self.budget is not None:
                self._budget_step()  # the budget's pruning / reuse for these frames (the inference chooses the same)
            self._compress_images(images, instruction)
        if not instruction:
            self.get_logger().warning("no instruction yet: waiting (publish a std_msgs/String on "
                                      f"{cfg.instruction_topic})", throttle_duration_sec=10.0)
            self._stalled("no_instruction", f"no instruction yet on {cfg.instruction_topic}", log=False)
            return
        if not states:
            self.get_logger().warning(f"no JointState yet on {cfg.joint_states_topic}: waiting",
                                      throttle_duration_sec=10.0)
            self._stalled("no_joint_state", f"no JointState yet on {cfg.joint_states_topic}", log=False)
            return
        obs = self._observation(tokens)
        if obs is None:
            return
        obs_stamp, cams = obs
        now = self._now()
        self._schedule.observe(obs_stamp, now)
        if self._last_obs_stamp is not None and obs_stamp <= self._last_obs_stamp:
            if now - obs_stamp > cfg.max_observation_age_s:  # nothing new for long: the cameras stopped
                self._stalled("observation_stale", f"no new camera observation for {now - obs_stamp:.1f} s "
                                                   f"(max_observation_age_s {cfg.max_observation_age_s})")
            return  # nothing new
        if now - obs_stamp > cfg.max_observation_age_s:
            self.counts["dropped_stale"] += 1
            self.get_logger().warning(f"observation is {now - obs_stamp:.2f} s old (> max_observation_age_s "
                                      f"{cfg.max_observation_age_s}); dropped", throttle_duration_sec=2.0)
            self._stalled("observation_stale", f"observations arrive {now - obs_stamp:.2f} s old (> "
                                               f"max_observation_age_s {cfg.max_observation_age_s})", log=False)
            self._last_obs_stamp = obs_stamp
            return
        dt = 1.0 / cfg.fps
        last = self._chunks.last
        if not self._schedule.should_start(now, last.stamp if last is not None else None,
                                           cfg.execution_horizon * dt, self.delay.latency() or 0.0,
                                           align=cfg.align_to_observations):
            self._stall = None
            return  # the current chunk still covers the horizon
        synced = self._state_at(obs_stamp, states)
        if synced is None:
            newest = max(st for st, _ in states)
            self._stalled("state_stale", f"the newest JointState is {obs_stamp - newest:.3f} s older than the "
                                         f"observation (state_stamp_tolerance_s {cfg.state_stamp_tolerance_s}); "
                                         "waiting for a current one")
            return
        if synced is False:
            self._stalled("state_stale", "no JointState within state_stamp_tolerance_s "
                                         f"{cfg.state_stamp_tolerance_s} s at or before the observation", log=False)
            self._last_obs_stamp = obs_stamp
            return
        state = self._state_vector(synced)
        if state is None:
            return
        self.runner.set_instruction(instruction)
        guidance = self._guidance(obs_stamp, feedback, dt)
        self._last_obs_stamp = obs_stamp
        choice = self._budget_step()
        try:
            res = self.runner.infer(cams, state, guidance=guidance)
        except FloatingPointError as e:
            self.counts["nonfinite_output"] += 1
            self.get_logger().error(f"{e}: chunk not published", throttle_duration_sec=2.0)
            return
        except ValueError as e:
            self.counts["rejected_tokens"] += 1
            self.get_logger().error(f"observation rejected: {e}", throttle_duration_sec=2.0)
            return
        if choice is not None and self.budget is not None:
            encode_ms = (sum(self._image_encode_s.get(c, 0.0) for c in cfg.cameras) * 1e3 if self.compressor is not None
                         else sum(float(m.encode_time_ms) for m in tokens.values()))
            measured = encode_ms + res.times["total_s"] * 1e3
            self.budget.observe(choice.entry.name, measured)
            self._budget_last = (choice, measured)
        self._publish(obs_stamp, res, guidance, dt)

    # ------------------------------------------------------------------ latency budget
    def _budget_configs(self) -> dict[str, Any]:
        """The node's own settings of the groups a budget entry sets."""
        local = self.compressor is not None  # the compressor node's own values are not known here: its defaults
        return {"pruning": self.pruning_params.config if local else PruningConfig(),
                "reuse": self.reuse_params.config if local else ReuseConfig(),
                "early_exit": self.exit_params.config, "expert_reuse": self.expert_params.config,
                "inference": self.inference_params.config}

    def _budget_compressor_fields(self) -> list[tuple[str, str]]:
        """(group, field) of the compressor node's parameters the budget sets: the pruning switch and ratio, the reuse
        switch, and every other pruning / reuse field a setting of the table names."""
        fields = [("pruning", "method"), ("pruning", "keep_ratio"), ("reuse", "enabled")]
        if self.budget is not None:
            for e in self.budget.table.entries:
                for k in e.overrides:
                    g, f = canonical(k).split(".", 1)
                    if g in ("pruning", "reuse") and (g, f) not in fields:
                        fields.append((g, f))
        return fields

    def _make_budget(self, c: BudgetConfig) -> BudgetController | None:
        """The controller of ``c`` (None when off); ValueError naming the parameter when the table is missing, does not
        load, or holds a setting this backend cannot run (checked on set: nothing is accepted that cannot apply)."""
        if c.latency_budget_ms <= 0:
            return None
        if not c.latency_budget_table:
            raise ValueError("latency_budget_table: empty; latency_budget_ms needs the table written by "
                             "`effvla calibrate-budget BAG --checkpoint CKPT --out table.yaml`")
        table = BudgetTable.load(c.latency_budget_table)
        try:  # a compressor node checks its own backend when the budget sets its reuse
            check_runnable(table, self._budget_configs(), self.runner.backend.caps, compressor=self.compressor is not None)
        except ValueError as err:
            raise ValueError(f"latency_budget_table: {err} ({c.latency_budget_table})") from None
        return BudgetController(table, c.latency_budget_ms, window=c.latency_budget_window,
                                margin=c.latency_budget_margin)

    def _check_budget(self, c: BudgetConfig) -> None:
        self._make_budget(c)

    def _reconfigure_budget(self) -> None:
        was_on = self.budget is not None
        self.budget = self._make_budget(self.budget_params.config)
        if self.budget is not None:
            self.get_logger().info(f"latency budget {self.budget.budget_ms:.0f} ms over "
                                   f"{len(self.budget.table.entries)} settings of "
                                   f"{self.budget_params.config.latency_budget_table}")
            note = backend_mismatch(self.budget.table, self.runner.backend.caps.name)
            if note:
                self.get_logger().warning(f"latency_budget_table: {note}")
        elif was_on:  # off again: the node's own parameters (applied by the other groups) and the compressor's
            if self._budget_compressor is not None:
                self._budget_compressor.restore()
            self._budget_sent = {}
            self.get_logger().info("latency budget off: the configured settings apply again")

    def _budget_step(self) -> BudgetChoice | None:
        """Choose this inference's setting and apply it: policy-side groups to the runner (only what changed, so that
        early exit keeps its reference prefix), the kept-token ratio to the compressor."""
        if self.budget is None:
            return None
        prev = self.budget.last
        choice = self.budget.choose()
        cfgs = apply_overrides(self._budget_configs(), choice.entry.overrides, from_baseline=True)
        configure_changed(cfgs, self.runner, self.compressor)
        pruning, reuse = cfgs["pruning"], cfgs["reuse"]
        if self.compressor is None:  # the compressor node: the parameters any setting of the table sets, when they change
            fields = self._budget_compressor_fields()
            on = {"pruning": pruning.method != "none", "reuse": reuse.enabled}
            # a group's switch always; its other fields only while it is on (the compressor keeps its own otherwise)
            want = {f"{g}.{f}": getattr(cfgs[g], f) for g, f in fields if on[g] or f in ("method", "enabled")}
            changed = {k: v for k, v in want.items() if self._budget_sent.get(k) != v}
            if changed:
                if self._budget_compressor is None:
                    self._budget_compressor = CompressorParameters(
                        self, self.budget_params.config.latency_budget_compressor, [f"{g}.{f}" for g, f in fields])
                self._budget_compressor.set(changed)
                self._budget_sent.update(changed)
        if prev is None or prev.entry.name != choice.entry.name or prev.feasible != choice.feasible:
            log = self.get_logger().info if choice.feasible else self.get_logger().warning
            log(f"latency budget: {choice.describe()}", throttle_duration_sec=2.0)
        return choice

    def _now(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    def _stalled(self, cause: str, msg: str, log: bool = True) -> None:
        """No chunk this step because of ``cause`` (one of STALL_CAUSES): remembered for the diagnostics and,
        once it lasts STALL_LOG_AFTER_S, logged (``log``; at most every 5 s per cause, with the numbers)."""
        now = time.monotonic()
        stall = self._stall
        same = stall is not None and stall[0] == cause
        since = stall[2] if stall is not None and same else now
        counted = bool(same and self._stall_counted)
        if not counted and now - since >= STALL_LOG_AFTER_S:  # counted once it lasted (not a transient)
            self.stall_counts[cause] += 1
            counted = True
        self._stall, self._stall_counted = (cause, msg, since), counted
        if log and now - since >= STALL_LOG_AFTER_S:
            line = self._stall_log(cause, f"no chunk for {now - since:.1f} s: {msg}")
            if line:
                self.get_logger().warning(line)

    def _compress_images(self, images: dict[str, Image], instruction: str | None) -> None:
        assert self.compressor is not None
        if instruction and instruction != self.compressor.instruction:
            self.compressor.set_instruction(instruction)
        for cam, msg in images.items():
            try:
                img = image_tensor_from_msg(msg)  # (3, H, W)
            except ImageError as e:
                self.get_logger().warning(f"camera {cam}: invalid image: {e}", throttle_duration_sec=2.0)
                continue
            out = self.compressor.process(cam, img)
            self._image_tokens[cam] = (stamp_to_sec(msg.header.stamp), compressed_to_camera_tokens(out))
            self._image_encode_s[cam] = float(out.time_s)

    def _observation(self, tokens: dict[str, VisualTokens]) -> tuple[float, dict[str, CameraTokens]] | None:
        """The cameras of one instant (stamps within stamp_tolerance_s) and their stamp; None: wait."""
        cfg = self.node_params.config
        cams: dict[str, CameraTokens] = {}
        stamps: list[float] = []
        named: list[tuple[str, float]] = []
        for cam in cfg.cameras:
            if self.compressor is not None:
                if cam not in self._image_tokens:
                    self._stalled("camera_missing", f"camera {cam}: no image received yet on "
                                                    f"{cfg.image_topic.format(camera=cam)}")
                    return None
                st, cams[cam] = self._image_tokens[cam]
                stamps.append(st)
                named.append((cam, st))
                continue
            msg = tokens.get(cam)
            if msg is None:
                self._stalled("camera_missing", f"camera {cam}: no VisualTokens received yet on "
                                                f"{self.resolve_topic_name('~/visual_tokens')} (cameras {cfg.cameras})")
                return None
            try:
                cams[cam] = camera_tokens_from_msg(msg)
            except TokenError as e:
                self.counts["rejected_tokens"] += 1
                self.get_logger().error(f"camera {msg.camera_name}: malformed VisualTokens: {e}",
                                        throttle_duration_sec=2.0)
                return None
            if not msg.camera_missing:
                stamps.append(stamp_to_sec(msg.header.stamp))
                named.append((cam, stamps[-1]))
        if not stamps:
            self.get_logger().warning("every camera is missing: no inference", throttle_duration_sec=5.0)
            self._stalled("camera_missing", "every camera is reported missing by the token compressor", log=False)
            return None
        stamp = observation_stamp(stamps, cfg.stamp_tolerance_s)
        if stamp is None:  # wait for the cameras of one instant
            spread = max(stamps) - min(stamps)
            each = ", ".join(f"{c} {st:.3f}" for c, st in named)
            self._stalled("stamp_mismatch", f"camera stamps {spread:.3f} s apart ({each}), more than "
                                            f"stamp_tolerance_s {cfg.stamp_tolerance_s}: waiting for frames of one "
                                            "instant")
            return None
        return stamp, cams

    def _state_at(self, obs_stamp: float, states: list[tuple[float, JointState]]) -> JointState | None | bool:
        """The JointState paired with the observation (see :func:`~effvla_ros.core.observation.state_at`)
        from the received ones (``states``: (stamp, msg), arrival order, not empty). None: wait for it;
        False: none fits, the observation is skipped (counted, throttled warning)."""
        newest = states[-1][1]
        tol = self.node_params.config.state_stamp_tolerance_s
        if tol <= 0.0:
            return newest
        if stamp_to_sec(newest.header.stamp) == 0.0:
            self.get_logger().warning("JointState messages are unstamped (stamp 0): the newest is used, not the one "
                                      "of the images' instant", throttle_duration_sec=10.0)
            return newest
        stamps = [st for st, _ in states]
        i = state_at(stamps, obs_stamp, tol)
        if i is not None and i >= 0:
            return states[i][1]
        if i is None:
            return None
        self.counts["unsynced_state"] += 1
        before = newest_before(stamps, obs_stamp)
        gap = f"the newest before it is {obs_stamp - before:.3f} s older" if before is not None else "none is older"
        self.get_logger().warning(f"no JointState within state_stamp_tolerance_s {tol} s at or before the "
                                  f"observation ({gap}); observation skipped", throttle_duration_sec=2.0)
        return False

    def _state_vector(self, msg: JointState) -> torch.Tensor | None:
        try:
            return state_from_msg(msg, self.state_spec, self.policy.arch.state_dim)
        except StateError as e:
            self.counts["rejected_state"] += 1
            self.get_logger().error(f"JointState {e}; skipping", throttle_duration_sec=2.0)
            return None

    def _guidance(self, obs_stamp: float, fb: ExecutionFeedback | None, dt: float) -> GuidanceTarget | None:
        if not self.rtc_params.config.enabled:
            return None
        return self._chunks.guidance(obs_stamp, dt, self.policy.arch.chunk_size, self.delay, execution_report(fb))

    def _publish(self, obs_stamp: float, res: Any, guidance: GuidanceTarget | None, dt: float) -> None:
        arch = self.policy.arch
        acts = res.actions.detach().cpu().double().numpy()
        if not np.isfinite(acts).all():  # runner checks too; never publish non-finite commands
            self.counts["nonfinite_output"] += 1
            return
        self._chunk_id += 1
        msg = ActionChunk()
        msg.header.stamp = sec_to_stamp(obs_stamp)
        msg.header.frame_id = "policy"
        msg.chunk_id = self._chunk_id
        msg.step_period = Duration(sec=int(dt), nanosec=int(round((dt - int(dt)) * 1e9)))
        msg.joint_names = list(self.action_names)
        msg.num_actions, msg.action_dim = int(acts.shape[0]), int(arch.action_dim)
        msg.actions = acts.reshape(-1).tolist()
        msg.inference_latency_ms = float(res.times["total_s"] * 1e3)
        msg.exit_layers = [int(res.exit_layer)]
        msg.denoising_steps = int(res.steps)
        msg.reused_denoising_steps = int(res.steps_with_reuse)
        msg.rtc_delay_steps = int(res.rtc_delay) if res.guided else 0
        msg.rtc_prefix_chunk_id = int(guidance.source_chunk_id) if (guidance is not None and res.guided) else 0
        self.pub.publish(msg)
        self._stall = None
        self._last_chunk_wall = time.monotonic()
        latency = self._now() - obs_stamp
        self.delay.record(latency)
        self._lat_hist.append(latency)
        self._chunks.add(IssuedChunk(self._chunk_id, obs_stamp, res.x_final.detach().cpu(), res.state))
        self.counts["chunks"] += 1
        self._last = {"exit_layer": res.exit_layer, "steps": res.steps, "rtc_delay": msg.rtc_delay_steps,
                      "inference_ms": msg.inference_latency_ms, "prefill_ms": res.times["prefill_s"] * 1e3,
                      "denoise_ms": res.times["denoise_s"] * 1e3}

    # ------------------------------------------------------------------ diagnostics
    def _publish_diagnostics(self) -> None:
        arr = DiagnosticArray()
        arr.header.stamp = self.get_clock().now().to_msg()
        st = DiagnosticStatus(name="effvla/policy", hardware_id="policy")
        self.counts["errors"] = self._worker.errors
        bad = self.counts["nonfinite_output"] + self.counts["errors"]
        st.level = DiagnosticStatus.WARN if bad else DiagnosticStatus.OK
        st.message = "non-finite outputs or errors" if bad else "ok"
        vals: dict[str, str] = {k: str(v) for k, v in self.counts.items()}
        stall, now = self._stall, time.monotonic()
        if stall is not None and now - stall[2] >= STALL_LOG_AFTER_S:  # why no chunk is published
            st.level = DiagnosticStatus.WARN
            st.message = f"no chunk for {now - stall[2]:.1f} s: {stall[1]}"
        vals["no_chunk.cause"] = stall[0] if stall is not None else ""
        vals["no_chunk.reason"] = stall[1] if stall is not None else ""
        vals["no_chunk.for_s"] = f"{now - stall[2]:.1f}" if stall is not None else "0.0"
        vals["last_chunk_age_s"] = f"{now - self._last_chunk_wall:.1f}" if self._last_chunk_wall is not None else ""
        vals.update({f"stall.{k}": str(v) for k, v in self.stall_counts.items()})
        if self._lat_hist:
            lat = np.array(self._lat_hist) * 1e3
            vals["latency_p50_ms"], vals["latency_p95_ms"] = f"{np.percentile(lat, 50):.1f}", f"{np.percentile(lat, 95):.1f}"
        vals.update({k: (f"{v:.2f}" if isinstance(v, float) else str(v)) for k, v in self._last.items()})
        budget_last = getattr(self, "_budget_last", None)
        if self.budget is not None and budget_last is not None:
            choice, measured = budget_last
            vals.update({"budget.setting": choice.entry.name, "budget.budget_ms": f"{choice.budget_ms:.1f}",
                         "budget.predicted_ms": f"{choice.predicted_ms:.1f}", "budget.margin_ms": f"{choice.margin_ms:.1f}",
                         "budget.measured_ms": f"{measured:.1f}", "budget.slowdown": f"{choice.slowdown:.2f}",
                         "budget.feasible": str(choice.feasible)})
            if not choice.feasible:
                st.level = DiagnosticStatus.WARN
                st.message = f"latency budget: {choice.describe()}"
        st.values = [KeyValue(key=k, value=v) for k, v in vals.items()]
        arr.status.append(st)
        self.diag_pub.publish(arr)


def main(args: list[str] | None = None) -> None:
    run_node(PolicyNode, "policy", args)


if __name__ == "__main__":
    main()
