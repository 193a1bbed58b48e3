"""Loop statistics, rate-limited fault logging and /diagnostics messages.

diagnostic_updater is not a dependency (it is not available as a wheel), so the node builds the
DiagnosticArray itself with the same conventions: one DiagnosticStatus per concern, levels OK / WARN /
ERROR / STALE, key-value pairs a dashboard (rqt_robot_monitor) can show. The statistics are plain Python so
they are testable without a graph.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue

# Levels as ints (the message field is a byte); ordered so max() gives the worst.
OK, WARN, ERROR, STALE = 0, 1, 2, 3


class RateLimitedLog:
    """One log line per cause, then at most one per `interval_s` with the count of suppressed repeats.

    Bad input at 500 Hz must not become 500 log lines a second; the first occurrence of each cause is
    always logged so nothing is hidden. rclpy's `throttle_duration_sec` throttles per call site, not per
    cause (a second kind of bad input within the interval would go unlogged) and counts nothing, while
    these counts feed /diagnostics."""

    def __init__(self, sink: Callable[[str], None], interval_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._sink = sink
        self._interval = interval_s
        self._clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self.counts: dict[str, int] = {}
        self.last_message = ""

    def __call__(self, cause: str, message: str) -> bool:
        """Record one occurrence; returns True when a line was logged."""
        self.counts[cause] = self.counts.get(cause, 0) + 1
        self.last_message = message
        now = self._clock()
        last = self._last.get(cause)
        if last is not None and now - last < self._interval:
            self._suppressed[cause] = self._suppressed.get(cause, 0) + 1
            return False
        n = self._suppressed.pop(cause, 0)
        self._last[cause] = now
        self._sink(message + (f" ({n} more like this suppressed)" if n else ""))
        return True

    @property
    def total(self) -> int:
        return sum(self.counts.values())


class AgeWatch:
    """The p95 of each observation source's age at the ticks (the age the watchdog compares with the
    source's timeout_s), over the last `window` ticks: a source whose p95 passes `fraction` of its timeout
    is about to make the node go SAFE or WAITING, which an operator should hear before it happens."""

    def __init__(self, window: int = 400, fraction: float = 0.8) -> None:
        self.window, self.fraction = window, fraction
        self._ages: dict[str, deque[float]] = {}
        self._lock = threading.Lock()  # the loop thread adds, the diagnostics timer reads

    def add(self, ages: Mapping[str, float], feature_source: Mapping[str, str]) -> None:
        """One tick's feature ages (s; inf = never received, skipped), per source: its oldest feature."""
        worst: dict[str, float] = {}
        for feature, age in ages.items():
            src = feature_source.get(feature)
            if src is not None and math.isfinite(age):
                worst[src] = max(age, worst.get(src, -math.inf))
        with self._lock:
            for src, age in worst.items():
                self._ages.setdefault(src, deque(maxlen=self.window)).append(age)

    def p95(self) -> dict[str, float]:
        with self._lock:
            copies = {src: list(ages) for src, ages in self._ages.items() if ages}
        return {src: percentile(ages, 95) for src, ages in copies.items()}

    def near_timeout(self, timeouts: Mapping[str, float]) -> list[tuple[str, float, float]]:
        """(source, p95, timeout) of each source with a timeout (> 0) whose age p95 passes the fraction."""
        out = []
        for src, p in self.p95().items():
            t = timeouts.get(src, 0.0)
            if t > 0 and p > self.fraction * t:
                out.append((src, p, t))
        return out

    def clear(self) -> None:
        with self._lock:
            self._ages.clear()


def percentile(values: Iterable[float], q: float) -> float:
    data = np.fromiter(values, dtype=float)
    return float(np.percentile(data, q)) if data.size else math.nan


@dataclass
class LoopStats:
    """Tick timing: measured rate, jitter (|interval - period|) and ticks the timer skipped.

    A skipped tick is a slot of the timer's grid with no callback. With the timer's expected call time
    (`slot`, rclpy's TimerInfo) that is exact: rcl keeps the grid and advances it past the slots it
    skipped. Without it, the interval is rounded to periods, which also counts a tick that ran late but
    in its own slot (1.5 periods after the one before, under sim time one physics step late) as missed."""

    period_s: float
    window: int = 1000
    ticks: int = 0
    missed_ticks: int = 0
    max_jitter_s: float = 0.0
    _last: float | None = None
    _last_slot: float | None = None
    _intervals: deque = field(default_factory=deque)
    _jitter: deque = field(default_factory=deque)
    _cost: deque = field(default_factory=deque)

    def tick(
        self, t: float, cost_s: float | None = None, slot: float | None = None, actual: float | None = None
    ) -> None:
        """Record a tick at time `t` (seconds, monotonic or sim time) that took `cost_s` to run; `slot`:
        the time the timer's grid expected it and `actual` the time it was called (seconds on the timer's
        clock), None when unknown.

        The first tick after a reset counts from the slot it ran in, not the one it was due in: the slots
        before it belong to no tick of this phase. (Under use_sim_time the grid starts at time 0 when the
        timer is started before the first /clock; the first tick then runs at the simulator's time, and
        counting from slot 0 called the clock's start 28 missed ticks.)"""
        if self._last is None and slot is not None and actual is not None and actual - slot >= self.period_s:
            slot += math.floor((actual - slot) / self.period_s + 1e-9) * self.period_s
        self.ticks += 1
        if cost_s is not None:
            self._cost.append(cost_s)
            if len(self._cost) > self.window:
                self._cost.popleft()
        if self._last is not None:
            dt = t - self._last
            jitter = abs(dt - self.period_s)
            self._intervals.append(dt)
            self._jitter.append(jitter)
            if len(self._jitter) > self.window:
                self._intervals.popleft()
                self._jitter.popleft()
            self.max_jitter_s = max(self.max_jitter_s, jitter)
            if slot is None or self._last_slot is None:
                # An interval of ~2 periods means the timer skipped one tick, and so on.
                self.missed_ticks += max(0, round(dt / self.period_s) - 1)
        if slot is not None and self._last_slot is not None:
            self.missed_ticks += max(0, round((slot - self._last_slot) / self.period_s) - 1)
        self._last, self._last_slot = t, slot

    def reset_phase(self) -> None:
        """Forget the last tick (after a pause such as deactivate) so the gap is not counted as missed."""
        self._last = self._last_slot = None

    @property
    def rate_hz(self) -> float:
        if not self._intervals:
            return math.nan
        mean = float(np.mean(self._intervals))
        return 1.0 / mean if mean > 0 else math.nan

    def jitter_ms(self, q: float) -> float:
        return 1000.0 * percentile(self._jitter, q)

    def cost_ms(self, q: float) -> float:
        """Percentile of the time the tick callback itself took."""
        return 1000.0 * percentile(self._cost, q)


@dataclass
class Section:
    """One DiagnosticStatus: a name under the node, a level, a summary and key-values."""

    name: str
    level: int
    message: str
    values: Mapping[str, object]


def fmt(value: object) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def diagnostic_array(node_name: str, stamp, sections: Iterable[Section]) -> DiagnosticArray:
    """DiagnosticArray with one status per section, named `<node>: <section>` like diagnostic_updater."""
    msg = DiagnosticArray()
    msg.header.stamp = stamp
    for s in sections:
        st = DiagnosticStatus()
        st.level = bytes([s.level])
        st.name = f"{node_name}: {s.name}"
        st.message = s.message
        st.hardware_id = node_name
        st.values = [KeyValue(key=k, value=fmt(v)) for k, v in s.values.items()]
        msg.status.append(st)
    return msg
