"""Offscreen render speed of the scene, original vs decimated visual meshes.

``python -m effvla_ros.sim.bench [--size 224] [--frames 60] [--faces 1500]`` prints frames per second
per camera (shadows and multisampling off, as the environment renders) for the original
322k-triangle meshes and for the decimated ones.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("MUJOCO_GL", "egl")


def render_fps(size: int, frames: int, mesh_faces: int) -> dict[str, float]:
    from effvla_ros.sim.env import SimConfig, TwoCubePickPlaceEnv

    env = TwoCubePickPlaceEnv(SimConfig(image_size=size, mesh_faces=mesh_faces), seed=0)
    try:
        out = {}
        for cam in env.config.cameras:
            env.render(cam)  # warm-up (context, mesh upload)
            t = time.perf_counter()
            for _ in range(frames):
                env.render(cam)
            out[cam] = frames / (time.perf_counter() - t)
        return out
    finally:
        env.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--frames", type=int, default=60)
    p.add_argument("--faces", type=int, default=1500, help="triangles per decimated mesh")
    a = p.parse_args(argv)
    for label, faces in (("original meshes", 0), (f"decimated ({a.faces}/mesh)", a.faces)):
        fps = render_fps(a.size, a.frames, faces)
        print(f"{label:>24}: " + ", ".join(f"{c} {v:.1f} FPS" for c, v in fps.items()) + f" at {a.size} px")


if __name__ == "__main__":
    main()
