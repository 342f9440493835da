"""The policy and token compressor nodes at start, in process (no spinning): the stage backend parameter, the
warm-up, the startup check on the MEASURED latency, and live changes the backend cannot apply rejected on set."""
from __future__ import annotations

from pathlib import Path

import pytest

rclpy = pytest.importorskip("rclpy")

from rclpy.parameter import Parameter  # noqa: E402

from model_fixtures import write_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=2)


def _params(ckpt: Path, **extra: object) -> list[Parameter]:
    values = {"checkpoint": str(ckpt), "cameras": ["camera1", "camera2"], **extra}
    return [Parameter(k, value=v) for k, v in values.items()]


def _policy(context, ckpt: Path, **extra: object):  # type: ignore[no-untyped-def]
    from effvla_ros.nodes.policy import PolicyNode

    return PolicyNode(context=context, parameter_overrides=_params(ckpt, **extra))


def test_startup_check_uses_the_measured_latency(context, ckpt: Path) -> None:
    node = _policy(context, ckpt, fps=20.0, execution_horizon=10)  # deadline 0.5 s: a tiny chunk fits
    try:
        assert node.runner.backend.caps.name == "eager" and node.runner.instruction is None
    finally:
        node.destroy_node()
    # deadline 1 ms: the FLOP estimate of a tiny checkpoint (~0 s) passes, the measured latency does not
    with pytest.raises(ValueError, match=r"execution_horizon: a chunk takes .*\(measured\)"):
        _policy(context, ckpt, fps=1000.0, execution_horizon=1)
    node = _policy(context, ckpt, fps=1000.0, execution_horizon=1, startup_check=False)  # refused only when asked
    node.destroy_node()


def test_startup_check_deadline_in_clock_time(context, ckpt: Path) -> None:
    """On a simulation's /clock the deadline is simulated time: the wall latency is scaled by real_time_factor."""
    # 1 simulated s per 1000 wall s: a deadline of 10 ms simulated is 10 s of wall time, a tiny chunk fits
    node = _policy(context, ckpt, fps=100.0, execution_horizon=1, real_time_factor=0.001)
    node.destroy_node()
    # 1000 simulated s per wall s: any wall latency >= 1 ms misses a 0.5 s deadline, and the message says why
    with pytest.raises(ValueError, match=r"execution_horizon: a chunk takes .*\(measured, x real_time_factor 1000\)"):
        _policy(context, ckpt, fps=20.0, execution_horizon=10, real_time_factor=1000.0)


def test_backend_capabilities_at_start_and_on_live_changes(context, ckpt: Path) -> None:
    from effvla_ros.core.backends.base import Capabilities

    node = _policy(context, ckpt, **{"rtc.enabled": True})
    try:
        node.runner.backend.caps = Capabilities("no-vjp", vjp=False)  # as a backend without autograd declares
        res = node.set_parameters([Parameter("rtc.guidance", value="vjp")])[0]
        assert not res.successful and "rtc.guidance" in res.reason and "no-vjp" in res.reason
        assert node.rtc_params.config.guidance == "jacobian_free"  # nothing half-applied
        assert node.set_parameters([Parameter("rtc.max_guidance_weight", value=5.0)])[0].successful
    finally:
        node.destroy_node()
    with pytest.raises(ValueError, match="backend"):
        _policy(context, ckpt, backend="tensorrt")


def test_token_compressor_warms_up_its_backend(context, ckpt: Path) -> None:
    from effvla_ros.nodes.token_compressor import TokenCompressorNode

    node = TokenCompressorNode(context=context, parameter_overrides=_params(ckpt))
    try:
        assert node.compressor.backend.caps.name == "eager"
        assert node.compressor.warm_up(repeats=1) > 0
        assert not node.compressor._cams  # the warm-up leaves the camera caches empty
    finally:
        node.destroy_node()
