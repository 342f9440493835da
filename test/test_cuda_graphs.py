"""The graph backends on a CUDA device: the capture itself (the CPU tests run only its fallback).

Every test runs on the CPU (the fallback: the same loops over the same buffers, no capture) and on CUDA where
it is (skipped in CI; ``benchmarks/run_gpu.sh`` runs this file on a lent GPU machine). A tiny
random policy in fp32: every stage captured (encode per image shape, prefill per prefix shape and layer
segment, the denoising loop with Jacobian-free RTC guidance and training-time RTC's committed prefix),
replayed over the same static buffers, and its actions equal to the eager backend's on the same device.
"""
from __future__ import annotations

import pytest
import torch

from effvla_ros.core.backends import make_backend
from effvla_ros.core.rtc import GuidanceTarget, RTCConfig
from effvla_ros.core.runner import CameraTokens, PolicyRunner
from effvla_ros.core.smolvla import RuntimeConfig, build_random_policy, tiny_arch
from effvla_ros.core.smolvla.tokenizer import build_tiny_tokenizer

from model_fixtures import camera_tokens as _cams
from model_fixtures import chunk_noise as _noise

TASK = "pick up the red cube"


@pytest.fixture(scope="module", params=["cpu", "cuda"])
def policy(request):  # type: ignore[no-untyped-def]
    """The tiny policy on the CPU (the graphs' fallback: the same checks, no capture) and on CUDA (captured)."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    arch = tiny_arch(rtc_trained_max_delay=4)  # declared: rtc.mode trained is accepted
    p = build_random_policy(arch, tokenizer=build_tiny_tokenizer(), seed=3)
    p.apply_runtime(RuntimeConfig(device=request.param))
    return p


def _captured(policy) -> bool:  # type: ignore[no-untyped-def]
    return bool(policy.device.type == "cuda")




def _chunks(policy, backend, mode: str = "guided"):  # type: ignore[no-untyped-def]
    """Three chunks: plain, RTC toward the first (guided: Jacobian-free; trained: its first 2 actions committed),
    and a pruned prefix (another prefix shape)."""
    runner = PolicyRunner(policy, backend=backend, rtc=RTCConfig(enabled=True, mode=mode))
    runner.set_instruction(TASK)
    first = runner.infer(_cams(policy), torch.zeros(6), noise=_noise(policy))
    target = GuidanceTarget(first.x_final, delay=2, valid=policy.arch.chunk_size, ref_state=torch.zeros(6))
    second = runner.infer(_cams(policy, 1), torch.zeros(6), noise=_noise(policy, 1), guidance=target)
    keep = torch.arange(0, 16, 2)
    pruned = {c: CameraTokens(ct.tokens[keep], keep, ct.grid) for c, ct in _cams(policy, 2).items()}
    third = runner.infer(pruned, torch.zeros(6), noise=_noise(policy, 2))
    return first, second, third


@pytest.mark.parametrize("mode", ["guided", "trained"])
def test_captured_graphs_equal_eager_on_cuda(policy, mode: str) -> None:  # type: ignore[no-untyped-def]
    be = make_backend("cudagraph", policy)
    ref = _chunks(policy, "eager", mode)
    got = _chunks(policy, be, mode)
    for a, b in zip(ref, got, strict=True):
        assert b.actions.device == a.actions.device
        torch.testing.assert_close(b.actions, a.actions, rtol=1e-5, atol=1e-5)
    assert got[1].guided and not torch.allclose(got[1].actions, got[0].actions)
    assert len(be.graphs) == 2 and all((g.graph is not None) == _captured(policy) for g in be.graphs.values())  # per prefix
    assert len(be.prefill_graphs) == 2 and all((g.graph is not None) == _captured(policy) for g in be.prefill_graphs.values())
    full = next(g for g in be.graphs.values() if g.replays == 2)
    ptr = full.cache.keys[0].data_ptr()
    _chunks(policy, be, mode)
    assert full.replays == 4 and full.cache.keys[0].data_ptr() == ptr  # the same static buffers, replayed


def test_encode_graph_on_cuda(policy) -> None:  # type: ignore[no-untyped-def]
    be = make_backend("cudagraph", policy)
    size = policy.arch.image_size
    px = [torch.rand(1, 3, size, size, device=policy.device) * 2 - 1 for _ in range(2)]
    a, b = be.encode(px[0]), be.encode(px[1])
    torch.testing.assert_close(a, policy.encode_pixels(px[0]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b, policy.encode_pixels(px[1]), rtol=1e-5, atol=1e-5)
    (g,) = be.encode_graphs.values()
    assert (g.graph is not None) == _captured(policy) and g.replays == 2 and not torch.equal(a, b)


def test_compiled_graphs_on_cuda(policy) -> None:  # type: ignore[no-untyped-def]
    be = make_backend("cudagraph_compiled", policy)
    ref = _chunks(policy, "eager")
    got = _chunks(policy, be)
    for a, b in zip(ref, got, strict=True):
        torch.testing.assert_close(b.actions, a.actions, rtol=1e-4, atol=1e-4)
    assert all((g.graph is not None) == _captured(policy) for g in be.graphs.values())


def test_flops_are_counted_through_the_graphs(policy) -> None:  # type: ignore[no-untyped-def]
    """FLOP counting (a dispatch mode watching the ops) sees a graph stage's ops: the graph runs plainly while it
    is watched (the first, watched call does not capture), and counts what the eager backend counts (the
    denoising graph's guidance arithmetic aside)."""
    from effvla_ros.core.backends import EagerBackend
    from effvla_ros.core.runner import InferenceConfig

    be = make_backend("cudagraph", policy)

    class PaddedEager(EagerBackend):  # the eager ops on the graph backend's prefix layout (padded to its bucket)
        def begin_prefill(self, visual, lang_tokens, lang_mask, state):  # type: ignore[no-untyped-def]
            return policy.begin_prefill(visual, lang_tokens, lang_mask, state, pad_multiple=be.prefix_bucket)

    flops = {}
    for name, backend in (("eager", PaddedEager(policy)), ("graph", be)):
        runner = PolicyRunner(policy, backend=backend, inference=InferenceConfig(count_flops=True))
        runner.set_instruction(TASK)
        res = runner.infer(_cams(policy), torch.zeros(6), noise=_noise(policy))
        flops[name] = (res.flops["prefill"], res.flops["denoise"])
    assert flops["graph"][0] == flops["eager"][0] > 0  # the prefill: the same ops
    # the denoising loop: the expert's ops, plus the (zero-weighted) guidance every step of the one graph runs
    assert flops["eager"][1] <= flops["graph"][1] <= 1.02 * flops["eager"][1]
    assert all(g.graph is None for g in be.graphs.values())  # watched: not captured
    runner = PolicyRunner(policy, backend=be)
    runner.set_instruction(TASK)
    runner.infer(_cams(policy), torch.zeros(6), noise=_noise(policy))
    assert all((g.graph is not None) == _captured(policy) for g in be.graphs.values())  # then captured, unwatched


@pytest.mark.parametrize("patch_level", [False, True])
def test_token_compressor_on_the_policys_device(policy, patch_level: bool) -> None:  # type: ignore[no-untyped-def]
    """The compressor with pruning and reuse on the graph backend, on the policy's device: the kept grid indices
    come back on the host (on CUDA they once indexed a host mask from the GPU and every cuda target's compressor
    raised), the kept tokens stay on the device and equal the eager backend's."""
    from effvla_ros.core.compression.compressor import ReuseConfig, TokenCompressor
    from effvla_ros.core.compression.pruning import PruningConfig

    g = torch.Generator().manual_seed(7)
    frames = [torch.rand(3, 48, 64, generator=g) for _ in range(3)]
    frames[1] = frames[0].clone()
    frames[1][:, :8, :8] = 1.0  # a corner changed: a partial pass with patch-level reuse
    outs = {}
    for name in ("eager", "cudagraph"):
        comp = TokenCompressor(policy, PruningConfig(keep_ratio=0.5), ReuseConfig(patch_level=patch_level),
                               backend=make_backend(name, policy))
        comp.set_instruction(TASK)
        outs[name] = [comp.process("camera1", f) for f in frames]
    for a, b in zip(outs["eager"], outs["cudagraph"], strict=True):
        assert b.kept.device.type == "cpu" and b.tokens.device.type == policy.device.type and b.kind == a.kind
        assert torch.equal(a.kept, b.kept) and 0 < len(b.kept) < b.grid[0] * b.grid[1]
        torch.testing.assert_close(b.tokens, a.tokens, rtol=1e-5, atol=1e-5)
    assert [o.kind for o in outs["cudagraph"]][:2] == ["full", "partial" if patch_level else "full"]
