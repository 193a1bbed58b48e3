"""The ant's sensor streams: the good message of each, and the bad ones (mutations) a scenario publishes.

`BAD_INPUTS` are the malformed messages of the bad-input scenarios with what the node must say about each;
`MUTATIONS` every message change by name, which is how the sensor process is told what to publish.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from geometry_msgs.msg import Twist
from nav_msgs.msg import Odometry
from sensor_msgs.msg import Imu, JointState

ANT_JOINTS = ("hip_1", "ankle_1", "hip_2", "ankle_2", "hip_3", "ankle_3", "hip_4", "ankle_4")
STREAMS = ("joint_states", "imu", "odom", "cmd_vel")
TOPICS = {
    "joint_states": "/joint_states",
    "imu": "/imu_sensor_broadcaster/imu",
    "odom": "/odom",
    "cmd_vel": "/cmd_vel",
}
TYPES = {"joint_states": JointState, "imu": Imu, "odom": Odometry, "cmd_vel": Twist}
#: The feeder's normal rates (Hz): a ros2_control robot's joint states and IMU, odometry, a teleop.
NORMAL_RATES = {"joint_states": 200.0, "imu": 100.0, "odom": 50.0, "cmd_vel": 1.0}


def stamp(msg: Any, t: float) -> Any:
    ns = max(round(t * 1e9), 0)
    msg.header.stamp.sec, msg.header.stamp.nanosec = ns // 1_000_000_000, ns % 1_000_000_000
    return msg


def build(stream: str, t: float, command: tuple[float, float] = (0.2, 0.0)) -> Any:
    """The good message of `stream` at stamp time `t`; `command` is the (vx, yaw rate) of /cmd_vel."""
    if stream == "joint_states":
        msg = stamp(JointState(), t)
        msg.name = list(ANT_JOINTS)
        msg.position = [0.1 * math.sin(t + i) for i in range(len(ANT_JOINTS))]
        msg.velocity = [0.1 * math.cos(t + i) for i in range(len(ANT_JOINTS))]
    elif stream == "imu":
        msg = stamp(Imu(), t)
        msg.header.frame_id = "imu_link"
        msg.orientation.w = 1.0
        msg.angular_velocity.z = 0.05 * math.sin(t)
        msg.linear_acceleration.z = 9.81
    elif stream == "odom":
        msg = stamp(Odometry(), t)
        msg.header.frame_id, msg.child_frame_id = "odom", "base_link"
        msg.pose.pose.orientation.w = 1.0
        msg.twist.twist.linear.x = 0.2
    else:
        msg = Twist()
        msg.linear.x, msg.angular.z = command
    return msg


@dataclass(frozen=True)
class BadInput:
    """A malformed message on one topic; `fragment` is what the node's log must say (None: nothing), and
    `rejected` whether the node must drop it (False: the message is usable where it matters)."""

    name: str
    stream: str
    mutate: Callable[[Any, float], Any]
    fragment: str | None
    rejected: bool = True
    counter: str = ""  # an /diagnostics observations key (`<name>.<stream>`) that must count them too


def _set(attr_path: str, value: Any) -> Callable[[Any, float], Any]:
    def mutate(msg: Any, t: float) -> Any:
        obj = msg
        *parents, last = attr_path.split(".")
        for p in parents:
            obj = getattr(obj, p)
        setattr(obj, last, value(getattr(obj, last)) if callable(value) else value)
        return msg

    return mutate


def _restamp(dt: float | None) -> Callable[[Any, float], Any]:
    return lambda msg, t: stamp(msg, 0.0 if dt is None else t + dt)


def _replace(factory: Callable[[], Any]) -> Callable[[Any, float], Any]:
    return lambda msg, t: factory()


def _nan_at(field_name: str, index: int, value: float = math.nan) -> Callable[[Any, float], Any]:
    def mutate(msg: Any, t: float) -> Any:
        values = list(getattr(msg, field_name))
        values[index] = value
        setattr(msg, field_name, values)
        return msg

    return mutate


def _extra_and_duplicated(msg: JointState, t: float) -> JointState:
    msg.name = [*msg.name, "hip_1"]  # all joints present, hip_1 listed a second time with another value
    msg.position = [*msg.position, 0.5]
    msg.velocity = [*msg.velocity, 0.0]
    return msg


NAN, INF = math.nan, math.inf
BAD_INPUTS = [
    BadInput("joint_states_short_position", "joint_states", _set("position", lambda v: v[:5]),
             "5 position values"),
    BadInput("joint_states_long_velocity", "joint_states", _set("velocity", lambda v: [*v, 0.0, 0.0]),
             "10 velocity values"),
    BadInput("joint_states_missing_joint", "joint_states", _set("name", lambda v: [*v[:7], "knee_9"]),
             "lacks joints ['ankle_4']"),
    BadInput("joint_states_duplicated_joint", "joint_states", _extra_and_duplicated, "more than once"),
    BadInput("joint_states_nan_position", "joint_states", _nan_at("position", 2), "contains NaN/Inf"),
    BadInput("joint_states_inf_velocity", "joint_states", _nan_at("velocity", 7, INF), "contains NaN/Inf"),
    BadInput("joint_states_nan_effort_unused", "joint_states", _set("effort", [NAN] * 8), None, False),
    BadInput("joint_states_future_stamp", "joint_states", _restamp(5.0), "ahead of the node clock"),
    BadInput("joint_states_stamp_backwards", "joint_states", _restamp(-1.0), "older than the previous"),
    BadInput("joint_states_zero_stamp", "joint_states", _restamp(None), "header stamp 0", False),
    BadInput("joint_states_empty", "joint_states", _replace(JointState), "lacks joints"),
    BadInput("imu_nan_orientation", "imu", _set("orientation.x", NAN), "not a unit quaternion"),
    BadInput("imu_zero_quaternion", "imu", _set("orientation.w", 0.0), "not a unit quaternion"),
    BadInput("imu_inf_angular_velocity", "imu", _set("angular_velocity.y", -INF), "contains NaN/Inf"),
    BadInput("imu_nan_acceleration_unused", "imu", _set("linear_acceleration.x", NAN), None, False),
    BadInput("imu_future_stamp", "imu", _restamp(5.0), "ahead of the node clock"),
    BadInput("imu_stamp_backwards", "imu", _restamp(-1.0), "older than the previous"),
    BadInput("imu_zero_stamp", "imu", _restamp(None), "header stamp 0", False),
    # ROS 2 defaults a quaternion to w=1: an empty Imu reads as level and still, stamped on receipt.
    BadInput("imu_empty", "imu", _replace(Imu), "header stamp 0", False),
    BadInput("odom_nan_twist", "odom", _set("twist.twist.linear.y", NAN), "contains NaN/Inf"),
    BadInput("odom_inf_twist", "odom", _set("twist.twist.linear.x", INF), "contains NaN/Inf"),
    BadInput("odom_zero_quaternion_unused", "odom", _set("pose.pose.orientation.w", 0.0), None, False),
    BadInput("odom_wrong_child_frame", "odom", _set("child_frame_id", "odom"), "child_frame_id 'odom'"),
    BadInput("odom_future_stamp", "odom", _restamp(5.0), "ahead of the node clock"),
    BadInput("odom_stamp_backwards", "odom", _restamp(-1.0), "older than the previous"),
    BadInput("odom_zero_stamp", "odom", _restamp(None), "header stamp 0", False),
    BadInput("odom_empty", "odom", _replace(Odometry), "is not the body frame"),
    BadInput("cmd_vel_nan", "cmd_vel", _set("linear.x", NAN), "contains NaN/Inf"),
    BadInput("cmd_vel_inf", "cmd_vel", _set("angular.z", INF), "contains NaN/Inf"),
    BadInput("cmd_vel_empty", "cmd_vel", _replace(Twist), None, False),  # all zeros: a valid "stand still"
    # Finite but impossible (core.plausibility): refused for sensors, clamped for the command, counted.
    BadInput("joint_states_implausible_position", "joint_states", _nan_at("position", 2, 1e308),
             "/joint_states: joint_position: hip_2 = 1e+308", counter="implausible"),
    BadInput("joint_states_implausible_velocity", "joint_states", _nan_at("velocity", 5, 1e6),
             "joint_velocity: ankle_3 = 1e+06", counter="implausible"),
    BadInput("imu_implausible_angular_velocity", "imu", _set("angular_velocity.z", -3e4),
             "base_angular_velocity[2] = -3e+04", counter="implausible"),
    BadInput("cmd_vel_overdriven", "cmd_vel", _set("linear.x", 100.0),
             "/cmd_vel: velocity_command: velocity_command[0] = 100", False, counter="clamped"),
]  # fmt: skip
#: Every message mutation by name: the sensor process publishes them (`Sensors.inject`).
MUTATIONS: dict[str, tuple[str, Callable[[Any, float], Any]]] = {
    b.name: (b.stream, b.mutate) for b in BAD_INPUTS
}
MUTATIONS.update(
    {
        "joint_states_nan_everywhere": ("joint_states", _nan_at("position", 0)),
        "imu_zero_quaternion_only": ("imu", _set("orientation.w", 0.0)),
        "odom_wrong_frame_only": ("odom", _set("child_frame_id", "odom")),
    }
)
