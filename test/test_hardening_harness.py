"""The hardening harness' own bookkeeping (bench/hardening/): what counts as a missed tick, and whose."""

import time

import numpy as np
from hardening.node import RUNNING, SAFE, count_missed, count_stall_safe
from hardening.sensors import STALL_MIN_S, SensorStreams, _feeder_command

PERIOD = 0.02


def ticks_with_gap(gap_s: float, start: float = 100.0) -> np.ndarray:
    """Ten ticks on time, one gap of `gap_s`, ten more on time (node clock)."""
    before = start + PERIOD * np.arange(10)
    after = before[-1] + gap_s + PERIOD * np.arange(10)
    return np.concatenate([before, after])


def adjacent(ticks: np.ndarray) -> np.ndarray:
    return np.ones(len(ticks) - 1, dtype=bool)


def test_ticks_on_time_miss_nothing():
    t = 100.0 + PERIOD * np.arange(50) + np.random.default_rng(0).uniform(-0.003, 0.003, 50)
    assert count_missed(t, adjacent(t), PERIOD) == (0, 0)


def test_a_gap_misses_its_empty_slots():
    t = ticks_with_gap(0.084)  # the CI case: 84 ms between two ticks at 50 Hz
    assert count_missed(t, adjacent(t), PERIOD) == (3, 0)


def test_slots_inside_a_machine_stall_are_the_machines():
    t = ticks_with_gap(0.084)
    gap_start = t[9]
    stall = [(gap_start + 0.006, gap_start + 0.077)]  # the sensor process stalled 71 ms inside the gap
    assert count_missed(t, adjacent(t), PERIOD, stall) == (3, 3)


def test_a_stall_elsewhere_excuses_nothing():
    t = ticks_with_gap(0.084)
    stall = [(t[0] - 1.0, t[0] - 0.9), (t[-1] + 0.1, t[-1] + 0.2)]
    assert count_missed(t, adjacent(t), PERIOD, stall) == (3, 0)


def test_a_node_stall_longer_than_the_machines_still_counts():
    t = ticks_with_gap(0.200)  # 9 empty slots, of which the machine held up ~2
    stall = [(t[9] + 0.05, t[9] + 0.09)]
    assert count_missed(t, adjacent(t), PERIOD, stall) == (9, 2)


def test_rows_lost_on_the_way_are_not_missed_ticks():
    t = ticks_with_gap(0.084)
    adj = adjacent(t)
    adj[9] = False  # DDS lost timing rows inside the gap: it says nothing about the node
    assert count_missed(t, adj, PERIOD) == (0, 0)


class _Publisher:
    def __init__(self) -> None:
        self.sent = 0

    def publish(self, msg: object) -> None:
        self.sent += 1


class _Node:
    def create_publisher(self, *args: object) -> _Publisher:
        return _Publisher()


def test_the_sensor_process_records_its_late_wake_ups_and_forgets_them_on_reset():
    streams = SensorStreams(_Node())
    streams.step()
    due = streams.step()
    time.sleep(max(0.0, due - time.monotonic()) + 0.03)  # held up 30 ms past its wake-up
    streams.step()
    assert streams.stalls, "a wake-up 30 ms late was not recorded"
    start, end = streams.stalls[-1]
    assert end - start >= 0.03 - STALL_MIN_S
    assert abs(end - time.time()) < 1.0  # in the stamp clock (wall time here), comparable to node ticks
    _feeder_command({"reset_gaps": True}, streams, {"t": 0.0})
    assert streams.stalls == []


def test_safe_ticks_right_after_a_long_machine_stall_are_excused():
    t = 100.0 + PERIOD * np.arange(100)
    states = np.full(100, RUNNING)
    states[40:48] = SAFE  # SAFE for 8 ticks once the machine ran the node again
    long_stall = [(t[38], t[38] + 0.15)]  # longer than the observation timeouts
    assert count_stall_safe(t, states, long_stall) == 8


def test_safe_ticks_are_the_nodes_after_a_short_stall_or_long_after_one():
    t = 100.0 + PERIOD * np.arange(200)
    states = np.full(200, RUNNING)
    states[40:48] = SAFE
    short_stall = [(t[38], t[38] + 0.04)]  # observations were never stale: the node had no reason
    assert count_stall_safe(t, states, short_stall) == 0
    long_ago = [(t[38] - 3.0, t[38] - 2.85)]
    assert count_stall_safe(t, states, long_ago) == 0
