"""Chunks on the wire: JointTrajectory <-> (actions, t_obs, model), the topic's QoS, and the controller's
intake of them.

A chunk is a trajectory_msgs/JointTrajectory: the card's action joints, one point per action at
time_from_start = (first_offset + i) * period after header.stamp = t_obs, the stamp of the observations it
was computed from (never the policy computer's clock), and header.frame_id = `model=<name>;version=<v>;
K=<steps>` (core/external.py), so `ros2 topic echo` shows which model made it and the controller checks
each chunk on its own (no second topic to keep in step).

QoS: best effort, keep last 10, volatile. A chunk is superseded by the next one a period later; a reliable
writer would resend a lost one after a NACK round trip, when it is stale or superseded, and hold newer
ones behind it on a lossy link. A best-effort reader still matches a reliable writer (`ros2 topic pub`).
Ten is enough for the chunks of one control period at any rate the node runs; the loop takes them all.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.serialization import deserialize_message
from sensor_msgs.msg import JointState
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from diffusion_controller.core.external import ChunkFitError, fit_chunk, model_id_text, parse_model_id
from diffusion_controller.core.inputs import time_to_sec
from diffusion_controller.ros.conversions import sec_to_duration, sec_to_time
from diffusion_controller.ros.intake import _never

CHUNK_QOS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.BEST_EFFORT,
    durability=DurabilityPolicy.VOLATILE,
)  # fmt: skip
#: The stamped commands the policy node conditions previous_action on: same reasoning (the next command
#: follows a period later), a little deeper (a policy pass may take several periods).
EXECUTED_QOS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST, depth=50, reliability=ReliabilityPolicy.BEST_EFFORT,
    durability=DurabilityPolicy.VOLATILE,
)  # fmt: skip


#: The JointTrajectoryPoint field a chunk's actions travel in, by the card's action kind (a base velocity's
#: axes are its joint names), so that `ros2 topic echo` shows them where the units say.
CHUNK_FIELD = {
    "position": "positions", "velocity": "velocities", "effort": "effort", "base_velocity": "velocities",
}  # fmt: skip


def chunk_msg(
    joints: Sequence[str], actions: np.ndarray, t_obs: float, period: float, first_offset: int, model_id: str,
    kind: str = "position",
) -> JointTrajectory:  # fmt: skip
    """One chunk as a JointTrajectory: the predicted actions in the field of their kind (CHUNK_FIELD)."""
    a = np.asarray(actions, dtype=float)
    if a.ndim != 2 or a.shape[1] != len(joints):
        raise ValueError(f"actions {a.shape} do not match {len(joints)} joints")
    msg = JointTrajectory()
    msg.header.stamp = sec_to_time(t_obs)
    msg.header.frame_id = model_id
    msg.joint_names = list(joints)
    for i in range(a.shape[0]):
        pt = JointTrajectoryPoint()
        setattr(pt, CHUNK_FIELD[kind], a[i].tolist())
        pt.time_from_start = sec_to_duration((first_offset + i) * period)
        msg.points.append(pt)
    return msg


def read_chunk(msg: JointTrajectory, card: Any) -> tuple[np.ndarray, float]:
    """(actions in card order, t_obs) of a chunk that fits `card`; ChunkFitError says why not."""
    tfs = [float(p.time_from_start.sec) + 1e-9 * float(p.time_from_start.nanosec) for p in msg.points]
    field = CHUNK_FIELD[card.action_kind]
    values = [list(getattr(p, field)) for p in msg.points]
    lengths = {len(v) for v in values}
    if len(lengths) > 1:
        raise ChunkFitError(f"points have different numbers of {field} {sorted(lengths)}")
    if lengths == {0}:
        raise ChunkFitError(f"points carry no {field} (a {card.action_kind} model's chunk travels there)")
    actions = fit_chunk(card, msg.joint_names, tfs, values)
    t_obs = time_to_sec(msg.header.stamp)
    if t_obs <= 0.0:
        raise ChunkFitError("header.stamp is 0: a chunk is stamped with its observations' time")
    return actions, t_obs


def model_of(msg: JointTrajectory) -> str:
    """What a chunk says about its model, for /diagnostics ("" when it says nothing readable)."""
    mid = parse_model_id(msg.header.frame_id)
    return "" if mid is None else model_id_text(*mid)


def executed_msg(joints: Sequence[str], command: np.ndarray, stamp: float) -> JointState:
    """A command as the controller sent it, at the tick time it recorded it (previous_action)."""
    msg = JointState()
    msg.header.stamp = sec_to_time(stamp)
    msg.name = list(joints)
    msg.position = [float(v) for v in command]
    return msg


def read_executed(msg: JointState, joints: Sequence[str]) -> tuple[float, np.ndarray]:
    """(stamp, command in `joints` order) of an executed-command message; ValueError when it lacks one."""
    index = {n: i for i, n in enumerate(msg.name)}
    missing = [j for j in joints if j not in index]
    if missing or len(msg.position) != len(msg.name):
        raise ValueError(f"executed command without joints {missing} or with {len(msg.position)} values")
    values = np.array([msg.position[index[j]] for j in joints], dtype=float)
    if not np.all(np.isfinite(values)):
        raise ValueError("executed command has non-finite values")
    return time_to_sec(msg.header.stamp), values


class RawQueue:
    """A never-spun subscription whose queue the control loop takes at tick time (as the observation
    intake does): the loop never waits on the link, and no executor callback runs per message."""

    def __init__(self, node: Any, msg_class: type, topic: str, qos: QoSProfile) -> None:
        self.msg_class = msg_class
        self.node = node
        self.subscription = node.create_subscription(msg_class, topic, _never, qos, raw=True)
        self.depth = qos.depth
        self.taken = 0

    def take(self, now: float) -> list[tuple[Any, float]]:
        """(message, receipt time on the node's clock) of everything queued, oldest first; messages that do
        not deserialize are skipped (counted by the caller through the returned None)."""
        handle, out = self.subscription.handle, []
        wall = time.time_ns()
        for _ in range(2 * self.depth):
            got = handle.take_message(self.msg_class, True)
            if got is None:
                break
            raw, info = got
            received = now - max(0.0, 1e-9 * (wall - int(info.get("received_timestamp") or wall)))
            try:
                out.append((deserialize_message(raw, self.msg_class), received))
            except Exception:  # bytes that do not deserialize: nothing to read
                out.append((None, received))
        self.taken += len(out)
        return out

    def close(self) -> None:
        self.node.destroy_subscription(self.subscription)
