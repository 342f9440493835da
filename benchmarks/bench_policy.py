"""Policy-side benchmark: VLM early exit and expert feature reuse (compute and time per stage),
and real-time chunking continuity at chunk boundaries at several inference delays — side by side
in one run, on a moving simulated manipulation sequence (scripted SO-101 pick-and-place).

    python benchmarks/bench_policy.py [--frames 32] [--checkpoint DIR] [--real-size] [--threads 1]

Part 1 (compute): for every observation of the second half of the sequence, the prefix/expert
FLOPs (torch.utils.flop_counter; a separate pass without the counter gives the wall medians) with
every optimization off, with VLM early exit only, expert reuse only, and both (the efficient
setting), all averaged over the same observations. The thresholds of both are calibrated
(``effvla_ros.core.calibration.calibrate``, what ``effvla calibrate-exit`` runs) on the FIRST half
of the sequence and loaded from the YAML it writes, as the node does. Reference rows: the spread
of the unmodified policy between two noise draws, and fewer denoising steps at a similar compute.
``max |da|`` / ``mean |da|``: largest / mean absolute action difference vs "all off" with the same
noise (joint units), over all measured chunks. ``--real-size`` uses the real SmolVLA-450M shapes
with random weights (the compute split is what matters there; similarity statistics of random
weights are not representative of a trained model).

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
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--checkpoint", default=None, help="default: the bundled default, effvla_ros/assets/so101_pickplace_pruned")
    ap.add_argument("--real-size", action="store_true", help="part 1 on the real SmolVLA-450M shapes (random weights)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ratio", type=float, default=0.7, help="VLM exit calibration: p_k ~ ratio^k (DeeR)")
    ap.add_argument("--exit-fraction", type=float, default=0.7, help="VLM exit calibration: fraction exiting early")
    ap.add_argument("--exit-max-consecutive", type=int, default=3, help="early_exit.max_consecutive_reuses")
    ap.add_argument("--exit-layers", default="", help="comma-separated candidate VLM exit layers (default 1 .. L-2)")
    ap.add_argument("--expert-reuse-fraction", type=float, default=0.65,
                    help="expert calibration: target fraction of expert layer evaluations reused")
    ap.add_argument("--expert-max-consecutive", type=int, default=4, help="expert_reuse.max_consecutive")
    ap.add_argument("--full-steps", type=int, default=1, help="expert_reuse.full_steps")
    ap.add_argument("--final-steps", type=int, default=1, help="expert_reuse.final_steps")
    ap.add_argument("--no-extrapolate", action="store_true", help="expert_reuse.extrapolate = false")
    ap.add_argument("--sweep", nargs="*", default=[],
                    help="extra 'both' rows: FRACTION[:MAX_CONSECUTIVE[:plain]] (expert target, its max_consecutive, "
                         "'plain' = no extrapolation)")
    ap.add_argument("--steps-ref", type=int, nargs="*", default=[], help="reference rows: all off at N steps")
    ap.add_argument("--calibration-out", default=None, help="keep the calibration YAML here")
    ap.add_argument("--skip-rtc", action="store_true", help="part 1 only")
    ap.add_argument("--horizon", type=int, default=5, help="execution horizon s (actions per chunk executed)")
    ap.add_argument("--delay", type=int, default=2, help="nominal inference delay in control steps")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import tempfile
    from pathlib import Path

    from effvla_ros.core.compression.compressor import ReuseConfig, TokenCompressor
    from effvla_ros.core.compression.pruning import PruningConfig
    from effvla_ros.core.early_exit import EarlyExitConfig, ExpertReuseConfig
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
    noise_b = [torch.randn(1, policy.arch.chunk_size, policy.arch.max_action_dim,
                           generator=torch.Generator().manual_seed(1000 + i)) for i in range(len(obs))]
    half = len(obs) // 2

    # calibration on the first half (VLM exit thresholds + expert reuse thresholds), written to a YAML
    from effvla_ros.core.calibration import collect, thresholds_from
    from effvla_ros.core.early_exit import load_calibration, save_calibration

    num_steps = policy.num_steps
    er_rule = ExpertReuseConfig(enabled=True, max_consecutive=args.expert_max_consecutive, full_steps=args.full_steps,
                                final_steps=args.final_steps, extrapolate=not args.no_extrapolate)
    layers = ([int(x) for x in args.exit_layers.split(",")] if args.exit_layers
              else list(range(1, policy.arch.num_vlm_layers - 1)))
    sims, changes = collect(policy, [(o[0], o[1], o[2]) for o in obs[:half]], layers, expert_steps=num_steps)

    def calibration(fraction: float, rule: ExpertReuseConfig = er_rule) -> dict:  # type: ignore[type-arg]
        return thresholds_from(sims, changes, layers, ratio=args.ratio, exit_fraction=args.exit_fraction,
                               expert_reuse_fraction=fraction, expert=rule, num_steps=num_steps)

    cal = calibration(args.expert_reuse_fraction)
    cal_file = Path(args.calibration_out or Path(tempfile.mkdtemp()) / "exit.yaml")
    save_calibration(cal_file, cal.pop("exit_layers"), cal.pop("thresholds"), **cal)
    cal_data = load_calibration(cal_file)
    ee_on = EarlyExitConfig(enabled=True, calibration_file=str(cal_file),
                            max_consecutive_reuses=args.exit_max_consecutive)
    er_on = ExpertReuseConfig(**{**er_rule.to_dict(), "calibration_file": str(cal_file)})

    settings: list[tuple[str, EarlyExitConfig, ExpertReuseConfig, int, list[torch.Tensor]]] = [
        ("all off", EarlyExitConfig(), ExpertReuseConfig(), num_steps, noise),
        ("all off, other noise", EarlyExitConfig(), ExpertReuseConfig(), num_steps, noise_b),
        ("early exit only", ee_on, ExpertReuseConfig(), num_steps, noise),
        ("expert reuse only", EarlyExitConfig(), er_on, num_steps, noise),
        ("expert reuse, uncalibrated", EarlyExitConfig(), ExpertReuseConfig(enabled=True), num_steps, noise),
        ("both (efficient)", ee_on, er_on, num_steps, noise),
    ]
    for spec in args.sweep:  # FRACTION[:MAX_CONSECUTIVE[:plain]]
        parts = spec.split(":")
        f = float(parts[0])
        mc = int(parts[1]) if len(parts) > 1 and parts[1] else er_rule.max_consecutive
        plain = len(parts) > 2 and parts[2] == "plain"
        rule = ExpertReuseConfig(**{**er_rule.to_dict(), "max_consecutive": mc, "extrapolate": not plain})
        er_f = ExpertReuseConfig(**{**rule.to_dict(), "thresholds": calibration(f, rule)["expert_thresholds"]})
        settings.append((f"both, expert {f:g}, max {mc}{', plain' if plain else ''}", ee_on, er_f, num_steps, noise))
    for k in args.steps_ref:
        settings.append((f"all off, {k} steps", EarlyExitConfig(), ExpertReuseConfig(), k, noise))

    n_exp = len(policy.expert_layer_indices())
    # settings interleaved per observation (machine load spreads evenly); a FLOP-counting runner and a
    # timed one walk the same sequence (counting does not change the numerics, only the time)
    runners = [(PolicyRunner(policy, inference=InferenceConfig(num_steps=steps, count_flops=True), early_exit=ee,
                             expert_reuse=er),
                PolicyRunner(policy, inference=InferenceConfig(num_steps=steps), early_exit=ee, expert_reuse=er))
               for _, ee, er, steps, _ in settings]
    acc: list[dict[str, list[float]]] = [{k: [] for k in ("pf", "df", "pt", "dt", "exit", "comp", "dmax", "dmean")}
                                         for _ in settings]
    joint_max: list[torch.Tensor] = [torch.zeros(policy.arch.action_dim) for _ in settings]
    for i in range(half, len(obs)):
        base = None
        for k, ((_name, _, _, steps, nz), (counted, timed)) in enumerate(zip(settings, runners)):
            counted.set_instruction(obs[i][2])
            timed.set_instruction(obs[i][2])
            r = counted.infer(tokens[i], obs[i][1], noise=nz[i])
            rt = timed.infer(tokens[i], obs[i][1], noise=nz[i])
            if base is None:
                base = r.actions
            d = (r.actions - base).abs()
            a = acc[k]
            a["pf"].append(r.flops["prefill"])
            a["df"].append(r.flops["denoise"])
            a["pt"].append(rt.times["prefill_s"])
            a["dt"].append(rt.times["denoise_s"])
            a["exit"].append(r.exit_layer)
            a["comp"].append(r.computed_expert_layers / (n_exp * steps))
            a["dmax"].append(float(d.max()))
            a["dmean"].append(float(d.mean()))
            joint_max[k] = torch.maximum(joint_max[k], d.amax(0))
    rows = [(name, statistics.mean(a["pf"]), statistics.mean(a["df"]), statistics.median(a["pt"]),
             statistics.median(a["dt"]), statistics.mean(a["exit"]), statistics.mean(a["comp"]), max(a["dmax"]),
             statistics.mean(a["dmean"])) for (name, *_), a in zip(settings, acc)]
    b = rows[0]
    print(f"\nall off: prefill {b[1] / 1e9:.4f} GFLOP ({b[1] / (b[1] + b[2]):.0%}), denoise {b[2] / 1e9:.4f} GFLOP "
          f"({b[2] / (b[1] + b[2]):.0%}) per observation, {num_steps} steps, {n_exp} expert layers")
    print(f"\n{'setting':<28}{'prefill GF':>11}{'denoise GF':>11}{'VLM+exp x':>10}{'prefill s':>10}{'denoise s':>10}"
          f"{'time x':>7}{'exit':>6}{'expert':>7}{'max|da|':>9}{'mean|da|':>9}")
    for name, pf, df, pt, dtm, ex, comp_frac, dmx, dmn in rows:
        print(f"{name:<28}{pf / 1e9:>11.4f}{df / 1e9:>11.4f}{(pf + df) / (b[1] + b[2]):>10.3f}{pt:>10.4f}{dtm:>10.4f}"
              f"{(pt + dtm) / (b[3] + b[4]):>7.2f}{ex:>6.2f}{comp_frac:>7.2f}{dmx:>9.4f}{dmn:>9.4f}")
    print(f"(second half of the sequence: {len(obs) - half} observations; exit = mean VLM layers computed of "
          f"{policy.arch.num_vlm_layers}; expert = fraction of expert layer evaluations computed (of {num_steps} "
          f"steps); calibration on the first half, {cal_file}: exit layers {cal_data['exit_layers']} thresholds "
          f"{[round(t, 4) for t in cal_data['thresholds']]}, expert thresholds "
          f"{[round(t, 4) for t in cal_data.get('expert_thresholds', [])]} for a target reuse fraction "
          f"{args.expert_reuse_fraction} (simulated on the calibration half: "
          f"{[round(t, 3) for t in cal_data.get('expert_reuse_fraction_per_layer', [])]}))")
    print("max |da| per joint: " + "; ".join(f"{name}: {[round(float(x), 3) for x in jm]}"
                                              for (name, *_), jm in zip(settings, joint_max) if name != "all off"))
    if args.skip_rtc:
        return

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
