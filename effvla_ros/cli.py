"""The ``effvla`` command: one entry point, one module per subcommand.

Each subcommand lives in ``effvla_ros.commands.<module>`` and provides
``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported only when their
subcommand runs, so ``effvla --help`` stays fast and a subcommand's heavy imports (torch, rclpy)
stay out of the others.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "infer": ("effvla_ros.commands.infer", "run a SmolVLA checkpoint on one observation file (offline)"),
    "demo": ("effvla_ros.commands.demo", "the closed-loop demo: simulation + the ROS 2 graph"),
    "run": ("effvla_ros.commands.run", "start the ROS 2 graph in one process (bringup without launch)"),
    "check-target": ("effvla_ros.commands.check_target", "estimate memory/compute of a config on a target"),
    "record": ("effvla_ros.commands.record", "record the pipeline's topics to a rosbag2 (MCAP)"),
    "replay": ("effvla_ros.commands.replay", "replay a rosbag offline under several settings and report"),
    "bag": ("effvla_ros.commands.bag", "rosbag2 tools: repair an interrupted recording, info"),
    "calibrate-exit": ("effvla_ros.commands.calibrate_exit", "calibrate early-exit thresholds to a YAML"),
    "gen-demos": ("effvla_ros.commands.gen_demos", "generate scripted demonstrations in simulation"),
    "train": ("effvla_ros.commands.train", "train a small SmolVLA-architecture policy on demonstrations"),
    "eval-sim": ("effvla_ros.commands.eval_sim", "success rate in simulation under several settings"),
    "train-correction": ("effvla_ros.commands.train_correction",
                         "per-step chunk correction head (A2C2) of a checkpoint, from demonstrations"),
    "calibrate-budget": ("effvla_ros.commands.calibrate_budget",
                         "latency-budget table: latency and action deviation per setting, on your bag"),
    "export": ("effvla_ros.commands.export", "export a checkpoint's stages to ONNX (+ TensorRT build scripts)"),
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--ros-args" in argv:  # started by launch_ros / ros2 run: ROS arguments are not ours
        argv = argv[: argv.index("--ros-args")]
    parser = argparse.ArgumentParser(prog="effvla", description="effvla_ros command-line tools")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.print_help()
        sys.exit(0 if not argv or argv[0] in ("-h", "--help") else 2)
    name = argv[0]
    module_name, help_ = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            print(f"effvla {name}: not available in this build ({module_name} is missing)", file=sys.stderr)
            sys.exit(2)
        raise
    sub_parser = argparse.ArgumentParser(prog=f"effvla {name}", description=help_)
    module.add_arguments(sub_parser)
    args = sub_parser.parse_args(argv[1:])
    try:
        code = module.run(args)
    except (ValueError, FileNotFoundError) as e:  # bad input or configuration: say what, no traceback
        print(f"effvla {name}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:
        if type(e).__name__ == "CheckpointError":
            print(f"effvla {name}: error: {e}", file=sys.stderr)
            sys.exit(2)
        raise
    sys.exit(code)


if __name__ == "__main__":
    main()
