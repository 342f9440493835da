"""Per-joint limits: from the config, optionally overridden by a URDF's ``<limit>`` elements."""
from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from effvla_ros.core.executor.config import ExecutorConfig

FloatArray = NDArray[np.float64]


@dataclasses.dataclass(frozen=True)
class UrdfJointLimit:
    lower: float | None
    upper: float | None
    velocity: float | None


def parse_urdf_limits(path: str | Path, joint_names: list[str]) -> dict[str, UrdfJointLimit]:
    """``<limit lower upper velocity>`` of the named joints of a URDF file.

    Joints absent from the file, or without a ``<limit>``, are absent from the result; continuous
    joints have no position limits (``lower``/``upper`` None); a ``mimic``/fixed joint is ignored.
    Raises ``ValueError`` for an unreadable file.
    """
    try:
        root = ET.parse(str(path)).getroot()
    except (OSError, ET.ParseError) as e:
        raise ValueError(f"urdf_path: cannot read {path}: {e}") from None
    wanted = set(joint_names)
    out: dict[str, UrdfJointLimit] = {}
    for joint in root.iter("joint"):
        name = joint.get("name")
        if name not in wanted:
            continue
        lim = joint.find("limit")
        if lim is None:
            continue

        def num(attr: str, lim: ET.Element = lim) -> float | None:
            v = lim.get(attr)
            return float(v) if v is not None else None

        jtype = joint.get("type", "")
        lower, upper = (None, None) if jtype == "continuous" else (num("lower"), num("upper"))
        if lower is not None and upper is not None and not lower < upper:
            lower = upper = None  # URDF convention: lower == upper means "no position limit"
        vel = num("velocity")
        out[name] = UrdfJointLimit(lower, upper, vel if vel is not None and vel > 0 else None)
    return out


@dataclasses.dataclass(frozen=True)
class JointLimits:
    """Arrays of shape (D,) in the order of ``names``."""

    names: tuple[str, ...]
    lower: FloatArray
    upper: FloatArray
    velocity: FloatArray
    acceleration: FloatArray

    @classmethod
    def from_config(cls, cfg: ExecutorConfig) -> JointLimits:
        lower = np.array(cfg.per_joint(cfg.position_lower), dtype=np.float64)
        upper = np.array(cfg.per_joint(cfg.position_upper), dtype=np.float64)
        vel = np.array(cfg.per_joint(cfg.velocity_limits), dtype=np.float64)
        acc = np.array(cfg.per_joint(cfg.acceleration_limits), dtype=np.float64)
        if cfg.urdf_path:
            urdf = parse_urdf_limits(cfg.urdf_path, cfg.joint_names)
            for i, name in enumerate(cfg.joint_names):
                lim = urdf.get(name)
                if lim is None:
                    continue
                if lim.lower is not None and lim.upper is not None:
                    lower[i], upper[i] = lim.lower, lim.upper
                if lim.velocity is not None:
                    vel[i] = lim.velocity
        return cls(tuple(cfg.joint_names), lower, upper, vel, acc)

    def violations(self, positions: FloatArray, velocities: FloatArray, tol: float = 1e-9) -> list[str]:
        """Human-readable list of position/velocity limit violations of one command (for tests)."""
        out = []
        for i, n in enumerate(self.names):
            if not self.lower[i] - tol <= positions[i] <= self.upper[i] + tol:
                out.append(f"{n}: position {positions[i]} outside [{self.lower[i]}, {self.upper[i]}]")
            if abs(velocities[i]) > self.velocity[i] * (1 + tol) + tol:
                out.append(f"{n}: |velocity| {abs(velocities[i])} > {self.velocity[i]}")
        return out
