"""Remote policy benchmarks: one policy node serving several controllers; 100 Hz behind a lossy link.

    python bench/remote_policy.py fleet [--robots 4] [--seconds 20]   # batch graph, loop, worker per robot
    python bench/remote_policy.py link [--seconds 30] [--baseline]    # 100 Hz, 20% loss + reordering

fleet: `--robots` controller_node processes (namespaces robot1..N, `policy.source: remote`) and one
policy_node (`policy.robots: [robot1, ...]`, the shipped model) on this machine; this process publishes
every robot's sensors (stamped with wall time) and records each chunk's arrival (the rmw receipt time)
against its observation stamp. A chunk is due when its first action is (t_obs + first_offset * period);
"within one period of due" = age at arrival <= (first_offset + 1) * period. Three rows in the same
benchmark, all with the same weights: a network of the shipped model's size and card (random weights:
the shipped model has no checkpoint to re-export) exported at batch 1 and at batch `--graph-batch`
(default: one row per robot). `policy.batch: true` with the batch-1 graph (the robots due together in
one pass of one worker thread: a loop of single runs), `false` with it (a worker thread per robot), and
`true` with the batch graph (the due robots in ONE run); then the batch graph's ratios to a worker per
robot. `--model PATH` runs the first two rows on that model instead (the batch row needs the pair).

link: one controller at 100 Hz (the tiny model, horizon 16, period 10 ms), the policy node behind
link_emulator (10 +- 5 ms, 20% loss, 20% reordered by 20 ms, 5% duplicated): missed ticks, stale actions
published, chunks dropped, safe entries from the controller's /diagnostics and timing topic.
"""

from __future__ import annotations

import argparse
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

from diffusion_controller.core.chunk import is_stale
from diffusion_controller.ros import dds

ROOT = Path(__file__).resolve().parents[1]

MODEL = ROOT / "models" / "ant_locomotion.onnx"
CONFIG = ROOT / "config" / "ant.yaml"
JOINTS = ("hip_1", "ankle_1", "hip_2", "ankle_2", "hip_3", "ankle_3", "hip_4", "ankle_4")


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Procs:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "w")  # noqa: SIM115
        p = subprocess.Popen([sys.executable, "-m", *args], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        self.procs[name] = p
        return p

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in self.procs.values():
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()


class Bench:
    """This process's node: sensors for each namespace, chunk arrivals, diagnostics, timing rows."""

    def __init__(self, namespaces: list[str]) -> None:
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from geometry_msgs.msg import Twist
        from nav_msgs.msg import Odometry
        from rclpy.executors import SingleThreadedExecutor
        from sensor_msgs.msg import Imu, JointState
        from std_msgs.msg import Float64MultiArray
        from trajectory_msgs.msg import JointTrajectory

        from diffusion_controller.ros.chunks import CHUNK_QOS

        rclpy.init()
        self.rclpy = rclpy
        self.node = rclpy.create_node("remote_policy_bench")
        self.types = {"joint_states": JointState, "imu_sensor_broadcaster/imu": Imu, "odom": Odometry,
                      "cmd_vel": Twist}  # fmt: skip
        self.periods = {
            "joint_states": 0.01,
            "imu_sensor_broadcaster/imu": 0.01,
            "odom": 0.02,
            "cmd_vel": 1.0,
        }
        self.pubs = {
            (ns, t): self.node.create_publisher(cls, f"/{ns}/{t}" if ns else f"/{t}", 10)
            for ns in namespaces
            for t, cls in self.types.items()
        }
        self.lock = threading.Lock()
        self.arrivals: dict[str, list[tuple[float, float]]] = {ns: [] for ns in namespaces}  # (t_obs, recv)
        self.diag: dict[str, dict[str, str]] = {}
        self.timing: list[tuple[float, ...]] = []
        for ns in namespaces:
            topic = f"/{ns}/policy/chunk" if ns else "/policy/chunk"
            self.node.create_subscription(
                JointTrajectory, topic, lambda m, info, ns=ns: self._on_chunk(ns, m, info), CHUNK_QOS
            )
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, 50)
        self.node.create_subscription(
            Float64MultiArray, "/diffusion_controller/debug/command_timing", self._on_timing, 200
        )
        self.executor = SingleThreadedExecutor()
        self.executor.add_node(self.node)
        self._stop = threading.Event()
        self.threads = [threading.Thread(target=self.executor.spin, daemon=True),
                        threading.Thread(target=self._feed, daemon=True)]  # fmt: skip
        for t in self.threads:
            t.start()

    def _on_chunk(self, ns: str, msg, info) -> None:
        t_obs = msg.header.stamp.sec + 1e-9 * msg.header.stamp.nanosec
        recv = 1e-9 * info["received_timestamp"] if isinstance(info, dict) else 1e-9 * info.received_timestamp
        with self.lock:
            self.arrivals[ns].append((t_obs, recv))

    def _on_diag(self, msg) -> None:
        with self.lock:
            for st in msg.status:
                self.diag[st.name] = {kv.key: kv.value for kv in st.values}

    def _on_timing(self, msg) -> None:
        with self.lock:
            self.timing.append(tuple(msg.data))

    def _message(self, topic: str, t: float):
        msg = self.types[topic]()
        ns = round(t * 1e9)
        if topic != "cmd_vel":
            msg.header.stamp.sec, msg.header.stamp.nanosec = ns // 1_000_000_000, ns % 1_000_000_000
        if topic == "joint_states":
            msg.name = list(JOINTS)
            msg.position = [0.1 * math.sin(t + i) for i in range(8)]
            msg.velocity = [0.1 * math.cos(t + i) for i in range(8)]
        elif topic == "odom":
            msg.header.frame_id, msg.child_frame_id = "odom", "base_link"
            msg.pose.pose.orientation.w = 1.0
            msg.twist.twist.linear.x = 0.2
        elif topic == "cmd_vel":
            msg.linear.x = 0.2
        else:
            msg.orientation.w = 1.0
        return msg

    def _feed(self) -> None:
        due = dict.fromkeys(self.pubs, time.monotonic())
        while not self._stop.is_set():
            now = time.monotonic()
            for key, pub in self.pubs.items():
                if now >= due[key]:
                    due[key] = max(due[key] + self.periods[key[1]], now)
                    pub.publish(self._message(key[1], time.time()))
            time.sleep(max(0.0, min(due.values()) - time.monotonic()))

    def close(self) -> None:
        self._stop.set()
        self.executor.shutdown()
        self.node.destroy_node()
        self.rclpy.shutdown()


def wait(pred, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.1)
    return False


def controller(ns: str, model: Path, *extra: str) -> list[str]:
    args = [
        "diffusion_controller.ros.controller_node",
        "--ros-args",
        "--params-file",
        str(CONFIG),
        "-p",
        f"model_path:={model}",
        "-p",
        "policy.source:=remote",
        "-p",
        "outputs.trajectory.enabled:=false",
    ]
    if ns:
        args += ["-r", f"__ns:=/{ns}", "-p", "outputs.debug.enabled:=false"]
    return args + list(extra)  # fmt: skip


def export_pair(out_dir: Path, graph_batch: int) -> dict[int, Path]:
    """A network of the shipped model's size and card (random weights) exported at batch 1 and batch N."""
    from tiny_models import tiny_network

    from diffusion_controller.core.card_source import card_of_model
    from diffusion_controller.training.export import export_onnx

    card = card_of_model(MODEL, lambda _m: None)
    card = card.replace(name=f"{card.name}_random_weights")  # what the logs say runs
    size = {k: int(card.network[k]) for k in ("layers", "heads", "width")}
    net = tiny_network(card, **size, seed=0)
    sizes = sorted({1, graph_batch})
    return {b: export_onnx(net, card, out_dir / f"fleet_batch{b}.onnx", batch=b) for b in sizes}


def fleet(robots: int, seconds: float, batch: bool, log_dir: Path, model: Path = MODEL) -> dict:
    namespaces = [f"robot{i + 1}" for i in range(robots)]
    procs = Procs(log_dir)
    bench = Bench(namespaces)
    try:
        for ns in namespaces:
            procs.start(f"controller_{ns}_{batch}_{model.stem}", controller(ns, model))
        robots_list = "[" + ",".join(namespaces) + "]"
        pol = procs.start(f"policy_{batch}_{model.stem}", [
            "diffusion_controller.ros.policy_node", "--ros-args", "--params-file", str(CONFIG),
            "-p", f"model_path:={model}", "-p", f"policy.robots:={robots_list}",
            "-p", f"policy.batch:={str(batch).lower()}",
        ])  # fmt: skip
        running = lambda: all(  # noqa: E731
            bench.diag.get(f"/{ns}/diffusion_controller: control loop", {}).get("state") == "running"
            for ns in namespaces
        )
        if not wait(running, 90.0):
            raise RuntimeError(f"controllers did not run; logs in {log_dir}")
        time.sleep(2.0)
        with bench.lock:
            for a in bench.arrivals.values():
                a.clear()
        cpu0, t0 = cpu_seconds(pol.pid), time.monotonic()
        time.sleep(seconds)
        cpu1, t1 = cpu_seconds(pol.pid), time.monotonic()
        time.sleep(1.2)
        with bench.lock:
            arrivals = {ns: list(a) for ns, a in bench.arrivals.items()}
            diag = dict(bench.diag)
    finally:
        bench.close()
        procs.stop()
    period, first_offset = 0.02, 1
    limit = (first_offset + 1) * period
    per_robot = {}
    for ns, a in arrivals.items():
        ages = np.array([recv - t_obs for t_obs, recv in a])
        ctl = diag.get(f"/{ns}/diffusion_controller: control loop", {})
        per_robot[ns] = {
            "chunks_per_s": len(a) / (t1 - t0),
            "age_ms_p50": 1000 * float(np.percentile(ages, 50)) if len(ages) else math.nan,
            "age_ms_p99": 1000 * float(np.percentile(ages, 99)) if len(ages) else math.nan,
            "within_one_period_of_due": float(np.mean(ages <= limit)) if len(ages) else math.nan,
            "missed_steps": ctl.get("missed_steps"),
            "safe_entries": ctl.get("safe_entries"),
        }
    pol_diag = diag.get("/diffusion_policy: policy", {})
    chunks = sum(len(a) for a in arrivals.values())
    within = [v["within_one_period_of_due"] for v in per_robot.values()]
    return {
        "batch": batch,
        "robots": robots,
        "model": str(model),
        "graph_batch": int(pol_diag.get("graph_batch", 1)),
        "model_runs": pol_diag.get("model_runs"),
        "within_one_period_of_due": float(np.nanmean(within)) if within else math.nan,
        "policy_cpu_ms_per_chunk": 1000 * (cpu1 - cpu0) / max(chunks, 1),
        "policy_cpu_share": (cpu1 - cpu0) / (t1 - t0),
        "pass_ms_p50": pol_diag.get("pass_p50_ms"),
        "pass_ms_p99": pol_diag.get("pass_p99_ms"),
        "run_ms_p50": pol_diag.get("run_p50_ms"),
        "passes": pol_diag.get("passes"),
        "per_robot": per_robot,
    }


def link(seconds: float, log_dir: Path, local: bool = False) -> dict:
    from tiny_models import make_tiny_model

    model = make_tiny_model(log_dir / "tiny", name="tiny_100hz", horizon=16, period=0.01)
    procs = Procs(log_dir)
    bench = Bench([""])
    relaxed = [a for s in ("joint_states", "imu", "odom") for a in ("-p", f"observations.{s}.timeout_s:=0.5")]
    try:
        args = controller("", model, *relaxed)
        if local:  # the baseline: the same controller running the model itself; no policy node, no link
            args[args.index("policy.source:=remote")] = "policy.source:=local"
        procs.start("controller", args)
        if not local:
            procs.start("policy", ["diffusion_controller.ros.policy_node", "--ros-args", "--params-file",
                                   str(CONFIG), "-p", f"model_path:={model}", "-p",
                                   "policy.chunk_topic:=policy/chunk_tx"])  # fmt: skip
            link_args = ["--in", "/policy/chunk_tx", "--out", "/policy/chunk", "--delay", "0.01",
                         "--jitter", "0.005", "--loss", "0.2", "--reorder", "0.2", "--reorder-s", "0.02",
                         "--duplicate", "0.05"]  # fmt: skip
            procs.start("link", ["diffusion_controller.sim.link_emulator", *link_args])
        name = "/diffusion_controller: control loop"
        if not wait(lambda: bench.diag.get(name, {}).get("state") == "running", 90.0):
            raise RuntimeError(f"controller did not run; logs in {log_dir}")
        time.sleep(2.0)
        before = dict(bench.diag[name])
        pol_before = dict(bench.diag.get("/diffusion_controller: policy", {}))
        n0 = len(bench.timing)
        time.sleep(seconds)
        time.sleep(1.2)
        after = dict(bench.diag[name])
        pol_after = dict(bench.diag.get("/diffusion_controller: policy", {}))
        rows = np.array(bench.timing[n0:])
    finally:
        bench.close()
        procs.stop()
    run = rows[rows[:, 6] == 1.0]
    stale = int(np.sum(is_stale(run[:, 2], run[:, 1], 0.01)))

    def delta(d0, d1, key):
        return int(float(d1.get(key, 0))) - int(float(d0.get(key, 0)))

    return {
        "ticks": delta(before, after, "ticks"),
        "missed_ticks": delta(before, after, "missed_ticks"),
        "missed_steps": delta(before, after, "missed_steps"),
        "safe_entries": delta(before, after, "safe_entries"),
        "stale_actions_published": stale,
        "running_fraction": float(len(run) / max(len(rows), 1)),
        "chunks_received": delta(pol_before, pol_after, "chunks_received"),
        "chunks_dropped": delta(pol_before, pol_after, "chunks_dropped"),
        "jitter_p99_ms": after.get("jitter_p99_ms"),
        "rate_hz": after.get("rate_hz"),
    }


def fleet_rows(args: argparse.Namespace, log_dir: Path) -> dict:
    """The fleet's rows (loop, a worker per robot, the batch graph) and the batch graph's ratios."""
    n = args.graph_batch or args.robots
    pair = export_pair(log_dir, n)
    single = args.model or pair[1]
    rows = [fleet(args.robots, args.seconds, b, log_dir, single) for b in (True, False)]
    for r in rows:
        loop = "one pass for all due robots (a loop of single runs)"
        r["mode"] = loop if r["batch"] else "a worker per robot"
    out: dict = {"rows": rows}
    if n > 1:
        row = fleet(args.robots, args.seconds, True, log_dir, pair[n])
        row["mode"] = f"one run of the batch-{n} graph for the due robots"
        rows.append(row)
        keys = ("policy_cpu_ms_per_chunk", "policy_cpu_share", "within_one_period_of_due")
        out["batched_over_per_robot"] = {k: row[k] / rows[1][k] for k in keys}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="remote policy benchmarks (see module docstring)")
    p.add_argument("what", choices=("fleet", "link"))
    p.add_argument("--robots", type=int, default=4)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--baseline", action="store_true", help="link: also the same controller running the model")
    p.add_argument("--json", action="store_true")
    p.add_argument("--graph-batch", type=int, default=None, help="fleet: batch graph rows (default robots)")
    p.add_argument("--model", type=Path, default=None, help="fleet: the batch-1 rows' model (default: pair)")
    args = p.parse_args(argv)
    dds.one_host_udp(os.environ)
    os.environ.setdefault("ROS_DOMAIN_ID", str(100 + os.getpid() % 100))
    log_dir = Path(tempfile.mkdtemp(prefix="remote_policy_"))
    if args.what == "fleet":
        out = fleet_rows(args, log_dir)
        for r in out["rows"]:
            mode = r["mode"]
            print(f"{mode}: policy CPU {r['policy_cpu_ms_per_chunk']:.2f} ms/chunk "
                  f"({100 * r['policy_cpu_share']:.0f}% of a core), pass p50 {r['pass_ms_p50']} ms, "
                  f"run p50 {r['run_ms_p50']} ms, model runs {r['model_runs']}, within one period of due "
                  f"{100 * r['within_one_period_of_due']:.1f}%")  # fmt: skip
            for ns, v in r["per_robot"].items():
                print(f"  {ns}: {v['chunks_per_s']:.1f} chunks/s, age at arrival p50 {v['age_ms_p50']:.1f} / "
                      f"p99 {v['age_ms_p99']:.1f} ms, within one period of due "
                      f"{100 * v['within_one_period_of_due']:.1f}%, missed steps "
                      f"{v['missed_steps']}")  # fmt: skip
        for key, value in out.get("batched_over_per_robot", {}).items():
            print(f"batch graph / a worker per robot: {key} {value:.2f}")
    else:
        out = {"remote behind the link": link(args.seconds, log_dir)}
        if args.baseline:
            out["local (baseline)"] = link(args.seconds, log_dir / "local", local=True)
        print(json.dumps(out, indent=1))
    print(f"logs: {log_dir}")
    if args.json:
        print(json.dumps(out, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
