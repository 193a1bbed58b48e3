"""ObservationHistory: zero-order hold on the grid, input rejection, previous_action, bounded memory."""

import dataclasses
import time

import numpy as np
import pytest
from core_fakes import FakeFeature, clock_card

from diffusion_controller.core.features import gait_clock, gait_phase
from diffusion_controller.core.observation import ObservationError, ObservationHistory

P = 0.02


def make(**kw) -> ObservationHistory:
    return ObservationHistory(clock_card(), **kw)


def column(h: ObservationHistory, rows: np.ndarray, name: str) -> np.ndarray:
    return rows[:, clock_card().feature_slice(name)]


def test_sample_is_zero_order_hold_on_the_control_grid():
    h = make()
    # The clock feature arrives every 7 ms with its own stamp as value; joints every 20 ms.
    stamps = np.arange(0.0, 0.2, 0.007)
    for t in stamps:
        h.push("clock", t, [t])
    for t in np.arange(0.0, 0.2, P):
        h.push("joint_position", t, [t, 2 * t, 3 * t])
    t_obs = 0.15
    rows = h.sample(t_obs)
    grid = t_obs - (h.history - 1 - np.arange(h.history)) * P
    expected = [stamps[stamps <= g].max() for g in grid]
    np.testing.assert_allclose(column(h, rows, "clock")[:, 0], expected)
    assert np.all(np.diff(column(h, rows, "clock")[:, 0]) > 0), "rows are oldest first"


def test_newest_common_stamp_is_the_oldest_newest_stamp_of_required_features():
    h = make()
    assert h.newest_common_stamp() is None
    h.push("clock", 0.30, [0.3])
    assert h.newest_common_stamp() is None, "joint_position not seen yet"
    h.push("joint_position", 0.25, [0, 0, 0])
    h.push("velocity_command", 0.10, [0, 0, 0])  # operator input: never holds t_obs back
    assert h.newest_common_stamp() == 0.25
    h.push("joint_position", 0.40, [0, 0, 0])
    assert h.newest_common_stamp() == 0.30


def test_grid_older_than_the_buffer_repeats_the_oldest_sample():
    h = make()
    h.push("clock", 1.0, [1.0])
    h.push("clock", 1.02, [1.02])
    h.push("joint_position", 1.02, [0, 0, 0])
    rows = h.sample(1.02)
    np.testing.assert_allclose(column(h, rows, "clock")[:, 0], [1.0, 1.0, 1.0, 1.02])


@pytest.mark.parametrize(
    ("feature", "stamp", "value", "fragment"),
    [
        ("clock", 1.0, [1.0, 2.0], "expected 1 values, got 2"),
        ("clock", 1.0, [np.nan], "non-finite"),
        ("clock", 1.0, [np.inf], "non-finite"),
        ("clock", np.nan, [1.0], "not finite"),
        ("clock", 1.0, ["x"], "not numeric"),
        ("nope", 1.0, [1.0], "not a feature"),
        ("previous_action", 1.0, [0.0, 0.0], "own commands"),
        ("clock", 0.5, [1.0], "backwards"),
        ("clock", 2.2, [1.0], "future"),
    ],
)
def test_bad_samples_are_rejected_and_leave_the_state_unchanged(feature, stamp, value, fragment):
    h = make()
    h.push("clock", 1.0, [7.0])
    h.push("joint_position", 1.0, [1, 2, 3])
    before = h.sample(1.0)
    with pytest.raises(ObservationError) as e:
        h.push(feature, stamp, value, now=2.0)
    assert fragment in e.value.reason
    np.testing.assert_array_equal(h.sample(1.0), before)
    assert h.newest_common_stamp() == 1.0


def test_equal_stamp_replaces_the_newest_value():
    h = make()
    h.push("clock", 1.0, [1.0])
    h.push("clock", 1.0, [5.0])
    h.push("joint_position", 1.0, [0, 0, 0])
    assert column(h, h.sample(1.0), "clock")[-1, 0] == 5.0


def test_previous_action_is_the_last_command_strictly_before_each_row():
    h = make()
    h.push("clock", 0.0, [0.0])
    h.push("joint_position", 0.0, [5.0, 4.0, 9.0])  # j2=5, j1=4
    for k in range(10):
        h.record_command(k * P, [k, -k])
    t_obs = 6 * P
    rows = column(h, h.sample(t_obs), "previous_action")
    grid_ticks = 6 - (h.history - 1 - np.arange(h.history))  # commands exist at every grid tick ...
    np.testing.assert_allclose(rows[:, 0], grid_ticks - 1)  # ... but only the one before counts
    np.testing.assert_allclose(rows[:, 1], -(grid_ticks - 1))


def test_previous_action_before_any_command_is_the_measured_position_in_action_joint_order():
    h = make()
    h.push("clock", 0.0, [0.0])
    h.push("joint_position", 0.0, [5.0, 4.0, 9.0])  # joints (j2, j1, j3); actions (j1, j2)
    rows = column(h, h.sample(0.0), "previous_action")
    np.testing.assert_allclose(rows, np.tile([4.0, 5.0], (h.history, 1)))
    np.testing.assert_allclose(h.measured_action(), [4.0, 5.0])


def test_velocity_command_is_zero_until_received_and_expires_when_configured():
    h = make(expire_s={"velocity_command": 0.05})
    h.push("clock", 0.0, [0.0])
    h.push("joint_position", 0.0, [0, 0, 0])
    assert np.all(column(h, h.sample(0.0), "velocity_command") == 0)
    h.push("velocity_command", 0.0, [1.0, 0.0, 0.5])
    h.push("clock", 0.1, [0.1])
    h.push("joint_position", 0.1, [0, 0, 0])
    rows = column(h, h.sample(0.1), "velocity_command")
    grid = 0.1 - (h.history - 1 - np.arange(h.history)) * P
    fresh = grid - 0.0 <= 0.05
    np.testing.assert_allclose(rows[fresh], np.tile([1.0, 0.0, 0.5], (fresh.sum(), 1)))
    assert np.all(rows[~fresh] == 0) and (~fresh).any()


def test_ages_name_required_features_only():
    h = make()
    h.push("clock", 1.0, [1.0])
    ages = h.ages(1.5)
    assert set(ages) == {"clock", "joint_position"}
    assert ages["clock"] == pytest.approx(0.5)
    assert ages["joint_position"] == np.inf
    assert h.missing() == ("joint_position",)


def test_reset_keep_newest_restarts_history_at_the_newest_sample():
    h = make()
    for k in range(10):
        h.push("clock", k * P, [k])
        h.push("joint_position", k * P, [k, k, k])
    h.reset(keep_newest=True)
    rows = column(h, h.sample(9 * P), "clock")
    assert np.all(rows == 9)
    h.reset()
    assert h.newest_common_stamp() is None


def test_flooding_keeps_memory_bounded_and_history_correct():
    h = make()
    n = 50_000  # 10 s at 5 kHz: 250x the control rate
    stamps = np.arange(n) * 0.0002
    t0 = time.perf_counter()
    for t in stamps:
        h.push("clock", t, (t,))
    per_push = (time.perf_counter() - t0) / n
    h.push("joint_position", stamps[-1], [0, 0, 0])
    buffer = h._buffers["clock"]
    assert len(buffer) <= buffer._capacity and buffer._stamps.size == 2 * buffer._capacity
    # Every grid point is still found within the coalescing spacing (period / 10).
    rows = column(h, h.sample(stamps[-1]), "clock")[:, 0]
    grid = stamps[-1] - (h.history - 1 - np.arange(h.history)) * P
    assert np.all(rows <= grid + 1e-12) and np.all(grid - rows < P / 10)
    assert per_push < 100e-6, f"{per_push * 1e6:.1f} us per push"


def test_gait_clock_is_computed_from_each_row_time_and_needs_no_source():
    base = clock_card()
    gait = FakeFeature("gait", "gait_clock", 2, frequency_hz=1.5)
    card = dataclasses.replace(base, features=(*base.features, gait))
    h = ObservationHistory(card)
    assert "gait" not in h.required and "gait" not in h.ages(0.0)
    with pytest.raises(ObservationError, match="computed from the observation time"):
        h.push("gait", 0.0, [0.0, 1.0])
    t0 = 1_763_700_000.0  # a wall-clock stamp: the phase must not lose precision
    h.push("clock", t0, [0.0])
    h.push("joint_position", t0, [0, 0, 0])
    rows = h.sample(t0)[:, card.feature_slice("gait")]
    grid = h.grid(t0)
    np.testing.assert_allclose(rows, gait_clock(grid, 1.5), atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0)
    # consecutive rows advance by f * period of a cycle
    phases = np.array([gait_phase(r) for r in rows])
    np.testing.assert_allclose(np.mod(np.diff(phases), 1.0), 1.5 * P, atol=1e-6)
