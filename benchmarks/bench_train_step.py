"""Training-step benchmark: what one optimizer step of the bundled recipe costs on this machine, with the
optimizer and the attention implementation each as before and sped up — side by side in one run.

    python benchmarks/bench_train_step.py [--batch 32] [--steps 30] [--rounds 3] [--threads 1]

The model is the recipe's (``effvla_ros.train.trainer.small_arch``: 0.42 M parameters, two 64 px cameras),
with random weights; the batch is random images, states and action chunks with real instructions, and the
loss is the recipe's: flow matching plus the grounding heads (``flow_and_grounding_loss``), backward,
gradient clipping, AdamW, EMA update. Rows:

* ``before``: LeRobot's eager attention, ``torch.optim.AdamW`` with its default CPU implementation
  (a Python loop over the parameter tensors) — how the checkpoints bundled before 2026-11-23 were trained;
* ``fused AdamW``: ``AdamW(fused=True)``, now always used by ``effvla train``;
* ``fused AdamW + fused attention``: also ``effvla train --attention fused`` (torch SDPA in the VLM and
  expert layers, :func:`effvla_ros.core.smolvla.functional.fused_attention`): how the bundled checkpoint
  was trained (the ``so101`` recipe sets it).

Each round times ``--steps`` steps of every row in turn (after warm-up steps) and the table reports the
median step time over all rounds, and its ratio to ``before``. Also printed: the loss of the same batch,
noise and weights under both attention implementations (they must agree to float32 summation order).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch


def make_batch(policy, batch: int, seed: int = 0) -> dict:  # type: ignore[no-untyped-def]
    from effvla_ros.sim.task import all_instructions

    g = torch.Generator().manual_seed(seed)
    arch = policy.arch
    size = arch.camera_shape[-1]
    tasks = sorted(all_instructions())
    out: dict = {f"observation.images.{c}": torch.rand((batch, 3, size, size), generator=g) for c in arch.cameras}
    out["observation.state"] = torch.randn((batch, arch.state_dim), generator=g)
    out["action"] = torch.randn((batch, arch.chunk_size, arch.action_dim), generator=g)
    out["action_is_pad"] = torch.zeros((batch, arch.chunk_size), dtype=torch.bool)
    out["task"] = [tasks[i % len(tasks)] for i in range(batch)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30, help="timed steps per row and round")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from effvla_ros.core.smolvla import build_random_policy
    from effvla_ros.train.grounding import N_TARGETS, GroundingHeads, flow_and_grounding_loss
    from effvla_ros.train.trainer import TrainConfig, policy_tokenizer, small_arch

    tok = policy_tokenizer()
    arch = small_arch(vocab_size=len(tok), image_token_id=int(tok.convert_tokens_to_ids("<image>")))
    base = build_random_policy(arch, tokenizer=tok, seed=0, init="transformers")
    batch = make_batch(base, args.batch)
    g = torch.Generator().manual_seed(1)
    targets = torch.randn((args.batch, N_TARGETS), generator=g)
    mask = torch.ones((args.batch, N_TARGETS), dtype=torch.bool)
    noise = torch.randn((args.batch, arch.chunk_size, arch.max_action_dim), generator=g)
    t = torch.rand((args.batch,), generator=g) * 0.999 + 0.001
    heads0 = GroundingHeads(arch.tokens_per_camera, arch.text_hidden_size)
    aux_layer = TrainConfig(data="", out="").aux_layer % arch.num_vlm_layers  # as effvla train

    rows = {"before": ("eager", False), "fused AdamW": ("eager", True),
            "fused AdamW + fused attention": ("fused", True)}
    setups = {}
    for name, (attention, fused_opt) in rows.items():
        pol = copy.deepcopy(base)
        heads = copy.deepcopy(heads0)
        for p in pol.weights.parameters():
            p.requires_grad_(True)
        pol.fused_attention = attention == "fused"
        params = list(pol.weights.parameters()) + list(heads.parameters())
        opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), **({"fused": True} if fused_opt else {}))
        ema = copy.deepcopy(pol.weights)
        for p in ema.parameters():
            p.requires_grad_(False)
        setups[name] = (pol, heads, params, opt, ema)

    def step(name: str) -> float:
        pol, heads, params, opt, ema = setups[name]
        t0 = time.perf_counter()
        flow, aux, _ = flow_and_grounding_loss(pol, batch, heads, targets, mask, layer=aux_layer, camera="scene",
                                               noise=noise, t=t)
        loss = flow + aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), pol.weights.parameters(), strict=True):
                pe.lerp_(p.detach(), 1e-3)
        return time.perf_counter() - t0

    # same weights, batch and noise: the two attention implementations give the same loss
    with torch.no_grad():
        losses = {}
        for attention in ("eager", "fused"):
            base.fused_attention = attention == "fused"
            flow, aux, _ = flow_and_grounding_loss(base, batch, heads0, targets, mask, layer=aux_layer, camera="scene",
                                                   noise=noise, t=t)
            losses[attention] = (float(flow), float(aux))
        base.fused_attention = False

    times: dict[str, list[float]] = {name: [] for name in rows}
    for name in rows:
        for _ in range(args.warmup):
            step(name)
    for _ in range(args.rounds):
        for name in rows:
            times[name] += [step(name) for _ in range(args.steps)]

    n_params = sum(p.numel() for p in base.weights.parameters())
    print(f"training step of the so101 recipe's model ({n_params / 1e6:.2f} M parameters), batch {args.batch}, "
          f"{args.threads} torch thread(s), {args.rounds} rounds x {args.steps} steps per row")
    print(f"loss, same batch and noise: eager flow {losses['eager'][0]:.6f} aux {losses['eager'][1]:.6f} | "
          f"fused flow {losses['fused'][0]:.6f} aux {losses['fused'][1]:.6f} | "
          f"max |diff| {max(abs(a - b) for a, b in zip(losses['eager'], losses['fused'], strict=True)):.2e}")
    print()
    print("| setting | step median [ms] | x before | steps/s |")
    print("| --- | --- | --- | --- |")
    ref = statistics.median(times["before"])
    for name in rows:
        med = statistics.median(times[name])
        print(f"| {name} | {med * 1e3:.1f} | {med / ref:.2f} | {1 / med:.2f} |")


if __name__ == "__main__":
    main()
