"""``effvla export``: write a checkpoint's stages as ONNX graphs + a manifest + per target a TensorRT build script.

    effvla export --checkpoint CKPT --out DIR [--dtype fp32|fp16|bf16] [--target T ...] [--exit-layers all|none|3,7]

Run the result with ``backend: onnxruntime`` (here, or on a Jetson with JetPack's onnxruntime-gpu) or build the
TensorRT engines on the device (``DIR/build_engines_<target>.sh``) and run ``backend: tensorrt``. See README
"Deploy on Jetson".
"""
from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path
from typing import Any

TARGET_NODE_PARAMS = ("keep_ratio", "min_tokens", "coverage_regions")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="LeRobot SmolVLA checkpoint directory")
    p.add_argument("--out", required=True, help="export directory (created)")
    p.add_argument("--vlm-dir", default=None, help="VLM config + tokenizer directory (default: found as load_policy does)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"),
                   help="dtype of every stage's weights and activations (fp32: ONNX Runtime CPU; fp16/bf16: TensorRT "
                        "and CUDA)")
    p.add_argument("--target", action="append", default=None,
                   help="deployment target(s) whose pruning keep ratio sets the prefix-length profiles and whose "
                        "TensorRT build script is written (default: every target)")
    p.add_argument("--exit-layers", default="all",
                   help="VLM early-exit points as prefill segment ends: all (one graph per layer), none (one graph), "
                        "or layer indices, e.g. 3,7,11")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's choice here, 20)")


def _targets(names: list[str] | None) -> dict[str, dict[str, Any]]:
    from effvla_ros.graph import TARGETS
    from effvla_ros.replay.settings import node_params, target_files

    chosen = names or list(TARGETS)
    out: dict[str, dict[str, Any]] = {}
    for t in chosen:
        if t not in TARGETS:
            raise ValueError(f"--target: {t!r} is not one of {list(TARGETS)}")
        comp = node_params(target_files(t), "token_compressor")
        pruning_on = comp.get("pruning.method", "task") != "none"
        out[t] = {k: comp[f"pruning.{k}"] for k in TARGET_NODE_PARAMS if f"pruning.{k}" in comp}
        if not pruning_on:
            out[t]["keep_ratio"] = 1.0
    return out


def run(args: argparse.Namespace) -> int:
    from effvla_ros.core.backends.exported import ExportError
    from effvla_ros.core.backends.onnx_export import OPSET, export_policy
    from effvla_ros.core.smolvla import RuntimeConfig, load_policy
    from effvla_ros.core.smolvla.config import DTYPE_ALIASES

    dtype = DTYPE_ALIASES[args.dtype]
    exits: Any = args.exit_layers
    if exits not in ("all", "none"):
        try:
            exits = [int(x) for x in str(exits).split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--exit-layers: {args.exit_layers!r} is not all, none or a list of layer indices") from None
    targets = _targets(args.target)
    t0 = time.perf_counter()
    runtime = RuntimeConfig(vision_dtype=dtype, vlm_dtype=dtype, expert_dtype=dtype)
    policy = load_policy(args.checkpoint, vlm_dir=args.vlm_dir, runtime=runtime)
    print(f"effvla export: {args.checkpoint} ({sum(p.numel() for p in policy.weights.parameters()) / 1e6:.0f} M "
          f"parameters, {dtype}) -> {args.out}")
    try:
        manifest = export_policy(policy, Path(args.out), exit_layers=exits, targets=targets, opset=args.opset or OPSET,
                                 checkpoint=args.checkpoint)
    except ExportError:
        raise
    out = Path(args.out)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    print(f"effvla export: {len(manifest.stages)} stage graphs, {size / 1e9:.2f} GB, opset {manifest.opset}, "
          f"early exit after layers {list(manifest.exit_layers) or 'none'}; {time.perf_counter() - t0:.0f} s, "
          f"peak memory {peak:.1f} GB")
    for t, prof in manifest.targets.items():
        print(f"  {t}: prefix length min {prof['min']} / opt {prof['opt']} / max {prof['max']} -> "
              f"{out / f'build_engines_{t}.sh'}")
    print(f"run: backend:=onnxruntime export_dir:={out}  (TensorRT: build the engines on the device, then "
          "backend:=tensorrt)")
    return 0
