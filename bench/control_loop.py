"""Control-loop benchmark: the controller node as a process under sensor load, with model swaps.

Not a test. Three processes talk over DDS on this machine: the controller node (config/ant.yaml, a
DiffuseLoco-size policy -- 6 layers, 8 heads, width 256, history 8, horizon 16 -- on the CPU with one ORT
thread), a sensor process publishing joint states at 500 Hz, IMU at 200 Hz, odometry at 50 Hz and a
velocity command at 1 Hz times `--sensor-scale` (SCHED_FIFO 45 where allowed, as a robot's drivers run),
and this process, which records the node's per-tick timing topic, swaps the model through the
`model_path` parameter and reads /diagnostics.

One row per control rate (`--rates`, the node's rate_hz) and sensor scale: the reference row (the first
rate at scale 1) runs `--duration` seconds with a model swap every `--swap-every` s; the others run
`--row-seconds` without swaps. Each row gives the node's CPU (percent of one core, /proc) beside the
input rate the node received (/diagnostics input_hz), so the cost per input message is a figure.

From the timing topic ([tick_time, exec_time, action_time, obs_stamp, chunk_seq, index, state, missed,
slot]): tick jitter = |tick interval - period|; missed ticks = timer slots that did not tick (consecutive
slots two periods apart: one missed; from tick times where the node sends no slot); obs->cmd =
tick_time - obs_stamp (age of the newest observation behind the published command); a stale action is
one with action_time < exec_time - period/2 (DESIGN.md stale rule).
Swap windows run from the parameter call until /diagnostics names the new model, plus one second.

    .venv/bin/python bench/control_loop.py [--duration 60 | --quick] [--json] [--steps K]
        [--rates 50 100] [--sensor-scale 1 4] [--executor ...] [--provider cpu|cuda|tensorrt|auto]

`--provider cuda` runs the node's policy on the GPU (a CUDA graph, as the node does by default), so the
swaps measure a GPU swap: the new model's session creation and capture beside the running one's chunks.

Models are generated once (torch export, about a minute) into --model-dir and reused.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from machine_stalls import missed_in

from diffusion_controller.core.chunk import is_stale
from diffusion_controller.ros import dds
from diffusion_controller.ros.config import EXECUTORS
from diffusion_controller.ros.outputs import ACTION, EXEC, MISSED, OBS, STATE, TICK
from diffusion_controller.sim.closed_loop import row_slots, tick_gaps

ROOT = Path(__file__).resolve().parents[1]
NODE = "/diffusion_controller"
#: The ant's sensor rates at scale 1 (Hz): joint states, IMU, odometry, velocity command.
SENSOR_HZ = {"js": 500.0, "imu": 200.0, "odom": 50.0, "cmd": 1.0}
RUNNING = 1.0
JOINTS = ["hip_1", "ankle_1", "hip_2", "ankle_2", "hip_3", "ankle_3", "hip_4", "ankle_4"]


# -- models ------------------------------------------------------------------------------------------------


def make_models(model_dir: Path, steps: int) -> list[Path]:
    """Two DiffuseLoco-size policies with the ant's observation layout (different random weights)."""
    paths = [model_dir / f"bench_loop_k{steps}_{tag}" / f"bench_loop_k{steps}_{tag}.onnx" for tag in "ab"]
    if all(p.exists() for p in paths):
        return paths
    from tiny_models import make_tiny_model

    for seed, p in enumerate(paths):
        if not p.exists():
            print(f"[bench] exporting {p.name} (6x256, K={steps}) ...", file=sys.stderr, flush=True)
            make_tiny_model(p.parent, name=p.stem, seed=seed, layers=6, heads=8, width=256, steps=steps,
                            horizon=16, history=8)  # fmt: skip
    return paths


# -- sensor process ----------------------------------------------------------------------------------------


#: A wake-up of the real-time sensor process this late is a machine stall (nothing else could delay it).
STALL_MIN_S = 0.004


def run_sensors(duration: float, scale: float, stall_log: Path | None = None) -> int:
    """Publish the ant's sensor streams at `scale` times robot rates, stamped with the publishing time;
    wake-ups later than STALL_MIN_S go to `stall_log` as [start, end] wall times: the process is
    real-time, so only the machine can hold it up that long."""
    import rclpy
    from geometry_msgs.msg import Twist
    from nav_msgs.msg import Odometry
    from sensor_msgs.msg import Imu, JointState

    with contextlib.suppress(OSError, AttributeError):  # like a robot's drivers: real-time where allowed
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(45))
    rclpy.init()
    node = rclpy.create_node("bench_sensors")
    topics = {
        "js": (JointState, "/joint_states"),
        "imu": (Imu, "/imu_sensor_broadcaster/imu"),
        "odom": (Odometry, "/odom"),
        "cmd": (Twist, "/cmd_vel"),
    }
    pubs = {
        k: (node.create_publisher(t, name, 10), 1.0 / (SENSOR_HZ[k] * scale))
        for k, (t, name) in topics.items()
    }
    js, imu, odom, cmd = JointState(), Imu(), Odometry(), Twist()
    js.name = JOINTS
    imu.header.frame_id, imu.orientation.w = "imu_link", 1.0
    odom.header.frame_id, odom.child_frame_id, odom.pose.pose.orientation.w = "odom", "base_link", 1.0
    cmd.linear.x = 0.3
    msgs = {"js": js, "imu": imu, "odom": odom, "cmd": cmd}
    start = time.monotonic()
    due = dict.fromkeys(pubs, start)
    try:
        while time.monotonic() - start < duration:
            now = time.monotonic()
            for key, (pub, period) in pubs.items():
                if now < due[key]:
                    continue
                due[key] = max(due[key] + period, now - period)
                t = time.time()
                stamp = node.get_clock().now().to_msg()
                m = msgs[key]
                if key == "js":
                    m.header.stamp = stamp
                    m.position = [0.2 * math.sin(2 * t + i) for i in range(8)]
                    m.velocity = [0.4 * math.cos(2 * t + i) for i in range(8)]
                elif key in ("imu", "odom"):
                    m.header.stamp = stamp
                pub.publish(m)
            wake = min(due.values())
            time.sleep(max(0.0, wake - time.monotonic()))
            late = time.monotonic() - wake
            if late > STALL_MIN_S and stall_log is not None:
                with open(stall_log, "a") as f:
                    f.write(json.dumps([time.time() - late, time.time()]) + "\n")
    except KeyboardInterrupt:
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


# -- observer ----------------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(a: np.ndarray, q: float) -> float:
    return float(np.percentile(a, q)) if len(a) else math.nan


def analyse(
    rows: np.ndarray,
    period: float,
    swap_windows: list[tuple[float, float]],
    action_period: float | None = None,
) -> dict:
    """Figures of the timing rows: ticks on the node's `period`; staleness on the model's `action_period`
    (a 50 Hz model run at 100 Hz holds each action for two ticks, which is not stale)."""
    action_period = period if action_period is None else action_period
    ticks = rows[:, TICK]
    dt = np.diff(ticks)
    jitter_ms = np.abs(dt - period) * 1000.0
    missed = np.maximum(np.rint(np.diff(row_slots(rows)) / period) - 1, 0)  # the slots, not the lateness
    run = rows[(rows[:, STATE] == RUNNING) & (rows[:, MISSED] == 0)]
    stale = is_stale(run[:, ACTION], run[:, EXEC], action_period)
    obs_to_cmd = (run[:, TICK] - run[:, OBS]) * 1000.0
    in_swap = np.zeros(len(dt), bool)
    for a, b in swap_windows:
        in_swap |= (ticks[1:] >= a) & (ticks[:-1] <= b)
    return {
        "rate_hz_measured": (len(ticks) - 1) / (ticks[-1] - ticks[0]),
        "ticks": len(ticks),
        "missed_ticks": int(missed.sum()),
        "jitter_ms_p50": percentile(jitter_ms, 50),
        "jitter_ms_p99": percentile(jitter_ms, 99),
        "jitter_ms_max": float(jitter_ms.max()) if len(jitter_ms) else math.nan,
        "obs_to_cmd_ms_p50": percentile(obs_to_cmd, 50),
        "obs_to_cmd_ms_p99": percentile(obs_to_cmd, 99),
        "stale_actions_published": int(stale.sum()),
        "running_fraction": len(run) / len(rows),
        "missed_steps": int((rows[:, MISSED] == 1).sum()),
        "swap_missed_ticks": int(missed[in_swap].sum()),
        "jitter_ms_p99_outside_swaps": percentile(jitter_ms[~in_swap], 99),
        "jitter_ms_max_outside_swaps": float(jitter_ms[~in_swap].max()) if (~in_swap).any() else math.nan,
    }


class Observer:
    """This process's ROS side: the timing topic, /diagnostics and the node's set_parameters client."""

    def __init__(self) -> None:
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rcl_interfaces.srv import SetParameters
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from std_msgs.msg import Float64MultiArray

        rclpy.init()
        self.node = rclpy.create_node("bench_observer")
        self.rows: list[list[float]] = []
        self.diag: dict[str, tuple[float, dict[str, str]]] = {}  # section -> (received, key values)
        self.lock = threading.Lock()
        self.node.create_subscription(
            Float64MultiArray,
            f"{NODE}/debug/command_timing",
            self._on_timing,
            QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE),
        )
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, 10)
        self.client = self.node.create_client(SetParameters, f"{NODE}/set_parameters")
        self.executor = SingleThreadedExecutor()
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def _on_timing(self, msg) -> None:
        with self.lock:
            self.rows.append(list(msg.data))

    def _on_diag(self, msg) -> None:
        for st in msg.status:
            if st.name.startswith(NODE + ":"):
                values = {kv.key: kv.value for kv in st.values}
                self.diag[st.name.split(": ", 1)[1]] = (time.monotonic(), values)

    def section(self, name: str, after: float = -math.inf, timeout: float = 5.0) -> dict[str, str]:
        """The newest /diagnostics section `name`, received after `after` (monotonic) when given."""
        wait(lambda: self.diag.get(name, (-math.inf, {}))[0] > after, timeout)
        return self.diag.get(name, (0.0, {}))[1]

    def rows_since(self, t_wall: float) -> np.ndarray:
        with self.lock:
            return np.array([r for r in self.rows if r[TICK] >= t_wall])

    def swap(self, target: Path) -> bool:
        from rcl_interfaces.srv import SetParameters
        from rclpy.parameter import Parameter

        param = Parameter("model_path", value=str(target)).to_parameter_msg()
        req = SetParameters.Request(parameters=[param])
        fut = self.client.call_async(req)
        ok = wait(fut.done, 5.0) and fut.result().results[0].successful
        return bool(ok and wait(lambda: self.section("policy").get("path") == str(target), 10.0))

    def close(self) -> None:
        import rclpy

        self.executor.shutdown(timeout_sec=2.0)
        self.thread.join(2.0)
        self.node.destroy_node()
        rclpy.try_shutdown()


def wait(pred, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end and not pred():
        time.sleep(0.05)
    return bool(pred())


def start_node(model: Path, rate_hz: float, executor: str, log, provider: str = "cpu") -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "diffusion_controller.ros.controller_node",
            "--ros-args",
            "--params-file",
            str(ROOT / "config" / "ant.yaml"),
            "-p",
            f"model_path:={model}",
            "-p",
            f"provider:={provider}",
            "-p",
            "threads:=1",
            "-p",
            f"executor:={executor}",
            "-p",
            f"rate_hz:={float(rate_hz)}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )


def stop(proc: subprocess.Popen, timeout: float = 20.0) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return None


def measure_row(
    obs: Observer,
    node: subprocess.Popen,
    models: list[Path],
    rate: float,
    scale: float,
    seconds: float,
    swap_every: float | None,
) -> dict:
    """One row: sensors at `scale`, `seconds` of measurement (model swaps every `swap_every` s if given)."""
    period = 1.0 / rate
    stall_log = Path(tempfile.mkstemp(prefix="bench_stalls_", suffix=".jsonl")[1])
    cmd = [sys.executable, __file__, "--sensors", str(seconds + 30.0), "--sensor-scale", str(scale)]
    sensors = subprocess.Popen([*cmd, "--stall-log", str(stall_log)], cwd=ROOT)
    try:

        def fed() -> bool:
            hz = obs.section("observations").get("input_hz.joint_states", "nan")
            return float(hz) > 0.5 * SENSOR_HZ["js"] * scale

        if not wait(fed, 20.0):
            if node.poll() is not None:  # the node's /diagnostics never came: say that, not the sensors
                raise RuntimeError(f"the node exited ({node.returncode}); see its log in the --model-dir")
            raise RuntimeError(
                f"the sensor process did not reach {500 * scale:.0f} Hz on joint states (or the node, which "
                "reports it on /diagnostics, is not configured: see its log in the --model-dir)"
            )
        if not wait(lambda: obs.rows and obs.rows[-1][STATE] == RUNNING, 30.0):
            raise RuntimeError("the node is not RUNNING")
        time.sleep(2.0)  # settle
        t_start, cpu0, wall0 = time.time(), cpu_seconds(node.pid), time.monotonic()
        swap_windows: list[tuple[float, float]] = []
        swaps = failed = 0
        next_swap, k = (time.monotonic() + swap_every, 1) if swap_every else (math.inf, 1)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if time.monotonic() >= next_swap and time.monotonic() < end - 3.0:
                t_req = time.time()
                done = obs.swap(models[k % 2])
                swap_windows.append((t_req, time.time() + 1.0))
                swaps += done
                failed += not done
                k += 1
                next_swap += swap_every
            time.sleep(0.05)
        wall1 = time.monotonic()
        cpu = 100.0 * (cpu_seconds(node.pid) - cpu0) / (wall1 - wall0)
        diag = obs.section("observations", after=wall1)
        pol, loop = obs.section("policy"), obs.section("control loop")
        data = obs.rows_since(t_start)
    finally:
        stop(sensors, 10.0)
    row = {"rate_hz": rate, "sensor_scale": scale, "seconds": seconds}
    from diffusion_controller.core.card_source import card_of_model

    row.update(analyse(data, period, swap_windows, card_of_model(models[0]).control_period_s))
    stalls = [json.loads(line) for line in stall_log.read_text().splitlines() if line.strip()]
    stall_log.unlink()
    stalls = [(a, b) for a, b in stalls if t_start <= b]
    row["machine_stalls"] = len(stalls)
    row["machine_stall_max_ms"] = max((1000.0 * (b - a) for a, b in stalls), default=0.0)
    gaps = tick_gaps(row_slots(data), period, data[:, TICK])
    row["missed_ticks_in_machine_stalls"] = missed_in(gaps, stalls)
    input_hz = sum(float(v) for key, v in diag.items() if key.startswith("input_hz."))
    row.update(
        node_cpu_percent=cpu,
        input_msgs_per_s=input_hz,
        lost_messages=sum(int(v) for key, v in diag.items() if key.startswith("lost.")),
        tick_cost_ms_p99=float(loop.get("tick_cost_p99_ms", "nan")),
        compute_ms_p50=float(pol.get("compute_p50_ms", "nan")),
        compute_ms_p99=float(pol.get("compute_p99_ms", "nan")),
        swaps=swaps,
        failed_swaps=failed,
    )
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of the reference row (default 60)")
    ap.add_argument("--row-seconds", type=float, default=30.0, help="seconds of every other row (default 30)")
    ap.add_argument("--quick", action="store_true", help="20 s reference row, 12 s rows (about 1.5 min)")
    ap.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    ap.add_argument("--steps", type=int, default=3, help="DDIM steps K of the fused graph (default 3)")
    ap.add_argument("--rates", type=float, nargs="+", default=[50.0, 100.0], help="control rates (Hz)")
    ap.add_argument(
        "--sensor-scale",
        type=float,
        nargs="+",
        default=[1.0, 4.0],
        help="sensor rates as multiples of 500/200/50/1 Hz (default 1 4)",
    )
    ap.add_argument("--swap-every", type=float, default=10.0, help="seconds between reference-row swaps")
    ap.add_argument(
        "--executor", default="auto", choices=list(EXECUTORS), help="the node's main executor (default auto)"
    )
    ap.add_argument(
        "--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "diffusion_controller_bench"
    )
    ap.add_argument(
        "--provider", default="cpu", choices=["cpu", "cuda", "tensorrt", "auto"],
        help="the node's provider (default cpu); cuda runs the policy as a CUDA graph, swaps included",
    )  # fmt: skip
    ap.add_argument("--sensors", type=float, default=None, help=argparse.SUPPRESS)  # child mode
    ap.add_argument("--stall-log", type=Path, default=None, help=argparse.SUPPRESS)  # child mode
    args = ap.parse_args(argv)
    if args.sensors is not None:
        return run_sensors(args.sensors, args.sensor_scale[0], args.stall_log)
    duration = 20.0 if args.quick else args.duration
    row_seconds = 12.0 if args.quick else args.row_seconds
    os.environ.setdefault("ROS_DOMAIN_ID", str(60 + os.getpid() % 40))
    dds.one_host_udp(os.environ)

    models = make_models(args.model_dir, args.steps)
    load0 = os.getloadavg()[0]
    obs = Observer()
    rows: list[dict] = []
    exit_codes: list[int | None] = []
    try:
        for rate in args.rates:
            with open(args.model_dir / f"control_loop_node_{rate:g}hz.log", "w") as log:
                node = start_node(models[0], rate, args.executor, log, args.provider)
                try:
                    for scale in args.sensor_scale:
                        reference = not rows
                        print(
                            f"[bench] {rate:g} Hz, sensors x{scale:g}"
                            f"{' with swaps' if reference else ''} ...",
                            file=sys.stderr,
                            flush=True,
                        )
                        rows.append(
                            measure_row(
                                obs,
                                node,
                                models,
                                rate,
                                scale,
                                duration if reference else row_seconds,
                                args.swap_every if reference else None,
                            )
                        )
                finally:
                    exit_codes.append(stop(node))
                    with obs.lock:
                        obs.rows.clear()
    finally:
        obs.close()

    result = dict(rows[0])
    result.update(
        rows=rows,
        cpu_ratio_by_rate={f"{r:g}": cpu_ratio(rows, r, args.sensor_scale) for r in args.rates},
        us_per_input_message_by_rate={
            f"{r:g}": us_per_message(rows, r, args.sensor_scale) for r in args.rates
        },
        steps=args.steps,
        executor=args.executor,
        provider=args.provider,
        duration_s=duration,
        loadavg_start=load0,
        loadavg_end=os.getloadavg()[0],
        cores=os.cpu_count(),
        node_exit_codes=exit_codes,
    )
    print_report(result, args.steps, args.executor, load0, args.provider)
    if args.json:
        print(json.dumps(result))
    return 0


def _pair(rows: list[dict], rate: float, scales: list[float]) -> tuple[dict, dict] | None:
    by_scale = {r["sensor_scale"]: r for r in rows if r["rate_hz"] == rate}
    lo, hi = min(scales), max(scales)
    return (by_scale[lo], by_scale[hi]) if lo != hi and lo in by_scale and hi in by_scale else None


def cpu_ratio(rows: list[dict], rate: float, scales: list[float]) -> float:
    """Node CPU at the highest sensor scale over the lowest (target <= 1.5 for 4x)."""
    pair = _pair(rows, rate, scales)
    return pair[1]["node_cpu_percent"] / pair[0]["node_cpu_percent"] if pair else math.nan


def us_per_message(rows: list[dict], rate: float, scales: list[float]) -> float:
    """Node CPU microseconds per extra input message between the lowest and highest sensor scale."""
    pair = _pair(rows, rate, scales)
    if not pair:
        return math.nan
    extra = pair[1]["input_msgs_per_s"] - pair[0]["input_msgs_per_s"]
    cpu = (pair[1]["node_cpu_percent"] - pair[0]["node_cpu_percent"]) / 100.0
    return 1e6 * cpu / extra if extra > 0 else math.nan


def print_report(result: dict, steps: int, executor: str, load0: float, provider: str = "cpu") -> None:
    print(
        f"control loop, DiffuseLoco-size policy (6x256, K={steps}), provider {provider}, "
        f"executor {executor}, load avg {load0:.2f} -> {result['loadavg_end']:.2f}"
    )
    print(
        f"  {'rate':>6s} {'sensors':>8s} {'input/s':>8s} {'node CPU':>9s} {'jitter p99':>11s} "
        f"{'missed':>7s} {'(stall)':>7s} {'stale':>6s} {'obs->cmd p99':>13s} {'swaps':>6s}"
    )
    for r in result["rows"]:
        print(
            f"  {r['rate_hz']:5.0f}Hz {r['sensor_scale']:7.0f}x {r['input_msgs_per_s']:8.0f} "
            f"{r['node_cpu_percent']:8.1f}% {r['jitter_ms_p99']:9.3f}ms {r['missed_ticks']:7d} "
            f"{r['missed_ticks_in_machine_stalls']:7d} {r['stale_actions_published']:6d} "
            f"{r['obs_to_cmd_ms_p99']:11.1f}ms "
            f"{r['swaps']:3d}/{r['swaps'] + r['failed_swaps']:<2d}"
        )
    for rate, ratio in result["cpu_ratio_by_rate"].items():
        us = result["us_per_input_message_by_rate"][rate]
        print(
            f"  {rate} Hz: node CPU at the highest sensor scale / lowest {ratio:.2f} (target <= 1.5), "
            f"{us:.1f} us of node CPU per extra input message"
        )
    targets = {
        "jitter_ms_p99": "<= 1",
        "missed_ticks": "0",
        "stale_actions_published": "0",
        "swap_missed_ticks": "0",
    }
    print("  reference row (first rate, scale 1, with swaps):")
    for key, value in result.items():
        if key in ("rows", "cpu_ratio_by_rate", "us_per_input_message_by_rate"):
            continue
        shown = f"{value:.3f}" if isinstance(value, float) else str(value)
        print(f"    {key:26s} {shown:>12s}  {('target ' + targets[key]) if key in targets else ''}")


if __name__ == "__main__":
    sys.exit(main())
