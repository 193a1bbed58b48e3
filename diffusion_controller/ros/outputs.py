"""What carries each action kind to the robot, checked against the card at configure, and its messages.

- position, velocity, effort (joint space): Float64MultiArray for ros2_control's forward controllers
  (forward_position_controller, forward_velocity_controller, forward_effort_controller) on
  `outputs.commands`; a JointTrajectory on `outputs.trajectory` whose points carry the kind in the field
  the controller reads (`outputs.trajectory.interface`: positions, velocities or effort);
- base_velocity: geometry_msgs/Twist on `outputs.twist` (a mobile base's cmd_vel), the card's action
  "joints" naming the Twist fields it sets (linear.x, angular.z, ...); nothing else may carry it.

A mismatch (a position trajectory for a velocity model, a Twist for a joint model, a base model with no
Twist output) is a configuration error naming the parameter, so the robot never gets the wrong unit. No
ROS imports here (ros/binding.py checks with it); the messages are built in ros/conversions.py.
"""

from __future__ import annotations

from typing import Any

#: Values of outputs.trajectory.interface: the JointTrajectoryPoint field the actions go into.
TRAJECTORY_INTERFACES = ("position", "velocity", "effort")
#: The columns of a ~/debug/command_timing row, in order (ControlLoop._timing_row writes them; benchmarks
#: and tests read them by the indices below, so a new column is added here once).
TIMING_COLUMNS = (
    "tick_time", "exec_time", "action_time", "obs_stamp", "chunk_seq", "index", "state", "missed", "slot",
)  # fmt: skip
TICK, EXEC, ACTION, OBS, SEQ, INDEX, STATE, MISSED, SLOT = range(len(TIMING_COLUMNS))


def check_outputs(cfg: Any, card: Any) -> list[str]:
    """Problems of the output parameters for the card's action kind (empty when they fit)."""
    kind = getattr(card, "action_kind", "position")
    errors: list[str] = []
    if kind == "base_velocity":
        if cfg.commands_enabled:
            errors.append("outputs.commands.enabled: a base_velocity model's actions are a Twist, not joint "
                          "commands; set it false and use outputs.twist")  # fmt: skip
        if cfg.trajectory_enabled:
            errors.append("outputs.trajectory.enabled: a base_velocity model's actions are a Twist, not a "
                          "joint trajectory; set it false and use outputs.twist")  # fmt: skip
        if not cfg.twist_enabled:
            errors.append("outputs.twist.enabled: a base_velocity model needs it (nothing else carries a "
                          "Twist); set it true")  # fmt: skip
        return errors
    if cfg.twist_enabled:
        errors.append(f"outputs.twist.enabled: only a base_velocity model drives a Twist; model "
                      f"'{card.name}' commands joint {kind}s")  # fmt: skip
    if cfg.trajectory_enabled and cfg.trajectory_interface != kind:
        errors.append(
            f"outputs.trajectory.interface: '{cfg.trajectory_interface}' cannot carry model '{card.name}''s "
            f"{kind} actions; set it to '{kind}' (a controller that takes {kind}s) or disable "
            "outputs.trajectory"
        )
    return errors
