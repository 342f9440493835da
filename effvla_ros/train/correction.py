"""Training the per-step correction head (A2C2, arXiv 2509.23224; :mod:`effvla_ros.core.correction`).

The base policy is frozen. :func:`collect` runs it over demonstrations as the closed loop would (the token
compressor with the chosen setting over the frames where an inference happens, the policy runner for the chunk):
from frame ``t0`` it plans a chunk; for each row ``j`` whose frame ``t0 + j`` exists (and is a demonstration, not a
deliberately failed grasp) one sample is the chunk, ``j``, the joint positions at ``t0 + j`` and ``t0``, the
newest frames' connector tokens (``t0 + j``) and, as target, the demonstrator's action at ``t0 + j`` minus the
chunk's row ``j``. Inferences start every ``stride`` frames from each of ``offsets``, so rows past the execution
horizon (the delay's rows) are covered too.

:func:`train_head` fits the head by mean squared error on the normalized residual, holding out whole episodes; its
record has the held-out error of the base actions (the residual zero) and of the corrected ones, per dimension
group (arm, gripper).
"""
from __future__ import annotations

import math
import multiprocessing
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from effvla_ros.core.correction import CorrectionHead, HeadSpec, encode_frames


@dataclass
class CorrectionData:
    """Frames of the demonstrations (F), the chunks planned from them (M) and the samples (S) pairing both."""

    q: np.ndarray  # (F, A) joint positions
    action: np.ndarray  # (F, A) the demonstrator's action
    visual: np.ndarray | None  # (F, C, N, D) float16 connector tokens, or None
    episode: np.ndarray  # (F,) episode number of each frame
    chunks: np.ndarray  # (M, H, A) raw actions
    chunk_frame: np.ndarray  # (M,) frame of each chunk's observation
    samples: np.ndarray  # (S, 2) (chunk, row j): the sample's frame is chunk_frame + j
    cameras: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.samples.shape[0])

    @staticmethod
    def concat(parts: Sequence[CorrectionData]) -> CorrectionData:
        f_off = m_off = 0
        qs, acts, vis, eps, chunks, cf, samples = [], [], [], [], [], [], []
        for p in parts:
            qs.append(p.q)
            acts.append(p.action)
            if p.visual is not None:
                vis.append(p.visual)
            eps.append(p.episode)
            chunks.append(p.chunks)
            cf.append(p.chunk_frame + f_off)
            samples.append(p.samples + np.array([m_off, 0]))
            f_off += p.q.shape[0]
            m_off += p.chunks.shape[0]
        return CorrectionData(np.concatenate(qs), np.concatenate(acts), np.concatenate(vis) if vis else None,
                              np.concatenate(eps), np.concatenate(chunks), np.concatenate(cf),
                              np.concatenate(samples), parts[0].cameras if parts else [])


def _episode_data(policy: Any, arrays: dict[str, np.ndarray], episode: int, setting: Any, *, stride: int,
                  offsets: Sequence[int], seed: int, visual: bool, backend: str = "eager") -> CorrectionData:
    from effvla_ros.core.compression.compressor import TokenCompressor
    from effvla_ros.core.observation import rgb_to_tensor
    from effvla_ros.core.runner import PolicyRunner, compressed_to_camera_tokens

    cams = list(policy.arch.cameras)
    h = policy.arch.chunk_size
    q = np.asarray(arrays["observation.state"], dtype=np.float32)
    act = np.asarray(arrays["action"], dtype=np.float32)
    n = q.shape[0]
    failed = np.asarray(arrays.get("failed_grasp", np.zeros(n, bool)), dtype=bool)
    instruction = str(arrays["task"])
    images = {c: arrays[f"observation.images.{c}"] for c in cams}
    vis = None
    if visual:  # the newest frames as the head sees them (encode_frames, as eval-sim)
        toks = []
        for t in range(n):
            tok = encode_frames(policy, {c: images[c][t] for c in cams})
            toks.append(torch.stack([tok[c] for c in cams]).to(torch.float16).numpy())
        vis = np.stack(toks)                                                  # (F, C, N, D)
    cfg = setting.configs()
    chunks: list[np.ndarray] = []
    chunk_frame: list[int] = []
    samples: list[tuple[int, int]] = []
    for off in offsets:
        comp = TokenCompressor(policy, cfg["pruning"], cfg["reuse"], count_flops=False, backend=backend)
        runner = PolicyRunner(policy, inference=cfg["inference"], early_exit=cfg["early_exit"],
                              expert_reuse=cfg["expert_reuse"], backend=comp.backend)
        comp.set_instruction(instruction)
        runner.set_instruction(instruction)
        gen = torch.Generator().manual_seed(int(seed) * 1000 + int(off))
        for t0 in range(int(off), n, int(stride)):
            if failed[t0]:
                continue
            tokens = {c: compressed_to_camera_tokens(comp.process(c, rgb_to_tensor(images[c][t0]))) for c in cams}
            res = runner.infer(tokens, torch.as_tensor(q[t0]), generator=gen)
            m = len(chunks)
            chunks.append(res.actions.detach().float().numpy())
            chunk_frame.append(t0)
            for j in range(h):
                if t0 + j < n and not failed[t0 + j]:
                    samples.append((m, j))
    return CorrectionData(q, act, vis, np.full(n, episode, dtype=np.int64),
                          np.asarray(chunks, dtype=np.float32).reshape(-1, h, act.shape[1]),
                          np.asarray(chunk_frame, dtype=np.int64), np.asarray(samples, dtype=np.int64).reshape(-1, 2),
                          cams)


_W: dict[str, Any] = {}


def _init(checkpoint: str, setting: Any, kw: dict[str, Any]) -> None:
    torch.set_num_threads(1)
    from effvla_ros.core.smolvla import load_policy

    _W.update(policy=load_policy(checkpoint), setting=setting, kw=kw)


def _job(job: tuple[str, int, int]) -> CorrectionData:
    from effvla_ros.sim.dataset import load_episode

    root, i, number = job
    arrays = load_episode(Path(root), i)
    return _episode_data(_W["policy"], arrays, number, _W["setting"], seed=number, **_W["kw"])


def collect(checkpoint: str, demo_roots: Sequence[str], setting: Any, *, stride: int = 5,
            offsets: Sequence[int] = (0, 2), visual: bool = True, max_episodes: int = 0, workers: int = 1,
            progress: Callable[[int, int], None] | None = None) -> CorrectionData:
    """Samples from the demonstrations in ``demo_roots`` (``effvla gen-demos`` sets) under the base policy of
    ``checkpoint`` run with ``setting`` (a :class:`~effvla_ros.core.settings.Setting`)."""
    from effvla_ros.sim.dataset import load_index

    jobs: list[tuple[str, int, int]] = []
    for root in demo_roots:
        for i, _ in enumerate(load_index(Path(root))["episodes"]):
            jobs.append((str(root), i, len(jobs)))
    if max_episodes:
        jobs = jobs[:max_episodes]
    kw = {"stride": stride, "offsets": tuple(offsets), "visual": visual}
    parts: list[CorrectionData] = []
    if workers <= 1:
        _init(checkpoint, setting, kw)
        for k, j in enumerate(jobs):
            parts.append(_job(j))
            if progress:
                progress(k + 1, len(jobs))
    else:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(workers, initializer=_init, initargs=(checkpoint, setting, kw)) as pool:
            for k, p in enumerate(pool.imap(_job, jobs)):
                parts.append(p)
                if progress:
                    progress(k + 1, len(jobs))
    return CorrectionData.concat(parts)  # in job order (imap keeps it)


# ------------------------------------------------------------------------------------------ training
def _batch(data: CorrectionData, idx: np.ndarray, lag: np.ndarray | None = None) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Inputs and target of samples ``idx``; ``lag`` (per sample, clipped to the row): the joints and frames are
    taken that many frames before the corrected row's (what the graph's correction sees: a row is committed before
    it runs), the target stays the row's."""
    s = data.samples[idx]
    ci, j = s[:, 0], s[:, 1]
    f0 = data.chunk_frame[ci]
    f = f0 + j
    lg = np.zeros_like(j) if lag is None else np.minimum(lag, j)
    fo = f - lg  # the observation's frame (never before the chunk's own)
    chunk = torch.from_numpy(data.chunks[ci])
    target = torch.from_numpy(data.action[f] - data.chunks[ci, j])
    vis = torch.from_numpy(data.visual[fo].astype(np.float32)) if data.visual is not None else None
    return (chunk, torch.from_numpy(j), torch.from_numpy(data.q[fo]), torch.from_numpy(data.q[f0]), vis, target,
            torch.from_numpy(lg))


def _errors(head: CorrectionHead, data: CorrectionData, idx: np.ndarray, lag: int = 0) -> dict[str, float]:
    """Held-out RMSE (normalized units) of the base action and of the corrected one, arm and gripper, with the
    observations ``lag`` frames old."""
    base_sq = np.zeros(head.spec.action_dim)
    corr_sq = np.zeros(head.spec.action_dim)
    with torch.no_grad():
        for k in range(0, len(idx), 4096):
            part = idx[k:k + 4096]
            chunk, j, qn, qo, vis, target, lg = _batch(data, part, np.full(len(part), lag))
            t = target / head.std
            r = head(chunk, j, qn, qo, vis, lg)  # 0 on the dimensions the head leaves alone
            base_sq += (t ** 2).sum(0).numpy()
            corr_sq += ((t - r) ** 2).sum(0).numpy()
    n = max(1, len(idx))
    return {"base_rmse_arm": math.sqrt(base_sq[:-1].sum() / n / (len(base_sq) - 1)),
            "corrected_rmse_arm": math.sqrt(corr_sq[:-1].sum() / n / (len(corr_sq) - 1)),
            "base_rmse_gripper": math.sqrt(base_sq[-1] / n), "corrected_rmse_gripper": math.sqrt(corr_sq[-1] / n)}


def train_head(data: CorrectionData, *, chunk_size: int, steps: int = 4000, batch: int = 512, lr: float = 1e-3,
               hidden: int = 256, layers: int = 3, visual_width: int = 8, use_state: bool = True,
               dims: Sequence[int] = (), max_lag: int = 0, min_lag: int = 0, val_fraction: float = 0.1, seed: int = 0,
               state_noise: float = 0.0, members: int = 1, state_dims: Sequence[int] = (), log: Callable[[str], None] | None = None) -> tuple[CorrectionHead, dict[str, Any]]:
    """Fit a head to ``data``; returns it and the training record (held-out errors before and after, per lag).
    ``max_lag`` > 0: each sample's observation is ``min_lag``..``max_lag`` frames older than its row (uniform), and
    the head is told the lag (for a graph that commits rows before they run: the chunk_corrector's lag is 1).
    ``members`` > 1: an ensemble, each member fitted on its own from its own seed (``seed``, then ``[seed, k]``),
    the residuals averaged; the held-out errors are the ensemble's."""
    if not 0 <= min_lag <= max_lag:
        raise ValueError(f"min_lag {min_lag} must lie in 0..max_lag ({max_lag})")
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    a = data.action.shape[1]
    eps = np.unique(data.episode)
    val_eps = set(rng.choice(eps, size=max(1, int(round(len(eps) * val_fraction))), replace=False).tolist())
    sample_ep = data.episode[data.chunk_frame[data.samples[:, 0]]]
    val = np.flatnonzero(np.isin(sample_ep, list(val_eps)))
    tr = np.flatnonzero(~np.isin(sample_ep, list(val_eps)))
    vis_shape = data.visual.shape[1:] if data.visual is not None else (0, 0, 0)
    spec = HeadSpec(action_dim=a, chunk_size=chunk_size, hidden=hidden, layers=layers,
                    cameras=list(data.cameras) if data.visual is not None else [],
                    visual_tokens=int(vis_shape[1]), visual_dim=int(vis_shape[2]), visual_width=visual_width,
                    use_state=use_state, dims=[int(d) for d in dims], max_lag=int(max_lag), members=int(members),
                    state_dims=[int(d) for d in state_dims])
    head = CorrectionHead(spec)
    train_frames = np.isin(data.episode, [e for e in eps if e not in val_eps])
    head.mean.copy_(torch.from_numpy(data.action[train_frames].mean(0)))
    head.std.copy_(torch.from_numpy(np.maximum(data.action[train_frames].std(0), 1e-3)))
    lags = range(int(min_lag), int(max_lag) + 1)
    before = {lag: _errors(head, data, val, lag) for lag in lags}
    t0 = time.perf_counter()
    head.train()
    for k in range(int(members)):
        mrng = rng if k == 0 else np.random.default_rng([int(seed), k])
        params = head.member_parameters(k)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
        for step in range(steps):
            idx = mrng.choice(tr, size=min(batch, len(tr)), replace=False)
            lag = mrng.integers(int(min_lag), int(max_lag) + 1, size=len(idx)) if max_lag else None
            chunk, j, qn, qo, vis, target, lg = _batch(data, idx, lag)
            if state_noise > 0.0:  # the closed loop's joints differ from the demonstrations' (normalized units)
                qn = qn + torch.randn_like(qn) * state_noise * head.std
                qo = qo + torch.randn_like(qo) * state_noise * head.std
            out = head(chunk, j, qn, qo, vis, lg, member=k)
            loss = torch.nn.functional.mse_loss(out, target / head.std * head.mask)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            if log and (step % 500 == 0 or step == steps - 1):
                log(f"{f'member {k} ' if members > 1 else ''}step {step}: loss {float(loss.detach()):.4f}")
    head.eval()
    after = {lag: _errors(head, data, val, lag) for lag in lags}
    record = {"samples": int(len(tr)), "held_out_samples": int(len(val)), "episodes": int(len(eps)),
              "held_out_episodes": sorted(int(e) for e in val_eps), "steps": steps, "batch": batch, "lr": lr,
              "max_lag": int(max_lag), "train_s": time.perf_counter() - t0,
              "min_lag": int(min_lag), "state_noise": float(state_noise), "members": int(members),
              # the smallest lag's at the top level (lag 0 as before); every lag's under held_out_by_lag
              "held_out_before": before[int(min_lag)], "held_out_after": after[int(min_lag)],
              "held_out_by_lag": {str(lag): {"before": before[lag], "after": after[lag]} for lag in lags}}
    return head, record


def save_data(data: CorrectionData, path: str | Path) -> None:
    np.savez(path, q=data.q, action=data.action, visual=data.visual if data.visual is not None else np.zeros(0),
             episode=data.episode, chunks=data.chunks, chunk_frame=data.chunk_frame, samples=data.samples,
             cameras=np.asarray(data.cameras))


def load_data(path: str | Path) -> CorrectionData:
    with np.load(path) as z:
        vis = z["visual"]
        return CorrectionData(z["q"], z["action"], vis if vis.size else None, z["episode"], z["chunks"],
                              z["chunk_frame"], z["samples"], [str(c) for c in z["cameras"]])


# ------------------------------------------------------------------------------------------ on-policy data
class ShadowExpert:
    """The scripted demonstrator run alongside a closed-loop episode it does not drive (DAgger, Ross et al.,
    AISTATS 2011): at each step it sees the simulation's state and says which joint targets it would command from
    there (:meth:`label`), as in the demonstrations (``action``: absolute joint targets). Its Cartesian target
    starts from where the executed command points (the grasp point of the commanded joints), as the demonstrator's
    accumulated target does in its own episodes.

    The expert carries a phase (hover, descend, close, lift, ...) advanced by geometry and step counts. The gripper
    stays the policy's (the head corrects the arm), so the phase follows the executed jaw command: the policy closing
    the jaw during the approach puts the expert in its close phase (hold still, then lift), opening it while lowering
    in its open phase, opening it before the cube was lifted back in the approach. A label is not used (``valid``
    false) where the expert has no answer: the jaw opened while the cube is carried or closed again after the
    release, and everything after a failed grasp (the expert lifting with the cube left on the table:
    :class:`~effvla_ros.sim.dataset.Regrasp`'s test)."""

    def __init__(self, env: Any, *, aim_offset: tuple[float, float] = (0.0, 0.0), detect_rise: float = 0.015,
                 min_cube_rise: float = 0.008) -> None:
        from lerobot_env_so101.scripted import PickPlaceController

        self.env = env
        self.aim_offset = (float(aim_offset[0]), float(aim_offset[1]))  # the demonstrations' (gen-demos --aim-offset)
        self.ctrl = PickPlaceController()
        self.grip_mid = float(np.mean(env.ctrl_range[-1]))
        self.detect_rise, self.min_cube_rise = float(detect_rise), float(min_cube_rise)
        self.lift_from: tuple[float, float] | None = None
        self.failed = False

    def label(self, executed: np.ndarray) -> tuple[np.ndarray, bool]:
        """The expert's joint targets (A,) at the current state and whether they are usable, given the action
        ``executed`` (A,) now (before it is applied)."""
        from lerobot_env_so101.scripted.pick_place import Phase

        from effvla_ros.sim.dataset import _expert_target_without_applying

        env = self.env
        ctrl = self.ctrl
        target = env.task.target_cube
        closed = float(executed[-1]) < self.grip_mid
        lifted = self.lift_from is not None and \
            float(env.cube_positions()[target][2]) - self.lift_from[1] >= self.min_cube_rise
        usable = True
        ph = ctrl.phase
        if closed and ph in (Phase.HOVER, Phase.DESCEND):
            self._set(Phase.CLOSE)  # the policy grasps here: hold still while the jaw closes, then lift
        elif not closed and ph in (Phase.CLOSE, Phase.LIFT, Phase.TRAVERSE):
            if lifted:
                usable = False  # the cube dropped from the jaw
            else:
                self._set(Phase.DESCEND)  # not grasped yet: (back) to the cube at grasp height
                self.lift_from = None
        elif not closed and ph is Phase.LOWER:
            self._set(Phase.OPEN)  # the policy releases here
        elif closed and ph in (Phase.OPEN, Phase.RETREAT, Phase.DONE):
            usable = False
        a = env.expert_action(ctrl, self.aim_offset)
        phase = ctrl.phase.name
        if phase in ("LIFT", "TRAVERSE", "LOWER") and not self.failed:
            jaw_z, cube_z = float(env.ik_point_pos[2]), float(env.cube_positions()[target][2])
            if self.lift_from is None:
                self.lift_from = (jaw_z, cube_z)
            if jaw_z - self.lift_from[0] >= self.detect_rise and cube_z - self.lift_from[1] < self.min_cube_rise:
                self.failed = True
        env._target_ee_pos = env.jaw_points(env.joint_targets())[0]  # the executed command's grasp point
        env._last_action_was_zero = False
        q = _expert_target_without_applying(env, a)
        return q.astype(np.float32), bool(usable and not self.failed)

    def _set(self, phase: Any) -> None:
        self.ctrl._phase = phase  # the controller has no setter: its phase is private state
        self.ctrl._steps_in_phase = 0


def _on_policy_episode(policy: Any, env: Any, seed: int, setting: Any, episode: int, *, max_steps: int,
                       aim_offset: tuple[float, float] = (0.0, 0.0)) -> tuple[CorrectionData, dict[str, Any]]:
    """One closed-loop episode of ``policy`` under ``setting`` (its correction on: the head's visual input is
    recorded), labelled by a :class:`ShadowExpert`: every row of every chunk whose step has a usable label is a
    sample (as :func:`collect`'s: target = the label minus the row)."""
    from effvla_ros.train.evaluate import StepView, run_episode

    qs: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    valid: list[bool] = []
    vis: list[np.ndarray] = []
    chunks: dict[int, np.ndarray] = {}
    shadow: list[ShadowExpert] = []
    cams = list(policy.arch.cameras)

    def on_step(v: StepView) -> None:
        if not shadow:
            shadow.append(ShadowExpert(env, aim_offset=aim_offset))  # after run_episode's reset
        if v.visual is None:
            raise ValueError("on-policy collection needs a visual correction head in the rollouts")
        qs.append(env.joint_positions().astype(np.float32))
        lab, ok = shadow[0].label(v.action.numpy())
        labels.append(lab)
        valid.append(ok)
        vis.append(torch.stack([v.visual[c].float().reshape(v.visual[c].shape[-2:]) for c in cams])
                   .to(torch.float16).numpy())
        chunks.setdefault(v.chunk_start, v.chunk.float().numpy())

    res = run_episode(policy, env, int(seed), setting, max_steps=max_steps, on_step=on_step)
    n = len(qs)
    h = policy.arch.chunk_size
    ok = np.asarray(valid, dtype=bool)
    starts = sorted(chunks)
    samples = [(m, j) for m, t0 in enumerate(starts) for j in range(h) if t0 + j < n and ok[t0 + j]]
    a = int(policy.arch.action_dim)
    data = CorrectionData(np.asarray(qs, dtype=np.float32).reshape(n, -1), np.asarray(labels, np.float32).reshape(n, a),
                          np.stack(vis) if vis else None, np.full(n, episode, dtype=np.int64),
                          np.asarray([chunks[t] for t in starts], dtype=np.float32).reshape(-1, h, a),
                          np.asarray(starts, dtype=np.int64), np.asarray(samples, dtype=np.int64).reshape(-1, 2), cams)
    info = {"seed": int(seed), "success": bool(res.success), "outcome": res.outcome, "steps": n,
            "valid_steps": int(ok.sum()), "samples": len(samples)}
    return data, info


def _on_policy_init(checkpoint: str, max_steps: int, aim_offset: tuple[float, float]) -> None:
    import os

    os.environ.setdefault("MUJOCO_GL", "egl")
    torch.set_num_threads(1)
    from effvla_ros.core.smolvla import load_policy
    from effvla_ros.sim.env import SimConfig, TwoCubePickPlaceEnv

    policy = load_policy(checkpoint)
    sim = SimConfig(image_size=int(policy.arch.camera_shape[-1]), cameras=list(policy.arch.cameras))
    _W.update(policy=policy, env=TwoCubePickPlaceEnv(sim), max_steps=max_steps, aim_offset=aim_offset)


def _on_policy_job(job: tuple[int, Any, int]) -> tuple[CorrectionData, dict[str, Any]]:
    seed, setting, episode = job
    return _on_policy_episode(_W["policy"], _W["env"], seed, setting, episode, max_steps=_W["max_steps"],
                              aim_offset=_W["aim_offset"])


def collect_on_policy(checkpoint: str, settings: Sequence[Any], seeds: Sequence[int], *, first_episode: int = 0,
                      workers: int = 1, max_steps: int = 150, aim_offset: tuple[float, float] = (0.0, 0.0),
                      progress: Callable[[int, int, dict[str, Any]], None] | None = None,
                      ) -> tuple[CorrectionData, list[dict[str, Any]]]:
    """On-policy samples (DAgger): episode ``i`` runs ``seeds[i]`` under ``settings[i % len(settings)]`` (closed
    loop with the checkpoint's correction head on, e.g. at several delays), each step labelled by the scripted
    expert (:class:`ShadowExpert`) aimed as the demonstrations (``aim_offset``). Episodes are numbered from
    ``first_episode`` (after the demonstrations' when both are trained on). Returns the data and one record per
    episode."""
    jobs = [(int(sd), settings[i % len(settings)], int(first_episode) + i) for i, sd in enumerate(seeds)]
    parts: list[CorrectionData] = []
    infos: list[dict[str, Any]] = []
    if workers <= 1:
        _on_policy_init(checkpoint, max_steps, aim_offset)
        it: Any = map(_on_policy_job, jobs)
        pool = None
    else:
        ctx = multiprocessing.get_context("spawn")
        pool = ctx.Pool(workers, initializer=_on_policy_init, initargs=(checkpoint, max_steps, aim_offset))
        it = pool.imap(_on_policy_job, jobs)
    try:
        for k, (d, info) in enumerate(it):
            info["setting"] = jobs[k][1].name
            parts.append(d)
            infos.append(info)
            if progress:
                progress(k + 1, len(jobs), info)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return CorrectionData.concat(parts), infos


__all__ = ["CorrectionData", "ShadowExpert", "collect", "collect_on_policy", "load_data", "save_data", "train_head"]
