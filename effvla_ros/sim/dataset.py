"""Scripted demonstrations of the two-cube task: generation and the on-disk format.

Format (``effvla-sim-demos`` version 1)
---------------------------------------
A dataset is a directory::

    DIR/index.json
    DIR/episodes/episode_000000.npz
    DIR/episodes/episode_000001.npz
    ...

Each episode file is a compressed NumPy archive (``numpy.savez_compressed``, no pickled objects;
read with ``numpy.load(path)``). Frames are recorded at the expert's control rate, **10 Hz**
(``control_dt`` = 0.1 s, the period ``lerobot_env_so101``'s scripted ``PickPlaceController`` is
calibrated for). Frame ``t`` holds the observation *before* the action of step ``t`` and the action
chosen from it. With ``T`` frames and image size ``S``:

==============================  =================  =========  ===========================================
key                             shape              dtype      meaning
==============================  =================  =========  ===========================================
``observation.images.scene``    (T, S, S, 3)       uint8      RGB, fixed third-person camera ``scene``
``observation.images.wrist``    (T, S, S, 3)       uint8      RGB, camera on the wrist-roll link
``observation.state``           (T, 6)             float32    measured joint positions, rad, order
                                                              ``joint_names`` (5 arm joints + gripper)
``action``                      (T, 6)             float32    absolute joint **position targets**, rad,
                                                              same order; applied from frame t to t+1
                                                              (the IK output of the expert's Cartesian
                                                              action, incl. the gripper jaw angle)
``timestamp``                   (T,)               float32    seconds since the episode start (t * 0.1)
``frame_index``                 (T,)               int64      0 .. T-1
``next.success``                (T,)               bool       task success reached after frame t's action
                                                              (latched)
``env.cube_positions``          (T, 2, 3)          float32    centres of cube 0 / cube 1, metres
``task``                        ()                 <U         the instruction (a 0-d unicode array)
``perturbed``                   (T,)               bool       frame t's executed action was the expert's
                                                              plus a perturbation (see below); ``action``
                                                              is the expert's own, unperturbed target
``failed_grasp``                (T,)               bool       frame t belongs to a deliberately failed
                                                              first grasp (``--regrasp``, see below): not
                                                              a demonstration, never trained on (absent
                                                              in older datasets: all False)
==============================  =================  =========  ===========================================

**Perturbed demonstrations** (``--perturb``, DART: Laskey et al., "DART: Noise Injection for Robust
Imitation Learning", CoRL 2017). Behaviour cloning on the expert's own trajectories never shows how
to recover from a miss. With a :class:`Perturbation`, short segments of the free-space phases
(``HOVER``, ``TRAVERSE``) execute the expert's Cartesian action plus a constant random offset, so
the arm drifts off the expert's path; every frame is still labelled with the expert's own action
from the state actually reached (for a perturbed step: the IK target of the unperturbed action,
computed on a saved copy of the physics state, which is then restored). The expert corrects the
drift on the next steps, and those corrections are what the policy learns. Episodes are
deterministic per seed, perturbations included.

**Re-grasp demonstrations** (``--regrasp``). The expert never fails a grasp, so a policy trained on its
demonstrations has never seen what to do after one: its jaws closed beside or on top of the cube and
it lifts nothing. With a :class:`Regrasp`, the expert first approaches a fixed point
``magnitude_min``..``magnitude_max`` metres off the cube's initial centre in a random horizontal
direction, which misses the cube. Once the jaw point has risen ``detect_rise`` in the ``LIFT`` phase
and the cube has not risen ``min_cube_rise``, or the descent has stalled on the cube for
``stuck_steps`` steps, a fresh expert takes over from that state: it
opens the jaws, hovers over the cube again, grasps it at the centre and completes the task. The
frames of the failed attempt are marked ``failed_grasp`` and are excluded from training (their labels
steer to a wrong point); every later frame is an ordinary demonstration that starts from a failed
grasp. An episode whose off-centre grasp lifted the cube anyway is discarded (not a failed grasp).

Only cameras that were rendered are present (``cameras`` in the index). The gripper value is the
MuJoCo jaw angle in radians (``-0.1745`` closed … ``1.7453`` open), the same unit the
``sim_bridge`` node takes in a ``JointTrajectory`` and reports in ``/joint_states``.

``index.json`` holds ``format``, ``version``, ``fps``, ``control_dt``, ``physics_dt``,
``image_size``, ``cameras``, ``joint_names``, a ``features`` table (key → shape, dtype, meaning),
``generator`` (base seed, expert, package versions, mesh decimation) and ``episodes``: a list of
``{"index", "file", "seed", "instruction", "target_color", "place", "cube_colors", "success",
"length", "duration_s"}``, plus ``stats`` (attempts, successes, expert success rate, wall seconds
per episode and worker, total wall seconds). By default only successful episodes are kept; their
seeds are the base seed plus the attempt number, so every episode can be regenerated from its seed.
Generation is deterministic: the same arguments give identical arrays, with any number of worker
processes.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "effvla-sim-demos"
VERSION = 1

FEATURES: dict[str, str] = {
    "observation.images.<camera>": "uint8 (T, S, S, 3) RGB image of <camera>",
    "observation.state": "float32 (T, 6) measured joint positions [rad], joint_names order",
    "action": "float32 (T, 6) absolute joint position targets [rad], applied from frame t to t+1",
    "timestamp": "float32 (T,) seconds since episode start",
    "frame_index": "int64 (T,)",
    "next.success": "bool (T,) success reached after frame t's action (latched)",
    "env.cube_positions": "float32 (T, 2, 3) cube centres [m]",
    "task": "0-d unicode: the instruction",
    "perturbed": "bool (T,) the executed action was the expert's plus a DART perturbation (action = expert's)",
    "failed_grasp": "bool (T,) frame of a deliberately failed first grasp (--regrasp): not trained on",
}


@dataclasses.dataclass(frozen=True)
class Perturbation:
    """DART-style perturbation of the expert's free-space motion (see the module docstring).

    At each step of a ``HOVER`` or ``TRAVERSE`` phase without a running segment, a segment starts with
    probability ``prob`` (at most ``max_segments`` per episode): for ``steps_min``..``steps_max``
    steps the executed Cartesian action is the expert's plus a constant offset of ``magnitude_min``..
    ``magnitude_max`` action units (``DEFAULT_ACTION_SCALE`` = 2.5 cm per unit and step) in a random
    horizontal direction. Random numbers come from the episode's seed.
    """

    prob: float = 0.2
    steps_min: int = 2
    steps_max: int = 4
    magnitude_min: float = 0.3
    magnitude_max: float = 0.8
    max_segments: int = 2

    def __post_init__(self) -> None:
        if not 0.0 <= self.prob <= 1.0:
            raise ValueError(f"prob: must be in [0, 1], got {self.prob}")
        if not 1 <= self.steps_min <= self.steps_max:
            raise ValueError(f"steps_min/steps_max: need 1 <= steps_min <= steps_max, got {self.steps_min}, {self.steps_max}")
        if not 0.0 <= self.magnitude_min <= self.magnitude_max:
            raise ValueError(
                f"magnitude_min/magnitude_max: need 0 <= min <= max, got {self.magnitude_min}, {self.magnitude_max}"
            )
        if self.max_segments < 0:
            raise ValueError(f"max_segments: must be >= 0, got {self.max_segments}")


@dataclasses.dataclass(frozen=True)
class Regrasp:
    """A deliberately failed first grasp followed by the expert's recovery (see the module docstring).

    The first approach aims ``magnitude_min``..``magnitude_max`` metres off the cube's centre, in a random
    horizontal direction drawn from the episode's seed. The grasp is checked once the jaw point has risen
    ``detect_rise`` metres in the ``LIFT`` phase: it failed when the cube rose less than ``min_cube_rise``.
    A descent that gained less than 2 mm of depth over ``stuck_steps`` steps (a jaw sits on the cube) is
    abandoned the same way.
    """

    magnitude_min: float = 0.018
    magnitude_max: float = 0.03
    detect_rise: float = 0.015
    min_cube_rise: float = 0.008
    stuck_steps: int = 4

    def __post_init__(self) -> None:
        if not 0.0 < self.magnitude_min <= self.magnitude_max:
            raise ValueError(
                f"magnitude_min/magnitude_max: need 0 < min <= max, got {self.magnitude_min}, {self.magnitude_max}"
            )
        if not 0.0 < self.detect_rise <= 0.06:  # LIFT_HEIGHT of the expert
            raise ValueError(f"detect_rise: must be in (0, 0.06] m, got {self.detect_rise}")
        if not 0.0 < self.min_cube_rise < self.detect_rise:
            raise ValueError(f"min_cube_rise: must be in (0, detect_rise), got {self.min_cube_rise}")
        if self.stuck_steps < 1:
            raise ValueError(f"stuck_steps: must be >= 1, got {self.stuck_steps}")


_PERTURBED_PHASES = ("HOVER", "TRAVERSE")


def _expert_target_without_applying(env: Any, action: np.ndarray) -> np.ndarray:
    """The joint targets ``env.step(action)`` would set, leaving the simulation as it was."""
    import mujoco

    model, data = env._model, env._data
    # the whole mjData, derived quantities included (after mj_step they belong to the state before
    # the last integration: recomputing them with mj_forward would change the next IK solution)
    saved = mujoco.MjData(model)
    mujoco.mj_copyData(saved, model, data)
    target_ee, last_zero = env._target_ee_pos.copy(), env._last_action_was_zero
    env.apply_action(np.asarray(action, dtype=np.float64))
    q = env.joint_targets()
    mujoco.mj_copyData(data, model, saved)
    env._target_ee_pos, env._last_action_was_zero = target_ee, last_zero
    return np.asarray(q, dtype=np.float64)


def record_episode(
    env: Any, seed: int, *, max_steps: int = 200, render: bool = True, perturb: Perturbation | None = None,
    aim_offset: tuple[float, float] = (0.0, 0.0), regrasp: Regrasp | None = None,
) -> dict[str, np.ndarray]:
    """Run the scripted expert on the episode of ``seed`` and return its frames (keys as above).

    Recording stops when the expert has finished (retreated after releasing the cube), the target
    cube left the workspace, or after ``max_steps`` frames. ``perturb``: DART perturbations (labels
    stay the expert's own actions). ``aim_offset``: where the expert grasps relative to the cube's centre
    (``TwoCubePickPlaceEnv.expert_action``; ``effvla_ros.sim.env.GRASP_AIM_OFFSET``). ``regrasp``: a
    deliberately failed first grasp, then the recovery (:class:`Regrasp`); when the off-centre grasp
    lifts the cube anyway, recording stops there and the episode is not successful (discarded).
    """
    from lerobot_env_so101.scripted import PickPlaceController

    env.reset(seed=seed)
    ctrl = PickPlaceController()
    rng = np.random.default_rng([int(seed), 0xDA27])
    cams = list(env.config.cameras) if render else []
    images: dict[str, list[np.ndarray]] = {c: [] for c in cams}
    state, action, success, cubes, perturbed, failing = [], [], [], [], [], []
    seg_left, segments, offset = 0, 0, np.zeros(3)
    lift_from: tuple[float, float] | None = None  # (jaw point z, cube z) when the failing grasp's LIFT began
    target = env.task.target_cube
    wrong_point = None  # the failing approach aims at a fixed point off the cube's initial centre
    if regrasp is not None:
        ang = rng.uniform(0.0, 2.0 * np.pi)
        mag = rng.uniform(regrasp.magnitude_min, regrasp.magnitude_max)
        wrong_point = env.aim_point(env.cube_positions()[target], (aim_offset[0] + mag * np.cos(ang), aim_offset[1] + mag * np.sin(ang)))
    in_failed_grasp = regrasp is not None
    descent: list[float] = []  # jaw point z over the failing attempt's DESCEND steps
    for _ in range(max_steps):
        if in_failed_grasp and regrasp is not None:
            recover = False
            jaw_z, cube_z = float(env.ik_point_pos[2]), float(env.cube_positions()[target][2])
            if ctrl.phase.name == "DESCEND":
                descent.append(jaw_z)
                k = regrasp.stuck_steps
                recover = len(descent) > k and descent[-k - 1] - jaw_z < 0.002  # blocked: a jaw is on the cube
            elif ctrl.phase.name == "LIFT":
                if lift_from is None:
                    lift_from = (jaw_z, cube_z)
                if jaw_z - lift_from[0] >= regrasp.detect_rise:
                    if cube_z - lift_from[1] >= regrasp.min_cube_rise:
                        break  # the off-centre grasp held the cube: not a failed grasp, the episode is discarded
                    recover = True
            if recover:  # a fresh expert takes over from this state: open, hover, grasp at the centre
                ctrl, in_failed_grasp = PickPlaceController(), False
        for c in cams:
            images[c].append(env.render(c))
        state.append(env.joint_positions())
        cubes.append(env.cube_positions())
        failing.append(in_failed_grasp)
        if in_failed_grasp and wrong_point is not None and ctrl.phase.name in ("HOVER", "DESCEND"):
            a = ctrl.act(env.ik_point_pos, wrong_point, env.goal_pos())
        else:
            a = env.expert_action(ctrl, aim_offset)
        if perturb is not None:
            if ctrl.phase.name not in _PERTURBED_PHASES:
                seg_left = 0
            elif seg_left == 0 and segments < perturb.max_segments and rng.random() < perturb.prob:
                seg_left = int(rng.integers(perturb.steps_min, perturb.steps_max + 1))
                ang = rng.uniform(0.0, 2.0 * np.pi)
                mag = rng.uniform(perturb.magnitude_min, perturb.magnitude_max)
                offset = np.array([mag * np.cos(ang), mag * np.sin(ang), 0.0])
                segments += 1
        if perturb is not None and seg_left > 0:
            seg_left -= 1
            label = _expert_target_without_applying(env, a)
            executed = np.asarray(a, dtype=np.float64).copy()
            executed[:3] += offset
            _, _, terminated, _, _ = env.step(executed)
            action.append(label)
            perturbed.append(True)
        else:
            _, _, terminated, _, _ = env.step(a)
            action.append(env.joint_targets())
            perturbed.append(False)
        success.append(env.success)
        if ctrl.done or (terminated and not env.success):
            break
    t = len(state)
    out: dict[str, np.ndarray] = {f"observation.images.{c}": np.stack(images[c]).astype(np.uint8) for c in cams}
    out["observation.state"] = np.asarray(state, dtype=np.float32)
    out["action"] = np.asarray(action, dtype=np.float32)
    out["timestamp"] = (np.arange(t) * env.control_dt).astype(np.float32)
    out["frame_index"] = np.arange(t, dtype=np.int64)
    out["next.success"] = np.asarray(success, dtype=bool)
    out["env.cube_positions"] = np.asarray(cubes, dtype=np.float32)
    out["task"] = np.asarray(env.instruction)
    out["perturbed"] = np.asarray(perturbed, dtype=bool)
    out["failed_grasp"] = np.asarray(failing, dtype=bool)
    if regrasp is not None and (not len(failing) or failing[-1]):  # never recovered: not a re-grasp demo
        out["next.success"] = np.zeros(t, dtype=bool)
    return out


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for pkg in ("lerobot_env_so101", "mujoco"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:  # pragma: no cover
            out[pkg] = "unknown"
    return out


# -- generation (sequential or in worker processes) ------------------------------------------
_WORKER: dict[str, Any] = {}


def default_max_attempts(episodes: int, regrasp: bool = False) -> int:
    """Seeds :func:`generate` tries at most by default: ``2N + 10``, or ``4N + 10`` for re-grasp sets, where
    about 4 in 10 attempts are discarded because the off-centre grasp held the cube."""
    return (4 if regrasp else 2) * episodes + 10


def _make_env(cfg_dict: dict[str, Any], seed: int) -> Any:
    from effvla_ros.sim.env import SimConfig, TwoCubePickPlaceEnv

    return TwoCubePickPlaceEnv(SimConfig(**cfg_dict), seed=seed)


def _run_episode(env: Any, out_dir: Path, seed: int, max_steps: int, keep_failed: bool,
                 perturb: Perturbation | None = None, aim_offset: tuple[float, float] = (0.0, 0.0),
                 regrasp: Regrasp | None = None) -> dict[str, Any]:
    """Record one episode; write it to ``episodes/.seed_<seed>.npz`` if kept; return its index entry."""
    t0 = time.perf_counter()
    data = record_episode(env, seed, max_steps=max_steps, perturb=perturb, aim_offset=aim_offset, regrasp=regrasp)
    ok = bool(len(data["next.success"]) and data["next.success"][-1])
    tmp_name = None
    if ok or keep_failed:
        tmp_name = f"episodes/.seed_{seed}.npz"
        part = out_dir / (tmp_name + ".part.npz")
        np.savez_compressed(part, **data)  # type: ignore[arg-type]
        os.replace(part, out_dir / tmp_name)
    task = env.task
    return {
        "seed": seed,
        "instruction": task.instruction,
        "target_color": task.target_color,
        "place": task.place,
        "cube_colors": list(task.cube_colors),
        "success": ok,
        "length": int(len(data["action"])),
        "perturbed_frames": int(np.count_nonzero(data["perturbed"])),
        "failed_grasp_frames": int(np.count_nonzero(data["failed_grasp"])),
        "duration_s": float(len(data["action"]) * env.control_dt),
        "_tmp": tmp_name,
        "_wall_s": time.perf_counter() - t0,
    }


def _worker_init(cfg_dict: dict[str, Any], out_dir: str, max_steps: int, keep_failed: bool,
                 perturb: dict[str, Any] | None = None, aim_offset: tuple[float, float] = (0.0, 0.0),
                 regrasp: dict[str, Any] | None = None) -> None:
    os.environ.setdefault("MUJOCO_GL", "egl")
    _WORKER.update(env=_make_env(cfg_dict, 0), out_dir=Path(out_dir), max_steps=max_steps, keep_failed=keep_failed,
                   perturb=Perturbation(**perturb) if perturb is not None else None, aim_offset=aim_offset,
                   regrasp=Regrasp(**regrasp) if regrasp is not None else None)


def _worker_run(seed: int) -> dict[str, Any]:
    w = _WORKER
    return _run_episode(w["env"], w["out_dir"], seed, w["max_steps"], w["keep_failed"], w["perturb"], w["aim_offset"],
                        w["regrasp"])


def generate(
    out_dir: Path,
    episodes: int,
    *,
    image_size: int = 224,
    seed: int = 0,
    cameras: tuple[str, ...] = ("scene", "wrist"),
    max_steps: int = 200,
    keep_failed: bool = False,
    max_attempts: int | None = None,
    paraphrase: bool = True,
    mesh_faces: int | None = None,
    workers: int = 1,
    perturb: Perturbation | None = None,
    aim_offset: tuple[float, float] = (0.0, 0.0),
    regrasp: Regrasp | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Write ``episodes`` episodes (successful ones unless ``keep_failed``) to ``out_dir``; return the index.

    Seeds ``seed``, ``seed + 1``, ... are tried in order (in ``workers`` processes when > 1) until
    enough episodes are kept or ``max_attempts`` (default :func:`default_max_attempts`) were tried; the
    result does not depend on ``workers``. ``aim_offset``, ``regrasp``: see :func:`record_episode`.
    """
    from effvla_ros.sim import scene as scene_mod
    from effvla_ros.sim.env import JOINT_NAMES, SimConfig

    out_dir = Path(out_dir)
    (out_dir / "episodes").mkdir(parents=True, exist_ok=True)
    faces = scene_mod.DEFAULT_TARGET_FACES if mesh_faces is None else mesh_faces
    cfg = SimConfig(image_size=image_size, cameras=list(cameras), paraphrase=paraphrase, mesh_faces=faces)
    scene_mod.scene_xml(faces or None)  # build the mesh cache once, before any worker starts
    max_attempts = max_attempts if max_attempts is not None else default_max_attempts(episodes, regrasp is not None)
    perturb_dict = dataclasses.asdict(perturb) if perturb is not None else None
    regrasp_dict = dataclasses.asdict(regrasp) if regrasp is not None else None
    index: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "fps": 1.0 / cfg.control_dt,
        "control_dt": cfg.control_dt,
        "physics_dt": cfg.physics_dt,
        "image_size": image_size,
        "cameras": list(cameras),
        "joint_names": list(JOINT_NAMES),
        "features": FEATURES,
        "generator": {
            "base_seed": seed,
            "expert": "lerobot_env_so101.scripted.PickPlaceController",
            "paraphrase": paraphrase,
            "mesh_faces": faces,
            "scene_version": scene_mod.SCENE_VERSION,
            "max_steps": max_steps,
            "perturb": perturb_dict,
            "aim_offset": [float(aim_offset[0]), float(aim_offset[1])],
            "regrasp": regrasp_dict,
            "versions": _versions(),
        },
        "episodes": [],
    }
    seeds = range(seed, seed + max_attempts)
    attempts = successes = 0
    episode_wall = 0.0
    t0 = time.perf_counter()
    pool = env = None
    results: Iterable[dict[str, Any]]
    try:
        if workers > 1:
            import multiprocessing

            pool = multiprocessing.get_context("spawn").Pool(
                workers, initializer=_worker_init, initargs=(cfg.to_dict(), str(out_dir), max_steps, keep_failed, perturb_dict,
                          tuple(aim_offset), regrasp_dict)
            )
            results = pool.imap(_worker_run, seeds)
        else:
            env = _make_env(cfg.to_dict(), seed)
            results = (_run_episode(env, out_dir, s, max_steps, keep_failed, perturb, aim_offset, regrasp)
                       for s in seeds)
        for meta in results:
            attempts += 1
            successes += meta["success"]
            episode_wall += meta.pop("_wall_s")
            tmp = meta.pop("_tmp")
            if tmp is not None:
                i = len(index["episodes"])
                rel = f"episodes/episode_{i:06d}.npz"
                os.replace(out_dir / tmp, out_dir / rel)
                index["episodes"].append({"index": i, "file": rel, **meta})
            if progress is not None:
                progress({"attempts": attempts, "successes": successes, "kept": len(index["episodes"])})
            if len(index["episodes"]) >= episodes:
                break
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if env is not None:
            env.close()
        for leftover in (out_dir / "episodes").glob(".seed_*"):  # in flight when enough were kept
            leftover.unlink(missing_ok=True)
    wall = time.perf_counter() - t0
    index["stats"] = {
        "attempts": attempts,
        "successes": successes,
        "expert_success_rate": successes / attempts if attempts else 0.0,
        "kept": len(index["episodes"]),
        "workers": workers,
        "wall_s": wall,
        "seconds_per_episode": episode_wall / attempts if attempts else 0.0,
        "frames": int(sum(e["length"] for e in index["episodes"])),
    }
    tmp_index = out_dir / "index.json.tmp"
    tmp_index.write_text(json.dumps(index, indent=1))
    os.replace(tmp_index, out_dir / "index.json")
    return index


def load_index(root: Path) -> dict[str, Any]:
    index = json.loads((Path(root) / "index.json").read_text())
    if index.get("format") != FORMAT:
        raise ValueError(f"{root}: not an {FORMAT} dataset")
    return index


def load_episode(root: Path, i: int) -> dict[str, np.ndarray]:
    """All arrays of episode ``i`` (loaded eagerly)."""
    index = load_index(root)
    with np.load(Path(root) / index["episodes"][i]["file"]) as z:
        return {k: z[k] for k in z.files}


def iter_episodes(root: Path) -> Iterator[tuple[dict[str, Any], dict[str, np.ndarray]]]:
    """(index entry, arrays) of every episode."""
    index = load_index(root)
    for e in index["episodes"]:
        with np.load(Path(root) / e["file"]) as z:
            yield e, {k: z[k] for k in z.files}
