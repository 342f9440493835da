"""The demo graph's chunk-to-command path in simulated time, without ROS: where does success go?

``effvla eval-sim`` applies each action of a chunk directly for 0.1 s with the simulation paused during
inference. The ROS graph (``make demo``) does more: the policy node's timing (a new chunk when the
execution horizon minus the measured latency has elapsed, RTC guidance from the executor's feedback), the
chunk executor core (merging, blending, velocity / acceleration limits, rolling trajectories) and the
simulated joint_trajectory_controller (:class:`~effvla_ros.sim.follower.JointTrajectoryFollower` at
100 Hz). This script runs exactly those core parts on :class:`~effvla_ros.sim.env.TwoCubePickPlaceEnv`
in simulated time, with the simulation paused during inference and each chunk delivered ``--latency``
simulated seconds after its observation, so one factor at a time can be switched::

    python scripts/emulate_graph.py --seeds 1000 1001 1002                        # the demo's parameters
    python scripts/emulate_graph.py --exec blend_time=0.2,velocity_limits=3:3:3:3:3:6 --latency 0.15
    python scripts/emulate_graph.py --mode direct                                 # = eval-sim's execution

Parameters: ``config/base.yaml`` < the target's file < ``config/sim.yaml`` (the demo's layering), then
``--exec`` (chunk executor fields, lists ``:``-separated) and ``--setting`` (one setting in the sweep
grammar of eval-sim and replay, :mod:`effvla_ros.core.settings`: ``group.field=value`` joined by ``+``,
on the baseline: every optimization off). Images and
joint state of one instant (what the policy node pairs). What it does not have: DDS, the GIL and CPU
contention between nodes, float16 tokens on the wire.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from effvla_ros.core.chunking import ChunkHistory, ExecutionReport, IssuedChunk  # noqa: E402
from effvla_ros.core.compression.compressor import TokenCompressor  # noqa: E402
from effvla_ros.core.executor import ChunkExecutorCore, ExecState, ExecutorConfig  # noqa: E402
from effvla_ros.core.observation import rgb_to_tensor  # noqa: E402
from effvla_ros.core.rtc import DelayEstimator  # noqa: E402
from effvla_ros.core.runner import PolicyRunner, compressed_to_camera_tokens  # noqa: E402
from effvla_ros.core.settings import Setting, build_settings  # noqa: E402
from effvla_ros.core.smolvla import load_policy  # noqa: E402
from effvla_ros.graph import TARGETS, default_checkpoint, params_files  # noqa: E402
from effvla_ros.replay.settings import node_params  # noqa: E402
from effvla_ros.sim.env import JOINT_NAMES, SimConfig, TwoCubePickPlaceEnv  # noqa: E402
from effvla_ros.sim.follower import JointTrajectoryFollower, TrajectoryPoint  # noqa: E402

PHYSICS_MS = 2  # the environment's physics step
CONTROLLER_MS = 10  # sim_bridge controller_rate 100 Hz
JOINT_STATE_MS = 20  # sim_bridge joint_state_rate 50 Hz


def executor_config(target: str, overrides: str) -> ExecutorConfig:
    values = node_params(params_files(target, sim=True), "chunk_executor")
    cfg = ExecutorConfig.from_dict(values, strict=False)
    for kv in filter(None, overrides.split(",")):
        k, _, v = kv.partition("=")
        cur = getattr(cfg, k)
        cfg = cfg.replace(**{k: [float(x) for x in v.split(":")] if isinstance(cur, list) else type(cur)(v)})
    return cfg


def run_episode(policy, env, seed: int, setting: Setting, ecfg: ExecutorConfig, *, mode: str,  # type: ignore[no-untyped-def]
                latency: float, horizon: int, max_steps: int, row_offset: float = 0.0) -> tuple[bool, float]:
    cfg = setting.configs()
    dt = env.control_dt
    env.reset(seed=seed)
    compressor = TokenCompressor(policy, cfg["pruning"], cfg["reuse"])
    runner = PolicyRunner(policy, inference=cfg["inference"], early_exit=cfg["early_exit"],
                          expert_reuse=cfg["expert_reuse"], rtc=cfg["rtc"])
    compressor.set_instruction(env.instruction)
    runner.set_instruction(env.instruction)
    gen = torch.Generator().manual_seed(seed)
    delay = DelayEstimator(cfg["rtc"])
    core = ChunkExecutorCore(ecfg)
    follower = JointTrajectoryFollower(JOINT_NAMES, env.joint_targets(), now=0.0)
    chunks = ChunkHistory(maxlen=8)  # as the policy node
    pending: list[tuple[float, dict]] = []  # (arrival time, ActionChunk fields)
    direct: tuple[float, np.ndarray] | None = None
    obs = None
    last_obs = -math.inf
    chunk_id = 0
    fb = None
    cam_ms = int(round(dt * 1000))
    t = 0.0
    for i in range(int(round(max_steps * dt * 1000 / PHYSICS_MS))):
        ms = i * PHYSICS_MS
        t = ms / 1000.0
        if ms % JOINT_STATE_MS == 0:
            core.on_joint_state(JOINT_NAMES, env.joint_positions(), t)
        if ms % cam_ms == 0:
            imgs = env.render_all()
            cams = {c: compressed_to_camera_tokens(compressor.process(c, rgb_to_tensor(imgs[c])))
                    for c in policy.arch.cameras}
            obs = (t, cams, torch.as_tensor(env.joint_positions(), dtype=torch.float32))
        # the policy node: a new chunk once the current one's horizon minus the latency has elapsed
        if obs is not None and obs[0] > last_obs and not pending:
            last = chunks.last
            due = last is None or t >= last.stamp + horizon * dt - (delay.latency() or 0.0) - 1e-9
            if due:
                o_t, o_cams, state = obs
                guidance = None
                if cfg["rtc"].enabled:  # as PolicyNode._guidance, from the executor's feedback
                    report = (ExecutionReport(fb.chunk_id, fb.committed_until, fb.state is ExecState.HOLDING)
                              if fb is not None and fb.chunk_id else None)
                    guidance = chunks.guidance(o_t, dt, policy.arch.chunk_size, delay, report)
                res = runner.infer(o_cams, state, guidance=guidance, generator=gen)
                last_obs = o_t
                chunk_id += 1
                acts = res.actions.detach().double().numpy()
                pending.append((o_t + latency, dict(
                    chunk_id=chunk_id, t0=o_t + row_offset * dt, dt=dt, joint_names=list(JOINT_NAMES), num_actions=acts.shape[0],
                    action_dim=acts.shape[1], actions=acts.reshape(-1),
                    rtc_delay_steps=int(res.rtc_delay) if res.guided else 0,
                    rtc_prefix_chunk_id=int(guidance.source_chunk_id) if (guidance is not None and res.guided) else 0)))
                delay.record(latency)
                chunks.add(IssuedChunk(chunk_id, o_t, res.x_final.detach(), res.state))
        while pending and t >= pending[0][0] - 1e-9:
            _, kw = pending.pop(0)
            if mode == "executor":
                core.on_chunk(t, **kw)
                fb = core.feedback(t)
            else:
                direct = (kw["t0"], kw["actions"].reshape(kw["num_actions"], -1))
        if mode == "executor":
            if ms % int(round(1000 * ecfg.publish_period)) == 0:
                cmd = core.tick(t)
                if cmd is not None:
                    pts = [TrajectoryPoint(float(tf), p, v)
                           for tf, p, v in zip(cmd.time_from_start, cmd.positions, cmd.velocities)]
                    follower.set_trajectory(JOINT_NAMES, pts, now=t, start_time=cmd.stamp)
                    fb = core.feedback(t)
            if ms % CONTROLLER_MS == 0:
                env.set_joint_targets(follower.sample(t)[0])
        elif direct is not None and ms % cam_ms == 0:  # eval-sim: each action held for one control step
            k = int(round((t - direct[0]) / dt))
            env.set_joint_targets(direct[1][min(k, direct[1].shape[0] - 1)])
        env.step_physics(1)
        if env.success:
            break
    return bool(env.success), t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=default_checkpoint())
    ap.add_argument("--target", default="x86_cpu", choices=TARGETS)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1000, 1001, 1002])
    ap.add_argument("--mode", choices=["executor", "direct"], default="executor",
                    help="executor: the graph's path; direct: eval-sim's (each action held for 0.1 s)")
    ap.add_argument("--latency", type=float, default=0.1, help="observation to chunk arrival, simulated s")
    ap.add_argument("--setting", default="", help="eval-sim setting on its baseline, e.g. rtc.enabled=true+reuse.enabled=true")
    ap.add_argument("--exec", default="", help="chunk executor overrides k=v,k=v (lists: a:b:c)")
    ap.add_argument("--horizon", type=int, default=5, help="the policy node's execution_horizon")
    ap.add_argument("--max-steps", type=int, default=150, help="10 Hz steps per episode (eval-sim's default)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--row-offset", type=float, default=0.0,
                    help="steps added to each chunk's stamp before the executor sees it: 1 executes row i as the "
                         "target reached at t_(i+1), as the demonstrations apply it (the graph's is 0: reached at t_i)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    policy = load_policy(args.checkpoint)
    env = TwoCubePickPlaceEnv(SimConfig(image_size=int(node_params(params_files(args.target, sim=True),
                                                                   "sim_bridge").get("image_size", 64))))
    settings = build_settings([args.setting] if args.setting else [])  # the baseline first
    setting = settings[1] if args.setting else settings[0]
    ecfg = executor_config(args.target, args.exec)
    print(f"mode {args.mode}, latency {args.latency} s, setting {setting.name}; executor: "
          + ", ".join(f"{k}={ecfg.to_dict()[k]}" for k in ("velocity_limits", "acceleration_limits", "blend_time",
                                                            "output_mode", "merge_strategy")))
    ok = 0
    for seed in args.seeds:
        success, t = run_episode(policy, env, seed, setting, ecfg, mode=args.mode, latency=args.latency,
                                 horizon=args.horizon, max_steps=args.max_steps, row_offset=args.row_offset)
        ok += success
        print(f"seed {seed}: {'success' if success else 'failure'} at {t:.1f} s", flush=True)
    print(f"{ok}/{len(args.seeds)} successful")
    env.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
