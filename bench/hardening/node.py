"""One controller node process under observation, and the checks of what it published.

`NodeRun` starts the node (config/ant.yaml, CPU) and reads what the harness' probe recorded of it;
`NodeRun.analyse` checks every command, trajectory and timing row of a window against the card and
DESIGN.md; `count_missed` / `count_stall_safe` tell the node's missed ticks from the machine's.
"""

from __future__ import annotations

import itertools
import math
import signal
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from ros_helpers import NodeProcess, console_script, diagnostic_status, rss_mb, wait_until
from std_msgs.msg import Float64MultiArray
from trajectory_msgs.msg import JointTrajectory

from diffusion_controller.core.card import ModelCard
from diffusion_controller.core.chunk import is_stale
from diffusion_controller.ros.outputs import ACTION, EXEC, MISSED, OBS, STATE, TICK, TIMING_COLUMNS
from hardening.messages import STREAMS, TOPICS

if TYPE_CHECKING:
    from hardening.harness import Harness
    from hardening.sensors import Sensors

ROOT = Path(__file__).resolve().parents[2]
NODE_NAME = "diffusion_controller"
#: How ~/model is published (latched): a subscriber that comes later still gets the current model.
LATCHED = QoSProfile(
    depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL
)
ANT_JOINTS = ("hip_1", "ankle_1", "hip_2", "ankle_2", "hip_3", "ankle_3", "hip_4", "ankle_4")
#: ~/debug/command_timing state codes (loop.STATE_CODES).
WAITING, RUNNING, SAFE, ESTOP = 0.0, 1.0, 2.0, 3.0
#: config/ant.yaml values the verdicts depend on.
MAX_STEP = 0.25
TIMEOUTS = {"joint_states": 0.1, "imu": 0.1, "odom": 0.2}
#: A machine stall at least this long can rightly make the node SAFE: the last IMU message before it (10 ms
#: period) plus DDS delivery is then older than the shortest timeout. It may take STALL_RECOVERY_S to recover.
STALL_STALE_S, STALL_RECOVERY_S = min(TIMEOUTS.values()) - 0.015, 1.0
#: /diagnostics period of the nodes under test (a scenario waits for a fresh report after it acts).
DIAG_PERIOD = 0.25


def _seq(info: Any) -> int | None:
    """The writer's publication sequence number of a received message (None where rmw has none)."""
    seq = info.get("publication_sequence_number") if info else None
    return int(seq) if seq else None


def _src(info: Any) -> float:
    """When the publisher sent the message (source timestamp, s)."""
    return 1e-9 * info["source_timestamp"]


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
        return np.array(rows, dtype=float).reshape(-1, len(TIMING_COLUMNS))

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
        stale = is_stale(run[:, ACTION], run[:, EXEC], self.period)  # the core's rule, its float slack too
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
