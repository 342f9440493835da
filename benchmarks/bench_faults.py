"""Fault injection (issue #27): the stall and flood cases, repeated, with what the robot is asked to do across them.

Part 1 (chunk_executor, real DDS on loopback): the executor runs as its own process
(``python -m effvla_ros.nodes.chunk_executor``, stream mode, 100 Hz, v_max 2 rad/s, a_max 10 rad/s^2); this
process plays the policy (10 Hz chunks of 50 actions at 30 Hz following a moving target, 50 ms latency) and
the controller (it records every trajectory point). Faults, each in a fresh executor:

* ``policy_stall_<G>``: no chunk for G s (the policy stalled: cameras stamped apart, a lost camera, a stale
  state), while the target moves on; then chunks resume far from the held point;
* ``executor_stall_<G>``: the executor process is stopped (SIGSTOP/SIGCONT) for G s, as on a starved machine;
* ``chunk_flood``: chunks at 200 Hz for 2 s, each offset at random by up to +-0.3 rad (disagreeing chunks);
* ``joint_state_flood``: 2 kHz JointState with alternating garbage (NaN, too few positions) for 2 s.

Every run's points are checked as the trajectory controller sees them (``bench_executor.check_points``:
within the limits along the stream; from rest at the held point after an uncovered interval) and the
largest velocity / acceleration demanded is reported, across the gaps included.

Part 2 (policy node, tiny checkpoint): cameras stamped 2 s apart for 4 s (the silent stall of the issue:
seconds to the first warning, warning lines, the diagnostics' cause) and a 100 kB instruction alternating at
20 Hz for 3 s (log bytes written; 5.6 MB before the fix).

    python benchmarks/bench_faults.py [--repeats 3] [--json out.json] [--skip-policy]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ.pop("ROS_STATIC_PEERS", None)
os.environ["ROS_DOMAIN_ID"] = os.environ.get("EFFVLA_BENCH_DOMAIN_ID", str(200 + os.getpid() % 30))
os.environ["EFFVLA_BENCH_DOMAIN_ID"] = os.environ["ROS_DOMAIN_ID"]

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from bench_executor import AMAX, JOINTS, VMAX, check_points, truth  # noqa: E402

PERIOD = 0.01  # executor control period (100 Hz)
DT = 1.0 / 30.0  # action period of the chunks
H = 50  # actions per chunk


class Executor:
    """The chunk_executor node in its own process (so that it can be stopped like a starved process)."""

    def __init__(self, log: Path) -> None:
        self.log_path = log
        self._log = open(log, "wb")
        args = ["--ros-args", "-p", "control_rate:=100.0", "-p", "output_mode:=stream", "-p", "merge_strategy:=rtc",
                "-p", f"velocity_limits:=[{VMAX}]", "-p", f"acceleration_limits:=[{AMAX}]",
                "-p", "watchdog_timeout:=0.5"]
        self.proc = subprocess.Popen([sys.executable, "-m", "effvla_ros.nodes.chunk_executor", *args],
                                     stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)

    def stop(self) -> tuple[int | None, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode, self.log_path.read_text(errors="replace")


class Rig:
    """This process's side: the policy (chunks), the robot state (JointState) and the controller (recorder)."""

    def __init__(self) -> None:
        import rclpy
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import JointState
        from trajectory_msgs.msg import JointTrajectory

        from effvla_ros.msg import ActionChunk

        self.ctx = rclpy.Context()
        rclpy.init(context=self.ctx)
        self.node = rclpy.create_node("bench_faults", context=self.ctx)
        rel = QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE)
        self.chunk_pub = self.node.create_publisher(ActionChunk, "/chunk_executor/action_chunk", rel)
        self.js_pub = self.node.create_publisher(JointState, "/joint_states", 10)
        self.lock = threading.Lock()
        self.points: list[list[float]] = []
        self.spans: list[list[float]] = []
        self.base_ns = time.time_ns() // 10**9 * 10**9
        self.node.create_subscription(JointTrajectory, "/chunk_executor/joint_trajectory", self._on_traj, rel)
        from diagnostic_msgs.msg import DiagnosticArray

        self.diag: dict[str, str] = {}  # the executor's own last diagnostics (gap.max_ms: uncovered intervals)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, 10)
        self.ex = SingleThreadedExecutor(context=self.ctx)
        self.ex.add_node(self.node)
        self._spin = threading.Thread(target=self._spin_loop, daemon=True)
        self._spin.start()
        self.cid = 0

    def _spin_loop(self) -> None:
        from rclpy.executors import ExternalShutdownException

        try:
            self.ex.spin()
        except (ExternalShutdownException, Exception):  # noqa: BLE001 - shutdown races
            pass

    def _on_traj(self, m: Any) -> None:
        s = m.header.stamp.sec * 10**9 + m.header.stamp.nanosec - self.base_ns
        last = m.points[-1].time_from_start
        with self.lock:
            self.spans.append([s, s + last.sec * 10**9 + last.nanosec])
            for pt in m.points:
                self.points.append([s + pt.time_from_start.sec * 10**9 + pt.time_from_start.nanosec,
                                    *pt.positions, *pt.velocities])

    def _on_diag(self, m: Any) -> None:
        for st in m.status:
            if st.name.startswith("chunk_executor"):
                self.diag = {kv.key: kv.value for kv in st.values}

    def clear(self) -> None:
        with self.lock:
            self.points.clear()
            self.spans.clear()

    def wait_connected(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.chunk_pub.get_subscription_count() == 0 or self.js_pub.get_subscription_count() == 0:
            if time.monotonic() > deadline:
                raise RuntimeError("chunk_executor not discovered")
            time.sleep(0.05)

    def joint_state(self, q: Any = None, names: list[str] | None = None) -> None:
        from sensor_msgs.msg import JointState

        m = JointState()
        m.header.stamp = self.node.get_clock().now().to_msg()
        m.name = list(names or JOINTS)
        m.position = [float(x) for x in (truth(np.array([time.time()]))[0] if q is None else q)]
        self.js_pub.publish(m)

    def chunk(self, offset: np.ndarray | float = 0.0, latency: float = 0.05) -> None:
        from builtin_interfaces.msg import Duration, Time

        from effvla_ros.msg import ActionChunk

        self.cid += 1
        t0_ns = self.node.get_clock().now().nanoseconds - int(latency * 1e9)
        t0 = t0_ns * 1e-9
        m = ActionChunk()
        m.header.stamp = Time(sec=t0_ns // 10**9, nanosec=t0_ns % 10**9)
        m.chunk_id = self.cid
        m.step_period = Duration(sec=0, nanosec=int(round(DT * 1e9)))
        m.joint_names = JOINTS
        m.num_actions, m.action_dim = H, len(JOINTS)
        m.actions = (truth(t0 + DT * np.arange(H)) + offset).ravel().tolist()
        self.chunk_pub.publish(m)

    def analyse(self) -> dict[str, Any]:
        with self.lock:
            arr = np.array(self.points, dtype=np.float64).reshape(-1, 1 + 2 * len(JOINTS))
            spans = np.array(self.spans, dtype=np.float64).reshape(-1, 2)
        res = check_points(arr, spans, self.base_ns, time.time(), 1e9, PERIOD, 0.0)
        return {k: res.get(k) for k in ("points", "max_gap_ms", "restarts", "max_vel", "max_acc", "max_fd_vel",
                                        "max_restart_step", "limits_ok")}

    def close(self) -> None:
        import rclpy

        self.ex.shutdown(timeout_sec=2)
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.ctx)
        self._spin.join(5)


def _stream(rig: Rig, seconds: float, rate: float = 10.0, offset_fn: Any = None, js_every: int = 1) -> None:
    """Chunks at ``rate`` Hz (and JointState) for ``seconds``."""
    t_end = time.monotonic() + seconds
    k = 0
    while time.monotonic() < t_end:
        if k % js_every == 0:
            rig.joint_state()
        rig.chunk(offset_fn() if offset_fn is not None else 0.0)
        k += 1
        time.sleep(1.0 / rate)


def run_case(rig: Rig, case: str, gap: float, tmp: Path, rng: np.random.Generator) -> dict[str, Any]:
    rig.cid = 0
    rig.diag = {}
    ex = Executor(tmp / f"{case}.log")
    try:
        rig.wait_connected()
        q0 = truth(np.array([time.time()]))[0]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # until the executor publishes (it has the state)
            rig.joint_state(q0)
            time.sleep(0.05)
            with rig.lock:
                if rig.points:
                    break
        _stream(rig, 1.5)  # converge onto the moving target
        rig.clear()
        _stream(rig, 1.0)
        if case == "policy_stall":
            t_end = time.monotonic() + gap
            while time.monotonic() < t_end:  # the robot still reports its state; no chunk
                rig.joint_state()
                time.sleep(0.02)
            _stream(rig, 2.0)
        elif case == "executor_stall":
            os.kill(ex.proc.pid, signal.SIGSTOP)
            t_end = time.monotonic() + gap
            while time.monotonic() < t_end:  # chunks keep coming and queue up
                rig.joint_state()
                rig.chunk()
                time.sleep(0.1)
            os.kill(ex.proc.pid, signal.SIGCONT)
            _stream(rig, 2.0)
        elif case == "chunk_flood":
            _stream(rig, 2.0, rate=200.0, offset_fn=lambda: rng.uniform(-0.3, 0.3, len(JOINTS)), js_every=20)
            _stream(rig, 1.0)
        elif case == "joint_state_flood":
            t_end = time.monotonic() + 2.0
            k = 0
            while time.monotonic() < t_end:
                if k % 200 == 0:
                    rig.chunk()
                if k % 2:
                    rig.joint_state([float("nan")] * len(JOINTS))
                else:
                    rig.joint_state([0.0] * (len(JOINTS) - 1))
                k += 1
                time.sleep(0.0005)
            _stream(rig, 1.0)
        time.sleep(1.2)  # the executor's next diagnostics
        res = rig.analyse()
        res["exec_gap_max_ms"] = float(rig.diag.get("gap.max_ms", "nan"))
        res["exec_reanchored"] = int(rig.diag.get("gap.reanchored", "0"))
        res["exec_clamps"] = sum(int(v) for k, v in rig.diag.items() if k.startswith("clamp.") and k.count(".") == 1)
    finally:
        code, log = ex.stop()
    res.update({"case": case, "gap_s": gap, "exit_code": code, "traceback": "Traceback" in log,
                "log_lines": len(log.splitlines()), "stall_warnings": log.count("output stalled"),
                "js_warnings": log.count("JointState ignored")})
    return res


# ---------------------------------------------------------------------------------------------
# Part 2: the policy node's stall report and instruction flood
# ---------------------------------------------------------------------------------------------
def run_policy(tmp: Path) -> dict[str, Any]:
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.executors import SingleThreadedExecutor
    from sensor_msgs.msg import JointState
    from std_msgs.msg import String

    sys.path.insert(0, str(REPO / "test"))
    from effvla_ros.msg import ActionChunk, VisualTokens
    from effvla_ros.nodes.common import LATCHED_QOS

    from model_fixtures import write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(tmp / "tiny", seed=1)
    names = [f"j{i}" for i in range(6)]
    log_path = tmp / "policy.log"
    logf = open(log_path, "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "effvla_ros.nodes.policy", "--ros-args", "-p", f"checkpoint:={ckpt}",
         "-p", "cameras:=[camera1,camera2]", "-p", f"state_joint_names:=[{','.join(names)}]", "-p", "fps:=20.0",
         "-p", "execution_horizon:=2", "-p", "warmup:=false", "-p", "startup_check:=false", "-p", "num_steps:=4",
         "-r", "/policy/visual_tokens:=/vt"], stdout=logf, stderr=subprocess.STDOUT, cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    node = rclpy.create_node("bench_faults_policy", context=ctx)
    chunks: list[Any] = []
    diags: list[Any] = []
    node.create_subscription(ActionChunk, "/policy/action_chunk", chunks.append, 50)
    node.create_subscription(DiagnosticArray, "/diagnostics",
                             lambda m: diags.extend(s for s in m.status if s.name == "effvla/policy"), 50)
    tok = node.create_publisher(VisualTokens, "/vt", 10)
    js = node.create_publisher(JointState, "/joint_states", 10)
    instr = node.create_publisher(String, "/instruction", LATCHED_QOS)
    ex = SingleThreadedExecutor(context=ctx)
    ex.add_node(node)
    spin = threading.Thread(target=lambda: _quiet_spin(ex), daemon=True)
    spin.start()

    def tokens(cam: str, stamp: float) -> VisualTokens:
        keep = [0, 2, 5, 7, 9, 12]
        m = VisualTokens(camera_name=cam, grid_height=4, grid_width=4, token_dim=64, dtype="float16",
                         kept_indices=keep, reused=[False] * len(keep))
        m.header.stamp.sec, m.header.stamp.nanosec = int(stamp), int((stamp - int(stamp)) * 1e9)
        m.data = np.random.default_rng(int(stamp * 100)).standard_normal((len(keep), 64)).astype(np.float16).tobytes()
        return m

    def send(skew: float = 0.0) -> None:
        t = time.time()
        js.publish(JointState(name=names, position=list(np.linspace(-0.5, 0.5, 6))))
        tok.publish(tokens("camera1", t))
        tok.publish(tokens("camera2", t - skew))

    out: dict[str, Any] = {}
    try:
        instr.publish(String(data="pick up the red cube"))
        deadline = time.monotonic() + 120
        while len(chunks) < 3 and time.monotonic() < deadline:
            send()
            time.sleep(0.1)
        if len(chunks) < 3:
            raise RuntimeError("policy produced no chunks:\n" + log_path.read_text(errors="replace"))
        # cameras stamped 2 s apart for 4 s
        n0, size0 = len(chunks), log_path.stat().st_size
        t_start = time.monotonic()
        first_warning = None
        while time.monotonic() - t_start < 4.0:
            send(skew=2.0)
            time.sleep(0.05)
            if first_warning is None and "camera stamps" in log_path.read_text(errors="replace")[size0:]:
                first_warning = time.monotonic() - t_start
        time.sleep(0.5)
        text = log_path.read_text(errors="replace")[size0:]
        d = {kv.key: kv.value for kv in diags[-1].values} if diags else {}
        out["stall"] = {"chunks_during": len(chunks) - n0, "first_warning_s": first_warning,
                        "warning_lines": text.count("camera stamps"), "diag_cause": d.get("no_chunk.cause"),
                        "diag_message": diags[-1].message if diags else None}
        n1 = len(chunks)
        t_end = time.monotonic() + 10
        while len(chunks) == n1 and time.monotonic() < t_end:
            send()
            time.sleep(0.05)
        out["stall"]["resumed_s"] = 10 - (t_end - time.monotonic()) if len(chunks) > n1 else None
        # 100 kB instruction alternating at 20 Hz for 3 s
        size1 = log_path.stat().st_size
        a, b = "a" * 100_000, "b" * 100_000
        for i in range(60):
            instr.publish(String(data=a if i % 2 else b))
            time.sleep(0.05)
        time.sleep(1.0)
        text = log_path.read_text(errors="replace")[size1:]
        out["flood"] = {"changes": 60, "log_bytes": log_path.stat().st_size - size1,
                        "instruction_lines": text.count("instruction:"), "alive": proc.poll() is None}
    finally:
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGINT)  # two, as launch + terminal deliver
        try:
            out["exit_code"] = proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out["exit_code"] = None
        logf.close()
        out["traceback"] = "Traceback" in log_path.read_text(errors="replace")
        ex.shutdown(timeout_sec=2)
        node.destroy_node()
        rclpy.try_shutdown(context=ctx)
    return out


def _quiet_spin(ex: Any) -> None:
    try:
        ex.spin()
    except Exception:  # noqa: BLE001 - shutdown races
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each executor case")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--skip-policy", action="store_true", help="only part 1")
    args = ap.parse_args()
    cases = [("policy_stall", 0.3), ("policy_stall", 1.0), ("policy_stall", 2.5), ("executor_stall", 0.3),
             ("executor_stall", 0.56), ("chunk_flood", 0.0), ("joint_state_flood", 0.0)]
    rng = np.random.default_rng(0)
    results: dict[str, Any] = {"executor": [], "limits": {"v_max": VMAX, "a_max": AMAX}}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        rig = Rig()
        try:
            print(f"part 1: chunk_executor, v_max {VMAX} rad/s, a_max {AMAX} rad/s^2, 100 Hz stream, "
                  f"{args.repeats} runs per case (load average {os.getloadavg()[0]:.1f})")
            print(f"{'case':<22}{'runs':>5}{'limits ok':>10}{'max |v|':>9}{'max |a|':>9}{'restart step':>13}"
                  f"{'restarts':>9}{'max gap ms':>11}{'exec gap ms':>12}{'exit 0':>7}")
            for case, gap in cases:
                runs = [run_case(rig, case, gap, tmp, rng) for _ in range(args.repeats)]
                results["executor"].extend(runs)
                name = f"{case}_{gap:g}s" if gap else case
                ok = sum(bool(r["limits_ok"]) for r in runs)
                print(f"{name:<22}{len(runs):>5}{ok:>7}/{len(runs):<2}"
                      f"{max(r['max_vel'] or 0 for r in runs):>9.3f}{max(r['max_acc'] or 0 for r in runs):>9.2f}"
                      f"{max(r['max_restart_step'] or 0 for r in runs):>13.5f}"
                      f"{max(r['restarts'] or 0 for r in runs):>9}"
                      f"{max(r['max_gap_ms'] or 0 for r in runs):>11.0f}"
                      f"{max(r['exec_gap_max_ms'] for r in runs):>12.0f}"
                      f"{sum(r['exit_code'] == 0 and not r['traceback'] for r in runs):>5}/{len(runs)}")
        finally:
            rig.close()
        if not args.skip_policy:
            print("part 2: policy node (tiny checkpoint)")
            pol = run_policy(tmp)
            results["policy"] = pol
            s, f = pol["stall"], pol["flood"]
            print(f"  cameras 2 s apart for 4 s: {s['chunks_during']} chunks, first warning after "
                  f"{s['first_warning_s'] if s['first_warning_s'] is None else round(s['first_warning_s'], 2)} s, "
                  f"{s['warning_lines']} warning line(s), diagnostics cause {s['diag_cause']!r} "
                  f"({s['diag_message']!r}); chunks again {s['resumed_s'] and round(s['resumed_s'], 2)} s after "
                  "the stamps agree")
            print(f"  100 kB instruction x{f['changes']} at 20 Hz: {f['log_bytes']} log bytes, "
                  f"{f['instruction_lines']} instruction line(s), alive {f['alive']}")
            print(f"  two SIGINTs: exit code {pol['exit_code']}, traceback {pol['traceback']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    main()
