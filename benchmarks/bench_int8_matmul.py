"""Would int8 kernels make the real-size matmuls faster on this CPU? (issue #24: kernels chosen by measurement)

One matmul of each shape the real-size SmolVLA runs (SigLIP's fc1 over 1024 patches, the VLM's gate/up over the
177-token prefix, the expert's projections over the 50-row chunk), side by side in one run, 2 threads by default,
medians of ``--runs`` calls cycling over 16 weights (as the layers do: no weight stays in cache):

* ``packed bf16``: oneDNN's pre-packed bf16 weight, what the ``packed`` backend runs (the reference of the ratios);
* ``fp32``: ``nn.Linear`` in float32;
* ``int8 dynamic``: ``torch.ao.quantization.quantize_dynamic`` (fbgemm: int8 weights per tensor, activations
  quantized per call; W8A8);
* ``int8 weight-only``: ``torch.ops.aten._weight_int8pack_mm`` (int8 weights per output channel, bf16 activations;
  gpt-fast's CPU kernel).

Each row also prints the relative error against the float32 product (max |error| / max |product|) on random inputs
and weights: random weights have no activation outliers, so this is a lower bound of what a trained model sees.

    python benchmarks/bench_int8_matmul.py [--threads 2] [--runs 30]
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
import warnings
from collections.abc import Callable

import torch

SHAPES = [  # (rows, in, out, what)
    (1024, 768, 3072, "SigLIP fc1, 1024 patches"),
    (177, 960, 5120, "VLM gate+up, 177-token prefix"),
    (50, 720, 2048, "expert gate+up, 50 rows"),
    (50, 2048, 720, "expert down, 50 rows"),
]


def _median(f: Callable[[], object], runs: int) -> float:
    for _ in range(3):
        f()
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


def _cycle(fs: list[Callable[[], object]]) -> Callable[[], object]:
    state = {"i": 0}

    def call() -> object:
        state["i"] += 1
        return fs[state["i"] % len(fs)]()
    return call


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--weights", type=int, default=16, help="distinct weights cycled through (cold caches)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    print(f"# {cpu}; {args.threads} threads; torch {torch.__version__}; medians of {args.runs}, "
          f"{args.weights} weights cycled")
    print("| shape | what | packed bf16 [ms] | TFLOP/s | fp32 | int8 dynamic | int8 weight-only | "
          "rel. error dynamic / weight-only |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    mk = torch.ops.mkldnn
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m, k, n, what in SHAPES:
            ws = [torch.randn(n, k, generator=g) * 0.02 for _ in range(args.weights)]
            x = torch.randn(m, k, generator=g)
            xb = x.bfloat16()
            packed = [mk._reorder_linear_weight(w.bfloat16().contiguous(), m) for w in ws]
            t_packed = _median(_cycle([lambda p=p, xb=xb: mk._linear_pointwise(xb, p, None, "none", [], "")
                                       for p in packed]), args.runs)
            lins = []
            for w in ws:
                lin = torch.nn.Linear(k, n, bias=False)
                lin.weight.copy_(w)
                lins.append(lin)
            t_fp32 = _median(_cycle([lambda lin=lin, x=x: lin(x) for lin in lins]), args.runs)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                qs = [torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear},
                                                             dtype=torch.qint8) for lin in lins]
            t_dyn = _median(_cycle([lambda q=q, x=x: q(x) for q in qs]), args.runs)
            w8 = []
            for w in ws:
                scale = w.abs().amax(1) / 127.0
                w8.append((torch.round(w / scale[:, None]).clamp(-128, 127).to(torch.int8), scale.bfloat16()))
            t_w8 = _median(_cycle([lambda q=q, s=s, xb=xb: torch.ops.aten._weight_int8pack_mm(xb, q, s)
                                   for q, s in w8]),
                           args.runs)
            ref = x @ ws[0].t()
            scale_ref = float(ref.abs().max())
            e_dyn = float((qs[0](x) - ref).abs().max()) / scale_ref
            e_w8 = float((torch.ops.aten._weight_int8pack_mm(xb, *w8[0]).float() - ref).abs().max()) / scale_ref
            tf = 2 * m * k * n / t_packed / 1e12
            print(f"| {m}x{k}x{n} | {what} | {t_packed * 1e3:.3f} | {tf:.2f} | x{t_packed / t_fp32:.2f} | "
                  f"x{t_packed / t_dyn:.2f} | x{t_packed / t_w8:.2f} | {e_dyn:.1e} / {e_w8:.1e} |", flush=True)
    print("ratios: speed relative to packed bf16 (x2.00 = twice as fast)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
