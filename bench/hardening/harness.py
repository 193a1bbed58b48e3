"""The harness, a scenario's result, the verdict every scenario gets, and the scenario registry.

The harness holds the test-side ROS node (`ros_helpers.Probe`), the sensor process, the scenario models
and the node processes started; `Watch.verdict` is what holds around every scenario whatever happened
(package docstring). Scenarios register with `@scenario(group)`; `hardening.scenarios` imports them all.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ros_helpers import Probe

from hardening.models import Models
from hardening.node import RUNNING, Analysis, NodeRun
from hardening.sensors import Sensors


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
