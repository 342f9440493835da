"""Policy runner core: fidelity with everything off, early exit, expert reuse, RTC guidance, calibration."""
from __future__ import annotations

import pytest
import torch

from effvla_ros.core.early_exit import EarlyExitConfig, ExpertReuseConfig, calibrate_thresholds, token_similarity
from effvla_ros.core.rtc import GuidanceTarget, RTCConfig
from effvla_ros.core.runner import CameraTokens, InferenceConfig, PolicyRunner
from effvla_ros.core.smolvla import build_random_policy, tiny_arch
from effvla_ros.core.smolvla.tokenizer import build_tiny_tokenizer

TASK = "pick up the red cube"


@pytest.fixture(scope="module")
def policy():  # type: ignore[no-untyped-def]
    stats = {"observation.state": {"mean": torch.zeros(6), "std": torch.ones(6)},
             "action": {"mean": torch.linspace(-1, 1, 6), "std": torch.ones(6) * 0.5}}
    return build_random_policy(tiny_arch(), tokenizer=build_tiny_tokenizer(), seed=5, stats=stats)


def _obs(seed: int):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    imgs = {c: torch.rand(1, 3, 48, 64, generator=g) for c in ("camera1", "camera2")}
    return imgs, torch.randn(6, generator=g)


def _tokens(policy, imgs, keep=None):  # type: ignore[no-untyped-def]
    enc = policy.encode_images(imgs)
    out = {}
    for c, t in enc.tokens.items():
        kept = torch.arange(16) if keep is None else keep
        out[c] = CameraTokens(t[0, kept], kept, enc.grid)
    return out


def _noise(policy, seed=0):  # type: ignore[no-untyped-def]
    return torch.randn(1, policy.arch.chunk_size, policy.arch.max_action_dim, generator=torch.Generator().manual_seed(seed))


def test_everything_off_equals_policy_core(policy) -> None:  # type: ignore[no-untyped-def]
    imgs, state = _obs(0)
    runner = PolicyRunner(policy)
    runner.set_instruction(TASK)
    res = runner.infer(_tokens(policy, imgs), state, noise=_noise(policy))
    ref = policy.predict_action_chunk({**{f"observation.images.{c}": v for c, v in imgs.items()},
                                       "observation.state": state[None], "task": TASK}, noise=_noise(policy))
    assert torch.equal(res.actions, ref.actions[0])
    assert res.exit_layer == policy.arch.num_vlm_layers and not res.guided and res.reused_expert_layers == 0


def test_pruned_tokens_equal_masking(policy) -> None:  # type: ignore[no-untyped-def]
    """Removing tokens (kept subset) equals LeRobot-style masking of the others."""
    from effvla_ros.core.smolvla import VisualTokens

    imgs, state = _obs(1)
    keep = torch.tensor([0, 3, 5, 6, 9, 12, 15])
    runner = PolicyRunner(policy)
    runner.set_instruction(TASK)
    res = runner.infer(_tokens(policy, imgs, keep), state, noise=_noise(policy))
    enc = policy.encode_images(imgs)
    mask = torch.zeros(1, 16, dtype=torch.bool)
    mask[0, keep] = True
    lang, lmask = policy.tokenize(TASK)
    cache = policy.prefill({c: VisualTokens(t, mask=mask) for c, t in enc.tokens.items()}, lang, lmask,
                           policy.prepare_state(state[None]))
    ref = policy.denoise(cache, _noise(policy))
    torch.testing.assert_close(res.actions, ref.actions[0], atol=1e-5, rtol=1e-5)


def test_early_exit_reuses_prefix_and_forces_full(policy) -> None:  # type: ignore[no-untyped-def]
    imgs, state = _obs(2)
    toks = _tokens(policy, imgs)
    runner = PolicyRunner(policy, early_exit=EarlyExitConfig(enabled=True, exit_layers=[1], thresholds=[0.99],
                                                             max_consecutive_reuses=1))
    runner.set_instruction(TASK)
    full = runner.infer(toks, state, noise=_noise(policy))
    again = runner.infer(toks, state, noise=_noise(policy))
    assert full.exit_layer == policy.arch.num_vlm_layers
    assert again.exit_layer == 2 and again.similarities[1] == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(again.actions, full.actions)  # same observation: same result
    third = runner.infer(toks, state, noise=_noise(policy))
    assert third.exit_layer == policy.arch.num_vlm_layers  # max_consecutive_reuses reached
    # a very different observation does not exit
    other = runner.infer(_tokens(policy, _obs(9)[0]), state, noise=_noise(policy))
    assert other.exit_layer == policy.arch.num_vlm_layers or other.similarities[1] >= 0.99
    # a new instruction never reuses the old prefix
    runner.set_instruction("open the drawer")
    new_task = runner.infer(toks, state, noise=_noise(policy))
    assert new_task.exit_layer == policy.arch.num_vlm_layers and not new_task.similarities


def test_expert_reuse_counts_and_threshold_zero_is_exact(policy) -> None:  # type: ignore[no-untyped-def]
    imgs, state = _obs(3)
    toks = _tokens(policy, imgs)
    base = PolicyRunner(policy)
    base.set_instruction(TASK)
    ref = base.infer(toks, state, noise=_noise(policy))
    off = PolicyRunner(policy, expert_reuse=ExpertReuseConfig(enabled=True, threshold=0.0))
    off.set_instruction(TASK)
    r0 = off.infer(toks, state, noise=_noise(policy))
    assert r0.reused_expert_layers == 0
    torch.testing.assert_close(r0.actions, ref.actions)
    on = PolicyRunner(policy, expert_reuse=ExpertReuseConfig(enabled=True, threshold=10.0, max_consecutive=1))
    on.set_instruction(TASK)
    r1 = on.infer(toks, state, noise=_noise(policy))
    n_layers = len(policy.expert_layer_indices())
    assert r1.reused_expert_layers + r1.computed_expert_layers == n_layers * 10
    assert r1.reused_expert_layers > 0
    assert not torch.equal(r1.actions, ref.actions)


def test_rtc_guidance_pulls_start_of_chunk_to_previous(policy) -> None:  # type: ignore[no-untyped-def]
    imgs, state = _obs(4)
    toks = _tokens(policy, imgs)
    runner = PolicyRunner(policy, rtc=RTCConfig(max_guidance_weight=10.0))
    runner.set_instruction(TASK)
    plain = runner.infer(toks, state, noise=_noise(policy, 1))
    target = plain.x_final + 1.0  # a previous chunk that disagrees
    g = runner.infer(toks, state, noise=_noise(policy, 1), guidance=GuidanceTarget(target, valid=8, delay=3))
    assert g.guided and g.rtc_delay == 3
    d_plain = (plain.x_final[:3] - target[:3]).abs().mean()
    d_guided = (g.x_final[:3] - target[:3]).abs().mean()
    assert d_guided < 0.5 * d_plain
    vjp = PolicyRunner(policy, rtc=RTCConfig(guidance="vjp", max_guidance_weight=10.0))
    vjp.set_instruction(TASK)
    gv = vjp.infer(toks, state, noise=_noise(policy, 1), guidance=GuidanceTarget(target, valid=8, delay=3))
    assert (gv.x_final[:3] - target[:3]).abs().mean() < 0.5 * d_plain


def test_bad_inputs(policy) -> None:  # type: ignore[no-untyped-def]
    imgs, state = _obs(5)
    runner = PolicyRunner(policy)
    with pytest.raises(RuntimeError, match="instruction"):
        runner.infer(_tokens(policy, imgs), state)
    runner.set_instruction(TASK)
    with pytest.raises(ValueError, match="state"):
        runner.infer(_tokens(policy, imgs), torch.zeros(3))
    with pytest.raises(ValueError, match="NaN"):
        runner.infer(_tokens(policy, imgs), torch.full((6,), float("nan")))
    bad = {"camera1": CameraTokens(torch.zeros(4, 32), torch.arange(4), (2, 2))}
    with pytest.raises(ValueError, match="camera1"):
        runner.infer(bad, state)
    # a missing camera is masked out, inference still runs
    toks = _tokens(policy, imgs)
    toks["camera2"] = CameraTokens(torch.zeros(0, 64), torch.zeros(0, dtype=torch.long), (4, 4), missing=True)
    assert torch.isfinite(runner.infer(toks, state).actions).all()


def test_calibration_follows_target_fractions() -> None:
    g = torch.Generator().manual_seed(0)
    sims = torch.sort(torch.rand(1000, 3, generator=g), dim=1).values  # deeper exits are more similar
    thr = calibrate_thresholds(sims, ratio=0.5, exit_fraction=0.7)
    remaining = torch.ones(1000, dtype=torch.bool)
    taken = []
    for k, t in enumerate(thr):
        here = remaining & (sims[:, k] >= t)
        taken.append(int(here.sum()))
        remaining &= ~here
    p = torch.tensor([1, 0.5, 0.25]) / 1.75 * 0.7
    for k in range(3):
        assert abs(taken[k] - int(1000 * p[k])) <= 2
    assert token_similarity(torch.ones(1, 3, 4), torch.ones(1, 3, 4), torch.ones(1, 3, dtype=torch.bool)) == 1.0


def test_inference_config_validation() -> None:
    with pytest.raises(ValueError, match="num_steps"):
        InferenceConfig(num_steps=0)
    with pytest.raises(ValueError, match="thresholds"):
        EarlyExitConfig(exit_layers=[1, 2, 3], thresholds=[0.9, 0.8])
