"""The effvla_ros ROS 2 graph, described once in plain Python.

``describe_graph(...)`` returns which nodes run, from which executable/module, with which layered
parameter files (``config/base.yaml`` < ``config/targets/<target>.yaml`` < ``config/sim.yaml`` with
``sim=True`` < the user's file < explicit overrides), which remappings, and whether they share one process. Both
``launch/manipulation.launch.py`` (real ROS 2 with launch_ros) and ``effvla run`` (single-process
bringup without ``launch``) build the graph from this description, so the wiring tested here is the
wiring users launch.

Topic layout (names relative to the namespace unless absolute)::

    camera/<cam>/image_raw ─► token_compressor ─► visual_tokens ─► policy ─► action_chunk ─► chunk_executor
    instruction ────────────► token_compressor, policy                    ▲                     │
    joint_states ───────────► policy, chunk_executor                      └─ execution_feedback ┘
    chunk_executor ─► /<controller>/joint_trajectory (ros2_control joint_trajectory_controller)
    camera/<cam>/image_raw (or all_visual_tokens), joint_states, action_chunk, execution_feedback ─► chunk_corrector
        ─► action_correction ─► chunk_executor       (per-step A2C2 corrections; idle unless correction.enabled)

With ``sim=True`` the SO-101 MuJoCo bridge provides the cameras, joint states, instruction and the
controller; otherwise the robot's drivers and ros2_control do.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "effvla_ros"
TARGETS = ("orin_nano_8gb", "orin_nx_16gb", "agx_orin_64gb", "agx_thor", "x86_cpu")
DEFAULT_TARGET = "x86_cpu"
DEFAULT_CAMERAS = ("scene", "wrist")
DEFAULT_CONTROLLER = "arm_controller"
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class NodeSpec:
    """One node of the graph."""

    name: str  # ROS node name
    executable: str  # `ros2 run effvla_ros <executable>` (installed in lib/effvla_ros)
    module: str  # Python module holding the Node class and main()
    node_class: str  # Node subclass, constructed with no positional arguments (single-process bringup)
    remappings: tuple[tuple[str, str], ...] = ()
    role: str = "pipeline"  # "pipeline" | "sim"


@dataclass(frozen=True)
class Graph:
    nodes: tuple[NodeSpec, ...]
    params_files: tuple[Path, ...]  # in increasing precedence
    overrides: dict[str, object] = field(default_factory=dict)  # applied to every node, highest precedence
    namespace: str = ""
    single_process: bool = False

    def node(self, name: str) -> NodeSpec:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def ros_args(self, spec: NodeSpec, log_level: str | None = None) -> list[str]:
        """``--ros-args`` for one node: parameter files, overrides, remappings, namespace."""
        args = ["--ros-args", "-r", f"__node:={spec.name}"]
        if self.namespace:
            args += ["-r", f"__ns:={self.namespace}"]
        for f in self.params_files:
            args += ["--params-file", str(f)]
        if self.overrides:
            # Not `-p`: rcl lets a node-specific file section beat `-p` (which applies to /**), so the
            # overrides go into a last file with node-specific sections, as launch_ros does.
            args += ["--params-file", str(self.overrides_file())]
        for src, dst in spec.remappings:
            args += ["-r", f"{src}:={dst}"]
        if log_level:
            args += ["--log-level", log_level]
        return args


    def overrides_file(self) -> Path:
        """A parameter file holding ``overrides`` for every node of the graph (written once)."""
        import hashlib
        import tempfile

        import yaml

        data = {f"/**/{n.name}": {"ros__parameters": dict(self.overrides)} for n in self.nodes}
        class _NoAliases(yaml.SafeDumper):  # rcl's YAML parser refuses anchors/aliases
            def ignore_aliases(self, data: object) -> bool:
                return True

        text = yaml.dump(data, Dumper=_NoAliases, sort_keys=True)
        d = Path(tempfile.gettempdir()) / "effvla_ros"
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"overrides-{hashlib.sha256(text.encode()).hexdigest()[:16]}.yaml"
        if not path.is_file():
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(text)
            tmp.replace(path)
        return path


def share_dir() -> Path:
    """The package's share directory: the installed one (colcon/apt) or, from a source checkout, the repo."""
    try:  # an installed package (ament index) wins
        from ament_index_python.packages import get_package_share_directory

        p = Path(get_package_share_directory(PACKAGE))
        if (p / "config" / "base.yaml").is_file():
            return p
    except Exception:  # noqa: BLE001 - not installed through ament: use the source tree
        pass
    return Path(__file__).resolve().parents[1]


DEFAULT_CHECKPOINT = "so101_pickplace_pruned"


def default_checkpoint() -> str | None:
    """The bundled default SO-101 simulation checkpoint, when present: ``effvla_ros/assets/so101_pickplace_pruned``,
    the policy trained here and fine-tuned for the default token compression (eval-sim, seeds 100000-100099:
    81/100 under it, 81/100 with every optimization off). Its sibling ``so101_pickplace`` (84/100 off) was trained
    on full prefixes only and loses the task under pruning (``config/sim_unpruned.yaml``)."""
    p = Path(__file__).resolve().parent / "assets" / DEFAULT_CHECKPOINT
    return str(p) if (p / "config.json").is_file() else None


def params_files(target: str, user_file: str | os.PathLike[str] | None = None, root: Path | None = None, *,
                 sim: bool = False) -> list[Path]:
    """Layered parameter files: base < target < sim (the simulated robot, with ``sim``) < user."""
    if target not in TARGETS:
        raise ValueError(f"target: {target!r} is not one of {list(TARGETS)}")
    root = root or share_dir()
    files = [root / "config" / "base.yaml", root / "config" / "targets" / f"{target}.yaml"]
    if sim:
        files.append(root / "config" / "sim.yaml")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"parameter file {f} is missing (package share dir {root})")
    if user_file:
        uf = Path(user_file).expanduser()
        if not uf.is_file():
            raise FileNotFoundError(f"params_file: {uf} does not exist")
        files.append(uf)
    return files


def describe_graph(
    target: str = DEFAULT_TARGET,
    *,
    sim: bool = False,
    cameras: tuple[str, ...] | list[str] = DEFAULT_CAMERAS,
    controller: str = DEFAULT_CONTROLLER,
    namespace: str = "",
    checkpoint: str | None = None,
    params_file: str | os.PathLike[str] | None = None,
    use_sim_time: bool | None = None,
    single_process: bool = False,
    root: Path | None = None,
) -> Graph:
    """The graph for one target. ``use_sim_time`` defaults to ``sim``."""
    cams = tuple(cameras)
    if not cams:
        raise ValueError("cameras: at least one camera is needed")
    for c in cams:
        if not _NAME_RE.match(c):
            raise ValueError(f"cameras: {c!r} is not a valid camera name (letters, digits, underscore)")
    if not _NAME_RE.match(controller):
        raise ValueError(f"controller: {controller!r} is not a valid controller name")
    ns = namespace.strip("/")
    if ns and not all(_NAME_RE.match(p) for p in ns.split("/")):
        raise ValueError(f"namespace: {namespace!r} is not a valid ROS namespace")

    nodes = [
        NodeSpec(
            "token_compressor", "token_compressor", "effvla_ros.nodes.token_compressor", "TokenCompressorNode",
            remappings=(("~/visual_tokens", "visual_tokens"), ("~/all_tokens", "all_visual_tokens")),
        ),
        NodeSpec(
            "policy", "policy", "effvla_ros.nodes.policy", "PolicyNode",
            remappings=(("~/visual_tokens", "visual_tokens"), ("~/action_chunk", "action_chunk"),
                        ("~/execution_feedback", "execution_feedback")),
        ),
        NodeSpec(
            "chunk_executor", "chunk_executor", "effvla_ros.nodes.chunk_executor", "ChunkExecutorNode",
            remappings=(("~/action_chunk", "action_chunk"), ("~/feedback", "execution_feedback"),
                        ("~/action_correction", "action_correction"),
                        ("~/joint_trajectory", f"/{controller}/joint_trajectory")),
        ),
        NodeSpec(  # idle unless correction.enabled (its parameter files say)
            "chunk_corrector", "chunk_corrector", "effvla_ros.nodes.chunk_corrector", "ChunkCorrectorNode",
            remappings=(("~/action_chunk", "action_chunk"), ("~/execution_feedback", "execution_feedback"),
                        ("~/action_correction", "action_correction"), ("~/all_tokens", "all_visual_tokens")),
        ),
    ]
    if sim:
        nodes.insert(0, NodeSpec("sim_bridge", "sim_bridge", "effvla_ros.nodes.sim_bridge", "SimBridge",
                                 role="sim"))
    overrides: dict[str, object] = {"use_sim_time": sim if use_sim_time is None else use_sim_time}
    ckpt = checkpoint or default_checkpoint()
    if ckpt:
        overrides["checkpoint"] = str(ckpt)
    overrides["cameras"] = list(cams)
    if sim:
        overrides["controller"] = controller
    return Graph(
        nodes=tuple(nodes),
        params_files=tuple(params_files(target, params_file, root, sim=sim)),
        overrides=overrides,
        namespace=ns,
        single_process=single_process,
    )
