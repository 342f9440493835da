"""One policy inference from (compressed) visual tokens, instruction and state, with every
efficiency technique of the policy side: VLM early exit, expert feature reuse, configurable
denoising steps, and real-time chunking guidance toward the previous chunk.

This is the ROS-free core of the ``policy`` node and of offline replay/evaluation: the node only
converts messages into :class:`CameraTokens` / tensors and publishes :class:`InferenceResult`.
The techniques are written here once, against the stage seam (:mod:`effvla_ros.core.backends`): the
prefill runs in segments that end at the exit layers (:class:`PrefixReuse`), the denoising is the shared
Euler integrator (:func:`effvla_ros.core.flow.euler_integrate`) over the backend's ``velocity`` with an
expert plan per step (:class:`ExpertReuse`) and the RTC guidance as its guide.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from effvla_ros.core.backends.base import StageBackend, make_backend
from effvla_ros.core.early_exit import EarlyExitConfig, ExpertReuse, ExpertReuseConfig, PrefixReuse
from effvla_ros.core.flow import Guide, euler_integrate
from effvla_ros.core.params import ConfigBase, param
from effvla_ros.core.rtc import GuidanceTarget, RTCConfig, guided_velocity, soft_mask
from effvla_ros.core.smolvla.policy import SmolVLAPolicy
from effvla_ros.core.stages import StageStats, VisualTokens, measure


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
    """Policy inferences on one backend (default: the eager reference), with the state the techniques keep
    between them (the last full prefix for early exit; the instruction's tokens). Settings change live with
    :meth:`configure`; a setting the backend cannot apply is refused there (``CapabilityError`` naming it)."""

    def __init__(self, policy: SmolVLAPolicy, *, inference: InferenceConfig | None = None,
                 early_exit: EarlyExitConfig | None = None, expert_reuse: ExpertReuseConfig | None = None,
                 rtc: RTCConfig | None = None, backend: StageBackend | str = "eager") -> None:
        self.policy = policy
        self.backend = make_backend(backend, policy) if isinstance(backend, str) else backend
        self.inference = inference or InferenceConfig()
        self.rtc = rtc or RTCConfig()
        self.prefix_reuse = PrefixReuse(early_exit or EarlyExitConfig(), policy.arch.num_vlm_layers)
        self.expert_layers = policy.expert_layer_indices()
        self.expert_reuse = ExpertReuse(expert_reuse or ExpertReuseConfig(), self.expert_layers)
        self._check()
        self.instruction: str | None = None
        self._lang: tuple[Tensor, Tensor] | None = None

    def _check(self) -> None:
        self.backend.caps.check(early_exit=self.prefix_reuse.cfg.enabled, expert_reuse=self.expert_reuse.cfg.enabled)
        self.check_rtc(self.rtc)

    def check_rtc(self, rtc: RTCConfig) -> None:
        """Raise (naming the parameter) if ``rtc`` cannot run here: VJP guidance or a committed prefix on a backend
        without it, ``rtc.mode: trained`` with a checkpoint not trained for it."""
        self.backend.caps.check(vjp=rtc.enabled and rtc.mode == "guided" and rtc.guidance == "vjp",
                                committed_prefix=rtc.enabled and rtc.mode == "trained")
        if rtc.enabled and rtc.mode == "trained" and not self.policy.arch.rtc_trained_max_delay:
            raise ValueError("rtc.mode: 'trained' needs a checkpoint trained with training-time RTC (`effvla train "
                             "--rtc-train-max-delay N`, config.json effvla_rtc_trained_max_delay); this one was not: "
                             "use 'guided'")

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
        self._check()

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
        be, count = self.backend, self.inference.count_flops
        pol.adapt_threads()  # RuntimeConfig.adaptive_threads: the cores other processes leave free
        t0 = time.perf_counter()
        visual = self.visual_inputs(cameras)
        lang, lmask = self._lang
        stats: list[StageStats] = []
        with measure(pol.device, stats, count):                                    # stage 2: prefill
            cache = be.begin_prefill(visual, lang, lmask, pol.prepare_state(state.reshape(1, -1)))
            self.prefix_reuse.prefill(be, cache, lang)
        exit_layer = (cache.exit_layer + 1) if cache.exit_layer is not None else pol.arch.num_vlm_layers

        n_steps = self.inference.num_steps
        self.expert_reuse.reset(n_steps)
        guide: Guide | None = None
        target: Tensor | None = None
        mask: Tensor | None = None
        prefix: Tensor | None = None
        delay = 0
        if guidance is not None and self.rtc.enabled and guidance.valid > 0:
            target = self._rebase(guidance, state)
            if self.rtc.mode == "trained":
                # training-time RTC: the d actions that execute while this chunk is computed are its committed
                # prefix (beyond the delays it was trained on, the first ones of them: the rest run before it anyway)
                delay = min(guidance.delay, guidance.valid, pol.arch.rtc_trained_max_delay)
                prefix = target[None, :delay] if delay > 0 else None                 # (1, d, max_action_dim)
                target = None
            else:
                delay = min(guidance.delay, guidance.valid)
                mask = soft_mask(pol.arch.chunk_size, delay, guidance.valid, self.rtc.schedule).to(pol.device)
                rtc, y, w = self.rtc, target, mask

                def guide(step: int, t: float, x: Tensor, v: Tensor) -> Tensor:
                    def vfn(x_in: Tensor, t_in: float) -> Tensor:
                        return be.velocity(cache, x_in, torch.full((x_in.shape[0],), float(t_in), device=x_in.device))
                    return guided_velocity(x, t, vfn, y, w, rtc, v_t=v)

        def velocity(x: Tensor, t: Tensor, step: int) -> Tensor:
            return be.velocity(cache, x, t, step=step, plan=self.expert_reuse.plan(step))

        if noise is None:
            noise = pol.draw_noise(1, generator)
        integrate = getattr(be, "integrate", None)  # a backend that runs the whole loop itself (CUDA graph)
        with measure(pol.device, stats, count):                                    # stage 3: denoise
            if integrate is not None:
                x = integrate(cache, noise, n_steps, self.rtc, target, mask, prefix)
            else:
                x = euler_integrate(velocity, noise.to(pol.device), n_steps, guide=guide, prefix=prefix)
        den_actions, _ = pol.decode_actions(x)
        prefill_stats, denoise_stats = stats
        actions = pol.to_absolute(den_actions, state.reshape(1, -1))[0]
        if not torch.isfinite(actions).all():
            raise FloatingPointError("policy produced NaN/Inf actions")
        times = {"prefill_s": prefill_stats.wall_s, "denoise_s": denoise_stats.wall_s,
                 "total_s": time.perf_counter() - t0}
        flops: dict[str, int] = {}
        if prefill_stats.flops is not None and denoise_stats.flops is not None:
            flops = {"prefill": prefill_stats.flops, "denoise": denoise_stats.flops}
        n_layers = len(self.expert_layers)
        computed = self.expert_reuse.computed if self.expert_reuse.cfg.enabled else n_layers * n_steps
        return InferenceResult(
            actions=actions, x_final=x[0], exit_layer=exit_layer, steps=n_steps,
            reused_expert_layers=self.expert_reuse.reused if self.expert_reuse.cfg.enabled else 0,
            computed_expert_layers=computed, steps_with_reuse=len(self.expert_reuse.steps_with_reuse),
            rtc_delay=delay, guided=guide is not None or prefix is not None, times=times, flops=flops,
            similarities={k: float(v) for k, v in self.prefix_reuse.last_similarities.items()},
            state=state.detach().reshape(-1).clone())

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


@torch.no_grad()
def backend_chunk(backend: StageBackend, observation: Any, noise: Tensor, num_steps: int | None = None
                  ) -> tuple[Tensor, Tensor]:
    """:meth:`SmolVLAPolicy.predict_action_chunk` (every optimization off) through a stage backend's ``encode``,
    ``prefill`` and ``velocity``, one observation of the batch at a time (exported graphs take a batch of one).
    observation as there (LeRobot keys); noise (B, chunk, max_action_dim). Returns (actions (B, chunk,
    action_dim) unnormalized and absolute, normalized actions)."""
    pol = backend.policy
    images, state, task = pol.split_observation(observation)
    b = state.shape[0]
    lang, lmask = pol.language(observation, task, b)
    xs = []
    for i in range(b):
        tokens = {c: backend.encode(pol.preprocess_image(img[i:i + 1])) for c, img in images.items()}
        cache = backend.begin_prefill(tokens, lang[i:i + 1], lmask[i:i + 1], pol.prepare_state(state[i:i + 1]))
        backend.prefill(cache, 0, pol.arch.num_vlm_layers)

        def velocity(x: Tensor, t: Tensor, step: int, cache: Any = cache) -> Tensor:
            return backend.velocity(cache, x, t)

        xs.append(euler_integrate(velocity, noise[i:i + 1].to(pol.device), num_steps or pol.num_steps))
    actions, norm = pol.decode_actions(torch.cat(xs))
    return pol.to_absolute(actions, state.reshape(b, -1)), norm

