"""Configuration of the chunk executor core (one ROS parameter per field, see ``param_bridge``)."""
from __future__ import annotations

import dataclasses

from effvla_ros.core.params import ConfigBase, param

#: SO-101 arm joints (5 arm joints + gripper), the default robot of the project.
SO101_JOINTS = ["shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper"]

STRATEGIES = ("rtc", "temporal_ensemble", "crossfade", "latest")
OUTPUT_MODES = ("rolling", "stream")


@dataclasses.dataclass
class ExecutorConfig(ConfigBase):
    """Everything the ROS-free chunk executor needs: joints, limits, merging, timing, watchdog.

    Per-joint lists (``position_lower`` ... ``acceleration_limits``) have one entry per joint of
    ``joint_names`` or a single entry that applies to every joint.
    """

    # -- robot (read-only) ----------------------------------------------------------------------
    joint_names: list[str] = param(
        default_factory=lambda: list(SO101_JOINTS),
        description="Commanded joints, in output order (chunks are matched to them by name).",
        read_only=True,
    )
    urdf_path: str = param(
        "",
        description="Optional URDF file; <limit lower upper velocity> of the named joints override the "
        "position/velocity parameters (acceleration always comes from acceleration_limits).",
        read_only=True,
    )
    position_lower: list[float] = param(
        default_factory=lambda: [-3.14159],
        description="Lower position limit per joint (or one value for all), robot units.",
        min=-1e6,
        max=1e6,
        read_only=True,
    )
    position_upper: list[float] = param(
        default_factory=lambda: [3.14159],
        description="Upper position limit per joint (or one value for all), robot units.",
        min=-1e6,
        max=1e6,
        read_only=True,
    )
    velocity_limits: list[float] = param(
        default_factory=lambda: [2.0],
        description="Maximum |velocity| per joint (or one value for all), units/s.",
        min=1e-6,
        max=1e6,
        read_only=True,
    )
    acceleration_limits: list[float] = param(
        default_factory=lambda: [10.0],
        description="Maximum |acceleration| per joint (or one value for all), units/s^2.",
        min=1e-6,
        max=1e7,
        read_only=True,
    )

    # -- output timing (read-only) --------------------------------------------------------------
    output_mode: str = param(
        "stream",
        description="'stream': one point per control period; 'rolling': a short trajectory of "
        "rolling_points points over rolling_horizon, published at rolling_rate.",
        choices=OUTPUT_MODES,
        read_only=True,
    )
    control_rate: float = param(
        100.0,
        description="Internal command rate (Hz): the limiter's step and the stream publishing rate.",
        min=1.0,
        max=2000.0,
        read_only=True,
    )
    rolling_rate: float = param(
        20.0, description="Publishing rate of the rolling trajectory (Hz).", min=0.5, max=500.0, read_only=True
    )
    rolling_horizon: float = param(
        0.2,
        description="Duration (s) covered by each rolling trajectory; must exceed 1/rolling_rate.",
        min=0.001,
        max=5.0,
        read_only=True,
    )
    rolling_points: int = param(
        10, description="Points per rolling trajectory.", min=2, max=200, read_only=True
    )
    stamp_lead: float = param(
        0.01,
        description="header.stamp of each trajectory = time of its first point = now + stamp_lead "
        "(rounded up to the control grid): slightly in the future so the controller never drops it.",
        min=0.0,
        max=1.0,
        read_only=True,
    )

    # -- merging (live) -------------------------------------------------------------------------
    merge_strategy: str = param(
        "rtc",
        description="How a new chunk joins the timeline: rtc (after what the policy was told is "
        "committed), temporal_ensemble (ACT weights exp(-m*i)), crossfade, latest.",
        choices=STRATEGIES,
    )
    blend_time: float = param(
        0.2,
        description="Every strategy: the disagreement between the committed command and the merged "
        "targets at the commit time fades out over this time (s) (quintic, C1). 0 = none (the limiter "
        "absorbs it).",
        min=0.0,
        max=2.0,
    )
    crossfade_window: float = param(
        0.3, description="crossfade: blend duration (s) from the old to the new chunk.", min=0.0, max=5.0
    )
    ensemble_m: float = param(
        0.01,
        description="temporal_ensemble: weight exp(-m*i) of the i-th oldest prediction of a time step.",
        min=0.0,
        max=10.0,
    )
    max_future: float = param(
        1.0,
        description="Chunks whose observation stamp is more than this (s) in the future are rejected "
        "(clock mismatch).",
        min=0.0,
        max=60.0,
    )

    # -- watchdog (live) ------------------------------------------------------------------------
    watchdog_timeout: float = param(
        0.5,
        description="No accepted chunk for this long (s): decelerate within the acceleration limits "
        "and hold.",
        min=0.01,
        max=60.0,
    )

    def validate(self) -> None:
        n = len(self.joint_names)
        if n == 0:
            raise ValueError("joint_names: at least one joint is required")
        if len(set(self.joint_names)) != n:
            raise ValueError("joint_names: names must be unique")
        for name in ("position_lower", "position_upper", "velocity_limits", "acceleration_limits"):
            ln = len(getattr(self, name))
            if ln not in (1, n):
                raise ValueError(f"{name}: needs 1 or {n} values (one per joint), got {ln}")
        lo = self.per_joint(self.position_lower)
        hi = self.per_joint(self.position_upper)
        for i, (a, b) in enumerate(zip(lo, hi)):
            if not a < b:
                raise ValueError(f"position_upper: {b} must be above position_lower {a} ({self.joint_names[i]})")
        if self.output_mode == "rolling" and self.rolling_horizon <= 1.0 / self.rolling_rate:
            raise ValueError(
                f"rolling_horizon: {self.rolling_horizon} s must exceed the rolling period "
                f"{1.0 / self.rolling_rate:.4f} s (1/rolling_rate)"
            )
        if self.output_mode == "rolling" and self.rolling_rate > self.control_rate:
            raise ValueError("rolling_rate: must not exceed control_rate")

    def per_joint(self, values: list[float]) -> list[float]:
        """``values`` expanded to one entry per joint."""
        return list(values) * len(self.joint_names) if len(values) == 1 else list(values)

    @property
    def control_period(self) -> float:
        return 1.0 / self.control_rate

    @property
    def publish_period(self) -> float:
        return 1.0 / (self.rolling_rate if self.output_mode == "rolling" else self.control_rate)
