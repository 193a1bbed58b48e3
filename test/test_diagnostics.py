"""Loop statistics, rate-limited fault logging and DiagnosticArray building, without a ROS graph."""

from __future__ import annotations

import math

import pytest

from diffusion_controller.ros import diagnostics as dg


def test_rate_limited_log_one_line_per_cause_then_a_summary():
    lines: list[str] = []
    t = {"now": 0.0}
    log = dg.RateLimitedLog(lines.append, interval_s=10.0, clock=lambda: t["now"])
    for _ in range(500):  # a 500 Hz stream of one bad cause for a second
        log("imu:bad_quaternion", "bad quaternion")
        t["now"] += 0.002
    log("joint_states:missing_joints", "missing joints")
    assert lines == ["bad quaternion", "missing joints"]
    t["now"] = 11.0
    log("imu:bad_quaternion", "bad quaternion")
    assert lines[-1] == "bad quaternion (499 more like this suppressed)"
    assert log.counts["imu:bad_quaternion"] == 501 and log.total == 502


def test_loop_stats_rate_jitter_and_missed_ticks():
    s = dg.LoopStats(period_s=0.02)
    t = 0.0
    for k in range(100):
        t += 0.02 + (0.001 if k % 10 == 0 else 0.0)
        s.tick(t)
    assert s.rate_hz == pytest.approx(1 / 0.0201, rel=1e-3)
    assert s.jitter_ms(50) == pytest.approx(0.0, abs=1e-9)
    assert 0.5 < s.jitter_ms(99) <= 1.0 + 1e-9
    assert s.missed_ticks == 0
    s.tick(t + 0.06)  # two ticks skipped
    assert s.missed_ticks == 2
    s.reset_phase()
    s.tick(t + 10.0)  # after a pause (deactivate): not counted
    assert s.missed_ticks == 2 and s.ticks == 102


def test_loop_stats_empty_is_nan():
    s = dg.LoopStats(period_s=0.02)
    assert math.isnan(s.rate_hz) and math.isnan(s.jitter_ms(99))


def test_diagnostic_array_levels_and_values():
    from builtin_interfaces.msg import Time

    msg = dg.diagnostic_array(
        "/robot/diffusion_controller",
        Time(sec=3),
        [
            dg.Section("control loop", dg.OK, "running", {"rate_hz": 49.98765, "ticks": 10}),
            dg.Section("observations", dg.ERROR, "stale: projected_gravity", {"age_ms.x": math.nan}),
        ],
    )
    assert msg.header.stamp.sec == 3
    loop, obs = msg.status
    assert loop.name == "/robot/diffusion_controller: control loop" and loop.level == bytes([0])
    assert {kv.key: kv.value for kv in loop.values} == {"rate_hz": "49.99", "ticks": "10"}
    assert obs.level == bytes([2]) and obs.values[0].value == "nan"


def test_age_watch_names_the_sources_whose_age_p95_passes_80_percent_of_their_timeout():
    w = dg.AgeWatch(window=100)
    sources = {"joint_position": "joints", "joint_velocity": "joints", "base_linear_velocity": "odom"}
    for k in range(100):
        late = 0.17 if k % 10 == 0 else 0.02  # 10 % of the ticks: p95 is the late age
        w.add({"joint_position": 0.01, "joint_velocity": 0.03, "base_linear_velocity": late,
               "never": math.inf}, sources)  # fmt: skip
    p95 = w.p95()
    assert p95["joints"] == pytest.approx(0.03) and p95["odom"] == pytest.approx(0.17)
    assert w.near_timeout({"joints": 0.1, "odom": 0.2}) == [("odom", pytest.approx(0.17), 0.2)]
    assert w.near_timeout({"joints": 0.1, "odom": 0.0}) == []  # timeout 0: never stale, never warned
    assert w.near_timeout({"joints": 0.035, "odom": 0.25}) == [("joints", pytest.approx(0.03), 0.035)]
