"""Configurations of the SmolVLA policy core.

Two kinds of configuration live here:

* :class:`SmolVLAArch` - a plain dataclass with the *architecture* (the SmolVLM backbone shapes and the
  LeRobot ``SmolVLAConfig`` fields that change the computation). It is what a checkpoint determines.
  :func:`tiny_arch` gives a seconds-on-CPU configuration for tests, :func:`smolvla_450m_arch` the real
  SmolVLA-450M shapes (SmolVLM2-500M backbone, first 16 of 32 text layers, expert width x0.75).
* :class:`RuntimeConfig` - validated runtime options (device, per-stage dtypes, number of denoising
  steps, FLOP counting) built on :class:`effvla_ros.core.params.ConfigBase`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from effvla_ros.core.params import ConfigBase, param

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
#: Attention of the VLM and action-expert layers (RuntimeConfig.attention, TrainConfig.attention): "eager" is
#: LeRobot's path (fp32 logits, explicit softmax); "fused" runs torch's scaled_dot_product_attention with the same
#: semantics (functional.fused_attention), which lets CUDA pick a memory-efficient kernel.
ATTENTION_IMPLS = ("eager", "fused")
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}
# config.json key of SmolVLAArch.relative_action_dims (an effvla extension; written only when non-empty, so
# absolute-action checkpoints keep LeRobot's exact config.json)
RELATIVE_KEY = "effvla_relative_action_dims"
# config.json key of SmolVLAArch.rtc_trained_max_delay (an effvla extension, written only when > 0): the checkpoint
# was trained with training-time real-time chunking (arXiv 2512.05964) on committed prefixes of up to that many actions
RTC_TRAINED_KEY = "effvla_rtc_trained_max_delay"


#: Choices of the dtype parameters: the dtypes, and "auto" (:func:`resolve_dtype`).
DTYPE_CHOICES = (*DTYPES, "auto")


def native_bf16(device: str | torch.device = "cpu") -> bool:
    """Whether ``device`` computes bf16 natively: an x86 CPU with AMX or AVX512-BF16 (oneDNN's bf16 kernels), a
    CUDA device with bf16 support (Ampere or newer: every Jetson Orin and Thor)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if dev.type == "cpu":
        cpu = getattr(torch, "cpu", None)
        return bool(cpu is not None and (getattr(cpu, "_is_amx_tile_supported", lambda: False)()
                                         or getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()))
    return False


def resolve_dtype(name: str, device: str | torch.device = "cpu") -> str:
    """A dtype parameter's value as a dtype name: "auto" is bfloat16 where ``device`` computes it natively
    (:func:`native_bf16`), else float16 on CUDA and float32 on a CPU (emulated bf16 is slower than fp32 there)."""
    if name != "auto":
        return DTYPE_ALIASES.get(name, name)
    if native_bf16(device):
        return "bfloat16"
    return "float16" if torch.device(device).type == "cuda" else "float32"


def to_dtype(name: str | torch.dtype) -> torch.dtype:
    """'float32' | 'bfloat16' | 'float16' (or fp32/bf16/fp16) -> torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    key = DTYPE_ALIASES.get(name, name)
    if key not in DTYPES:
        raise ValueError(f"dtype: {name!r} is not one of {sorted(DTYPES) + sorted(DTYPE_ALIASES)}")
    return DTYPES[key]


def expert_intermediate_size(hidden: int, ffn_multiplier: int = 4, multiple_of: int = 256) -> int:
    """LeRobot's expert MLP width: 4 * (2/3 * hidden), rounded up to a multiple of 256."""
    h = int(2 * hidden / 3)
    h = int(ffn_multiplier * h)
    return multiple_of * ((h + multiple_of - 1) // multiple_of)


@dataclass
class SmolVLAArch:
    """Architecture of a SmolVLA policy (backbone shapes + the LeRobot SmolVLAConfig fields we honour).

    Field names of the policy part follow LeRobot's ``SmolVLAConfig`` so that ``config.json`` maps
    one-to-one. Cameras are named by their suffix (``observation.images.<camera>``).
    """

    # -- vision tower (SigLIP-like, SmolVLMVisionConfig) --------------------------------------------
    vision_hidden_size: int = 768
    vision_intermediate_size: int = 3072
    vision_num_layers: int = 12
    vision_num_heads: int = 12
    image_size: int = 512
    patch_size: int = 16
    vision_layer_norm_eps: float = 1e-6
    scale_factor: int = 4  # pixel shuffle factor of the connector
    # -- text model (Llama, SmolVLM text_config) ------------------------------------------------------
    text_hidden_size: int = 960
    text_intermediate_size: int = 2560
    text_total_layers: int = 32  # layers in the VLM's config (only num_vlm_layers are built)
    num_attention_heads: int = 15
    num_key_value_heads: int = 5
    head_dim: int = 64
    vocab_size: int = 49280
    rms_norm_eps: float = 1e-5
    rope_theta: float = 100000.0  # kept in the VLM config only: SmolVLA's RoPE uses base 10000
    max_position_embeddings: int = 8192
    pad_token_id: int = 2
    image_token_id: int = 49190
    # -- SmolVLA policy (LeRobot SmolVLAConfig names) ---------------------------------------------------
    num_vlm_layers: int = 16
    num_expert_layers: int = -1  # <=0: as many as the VLM layers
    self_attn_every_n_layers: int = 2
    expert_width_multiplier: float = 0.75
    attention_mode: str = "cross_attn"
    chunk_size: int = 50
    n_action_steps: int = 50
    max_state_dim: int = 32
    max_action_dim: int = 32
    resize_imgs_with_padding: tuple[int, int] | None = (512, 512)  # (width, height) as in LeRobot
    tokenizer_max_length: int = 48
    pad_language_to: str = "longest"
    num_steps: int = 10
    min_period: float = 4e-3
    max_period: float = 4.0
    prefix_length: int = -1
    add_image_special_tokens: bool = False
    vlm_model_name: str = "HuggingFaceTB/SmolVLM2-500M-Video-Instruct"
    load_vlm_weights: bool = False
    # -- features ---------------------------------------------------------------------------------------
    state_dim: int = 6
    action_dim: int = 6
    cameras: tuple[str, ...] = ("camera1", "camera2")
    camera_shape: tuple[int, int, int] = (3, 256, 256)  # (C, H, W) recorded in config.json
    # action dims predicted relative to the same-index state dim (openpi's DeltaActions: a = a_abs - state;
    # the policy adds the observation's state back); () = absolute actions, as LeRobot's SmolVLA
    relative_action_dims: tuple[int, ...] = ()
    # training-time real-time chunking (arXiv 2512.05964): trained to condition on a committed prefix of up to this
    # many clean actions (per-token flow time 0); 0 = not trained so (inference-time guidance only)
    rtc_trained_max_delay: int = 0
    normalization_mapping: dict[str, str] = field(
        default_factory=lambda: {"VISUAL": "IDENTITY", "STATE": "MEAN_STD", "ACTION": "MEAN_STD"}
    )

    # -- derived ------------------------------------------------------------------------------------------
    @property
    def expert_hidden_size(self) -> int:
        return int(self.text_hidden_size * self.expert_width_multiplier)

    @property
    def expert_intermediate_size(self) -> int:
        return expert_intermediate_size(self.expert_hidden_size)

    @property
    def n_expert_layers(self) -> int:
        return self.num_expert_layers if self.num_expert_layers > 0 else self.num_vlm_layers

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_camera(self) -> int:
        return (self.patches_per_side // self.scale_factor) ** 2

    @property
    def image_keys(self) -> list[str]:
        return [f"observation.images.{c}" for c in self.cameras]

    def is_cross_attn_layer(self, layer_idx: int) -> bool:
        """True where the expert cross-attends to the VLM's K/V (odd layers with every_n = 2)."""
        if "cross" not in self.attention_mode:
            return False
        n = self.self_attn_every_n_layers
        return not (n > 0 and layer_idx % n == 0)

    def validate(self) -> None:
        if self.add_image_special_tokens:
            raise NotImplementedError("add_image_special_tokens=True is not supported by the policy core")
        if self.attention_mode not in ("cross_attn", "self_attn"):
            raise ValueError(f"attention_mode: {self.attention_mode!r} is not supported")
        if self.num_vlm_layers % self.n_expert_layers != 0:
            raise ValueError("num_expert_layers must divide num_vlm_layers")
        if self.text_hidden_size != self.num_attention_heads * self.head_dim:
            # SmolVLM/Llama allow it, but LeRobot's attention reshapes assume it
            pass
        if self.patches_per_side % self.scale_factor != 0:
            raise ValueError("image_size / patch_size must be a multiple of scale_factor")
        bad = [i for i in self.relative_action_dims if not 0 <= i < min(self.action_dim, self.state_dim)]
        if bad or len(set(self.relative_action_dims)) != len(self.relative_action_dims):
            raise ValueError(f"relative_action_dims: {list(self.relative_action_dims)} must be distinct indices below "
                             f"min(action_dim, state_dim) = {min(self.action_dim, self.state_dim)}")
        if not 0 <= self.rtc_trained_max_delay < self.chunk_size:
            raise ValueError(f"rtc_trained_max_delay: must be in [0, chunk_size {self.chunk_size}), "
                             f"got {self.rtc_trained_max_delay}")

    def replace(self, **changes: Any) -> SmolVLAArch:
        return dataclasses.replace(self, **changes)

    # -- transformers configs -------------------------------------------------------------------------
    def vlm_config(self) -> Any:
        """The SmolVLMConfig of the backbone with only ``num_vlm_layers`` text layers."""
        from transformers import SmolVLMConfig

        vision = dict(
            hidden_size=self.vision_hidden_size, intermediate_size=self.vision_intermediate_size,
            num_hidden_layers=self.vision_num_layers, num_attention_heads=self.vision_num_heads,
            image_size=self.image_size, patch_size=self.patch_size, layer_norm_eps=self.vision_layer_norm_eps,
        )
        text = dict(
            model_type="llama", hidden_size=self.text_hidden_size, intermediate_size=self.text_intermediate_size,
            num_hidden_layers=self.text_total_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim, vocab_size=self.vocab_size,
            max_position_embeddings=self.max_position_embeddings, rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta, pad_token_id=self.pad_token_id, tie_word_embeddings=False,
        )
        extra: dict[str, Any] = {"pad_token_id": self.pad_token_id}
        cfg = SmolVLMConfig(vision_config=vision, text_config=text, scale_factor=self.scale_factor,
                            image_token_id=self.image_token_id, tie_word_embeddings=False, **extra)
        cfg.architectures = ["SmolVLMForConditionalGeneration"]
        return cfg

    @classmethod
    def from_vlm_config(cls, vlm_cfg: Any, **policy_fields: Any) -> SmolVLAArch:
        """Backbone shapes from a SmolVLMConfig plus LeRobot policy fields."""
        v, t = vlm_cfg.vision_config, vlm_cfg.text_config
        rope = getattr(t, "rope_parameters", None) or {}
        return cls(
            vision_hidden_size=v.hidden_size, vision_intermediate_size=v.intermediate_size,
            vision_num_layers=v.num_hidden_layers, vision_num_heads=v.num_attention_heads,
            image_size=v.image_size, patch_size=v.patch_size, vision_layer_norm_eps=v.layer_norm_eps,
            scale_factor=vlm_cfg.scale_factor, text_hidden_size=t.hidden_size,
            text_intermediate_size=t.intermediate_size, text_total_layers=t.num_hidden_layers,
            num_attention_heads=t.num_attention_heads, num_key_value_heads=t.num_key_value_heads,
            head_dim=getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads,
            vocab_size=t.vocab_size, rms_norm_eps=t.rms_norm_eps,
            rope_theta=float(rope.get("rope_theta", getattr(t, "rope_theta", 10000.0))),
            max_position_embeddings=t.max_position_embeddings,
            pad_token_id=t.pad_token_id if t.pad_token_id is not None else 2,
            image_token_id=getattr(vlm_cfg, "image_token_id", 0) or 0,
            **policy_fields,
        )

    # -- LeRobot config.json ------------------------------------------------------------------------------
    POLICY_FIELDS = (
        "chunk_size", "n_action_steps", "max_state_dim", "max_action_dim", "tokenizer_max_length",
        "num_steps", "vlm_model_name", "load_vlm_weights", "add_image_special_tokens", "attention_mode",
        "prefix_length", "pad_language_to", "num_expert_layers", "num_vlm_layers", "self_attn_every_n_layers",
        "expert_width_multiplier", "min_period", "max_period",
    )

    @classmethod
    def policy_fields_from_lerobot(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        """The SmolVLAArch policy/feature fields of a LeRobot SmolVLA ``config.json`` dict."""
        out: dict[str, Any] = {k: cfg[k] for k in cls.POLICY_FIELDS if k in cfg}
        if cfg.get("resize_imgs_with_padding") is not None:
            out["resize_imgs_with_padding"] = tuple(cfg["resize_imgs_with_padding"])
        else:
            out["resize_imgs_with_padding"] = None
        if cfg.get("normalization_mapping"):
            out["normalization_mapping"] = dict(cfg["normalization_mapping"])
        if cfg.get(RELATIVE_KEY):
            out["relative_action_dims"] = tuple(int(i) for i in cfg[RELATIVE_KEY])
        if cfg.get(RTC_TRAINED_KEY):
            out["rtc_trained_max_delay"] = int(cfg[RTC_TRAINED_KEY])
        for bad in ("adapt_to_pi_aloha", "use_delta_joint_actions_aloha"):
            if cfg.get(bad):
                raise NotImplementedError(f"config.json: {bad}=true is not supported by the policy core")
        if cfg.get("empty_cameras", 0):
            raise NotImplementedError("config.json: empty_cameras > 0 is not supported by the policy core")
        feats = cfg.get("input_features", {})
        cams, cam_shape = [], None
        for key, f in feats.items():
            if f.get("type") == "VISUAL":
                if not key.startswith("observation.images."):
                    raise ValueError(f"config.json: visual feature {key!r} is not under observation.images.")
                cams.append(key[len("observation.images."):])
                cam_shape = tuple(f["shape"])
            elif key == "observation.state":
                out["state_dim"] = int(f["shape"][0])
        out["cameras"] = tuple(cams)
        if cam_shape is not None:
            out["camera_shape"] = cam_shape
        act = cfg.get("output_features", {}).get("action")
        if act is not None:
            out["action_dim"] = int(act["shape"][0])
        return out

    def to_lerobot_config(self) -> dict[str, Any]:
        """A LeRobot 0.6.1 SmolVLA ``config.json`` dict (every SmolVLAConfig field, LeRobot defaults)."""
        feats: dict[str, Any] = {"observation.state": {"type": "STATE", "shape": [self.state_dim]}}
        for k in self.image_keys:
            feats[k] = {"type": "VISUAL", "shape": list(self.camera_shape)}
        return {
            "type": "smolvla", "n_obs_steps": 1, "input_features": feats,
            "output_features": {"action": {"type": "ACTION", "shape": [self.action_dim]}},
            "device": "cpu", "use_amp": False, "use_peft": False, "push_to_hub": False, "repo_id": None,
            "private": None, "tags": None, "license": None, "pretrained_path": None, "pretrained_revision": None,
            "chunk_size": self.chunk_size, "n_action_steps": self.n_action_steps,
            "normalization_mapping": dict(self.normalization_mapping),
            "max_state_dim": self.max_state_dim, "max_action_dim": self.max_action_dim,
            "resize_imgs_with_padding": list(self.resize_imgs_with_padding) if self.resize_imgs_with_padding else None,
            "empty_cameras": 0, "adapt_to_pi_aloha": False, "use_delta_joint_actions_aloha": False,
            "tokenizer_max_length": self.tokenizer_max_length, "num_steps": self.num_steps, "use_cache": True,
            "freeze_vision_encoder": True, "train_expert_only": True, "train_state_proj": True,
            "optimizer_lr": 1e-4, "optimizer_betas": [0.9, 0.95], "optimizer_eps": 1e-8,
            "optimizer_weight_decay": 1e-10, "optimizer_grad_clip_norm": 10, "scheduler_warmup_steps": 1000,
            "scheduler_decay_steps": 30000, "scheduler_decay_lr": 2.5e-6,
            "vlm_model_name": self.vlm_model_name, "load_vlm_weights": self.load_vlm_weights,
            "add_image_special_tokens": self.add_image_special_tokens, "attention_mode": self.attention_mode,
            "prefix_length": self.prefix_length, "pad_language_to": self.pad_language_to,
            "num_expert_layers": self.num_expert_layers, "num_vlm_layers": self.num_vlm_layers,
            "self_attn_every_n_layers": self.self_attn_every_n_layers,
            "expert_width_multiplier": self.expert_width_multiplier, "min_period": self.min_period,
            "max_period": self.max_period, "rtc_config": None, "compile_model": False,
            "compile_mode": "max-autotune",
        } | ({RELATIVE_KEY: list(self.relative_action_dims)} if self.relative_action_dims else {}) \
          | ({RTC_TRAINED_KEY: self.rtc_trained_max_delay} if self.rtc_trained_max_delay else {})


def tiny_arch(**changes: Any) -> SmolVLAArch:
    """Seconds-on-CPU architecture, the same shapes as the reference kit's tiny checkpoint.

    vision 32-d x2 layers at 64 px (patch 8 -> 8x8 patches -> pixel shuffle 2 -> 16 tokens per camera),
    text 64-d (4 heads / 2 KV heads, head_dim 16), 4 of 6 layers, expert 48-d, chunk 10, vocab 304.
    """
    base = SmolVLAArch(
        vision_hidden_size=32, vision_intermediate_size=64, vision_num_layers=2, vision_num_heads=2,
        image_size=64, patch_size=8, scale_factor=2, text_hidden_size=64, text_intermediate_size=128,
        text_total_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=304,
        max_position_embeddings=1024, image_token_id=302, num_vlm_layers=4, chunk_size=10, n_action_steps=10,
        resize_imgs_with_padding=(64, 64), tokenizer_max_length=16, pad_language_to="max_length",
        camera_shape=(3, 48, 64), vlm_model_name="tiny_vlm",
    )
    return base.replace(**changes) if changes else base


def smolvla_450m_arch(**changes: Any) -> SmolVLAArch:
    """The real SmolVLA-450M shapes (lerobot/smolvla_base): 2 cameras, 64 tokens each, chunk 50, 10 steps."""
    base = SmolVLAArch(pad_language_to="max_length")
    return base.replace(**changes) if changes else base


@dataclass
class RuntimeConfig(ConfigBase):
    """Runtime options of :class:`~effvla_ros.core.smolvla.policy.SmolVLAPolicy`."""

    device: str = param("cpu", description="torch device ('cpu', 'cuda', 'cuda:1', ...)", read_only=True)
    vision_dtype: str = param("float32", choices=DTYPE_CHOICES, read_only=True,
                              description="dtype of the vision tower and the connector")
    vlm_dtype: str = param("float32", choices=DTYPE_CHOICES, read_only=True,
                           description="dtype of the VLM text layers (prefill, KV cache)")
    expert_dtype: str = param("float32", choices=DTYPE_CHOICES, read_only=True,
                              description="dtype of the action expert and the state/action projections")
    num_steps: int = param(0, min=0, max=1000,
                           description="Euler denoising steps; 0 = the checkpoint's num_steps")
    count_flops: bool = param(False, description="count FLOPs per stage with FlopCounterMode (slow)")
    num_threads: int = param(0, min=0, max=256, description="torch CPU threads; 0 = leave as is")
    adaptive_threads: bool = param(False, read_only=True,
                                   description="before each stage call, use only the cores other processes leave "
                                               "free (read from /proc/stat), at most num_threads (0: all cores): "
                                               "avoids OpenMP threads spinning against a busy CPU")
    attention: str = param("eager", choices=ATTENTION_IMPLS, read_only=True,
                           description="VLM/expert attention: eager (LeRobot's path) or fused (torch SDPA, same "
                                       "semantics; eager still runs where attention probabilities are needed)")

    def resolved_dtypes(self) -> tuple[str, str, str]:
        """(vision, vlm, expert) dtype names with "auto" resolved for this device (:func:`resolve_dtype`)."""
        return (resolve_dtype(self.vision_dtype, self.device), resolve_dtype(self.vlm_dtype, self.device),
                resolve_dtype(self.expert_dtype, self.device))

    def validate(self) -> None:
        if not (self.device == "cpu" or self.device.startswith("cuda") or self.device == "mps"):
            raise ValueError(f"device: {self.device!r} is not a cpu/cuda device")

    @classmethod
    def lerobot_bf16(cls, **changes: Any) -> RuntimeConfig:
        """What LeRobot runs with load_vlm_weights=True: VLM (vision + text) in bf16, expert fp32."""
        return cls(vision_dtype="bfloat16", vlm_dtype="bfloat16", **changes)
