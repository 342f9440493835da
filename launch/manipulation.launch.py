"""Launch the effvla_ros manipulation pipeline on a real ROS 2 system (Humble, Jazzy, Kilted).

    ros2 launch effvla_ros manipulation.launch.py target:=orin_nano_8gb checkpoint:=/path/to/ckpt

The nodes, parameter-file layering and remappings come from ``effvla_ros.graph.describe_graph``,
the same description ``effvla run`` uses (so the wiring is tested without ``launch``).

Every node is required: when one exits (a node refused to start: bad parameter, missing checkpoint,
``device: cuda`` without CUDA; or it died), the whole launch shuts down (``on_exit``), so the robot
never runs half a graph. Ctrl-C: each node exits 0 without a traceback, also on the second SIGINT that
launch forwards after the terminal's.
"""
from __future__ import annotations

from pathlib import Path

from launch.actions import DeclareLaunchArgument, OpaqueFunction, Shutdown
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

from effvla_ros.graph import DEFAULT_CAMERAS, DEFAULT_CONTROLLER, DEFAULT_TARGET, PACKAGE, TARGETS, describe_graph
from launch import LaunchDescription

ARGUMENTS = [
    ("target", DEFAULT_TARGET, "hardware target: selects config/targets/<target>.yaml", list(TARGETS)),
    ("checkpoint", "", "local LeRobot SmolVLA checkpoint directory (empty: the parameter files' value)", None),
    ("params_file", "", "your own parameter YAML, applied over the target's (empty: none)", None),
    ("namespace", "", "namespace of every node and relative topic", None),
    ("cameras", ",".join(DEFAULT_CAMERAS), "comma-separated camera names (topics camera/<name>/image_raw)", None),
    ("controller", DEFAULT_CONTROLLER, "joint_trajectory_controller name: commands go to /<controller>/joint_trajectory",
     None),
    ("use_sim_time", "auto", "use /clock (auto: true when sim is true)", ["auto", "true", "false"]),
    ("log_level", "info", "log level of every node", ["debug", "info", "warn", "error", "fatal"]),
    ("composition", "false", "true: all nodes in one process (effvla run), false: one process per node",
     ["true", "false"]),
    ("sim", "false", "true: start the SO-101 MuJoCo simulation instead of real cameras/controller", ["true", "false"]),
]


def _setup(context, *_, **__):  # type: ignore[no-untyped-def]
    a = {name: LaunchConfiguration(name).perform(context) for name, *_ in ARGUMENTS}
    sim = a["sim"] == "true"
    use_sim_time = sim if a["use_sim_time"] == "auto" else a["use_sim_time"] == "true"
    cameras = [c.strip() for c in a["cameras"].split(",") if c.strip()]
    share = Path(FindPackageShare(PACKAGE).perform(context))
    graph = describe_graph(
        a["target"], sim=sim, cameras=cameras, controller=a["controller"], namespace=a["namespace"],
        checkpoint=a["checkpoint"] or None, params_file=a["params_file"] or None, use_sim_time=use_sim_time,
        single_process=a["composition"] == "true", root=share,
    )
    if graph.single_process:
        argv = ["run", "--target", a["target"], "--cameras", ",".join(cameras), "--controller", a["controller"],
                "--log-level", a["log_level"], "--use-sim-time", "true" if use_sim_time else "false"]
        for flag, key in (("--checkpoint", "checkpoint"), ("--params-file", "params_file"),
                          ("--namespace", "namespace")):
            if a[key]:
                argv += [flag, a[key]]
        if sim:
            argv.append("--sim")
        # no name/parameters here: `effvla run` gives every node its own --ros-args from the graph
        return [Node(package=PACKAGE, executable="effvla", arguments=argv, output="screen",
                     on_exit=_shutdown("effvla run (composition)"))]
    return [
        Node(
            package=PACKAGE,
            executable=spec.executable,
            name=spec.name,
            namespace=graph.namespace,
            parameters=[*(str(f) for f in graph.params_files), dict(graph.overrides)],
            remappings=list(spec.remappings),
            arguments=["--ros-args", "--log-level", a["log_level"]],
            output="screen",
            emulate_tty=True,
            on_exit=_shutdown(spec.name),
        )
        for spec in graph.nodes
    ]


def _shutdown(name: str) -> list[Shutdown]:
    """End the whole launch when the required process ``name`` exits (never half a graph)."""
    return [Shutdown(reason=f"{name} exited (a required node); see its log above")]


def generate_launch_description() -> LaunchDescription:
    declared = []
    for name, default, description, choices in ARGUMENTS:
        kw = {"choices": choices} if choices else {}
        declared.append(DeclareLaunchArgument(name, default_value=default, description=description, **kw))
    return LaunchDescription([*declared, OpaqueFunction(function=_setup)])
