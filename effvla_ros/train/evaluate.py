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
  guided toward the executing chunk's ``x_final`` aligned to step ``k`` with delay ``D``
  (:func:`~effvla_ros.core.chunking.guidance_toward` with a :class:`~effvla_ros.core.chunking.FixedDelay`). The first inference of an episode has no previous chunk: it is executed from row 0;
* at each switch the report records the step between the two chunks' arm commands (``switch_jump``, rad: the
  discontinuity the chunk executor would otherwise blend or limit);
* the next inference observes at step ``k + max(E, D)``: one inference at a time, so with ``D >= E`` the next
  one starts when the chunk arrives (back to back, as the policy node runs then) and each chunk executes rows
  ``D .. 2D - 1``; where that passes the chunk's end, its last action is held (``held_steps``), as the chunk
  executor holds the last point of a chunk that ran out.

With ``correction.enabled`` (A2C2, :mod:`effvla_ros.core.correction`) the action of every control step is the
executing chunk's row plus the residual of the checkpoint's correction head, computed at that step from the
measured joint positions, the chunk's observation state, the row (steps since the chunk's observation) and, for a
head with camera input, the frames rendered at that step through the policy's own vision encoder (with
``exec.correction_tokens`` compressor: the token compressor runs on every frame, as in the graph, and its tokens
before pruning are used, as the chunk_corrector's ``visual_source: compressor`` does). With
``exec.correction_lag`` L the joints and frames are those of L steps before (never older than the chunk's own
observation; a head trained with ``max_lag`` is told the lag): the graph's ``chunk_corrector`` corrects a row from
the frames of the step before it (that step's row is committed by then; the chunk executor measures the age).

An episode ends on success (latched by the environment) or after ``max_steps`` control steps. The
noise of every inference comes from a generator seeded by the episode seed, so every setting sees the
same episodes and the same noise sequence (until their actions differ).

A *setting* is a set of ``group.field=value`` changes on top of the baseline (every optimization
off), in the ``--sweep`` grammar shared with ``effvla replay`` (:mod:`effvla_ros.core.settings`: groups
``pruning``, ``reuse``, ``early_exit``, ``expert_reuse``, ``rtc``, ``inference`` and ``exec``
(``horizon``, ``delay_steps``); list items ``:``-separated; ``+`` joins changes of one setting). Changing a
field of a switched-off group switches it on (``pruning.keep_ratio=0.5`` implies ``pruning.method=task``),
unless the switch itself is part of the setting.

Under a latency budget (:class:`EvalBudget`: a :class:`~effvla_ros.core.budget.BudgetTable` of ``effvla
calibrate-budget`` and a budget in ms) every inference of an episode first lets a fresh
:class:`~effvla_ros.core.budget.BudgetController` choose a table entry, applies it on top of the setting's own
configs as the policy node does (:func:`~effvla_ros.core.budget.apply_overrides` with ``from_baseline``: the groups
``pruning``, ``reuse``, ``early_exit``, ``expert_reuse``, ``inference`` switched off, then the entry's overrides;
RTC and the execution settings stay the setting's), and reports the measured latency (encoder + prefill +
denoising) back to the controller; the encoder's FLOPs are then not counted on every call (the first full pass is,
later passes analytically), so that its time is the node's. The report then has, per setting, the fraction of
inferences within the budget, the p95 measured latency and how often each entry was chosen.
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

from effvla_ros.core.backends.base import StageBackend, make_backend
from effvla_ros.core.budget import BudgetController, BudgetTable, apply_overrides, check_runnable, configure_changed
from effvla_ros.core.chunking import FixedDelay, IssuedChunk, guidance_toward
from effvla_ros.core.compression.compressor import TokenCompressor
from effvla_ros.core.correction import encode_frames, load_corrector
from effvla_ros.core.observation import rgb_to_tensor
from effvla_ros.core.runner import InferenceResult, PolicyRunner, compressed_to_camera_tokens
from effvla_ros.core.settings import BASELINE_OFF, Setting, build_settings, parse_sweep
from effvla_ros.core.smolvla.policy import SmolVLAPolicy

#: The baseline's switches (every optimization off); see :mod:`effvla_ros.core.settings`.
BASELINE = BASELINE_OFF
#: The one setting type of eval-sim and replay (its former name here).
EvalSetting = Setting


def eval_settings(items: Sequence[str], *, num_steps: int = 0, horizon: int = 0, delay_steps: int = 0,
                  count_flops: bool = False, mode: str = "one-at-a-time") -> list[Setting]:
    """The baseline + the settings of the ``--sweep`` ``items`` (grammar: :mod:`effvla_ros.core.settings`,
    e.g. ``["pruning.keep_ratio=0.5,0.25", "rtc.enabled=true+delay_steps=2"]``), on the run's defaults:
    ``num_steps`` (0: InferenceConfig's default), ``horizon`` (0: the checkpoint's n_action_steps),
    ``delay_steps``, ``count_flops``. Every setting is validated here."""
    defaults: dict[str, Any] = {"inference.count_flops": count_flops, "exec.horizon": horizon,
                                "exec.delay_steps": delay_steps}
    if num_steps:
        defaults["inference.num_steps"] = num_steps
    return build_settings(parse_sweep(items), defaults=defaults, mode=mode)


# ----------------------------------------------------------------------------------------- latency budget
@dataclass(frozen=True)
class EvalBudget:
    """The latency-budget mode of an evaluation: ``table`` (``effvla calibrate-budget``), ``budget_ms`` per inference
    (encoder + prefill + denoising), the controller's ``window``; ``table_path`` only for the report. Picklable (sent
    to :func:`evaluate_parallel`'s workers)."""

    table: BudgetTable
    budget_ms: float
    window: int = 20
    table_path: str = ""
    margin: float = 0.0

    def __post_init__(self) -> None:
        if not (self.budget_ms > 0 and math.isfinite(self.budget_ms)):
            raise ValueError(f"latency budget: {self.budget_ms!r} ms must be a positive number")
        if self.window < 1:
            raise ValueError(f"latency budget window: {self.window!r} must be at least 1")
        if not 0.0 <= self.margin < 1.0:
            raise ValueError(f"latency budget margin: {self.margin!r} must be in [0, 1)")

    def controller(self) -> BudgetController:
        return BudgetController(self.table, self.budget_ms, window=self.window, margin=self.margin)

    def describe(self) -> dict[str, Any]:
        """The report's ``latency_budget``."""
        return {"budget_ms": self.budget_ms, "table": self.table_path, "window": self.window, "margin": self.margin,
                "entries": {e.name: {"overrides": e.overrides, "latency_ms": e.latency_ms, "deviation": e.deviation}
                            for e in self.table.entries}}


def _check_budget(budget: EvalBudget, cfg: dict[str, Any], backend: StageBackend, setting: str) -> None:
    """Every entry of the table applies to ``cfg`` on ``backend`` (ValueError naming the entry otherwise)."""
    try:
        check_runnable(budget.table, cfg, backend.caps)
    except ValueError as err:
        raise ValueError(f"latency budget table {budget.table_path or ''}: {err} (with {setting})") from None


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
    held_steps: int = 0  # control steps past the executing chunk's last action (its last point held)
    # latency budget only (empty without): the measured latency of each inference (encoder + prefill + denoising,
    # ms) and how often each table entry was chosen
    budget_latency_ms: list[float] = field(default_factory=list)
    budget_choices: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The report's episode: without the budget fields when the episode ran without a budget."""
        d = dataclasses.asdict(self)
        if not self.budget_choices:
            d.pop("budget_latency_ms")
            d.pop("budget_choices")
        return d


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


@dataclass(frozen=True)
class StepView:
    """What :func:`run_episode` hands its ``on_step`` callback at each control step, before the action is applied
    (the simulation is at the step's state): the executing chunk (H, A) raw, the step its row 0 is meant for (= its
    observation's), the action about to be applied (A,) (corrected when the correction runs) and the head's visual
    input of this step's frames (camera -> (N, D); None without a visual correction)."""

    step: int
    chunk: torch.Tensor
    chunk_start: int
    action: torch.Tensor
    visual: dict[str, torch.Tensor] | None


def run_episode(policy: SmolVLAPolicy, env: Any, seed: int, setting: Setting, *, max_steps: int = 150,
                backend: StageBackend | str = "eager", budget: EvalBudget | None = None,
                on_step: Callable[[StepView], None] | None = None) -> EpisodeResult:
    """One closed-loop episode of ``env`` (reset to ``seed``) under ``setting``, on the stage ``backend``; with a
    ``budget``, each inference runs the table entry its controller (fresh for the episode) chooses. ``on_step`` is
    called at every control step before its action is applied (:class:`StepView`; on-policy data collection)."""
    cfg = setting.configs()
    arch = policy.arch
    h_chunk = arch.chunk_size
    horizon, delay = setting.exec_params()
    lag = setting.execution.correction_lag
    horizon = horizon or arch.n_action_steps
    if not 1 <= horizon <= h_chunk:
        raise ValueError(f"execution horizon {horizon} must be in 1..chunk_size ({h_chunk})")
    # one inference at a time: the next observation comes E steps after this one, or when this one's chunk
    # arrives if that is later (a delay of E steps or more: back to back, what the policy node does then)
    period = max(horizon, delay)
    env.reset(seed=seed)
    # under a budget the encoder's FLOPs are not counted per call (FlopCounterMode's dispatch is several times a small
    # encode): its measured latency is then the policy node's (count_flops off there too); the first full pass is
    # counted, later ones accounted analytically
    compressor = TokenCompressor(policy, cfg["pruning"], cfg["reuse"], count_flops=budget is None, backend=backend)
    runner = PolicyRunner(policy, inference=cfg["inference"], early_exit=cfg["early_exit"],
                          expert_reuse=cfg["expert_reuse"], rtc=cfg["rtc"], backend=compressor.backend)
    corrector = None
    if cfg["correction"].enabled:  # A2C2: a residual per control step from the measured joints and newest frames
        if policy.source is None:
            raise ValueError(f"{setting.name}: correction.enabled needs a policy loaded from a checkpoint directory")
        corrector = load_corrector(policy.source, cfg["correction"])
        corrector.check(h_chunk, int(arch.action_dim), list(arch.cameras))
    # the head reads the compressor's tokens (before pruning) of every frame, as the chunk_corrector's
    # visual_source compressor does, instead of a fresh encode
    compressor_tokens = (corrector is not None and corrector.needs_visual
                         and setting.execution.correction_tokens == "compressor")
    controller = None
    if budget is not None:
        _check_budget(budget, cfg, compressor.backend, setting.name)
        controller = budget.controller()
    budget_ms: list[float] = []
    choices: dict[str, int] = {}
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
    obs_step = -1
    images: dict[str, Any] = {}
    all_tokens: dict[str, Any] = {}  # the compressor's tokens before pruning of the last observation
    seen: dict[int, tuple[Any, Any]] = {}  # step -> (joint positions, encoded frames) the correction may use
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
    held = 0
    jumps: list[float] = []

    def switch_jump(k: int, start: int, new: InferenceResult) -> None:
        """The step in the commanded arm joints where ``new`` (row 0 at step ``start``) takes over at step ``k``."""
        if cur is not None:
            a_old = cur.actions[min(k - cur_start, h_chunk - 1), :5]
            a_new = new.actions[min(k - start, h_chunk - 1), :5]
            jumps.append(float((a_new - a_old).abs().max()))

    for k in range(max_steps):
        if pending is not None and k >= pending[0] + delay:  # the chunk computed during the delay takes over
            switch_jump(k, *pending)
            cur_start, cur = pending
            pending = None
        if k == next_obs:
            obs_step = k
            choice = None
            if controller is not None:  # this inference's entry, applied as the policy node does (what changed)
                choice = controller.choose()
                configure_changed(apply_overrides(cfg, choice.entry.overrides, from_baseline=True), runner, compressor)
                choices[choice.entry.name] = choices.get(choice.entry.name, 0) + 1
            images = env.render_all()
            state = torch.as_tensor(env.joint_positions(), dtype=torch.float32)
            cams = {}
            enc_flops = enc_full = kept = reused = 0
            enc_time = 0.0
            for cam in arch.cameras:
                out = compressor.process(cam, rgb_to_tensor(images[cam]))
                cams[cam] = compressed_to_camera_tokens(out)
                if compressor_tokens:
                    all_tokens[cam] = out.all_tokens.clone()  # the compressor updates its cache in place
                enc_flops += out.encoder_flops
                enc_full += out.encoder_flops_full
                kept += int(out.kept.numel())
                reused += int(out.reused.sum())
                enc_time += out.time_s
            guidance = None
            if cur is not None and cfg["rtc"].enabled:  # toward the chunk executing now, d = the emulated delay
                executing = IssuedChunk(0, cur_start * dt, cur.x_final, cur.state)
                guidance = guidance_toward(executing, k * dt, dt, h_chunk, FixedDelay(delay))
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
            if controller is not None and choice is not None:
                measured = (enc_time + res.times["total_s"]) * 1e3
                controller.observe(choice.entry.name, measured)
                budget_ms.append(measured)
                add("budget_latency_ms", measured)
                add("budget_predicted_ms", choice.predicted_ms)
                add("budget_within", float(measured <= controller.budget_ms))
                add("budget_feasible", float(choice.feasible))
            if cur is None or delay == 0:
                switch_jump(k, k, res)
                cur, cur_start = res, k
            else:
                pending = (k, res)
            next_obs = k + period
        assert cur is not None
        held += k - cur_start >= h_chunk  # past the chunk's end the executor holds its last point
        action = cur.actions[min(k - cur_start, h_chunk - 1)].detach().cpu()
        if corrector is not None:
            visual = None
            if compressor_tokens:  # the graph's compressor encodes every frame, not only the observed ones
                if k == obs_step:
                    visual = dict(all_tokens)
                else:
                    frames = env.render_all()
                    visual = {c: compressor.process(c, rgb_to_tensor(frames[c])).all_tokens.clone()
                              for c in arch.cameras}
            elif corrector.needs_visual:  # the newest frames (rendered above when this step observed)
                frames = images if k == obs_step else env.render_all()
                visual = encode_frames(policy, {c: frames[c] for c in arch.cameras})
            seen[k] = (env.joint_positions(), visual)
            # what the graph's correction of this step can have seen: the observation `lag` steps back, never one
            # older than the executing chunk's own (the policy node corrects a chunk once it has it)
            # (cur_start is that chunk's observation step: its row i is meant for step cur_start + i)
            obs_k = max(k - lag, cur_start)
            q_now, visual = seen[obs_k]
            for old_k in [s for s in seen if s < min(k - lag, cur_start)]:
                del seen[old_k]
            corrected = corrector.correct(cur.actions.detach().cpu(), k - cur_start, q_now,
                                          cur.state if cur.state is not None else env.joint_positions(), visual,
                                          lag=k - obs_k)
            add("correction_abs_arm", float((corrected - action)[:-1].abs().mean()))
            add("correction_abs_gripper", float((corrected - action)[-1].abs()))
            action = corrected
        if on_step is not None:
            on_step(StepView(k, cur.actions.detach().cpu(), cur_start, action, seen[k][1] if k in seen else None))
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
    if jumps:  # mean over the episode's chunk switches (rad)
        per["switch_jump"] = float(np.mean(jumps))
    dt_cm, do_cm = grasp if grasp is not None else (math.nan, math.nan)
    outcome = classify_outcome(bool(env.success), dt_cm, do_cm, lift)
    return EpisodeResult(int(seed), instruction, bool(env.success), steps, len(stats.get("policy_s", [])), motion, per,
                         outcome, dt_cm, do_cm, lift, int(closes), int(held), budget_ms, choices)


# ----------------------------------------------------------------------------------------- evaluation
def summarize_budget(results: Sequence[EpisodeResult], budget_ms: float) -> dict[str, Any]:
    """The budget's record over ``results``' inferences: the fraction measured within ``budget_ms``, the fraction
    with an entry predicted within it (``feasible``), the p50 / p95 measured latency, each entry's choices."""
    lat = np.asarray([m for r in results for m in r.budget_latency_ms], dtype=float)
    feasible = sum(r.per_inference.get("budget_feasible", 0.0) * len(r.budget_latency_ms) for r in results)
    choices: dict[str, int] = {}
    for r in results:
        for name, c in r.budget_choices.items():
            choices[name] = choices.get(name, 0) + c
    n = int(lat.size)
    return {"budget_ms": float(budget_ms), "inferences": n,
            "within_fraction": float(np.mean(lat <= budget_ms)) if n else math.nan,
            "feasible_fraction": float(feasible / n) if n else math.nan,
            "latency_p50_ms": float(np.percentile(lat, 50)) if n else math.nan,
            "latency_p95_ms": float(np.percentile(lat, 95)) if n else math.nan,
            "choices": dict(sorted(choices.items(), key=lambda kv: (-kv[1], kv[0])))}


def summarize(setting: Setting, results: Sequence[EpisodeResult], *, default_horizon: int = 0,
              budget: EvalBudget | None = None) -> dict[str, Any]:
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
        **({"correction_lag": setting.execution.correction_lag,
            "correction_tokens": setting.execution.correction_tokens} if setting.correction.enabled else {}),
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
        "held_steps": float(np.mean([r.held_steps for r in results])) if n else math.nan,
        **({"budget": summarize_budget(results, budget.budget_ms)} if budget is not None else {}),
        "episode_results": [r.as_dict() for r in results],
    }


def evaluate(policy: SmolVLAPolicy, settings: Sequence[Setting], seeds: Sequence[int], *,
             max_steps: int = 150, image_size: int | None = None, mesh_faces: int | None = None,
             progress: Callable[[str, int, int, EpisodeResult], None] | None = None,
             backend: str = "eager", export_dir: str | None = None, budget: EvalBudget | None = None) -> dict[str, Any]:
    """Run every setting on the same ``seeds`` on the stage ``backend`` (built once; an exported backend runs the
    graphs in ``export_dir``), under the latency ``budget`` if given (every setting); returns the report."""
    from effvla_ros.sim.env import SimConfig, TwoCubePickPlaceEnv

    size = image_size or int(policy.arch.camera_shape[-1])
    sim_kw: dict[str, Any] = {"image_size": size, "cameras": list(policy.arch.cameras)}
    if mesh_faces is not None:
        sim_kw["mesh_faces"] = mesh_faces
    env = TwoCubePickPlaceEnv(SimConfig(**sim_kw), seed=int(seeds[0]) if seeds else 0)
    report: dict[str, Any] = {"seeds": list(map(int, seeds)), "max_steps": max_steps, "image_size": size,
                              "backend": backend, "dtypes": list(policy.runtime.resolved_dtypes()), "settings": []}
    if budget is not None:
        report["latency_budget"] = budget.describe()
    be = make_backend(backend, policy, export_dir=export_dir)
    t0 = time.perf_counter()
    try:
        for s in settings:
            results = []
            for i, seed in enumerate(seeds):
                r = run_episode(policy, env, int(seed), s, max_steps=max_steps, backend=be, budget=budget)
                results.append(r)
                if progress is not None:
                    progress(s.name, i, len(seeds), r)
            report["settings"].append(summarize(s, results, default_horizon=policy.arch.n_action_steps,
                                                budget=budget))
    finally:
        env.close()
    report["wall_s"] = time.perf_counter() - t0
    return report


_WORKER: dict[str, Any] = {}


def _worker_init(checkpoint: str, sim_kw: dict[str, Any], threads: int, max_steps: int, backend: str,
                 runtime: Any, export_dir: str | None = None) -> None:
    import os

    os.environ.setdefault("MUJOCO_GL", "egl")
    from effvla_ros.core.smolvla import load_policy
    from effvla_ros.sim.env import SimConfig, TwoCubePickPlaceEnv

    torch.set_num_threads(max(1, threads))
    policy = load_policy(checkpoint, runtime=runtime)
    _WORKER.update(policy=policy, env=TwoCubePickPlaceEnv(SimConfig(**sim_kw)), max_steps=max_steps,
                   backend=make_backend(backend, policy, export_dir=export_dir))


def _worker_job(job: tuple[int, Setting, int, EvalBudget | None]) -> tuple[int, EpisodeResult]:
    si, setting, seed, budget = job
    w = _WORKER
    return si, run_episode(w["policy"], w["env"], seed, setting, max_steps=w["max_steps"], backend=w["backend"],
                           budget=budget)


def evaluate_parallel(checkpoint: str, settings: Sequence[Setting], seeds: Sequence[int], *, workers: int,
                      max_steps: int = 150, threads: int = 1,
                      progress: Callable[[str, int, int, EpisodeResult], None] | None = None,
                      backend: str = "eager", runtime: Any = None, export_dir: str | None = None,
                      budget: EvalBudget | None = None) -> dict[str, Any]:
    """:func:`evaluate` in ``workers`` processes (each loads ``checkpoint``); same report, same episodes."""
    import multiprocessing

    from effvla_ros.core.smolvla import load_policy

    arch = load_policy(checkpoint).arch
    size = int(arch.camera_shape[-1])
    sim_kw = {"image_size": size, "cameras": list(arch.cameras)}
    jobs = [(si, s, int(seed), budget) for si, s in enumerate(settings) for seed in seeds]
    results: dict[int, dict[int, EpisodeResult]] = {si: {} for si in range(len(settings))}
    t0 = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_worker_init,
                  initargs=(str(checkpoint), sim_kw, threads, max_steps, backend, runtime, export_dir)) as pool:
        for si, r in pool.imap_unordered(_worker_job, jobs):
            results[si][r.seed] = r
            if progress is not None:
                progress(settings[si].name, len(results[si]) - 1, len(seeds), r)
    report: dict[str, Any] = {"seeds": list(map(int, seeds)), "max_steps": max_steps, "image_size": size,
                              "workers": workers, "backend": backend, "settings": []}
    if budget is not None:
        report["latency_budget"] = budget.describe()
    for si, s in enumerate(settings):
        report["settings"].append(summarize(s, [results[si][int(seed)] for seed in seeds],
                                            default_horizon=arch.n_action_steps, budget=budget))
    report["wall_s"] = time.perf_counter() - t0
    return report


def format_table(report: dict[str, Any]) -> str:
    """A fixed-width table: one row per setting (under a latency budget also: the fraction of inferences measured
    within it, their p95 latency, the fraction with a setting predicted within it; the entries chosen below)."""
    cols = ["setting", "success", "len", "len_ok", "kept/tot", "reused", "enc MFLOP", "enc ms", "prefill ms",
            "denoise ms", "exit", "exp.reuse", "failures: wrong/missed/no-lift/no-place/no-grasp",
            "re-grasp: ok/tried"]
    budget = report.get("latency_budget")
    if budget is not None:
        cols += ["in budget", "p95 ms", "feasible"]
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
        if budget is not None:
            b = s.get("budget") or {}
            rows[-1] += [f"{b.get('within_fraction', math.nan):.0%}", f"{b.get('latency_p95_ms', math.nan):.1f}",
                         f"{b.get('feasible_fraction', math.nan):.0%}"]
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    line = "  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))
    out = [line, "-" * len(line)]
    out += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    if budget is not None:
        out.insert(0, f"latency budget {budget['budget_ms']:g} ms per inference (encoder + prefill + denoising), "
                      f"table {budget.get('table') or '-'} ({len(budget.get('entries', {}))} settings)")
        for s in report["settings"]:
            ch = (s.get("budget") or {}).get("choices", {})
            out.append(f"[{s['name']}] chosen: " + (", ".join(f"{k} x{v}" for k, v in ch.items()) or "-"))
    return "\n".join(out)


def write_report(report: dict[str, Any], path: str) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=1, default=float)
