"""Training-time real-time chunking (arXiv 2512.05964): the committed prefix in training, in the checkpoint,
at inference (``rtc.mode: trained``), and the refusals naming ``rtc.mode``."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from effvla_ros.core.backends.base import Capabilities, CapabilityError, make_backend
from effvla_ros.core.backends.eager import EagerBackend
from effvla_ros.core.flow import euler_integrate, rtc_training_time
from effvla_ros.core.rtc import GuidanceTarget, RTCConfig
from effvla_ros.core.runner import CameraTokens, PolicyRunner
from effvla_ros.core.smolvla import build_random_policy, load_policy, save_policy, tiny_arch
from effvla_ros.core.smolvla.tokenizer import build_tiny_tokenizer
from effvla_ros.train.data import ChunkDataset, load_demos, write_demos
from effvla_ros.train.losses import masked_loss
from effvla_ros.train.trainer import TrainConfig, train

from model_fixtures import random_episode

TASK = "pick up the red cube"
STATS = {"observation.state": {"mean": torch.zeros(6), "std": torch.ones(6)},
         "action": {"mean": torch.linspace(-1, 1, 6), "std": torch.ones(6) * 0.5}}


def _policy(max_delay: int):  # type: ignore[no-untyped-def]
    return build_random_policy(tiny_arch(rtc_trained_max_delay=max_delay), tokenizer=build_tiny_tokenizer(), seed=3,
                               stats=STATS)


def _inputs(policy, seed: int = 0):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    imgs = {c: torch.rand(1, 3, 48, 64, generator=g) for c in policy.arch.cameras}
    enc = policy.encode_images(imgs)
    cams = {c: CameraTokens(t[0], torch.arange(t.shape[1]), enc.grid) for c, t in enc.tokens.items()}
    return cams, torch.randn(6, generator=g)


def test_training_time_is_zero_on_the_prefix_and_the_sample_is_clean_there():
    t = torch.tensor([0.3, 0.9, 0.5])
    tt, prefix = rtc_training_time(t, torch.tensor([0, 2, 4]), 6)
    assert tt.shape == (3, 6) and prefix.tolist() == [[False] * 6, [True] * 2 + [False] * 4, [True] * 4 + [False] * 2]
    assert torch.equal(tt[prefix], torch.zeros(6)) and torch.equal(tt[~prefix], t.repeat_interleave(torch.tensor([6, 4, 2])))
    policy = _policy(4)
    actions = torch.randn(3, policy.arch.chunk_size, 6)
    state = torch.randn(3, 6)
    tt, prefix = rtc_training_time(t, torch.tensor([0, 2, 4]), policy.arch.chunk_size)
    x_t, u_t, t_out = policy.flow_training_sample(actions, state, torch.randn(3, policy.arch.chunk_size, 32), tt)
    a = policy.action_targets(actions, state)
    torch.testing.assert_close(x_t[prefix], a[prefix])          # the committed actions are given clean
    assert not torch.allclose(x_t[~prefix], a[~prefix])           # the rest is noised
    assert t_out is tt


def test_the_committed_prefix_is_left_out_of_the_loss():
    policy = _policy(4)
    n, s = 2, policy.arch.chunk_size
    g = torch.Generator().manual_seed(0)
    batch = {"observation.images.camera1": torch.rand(n, 3, 48, 64, generator=g),
             "observation.images.camera2": torch.rand(n, 3, 48, 64, generator=g),
             "observation.state": torch.randn(n, 6, generator=g), "task": [TASK] * n,
             "action": torch.randn(n, s, 6, generator=g), "action_is_pad": torch.zeros(n, s, dtype=torch.bool)}
    noise = torch.randn(n, s, 32, generator=g)
    tt, prefix = rtc_training_time(torch.tensor([0.4, 0.7]), torch.tensor([3, 3]), s)
    masked = dict(batch, action_is_pad=batch["action_is_pad"] | prefix)
    with torch.no_grad():
        base = masked_loss(policy, masked, noise=noise, t=tt)
        changed = dict(masked, action=masked["action"].clone())
        changed["action"][:, 3:] += 1.0  # the targets of the trained tokens move: the loss does
        moved = masked_loss(policy, changed, noise=noise, t=tt)
    assert not torch.isclose(base, moved)
    # a prefix target enters only as clean input (x_t = a there), never as a regression target: with the prefix
    # given as noise instead (t = 1 on it) and the loss still masked there, the loss changes only through attention
    with torch.no_grad():
        tt1 = torch.where(prefix, torch.ones(()), tt)
        other = masked_loss(policy, masked, noise=noise, t=tt1)
    assert torch.isfinite(other) and not torch.isclose(base, other)


def test_trained_mode_reproduces_the_committed_prefix_exactly():
    policy = _policy(4)
    runner = PolicyRunner(policy, rtc=RTCConfig(enabled=True, mode="trained"))
    runner.set_instruction(TASK)
    cams, state = _inputs(policy)
    noise = torch.randn(1, policy.arch.chunk_size, policy.arch.max_action_dim, generator=torch.Generator().manual_seed(1))
    prev = runner.infer(cams, state, noise=noise)
    assert not prev.guided and prev.rtc_delay == 0
    target = torch.roll(prev.x_final, shifts=-2, dims=0)  # the previous chunk 2 steps later
    res = runner.infer(cams, state, noise=noise, guidance=GuidanceTarget(target, valid=8, delay=3))
    assert res.guided and res.rtc_delay == 3
    assert torch.equal(res.x_final[:3], target[:3])             # the ideal guidance: the committed actions, exactly
    assert not torch.allclose(res.x_final[3:], prev.x_final[3:])  # and the rest conditioned on them
    # the velocity saw the prefix as data: flow time 0 there at every step
    trace: dict[str, list[torch.Tensor]] = {}
    be = runner.backend
    cache = be.begin_prefill(runner.visual_inputs(cams), *runner._lang, policy.prepare_state(state.reshape(1, -1)))
    be.prefill(cache, 0, policy.arch.num_vlm_layers)
    euler_integrate(lambda x, t, k: be.velocity(cache, x, t), noise, 4, prefix=target[None, :3], trace=trace)
    assert all(torch.equal(t[0, :3], torch.zeros(3)) and bool((t[0, 3:] > 0).all()) for t in trace["t"])
    assert all(torch.equal(x[0, :3], target[:3]) for x in trace["x_t"])
    # beyond the delays it was trained on: the first rtc_trained_max_delay actions
    far = runner.infer(cams, state, noise=noise, guidance=GuidanceTarget(target, valid=8, delay=7))
    assert far.rtc_delay == 4 and torch.equal(far.x_final[:4], target[:4])
    # guided mode on the same checkpoint: the prefix is pulled toward, not held
    runner.configure(rtc=RTCConfig(enabled=True, mode="guided"))
    guided = runner.infer(cams, state, noise=noise, guidance=GuidanceTarget(target, valid=8, delay=3))
    assert guided.guided and not torch.equal(guided.x_final[:3], target[:3])


class _NoPrefixBackend(EagerBackend):
    caps = Capabilities("no-prefix", committed_prefix=False)


def test_trained_mode_on_the_cuda_graph_loop_equals_the_eager_one():
    """The cudagraph backend's static buffers hold the committed prefix too (here its CPU fallback): the eager
    runner's chunks (within fp32 rounding: the graphs pad the prefix to a bucket, another summation order), the
    committed actions held exactly, one graph replayed for unguided, trained and plain chunks."""
    from effvla_ros.core.backends.graphs import GraphBackend

    policy = _policy(4)
    graph_be = GraphBackend(policy)
    cams, state = _inputs(policy)
    noise = torch.randn(1, policy.arch.chunk_size, policy.arch.max_action_dim, generator=torch.Generator().manual_seed(2))
    runs = {}
    for name, backend in (("eager", make_backend("eager", policy)), ("graph", graph_be)):
        runner = PolicyRunner(policy, backend=backend, rtc=RTCConfig(enabled=True, mode="trained"))
        runner.set_instruction(TASK)
        first = runner.infer(cams, state, noise=noise)
        target = GuidanceTarget(torch.roll(first.x_final, -2, dims=0), valid=8, delay=3)
        held = runner.infer(cams, state, noise=noise, guidance=target)
        plain = runner.infer(cams, state, noise=noise)  # after a held prefix: none held again
        runs[name] = (first, held, plain, target)
    for a, b in zip(runs["eager"][:3], runs["graph"][:3], strict=True):
        torch.testing.assert_close(b.x_final, a.x_final, rtol=1e-5, atol=1e-5)
    first, held, plain, target = runs["graph"]
    assert torch.equal(held.x_final[:3], target.actions[:3]) and torch.equal(plain.x_final, first.x_final)
    assert len(graph_be.graphs) == 1 and next(iter(graph_be.graphs.values())).replays == 3


def test_trained_mode_is_refused_naming_the_parameter():
    untrained = _policy(0)
    with pytest.raises(ValueError, match="rtc.mode"):
        PolicyRunner(untrained, rtc=RTCConfig(enabled=True, mode="trained"))
    runner = PolicyRunner(untrained, rtc=RTCConfig(enabled=False, mode="trained"))  # off: nothing to refuse
    with pytest.raises(ValueError, match="rtc.mode"):
        runner.configure(rtc=RTCConfig(enabled=True, mode="trained"))
    with pytest.raises(CapabilityError, match="rtc.mode"):  # a backend without a committed prefix
        PolicyRunner(_policy(4), rtc=RTCConfig(enabled=True, mode="trained"), backend=_NoPrefixBackend(_policy(4)))
    with pytest.raises(ValueError, match="rtc_trained_max_delay"):
        tiny_arch(rtc_trained_max_delay=10).validate()  # the whole chunk cannot be committed


def test_training_with_committed_prefixes_declares_it_in_the_checkpoint(tmp_path):
    demos = tmp_path / "demos"
    write_demos(demos, [random_episode(12, s, TASK) for s in range(2)])
    threads = torch.get_num_threads()
    try:
        first = train(TrainConfig(data=str(demos), out=str(tmp_path / "a"), steps=2, batch=4, image_size=32, ema=0.0,
                                  threads=1), progress=False, log=lambda s: None)
        # fine-tuned from it with a longer chunk and committed prefixes of up to 3 actions
        res = train(TrainConfig(data=str(demos), out=str(tmp_path / "b"), steps=3, batch=4, image_size=32, ema=0.0,
                                threads=1, init=str(first.out), arch_changes={"chunk_size": 14},
                                rtc_train_max_delay=3), progress=False, log=lambda s: None)
    finally:
        torch.set_num_threads(threads)
    assert np.isfinite(res.final_loss)
    loaded = load_policy(tmp_path / "b")
    assert (loaded.arch.chunk_size, loaded.arch.rtc_trained_max_delay) == (14, 3)
    assert load_policy(tmp_path / "a").arch.rtc_trained_max_delay == 0
    eps, _ = load_demos(demos)
    assert ChunkDataset(eps, 14).chunk_size == 14
    # a checkpoint that declares it round-trips through save_policy too
    save_policy(loaded, tmp_path / "c")
    assert load_policy(tmp_path / "c").arch.rtc_trained_max_delay == 3
    with pytest.raises(ValueError, match="rtc_train_max_delay"):
        TrainConfig(data="", out="", rtc_train_max_delay=-1)
