"""Control-loop benchmark: the controller node as a process under sensor load, with model swaps.

Not a test. Three processes talk over DDS on this machine: the controller node (config/ant.yaml, a
DiffuseLoco-size policy -- 6 layers, 8 heads, width 256, history 8, horizon 16 -- on the CPU with one ORT
thread), a sensor process publishing joint states at 500 Hz, IMU at 200 Hz, odometry at 50 Hz and a
velocity command at 1 Hz (SCHED_FIFO 45 where allowed, as a robot's drivers run), and this process,
which records the node's per-tick timing topic, swaps the model every 10 s through the `model_path`
parameter and reads /diagnostics.

From the timing topic ([tick_time, exec_time, action_time, obs_stamp, chunk_seq, index, state, missed]):
tick jitter = |tick interval - period|; missed ticks = timer ticks that did not happen (an interval of
~2 periods is one missed tick); obs->cmd = tick_time - obs_stamp (age of the newest observation behind the
published command); a stale action is one with action_time < exec_time - period/2 (DESIGN.md stale rule).
Swap windows run from the parameter call until /diagnostics names the new model, plus one second.

    .venv/bin/python bench/control_loop.py [--duration 60 | --quick] [--json] [--steps K] [--executor ...]

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

from diffusion_controller.ros.config import EXECUTORS

ROOT = Path(__file__).resolve().parents[1]
NODE = "/diffusion_controller"
PERIOD = 0.02
TICK, EXEC, ACTION, OBS, SEQ, INDEX, STATE, MISSED = range(8)
RUNNING = 1.0
JOINTS = ["hip_1", "ankle_1", "hip_2", "ankle_2", "hip_3", "ankle_3", "hip_4", "ankle_4"]


# -- models ------------------------------------------------------------------------------------------------


def make_models(model_dir: Path, steps: int) -> list[Path]:
    """Two DiffuseLoco-size policies with the ant's observation layout (different random weights)."""
    paths = [model_dir / f"bench_loop_k{steps}_{tag}" / f"bench_loop_k{steps}_{tag}.onnx" for tag in "ab"]
    if all(p.exists() for p in paths):
        return paths
    from diffusion_controller.training.tiny import make_tiny_model

    for seed, p in enumerate(paths):
        if not p.exists():
            print(f"[bench] exporting {p.name} (6x256, K={steps}) ...", file=sys.stderr, flush=True)
            make_tiny_model(p.parent, name=p.stem, seed=seed, layers=6, heads=8, width=256, steps=steps,
                            horizon=16, history=8)  # fmt: skip
    return paths


# -- sensor process ----------------------------------------------------------------------------------------


def run_sensors(duration: float) -> int:
    """Publish the ant's sensor streams at robot rates, stamped with the publishing time."""
    import rclpy
    from geometry_msgs.msg import Twist
    from nav_msgs.msg import Odometry
    from sensor_msgs.msg import Imu, JointState

    with contextlib.suppress(OSError, AttributeError):  # like a robot's drivers: real-time where allowed
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(45))
    rclpy.init()
    node = rclpy.create_node("bench_sensors")
    pubs = {
        "js": (node.create_publisher(JointState, "/joint_states", 10), 1 / 500),
        "imu": (node.create_publisher(Imu, "/imu_sensor_broadcaster/imu", 10), 1 / 200),
        "odom": (node.create_publisher(Odometry, "/odom", 10), 1 / 50),
        "cmd": (node.create_publisher(Twist, "/cmd_vel", 10), 1.0),
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
            time.sleep(max(0.0, min(due.values()) - time.monotonic()))
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


def analyse(rows: np.ndarray, swap_windows: list[tuple[float, float]]) -> dict:
    ticks = rows[:, TICK]
    dt = np.diff(ticks)
    jitter_ms = np.abs(dt - PERIOD) * 1000.0
    missed = np.maximum(np.rint(dt / PERIOD) - 1, 0)
    run = rows[(rows[:, STATE] == RUNNING) & (rows[:, MISSED] == 0)]
    stale = run[:, ACTION] < run[:, EXEC] - PERIOD / 2 - 1e-9
    obs_to_cmd = (run[:, TICK] - run[:, OBS]) * 1000.0
    in_swap = np.zeros(len(dt), bool)
    for a, b in swap_windows:
        in_swap |= (ticks[1:] >= a) & (ticks[:-1] <= b)
    return {
        "rate_hz": (len(ticks) - 1) / (ticks[-1] - ticks[0]),
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of measurement (default 60)")
    ap.add_argument("--quick", action="store_true", help="20 s instead of --duration")
    ap.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    ap.add_argument("--steps", type=int, default=3, help="DDIM steps K of the fused graph (default 3)")
    ap.add_argument("--swap-every", type=float, default=10.0, help="seconds between model swaps")
    ap.add_argument(
        "--executor", default="auto", choices=list(EXECUTORS), help="the node's main executor (default auto)"
    )
    ap.add_argument(
        "--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "diffusion_controller_bench"
    )
    ap.add_argument("--sensors", type=float, default=None, help=argparse.SUPPRESS)  # child mode
    args = ap.parse_args(argv)
    if args.sensors is not None:
        return run_sensors(args.sensors)
    duration = 20.0 if args.quick else args.duration
    os.environ.setdefault("ROS_DOMAIN_ID", str(60 + os.getpid() % 40))
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    os.environ.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")

    models = make_models(args.model_dir, args.steps)
    load0 = os.getloadavg()[0]

    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from rcl_interfaces.srv import SetParameters
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.parameter import Parameter
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from std_msgs.msg import Float64MultiArray

    log = open(args.model_dir / "control_loop_node.log", "w")  # noqa: SIM115
    node_proc = subprocess.Popen(
        [sys.executable, "-m", "diffusion_controller.ros.controller_node", "--ros-args",
         "--params-file", str(ROOT / "config" / "ant.yaml"), "-p", f"model_path:={models[0]}",
         "-p", "provider:=cpu", "-p", "threads:=1", "-p", f"executor:={args.executor}"],
        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
    )  # fmt: skip
    sensors = subprocess.Popen([sys.executable, __file__, "--sensors", str(duration + 120)], cwd=ROOT)

    rclpy.init()
    obs = rclpy.create_node("bench_observer")
    rows: list[list[float]] = []
    diag: dict[str, dict[str, str]] = {}
    lock = threading.Lock()

    def on_timing(msg):
        with lock:
            rows.append(list(msg.data))

    def on_diag(msg):
        for st in msg.status:
            if st.name.startswith(NODE + ":"):
                diag[st.name.split(": ", 1)[1]] = {kv.key: kv.value for kv in st.values}

    obs.create_subscription(Float64MultiArray, f"{NODE}/debug/command_timing", on_timing,
                            QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE))  # fmt: skip
    obs.create_subscription(DiagnosticArray, "/diagnostics", on_diag, 10)
    client = obs.create_client(SetParameters, f"{NODE}/set_parameters")
    ex = SingleThreadedExecutor()
    ex.add_node(obs)
    spin = threading.Thread(target=ex.spin, daemon=True)
    spin.start()

    def wait(pred, timeout):
        end = time.monotonic() + timeout
        while time.monotonic() < end and not pred():
            time.sleep(0.05)
        return pred()

    result: dict = {}
    try:
        if not wait(lambda: rows and rows[-1][STATE] == RUNNING, 90.0):
            raise RuntimeError("the node did not reach RUNNING; see " + log.name)
        time.sleep(2.0)  # settle
        with lock:
            rows.clear()
        t_start = time.time()
        cpu0, wall0 = cpu_seconds(node_proc.pid), time.monotonic()
        swap_windows: list[tuple[float, float]] = []
        swaps, failed = 0, 0
        next_swap, k = time.monotonic() + args.swap_every, 1
        end = time.monotonic() + duration
        while time.monotonic() < end:
            if time.monotonic() >= next_swap and time.monotonic() < end - 3.0:
                target = models[k % 2]
                req = SetParameters.Request(
                    parameters=[Parameter("model_path", value=str(target)).to_parameter_msg()]
                )
                t_req = time.time()
                fut = client.call_async(req)
                ok = wait(fut.done, 5.0) and fut.result().results[0].successful
                done = ok and wait(lambda t=target: diag.get("policy", {}).get("path") == str(t), 10.0)
                swap_windows.append((t_req, time.time() + 1.0))
                swaps += bool(done)
                failed += not done
                k += 1
                next_swap += args.swap_every
            time.sleep(0.05)
        cpu = 100.0 * (cpu_seconds(node_proc.pid) - cpu0) / (time.monotonic() - wall0)
        with lock:
            data = np.array([r for r in rows if r[TICK] >= t_start])
        result = analyse(data, swap_windows)
        pol = diag.get("policy", {})
        loop = diag.get("control loop", {})
        result.update(
            tick_cost_ms_p99=float(loop.get("tick_cost_p99_ms", "nan")),
            swaps=swaps,
            failed_swaps=failed,
            cpu_percent=cpu,
            compute_ms_p50=float(pol.get("compute_p50_ms", "nan")),
            compute_ms_p99=float(pol.get("compute_p99_ms", "nan")),
            inference_ms_p50=float(pol.get("inference_p50_ms", "nan")),
            inference_ms_p99=float(pol.get("inference_p99_ms", "nan")),
            steps=args.steps,
            executor=args.executor,
            duration_s=duration,
            loadavg_start=load0,
            loadavg_end=os.getloadavg()[0],
            cores=os.cpu_count(),
        )
    finally:
        for p in (sensors, node_proc):
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        rc = node_proc.wait(20)
        sensors.wait(10)
        ex.shutdown(timeout_sec=2.0)
        spin.join(2.0)
        obs.destroy_node()
        rclpy.try_shutdown()
        log.close()
    result["node_exit_code"] = rc

    print(
        f"control loop, {result['duration_s']:.0f} s at 50 Hz, DiffuseLoco-size policy (6x256, "
        f"K={args.steps}) on CPU, executor {args.executor}, "
        f"load avg {load0:.2f} -> {result['loadavg_end']:.2f}"
    )
    targets = {
        "jitter_ms_p99": "<= 1",
        "missed_ticks": "0",
        "stale_actions_published": "0",
        "swap_missed_ticks": "0",
    }
    for key, value in result.items():
        shown = f"{value:.3f}" if isinstance(value, float) else str(value)
        print(f"  {key:26s} {shown:>12s}  {('target ' + targets[key]) if key in targets else ''}")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
