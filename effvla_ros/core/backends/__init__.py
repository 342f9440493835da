"""Runtimes of the three inference stages behind one seam (:mod:`.base`).

``eager``: the reference (:class:`~effvla_ros.core.smolvla.policy.SmolVLAPolicy`'s own layer loops, equal to
LeRobot 0.6.1). Further backends (compiled, ONNX Runtime, TensorRT) implement the same
:class:`~.base.StageBackend` protocol and declare what they support in :class:`~.base.Capabilities`; the
runner (:mod:`effvla_ros.core.runner`) and the token compressor write every hook once, against the protocol.
"""
from .base import BACKENDS, EXPORTED_BACKENDS, Capabilities, StageBackend, make_backend
from .eager import EagerBackend

__all__ = ["BACKENDS", "EXPORTED_BACKENDS", "Capabilities", "EagerBackend", "StageBackend", "make_backend"]
