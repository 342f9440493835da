"""``effvla replay`` without the command line: bag -> observations -> settings -> report dict.

:func:`run_replay` returns the report (the content of ``report.json``) plus the arrays behind the
plots; :mod:`effvla_ros.replay.report` writes them.
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from effvla_ros.core.observation import checkpoint_joint_names
from effvla_ros.replay.bagio import BagError, open_bag
from effvla_ros.replay.evaluate import (
    SettingRun,
    action_std,
    compute_stats,
    deviation,
    execute,
    executor_config,
    latency_ms,
    run_setting,
)
from effvla_ros.replay.observations import Episode, ObservationOptions, build_episode, state_spec_for
from effvla_ros.replay.settings import Setting, build_settings, parse_replay_sweep, target_overrides

REPORT_VERSION = 1
#: Keys whose values are wall-clock measurements (everything else in the report is deterministic).
TIMING_KEYS = ("latency_ms", "wall_s")


@dataclass
class ReplayConfig:
    bag: str
    checkpoint: str
    vlm_dir: str | None = None
    target: str | None = None
    sweep: list[str] = field(default_factory=list)
    sweep_mode: str = "one-at-a-time"
    max_steps: int = 0
    num_steps: int = 0  # denoising steps of the baseline (0 = the checkpoint's)
    seed: int = 0
    fps: float | None = None  # default: the recorded chunks' step period, else the target's/base policy fps
    rtc_delay_steps: int = 1
    latency_s: float = 0.0  # chunk arrival delay at the executor (simulated)
    flops: str = "separate"  # separate: timing pass + counting pass | inline: one counted pass | off
    device: str = "cpu"
    backend: str = "eager"  # stage backend (core/backends: eager, packed, compiled, ...), made once for every setting
    dtype: str = ""  # vision / VLM / expert dtype when the checkpoint is loaded here ("": float32; auto: native bf16)
    observations: ObservationOptions = field(default_factory=ObservationOptions)
    action_names: list[str] = field(default_factory=list)
    progress: bool = True


@dataclass
class ReplayResult:
    report: dict[str, Any]
    runs: list[SettingRun]
    episode: Episode
    executed: dict[str, tuple[np.ndarray, np.ndarray]]  # setting -> (t, q)
    action_names: list[str]


def _json_num(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def clean(obj: Any) -> Any:
    """JSON-safe copy: NaN/Inf -> None, numpy scalars/arrays -> Python, private '_' keys dropped."""
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return clean(obj.tolist())
    if isinstance(obj, np.generic):
        return clean(obj.item())
    return _json_num(obj)


def run_replay(cfg: ReplayConfig, policy: Any = None) -> ReplayResult:
    """Replay ``cfg.bag``; ``policy``: an already loaded checkpoint to reuse (else ``cfg.checkpoint`` is loaded)."""
    from effvla_ros.core.smolvla import RuntimeConfig, load_policy

    bag = open_bag(cfg.bag)
    extra: list[tuple[str, dict[str, Any]]] = []
    policy_params: dict[str, Any] = {}
    exec_params: dict[str, Any] | None = None
    if cfg.target:
        over, policy_params, exec_params = target_overrides(cfg.target)
        extra.append((f"target:{cfg.target}", over))
    sweeps = parse_replay_sweep(cfg.sweep)
    build_settings(sweeps, mode=cfg.sweep_mode, extra=extra)  # validate every setting before loading the model
    if cfg.flops not in ("separate", "inline", "off"):
        raise ValueError(f"flops: {cfg.flops!r} is not one of separate, inline, off")
    if policy is None:  # check the bag against the checkpoint's architecture before loading weights
        from effvla_ros.core.target_check import read_arch

        arch0 = read_arch(cfg.checkpoint, cfg.vlm_dir)
        cams0, state_dim0 = list(arch0.cameras), arch0.state_dim
    else:
        cams0, state_dim0 = list(policy.cameras), policy.arch.state_dim
    obs_opts = cfg.observations
    ckpt_state, ckpt_action = checkpoint_joint_names(cfg.checkpoint)
    if obs_opts.state is None and obs_opts.state_spec is None:
        obs_opts.state_spec = state_spec_for(state_dim0, obs_opts, ckpt_state, cfg.target, policy_params)
    episode = build_episode(bag, cams0, state_dim0, obs_opts)
    if policy is None:
        dt = cfg.dtype or "float32"
        policy = load_policy(cfg.checkpoint, vlm_dir=cfg.vlm_dir, runtime=RuntimeConfig(
            device=cfg.device, vision_dtype=dt, vlm_dtype=dt, expert_dtype=dt))
    arch = policy.arch
    settings = build_settings(sweeps, defaults={"num_steps": cfg.num_steps or policy.num_steps}, mode=cfg.sweep_mode,
                              extra=extra)

    fps = cfg.fps
    fps_source = "--fps"
    if fps is None:
        periods = [c.step_period_s for c in episode.chunks if c.step_period_s > 0]
        if periods:
            fps, fps_source = 1.0 / float(np.median(periods)), "recorded ActionChunk.step_period"
        else:
            fps, fps_source = float(policy_params.get("fps", 10.0)), (
                f"target {cfg.target} policy fps" if "fps" in policy_params else "default (config/base.yaml: 10 Hz)")
    if fps <= 0:
        raise ValueError("--fps: must be positive")

    names = list(cfg.action_names)
    if not names:
        rec_names = [c.joint_names for c in episode.chunks if len(c.joint_names) == arch.action_dim]
        if rec_names:
            names = list(rec_names[0])
        elif len(ckpt_action) == arch.action_dim:
            names = list(ckpt_action)
        elif policy_params.get("action_joint_names") and len(policy_params["action_joint_names"]) == arch.action_dim:
            names = list(policy_params["action_joint_names"])
        elif (obs_opts.state_spec is not None and not obs_opts.state_spec.by_position
              and len(obs_opts.state_spec.joint_names) == arch.action_dim):  # the action commands the state's joints
            names = list(obs_opts.state_spec.joint_names)
        else:
            names = [f"joint_{i}" for i in range(arch.action_dim)]
    if len(names) != arch.action_dim:
        raise ValueError(f"--action-names: {len(names)} names, the checkpoint's action has {arch.action_dim} dimensions")
    std = action_std(policy)

    n_obs = len(episode.observations)
    bar: Any = None
    if cfg.progress:
        from tqdm import tqdm

        passes = 2 if cfg.flops == "separate" else 1
        bar = tqdm(total=n_obs * len(settings) * passes, desc="replay", unit="step", leave=False)
    from effvla_ros.core.backends import make_backend

    backend = make_backend(cfg.backend, policy)  # raises naming the backend; settings it cannot run raise per setting
    runs: list[SettingRun] = []
    flops_identical: dict[str, bool] = {}
    t0 = time.perf_counter()
    try:
        for s in settings:
            if bar is not None:
                bar.set_postfix_str(s.name[:40])
            kw: dict[str, Any] = {"seed": cfg.seed, "fps": fps, "rtc_delay_steps": cfg.rtc_delay_steps,
                                  "progress": bar.update if bar is not None else None, "backend": backend}
            run = run_setting(policy, episode, s, count_flops=cfg.flops == "inline", **kw)
            if cfg.flops == "separate":  # FLOP counting slows inference down: count in a second, identical pass
                counted = run_setting(policy, episode, s, count_flops=True, **kw)
                flops_identical[s.name] = bool(np.array_equal(counted.actions, run.actions))
                for a, b in zip(run.steps, counted.steps):
                    a.prefill_flops, a.denoise_flops = b.prefill_flops, b.denoise_flops
            runs.append(run)
    finally:
        if bar is not None:
            bar.close()

    base = runs[0]
    stamps = [o.stamp for o in episode.observations]
    first_state = episode.observations[0].state
    start = (np.asarray(first_state, dtype=np.float64) if first_state.shape[0] == arch.action_dim
             else base.actions[0, 0])
    ecfg = executor_config(names, exec_params)
    rec_idx = [i for i, o in enumerate(episode.observations) if o.recorded is not None
               and o.recorded.actions.shape[1] == arch.action_dim]
    if rec_idx:  # one chunk shape (a live run does not change it; skip odd ones)
        shape0 = episode.observations[rec_idx[0]].recorded.actions.shape  # type: ignore[union-attr]
        rec_idx = [i for i in rec_idx if episode.observations[i].recorded.actions.shape == shape0]  # type: ignore[union-attr]
    rec = np.stack([episode.observations[i].recorded.actions for i in rec_idx]) if rec_idx else None  # type: ignore[union-attr]
    executed: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    setting_reports = []
    for run in runs:
        ex = execute(run, stamps, ecfg, fps, start, std, cfg.latency_s)
        executed[run.setting.name] = (ex.get("_t", np.zeros(0)), ex.get("_q", np.zeros((0, arch.action_dim))))
        entry: dict[str, Any] = {
            "name": run.setting.name,
            "baseline": run.setting.is_baseline,
            "overrides": run.setting.overrides,
            "implied": run.setting.implied,
            "config": run.setting.config_dict(),
            "latency_ms": latency_ms(run),
            **compute_stats(run, base),
            "deviation_vs_baseline": deviation(run.actions, base.actions, std),
            "deviation_vs_recorded": (deviation(run.actions[rec_idx], _pad(rec, run.actions.shape[1]), std)
                                      if rec is not None else None),
            "smoothness": ex,
            "flops_pass_identical": flops_identical.get(run.setting.name),
            "per_step": [{"index": st.index, "stamp": st.stamp, "tokens_kept": st.tokens_kept,
                          "tokens_reused": st.tokens_reused, "encoder": st.encoder_kinds, "exit_layer": st.exit_layer,
                          "flops": st.encoder_flops + st.prefill_flops + st.denoise_flops,
                          "guided": st.guided} for st in run.steps],
            "wall_s": run.wall_s,
        }
        if cfg.flops == "off":  # only the encoder's FLOPs (always counted by the compressor)
            fl = entry["flops_per_step"]
            fl.update({"prefill": None, "denoise": None, "total": None, "fraction_of_baseline": None})
        setting_reports.append(entry)

    topics = {t: {"type": i.msgtype, "count": i.count} for t, i in sorted(bag.topics.items())}
    recorded: dict[str, Any] | None = None
    if episode.chunks:
        recorded = {"chunks": len(episode.chunks),
                    "inference_latency_ms": {"p50": float(np.percentile([c.latency_ms for c in episode.chunks], 50)),
                                             "p95": float(np.percentile([c.latency_ms for c in episode.chunks], 95))},
                    "exit_layers_mean": float(np.mean([np.mean(c.exit_layers) for c in episode.chunks
                                                       if c.exit_layers])) if any(c.exit_layers for c in episode.chunks)
                    else None,
                    "denoising_steps_mean": float(np.mean([c.denoising_steps for c in episode.chunks]))}
    report = {
        "version": REPORT_VERSION,
        "timing_keys": list(TIMING_KEYS),
        "bag": {"path": str(Path(cfg.bag)), "storage": bag.storage, "recovered": bag.recovered,
                "has_metadata": bag.has_metadata, "notes": bag.notes, "messages": bag.message_count,
                "topics": topics},
        "checkpoint": {"path": str(cfg.checkpoint), "cameras": list(policy.cameras), "chunk_size": arch.chunk_size,
                       "action_dim": arch.action_dim, "state_dim": arch.state_dim, "num_steps": policy.num_steps,
                       "action_std": [float(x) for x in std], "action_names": names},
        "warnings": ([f"recovered from an interrupted recording: {n}" for n in bag.notes] if bag.recovered else [])
                    + list(episode.stats.get("warnings", [])),
        "episode": {"camera_topics": episode.camera_topics, "missing_cameras": episode.missing_cameras,
                    "state_topic": episode.state_topic, "instruction_topic": episode.instruction_topic,
                    "action_chunk_topic": episode.chunk_topic, "instructions": episode.instructions,
                    **episode.stats},
        "replay": {"seed": cfg.seed, "fps": fps, "fps_source": fps_source, "rtc_delay_steps": cfg.rtc_delay_steps,
                   "executor": {"control_rate": ecfg.control_rate, "merge_strategy": ecfg.merge_strategy,
                                "limits": "target chunk_executor parameters" if exec_params else "wide (none)",
                                "chunk_latency_s": cfg.latency_s},
                   "sweep": list(cfg.sweep), "sweep_mode": cfg.sweep_mode, "target": cfg.target,
                   "flops": cfg.flops, "device": cfg.device, "backend": cfg.backend,
                   "dtypes": dict(zip(("vision", "vlm", "expert"), policy.runtime.resolved_dtypes()))},
        "recorded": recorded,
        "settings": setting_reports,
        "wall_s": time.perf_counter() - t0,
    }
    return ReplayResult(clean(report), runs, episode, executed, names)


def _pad(rec: np.ndarray | None, h: int) -> np.ndarray:
    assert rec is not None
    return rec[:, :h]


def strip_timings(report: Any) -> Any:
    """The report without wall-clock entries (for determinism checks)."""
    if isinstance(report, dict):
        return {k: strip_timings(v) for k, v in report.items() if k not in TIMING_KEYS}
    if isinstance(report, list):
        return [strip_timings(v) for v in report]
    return report


def settings_preview(sweep: Sequence[str], num_steps: int, mode: str = "one-at-a-time") -> list[Setting]:
    """The settings a sweep expands to (validation without a bag)."""
    return build_settings(parse_replay_sweep(sweep), defaults={"num_steps": num_steps}, mode=mode)


__all__ = ["BagError", "ReplayConfig", "ReplayResult", "run_replay", "strip_timings", "TIMING_KEYS"]
