"""numpy <-> ROS messages: the message class of each source type, and the messages the node publishes.

Reading observation messages is the core's (core/inputs.py reads their fields, so the bag reader uses
the same code without ROS); what is left here needs the ROS message classes: the class a subscription
takes per source type, stamps as builtin_interfaces Time/Duration, and the command, trajectory and
Twist messages built from numpy arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from builtin_interfaces.msg import Duration, Time
from geometry_msgs.msg import Twist, TwistStamped
from nav_msgs.msg import Odometry
from sensor_msgs.msg import Imu, JointState
from std_msgs.msg import Float64MultiArray, MultiArrayDimension
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from diffusion_controller.core import inputs

MESSAGE_CLASSES: dict[str, type] = {
    inputs.JOINT_STATE: JointState,
    inputs.IMU: Imu,
    inputs.ODOMETRY: Odometry,
    inputs.TWIST: Twist,
    inputs.TWIST_STAMPED: TwistStamped,
    inputs.FLOAT64_ARRAY: Float64MultiArray,
}


def sec_to_time(s: float) -> Time:
    ns = round(s * 1e9)
    return Time(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)


def sec_to_duration(s: float) -> Duration:
    ns = round(s * 1e9)
    return Duration(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)


# ---------------------------------------------------------------------------------------------------------
# Outputs


def command_msg(values: np.ndarray) -> Float64MultiArray:
    """Float64MultiArray in output joint order (forward_command_controller)."""
    msg = Float64MultiArray()
    msg.layout.dim = [MultiArrayDimension(label="joints", size=len(values), stride=len(values))]
    msg.data = [float(v) for v in values]
    return msg


def finite_difference_velocities(positions: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Per-point velocities of a sampled trajectory (second-order central differences inside, one-sided
    at the ends; zeros for a single point) so joint_trajectory_controller interpolates cubically."""
    positions = np.asarray(positions, dtype=float)
    if len(positions) < 2:
        return np.zeros_like(positions)
    return np.gradient(positions, np.asarray(times, dtype=float), axis=0)


def trajectory_msg(joint_names: Sequence[str], positions: np.ndarray, times_from_start: np.ndarray,
                   stamp: Time | None = None, start_velocities: np.ndarray | None = None) -> JointTrajectory:
    """JointTrajectory of the remaining chunk. `times_from_start` must be strictly increasing and > 0.

    stamp None -> header stamp 0 (the controller starts it on receipt). Velocities are finite differences
    over the points; `start_velocities` is unused now but kept for a future smoother start.
    """
    positions, times, msg = _trajectory("positions", joint_names, positions, times_from_start, stamp)
    vel = finite_difference_velocities(positions, times)
    for k in range(len(times)):
        pt = JointTrajectoryPoint()
        pt.positions = positions[k].tolist()
        pt.velocities = vel[k].tolist()
        pt.time_from_start = sec_to_duration(float(times[k]))
        msg.points.append(pt)
    return msg


def _trajectory(what: str, joint_names: Sequence[str], values: Any, times_from_start: Any,
                stamp: Time | None) -> tuple[np.ndarray, np.ndarray, JointTrajectory]:  # fmt: skip
    """The checked (points x joints) values and times, and an empty JointTrajectory for them."""
    times = np.asarray(times_from_start, dtype=float)
    values = np.asarray(values, dtype=float)
    if values.ndim != 2 or values.shape != (len(times), len(joint_names)):
        shape = f"{len(times)} points x {len(joint_names)} joints"
        raise ValueError(f"{what} {values.shape} do not match {shape}")
    if len(times) and (times[0] <= 0.0 or np.any(np.diff(times) <= 0.0)):
        raise ValueError("time_from_start must be positive and strictly increasing")
    msg = JointTrajectory()
    if stamp is not None:
        msg.header.stamp = stamp
    msg.joint_names = list(joint_names)
    return values, times, msg


def array_msg(values: Sequence[float]) -> Float64MultiArray:
    msg = Float64MultiArray()
    msg.data = [float(v) for v in values]
    return msg


def twist_msg(axes: Sequence[str], values: np.ndarray) -> Twist:
    """A Twist with the named fields ('linear.x', 'angular.z', ...) set, the others zero."""
    msg = Twist()
    for axis, v in zip(axes, values, strict=True):
        part, comp = axis.split(".")
        setattr(getattr(msg, part), comp, float(v))
    return msg


def kind_trajectory_msg(joint_names: Sequence[str], values: np.ndarray, times_from_start: np.ndarray,
                        interface: str, stamp: Time | None = None) -> JointTrajectory:  # fmt: skip
    """JointTrajectory of the remaining chunk with velocities or efforts only (a controller with that
    command interface reads them); positions go through conversions.trajectory_msg."""
    field = {"velocity": "velocities", "effort": "effort"}[interface]
    values, times, msg = _trajectory("values", joint_names, values, times_from_start, stamp)
    for k in range(len(times)):
        pt = JointTrajectoryPoint()
        setattr(pt, field, values[k].tolist())
        pt.time_from_start = sec_to_duration(float(times[k]))
        msg.points.append(pt)
    return msg
