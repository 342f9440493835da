"""Action-expert feature reuse: the rule (first/final full steps, forced recompute, linear prediction),
that it really skips compute, its data-driven calibration and the YAML the node loads."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from effvla_ros.core.calibration import calibrate
from effvla_ros.core.early_exit import (
    EarlyExitConfig,
    ExpertReuse,
    ExpertReuseConfig,
    calibrate_expert_thresholds,
    expert_reuse_fraction,
    load_calibration,
    relative_change,
    save_calibration,
)
from effvla_ros.core.runner import CameraTokens, InferenceConfig, PolicyRunner
from effvla_ros.core.smolvla import build_random_policy, tiny_arch
from effvla_ros.core.smolvla.policy import ExpertLayerContext
from effvla_ros.core.smolvla.tokenizer import build_tiny_tokenizer

TASK = "pick up the red cube"


@pytest.fixture(scope="module")
def policy():  # type: ignore[no-untyped-def]
    return build_random_policy(tiny_arch(), tokenizer=build_tiny_tokenizer(), seed=7)


def _tokens(policy, seed: int = 0):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    enc = policy.encode_images({c: torch.rand(1, 3, 48, 64, generator=g) for c in ("camera1", "camera2")})
    n = enc.tokens["camera1"].shape[1]
    return {c: CameraTokens(t[0], torch.arange(n), enc.grid) for c, t in enc.tokens.items()}, torch.randn(6, generator=g)


def _noise(policy, seed: int = 0):  # type: ignore[no-untyped-def]
    return torch.randn(1, policy.arch.chunk_size, policy.arch.max_action_dim, generator=torch.Generator().manual_seed(seed))


class _FakeLayers:
    """Drives ExpertReuse.hook like denoise() does, with given inputs and an exactly known layer."""

    def __init__(self, layers: list[int], delta) -> None:  # type: ignore[no-untyped-def]
        self.layers, self.delta, self.calls = layers, delta, []

    def run_steps(self, reuse: ExpertReuse, num_steps: int, inputs=None) -> list[dict[int, torch.Tensor]]:  # type: ignore[no-untyped-def]
        reuse.reset(num_steps)
        outs = []
        for s in range(num_steps):
            step_out = {}
            for i in self.layers:
                h = inputs(s, i) if inputs is not None else torch.full((1, 2, 3), float(s + 1))

                def run(hh: torch.Tensor, s: int = s, i: int = i) -> torch.Tensor:
                    self.calls.append((s, i))
                    return hh + self.delta(s, i)

                step_out[i] = reuse.hook(ExpertLayerContext(s, torch.full((1,), 1.0 - s / num_steps), i, False, h, run))
            outs.append(step_out)
        return outs


def test_forced_recompute_first_and_final_steps() -> None:
    fake = _FakeLayers([0, 2], lambda s, i: torch.ones(1, 2, 3))
    cfg = ExpertReuseConfig(enabled=True, threshold=10.0, max_consecutive=2, full_steps=1, final_steps=0)
    reuse = ExpertReuse(cfg, [0, 2])
    fake.run_steps(reuse, 10)
    # threshold 10: reuse whenever allowed -> computed at 0, 3, 6, 9 (recompute after 2 reuses)
    assert sorted({s for s, _ in fake.calls}) == [0, 3, 6, 9]
    assert reuse.computed == 8 and reuse.reused == 12 and reuse.steps_with_reuse == {1, 2, 4, 5, 7, 8}
    fake.calls.clear()
    reuse = ExpertReuse(ExpertReuseConfig(enabled=True, threshold=10.0, max_consecutive=3, full_steps=2,
                                          final_steps=2), [0, 2])
    fake.run_steps(reuse, 10)
    assert sorted({s for s, _ in fake.calls}) == [0, 1, 5, 8, 9]  # 0-1 first, 8-9 final, 5 after 3 reuses
    fake.calls.clear()
    off = ExpertReuse(ExpertReuseConfig(enabled=False, threshold=10.0), [0, 2])
    fake.run_steps(off, 5)
    assert len(fake.calls) == 10 and off.reused == 0


def test_threshold_decides_on_change_since_last_computation() -> None:
    fake = _FakeLayers([0], lambda s, i: torch.zeros(1, 2, 3))
    # input grows by 10 % per step: relative change 0.1, 0.21, ... against the last computed step
    def inputs(s: int, i: int) -> torch.Tensor:
        return torch.full((1, 2, 3), 1.1**s)

    reuse = ExpertReuse(ExpertReuseConfig(enabled=True, threshold=0.15, max_consecutive=5, final_steps=0), [0])
    fake.run_steps(reuse, 7, inputs)
    # step 1: 0.1 < 0.15 reuse; step 2: 0.21 vs step 0 -> compute; step 3 reuse; 4 compute; 5 reuse; 6 compute
    assert [s for s, _ in fake.calls] == [0, 2, 4, 6]
    assert float(reuse.changes[(1, 0)]) == pytest.approx(0.1, rel=1e-5)
    assert float(relative_change(torch.full((3,), 1.1), torch.ones(3))) == pytest.approx(0.1, rel=1e-5)


def test_linear_prediction_is_exact_for_linear_updates() -> None:
    def delta(s: int, i: int) -> torch.Tensor:
        return torch.full((1, 2, 3), 0.5 + 0.25 * s + i)

    ref_fake = _FakeLayers([0, 1], delta)
    ref = ref_fake.run_steps(ExpertReuse(ExpertReuseConfig(enabled=False), [0, 1]), 10)
    for extrapolate in (True, False):
        fake = _FakeLayers([0, 1], delta)
        reuse = ExpertReuse(ExpertReuseConfig(enabled=True, threshold=10.0, max_consecutive=2, full_steps=2,
                                              final_steps=0, extrapolate=extrapolate), [0, 1])
        out = fake.run_steps(reuse, 10)
        assert reuse.reused > 0
        same = all(torch.allclose(o[i], r[i]) for o, r in zip(out, ref) for i in (0, 1))
        assert same == extrapolate  # the linear prediction recovers linearly drifting updates exactly


def test_reuse_really_skips_compute(policy) -> None:  # type: ignore[no-untyped-def]
    toks, state = _tokens(policy)
    n_layers = len(policy.expert_layer_indices())
    res = {}
    for name, er in (("off", ExpertReuseConfig()),
                     ("on", ExpertReuseConfig(enabled=True, threshold=10.0, max_consecutive=3, final_steps=1))):
        r = PolicyRunner(policy, inference=InferenceConfig(num_steps=10, count_flops=True), expert_reuse=er)
        r.set_instruction(TASK)
        res[name] = r.infer(toks, state, noise=_noise(policy))
    on, off = res["on"], res["off"]
    # computed at steps 0, 4, 8 and the final step 9: 4 of 10 steps per layer
    assert on.computed_expert_layers == 4 * n_layers and on.reused_expert_layers == 6 * n_layers
    assert off.computed_expert_layers == 10 * n_layers
    # FLOPs: the prefix is unchanged, the denoising FLOPs drop by the 6 skipped layer evaluations
    assert on.flops["prefill"] == off.flops["prefill"]
    assert on.flops["denoise"] < 0.6 * off.flops["denoise"]
    per_layer_step = (off.flops["denoise"] - on.flops["denoise"]) / (6 * n_layers)
    assert per_layer_step > 0
    assert torch.isfinite(on.actions).all() and not torch.equal(on.actions, off.actions)


def test_reuse_fraction_simulation_matches_the_hook() -> None:
    g = torch.Generator().manual_seed(3)
    n = 10
    walk = torch.cumsum(torch.rand(n, 1, 4, 5, generator=g) * 0.2, dim=0) + 1.0  # inputs of one layer per step
    changes = torch.zeros(1, n, n, dtype=torch.float64)
    for a in range(n):
        for b in range(a + 1, n):
            changes[0, a, b] = relative_change(walk[b], walk[a])
    for thr in (0.05, 0.15, 0.3):
        cfg = ExpertReuseConfig(enabled=True, threshold=thr, max_consecutive=3, full_steps=1, final_steps=1)
        reuse = ExpertReuse(cfg, [0])
        _FakeLayers([0], lambda s, i: torch.zeros(1)).run_steps(reuse, n, lambda s, i: walk[s])
        assert reuse.reused / n == pytest.approx(expert_reuse_fraction(changes, thr, 1, 3, 1))


def test_calibrated_thresholds_hit_the_target_fraction() -> None:
    g = torch.Generator().manual_seed(0)
    n_chunks, n = 200, 10
    # synthetic per-step changes growing towards the end of denoising, noisy per chunk; accumulated
    # change from a to b = sum of the per-step changes in between
    per_step = torch.rand(n_chunks, n, generator=g) * 0.2 + torch.linspace(0.05, 0.3, n)
    cum = torch.cumsum(per_step, dim=1)
    changes = [(cum[:, None, :] - cum[:, :, None]).clamp(min=0).double() * (1.0 + 0.2 * k) for k in range(3)]
    for target in (0.2, 0.4, 0.55):
        thr = calibrate_expert_thresholds(changes, target, full_steps=1, max_consecutive=3, final_steps=1)
        assert len(thr) == 3
        for ch, t in zip(changes, thr):
            assert expert_reuse_fraction(ch, t, 1, 3, 1) == pytest.approx(target, abs=0.01)
        assert thr[1] > thr[0]  # larger changes need a larger threshold for the same fraction
    # unreachable (at most 8 of 10 steps eligible, 3 of 4 reused): saturates at the parameter's maximum
    assert calibrate_expert_thresholds(changes[:1], 0.9, 1, 3, 1) == [10.0]
    assert calibrate_expert_thresholds(changes[:1], 0.0, 1, 3, 1) == [0.0]
    with pytest.raises(ValueError, match="reuse_fraction"):
        calibrate_expert_thresholds(changes, 1.5)


def _seq(n: int, drift: float):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(0)
    base = {c: torch.rand(3, 48, 64, generator=g) for c in ("camera1", "camera2")}
    for t in range(n):
        imgs = {c: (im + drift * t * torch.rand(3, 48, 64, generator=g)).clamp(0, 1) for c, im in base.items()}
        yield imgs, torch.zeros(6), TASK


def test_calibration_writes_expert_thresholds_the_node_loads(policy, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rule = ExpertReuseConfig(enabled=True, max_consecutive=3, full_steps=1, final_steps=1)
    res = calibrate(policy, _seq(6, 0.05), [1, 2], expert_reuse_fraction=0.4, expert=rule, num_steps=6)
    n_layers = len(policy.expert_layer_indices())
    assert len(res["expert_thresholds"]) == n_layers and res["expert_samples"] == 6 and res["expert_num_steps"] == 6
    assert all(f == pytest.approx(0.4, abs=0.1) for f in res["expert_reuse_fraction_per_layer"])
    f = tmp_path / "cal.yaml"
    save_calibration(f, res.pop("exit_layers"), res.pop("thresholds"), **res)
    data = load_calibration(f, expert=True)
    cfg = ExpertReuseConfig(enabled=True, max_consecutive=3, calibration_file=str(f))
    assert cfg.resolved(n_layers) == pytest.approx(data["expert_thresholds"])
    assert EarlyExitConfig(enabled=True, calibration_file=str(f)).resolved(policy.arch.num_vlm_layers)[0] == [1, 2]
    # the runner takes them per expert layer; explicit thresholds override the file
    runner = PolicyRunner(policy, inference=InferenceConfig(num_steps=6), expert_reuse=cfg)
    assert list(runner.expert_reuse._thr.values()) == pytest.approx(data["expert_thresholds"])
    runner.configure(expert_reuse=ExpertReuseConfig(enabled=True, thresholds=[0.25], calibration_file=str(f)))
    assert list(runner.expert_reuse._thr.values()) == [0.25] * n_layers
    toks, state = _tokens(policy, 1)
    runner.set_instruction(TASK)
    assert torch.isfinite(runner.infer(toks, state, noise=_noise(policy)).actions).all()
    # a VLM-only calibration file has no expert section
    g = tmp_path / "vlm_only.yaml"
    save_calibration(g, [1], [0.99])
    with pytest.raises(ValueError, match="expert_thresholds"):
        ExpertReuseConfig(enabled=True, calibration_file=str(g)).resolved(n_layers)
    with pytest.raises(ValueError, match="expert thresholds"):
        ExpertReuseConfig(thresholds=[0.1, 0.2, 0.3]).resolved(n_layers + 1)
