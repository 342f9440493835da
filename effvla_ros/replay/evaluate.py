"""Deterministic replay of an episode through TokenCompressor -> PolicyRunner, per setting, and metrics.

Determinism: the flow-matching noise of observation ``i`` is drawn from a generator seeded with
``seed * 1_000_003 + i`` (the same noise for every setting, so deviations measure the setting only),
every setting starts from fresh compressor / runner state, and real-time chunking guides each chunk
toward the previous observation's (:class:`~effvla_ros.core.chunking.ChunkHistory`, as the node) with
a fixed delay of ``rtc_delay_steps`` (:class:`~effvla_ros.core.chunking.FixedDelay`; the live node
measures it from latency, which is not reproducible).
Everything in the report except ``latency_ms`` and ``wall_s`` entries is a deterministic number.

The encoder runs on the frames the observations use (on the robot the compressor also encodes the
frames in between, so temporal reuse sees smaller changes there).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from effvla_ros.core.chunking import ChunkHistory, FixedDelay, IssuedChunk
from effvla_ros.core.compression.compressor import TokenCompressor
from effvla_ros.core.executor import ChunkExecutorCore, ExecutorConfig
from effvla_ros.core.observation import missing_camera, rgb_to_tensor
from effvla_ros.core.runner import CameraTokens, InferenceConfig, PolicyRunner, compressed_to_camera_tokens
from effvla_ros.core.settings import Setting
from effvla_ros.replay.observations import Episode

NOISE_STRIDE = 1_000_003


@dataclass
class StepRecord:
    """One observation under one setting."""

    index: int
    stamp: float
    encoder_s: float
    prefill_s: float
    denoise_s: float
    total_s: float
    encoder_flops: int
    encoder_flops_full: int
    prefill_flops: int
    denoise_flops: int
    tokens_total: int
    tokens_kept: int
    tokens_reused: int
    encoder_kinds: dict[str, str]
    exit_layer: int
    steps: int
    reused_expert_layers: int
    computed_expert_layers: int
    guided: bool
    rtc_delay: int


@dataclass
class SettingRun:
    setting: Setting
    actions: np.ndarray  # (N, H, A) unnormalized
    steps: list[StepRecord]
    wall_s: float
    guidance_ids: list[int] = field(default_factory=list)  # previous chunk index + 1 guiding each chunk (0 = none)


def noise_for(index: int, seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(seed) * NOISE_STRIDE + int(index))
    return torch.randn(shape, generator=g, dtype=torch.float32)


def run_setting(policy: Any, episode: Episode, setting: Setting, *, seed: int = 0, fps: float = 10.0,
                rtc_delay_steps: int = 1, count_flops: bool = True,
                progress: Callable[[int], None] | None = None, backend: Any = "eager") -> SettingRun:
    """Replay every observation of ``episode`` under ``setting`` (fresh caches), on the stage ``backend`` (a name or
    a :class:`~effvla_ros.core.backends.base.StageBackend` made once for every setting)."""
    arch = policy.arch
    comp = TokenCompressor(policy, setting.pruning, setting.reuse, backend=backend)
    inference = InferenceConfig(num_steps=setting.inference.num_steps, count_flops=count_flops)
    runner = PolicyRunner(policy, inference=inference, early_exit=setting.early_exit,
                          expert_reuse=setting.expert_reuse, rtc=setting.rtc, backend=comp.backend)
    dt = 1.0 / fps
    h = arch.chunk_size
    actions: list[np.ndarray] = []
    steps: list[StepRecord] = []
    guidance_ids: list[int] = []
    issued = ChunkHistory(maxlen=1)  # chunk_id = observation index + 1
    delay = FixedDelay(int(rtc_delay_steps))
    t_start = time.perf_counter()
    for obs in episode.observations:
        if obs.instruction != comp.instruction:
            comp.set_instruction(obs.instruction)
        runner.set_instruction(obs.instruction)
        cams: dict[str, CameraTokens] = {}
        enc_s = 0.0
        enc_f = enc_full = kept = reused = 0
        total_tokens = 0
        kinds: dict[str, str] = {}
        for cam in policy.cameras:
            fr = obs.frames.get(cam)
            if fr is None:
                cams[cam] = missing_camera()
                kinds[cam] = "missing"
                continue
            out = comp.process(cam, rgb_to_tensor(episode.image(fr)))
            cams[cam] = compressed_to_camera_tokens(out)
            enc_s += out.time_s
            enc_f += int(out.encoder_flops)
            enc_full += int(out.encoder_flops_full)
            kept += int(out.kept.numel())
            reused += int(out.reused.sum())
            total_tokens += out.grid[0] * out.grid[1]
            kinds[cam] = out.kind
        noise = noise_for(obs.index, seed, (1, h, arch.max_action_dim))
        guidance = issued.guidance(obs.stamp, dt, h, delay) if setting.rtc.enabled else None
        res = runner.infer(cams, torch.from_numpy(np.asarray(obs.state, dtype=np.float32)), noise=noise,
                           guidance=guidance)
        actions.append(res.actions.detach().cpu().double().numpy())
        guidance_ids.append(guidance.source_chunk_id if (res.guided and guidance is not None) else 0)
        issued.add(IssuedChunk(obs.index + 1, obs.stamp, res.x_final.detach().cpu(), res.state))
        steps.append(StepRecord(
            index=obs.index, stamp=obs.stamp, encoder_s=enc_s, prefill_s=float(res.times.get("prefill_s", 0.0)),
            denoise_s=float(res.times.get("denoise_s", 0.0)), total_s=enc_s + float(res.times.get("total_s", 0.0)),
            encoder_flops=enc_f, encoder_flops_full=enc_full, prefill_flops=int(res.flops.get("prefill", 0)),
            denoise_flops=int(res.flops.get("denoise", 0)), tokens_total=total_tokens, tokens_kept=kept,
            tokens_reused=reused, encoder_kinds=kinds, exit_layer=int(res.exit_layer), steps=int(res.steps),
            reused_expert_layers=int(res.reused_expert_layers), computed_expert_layers=int(res.computed_expert_layers),
            guided=bool(res.guided), rtc_delay=int(res.rtc_delay)))
        if progress is not None:
            progress(1)
    return SettingRun(setting, np.stack(actions), steps, time.perf_counter() - t_start, guidance_ids)


# ------------------------------------------------------------------------------------------ metrics
def _pct(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": math.nan, "p95": math.nan}
    a = np.asarray(values, dtype=np.float64) * 1e3
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95))}


def latency_ms(run: SettingRun) -> dict[str, dict[str, float]]:
    s = run.steps
    return {"encoder": _pct([x.encoder_s for x in s]), "prefill": _pct([x.prefill_s for x in s]),
            "denoise": _pct([x.denoise_s for x in s]), "total": _pct([x.total_s for x in s])}


def compute_stats(run: SettingRun, baseline: SettingRun | None) -> dict[str, Any]:
    s = run.steps
    n = max(len(s), 1)
    enc = sum(x.encoder_flops for x in s) / n
    pre = sum(x.prefill_flops for x in s) / n
    den = sum(x.denoise_flops for x in s) / n
    total = enc + pre + den
    out: dict[str, Any] = {
        "flops_per_step": {"encoder": enc, "encoder_full": sum(x.encoder_flops_full for x in s) / n,
                           "prefill": pre, "denoise": den, "total": total},
        "tokens": {"total_per_step": sum(x.tokens_total for x in s) / n,
                   "kept_per_step": sum(x.tokens_kept for x in s) / n,
                   "kept_fraction": (sum(x.tokens_kept for x in s) / max(sum(x.tokens_total for x in s), 1)),
                   "reused_per_step": sum(x.tokens_reused for x in s) / n,
                   "encoder_passes": _count([k for x in s for k in x.encoder_kinds.values()])},
        "exit_layers": {"mean": float(np.mean([x.exit_layer for x in s])) if s else math.nan,
                        "histogram": _count([str(x.exit_layer) for x in s])},
        "denoising_steps": {"mean": float(np.mean([x.steps for x in s])) if s else math.nan,
                            "reused_expert_layers_per_step": sum(x.reused_expert_layers for x in s) / n,
                            "computed_expert_layers_per_step": sum(x.computed_expert_layers for x in s) / n},
        "rtc": {"guided_chunks": sum(1 for x in s if x.guided)},
    }
    if baseline is not None:
        bt = compute_flops_total(baseline)
        out["flops_per_step"]["fraction_of_baseline"] = total / bt if bt else math.nan
    return out


def compute_flops_total(run: SettingRun) -> float:
    s = run.steps
    n = max(len(s), 1)
    return sum(x.encoder_flops + x.prefill_flops + x.denoise_flops for x in s) / n


def _count(items: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for i in items:
        out[i] = out.get(i, 0) + 1
    return dict(sorted(out.items()))


def deviation(a: np.ndarray, b: np.ndarray, std: np.ndarray) -> dict[str, Any]:
    """Per joint normalized RMSE (by the checkpoint's action std) and max |a - b| over (N, H) of (N, H, A)."""
    if a.size == 0 or b.size == 0:
        return {"nrmse_per_joint": [], "nrmse": math.nan, "max_abs_per_joint": [], "max_abs": math.nan, "n": 0}
    h = min(a.shape[1], b.shape[1])
    d = a[:, :h] - b[:, :h]
    rmse = np.sqrt(np.mean(d**2, axis=(0, 1)))
    nrmse = rmse / np.maximum(std, 1e-12)
    mx = np.max(np.abs(d), axis=(0, 1))
    return {"nrmse_per_joint": [float(x) for x in nrmse], "nrmse": float(np.mean(nrmse)),
            "max_abs_per_joint": [float(x) for x in mx], "max_abs": float(np.max(mx)), "n": int(a.shape[0])}


def action_std(policy: Any) -> np.ndarray:
    """Scale of each action dimension from the checkpoint's normalization stats (1 when absent)."""
    a = policy.arch.action_dim
    st = policy.normalizer.stats.get("action", {})
    if "std" in st:
        v = st["std"].detach().cpu().double().numpy().reshape(-1)[:a]
    elif "min" in st and "max" in st:
        v = ((st["max"] - st["min"]) / 2).detach().cpu().double().numpy().reshape(-1)[:a]
    else:
        v = np.ones(a)
    return np.where(np.asarray(v) > 1e-12, v, 1.0)


# ------------------------------------------------------------------------------------------ execution
def executor_config(names: list[str], params: dict[str, Any] | None = None) -> ExecutorConfig:
    """Executor config for smoothness: ``params`` (flattened chunk_executor ROS parameters, e.g. a
    target's) when given, else wide limits so that the chunks' own motion is measured. Always stream."""
    if params:
        fields = {f for f in ExecutorConfig.__dataclass_fields__}
        vals = {k: v for k, v in params.items() if k in fields}
        vals["joint_names"] = list(names)
        for k in ("position_lower", "position_upper", "velocity_limits", "acceleration_limits"):
            if k in vals and len(vals[k]) not in (1, len(names)):
                vals.pop(k)
        vals["output_mode"] = "stream"
        vals.pop("urdf_path", None)
        return ExecutorConfig(**vals)
    return ExecutorConfig(joint_names=list(names), position_lower=[-1e5], position_upper=[1e5],
                          velocity_limits=[1e5], acceleration_limits=[1e6], output_mode="stream",
                          merge_strategy="rtc", watchdog_timeout=60.0)


def _interp(actions: np.ndarray, t0: float, dt: float, t: float) -> np.ndarray:
    x = (t - t0) / dt
    x = min(max(x, 0.0), actions.shape[0] - 1.0)
    i = int(math.floor(x))
    j = min(i + 1, actions.shape[0] - 1)
    w = x - i
    return np.asarray((1 - w) * actions[i] + w * actions[j])


def execute(run: SettingRun, stamps: list[float], cfg: ExecutorConfig, fps: float, start: np.ndarray,
            std: np.ndarray, latency_s: float = 0.0) -> dict[str, Any]:
    """Run the chunks through the chunk executor core at its control rate; smoothness of the result.

    Chunk ``i`` (stamped with its observation) arrives at ``stamp + latency_s``. Returns the executed
    trajectory (``t``, ``q``) and the metrics: ``boundary_jump`` (normalized L-inf disagreement of the
    new chunk with the previous one at the switch time, before blending), ``rms_jerk`` /
    ``max_accel`` of the executed command, and the executor's counters.
    """
    core = ChunkExecutorCore(cfg)
    dt = 1.0 / fps
    acts = run.actions
    n, h, a = acts.shape
    names = list(cfg.joint_names)
    if not stamps:
        return {}
    t = stamps[0] + latency_s
    core.on_joint_state(names, [float(x) for x in start], t)
    period = cfg.control_period
    end = max(s + h * dt for s in stamps) + 2 * period
    ci = 0
    times: list[float] = []
    qs: list[np.ndarray] = []
    jumps: list[float] = []
    last_accepted: int | None = None
    verdicts: dict[str, int] = {}
    while t <= end and (ci < n or core.commanding):
        while ci < n and stamps[ci] + latency_s <= t + 1e-9:
            guide = run.guidance_ids[ci] if ci < len(run.guidance_ids) else 0
            res = core.on_chunk(t, chunk_id=ci + 1, t0=stamps[ci], dt=dt, joint_names=names, num_actions=h,
                                action_dim=a, actions=acts[ci].reshape(-1),
                                rtc_delay_steps=run.steps[ci].rtc_delay if guide else 0, rtc_prefix_chunk_id=guide)
            verdicts[res.verdict.value] = verdicts.get(res.verdict.value, 0) + 1
            if res.accepted:
                if last_accepted is not None:
                    tb = max(core.committed_until, t)
                    old = _interp(acts[last_accepted], stamps[last_accepted], dt, tb)
                    new = _interp(acts[ci], stamps[ci], dt, tb)
                    jumps.append(float(np.max(np.abs(new - old) / std[:a])))
                last_accepted = ci
            ci += 1
        cmd = core.tick(t)
        core.feedback(t)
        if cmd is not None:
            times.append(float(cmd.stamp))
            qs.append(np.asarray(cmd.positions[0], dtype=np.float64))
        t += period
    q = np.asarray(qs) if qs else np.zeros((0, a))
    out: dict[str, Any] = {"samples": int(q.shape[0]), "verdicts": dict(sorted(verdicts.items())),
                           "clamps": int(core.stats.clamps_total().sum()),
                           "boundary_jump": {"mean": float(np.mean(jumps)) if jumps else 0.0,
                                             "max": float(np.max(jumps)) if jumps else 0.0, "n": len(jumps)}}
    if q.shape[0] >= 4:
        jerk = np.diff(q, n=3, axis=0) / period**3
        acc = np.diff(q, n=2, axis=0) / period**2
        rj = np.sqrt(np.mean(jerk**2, axis=0))
        out["rms_jerk_per_joint"] = [float(x) for x in rj]
        out["rms_jerk"] = float(np.sqrt(np.mean(jerk**2)))
        out["max_accel"] = float(np.max(np.abs(acc)))
        out["max_step"] = float(np.max(np.abs(np.diff(q, axis=0))))
    else:
        out.update({"rms_jerk_per_joint": [], "rms_jerk": math.nan, "max_accel": math.nan, "max_step": math.nan})
    out["_t"] = np.asarray(times)
    out["_q"] = q
    return out
