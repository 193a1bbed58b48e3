"""The MuJoCo ant: PD servos, standing, fall detection, sensor frames, noise and delay."""

from __future__ import annotations

import numpy as np
import pytest

from diffusion_controller.core import features
from diffusion_controller.sim.ant import (
    GAIT_FREQUENCY_HZ,
    JOINTS,
    OBS,
    OBS_DIM,
    STANDING_POSE,
    Ant,
    AntConfig,
    SensorNoise,
    card_observation,
    pd_torque,
)


def _set_base(ant: Ant, quat_xyzw, lin_vel_world=(0.0, 0.0, 0.0), height: float = 0.6) -> None:
    import mujoco

    x, y, z, w = quat_xyzw
    ant.data.qpos[2] = height
    ant.data.qpos[3:7] = [w, x, y, z]
    ant.data.qvel[0:3] = lin_vel_world
    mujoco.mj_forward(ant.model, ant.data)


def _axis_angle(axis, angle: float) -> np.ndarray:
    a = np.asarray(axis, float) / np.linalg.norm(axis)
    return np.concatenate([a * np.sin(angle / 2), [np.cos(angle / 2)]])


def test_joint_ranges_come_from_the_xml() -> None:
    ant = Ant()
    assert ant.joint_lower.shape == (8,)
    assert np.all(ant.joint_lower < ant.joint_upper)
    # hips are +-30 deg, ankles span 40 deg on their own side
    assert np.allclose(ant.joint_upper - ant.joint_lower, np.deg2rad([60, 40] * 4))
    assert np.all((ant.joint_lower <= STANDING_POSE) & (ant.joint_upper >= STANDING_POSE))


def test_mujoco_servo_is_the_reference_pd_law() -> None:
    ant = Ant()
    rng = np.random.default_rng(1)
    for _ in range(20):
        target = rng.uniform(ant.joint_lower, ant.joint_upper)
        ant.set_target(target)
        before = ant.ground_truth()
        ant.step(ant.model.opt.timestep)  # one physics step: force computed from the state before it
        expected = pd_torque(ant.target, before.joint_position, before.joint_velocity, ant.cfg.kp, ant.cfg.kd)
        assert np.allclose(ant.joint_torque(), expected, atol=1e-6)
    assert np.max(np.abs(ant.joint_torque())) <= 150.0 + 1e-9


def test_targets_are_clipped_to_joint_ranges() -> None:
    ant = Ant()
    applied = ant.set_target(np.full(8, 5.0))
    assert np.allclose(applied, ant.joint_upper)
    with pytest.raises(ValueError):
        ant.set_target(np.full(8, np.nan))


def test_stands_stably_for_five_seconds() -> None:
    ant = Ant(AntConfig(seed=3))
    ant.reset(randomize=True)
    ant.set_target(STANDING_POSE)
    start = ant.ground_truth()
    heights = []
    for _ in range(250):
        ant.step(0.02)
        heights.append(ant.ground_truth().position[2])
        assert not ant.fallen()
    end = ant.ground_truth()
    assert np.linalg.norm(end.position[:2] - start.position[:2]) < 0.05
    assert np.ptp(heights[50:]) < 0.005  # settled: no bouncing or sinking
    assert min(heights) > 0.45
    assert np.allclose(end.joint_position, STANDING_POSE, atol=0.05)
    assert np.allclose(end.projected_gravity, [0, 0, -1], atol=0.02)
    assert np.max(np.abs(end.linear_velocity)) < 0.01


def test_fall_detection() -> None:
    ant = Ant()
    assert not ant.fallen()
    _set_base(ant, _axis_angle([1, 0, 0], np.pi))  # upside down, still high up
    assert ant.fallen()
    _set_base(ant, _axis_angle([0, 1, 0], np.deg2rad(70)))
    assert ant.fallen()
    _set_base(ant, _axis_angle([0, 1, 0], np.deg2rad(20)))
    assert not ant.fallen()
    _set_base(ant, [0, 0, 0, 1], height=0.1)  # flat on the ground
    assert ant.fallen()


def test_flipped_ant_lands_fallen() -> None:
    ant = Ant()
    _set_base(ant, _axis_angle([1, 0, 0], np.pi), height=1.0)
    for _ in range(100):
        ant.step(0.02)
    assert ant.fallen()
    assert ant.ground_truth().projected_gravity[2] > 0.5


def test_sensor_frames() -> None:
    ant = Ant()
    assert np.allclose(ant.ground_truth().projected_gravity, [0, 0, -1])
    # Yaw does not change gravity; world velocity shows up rotated into the body frame.
    _set_base(ant, _axis_angle([0, 0, 1], np.pi / 2), lin_vel_world=(1.0, 0.0, 0.0))
    m = ant.ground_truth()
    assert np.allclose(m.projected_gravity, [0, 0, -1], atol=1e-9)
    assert np.allclose(m.linear_velocity, [0, -1, 0], atol=1e-9)
    assert features.yaw_of(m.orientation) == pytest.approx(np.pi / 2)
    # Roll phi about x: gravity in the body frame is (0, -sin phi, -cos phi).
    phi = 0.3
    _set_base(ant, _axis_angle([1, 0, 0], phi))
    assert np.allclose(ant.ground_truth().projected_gravity, [0, -np.sin(phi), -np.cos(phi)], atol=1e-9)


def test_card_observation_layout() -> None:
    ant = Ant()
    prev = np.arange(8.0)
    m = ant.ground_truth()
    row = card_observation(m, [0.1, 0.2, 0.3], prev, clock_offset_s=0.25)
    assert row.shape == (OBS_DIM,) == (38,)
    assert np.allclose(row[OBS["gait_clock"]], features.gait_clock(m.t + 0.25, GAIT_FREQUENCY_HZ))
    assert np.allclose(row[OBS["projected_gravity"]], [0, 0, -1])
    assert np.allclose(row[OBS["velocity_command"]], [0.1, 0.2, 0.3])
    assert np.allclose(row[OBS["joint_position"]], STANDING_POSE)
    assert np.allclose(row[OBS["previous_action"]], prev)
    assert JOINTS[0::2] == ("hip_1", "hip_2", "hip_3", "hip_4")


def test_noise_has_the_configured_spread_and_is_seeded() -> None:
    noise = SensorNoise(
        joint_position=0.01, joint_velocity=0.1, orientation=0.02, angular_velocity=0.05, linear_velocity=0.03
    )
    a, b = Ant(AntConfig(noise=noise, seed=5)), Ant(AntConfig(noise=noise, seed=5))
    truth = a.ground_truth()
    samples = [a.measure() for _ in range(2000)]
    jp = np.array([s.joint_position for s in samples]) - truth.joint_position
    lv = np.array([s.linear_velocity for s in samples]) - truth.linear_velocity
    assert np.std(jp) == pytest.approx(0.01, rel=0.1)
    assert np.std(lv) == pytest.approx(0.03, rel=0.1)
    tilt = np.array([np.arccos(np.clip(-s.projected_gravity[2], -1, 1)) for s in samples])
    assert 0.002 < np.mean(tilt) < 0.04
    assert np.allclose(
        b.measure().joint_position, Ant(AntConfig(noise=noise, seed=5)).measure().joint_position
    )
    assert not np.allclose(a.measure().joint_position, b.measure().joint_position)
    quiet = Ant()
    assert np.array_equal(quiet.measure().joint_position, quiet.ground_truth().joint_position)


def test_observation_delay_returns_the_past() -> None:
    delay = 0.05
    ant = Ant(AntConfig(obs_delay_s=delay))
    ref = Ant()
    target = STANDING_POSE + np.array([0.3, 0.1, -0.3, -0.1, 0.3, -0.1, -0.3, 0.1])
    ant.set_target(target)
    ref.set_target(target)
    history = {}
    for _ in range(30):
        ant.step(0.01)
        ref.step(0.01)
        history[round(ref.time, 6)] = ref.ground_truth().joint_position
        seen = ant.observe()
        assert seen.t == pytest.approx(max(0.0, ant.time - delay), abs=1e-9)
        if seen.t > 0:
            assert np.allclose(seen.joint_position, history[round(seen.t, 6)])
    assert not np.allclose(ant.observe().joint_position, ant.ground_truth().joint_position)


def test_reset_randomizes_by_seed() -> None:
    a, b = Ant(), Ant()
    a.reset(randomize=True, seed=1)
    b.reset(randomize=True, seed=1)
    assert np.array_equal(a.data.qpos, b.data.qpos)
    b.reset(randomize=True, seed=2)
    assert not np.allclose(a.data.qpos, b.data.qpos)
    for ant in (a, b):
        m = ant.ground_truth()
        assert m.t == 0.0 and not ant.fallen()
        assert np.all(m.joint_position >= ant.joint_lower) and np.all(m.joint_position <= ant.joint_upper)
