"""Closed-loop success rate of a checkpoint in :class:`~effvla_ros.sim.env.TwoCubePickPlaceEnv` (ROS-free).

Every episode runs the same core path as the ROS graph: each camera image goes through a
:class:`~effvla_ros.core.compression.compressor.TokenCompressor` (temporal reuse + pruning), its
output is fed to a :class:`~effvla_ros.core.runner.PolicyRunner` (early exit, expert reuse, denoising
steps, RTC), and the chunk's joint targets are executed at 10 Hz (``set_joint_targets`` +
``control_dt / physics_dt`` physics steps per action, as the demonstrations were recorded).

Timeline (control step ``k``, execution horizon ``E``, emulated inference delay ``D``):

* an inference observes the scene at step ``k`` (images + joint positions, simulation paused while
  the policy runs) and its chunk row ``i`` is meant for step ``k + i``;
* with ``D = 0`` the new chunk is executed from its row 0; with ``D > 0`` the previous chunk keeps
  executing for ``D`` more steps (rows ``D..``) and the new chunk takes over at step ``k + D`` from its
  row ``D`` - what a real robot does while the policy computes. With RTC enabled the new chunk is
  guided toward the previous chunk's ``x_final`` aligned to step ``k`` (``align_previous_chunk``) with
  delay ``D``. The first inference of an episode has no previous chunk: it is executed from row 0;
* the next inference observes at step ``k + E``; ``E + D`` must not exceed the chunk size.

An episode ends on success (latched by the environment) or after ``max_steps`` control steps. The
noise of every inference comes from a generator seeded by the episode seed, so every setting sees the
same episodes and the same noise sequence (until their actions differ).

A *setting* is a set of ``section.field=value`` changes on top of the baseline (every optimization
off): sections ``pruning`` (PruningConfig), ``reuse`` (ReuseConfig), ``early_exit``
(EarlyExitConfig), ``expert_reuse`` (ExpertReuseConfig), ``rtc`` (RTCConfig), ``inference``
(InferenceConfig; ``num_steps`` alone is accepted too) and ``exec`` (``horizon``, ``delay_steps``).
Changing a field of a switched-off section switches it on (``pruning.keep_ratio=0.5`` implies
``pruning.method=task``; ``reuse.threshold=0.05`` implies ``reuse.enabled=true``), unless the switch
itself is part of the setting.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from effvla_ros.core.compression.compressor import ReuseConfig, TokenCompressor
from effvla_ros.core.compression.pruning import PruningConfig
from effvla_ros.core.early_exit import EarlyExitConfig, ExpertReuseConfig
from effvla_ros.core.rtc import GuidanceTarget, RTCConfig, align_previous_chunk
from effvla_ros.core.runner import InferenceConfig, InferenceResult, PolicyRunner, compressed_to_camera_tokens
from effvla_ros.core.smolvla.policy import SmolVLAPolicy

SECTIONS: dict[str, type] = {
    "pruning": PruningConfig, "reuse": ReuseConfig, "early_exit": EarlyExitConfig,
    "expert_reuse": ExpertReuseConfig, "rtc": RTCConfig, "inference": InferenceConfig,
}
ALIASES = {"num_steps": "inference.num_steps", "count_flops": "inference.count_flops",
           "horizon": "exec.horizon", "delay_steps": "exec.delay_steps"}
BASELINE: dict[str, Any] = {
    "pruning.method": "none", "reuse.enabled": False, "early_exit.enabled": False,
    "expert_reuse.enabled": False, "rtc.enabled": False,
}
# changing another field of a section switches the section on unless its switch is given too
SWITCH_ON: dict[str, tuple[str, Any]] = {
    "pruning": ("method", "task"), "reuse": ("enabled", True), "early_exit": ("enabled", True),
    "expert_reuse": ("enabled", True), "rtc": ("enabled", True),
}


@dataclass
class EvalSetting:
    """One evaluated configuration: ``changes`` on top of :data:`BASELINE` (and the run's defaults)."""

    name: str
    changes: dict[str, Any] = field(default_factory=dict)
    num_steps: int = 0  # 0: the checkpoint's
    horizon: int = 0  # executed actions per chunk; 0: the checkpoint's n_action_steps
    delay_steps: int = 0
    count_flops: bool = False

    def effective_changes(self) -> dict[str, Any]:
        """Baseline + changes; a section whose fields are changed without its switch is switched on
        (``pruning.keep_ratio=0.5`` implies ``pruning.method=task``, ``rtc.guidance=vjp`` ``rtc.enabled=true``)."""
        out = {**BASELINE, **self.changes}
        for sec, (switch, on) in SWITCH_ON.items():
            touched = [k for k in self.changes if k.startswith(sec + ".") and k != f"{sec}.{switch}"]
            if touched and f"{sec}.{switch}" not in self.changes:
                out[f"{sec}.{switch}"] = on
        return out

    def configs(self) -> dict[str, Any]:
        """The core configs of this setting (baseline + changes), validated."""
        values: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
        for key, v in self.effective_changes().items():
            sec, name = key.split(".", 1)
            if sec == "exec":
                continue
            values[sec][name] = v
        if self.num_steps:
            values["inference"].setdefault("num_steps", self.num_steps)
        values["inference"].setdefault("count_flops", self.count_flops)
        return {s: SECTIONS[s]().replace(**values[s]) for s in SECTIONS}

    def exec_params(self) -> tuple[int, int]:
        h = int(self.changes.get("exec.horizon", self.horizon))
        d = int(self.changes.get("exec.delay_steps", self.delay_steps))
        return h, d


def parse_value(key: str, text: str) -> Any:
    """A command-line value for ``key`` (``section.field``), typed like the field's default."""
    sec, name = key.split(".", 1)
    if sec == "exec":
        return int(text)
    cls = SECTIONS[sec]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if name not in fields:
        raise ValueError(f"{key}: unknown parameter of {cls.__name__}")
    default = getattr(cls(), name)
    t = text.strip()
    if isinstance(default, bool):
        if t.lower() not in ("true", "false", "1", "0", "on", "off", "yes", "no"):
            raise ValueError(f"{key}: {text!r} is not a boolean")
        return t.lower() in ("true", "1", "on", "yes")
    if isinstance(default, int):
        return int(t)
    if isinstance(default, float):
        return float(t)
    if isinstance(default, list):
        return [type(default[0])(x) if default else float(x) for x in t.split(";") if x]
    return t


def normalize_key(key: str) -> str:
    key = ALIASES.get(key.strip(), key.strip())
    sec = key.split(".", 1)[0]
    if "." not in key or (sec not in SECTIONS and sec != "exec"):
        raise ValueError(f"{key}: expected section.field with section one of {sorted(SECTIONS) + ['exec']}")
    return key


def parse_sweep(specs: Sequence[str], *, base: EvalSetting | None = None) -> list[EvalSetting]:
    """``["pruning.keep_ratio=0.5,0.25", "rtc.enabled=true"]`` -> baseline + one setting per value.

    Each spec varies one parameter on top of the baseline (one factor at a time); join several
    parameters of one setting with ``+``: ``"pruning.method=task+pruning.keep_ratio=0.5"`` (one value each).
    """
    base = base or EvalSetting("baseline")
    out = [base]
    for spec in specs:
        if "+" in spec:
            changes: dict[str, Any] = {}
            for part in spec.split("+"):
                k, _, v = part.partition("=")
                key = normalize_key(k)
                changes[key] = parse_value(key, v)
            out.append(dataclasses.replace(base, name=spec, changes={**base.changes, **changes}))
            continue
        k, sep, vals = spec.partition("=")
        if not sep or not vals:
            raise ValueError(f"--sweep {spec!r}: expected name=v1,v2,...")
        key = normalize_key(k)
        for v in vals.split(","):
            value = parse_value(key, v)
            out.append(dataclasses.replace(base, name=f"{key}={v.strip()}", changes={**base.changes, key: value}))
    for s in out:
        s.configs()  # validate early
    return out


# ----------------------------------------------------------------------------------------- episodes
@dataclass
class EpisodeResult:
    seed: int
    instruction: str
    success: bool
    steps: int
    inferences: int
    arm_motion: float  # max |q - q0| over the episode (rad), 5 arm joints
    per_inference: dict[str, float]  # means over the episode's inferences
    outcome: str = ""  # :data:`OUTCOMES` (see :func:`classify_outcome`)
    grasp_dist_target_cm: float = math.nan  # at the first commanded close: jaw point to the instructed cube (xy)
    grasp_dist_other_cm: float = math.nan  # ... and to the other cube
    target_lift_cm: float = math.nan  # highest rise of the instructed cube above its start
    closes: int = 0  # times the commanded gripper went from open to closed (2+: the policy grasped again)


OUTCOMES: tuple[str, ...] = ("success", "no_grasp", "wrong_cube", "missed", "not_lifted", "not_placed")
NEAR_CM = 3.0  # a grasp closer than this (xy) to a cube is "at" that cube
LIFT_CM = 2.0  # the instructed cube counts as lifted above this rise


def classify_outcome(success: bool, dist_target_cm: float, dist_other_cm: float, lift_cm: float) -> str:
    """How an episode ended, from where the gripper first closed and how high the instructed cube rose.

    ``success``; ``no_grasp``: the gripper command never closed; ``wrong_cube``: it first closed within
    :data:`NEAR_CM` of the other cube, nearer to it than to the instructed one; ``missed``: it first closed
    :data:`NEAR_CM` or more from both cubes; ``not_lifted``: it first closed at the instructed cube, which
    never rose :data:`LIFT_CM`; ``not_placed``: the instructed cube was lifted but not placed as instructed.
    """
    if success:
        return "success"
    if lift_cm >= LIFT_CM:
        return "not_placed"
    if math.isnan(dist_target_cm):
        return "no_grasp"
    if dist_other_cm < NEAR_CM and dist_other_cm < dist_target_cm:
        return "wrong_cube"
    if dist_target_cm >= NEAR_CM:
        return "missed"
    return "not_lifted"


def _image(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float() / 255.0


def run_episode(policy: SmolVLAPolicy, env: Any, seed: int, setting: EvalSetting, *, max_steps: int = 150) -> EpisodeResult:
    """One closed-loop episode of ``env`` (reset to ``seed``) under ``setting``."""
    cfg = setting.configs()
    arch = policy.arch
    h_chunk = arch.chunk_size
    horizon, delay = setting.exec_params()
    horizon = horizon or arch.n_action_steps
    if horizon < 1 or horizon + delay > h_chunk:
        raise ValueError(f"execution horizon {horizon} + delay {delay} must be in 1..chunk_size ({h_chunk})")
    env.reset(seed=seed)
    compressor = TokenCompressor(policy, cfg["pruning"], cfg["reuse"])
    runner = PolicyRunner(policy, inference=cfg["inference"], early_exit=cfg["early_exit"],
                          expert_reuse=cfg["expert_reuse"], rtc=cfg["rtc"])
    instruction = env.instruction
    compressor.set_instruction(instruction)
    runner.set_instruction(instruction)
    gen = torch.Generator().manual_seed(int(seed))
    n_phys = max(1, int(round(env.control_dt / env.physics_dt)))
    dt = env.control_dt
    q0 = env.joint_positions()
    motion = 0.0
    cur: InferenceResult | None = None  # the executing chunk (x_final and state: the next RTC target)
    cur_start = 0  # step at which cur's row 0 applies
    pending: tuple[int, InferenceResult] | None = None  # a chunk waiting out the emulated delay
    next_obs = 0
    stats: dict[str, list[float]] = {}

    def add(k: str, v: float) -> None:
        stats.setdefault(k, []).append(float(v))

    steps = 0
    grip_mid = float(np.mean(env.ctrl_range[-1]))  # commanded jaw angle below this = closing
    target, other = env.task.target_cube, 1 - env.task.target_cube
    z0 = float(env.cube_positions()[target][2])
    lift = 0.0
    grasp: tuple[float, float] | None = None
    closes, was_closed = 0, False
    for k in range(max_steps):
        if k == next_obs:
            images = env.render_all()
            state = torch.as_tensor(env.joint_positions(), dtype=torch.float32)
            cams = {}
            enc_flops = enc_full = kept = reused = 0
            enc_time = 0.0
            for cam in arch.cameras:
                out = compressor.process(cam, _image(images[cam]))
                cams[cam] = compressed_to_camera_tokens(out)
                enc_flops += out.encoder_flops
                enc_full += out.encoder_flops_full
                kept += int(out.kept.numel())
                reused += int(out.reused.sum())
                enc_time += out.time_s
            guidance = None
            if cur is not None and cfg["rtc"].enabled:
                aligned, valid = align_previous_chunk(cur.x_final, cur_start * dt, k * dt, dt, h_chunk)
                guidance = GuidanceTarget(aligned, valid, delay, ref_state=cur.state)
            res = runner.infer(cams, state, guidance=guidance, generator=gen)
            add("encoder_flops", enc_flops)
            add("encoder_flops_full", enc_full)
            add("encoder_s", enc_time)
            add("kept_tokens", kept)
            add("reused_tokens", reused)
            add("total_tokens", arch.tokens_per_camera * len(arch.cameras))
            add("prefill_s", res.times.get("prefill_s", math.nan))
            add("denoise_s", res.times.get("denoise_s", math.nan))
            add("policy_s", res.times.get("total_s", math.nan))
            add("exit_layer", res.exit_layer)
            add("expert_reused_layers", res.reused_expert_layers)
            add("expert_computed_layers", res.computed_expert_layers)
            add("guided", float(res.guided))
            if res.flops:
                add("prefill_flops", res.flops.get("prefill", 0))
                add("denoise_flops", res.flops.get("denoise", 0))
            if cur is None or delay == 0:
                cur, cur_start = res, k
            else:
                pending = (k, res)
            next_obs = k + horizon
        if pending is not None and k >= pending[0] + delay:
            cur_start, cur = pending
            pending = None
        assert cur is not None
        action = cur.actions[min(k - cur_start, h_chunk - 1)].detach().cpu()
        env.set_joint_targets(action.numpy().astype(np.float64))
        closed = float(action[-1]) < grip_mid
        closes += closed and not was_closed
        was_closed = closed
        if grasp is None and closed:
            jaw, cubes = np.asarray(env.ik_point_pos)[:2], env.cube_positions()[:, :2]
            grasp = (100 * float(np.linalg.norm(jaw - cubes[target])), 100 * float(np.linalg.norm(jaw - cubes[other])))
        env.step_physics(n_phys)
        steps = k + 1
        motion = max(motion, float(np.max(np.abs(env.joint_positions()[:5] - q0[:5]))))
        lift = max(lift, 100 * (float(env.cube_positions()[target][2]) - z0))
        if env.success:
            break
    per = {k: float(np.mean(v)) for k, v in stats.items()}
    dt_cm, do_cm = grasp if grasp is not None else (math.nan, math.nan)
    outcome = classify_outcome(bool(env.success), dt_cm, do_cm, lift)
    return EpisodeResult(int(seed), instruction, bool(env.success), steps, len(stats.get("policy_s", [])), motion, per,
                         outcome, dt_cm, do_cm, lift, int(closes))


# ----------------------------------------------------------------------------------------- evaluation
def summarize(setting: EvalSetting, results: Sequence[EpisodeResult], *, default_horizon: int = 0) -> dict[str, Any]:
    n = len(results)
    succ = [r for r in results if r.success]
    per: dict[str, float] = {}
    keys = sorted({k for r in results for k in r.per_inference})
    for k in keys:
        vals = [r.per_inference[k] for r in results if k in r.per_inference]
        per[k] = float(np.mean(vals)) if vals else math.nan
    h, d = setting.exec_params()
    return {
        "name": setting.name,
        "changes": setting.effective_changes(),
        "horizon": h or default_horizon, "delay_steps": d,
        "episodes": n,
        "successes": len(succ),
        "success_rate": len(succ) / n if n else math.nan,
        "mean_length": float(np.mean([r.steps for r in results])) if n else math.nan,
        "mean_length_success": float(np.mean([r.steps for r in succ])) if succ else math.nan,
        "inferences_per_episode": float(np.mean([r.inferences for r in results])) if n else math.nan,
        "per_inference": per,
        "outcomes": {o: sum(r.outcome == o for r in results) for o in OUTCOMES},
        # episodes whose gripper closed more than once (a second grasp), and how many of them succeeded
        "regrasp_episodes": sum(r.closes >= 2 for r in results),
        "regrasp_successes": sum(r.closes >= 2 and r.success for r in results),
        "episode_results": [dataclasses.asdict(r) for r in results],
    }


def evaluate(policy: SmolVLAPolicy, settings: Sequence[EvalSetting], seeds: Sequence[int], *,
             max_steps: int = 150, image_size: int | None = None, mesh_faces: int | None = None,
             progress: Callable[[str, int, int, EpisodeResult], None] | None = None) -> dict[str, Any]:
    """Run every setting on the same ``seeds``; returns the report (settings in order)."""
    from effvla_ros.sim.env import SimConfig, TwoCubePickPlaceEnv

    size = image_size or int(policy.arch.camera_shape[-1])
    sim_kw: dict[str, Any] = {"image_size": size, "cameras": list(policy.arch.cameras)}
    if mesh_faces is not None:
        sim_kw["mesh_faces"] = mesh_faces
    env = TwoCubePickPlaceEnv(SimConfig(**sim_kw), seed=int(seeds[0]) if seeds else 0)
    report: dict[str, Any] = {"seeds": list(map(int, seeds)), "max_steps": max_steps, "image_size": size,
                              "settings": []}
    t0 = time.perf_counter()
    try:
        for s in settings:
            results = []
            for i, seed in enumerate(seeds):
                r = run_episode(policy, env, int(seed), s, max_steps=max_steps)
                results.append(r)
                if progress is not None:
                    progress(s.name, i, len(seeds), r)
            report["settings"].append(summarize(s, results, default_horizon=policy.arch.n_action_steps))
    finally:
        env.close()
    report["wall_s"] = time.perf_counter() - t0
    return report


_WORKER: dict[str, Any] = {}


def _worker_init(checkpoint: str, sim_kw: dict[str, Any], threads: int, max_steps: int) -> None:
    import os

    os.environ.setdefault("MUJOCO_GL", "egl")
    from effvla_ros.core.smolvla import load_policy
    from effvla_ros.sim.env import SimConfig, TwoCubePickPlaceEnv

    torch.set_num_threads(max(1, threads))
    _WORKER.update(policy=load_policy(checkpoint), env=TwoCubePickPlaceEnv(SimConfig(**sim_kw)), max_steps=max_steps)


def _worker_job(job: tuple[int, EvalSetting, int]) -> tuple[int, EpisodeResult]:
    si, setting, seed = job
    w = _WORKER
    return si, run_episode(w["policy"], w["env"], seed, setting, max_steps=w["max_steps"])


def evaluate_parallel(checkpoint: str, settings: Sequence[EvalSetting], seeds: Sequence[int], *, workers: int,
                      max_steps: int = 150, threads: int = 1,
                      progress: Callable[[str, int, int, EpisodeResult], None] | None = None) -> dict[str, Any]:
    """:func:`evaluate` in ``workers`` processes (each loads ``checkpoint``); same report, same episodes."""
    import multiprocessing

    from effvla_ros.core.smolvla import load_policy

    arch = load_policy(checkpoint).arch
    size = int(arch.camera_shape[-1])
    sim_kw = {"image_size": size, "cameras": list(arch.cameras)}
    jobs = [(si, s, int(seed)) for si, s in enumerate(settings) for seed in seeds]
    results: dict[int, dict[int, EpisodeResult]] = {si: {} for si in range(len(settings))}
    t0 = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_worker_init, initargs=(str(checkpoint), sim_kw, threads, max_steps)) as pool:
        for si, r in pool.imap_unordered(_worker_job, jobs):
            results[si][r.seed] = r
            if progress is not None:
                progress(settings[si].name, len(results[si]) - 1, len(seeds), r)
    report: dict[str, Any] = {"seeds": list(map(int, seeds)), "max_steps": max_steps, "image_size": size,
                              "workers": workers, "settings": []}
    for si, s in enumerate(settings):
        report["settings"].append(summarize(s, [results[si][int(seed)] for seed in seeds],
                                            default_horizon=arch.n_action_steps))
    report["wall_s"] = time.perf_counter() - t0
    return report


def format_table(report: dict[str, Any]) -> str:
    """A fixed-width table: one row per setting."""
    cols = ["setting", "success", "len", "len_ok", "kept/tot", "reused", "enc MFLOP", "enc ms", "prefill ms",
            "denoise ms", "exit", "exp.reuse", "failures: wrong/missed/no-lift/no-place/no-grasp",
            "re-grasp: ok/tried"]
    rows = []
    for s in report["settings"]:
        p = s["per_inference"]
        enc = p.get("encoder_flops", math.nan) / 1e6
        rows.append([
            s["name"], f"{s['successes']}/{s['episodes']} ({s['success_rate']:.0%})", f"{s['mean_length']:.1f}",
            f"{s['mean_length_success']:.1f}",
            f"{p.get('kept_tokens', math.nan):.1f}/{p.get('total_tokens', math.nan):.0f}",
            f"{p.get('reused_tokens', math.nan):.1f}", f"{enc:.2f}", f"{1e3 * p.get('encoder_s', math.nan):.1f}",
            f"{1e3 * p.get('prefill_s', math.nan):.1f}", f"{1e3 * p.get('denoise_s', math.nan):.1f}",
            f"{p.get('exit_layer', math.nan):.2f}", f"{p.get('expert_reused_layers', math.nan):.1f}",
            "/".join(str(s.get("outcomes", {}).get(o, "-"))
                     for o in ("wrong_cube", "missed", "not_lifted", "not_placed", "no_grasp")),
            f"{s.get('regrasp_successes', '-')}/{s.get('regrasp_episodes', '-')}",
        ])
        if "prefill_flops" in p:
            rows[-1][8] += f" ({p['prefill_flops'] / 1e6:.1f}MF)"
            rows[-1][9] += f" ({p['denoise_flops'] / 1e6:.1f}MF)"
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    line = "  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))
    out = [line, "-" * len(line)]
    out += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def write_report(report: dict[str, Any], path: str) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=1, default=float)
