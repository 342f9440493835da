"""policy node over real DDS: chunks from tokens, RTC with executor feedback, live tuning, bad input
(its observation functions alone: test_observation_core.py, test_observation_paths.py)."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from effvla_ros.msg import ActionChunk, ExecutionFeedback, VisualTokens

from model_fixtures import write_tiny_checkpoint
from ros_helpers import node_process, set_parameter, spinner, wait_for


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=1)


def _tokens(cam: str, stamp: float, keep: list[int], seed: int, dim: int = 64, dtype: str = "float16") -> VisualTokens:
    m = VisualTokens()
    m.header.stamp.sec = int(stamp)
    m.header.stamp.nanosec = int((stamp - int(stamp)) * 1e9)
    m.camera_name = cam
    m.grid_height = m.grid_width = 4
    m.token_dim = dim
    m.dtype = dtype
    m.kept_indices = keep
    m.reused = [False] * len(keep)
    m.data = np.random.default_rng(seed).standard_normal((len(keep), dim)).astype(np.float16).tobytes()
    return m


def _set(node, name: str, **value):  # type: ignore[no-untyped-def]
    return set_parameter(node, "/policy", name, **value)


def test_policy_node_end_to_end(tmp_path: Path, ckpt: Path) -> None:
    from rcl_interfaces.msg import ParameterType
    from sensor_msgs.msg import JointState
    from std_msgs.msg import String

    from effvla_ros.nodes.common import LATCHED_QOS, PIPELINE_QOS

    names = [f"j{i}" for i in range(6)]
    argv = ["-m", "effvla_ros.nodes.policy", "--ros-args", "-p", f"checkpoint:={ckpt}",
            "-p", "cameras:=[camera1,camera2]", "-p", f"state_joint_names:=[{','.join(names)}]",
            "-p", "fps:=20.0", "-p", "execution_horizon:=2", "-p", "attention:=fused",
            "-p", "startup_check:=false",  # a 0.1 s deadline: a loaded machine fails it (test_policy_node_startup)
            "-r", "/policy/visual_tokens:=/vt", "-r", "/policy/execution_feedback:=/fb"]
    chunks: list[ActionChunk] = []
    with node_process(argv, tmp_path, "policy") as proc, spinner() as sp:
        node = sp.node("policy_tester")
        node.create_subscription(ActionChunk, "/policy/action_chunk", chunks.append, 50)
        tok_pub = node.create_publisher(VisualTokens, "/vt", 10)
        js_pub = node.create_publisher(JointState, "/joint_states", 10)
        fb_pub = node.create_publisher(ExecutionFeedback, "/fb", PIPELINE_QOS)
        instr_pub = node.create_publisher(String, "/instruction", LATCHED_QOS)
        t = [time.time()]

        def send(keep=(0, 2, 5, 7, 9, 12), dim=64, cams=("camera1", "camera2"), state=None):  # type: ignore[no-untyped-def]
            t[0] = max(t[0] + 0.001, time.time())
            js = JointState(name=names, position=list(state if state is not None else np.linspace(-0.5, 0.5, 6)))
            js_pub.publish(js)
            for i, cam in enumerate(cams):
                tok_pub.publish(_tokens(cam, t[0], list(keep), seed=int(t[0] * 100) + i, dim=dim))

        # no instruction yet: no chunk, the node says what it waits for
        for _ in range(10):
            send()
        wait_for(lambda: "no instruction yet" in proc.log(), timeout=30)
        assert not chunks
        assert "attention=fused" in proc.log()  # the parameter reached the policy core (torch SDPA path)
        instr_pub.publish(String(data="pick up the red cube"))
        try:
            wait_for(lambda: (send() or True) and len(chunks) >= 2, timeout=60, period=0.1)
        except TimeoutError:
            pytest.fail(f"no chunks; node log:\n{proc.log()}")
        c = chunks[-1]
        assert c.num_actions == 10 and c.action_dim == 6 and len(c.actions) == 60
        assert list(c.joint_names) == names
        assert np.isfinite(np.array(c.actions)).all()
        assert c.step_period.nanosec == 50_000_000 and c.denoising_steps == 10
        assert list(c.exit_layers) == [4]
        assert c.chunk_id > chunks[0].chunk_id
        assert abs(c.header.stamp.sec + 1e-9 * c.header.stamp.nanosec - t[0]) < 30  # the observation's stamp

        # executor feedback: RTC guides the next chunk toward the one being executed
        last = chunks[-1]
        fb = ExecutionFeedback(state=ExecutionFeedback.STATE_EXECUTING, chunk_id=last.chunk_id,
                               chunk_stamp=last.header.stamp, step_period=last.step_period,
                               next_action_index=1, committed_index=2, remaining_actions=8)
        # the executor reports 8 actions (0.4 s) of that chunk as committed: they are frozen (d >= 1)
        committed_ns = last.header.stamp.sec * 1_000_000_000 + last.header.stamp.nanosec + 400_000_000
        fb.committed_until.sec, fb.committed_until.nanosec = divmod(committed_ns, 1_000_000_000)
        def guided() -> bool:  # type: ignore[no-untyped-def]
            fb_pub.publish(fb)
            send()
            # guided toward the executed chunk, with d covering at least the committed actions
            return any(x.rtc_prefix_chunk_id != 0 and x.rtc_delay_steps >= 1 for x in chunks
                       if x.chunk_id > last.chunk_id)
        wait_for(guided, timeout=60, period=0.1)
        g = next(x for x in chunks if x.chunk_id > last.chunk_id and x.rtc_prefix_chunk_id != 0
                 and x.rtc_delay_steps >= 1)
        assert g.rtc_prefix_chunk_id <= g.chunk_id - 1 and g.rtc_delay_steps <= g.num_actions

        # live tuning through the real parameter service
        res = _set(node, "num_steps", type=ParameterType.PARAMETER_INTEGER, integer_value=3)
        assert res.successful, res.reason
        wait_for(lambda: (send() or True) and chunks[-1].denoising_steps == 3, timeout=60, period=0.1)
        bad = _set(node, "rtc.max_guidance_weight", type=ParameterType.PARAMETER_DOUBLE, double_value=-2.0)
        assert not bad.successful and "max_guidance_weight" in bad.reason
        # training-time RTC on a checkpoint not trained for it: refused on set, with the reason
        untrained = _set(node, "rtc.mode", type=ParameterType.PARAMETER_STRING, string_value="trained")
        assert not untrained.successful and "rtc.mode" in untrained.reason and "trained" in untrained.reason
        ro = _set(node, "checkpoint", type=ParameterType.PARAMETER_STRING, string_value="/nope")
        assert not ro.successful

        # tokens of the wrong dimension: rejected with a log, nothing published for them
        n_before = len(chunks)
        wait_for(lambda: (send(dim=32) or True) and "do not match the checkpoint" in proc.log(), timeout=60,
                 period=0.1)
        # wrong state dimension
        def bad_state() -> bool:
            send()
            js_pub.publish(JointState(name=names[:3], position=[0.0, 0.0, 0.0]))
            return "JointState lacks joints" in proc.log()
        wait_for(bad_state, timeout=30, period=0.1)
        n_before = len(chunks)
        # a missing camera is tolerated (masked), inference continues
        missing = VisualTokens(camera_name="camera2", camera_missing=True, grid_height=4, grid_width=4)
        def with_missing() -> bool:  # type: ignore[no-untyped-def]
            send(cams=("camera1",))
            missing.header.stamp.sec = int(t[0])
            tok_pub.publish(missing)
            return len(chunks) > n_before
        wait_for(with_missing, timeout=60, period=0.1)
        assert "JointState messages are unstamped" in proc.log()  # so far: the newest state, with a warning

        # stamped joint states: the one of the images' instant is used; none within
        # state_stamp_tolerance_s (0.05 s) at or before the images: the observation is skipped
        def stamped(state_offset: float) -> None:
            t[0] = max(t[0] + 0.001, time.time())
            js = JointState(name=names, position=list(np.linspace(-0.5, 0.5, 6)))
            ns = int(round((t[0] + state_offset) * 1e9))
            js.header.stamp.sec, js.header.stamp.nanosec = divmod(ns, 1_000_000_000)
            js_pub.publish(js)
            for i, cam in enumerate(("camera1", "camera2")):
                tok_pub.publish(_tokens(cam, t[0], [0, 2, 5, 7, 9, 12], seed=int(t[0] * 100) + i))

        # (+100 s: no state of an earlier call ever falls at or just before a later observation)
        wait_for(lambda: (stamped(100.0) or True) and "no JointState within state_stamp_tolerance_s" in proc.log(),
                 timeout=60, period=0.1)
        time.sleep(1.0)  # a chunk of an earlier observation may still be on its way
        n_skipped = len(chunks)
        for _ in range(10):
            stamped(100.0)  # only states newer than the images: nothing is published
            time.sleep(0.1)
        assert len(chunks) == n_skipped
        wait_for(lambda: (stamped(0.0) or True) and len(chunks) > n_skipped, timeout=60, period=0.1)
        c = chunks[-1]
        assert abs(c.header.stamp.sec + 1e-9 * c.header.stamp.nanosec - t[0]) < 5.0
        assert proc.alive()
