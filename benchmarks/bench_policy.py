"""Policy-side benchmark: VLM early exit and expert feature reuse (compute and time per stage),
and real-time chunking continuity at chunk boundaries at several inference delays — side by side
in one run, on a moving simulated manipulation sequence (scripted SO-101 pick-and-place).

    python benchmarks/bench_policy.py [--frames 24] [--checkpoint DIR] [--real-size]

Part 1 (compute): the prefix/expert FLOPs (torch.utils.flop_counter) and wall medians per
observation with every optimization off, with early exit on (thresholds calibrated DeeR-style on
the first half of the sequence, measured on the second half), with expert reuse, and both.
``--real-size`` uses the real SmolVLA-450M shapes with random weights (the compute is what
matters there); otherwise the checkpoint (default: the bundled sim policy).

Part 2 (RTC continuity): the policy predicts a chunk every ``s`` control steps along the episode;
with an inference delay of d steps the executed sequence switches from the old chunk to the new one
at step d. The boundary jump is |new[d] - old[s + d]| (joint units, max over joints), reported
without RTC at d = 0 (no delay at all) and without/with RTC at d = nominal and 2 x nominal.
"""
from __future__ import annotations

import argparse
import statistics

import torch


def episode_observations(n: int, size: int, cameras: list[str], seed: int = 5) -> list[tuple[dict, torch.Tensor, str]]:
    from lerobot_env_so101.scripted import PickPlaceController  # type: ignore[import-not-found]

    from effvla_ros.sim.env import SimConfig, TwoCubePickPlaceEnv

    env = TwoCubePickPlaceEnv(SimConfig(image_size=size, cameras=list(cameras)), seed=seed)
    env.reset(seed=seed)
    ctrl = PickPlaceController()
    obs = []
    for _ in range(n):
        imgs = {c: torch.from_numpy(env.render(c).copy()).permute(2, 0, 1).float() / 255.0 for c in cameras}
        obs.append((imgs, torch.from_numpy(env.joint_positions()).float(), env.instruction))
        env.step(env.expert_action(ctrl))
    return obs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--checkpoint", default=None, help="default: effvla_ros/assets/so101_pickplace")
    ap.add_argument("--real-size", action="store_true", help="part 1 on the real SmolVLA-450M shapes (random weights)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--horizon", type=int, default=5, help="execution horizon s (actions per chunk executed)")
    ap.add_argument("--delay", type=int, default=2, help="nominal inference delay in control steps")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from effvla_ros.core.compression.compressor import ReuseConfig, TokenCompressor
    from effvla_ros.core.compression.pruning import PruningConfig
    from effvla_ros.core.early_exit import EarlyExitConfig, ExpertReuseConfig, calibrate_thresholds
    from effvla_ros.core.rtc import GuidanceTarget, RTCConfig, align_previous_chunk
    from effvla_ros.core.runner import InferenceConfig, PolicyRunner, compressed_to_camera_tokens
    from effvla_ros.core.smolvla import build_random_policy, load_policy, smolvla_450m_arch
    from effvla_ros.core.smolvla.tokenizer import build_tiny_tokenizer
    from effvla_ros.graph import default_checkpoint
    from effvla_ros.sim.task import all_instructions

    ckpt = args.checkpoint or default_checkpoint()
    trained = load_policy(ckpt) if ckpt else None
    if args.real_size or trained is None:
        tok = build_tiny_tokenizer(corpus=list(all_instructions()), vocab_size=600)
        policy = build_random_policy(smolvla_450m_arch(cameras=("scene", "wrist")), tokenizer=tok, init="transformers")
        label = "real-size SmolVLA-450M shapes, random weights"
    else:
        policy, label = trained, f"checkpoint {ckpt}"
    size = 256 if args.real_size or trained is None else (trained.arch.resize_imgs_with_padding or (64, 64))[0]
    obs = episode_observations(args.frames, size, list(policy.cameras))
    print(f"part 1 on {label}: {len(obs)} observations of a scripted episode, {args.threads} threads")

    comp = TokenCompressor(policy, PruningConfig(method="none"), ReuseConfig(enabled=False))
    tokens = []
    for imgs, _, instr in obs:
        comp.set_instruction(instr)
        tokens.append({c: compressed_to_camera_tokens(comp.process(c, im)) for c, im in imgs.items()})
    noise = [torch.randn(1, policy.arch.chunk_size, policy.arch.max_action_dim, generator=torch.Generator().manual_seed(i))
             for i in range(len(obs))]
    half = len(obs) // 2

    # calibrate early exit on the first half: similarities of consecutive observations per layer
    layers = list(range(1, policy.arch.num_vlm_layers - 1))
    from effvla_ros.core.calibration import exit_similarities

    sims = exit_similarities(policy, [(o[0], o[1], o[2]) for o in obs[:half]], layers)
    thr = calibrate_thresholds(sims, ratio=0.7, exit_fraction=0.7)

    settings = [
        ("all off", EarlyExitConfig(), ExpertReuseConfig()),
        ("early exit (calibrated)", EarlyExitConfig(enabled=True, exit_layers=layers, thresholds=thr,
                                                     max_consecutive_reuses=4), ExpertReuseConfig()),
        ("expert reuse", EarlyExitConfig(), ExpertReuseConfig(enabled=True, threshold=0.1, max_consecutive=2)),
        ("both", EarlyExitConfig(enabled=True, exit_layers=layers, thresholds=thr, max_consecutive_reuses=4),
         ExpertReuseConfig(enabled=True, threshold=0.1, max_consecutive=2)),
    ]
    rows = []
    base_actions: list[torch.Tensor] = []
    for name, ee, er in settings:
        runner = PolicyRunner(policy, inference=InferenceConfig(count_flops=True), early_exit=ee, expert_reuse=er)
        pf, df, pt, dtm, exits, dev = [], [], [], [], [], []
        for i in range(half, len(obs)):
            runner.set_instruction(obs[i][2])
            r = runner.infer(tokens[i], obs[i][1], noise=noise[i])
            pf.append(r.flops["prefill"])
            df.append(r.flops["denoise"])
            pt.append(r.times["prefill_s"])
            dtm.append(r.times["denoise_s"])
            exits.append(r.exit_layer)
            if name == "all off":
                base_actions.append(r.actions)
            dev.append(float((r.actions - base_actions[i - half]).abs().max()))
        rows.append((name, statistics.mean(pf), statistics.mean(df), statistics.median(pt), statistics.median(dtm),
                     statistics.mean(exits), max(dev)))
    b = rows[0]
    print(f"\n{'setting':<26}{'prefill GF':>11}{'denoise GF':>11}{'VLM+expert x':>13}{'prefill s':>10}{'denoise s':>10}"
          f"{'time x':>8}{'mean exit':>10}{'max |da|':>9}")
    for name, pf, df, pt, dtm, ex, dev in rows:
        print(f"{name:<26}{pf / 1e9:>11.2f}{df / 1e9:>11.2f}{(pf + df) / (b[1] + b[2]):>13.2f}{pt:>10.3f}{dtm:>10.3f}"
              f"{(pt + dtm) / (b[3] + b[4]):>8.2f}{ex:>10.1f}{dev:>9.4f}")
    print(f"(second half of the sequence: {len(obs) - half} observations; thresholds from the first half: "
          f"{[round(t, 4) for t in thr]} at layers {layers})")

    # ---------------------------------------------------------------- part 2: RTC continuity
    if trained is None:
        print("\npart 2 skipped: no trained checkpoint (continuity of random weights means nothing)")
        return
    policy = trained
    obs2 = episode_observations(max(args.frames, 4 * args.horizon + 2), size, list(policy.cameras))
    comp = TokenCompressor(policy, PruningConfig(method="none"), ReuseConfig(enabled=False))
    toks2 = []
    for imgs, _, instr in obs2:
        comp.set_instruction(instr)
        toks2.append({c: compressed_to_camera_tokens(comp.process(c, im)) for c, im in imgs.items()})
    s = args.horizon
    dt = 1.0
    print(f"\npart 2 on checkpoint {ckpt}: a chunk every s={s} steps, chunk {policy.arch.chunk_size}; boundary jump "
          "= max over joints of |new[d] - old[s+d]| (joint units)")
    print(f"{'delay d':>8}{'rtc':>15}{'mean jump':>11}{'max jump':>10}{'chunks':>8}{'ms/chunk':>10}")
    cases = [(0, "off"), (args.delay, "off"), (args.delay, "jacobian_free"), (args.delay, "vjp"),
             (2 * args.delay, "off"), (2 * args.delay, "jacobian_free"), (2 * args.delay, "vjp")]
    for d, mode in cases:
        if s + d >= policy.arch.chunk_size:
            continue
        rtc_on = mode != "off"
        runner = PolicyRunner(policy, rtc=RTCConfig(enabled=rtc_on, guidance=mode if rtc_on else "jacobian_free"))
        t_inf = []
        prev = None
        jumps = []
        for k, i in enumerate(range(0, len(obs2), s)):
            runner.set_instruction(obs2[i][2])
            guidance = None
            if prev is not None and rtc_on:
                aligned, valid = align_previous_chunk(prev.x_final, 0.0, s * dt, dt, policy.arch.chunk_size)
                guidance = GuidanceTarget(aligned, valid, d)
            r = runner.infer(toks2[i], obs2[i][1], noise=torch.randn(1, policy.arch.chunk_size,
                             policy.arch.max_action_dim, generator=torch.Generator().manual_seed(k)), guidance=guidance)
            t_inf.append(r.times["denoise_s"])
            if prev is not None:
                jumps.append(float((r.actions[d] - prev.actions[s + d]).abs().max()))
            prev = r
        print(f"{d:>8}{mode:>15}{statistics.mean(jumps):>11.4f}{max(jumps):>10.4f}{len(jumps):>8}"
              f"{1e3 * statistics.median(t_inf):>10.1f}")
    print(f"(target: the jump with RTC at d={2 * args.delay} is no larger than without RTC at d=0; ms/chunk = "
          "denoising wall median, vjp adds one backward pass per step)")


if __name__ == "__main__":
    main()
