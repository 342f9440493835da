"""Test-session setup: DDS isolation before anything imports rclpy.

Every test run talks DDS only over loopback (ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST) and on a
ROS_DOMAIN_ID of its own (derived from the pytest process id unless EFFVLA_TEST_DOMAIN_ID is set),
so parallel runs on one machine do not see each other. Subprocesses inherit this environment.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ.pop("ROS_STATIC_PEERS", None)
os.environ["ROS_DOMAIN_ID"] = os.environ.get("EFFVLA_TEST_DOMAIN_ID", str(120 + os.getpid() % 100))
os.environ.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
os.environ.setdefault("_ROS_WHEELS_BOOTSTRAP_COMPLETE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("OMP_NUM_THREADS", "2")

sys.path.insert(0, str(Path(__file__).parent))
