"""The expert gait: each skill tracks its command, no falls across skill switches; the dataset format."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from diffusion_controller.core.features import gait_clock, gait_phase
from diffusion_controller.sim import dataset
from diffusion_controller.sim.ant import OBS, OBS_DIM, STANDING_POSE, Ant, AntConfig, SensorNoise
from diffusion_controller.sim.evaluate import rollout, skill_of, tracking_errors
from diffusion_controller.sim.expert import HIP, Expert, ExpertConfig

# Tolerances: about twice what the expert achieves over the 3000 s training set (sim/dataset.py prints
# it: vx ~0.04 m/s walking, wz ~0.08 rad/s turning, gait-cycle averaged).
VX_TOL = 0.1  # m/s
WZ_TOL = 0.2  # rad/s

SCHEDULE = [
    (1.0, (0.0, 0.0, 0.0)),
    (4.0, (0.4, 0.0, 0.0)),
    (2.5, (0.0, 0.0, 0.0)),
    (4.0, (-0.3, 0.0, 0.0)),
    (3.5, (0.0, 0.0, 1.0)),
    (3.5, (0.0, 0.0, -0.6)),
    (2.5, (0.0, 0.0, 0.0)),
]


@pytest.fixture(scope="module")
def run():
    ant = Ant(AntConfig(noise=SensorNoise.realistic(), seed=11))
    ant.reset(randomize=True)
    start = ant.ground_truth().position.copy()
    r = rollout(ant, Expert().act, SCHEDULE, stop_on_fall=False)
    return r, start, ant


def test_no_fall_over_a_multi_skill_schedule(run) -> None:
    r, _, ant = run
    assert not r.fell
    assert len(r.obs) == round(sum(d for d, _ in SCHEDULE) / 0.02)
    assert not ant.fallen()


def test_every_skill_tracks_its_command(run) -> None:
    r, _, _ = run
    err = tracking_errors(r)
    assert {"stand", "walk_forward", "walk_backward", "turn_left", "turn_right"} <= set(err)
    for skill in ("walk_forward", "walk_backward"):
        assert err[skill]["vx"] < VX_TOL, (skill, err[skill])
        assert err[skill]["wz"] < WZ_TOL, (skill, err[skill])
    for skill in ("turn_left", "turn_right"):
        assert err[skill]["wz"] < WZ_TOL, (skill, err[skill])
        assert err[skill]["vx"] < VX_TOL, (skill, err[skill])
    assert err["stand"]["vx"] < 0.02 and err["stand"]["wz"] < 0.02


def test_motion_goes_the_commanded_way(run) -> None:
    r, _, _ = run
    for _, cmd in SCHEDULE:
        rows = np.all(r.command == cmd, axis=1)
        v = r.true_velocity[rows][50:].mean(axis=0)  # after a second of transition
        if cmd[0]:
            assert np.sign(v[0]) == np.sign(cmd[0]) and abs(v[0]) > 0.5 * abs(cmd[0])
        if cmd[2]:
            assert np.sign(v[2]) == np.sign(cmd[2]) and abs(v[2]) > 0.5 * abs(cmd[2])


def test_stand_command_settles_to_the_standing_pose() -> None:
    ant = Ant()
    expert = Expert()
    r = rollout(ant, expert.act, [(2.0, (0.3, 0.0, 0.0)), (2.0, (0.0, 0.0, 0.0))])
    assert np.allclose(r.action[-1], STANDING_POSE, atol=1e-3)
    assert np.abs(r.true_velocity[-10:]).max() < 0.02


def test_targets_stay_in_joint_ranges(run) -> None:
    r, _, ant = run
    assert np.all(r.action >= ant.joint_lower - 1e-12) and np.all(r.action <= ant.joint_upper + 1e-12)


def test_expert_reads_only_the_observation_row() -> None:
    """Same rows in, same targets out: no hidden access to the simulator."""
    rows = np.random.default_rng(0).normal(size=(50, OBS_DIM))
    rows[:, OBS["velocity_command"]] = [0.3, 0.0, 0.5]
    a, b = Expert(), Expert()
    out_a = np.array([a.act(row) for row in rows])
    out_b = np.array([b.act(row) for row in rows])
    assert np.array_equal(out_a, out_b)
    assert not np.allclose(out_a[-1], STANDING_POSE)


def _walk_rows(measured_vx: float, n: int = 150) -> np.ndarray:
    """Rows of a 0.3 m/s walk command whose measured forward velocity reads ``measured_vx``."""
    rows = np.zeros((n, OBS_DIM))
    rows[:, OBS["joint_position"]] = STANDING_POSE
    rows[:, OBS["velocity_command"]] = [0.3, 0.0, 0.0]
    rows[:, OBS["base_linear_velocity"].start] = measured_vx
    for k in range(n):
        rows[k, OBS["gait_clock"]] = gait_clock(k * 0.02, 1.5)
    return rows


def test_expert_trot_follows_the_gait_clock() -> None:
    """The phase is the row's clock, so a policy given the same clock can know where in the stride it is."""
    e = Expert()
    walk = _walk_rows(0.0, n=120)
    for row in walk:  # fade the gait in
        e.act(row)
    row = walk[-1].copy()
    out = {}
    for t in (10.0, 10.0 + 1 / 1.5, 10.0 + 0.5 / 1.5):  # same phase, one cycle later, half a cycle later
        row[OBS["gait_clock"]] = gait_clock(t, 1.5)
        out[t] = e.act(row)
    a, b, c = out.values()
    np.testing.assert_allclose(a, b, atol=1e-9)
    assert np.abs(a - c).max() > 0.1


def test_default_labels_do_not_depend_on_the_measured_velocity() -> None:
    """The labels must be a function of what the policy observes: a filtered velocity it cannot reconstruct
    from its short history made the policy learn DART's average stride and over-speed."""
    slow, fast = _walk_rows(0.0), _walk_rows(0.6)
    a, b = Expert(), Expert()
    np.testing.assert_array_equal([a.act(r) for r in slow], [b.act(r) for r in fast])


def test_velocity_feedback_when_configured_lengthens_the_stride_of_a_slow_robot() -> None:
    cfg = ExpertConfig(kp=np.array([0.3, 0.3, 0.3]))
    a, b = Expert(cfg), Expert(cfg)
    slow = np.array([a.act(r) for r in _walk_rows(0.0)])
    fast = np.array([b.act(r) for r in _walk_rows(0.6)])
    # hip swing over the last 1.5 s (two gait cycles), gait fully faded in
    swing_slow, swing_fast = (np.ptp(q[-75:, HIP], axis=0).mean() for q in (slow, fast))
    assert swing_slow > 1.2 * swing_fast


def test_skill_labels() -> None:
    assert skill_of((0, 0, 0)) == "stand"
    assert skill_of((-0.2, 0, 0)) == "walk_backward"
    assert skill_of((0, 0, -1)) == "turn_right"
    assert skill_of((0.2, 0, 0.3)) == "other"


def test_random_schedule_switches_skills() -> None:
    rng = np.random.default_rng(0)
    sched = dataset.random_schedule(rng, 60.0)
    assert sum(d for d, _ in sched) == pytest.approx(60.0)
    skills = [skill_of(c) for _, c in sched]
    assert all(s1 != s2 for s1, s2 in itertools.pairwise(skills))
    assert len(set(skills)) >= 4


def test_generated_file_has_the_documented_format(tmp_path) -> None:
    out = tmp_path / "d.npz"
    assert dataset.main(["--episodes", "2", "--episode-seconds", "3", "--seed", "4", "--out", str(out)]) == 0
    d = np.load(out)
    n = 2 * 150
    assert d["obs"].shape == (n, 38) and d["obs"].dtype == np.float32
    assert d["action"].shape == (n, 8) and d["action"].dtype == np.float32
    assert d["command"].shape == (n, 3)
    assert d["episode_ends"].tolist() == [150, 300] and d["episode_ends"].dtype == np.int64
    layout = json.loads(str(d["layout"]))
    assert [f["name"] for f in layout][:4] == [
        "projected_gravity",
        "base_angular_velocity",
        "base_linear_velocity",
        "velocity_command",
    ]
    assert sum(f["size"] for f in layout) == 38
    assert layout[-1] == {"name": "gait_clock", "kind": "gait_clock", "size": 2, "frequency_hz": 1.5}
    assert float(d["period"]) == 0.02
    assert list(d["action_joints"]) == layout[4]["joints"]
    assert np.all(d["action"] >= d["action_lower"]) and np.all(d["action"] <= d["action_upper"])
    prev = d["obs"][:, OBS["previous_action"]]
    for start, end in zip([0, 150], [150, 300], strict=True):
        assert np.allclose(prev[start], STANDING_POSE)
        assert np.array_equal(prev[start + 1 : end], d["action"][start : end - 1])
    assert np.array_equal(d["obs"][:, OBS["velocity_command"]], d["command"])
    # the clock advances one control period per row, from a random phase per episode
    phase = np.array([gait_phase(c) for c in d["obs"][:, OBS["gait_clock"]]])
    steps = np.mod(np.diff(phase), 1.0)
    inside = np.ones(n - 1, bool)
    inside[149] = False
    np.testing.assert_allclose(steps[inside], 1.5 * 0.02, atol=1e-5)
    assert abs(phase[150] - phase[0]) > 1e-3


def test_dart_perturbation_keeps_labels_clean_and_previous_action_executed() -> None:
    """With DART noise the ant executes a perturbed target, the label is the expert's own target, and the
    next row's previous_action is what was executed (as the node's previous_action is what it sent)."""
    ant = Ant(AntConfig(seed=3))
    ant.reset(randomize=False)
    expert = Expert()
    targets: list[np.ndarray] = []
    executed: list[np.ndarray] = []

    def policy(o: np.ndarray) -> np.ndarray:
        targets.append(np.clip(expert.act(o), ant.joint_lower, ant.joint_upper))
        return targets[-1]

    noise = dataset.LowPassNoise(np.random.default_rng(0), std=0.1)

    def perturb(t: np.ndarray) -> np.ndarray:
        executed.append(np.clip(noise(t), ant.joint_lower, ant.joint_upper))
        return executed[-1]

    r = rollout(ant, policy, [(2.0, [0.3, 0.0, 0.0])], perturb=perturb)
    np.testing.assert_allclose(r.action, np.array(targets), atol=1e-12)
    prev = r.obs[1:, OBS["previous_action"]]
    np.testing.assert_allclose(prev, np.array(executed)[:-1], atol=1e-12)
    assert np.abs(np.array(executed) - np.array(targets)).mean() > 0.01  # the noise did move the targets


def test_low_pass_noise_has_the_requested_spread() -> None:
    noise = dataset.LowPassNoise(np.random.default_rng(1), std=0.1)
    samples = np.array([noise(np.zeros(8)) for _ in range(20000)])
    assert 0.08 < samples.std() < 0.12
    # correlated over ~tau: neighbouring steps are close, far-apart ones are not
    corr1 = np.corrcoef(samples[:-1, 0], samples[1:, 0])[0, 1]
    corr50 = np.corrcoef(samples[:-50, 0], samples[50:, 0])[0, 1]
    assert corr1 > 0.7 and abs(corr50) < 0.2


def test_the_effort_expert_walks_the_torque_driven_ant_and_rows_feed_back_what_the_node_would():
    """The ant's motors as torque motors at 200 Hz, the expert's PD computed from 40 ms old sensors
    (knowing the delay): it walks without falling; each row's previous_action is the torque in force at
    the row's sensor time (the node records its own commands that way), not the newest one."""
    from diffusion_controller.sim.ant import EFFORT_PERIOD_S, EFFORT_TIMESTEP_S
    from diffusion_controller.sim.expert import EffortExpert, EffortExpertConfig

    delay = 0.04
    ant = Ant(AntConfig(drive="effort", timestep=EFFORT_TIMESTEP_S, obs_delay_s=delay, seed=4,
                        noise=SensorNoise.realistic()))  # fmt: skip
    expert = EffortExpert(EffortExpertConfig(lookahead_s=delay))
    r = rollout(ant, expert.act, [(1.0, (0.0, 0.0, 0.0)), (5.0, (0.3, 0.0, 0.0))], EFFORT_PERIOD_S)
    assert not r.fell
    assert tracking_errors(r, period=EFFORT_PERIOD_S)["walk_forward"]["vx"] < 0.12
    lag = round(delay / EFFORT_PERIOD_S) + 1  # the command sent at the sensor time itself is not before it
    prev = r.obs[:, OBS["previous_action"]]
    np.testing.assert_allclose(prev[lag:], r.action[:-lag], atol=1e-6)
    assert np.all(prev[:lag] == 0.0)
    with pytest.raises(RuntimeError, match="drive='effort'"):
        Ant().set_effort(np.zeros(8))
