"""bench/control_loop.py's arithmetic without ROS: tick analysis, CPU ratio and cost per input message."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import control_loop as cl
import numpy as np
import pytest

from diffusion_controller.ros.outputs import ACTION, EXEC, OBS, SLOT, STATE, TICK


def rows(ticks, action_times=None, period=0.02, slots=None):
    """Timing rows RUNNING at `ticks`, each executing the action at `action_times` (default: on time),
    for the timer slots `slots` (default: NaN, as from a node without TimerInfo)."""
    ticks = np.asarray(ticks, float)
    act = ticks if action_times is None else np.asarray(action_times, float)
    out = np.zeros((len(ticks), 9))
    out[:, TICK], out[:, EXEC], out[:, ACTION] = ticks, ticks, act
    out[:, SLOT] = np.nan if slots is None else slots
    out[:, OBS] = ticks - 0.03
    out[:, STATE] = cl.RUNNING
    return out


def test_a_skipped_tick_is_missed_and_counts_as_jitter():
    t = np.r_[np.arange(10) * 0.02, 0.22 + np.arange(10) * 0.02]  # one tick (0.20) never happened
    a = cl.analyse(rows(t), 0.02, [])
    assert a["missed_ticks"] == 1
    assert a["jitter_ms_max"] == pytest.approx(20.0)
    assert a["stale_actions_published"] == 0


def test_a_late_tick_is_jitter_but_only_a_skipped_slot_is_missed():
    """The slot column (the timer's expected call time) tells a tick 12 ms late from a skipped slot: the
    tick times alone (rounded intervals) count the late one as missed too."""
    slots = np.arange(20) * 0.02
    late = slots.copy()
    late[10] += 0.012  # slot 10 ran 12 ms late
    assert cl.analyse(rows(late), 0.02, [])["missed_ticks"] == 1  # without slots: over-counted
    a = cl.analyse(rows(late, slots=slots), 0.02, [])
    assert a["missed_ticks"] == 0 and a["jitter_ms_max"] == pytest.approx(12.0)
    skipped = np.delete(slots, 10)
    assert cl.analyse(rows(skipped, slots=skipped), 0.02, [])["missed_ticks"] == 1


def test_a_50_hz_model_held_for_two_100_hz_ticks_is_not_stale_but_an_older_action_is():
    t = np.arange(20) * 0.01
    held = np.floor(t / 0.02) * 0.02  # each 20 ms action runs for two 10 ms ticks
    assert cl.analyse(rows(t, held), 0.01, [], action_period=0.02)["stale_actions_published"] == 0
    assert cl.analyse(rows(t, held), 0.01, [])["stale_actions_published"] == 10
    late = held - 0.02  # one model period behind
    assert cl.analyse(rows(t, late), 0.01, [], action_period=0.02)["stale_actions_published"] == 20


def test_cpu_ratio_and_cost_per_message_compare_the_lowest_and_highest_scale_of_a_rate():
    table = [
        {"rate_hz": 50.0, "sensor_scale": 1.0, "node_cpu_percent": 40.0, "input_msgs_per_s": 750.0},
        {"rate_hz": 50.0, "sensor_scale": 4.0, "node_cpu_percent": 46.0, "input_msgs_per_s": 3000.0},
        {"rate_hz": 100.0, "sensor_scale": 1.0, "node_cpu_percent": 60.0, "input_msgs_per_s": 750.0},
    ]
    assert cl.cpu_ratio(table, 50.0, [1.0, 4.0]) == pytest.approx(46.0 / 40.0)
    assert cl.us_per_message(table, 50.0, [1.0, 4.0]) == pytest.approx(1e6 * 0.06 / 2250.0)
    assert math.isnan(cl.cpu_ratio(table, 100.0, [1.0, 4.0]))  # no 4x row at 100 Hz


def test_the_node_is_started_as_a_module_on_the_chosen_provider(monkeypatch):
    """--provider reaches the node (default cpu); the node starts with `python -m`, no console script, so
    scripts/gpu_check runs it from a plain PYTHONPATH checkout."""
    started = []
    monkeypatch.setattr(cl.subprocess, "Popen", lambda cmd, **kw: started.append(cmd))
    cl.start_node(Path("m.onnx"), 100.0, "auto", None)
    cl.start_node(Path("m.onnx"), 100.0, "auto", None, "cuda")
    provs = [next(a for a in c if a.startswith("provider:=")) for c in started]
    assert provs == ["provider:=cpu", "provider:=cuda"]
    assert started[0][:3] == [sys.executable, "-m", "diffusion_controller.ros.controller_node"]
