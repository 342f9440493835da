"""``effvla gen-demos``: scripted demonstrations of the two-cube task in simulation.

Runs ``lerobot_env_so101``'s scripted pick-and-place expert on consecutive seeds (``--seed``,
``--seed`` + 1, ...) of :mod:`effvla_ros.sim`'s language-conditioned two-cube task and records both
cameras, the joint positions, the joint-position targets and the instruction at 10 Hz. Writes
``OUT/index.json`` + ``OUT/episodes/episode_NNNNNN.npz``; the format is documented in
:mod:`effvla_ros.sim.dataset`. Only successful episodes are kept unless ``--keep-failed``; the
command fails (exit 1) if fewer than ``--episodes`` could be produced within ``--max-attempts``.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--episodes", type=int, required=True, help="number of episodes to write")
    parser.add_argument("--out", type=Path, required=True, help="output directory (created)")
    parser.add_argument("--image-size", type=int, default=224, help="camera image size in pixels (default 224)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first episode (default 0)")
    parser.add_argument("--cameras", default="scene,wrist", help="comma-separated cameras (default scene,wrist)")
    parser.add_argument("--max-steps", type=int, default=200, help="frames per episode at most (10 Hz; default 200)")
    parser.add_argument("--max-attempts", type=int, default=None, help="episodes to try at most (default 2N+10; 4N+10 with --regrasp)")
    parser.add_argument("--keep-failed", action="store_true", help="also write episodes the expert failed")
    parser.add_argument("--canonical", action="store_true",
                        help="canonical instruction wording only (no paraphrases)")
    parser.add_argument("--mesh-faces", type=int, default=None,
                        help="triangles per decimated visual mesh (0: original meshes; default 1500)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1; the result is the same)")
    parser.add_argument("--perturb", action="store_true",
                        help="DART perturbations of the free-space motion (labels stay the expert's; "
                             "see effvla_ros.sim.dataset.Perturbation for the defaults)")
    parser.add_argument("--perturb-prob", type=float, default=None,
                        help="with --perturb: probability per free-space step of starting a perturbation")
    parser.add_argument("--aim-offset", type=float, nargs=2, default=(0.0, 0.0), metavar=("RADIAL", "TANGENTIAL"),
                        help="where the expert grasps relative to the cube's centre, metres (radial from the robot "
                             "base, tangential counter-clockwise); default 0 0; effvla_ros.sim.env.GRASP_AIM_OFFSET "
                             "is the measured robust choice")
    parser.add_argument("--regrasp", action="store_true",
                        help="re-grasp demonstrations: the expert first grasps 1.8-3 cm off the cube's centre and "
                             "fails, then recovers and completes the task; the failed attempt's frames are marked "
                             "failed_grasp and not trained on; an off-centre grasp that holds the cube discards the "
                             "episode (see effvla_ros.sim.dataset.Regrasp; default --max-attempts 4N+10)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("MUJOCO_GL", "egl")
    from effvla_ros.sim.dataset import Perturbation, Regrasp, generate

    if args.episodes < 1:
        print("effvla gen-demos: --episodes must be at least 1", file=sys.stderr)
        return 2
    cameras = tuple(c.strip() for c in args.cameras.split(",") if c.strip())
    perturb = None
    if args.perturb:
        try:
            perturb = Perturbation() if args.perturb_prob is None else Perturbation(prob=args.perturb_prob)
        except ValueError as e:
            print(f"effvla gen-demos: --perturb-{e}", file=sys.stderr)
            return 2
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=args.episodes, unit="ep", desc="gen-demos")

    def progress(p: dict) -> None:
        if bar is not None:
            bar.n = p["kept"]
            bar.set_postfix(attempts=p["attempts"], success=f"{p['successes'] / p['attempts']:.0%}")
            bar.refresh()

    try:
        index = generate(
            args.out,
            args.episodes,
            image_size=args.image_size,
            seed=args.seed,
            cameras=cameras,
            max_steps=args.max_steps,
            keep_failed=args.keep_failed,
            max_attempts=args.max_attempts,
            paraphrase=not args.canonical,
            mesh_faces=args.mesh_faces,
            workers=max(1, args.workers),
            perturb=perturb,
            aim_offset=tuple(args.aim_offset),
            regrasp=Regrasp() if args.regrasp else None,
            progress=progress,
        )
    except ValueError as e:
        print(f"effvla gen-demos: {e}", file=sys.stderr)
        return 2
    finally:
        if bar is not None:
            bar.close()
    s = index["stats"]
    print(
        f"wrote {s['kept']} episodes ({s['frames']} frames) to {args.out}; expert success "
        f"{s['successes']}/{s['attempts']} ({s['expert_success_rate']:.0%}); "
        f"{s['seconds_per_episode']:.2f} s per episode and worker, {s['wall_s']:.1f} s in all"
    )
    return 0 if s["kept"] >= args.episodes else 1
