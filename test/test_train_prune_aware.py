"""effvla_ros.train.prune_aware and --prune-train: training on the prefix the runtime pruning produces."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from effvla_ros.core.compression.compressor import TokenCompressor
from effvla_ros.core.compression.pruning import PruningConfig, instruction_queries, keep_mask_batch, select_tokens
from effvla_ros.core.smolvla import build_random_policy
from effvla_ros.core.smolvla.policy import VisualTokens
from effvla_ros.sim.task import sample_task
from effvla_ros.train.data import Episode, write_demos
from effvla_ros.train.prune_aware import pruned_visual_tokens
from effvla_ros.train.trainer import TrainConfig, policy_tokenizer, small_arch, train

SIZE = 32


@pytest.fixture(scope="module")
def policy():
    tok = policy_tokenizer()
    arch = small_arch(image_size=SIZE, vocab_size=len(tok), image_token_id=int(tok.convert_tokens_to_ids("<image>")),
                      patch_size=4)
    return build_random_policy(arch, tokenizer=tok, seed=0, init="fan_in")


def _images(b: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {c: torch.rand(b, 3, SIZE, SIZE, generator=g) for c in ("scene", "wrist")}


def test_training_queries_are_the_compressors(policy):
    """The batch's embedded instructions (what pruning-aware training scores against) hold, at their valid
    positions, exactly the compressor's relevance queries."""
    texts = [sample_task(3).instruction, sample_task(8).instruction]
    ids, lmask = policy.tokenize(texts)
    emb = policy.weights.text.embed_tokens(ids)
    for i, text in enumerate(texts):
        comp = TokenCompressor(policy)
        comp.set_instruction(text)
        torch.testing.assert_close(emb[i][lmask[i].bool()].float(), comp._task)
        torch.testing.assert_close(comp._task, instruction_queries(policy, text))


@pytest.mark.parametrize("cfg", [PruningConfig(keep_ratio=0.5), PruningConfig(keep_ratio=0.1, min_tokens=6),
                                 PruningConfig(keep_ratio=0.25, coverage_regions=3),
                                 PruningConfig(mode="adaptive"), PruningConfig(keep_ratio=0.5, coverage_regions=0)])
def test_batched_selection_equals_the_runtime_rule(cfg):
    """keep_mask_batch on a batch (pruning-aware training) keeps exactly what select_tokens (the compressor, one
    image and its unpadded instruction) keeps, per row, whatever the instruction length and padding; a row
    without instruction tokens keeps everything."""
    g = torch.Generator().manual_seed(0)
    b, grid, d = 24, (6, 6), 16
    vis = torch.randn(b, grid[0] * grid[1], d, generator=g)
    lens = torch.randint(1, 9, (b,), generator=g)
    lens[5] = 0
    task = torch.randn(b, 8, d, generator=g)
    mask = torch.arange(8)[None, :] < lens[:, None]
    task = task * mask[..., None]
    keep = keep_mask_batch(vis, task, mask, grid, cfg)
    assert keep.shape == (b, 36) and keep[5].all()
    for i in range(b):
        ref = select_tokens(vis[i], task[i][mask[i]], grid, cfg)
        assert torch.equal(torch.nonzero(keep[i]).flatten(), ref), i
    assert not keep.all()  # something was pruned


def test_mask_selects_the_runtime_tokens_and_equals_removing_them(policy):
    b = 3
    tasks = [sample_task(s).instruction for s in range(b)]
    with torch.no_grad():
        enc = policy.encode_images(_images(b))
    cfg = PruningConfig(keep_ratio=0.5)
    apply = torch.tensor([True, False, True])
    lang, lmask = policy.tokenize(tasks)
    with torch.no_grad():
        emb = policy.weights.text.embed_tokens(lang)
    vis = pruned_visual_tokens(enc.tokens, enc.grid, emb, lmask, apply, cfg)
    n = enc.tokens["scene"].shape[1]
    for cam in ("scene", "wrist"):
        m = vis[cam].mask
        assert m[1].all()  # not selected for pruning: every token
        for i in (0, 2):
            keep = select_tokens(enc.tokens[cam][i], instruction_queries(policy, tasks[i]), enc.grid, cfg)
            assert torch.equal(torch.nonzero(m[i]).flatten(), keep)
            assert round(0.5 * n) <= int(m[i].sum()) < n
    # the masked prefix gives the velocity of the prefix with the pruned tokens removed (the runtime's path)
    state = policy.prepare_state(torch.zeros(b, 6))
    x_t = torch.randn(b, policy.arch.chunk_size, policy.arch.max_action_dim, generator=torch.Generator().manual_seed(1))
    t = torch.full((b,), 0.4)
    with torch.no_grad():
        v_masked = policy.velocity(policy.prefill(vis, lang, lmask, state), x_t, t)
        for i in (0, 1, 2):
            kept = {cam: VisualTokens(enc.tokens[cam][i:i + 1], keep=torch.nonzero(vis[cam].mask[i]).flatten())
                    for cam in ("scene", "wrist")}
            v_removed = policy.velocity(policy.prefill(kept, lang[i:i + 1], lmask[i:i + 1], state[i:i + 1]),
                                        x_t[i:i + 1], t[i:i + 1])
            torch.testing.assert_close(v_masked[i:i + 1], v_removed, atol=1e-5, rtol=1e-4)
        v_full = policy.velocity(policy.prefill(dict(enc.tokens), lang, lmask, state), x_t, t)
    assert not torch.allclose(v_full[0], v_masked[0], atol=1e-4)  # pruning changed the pruned samples
    torch.testing.assert_close(v_full[1], v_masked[1], atol=1e-5, rtol=1e-4)


def _episode(t: int, seed: int) -> Episode:
    rng = np.random.default_rng(seed)
    state = np.cumsum(rng.normal(scale=0.05, size=(t, 6)), axis=0).astype(np.float32)
    return Episode(images={c: rng.integers(0, 256, (t, SIZE, SIZE, 3), dtype=np.uint8) for c in ("scene", "wrist")},
                   state=state, action=(state + 0.1).astype(np.float32), task=sample_task(seed).instruction, seed=seed)


def test_training_with_pruned_prefixes(tmp_path):
    with pytest.raises(ValueError, match="prune_train"):
        TrainConfig(data="x", out="y", prune_train=-0.1)
    with pytest.raises(ValueError, match="prune_keep_ratio"):
        TrainConfig(data="x", out="y", prune_keep_ratio=0.0)
    root = tmp_path / "demos"
    write_demos(root, [_episode(10, s) for s in range(3)])
    threads = torch.get_num_threads()
    try:
        res = train(TrainConfig(data=str(root), out=str(tmp_path / "pa"), steps=3, batch=8, warmup=1, image_size=SIZE,
                                ema=0.0, save_every=0, threads=1, prune_train=1.0),
                    progress=False, log=lambda s: None)
    finally:
        torch.set_num_threads(threads)
    assert res.steps == 3 and np.isfinite(res.final_loss)
    cfg = json.loads((tmp_path / "pa" / "train_log.json").read_text())["config"]
    assert cfg["prune_train"] == 1.0 and cfg["prune_keep_ratio"] == 0.5
