"""One policy inference from (compressed) visual tokens, instruction and state, with every
efficiency technique of the policy side: VLM early exit, expert feature reuse, configurable
denoising steps, and real-time chunking guidance toward the previous chunk.

This is the ROS-free core of the ``policy`` node and of offline replay/evaluation: the node only
converts messages into :class:`CameraTokens` / tensors and publishes :class:`InferenceResult`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from effvla_ros.core.early_exit import EarlyExitConfig, ExpertReuse, ExpertReuseConfig, PrefixReuse
from effvla_ros.core.params import ConfigBase, param
from effvla_ros.core.rtc import GuidanceTarget, RTCConfig, guided_velocity, soft_mask
from effvla_ros.core.smolvla.policy import SmolVLAPolicy, StepInfo, VisualTokens


@dataclass
class InferenceConfig(ConfigBase):
    """Denoising settings (ROS parameters of the policy node, no prefix)."""

    num_steps: int = param(10, min=1, max=100, description="flow-matching Euler steps per chunk")
    count_flops: bool = param(False, description="count FLOPs per stage (torch.utils.flop_counter; slower)")


@dataclass
class CameraTokens:
    """Visual tokens of one camera as received: the kept subset of the token grid."""

    tokens: Tensor  # (K, D) unscaled connector outputs
    kept: Tensor  # (K,) long grid indices
    grid: tuple[int, int]
    missing: bool = False


@dataclass
class InferenceResult:
    actions: Tensor  # (H, action_dim) unnormalized
    x_final: Tensor  # (H, max_action_dim) normalized, padded (RTC target of the next chunk)
    exit_layer: int  # VLM layers computed (num layers when no exit)
    steps: int
    reused_expert_layers: int
    computed_expert_layers: int
    steps_with_reuse: int
    rtc_delay: int
    guided: bool
    times: dict[str, float] = field(default_factory=dict)  # prefill_s, denoise_s, total_s
    flops: dict[str, int] = field(default_factory=dict)  # prefill, denoise (when counted)
    similarities: dict[int, float] = field(default_factory=dict)
    state: Tensor | None = None  # (state_dim,) the raw state of this inference (GuidanceTarget.ref_state of the next)


class PolicyRunner:
    def __init__(self, policy: SmolVLAPolicy, *, inference: InferenceConfig | None = None,
                 early_exit: EarlyExitConfig | None = None, expert_reuse: ExpertReuseConfig | None = None,
                 rtc: RTCConfig | None = None) -> None:
        self.policy = policy
        self.inference = inference or InferenceConfig()
        self.rtc = rtc or RTCConfig()
        self.prefix_reuse = PrefixReuse(early_exit or EarlyExitConfig(), policy.arch.num_vlm_layers)
        self.expert_layers = policy.expert_layer_indices()
        self.expert_reuse = ExpertReuse(expert_reuse or ExpertReuseConfig(), self.expert_layers)
        self.instruction: str | None = None
        self._lang: tuple[Tensor, Tensor] | None = None

    # ------------------------------------------------------------------ configuration
    def configure(self, *, inference: InferenceConfig | None = None, early_exit: EarlyExitConfig | None = None,
                  expert_reuse: ExpertReuseConfig | None = None, rtc: RTCConfig | None = None) -> None:
        if inference is not None:
            self.inference = inference
        if early_exit is not None:
            self.prefix_reuse.configure(early_exit)
            self.prefix_reuse.reset()
        if expert_reuse is not None:
            self.expert_reuse.configure(expert_reuse)
        if rtc is not None:
            self.rtc = rtc

    def set_instruction(self, text: str) -> None:
        if text != self.instruction:
            self.instruction = text
            self._lang = self.policy.tokenize(text)
            self.prefix_reuse.reset()  # a new task: never reuse the old prefix

    # ------------------------------------------------------------------ inference
    def visual_inputs(self, cameras: dict[str, CameraTokens]) -> dict[str, VisualTokens]:
        """Scatter each camera's kept tokens into its full grid (missing cameras are masked out)."""
        arch = self.policy.arch
        n = arch.tokens_per_camera
        out: dict[str, VisualTokens] = {}
        dev = self.policy.device
        for cam in self.policy.cameras:
            ct = cameras.get(cam)
            d = arch.text_hidden_size
            grid_tokens = torch.zeros((1, n, d), dtype=torch.float32, device=dev)
            if ct is None or ct.missing or ct.tokens.numel() == 0:
                out[cam] = VisualTokens(grid_tokens, keep=torch.arange(n, device=dev),
                                        camera_mask=torch.zeros(1, dtype=torch.bool, device=dev))
                continue
            if ct.grid[0] * ct.grid[1] != n or ct.tokens.shape[-1] != d:
                raise ValueError(f"camera {cam}: tokens {tuple(ct.tokens.shape)} on grid {ct.grid} do not match the "
                                 f"checkpoint ({n} tokens of dimension {d})")
            kept = ct.kept.to(dev).long()
            if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= n):
                raise ValueError(f"camera {cam}: kept index out of range 0..{n - 1}")
            grid_tokens[0, kept] = ct.tokens.to(dev, torch.float32)
            out[cam] = VisualTokens(grid_tokens, keep=torch.sort(kept).values)
        return out

    @torch.no_grad()
    def infer(self, cameras: dict[str, CameraTokens], state: Tensor, *, noise: Tensor | None = None,
              guidance: GuidanceTarget | None = None, generator: torch.Generator | None = None) -> InferenceResult:
        """state: (state_dim,) raw. guidance: previous chunk aligned to this observation (RTC)."""
        if self._lang is None:
            raise RuntimeError("no instruction set")
        pol = self.policy
        if state.shape[-1] != pol.arch.state_dim:
            raise ValueError(f"state has {state.shape[-1]} values, the checkpoint expects {pol.arch.state_dim}")
        if not torch.isfinite(state).all():
            raise ValueError("state contains NaN/Inf")
        pol._flops_enabled = self.inference.count_flops  # per-stage counting in the policy core
        t0 = time.perf_counter()
        visual = self.visual_inputs(cameras)
        lang, lmask = self._lang
        st = pol.prepare_state(state.reshape(1, -1))
        cb = self.prefix_reuse.callback(lang)
        cache = pol.prefill(visual, lang, lmask, st, layer_callback=cb)
        exit_layer = (cache.exit_layer + 1) if cache.exit_layer is not None else pol.arch.num_vlm_layers

        self.expert_reuse.reset(self.inference.num_steps)
        step_cb = None
        delay = 0
        if guidance is not None and self.rtc.enabled and guidance.valid > 0:
            h = pol.arch.chunk_size
            delay = min(guidance.delay, guidance.valid)
            mask = soft_mask(h, delay, guidance.valid, self.rtc.schedule).to(pol.device)
            target = self._rebase(guidance, state)
            rtc = self.rtc

            def step_cb(info: StepInfo) -> Tensor:
                def vfn(x: Tensor, t: float) -> Tensor:
                    return info.velocity_fn(x, torch.full((x.shape[0],), float(t), device=x.device))
                return guided_velocity(info.x_t, info.t, vfn, target, mask, rtc, v_t=info.v_t)

        den = pol.denoise(cache, noise, self.inference.num_steps, step_callback=step_cb,
                          expert_layer_hook=self.expert_reuse.hook if self.expert_reuse.cfg.enabled else None,
                          generator=generator)
        actions = pol.to_absolute(den.actions, state.reshape(1, -1))[0]
        if not torch.isfinite(actions).all():
            raise FloatingPointError("policy produced NaN/Inf actions")
        assert cache.stats is not None and den.stats is not None
        times = {"prefill_s": cache.stats.wall_s, "denoise_s": den.stats.wall_s, "total_s": time.perf_counter() - t0}
        flops: dict[str, int] = {}
        if cache.stats.flops is not None and den.stats.flops is not None:
            flops = {"prefill": cache.stats.flops, "denoise": den.stats.flops}
        n_layers = len(self.expert_layers)
        computed = self.expert_reuse.computed if self.expert_reuse.cfg.enabled else n_layers * self.inference.num_steps
        return InferenceResult(
            actions=actions, x_final=den.x_final[0], exit_layer=exit_layer, steps=self.inference.num_steps,
            reused_expert_layers=self.expert_reuse.reused if self.expert_reuse.cfg.enabled else 0,
            computed_expert_layers=computed, steps_with_reuse=len(self.expert_reuse.steps_with_reuse),
            rtc_delay=delay, guided=step_cb is not None, times=times, flops=flops,
            similarities=dict(self.prefix_reuse.last_similarities), state=state.detach().reshape(-1).clone())

    def _rebase(self, guidance: GuidanceTarget, state: Tensor) -> Tensor:
        """The guidance target in this inference's action space. For relative actions the previous chunk is
        relative to its own state: unnormalize, add that state, subtract this one, normalize again."""
        pol = self.policy
        target = guidance.actions.to(pol.device, torch.float32)
        if not pol.arch.relative_action_dims:
            return target
        if guidance.ref_state is None:
            raise ValueError("RTC guidance for a relative-action checkpoint needs GuidanceTarget.ref_state")
        a = pol.arch.action_dim
        rel = pol.normalizer.unnormalize("action", target[None, :, :a])
        absolute = pol.to_absolute(rel, guidance.ref_state.reshape(1, -1))
        out = target.clone()
        out[:, :a] = pol.normalizer.normalize("action", pol.to_relative(absolute, state.reshape(1, -1)))[0]
        return out


def compressed_to_camera_tokens(out: Any) -> CameraTokens:
    """A :class:`~effvla_ros.core.compression.compressor.CompressedCamera` as policy input."""
    return CameraTokens(out.tokens, out.kept, out.grid)
