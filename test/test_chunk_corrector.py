"""Per-step corrections in the graph (A2C2): the chunk executor core adds residuals to rows not yet committed, within
its limits; the chunk_corrector node computes them from real frames, joints, chunks and executor feedback over real
DDS, equal to the core's head on the same inputs; refusals name the parameter."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from effvla_ros.core.executor import ChunkExecutorCore, ExecutorConfig

CKPT = Path(__file__).resolve().parents[1] / "effvla_ros" / "assets" / "so101_pickplace_pruned"
JOINTS = ["shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper"]


def _core(vmax: float = 3.0, amax: float = 20.0) -> tuple[ChunkExecutorCore, np.ndarray]:
    cfg = ExecutorConfig(joint_names=["a", "b"], velocity_limits=[vmax], acceleration_limits=[amax],
                         position_lower=[-3.0], position_upper=[3.0], output_mode="stream", merge_strategy="rtc",
                         blend_time=0.0, watchdog_timeout=5.0)
    ex = ChunkExecutorCore(cfg)
    ex.on_joint_state(["a", "b"], [0.0, 0.0], 0.0)
    acts = np.stack([np.linspace(0.0, 0.5, 10), np.zeros(10)], 1)
    assert ex.on_chunk(0.0, chunk_id=1, t0=0.0, dt=0.1, joint_names=["a", "b"], num_actions=10, action_dim=2,
                       actions=acts.reshape(-1)).accepted
    for k in range(1, 30):
        ex.tick(k * 0.01)
    return ex, acts


def _correct(ex: ChunkExecutorCore, first: int, res: np.ndarray, stamp: float = 0.25, chunk_id: int = 1,
             names: list[str] | None = None):  # type: ignore[no-untyped-def]
    return ex.on_correction(0.3, chunk_id=chunk_id, first_index=first, joint_names=names or ["a", "b"], action_dim=2,
                            residuals=np.asarray(res, dtype=np.float64).reshape(-1), stamp=stamp)


def test_executor_adds_the_newest_residual_to_uncommitted_rows_only():
    ex, acts = _core()
    t_c = ex.committed_until
    assert 0.25 < t_c < 0.35  # rows 0..3 of the chunk are committed, 4.. are not
    r1 = np.tile([0.1, -0.05], (7, 1))
    res = _correct(ex, 3, r1)
    assert not res.dropped and res.late == 1 and res.applied == 6  # row 3 was committed already
    ref = ex.reference
    assert ref is not None
    for i in range(5, 10):  # past the boundary blend (one step) the reference passes through base + residual
        assert np.allclose(ref(0.1 * i), acts[i] + r1[0], atol=1e-9)
    r2 = np.tile([-0.2, 0.0], (6, 1))  # a newer message for the same rows replaces the residual, it does not add
    assert _correct(ex, 4, r2, stamp=0.28).applied == 6
    for i in range(5, 10):
        assert np.allclose(ex.reference(0.1 * i), acts[i] + r2[0], atol=1e-9)  # type: ignore[misc]
    # reordered by name: a message in another joint order corrects the same joints
    assert _correct(ex, 6, np.tile([0.0, 0.3], (4, 1)), names=["b", "a"]).applied == 4
    assert np.allclose(ex.reference(0.8), acts[8] + [0.3, 0.0], atol=1e-9)  # type: ignore[misc]
    for k in range(30, 120):  # commit everything: each corrected row's age is recorded in the chunk's steps
        ex.tick(k * 0.01)
    ages = list(ex.stats.correction_age_steps)
    assert ages and min(ages) >= (0.4 - 0.3) / 0.1 - 1e-6 and max(ages) <= (0.9 - 0.25) / 0.1 + 1e-6
    assert ex.stats.counts["corrected_rows"] == 16 and ex.stats.counts["corrected_rows_late"] == 1


def test_executor_drops_corrections_it_cannot_apply_with_the_reason():
    ex, _ = _core()
    before = ex.reference
    other = _correct(ex, 4, np.zeros((6, 2)), chunk_id=7)
    assert "not the executing chunk" in other.reason and other.stale
    bad = _correct(ex, 4, np.full((6, 2), np.nan))
    assert "non-finite" in bad.reason and not bad.stale
    assert "residual values" in ex.on_correction(0.3, chunk_id=1, first_index=4, joint_names=[], action_dim=3,
                                                 residuals=np.zeros(9), stamp=0.2).reason
    assert "do not match" in _correct(ex, 4, np.zeros((6, 2)), names=["a", "c"]).reason
    assert ex.reference is before and ex.stats.counts["corrections_dropped"] == 4


def test_a_huge_residual_never_breaks_the_velocity_and_acceleration_limits():
    vmax, amax = 1.0, 5.0
    ex, _ = _core(vmax, amax)
    _correct(ex, 4, np.tile([2.0, -2.0], (6, 1)))
    q_prev, v_prev = ex.last_command
    for k in range(30, 500):
        cmd = ex.tick(k * 0.01)
        if cmd is None:
            continue
        q, v = cmd.positions[0], cmd.velocities[0]
        assert np.all(np.abs(v) <= vmax + 1e-9)
        assert np.all(np.abs(v - v_prev) <= amax * ex.dt + 1e-9)
        q_prev, v_prev = q, v
    assert abs(q_prev[0] - 2.5) < 0.05  # and it does reach the corrected target


# ------------------------------------------------------------------------------------------------ the nodes
def _frames(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {c: rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for c in ("scene", "wrist")}


class _Robot:
    """The robot side of a node test: joint states and camera frames stamped with the test node's clock."""

    def __init__(self, t, q: np.ndarray) -> None:  # type: ignore[no-untyped-def]
        from sensor_msgs.msg import Image, JointState

        from effvla_ros.nodes.common import SENSOR_QOS

        self.t, self.q, self._image, self._state = t, q, Image, JointState
        self.js = t.create_publisher(JointState, "/joint_states", 10)
        self.cams = {c: t.create_publisher(Image, f"camera/{c}/image_raw", SENSOR_QOS) for c in ("scene", "wrist")}

    def now(self) -> float:
        return self.t.get_clock().now().nanoseconds * 1e-9

    def state(self) -> None:
        from effvla_ros.nodes.common import sec_to_stamp

        m = self._state(name=JOINTS, position=self.q.tolist())
        m.header.stamp = sec_to_stamp(self.now())
        self.js.publish(m)

    def settle(self) -> float:
        """A short history of joint states; returns an observation time inside it."""
        for _ in range(20):
            self.state()
            time.sleep(0.02)
        return self.now() - 0.01

    def frames(self, frames: dict[str, np.ndarray]) -> None:
        from effvla_ros.nodes.common import sec_to_stamp

        stamp = sec_to_stamp(self.now())
        for c, pub in self.cams.items():
            img = self._image(height=64, width=64, encoding="rgb8", step=64 * 3, data=frames[c].tobytes())
            img.header.stamp = stamp
            pub.publish(img)


def test_corrector_node_publishes_the_heads_residuals_and_the_executor_applies_them():
    import rclpy  # noqa: F401
    from rclpy.parameter import Parameter

    from effvla_ros.core.correction import CorrectionConfig, encode_frames, load_corrector
    from effvla_ros.msg import ActionChunk, ActionCorrection
    from effvla_ros.nodes.chunk_corrector import ChunkCorrectorNode
    from effvla_ros.nodes.chunk_executor import ChunkExecutorNode
    from effvla_ros.nodes.common import sec_to_stamp

    from ros_helpers import spinner, wait_for

    with spinner() as sp:
        corrector = sp.add(ChunkCorrectorNode(context=sp.context, parameter_overrides=[
            Parameter("checkpoint", value=str(CKPT)), Parameter("correction.enabled", value=True),
            Parameter("state_joint_names", value=JOINTS)]))
        executor = sp.add(ChunkExecutorNode(context=sp.context, parameter_overrides=[
            Parameter("joint_names", value=JOINTS), Parameter("watchdog_timeout", value=30.0),
            Parameter("output_mode", value="stream")]))
        ex_name = executor.get_fully_qualified_name()
        co_name = corrector.get_fully_qualified_name()
        t = sp.node("corrector_test")
        from effvla_ros.nodes.common import PIPELINE_QOS

        got: list[ActionCorrection] = []
        t.create_subscription(ActionCorrection, f"{co_name}/action_correction", got.append, PIPELINE_QOS)
        # the executor takes the corrector's output and gives it its feedback (the graph's remappings, by hand)
        fwd = t.create_publisher(ActionCorrection, f"{ex_name}/action_correction", PIPELINE_QOS)
        t.create_subscription(ActionCorrection, f"{co_name}/action_correction", fwd.publish, PIPELINE_QOS)
        from effvla_ros.msg import ExecutionFeedback

        fb_pub = t.create_publisher(ExecutionFeedback, f"{co_name}/execution_feedback", PIPELINE_QOS)
        t.create_subscription(ExecutionFeedback, f"{ex_name}/feedback", fb_pub.publish, PIPELINE_QOS)
        chunk_pubs = [t.create_publisher(ActionChunk, f"{n}/action_chunk", PIPELINE_QOS) for n in (ex_name, co_name)]
        q = np.array([0.0, -0.5, 0.6, 0.3, 0.0, 1.0])
        robot = _Robot(t, q)
        t_obs = robot.settle()
        actions = q[None, :] + np.linspace(0.0, 0.2, 10)[:, None] * np.array([1, 1, 1, 1, 1, 0])
        chunk = ActionChunk(chunk_id=1, joint_names=JOINTS, num_actions=10, action_dim=6,
                            actions=actions.reshape(-1).tolist())
        chunk.header.stamp = sec_to_stamp(t_obs)
        chunk.step_period.nanosec = 100_000_000
        wait_for(lambda: all(p.get_subscription_count() for p in chunk_pubs), 20)
        for p in chunk_pubs:
            p.publish(chunk)
        frames = _frames(3)
        deadline = time.monotonic() + 20
        while not got and time.monotonic() < deadline:
            robot.state()
            robot.frames(frames)
            time.sleep(0.05)
        assert got, "no ActionCorrection published"
        m = got[0]
        assert m.chunk_id == 1 and m.action_dim == 6 and list(m.joint_names) == JOINTS
        assert 1 <= m.first_index < 10 and m.num_rows == 10 - m.first_index
        res = np.asarray(m.residuals).reshape(m.num_rows, 6)
        # what the core's head gives on the same frames, joints and chunk
        import torch

        core = load_corrector(CKPT, CorrectionConfig(enabled=True))
        # the frames' own row of the chunk (their stamp is the message's): each row's lag is counted from it
        obs_row = min(int(round((m.header.stamp.sec + 1e-9 * m.header.stamp.nanosec - t_obs) / 0.1)), m.first_index)
        want = core.row_residuals(torch.as_tensor(actions, dtype=torch.float32), m.first_index, q, q,
                                  encode_frames(corrector.policy, frames), obs_row=obs_row)
        assert want is not None
        assert np.allclose(res, want.double().numpy(), atol=1e-5)
        assert np.all(res[:, 5] == 0.0) and np.abs(res[:, :5]).max() > 1e-4  # the head corrects the arm only
        wait_for(lambda: executor.core.stats.counts["corrections_received"] >= 1, 10)
        wait_for(lambda: executor.core.stats.counts["corrected_rows"] >= 1, 10)
        assert executor.core.stats.counts["corrections_dropped"] <= executor.core.stats.counts["corrections_received"]


def test_corrector_node_refusals_name_the_parameter(tmp_path):
    from rclpy.parameter import Parameter

    from effvla_ros.nodes.chunk_corrector import ChunkCorrectorNode

    from ros_helpers import set_parameter, spinner

    bare = tmp_path / "ckpt"
    shutil.copytree(CKPT, bare, ignore=shutil.ignore_patterns("correction_head.*", "eval_*"))
    with spinner() as sp:
        with pytest.raises(ValueError, match=r"correction\.enabled: no correction head"):
            ChunkCorrectorNode(context=sp.context, parameter_overrides=[
                Parameter("checkpoint", value=str(bare)), Parameter("correction.enabled", value=True)])
        idle = sp.add(ChunkCorrectorNode(context=sp.context, parameter_overrides=[
            Parameter("checkpoint", value=str(bare))]))
        assert idle.corrector is None
        from rcl_interfaces.msg import ParameterType

        r = set_parameter(sp.node("setter"), idle.get_fully_qualified_name(), "correction.enabled",
                          type=ParameterType.PARAMETER_BOOL, bool_value=True)
        assert not r.successful and "restart" in r.reason


def test_corrector_reads_every_token_the_compressor_computed_instead_of_encoding_again():
    """visual_source 'compressor': the token compressor publishes every token of each frame on ~/all_tokens
    (publish_all_tokens) besides its pruned ~/visual_tokens; the corrector's residuals are the head's on exactly
    those tokens, and they are the frames' encoder output (fp16 on the wire), not the pruned subset."""
    import torch
    from rclpy.parameter import Parameter

    from effvla_ros.core.correction import CorrectionConfig, encode_frames, load_corrector
    from effvla_ros.core.observation import decode_tokens
    from effvla_ros.msg import ActionChunk, ActionCorrection, ExecutionFeedback, VisualTokens
    from effvla_ros.nodes.chunk_corrector import ChunkCorrectorNode
    from effvla_ros.nodes.common import PIPELINE_QOS, sec_to_stamp
    from effvla_ros.nodes.token_compressor import TokenCompressorNode

    from ros_helpers import spinner, wait_for

    with spinner() as sp:
        comp = sp.add(TokenCompressorNode(context=sp.context, parameter_overrides=[
            Parameter("checkpoint", value=str(CKPT)), Parameter("publish_all_tokens", value=True),
            Parameter("pruning.keep_ratio", value=0.5)]))
        corrector = sp.add(ChunkCorrectorNode(context=sp.context, parameter_overrides=[
            Parameter("checkpoint", value=str(CKPT)), Parameter("correction.enabled", value=True),
            Parameter("visual_source", value="compressor"), Parameter("state_joint_names", value=JOINTS)]))
        comp_name, co_name = comp.get_fully_qualified_name(), corrector.get_fully_qualified_name()
        t = sp.node("corrector_tokens_test")
        got: list[ActionCorrection] = []
        full: list[VisualTokens] = []
        pruned: list[VisualTokens] = []
        t.create_subscription(ActionCorrection, f"{co_name}/action_correction", got.append, PIPELINE_QOS)
        t.create_subscription(VisualTokens, f"{comp_name}/visual_tokens", pruned.append, PIPELINE_QOS)
        fwd = t.create_publisher(VisualTokens, f"{co_name}/all_tokens", PIPELINE_QOS)  # the graph's remapping

        def on_full(m: VisualTokens) -> None:
            full.append(m)
            fwd.publish(m)

        t.create_subscription(VisualTokens, f"{comp_name}/all_tokens", on_full, PIPELINE_QOS)
        fb_pub = t.create_publisher(ExecutionFeedback, f"{co_name}/execution_feedback", PIPELINE_QOS)
        chunk_pub = t.create_publisher(ActionChunk, f"{co_name}/action_chunk", PIPELINE_QOS)
        from std_msgs.msg import String

        instr = t.create_publisher(String, "instruction", 10)  # task pruning needs the instruction
        q = np.array([0.1, -0.4, 0.5, 0.2, 0.0, 0.8])
        robot = _Robot(t, q)
        t_obs = robot.settle()
        actions = q[None, :] + np.linspace(0.0, 0.3, 10)[:, None] * np.array([1, -1, 1, 1, 1, 0])
        chunk = ActionChunk(chunk_id=7, joint_names=JOINTS, num_actions=10, action_dim=6,
                            actions=actions.reshape(-1).tolist())
        chunk.header.stamp = sec_to_stamp(t_obs)
        chunk.step_period.nanosec = 100_000_000
        wait_for(lambda: chunk_pub.get_subscription_count() and fb_pub.get_subscription_count(), 20)
        chunk_pub.publish(chunk)
        fb = ExecutionFeedback(chunk_id=7, state=ExecutionFeedback.STATE_EXECUTING, committed_index=2)
        frames = _frames(5)  # the same frames every time: each later pass reuses every patch
        deadline = time.monotonic() + 30
        while (not got or not pruned) and time.monotonic() < deadline:
            instr.publish(String(data="put the red cube on the plate"))
            fb_pub.publish(fb)
            robot.state()
            robot.frames(frames)
            time.sleep(0.1)
        assert got, "no ActionCorrection from the compressor's tokens"
        m = got[0]
        assert m.chunk_id == 7 and m.first_index == 2 and m.num_rows == 8
        by_stamp = {(v.header.stamp.sec, v.header.stamp.nanosec, v.camera_name): v for v in full}
        key = (m.header.stamp.sec, m.header.stamp.nanosec)
        tokens = {}
        for c in ("scene", "wrist"):
            v = by_stamp[(*key, c)]
            ct = decode_tokens(v.dtype, bytes(v.data), list(v.kept_indices), (v.grid_height, v.grid_width),
                               v.token_dim)
            assert ct.tokens.shape[0] == v.grid_height * v.grid_width  # every token of the grid ...
            tokens[c] = ct.tokens
        assert len(pruned[-1].kept_indices) < pruned[-1].grid_height * pruned[-1].grid_width  # ... not the pruned ones
        enc = encode_frames(comp.compressor.policy, frames)  # a fresh full encode of the same frames
        for c in tokens:
            assert torch.allclose(tokens[c], enc[c].float(), atol=2e-2, rtol=1e-2)  # fp16 on the wire
        core = load_corrector(CKPT, CorrectionConfig(enabled=True))
        obs_row = min(int(round((m.header.stamp.sec + 1e-9 * m.header.stamp.nanosec - t_obs) / 0.1)), 2)
        want = core.row_residuals(torch.as_tensor(actions, dtype=torch.float32), 2, q, q, tokens, obs_row=obs_row)
        assert want is not None
        res = np.asarray(m.residuals).reshape(8, 6)
        assert np.allclose(res, want.double().numpy(), atol=1e-5) and np.abs(res[:, :5]).max() > 1e-4
        assert corrector.counts["bad_tokens"] == 0
        assert corrector.policy is None  # it read the checkpoint's shapes, not its weights


def test_a_corrector_told_to_read_tokens_that_never_come_says_so():
    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
    from rclpy.parameter import Parameter

    from effvla_ros.nodes.chunk_corrector import ChunkCorrectorNode

    from ros_helpers import spinner, wait_for

    with spinner() as sp:
        corrector = sp.add(ChunkCorrectorNode(context=sp.context, parameter_overrides=[
            Parameter("checkpoint", value=str(CKPT)), Parameter("correction.enabled", value=True),
            Parameter("visual_source", value="compressor")]))
        seen: list[DiagnosticStatus] = []
        t = sp.node("diag_listener")
        t.create_subscription(DiagnosticArray, "/diagnostics",
                              lambda m: seen.extend(s for s in m.status if s.name == "effvla/chunk_corrector"), 10)
        wait_for(lambda: seen, 10)
        assert seen[-1].level == DiagnosticStatus.OK  # at start: no complaint yet
        corrector._started -= 10.0  # as if 10 s had passed without a token message
        wait_for(lambda: seen[-1].level == DiagnosticStatus.WARN, 10)
        assert "all_tokens" in seen[-1].message
