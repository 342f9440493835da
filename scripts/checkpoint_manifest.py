"""Carry a real-size checkpoint where its 1.8 GB of weights cannot go: shapes and statistics out, weights back in.

A machine reached only through a size-limited copy (the GPU machine of ``benchmarks/run_gpu.sh``: 64 MiB per
call, no model hub) cannot receive ``model.safetensors`` of a real-size SmolVLA. The benchmark's checkpoint
has random weights anyway (built offline by LeRobot 0.6.1, see ``bench_e2e_realsize.py``), so what has to
travel is its layout:

    python scripts/checkpoint_manifest.py manifest /tmp/real_ckpt OUT_DIR
        copies everything of the checkpoint but model.safetensors (config.json, the processors and their
        normalizer states, a vlm/ folder) to OUT_DIR and writes OUT_DIR/weights_manifest.json: every tensor's name, shape,
        dtype, mean and standard deviation

    python scripts/checkpoint_manifest.py materialize OUT_DIR [--seed 0]
        writes OUT_DIR/model.safetensors: every tensor drawn from N(mean, std) of the manifest (constant
        tensors - LayerNorm weights of ones, zero biases - exactly constant), in the manifest's dtype

The result loads with LeRobot's ``SmolVLAPolicy.from_pretrained`` and with ours (same names, shapes, dtypes);
its numbers are not the original's (another random draw with the same per-tensor scale), so it serves
timing and same-run fidelity comparisons (ours vs LeRobot on the same materialized file), never a golden file.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

MANIFEST = "weights_manifest.json"
WEIGHTS = "model.safetensors"


def manifest(src: Path, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if p.is_dir():  # e.g. vlm/: the VLM's config and tokenizer (small)
            shutil.copytree(p, out / p.name, dirs_exist_ok=True)
        elif p.name != WEIGHTS and p.name != "reference.safetensors":
            shutil.copy2(p, out / p.name)
    tensors = []
    with safe_open(str(src / WEIGHTS), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
            t = f.get_tensor(name)
            x = t.double()
            tensors.append({"name": name, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
                            "mean": float(x.mean()) if t.numel() else 0.0,
                            "std": float(x.std()) if t.numel() > 1 else 0.0})
    doc = {"source": str(src), "tensors": tensors}
    (out / MANIFEST).write_text(json.dumps(doc, indent=0))
    return doc


def materialize(out: Path, seed: int = 0) -> Path:
    doc = json.loads((out / MANIFEST).read_text())
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for t in doc["tensors"]:
        dtype = getattr(torch, t["dtype"])
        x = torch.randn(t["shape"], generator=gen, dtype=torch.float32) * t["std"] + t["mean"]
        weights[t["name"]] = x.to(dtype).contiguous()
    save_file(weights, str(out / WEIGHTS), metadata={"format": "pt"})
    return out / WEIGHTS


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("manifest")
    m.add_argument("src")
    m.add_argument("out")
    z = sub.add_parser("materialize")
    z.add_argument("out")
    z.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.cmd == "manifest":
        src = Path(args.src)
        if not (src / WEIGHTS).is_file() or not (src / "config.json").is_file():
            sys.exit(f"{src}: no config.json + {WEIGHTS}")
        doc = manifest(src, Path(args.out))
        n = sum(int(torch.Size(t["shape"]).numel()) for t in doc["tensors"])
        print(f"{len(doc['tensors'])} tensors, {n / 1e6:.0f} M values -> {Path(args.out) / MANIFEST}")
    else:
        path = materialize(Path(args.out), args.seed)
        print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
