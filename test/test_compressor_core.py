"""Token compressor core on a tiny SmolVLA: reuse paths, FLOPs accounting, pruning, fidelity."""
from __future__ import annotations

import pytest
import torch

from effvla_ros.core.compression.compressor import ReuseConfig, TokenCompressor
from effvla_ros.core.compression.pruning import PruningConfig
from effvla_ros.core.smolvla import build_random_policy, tiny_arch
from effvla_ros.core.smolvla.tokenizer import build_tiny_tokenizer


@pytest.fixture(scope="module")
def policy():  # type: ignore[no-untyped-def]
    return build_random_policy(tiny_arch(), tokenizer=build_tiny_tokenizer(), seed=3)


def _scene(seed: int = 0) -> torch.Tensor:
    return torch.rand(3, 48, 64, generator=torch.Generator().manual_seed(seed))


def test_reuse_off_equals_policy_encoder_exactly(policy) -> None:  # type: ignore[no-untyped-def]
    comp = TokenCompressor(policy, PruningConfig(method="none"), ReuseConfig(enabled=False))
    img = _scene()
    out = comp.process("camera1", img)
    ref = policy.encode_images({"camera1": img[None]}).tokens["camera1"][0]
    assert out.kind == "full" and out.kept.tolist() == list(range(16))
    assert torch.equal(out.tokens, ref)
    assert out.encoder_flops == out.encoder_flops_full > 0
    out2 = comp.process("camera1", img)  # reuse off: computed again
    assert out2.kind == "full" and out2.encoder_flops > 0


def test_static_frames_reuse_and_moving_region_is_partial(policy) -> None:  # type: ignore[no-untyped-def]
    comp = TokenCompressor(policy, PruningConfig(method="none"),
                           ReuseConfig(threshold=0.02, max_age=100, keyframe_interval=100, dilation=0))
    img = _scene(1)
    first = comp.process("camera1", img)
    assert first.kind == "full"
    same = comp.process("camera1", img.clone())
    assert same.kind == "reuse" and same.encoder_flops == 0 and bool(same.reused.all())
    assert torch.equal(same.tokens, first.tokens)
    moved = img.clone()
    moved[:, 30:40, 40:50] = torch.rand(3, 10, 10, generator=torch.Generator().manual_seed(7))  # an object moves
    part = comp.process("camera1", moved)
    assert part.kind == "partial"
    assert 0 < part.encoder_flops < 0.6 * part.encoder_flops_full
    assert 0 < int((~part.reused).sum()) < 16
    # error against a full encode of the same frame stays small relative to the tokens' scale
    full = policy.encode_images({"camera1": moved[None]}).tokens["camera1"][0]
    rel = ((part.all_tokens - full).norm() / full.norm()).item()
    stale = ((first.tokens - full).norm() / full.norm()).item()
    assert rel < stale  # better than reusing the old frame whole


def test_keyframe_and_max_age_force_full(policy) -> None:  # type: ignore[no-untyped-def]
    comp = TokenCompressor(policy, PruningConfig(method="none"), ReuseConfig(max_age=2, keyframe_interval=100))
    img = _scene(2)
    kinds = [comp.process("camera1", img).kind for _ in range(5)]
    assert kinds == ["full", "reuse", "full", "reuse", "full"]


def test_task_pruning_keeps_fraction_and_live_reconfiguration(policy) -> None:  # type: ignore[no-untyped-def]
    comp = TokenCompressor(policy, PruningConfig(method="task", keep_ratio=0.5, coverage_regions=2),
                           ReuseConfig(enabled=False))
    img = _scene(3)
    no_instr = comp.process("camera1", img)
    assert len(no_instr.kept) == 16  # no instruction yet: nothing is pruned
    comp.set_instruction("pick up the red cube")
    half = comp.process("camera1", img)
    assert len(half.kept) == 8
    assert torch.equal(half.tokens, half.all_tokens[half.kept])
    comp.configure(pruning=PruningConfig(method="task", keep_ratio=0.25, coverage_regions=0, min_tokens=1))
    quarter = comp.process("camera1", img)
    assert len(quarter.kept) == 4


def test_bad_images_rejected(policy) -> None:  # type: ignore[no-untyped-def]
    comp = TokenCompressor(policy)
    with pytest.raises(ValueError, match="NaN"):
        comp.process("camera1", torch.full((3, 48, 64), float("nan")))
    with pytest.raises(ValueError, match="image"):
        comp.process("camera1", torch.rand(48, 64))


def test_analytic_flops_when_counting_is_off(policy) -> None:  # type: ignore[no-untyped-def]
    counted = TokenCompressor(policy, PruningConfig(method="none"),
                              ReuseConfig(max_age=100, keyframe_interval=100, dilation=0), count_flops=True)
    fast = TokenCompressor(policy, PruningConfig(method="none"),
                           ReuseConfig(max_age=100, keyframe_interval=100, dilation=0), count_flops=False)
    img = _scene(4)
    moved = img.clone()
    moved[:, 30:40, 40:50] = 0.0
    a = [counted.process("camera1", x) for x in (img, img, moved)]
    b = [fast.process("camera1", x) for x in (img, img, moved)]
    assert [o.kind for o in a] == [o.kind for o in b] == ["full", "reuse", "partial"]
    assert b[0].encoder_flops == a[0].encoder_flops == b[0].encoder_flops_full  # first full pass is counted
    assert b[1].encoder_flops == 0
    # partial: the fraction of recomputed patches of a full pass, within 2x of the exact count
    assert 0 < b[2].encoder_flops < b[2].encoder_flops_full
    assert 0.5 < b[2].encoder_flops / a[2].encoder_flops < 2.0
    torch.testing.assert_close(b[2].all_tokens, a[2].all_tokens)


def test_fill_to_bucket_adds_the_most_changed_patches() -> None:
    from effvla_ros.core.compression.change import fill_to_bucket

    changed = torch.zeros(4, 4, dtype=torch.bool)
    changed[0, :3] = True
    score = torch.arange(16.0).view(4, 4)
    out = fill_to_bucket(changed, score, 4)
    assert int(out.sum()) == 4 and bool(out[changed].all()) and bool(out[3, 3])  # + the largest unchanged score
    assert int(fill_to_bucket(changed, score, 8).sum()) == 8
    assert torch.equal(fill_to_bucket(changed, score, 1), changed)
    assert int(fill_to_bucket(changed, score, 64).sum()) == 16  # never more than all
    assert int(fill_to_bucket(torch.zeros(4, 4, dtype=torch.bool), score, 4).sum()) == 0  # nothing changed: nothing
    assert int(fill_to_bucket(changed, None, 4).sum()) == 4  # no scores: still a full bucket


def test_partial_passes_recompute_whole_buckets(policy) -> None:  # type: ignore[no-untyped-def]
    """``reuse.partial_shapes``: a partial pass recomputes a multiple of N / shapes patches (0: exactly the changed
    ones), the changed ones always among them; more patches recomputed, more FLOPs counted, and the tokens no
    further from a full encode than the exact pass's."""
    results = {}
    for shapes in (0, 16, 4):
        comp = TokenCompressor(policy, PruningConfig(method="none"),
                               ReuseConfig(threshold=0.02, max_age=100, keyframe_interval=100, dilation=0,
                                           partial_shapes=shapes))
        seen = []
        real = comp.eventful.encode_partial

        def spy(pixels, changed, state, inplace=False, real=real, seen=seen):  # type: ignore[no-untyped-def]
            seen.append(changed.clone())
            return real(pixels, changed, state, inplace=inplace)

        comp.eventful.encode_partial = spy  # type: ignore[method-assign]
        img = _scene(1)
        comp.process("camera1", img)
        moved = img.clone()
        moved[:, 30:40, 40:50] = torch.rand(3, 10, 10, generator=torch.Generator().manual_seed(7))
        part = comp.process("camera1", moved)
        assert part.kind == "partial" and len(seen) == 1
        n, total = int(seen[0].sum()), seen[0].numel()
        assert n % (-(-total // shapes) if shapes else 1) == 0 and 0 < n < total
        full = policy.encode_images({"camera1": moved[None]}).tokens["camera1"][0]
        results[shapes] = (n, part.encoder_flops, ((part.all_tokens - full).norm() / full.norm()).item())
    (n0, f0, e0), (n16, f16, e16), (n4, f4, e4) = (results[k] for k in (0, 16, 4))
    assert n0 < n4 and n0 <= n16  # the exact pass recomputes fewest; 4 shapes round up to quarters
    assert f4 > f0 and (f16 > f0) == (n16 > n0)
    assert e4 <= e0 + 1e-6 and e16 <= e0 + 1e-6


def _moving(seed: int, n: int) -> list[torch.Tensor]:
    """``n`` frames of one scene with a small square that moves each frame (a partial pass every frame)."""
    img = _scene(seed)
    out = []
    for i in range(n):
        f = img.clone()
        f[:, 4:12, 4 + 4 * i:12 + 4 * i] = 1.0
        out.append(f)
    return out


def test_rolling_refresh_recomputes_every_patch_in_turn_without_full_passes(policy) -> None:  # type: ignore[no-untyped-def]
    """refresh=rolling: after the first frame no full pass, yet within keyframe_interval partial frames every token was
    recomputed at least once (a slice of the patches each frame), where keyframe refresh runs a full pass instead."""
    k = 4
    frames = _moving(5, 1 + 2 * k)
    kf = TokenCompressor(policy, PruningConfig(method="none"),
                         ReuseConfig(max_age=100, keyframe_interval=k, dilation=0, partial_shapes=0))
    assert [kf.process("camera1", f).kind for f in frames].count("full") == 3  # frames 0, 4, 8
    roll = TokenCompressor(policy, PruningConfig(method="none"),
                           ReuseConfig(max_age=100, keyframe_interval=k, dilation=0, partial_shapes=0, refresh="rolling"))
    outs = [roll.process("camera1", f) for f in frames]
    assert [o.kind for o in outs] == ["full"] + ["partial"] * (2 * k)
    recomputed = torch.zeros(16, dtype=torch.bool)
    for o in outs[1:k + 1]:
        recomputed |= ~o.reused
    assert bool(recomputed.all())  # every token within k frames
    assert all(int((~o.reused).sum()) < 16 for o in outs[1:])  # each frame still partial
    # the square's patches plus one slice of 16 / k: more than the square alone
    plain = TokenCompressor(policy, PruningConfig(method="none"),
                            ReuseConfig(max_age=100, keyframe_interval=100, dilation=0, partial_shapes=0))
    plain_outs = [plain.process("camera1", f) for f in frames[:3]]
    assert int((~outs[1].reused).sum()) > int((~plain_outs[1].reused).sum())


def test_keep_cache_lets_reuse_resume_with_a_partial_pass(policy) -> None:  # type: ignore[no-untyped-def]
    """reuse.keep_cache: while reuse is off every frame is a full pass that still builds the patch cache, so the
    first frame after reuse is turned on is partial; without it that frame is a full pass. Tokens while off equal
    the plain encoder's."""
    frames = _moving(6, 4)
    for keep, want in ((True, "partial"), (False, "full")):
        on = ReuseConfig(max_age=100, keyframe_interval=100, dilation=0, keep_cache=keep)
        comp = TokenCompressor(policy, PruningConfig(method="none"), on)
        comp.process("camera1", frames[0])
        comp.configure(reuse=ReuseConfig(enabled=False, keep_cache=keep))
        off = comp.process("camera1", frames[1])
        ref = policy.encode_images({"camera1": frames[1][None]}).tokens["camera1"][0]
        assert off.kind == "full"
        torch.testing.assert_close(off.tokens, ref, rtol=1e-5, atol=1e-5)
        comp.configure(reuse=on)
        assert comp.process("camera1", frames[2]).kind == want, keep
