"""The SmolVLA parameter tree, built from real ``transformers`` modules with LeRobot's names.

``SmolVLAWeights().state_dict()`` has exactly the keys of a LeRobot 0.6.1 SmolVLA ``model.safetensors``::

    model.state_proj / action_in_proj / action_out_proj / action_time_mlp_in / action_time_mlp_out
    model.vlm_with_expert.vlm.model.vision_model.*     SmolVLMVisionTransformer
    model.vlm_with_expert.vlm.model.connector.*        SmolVLMConnector (pixel shuffle + Linear)
    model.vlm_with_expert.vlm.model.text_model.*       LlamaModel, first num_vlm_layers layers
    model.vlm_with_expert.vlm.lm_head.*                (unused at inference, kept for interchange)
    model.vlm_with_expert.lm_expert.*                  LlamaModel at expert width, no embed_tokens;
                                                       cross-attention layers' k/v_proj take VLM K/V

The forward computation does NOT call these modules' ``forward`` (except the vision layers,
connector, norms and MLPs): :mod:`effvla_ros.core.smolvla.policy` runs the attention itself.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .config import SmolVLAArch


class VLMWithExpert(nn.Module):
    """Container named like LeRobot's ``SmolVLMWithExpertModel`` (parameters only)."""

    def __init__(self, arch: SmolVLAArch, vlm_config: Any | None = None):
        super().__init__()
        from transformers import LlamaModel, SmolVLMForConditionalGeneration

        cfg = copy.deepcopy(vlm_config if vlm_config is not None else arch.vlm_config())
        # build only the kept text layers (LeRobot builds all and truncates: same parameters/names)
        cfg.text_config.num_hidden_layers = arch.num_vlm_layers
        for c in (cfg, cfg.vision_config, cfg.text_config):
            c._attn_implementation = "sdpa"  # the vision layers' attention, as LeRobot gets by default
        self.vlm = SmolVLMForConditionalGeneration(cfg)
        self.vlm.model.text_model.rotary_emb = None  # SmolVLA does its own RoPE (base 10000)

        ecfg = copy.deepcopy(cfg.text_config)
        ecfg.hidden_size = arch.expert_hidden_size
        ecfg.intermediate_size = arch.expert_intermediate_size
        ecfg.num_hidden_layers = arch.n_expert_layers
        expert: Any = LlamaModel(ecfg)
        expert.embed_tokens = None  # the expert reads embeddings, not tokens
        expert.rotary_emb = None
        self.lm_expert = expert
        kv_in = cfg.text_config.num_key_value_heads * cfg.text_config.head_dim
        kv_out = ecfg.num_key_value_heads * ecfg.head_dim
        expert_layers: Any = self.lm_expert.layers
        for i, layer in enumerate(expert_layers):
            if arch.is_cross_attn_layer(i):  # K/V come from the VLM's cached K/V (kv_in features)
                layer.self_attn.k_proj = nn.Linear(kv_in, kv_out, bias=ecfg.attention_bias)
                layer.self_attn.v_proj = nn.Linear(kv_in, kv_out, bias=ecfg.attention_bias)


class FlowMatchingModule(nn.Module):
    """Container named like LeRobot's ``VLAFlowMatching`` (parameters only)."""

    def __init__(self, arch: SmolVLAArch, vlm_config: Any | None = None):
        super().__init__()
        self.vlm_with_expert = VLMWithExpert(arch, vlm_config)
        d_vlm, d_exp = arch.text_hidden_size, arch.expert_hidden_size
        self.state_proj = nn.Linear(arch.max_state_dim, d_vlm)
        self.action_in_proj = nn.Linear(arch.max_action_dim, d_exp)
        self.action_out_proj = nn.Linear(d_exp, arch.max_action_dim)
        self.action_time_mlp_in = nn.Linear(2 * d_exp, d_exp)
        self.action_time_mlp_out = nn.Linear(d_exp, d_exp)


class SmolVLAWeights(nn.Module):
    """Root module: ``state_dict()`` keys equal LeRobot's ``SmolVLAPolicy.state_dict()``."""

    def __init__(self, arch: SmolVLAArch, vlm_config: Any | None = None):
        super().__init__()
        self.model = FlowMatchingModule(arch, vlm_config)

    # -- short accessors -------------------------------------------------------------------------------
    @property
    def vision(self) -> Any:
        return self.model.vlm_with_expert.vlm.model.vision_model

    @property
    def connector(self) -> Any:
        return self.model.vlm_with_expert.vlm.model.connector

    @property
    def text(self) -> Any:
        return self.model.vlm_with_expert.vlm.model.text_model

    @property
    def expert(self) -> Any:
        return self.model.vlm_with_expert.lm_expert

    def set_dtypes(self, vision: torch.dtype, vlm: torch.dtype, expert: torch.dtype) -> None:
        """Per-stage dtypes: vision tower + connector; text model + lm_head; expert + projections."""
        self.vision.to(vision)
        self.connector.to(vision)
        self.text.to(vlm)
        self.model.vlm_with_expert.vlm.lm_head.to(vlm)
        self.expert.to(expert)
        for m in (self.model.state_proj, self.model.action_in_proj, self.model.action_out_proj,
                  self.model.action_time_mlp_in, self.model.action_time_mlp_out):
            m.to(expert)


def build_weights(arch: SmolVLAArch, vlm_config: Any | None = None, *, meta: bool = False) -> SmolVLAWeights:
    """Construct the parameter tree (on the meta device when ``meta``: no memory, no init)."""
    arch.validate()
    if meta:
        with torch.device("meta"):
            return SmolVLAWeights(arch, vlm_config)
    return SmolVLAWeights(arch, vlm_config)


def randomize_(weights: nn.Module, seed: int = 0, scale: str = "fan_in") -> None:
    """Re-draw every parameter with O(1)-scale values (norm weights ~ 1 + 0.1 N, biases ~ 0.02 N,
    matrices ~ N / sqrt(fan_in)) so that every component visibly affects the output - the scheme of the
    reference kit's build_reference.py. ``scale='transformers'`` keeps the transformers init instead."""
    if scale == "transformers":
        return
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in weights.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
