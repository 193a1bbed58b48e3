"""Load scenarios: the sensor streams at their normal rates, at 2 kHz / 1 kHz, and every one at 10x.

No missed tick, nothing unsafe, control RUNNING throughout, latency and jitter bounded, memory flat.
`LOAD_SECONDS` is read when a scenario runs: bench/robustness.py lengthens it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
from ros_helpers import cpu_seconds

from hardening.harness import Harness, Result, Watch, check_running, scenario
from hardening.messages import NORMAL_RATES, STREAMS
from hardening.node import RUNNING

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
