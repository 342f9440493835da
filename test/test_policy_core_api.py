"""Staged API of the SmolVLA policy core: stages compose to predict_action_chunk, hooks are exact when
they only observe, token pruning equals LeRobot-style masking, early exit, RTC-style velocity edits."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from effvla_ros.core.smolvla import PrefillStop, RuntimeConfig, VisualTokens, load_policy

GOLDEN = Path(__file__).parent / "data" / "golden_tiny"


@pytest.fixture(scope="module")
def setup():
    policy = load_policy(GOLDEN / "fp32", vlm_dir=GOLDEN / "vlm", runtime=RuntimeConfig())
    ref = load_file(str(GOLDEN / "fp32" / "reference.safetensors"))
    tasks = json.loads((GOLDEN / "fp32" / "reference_info.json").read_text())["tasks"]
    obs = {f"observation.images.{c}": ref[f"observation.images.{c}"] for c in ("camera1", "camera2")}
    obs["observation.state"] = ref["observation.state.raw"]
    obs["task"] = tasks
    full = policy.predict_action_chunk(obs, noise=ref["noise"])
    return policy, ref, obs, full


def _stages(policy, obs):
    images, state, task = policy.split_observation(obs)
    lang, lmask = policy.tokenize(task)
    return images, lang, lmask, policy.prepare_state(state)


def test_staged_equals_monolithic(setup):
    policy, ref, obs, full = setup
    images, lang, lmask, state = _stages(policy, obs)
    with torch.no_grad():
        enc = policy.encode_images(images)
        cache = policy.prefill(enc.tokens, lang, lmask, state)
        den = policy.denoise(cache, ref["noise"])
    assert torch.equal(den.actions, full.actions)
    assert torch.equal(den.actions_normalized, full.actions_normalized)
    assert cache.num_layers == policy.arch.num_vlm_layers
    assert cache.segments["camera1"] == (0, 16) and cache.segments["state"] == (48, 49)
    assert enc.tokens["camera1"].shape == (2, 16, 64) and enc.patch_grid == (8, 8)


def test_observing_hooks_are_exact(setup):
    policy, ref, obs, full = setup
    images, lang, lmask, state = _stages(policy, obs)
    seen = {"prefill": [], "expert": [], "steps": []}

    def prefill_cb(info):
        seen["prefill"].append(info.layer_idx)
        assert info.hidden_out.shape == info.hidden_in.shape == (2, 49, 64)

    def expert_hook(ctx):
        seen["expert"].append((ctx.step, ctx.layer_idx, ctx.cross))
        return ctx.run(ctx.hidden)

    def step_cb(info):
        seen["steps"].append(info.t)
        return None

    with torch.no_grad():
        enc = policy.encode_images(images)
        cache = policy.prefill(enc.tokens, lang, lmask, state, layer_callback=prefill_cb)
        den = policy.denoise(cache, ref["noise"], step_callback=step_cb, expert_layer_hook=expert_hook)
    assert torch.equal(den.actions, full.actions)
    assert seen["prefill"] == [0, 1, 2, 3]
    assert [e for e in seen["expert"] if e[0] == 0] == [(0, 0, False), (0, 1, True), (0, 2, False), (0, 3, True)]
    assert seen["steps"] == pytest.approx([1.0 - 0.1 * i for i in range(10)])


def test_pruning_equals_masking(setup):
    policy, ref, obs, full = setup
    images, lang, lmask, state = _stages(policy, obs)
    keep = torch.tensor([0, 1, 3, 4, 6, 9, 10, 12, 15])  # 9 of camera1's 16 tokens
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, keep] = True
    with torch.no_grad():
        enc = policy.encode_images(images)
        pruned = policy.prefill({"camera1": VisualTokens(enc.tokens["camera1"], keep=keep),
                                 "camera2": enc.tokens["camera2"]}, lang, lmask, state)
        masked = policy.prefill({"camera1": VisualTokens(enc.tokens["camera1"], mask=mask),
                                 "camera2": enc.tokens["camera2"]}, lang, lmask, state)
        a_pruned = policy.denoise(pruned, ref["noise"]).actions
        a_masked = policy.denoise(masked, ref["noise"]).actions
    assert pruned.length == masked.length - 7
    assert torch.equal(pruned.token_index["camera1"], keep)
    # pruned prefix position j <-> masked prefix position where[j]; compare where the token is valid
    where = torch.cat([keep, torch.arange(16, masked.length)])
    valid = pruned.pad_mask                                              # (B, P_pruned)
    assert torch.equal(valid, masked.pad_mask[:, where])
    assert torch.equal(pruned.position_ids[valid], masked.position_ids[:, where][valid])
    for layer in range(pruned.num_layers):
        for a, b in ((pruned.keys[layer], masked.keys[layer]), (pruned.values[layer], masked.values[layer])):
            a_v = a.transpose(1, 2)[valid]                                # (N_valid, Hkv, D)
            b_v = b[:, :, where].transpose(1, 2)[valid]
            torch.testing.assert_close(a_v, b_v, atol=1e-5, rtol=0)
    torch.testing.assert_close(a_pruned, a_masked, atol=1e-5, rtol=0)
    assert (a_pruned - full.actions).abs().max() > 1e-3  # pruning changes the result (not vacuous)


def test_attention_probabilities_on_request(setup):
    policy, _, obs, _ = setup
    images, lang, lmask, state = _stages(policy, obs)
    with torch.no_grad():
        cache = policy.prefill(policy.encode_images(images).tokens, lang, lmask, state, attn_layers=[1])
    assert set(cache.attn_probs) == {1}
    p = cache.attn_probs[1]
    assert p.shape == (2, 4, 49, 49)
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 4, 49))
    pad = ~cache.pad_mask  # padded language tokens receive no attention from valid rows
    valid_rows = cache.pad_mask[:, None, :, None].expand_as(p)
    assert p.masked_select(valid_rows & pad[:, None, None, :]).abs().max() == 0
    rows = cache.pad_mask[:, None, :48].expand(2, 4, 48)
    assert p[:, :, :48, 48][rows].abs().max() == 0  # valid images/language tokens do not see the state


def test_fused_attention_matches_eager_attention():
    """The training-time fused path (torch SDPA) has the eager path's semantics: GQA, masks, a fully masked
    row attending uniformly, gradients."""
    from effvla_ros.core.smolvla.functional import eager_attention, fused_attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn((3, 4, 7, 16), generator=g, requires_grad=True)
    k = torch.randn((3, 2, 9, 16), generator=g, requires_grad=True)
    v = torch.randn((3, 2, 9, 16), generator=g, requires_grad=True)
    mask = torch.rand((3, 7, 9), generator=g) > 0.4
    mask[1, 2] = False                                                    # a fully masked row
    eager, _ = eager_attention(q, k, v, mask)
    fused = fused_attention(q, k, v, mask)
    assert fused.shape == eager.shape == (3, 7, 64)
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-6)
    uniform = v[1].mean(dim=1).repeat_interleave(2, dim=0).reshape(-1)  # heads 0,1 -> kv 0; 2,3 -> kv 1
    torch.testing.assert_close(fused[1, 2], uniform, rtol=1e-5, atol=1e-6)
    # gradients agree where the output of the fully masked row gets none (so in the policy, where a padded
    # token's output is never attended to); through that row, eager's where() passes no gradient to q and k
    w = torch.randn(eager.shape, generator=g)
    w[1, 2] = 0.0
    ge = torch.autograd.grad((eager * w).sum(), (q, k, v))
    gf = torch.autograd.grad((fused * w).sum(), (q, k, v))
    for a, b in zip(ge, gf, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    assert not torch.equal(fused, eager_attention(q, k, v, torch.ones_like(mask))[0])  # the mask matters


def test_policy_with_fused_attention_predicts_the_same_chunk(setup, monkeypatch):
    import effvla_ros.core.smolvla.layers as policy_module

    calls = []
    real = policy_module.fused_attention
    monkeypatch.setattr(policy_module, "fused_attention", lambda *a: calls.append(a[0].shape) or real(*a))
    policy, ref, obs, full = setup
    eager_runtime = policy.runtime
    assert eager_runtime.attention == "eager" and not policy.fused_attention  # LeRobot's path by default
    policy.apply_runtime(dataclasses.replace(eager_runtime, attention="fused"))  # RuntimeConfig.attention
    assert policy.fused_attention
    try:
        fused = policy.predict_action_chunk(obs, noise=ref["noise"])
        images, lang, lmask, state = _stages(policy, obs)
        with torch.no_grad():  # probabilities on request still come from the eager path
            cache = policy.prefill(policy.encode_images(images).tokens, lang, lmask, state, attn_layers=[1])
    finally:
        policy.apply_runtime(eager_runtime)
    assert not policy.fused_attention
    n_vlm, n_expert = policy.arch.num_vlm_layers, len(policy.expert_layer_indices())
    assert len(calls) == n_vlm + n_expert * policy.num_steps + (n_vlm - 1)  # every layer, then prefill minus layer 1
    torch.testing.assert_close(fused.actions, full.actions, rtol=1e-4, atol=1e-4)
    assert set(cache.attn_probs) == {1} and cache.attn_probs[1].shape == (2, 4, 49, 49)
    with pytest.raises(ValueError, match="attention"):
        RuntimeConfig(attention="flash")


def test_early_exit_reuses_previous_cache(setup):
    policy, ref, obs, full = setup
    images, lang, lmask, state = _stages(policy, obs)
    with torch.no_grad():
        tokens = policy.encode_images(images).tokens
        old = policy.prefill(tokens, lang, lmask, state)
        same = policy.prefill(tokens, lang, lmask, state,
                              layer_callback=lambda info: PrefillStop(old) if info.layer_idx == 1 else None)
        assert same.exit_layer == 1 and same.num_layers == 4
        assert same.keys[3] is old.keys[3]
        assert torch.equal(policy.denoise(same, ref["noise"]).actions, full.actions)
        other = policy.prefill(tokens, lang, lmask, state * 0.0,
                               layer_callback=lambda info: PrefillStop(old) if info.layer_idx == 0 else None)
        assert not torch.equal(other.keys[0], old.keys[0]) and other.keys[1] is old.keys[1]


def test_step_callback_modifies_velocity(setup):
    policy, ref, obs, _ = setup
    images, lang, lmask, state = _stages(policy, obs)
    with torch.no_grad():
        cache = policy.prefill(policy.encode_images(images).tokens, lang, lmask, state)
        frozen = policy.denoise(cache, ref["noise"], step_callback=lambda info: torch.zeros_like(info.v_t))
    torch.testing.assert_close(frozen.actions_normalized, ref["noise"][:, :, :6])


def test_velocity_is_differentiable_for_guidance(setup):
    policy, ref, obs, full = setup
    images, lang, lmask, state = _stages(policy, obs)
    grads = []

    def guided(info):  # a pinv-style guidance step: v + VJP of a loss on the predicted x_0
        with torch.enable_grad():
            x = info.x_t.detach().requires_grad_(True)
            v = info.velocity_fn(x, torch.full((x.shape[0],), info.t))
            x0 = x - info.t * v
            loss = (x0[:, -3:] ** 2).sum()  # the last actions
            (g,) = torch.autograd.grad(loss, x)
        grads.append(g)
        torch.testing.assert_close(v.detach(), info.v_t)
        return info.v_t + 0.1 * g

    with torch.no_grad():
        cache = policy.prefill(policy.encode_images(images).tokens, lang, lmask, state)
        out = policy.denoise(cache, ref["noise"], step_callback=guided)
    assert len(grads) == 10 and all(torch.isfinite(g).all() and g.abs().max() > 0 for g in grads)
    assert grads[0][:, :3].abs().max() > 0  # earlier actions influence later ones (causal suffix)
    assert (out.actions - full.actions).abs().max() > 1e-4


def test_flop_counting(setup):
    policy, ref, obs, _ = setup
    policy.apply_runtime(policy.runtime.replace(count_flops=True))
    try:
        r = policy.predict_action_chunk(obs, noise=ref["noise"])
    finally:
        policy.apply_runtime(policy.runtime.replace(count_flops=False))
    for k in ("vision.camera1", "prefill", "denoise"):
        assert r.stats[k].flops is not None and r.stats[k].flops > 0 and r.stats[k].wall_s > 0
    assert r.stats["denoise"].flops > r.stats["prefill"].flops


@pytest.mark.parametrize("vision,vlm,expert", [("bfloat16", "bfloat16", "bfloat16"), ("float16", "float16", "float16"),
                                               ("float32", "bfloat16", "float32"), ("bfloat16", "float32", "float16")])
def test_per_stage_dtypes(setup, vision, vlm, expert):
    policy, ref, obs, full = setup
    try:
        policy.apply_runtime(RuntimeConfig(vision_dtype=vision, vlm_dtype=vlm, expert_dtype=expert))
        r = policy.predict_action_chunk(obs, noise=ref["noise"])
    finally:
        policy.apply_runtime(RuntimeConfig())
    assert r.images.tokens["camera1"].dtype == getattr(torch, vision)
    assert r.cache.keys[0].dtype == getattr(torch, vlm)
    assert r.actions.dtype == torch.float32 and torch.isfinite(r.actions).all()
    err = (r.actions - full.actions).abs().max().item()
    assert 0 < err < 0.25 * full.actions.abs().max().item()  # low precision: close, not equal
    assert policy.weights.expert.norm.weight.dtype == torch.float32  # restored
