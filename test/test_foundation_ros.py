"""Foundation: the generated interfaces cross real DDS between processes, byte-exact, and node
parameters backed by core configs work through the real parameter services."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from ros_helpers import node_process, spinner, wait_for

FIX = Path(__file__).parent / "fixtures"
sys.path.insert(0, str(FIX))


def test_interfaces_import_and_fields() -> None:
    from effvla_ros.msg import ActionChunk, ExecutionFeedback, VisualTokens

    vt = VisualTokens()
    for f in ("camera_name", "kept_indices", "reused", "data", "encoder_flops", "encoder_flops_full", "dtype"):
        assert hasattr(vt, f), f
    ac = ActionChunk()
    for f in ("chunk_id", "step_period", "joint_names", "actions", "inference_latency_ms", "exit_layers",
              "denoising_steps", "rtc_delay_steps"):
        assert hasattr(ac, f), f
    fb = ExecutionFeedback()
    assert ExecutionFeedback.STATE_HOLDING != ExecutionFeedback.STATE_EXECUTING
    assert hasattr(fb, "committed_index") and hasattr(fb, "committed_until")


def test_visual_tokens_cross_processes_byte_exact(tmp_path: Path) -> None:
    from effvla_ros.msg import VisualTokens

    from tokens_publisher import make_tokens

    seed, n, dim = 7, 40, 960  # 40 x 960 fp16 = 76.8 kB payload
    received: list[VisualTokens] = []
    with node_process([str(FIX / "tokens_publisher.py"), str(seed), str(n), str(dim)], tmp_path, "pub") as pub, \
            spinner() as sp:
        node = sp.node("tokens_listener")
        node.create_subscription(VisualTokens, "/test/visual_tokens", received.append, 10)
        try:
            wait_for(lambda: len(received) >= 2, timeout=20)
        except TimeoutError:
            pytest.fail(f"no VisualTokens received over DDS; publisher log:\n{pub.log()}")
    msg = received[-1]
    expected = make_tokens(seed, n, dim)
    payload = bytes(msg.data)
    assert payload == expected.tobytes()
    decoded = np.frombuffer(payload, dtype=np.float16).reshape(len(msg.kept_indices), msg.token_dim)
    np.testing.assert_array_equal(decoded, expected)
    assert list(msg.kept_indices) == list(range(0, 2 * n, 2))
    assert list(msg.reused) == [i % 3 == 0 for i in range(n)]
    assert (msg.header.stamp.sec, msg.header.stamp.nanosec) == (123, 456)
    assert msg.encoder_flops == 1234567890123 and msg.encoder_flops_full == 9876543210987
    assert msg.camera_name == "scene" and msg.dtype == "float16"


def _param_clients(node):  # type: ignore[no-untyped-def]
    from rcl_interfaces.srv import DescribeParameters, GetParameters, SetParameters

    return (node.create_client(SetParameters, "/param_node/set_parameters"),
            node.create_client(GetParameters, "/param_node/get_parameters"),
            node.create_client(DescribeParameters, "/param_node/describe_parameters"))


def _call(client, request, timeout=10.0):  # type: ignore[no-untyped-def]
    assert client.wait_for_service(timeout_sec=timeout), f"service {client.srv_name} not available"
    fut = client.call_async(request)
    wait_for(fut.done, timeout=timeout)
    return fut.result()


def test_parameters_set_read_back_and_rejected_with_reason(tmp_path: Path) -> None:
    from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
    from rcl_interfaces.srv import DescribeParameters, GetParameters, SetParameters

    def p(name: str, **value) -> Parameter:  # type: ignore[no-untyped-def]
        return Parameter(name=name, value=ParameterValue(**value))

    with node_process([str(FIX / "param_node.py")], tmp_path, "param_node") as proc, spinner() as sp:
        node = sp.node("param_tester")
        set_c, get_c, desc_c = _param_clients(node)

        # accepted, applied, read back through the real services
        res = _call(set_c, SetParameters.Request(parameters=[
            p("keep_ratio", type=ParameterType.PARAMETER_DOUBLE, double_value=0.3)]))
        assert res.results[0].successful, res.results[0].reason
        got = _call(get_c, GetParameters.Request(names=["keep_ratio", "method"]))
        assert got.values[0].double_value == pytest.approx(0.3)
        assert got.values[1].string_value == "task"
        wait_for(lambda: "applied ['keep_ratio'] -> keep_ratio=0.3" in proc.log(), timeout=10)

        # out of range: rejected with a reason, value unchanged
        res = _call(set_c, SetParameters.Request(parameters=[
            p("keep_ratio", type=ParameterType.PARAMETER_DOUBLE, double_value=1.7)]))
        assert not res.results[0].successful
        assert "keep_ratio" in res.results[0].reason
        # not one of the choices: our own validation, reason names the field and the choices
        res = _call(set_c, SetParameters.Request(parameters=[
            p("method", type=ParameterType.PARAMETER_STRING, string_value="magic")]))
        assert not res.results[0].successful
        assert "method" in res.results[0].reason and "task" in res.results[0].reason
        # cross-field validation from the config's validate()
        res = _call(set_c, SetParameters.Request(parameters=[
            p("method", type=ParameterType.PARAMETER_STRING, string_value="none")]))
        assert not res.results[0].successful and "keep_ratio" in res.results[0].reason
        # read-only
        res = _call(set_c, SetParameters.Request(parameters=[
            p("cameras", type=ParameterType.PARAMETER_STRING_ARRAY, string_array_value=["a", "b"])]))
        assert not res.results[0].successful
        got = _call(get_c, GetParameters.Request(names=["keep_ratio", "cameras"]))
        assert got.values[0].double_value == pytest.approx(0.3)
        assert list(got.values[1].string_array_value) == ["scene"]

        # descriptors carry the ranges and descriptions of the core config
        d = _call(desc_c, DescribeParameters.Request(names=["keep_ratio", "max_age", "cameras"])).descriptors
        assert d[0].floating_point_range[0].from_value == pytest.approx(0.05)
        assert d[0].floating_point_range[0].to_value == pytest.approx(1.0)
        assert d[0].description == "fraction of tokens kept"
        assert d[1].integer_range[0].to_value == 100
        assert d[2].read_only
        assert proc.alive()


def test_bad_parameter_file_refuses_start_with_field_name(tmp_path: Path) -> None:
    params = tmp_path / "bad.yaml"
    params.write_text("param_node:\n  ros__parameters:\n    max_age: 0\n")
    with node_process([str(FIX / "param_node.py"), "--ros-args", "--params-file", str(params)], tmp_path,
                      "bad") as proc:
        wait_for(lambda: not proc.alive(), timeout=20)
        log = proc.log()
    assert "max_age" in log
