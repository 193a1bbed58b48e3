"""Every hardening scenario, registered: the groups' modules imported, `names`, `in_order` and `run`.

Import this (not a group module alone) to see all of them. `in_order` lists them input, then faults, then
load (each group in the order its module registers them), the order bench/robustness.py runs them in,
whichever module was imported first.
"""

from __future__ import annotations

import time

from hardening import bad_input, faults, load  # noqa: F401 (each registers its scenarios)
from hardening.harness import SCENARIOS, Harness, Result, Scenario

#: The groups in the order bench/robustness.py runs them (that of the single file they were split from).
GROUPS = ("input", "faults", "load")


def names(group: str) -> list[str]:
    return [s.name for s in SCENARIOS.values() if s.group == group]


def in_order() -> list[Scenario]:
    """Every scenario, group by group in GROUPS order."""
    return [s for g in GROUPS for s in SCENARIOS.values() if s.group == g]


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
