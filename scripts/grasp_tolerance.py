#!/usr/bin/env python3
"""How far off the cube's centre can the SO-101's grasp be aimed and still pick and place the cube?

Runs the scripted expert (``lerobot_env_so101``'s ``PickPlaceController``) on the two-cube task with its
grasp aimed at ``centre + r * (cos a, sin a)`` for radii ``--radii`` and 8 directions ``a`` (0 deg: radially
away from the robot base, 90 deg: tangential, counter-clockwise seen from above), and prints how many of
the episodes succeed. The measurement behind ``effvla_ros.sim.env.GRASP_AIM_OFFSET``:

    python scripts/grasp_tolerance.py --seeds 0 8                       # aimed around the cube's centre
    python scripts/grasp_tolerance.py --seeds 8 8 --centre 0 -0.008 --radii 0.006 0.010

No rendering; about 1 s per episode on one core.
"""
from __future__ import annotations

import argparse
import os

import numpy as np


def run(env, seed: int, aim: tuple[float, float]) -> bool:
    from effvla_ros.sim.dataset import record_episode

    return bool(record_episode(env, seed, render=False, aim_offset=aim)["next.success"][-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs=2, default=(0, 8), metavar=("FIRST", "COUNT"))
    p.add_argument("--centre", type=float, nargs=2, default=(0.0, 0.0), metavar=("RADIAL", "TANGENTIAL"),
                   help="aim offset around which to test, metres (default 0 0: the cube's centre)")
    p.add_argument("--radii", type=float, nargs="+", default=(0.004, 0.008, 0.012), help="metres")
    args = p.parse_args()
    os.environ.setdefault("MUJOCO_GL", "egl")
    from effvla_ros.sim.env import SimConfig, TwoCubePickPlaceEnv

    env = TwoCubePickPlaceEnv(SimConfig(image_size=32, cameras=["scene"]))
    seeds = range(args.seeds[0], args.seeds[0] + args.seeds[1])
    centre = np.asarray(args.centre, dtype=np.float64)
    ok = sum(run(env, s, tuple(centre)) for s in seeds)
    print(f"aimed at ({100 * centre[0]:+.1f}, {100 * centre[1]:+.1f}) cm (radial, tangential): {ok}/{len(seeds)}")
    for radius in args.radii:
        row = []
        for deg in range(0, 360, 45):
            aim = centre + radius * np.array([np.cos(np.radians(deg)), np.sin(np.radians(deg))])
            row.append(f"{deg:3d} deg {sum(run(env, s, tuple(aim)) for s in seeds)}/{len(seeds)}")
        print(f"  + {100 * radius:.1f} cm at " + ", ".join(row), flush=True)
    env.close()


if __name__ == "__main__":
    main()
