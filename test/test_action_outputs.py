"""Each action kind's card fields and the node outputs that carry it, checked at configure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from diffusion_controller.core.card import CardError, ModelCard
from diffusion_controller.ros import config as cf
from diffusion_controller.ros import conversions as cv
from diffusion_controller.ros.binding import validate_against_card
from diffusion_controller.ros.params_file import load_params_file

ROOT = Path(__file__).resolve().parents[1]
ANT = ROOT / "models" / "ant_locomotion.yaml"


def card_of(kind: str, units: str, lower, upper, joints=None) -> ModelCard:
    d = ModelCard.from_yaml(ANT).to_dict()
    n = len(lower)
    joints = joints or d["action"]["joints"][:n]
    d["action"].update(kind=kind, units=units, lower=list(lower), upper=list(upper), joints=list(joints))
    if n != 8:  # a robot with other actions: previous_action and the normalization follow
        for f in d["observation"]["features"]:
            if f["kind"] == "previous_action":
                f["size"] = n
        d["normalization"]["action"] = {"min": list(lower), "max": list(upper)}
        obs = sum(f["size"] for f in d["observation"]["features"])
        d["normalization"]["observation"] = {"mean": [0.0] * obs, "std": [1.0] * obs}
        d["network"]["obs_dim"], d["network"]["action_dim"] = obs, n
    return ModelCard.from_dict(d)


def config(**changes) -> cf.NodeConfig:
    params = load_params_file(str(ROOT / "config" / "ant.yaml"))
    params.update(changes)
    return cf.NodeConfig.from_params(params)


def test_card_kinds_have_their_units_and_limits():
    card_of("velocity", "rad/s", [-3.0] * 8, [3.0] * 8)
    card_of("effort", "N m", [-150.0] * 8, [150.0] * 8)
    card_of("base_velocity", "m/s, rad/s", [-0.5, -1.0], [1.0, 1.0], ["linear.x", "angular.z"])
    units = r"action\.units: expected one of \['rad/s', 'm/s'\] for kind 'velocity'"
    with pytest.raises(CardError, match=units):
        card_of("velocity", "rad", [-3.0] * 8, [3.0] * 8)
    with pytest.raises(CardError, match=r"action\.lower\[0\]: an action of kind 'effort' must allow 0"):
        card_of("effort", "N m", [1.0] + [-1.0] * 7, [2.0] + [1.0] * 7)
    with pytest.raises(CardError, match=r"action\.joints\[1\]: expected a Twist field"):
        card_of("base_velocity", "m/s, rad/s", [-1.0, -1.0], [1.0, 1.0], ["linear.x", "yaw"])
    with pytest.raises(CardError, match=r"action\.kind"):
        card_of("torque", "N m", [-1.0] * 8, [1.0] * 8)


def test_outputs_must_fit_the_action_kind():
    velocity = card_of("velocity", "rad/s", [-3.0] * 8, [3.0] * 8)
    # ant.yaml publishes a position trajectory: refused for a velocity model, naming the parameter.
    with pytest.raises(cf.ConfigError, match=r"outputs\.trajectory\.interface: 'position' cannot carry"):
        validate_against_card(config(safe_mode="zero"), velocity)
    with pytest.raises(cf.ConfigError, match="safe_mode: velocity actions are never held"):
        validate_against_card(config(**{"outputs.trajectory.interface": "velocity"}), velocity)
    as_velocity = {"outputs.trajectory.interface": "velocity"}
    validate_against_card(config(safe_mode="zero", **as_velocity), velocity)
    validate_against_card(config(safe_mode="zero", **{"outputs.trajectory.enabled": False}), velocity)
    with pytest.raises(cf.ConfigError, match=r"outputs\.twist\.enabled: only a base_velocity model"):
        validate_against_card(config(**{"outputs.twist.enabled": True}), ModelCard.from_yaml(ANT))
    base = card_of("base_velocity", "m/s, rad/s", [-0.5, -1.0], [1.0, 1.0], ["linear.x", "angular.z"])
    with pytest.raises(cf.ConfigError) as e:
        validate_against_card(config(safe_mode="zero"), base)
    for name in ("outputs.commands.enabled", "outputs.trajectory.enabled", "outputs.twist.enabled"):
        assert name in str(e.value)
    off = {"outputs.commands.enabled": False, "outputs.trajectory.enabled": False}
    off["outputs.twist.enabled"] = True
    binding = validate_against_card(config(safe_mode="zero", **off), base)
    assert binding.output_joints == ("linear.x", "angular.z")


def test_messages_of_each_kind():
    t = cv.twist_msg(("linear.x", "angular.z"), np.array([0.4, -0.2]))
    assert (t.linear.x, t.linear.y, t.angular.z) == (0.4, 0.0, -0.2)
    for interface, field in (("velocity", "velocities"), ("effort", "effort")):
        msg = cv.kind_trajectory_msg(["a", "b"], np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([0.01, 0.02]),
                                     interface)  # fmt: skip
        assert [list(getattr(p, field)) for p in msg.points] == [[1.0, 2.0], [3.0, 4.0]]
        assert all(len(p.positions) == 0 for p in msg.points)
    with pytest.raises(ValueError, match="strictly increasing"):
        cv.kind_trajectory_msg(["a"], np.ones((2, 1)), np.array([0.02, 0.01]), "velocity")


def test_a_swap_keeps_the_action_kind():
    from diffusion_controller.ros.swapper import check_same_kind

    velocity = card_of("velocity", "rad/s", [-3.0] * 8, [3.0] * 8)
    effort = card_of("effort", "N m", [-150.0] * 8, [150.0] * 8)
    check_same_kind(velocity, velocity)
    with pytest.raises(cf.ConfigError, match="its action kind is 'effort', the running model's 'velocity'"):
        check_same_kind(velocity, effort)
