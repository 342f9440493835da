"""Stage backends side by side at real SmolVLA-450M size (random weights): what each stage costs, and why.

    python benchmarks/bench_backends.py [--backends eager,packed,compiled] [--dtype bfloat16] [--threads 2]
                                        [--fractions 0.05,0.1,0.25,0.4,0.6] [--runs 5]

Per backend (one process, one set of weights, medians of ``--runs`` after a warm-up call):
* the full-frame encode of one camera (512 px model input) and the Eventful partial encode with a random
  fraction of the patches changed (the cost curve of patch-level reuse: time should follow the fraction);
* one chunk through ``PolicyRunner`` (prefill + 10 denoising steps) with everything off and with expert reuse
  at its most (threshold 10: every layer the rule allows), and the layer evaluations it skipped.
Then the expert's matmul shape alone (50 rows x 720 -> 2048), on a different weight per call (cache-cold, as the
16 expert layers are) and on one cache-hot weight, against 1024 rows: whether a denoising step is bound by
arithmetic or by reading weights.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def med(fn: Callable[[], object], runs: int) -> float:
    fn()
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default="eager,packed,compiled")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fractions", default="0.05,0.1,0.25,0.4,0.6")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from effvla_ros.core.backends import make_backend
    from effvla_ros.core.early_exit import ExpertReuseConfig
    from effvla_ros.core.runner import CameraTokens, PolicyRunner
    from effvla_ros.core.smolvla import RuntimeConfig, build_random_policy, smolvla_450m_arch
    from effvla_ros.core.smolvla.tokenizer import build_tiny_tokenizer

    arch = smolvla_450m_arch()
    dt = args.dtype
    policy = build_random_policy(arch, seed=0, init="transformers", tokenizer=build_tiny_tokenizer(),
                                 runtime=RuntimeConfig(vision_dtype=dt, vlm_dtype=dt, expert_dtype=dt))
    policy.weights.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    pixels = policy.preprocess_image(torch.rand(1, 3, 256, 256, generator=g)).to(getattr(torch, dt))
    side = arch.patches_per_side
    fractions = [float(f) for f in args.fractions.split(",")]
    masks = [torch.rand(side, side, generator=g) < f for f in fractions]
    with torch.no_grad():
        tokens = policy.encode_pixels(pixels)[0].float()
    cams = {c: CameraTokens(tokens, torch.arange(tokens.shape[0]), (side // arch.scale_factor,) * 2)
            for c in arch.cameras}
    noise = torch.randn(1, arch.chunk_size, arch.max_action_dim, generator=g)
    print(f"# SmolVLA-450M random weights, {dt}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"medians of {args.runs}")
    head = (["backend", "full encode [s]"] + [f"partial {f:.0%} [s]" for f in fractions]
            + ["chunk off [s]", "chunk max reuse [s]", "reused / layer evals"])
    print("\n| " + " | ".join(head) + " |\n|---|" + "---:|" * (len(head) - 1))
    copy_lines: list[str] = []
    for name in args.backends.split(","):
        be = make_backend(name, policy)
        with torch.no_grad():
            full = med(lambda b=be: b.encode(pixels), args.runs)
            ev = be.eventful_encoder()
            state = ev.encode_full(pixels)[1]
            # as the compressor runs it: the cache updated in place; and the copying update (a new cache per frame,
            # the compressor's before 2026-12-04), side by side
            copying = [med(lambda m=m, e=ev, s=state: e.encode_partial(pixels, m, s), args.runs) for m in masks]
            parts = [med(lambda m=m, e=ev, s=state: e.encode_partial(pixels, m, s, inplace=True), args.runs)
                     for m in masks]
        copy_lines.append(f"{name}: partial encode, cache copied per frame / updated in place: " + ", ".join(
            f"{f:.0%} {c:.3f} / {p:.3f} s ({p / c:.2f})" for f, c, p in zip(fractions, copying, parts)))
        row = [name, f"{full:.3f}"] + [f"{p:.3f}" for p in parts]
        for reuse in (False, True):
            runner = PolicyRunner(policy, backend=be, expert_reuse=ExpertReuseConfig(enabled=reuse, threshold=10.0))
            runner.set_instruction("pick up the red cube")
            row.append(f"{med(lambda r=runner: r.infer(cams, torch.zeros(arch.state_dim), noise=noise), args.runs):.3f}")
            res = runner.infer(cams, torch.zeros(arch.state_dim), noise=noise)
        row.append(f"{res.reused_expert_layers} / {res.reused_expert_layers + res.computed_expert_layers}")
        print("| " + " | ".join(row) + " |", flush=True)

    print("\n" + "\n".join(copy_lines))

    d_in, d_out = arch.expert_hidden_size, arch.expert_intermediate_size
    weights = [torch.randn(d_out, d_in, dtype=getattr(torch, dt)) for _ in range(100)]  # > the last-level cache
    x50 = torch.randn(arch.chunk_size, d_in, dtype=getattr(torch, dt))
    x1k = torch.randn(1024, d_in, dtype=getattr(torch, dt))
    lin = torch.nn.functional.linear
    cold = med(lambda: [lin(x50, w) for w in weights], args.runs) / len(weights)
    hot = med(lambda: [lin(x50, weights[0]) for _ in weights], args.runs) / len(weights)
    big = med(lambda: [lin(x1k, w) for w in weights[:20]], args.runs) / 20
    flop50, flop1k = 2 * arch.chunk_size * d_in * d_out, 2 * 1024 * d_in * d_out
    wbytes = d_in * d_out * weights[0].element_size()
    print(f"\nexpert matmul {arch.chunk_size}x{d_in} @ {d_in}x{d_out}: {cold * 1e3:.3f} ms on a new weight each call "
          f"({flop50 / cold / 1e12:.2f} TFLOP/s, {wbytes / cold / 1e9:.1f} GB/s of weights), {hot * 1e3:.3f} ms "
          f"cache-hot ({flop50 / hot / 1e12:.2f} TFLOP/s); 1024 rows: {flop1k / big / 1e12:.2f} TFLOP/s")
    if dt == "bfloat16":
        int8_rows(weights, x50, args.runs)
    return 0


def int8_rows(weights: list[torch.Tensor], x: torch.Tensor, runs: int) -> None:
    """Fewer weight bytes for the bandwidth-bound expert: int8 weights (half of bf16's bytes) through the CPU
    kernels torch has, on the same cold-weight expert shape, against the packed bf16 matmul of the packed backend.
    ``_weight_int8pack_mm``: weight-only int8, bf16 activations (gpt-fast's CPU path); dynamic int8 (oneDNN engine):
    activations quantized per call, int8 AMX/VNNI kernels, fp32 in and out."""
    mk = torch.ops.mkldnn
    rows = x.shape[0]
    packed = [mk._reorder_linear_weight(w.contiguous(), rows) for w in weights]
    scales = [w.float().abs().amax(dim=1) / 127 for w in weights]
    q8 = [torch.round(w.float() / s[:, None]).clamp(-128, 127).to(torch.int8).contiguous() for w, s in zip(weights, scales)]
    s16 = [s.to(torch.bfloat16) for s in scales]
    n = len(weights)
    t_packed = med(lambda: [mk._linear_pointwise(x, w, None, "none", [], "") for w in packed], runs) / n
    t_w8 = med(lambda: [torch.ops.aten._weight_int8pack_mm(x, q, s) for q, s in zip(q8, s16)], runs) / n
    line = (f"int8 weights on that shape (cold): packed bf16 {t_packed * 1e3:.3f} ms; weight-only int8 "
            f"(_weight_int8pack_mm) {t_w8 * 1e3:.3f} ms ({t_w8 / t_packed:.2f}x)")
    if "onednn" in torch.backends.quantized.supported_engines:
        import warnings

        torch.backends.quantized.engine = "onednn"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dyn = []
            for w in weights:
                lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
                lin.weight.data = w.float()
                dyn.append(torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear},
                                                                   dtype=torch.qint8))
            x32 = x.float()
            t_dyn = med(lambda: [m(x32) for m in dyn], runs) / n
        line += f"; dynamic int8 (oneDNN) {t_dyn * 1e3:.3f} ms ({t_dyn / t_packed:.2f}x)"
    print(line)


if __name__ == "__main__":
    raise SystemExit(main())
