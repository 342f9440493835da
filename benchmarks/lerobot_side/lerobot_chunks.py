"""LeRobot 0.6.1 side of ``benchmarks/bench_e2e_realsize.py``: one ``predict_action_chunk`` per frame, timed.

Runs in the LeRobot reference venv (``~/.cache/effvla-lerobot-ref``, made by
``../shared/lerobot_reference/setup.sh``), as a subprocess of the benchmark. It never imports effvla_ros
(another venv): it reads the inputs the benchmark wrote and writes its timings as JSON.

    HF_HUB_OFFLINE=1 ~/.cache/effvla-lerobot-ref/bin/python benchmarks/lerobot_side/lerobot_chunks.py \\
        --checkpoint CKPT --inputs INPUTS.safetensors --out OUT.json [--dtypes fp32,vlm-bf16] [--threads 2]
        [--kit-scripts ../shared/lerobot_reference/scripts]

INPUTS.safetensors: ``images.<camera>`` (N, 3, H, W) float in [0, 1] per checkpoint camera, ``state`` (N, S)
raw, ``noise`` (N, 1, chunk_size, max_action_dim); metadata ``task`` (the instruction) and ``cameras`` (JSON
list of the checkpoint's camera names).

The checkpoint is loaded once with LeRobot's own API (``SmolVLAPolicy.from_pretrained`` and the saved
``policy_preprocessor.json`` / ``policy_postprocessor.json`` pipelines). Per dtype, in the order given:

- ``fp32``: as loaded (a checkpoint with ``load_vlm_weights=false`` loads in fp32);
- ``vlm-bf16``: ``policy.model.vlm_with_expert.vlm.to(torch.bfloat16)``, the VLM (vision + connector + text)
  in bf16 and the expert in fp32, as LeRobot runs with ``load_vlm_weights=true``. Casts are one-way, so
  give ``fp32`` first.

Per frame (batch of one): ``step_s`` = preprocessor (batching, tokenization, state normalization) +
``predict_action_chunk(batch, noise=noise[i])`` + postprocessor (action unnormalization), i.e. raw
observation to unnormalized actions; ``chunk_s`` = ``predict_action_chunk`` alone; from wrappers on the
model's own methods: ``vision_s`` = ``embed_image`` (both cameras), ``denoise_s`` = every ``denoise_step``,
``prefill_s`` = ``sample_actions`` minus those two (prefix embedding + the VLM forward that fills the KV
cache). The wrappers only observe (each adds one ``perf_counter`` pair). Every frame is timed: the
benchmark drops its warm-up frames. The unnormalized actions of the first frame come back for the
fidelity check.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtypes", default="fp32,vlm-bf16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="torch device (the policy, its preprocessor's device step)")
    ap.add_argument("--kit-scripts", default=None,
                    help="../shared/lerobot_reference/scripts (crop_shim, imported on transformers >= 5.15)")
    args = ap.parse_args()

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    tv = tuple(int(x) for x in transformers.__version__.split(".")[:2])
    if tv >= (5, 15):
        if not args.kit_scripts:
            sys.exit(f"transformers {transformers.__version__} >= 5.15 needs crop_shim: pass --kit-scripts")
        sys.path.insert(0, args.kit_scripts)
        import crop_shim  # noqa: F401  (DynamicLayer.crop(n > 0) raises on transformers >= 5.15)

    import lerobot
    from lerobot.configs.policies import PreTrainedConfig
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy
    from lerobot.processor import PolicyProcessorPipeline
    from lerobot.processor.converters import policy_action_to_transition, transition_to_policy_action
    from safetensors import safe_open

    with safe_open(args.inputs, framework="pt") as f:
        meta = f.metadata()
        io = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    task, cameras = meta["task"], json.loads(meta["cameras"])
    n = io["state"].shape[0]

    d = args.checkpoint
    t0 = time.perf_counter()
    cfg = PreTrainedConfig.from_pretrained(d)
    cfg.device = args.device
    policy = SmolVLAPolicy.from_pretrained(d, config=cfg).eval().to(args.device)
    pre = PolicyProcessorPipeline.from_pretrained(d, config_filename="policy_preprocessor.json",
                                                  overrides={"device_processor": {"device": args.device}})
    post = PolicyProcessorPipeline.from_pretrained(d, config_filename="policy_postprocessor.json",
                                                   to_transition=policy_action_to_transition,
                                                   to_output=transition_to_policy_action)
    load_s = time.perf_counter() - t0
    feats = [k for k in policy.config.input_features if k.startswith("observation.images.")]
    if feats != [f"observation.images.{c}" for c in cameras]:
        sys.exit(f"camera mismatch: checkpoint {feats}, inputs {cameras}")
    print(f"[lerobot] loaded {d} in {load_s:.1f} s ({sum(p.numel() for p in policy.parameters()) / 1e6:.0f} M "
          f"params); lerobot {lerobot.__version__}, torch {torch.__version__}, transformers "
          f"{transformers.__version__}, {torch.get_num_threads()} threads", file=sys.stderr, flush=True)

    # observe-only wrappers for the per-stage breakdown (as build_reference.py of the kit does)
    m, vwe = policy.model, policy.model.vlm_with_expert
    acc = {"vision_s": 0.0, "denoise_s": 0.0, "sample_s": 0.0}
    orig_img, orig_den, orig_sample = vwe.embed_image, m.denoise_step, m.sample_actions

    cuda = args.device.startswith("cuda")

    def sync() -> None:  # CUDA runs asynchronously: a stage ends when its work is done
        if cuda:
            torch.cuda.synchronize()

    def timed(fn, key):  # type: ignore[no-untyped-def]
        def wrapper(*a, **k):  # type: ignore[no-untyped-def]
            sync()
            t = time.perf_counter()
            out = fn(*a, **k)
            sync()
            acc[key] += time.perf_counter() - t
            return out
        return wrapper

    vwe.embed_image = timed(orig_img, "vision_s")
    m.denoise_step = timed(orig_den, "denoise_s")
    m.sample_actions = timed(orig_sample, "sample_s")

    rows = {}
    for dtype in args.dtypes.split(","):
        if dtype == "vlm-bf16":
            vwe.vlm.to(torch.bfloat16)
        elif dtype != "fp32":
            sys.exit(f"--dtypes: unknown {dtype!r} (fp32, vlm-bf16)")
        rec: dict = {k: [] for k in ("step_s", "chunk_s", "vision_s", "prefill_s", "denoise_s")}
        for i in range(n):
            raw = {f"observation.images.{c}": io[f"images.{c}"][i:i + 1].clone() for c in cameras}
            raw["observation.state"] = io["state"][i:i + 1].clone()
            raw["task"] = [task]
            noise = io["noise"][i].clone().to(args.device)
            for k in acc:
                acc[k] = 0.0
            sync()
            t0 = time.perf_counter()
            batch = pre(raw)
            sync()
            t1 = time.perf_counter()
            chunk = policy.predict_action_chunk(batch, noise=noise)
            sync()
            t2 = time.perf_counter()
            actions = post(chunk)
            t3 = time.perf_counter()
            rec["step_s"].append(t3 - t0)
            rec["chunk_s"].append(t2 - t1)
            rec["vision_s"].append(acc["vision_s"])
            rec["denoise_s"].append(acc["denoise_s"])
            rec["prefill_s"].append(acc["sample_s"] - acc["vision_s"] - acc["denoise_s"])
            if i == 0:
                rec["actions0"] = actions[0].float().tolist()
            print(f"[lerobot {dtype}] frame {i}: step {t3 - t0:.3f} s (chunk {t2 - t1:.3f}, vision "
                  f"{acc['vision_s']:.3f}, denoise {acc['denoise_s']:.3f})", file=sys.stderr, flush=True)
        rows[dtype] = rec
    vwe.embed_image, m.denoise_step, m.sample_actions = orig_img, orig_den, orig_sample

    out = {"device": args.device, "versions": {"lerobot": lerobot.__version__, "torch": torch.__version__,
                        "transformers": transformers.__version__, "python": platform.python_version()},
           "threads": torch.get_num_threads(), "load_s": load_s, "frames": n, "rows": rows}
    Path(args.out).write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
