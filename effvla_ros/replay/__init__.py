"""Rosbag2 recording helpers and offline replay evaluation (ROS-free).

* :mod:`.bagio` — rosbag2 reading (MCAP and sqlite3, with or without ``metadata.yaml``, MCAP files
  cut short by a killed recorder), the typestore with effvla_ros' messages, and the MCAP bag writer
  the recorder uses (periodic chunk flushes, ``metadata.yaml`` written early and kept current).
* :mod:`.observations` — observations from a bag: cameras matched by stamp, joint state, instruction.
* :mod:`.settings` — ``--target`` settings; the baseline and the ``--sweep`` grammar (shared with eval-sim)
  are :mod:`effvla_ros.core.settings`.
* :mod:`.evaluate` — deterministic replay of the observations through TokenCompressor -> PolicyRunner
  per setting, with metrics (latency, FLOPs, tokens, exits, deviation, smoothness through the
  chunk executor core).
* :mod:`.report` — ``report.json``, ``report.md`` and PNG plots.
"""
from effvla_ros.replay.bagio import Bag, BagError, open_bag

__all__ = ["Bag", "BagError", "open_bag"]
