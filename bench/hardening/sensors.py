"""The sensor process: the ant's streams at set rates, bad messages on demand, and its controller.

A process of its own (`python -m hardening.sensors --feeder ...`, run from bench/), at real-time priority
where allowed, so a starved test process never passes for a node that drops data. The same module is the
wrong-type driver of `bad_input.wrong_message_types` (`--wrong-types`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import select
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from geometry_msgs.msg import TwistStamped
from rclpy.qos import QoSProfile
from ros_helpers import wait_until
from rosgraph_msgs.msg import Clock
from std_msgs.msg import String

from hardening.messages import MUTATIONS, NORMAL_RATES, STREAMS, TOPICS, TYPES, build

#: bench/: the directory a child process of this module runs in, so that `hardening` imports.
BENCH = Path(__file__).resolve().parents[1]
#: A sensor-process wake-up later than this is recorded as a machine stall (at most MAX_STALLS kept).
STALL_MIN_S, MAX_STALLS = 0.002, 1000


def child(mode: str, *args: str, **popen: Any) -> subprocess.Popen:
    """This module as a process of its own in `mode` (`--feeder`, `--wrong-types`), run from bench/."""
    cmd = [sys.executable, "-m", "hardening.sensors", mode, *args]
    return subprocess.Popen(cmd, cwd=BENCH, **popen)


class SensorStreams:
    """The ant's four observation streams at set rates, stamped by `clock` (wall time or a sim clock).

    The publishing loop of the sensor process (`feeder_main`); `messages.build` makes each good message,
    which a bad-input scenario mutates. `max_gap` is the longest pause between two messages of a stream, so a
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
                self.pubs[s].publish(inj["mutate"](build(s, t, self.command), t))
            if inj["left"] <= 0:
                del self.injections[s]
        for s in STREAMS:
            burst = 0
            replaced = s in self.injections and self.injections[s]["replace"]
            while now >= self._due[s] and burst < 5:  # catch up a little after a late wake-up
                self._due[s] += 1.0 / self.rates[s]
                burst += 1
                if s not in self.paused and not replaced:
                    self.pubs[s].publish(build(s, self.clock(), self.command))
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
        self.proc = child(
            "--feeder", prefix, str(sim_start), str(priority),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True,
        )  # fmt: skip
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
