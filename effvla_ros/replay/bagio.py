"""rosbag2 input/output with ``rosbags`` (pure Python: no rosbag2 / ``ros2 bag`` needed).

Reading (:func:`open_bag`) accepts

* a rosbag2 directory with ``metadata.yaml`` (MCAP or sqlite3, as written by ``ros2 bag record`` or
  by our recorder), read with ``rosbags``' reader;
* a rosbag2 directory *without* ``metadata.yaml`` (a recorder that was killed), or a bare
  ``.mcap`` / ``.db3`` file;
* an MCAP file that ends abruptly (no summary section, no footer: the recorder was killed with
  SIGKILL): ``rosbags`` refuses it, so it is read by :func:`scan_mcap`, a linear record scan that
  keeps every complete record and stops at the first incomplete (or corrupt) one. The bag is then
  marked ``recovered`` and the reason is in ``Bag.notes``.

Anything else raises :class:`BagError` (a ``ValueError``) saying what was expected.

Messages are decoded with a ``rosbags`` typestore: ROS 2 Kilted's standard types, effvla_ros'
messages from ``msg/*.msg``, plus every definition embedded in the bag.

Writing (:class:`McapBagWriter`) wraps ``rosbags``' rosbag2 writer (MCAP storage, CDR, message
definitions and RIHS01 type hashes embedded) for a writer that can die at any time: every
``flush()`` closes the pending MCAP chunk, flushes it to the OS, and rewrites ``metadata.yaml``
(atomic rename) with the counts of what is on disk. A SIGKILL therefore loses at most the messages
since the last flush; the file has no summary section, which readers that scan (``mcap``'s
fallback scan, :func:`scan_mcap`) handle.
"""
from __future__ import annotations

import io
import os
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MCAP_MAGIC = b"\x89MCAP0\r\n"
SQLITE_MAGIC = b"SQLite format 3\x00"

# Our own message package (registered in every typestore we build).
EFFVLA_PACKAGE = "effvla_ros"


class BagError(ValueError):
    """The path is not a (readable) rosbag2, or lacks what is needed; the message says what to do."""


@dataclass
class TopicInfo:
    topic: str
    msgtype: str
    count: int = 0
    msgdef_format: str = ""  # "ros2msg" | "ros2idl" | "" (none)
    msgdef: str = ""
    digest: str = ""
    qos: list[Any] = field(default_factory=list)  # offered QoS profiles (rosbags Qos) as recorded


# ------------------------------------------------------------------------------------------ types
def effvla_msg_dirs() -> list[Path]:
    """Directories holding effvla_ros' ``*.msg`` (installed share dir first, then the source tree)."""
    dirs: list[Path] = []
    for prefix in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep):
        if prefix:
            d = Path(prefix) / "share" / EFFVLA_PACKAGE / "msg"
            if d.is_dir():
                dirs.append(d)
    src = Path(__file__).resolve().parents[2] / "msg"
    if src.is_dir():
        dirs.append(src)
    return dirs


def _find_msg_file(msgtype: str) -> Path | None:
    """``pkg/msg/Name`` -> ``<prefix>/share/pkg/msg/Name.msg`` from the ament prefix path."""
    parts = msgtype.split("/")
    if len(parts) != 3:
        return None
    pkg, kind, name = parts
    dirs = [Path(p) / "share" / pkg / kind for p in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep) if p]
    if pkg == EFFVLA_PACKAGE:
        dirs += effvla_msg_dirs()
    for d in dirs:
        f = d / f"{name}.msg"
        if f.is_file():
            return f
    return None


def make_typestore() -> Any:
    """ROS 2 Kilted's standard message types plus effvla_ros' messages."""
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore

    ts = get_typestore(Stores.ROS2_KILTED)
    add: dict[str, Any] = {}
    for d in effvla_msg_dirs():
        for f in sorted(d.glob("*.msg")):
            name = f"{EFFVLA_PACKAGE}/msg/{f.stem}"
            if name not in add:
                add.update(get_types_from_msg(f.read_text(), name))
        if add:
            break
    if add:
        ts.register(add)
    return ts


def ensure_type(ts: Any, msgtype: str, _depth: int = 0) -> bool:
    """Make ``msgtype`` (and what it uses) known to ``ts`` from ``.msg`` files on the ament prefix path."""
    from rosbags.typesys import get_types_from_msg

    if msgtype in ts.fielddefs:
        return True
    if _depth > 20:
        return False
    f = _find_msg_file(msgtype)
    if f is None:
        return False
    typs = get_types_from_msg(f.read_text(), msgtype)
    for _, fields in typs.values():
        for _, desc in fields:
            for ref in _referenced(desc):
                if ref != msgtype and not ensure_type(ts, ref, _depth + 1):
                    return False
    try:
        ts.register(typs)
    except Exception:  # noqa: BLE001 - conflicting definition: not usable
        return False
    return msgtype in ts.fielddefs


def _referenced(desc: Any) -> list[str]:
    """Message type names referenced by a rosbags field descriptor (nested tuples)."""
    out: list[str] = []
    if isinstance(desc, tuple):
        for x in desc:
            if isinstance(x, str) and x.count("/") == 2:
                out.append(x)
            else:
                out.extend(_referenced(x))
    return out


def register_embedded(ts: Any, topics: Iterable[TopicInfo]) -> list[str]:
    """Register the bag's embedded definitions of types the typestore lacks; return notes."""
    from rosbags.typesys import get_types_from_idl, get_types_from_msg

    notes: list[str] = []
    for t in topics:
        if t.msgtype in ts.fielddefs or not t.msgdef:
            continue
        try:
            if t.msgdef_format == "ros2idl":
                typs: dict[str, Any] = {}
                sep = "=" * 80 + "\n"
                parts = t.msgdef.split(sep)[1:] if t.msgdef.startswith(sep + "IDL: ") else [t.msgdef]
                for part in parts:
                    typs.update(get_types_from_idl(part.split("\n", 1)[1] if part.startswith("IDL: ") else part))
            else:
                typs = get_types_from_msg(t.msgdef, t.msgtype)
            ts.register({k: v for k, v in typs.items() if k not in ts.fielddefs})
        except Exception as e:  # noqa: BLE001 - an unusable definition only matters if the topic is decoded
            notes.append(f"{t.topic}: embedded definition of {t.msgtype} not usable ({e})")
    return notes


def cdr_header_stamp_ns(raw: bytes | memoryview) -> int | None:
    """``header.stamp`` of a CDR message that starts with ``std_msgs/Header`` (without decoding it)."""
    if len(raw) < 12:
        return None
    little = raw[1] == 1
    sec, nsec = struct.unpack_from("<iI" if little else ">iI", raw, 4)
    return int(sec) * 1_000_000_000 + int(nsec)


# ------------------------------------------------------------------------------------------ MCAP scan
class _Truncated(Exception):
    pass


def _read(bio: Any, n: int) -> bytes:
    b = bio.read(n)
    if len(b) != n:
        raise _Truncated
    return bytes(b)


def _str(rec: io.BytesIO) -> str:
    (n,) = struct.unpack("<I", _read(rec, 4))
    return _read(rec, n).decode()


@dataclass
class McapScan:
    """What a linear scan of an MCAP file found."""

    schemas: dict[int, tuple[str, str, str]] = field(default_factory=dict)  # id -> (name, encoding, data)
    channels: dict[int, tuple[int, str, str, bytes]] = field(default_factory=dict)  # id -> (schema, topic, enc, meta)
    counts: dict[int, int] = field(default_factory=dict)
    complete: bool = False  # footer reached
    truncated_at: int | None = None  # byte offset of the first incomplete/corrupt record
    reason: str = ""


def iter_mcap(path: Path, out: McapScan) -> Iterator[tuple[str, int, bytes]]:
    """Linear scan of an MCAP file, tolerant of a missing summary/footer and of a cut-off tail.

    Yields (topic, log time ns, data) of every complete message in file order and fills ``out``
    (schemas, channels, counts, whether the footer was reached, where and why the scan stopped).
    """
    from rosbags.rosbag2.storage_mcap import decompress

    size = path.stat().st_size
    with open(path, "rb") as f:
        if f.read(8) != MCAP_MAGIC:
            raise BagError(f"{path}: not an MCAP file (bad magic)")

        def records(bio: Any, limit: int | None) -> Iterator[tuple[int, bytes, int]]:
            while limit is None or bio.tell() < limit:
                pos = bio.tell()
                op = bio.read(1)
                if not op:
                    return
                n = -1
                try:
                    (n,) = struct.unpack("<Q", _read(bio, 8))
                    body = _read(bio, n)
                except _Truncated:
                    raise _Truncated(pos, n) from None
                yield op[0], body, pos

        def handle(op: int, body: bytes) -> tuple[str, int, bytes] | None:
            rec = io.BytesIO(body)
            if op == 0x03:
                (sid,) = struct.unpack("<H", _read(rec, 2))
                name, enc = _str(rec), _str(rec)
                (n,) = struct.unpack("<I", _read(rec, 4))
                out.schemas[sid] = (name, enc, _read(rec, n).decode(errors="replace"))
            elif op == 0x04:
                cid, sid = struct.unpack("<HH", _read(rec, 4))
                topic, enc = _str(rec), _str(rec)
                (n,) = struct.unpack("<I", _read(rec, 4))
                out.channels[cid] = (sid, topic, enc, _read(rec, n))
            elif op == 0x05:
                cid, _seq, log_time, _pub = struct.unpack("<HIQQ", _read(rec, 22))
                out.counts[cid] = out.counts.get(cid, 0) + 1
                ch = out.channels.get(cid)
                return (ch[1] if ch else "", int(log_time), body[22:])
            return None

        try:
            for op, body, pos in records(f, None):
                if op == 0x02:  # footer
                    out.complete = True
                    break
                if op == 0x06:
                    rec = io.BytesIO(body)
                    _s, _e, usize, crc = struct.unpack("<QQQI", _read(rec, 28))
                    comp = _str(rec)
                    (csize,) = struct.unpack("<Q", _read(rec, 8))
                    try:
                        raw = decompress(_read(rec, csize), comp, usize, crc)
                    except Exception as e:  # noqa: BLE001 - corrupt chunk: stop here
                        out.truncated_at, out.reason = pos, f"corrupt chunk at byte {pos}: {e}"
                        break
                    for iop, ibody, _ in records(io.BytesIO(raw), len(raw)):
                        m = handle(iop, ibody)
                        if m is not None:
                            yield m
                else:
                    m = handle(op, body)
                    if m is not None:
                        yield m
        except _Truncated as e:
            out.truncated_at = int(e.args[0]) if e.args else None
            rec_len = int(e.args[1]) if len(e.args) > 1 else -1
            what = (f"a record of {rec_len + 9} bytes starting at byte {out.truncated_at}" if rec_len >= 0
                    else f"the record starting at byte {out.truncated_at}")
            out.reason = (f"truncated: the file ends at byte {size}, inside {what}; the {out.truncated_at} bytes "
                          "before it were read (recording was interrupted)")
    if not out.complete and not out.reason:
        out.reason = f"no MCAP footer: all {size} bytes read, the summary is missing (recording was interrupted)"


def scan_mcap(path: Path) -> McapScan:
    """Scan a whole MCAP file (see :func:`iter_mcap`) for its topics and counts."""
    out = McapScan()
    for _ in iter_mcap(path, out):
        pass
    return out


# ------------------------------------------------------------------------------------------ reading
@dataclass
class _Source:
    path: Path
    kind: str  # "rosbags" (directory or file read by rosbags) | "scan" (MCAP linear scan)


@dataclass
class Bag:
    """An opened rosbag2 (see the module docstring for what is accepted)."""

    path: Path
    storage: str  # "mcap" | "sqlite3"
    topics: dict[str, TopicInfo]
    sources: list[_Source]
    typestore: Any
    recovered: bool = False
    notes: list[str] = field(default_factory=list)
    has_metadata: bool = False

    @property
    def message_count(self) -> int:
        return sum(t.count for t in self.topics.values())

    def topics_of_type(self, *msgtypes: str) -> list[str]:
        return sorted(t.topic for t in self.topics.values() if t.msgtype in msgtypes)

    def messages(self, topics: Iterable[str] | None = None) -> Iterator[tuple[str, int, bytes]]:
        """(topic, log time ns, CDR bytes) for the selected topics, in storage order per source."""
        want = set(topics) if topics is not None else None
        for src in self.sources:
            if src.kind == "scan":
                yield from _scan_messages(src.path, want)
            else:
                from rosbags.rosbag2 import Reader

                try:
                    with Reader(src.path) as reader:
                        conns = [c for c in reader.connections if want is None or c.topic in want]
                        if not conns:
                            continue
                        for conn, ts, raw in reader.messages(connections=conns):
                            yield conn.topic, int(ts), raw
                except (BagError, GeneratorExit):
                    raise
                except Exception as e:  # noqa: BLE001 - a corrupt storage file: one line naming it
                    raise BagError(f"{src.path}: reading the messages failed ({type(e).__name__}: {e})") from None

    def decode(self, topic: str, raw: bytes) -> Any:
        return self.typestore.deserialize_cdr(raw, self.topics[topic].msgtype)


def _scan_messages(path: Path, want: set[str] | None) -> Iterator[tuple[str, int, bytes]]:
    for topic, log, data in iter_mcap(path, McapScan()):
        if topic and (want is None or topic in want):
            yield topic, log, data


def _sniff(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise BagError(f"{path}: cannot read ({e.strerror})") from None
    if head.startswith(MCAP_MAGIC):
        return "mcap"
    if head.startswith(SQLITE_MAGIC):
        return "sqlite3"
    return ""


def _topics_from_reader(reader: Any) -> dict[str, TopicInfo]:
    from rosbags.interfaces import MessageDefinitionFormat

    topics: dict[str, TopicInfo] = {}
    for c in reader.connections:
        fmt = {MessageDefinitionFormat.MSG: "ros2msg", MessageDefinitionFormat.IDL: "ros2idl"}.get(c.msgdef.format, "")
        t = topics.get(c.topic)
        if t is None:
            qos = list(getattr(c.ext, "offered_qos_profiles", None) or [])
            topics[c.topic] = TopicInfo(c.topic, c.msgtype, int(c.msgcount), fmt, c.msgdef.data, c.digest or "", qos)
        else:
            t.count += int(c.msgcount)
    return topics


def channel_metadata(meta: bytes) -> dict[str, str]:
    """An MCAP channel's metadata (a string map) -> dict."""
    out: dict[str, str] = {}
    bio = io.BytesIO(meta)
    try:
        while bio.tell() < len(meta):
            k = _str(bio)
            out[k] = _str(bio)
    except (_Truncated, UnicodeDecodeError):
        pass
    return out


def _topics_from_scan(scan: McapScan) -> dict[str, TopicInfo]:
    topics: dict[str, TopicInfo] = {}
    for cid, (sid, topic, _enc, meta) in scan.channels.items():
        name, enc, data = scan.schemas.get(sid, ("", "", ""))
        t = topics.get(topic)
        if t is None:
            md = channel_metadata(meta)
            qos: list[Any] = []
            if md.get("offered_qos_profiles"):
                try:
                    from rosbags.rosbag2.metadata import parse_qos

                    qos = list(parse_qos(md["offered_qos_profiles"]))
                except Exception:  # noqa: BLE001 - QoS is informative only
                    qos = []
            topics[topic] = TopicInfo(topic, name, scan.counts.get(cid, 0), enc if enc in ("ros2msg", "ros2idl") else "",
                                      data, md.get("topic_type_hash", ""), qos)
        else:
            t.count += scan.counts.get(cid, 0)
    return topics


def _open_file(path: Path, kind: str, notes: list[str]) -> tuple[_Source, dict[str, TopicInfo], bool]:
    """One storage file: (source, topics, recovered)."""
    from rosbags.rosbag2 import Reader

    err: Exception | None = None
    if kind in ("mcap", "sqlite3"):
        try:  # rosbags picks the storage by suffix
            if path.suffix not in (".mcap", ".db3"):
                raise BagError(f"unexpected suffix {path.suffix!r}")
            with Reader(path) as reader:
                topics = _topics_from_reader(reader)
            return _Source(path, "rosbags"), topics, False
        except Exception as e:  # noqa: BLE001 - fall back to the tolerant scan (MCAP)
            err = e
    if kind == "mcap":
        scan = scan_mcap(path)
        notes.append(f"{path.name}: {scan.reason}; kept the {sum(scan.counts.values())} complete messages before it"
                     if not scan.complete
                     else f"{path.name}: read by linear scan ({err})")
        return _Source(path, "scan"), _topics_from_scan(scan), not scan.complete
    raise BagError(f"{path}: cannot read this {kind} storage file ({err})")


def open_bag(path: str | os.PathLike[str]) -> Bag:
    """Open a rosbag2 directory or storage file (see the module docstring)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"bag {p} does not exist")
    notes: list[str] = []
    ts = make_typestore()
    has_meta = False
    if p.is_dir():
        has_meta = (p / "metadata.yaml").is_file()
        files = sorted([*p.glob("*.mcap"), *p.glob("*.db3")])
        if not files:
            raise BagError(f"{p} is not a rosbag2 directory: no .mcap or .db3 storage file in it "
                           "(expected the directory written by `ros2 bag record` or `effvla record`)")
        if has_meta:
            from rosbags.rosbag2 import Reader

            try:
                with Reader(p) as reader:
                    topics = _topics_from_reader(reader)
                    storage = "mcap" if any(f.suffix == ".mcap" for f in files) else "sqlite3"
                bag = Bag(p, storage, topics, [_Source(p, "rosbags")], ts, notes=notes, has_metadata=True)
                notes.extend(register_embedded(ts, topics.values()))
                return bag
            except Exception as e:  # noqa: BLE001 - e.g. an MCAP without footer: read the files directly
                notes.append(f"metadata.yaml present but the bag is not readable as a whole ({e}); "
                             "reading its storage files directly")
        else:
            notes.append("no metadata.yaml (recording interrupted?): reading the storage files directly")
    else:
        files = [p]
    kinds = [_sniff(f) for f in files]
    bad = [f for f, k in zip(files, kinds) if not k]
    if bad:
        raise BagError(f"{bad[0]} is not a rosbag2 storage file (neither MCAP nor sqlite3); pass a rosbag2 "
                       "directory (with metadata.yaml) or its .mcap/.db3 file")
    sources: list[_Source] = []
    topics = {}
    recovered = False
    for f, k in zip(files, kinds):
        src, tps, rec = _open_file(f, k, notes)
        sources.append(src)
        recovered = recovered or rec
        for name, t in tps.items():
            if name in topics:
                topics[name].count += t.count
            else:
                topics[name] = t
    storage = "mcap" if all(k == "mcap" for k in kinds) else "sqlite3"
    notes.extend(register_embedded(ts, topics.values()))
    return Bag(p, storage, topics, sources, ts, recovered=recovered, notes=notes, has_metadata=has_meta)


# ------------------------------------------------------------------------------------------ writing
def ros_distro() -> str:
    """The running ROS 2 distribution: ``$ROS_DISTRO``, else the one of the installed rclpy (apt's
    ``/opt/ros/<distro>`` or the ``ros-<distro>-rclpy`` wheel), else ``unknown``."""
    d = os.environ.get("ROS_DISTRO", "").strip()
    if d:
        return d
    try:
        import rclpy

        parts = Path(rclpy.__file__).resolve().parts
        if "ros" in parts and parts.index("ros") + 1 < len(parts) and parts[parts.index("ros") - 1] == "opt":
            return parts[parts.index("ros") + 1]
    except Exception:  # noqa: BLE001 - rclpy not importable: try the wheels' metadata
        pass
    try:
        import importlib.metadata as md

        for dist in md.distributions():
            name = (dist.metadata["Name"] or "").lower()
            if name.startswith("ros-") and name.endswith("-rclpy") and name.count("-") == 2:
                return name.split("-")[1]
    except Exception:  # noqa: BLE001
        pass
    return "unknown"


def _rosbag2_channels(storage: Any, distro: str) -> None:
    """Make rosbags' MCAP storage writer write what rosbag2's does: channel metadata with
    ``offered_qos_profiles`` *and* ``topic_type_hash`` (RIHS01), and ``ros_distro`` of the running ROS in
    the embedded bag metadata (rosbags writes ``rosbags``)."""
    from rosbags.rosbag2.storage_mcap import Channel, write_channel, write_string

    orig_close = storage.close

    def add_connection(connection: Any, offered_qos_profiles: str) -> None:
        meta = io.BytesIO()
        write_string(meta, "offered_qos_profiles")
        write_string(meta, offered_qos_profiles)
        write_string(meta, "topic_type_hash")
        write_string(meta, str(connection.digest or ""))
        storage.channels.append(Channel(connection.id, connection.msgtype, connection.topic,
                                        connection.ext.serialization_format, meta.getvalue()))
        storage.channel_stats[connection.id] = 0
        write_channel(storage.chunk.bio, storage.channels[-1], storage.schemas)

    def close(version: int, metadata: str) -> None:
        orig_close(version, metadata.replace("ros_distro: rosbags", f"ros_distro: {distro}"))

    storage.add_connection = add_connection
    storage.close = close


def to_rosbags_qos(profiles: Sequence[Any]) -> list[Any]:
    """rclpy QoSProfile (or TopicEndpointInfo.qos_profile) list -> rosbags ``Qos`` list."""
    from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime

    def t(d: Any) -> Any:
        ns = int(getattr(d, "nanoseconds", 0) or 0)
        if ns <= 0 or ns >= 2**63 - 1:
            return QosTime(2147483647, 4294967295)  # "infinite", as rosbag2 writes it
        return QosTime(ns // 1_000_000_000, ns % 1_000_000_000)

    out = []
    for q in profiles:
        out.append(Qos(
            QosHistory(int(q.history)), int(q.depth), QosReliability(int(q.reliability)),
            QosDurability(int(q.durability)), t(q.deadline), t(q.lifespan), QosLiveliness(int(q.liveliness)),
            t(q.liveliness_lease_duration), bool(q.avoid_ros_namespace_conventions)))
    return out


class McapBagWriter:
    """rosbag2 (MCAP) writer that stays readable when its process dies (see the module docstring).

    Not thread-safe: one writer thread owns it.
    """

    def __init__(self, path: str | os.PathLike[str], typestore: Any | None = None, *,
                 max_chunk_bytes: int = 1 << 20, fsync: bool = False) -> None:
        from rosbags.rosbag2 import StoragePlugin, Writer

        self.path = Path(path)
        self.typestore = typestore or make_typestore()
        self.writer = Writer(self.path, version=9, storage_plugin=StoragePlugin.MCAP)
        self.writer.open()
        self.ros_distro = ros_distro()
        _rosbag2_channels(self.writer.storage, self.ros_distro)
        self.max_chunk_bytes = int(max_chunk_bytes)
        self.fsync = fsync
        self.connections: dict[str, Any] = {}
        self._flushed_counts: dict[int, int] = {}
        self._flushed_min = 2**63 - 1
        self._flushed_max = 0
        self._min = 2**63 - 1
        self._max = 0
        self.flushes = 0
        self.closed = False
        self.write_metadata()  # a valid (empty) bag from the start

    @property
    def _storage(self) -> Any:
        return self.writer.storage

    def add_topic(self, topic: str, msgtype: str, *, qos: Sequence[Any] = (),
                  fallback_rihs01: str | None = None, msgdef: str | None = None) -> Any:
        """Declare a topic. The message definition and RIHS01 hash come from the typestore (standard
        types, effvla_ros, any ``.msg`` on the ament prefix path); an unknown type is stored without a
        definition, with ``fallback_rihs01`` (the publishers' type hash) when given. ``msgdef`` and
        ``fallback_rihs01`` given together are stored as they are (a copy of another bag's topic)."""
        if topic in self.connections:
            return self.connections[topic]
        if msgdef is not None and fallback_rihs01:
            rihs01 = fallback_rihs01
        elif ensure_type(self.typestore, msgtype):
            msgdef, _ = self.typestore.generate_msgdef(msgtype, ros_version=2)
            rihs01 = self.typestore.hash_rihs01(msgtype)
        else:
            msgdef, rihs01 = "", fallback_rihs01 or "RIHS01_" + "0" * 64
        conn = self.writer.add_connection(topic, msgtype, msgdef=msgdef, rihs01=rihs01,
                                          offered_qos_profiles=list(qos))
        self.connections[topic] = conn
        return conn

    def write(self, topic: str, timestamp_ns: int, data: bytes | memoryview) -> None:
        self.writer.write(self.connections[topic], int(timestamp_ns), data)
        self._min = min(self._min, int(timestamp_ns))
        self._max = max(self._max, int(timestamp_ns))
        st = self._storage
        if st is not None and st.chunk.bio.tell() >= self.max_chunk_bytes:
            self.flush()

    def pending_bytes(self) -> int:
        st = self._storage
        return int(st.chunk.bio.tell()) if st is not None else 0

    def flush(self) -> None:
        """Close the pending MCAP chunk, hand it to the OS, and update metadata.yaml."""
        st = self._storage
        if st is None:
            return
        if st.chunk.msgs:  # only chunks with messages (schemas/channels alone wait for their messages)
            st.close_chunk()
        st.bio.flush()
        if self.fsync:
            os.fsync(st.bio.fileno())
        self._flushed_counts = dict(self.writer.counts)
        self._flushed_min, self._flushed_max = self._min, self._max
        self.flushes += 1
        self.write_metadata()

    def write_metadata(self, custom: dict[str, str] | None = None) -> None:
        """metadata.yaml describing what is on disk (same layout as rosbag2's / rosbags' writer)."""
        from io import StringIO

        from rosbags.interfaces import ConnectionExtRosbag2
        from rosbags.rosbag2.metadata import dump_qos_v9
        from ruamel.yaml import YAML

        st = self._storage
        name = st.path.name if st is not None else f"{self.path.name}.mcap"
        count = sum(self._flushed_counts.values())
        start = self._flushed_min if count else 0
        duration = max(0, self._flushed_max - self._flushed_min) if count else 0
        meta = {"rosbag2_bagfile_information": {
            "version": 9,
            "storage_identifier": "mcap",
            "relative_file_paths": [name],
            "duration": {"nanoseconds": duration},
            "starting_time": {"nanoseconds_since_epoch": start},
            "message_count": count,
            "topics_with_message_count": [
                {"topic_metadata": {"name": c.topic, "type": c.msgtype,
                                    "serialization_format": c.ext.serialization_format,
                                    "offered_qos_profiles": dump_qos_v9(c.ext.offered_qos_profiles),
                                    "type_description_hash": c.digest},
                 "message_count": self._flushed_counts.get(c.id, 0)}
                for c in self.writer.connections if isinstance(c.ext, ConnectionExtRosbag2)],
            "compression_format": "",
            "compression_mode": "",
            "files": [{"path": name, "starting_time": {"nanoseconds_since_epoch": start},
                       "duration": {"nanoseconds": duration}, "message_count": count}],
            "custom_data": {**self.writer.custom_data, **(custom or {"effvla.recording": "in_progress"})},
            "ros_distro": self.ros_distro,
        }}
        yaml = YAML(typ="safe")
        yaml.default_flow_style = False
        s = StringIO()
        yaml.dump(meta, s)
        tmp = self.path / "metadata.yaml.tmp"
        tmp.write_text(s.getvalue())
        tmp.replace(self.path / "metadata.yaml")

    def close(self, custom: dict[str, str] | None = None) -> None:
        """Finish the bag: summary section, footer, final metadata.yaml."""
        if self.closed:
            return
        for k, v in (custom or {}).items():
            self.writer.set_custom_data(k, v)
        self.writer.set_custom_data("effvla.recording", "complete")
        self.writer.close()
        self.closed = True
        meta = self.path / "metadata.yaml"  # rosbags' writer says ros_distro: rosbags
        text = meta.read_text()
        tmp = self.path / "metadata.yaml.tmp"
        tmp.write_text(text.replace("ros_distro: rosbags", f"ros_distro: {self.ros_distro}"))
        tmp.replace(meta)


# ------------------------------------------------------------------------------------------ repair
@dataclass
class RepairResult:
    source: Path
    out: Path
    messages: int
    topics: dict[str, int]
    reason: str  # why the source needed repairing ("" if it was complete)


def default_repair_out(path: str | os.PathLike[str]) -> Path:
    """``<bag>_repaired`` next to the bag directory (for a storage file inside one: next to that directory)."""
    p = Path(str(path).rstrip("/")).expanduser()
    if p.is_dir():
        return p.parent / f"{p.name}_repaired"
    if (p.parent / "metadata.yaml").is_file() or p.stem.startswith(p.parent.name):
        return p.parent.parent / f"{p.parent.name}_repaired"
    return p.parent / f"{p.stem}_repaired"


def repair_bag(path: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> RepairResult:
    """Rewrite a (possibly interrupted) rosbag2 into a complete MCAP bag at ``out``: every complete message
    of the source (its log times, bytes, topics, types, embedded definitions, offered QoS and type hashes
    kept), then the summary section, the footer and a metadata.yaml with the true counts. The source is
    not modified. Raises BagError when there is nothing to keep."""
    src = Path(path)
    bag = open_bag(src)
    dst = Path(out) if out is not None else default_repair_out(src)
    if dst.exists():
        raise BagError(f"{dst} exists already; choose another --out (bags are never overwritten)")
    if bag.message_count == 0:
        raise BagError(f"{src}: no complete message to keep ({'; '.join(bag.notes) or 'empty bag'})")
    custom: dict[str, str] = {}
    meta = src / "metadata.yaml" if src.is_dir() else None
    if meta is not None and meta.is_file():
        try:
            import yaml

            info = (yaml.safe_load(meta.read_text()) or {}).get("rosbag2_bagfile_information") or {}
            custom = {str(k): str(v) for k, v in (info.get("custom_data") or {}).items() if k != "effvla.recording"}
        except Exception:  # noqa: BLE001 - the old custom data is informative only
            custom = {}
    reason = "; ".join(bag.notes) if bag.recovered or not bag.has_metadata else ""
    custom["effvla.repaired_from"] = str(src.resolve())
    if reason:
        custom["effvla.repair_reason"] = reason
    dst.parent.mkdir(parents=True, exist_ok=True)
    w = McapBagWriter(dst, bag.typestore)
    counts: dict[str, int] = {}
    try:
        for t in bag.topics.values():
            rihs = t.digest if t.digest.startswith("RIHS01_") else None
            if t.msgdef and rihs:
                w.add_topic(t.topic, t.msgtype, qos=t.qos, fallback_rihs01=rihs, msgdef=t.msgdef)
            else:
                w.add_topic(t.topic, t.msgtype, qos=t.qos, fallback_rihs01=rihs)
        for topic, log_ns, raw in bag.messages():
            w.write(topic, log_ns, raw)
            counts[topic] = counts.get(topic, 0) + 1
    except BaseException:
        w.close(custom)
        raise
    w.close(custom)
    return RepairResult(src, dst, sum(counts.values()), counts, reason)
