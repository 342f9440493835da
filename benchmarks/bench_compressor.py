"""Token compressor benchmark: encoder compute and wall time with temporal reuse and pruning,
side by side in one run, on a simulated manipulation sequence (SO-101 arm moving in front of a
static scene: a fixed third-person camera and a wrist camera), with the REAL SmolVLA encoder
size (SigLIP 768-d x 12 at 512 px, 64 tokens per camera) and random weights.

    python benchmarks/bench_compressor.py [--frames 16] [--render 256] [--threads 2]

Reports per setting: encoder GFLOP per frame (counted with torch.utils.flop_counter on the
operations actually run) and its ratio to full, wall-clock median per frame and its ratio, the
kinds of frames (full / partial / reuse), tokens kept, and the token error against a full encode of
the same frame (relative L2 of the connector outputs, mean and max over frames).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def sequence(n: int, size: int, seed: int = 3) -> list[dict[str, torch.Tensor]]:
    """Frames of a scripted pick-and-place episode: {camera: (3, H, W) float in [0, 1]}."""
    from lerobot_env_so101.scripted import PickPlaceController  # type: ignore[import-not-found]

    from effvla_ros.sim.env import SimConfig, TwoCubePickPlaceEnv

    env = TwoCubePickPlaceEnv(SimConfig(image_size=size), seed=seed)
    env.reset(seed=seed)
    ctrl = PickPlaceController()
    frames = []
    for _ in range(n):
        imgs = {c: env.render(c) for c in env.config.cameras}
        frames.append({c: torch.from_numpy(im.copy()).permute(2, 0, 1).float() / 255.0 for c, im in imgs.items()})
        env.step(env.expert_action(ctrl))
    return frames


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--render", type=int, default=256, help="rendered camera size (resized with padding to 512)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--quick", action="store_true", help="only full, patch-level reuse and the default")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from effvla_ros.core.compression.compressor import ReuseConfig, TokenCompressor
    from effvla_ros.core.compression.pruning import PruningConfig
    from effvla_ros.core.smolvla import RuntimeConfig, build_random_policy, smolvla_450m_arch
    from effvla_ros.core.smolvla.tokenizer import build_tiny_tokenizer
    from effvla_ros.sim.task import all_instructions

    t0 = time.perf_counter()
    frames = sequence(args.frames, args.render)
    print(f"rendered {len(frames)} frames x {list(frames[0])} at {args.render} px in {time.perf_counter() - t0:.1f} s")
    arch = smolvla_450m_arch(cameras=tuple(frames[0]))
    tok = build_tiny_tokenizer(corpus=list(all_instructions()), vocab_size=600)
    t0 = time.perf_counter()
    policy = build_random_policy(arch,
                                 tokenizer=tok, init="transformers",
                                 runtime=RuntimeConfig(vision_dtype=args.dtype, num_threads=args.threads))
    print(f"built real-size SmolVLA ({sum(p.numel() for p in policy.weights.parameters()) / 1e6:.0f} M params, "
          f"random weights) in {time.perf_counter() - t0:.1f} s; vision {args.dtype}, {args.threads} threads")
    instruction = "pick up the red cube and place it on the plate"

    # Every setting runs twice over the same frames: once with exact FLOP counting (FLOPs, decisions,
    # token error) and once without counting (wall time), so the counter's overhead is not timed.
    settings = [
        ("full (reuse off, no pruning)", PruningConfig(method="none"), ReuseConfig(enabled=False)),
        ("frame-level reuse", PruningConfig(method="none"), ReuseConfig(patch_level=False)),
        ("patch-level reuse (default)", PruningConfig(method="none"), ReuseConfig()),
        ("patch reuse, dilation 0, keyframe 16", PruningConfig(method="none"),
         ReuseConfig(dilation=0, keyframe_interval=16)),
        ("default: patch reuse + task 0.5", PruningConfig(keep_ratio=0.5), ReuseConfig()),
    ]
    if args.quick:  # pruning does not change the encoder; frame-level reuse needs static frames
        settings = [settings[0], settings[2], settings[3]]
    full_tokens: list[dict[str, torch.Tensor]] = []
    rows = []
    for name, pr, ru in settings:
        counted = TokenCompressor(policy, pr, ru, count_flops=True)
        timed = TokenCompressor(policy, pr, ru, count_flops=False)
        for c in (counted, timed):
            c.set_instruction(instruction)
        flops, walls, kinds, kept, errs = [], [], {"full": 0, "partial": 0, "reuse": 0}, [], []
        for i, f in enumerate(frames):
            fl, wl = 0, 0.0
            for cam, img in f.items():
                out = counted.process(cam, img)
                t0 = time.perf_counter()
                timed.process(cam, img)
                wl += time.perf_counter() - t0
                fl += out.encoder_flops
                kinds[out.kind] += 1
                kept.append(len(out.kept) / (out.grid[0] * out.grid[1]))
                if not full_tokens or len(full_tokens) <= i:
                    full_tokens.append({})
                ref_t = full_tokens[i].setdefault(cam, out.all_tokens.clone())  # first setting = full encodes
                errs.append(float((out.all_tokens - ref_t).norm() / ref_t.norm()))
            flops.append(fl)
            walls.append(wl)
        rows.append((name, flops, walls, kinds, statistics.mean(kept), statistics.mean(errs), max(errs)))
    base_f, base_w = statistics.mean(rows[0][1]), statistics.mean(rows[0][2])
    base_fs, base_ws = statistics.mean(rows[0][1][1:]), statistics.mean(rows[0][2][1:])
    print(f"\n{'setting':<34}{'GFLOP/frame':>12}{'x full':>8}{'steady x':>9}{'wall med s':>11}{'x full':>8}"
          f"{'steady x':>9}{'kept':>6}{'err mean':>9}{'err max':>8}  full/partial/reuse")
    for name, fl, wl, kinds, kept, em, ex in rows:
        print(f"{name:<34}{statistics.mean(fl) / 1e9:>12.1f}{statistics.mean(fl) / base_f:>8.2f}"
              f"{statistics.mean(fl[1:]) / base_fs:>9.2f}{statistics.median(wl):>11.3f}{statistics.mean(wl) / base_w:>8.2f}"
              f"{statistics.mean(wl[1:]) / base_ws:>9.2f}{kept:>6.2f}{em:>9.4f}{ex:>8.4f}  "
              f"{kinds['full']}/{kinds['partial']}/{kinds['reuse']}")
    print("\nPer frame, all cameras together. 'x full': mean over the sequence / the first row's mean; 'steady x': the "
          "same without the first (cold) frame. FLOPs counted with torch.utils.flop_counter; wall measured in a "
          "second pass without counting. Token error: relative L2 of the connector outputs vs a full encode.")

if __name__ == "__main__":
    main()
