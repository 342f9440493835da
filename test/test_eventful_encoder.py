"""Patch-level temporal reuse in the SmolVLM vision transformer (Eventful Transformers)."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import SmolVLMConfig
from transformers.models.smolvlm.modeling_smolvlm import SmolVLMConnector, SmolVLMVisionTransformer

from effvla_ros.core.compression.eventful import EventfulVisionEncoder, dilate


@pytest.fixture(scope="module")
def encoder() -> EventfulVisionEncoder:
    torch.manual_seed(0)
    cfg = SmolVLMConfig(
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                           image_size=64, patch_size=8),
        text_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128),
        scale_factor=2,
    )
    cfg.vision_config._attn_implementation = "eager"
    vm = SmolVLMVisionTransformer(cfg.vision_config).eval()
    conn = SmolVLMConnector(cfg).eval()
    return EventfulVisionEncoder(vm, conn)


def _flops(fn):  # type: ignore[no-untyped-def]
    with FlopCounterMode(display=False) as fc:
        out = fn()
    return out, fc.get_total_flops()


def test_full_pass_equals_transformers_forward(encoder: EventfulVisionEncoder) -> None:
    px = torch.rand(1, 3, 64, 64) * 2 - 1
    tokens, state = encoder.encode_full(px)
    with torch.no_grad():
        mask = torch.ones(1, 8, 8, dtype=torch.bool)
        ref = encoder.connector(encoder.vm(pixel_values=px, patch_attention_mask=mask).last_hidden_state)[0]
    assert tokens.shape == (16, 48) and state.grid == (8, 8)
    torch.testing.assert_close(tokens, ref, atol=1e-5, rtol=1e-5)


def test_partial_with_every_patch_changed_equals_full(encoder: EventfulVisionEncoder) -> None:
    a, b = torch.rand(1, 3, 64, 64) * 2 - 1, torch.rand(1, 3, 64, 64) * 2 - 1
    _, state = encoder.encode_full(a)
    full_b, _ = encoder.encode_full(b)
    part_b, _, rows = encoder.encode_partial(b, torch.ones(8, 8, dtype=torch.bool), state)
    assert rows.tolist() == list(range(16))
    torch.testing.assert_close(part_b, full_b, atol=1e-5, rtol=1e-5)


def test_partial_recomputes_only_changed_region_with_less_compute(encoder: EventfulVisionEncoder) -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    b = a.clone()
    b[..., 0:16, 0:16] = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1  # top-left 2x2 patches move
    changed = torch.zeros(8, 8, dtype=torch.bool)
    changed[0:2, 0:2] = True
    (_, state), f_full = _flops(lambda: encoder.encode_full(a))
    (part, _, rows), f_part = _flops(lambda: encoder.encode_partial(b, changed, state))
    full_b, _ = encoder.encode_full(b)
    assert rows.tolist() == [0]  # the 2x2 changed patches form visual token 0 (scale factor 2)
    assert f_part < 0.25 * f_full
    # the changed token is recomputed; others keep the cached values (stale but close)
    torch.testing.assert_close(part[1:], state.tokens[1:])
    err_changed = (part[0] - full_b[0]).abs().max()
    stale_err = (part[1:] - full_b[1:]).abs().max()
    base = (state.tokens[0] - full_b[0]).abs().max()
    assert err_changed < 0.5 * base  # much closer to the new frame than the old token was
    assert stale_err > 0  # reuse is an approximation; the keyframe bounds it


def test_inplace_partial_equals_the_copying_one_and_consumes_the_state(encoder: EventfulVisionEncoder) -> None:
    """The compressor's in-place update (no copy of every layer's K/V) gives bit-identical tokens and cache, over
    several frames in a row; the copying path leaves its input state untouched, the in-place one updates it."""
    g = torch.Generator().manual_seed(3)
    frames = [torch.rand(1, 3, 64, 64, generator=g) * 2 - 1 for _ in range(4)]
    masks = [torch.rand(8, 8, generator=g) < f for f in (0.2, 0.5, 0.05)]
    _, s_copy = encoder.encode_full(frames[0])
    _, s_in = encoder.encode_full(frames[0])
    for px, m in zip(frames[1:], masks):
        before = [c.k.clone() for c in s_copy.layers]
        t_copy, new_copy, r_copy = encoder.encode_partial(px, m, s_copy)
        assert all(torch.equal(c.k, b) for c, b in zip(s_copy.layers, before))  # copying: input state unchanged
        old_in = s_in
        t_in, s_in, r_in = encoder.encode_partial(px, m, s_in, inplace=True)
        assert s_in.layers[0].k is old_in.layers[0].k and s_in.final is old_in.final  # in place: the same storage
        assert torch.equal(t_in, t_copy) and torch.equal(r_in, r_copy)
        for a, b in zip(s_in.layers, new_copy.layers):
            assert torch.equal(a.x_in, b.x_in) and torch.equal(a.k, b.k) and torch.equal(a.v, b.v)
        assert torch.equal(s_in.final, new_copy.final)
        s_copy = new_copy


def test_no_change_reuses_everything(encoder: EventfulVisionEncoder) -> None:
    a = torch.rand(1, 3, 64, 64) * 2 - 1
    tokens, state = encoder.encode_full(a)
    (same, _, rows), flops = _flops(lambda: encoder.encode_partial(a, torch.zeros(8, 8, dtype=torch.bool), state))
    assert rows.numel() == 0 and flops == 0
    assert torch.equal(same, tokens)


def test_dilate() -> None:
    m = torch.zeros(5, 5, dtype=torch.bool)
    m[2, 2] = True
    assert int(dilate(m, 1).sum()) == 9 and int(dilate(m, 0).sum()) == 1
