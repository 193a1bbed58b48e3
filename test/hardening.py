"""Hardening scenarios: bad input, faults and load against the controller node as a real process.

Shared by test/test_hardening_*.py (one pytest test per scenario) and bench/robustness.py (every scenario,
a table and JSON), so the suite and the report measure the same thing. A scenario is
setup -> inject -> observe -> verdict: it gets a `Harness` and a `Result` it adds its own checks to.

The harness: node processes (config/ant.yaml, tiny random policies made at run time, nice -10 as a
controller is deployed beside other work), a sensor process publishing the ant's four streams (SCHED_FIFO
where allowed: a starved test process must not pass for a node that drops data; it also injects the bad
messages, from the same writer so stamps stay ordered), and a test-side ROS node recording every output
with its publication sequence number (DDS losses on a loaded machine are counted, never mistaken for the
node's doing). Around every scenario, for every node it watched, `Watch.verdict` checks what holds
whatever happened:

- the node process is alive (or exited 0 when the scenario stopped it);
- it kept ticking: no gap in the node-clock tick times of ~/debug/command_timing (missed ticks); a tick
  slot inside a stall that the real-time sensor process suffered too is the machine's, counted apart
  (`count_missed`), since no node ticks while the machine does not run it;
- no unsafe output: every Float64MultiArray command and every JointTrajectory point is finite, inside the
  card's limits and within `max_step_per_tick` of the one before (the first command of a process and the
  first after a clock jump start a new episode, DESIGN.md), and no RUNNING tick executed a stale action
  (action_time < exec_time - period/2).

What the node is expected to do (DESIGN.md, README): reject bad input with one rate-limited log line per
cause and a count on /diagnostics, go to the safe state (hold) when a required stream is stale and come
back by itself, refuse a model swap that cannot work while the old model keeps running, exit 0 on SIGINT
and SIGTERM, and start a new episode when the sim clock jumps back.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from geometry_msgs.msg import Twist, TwistStamped
from nav_msgs.msg import Odometry
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from ros_helpers import (
    NodeProcess,
    Probe,
    console_script,
    cpu_seconds,
    diagnostic_status,
    rss_mb,
    wait_until,
)
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import Imu, JointState
from std_msgs.msg import Float64MultiArray, String
from trajectory_msgs.msg import JointTrajectory

from diffusion_controller.core.card import ModelCard

ROOT = Path(__file__).resolve().parents[1]
NODE_NAME = "diffusion_controller"
#: How ~/model is published (latched): a subscriber that comes later still gets the current model.
LATCHED = QoSProfile(
    depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL
)
ANT_JOINTS = ("hip_1", "ankle_1", "hip_2", "ankle_2", "hip_3", "ankle_3", "hip_4", "ankle_4")
#: ~/debug/command_timing columns (loop.ControlLoop._timing_row) and state codes.
TICK, EXEC, ACTION, OBS, SEQ, INDEX, STATE, MISSED = range(8)
WAITING, RUNNING, SAFE, ESTOP = 0.0, 1.0, 2.0, 3.0
#: config/ant.yaml values the verdicts depend on.
MAX_STEP = 0.25
TIMEOUTS = {"joint_states": 0.1, "imu": 0.1, "odom": 0.2}
#: A machine stall at least this long can rightly make the node SAFE: the last IMU message before it (10 ms
#: period) plus DDS delivery is then older than the shortest timeout. It may take STALL_RECOVERY_S to recover.
STALL_STALE_S, STALL_RECOVERY_S = min(TIMEOUTS.values()) - 0.015, 1.0
STREAMS = ("joint_states", "imu", "odom", "cmd_vel")
TOPICS = {
    "joint_states": "/joint_states",
    "imu": "/imu_sensor_broadcaster/imu",
    "odom": "/odom",
    "cmd_vel": "/cmd_vel",
}
TYPES = {"joint_states": JointState, "imu": Imu, "odom": Odometry, "cmd_vel": Twist}
#: /diagnostics period of the nodes under test (a scenario waits for a fresh report after it acts).
DIAG_PERIOD = 0.25
#: The feeder's normal rates (Hz): a ros2_control robot's joint states and IMU, odometry, a teleop.
NORMAL_RATES = {"joint_states": 200.0, "imu": 100.0, "odom": 50.0, "cmd_vel": 1.0}
#: A sensor-process wake-up later than this is recorded as a machine stall (at most MAX_STALLS kept).
STALL_MIN_S, MAX_STALLS = 0.002, 1000


# -- models --------------------------------------------------------------------------------------------------


def _edit_output(
    src: Path, dst: Path, name: str, extra_nodes: Callable[[str, str], list], inits: list
) -> Path:
    """Copy `src` with its `actions` output rerouted through `extra_nodes(raw, out)` and the card renamed.

    The card is otherwise unchanged, so the node accepts the file as the same layout: only running it shows
    what the graph does."""
    import onnx

    model = onnx.load(str(src))
    out = ModelCard.from_onnx(src).graph.outputs["actions"]
    raw = out + "_raw"
    for node in model.graph.node:
        node.output[:] = [raw if o == out else o for o in node.output]
    model.graph.node.extend(extra_nodes(raw, out))
    model.graph.initializer.extend(inits)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    card = ModelCard.from_onnx(src).replace(name=name)
    card.to_onnx(dst)
    card.to_yaml(dst.with_suffix(".yaml"))
    return dst


def nan_model(src: Path, dst: Path) -> Path:
    """The same policy with every output multiplied by NaN: a valid file and card, a useless model."""
    from onnx import helper, numpy_helper

    nan = numpy_helper.from_array(np.array(math.nan, dtype=np.float32), "nan_scale")
    return _edit_output(
        src, dst, "tiny_nan", lambda raw, out: [helper.make_node("Mul", [raw, "nan_scale"], [out])], [nan]
    )


#: Matrix products per unit of the velocity command's yaw rate in a tunable model (see `tunable_model`).
TUNABLE_PER_UNIT = 1000.0


def tunable_model(src: Path, dst: Path, name: str, size: int = 256) -> Path:
    """The same policy plus a loop of (size x size) matrix products, as many as TUNABLE_PER_UNIT times the
    yaw rate of the newest velocity command in the input, adding exactly 0 to the output.

    A test makes inference slow (or too slow) while the node runs by publishing a /cmd_vel with
    angular.z > 0, and fast again with 0: the node sees one model whose compute time changes, as when a
    GPU throttles or another program takes the CPU. Nothing folds at load time: the count is an input."""
    from onnx import TensorProto, helper, numpy_helper

    card = ModelCard.from_onnx(src)
    wz = card.feature_slice(card.feature_of_kind("velocity_command").name).start + 2
    obs = card.graph.inputs["obs_history"]
    inits = [
        numpy_helper.from_array(np.eye(size, dtype=np.float32), "tn_eye"),
        numpy_helper.from_array(np.array(0.0, dtype=np.float32), "tn_zero"),
        numpy_helper.from_array(np.array(TUNABLE_PER_UNIT, dtype=np.float32), "tn_scale"),
        numpy_helper.from_array(np.array([card.history - 1, wz], dtype=np.int64), "tn_start"),
        numpy_helper.from_array(np.array([card.history, wz + 1], dtype=np.int64), "tn_end"),
        numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "tn_axes"),
        numpy_helper.from_array(np.array(True), "tn_true"),
    ]
    square = [size, size]
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["x_in", "tn_eye"], ["x_out"]),
            helper.make_node("Identity", ["c_in"], ["c_out"]),
        ],
        "tn_body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_in", TensorProto.FLOAT, square),
        ],
        [
            helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_out", TensorProto.FLOAT, square),
        ],
    )

    def nodes(raw: str, out: str) -> list:
        return [
            helper.make_node("Slice", [obs, "tn_start", "tn_end", "tn_axes"], ["tn_wz3"]),
            helper.make_node("ReduceMax", ["tn_wz3"], ["tn_wz"], keepdims=0),
            helper.make_node("Mul", ["tn_wz", "tn_scale"], ["tn_nf"]),
            helper.make_node("Relu", ["tn_nf"], ["tn_nr"]),
            helper.make_node("Cast", ["tn_nr"], ["tn_n"], to=TensorProto.INT64),
            helper.make_node("Mul", ["tn_wz", "tn_zero"], ["tn_z"]),
            helper.make_node("Add", ["tn_eye", "tn_z"], ["tn_x0"]),  # depends on the input: not folded
            helper.make_node("Loop", ["tn_n", "tn_true", "tn_x0"], ["tn_x"], body=body),
            helper.make_node("ReduceMean", ["tn_x"], ["tn_m"], keepdims=0),
            helper.make_node("Mul", ["tn_m", "tn_zero"], ["tn_d"]),
            helper.make_node("Add", [raw, "tn_d"], [out]),
        ]

    return _edit_output(src, dst, name, nodes, inits)


def predict_time(path: Path, yaw_rate: float = 0.0, n: int = 5) -> float:
    """Fastest predict() time of a model here with a velocity command of `yaw_rate` (one ORT thread, like
    the node): the uncontended speed; on a loaded machine it is only slower."""
    from diffusion_controller.core.runtime import Policy

    policy = Policy.load(path, provider="cpu", threads=1, warmup=1, log=lambda m: None)
    card = policy.card
    obs = np.array(np.broadcast_to(card.obs_mean, (card.history, card.obs_dim)))
    obs[:, card.feature_slice(card.feature_of_kind("velocity_command").name).start + 2] = yaw_rate
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        policy.predict(obs, seed=i)
        times.append(time.perf_counter() - t0)
    return float(np.min(times))


class Models:
    """The scenario models, made on first use in `root`: tiny policies and files derived from them."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._paths: dict[str, Path] = {}
        self.figures: dict[str, float] = {}
        self._per_unit_s: dict[str, float] = {}

    def __getitem__(self, key: str) -> Path:
        if key not in self._paths:
            self._paths[key] = getattr(self, "_make_" + key)()
        return self._paths[key]

    def yaw_rate_for(self, seconds: float, key: str) -> float:
        """The /cmd_vel angular.z that makes tunable model `key`'s predict take about `seconds` here at best.

        Measured as the fastest of many short runs: other programs only ever make a run slower, and a
        slower estimate would make the scenario's inference too fast."""
        if key not in self._per_unit_s:
            fast = predict_time(self[key], 0.0, n=9)
            slow = predict_time(self[key], 0.02, n=25)  # 20 products a run
            self._per_unit_s[key] = max((slow - fast) / 0.02, 1e-6)
            self.figures[f"{key}_ms_per_unit_yaw"] = 1000.0 * self._per_unit_s[key]
        return seconds / self._per_unit_s[key]

    def _make_a(self) -> Path:
        from diffusion_controller.training.tiny import make_tiny_model

        return make_tiny_model(self.root / "a", name="tiny_a")

    def _make_a16(self) -> Path:
        """Horizon 16 (320 ms of actions): room for inference several periods long."""
        from diffusion_controller.training.tiny import make_tiny_model

        return make_tiny_model(self.root / "a16", name="tiny_a16", horizon=16, seed=3)

    def _make_tunable8(self) -> Path:
        return tunable_model(self["a"], self.root / "tunable8" / "tiny_tunable8.onnx", "tiny_tunable8")

    def _make_tunable16(self) -> Path:
        return tunable_model(self["a16"], self.root / "tunable16" / "tiny_tunable16.onnx", "tiny_tunable16")

    def _make_directory(self) -> Path:
        path = self.root / "directory.onnx"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _sparse(self, name: str, mib: int) -> Path:
        """A file of `mib` MiB of zeros that takes no disk space (nothing in it is a model)."""
        path = self.root / name
        with open(path, "wb") as f:
            f.truncate(mib * 1024 * 1024)
        return path

    def _make_too_large(self) -> Path:
        return self._sparse("too_large.onnx", 768)  # the node's max_model_mb is 512

    def _make_zeros(self) -> Path:
        return self._sparse("zeros.onnx", 256)

    def _make_truncated(self) -> Path:
        data = self["a"].read_bytes()
        path = self.root / "truncated" / "tiny_truncated.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data[: len(data) // 2])  # a copy interrupted half way
        return path

    def _recarded(self, folder: str, name: str, **card_changes) -> Path:
        """A copy of the base model whose card has `card_changes` (and the name `name`)."""
        path = self.root / folder / f"{name}.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self["a"].read_bytes())
        ModelCard.from_onnx(path).replace(name=name, **card_changes).to_onnx(path)
        return path

    def _make_period(self) -> Path:
        """A valid ONNX whose card says 100 Hz: it does not fit the running 50 Hz configuration."""
        return self._recarded("period", "tiny_100hz", control_period_s=0.01)

    def _make_graph_mismatch(self) -> Path:
        """A card that fits the configuration but not its own graph (history 6 vs the graph's 4)."""
        return self._recarded("graph_mismatch", "tiny_history6", history=6)

    def _make_reordered(self) -> Path:
        """The same model with its action joints listed in another order: the published joint order would
        change under a joint_trajectory_controller that is already running."""
        card = ModelCard.from_onnx(self["a"])
        order = list(reversed(range(card.action_dim)))
        return self._recarded(
            "reordered", "tiny_reordered",
            action_joints=tuple(card.action_joints[i] for i in order),
            action_lower=card.action_lower[order], action_upper=card.action_upper[order],
            action_min=card.action_min[order], action_max=card.action_max[order],
        )  # fmt: skip

    def _make_nan(self) -> Path:
        return nan_model(self["a"], self.root / "nan" / "tiny_nan.onnx")


# -- sensors -------------------------------------------------------------------------------------------------


class SensorStreams:
    """The ant's four observation streams at set rates, stamped by `clock` (wall time or a sim clock).

    The publishing loop of the sensor process (`feeder_main`); `stamp`/`build` also make the good message a
    bad-input scenario mutates. `max_gap` is the longest pause between two messages of a stream, so a
    starved feeder is told apart from a node that drops data."""

    def __init__(self, node: Any, clock: Callable[[], float] = time.time, prefix: str = "") -> None:
        self.clock = clock
        self.pubs = {s: node.create_publisher(TYPES[s], prefix + TOPICS[s], 10) for s in STREAMS}
        self.rates = dict(NORMAL_RATES)
        self.paused: set[str] = set()
        self.sent: Counter[str] = Counter()
        self.max_gap: dict[str, float] = dict.fromkeys(STREAMS, 0.0)
        self.injections: dict[str, dict[str, Any]] = {}  # stream -> bad messages still to publish
        self.command = (0.2, 0.0)  # /cmd_vel (vx, yaw rate)
        self._last: dict[str, float] = {}
        self._due = dict.fromkeys(STREAMS, time.monotonic())
        # When this process woke later than it asked to: (start, end) in its stamp clock. At real-time
        # priority only the machine itself can hold it up, so these are the machine's stalls (`Analysis`).
        self.stalls: list[tuple[float, float]] = []
        self._wake = math.inf

    @staticmethod
    def stamp(msg: Any, t: float) -> Any:
        ns = max(round(t * 1e9), 0)
        msg.header.stamp.sec, msg.header.stamp.nanosec = ns // 1_000_000_000, ns % 1_000_000_000
        return msg

    @classmethod
    def build(cls, stream: str, t: float, command: tuple[float, float] = (0.2, 0.0)) -> Any:
        """The good message of `stream` at stamp time `t`; `command` is the (vx, yaw rate) of /cmd_vel."""
        if stream == "joint_states":
            msg = cls.stamp(JointState(), t)
            msg.name = list(ANT_JOINTS)
            msg.position = [0.1 * math.sin(t + i) for i in range(len(ANT_JOINTS))]
            msg.velocity = [0.1 * math.cos(t + i) for i in range(len(ANT_JOINTS))]
        elif stream == "imu":
            msg = cls.stamp(Imu(), t)
            msg.header.frame_id = "imu_link"
            msg.orientation.w = 1.0
            msg.angular_velocity.z = 0.05 * math.sin(t)
            msg.linear_acceleration.z = 9.81
        elif stream == "odom":
            msg = cls.stamp(Odometry(), t)
            msg.header.frame_id, msg.child_frame_id = "odom", "base_link"
            msg.pose.pose.orientation.w = 1.0
            msg.twist.twist.linear.x = 0.2
        else:
            msg = Twist()
            msg.linear.x, msg.angular.z = command
        return msg

    def inject(self, name: str, count: int, rate: float, replace: bool) -> None:
        """Publish `count` messages of mutation `name` at `rate` on its stream, beside the good ones or
        (`replace`) instead of them. One writer for both keeps the stamps in order."""
        stream, mutate = MUTATIONS[name]
        self.injections[stream] = {
            "mutate": mutate,
            "left": count,
            "period": 1.0 / rate,
            "due": time.monotonic(),
            "replace": replace,
        }

    def step(self) -> float:
        """Publish what is due; returns the monotonic time of the next message."""
        now = time.monotonic()
        late = now - self._wake
        if late > STALL_MIN_S:
            t = self.clock()
            self.stalls = [*self.stalls[-(MAX_STALLS - 1) :], (t - late, t)]
        for s, inj in list(self.injections.items()):
            while now >= inj["due"] and inj["left"] > 0:
                inj["due"] += inj["period"]
                inj["left"] -= 1
                t = self.clock()
                self.pubs[s].publish(inj["mutate"](self.build(s, t, self.command), t))
            if inj["left"] <= 0:
                del self.injections[s]
        for s in STREAMS:
            burst = 0
            replaced = s in self.injections and self.injections[s]["replace"]
            while now >= self._due[s] and burst < 5:  # catch up a little after a late wake-up
                self._due[s] += 1.0 / self.rates[s]
                burst += 1
                if s not in self.paused and not replaced:
                    self.pubs[s].publish(self.build(s, self.clock(), self.command))
                    self.sent[s] += 1
                    t = time.monotonic()
                    if s in self._last:
                        self.max_gap[s] = max(self.max_gap[s], t - self._last[s])
                    self._last[s] = t
            if now - self._due[s] > 0.1:
                self._due[s] = now  # far behind (a stall): restart the schedule instead of flooding
        self._wake = min([*self._due.values(), *(i["due"] for i in self.injections.values())])
        return self._wake

    def resume(self, streams: list[str]) -> None:
        for s in streams:
            self.paused.discard(s)
            self._last.pop(s, None)  # a deliberate pause is no gap


def feeder_main(argv: list[str]) -> int:
    """The sensor process: publishes the streams, obeys JSON-line commands on stdin, answers `stats`.

    A process of its own, at real-time priority when allowed (like a ros2_control driver), so a loaded
    test process never starves the streams: what a scenario sees is the node's doing. With a sim start
    time it also publishes /clock (real-time pace, 5 ms steps) and stamps with it."""
    import rclpy

    prefix, sim_start, priority = argv[0], float(argv[1]), int(argv[2])
    # Before rclpy.init: the DDS threads it starts inherit the priority. A real-time publisher whose DDS
    # threads are not would wait on their locks whenever they are starved (priority inversion).
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
    rclpy.init()
    node = rclpy.create_node("hardening_sensors")
    sim = {"t": sim_start}
    clock_pub = node.create_publisher(Clock, "/clock", QoSProfile(depth=10)) if sim_start > 0 else None
    streams = SensorStreams(node, (lambda: sim["t"]) if clock_pub else time.time, prefix)
    next_clock = time.monotonic()
    fd, pending = sys.stdin.fileno(), b""
    try:
        while True:
            if clock_pub is not None and time.monotonic() >= next_clock:
                # Like a simulator that falls behind: after a stall sim time resumes, it never races.
                next_clock = max(next_clock + 0.005, time.monotonic())
                sim["t"] += 0.005
                ns = round(sim["t"] * 1e9)
                msg = Clock()
                msg.clock.sec, msg.clock.nanosec = ns // 1_000_000_000, ns % 1_000_000_000
                clock_pub.publish(msg)
            due = streams.step()
            if clock_pub is not None:
                due = min(due, next_clock)
            ready, _, _ = select.select([fd], [], [], max(0.0, due - time.monotonic()))
            if not ready:
                continue
            chunk = os.read(fd, 65536)  # not sys.stdin: its buffer would hide a second line from select
            if not chunk:
                break  # the controlling process has gone
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                _feeder_command(json.loads(line), streams, sim)
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


def _feeder_command(cmd: dict[str, Any], streams: SensorStreams, sim: dict[str, float]) -> None:
    """One JSON command of the controlling process (see `Sensors`)."""
    streams.rates.update(cmd.get("rates", {}))
    streams.paused.update(cmd.get("pause", []))
    streams.resume(cmd.get("resume", []))
    sim["t"] += float(cmd.get("jump", 0.0))
    if "inject" in cmd:
        streams.inject(**cmd["inject"])
    if "command" in cmd:
        streams.command = tuple(cmd["command"])
        streams._due["cmd_vel"] = time.monotonic()  # out now, not at the next 1 Hz slot
    if cmd.get("reset_gaps"):
        streams.max_gap = dict.fromkeys(STREAMS, 0.0)
        streams.stalls = []
    if cmd.get("stats"):
        rt = os.sched_getscheduler(0) == os.SCHED_FIFO
        stats = {
            "sent": dict(streams.sent),
            "max_gap": streams.max_gap,
            "sim_time": sim["t"],
            "rt": rt,
            "injecting": sorted(streams.injections),
            "stalls": streams.stalls,
        }
        print(json.dumps(stats), flush=True)


class Sensors:
    """A sensor process (`feeder_main`) under a scenario's control: `pause`/`resume`/`set_rates`, `jump`
    (the sim clock) and `inject` (bad messages from MUTATIONS) are commands to it."""

    def __init__(self, prefix: str = "", sim_start: float = 0.0, priority: int = 20) -> None:
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--feeder",
            prefix,
            str(sim_start),
            str(priority),
        ]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True
        )
        self.paused: set[str] = set()
        self.sim = sim_start > 0
        self._lock = threading.Lock()

    def _send(self, **cmd: Any) -> dict[str, Any] | None:
        with self._lock:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
            return json.loads(self.proc.stdout.readline()) if cmd.get("stats") else None

    def pause(self, *streams: str) -> None:
        self.paused.update(streams)
        self._send(pause=list(streams))

    def resume(self, *streams: str) -> None:
        self.paused.difference_update(streams)
        self._send(resume=list(streams))

    def set_rates(self, rates: dict[str, float]) -> None:
        self._send(rates=rates)

    def set_command(self, vx: float = 0.2, yaw_rate: float = 0.0) -> None:
        """The /cmd_vel the sensor process publishes (the yaw rate also sets a tunable model's load)."""
        self._send(command=[vx, yaw_rate])

    def jump(self, seconds: float) -> None:
        self._send(jump=seconds)

    def stats(self, reset_gaps: bool = False) -> dict[str, Any]:
        """{"sent": {stream: n}, "max_gap": {stream: s}, "sim_time": t, "rt": bool, "stalls": [(t0, t1)]} of
        the sensor process (gaps and stalls since the last `reset_gaps`)."""
        return self._send(stats=True, reset_gaps=reset_gaps) or {}

    def inject(self, name: str, count: int, rate: float, replace: bool = False, wait: bool = True) -> None:
        """Have the sensor process publish `count` messages of mutation `name` at `rate` beside the good
        stream (or instead of it, `replace`); with `wait`, return when the last one is out."""
        self._send(inject={"name": name, "count": count, "rate": rate, "replace": replace})
        if wait:
            self.wait_injected(count / rate + 10.0)

    def wait_injected(self, timeout: float) -> bool:
        return wait_until(lambda: not self.stats()["injecting"], timeout, period=0.05)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(5.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()


def _seq(info: Any) -> int | None:
    """The writer's publication sequence number of a received message (None where rmw has none)."""
    seq = info.get("publication_sequence_number") if info else None
    return int(seq) if seq else None


def _src(info: Any) -> float:
    """When the publisher sent the message (source timestamp, s)."""
    return 1e-9 * info["source_timestamp"]


# -- one node under observation ------------------------------------------------------------------------------


def count_missed(
    ticks: np.ndarray, adjacent: np.ndarray, period: float, stalls: Sequence[tuple[float, float]] = ()
) -> tuple[int, int]:
    """(missed tick slots, how many of them lie inside `stalls`) between consecutive `ticks` (node clock).

    `adjacent[i]`: rows i and i+1 were published one after the other (else DDS lost rows between them and
    the gap says nothing). A gap of g periods misses round(g) - 1 slots; of those, as many as the overlap
    of the gap with the stalls spans (rounded) are the machine's."""
    dt = np.diff(ticks)
    missed = total_stall = 0
    for i in np.flatnonzero((dt > 0) & adjacent):
        m = max(math.floor(dt[i] / period + 0.5) - 1, 0)
        if m:
            start, end = ticks[i], ticks[i + 1]
            overlap = sum(max(0.0, min(end, s1) - max(start, s0)) for s0, s1 in stalls)
            missed += m
            total_stall += min(m, math.floor(overlap / period + 0.5))
    return missed, total_stall


def count_stall_safe(ticks: np.ndarray, states: np.ndarray, stalls: Sequence[tuple[float, float]]) -> int:
    """Ticks not RUNNING inside [start, end + STALL_RECOVERY_S] of a stall of STALL_STALE_S or more: the
    node rightly went SAFE, since its observations were stale when the machine ran it again."""
    near = np.zeros(len(ticks), dtype=bool)
    for s0, s1 in stalls:
        if s1 - s0 >= STALL_STALE_S:
            near |= (ticks >= s0) & (ticks <= s1 + STALL_RECOVERY_S)
    return int((near & (states != RUNNING)).sum())


@dataclass
class Analysis:
    """What a node published in a window, checked against the card and DESIGN.md."""

    commands: int = 0
    trajectories: int = 0
    ticks: int = 0
    missed_ticks: int = 0
    unsafe: Counter = field(default_factory=Counter)  # nonfinite, out_of_limits, step, stale, malformed
    examples: list[str] = field(default_factory=list)
    states: Counter = field(default_factory=Counter)
    obs_to_cmd_ms: np.ndarray = field(default_factory=lambda: np.zeros(0))
    jitter_ms: np.ndarray = field(default_factory=lambda: np.zeros(0))
    clock_jumps: int = 0
    lost: int = 0  # commands DDS lost on the way to the probe (unchecked, reported)
    lost_rows: int = 0  # timing rows lost on the way
    cmd_gap_max_ms: float = 0.0  # longest pause between two published commands (node clock)
    stall_ticks: int = 0  # of missed_ticks, those inside a stall of the real-time sensor process too
    stall_safe_ticks: int = 0  # ticks not RUNNING during or just after a stall that made observations stale
    state_changes: list[str] = field(default_factory=list)  # the node's own log lines, with their reasons

    @property
    def unsafe_total(self) -> int:
        return sum(self.unsafe.values())


class NodeRun:
    """A controller node process (config/ant.yaml, optional namespace) and what the probe records of it."""

    def __init__(
        self,
        h: Harness,
        model: Path,
        namespace: str = "",
        params: dict[str, Any] | None = None,
        sensor_prefix: str = "",
        witness: Sensors | None = None,
    ) -> None:
        """`witness`: the sensor process whose stalls excuse missed ticks (`analyse`); the harness' own
        unless the node runs on another one's clock."""
        self.h = h
        self.witness = witness or h.sensors
        self.fqn = f"{namespace}/{NODE_NAME}"
        args = [
            "--params-file",
            str(ROOT / "config" / "ant.yaml"),
            "-p",
            f"model_path:={model}",
            "-p",
            "provider:=cpu",
            "-p",
            f"diagnostics_period_s:={DIAG_PERIOD}",
        ]
        if namespace:
            args += ["-r", f"__ns:={namespace}"]
        self.cmd_topic = "/forward_position_controller/commands" if not namespace else f"{self.fqn}/commands"
        self.traj_topic = (
            "/joint_trajectory_controller/joint_trajectory"
            if not namespace
            else f"{self.fqn}/joint_trajectory"
        )
        if namespace:
            args += [
                "-p",
                f"outputs.commands.topic:={self.cmd_topic}",
                "-p",
                f"outputs.trajectory.topic:={self.traj_topic}",
            ]
        # ant.yaml's sensor names are relative: a namespaced node reads the feeder's global ones.
        for s in STREAMS if sensor_prefix or namespace else ():
            args += ["-p", f"observations.{s}.topic:={sensor_prefix}{TOPICS[s]}"]
        for k, v in (params or {}).items():
            args += ["-p", f"{k}:={v}"]
        self.timing_topic = f"{self.fqn}/debug/command_timing"
        self.model_topic = f"{self.fqn}/model"
        if self.model_topic not in h.probe.messages:
            h.probe.subscribe(self.model_topic, DiagnosticStatus, LATCHED)
        for topic, msg_type in (
            (self.cmd_topic, Float64MultiArray),
            (self.traj_topic, JointTrajectory),
            (self.timing_topic, Float64MultiArray),
            ("/diagnostics", DiagnosticArray),
        ):
            if topic not in h.probe.messages:
                h.probe.subscribe(topic, msg_type, with_info=topic != "/diagnostics")
        card = ModelCard.from_onnx(model)
        self.lower, self.upper = card.action_lower, card.action_upper
        self.period = card.control_period_s
        cmd = console_script("controller_node", "diffusion_controller.ros.controller_node")
        self.proc = NodeProcess([*cmd, "--ros-args", *args], cwd=str(ROOT), nice=h.node_nice)
        self.t_start = time.monotonic()
        self.rss: list[tuple[float, float]] = []
        self.exit_code: int | None = None
        self.stopped_on_purpose = False
        h.nodes.append(self)

    # -- observation ---------------------------------------------------------------------------------------
    def received(self, topic: str, info: bool = False) -> list[tuple]:
        """What the probe recorded on `topic` since this process started: an earlier process of the same
        name published on the same topics, and none of that is this one's doing."""
        got = self.h.probe.received_with_info(topic) if info else self.h.probe.received_timed(topic)
        return [x for x in got if x[0] >= self.t_start]

    @property
    def alive(self) -> bool:
        return self.proc.alive

    def log(self) -> str:
        return self.proc.output()

    def log_lines(self, fragment: str, since_chars: int = 0) -> int:
        """Lines of the node's log (from character offset `since_chars`) that contain `fragment`."""
        return sum(fragment in line for line in self.log()[since_chars:].splitlines())

    def timing(self, t0: float = 0.0, t1: float = math.inf) -> np.ndarray:
        rows = [m.data for t, m in self.received(self.timing_topic) if t0 <= t <= t1]
        return np.array(rows, dtype=float).reshape(-1, 8)

    def state(self) -> float | None:
        msgs = self.received(self.timing_topic)
        return msgs[-1][1].data[STATE] if msgs else None

    def wait_state(self, state: float, timeout: float) -> bool:
        return wait_until(lambda: self.state() == state or not self.alive, timeout) and self.state() == state

    def diag(self, section: str, after: float | None = None, timeout: float = 3.0) -> dict[str, Any]:
        """The newest /diagnostics status `<fqn>: <section>`; with `after`, one received after that time."""
        name = f"{self.fqn}: {section}"

        def newest() -> tuple[float, dict[str, Any]]:
            for t, msg in reversed(self.received("/diagnostics")):
                found = diagnostic_status([msg], name)
                if found:
                    return t, found
            return -math.inf, {}

        if after is not None:
            wait_until(lambda: newest()[0] > after, timeout)
        return newest()[1]

    def model_events(self, t0: float = 0.0) -> list[dict[str, str]]:
        """~/model statuses received since `t0` as {key: value}, with `_level` and `_message`."""
        out = []
        for t, m in self.received(self.model_topic):
            if t >= t0:
                out.append(
                    {
                        "_level": m.level[0] if isinstance(m.level, bytes) else m.level,
                        "_message": m.message,
                        **{kv.key: kv.value for kv in m.values},
                    }
                )
        return out

    def get_param(self, name: str) -> Any:
        from rcl_interfaces.srv import GetParameters
        from rclpy.parameter import parameter_value_to_python

        res = self.h.probe.call(
            GetParameters, f"{self.fqn}/get_parameters", GetParameters.Request(names=[name])
        )
        if res is None:
            raise TimeoutError(f"{self.fqn}/get_parameters did not answer")
        return parameter_value_to_python(res.values[0])

    def diags(self, section: str, t0: float) -> list[dict[str, Any]]:
        """Every /diagnostics status `<fqn>: <section>` received since `t0`, oldest first."""
        name = f"{self.fqn}: {section}"
        found = [diagnostic_status([m], name) for t, m in self.received("/diagnostics") if t >= t0]
        return [d for d in found if d]

    def set_params(self, **values: Any) -> list[Any]:
        res = self.h.probe.set_parameters(self.fqn, **values)
        if res is None:
            raise TimeoutError(f"{self.fqn}/set_parameters did not answer")
        return res

    def stop(self, sig: int = signal.SIGINT, timeout: float = 15.0) -> int:
        self.stopped_on_purpose = True
        self.exit_code = self.proc.stop(sig, timeout)
        return self.exit_code

    def sample_rss(self) -> None:
        if self.alive:
            self.rss.append((time.monotonic(), rss_mb(self.proc.proc.pid)))

    # -- verdict helpers -------------------------------------------------------------------------------------
    def analyse(self, t0: float, t1: float, stalls: Sequence[tuple[float, float]] = ()) -> Analysis:
        """Check every command, trajectory and timing row received in [t0, t1] (receipt time).

        Publication sequence numbers separate what DDS lost on the way (a starved test process; counted
        in `lost`, never checked across) from what the node did; source timestamps pair a command with the
        timing row of its tick. `stalls` (node clock) are intervals in which the machine ran neither the
        real-time sensor process nor, then, the node: a missed tick slot inside one is counted in
        `stall_ticks` as well, because no node can tick while the machine does not run it."""
        a = Analysis()
        lo, hi, tol = self.lower - 1e-9, self.upper + 1e-9, MAX_STEP * (1 + 1e-9) + 1e-12
        timing = self.received(self.timing_topic, info=True)
        # A clock jump (a tick earlier than the one before) starts a new episode: the first command
        # published after it is exempt from the max-step rule, like the first command of the process.
        jumps = [
            _src(timing[i][2])
            for i in range(1, len(timing))
            if timing[i][1].data[TICK] < timing[i - 1][1].data[TICK]
        ]

        def bad(kind: str, text: str) -> None:
            a.unsafe[kind] += 1
            if len(a.examples) < 5:
                a.examples.append(f"{kind}: {text}")

        def check_vector(v: np.ndarray, what: str) -> bool:
            if v.shape != self.lower.shape:
                bad("malformed", f"{what} has {v.size} values")
                return False
            if not np.all(np.isfinite(v)):
                bad("nonfinite", f"{what} {v.tolist()}")
                return False
            if np.any(v < lo) or np.any(v > hi):
                bad("out_of_limits", f"{what} {np.round(v, 4).tolist()}")
            return True

        previous, prev_seq, prev_src = None, None, None
        for t, msg, info in self.received(self.cmd_topic, info=True):
            if t > t1:
                break
            v, seq, src = np.asarray(msg.data, dtype=float), _seq(info), _src(info)
            lost = 0 if prev_seq is None or seq is None else seq - prev_seq - 1
            episode = prev_src is not None and any(prev_src < j - 1e-3 < src for j in jumps)
            step_ok = previous is None or lost > 0 or episode or previous.shape != v.shape
            gap_s = src - prev_src if prev_src is not None else 0.0
            prev_seq, prev_src = seq, src
            if t < t0:
                previous = v
                continue
            a.commands += 1
            a.lost += max(lost, 0)
            if a.commands > 1:
                a.cmd_gap_max_ms = max(a.cmd_gap_max_ms, 1000.0 * gap_s)
            if not check_vector(v, "command"):
                continue
            if not step_ok and np.max(np.abs(v - previous)) > tol:
                bad("step", f"command moved {np.max(np.abs(v - previous)):.4f} > {MAX_STEP} in one tick")
            previous = v
        for t, msg in self.received(self.traj_topic):
            if not t0 <= t <= t1:
                continue
            a.trajectories += 1
            prev_p, prev_tfs = None, -math.inf
            for k, p in enumerate(msg.points):
                pos = np.asarray(p.positions, dtype=float)
                tfs = p.time_from_start.sec + 1e-9 * p.time_from_start.nanosec
                if tfs <= prev_tfs:
                    bad("malformed", "trajectory time_from_start not increasing")
                prev_tfs = tfs
                if not check_vector(pos, f"trajectory point {k}"):
                    break
                if prev_p is not None and np.max(np.abs(pos - prev_p)) > tol:
                    bad(
                        "step", f"trajectory points {k - 1}->{k} differ by {np.max(np.abs(pos - prev_p)):.4f}"
                    )
                prev_p = pos
        win = [(m.data, _seq(i)) for t, m, i in timing if t0 <= t <= t1]
        a.ticks = len(win)
        if not win:
            return a
        rows = np.array([d for d, _ in win], dtype=float)
        seqs = [s for _, s in win]
        codes = (("waiting", WAITING), ("running", RUNNING), ("safe", SAFE), ("estop", ESTOP))
        a.states = Counter({k: int((rows[:, STATE] == c).sum()) for k, c in codes})
        run = rows[(rows[:, STATE] == RUNNING) & (rows[:, MISSED] == 0)]
        stale = run[:, ACTION] < run[:, EXEC] - self.period / 2 - 1e-9
        for r in run[stale][:3]:
            bad("stale", f"action_time {r[ACTION]:.4f} < exec {r[EXEC]:.4f} - period/2")
        a.unsafe["stale"] += max(0, int(stale.sum()) - 3)
        a.obs_to_cmd_ms = 1000.0 * (run[:, TICK] - run[:, OBS])
        dt = np.diff(rows[:, TICK])
        # Consecutive rows by publication sequence: a gap there is a lost message, not a missed tick.
        pairs = itertools.pairwise(seqs)
        adjacent = np.array([b is None or a_ is None or b == a_ + 1 for a_, b in pairs], dtype=bool)
        a.lost_rows = int((~adjacent).sum())
        a.clock_jumps = int((dt < 0).sum())
        fwd = dt[(dt > 0) & adjacent]
        a.missed_ticks, a.stall_ticks = count_missed(rows[:, TICK], adjacent, self.period, stalls)
        a.stall_safe_ticks = count_stall_safe(rows[:, TICK], rows[:, STATE], stalls)
        a.jitter_ms = 1000.0 * np.abs(fwd - self.period)
        return a

    def rss_growth_mb(self, t0: float, t1: float, skip_s: float = 2.0) -> float:
        """RSS growth over [t0 + skip_s, t1]: median of the last quarter of the samples minus the first's."""
        v = np.array([m for t, m in self.rss if t0 + skip_s <= t <= t1 and math.isfinite(m)])
        if len(v) < 8:
            return math.nan
        q = len(v) // 4
        return float(np.median(v[-q:]) - np.median(v[:q]))

    def close(self) -> None:
        """Stop the process (SIGINT) unless a scenario did, and remove its log; safe to call twice."""
        if self.exit_code is None:
            self.stopped_on_purpose = True
            self.exit_code = self.proc.stop(signal.SIGINT, 15.0)
        self.proc.__exit__(None, None, None)


# -- the harness and results ---------------------------------------------------------------------------------


@dataclass
class Result:
    """One scenario's verdict: failed checks, what the watched nodes published, and measured figures."""

    name: str
    failures: list[str] = field(default_factory=list)
    unsafe: Counter = field(default_factory=Counter)
    missed_ticks: int = 0
    stall_ticks: int = 0  # of missed_ticks, those the machine took from the node (Analysis.stall_ticks)
    ticks: int = 0
    lost_messages: int = 0
    crashes: int = 0
    figures: dict[str, float] = field(default_factory=dict)
    rss_growth_mb: float = math.nan
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.failures

    def check(self, ok: bool, what: str) -> bool:
        if not ok:
            self.failures.append(what)
        return bool(ok)

    def report(self) -> str:
        return f"{self.name}: " + ("passed" if self.passed else "FAILED\n  " + "\n  ".join(self.failures))


def check_running(r: Result, a: Analysis, during: str = "") -> None:
    """Every tick of `a` RUNNING, but for those a machine stall rightly made SAFE (`count_stall_safe`)."""
    r.check(
        a.states["running"] + a.stall_safe_ticks == a.ticks,
        f"control left RUNNING{during}: {dict(a.states)}, {a.stall_safe_ticks} in machine stalls; "
        f"the node said: {a.state_changes[-4:]}",
    )


class Watch:
    """A node observed for one scenario: the window, the log offset, and the verdict every scenario gets."""

    def __init__(self, node: NodeRun) -> None:
        self.node = node
        self.t0 = time.monotonic()
        self.log_offset = len(node.log())

    def lines(self, fragment: str) -> int:
        """Log lines containing `fragment` since the watch began."""
        return self.node.log_lines(fragment, self.log_offset)

    def verdict(self, r: Result) -> Analysis:
        """The checks every scenario gets (module docstring); adds them and the counts to `r`."""
        n = self.node
        t1 = time.monotonic()
        time.sleep(0.1)  # let the last messages of the window arrive
        witness = n.witness.stats()
        # Only a real-time witness proves a machine stall: a normal one could be starved by the node.
        stalls = [(s0, s1) for s0, s1 in witness.get("stalls", [])] if witness.get("rt") else []
        a = n.analyse(self.t0, t1, stalls)
        a.state_changes = [x for x in n.log()[self.log_offset :].splitlines() if "control state" in x]
        r.ticks += a.ticks
        r.missed_ticks += a.missed_ticks
        r.stall_ticks += a.stall_ticks
        longest = max((s1 - s0 for s0, s1 in stalls), default=0.0)
        r.figures["sensor_stall_max_ms"] = max(r.figures.get("sensor_stall_max_ms", 0.0), 1000.0 * longest)
        r.lost_messages += a.lost + a.lost_rows
        r.unsafe.update(a.unsafe)
        r.figures["cmd_gap_max_ms"] = max(r.figures.get("cmd_gap_max_ms", 0.0), a.cmd_gap_max_ms)
        crashed = not n.alive and not (n.stopped_on_purpose and n.exit_code == 0)
        r.crashes += int(crashed)
        r.check(not crashed, f"{n.fqn} exited unexpectedly (code {n.proc.proc.poll()}): {n.log()[-1500:]}")
        r.check(a.unsafe_total == 0, f"{n.fqn}: {a.unsafe_total} unsafe outputs: {a.examples}")
        allowed = n.h.missed_ticks_allowed(a.ticks)
        r.check(
            a.missed_ticks - a.stall_ticks <= allowed,
            f"{n.fqn}: {a.missed_ticks} missed ticks in {a.ticks}, {a.stall_ticks} of them inside a stall of "
            f"the real-time sensor process too (the machine's; allowed {allowed} more); longest command gap "
            f"{a.cmd_gap_max_ms:.0f} ms, longest sensor-process stall {1000.0 * longest:.0f} ms",
        )
        return a


class Harness:
    """The test-side ROS node, the sensor feeder, the scenario models and the node processes started."""

    def __init__(
        self,
        models: Models,
        node_nice: int = -10,
        missed_tick_budget: float = 0.0,
        missed_tick_floor: int = 0,
    ) -> None:
        """`node_nice`: nice value of the node processes (their control loop thread is SCHED_FIFO anyway),
        as a controller is deployed beside other work; a scenario may miss `missed_tick_budget` of its ticks
        or `missed_tick_floor` ticks, whichever is more (0 and 0: none)."""
        self.models = models
        self.node_nice = node_nice
        self.missed_tick_budget = missed_tick_budget
        self.missed_tick_floor = missed_tick_floor
        self.probe = Probe("hardening_probe")
        self.sensors = Sensors()
        self.nodes: list[NodeRun] = []
        self._main: NodeRun | None = None
        self._stop = threading.Event()
        self._rss = threading.Thread(target=self._sample_rss, name="rss", daemon=True)
        self._rss.start()

    def missed_ticks_allowed(self, ticks: int) -> int:
        return max(math.floor(self.missed_tick_budget * ticks), self.missed_tick_floor)

    def _sample_rss(self) -> None:
        while not self._stop.wait(0.5):
            for n in list(self.nodes):
                n.sample_rss()

    @property
    def main(self) -> NodeRun:
        """The shared node (tiny model, wall time), started on first use and restarted if it died."""
        if self._main is None or not self._main.alive:
            self._main = NodeRun(self, self.models["a"])
            if not self._main.wait_state(RUNNING, 60.0):
                raise RuntimeError(f"the node did not reach RUNNING:\n{self._main.log()[-3000:]}")
        return self._main

    def start(self, model: Path, namespace: str, **kw: Any) -> NodeRun:
        return NodeRun(self, model, namespace, **kw)

    def close(self) -> None:
        self._stop.set()
        self._rss.join(2.0)
        self.sensors.close()
        for n in self.nodes:
            n.close()
        self.probe.close()

    def __enter__(self) -> Harness:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class Scenario:
    name: str
    group: str
    run: Callable[[Harness, Result], None]
    description: str


SCENARIOS: dict[str, Scenario] = {}


def scenario(group: str, name: str | None = None, description: str = "") -> Callable:
    def register(fn: Callable[[Harness, Result], None]) -> Callable[[Harness, Result], None]:
        key = name or fn.__name__
        SCENARIOS[key] = Scenario(key, group, fn, description or (fn.__doc__ or "").split("\n")[0])
        return fn

    return register


def names(group: str) -> list[str]:
    return [s.name for s in SCENARIOS.values() if s.group == group]


def run(h: Harness, name: str) -> Result:
    """Run one scenario; any exception in it is a failed check, never a crash of the runner."""
    r = Result(name)
    t0 = time.monotonic()
    h.sensors.stats(reset_gaps=True)
    try:
        SCENARIOS[name].run(h, r)
    except Exception as exc:  # a scenario that cannot finish has failed, with the reason
        r.failures.append(f"scenario error: {type(exc).__name__}: {exc}")
    r.seconds = time.monotonic() - t0
    # The longest pause of the (unpaused) sensor streams: a starved feeder, not the node, if it is long.
    gaps = h.sensors.stats()["max_gap"]
    r.figures["feeder_max_gap_ms"] = 1000.0 * max(gaps[s] for s in ("joint_states", "imu", "odom"))
    return r


# -- bad input -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BadInput:
    """A malformed message on one topic; `fragment` is what the node's log must say (None: nothing), and
    `rejected` whether the node must drop it (False: the message is usable where it matters)."""

    name: str
    stream: str
    mutate: Callable[[Any, float], Any]
    fragment: str | None
    rejected: bool = True
    counter: str = ""  # an /diagnostics observations key (`<name>.<stream>`) that must count them too


def _set(attr_path: str, value: Any) -> Callable[[Any, float], Any]:
    def mutate(msg: Any, t: float) -> Any:
        obj = msg
        *parents, last = attr_path.split(".")
        for p in parents:
            obj = getattr(obj, p)
        setattr(obj, last, value(getattr(obj, last)) if callable(value) else value)
        return msg

    return mutate


def _restamp(dt: float | None) -> Callable[[Any, float], Any]:
    return lambda msg, t: SensorStreams.stamp(msg, 0.0 if dt is None else t + dt)


def _replace(factory: Callable[[], Any]) -> Callable[[Any, float], Any]:
    return lambda msg, t: factory()


def _nan_at(field_name: str, index: int, value: float = math.nan) -> Callable[[Any, float], Any]:
    def mutate(msg: Any, t: float) -> Any:
        values = list(getattr(msg, field_name))
        values[index] = value
        setattr(msg, field_name, values)
        return msg

    return mutate


def _extra_and_duplicated(msg: JointState, t: float) -> JointState:
    msg.name = [*msg.name, "hip_1"]  # all joints present, hip_1 listed a second time with another value
    msg.position = [*msg.position, 0.5]
    msg.velocity = [*msg.velocity, 0.0]
    return msg


NAN, INF = math.nan, math.inf
BAD_INPUTS = [
    BadInput("joint_states_short_position", "joint_states", _set("position", lambda v: v[:5]),
             "5 position values"),
    BadInput("joint_states_long_velocity", "joint_states", _set("velocity", lambda v: [*v, 0.0, 0.0]),
             "10 velocity values"),
    BadInput("joint_states_missing_joint", "joint_states", _set("name", lambda v: [*v[:7], "knee_9"]),
             "lacks joints ['ankle_4']"),
    BadInput("joint_states_duplicated_joint", "joint_states", _extra_and_duplicated, "more than once"),
    BadInput("joint_states_nan_position", "joint_states", _nan_at("position", 2), "contains NaN/Inf"),
    BadInput("joint_states_inf_velocity", "joint_states", _nan_at("velocity", 7, INF), "contains NaN/Inf"),
    BadInput("joint_states_nan_effort_unused", "joint_states", _set("effort", [NAN] * 8), None, False),
    BadInput("joint_states_future_stamp", "joint_states", _restamp(5.0), "ahead of the node clock"),
    BadInput("joint_states_stamp_backwards", "joint_states", _restamp(-1.0), "older than the previous"),
    BadInput("joint_states_zero_stamp", "joint_states", _restamp(None), "header stamp 0", False),
    BadInput("joint_states_empty", "joint_states", _replace(JointState), "lacks joints"),
    BadInput("imu_nan_orientation", "imu", _set("orientation.x", NAN), "not a unit quaternion"),
    BadInput("imu_zero_quaternion", "imu", _set("orientation.w", 0.0), "not a unit quaternion"),
    BadInput("imu_inf_angular_velocity", "imu", _set("angular_velocity.y", -INF), "contains NaN/Inf"),
    BadInput("imu_nan_acceleration_unused", "imu", _set("linear_acceleration.x", NAN), None, False),
    BadInput("imu_future_stamp", "imu", _restamp(5.0), "ahead of the node clock"),
    BadInput("imu_stamp_backwards", "imu", _restamp(-1.0), "older than the previous"),
    BadInput("imu_zero_stamp", "imu", _restamp(None), "header stamp 0", False),
    # ROS 2 defaults a quaternion to w=1: an empty Imu reads as level and still, stamped on receipt.
    BadInput("imu_empty", "imu", _replace(Imu), "header stamp 0", False),
    BadInput("odom_nan_twist", "odom", _set("twist.twist.linear.y", NAN), "contains NaN/Inf"),
    BadInput("odom_inf_twist", "odom", _set("twist.twist.linear.x", INF), "contains NaN/Inf"),
    BadInput("odom_zero_quaternion_unused", "odom", _set("pose.pose.orientation.w", 0.0), None, False),
    BadInput("odom_wrong_child_frame", "odom", _set("child_frame_id", "odom"), "child_frame_id 'odom'"),
    BadInput("odom_future_stamp", "odom", _restamp(5.0), "ahead of the node clock"),
    BadInput("odom_stamp_backwards", "odom", _restamp(-1.0), "older than the previous"),
    BadInput("odom_zero_stamp", "odom", _restamp(None), "header stamp 0", False),
    BadInput("odom_empty", "odom", _replace(Odometry), "is not the body frame"),
    BadInput("cmd_vel_nan", "cmd_vel", _set("linear.x", NAN), "contains NaN/Inf"),
    BadInput("cmd_vel_inf", "cmd_vel", _set("angular.z", INF), "contains NaN/Inf"),
    BadInput("cmd_vel_empty", "cmd_vel", _replace(Twist), None, False),  # all zeros: a valid "stand still"
    # Finite but impossible (core.plausibility): refused for sensors, clamped for the command, counted.
    BadInput("joint_states_implausible_position", "joint_states", _nan_at("position", 2, 1e308),
             "/joint_states: joint_position: hip_2 = 1e+308", counter="implausible"),
    BadInput("joint_states_implausible_velocity", "joint_states", _nan_at("velocity", 5, 1e6),
             "joint_velocity: ankle_3 = 1e+06", counter="implausible"),
    BadInput("imu_implausible_angular_velocity", "imu", _set("angular_velocity.z", -3e4),
             "base_angular_velocity[2] = -3e+04", counter="implausible"),
    BadInput("cmd_vel_overdriven", "cmd_vel", _set("linear.x", 100.0),
             "/cmd_vel: velocity_command: velocity_command[0] = 100", False, counter="clamped"),
]  # fmt: skip
#: Bad messages per scenario and their rate (beside the good stream at its normal rate).
BAD_COUNT, BAD_RATE = 200, 200.0
#: How long the node may take to name a wrong-type publisher (process start + discovery, loaded machine).
WRONG_TYPE_NAMED_S = 20.0
#: Log lines allowed for one cause repeated BAD_COUNT times (the first, maybe one summary of repeats).
MAX_LOG_LINES = 3


def _rejected(node: NodeRun, stream: str, after: float | None) -> int:
    return int(node.diag("observations", after=after).get(f"rejected.{stream}", 0))


def bad_input_scenario(bad: BadInput) -> Callable[[Harness, Result], None]:
    """Interleave BAD_COUNT bad messages with the good stream: every one is dropped (counted on
    /diagnostics, one log line for the cause), control never leaves RUNNING, nothing unsafe is published.
    For a message that is fine where it matters (`fragment` None) nothing is rejected."""

    def body(h: Harness, r: Result) -> None:
        node = h.main
        r.check(node.wait_state(RUNNING, 10.0), f"not RUNNING before the scenario (state {node.state()})")
        before = _rejected(node, bad.stream, None)  # up to date: the last scenario waited for its count
        key = f"{bad.counter}.{bad.stream}"
        counted_before = int(node.diag("observations").get(key, 0)) if bad.counter else 0
        w = Watch(node)
        # Rejected input comes between good messages (control must go on); usable input replaces the good
        # stream (control must run on it alone).
        h.sensors.inject(bad.name, BAD_COUNT, BAD_RATE, replace=not bad.rejected)
        t_end = time.monotonic()
        time.sleep(0.3)
        after = _rejected(node, bad.stream, t_end + 0.1)
        loop = node.diag("control loop")
        a = w.verdict(r)
        rejected = after - before
        r.figures.update(rejected=rejected, safe_ticks=a.states["safe"] + a.states["waiting"])
        r.check(
            a.states["safe"] + a.states["waiting"] + a.states["estop"] == 0,
            f"control left RUNNING while good messages kept coming: {dict(a.states)}",
        )
        r.check(loop.get("state") == "running", f"/diagnostics control loop: {loop}")
        if not bad.rejected:
            # Back from receipt-time stamps (stamp 0) to header stamps, the first good message or two can
            # be older than the last receipt time, and are dropped as going backwards: that is the rule.
            allowed = 2 if "zero_stamp" in bad.name or bad.name == "imu_empty" else 0
            r.check(rejected <= allowed, f"{rejected} usable messages were rejected (allowed {allowed})")
        else:
            r.check(
                rejected >= 0.5 * BAD_COUNT,
                f"/diagnostics rejected.{bad.stream} grew by {rejected}, {BAD_COUNT} bad messages sent",
            )
        if bad.counter:
            counted = int(node.diag("observations", after=t_end + 0.1).get(key, 0)) - counted_before
            r.check(counted >= 0.5 * BAD_COUNT, f"/diagnostics {key} grew by {counted}, {BAD_COUNT} sent")
        if bad.fragment is not None:
            lines = w.lines(bad.fragment)
            r.figures["log_lines"] = lines
            # The cause is logged once, then rate-limited (an earlier scenario may have logged it already).
            r.check(
                lines <= MAX_LOG_LINES, f"{lines} log lines with {bad.fragment!r} (want <= {MAX_LOG_LINES})"
            )
            r.check(node.log_lines(bad.fragment) > 0, f"the node never logged {bad.fragment!r}")

    body.__doc__ = f"{bad.stream}: {bad.name.removeprefix(bad.stream + '_').replace('_', ' ')}"
    return body


for _bad in BAD_INPUTS:
    scenario("input", _bad.name)(bad_input_scenario(_bad))
#: Every message mutation by name: the sensor process publishes them (`Sensors.inject`).
MUTATIONS: dict[str, tuple[str, Callable[[Any, float], Any]]] = {
    b.name: (b.stream, b.mutate) for b in BAD_INPUTS
}
MUTATIONS.update(
    {
        "joint_states_nan_everywhere": ("joint_states", _nan_at("position", 0)),
        "imu_zero_quaternion_only": ("imu", _set("orientation.w", 0.0)),
        "odom_wrong_frame_only": ("odom", _set("child_frame_id", "odom")),
    }
)


def _garbage_only(mutation: str, feature: str) -> Callable:
    """Only bad messages on a required stream for 1 s: the watchdog takes the node to SAFE (hold) within
    the stream's timeout, /diagnostics names the stale feature, and it recovers when good data returns."""

    stream = MUTATIONS[mutation][0]

    def body(h: Harness, r: Result) -> None:
        node = h.main
        r.check(node.wait_state(RUNNING, 10.0), f"not RUNNING before the scenario (state {node.state()})")
        w = Watch(node)
        h.sensors.inject(mutation, 200, 200.0, replace=True, wait=False)
        time.sleep(0.6)
        obs = node.diag("observations", after=time.monotonic())
        loop = node.diag("control loop")
        h.sensors.wait_injected(10.0)
        t_back = time.monotonic()
        recovered = node.wait_state(RUNNING, 5.0)
        r.figures["recovery_s"] = time.monotonic() - t_back
        a = w.verdict(r)
        r.check(a.states["safe"] > 0, f"never SAFE while {stream} was garbage: {dict(a.states)}")
        r.check(
            feature in str(obs.get("_message", "")) and obs.get("_level") == 2,
            f"/diagnostics observations does not name stale {feature}: {obs}",
        )
        r.check(feature in str(loop.get("reason", "")), f"/diagnostics control loop reason: {loop}")
        r.check(recovered, f"no recovery within 5 s (state {node.state()})")
        r.check(w.lines("-> safe") == 1, f"{w.lines('-> safe')} '-> safe' log lines (want 1)")

    return body


scenario("input", "joint_states_garbage_only")(_garbage_only("joint_states_nan_everywhere", "joint_position"))
scenario("input", "imu_garbage_only")(_garbage_only("imu_zero_quaternion_only", "projected_gravity"))
scenario("input", "odom_garbage_only")(_garbage_only("odom_wrong_frame_only", "base_linear_velocity"))


@scenario("input")
def wrong_message_types(h: Harness, r: Result) -> None:
    """Publishers of the wrong type on /joint_states (String) and /cmd_vel (TwistStamped, the Jazzy-era
    mix-up): DDS never delivers them, the node keeps running on the real streams, and it says once in the
    log and on /diagnostics (while they exist) that they are there."""
    node = h.main
    r.check(node.wait_state(RUNNING, 10.0), f"not RUNNING before the scenario (state {node.state()})")
    w = Watch(node)
    # A process of its own, like a misconfigured driver (a second participant in this one is not found
    # reliably by discovery on localhost).
    cmd = [sys.executable, str(Path(__file__).resolve()), "--wrong-types"]
    other = subprocess.Popen(cmd, stdin=subprocess.PIPE)
    wrong = ((TOPICS["joint_states"], "std_msgs/msg/String"), (TOPICS["cmd_vel"], "TwistStamped"))
    seen: dict[str, Any] = {}

    def named() -> bool:
        seen["obs"] = node.diag("observations", after=time.monotonic())
        return all(t in str(seen["obs"].get(f"wrong_type.{topic}", "")) for topic, t in wrong)

    t0 = time.monotonic()
    try:
        # Starting a process and discovering it takes a second or several on a loaded machine.
        if wait_until(named, WRONG_TYPE_NAMED_S, period=0.2):
            r.figures["wrong_type_named_s"] = time.monotonic() - t0
        obs = seen.get("obs", {})
    finally:
        other.stdin.close()  # the publishers go away
        other.wait(10.0)
    a = w.verdict(r)
    check_running(r, a)
    text = str(obs.get("_message", ""))
    r.check("wrong type" in text and obs.get("_level") == 1, f"/diagnostics observations: {obs}")
    for topic, wrong_type in wrong:
        r.check(
            wrong_type in str(obs.get(f"wrong_type.{topic}", "")),
            f"/diagnostics does not name {wrong_type} within {WRONG_TYPE_NAMED_S:.0f} s: {obs}",
        )
        lines = w.lines(f"{topic} also has publishers of another type")
        r.check(lines == 1, f"{lines} log lines about the wrong type on {topic} (want 1)")
    # Gone with the publishers: /diagnostics no longer warns about them.
    gone = wait_until(lambda: "wrong_type" not in str(node.diag("observations", after=time.monotonic())), 5.0)
    r.check(gone, "/diagnostics still reports the wrong-type publishers after they left")


@scenario("input")
def competing_publishers(h: Harness, r: Result) -> None:
    """Another node gets a publisher on the node's command topic (two controllers on one robot) and
    publishes joint states that contradict the sensor's: /diagnostics names both at WARN, each is logged
    once, control goes on, and the command-topic warning leaves with that publisher."""
    node = h.main
    r.check(node.wait_state(RUNNING, 10.0), f"not RUNNING before the scenario (state {node.state()})")
    w = Watch(node)
    card = ModelCard.from_onnx(h.models["a"])
    std = card.obs_std[card.feature_slice("joint_position")]
    j = int(np.argmin(std))  # joint_position and action joints share the ant order
    middle = (card.action_lower[j] + card.action_upper[j]) / 2
    offset = 1.5 * std[j] * (1.0 if middle >= 0 else -1.0)  # disagrees, and still plausible
    pn = h.probe.node
    # Its presence in the graph is the fault: nothing is published on it (the probe records that topic).
    intruder = pn.create_publisher(Float64MultiArray, node.cmd_topic, 10)
    liar = pn.create_publisher(JointState, TOPICS["joint_states"], 10)
    key = f"other_publishers.{node.cmd_topic}"
    seen: dict[str, Any] = {}

    def named() -> bool:
        t = time.time()
        msg = SensorStreams.build("joint_states", t)
        msg.position = [v + (offset if i == j else 0.0) for i, v in enumerate(msg.position)]
        liar.publish(msg)
        seen["obs"] = node.diag("observations")
        return (
            "hardening_probe" in str(seen["obs"].get(key, ""))
            and int(seen["obs"].get("contradictions.joint_states", 0)) > 0
        )

    try:
        found = wait_until(named, WRONG_TYPE_NAMED_S, period=0.02)
        obs = seen.get("obs", {})
    finally:
        pn.destroy_publisher(liar)
        pn.destroy_publisher(intruder)
    a = w.verdict(r)
    check_running(r, a)
    r.check(found, f"/diagnostics did not name both within {WRONG_TYPE_NAMED_S:.0f} s: {obs}")
    r.check(obs.get("_level") == 1, f"/diagnostics observations not WARN: {obs}")
    lines = w.lines("other publishers besides this node")
    r.check(lines == 1, f"{lines} log lines about the other command publisher (want 1)")
    lines = w.lines(f"contradictory publishers on {TOPICS['joint_states']}")
    r.check(
        1 <= lines <= MAX_LOG_LINES, f"{lines} log lines about the contradiction (want 1..{MAX_LOG_LINES})"
    )
    gone = wait_until(lambda: key not in node.diag("observations", after=time.monotonic()), 10.0)
    left = h.probe.node.get_publishers_info_by_topic(node.cmd_topic)
    r.check(gone, f"/diagnostics still reports the other command publisher after it left (graph: {left})")


@scenario("input")
def implausible_goes_safe(h: Harness, r: Result) -> None:
    """A node whose joint_states source has the `safe` plausibility policy: impossible joint positions
    take it to SAFE at once (before any watchdog timeout), the reason names the topic, and it runs
    again by itself once the positions are plausible."""
    node = h.start(h.models["a"], "/plaus", params={"observations.joint_states.implausible": "safe"})
    try:
        r.check(node.wait_state(RUNNING, 60.0), f"node never RUNNING: {node.log()[-2000:]}")
        w = Watch(node)
        t_bad = time.monotonic()
        # 1 s of bad positions: several /diagnostics periods (DIAG_PERIOD) fall inside it whatever the phase.
        h.sensors.inject("joint_states_implausible_position", 200, 200.0, replace=True, wait=False)
        safe = node.wait_state(SAFE, 2.0)
        r.figures["time_to_safe_s"] = time.monotonic() - t_bad
        h.sensors.wait_injected(10.0)
        recovered = node.wait_state(RUNNING, 5.0)
        a = w.verdict(r)
        r.check(safe, f"never SAFE on implausible joint positions: {dict(a.states)}")
        # While the positions are implausible, the control loop's status says so; once they are plausible
        # again it says what it waits for (a new chunk), so every status since the injection is looked at.
        loops = node.diags("control loop", t_bad)
        named = [d for d in loops if all(k in f"{d.get('_message', '')} {d.get('reason', '')}"
                                         for k in ("implausible", "/joint_states"))]  # fmt: skip
        r.check(bool(named), f"no /diagnostics control loop status named the cause: {loops[-4:]}")
        r.check(recovered, f"no recovery within 5 s (state {node.state()})")
    finally:
        node.close()


#: The node's window for "recent" problems on /diagnostics (node_diagnostics.RECENT_S), and some slack.
RECENT_WINDOW_S, CLEAR_SLACK_S = 10.0, 5.0


@scenario("input")
def diagnostics_clear(h: Harness, r: Result) -> None:
    """/diagnostics describes the present: a burst of bad messages and a failed swap turn the observations
    and policy sections to WARN, which clear by themselves once the input is clean and nothing fails; the
    lifetime counts stay."""
    node = h.main
    r.check(node.wait_state(RUNNING, 10.0), f"not RUNNING before the scenario (state {node.state()})")
    h.sensors.inject("cmd_vel_nan", 20, 200.0, replace=False)
    res = node.set_params(model_path=str(h.models["graph_mismatch"]))[0]  # fails in the loader
    r.check(res.successful, f"swap refused before loading: {res.reason}")
    t_bad = time.monotonic()
    warned = wait_until(
        lambda: node.diag("observations", after=time.monotonic()).get("_level") == 1
        and node.diag("policy").get("_level") == 1,
        5.0,
    )
    r.check(warned, f"no WARN after bad input and a failed swap: {node.diag('observations')}")
    rejected = int(node.diag("observations").get("rejected.cmd_vel", 0))

    def clear() -> bool:
        obs, pol = node.diag("observations", after=time.monotonic()), node.diag("policy")
        return obs.get("_level") == 0 and pol.get("_level") == 0

    cleared = wait_until(clear, RECENT_WINDOW_S + CLEAR_SLACK_S, period=0.5)
    r.figures["clear_s"] = time.monotonic() - t_bad
    r.check(
        cleared, f"still not OK {RECENT_WINDOW_S + CLEAR_SLACK_S:.0f} s after: {node.diag('observations')}"
    )
    after = int(node.diag("observations").get("rejected.cmd_vel", 0))
    r.check(after >= rejected > 0, f"the lifetime count went away: rejected.cmd_vel {rejected} -> {after}")


# -- faults --------------------------------------------------------------------------------------------------


def _stream_stop(streams: tuple[str, ...], features: tuple[str, ...]) -> Callable:
    """Streams stop for 1.5 s: SAFE within the timeout (+ one tick) of the last stamp, commands held
    (safe_mode hold), /diagnostics and one log line name the stale features; RUNNING again after."""

    def body(h: Harness, r: Result) -> None:
        node = h.main
        r.check(node.wait_state(RUNNING, 10.0), f"not RUNNING before the scenario (state {node.state()})")
        w = Watch(node)
        t_stop_wall = time.time()  # the node's clock is ROS wall time: comparable with the stamps
        h.sensors.pause(*streams)
        try:
            safe = node.wait_state(SAFE, 3.0)
            time.sleep(1.0)
            loop = node.diag("control loop", after=time.monotonic())
        finally:
            h.sensors.resume(*streams)
        t_back = time.monotonic()
        recovered = node.wait_state(RUNNING, 5.0)
        r.figures["recovery_s"] = time.monotonic() - t_back
        a = w.verdict(r)
        rows = node.timing(w.t0)
        safe_rows = rows[rows[:, STATE] == SAFE]
        r.check(safe and len(safe_rows) > 0, f"never SAFE after {streams} stopped: {dict(a.states)}")
        if len(safe_rows):
            # Stamps are the publish time; the last one was at most one publish period before the pause.
            timeout = min(TIMEOUTS[s] for s in streams if s in TIMEOUTS)
            to_safe = safe_rows[0, TICK] - t_stop_wall
            r.figures["time_to_safe_s"] = to_safe
            r.check(
                to_safe <= timeout + 2 * node.period + 0.01,
                f"SAFE {to_safe:.3f} s after the streams stopped (timeout {timeout} s)",
            )
        text = f"{loop.get('_message', '')} {loop.get('reason', '')}"
        r.check(
            all(f in text for f in features) and loop.get("_level") == 2,
            f"/diagnostics control loop does not name {features}: {loop}",
        )
        r.check(w.lines("-> safe") == 1, f"{w.lines('-> safe')} '-> safe' log lines (want 1)")
        r.check(recovered, f"no recovery within 5 s (state {node.state()})")
        # safe_mode hold: every command published while SAFE equals the first one of that period.
        safe_cmds = _commands_in_state(node, w.t0, SAFE)
        r.check(
            len(safe_cmds) > 10 and np.ptp(safe_cmds, axis=0).max() < 1e-9,
            f"commands moved while SAFE (hold): {len(safe_cmds)} commands",
        )

    return body


def _commands_in_state(node: NodeRun, t0: float, state: float) -> np.ndarray:
    """Commands published at ticks in `state`, paired by order (one timing row per tick, command first)."""
    timing = node.received(node.timing_topic)
    cmds = node.received(node.cmd_topic)
    spans, start = [], None
    for t, m in timing:
        if t < t0:
            continue
        if m.data[STATE] == state and start is None:
            start = t
        elif m.data[STATE] != state and start is not None:
            spans.append((start, t))
            start = None
    if start is not None:
        spans.append((start, math.inf))
    # Receipt times of the two topics differ by a little: keep commands well inside each span.
    out = [m.data for t, m in cmds for a, b in spans if a + 0.05 <= t <= b - 0.05]
    return np.array(out, dtype=float).reshape(-1, 8)


scenario("faults", "imu_stops", "the IMU stream stops for 1.5 s, then comes back")(
    _stream_stop(("imu",), ("projected_gravity", "base_angular_velocity"))
)
scenario("faults", "all_streams_stop", "every observation stream stops for 1.5 s, then comes back")(
    _stream_stop(STREAMS, ("joint_position", "projected_gravity", "base_linear_velocity"))
)


def _swap_rejected(model_key: str | None, fragment: str, at_load: bool) -> Callable:
    """A model swap that cannot work: rejected (synchronously, or by the loader when only loading shows it),
    with the reason in the parameter result or the log and /diagnostics, and the old model keeps running."""

    def body(h: Harness, r: Result) -> None:
        node = h.main
        r.check(node.wait_state(RUNNING, 10.0), f"not RUNNING before the scenario (state {node.state()})")
        before = node.diag("policy", after=-math.inf)  # at least one report, also right after the start
        path = str(h.models.root / "no_such_model.onnx") if model_key is None else str(h.models[model_key])
        w = Watch(node)
        t_call = time.monotonic()
        res = node.set_params(model_path=path)[0]
        r.figures["param_call_s"] = time.monotonic() - t_call
        if at_load:
            # Only the card is read on the executor: the call answers at once, the loader says the rest.
            r.check(res.successful, f"swap refused before loading: {res.reason}")
            r.check(wait_until(lambda: w.lines("model swap to") > 0, 20.0), "no log line for the failed swap")
            failed = wait_until(
                lambda: any(
                    e.get("event") == "failed" and e.get("attempted_path") == path
                    for e in node.model_events(w.t0)
                ),
                5.0,
            )
            r.check(failed, f"~/model never said the swap failed: {node.model_events(w.t0)}")
        else:
            r.check(not res.successful, "a bad model_path was accepted")
            r.check("rejected" in res.reason, f"reason: {res.reason}")
        time.sleep(1.0)
        pol = node.diag("policy", after=time.monotonic())
        a = w.verdict(r)
        text = (res.reason or "") + node.log()[w.log_offset :] + str(pol.get("last_error", ""))
        r.check(fragment in text, f"{fragment!r} not in the reason/log/diagnostics: {res.reason}")
        said = res.reason if not at_load else node.log()[w.log_offset :]
        r.check("the old model keeps running" in said, f"does not say the old model keeps running: {said}")
        r.check(pol.get("model") == before.get("model") == "tiny_a", f"model now {pol.get('model')}")
        r.check(pol.get("path") == str(h.models["a"]), f"diagnostics path {pol.get('path')}")
        param = node.get_param("model_path")
        r.check(
            param == str(h.models["a"]), f"model_path parameter {param!r} does not name the running model"
        )
        check_running(r, a)
        r.check(w.lines("model swap to") <= 1, "more than one log line for one failed swap")
        r.check(
            int(pol.get("swap_failures", 0)) > int(before.get("swap_failures", 0)),
            f"swap_failures did not count it: {pol.get('swap_failures')}",
        )
        if pol.get("model") != "tiny_a":  # the swap went through: put the main node back for what follows
            node.set_params(model_path=str(h.models["a"]))
            wait_until(lambda: node.diag("policy", after=time.monotonic()).get("model") == "tiny_a", 20.0)
            node.wait_state(RUNNING, 10.0)

    return body


#: Model swaps that cannot work: (name, what is set, model, what the reason says, found by the loader).
#: The card is read and checked in the parameter call (issue 27): only what loading shows is the loader's.
SWAP_FAULTS = [
    ("swap_missing_file", "model_path set to a file that does not exist",
     None, "does not exist", False),
    ("swap_directory", "model_path set to a directory",
     "directory", "is a directory", False),
    ("swap_too_large", "model_path set to a file larger than max_model_mb",
     "too_large", "more than max_model_mb", False),
    ("swap_zeros_file", "model_path set to 256 MiB of zeros (under max_model_mb)",
     "zeros", "not an ONNX model", False),
    ("swap_truncated_file", "model_path set to an ONNX file cut in half",
     "truncated", "truncated", False),
    ("swap_card_mismatch", "a valid ONNX whose card says 100 Hz (the node runs 50 Hz)",
     "period", "control period", False),
    ("swap_reorders_joints", "a model whose action joints come in another order",
     "reordered", "change the published joints", False),
    ("swap_card_graph_mismatch", "a card that fits the config but not its own graph",
     "graph_mismatch", "does not match its card", True),
    ("swap_nan_model", "a valid model and card whose every output is NaN",
     "nan", "non-finite", True),
]  # fmt: skip
for _name, _description, _model, _fragment, _at_load in SWAP_FAULTS:
    scenario("faults", _name, _description)(_swap_rejected(_model, _fragment, at_load=_at_load))


#: Node parameters for the tunable models: their /cmd_vel yaw rate sets how long a predict takes, far
#: outside any training range, so the command plausibility bounds must not clamp it.
TUNABLE = {"plausibility.command_sigmas": 1e6}
#: Inference times (best case here) of the slow-inference scenarios: 2.5 control periods (inside the
#: 16-action horizon even if a loaded machine makes it 5x slower), and ~3.5x the 8-action horizon.
SLOW_S, TOO_SLOW_S = 0.05, 0.6


@scenario("faults")
def slow_inference(h: Harness, r: Result) -> None:
    """Inference becomes ~2.5x slower than the control period while the node runs: ticks go on at 50 Hz,
    the latency is compensated (later actions of each chunk run), no stale action is executed, control
    stays RUNNING; and it is fast again afterwards."""
    yaw = h.models.yaw_rate_for(SLOW_S, "tunable16")  # before the node starts: nothing else competes
    node = h.start(h.models["tunable16"], "/slow", params=TUNABLE)
    try:
        r.check(node.wait_state(RUNNING, 60.0), f"node never RUNNING: {node.log()[-2000:]}")
        w = Watch(node)
        h.sensors.set_command(yaw_rate=yaw)
        time.sleep(1.5)  # the command is out and the chunks running are the slow ones
        t_slow = time.monotonic()
        time.sleep(4.0)
        h.sensors.set_command()
        rows = node.timing(t_slow)
        run_rows = rows[(rows[:, STATE] == RUNNING) & (rows[:, MISSED] == 0)]
        # DiffuseLoco requests a chunk as soon as the last one is in: chunks per second = 1 / inference time.
        seqs = np.unique(run_rows[:, SEQ]) if len(run_rows) else np.zeros(0)
        span = rows[-1, TICK] - rows[0, TICK] if len(rows) > 1 else math.nan
        chunk_ms = 1000.0 * span / max(len(seqs) - 1, 1)
        r.figures.update(
            chunk_interval_ms=chunk_ms,
            target_predict_ms=1000.0 * SLOW_S,
            median_index=float(np.median(run_rows[:, INDEX])) if len(run_rows) else math.nan,
            obs_to_cmd_p50_ms=float(np.median(run_rows[:, TICK] - run_rows[:, OBS])) * 1000.0
            if len(run_rows)
            else math.nan,
        )
        r.check(chunk_ms > 1.5 * 1000 * node.period, f"a new chunk every {chunk_ms:.0f} ms: not slow")
        r.check(len(run_rows) >= 0.9 * len(rows), f"RUNNING only {len(run_rows)} of {len(rows)} ticks")
        r.check(
            len(run_rows) > 0 and np.median(run_rows[:, INDEX]) >= 2,
            "latency not compensated: the chunks' first actions ran although their time had passed",
        )
        time.sleep(1.5)
        rows = node.timing(time.monotonic() - 0.5)
        r.check(
            node.state() == RUNNING and len(rows) > 0 and np.median(rows[:, INDEX]) < 2,
            f"not RUNNING on fresh chunks once inference is fast again ({node.state()})",
        )
        w.verdict(r)
    finally:
        h.sensors.set_command()
        node.close()


@scenario("faults")
def inference_too_slow(h: Harness, r: Result) -> None:
    """Inference becomes ~3.5x slower than the whole horizon while the node runs: every chunk is stale on
    arrival. The node holds a safe command (SAFE after the configured misses), says why on /diagnostics
    and in a bounded number of log lines, and runs again by itself when inference is fast again."""
    yaw = h.models.yaw_rate_for(TOO_SLOW_S, "tunable8")
    node = h.start(h.models["tunable8"], "/tooslow", params=TUNABLE)
    try:
        r.check(node.wait_state(RUNNING, 60.0), f"node never RUNNING: {node.log()[-2000:]}")
        w = Watch(node)
        h.sensors.set_command(yaw_rate=yaw)
        r.check(node.wait_state(SAFE, 20.0), f"never SAFE with chunks that all arrive stale ({node.state()})")
        t_safe = time.monotonic()
        time.sleep(2.0)
        node.diag("control loop", after=time.monotonic())
        rows = node.timing(t_safe)
        reasons = [d.get("reason", "") for d in node.diags("control loop", t_safe) if d.get("_level") == 2]
        r.check(
            len(rows) > 0 and bool(np.all(rows[:, STATE] == SAFE)),
            f"not steadily SAFE while every chunk is stale: states {np.unique(rows[:, STATE])}",
        )
        why = ("stale on arrival", "has not answered")  # a chunk came too late, or none has come yet
        r.check(any(c in x for x in reasons for c in why), f"/diagnostics never said why: {reasons}")
        held = _commands_in_state(node, t_safe, SAFE)
        r.check(len(held) > 10 and np.ptp(held, axis=0).max() < 1e-9, "commands moved while SAFE (hold)")
        h.sensors.set_command()
        t_back = time.monotonic()
        r.check(node.wait_state(RUNNING, 20.0), f"no recovery once inference is fast again ({node.state()})")
        r.figures["recovery_s"] = time.monotonic() - t_back
        w.verdict(r)
        lines = [x for x in node.log()[w.log_offset :].splitlines() if "control state" in x or "missed" in x]
        r.check(len(lines) <= 2 * MAX_LOG_LINES, f"{len(lines)} state/missed-step log lines: {lines}")
    finally:
        h.sensors.set_command()
        node.close()


def _signal_during_inference(sig: int) -> Callable:
    """The signal arrives while a slow inference (~0.6 s) is in flight: the node exits 0 within 10 s."""

    def body(h: Harness, r: Result) -> None:
        h.sensors.set_command(yaw_rate=h.models.yaw_rate_for(TOO_SLOW_S, "tunable8"))
        node = h.start(h.models["tunable8"], f"/sig{int(sig)}", params=TUNABLE)
        try:
            # Requests go out from the first tick with fresh observations; each predict takes ~0.6 s, so
            # one is in flight nearly all the time.
            requested = wait_until(lambda: int(node.diag("policy").get("requests", 0)) > 1, 60.0)
            r.check(requested, f"no inference requested: {node.log()[-2000:]}")
            time.sleep(0.3)
            w = Watch(node)
            t0 = time.monotonic()
            rc = node.stop(sig, timeout=10.0)
            r.figures["exit_s"] = time.monotonic() - t0
            r.figures["exit_code"] = rc
            tail = "\n".join(x for x in node.log().splitlines() if not x.startswith("[INFO]"))[-3000:]
            r.check(rc == 0, f"exit code {rc} after {signal.Signals(sig).name}: {tail}")
            r.check(r.figures["exit_s"] < 10.0, f"took {r.figures['exit_s']:.1f} s to exit")
            w.verdict(r)
        finally:
            h.sensors.set_command()
            node.close()

    return body


scenario("faults", "sigterm_during_inference", "SIGTERM while a slow inference is running")(
    _signal_during_inference(signal.SIGTERM)
)
scenario("faults", "sigint_during_inference", "SIGINT while a slow inference is running")(
    _signal_during_inference(signal.SIGINT)
)


#: Seconds a freshly started node and sensor process get before a scenario that started them measures.
STARTUP_SETTLE_S = 4.0


@scenario("faults")
def sim_clock_jumps_back(h: Harness, r: Result) -> None:
    """use_sim_time, /clock from the sensor process; the clock jumps back 30 s (a simulator reset): the node
    starts a new episode (history cleared, WAITING, measured pose latched), says so once, runs again."""
    # Own sensor topics stamped in sim time; only sim-time nodes listen to /clock (not the main node).
    sensors = Sensors(prefix="/simt", sim_start=1000.0)
    node = h.start(
        h.models["a"], "/simt", params={"use_sim_time": "true"}, sensor_prefix="/simt", witness=sensors
    )
    try:
        r.check(node.wait_state(RUNNING, 60.0), f"sim-time node never RUNNING: {node.log()[-2000:]}")
        # Measure the jump, not the start: in about 1 run in 6 a node stalls once for ~350 ms within its
        # first seconds while DDS discovery of the new processes settles (0 in 8 runs after this wait);
        # an open issue of its own (README, robustness).
        time.sleep(STARTUP_SETTLE_S)
        w = Watch(node)
        time.sleep(1.0)
        sensors.jump(-30.0)
        time.sleep(0.5)
        r.check(node.wait_state(RUNNING, 10.0), f"no recovery after the clock jump ({node.state()})")
        time.sleep(1.0)
        a = w.verdict(r)
        gaps = sensors.stats()["max_gap"]
        r.figures["sim_feeder_max_gap_ms"] = 1000.0 * max(gaps[s] for s in ("joint_states", "imu", "odom"))
        r.check(a.clock_jumps == 1, f"{a.clock_jumps} backward tick jumps seen (want 1)")
        r.check(
            w.lines("clock jumped back") == 1, f"{w.lines('clock jumped back')} 'clock jumped back' lines"
        )
    finally:
        node.close()
        sensors.close()


# -- load ----------------------------------------------------------------------------------------------------


#: Bounds under load (bench/robustness.py reports the measured figures beside a baseline). An observation
#: older than the horizon (8 x 20 ms) could only drive stale actions, so the latency bound stays below it.
OBS_TO_CMD_P99_MS = 150.0
JITTER_P99_MS = 10.0
RSS_GROWTH_MB = 8.0


def load_scenario(rates: dict[str, float], seconds: float) -> Callable[[Harness, Result], None]:
    """The streams at `rates` for `seconds`: no missed tick, nothing unsafe, control RUNNING throughout,
    obs->command latency and tick jitter bounded, resident memory flat."""

    def body(h: Harness, r: Result) -> None:
        node = h.main
        r.check(node.wait_state(RUNNING, 10.0), f"not RUNNING before the scenario (state {node.state()})")
        before = node.diag("control loop")
        sent0 = h.sensors.stats(reset_gaps=True)["sent"]
        cpu0 = cpu_seconds(node.proc.proc.pid)
        w = Watch(node)
        h.sensors.set_rates(rates)
        try:
            time.sleep(seconds)
        finally:
            h.sensors.set_rates(NORMAL_RATES)
        t1 = time.monotonic()
        loop = node.diag("control loop", after=t1)
        a = w.verdict(r)
        feeder = h.sensors.stats()
        sent = {s: (feeder["sent"].get(s, 0) - sent0.get(s, 0)) / (t1 - w.t0) for s in STREAMS}
        r.figures.update({f"feeder_max_gap_{s}_ms": 1000 * feeder["max_gap"][s] for s in rates})
        r.rss_growth_mb = node.rss_growth_mb(w.t0, t1)
        p99 = float(np.percentile(a.obs_to_cmd_ms, 99)) if len(a.obs_to_cmd_ms) else math.nan
        jit = float(np.percentile(a.jitter_ms, 99)) if len(a.jitter_ms) else math.nan
        diag_missed = int(loop.get("missed_ticks", 0)) - int(before.get("missed_ticks", 0))
        r.figures.update({f"rate_{s}_hz": v for s, v in sent.items()})
        p50 = float(np.median(a.obs_to_cmd_ms)) if len(a.obs_to_cmd_ms) else math.nan
        r.figures.update(
            obs_to_cmd_p50_ms=p50,
            obs_to_cmd_p99_ms=p99,
            jitter_p99_ms=jit,
            diag_missed_ticks=diag_missed,
            tick_cost_p99_ms=float(loop.get("tick_cost_p99_ms", "nan")),
            cpu_percent=100.0 * (cpu_seconds(node.proc.proc.pid) - cpu0) / (t1 - w.t0),
        )
        r.missed_ticks = max(r.missed_ticks, diag_missed)
        allowed = h.missed_ticks_allowed(a.ticks)
        r.check(
            diag_missed - a.stall_ticks <= allowed,
            f"/diagnostics counted {diag_missed} missed ticks, {a.stall_ticks} of them in a machine stall "
            f"(allowed {allowed} more)",
        )
        check_running(r, a, " under load")
        r.check(p99 <= OBS_TO_CMD_P99_MS, f"obs->command p99 {p99:.1f} ms > {OBS_TO_CMD_P99_MS}")
        r.check(jit <= JITTER_P99_MS, f"tick jitter p99 {jit:.2f} ms > {JITTER_P99_MS}")
        r.check(not (r.rss_growth_mb > RSS_GROWTH_MB), f"RSS grew {r.rss_growth_mb:.1f} MB")
        for s, hz in rates.items():
            r.check(sent[s] >= 0.7 * hz, f"the feeder reached only {sent[s]:.0f} of {hz:.0f} Hz on {s}")

    return body


#: Durations: the pytest suite runs these; bench/robustness.py sets its own (60 s by default).
LOAD_SECONDS = {"baseline": 8.0, "sensor_load": 12.0, "flood_10x": 6.0}
LOAD_RATES = {
    "baseline": {},
    "sensor_load": {"joint_states": 2000.0, "imu": 1000.0},
    "flood_10x": {s: 10 * hz for s, hz in NORMAL_RATES.items()},
}


def _load(name: str) -> Callable[[Harness, Result], None]:
    return lambda h, r: load_scenario(LOAD_RATES[name], LOAD_SECONDS[name])(h, r)


scenario("load", "baseline", "the normal rates: the figures load is compared with")(_load("baseline"))
scenario("load", "sensor_load", "joint states at 2 kHz and IMU at 1 kHz")(_load("sensor_load"))
scenario("load", "flood_10x", "every observation topic at 10x its normal rate")(_load("flood_10x"))


def wrong_types_main() -> int:
    """Publish String on /joint_states and TwistStamped on /cmd_vel until stdin closes
    (wrong_message_types)."""
    import rclpy

    rclpy.init()
    node = rclpy.create_node("wrong_type_driver")
    pubs = [node.create_publisher(String, TOPICS["joint_states"], 10),
            node.create_publisher(TwistStamped, TOPICS["cmd_vel"], 10)]  # fmt: skip
    fd = sys.stdin.fileno()
    while not (select.select([fd], [], [], 0.005)[0] and not os.read(fd, 4096)):
        pubs[0].publish(String(data="not a joint state"))
        pubs[1].publish(TwistStamped())
    node.destroy_node()
    rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--feeder":
        sys.exit(feeder_main(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "--wrong-types":
        sys.exit(wrong_types_main())
