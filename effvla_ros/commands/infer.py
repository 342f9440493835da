"""``effvla infer``: run a SmolVLA checkpoint on one observation file, offline.

Observation file (safetensors): ``observation.images.<camera>`` float (1, 3, H, W) in [0, 1],
``observation.state`` (1, state_dim), and the task string in the metadata key ``task``.
Noise file (optional): ``noise`` (1, chunk_size, max_action_dim). Output: ``action``
(1, chunk_size, action_dim) unnormalized, plus ``action_normalized``; per-stage timings in the metadata.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from effvla_ros.core.smolvla.config import ATTENTION_IMPLS

    parser.add_argument("--checkpoint", required=True, help="LeRobot SmolVLA checkpoint directory")
    parser.add_argument("--observation", required=True, help="observation .safetensors (task in metadata 'task')")
    parser.add_argument("--noise", default=None, help="noise .safetensors with key 'noise' (default: random)")
    parser.add_argument("--vlm-dir", default=None,
                        help="directory with the VLM's config.json and tokenizer (when vlm_model_name is a Hub id "
                             "that is not in the local cache, or a path that does not exist here)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16", "lerobot-bf16"],
                        help="dtype of all stages; lerobot-bf16 = VLM in bf16, expert fp32; auto (default) = as "
                             "LeRobot runs the checkpoint (lerobot-bf16 if load_vlm_weights is true, else float32)")
    parser.add_argument("--vision-dtype", default=None, help="override the vision dtype")
    parser.add_argument("--vlm-dtype", default=None, help="override the VLM text dtype")
    parser.add_argument("--expert-dtype", default=None, help="override the expert dtype")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    parser.add_argument("--attention", default="eager", choices=ATTENTION_IMPLS,
                        help="VLM/expert attention: eager (LeRobot's path, default) or fused (torch SDPA)")
    parser.add_argument("--num-steps", type=int, default=0, help="denoising steps (0 = the checkpoint's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise when --noise is not given")
    parser.add_argument("--flops", action="store_true", help="count FLOPs per stage (slower)")
    parser.add_argument("--backend", default="eager",
                        help="stage backend (effvla_ros.core.backends): eager (default, LeRobot's computation), packed, "
                             "compiled, or onnxruntime / tensorrt with --export-dir")
    parser.add_argument("--export-dir", default=None, help="the directory `effvla export` wrote (exported backends)")
    parser.add_argument("--out", required=True, help="output .safetensors (key 'action')")


def run(args: argparse.Namespace) -> int:
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from effvla_ros.core.smolvla import CheckpointError, RuntimeConfig, load_policy

    dtype = args.dtype
    if dtype == "auto":
        cfg_path = Path(args.checkpoint) / "config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        dtype = "lerobot-bf16" if cfg.get("load_vlm_weights") else "float32"
    if dtype == "lerobot-bf16":
        dt = {"vision_dtype": "bfloat16", "vlm_dtype": "bfloat16", "expert_dtype": "float32"}
    else:
        dt = {"vision_dtype": dtype, "vlm_dtype": dtype, "expert_dtype": dtype}
    for k in ("vision_dtype", "vlm_dtype", "expert_dtype"):
        if getattr(args, k):
            dt[k] = getattr(args, k)
    try:
        runtime = RuntimeConfig(device=args.device, num_steps=args.num_steps, count_flops=args.flops,
                                vision_dtype=dt["vision_dtype"], vlm_dtype=dt["vlm_dtype"],
                                expert_dtype=dt["expert_dtype"], attention=args.attention)
        policy = load_policy(args.checkpoint, vlm_dir=args.vlm_dir, runtime=runtime)
    except (CheckpointError, ValueError) as e:
        print(f"effvla infer: {e}", file=sys.stderr)
        return 2
    obs_path = Path(args.observation)
    if obs_path.suffix != ".safetensors" or not obs_path.is_file():
        print(f"effvla infer: observation file {obs_path} must be an existing .safetensors file", file=sys.stderr)
        return 2
    obs: dict[str, object] = {}
    with safe_open(str(obs_path), framework="pt") as f:
        meta = f.metadata() or {}
        for k in f.keys():  # noqa: SIM118
            obs[k] = f.get_tensor(k)
    if "task" not in meta:
        print(f"effvla infer: {obs_path} has no 'task' in its safetensors metadata", file=sys.stderr)
        return 2
    obs["task"] = meta["task"]
    noise = None
    if args.noise:
        with safe_open(args.noise, framework="pt") as f:
            if "noise" not in f.keys():  # noqa: SIM118
                print(f"effvla infer: {args.noise} has no 'noise' tensor", file=sys.stderr)
                return 2
            noise = f.get_tensor("noise")
    else:
        g = torch.Generator().manual_seed(args.seed)
        b = obs["observation.state"].shape[0]  # type: ignore[attr-defined]
        noise = torch.randn((b, policy.arch.chunk_size, policy.arch.max_action_dim), generator=g)
    try:
        if args.backend == "eager":
            result = policy.predict_action_chunk(obs, noise=noise)
            actions, normalized = result.actions, result.actions_normalized
            stats = {k: {"wall_s": round(s.wall_s, 6), "flops": s.flops} for k, s in result.stats.items()}
        else:  # the same chunk through another stage backend (exported graphs: one observation at a time)
            import time

            from effvla_ros.core.backends import make_backend
            from effvla_ros.core.runner import backend_chunk

            backend = make_backend(args.backend, policy, export_dir=args.export_dir)
            t0 = time.perf_counter()
            actions, normalized = backend_chunk(backend, obs, noise)
            stats = {"total": {"wall_s": round(time.perf_counter() - t0, 6), "flops": None}}
    except KeyError as e:
        print(f"effvla infer: {e.args[0]}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"action": actions.float().cpu().contiguous(),
               "action_normalized": normalized.float().cpu().contiguous()},
              str(out), metadata={"stats": json.dumps(stats), "checkpoint": str(args.checkpoint),
                                  "backend": args.backend})
    print(json.dumps({"out": str(out), "shape": list(actions.shape), "stats": stats, "backend": args.backend,
                      "attention": "fused" if policy.fused_attention else "eager"}))
    return 0
