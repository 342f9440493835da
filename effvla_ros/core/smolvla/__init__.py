"""SmolVLA policy core (ROS-free): staged inference numerically equal to LeRobot 0.6.1.

Quick start::

    from effvla_ros.core.smolvla import load_policy, RuntimeConfig
    policy = load_policy("ckpt_dir", vlm_dir="vlm_dir", runtime=RuntimeConfig(device="cpu"))
    out = policy.predict_action_chunk({"observation.images.camera1": img, "observation.state": s,
                                       "task": "pick up the cube"}, noise=noise)
    out.actions  # (B, chunk_size, action_dim)

Stages: ``encode_images`` -> ``prefill`` -> ``denoise`` (see :mod:`.policy`; the stage types are in :mod:`effvla_ros.core.stages`).
"""
from .checkpoint import (
    CheckpointError,
    build_random_policy,
    load_policy,
    read_arch,
    resolve_vlm_dir,
    save_policy,
)
from .config import RuntimeConfig, SmolVLAArch, smolvla_450m_arch, tiny_arch, to_dtype
from .model import SmolVLAWeights, build_weights, randomize_
from .normalize import Normalizer
from .policy import (
    ChunkResult,
    DenoiseResult,
    ExpertLayerContext,
    ExpertPlan,
    ImageEncoding,
    PrefillLayerInfo,
    PrefillStop,
    PrefixCache,
    SmolVLAPolicy,
    StageStats,
    StepInfo,
    VisualTokens,
)
from .tokenizer import build_tiny_tokenizer

__all__ = [
    "CheckpointError", "ChunkResult", "DenoiseResult", "ExpertLayerContext", "ExpertPlan", "ImageEncoding", "Normalizer",
    "PrefillLayerInfo", "PrefillStop", "PrefixCache", "RuntimeConfig", "SmolVLAArch", "SmolVLAPolicy",
    "SmolVLAWeights", "StageStats", "StepInfo", "VisualTokens", "build_random_policy",
    "build_tiny_tokenizer", "build_weights", "load_policy", "randomize_", "read_arch", "resolve_vlm_dir", "save_policy",
    "smolvla_450m_arch", "tiny_arch", "to_dtype",
]
