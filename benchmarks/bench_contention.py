"""Inference on a CPU shared with other busy processes: torch threads and OpenMP's wait policy, side by side.

A robot's computer runs camera drivers, ROS and controllers beside the policy. This benchmark runs the real-size
stages (or a checkpoint's) on the ``packed`` backend in bf16 - one full camera encode, then one chunk (prefill of
a pruned two-camera prefix + ``--steps`` denoising steps) - quiet and with ``--load-procs`` busy-loop processes
competing for the cores, for each torch thread count of ``--threads`` and each wait policy of ``--wait-policies``:
``default``, an ``OMP_WAIT_POLICY`` value (``PASSIVE``, ``ACTIVE``), or ``spin=N`` (``GOMP_SPINCOUNT=N``: GNU
OpenMP, torch's, spins N iterations before it sleeps). Both are read when torch starts, so every configuration runs
in a process of its own.

    python benchmarks/bench_contention.py [--checkpoint /tmp/real_ckpt] [--threads 1,2] [--load-procs 2]
           [--wait-policies default,PASSIVE] [--repeats 6] [--steps 5]

Reported per configuration: median and max over ``--repeats`` of the encode and of the chunk (s). The ratios
between rows of one run are the result; the machine is named in the header.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def worker(args: argparse.Namespace) -> None:
    import torch

    sys.path.insert(0, str(REPO))
    from effvla_ros.core.backends import make_backend
    from effvla_ros.core.runner import CameraTokens, InferenceConfig, PolicyRunner
    from effvla_ros.core.smolvla import RuntimeConfig, load_policy

    adaptive = args.worker_threads < 0  # "adaptive": at most every core, as many as other processes leave free
    n = (os.cpu_count() or 1) if adaptive else args.worker_threads
    torch.set_num_threads(n)
    rt = RuntimeConfig(vision_dtype="bfloat16", vlm_dtype="bfloat16", expert_dtype="bfloat16", num_threads=n,
                       adaptive_threads=adaptive)
    policy = load_policy(args.checkpoint, runtime=rt)
    be = make_backend("packed", policy)
    runner = PolicyRunner(policy, backend=be, inference=InferenceConfig(num_steps=args.steps))
    runner.set_instruction("pick up the red cube")
    size = policy.arch.image_size
    px = (torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1).bfloat16()
    tokens = be.encode(px)[0]
    side = policy.arch.patches_per_side // policy.arch.scale_factor
    keep = torch.arange(0, side * side, 2)  # half the tokens, as pruning 0.5 keeps
    cams = {c: CameraTokens(tokens[keep], keep, (side, side)) for c in policy.cameras}
    noise = torch.zeros(1, policy.arch.chunk_size, policy.arch.max_action_dim)
    state = torch.zeros(policy.arch.state_dim)
    enc, chunk, used = [], [], []
    for i in range(args.repeats + 2):  # two warm-up rounds
        used.append(policy.adapt_threads())  # as the token compressor does before each image (no-op unless adaptive)
        t = time.perf_counter()
        be.encode(px)
        e = time.perf_counter() - t
        t = time.perf_counter()
        runner.infer(cams, state, noise=noise)
        if i >= 2:
            enc.append(e)
            chunk.append(time.perf_counter() - t)
    print(json.dumps({"encode": enc, "chunk": chunk, "threads_used": sorted(set(used[2:]))}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="/tmp/real_ckpt")
    ap.add_argument("--threads", default="1,2", help="torch thread counts; 'adaptive': RuntimeConfig.adaptive_threads "
                    "(every core, fewer while other processes keep some busy)")
    ap.add_argument("--wait-policies", default="default,PASSIVE")
    ap.add_argument("--load-procs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--worker-threads", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.worker_threads:
        worker(args)
        return 0
    if not (Path(args.checkpoint) / "config.json").is_file():
        sys.exit(f"{args.checkpoint}: no checkpoint (see bench_e2e_realsize.py for building a real-size one)")
    from bench_e2e_realsize import cpu_model  # this script's folder is on sys.path

    print(f"# {cpu_model()}, {os.cpu_count()} logical CPUs; {args.checkpoint}; packed bf16; chunk = prefill of half the "
          f"tokens + {args.steps} steps; {args.repeats} repeats after 2 warm-up rounds; load = {args.load_procs} "
          "busy-loop processes")
    rows = []
    for loaded in (False, True):
        load = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load_procs if loaded else 0)]
        try:
            for policy in args.wait_policies.split(","):
                for th_name in args.threads.split(","):
                    th = -1 if th_name == "adaptive" else int(th_name)
                    env = dict(os.environ, OMP_NUM_THREADS=str(os.cpu_count() if th < 0 else th))
                    env.pop("OMP_WAIT_POLICY", None)
                    env.pop("GOMP_SPINCOUNT", None)
                    if policy.startswith("spin="):  # GNU OpenMP (torch's): spin this long, then sleep
                        env["GOMP_SPINCOUNT"] = policy.removeprefix("spin=")
                    elif policy != "default":
                        env["OMP_WAIT_POLICY"] = policy
                    p = subprocess.run([sys.executable, __file__, "--checkpoint", args.checkpoint, "--worker-threads",
                                        str(th), "--repeats", str(args.repeats), "--steps", str(args.steps)],
                                       env=env, capture_output=True, text=True, timeout=3600)
                    if p.returncode != 0:
                        sys.exit(f"worker failed: {p.stderr[-2000:]}")
                    r = json.loads(p.stdout.strip().splitlines()[-1])
                    rows.append({"load": loaded, "wait_policy": policy, "threads": th_name, **r})
                    print(f"# {'load ' if loaded else 'quiet'} {policy:8s} {th_name} threads: chunk median "
                          f"{statistics.median(r['chunk']):.3f} s", file=sys.stderr, flush=True)
        finally:
            for q in load:
                q.kill()
    print("\n| CPU | wait policy | torch threads | threads used | encode median [s] | encode max | chunk median [s] | "
          "chunk max |")
    print("|---|---|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {'loaded' if r['load'] else 'quiet'} | {r['wait_policy']} | {r['threads']} | "
              f"{','.join(map(str, r['threads_used']))} | "
              f"{statistics.median(r['encode']):.3f} | {max(r['encode']):.3f} | {statistics.median(r['chunk']):.3f} | "
              f"{max(r['chunk']):.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
