"""One recorded stream through the policy node's observation path and through replay: the same
observations (state vectors, token sets) and the same actions for the same noise.

The node side runs the node's own methods (``_compress_images``, ``_observation``, ``_state_at``,
``_state_vector``, ``_guidance``) on a stand-in ``self`` (no DDS), fed with rclpy messages made from the
bag's messages in recording order: images as they arrive, every JointState received so far. The replay
side is :func:`effvla_ros.replay.observations.build_episode` + :func:`effvla_ros.replay.evaluate.run_setting`.
"""
from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from effvla_ros.core.chunking import ChunkHistory, FixedDelay, IssuedChunk
from effvla_ros.core.compression.compressor import TokenCompressor
from effvla_ros.core.observation import camera_tokens_equal, encode_tokens
from effvla_ros.core.runner import CameraTokens, InferenceConfig, PolicyRunner
from effvla_ros.core.settings import Setting, make_setting
from effvla_ros.replay.bagio import open_bag
from effvla_ros.replay.observations import ObservationOptions, build_episode
from effvla_ros.replay.synthetic import write_episode_bag

CAMS = ["camera1", "camera2"]
STATE_JOINTS = ["gripper", "shoulder_pan", "wrist_flex", "shoulder_lift", "wrist_roll", "elbow_flex"]  # not the
# message's order: picked by name
FPS = 10.0
SEED = 7
N_OBS = 4


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):  # type: ignore[no-untyped-def]
    """One torch thread (conftest.py)."""


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from effvla_ros.core.smolvla import RuntimeConfig, load_policy

    from model_fixtures import write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=2)
    return load_policy(str(ckpt), runtime=RuntimeConfig())


@pytest.fixture(scope="module")
def bag(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # BGR images (converted on both paths), joint states at 50 Hz (several per frame), unsynchronized cameras
    return write_episode_bag(tmp_path_factory.mktemp("bag") / "ep", duration=1.0, joint_rate=50.0, encoding="bgr8")


class _Logger:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def _log(self, msg: str, **_kw: Any) -> None:
        self.lines.append(msg)

    info = warning = error = _log


def _rclpy_messages(path: Path) -> list[tuple[str, Any]]:
    """The bag's images and joint states, in recording order, as the node receives them (rclpy messages)."""
    from sensor_msgs.msg import Image, JointState

    b = open_bag(path)
    out: list[tuple[str, Any]] = []
    topics = [t for t in b.topics if t.endswith("image_raw") or t == "/joint_states"]
    for topic, _log, raw in b.messages(topics):
        m = b.decode(topic, raw)
        if topic == "/joint_states":
            msg = JointState(name=list(m.name), position=[float(x) for x in m.position])
        else:
            msg = Image(height=int(m.height), width=int(m.width), encoding=str(m.encoding), step=int(m.step),
                        data=bytes(np.asarray(m.data, dtype=np.uint8)))
        msg.header.stamp.sec, msg.header.stamp.nanosec = int(m.header.stamp.sec), int(m.header.stamp.nanosec)
        out.append((topic, msg))
    return out


def _node(policy: Any, setting: Setting, tokens_mode: bool = False) -> Any:
    """A stand-in ``self`` for PolicyNode's methods: the attributes they use, the node's configs."""
    from effvla_ros.core.observation import resolve_state_spec
    from effvla_ros.nodes.policy import PolicyNodeConfig

    cfg = PolicyNodeConfig(checkpoint="unused", cameras=list(CAMS), state_joint_names=list(STATE_JOINTS), fps=FPS,
                           input_mode="tokens" if tokens_mode else "images")
    spec = resolve_state_spec(6, explicit=cfg.state_joint_names)  # what PolicyNode.__init__ resolves
    comp = TokenCompressor(policy, setting.pruning, setting.reuse)
    logger = _Logger()
    return types.SimpleNamespace(
        node_params=types.SimpleNamespace(config=cfg), state_spec=spec, rtc_params=types.SimpleNamespace(config=setting.rtc),
        policy=policy, compressor=None if tokens_mode else comp, _image_tokens={}, _image_encode_s={},
        _chunks=ChunkHistory(maxlen=8), delay=FixedDelay(1),  # replay's fixed d (the node measures it)
        counts={"rejected_tokens": 0, "rejected_state": 0, "unsynced_state": 0}, get_logger=lambda: logger, log=logger)


def _visual_tokens(cam: str, out: Any, stamp: Any, dtype: str = "float32") -> Any:
    """The token compressor node's message of one encoded frame (its wire encoding)."""
    from effvla_ros.msg import VisualTokens

    vt = VisualTokens(camera_name=cam, dtype=dtype, token_dim=int(out.tokens.shape[1]),
                      kept_indices=out.kept.to(torch.int64).tolist(), reused=out.reused.tolist(),
                      data=encode_tokens(out.tokens, dtype).tobytes())
    vt.grid_height, vt.grid_width = out.grid
    vt.header.stamp = stamp
    return vt


def _node_path(policy: Any, msgs: list[tuple[str, Any]], setting: Setting, instruction: str) -> dict[str, Any]:
    """Every image through the node's compressor path, an observation whenever the slower camera's frame
    arrives (frames mode's observation times), paired, decoded and inferred as the node does."""
    from effvla_ros.nodes.policy import PolicyNode
    from effvla_ros.replay.evaluate import noise_for

    node = _node(policy, setting)
    tok_node = _node(policy, setting, tokens_mode=True)
    node.compressor.set_instruction(instruction)
    runner = PolicyRunner(policy, inference=InferenceConfig(num_steps=setting.inference.num_steps),
                          early_exit=setting.early_exit, expert_reuse=setting.expert_reuse, rtc=setting.rtc)
    runner.set_instruction(instruction)
    states: list[tuple[float, Any]] = []
    tokens: dict[str, Any] = {}
    out: dict[str, Any] = {"stamps": [], "states": [], "cams": [], "actions": []}
    for topic, msg in msgs:
        if topic == "/joint_states":
            states.append((msg.header.stamp.sec + 1e-9 * msg.header.stamp.nanosec, msg))  # PolicyNode._on_state
            continue
        cam = topic.split("/")[-2]
        PolicyNode._compress_images(node, {cam: msg}, instruction)
        # the tokens-mode node gets the same frame through the wire format (float32: bit-exact)
        tokens[cam] = _visual_tokens(cam, _last_output[cam], msg.header.stamp)
        if cam != "camera2" or len(out["stamps"]) >= N_OBS:
            continue
        obs = PolicyNode._observation(node, {})
        assert obs is not None, node.log.lines
        obs_stamp, cams = obs
        tok_obs = PolicyNode._observation(tok_node, tokens)
        assert tok_obs is not None and tok_obs[0] == obs_stamp, tok_node.log.lines
        assert all(camera_tokens_equal(tok_obs[1][c], cams[c]) for c in CAMS)  # images == tokens mode
        synced = PolicyNode._state_at(node, obs_stamp, states)
        assert synced not in (None, False), node.log.lines
        state = PolicyNode._state_vector(node, synced)
        assert state is not None, node.log.lines
        guidance = PolicyNode._guidance(node, obs_stamp, None, 1.0 / FPS)
        i = len(out["stamps"])
        res = runner.infer(cams, state, noise=noise_for(i, SEED, (1, policy.arch.chunk_size, policy.arch.max_action_dim)),
                           guidance=guidance)
        node._chunks.add(IssuedChunk(i + 1, obs_stamp, res.x_final.detach().cpu(), res.state))  # PolicyNode._publish
        out["stamps"].append(obs_stamp)
        out["states"].append(state)
        out["cams"].append(cams)
        out["actions"].append(res.actions.detach().double().numpy())
    return out


_last_output: dict[str, Any] = {}


@pytest.fixture(autouse=True)
def _record_compressor_outputs(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Keep each camera's last CompressedCamera (the token compressor node publishes it)."""
    orig = TokenCompressor.process

    def process(self, camera: str, image: torch.Tensor):  # type: ignore[no-untyped-def]
        res = orig(self, camera, image)
        _last_output[camera] = res
        return res

    monkeypatch.setattr(TokenCompressor, "process", process)
    yield
    _last_output.clear()


def _replay_path(policy: Any, path: Path, setting: Setting, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """build_episode + run_setting, with the runner's inputs recorded."""
    import effvla_ros.replay.evaluate as ev

    seen: list[tuple[dict[str, CameraTokens], torch.Tensor]] = []

    class Recording(PolicyRunner):
        def infer(self, cameras, state, **kw):  # type: ignore[no-untyped-def, override]
            seen.append((dict(cameras), state.clone()))
            return super().infer(cameras, state, **kw)

    monkeypatch.setattr(ev, "PolicyRunner", Recording)
    ep = build_episode(open_bag(path), CAMS, 6, ObservationOptions(mode="frames", max_steps=N_OBS,
                                                                   state_joint_names=list(STATE_JOINTS)))
    run = ev.run_setting(policy, ep, setting, seed=SEED, fps=FPS, rtc_delay_steps=1, count_flops=False)
    return {"stamps": [o.stamp for o in ep.observations], "states": [s for _, s in seen],
            "cams": [c for c, _ in seen], "actions": list(run.actions), "episode": ep, "run": run}


@pytest.mark.parametrize("changes", [{}, {"pruning.keep_ratio": 0.5, "rtc.enabled": True}],
                         ids=["baseline", "pruned+rtc"])
def test_node_and_replay_build_the_same_observations_and_actions(policy, bag: Path, changes: dict[str, Any],  # type: ignore[no-untyped-def]
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    setting = make_setting("s", changes, {"num_steps": 2})
    replay = _replay_path(policy, bag, setting, monkeypatch)
    node = _node_path(policy, _rclpy_messages(bag), setting, "pick up the red cube")
    assert len(replay["stamps"]) == len(node["stamps"]) == N_OBS
    np.testing.assert_allclose(node["stamps"], replay["stamps"], rtol=0, atol=1e-6)
    for i in range(N_OBS):
        assert torch.equal(node["states"][i], replay["states"][i]), i
        for cam in CAMS:
            assert camera_tokens_equal(node["cams"][i][cam], replay["cams"][i][cam]), (i, cam)
        np.testing.assert_array_equal(node["actions"][i], replay["actions"][i])
    # the pairing is not trivial: the state is the one of the images' instant, not the newest received
    ep = replay["episode"]
    assert all(o.stamp - 0.02 < t <= o.stamp for o, t in zip(ep.observations, _paired_stamps(bag, ep), strict=True))
    if changes:
        assert replay["run"].guidance_ids[1:] == [1, 2, 3]  # every chunk after the first is guided
        assert all(int(c.kept.numel()) < 16 for cams in node["cams"] for c in cams.values())  # pruned


def _paired_stamps(path: Path, ep: Any) -> list[float]:
    """Stamp of the JointState whose positions are each observation's state."""
    b = open_bag(path)
    js = [b.decode("/joint_states", raw) for _, _, raw in b.messages(["/joint_states"])]
    out = []
    for o in ep.observations:
        for m in js:
            pos = dict(zip(m.name, m.position, strict=True))
            if np.array_equal(np.asarray([pos[n] for n in STATE_JOINTS], np.float32), o.state):
                out.append(m.header.stamp.sec + 1e-9 * m.header.stamp.nanosec)
                break
    return out
