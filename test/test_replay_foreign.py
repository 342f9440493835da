"""``effvla replay`` on bags written by other tools (issue 26).

The bags are written here by independent writers: the ``mcap`` + ``mcap-ros2-support`` packages (their
own CDR encoder, a rosbag2-style metadata.yaml written by hand) and ``rosbags`` for sqlite3. What a real
robot records: JointStates whose joints come in another order, with extra joints, with prefixed names,
with NaN; JPEG / PNG cameras (image_transport's ``<topic>/compressed``); files cut short; empty topics;
mono and resized images. Replay's actions must not depend on the joint order (0.0 difference, no option
given), a PNG camera must replay exactly as the raw one, a JPEG camera exactly as raw images holding the
JPEG-decoded pixels; every bad bag exits 2 with one line naming the cause.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import yaml

from effvla_ros.replay.observations import ObservationOptions
from effvla_ros.replay.pipeline import ReplayConfig, run_replay
from effvla_ros.replay.synthetic import frame_image

SO101 = ["shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper"]
CAMS = {"camera1": 10.0, "camera2": 5.0}
H, W = 48, 64
START = 100.0
DURATION = 1.0

# ROS 2 message definitions, written out by hand (mcap_ros2 encodes CDR from these)
TIME = "int32 sec\nuint32 nanosec"
HEADER = "builtin_interfaces/Time stamp\nstring frame_id"
SEP = "\n" + "=" * 80 + "\n"


def _def(main: str) -> str:
    return main + SEP + "MSG: std_msgs/Header\n" + HEADER + SEP + "MSG: builtin_interfaces/Time\n" + TIME


DEFS = {
    "sensor_msgs/msg/Image": _def("std_msgs/Header header\nuint32 height\nuint32 width\nstring encoding\n"
                                  "uint8 is_bigendian\nuint32 step\nuint8[] data"),
    "sensor_msgs/msg/CompressedImage": _def("std_msgs/Header header\nstring format\nuint8[] data"),
    "sensor_msgs/msg/JointState": _def("std_msgs/Header header\nstring[] name\nfloat64[] position\n"
                                       "float64[] velocity\nfloat64[] effort"),
    "std_msgs/msg/String": "string data",
}


def _stamp(t: float) -> dict[str, Any]:
    sec = int(np.floor(t))
    return {"sec": sec, "nanosec": int(round((t - sec) * 1e9)) % 1_000_000_000}


def positions(t: float) -> dict[str, float]:
    return {n: 0.2 * np.sin(0.7 * (t - START) + i) for i, n in enumerate(SO101)}


def episode(*, joints: list[str] | None = None, names: dict[str, str] | None = None, image: str = "raw",
            nan_every: int = 0, mono: bool = False, resize_after: float | None = None,
            jpeg_quality: int = 90, image_topics: bool = True) -> list[tuple[int, str, str, dict[str, Any]]]:
    """(log ns, topic, type, message dict): the same episode in several layouts.

    ``joints``: JointState name order (any of SO101 and extra joints); ``names``: renames (prefixes);
    ``image``: raw | jpeg | png | jpeg_decoded (raw images holding the pixels a JPEG decodes to) |
    depth (compressedDepth); ``nan_every``: every n-th JointState has NaN (n=1: all)."""
    joints = joints or list(SO101)
    names = names or {}
    out: list[tuple[int, str, str, dict[str, Any]]] = []
    for ci, (cam, rate) in enumerate(CAMS.items()):
        for k in range(int(DURATION * rate)):
            t = START + k / rate + 0.003 * ci
            h, w = (H, W) if resize_after is None or t - START < resize_after else (H // 2, W // 2)
            img = frame_image(t - START, h, w, ci)
            if mono:
                img = np.repeat(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)[..., None], 3, axis=2)
            hdr = {"stamp": _stamp(t), "frame_id": cam}
            log = int(round((t + 0.002) * 1e9))
            if image in ("jpeg", "png", "depth"):
                ext = ".png" if image in ("png", "depth") else ".jpg"
                params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality] if ext == ".jpg" else []
                src = img[..., 0] if mono else img[..., ::-1]  # OpenCV encodes BGR (or grey)
                ok, buf = cv2.imencode(ext, np.ascontiguousarray(src), params)
                assert ok
                fmt = {"jpeg": ("mono8" if mono else "rgb8") + "; jpeg compressed " + ("mono8" if mono else "bgr8"),
                       "png": "rgb8; png compressed bgr8", "depth": "16UC1; compressedDepth png"}[image]
                out.append((log, f"/camera/{cam}/image_raw/compressed", "sensor_msgs/msg/CompressedImage",
                            {"header": hdr, "format": fmt, "data": buf.tobytes()}))
            else:
                if image == "jpeg_decoded":
                    _, buf = cv2.imencode(".jpg", np.ascontiguousarray(img[..., ::-1]),
                                          [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
                    img = cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1]
                enc, data = ("mono8", img[..., 0]) if mono else ("rgb8", img)
                out.append((log, f"/camera/{cam}/image_raw", "sensor_msgs/msg/Image",
                            {"header": hdr, "height": h, "width": w, "encoding": enc, "is_bigendian": 0,
                             "step": w * (1 if mono else 3), "data": np.ascontiguousarray(data).tobytes()}))
    if not image_topics:
        out = []
    for k in range(int(DURATION * 20) + 1):
        t = START - 0.05 + k / 20
        pos = positions(t)
        vals = [pos.get(j, 0.5 + 0.1 * i) for i, j in enumerate(joints)]  # extra joints: some value
        if nan_every and k % nan_every == 0:
            vals[joints.index("elbow_flex")] = float("nan")
        out.append((int(round((t + 0.001) * 1e9)), "/joint_states", "sensor_msgs/msg/JointState",
                    {"header": {"stamp": _stamp(t), "frame_id": ""}, "name": [names.get(j, j) for j in joints],
                     "position": vals, "velocity": [0.0] * len(joints), "effort": []}))
    out.append((int((START - 0.2) * 1e9), "/instruction", "std_msgs/msg/String", {"data": "pick up the red cube"}))
    return sorted(out, key=lambda m: m[0])


def write_mcap(path: Path, msgs: list[tuple[int, str, str, dict[str, Any]]], *, chunk_size: int = 1 << 20,
               metadata: bool = True, empty_topics: tuple[tuple[str, str], ...] = ()) -> Path:
    """A rosbag2 directory written with mcap + mcap_ros2 (not rosbags): <dir>/<dir>_0.mcap + metadata.yaml."""
    from mcap_ros2.writer import Writer

    path.mkdir(parents=True)
    f = path / f"{path.name}_0.mcap"
    counts: dict[str, tuple[str, int]] = {}
    with open(f, "wb") as fh:
        w = Writer(fh, chunk_size=chunk_size)
        schemas: dict[str, Any] = {}
        for typ in {m[2] for m in msgs} | {t for _, t in empty_topics}:
            schemas[typ] = w.register_msgdef(typ, DEFS[typ])
        for topic, typ in empty_topics:  # a channel without messages
            w._writer.register_channel(topic=topic, message_encoding="cdr", schema_id=schemas[typ].id)
            counts[topic] = (typ, 0)
        for seq, (log, topic, typ, msg) in enumerate(msgs):
            w.write_message(topic, schemas[typ], msg, log_time=log, publish_time=log, sequence=seq)
            counts[topic] = (typ, counts.get(topic, (typ, 0))[1] + 1)
        w.finish()
    if metadata:
        logs = [m[0] for m in msgs] or [0]
        info = {"version": 9, "storage_identifier": "mcap", "relative_file_paths": [f.name],
                "duration": {"nanoseconds": max(logs) - min(logs)},
                "starting_time": {"nanoseconds_since_epoch": min(logs)}, "message_count": len(msgs),
                "topics_with_message_count": [
                    {"topic_metadata": {"name": t, "type": typ, "serialization_format": "cdr",
                                        "offered_qos_profiles": "", "type_description_hash": ""},
                     "message_count": n} for t, (typ, n) in sorted(counts.items())],
                "compression_format": "", "compression_mode": "",
                "files": [{"path": f.name, "starting_time": {"nanoseconds_since_epoch": min(logs)},
                           "duration": {"nanoseconds": max(logs) - min(logs)}, "message_count": len(msgs)}],
                "custom_data": {}, "ros_distro": "humble"}
        (path / "metadata.yaml").write_text(yaml.safe_dump({"rosbag2_bagfile_information": info}))
    return path


def write_sqlite3(path: Path, msgs: list[tuple[int, str, str, dict[str, Any]]]) -> Path:
    """A sqlite3 rosbag2 (what `ros2 bag record` writes by default on Humble), written with rosbags."""
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    ts = get_typestore(Stores.ROS2_HUMBLE)
    T, Hd = ts.types["builtin_interfaces/msg/Time"], ts.types["std_msgs/msg/Header"]

    def build(typ: str, m: dict[str, Any]) -> Any:
        m = dict(m)
        if "header" in m:
            m["header"] = Hd(stamp=T(**m["header"]["stamp"]), frame_id=m["header"]["frame_id"])
        for k in ("data",):
            if isinstance(m.get(k), bytes):
                m[k] = np.frombuffer(m[k], dtype=np.uint8)
        for k in ("position", "velocity", "effort"):
            if k in m:
                m[k] = np.asarray(m[k], dtype=np.float64)
        return ts.types[typ](**m)

    with Writer(path, version=8, storage_plugin=StoragePlugin.SQLITE3) as w:
        conns: dict[str, Any] = {}
        for log, topic, typ, msg in msgs:
            if topic not in conns:
                conns[topic] = w.add_connection(topic, typ, typestore=ts)
            w.write(conns[topic], log, ts.serialize_cdr(build(typ, msg), typ))
    return path


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):  # type: ignore[no-untyped-def]
    """One torch thread (conftest.py)."""


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model_fixtures import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def policy(ckpt: Path):  # type: ignore[no-untyped-def]
    from effvla_ros.core.smolvla import RuntimeConfig, load_policy

    return load_policy(str(ckpt), runtime=RuntimeConfig())


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("foreign")


def replay(bag: Path, ckpt: Path, policy: Any, **obs: Any) -> Any:
    """Baseline actions of a bag, no option but those given (frames mode: every camera2 frame)."""
    return run_replay(ReplayConfig(bag=str(bag), checkpoint=str(ckpt), flops="off", progress=False, num_steps=2,
                                   observations=ObservationOptions(mode="frames", **obs)), policy=policy)


def cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from effvla_ros.cli import main

    with pytest.raises(SystemExit) as e:
        main(args)
    out = capsys.readouterr()
    return int(e.value.code or 0), out.out, out.err


def assert_error(args: list[str], capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    code, _out, err = cli(args, capsys)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------------------------------ joint names
def test_joint_order_and_extra_joints_do_not_change_actions(d: Path, ckpt: Path, policy: Any) -> None:
    """Names are the contract: any order, extra joints, MCAP or sqlite3: the same actions (0.0 difference),
    with no option given (the names come from config/base.yaml's policy state_joint_names here; the tiny
    checkpoint declares none)."""
    canon = replay(write_mcap(d / "canon", episode()), ckpt, policy)
    assert canon.report["episode"]["state"]["joint_names"] == SO101
    assert canon.report["checkpoint"]["action_names"] == SO101  # plots and reports use the real names
    a0 = canon.runs[0].actions
    assert canon.report["episode"]["observations"] == 5
    layouts = {
        "alphabetical": sorted(SO101),
        "extra_first": ["wheel_left", "camera_tilt", "gripper", "wrist_roll", "elbow_flex", "shoulder_pan",
                        "wrist_flex", "shoulder_lift", "wheel_right"],
    }
    for name, joints in layouts.items():
        for storage in ("mcap", "sqlite3"):
            msgs = episode(joints=joints)
            bag = (write_mcap(d / f"{name}_{storage}", msgs) if storage == "mcap"
                   else write_sqlite3(d / f"{name}_{storage}", msgs))
            res = replay(bag, ckpt, policy)
            diff = float(np.max(np.abs(res.runs[0].actions - a0)))
            print(f"{name} ({storage}): max |delta action| vs canonical order = {diff}")
            assert diff == 0.0, (name, storage, diff)
            assert res.report["bag"]["storage"] == storage


def test_checkpoint_declared_names_win(d: Path, tmp_path: Path, policy: Any) -> None:
    """A checkpoint that declares its joints (joint_names.json) is read by those names: here a robot whose
    joints are j0..j5, in reverse order in the bag."""
    import shutil

    from model_fixtures import write_tiny_checkpoint

    ck = write_tiny_checkpoint(tmp_path / "declared")
    jn = [f"j{i}" for i in range(6)]
    (ck / "joint_names.json").write_text(json.dumps({"state": jn, "action": jn}))
    ren = dict(zip(SO101, jn))
    a = replay(write_mcap(tmp_path / "fwd", episode(names=ren)), ck, policy)
    b = replay(write_mcap(tmp_path / "rev", episode(joints=SO101[::-1], names=ren)), ck, policy)
    assert a.report["episode"]["state"]["source"] == "declared by the checkpoint"
    assert a.report["checkpoint"]["action_names"] == jn
    assert np.array_equal(a.runs[0].actions, b.runs[0].actions)
    shutil.rmtree(tmp_path / "fwd")


def test_prefixed_names_need_a_map_and_say_so(d: Path, ckpt: Path, policy: Any,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    pre = {j: f"so101_{j}" for j in SO101}
    bag = write_mcap(d / "prefixed", episode(joints=sorted(SO101), names=pre))
    line = assert_error(["replay", str(bag), "--checkpoint", str(ckpt), "--quiet"], capsys,
                        "lack joints ['shoulder_pan', 'shoulder_lift', 'elbow_flex', 'wrist_flex', 'wrist_roll', "
                        "'gripper']", "so101_elbow_flex", "--joint-map")
    print(line)
    canon = replay(write_mcap(d / "canon_p", episode()), ckpt, policy).runs[0].actions
    for jm in ({"so101_*": ""}, {f"so101_{j}": j for j in SO101}):
        res = replay(bag, ckpt, policy, joint_map=jm)
        assert float(np.max(np.abs(res.runs[0].actions - canon))) == 0.0
    # the position fallback only when asked for: the bag's order (alphabetical) is then taken as is
    res = replay(bag, ckpt, policy, state_by_position=True)
    assert res.report["episode"]["state"]["by_position"]
    assert float(np.max(np.abs(res.runs[0].actions - canon))) > 0.0


# ------------------------------------------------------------------------------------------ cameras
def test_png_and_jpeg_cameras(d: Path, ckpt: Path, policy: Any) -> None:
    raw = replay(write_mcap(d / "raw", episode()), ckpt, policy)
    png = replay(write_mcap(d / "png", episode(image="png")), ckpt, policy)
    jpeg = replay(write_mcap(d / "jpeg", episode(image="jpeg")), ckpt, policy)
    jpeg_px = replay(write_mcap(d / "jpeg_px", episode(image="jpeg_decoded")), ckpt, policy)
    assert png.report["episode"]["camera_topics"] == {"camera1": "/camera/camera1/image_raw/compressed",
                                                      "camera2": "/camera/camera2/image_raw/compressed"}
    assert set(jpeg.report["episode"]["image_types"].values()) == {"sensor_msgs/msg/CompressedImage"}
    a_raw = raw.runs[0].actions
    assert float(np.max(np.abs(png.runs[0].actions - a_raw))) == 0.0  # PNG is lossless
    # JPEG replays exactly as raw images holding the JPEG round trip's pixels...
    assert float(np.max(np.abs(jpeg.runs[0].actions - jpeg_px.runs[0].actions))) == 0.0
    # ...so its difference to the raw bag is the JPEG round trip's (reported, not zero: JPEG is lossy)
    img = frame_image(0.3, H, W, 0)
    _, buf = cv2.imencode(".jpg", np.ascontiguousarray(img[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 90])
    px_err = np.abs(cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1].astype(int) - img.astype(int))
    delta = float(np.max(np.abs(jpeg.runs[0].actions - a_raw)))
    std = float(np.min(jpeg.report["checkpoint"]["action_std"]))
    print(f"JPEG q90 vs raw: max |delta action| = {delta:.6f} rad (action std {std}), JPEG pixel error "
          f"mean {px_err.mean():.2f} max {px_err.max()} of 255, nRMSE vs raw "
          f"{float(np.sqrt(np.mean(((jpeg.runs[0].actions - a_raw) / std) ** 2))):.5f}")
    assert 0.0 < delta < std


def test_mono_and_size_change_are_warned(d: Path, ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bag = write_mcap(d / "mono_resize", episode(mono=True, resize_after=0.5))
    out = d / "mono_resize_out"
    code, stdout, err = cli(["replay", str(bag), "--checkpoint", str(ckpt), "--quiet", "--no-plots",
                             "--num-steps", "2", "--flops", "off", "--observations", "frames", "--out", str(out)],
                            capsys)
    assert code == 0, err
    warnings = [ln for ln in stdout.splitlines() if ln.startswith("warning: ")]
    assert any("single-channel (mono) images fed to a colour policy" in w for w in warnings), stdout
    assert any("image size changes within the stream: 64x48" in w and "32x24" in w for w in warnings), stdout
    md = (out / "report.md").read_text()
    assert "**Warnings:**" in md and "colour policy" in md and "size changes" in md
    rep = json.loads((out / "report.json").read_text())
    assert len(rep["warnings"]) == 4  # 2 cameras x (mono, size change)


def test_nan_states(d: Path, ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    some = write_mcap(d / "nan_some", episode(nan_every=4))
    out = d / "nan_some_out"
    code, stdout, err = cli(["replay", str(some), "--checkpoint", str(ckpt), "--quiet", "--no-plots", "--num-steps",
                             "2", "--flops", "off", "--observations", "frames", "--state-stamp-tolerance", "0",
                             "--out", str(out)], capsys)
    assert code == 0, err
    assert "warning: 6 of 21 JointStates on /joint_states dropped: 6 nan" in stdout, stdout
    rep = json.loads((out / "report.json").read_text())
    assert rep["episode"]["dropped"]["joint_states"] == {"nan": 6}
    assert "6 nan" in (out / "report.md").read_text()
    allnan = write_mcap(d / "nan_all", episode(nan_every=1))
    assert_error(["replay", str(allnan), "--checkpoint", str(ckpt)], capsys,
                 "all 21 JointStates on /joint_states contain NaN positions", "elbow_flex")


# ------------------------------------------------------------------------------------------ bad bags
def test_bad_bags_exit_2_naming_the_cause(d: Path, ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # a one-chunk MCAP cut short: nothing complete before the cut
    one = write_mcap(d / "onechunk", episode())
    f = one / "onechunk_0.mcap"
    data = f.read_bytes()
    cut = d / "cut.mcap"
    cut.write_bytes(data[: len(data) * 2 // 3])
    line = assert_error(["replay", str(cut), "--checkpoint", str(ckpt)], capsys, "truncated",
                        f"truncated: the file ends at byte {len(data) * 2 // 3}, inside a record of")
    print(line)
    # the same inside its directory (metadata.yaml says more than the file holds)
    f.write_bytes(data[: len(data) * 2 // 3])
    assert_error(["replay", str(one), "--checkpoint", str(ckpt)], capsys, "truncated")
    # image topics declared but without messages
    empty = write_mcap(d / "empty_imgs", episode(image_topics=False),
                       empty_topics=(("/camera/camera1/image_raw", "sensor_msgs/msg/Image"),
                                     ("/camera/camera2/image_raw", "sensor_msgs/msg/Image")))
    assert_error(["replay", str(empty), "--checkpoint", str(ckpt)], capsys,
                 "image topics /camera/camera1/image_raw [sensor_msgs/msg/Image], /camera/camera2/image_raw "
                 "[sensor_msgs/msg/Image] have no messages")
    # compressedDepth is not a camera image
    depth = write_mcap(d / "depth", episode(image="depth"))
    assert_error(["replay", str(depth), "--checkpoint", str(ckpt)], capsys, "compressedDepth")
    # no camera at all
    none = write_mcap(d / "nocam", episode(image_topics=False))
    assert_error(["replay", str(none), "--checkpoint", str(ckpt)], capsys,
                 "no camera topic (sensor_msgs/msg/Image or sensor_msgs/msg/CompressedImage)")


def test_default_out_is_next_to_the_bag(d: Path, ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from effvla_ros.commands.replay import default_out

    bag = write_mcap(d / "outloc", episode())
    assert default_out(str(bag)) == d / "outloc_replay"
    assert default_out(str(bag) + "/") == d / "outloc_replay"
    assert default_out(str(bag / "outloc_0.mcap")) == d / "outloc_replay"  # never inside the bag directory
    loose = d / "loose.mcap"
    loose.write_bytes((bag / "outloc_0.mcap").read_bytes())
    assert default_out(str(loose)) == d / "loose_replay"
    code, _out, err = cli(["replay", str(bag / "outloc_0.mcap"), "--checkpoint", str(ckpt), "--quiet", "--no-plots",
                           "--num-steps", "2", "--flops", "off", "--max-steps", "2"], capsys)
    assert code == 0, err
    assert (d / "outloc_replay" / "report.json").is_file()
    assert sorted(p.name for p in bag.iterdir()) == ["metadata.yaml", "outloc_0.mcap"]
