"""bench/machine_stalls.py: the probes that see a CPU held by the machine, and the skipped ticks inside."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import closed_loop as bench_closed_loop
import machine_stalls as ms
import numpy as np
import pytest

from diffusion_controller.sim.closed_loop import row_slots, tick_gaps


def test_missed_ticks_inside_a_machine_stall_are_counted_apart_from_the_others():
    t = np.r_[np.arange(10) * 0.02, 0.24 + np.arange(10) * 0.02, 0.48 + np.arange(5) * 0.02]
    # gaps: 0.18 -> 0.24 (2 missed) and 0.42 -> 0.48 (2 missed); only the first overlaps the stall
    gaps = tick_gaps(t, 0.02)
    assert [(round(a, 2), round(b, 2), n) for a, b, n in gaps] == [(0.18, 0.24, 2), (0.42, 0.48, 2)]
    assert ms.missed_in(gaps, [(0.19, 0.23)]) == 2
    assert ms.missed_in(gaps, []) == 0
    assert ms.missed_in(gaps, [(0.0, 1.0)]) == 4
    assert ms.missed_in(gaps, [(0.25, 0.30)]) == 0  # a stall while ticks kept coming excuses nothing
    assert ms.missed_in(gaps, [(0.15, 0.17)]) == 0
    assert ms.missed_in(gaps, [(0.15, 0.17)], margin_s=0.02) == 2  # rows received late: widen backwards
    late_walls = t + 0.001  # wall times of receipt: the gaps come from the ticks, the times from the walls
    assert tick_gaps(t, 0.02, late_walls)[0][:2] == pytest.approx((0.181, 0.241))


def test_skips_are_counted_from_the_rows_slots_where_the_node_sends_them():
    """Under sim time a tick one physics step (2.5 ms) late reads, from tick times, as a skipped 5 ms slot;
    the row's slot column (the timer's expected call time) says it was not. Rows without it (8 columns, or
    NaN from an rclpy without TimerInfo) fall back to the tick times."""
    slots = np.arange(8) * 0.005
    ticks = slots.copy()
    ticks[4] += 0.0025
    full = np.c_[ticks, np.zeros((8, 7)), slots]
    assert [n for _, _, n in tick_gaps(ticks, 0.005)] == [1]  # the late tick, rounded, over-counted
    assert tick_gaps(row_slots(full), 0.005) == []
    assert np.array_equal(row_slots(full[:, :8]), ticks)
    full[:, 8] = np.nan
    assert np.array_equal(row_slots(full), ticks)
    gone = np.delete(np.c_[ticks, np.zeros((8, 7)), slots], 2, axis=0)  # slot 2 skipped
    assert [n for _, _, n in tick_gaps(row_slots(gone), 0.005, gone[:, 0])] == [1]


def test_a_probe_held_by_the_machine_reports_the_hold(tmp_path):
    """The probes are real processes: one held 60 ms (SIGSTOP, as a host holds a vCPU) reports a stall
    covering the hold; where SCHED_FIFO is not allowed they say why instead of reporting figures."""
    probes = ms.Probes(tmp_path, min_s=0.0025)
    time.sleep(0.5)  # started and real-time
    victim = probes.procs[0]
    held_from = time.time()
    os.kill(victim.pid, signal.SIGSTOP)
    time.sleep(0.06)
    os.kill(victim.pid, signal.SIGCONT)
    held_to = time.time()
    time.sleep(0.2)
    stalls, why = probes.stop()
    if why is not None:
        assert "cpu" in why
        pytest.skip(f"no SCHED_FIFO here: {why}")
    assert all(p.returncode is not None for p in probes.procs)
    covering = [(a, b) for a, b in stalls if a <= held_from + 0.005 and b >= held_to - 0.005]
    assert covering, (stalls, held_from, held_to)
    assert all(b - a < 0.5 for a, b in stalls)


def test_the_closed_loop_bench_reports_the_skipped_ticks_inside_stalls_apart():
    row = {"setting": "ref", "missed_ticks": 3.0, "tick_gaps": [(10.0, 10.01, 1), (20.0, 20.012, 2)]}
    figures = bench_closed_loop.stall_figures(row, [(19.99, 20.008)], None, 0.005)
    assert figures == {"machine_stalls": 1, "machine_stall_max_ms": pytest.approx(18.0),
                       "missed_ticks_in_rows": 3, "missed_ticks_in_machine_stalls": 2}  # fmt: skip
    line = bench_closed_loop.stall_line({**row, **figures})
    assert "3 (the node's count), 3 in the timing rows, 2 of them while the machine held a CPU" in line
    none = bench_closed_loop.stall_figures(row, [], "cpu 0: not permitted", 0.005)
    assert none["machine_stalls"] is None
    assert "no machine-stall probe (cpu 0: not permitted)" in bench_closed_loop.stall_line({**row, **none})


def test_hold_cpu_takes_a_cpu_a_hold_ms_and_an_interval():
    assert ms.parse_hold("0:10:200") == (0, 0.01, 0.2)
    assert ms.parse_hold("1:2.5:50") == (1, 0.0025, 0.05)
    for bad in ("0", "0:10", "a:10:200", "0:10:200:1", "-1:10:200", "0:0:200", "0:200:200", "0:20:10"):
        with pytest.raises(ValueError, match="CPU"):
            ms.parse_hold(bad)
    with pytest.raises(ValueError, match="need 0 < hold < every"):
        ms.Holds(Path("/nonexistent"), 0, 0.2, 0.1)


def test_a_held_cpu_looks_to_a_probe_on_it_as_the_machine_holding_it(tmp_path):
    """Holds are what a host's hold is from inside: while the holder busy-waits at SCHED_FIFO 99, nothing
    else on its CPU runs, not even the probe (same priority): one stall per hold, about as long."""
    cpu = min(os.sched_getaffinity(0))
    probes = ms.Probes(tmp_path, min_s=0.0025)
    time.sleep(0.5)  # started and real-time
    holds = ms.Holds(tmp_path, cpu, 0.02, 0.1)
    time.sleep(1.5)
    n, why = holds.stop()
    stalls, probe_why = probes.stop()
    if why is not None or probe_why is not None:
        assert "cpu" in (why or probe_why)
        pytest.skip(f"no SCHED_FIFO here: {why or probe_why}")
    assert 8 <= n <= 16, n
    held = [b - a for a, b in stalls if b - a >= 0.015]
    assert len(held) >= n - 2 and all(d < 0.05 for d in held), (n, stalls)


def test_holds_stopped_at_any_moment_report_their_count(tmp_path):
    """SIGTERM can reach the holder anywhere, in the middle of writing its count too: the count it leaves
    is whole every time (10 stops of a holder busy half of each millisecond)."""
    cpu = min(os.sched_getaffinity(0))
    for i in range(10):
        holds = ms.Holds(tmp_path, cpu, 0.0005, 0.001)
        time.sleep(0.15 + 0.01 * i)
        n, why = holds.stop()
        if why is not None and "cpu" in why:
            pytest.skip(f"no SCHED_FIFO here: {why}")
        assert why is None and n > 0, (i, n, why)
