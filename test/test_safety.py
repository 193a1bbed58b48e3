"""SafetyFilter (limits, rate limit, non-finite, safe modes, e-stop) and Watchdog (per-feature timeouts)."""

import math

import numpy as np
import pytest

from diffusion_controller.core.safety import SafetyFilter, Watchdog

LOWER = np.array([-1.0, 0.0, -0.5])
UPPER = np.array([1.0, 2.0, 0.5])
STEP = 0.1


def make(**kw) -> SafetyFilter:
    return SafetyFilter(LOWER, UPPER, STEP, **kw)


def test_first_command_is_clamped_to_the_limits():
    f = make()
    cmd, ok = f.apply([5.0, -3.0, 0.2])
    assert ok
    np.testing.assert_allclose(cmd, np.clip([5.0, -3.0, 0.2], LOWER, UPPER))


def test_rate_limit_moves_at_most_max_step_per_command():
    f = make()
    f.reset(np.array([0.0, 1.0, 0.0]))
    target = np.array([1.0, 0.0, 0.5])
    previous = f.hold()
    for _ in range(30):
        cmd, _ = f.apply(target)
        assert np.all(np.abs(cmd - previous) <= STEP + 1e-12)
        previous = cmd
    np.testing.assert_allclose(previous, target)


@pytest.mark.parametrize("bad", [[np.nan, 0, 0], [0, np.inf, 0], [0, 0, -np.inf], [0.0, 0.0], None])
def test_non_finite_or_misshapen_actions_hold_the_last_command(bad):
    f = make()
    f.reset([0.3, 1.0, 0.1])
    cmd, ok = f.apply(bad)
    assert not ok
    np.testing.assert_allclose(cmd, [0.3, 1.0, 0.1])


def test_nothing_to_hold_before_the_first_command():
    f = make()
    assert f.apply([np.nan] * 3) == (None, False)
    assert f.safe_command() is None


def test_default_pose_is_approached_gently_and_clamped():
    pose = np.array([0.5, 5.0, 0.0])  # 5.0 is beyond the upper limit: the pose is clamped too
    f = make(safe_mode="default_pose", default_pose=pose)
    f.reset([-1.0, 0.0, 0.5])
    previous = f.hold()
    for _ in range(40):
        cmd = f.safe_command()
        assert np.all(np.abs(cmd - previous) <= STEP + 1e-12)
        assert np.all(cmd >= LOWER) and np.all(cmd <= UPPER)
        previous = cmd
    np.testing.assert_allclose(previous, np.clip(pose, LOWER, UPPER))


def test_a_command_outside_narrowed_limits_converges_at_max_step_instead_of_jumping():
    """A swap to a model with tighter limits while the command sits outside them (DESIGN.md)."""
    f = SafetyFilter(np.array([-0.5, -0.5]), np.array([0.5, 0.5]), max_step=0.1)
    f.reset(np.array([0.9, 0.2]), clamp=False)
    cmds = [f.apply(np.array([0.9, 0.2]))[0] for _ in range(6)]
    np.testing.assert_allclose([c[0] for c in cmds], [0.8, 0.7, 0.6, 0.5, 0.5, 0.5])
    assert all(c[1] == 0.2 for c in cmds)
    f.reset(np.array([0.9, 0.2]))  # the default still clamps (a measured pose, no command sent yet)
    np.testing.assert_allclose(f.hold(), [0.5, 0.2])


def test_hold_mode_safe_command_holds():
    f = make()
    f.reset([0.2, 0.2, 0.2])
    np.testing.assert_allclose(f.safe_command(), [0.2, 0.2, 0.2])


def test_estop_latches_until_resume():
    f = make()
    f.reset([0.0, 1.0, 0.0])
    f.estop()
    for target in ([1.0, 2.0, 0.5], [-1.0, 0.0, -0.5]):
        cmd, ok = f.apply(target)
        assert not ok
        np.testing.assert_allclose(cmd, [0.0, 1.0, 0.0])
    f.resume()
    cmd, ok = f.apply([1.0, 2.0, 0.5])
    assert ok and cmd[0] == pytest.approx(STEP)


def test_preview_chains_the_filter_without_changing_state():
    f = make()
    start = np.array([0.0, 1.0, 0.0])
    f.reset(start)
    actions = np.array([[1.0, 1.0, 0.0], [np.nan, 1.0, 0.0], [1.0, 1.0, 9.0]])
    out = f.preview(actions, start)
    previous = start
    for row in out:
        assert np.all(np.abs(row - previous) <= STEP + 1e-12)
        previous = row
    np.testing.assert_allclose(out[1], out[0])  # a non-finite action holds in the preview too
    np.testing.assert_allclose(f.hold(), start)


@pytest.mark.parametrize(
    "kw",
    [
        {"safe_mode": "default_pose"},
        {"safe_mode": "freeze"},
        {"default_pose": [0.0, 0.0]},
        {"default_pose": [0.0, np.nan, 0.0]},
    ],
)
def test_bad_safe_mode_configuration_is_rejected(kw):
    with pytest.raises(ValueError):
        make(**kw)


@pytest.mark.parametrize(
    ("lower", "upper", "step"), [(LOWER, UPPER, 0.0), (LOWER, UPPER, np.nan), (UPPER, LOWER, STEP)]
)
def test_bad_limits_are_rejected(lower, upper, step):
    with pytest.raises(ValueError):
        SafetyFilter(lower, upper, step)


def test_watchdog_names_the_stale_feature_and_recovers():
    w = Watchdog({"imu": 0.1, "joint_position": 0.05})
    s = w.update({"imu": 0.02, "joint_position": 0.01})
    assert s.healthy and not s.changed
    s = w.update({"imu": 0.02, "joint_position": 0.08})
    assert not s.healthy and s.changed
    assert [x.name for x in s.stale] == ["joint_position"]
    assert "joint_position" in s.reason() and "imu" not in s.reason()
    s = w.update({"imu": 0.02, "joint_position": 0.09})
    assert not s.healthy and not s.changed
    s = w.update({"imu": 0.02, "joint_position": 0.0})
    assert s.healthy and s.changed


def test_watchdog_treats_missing_and_never_seen_features_as_stale():
    w = Watchdog({"imu": 0.1})
    assert not w.update({}).healthy
    s = w.update({"imu": math.inf})
    assert "never received" in s.reason()
