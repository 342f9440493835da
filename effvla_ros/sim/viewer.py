"""A viewer camera for videos of the simulation, apart from the policy's cameras.

:class:`ViewerCamera` renders the scene from a free (``mjvCamera``) camera framing the arm and the
workspace, at any size up to the model's offscreen buffer (640 x 480), on a **copy** of the model and
its own ``MjData``: :meth:`render` takes a ``qpos`` snapshot of the simulation and runs only the
kinematics on its own data, so the simulation's physics, its renderer and its cameras (the policy's
64 px views) are untouched. Create and use it in one thread (it owns a GL context).
"""
from __future__ import annotations

import copy
from typing import Any

import mujoco
import numpy as np

# Free camera: over the arm's right shoulder (behind the base, -y side), looking down at the workspace, so
# the arm does not hide the cubes and the markers.
VIEW_LOOKAT = (0.15, 0.0, 0.08)
VIEW_DISTANCE = 0.62
VIEW_AZIMUTH = 60.0  # degrees
VIEW_ELEVATION = -40.0  # degrees


class ViewerCamera:
    """Renders ``(size[0], size[1])`` (height, width) RGB frames of ``model`` from a free camera."""

    def __init__(self, model: mujoco.MjModel, height: int = 320, width: int = 320, *, shadows: bool = False) -> None:
        self.model = copy.deepcopy(model)
        off = self.model.vis.global_
        off.offwidth, off.offheight = max(int(off.offwidth), width), max(int(off.offheight), height)
        self.data = mujoco.MjData(self.model)
        self.height, self.width = int(height), int(width)
        self.camera = mujoco.MjvCamera()
        self.camera.type = mujoco.mjtCamera.mjCAMERA_FREE
        self.camera.lookat[:] = VIEW_LOOKAT
        self.camera.distance = VIEW_DISTANCE
        self.camera.azimuth = VIEW_AZIMUTH
        self.camera.elevation = VIEW_ELEVATION
        self._renderer: Any = None
        self._shadows = shadows

    def sync_model(self, model: mujoco.MjModel) -> None:
        """Take the per-episode appearance of ``model`` (cube colours, marker positions: set at reset)."""
        self.model.geom_rgba[:] = model.geom_rgba
        self.model.geom_pos[:] = model.geom_pos

    def render(self, qpos: np.ndarray) -> np.ndarray:
        """An (H, W, 3) uint8 frame of the simulation state ``qpos`` (a copy of ``MjData.qpos``)."""
        if self._renderer is None:
            self._renderer = mujoco.Renderer(self.model, height=self.height, width=self.width)
            self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = self._shadows
            self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = False
        self.data.qpos[:] = qpos
        mujoco.mj_kinematics(self.model, self.data)
        mujoco.mj_camlight(self.model, self.data)
        self._renderer.update_scene(self.data, camera=self.camera)
        return self._renderer.render().copy()

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
