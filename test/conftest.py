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

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def context():  # type: ignore[no-untyped-def]
    """An rclpy context of the test module's own (nodes built in-process on it), shut down after the module."""
    rclpy = pytest.importorskip("rclpy")
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    yield ctx
    rclpy.shutdown(context=ctx)


@pytest.fixture(scope="module")
def one_torch_thread():  # type: ignore[no-untyped-def]
    """One torch thread for the module (use it with an autouse fixture or ``pytest.mark.usefixtures``): the tiny
    models run ~10x faster than with 2 threads on a loaded 2-core machine."""
    torch = pytest.importorskip("torch")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
