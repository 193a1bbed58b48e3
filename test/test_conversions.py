"""Message <-> numpy conversions without a ROS graph."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from geometry_msgs.msg import Twist, TwistStamped
from nav_msgs.msg import Odometry
from sensor_msgs.msg import Imu, JointState
from std_msgs.msg import Float64MultiArray

from diffusion_controller.core import features as fx
from diffusion_controller.core import inputs
from diffusion_controller.core.card_schema import Feature
from diffusion_controller.ros import config as cf
from diffusion_controller.ros import conversions as cv

JOINTS = ("hip_1", "ankle_1", "hip_2", "ankle_2")
FEATURES = (
    Feature("projected_gravity", "projected_gravity", 3),
    Feature("base_angular_velocity", "base_angular_velocity", 3),
    Feature("base_linear_velocity", "base_linear_velocity", 3),
    Feature("velocity_command", "velocity_command", 3),
    Feature("joint_position", "joint_position", 4, JOINTS),
    Feature("joint_velocity", "joint_velocity", 4, JOINTS),
    Feature("contacts", "generic", 2),
    Feature("previous_action", "previous_action", 4),
)


def reader(type_: str, features: tuple[str, ...], *, stamp="header", frame="", rename=None, notes=None):
    src = inputs.SourceConfig("s", "/t", type_, features, stamp=stamp, frame=frame)
    on_note = (lambda cause, msg: notes.append((cause, msg))) if notes is not None else None
    decoder = inputs.SourceDecoder(src, FEATURES, rename)
    return inputs.SourceReader(decoder, max_future_s=0.05, on_note=on_note)


def joint_state(names, pos, vel=None, t=1.0) -> JointState:
    msg = JointState()
    msg.header.stamp = cv.sec_to_time(t)
    msg.name = list(names)
    msg.position = [float(p) for p in pos]
    msg.velocity = [float(v) for v in (vel if vel is not None else [0.0] * len(pos))]
    return msg


def quat_about(axis, angle):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    return np.r_[axis * math.sin(angle / 2), math.cos(angle / 2)]


# -- JointState -------------------------------------------------------------------------------------------


def test_joint_state_by_name_any_order_extra_ignored():
    r = reader(cf.JOINT_STATE, ("joint_position", "joint_velocity"))
    names = ["ankle_2", "wheel", "hip_1", "ankle_1", "hip_2"]
    pos = [4.0, 99.0, 1.0, 2.0, 3.0]
    vel = [40.0, 99.0, 10.0, 20.0, 30.0]
    stamp, vals = r.read(joint_state(names, pos, vel, t=1.5), now=1.5)
    assert stamp == pytest.approx(1.5)
    np.testing.assert_allclose(vals["joint_position"], [1, 2, 3, 4])
    np.testing.assert_allclose(vals["joint_velocity"], [10, 20, 30, 40])
    # A later message in a different order goes through the same lookup.
    _, vals = r.read(joint_state(list(reversed(names)), list(reversed(pos)), t=1.6), now=1.6)
    np.testing.assert_allclose(vals["joint_position"], [1, 2, 3, 4])


def test_joint_state_missing_joint_is_a_clear_error():
    r = reader(cf.JOINT_STATE, ("joint_position",))
    with pytest.raises(inputs.InputError) as exc:
        r.read(joint_state(["hip_1", "ankle_1", "hip_2"], [0, 0, 0]), now=1.0)
    assert exc.value.cause == "missing_joints" and "ankle_2" in str(exc.value)


def test_joint_state_with_a_needed_joint_named_twice_is_rejected():
    """Two values for one joint: the decoder must not silently take either (a driver merging two buses)."""
    r = reader(cf.JOINT_STATE, ("joint_position",))
    names = [*JOINTS, "extra", JOINTS[1]]
    with pytest.raises(inputs.InputError) as exc:
        r.read(joint_state(names, [1.0, 2.0, 3.0, 4.0, 0.0, 9.0]), now=1.0)
    assert exc.value.cause == "duplicate_joints" and JOINTS[1] in str(exc.value)
    # A repeated joint the model does not use is harmless.
    _, vals = r.read(joint_state([*JOINTS, "extra", "extra"], [1.0, 2.0, 3.0, 4.0, 0.0, 9.0], t=1.1), now=1.1)
    np.testing.assert_allclose(vals["joint_position"], [1, 2, 3, 4])


def test_joint_state_size_mismatch_and_non_finite():
    r = reader(cf.JOINT_STATE, ("joint_position", "joint_velocity"))
    msg = joint_state(JOINTS, [0, 0, 0, 0])
    msg.velocity = [0.0, 0.0]
    with pytest.raises(inputs.InputError) as exc:
        r.read(msg, now=1.0)
    assert exc.value.cause == "size_velocity"
    with pytest.raises(inputs.InputError) as exc:
        r.read(joint_state(JOINTS, [0, math.nan, 0, 0]), now=1.0)
    assert exc.value.cause == "non_finite" and "joint_position" in str(exc.value)
    # NaN in a joint the card does not use is irrelevant.
    _, vals = r.read(joint_state([*JOINTS, "x"], [0, 0, 0, 0, math.inf], [0, 0, 0, 0, 0]), now=1.0)
    assert np.all(np.isfinite(vals["joint_position"]))


def test_joint_rename_applies_to_lookup():
    r = reader(cf.JOINT_STATE, ("joint_position",), rename={"hip_1": "robot_hip"})
    _, vals = r.read(joint_state(["robot_hip", "ankle_1", "hip_2", "ankle_2"], [5, 6, 7, 8]), now=1.0)
    np.testing.assert_allclose(vals["joint_position"], [5, 6, 7, 8])
    with pytest.raises(inputs.InputError):
        r.read(joint_state(JOINTS, [5, 6, 7, 8], t=1.1), now=1.1)


# -- Imu / Odometry / Twist / arrays ----------------------------------------------------------------------


def test_imu_projected_gravity_and_angular_velocity():
    q = quat_about([1, 0, 0], 0.3)  # rolled 0.3 rad
    msg = Imu()
    msg.header.stamp = cv.sec_to_time(2.0)
    msg.orientation.x, msg.orientation.y, msg.orientation.z, msg.orientation.w = q
    msg.angular_velocity.x, msg.angular_velocity.y, msg.angular_velocity.z = 0.1, -0.2, 0.3
    _, vals = reader(cf.IMU, ("projected_gravity", "base_angular_velocity")).read(msg, now=2.0)
    np.testing.assert_allclose(vals["projected_gravity"], fx.projected_gravity(q))
    np.testing.assert_allclose(vals["projected_gravity"], [0, -math.sin(0.3), -math.cos(0.3)], atol=1e-12)
    np.testing.assert_allclose(vals["base_angular_velocity"], [0.1, -0.2, 0.3])


def test_imu_zero_quaternion_rejected():
    msg = Imu()
    msg.header.stamp = cv.sec_to_time(2.0)
    msg.orientation.w = 0.0
    with pytest.raises(inputs.InputError) as exc:
        reader(cf.IMU, ("projected_gravity",)).read(msg, now=2.0)
    assert exc.value.cause == "bad_quaternion"
    msg.orientation.w = 1.0
    msg.orientation_covariance[0] = -1.0
    with pytest.raises(inputs.InputError) as exc:
        reader(cf.IMU, ("projected_gravity",)).read(msg, now=2.0)
    assert exc.value.cause == "no_orientation"
    # Angular velocity alone does not need the orientation.
    reader(cf.IMU, ("base_angular_velocity",)).read(msg, now=2.0)


def test_odometry_body_velocity_and_child_frame():
    msg = Odometry()
    msg.header.stamp = cv.sec_to_time(3.0)
    msg.header.frame_id = "odom"
    msg.child_frame_id = "base_link"
    msg.pose.pose.orientation.w = 1.0
    msg.twist.twist.linear.x, msg.twist.twist.linear.y = 0.5, -0.1
    r = reader(cf.ODOMETRY, ("base_linear_velocity",), frame="base_link")
    _, vals = r.read(msg, now=3.0)
    np.testing.assert_allclose(vals["base_linear_velocity"], [0.5, -0.1, 0.0])
    msg.child_frame_id = "odom"
    with pytest.raises(inputs.InputError) as exc:
        reader(cf.ODOMETRY, ("base_linear_velocity",), frame="base_link").read(msg, now=3.0)
    assert exc.value.cause == "child_frame"


def test_twist_and_twist_stamped_velocity_command():
    tw = Twist()
    tw.linear.x, tw.linear.y, tw.linear.z, tw.angular.z = 0.4, 0.1, 9.0, -0.3
    stamp, vals = reader(cf.TWIST, ("velocity_command",)).read(tw, now=7.0)
    assert stamp == 7.0  # no header: receipt time
    np.testing.assert_allclose(vals["velocity_command"], [0.4, 0.1, -0.3])
    ts = TwistStamped()
    ts.header.stamp = cv.sec_to_time(6.99)
    ts.twist = tw
    stamp, vals = reader(cf.TWIST_STAMPED, ("velocity_command",)).read(ts, now=7.0)
    assert stamp == pytest.approx(6.99)
    np.testing.assert_allclose(vals["velocity_command"], [0.4, 0.1, -0.3])


def test_float64_array_split_and_size_check():
    r = reader(cf.FLOAT64_ARRAY, ("contacts", "velocity_command"))
    _, vals = r.read(Float64MultiArray(data=[1.0, 0.0, 0.2, 0.0, 0.1]), now=1.0)
    np.testing.assert_allclose(vals["contacts"], [1, 0])
    np.testing.assert_allclose(vals["velocity_command"], [0.2, 0.0, 0.1])
    with pytest.raises(inputs.InputError) as exc:
        r.read(Float64MultiArray(data=[1.0, 0.0]), now=1.0)
    assert exc.value.cause == "size" and "expected 5" in str(exc.value)


# -- stamps ----------------------------------------------------------------------------------------------


def test_receipt_mode_ignores_header():
    r = reader(cf.JOINT_STATE, ("joint_position",), stamp="receipt")
    stamp, _ = r.read(joint_state(JOINTS, [0] * 4, t=1.0), now=5.0)
    assert stamp == 5.0


def test_zero_stamp_falls_back_to_receipt_and_is_noted_once():
    notes: list = []
    r = reader(cf.JOINT_STATE, ("joint_position",), notes=notes)
    stamp, _ = r.read(joint_state(JOINTS, [0] * 4, t=0.0), now=4.0)
    assert stamp == 4.0
    r.read(joint_state(JOINTS, [0] * 4, t=0.0), now=4.1)
    assert [c for c, _ in notes] == ["zero_stamp"]


def test_future_and_backwards_stamps_rejected():
    r = reader(cf.JOINT_STATE, ("joint_position",))
    with pytest.raises(inputs.InputError) as exc:
        r.read(joint_state(JOINTS, [0] * 4, t=10.0), now=9.0)
    assert exc.value.cause == "future_stamp"
    r.read(joint_state(JOINTS, [0] * 4, t=9.0), now=9.0)
    with pytest.raises(inputs.InputError) as exc:
        r.read(joint_state(JOINTS, [0] * 4, t=8.5), now=9.1)
    assert exc.value.cause == "stamp_backwards"
    stamp, _ = r.read(joint_state(JOINTS, [0] * 4, t=9.05), now=9.1)
    assert stamp == pytest.approx(9.05)


def test_clock_reset_starts_a_new_timeline():
    """A simulation reset sends sim time (and stamps) back to 0: not 'stamps going backwards'."""
    r = reader(cf.JOINT_STATE, ("joint_position",))
    r.read(joint_state(JOINTS, [0] * 4, t=50.0), now=50.0)
    with pytest.raises(inputs.InputError):
        r.read(joint_state(JOINTS, [0] * 4, t=49.0), now=50.01)  # same clock: really backwards
    stamp, _ = r.read(joint_state(JOINTS, [0] * 4, t=0.01), now=0.02)  # clock went back to 0
    assert stamp == pytest.approx(0.01)
    with pytest.raises(inputs.InputError):
        r.read(joint_state(JOINTS, [0] * 4, t=0.005), now=0.03)


def test_frame_check_on_headers():
    r = reader(cf.IMU, ("base_angular_velocity",), frame="imu_link")
    msg = Imu()
    msg.header.stamp = cv.sec_to_time(1.0)
    msg.header.frame_id = "camera"
    with pytest.raises(inputs.InputError) as exc:
        r.read(msg, now=1.0)
    assert exc.value.cause == "frame"


def test_time_round_trip():
    for s in (0.0, 1e-9, 1.5, 12345.678901234):
        assert inputs.time_to_sec(cv.sec_to_time(s)) == pytest.approx(s, abs=1e-9)


# -- outputs ------------------------------------------------------------------------------------------------


def test_command_message():
    msg = cv.command_msg(np.array([0.1, -0.2, 0.3]))
    assert list(msg.data) == pytest.approx([0.1, -0.2, 0.3])
    assert msg.layout.dim[0].size == 3


def test_trajectory_message_points_and_velocities():
    t = np.array([0.02, 0.04, 0.06, 0.08])
    pos = np.stack([np.sin(t * 10), np.cos(t * 10)], axis=1)
    msg = cv.trajectory_msg(["a", "b"], pos, t)
    assert msg.joint_names == ["a", "b"]
    assert msg.header.stamp.sec == 0 and msg.header.stamp.nanosec == 0
    tfs = [p.time_from_start.sec + 1e-9 * p.time_from_start.nanosec for p in msg.points]
    assert tfs == pytest.approx(list(t))
    assert all(b > a for a, b in itertools.pairwise(tfs))
    vel = np.array([p.velocities for p in msg.points])
    # Interior points: central differences approximate the derivative (10 cos, -10 sin).
    np.testing.assert_allclose(vel[1:3, 0], 10 * np.cos(t[1:3] * 10), rtol=0.02)
    np.testing.assert_allclose(vel[1:3, 1], -10 * np.sin(t[1:3] * 10), rtol=0.05)
    assert len(msg.points[0].positions) == 2


def test_trajectory_rejects_bad_times_and_shapes():
    with pytest.raises(ValueError, match="strictly increasing"):
        cv.trajectory_msg(["a"], np.zeros((2, 1)), np.array([0.02, 0.02]))
    with pytest.raises(ValueError, match="positive"):
        cv.trajectory_msg(["a"], np.zeros((1, 1)), np.array([0.0]))
    with pytest.raises(ValueError, match="do not match"):
        cv.trajectory_msg(["a", "b"], np.zeros((2, 1)), np.array([0.02, 0.04]))


def test_single_point_trajectory_has_zero_velocity():
    msg = cv.trajectory_msg(["a"], np.array([[0.3]]), np.array([0.02]))
    assert list(msg.points[0].velocities) == [0.0]


def test_every_config_type_has_a_message_class():
    assert set(cv.MESSAGE_CLASSES) == set(cf.KINDS_BY_TYPE) == set(inputs.MESSAGE_TYPES)
