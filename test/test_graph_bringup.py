"""Issue 7: one graph description, layered parameter files parsed by rcl, the startup check, the
single-process bringup running the real pipeline, live tuning through the parameter services, and
the launch file (skipped where `launch` is not installed)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from effvla_ros.graph import TARGETS, describe_graph

from model_fixtures import write_tiny_checkpoint
from ros_helpers import node_process, spinner, wait_for

REPO = Path(__file__).resolve().parents[1]
SO101 = ["shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=2)


def test_graph_description_wiring() -> None:
    g = describe_graph("orin_nano_8gb", controller="arm_controller", checkpoint="/ckpt", sim=False)
    assert [n.name for n in g.nodes] == ["token_compressor", "policy", "chunk_executor", "chunk_corrector"]
    assert [f.name for f in g.params_files] == ["base.yaml", "orin_nano_8gb.yaml"]
    ex = dict(g.node("chunk_executor").remappings)
    assert ex["~/joint_trajectory"] == "/arm_controller/joint_trajectory"
    assert ex["~/action_chunk"] == dict(g.node("policy").remappings)["~/action_chunk"] == "action_chunk"
    assert dict(g.node("policy").remappings)["~/visual_tokens"] == dict(g.node("token_compressor").remappings)[
        "~/visual_tokens"]
    assert ex["~/feedback"] == dict(g.node("policy").remappings)["~/execution_feedback"]
    assert g.overrides["checkpoint"] == "/ckpt" and g.overrides["use_sim_time"] is False
    sim = describe_graph("x86_cpu", sim=True, checkpoint="/ckpt")
    assert sim.nodes[0].name == "sim_bridge" and sim.overrides["use_sim_time"] is True
    # the simulated robot's layer comes after the target's, before the user's file
    assert [f.name for f in sim.params_files] == ["base.yaml", "x86_cpu.yaml", "sim.yaml"]
    from effvla_ros.core.executor import ExecutorConfig
    from effvla_ros.replay.settings import node_params

    real_ex = ExecutorConfig.from_dict(node_params(list(g.params_files), "chunk_executor"), strict=False)
    sim_ex = ExecutorConfig.from_dict(node_params(list(sim.params_files), "chunk_executor"), strict=False)
    assert real_ex.blend_time > 0.0 and sim_ex.blend_time == 0.0
    assert max(sim_ex.velocity_limits) > max(real_ex.velocity_limits)
    assert node_params(list(sim.params_files), "sim_bridge")["image_size"] == 64
    assert "image_size" not in node_params(list(g.params_files), "sim_bridge")
    # the simulated robot keeps base.yaml's default compression (the bundled checkpoint was trained for it);
    # the unpruned checkpoint's file turns pruning off over it and keeps temporal reuse
    comp = node_params(list(sim.params_files), "token_compressor")
    assert comp["pruning.method"] == "task" and comp["pruning.keep_ratio"] == 0.5 and comp["reuse.enabled"] is True
    # ... on the eager reference in fp32, where its closed-loop numbers were measured (the target: packed, auto)
    sim_pol = node_params(list(sim.params_files), "policy")
    assert comp["backend"] == sim_pol["backend"] == "eager" and comp["vision_dtype"] == sim_pol["vlm_dtype"] == "float32"
    real_pol = node_params(list(describe_graph("x86_cpu", checkpoint="/ckpt").params_files), "policy")
    assert real_pol["backend"] == "packed" and real_pol["expert_dtype"] == "auto"
    unpruned = describe_graph("x86_cpu", sim=True, checkpoint="/ckpt",
                              params_file=REPO / "config" / "sim_unpruned.yaml")
    assert [f.name for f in unpruned.params_files][-2:] == ["sim.yaml", "sim_unpruned.yaml"]
    comp = node_params(list(unpruned.params_files), "token_compressor")
    assert comp["pruning.method"] == "none" and comp["reuse.enabled"] is True
    # without --checkpoint: the bundled checkpoint trained for that compression
    from effvla_ros.graph import default_checkpoint

    bundled = default_checkpoint()
    assert bundled is not None and Path(bundled).name == "so101_pickplace_pruned"
    assert describe_graph("x86_cpu", sim=True).overrides["checkpoint"] == bundled
    with pytest.raises(ValueError, match="target"):
        describe_graph("raspberry_pi")
    with pytest.raises(ValueError, match="cameras"):
        describe_graph("x86_cpu", cameras=["bad name"])
    with pytest.raises(ValueError, match="controller"):
        describe_graph("x86_cpu", controller="a/b")
    args = g.ros_args(g.node("chunk_executor"))
    assert args[0] == "--ros-args" and "/arm_controller/joint_trajectory" in " ".join(args)
    assert args.count("--params-file") == 3  # base, target, overrides (node-specific sections)


def _parsed(graph, node_name: str, context) -> dict:  # type: ignore[no-untyped-def]
    """Parameters rcl parses for ``node_name`` from the graph's --ros-args (files + overrides)."""
    from rclpy.node import Node

    n = Node(node_name, context=context, cli_args=graph.ros_args(graph.node(node_name)), use_global_arguments=False,
             automatically_declare_parameters_from_overrides=True)
    try:
        return {k: v.value for k, v in n.get_parameters_by_prefix("").items()}
    finally:
        n.destroy_node()


@pytest.mark.parametrize("target", TARGETS)
def test_layered_params_parsed_by_rcl_are_valid_core_configs(target: str, tmp_path: Path) -> None:
    import rclpy

    from effvla_ros.core.compression.compressor import ReuseConfig
    from effvla_ros.core.compression.pruning import PruningConfig
    from effvla_ros.core.correction import CorrectionConfig
    from effvla_ros.core.early_exit import EarlyExitConfig, ExpertReuseConfig
    from effvla_ros.core.executor.config import ExecutorConfig
    from effvla_ros.core.rtc import RTCConfig
    from effvla_ros.core.runner import InferenceConfig
    from effvla_ros.nodes.chunk_corrector import CorrectorNodeConfig
    from effvla_ros.nodes.policy import PolicyNodeConfig
    from effvla_ros.nodes.token_compressor import CompressorNodeConfig

    user = tmp_path / "mine.yaml"
    user.write_text("/**/policy:\n  ros__parameters:\n    rtc:\n      max_guidance_weight: 3.5\n")
    g = describe_graph(target, checkpoint="/some/ckpt", params_file=user)
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    try:
        comp, pol, ex, corr = (_parsed(g, n, ctx) for n in ("token_compressor", "policy", "chunk_executor",
                                                             "chunk_corrector"))
    finally:
        rclpy.try_shutdown(context=ctx)

    def sub(d: dict, prefix: str) -> dict:
        return {k[len(prefix):]: v for k, v in d.items() if k.startswith(prefix)}

    # every value is valid for the core config it maps onto (one-to-one names)
    CompressorNodeConfig.from_dict(comp, strict=False)
    PruningConfig.from_dict(sub(comp, "pruning."))
    ReuseConfig.from_dict(sub(comp, "reuse."))
    PolicyNodeConfig.from_dict(pol, strict=False)
    InferenceConfig.from_dict(pol, strict=False)
    RTCConfig.from_dict(sub(pol, "rtc."))
    EarlyExitConfig.from_dict(sub(pol, "early_exit."))
    ExpertReuseConfig.from_dict(sub(pol, "expert_reuse."))
    ExecutorConfig.from_dict(ex, strict=False)
    CorrectorNodeConfig.from_dict(corr, strict=False)
    CorrectionConfig.from_dict(sub(corr, "correction."))
    assert corr["correction.enabled"] is False and corr["checkpoint"] == "/some/ckpt"  # off but for the simulation
    # layering: the target file beats base.yaml, the user's file beats both, overrides beat files
    assert pol["target"] == target
    assert pol["rtc.max_guidance_weight"] == 3.5
    assert pol["checkpoint"] == "/some/ckpt" == comp["checkpoint"]
    assert ex["joint_names"] == SO101
    if target == "orin_nano_8gb":
        assert pol["num_steps"] == 8 and comp["pruning.keep_ratio"] == 0.4  # base: 10 and 0.5
        assert pol["vlm_dtype"] == "bfloat16"
    if target == "x86_cpu":
        assert pol["device"] == "cpu" and pol["num_steps"] == 5  # base: 10
        assert comp["reuse.dilation"] == 0  # base: 1
        assert pol["backend"] == comp["backend"] == "packed" and pol["vlm_dtype"] == comp["vision_dtype"] == "auto"


def test_startup_check_refuses_impossible_configuration(tmp_path: Path, ckpt: Path) -> None:
    from effvla_ros.core.smolvla import smolvla_450m_arch
    from effvla_ros.core.target_check import check, enforce

    est = check(smolvla_450m_arch(), "orin_nano_8gb", memory_budget_gb=1.0)
    assert est.problems and "memory_budget_gb" in est.problems[0]
    with pytest.raises(ValueError, match="memory_budget_gb"):
        enforce(est)
    ok = check(smolvla_450m_arch(), "orin_nano_8gb", vision_dtype="bfloat16", vlm_dtype="bfloat16")
    assert not ok.problems and 1.0 < ok.memory_gb < 5.0
    slow = check(smolvla_450m_arch(), "x86_cpu", fps=30.0, execution_horizon=5)
    assert any(p.startswith("execution_horizon") for p in slow.problems)
    # the policy node refuses to start, naming the parameter, before loading any weight
    argv = ["-m", "effvla_ros.nodes.policy", "--ros-args", "-p", f"checkpoint:={ckpt}",
            "-p", "cameras:=[camera1,camera2]", "-p", "memory_budget_gb:=0.1"]
    with node_process(argv, tmp_path, "policy_refused") as proc:
        wait_for(lambda: not proc.alive(), timeout=60)
        assert proc.proc.returncode == 2
        assert "memory_budget_gb" in proc.log() and "refused" in proc.log()


def test_check_target_command(ckpt: Path) -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "effvla_ros.cli", "check-target", "--target", "orin_nano_8gb",
                          "--checkpoint", str(ckpt)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "weights: VLM text layers" in out.stdout and "verdict: OK" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "effvla_ros.cli", "check-target", "--target", "orin_nano_8gb",
                          "--memory-budget-gb", "0.5"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "REFUSED" in bad.stdout and "memory_budget_gb" in bad.stdout


def _image(w: int, h: int, seed: int):  # type: ignore[no-untyped-def]
    from sensor_msgs.msg import Image

    rgb = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    return Image(height=h, width=w, encoding="rgb8", step=w * 3, data=rgb.tobytes())


def test_single_process_bringup_runs_pipeline_and_live_tuning(ckpt: Path) -> None:
    """`effvla run`'s bringup: compressor -> policy -> executor in one process; a JointTrajectory
    reaches the controller topic; every live parameter of the three nodes accepts a set through the
    real SetParameters service, and an invalid value is refused with a reason."""
    import time

    from rcl_interfaces.msg import Parameter as ParamMsg
    from rcl_interfaces.msg import ParameterType
    from rcl_interfaces.srv import DescribeParameters, GetParameters, ListParameters, SetParameters
    from rclpy.parameter import Parameter
    from sensor_msgs.msg import JointState
    from std_msgs.msg import String
    from trajectory_msgs.msg import JointTrajectory

    from effvla_ros.bringup import Bringup
    from effvla_ros.nodes.common import LATCHED_QOS, SENSOR_QOS

    user = Path(ckpt).parent / "params.yaml"
    # 2 Hz actions: a chunk of 10 covers 5 s, so even a starved CI machine delivers chunks in time
    user.write_text("/**/policy:\n  ros__parameters:\n    fps: 2.0\n    execution_horizon: 3\n"
                    "    max_observation_age_s: 30.0\n"
                    "/**/chunk_executor:\n  ros__parameters:\n    watchdog_timeout: 5.0\n")
    graph = describe_graph("x86_cpu", checkpoint=str(ckpt), cameras=["camera1", "camera2"], params_file=user,
                           controller="test_controller")
    b = Bringup(graph, log_level="warn")
    b.start()
    trajs: list[JointTrajectory] = []
    try:
        with spinner() as sp:
            node = sp.node("bringup_tester")
            node.create_subscription(JointTrajectory, "/test_controller/joint_trajectory", trajs.append, 50)
            cams = {c: node.create_publisher(type(_image(2, 2, 0)), f"/camera/{c}/image_raw", SENSOR_QOS)
                    for c in ("camera1", "camera2")}
            js = node.create_publisher(JointState, "/joint_states", 10)
            node.create_publisher(String, "/instruction", LATCHED_QOS).publish(String(data="pick up the red cube"))
            imgs = {c: _image(64, 48, i) for i, c in enumerate(cams)}

            def pump() -> bool:
                now = node.get_clock().now().to_msg()
                js.publish(JointState(name=SO101, position=[0.0, 0.1, -0.1, 0.2, 0.0, 0.5], header=None or
                                      JointState().header))
                for c, pub in cams.items():
                    imgs[c].header.stamp = now
                    pub.publish(imgs[c])
                return len(trajs) >= 3

            wait_for(pump, timeout=90, period=0.05)
            t = trajs[-1]
            assert list(t.joint_names) == SO101
            assert len(t.points) >= 1 and all(np.isfinite(p.positions).all() for p in t.points)

            # live tuning of every non-read-only parameter through the real services
            for name in ("token_compressor", "policy", "chunk_executor"):
                lst = node.create_client(ListParameters, f"/{name}/list_parameters")
                desc = node.create_client(DescribeParameters, f"/{name}/describe_parameters")
                get = node.create_client(GetParameters, f"/{name}/get_parameters")
                setp = node.create_client(SetParameters, f"/{name}/set_parameters")
                for c in (lst, desc, get, setp):
                    assert c.wait_for_service(timeout_sec=20)

                def call(cli, req):  # type: ignore[no-untyped-def]
                    fut = cli.call_async(req)
                    wait_for(fut.done, timeout=20)
                    return fut.result()

                names = [n for n in call(lst, ListParameters.Request()).result.names
                         if n not in ("use_sim_time", "start_type_description_service", "qos_overrides")
                         and not n.startswith("qos_overrides")]
                ds = call(desc, DescribeParameters.Request(names=names)).descriptors
                live = [d.name for d in ds if not d.read_only]
                assert live, name
                vals = call(get, GetParameters.Request(names=live)).values
                req = SetParameters.Request(parameters=[
                    ParamMsg(name=n, value=v) for n, v in zip(live, vals) if v.type != ParameterType.PARAMETER_NOT_SET])
                assert req.parameters, (name, live)
                res = call(setp, req).results
                assert len(res) == len(req.parameters), name
                assert all(r.successful for r in res), (name, [r.reason for r in res if not r.successful])
            setp = node.create_client(SetParameters, "/token_compressor/set_parameters")
            fut = setp.call_async(SetParameters.Request(parameters=[
                Parameter("pruning.keep_ratio", Parameter.Type.DOUBLE, 7.0).to_parameter_msg()]))
            wait_for(fut.done, timeout=20)
            r = fut.result().results[0]
            assert not r.successful and "keep_ratio" in r.reason
            time.sleep(0.2)
    finally:
        b.shutdown()


@pytest.mark.skipif(importlib.util.find_spec("launch") is None or importlib.util.find_spec("launch_ros") is None,
                    reason="ROS 2 launch / launch_ros are not installed here (not on PyPI)")
def test_launch_description() -> None:  # pragma: no cover - runs only on a ROS 2 install
    from launch.actions import DeclareLaunchArgument

    from launch import LaunchContext

    spec = importlib.util.spec_from_file_location("manip", REPO / "launch" / "manipulation.launch.py")
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    ld = mod.generate_launch_description()
    args = {a.name: a for a in ld.entities if isinstance(a, DeclareLaunchArgument)}
    for name in ("target", "checkpoint", "params_file", "namespace", "cameras", "controller", "use_sim_time",
                 "log_level", "composition", "sim"):
        assert name in args and args[name].description
    assert set(args["target"].choices) == set(TARGETS)
    assert LaunchContext is not None


def test_launch_file_is_valid_python_without_eval() -> None:
    src = (REPO / "launch" / "manipulation.launch.py").read_text()
    compile(src, "manipulation.launch.py", "exec")
    assert "eval(" not in src and "FindPackageShare" in src
