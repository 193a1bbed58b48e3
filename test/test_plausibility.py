"""Plausible observations from the model card (core.plausibility) and what a source does outside them
(core.inputs.SourceReader): bounds per feature kind, the clamp / reject / safe policies, and
contradicting publishers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from geometry_msgs.msg import Twist
from sensor_msgs.msg import JointState

from diffusion_controller.core import inputs
from diffusion_controller.core.card import ModelCard
from diffusion_controller.core.plausibility import Plausibility, PlausibilityLimits, PublisherAgreement
from diffusion_controller.ros import config as cf

ROOT = Path(__file__).resolve().parents[1]
CARD = ModelCard.from_yaml(ROOT / "models" / "ant_locomotion.yaml")
JOINTS = CARD.action_joints


def col(name: str, i: int = 0) -> int:
    return CARD.feature_slice(name).start + i


def test_joint_positions_of_action_joints_are_bounded_by_the_action_limits_plus_the_margin():
    p = Plausibility(CARD, PlausibilityLimits(joint_margin=0.25))
    b = p.bounds["joint_position"]
    np.testing.assert_allclose(b.lower, CARD.action_lower - 0.25)
    np.testing.assert_allclose(b.upper, CARD.action_upper + 0.25)
    inside = (CARD.action_lower + CARD.action_upper) / 2
    assert p.check("joint_position", inside) == ""
    bad = inside.copy()
    bad[2] = 1e308
    why = p.check("joint_position", bad)
    assert "hip_2 = 1e+308" in why and "action limits" in why and "hip_1" not in why


def test_the_velocity_command_is_bounded_by_the_training_range_and_other_sensors_loosely():
    p = Plausibility(CARD, PlausibilityLimits(command_sigmas=3.0, sensor_sigmas=50.0))
    c = col("velocity_command")
    mean, std = CARD.obs_mean[c], CARD.obs_std[c]
    assert p.bounds["velocity_command"].upper[0] == pytest.approx(mean + 3.0 * std)
    why = p.check("velocity_command", np.array([100.0, 0.0, 0.0]))
    assert "velocity_command[0] = 100" in why and "training range" in why
    np.testing.assert_allclose(p.clamp("velocity_command", np.array([100.0, 0.0, 0.0]))[0], mean + 3.0 * std)
    v = col("joint_velocity")
    assert p.bounds["joint_velocity"].upper[0] == pytest.approx(CARD.obs_mean[v] + 50.0 * CARD.obs_std[v])
    assert p.check("joint_velocity", np.full(8, 1e6))
    assert p.check("joint_velocity", np.full(8, 5.0)) == ""  # fast, but a robot can do it


def test_gravity_is_a_unit_vector_and_computed_features_are_not_checked():
    p = Plausibility(CARD)
    assert p.check("projected_gravity", np.array([0.0, 0.0, -1.0])) == ""
    assert p.check("projected_gravity", np.array([0.0, 0.0, -1.5]))
    assert "previous_action" not in p.bounds and "gait_clock" not in p.bounds
    assert p.check("previous_action", np.full(8, 1e9)) == ""


def test_limits_must_be_positive():
    with pytest.raises(ValueError, match="joint_margin"):
        PlausibilityLimits(joint_margin=0.0)


def _reader(type_: str, features: tuple[str, ...], policy: str,
            notes: list | None = None) -> inputs.SourceReader:
    src = inputs.SourceConfig("s", "/t", type_, features, stamp="receipt", implausible=policy)
    on_note = (lambda cause, msg: notes.append((cause, msg))) if notes is not None else None
    return inputs.SourceReader(inputs.SourceDecoder(src, CARD.features), 0.05, on_note=on_note,
                               plausibility=Plausibility(CARD), policy=inputs.implausible_policy(src, CARD))


def _joints(position: list[float]) -> JointState:
    return JointState(name=list(JOINTS), position=position, velocity=[0.0] * 8)


@pytest.mark.parametrize("policy", ["reject", "safe", "auto"])
def test_implausible_sensor_messages_are_refused_and_safe_says_so(policy):
    r = _reader(cf.JOINT_STATE, ("joint_position", "joint_velocity"), policy)
    good = list((CARD.action_lower + CARD.action_upper) / 2)
    _, values = r.read(_joints(good), now=1.0)
    np.testing.assert_allclose(values["joint_position"], good)
    with pytest.raises(inputs.ImplausibleInputError, match="hip_1 = 1e\\+308") as err:
        r.read(_joints([1e308, *good[1:]]), now=1.1)
    assert err.value.cause == "implausible" and err.value.features == ("joint_position",)
    assert err.value.go_safe == (policy == "safe") and err.value.stamp == pytest.approx(1.1)
    assert r.last_stamp == pytest.approx(1.0), "a refused message does not advance the stamp rule"


def test_an_overdriven_command_is_clamped_into_the_training_range_and_noted():
    notes: list = []
    r = _reader(cf.TWIST, ("velocity_command",), "auto", notes)
    msg = Twist()
    msg.linear.x = 100.0
    _, values = r.read(msg, now=1.0)
    bound = Plausibility(CARD).bounds["velocity_command"].upper[0]
    assert values["velocity_command"][0] == pytest.approx(bound)
    assert r.clamped == 1 and notes and notes[0][0] == "clamped"
    assert "velocity_command[0] = 100" in notes[0][1]
    msg.linear.x = 0.1
    _, values = r.read(msg, now=1.1)
    assert values["velocity_command"][0] == pytest.approx(0.1) and r.clamped == 1


def test_auto_policy_clamps_commands_and_rejects_sensors():
    cmd = inputs.SourceConfig("c", "/c", cf.TWIST, ("velocity_command",))
    imu = inputs.SourceConfig("i", "/i", cf.IMU, ("projected_gravity",))
    assert inputs.implausible_policy(cmd, CARD) == "clamp"
    assert inputs.implausible_policy(imu, CARD) == "reject"
    chosen = inputs.SourceConfig("i", "/i", cf.IMU, ("x",), implausible="safe")
    assert inputs.implausible_policy(chosen, CARD) == "safe"
    with pytest.raises(cf.ConfigError, match="implausible"):
        cf.check_value(cf.spec_for("observations.imu.implausible"), "ignore")


def test_two_publishers_that_contradict_each_other_are_named():
    agree = PublisherAgreement(CARD)
    pose = (CARD.action_lower + CARD.action_upper) / 2
    assert agree.update(b"a", 1.00, {"joint_position": pose}) == ""
    assert agree.update(b"b", 1.01, {"joint_position": pose + 0.01}) == ""  # the same robot, noise
    off = pose.copy()
    off[6] += 0.5
    why = agree.update(b"b", 1.02, {"joint_position": off})
    assert "joint_position[6]" in why and "another" in why
    assert agree.update(b"a", 1.5, {"joint_position": pose}) == ""  # b's sample is too old to compare
