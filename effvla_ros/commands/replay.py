"""``effvla replay``: replay a rosbag2 offline under several efficiency settings and report.

Examples::

    effvla replay runs/pick_01 --checkpoint ckpt --sweep pruning.keep_ratio=0.25,0.5 reuse.enabled=true
    effvla replay runs/pick_01 --checkpoint ckpt --target orin_nano_8gb --max-steps 50 --out reports/pick_01
    effvla replay other.bag --checkpoint ckpt --camera camera1=/front/image_raw --instruction "pick the cube"

The baseline runs with every optimization off (pruning.method=none, reuse.enabled=false, early exit,
expert reuse and RTC off); each ``--sweep name=v1,v2`` value is applied alone on the baseline
(``--sweep-mode product``: every combination; ``name=v+name=v``: one setting with several changes; list
values ``a:b:c``) - the grammar of ``effvla eval-sim`` too, see :mod:`effvla_ros.core.settings`. The
joint state of an observation is paired as the policy node does (the newest at or before the images,
at most ``--state-stamp-tolerance`` older). ``--target T`` adds the target's configured setting
(config/base.yaml + config/targets/T.yaml) and uses its chunk executor parameters for smoothness.
Outputs in ``--out``: report.json, report.md, actions.npz, PNG plots; with ``--video``, replay.mp4 (or
``--video gif``: replay.gif): the bag's cameras with each setting's kept, pruned and recomputed tokens side
by side (:mod:`effvla_ros.replay.video`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bag", help="rosbag2 directory (MCAP or sqlite3) or its .mcap/.db3 file")
    parser.add_argument("--checkpoint", required=True, help="LeRobot SmolVLA checkpoint directory")
    parser.add_argument("--vlm-dir", default=None, help="VLM config + tokenizer directory (see effvla infer)")
    parser.add_argument("--target", default=None, help="add the setting of this deployment target "
                        "(orin_nano_8gb, orin_nx_16gb, agx_orin_64gb, agx_thor, x86_cpu)")
    parser.add_argument("--sweep", action="extend", nargs="+", default=[], metavar="NAME=V1,V2",
                        help="settings to compare with the baseline, by ROS parameter name: pruning.*, reuse.*, "
                             "early_exit.*, expert_reuse.*, rtc.*, num_steps; list values a:b:c; "
                             "NAME=V+NAME=V: one setting with several changes (repeatable)")
    parser.add_argument("--sweep-mode", default="one-at-a-time", choices=["one-at-a-time", "product"],
                        help="each sweep item's settings alone on the baseline (default) or every combination")
    parser.add_argument("--out", default=None, help="output directory (default: <bag>_replay next to the bag "
                        "directory, never inside it)")
    parser.add_argument("--max-steps", type=int, default=0, help="replay at most N observations (0 = all)")
    parser.add_argument("--num-steps", type=int, default=0,
                        help="denoising steps of the baseline (0 = the checkpoint's); sweep num_steps=... to compare")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (noise of observation i: seed*1000003+i)")
    parser.add_argument("--camera", action="append", default=[], metavar="CAMERA=TOPIC",
                        help="map a checkpoint camera to an image topic (default: topics with the camera's name)")
    parser.add_argument("--instruction", default=None, help="task instruction (overrides / replaces the bag's)")
    parser.add_argument("--instruction-topic", default=None, help="std_msgs/String topic of the instruction")
    parser.add_argument("--joint-states-topic", default=None, help="sensor_msgs/JointState topic")
    parser.add_argument("--action-chunk-topic", default=None, help="effvla_ros/ActionChunk topic")
    parser.add_argument("--state", default=None, help="fixed state v1,v2,... when the bag has no joint states")
    parser.add_argument("--state-joint-names", default=None,
                        help="comma-separated joints forming the state, in order (default: the checkpoint's declared "
                             "names (joint_names.json), else the --target's / config/base.yaml's policy "
                             "state_joint_names); JointStates are read by name, in any order, extra joints ignored")
    parser.add_argument("--joint-map", action="append", default=[], metavar="OLD=NEW,...",
                        help="rename the bag's joints to the policy's: OLD=NEW pairs, PREFIX*= strips a prefix "
                             "(e.g. so101_*=), *SUFFIX= a suffix (repeatable)")
    parser.add_argument("--state-by-position", action="store_true",
                        help="take the first state_dim JointState positions whatever their names (names ignored)")
    parser.add_argument("--action-names", default=None, help="comma-separated names of the action dimensions")
    parser.add_argument("--observations", default="auto", choices=["auto", "chunks", "frames"],
                        help="observation times: the recorded chunks' stamps, or every frame of the anchor camera "
                             "(auto: chunks when the bag has ActionChunks)")
    parser.add_argument("--anchor-camera", default=None, help="frames mode: camera whose frames define observations "
                        "(default: the one with the fewest frames)")
    parser.add_argument("--stamp-tolerance", type=float, default=0.05, help="max stamp distance of a camera's frame "
                        "to the observation time (s)")
    parser.add_argument("--state-stamp-tolerance", type=float, default=None,
                        help="the joint state of an observation is the newest stamped at or before its images and at "
                             "most this much older (s), as the policy node's state_stamp_tolerance_s (default: its "
                             "default, 0.05; 0: no limit)")
    parser.add_argument("--fps", type=float, default=None, help="policy action rate (default: from the recorded "
                        "chunks, else the target's, else 10)")
    parser.add_argument("--rtc-delay-steps", type=int, default=1, help="fixed RTC inference delay d (steps)")
    parser.add_argument("--chunk-latency", type=float, default=0.0,
                        help="simulated delay (s) between an observation and its chunk reaching the executor")
    parser.add_argument("--flops", default="separate", choices=["separate", "inline", "off"],
                        help="prefill/denoise FLOP counting: separate = a second, counted pass so latencies are not "
                             "inflated by counting (default); inline = one counted pass (latencies include the "
                             "counting overhead); off = no prefill/denoise FLOPs (fastest)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--video", nargs="?", const="mp4", default=None, choices=["mp4", "gif"],
                        help="also write <out>/replay.mp4 (or .gif): the bag's cameras with each setting's kept "
                             "(outlined), pruned (dimmed) and recomputed (tinted) tokens side by side")
    parser.add_argument("--video-size", type=int, default=224, help="pixels per camera view in the --video")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    add_backend_arguments(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what}: expected comma-separated numbers, got {text!r}") from None


def default_out(bag: str) -> Path:
    """``<bag>_replay`` next to the bag: for a storage file inside a rosbag2 directory (or a directory
    holding only it), next to that directory, never inside it."""
    p = Path(str(bag).rstrip("/")).expanduser()
    if p.is_dir() or not p.suffix:
        return p.parent / f"{p.name}_replay"
    parent = p.parent
    if (parent / "metadata.yaml").is_file() or p.stem.startswith(parent.name):  # rosbag2 dir: <dir>/<dir>_0.mcap
        return parent.parent / f"{parent.name}_replay"
    return parent / f"{p.stem}_replay"


def add_backend_arguments(parser: argparse.ArgumentParser) -> None:
    """--backend / --dtype: the stage backend and dtype to measure on (those the policy node will run with)."""
    from effvla_ros.core.backends import BACKENDS
    from effvla_ros.core.smolvla.config import DTYPE_CHOICES

    parser.add_argument("--backend", default="eager", choices=sorted(BACKENDS),
                        help="stage backend, as the nodes' backend parameter (default eager)")
    parser.add_argument("--dtype", default="", choices=["", *DTYPE_CHOICES],
                        help="vision / VLM / expert dtype, as the nodes' *_dtype parameters (default float32; auto: "
                             "bfloat16 where the CPU computes it natively)")


def run(args: argparse.Namespace) -> int:
    from effvla_ros.core.observation import DEFAULT_STATE_STAMP_TOLERANCE_S, parse_joint_map
    from effvla_ros.replay.observations import ObservationOptions
    from effvla_ros.replay.pipeline import ReplayConfig, run_replay
    from effvla_ros.replay.report import write_outputs

    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    cams: dict[str, str] = {}
    for item in args.camera:
        cam, eq, topic = item.partition("=")
        if not eq or not cam or not topic:
            raise ValueError(f"--camera {item!r}: expected CAMERA=TOPIC")
        cams[cam.strip()] = topic.strip()
    if args.max_steps < 0:
        raise ValueError("--max-steps: must be >= 0")
    state_tol = DEFAULT_STATE_STAMP_TOLERANCE_S if args.state_stamp_tolerance is None else args.state_stamp_tolerance
    if state_tol < 0:
        raise ValueError("--state-stamp-tolerance: must be >= 0")
    obs = ObservationOptions(
        cameras=cams, joint_states_topic=args.joint_states_topic, instruction_topic=args.instruction_topic,
        action_chunk_topic=args.action_chunk_topic, instruction=args.instruction,
        state=_floats(args.state, "--state") if args.state else None,
        state_joint_names=[x.strip() for x in args.state_joint_names.split(",") if x.strip()]
        if args.state_joint_names else [],
        joint_map=parse_joint_map(args.joint_map), state_by_position=args.state_by_position,
        stamp_tolerance_s=args.stamp_tolerance, state_stamp_tolerance_s=state_tol,
        mode=args.observations, anchor=args.anchor_camera,
        max_steps=args.max_steps)
    cfg = ReplayConfig(
        bag=args.bag, checkpoint=args.checkpoint, vlm_dir=args.vlm_dir, target=args.target, sweep=list(args.sweep),
        sweep_mode=args.sweep_mode, max_steps=args.max_steps, num_steps=args.num_steps, seed=args.seed, fps=args.fps,
        rtc_delay_steps=args.rtc_delay_steps, latency_s=args.chunk_latency, flops=args.flops,
        device=args.device, backend=args.backend, dtype=args.dtype, observations=obs,
        action_names=[x.strip() for x in args.action_names.split(",")] if args.action_names else [],
        progress=not args.quiet)
    policy = None
    if args.video:  # loaded here so that the video's token pass reuses it
        from effvla_ros.core.smolvla import RuntimeConfig, load_policy

        policy = load_policy(args.checkpoint, vlm_dir=args.vlm_dir, runtime=RuntimeConfig(device=args.device))
    result = run_replay(cfg, policy=policy)
    out = Path(args.out) if args.out else default_out(args.bag)
    paths = write_outputs(result, out, plots=not args.no_plots)
    rep = result.report
    print(f"replayed {rep['episode']['observations']} observations x {len(rep['settings'])} settings "
          f"from {args.bag}" + (" (recovered from an interrupted recording)" if rep["bag"]["recovered"] else ""))
    for s in rep["settings"]:
        dv = s["deviation_vs_baseline"]
        fr = s["flops_per_step"].get("fraction_of_baseline")
        frs = f"x{fr:.2f}" if fr is not None else "-"
        print(f"  {s['name']:<40} tokens kept {s['tokens']['kept_per_step']:.1f}/{s['tokens']['total_per_step']:.0f}"
              f"  FLOPs {frs}  nRMSE {dv['nrmse']:.4f}"
              f"  total p50 {s['latency_ms']['total']['p50']:.1f} ms")
    print(f"state: {rep['episode']['state']['rule']}")
    for w in rep.get("warnings", []):
        print(f"warning: {w}")
    print(f"report: {paths['md']} ({paths['json'].name}, plots in {out})", file=sys.stderr)
    if args.video:
        from effvla_ros.replay.video import render_replay_video

        v = render_replay_video(result, policy, out / f"replay.{args.video}", size=args.video_size)
        print(f"video: {v['path']} ({v['frames']} frames, settings {', '.join(v['settings'])})", file=sys.stderr)
    return 0
