"""ROS-free chunk executor: action timeline, merge strategies, C1 interpolation, limits, watchdog.

Public API::

    ExecutorConfig        the typed config (one ROS parameter per field)
    JointLimits           per-joint limits (config and/or URDF), parse_urdf_limits()
    Chunk, Reference      a validated chunk; the C1 cubic Hermite reference
    merge()               the merge strategies (rtc, temporal_ensemble, crossfade, latest)
    Limiter               position/velocity/acceleration command limiter
    ChunkExecutorCore     validation + merging + limiting + watchdog + output points + feedback
    PeriodJitter          publication period error statistics
"""
from effvla_ros.core.executor.config import OUTPUT_MODES, SO101_JOINTS, STRATEGIES, ExecutorConfig
from effvla_ros.core.executor.executor import (
    ChunkExecutorCore,
    ChunkResult,
    Command,
    CorrectionResult,
    ExecState,
    ExecutorStats,
    Feedback,
    PeriodJitter,
    Verdict,
)
from effvla_ros.core.executor.limiter import Limiter
from effvla_ros.core.executor.limits import JointLimits, UrdfJointLimit, parse_urdf_limits
from effvla_ros.core.executor.timeline import (
    Chunk,
    Correction,
    MergeResult,
    Reference,
    ensemble_weights,
    hermite_tangents,
    merge,
    smoothstep5,
)

__all__ = [
    "OUTPUT_MODES",
    "SO101_JOINTS",
    "STRATEGIES",
    "Chunk",
    "ChunkExecutorCore",
    "ChunkResult",
    "CorrectionResult",
    "Command",
    "Correction",
    "ExecState",
    "ExecutorConfig",
    "ExecutorStats",
    "Feedback",
    "JointLimits",
    "Limiter",
    "MergeResult",
    "PeriodJitter",
    "Reference",
    "UrdfJointLimit",
    "Verdict",
    "ensemble_weights",
    "hermite_tangents",
    "merge",
    "parse_urdf_limits",
    "smoothstep5",
]
