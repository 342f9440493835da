"""Fidelity of the SmolVLA policy core against LeRobot 0.6.1 golden files (test/data/golden_tiny/).

The golden files are produced by LeRobot itself (scripts/make_golden.sh): a tiny random-weight SmolVLA
checkpoint, fixed inputs (batch 2) and noise, LeRobot's actions and intermediates.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from effvla_ros.core.smolvla import RuntimeConfig, load_policy

GOLDEN = Path(__file__).parent / "data" / "golden_tiny"
CAMS = ["camera1", "camera2"]
# The golden files come from LeRobot on an Intel AMX CPU, where our outputs were bit-exact. On an AMD EPYC
# (no AMX) the kernels accumulate in another order: fp32 differs by up to 1.2e-5, and in bf16 one rounding
# step of the last layer's keys (2^-8 relative: 0.0156 at |k| ~ 4) carries into the actions (3e-3).
# A real fault (wrong weight, mask, position or scale) moves these by 0.1 or more.
FP32_TOL = 5e-5
BF16_TOL = 3e-2


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def _observation(ref: dict[str, torch.Tensor], tasks: list[str], rows: slice = slice(None)) -> dict:
    obs: dict = {f"observation.images.{c}": ref[f"observation.images.{c}"][rows] for c in CAMS}
    obs["observation.state"] = ref["observation.state.raw"][rows]
    obs["task"] = tasks[rows]
    return obs


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def golden(request):
    d = GOLDEN / request.param
    runtime = RuntimeConfig.lerobot_bf16() if request.param == "bf16" else RuntimeConfig()
    policy = load_policy(d, vlm_dir=GOLDEN / "vlm", runtime=runtime)
    ref = load_file(str(d / "reference.safetensors"))
    info = json.loads((d / "reference_info.json").read_text())
    tol = BF16_TOL if request.param == "bf16" else FP32_TOL
    result = policy.predict_action_chunk(_observation(ref, info["tasks"]), noise=ref["noise"], record=True)
    return request.param, policy, ref, info, tol, result


def test_preprocessing_matches(golden):
    _, policy, ref, info, _, _ = golden
    tokens, mask = policy.tokenize(info["tasks"])
    assert torch.equal(tokens, ref["observation.language.tokens"])
    assert torch.equal(mask, ref["observation.language.attention_mask"])
    state = policy.prepare_state(ref["observation.state.raw"])
    assert state.shape == (2, policy.arch.max_state_dim)
    assert _maxdiff(state[:, :6], ref["observation.state.normalized"]) <= 1e-6
    assert torch.count_nonzero(state[:, 6:]) == 0


def test_actions_match_lerobot(golden):
    _, _, ref, _, tol, r = golden
    assert _maxdiff(r.actions_normalized, ref["actions_normalized"]) <= tol
    assert _maxdiff(r.actions, ref["actions_unnormalized"]) <= tol
    assert ref["actions_unnormalized"].abs().max() > 0.5  # the comparison is not vacuous


def test_intermediates_match_lerobot(golden):
    _, policy, ref, _, tol, r = golden
    for i, cam in enumerate(CAMS):
        assert r.images.tokens[cam].shape == ref[f"img_emb.{i}"].shape
        assert _maxdiff(r.images.tokens[cam], ref[f"img_emb.{i}"]) <= tol
    assert r.images.grid == (4, 4)
    assert _maxdiff(r.cache.embeddings, ref["prefix_embs"]) <= tol
    assert torch.equal(r.cache.pad_mask, ref["prefix_pad_masks"])
    assert torch.equal(r.cache.att_mask, ref["prefix_att_masks"])
    assert _maxdiff(r.cache.keys[0], ref["kv_layer0_k"]) <= tol
    assert _maxdiff(r.cache.values[0], ref["kv_layer0_v"]) <= tol
    assert _maxdiff(r.cache.keys[-1], ref["kv_last_k"]) <= tol
    assert len(r.denoise.trace["v_t"]) == policy.num_steps == ref["v_t"].shape[0]
    assert _maxdiff(torch.stack(r.denoise.trace["t"]), ref["t"]) == 0.0
    assert _maxdiff(torch.stack(r.denoise.trace["x_t"]), ref["x_t"]) <= tol
    assert _maxdiff(torch.stack(r.denoise.trace["v_t"]), ref["v_t"]) <= tol


def test_batch_of_one_matches(golden):
    name, policy, ref, info, tol, _ = golden
    for row in range(2):
        rows = slice(row, row + 1)
        r = policy.predict_action_chunk(_observation(ref, info["tasks"], rows), noise=ref["noise"][rows])
        assert _maxdiff(r.actions, ref["actions_unnormalized"][rows]) <= max(tol, 1e-5)


def test_dtypes_of_stages(golden):
    name, _, _, _, _, r = golden
    expect = torch.bfloat16 if name == "bf16" else torch.float32
    assert r.images.tokens["camera1"].dtype == expect
    assert r.cache.keys[0].dtype == expect
    assert r.actions.dtype == torch.float32


@pytest.mark.slow
def test_real_size_golden():
    """Optional: a real-size golden made with `build_reference.py --real` (1.8 GB, not committed).

    EFFVLA_REAL_GOLDEN=<checkpoint dir> EFFVLA_REAL_GOLDEN_VLM=<vlm dir> pytest -m slow ..."""
    import os

    ckpt, vlm = os.environ.get("EFFVLA_REAL_GOLDEN"), os.environ.get("EFFVLA_REAL_GOLDEN_VLM")
    if not ckpt or not vlm:
        pytest.skip("set EFFVLA_REAL_GOLDEN and EFFVLA_REAL_GOLDEN_VLM to run the real-size comparison")
    info = json.loads((Path(ckpt) / "reference_info.json").read_text())
    runtime = RuntimeConfig.lerobot_bf16() if info.get("vlm_bf16") else RuntimeConfig()
    policy = load_policy(ckpt, vlm_dir=vlm, runtime=runtime)
    ref = load_file(str(Path(ckpt) / "reference.safetensors"))
    r = policy.predict_action_chunk(_observation(ref, info["tasks"]), noise=ref["noise"], record=True)
    tol = BF16_TOL if info.get("vlm_bf16") else FP32_TOL
    assert _maxdiff(r.actions, ref["actions_unnormalized"]) <= tol
    assert _maxdiff(r.cache.keys[-1], ref["kv_last_k"]) <= tol
    assert _maxdiff(torch.stack(r.denoise.trace["v_t"]), ref["v_t"]) <= tol
