"""The shipped model follows small commands too: bench/command_map.py --quick, in-process, no ROS.

The model before the gait clock stood still for slow commands (0.1 m/s -> 0.01, -0.2 m/s -> -0.09,
0.5 rad/s -> 0.15 in this benchmark) while its closed-loop average still looked acceptable; this catches
that failure directly. Seeds are fixed and the loop is single-threaded, so the figures are repeatable.
"""

from __future__ import annotations

import json
import math

import command_map


def test_shipped_model_has_no_dead_zone_and_no_runaway(capsys) -> None:
    assert command_map.main(["--quick", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = out["rows"]
    assert [(r["axis"], r["command"]) for r in rows] == [
        ("vx" if a == 0 else "wz", v) for a, v in command_map.QUICK_COMMANDS
    ]
    for r in rows:
        assert math.isfinite(r["policy"]) and math.isfinite(r["expert"]), r  # nan = it fell
        assert abs(r["expert"] - r["command"]) < 0.1 * abs(r["command"]) + 0.02, r  # the reference works
        # the same direction, at least half and at most 1.5x the commanded speed
        ratio = r["policy"] / r["command"]
        assert 0.5 <= ratio <= 1.5, r
