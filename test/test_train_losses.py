"""effvla_ros.train.losses: the masked flow-matching loss, and its stage-by-stage pass equals the policy's own."""
from __future__ import annotations

import pytest
import torch

from effvla_ros.core.compression.pruning import PruningConfig
from effvla_ros.core.smolvla import PrefillLayerInfo, VisualTokens, build_random_policy
from effvla_ros.sim.task import sample_task
from effvla_ros.train.losses import flow_pass, masked_flow_loss, masked_loss
from effvla_ros.train.trainer import policy_tokenizer, small_arch

SIZE = 32
B = 3


@pytest.fixture(scope="module")
def policy():
    tok = policy_tokenizer()
    arch = small_arch(image_size=SIZE, vocab_size=len(tok), image_token_id=int(tok.convert_tokens_to_ids("<image>")),
                      patch_size=4)
    pol = build_random_policy(arch, tokenizer=tok, seed=0, init="transformers")
    for p in pol.weights.parameters():
        p.requires_grad_(True)
    return pol


def _batch(policy, seed: int = 0) -> tuple[dict, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    arch = policy.arch
    batch: dict = {f"observation.images.{c}": torch.rand(B, 3, SIZE, SIZE, generator=g) for c in arch.cameras}
    batch["observation.state"] = torch.randn(B, arch.state_dim, generator=g)
    batch["action"] = torch.randn(B, arch.chunk_size, arch.action_dim, generator=g)
    pad = torch.zeros(B, arch.chunk_size, dtype=torch.bool)
    pad[1, -3:] = True
    batch["action_is_pad"] = pad
    batch["task"] = [sample_task(s).instruction for s in range(B)]
    noise = torch.randn(B, arch.chunk_size, arch.max_action_dim, generator=g)
    t = torch.rand(B, generator=g) * 0.999 + 0.001
    return batch, noise, t


def test_masked_flow_loss_leaves_out_padding_and_the_padded_dims():
    per = torch.ones(2, 3, 8)
    per[:, :, 6:] = 100.0   # dims past action_dim (zero padding of the flow)
    per[1, 2] = 50.0        # a padded chunk step
    pad = torch.tensor([[False, False, False], [False, False, True]])
    assert float(masked_flow_loss(per, pad, 6)) == 1.0
    per[0, 0, 0] = 6.0      # one real element of 5 * 6 valid ones: mean 1 + 5 / 30
    assert float(masked_flow_loss(per, pad, 6)) == pytest.approx(1.0 + 5.0 / 30.0)
    assert float(masked_flow_loss(per, torch.ones(2, 3, dtype=torch.bool), 6)) == 0.0  # nothing valid: 0


def test_flow_pass_is_the_policys_flow_matching_loss(policy):
    """The stage-by-stage pass (what the grounding / relevance / pruning losses read) computes
    SmolVLAPolicy.flow_matching_loss, masked as masked_loss; a layer callback and an all-False pruning draw
    change nothing."""
    batch, noise, t = _batch(policy)
    ref = masked_loss(policy, batch, noise=noise, t=t)
    seen: list[int] = []

    def cb(info: PrefillLayerInfo) -> None:
        seen.append(info.layer_idx)

    fp = flow_pass(policy, batch, noise=noise, t=t, layer_callback=cb, embed_language=True,
                   prune=(PruningConfig(keep_ratio=0.5), torch.zeros(B, dtype=torch.bool)))
    torch.testing.assert_close(fp.loss, ref)
    assert seen == list(range(policy.arch.num_vlm_layers))
    assert fp.lang_emb is not None and fp.lang_emb.shape[:2] == fp.lang.shape
    assert all(fp.visual[c] is fp.encoding.tokens[c] for c in policy.arch.cameras)  # nothing pruned
    fp.loss.backward()
    vision_grad = [p.grad for p in policy.weights.vision.parameters() if p.grad is not None]
    assert vision_grad and any(bool(g.abs().sum() > 0) for g in vision_grad)  # the vision tower is trained
    policy.weights.zero_grad(set_to_none=True)


def test_flow_pass_prunes_the_drawn_samples(policy):
    batch, noise, t = _batch(policy, seed=1)
    apply = torch.tensor([True, False, True])
    fp = flow_pass(policy, batch, noise=noise, t=t, prune=(PruningConfig(keep_ratio=0.5), apply))
    full = masked_loss(policy, batch, noise=noise, t=t)
    assert fp.lang_emb is not None  # the pruning's relevance queries
    for cam in policy.arch.cameras:
        vis = fp.visual[cam]
        assert isinstance(vis, VisualTokens) and vis.mask is not None
        assert bool(vis.mask[1].all())                                  # not drawn: every token
        assert not bool(vis.mask[0].all()) and not bool(vis.mask[2].all())
    assert not torch.allclose(fp.loss, full)                            # the pruned samples see another prefix
