"""Relative (delta) actions: ``SmolVLAArch.relative_action_dims`` (openpi's DeltaActions on joint dims).

The policy predicts ``action - state`` on those dims and adds the observation's state back; training labels,
normalization statistics, config.json and RTC guidance (re-based onto the new state) follow.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from effvla_ros.core.rtc import GuidanceTarget, RTCConfig
from effvla_ros.core.runner import CameraTokens, PolicyRunner
from effvla_ros.core.smolvla import build_random_policy, load_policy, save_policy
from effvla_ros.core.smolvla.config import RELATIVE_KEY
from effvla_ros.core.smolvla.policy import SmolVLAPolicy
from effvla_ros.sim.task import sample_task
from effvla_ros.train.data import Episode, compute_stats, relative_chunks
from effvla_ros.train.trainer import policy_tokenizer, small_arch

SIZE = 32
DIMS = (0, 1, 2, 3, 4)


def _stats() -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return {k: {"mean": torch.randn(6, generator=g) * 0.2, "std": torch.rand(6, generator=g) + 0.3}
            for k in ("observation.state", "action")}


def _pair() -> tuple[SmolVLAPolicy, SmolVLAPolicy]:
    """The same weights and statistics, absolute and relative actions."""
    tok = policy_tokenizer()
    arch = small_arch(image_size=SIZE, vocab_size=len(tok), image_token_id=int(tok.convert_tokens_to_ids("<image>")),
                      patch_size=4, chunk_size=6, n_action_steps=3)
    absolute = build_random_policy(arch, tokenizer=tok, seed=0, init="fan_in", stats=_stats())
    relative = build_random_policy(arch.replace(relative_action_dims=DIMS), tokenizer=tok, seed=0, init="fan_in",
                                   stats=_stats())
    return absolute, relative


def _obs(b: int = 2) -> dict:
    g = torch.Generator().manual_seed(1)
    obs: dict = {f"observation.images.{c}": torch.rand(b, 3, SIZE, SIZE, generator=g) for c in ("scene", "wrist")}
    obs["observation.state"] = torch.randn(b, 6, generator=g)
    obs["task"] = [sample_task(s).instruction for s in range(b)]
    return obs


def test_validation_and_config_round_trip(tmp_path):
    absolute, relative = _pair()
    with pytest.raises(ValueError, match="relative_action_dims"):
        absolute.arch.replace(relative_action_dims=(0, 6)).validate()
    with pytest.raises(ValueError, match="relative_action_dims"):
        absolute.arch.replace(relative_action_dims=(1, 1)).validate()
    save_policy(relative, tmp_path / "rel")
    save_policy(absolute, tmp_path / "abs")
    assert json.loads((tmp_path / "rel" / "config.json").read_text())[RELATIVE_KEY] == list(DIMS)
    assert RELATIVE_KEY not in json.loads((tmp_path / "abs" / "config.json").read_text())  # LeRobot's exact keys
    assert load_policy(tmp_path / "rel").arch.relative_action_dims == DIMS
    assert load_policy(tmp_path / "abs").arch.relative_action_dims == ()


def test_prediction_adds_the_state_back_on_the_relative_dims_only():
    absolute, relative = _pair()
    obs = _obs()
    noise = torch.randn(2, 6, absolute.arch.max_action_dim, generator=torch.Generator().manual_seed(2))
    a = absolute.predict_action_chunk(obs, noise=noise).actions
    r = relative.predict_action_chunk(obs, noise=noise).actions
    state = obs["observation.state"]
    torch.testing.assert_close(r[:, :, :5], a[:, :, :5] + state[:, None, :5])
    torch.testing.assert_close(r[:, :, 5], a[:, :, 5])  # the gripper stays absolute
    x = torch.randn(2, 6, 6)
    torch.testing.assert_close(relative.to_absolute(relative.to_relative(x, state), state), x)
    torch.testing.assert_close(absolute.to_relative(x, state), x)


def test_training_labels_are_relative_to_the_observed_state():
    absolute, relative = _pair()
    obs = _obs()
    g = torch.Generator().manual_seed(4)
    acts = torch.randn(2, 6, 6, generator=g)
    noise = torch.randn(2, 6, absolute.arch.max_action_dim, generator=g)
    t = torch.tensor([0.3, 0.8])
    state = obs["observation.state"]
    rel_labels = acts.clone()
    rel_labels[:, :, :5] -= state[:, None, :5]
    torch.testing.assert_close(relative.flow_matching_loss(obs, acts, noise=noise, t=t),
                               absolute.flow_matching_loss(obs, rel_labels, noise=noise, t=t))
    assert not torch.allclose(relative.flow_matching_loss(obs, acts, noise=noise, t=t),
                              absolute.flow_matching_loss(obs, acts, noise=noise, t=t))


def test_stats_are_those_of_the_relative_chunks():
    rng = np.random.default_rng(0)
    t = 7
    ep = Episode(images={}, state=rng.normal(size=(t, 6)).astype(np.float32),
                 action=rng.normal(size=(t, 6)).astype(np.float32), task="x")
    rel = relative_chunks(ep, 3, DIMS)
    assert rel.shape == (t + (t - 1) + (t - 2), 6)  # every in-episode row of every frame's chunk
    manual = [ep.action[i + j] - np.r_[ep.state[i, :5], 0.0] for i in range(t) for j in range(3) if i + j < t]
    np.testing.assert_allclose(np.sort(rel, axis=0), np.sort(np.asarray(manual), axis=0), atol=1e-6)
    st = compute_stats([ep], relative_dims=DIMS, chunk_size=3)
    np.testing.assert_allclose(st["action"]["mean"].numpy(), np.mean(manual, axis=0), atol=1e-5)
    np.testing.assert_allclose(compute_stats([ep])["action"]["mean"].numpy(), ep.action.mean(0), atol=1e-5)


def test_runner_outputs_absolute_actions_and_rebases_rtc_guidance():
    _, relative = _pair()
    runner = PolicyRunner(relative, rtc=RTCConfig(enabled=True))
    runner.set_instruction(sample_task(0).instruction)
    obs = _obs(1)
    with torch.no_grad():
        enc = relative.encode_images({c: obs[f"observation.images.{c}"] for c in ("scene", "wrist")})
    n = relative.arch.tokens_per_camera
    cams = {c: CameraTokens(enc.tokens[c][0], torch.arange(n), (4, 4)) for c in ("scene", "wrist")}
    s0 = obs["observation.state"][0]
    noise = torch.randn(1, 6, relative.arch.max_action_dim, generator=torch.Generator().manual_seed(5))
    first = runner.infer(cams, s0, noise=noise)
    ref = relative.predict_action_chunk(obs, noise=noise).actions[0]
    torch.testing.assert_close(first.actions, ref)
    assert first.state is not None and torch.equal(first.state, s0)
    # the previous chunk re-based onto a new state is the same absolute trajectory
    s1 = s0 + torch.tensor([0.1, -0.2, 0.05, 0.0, 0.3, 0.4])
    target = runner._rebase(GuidanceTarget(first.x_final, 6, 2, ref_state=first.state), s1)
    a = relative.arch.action_dim

    def absolute_of(x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        return relative.to_absolute(relative.normalizer.unnormalize("action", x[None, :, :a]), state[None])[0]

    torch.testing.assert_close(absolute_of(target, s1), absolute_of(first.x_final, s0))
    assert not torch.allclose(target[:, :a], first.x_final[:, :a])
    torch.testing.assert_close(target[:, a:], first.x_final[:, a:])  # padding untouched
    guided = runner.infer(cams, s1, noise=noise, guidance=GuidanceTarget(first.x_final, 6, 2, ref_state=first.state))
    assert guided.guided and torch.isfinite(guided.actions).all()
    with pytest.raises(ValueError, match="ref_state"):
        runner.infer(cams, s1, noise=noise, guidance=GuidanceTarget(first.x_final, 6, 2))


def test_grounding_path_trains_the_same_relative_targets():
    """The trainer's one-pass flow + grounding loss builds its targets like flow_matching_loss (it once
    normalized the absolute actions, and a relative checkpoint learned absolute ones)."""
    from effvla_ros.train.grounding import flow_and_grounding_loss
    from effvla_ros.train.trainer import masked_loss

    _, relative = _pair()
    obs = _obs()
    g = torch.Generator().manual_seed(6)
    batch = dict(obs, action=torch.randn(2, 6, 6, generator=g) + 1.0,
                 action_is_pad=torch.tensor([[False] * 6, [False] * 4 + [True] * 2]))
    noise = torch.randn(2, 6, relative.arch.max_action_dim, generator=g)
    t = torch.tensor([0.4, 0.7])
    flow, aux, _ = flow_and_grounding_loss(relative, batch, None, None, None, layer=2, camera="scene", noise=noise, t=t)
    torch.testing.assert_close(flow, masked_loss(relative, batch, noise=noise, t=t))
    assert float(aux) == 0.0
