"""Action kinds (card action.kind) in the core: velocity, effort and base velocity are never held.

Property tests in the style of test_properties.py, over random lifecycle orders (ticks, sensor dropouts
that reach SAFE, e-stop and resume, deactivate with its wind-down and a later activate, sim resets, model
swaps, wild chunks): every command within the kind's rate limit of the one before and inside the limits,
and every run of ticks without a fresh policy action ramps to zero at that limit, reaching it at most one
tick after the ramp's length. Then the kinds on simple plants, closed loop through the core: a joint
velocity integrator and a unicycle base (Twist).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from core_fakes import FakeCard, FakeClock, FakeFeature, SimWorker, clock_card
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from diffusion_controller.core.control_config import ConfigError, ControlConfig
from diffusion_controller.core.control_state import ControlState
from diffusion_controller.core.controller import ControlCore
from diffusion_controller.core.safety import SafetyFilter

P = 0.02
H = 6
# Velocity/effort limits must include zero (the safe command); asymmetric to catch sign slips.
LOWER = np.array([-2.0, -0.5])
UPPER = np.array([1.0, 3.0])
STOPPING_KINDS = ("velocity", "effort", "base_velocity")
FINITE = st.one_of(st.floats(-5.0, 5.0), st.sampled_from([1e300, -1e300, 0.0]))
WILD = st.one_of(st.floats(-5.0, 5.0), st.sampled_from([math.nan, math.inf, -math.inf, 0.0]))
ACTIONS = st.one_of(
    arrays(np.float64, (H, 2), elements=FINITE),
    arrays(np.float64, (H, 2), elements=FINITE),
    arrays(np.float64, (H, 2), elements=WILD),
)
EVENTS = st.sampled_from(
    ["tick"] * 6 + ["dropout", "dropout", "estop", "resume", "deactivate", "clock_back", "swap", "slow"]
)


class ScriptedPolicy:
    """Returns the drawn chunks in turn, whatever the observation (contents may be NaN or huge)."""

    provider = "fake"
    supports_inpainting = True

    def __init__(self, card, chunks) -> None:
        self.card, self.chunks, self.n = card, chunks, 0

    def predict(self, obs_history, **kw):
        chunk = self.chunks[self.n % len(self.chunks)]
        self.n += 1
        return chunk


def core_event(core: ControlCore, ev: str, card, chunks, slow: dict) -> bool:
    """Apply a lifecycle event that needs nothing but the core (e-stop, resume, a swap to the chunks in
    reverse, inference made slower than the misses allowed: SAFE by misses); False for the others."""
    if ev == "estop":
        core.estop()
    elif ev == "resume":
        core.resume()
    elif ev == "swap":
        core.swap_policy(ScriptedPolicy(card, chunks[::-1]))
    elif ev == "slow":
        slow["on"] = not slow["on"]
    else:
        return False
    return True


def ramp_ticks(command: np.ndarray, step: float) -> int:
    """Ticks a ramp at `step` per tick needs to bring `command` to zero."""
    return math.ceil(float(np.max(np.abs(command))) / step - 1e-9)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(STOPPING_KINDS),
    events=st.lists(EVENTS, min_size=30, max_size=90),
    chunks=st.lists(ACTIONS, min_size=1, max_size=4),
    step=st.floats(0.01, 0.8),
    misses=st.integers(1, 4),
    latency=st.floats(0.0, 0.05),
)
def test_velocity_and_effort_commands_ramp_to_zero_on_every_lifecycle_path(
    kind, events, chunks, step, misses, latency
):
    card = clock_card(horizon=H, action_lower=LOWER, action_upper=UPPER, action_kind=kind)
    clock = FakeClock()
    slow = {"on": False}
    worker = SimWorker(clock, latency=lambda seq: 0.5 if slow["on"] else latency)
    config = ControlConfig(max_step_per_tick=step, obs_timeout_s=0.05, max_consecutive_misses=misses,
                           safe_mode="zero")  # fmt: skip
    core = ControlCore(card, config, ScriptedPolicy(card, chunks), worker=worker)
    previous: np.ndarray | None = None
    idle = 0  # ticks since the last fresh policy action
    idle_from: np.ndarray | None = None  # the command the current run without policy actions started from
    seen: set[str] = set()
    now = 0.0

    def check(cmd: np.ndarray | None, fresh: bool, what: str) -> None:
        nonlocal previous, idle, idle_from
        # A velocity or effort node publishes from its first tick on (zero before any policy action).
        assert cmd is not None and cmd.shape == (2,), what
        assert np.all(np.isfinite(cmd)) and np.all(cmd >= LOWER) and np.all(cmd <= UPPER), what
        if previous is not None:
            assert np.all(np.abs(cmd - previous) <= step * (1 + 1e-9)), f"{what}: beyond the rate limit"
        if fresh:
            idle, idle_from = 0, None
        else:
            if idle_from is None:
                idle_from = np.zeros(2) if previous is None else previous
            idle += 1
            if previous is not None:  # strictly toward zero: never the same nonzero command twice
                assert np.all(np.abs(cmd) <= np.maximum(np.abs(previous) - step, 0.0) + 1e-9), what
            if idle > ramp_ticks(idle_from, step) + 1:
                assert np.all(cmd == 0.0), f"{what}: still {cmd} {idle} ticks after {idle_from}"
        previous = cmd

    for ev in events:
        if core_event(core, ev, card, chunks, slow):
            pass
        elif ev == "clock_back":
            now = max(now - 1.0, 0.0)
        elif ev == "deactivate":  # the node winds the command down, stops ticking, and later activates
            for _ in range(ramp_ticks(previous, step) + 1 if previous is not None else 1):
                cmd = core.stop_step()
                check(cmd, False, "deactivate")
            assert np.all(previous == 0.0)
            now += 0.5  # inactive for a while, sensors still arriving
            core.reset()  # activate
        now += P
        clock.t = now
        if ev != "dropout":
            stamp = now - 0.01
            core.observe("clock", stamp, [stamp], now=now)
            core.observe("joint_position", stamp, [0.3, -0.2, 0.0], now=now)
        r = core.tick(now)
        fresh = r.state is ControlState.RUNNING and not r.missed
        check(r.command, fresh, f"{ev} -> {r.state.value}")
        seen.add(r.state.value)
    event("states " + ",".join(sorted(seen)))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    events=st.lists(EVENTS, min_size=30, max_size=90),
    chunks=st.lists(ACTIONS, min_size=1, max_size=4),
    step=st.floats(0.01, 0.8),
)
def test_position_commands_still_hold_and_deactivate_sends_nothing(events, chunks, step):
    """The position kind keeps today's behaviour: ESTOP holds the last command exactly, and deactivate has
    no wind-down (the robot's position controller holds its target)."""
    lower, upper = np.array([-1.0, 0.5]), np.array([1.0, 2.0])
    card = clock_card(horizon=H, action_lower=lower, action_upper=upper)
    clock = FakeClock()
    config = ControlConfig(max_step_per_tick=step, obs_timeout_s=0.05, max_consecutive_misses=3)
    core = ControlCore(card, config, ScriptedPolicy(card, chunks), worker=SimWorker(clock))
    previous, now, estopped = None, 0.0, False
    for ev in events:
        if ev == "estop":
            core.estop()
            estopped = True
        elif ev == "resume":
            core.resume()
            estopped = False
        elif ev == "deactivate":
            assert core.stop_step() is None
        now += P
        clock.t = now
        if ev != "dropout":
            core.observe("clock", now - 0.01, [now - 0.01], now=now)
            core.observe("joint_position", now - 0.01, [0.3, -0.2, 0.0], now=now)
        r = core.tick(now)
        if r.command is not None and previous is not None:
            assert np.all(np.abs(r.command - previous) <= step * (1 + 1e-9))
            if estopped:
                np.testing.assert_array_equal(r.command, previous)
        previous = r.command if r.command is not None else previous


def test_safe_modes_must_fit_the_action_kind():
    for kind in STOPPING_KINDS:
        card = clock_card(action_lower=LOWER, action_upper=UPPER, action_kind=kind)
        for mode in ("hold", "default_pose"):
            with pytest.raises(ConfigError, match=f"safe_mode: {kind} actions are never held"):
                ControlConfig(safe_mode=mode, default_pose=(0.0, 0.0)).check_card(card)
        ControlConfig(safe_mode="zero").check_card(card)
    with pytest.raises(ConfigError, match="safe_mode: 'zero' is for velocity"):
        ControlConfig(safe_mode="zero").check_card(clock_card())
    with pytest.raises(ValueError, match="must include 0"):
        SafetyFilter(np.array([0.5]), np.array([1.0]), 0.1, "zero", kind="velocity")


def effort_card_with_velocities(**changes) -> FakeCard:
    """An effort model that sees the joint velocities of its action joints (what safe_mode damping needs)."""
    features = (
        FakeFeature("clock", "generic", 1),
        FakeFeature("joint_position", "joint_position", 3, ("j2", "j1", "j3")),
        FakeFeature("joint_velocity", "joint_velocity", 3, ("j2", "j1", "j3")),
        FakeFeature("previous_action", "previous_action", 2),
    )
    return FakeCard(features=features, action_kind="effort", **changes)


def test_damping_fits_effort_models_that_measure_their_joint_velocities():
    card = effort_card_with_velocities(action_lower=LOWER, action_upper=UPPER)
    ControlConfig(safe_mode="damping", damping_gain=2.0).check_card(card)
    with pytest.raises(ConfigError, match="damping_gain: expected a finite number > 0"):
        ControlConfig(safe_mode="damping")
    with pytest.raises(ConfigError, match="safe_mode: 'damping' needs the joint velocity"):
        no_velocity = clock_card(action_lower=LOWER, action_upper=UPPER, action_kind="effort")
        ControlConfig(safe_mode="damping", damping_gain=2.0).check_card(no_velocity)
    for kind, fits in (("velocity", "'zero'"), ("position", "'hold' or 'default_pose'")):
        with pytest.raises(ConfigError, match=f"'damping' is for effort actions.*a {kind} action: {fits}"):
            ControlConfig(safe_mode="damping", damping_gain=2.0).check_card(
                clock_card(action_lower=LOWER, action_upper=UPPER, action_kind=kind))


DAMPING_EVENTS = st.sampled_from(
    ["tick"] * 6 + ["dropout", "dropout", "estop", "resume", "deactivate", "swap", "slow"]
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    events=st.lists(DAMPING_EVENTS, min_size=30, max_size=90),
    chunks=st.lists(ACTIONS, min_size=1, max_size=4),
    step=st.floats(0.01, 0.8),
    gain=st.floats(0.1, 20.0),
    seed=st.integers(0, 2**16),
)
def test_damping_efforts_follow_the_measured_velocity_or_ramp_to_zero_on_every_lifecycle_path(
    events, chunks, step, gain, seed
):
    """safe_mode damping: every tick without a fresh policy action moves the torque one max-step toward
    -gain x the joint velocity measured within its timeout (toward zero without one, and to exactly zero
    on deactivate); every command inside the limits and the rate limit."""
    card = effort_card_with_velocities(horizon=H, action_lower=LOWER, action_upper=UPPER)
    clock, rng = FakeClock(), np.random.default_rng(seed)
    slow = {"on": False}
    worker = SimWorker(clock, latency=lambda seq: 0.5 if slow["on"] else 0.01)
    config = ControlConfig(max_step_per_tick=step, obs_timeout_s=0.05, max_consecutive_misses=2,
                           safe_mode="damping", damping_gain=gain)  # fmt: skip
    core = ControlCore(card, config, ScriptedPolicy(card, chunks), worker=worker)
    previous: np.ndarray | None = None
    velocity: tuple[float, np.ndarray] | None = None  # (stamp, action-order velocities) last sent
    seen: set[str] = set()
    now = 0.0

    def check(cmd: np.ndarray | None, target: np.ndarray | None, what: str) -> None:
        nonlocal previous
        assert cmd is not None and cmd.shape == (2,), what
        assert np.all(np.isfinite(cmd)) and np.all(cmd >= LOWER) and np.all(cmd <= UPPER), what
        start = np.zeros(2) if previous is None else previous
        assert np.all(np.abs(cmd - start) <= step * (1 + 1e-9)), f"{what}: beyond the rate limit"
        if target is not None:  # one full step toward the target, or on it
            target = np.clip(target, LOWER, UPPER)
            assert np.all(np.abs(cmd - target) <= np.maximum(np.abs(start - target) - step, 0.0) + 1e-9), (
                what, cmd, target, start)
        previous = cmd

    for ev in events:
        if core_event(core, ev, card, chunks, slow):
            pass
        elif ev == "deactivate":  # the wind-down goes to zero, whatever the joints do
            while previous is not None and np.any(previous != 0.0):
                check(core.stop_step(), np.zeros(2), "deactivate")
            now += 0.5
            core.reset()
        now += P
        clock.t = now
        if ev != "dropout":
            stamp = now - 0.005
            v = rng.normal(0.0, 0.3, 3)  # card order j2, j1, j3
            core.observe("clock", stamp, [stamp], now=now)
            core.observe("joint_position", stamp, [0.3, -0.2, 0.0], now=now)
            core.observe("joint_velocity", stamp, v, now=now)
            velocity = (stamp, v[[1, 0]])
        r = core.tick(now)
        fresh_policy = r.state is ControlState.RUNNING and not r.missed
        fresh_velocity = velocity is not None and now - velocity[0] <= 0.05
        target = None if fresh_policy else (-gain * velocity[1] if fresh_velocity else np.zeros(2))
        check(r.command, target, f"{ev} -> {r.state.value}")
        seen.add(r.state.value)
    event("states " + ",".join(sorted(seen)))


def test_damping_brakes_a_spinning_torque_driven_joint_that_zero_lets_coast():
    """A frictionless joint (inertia 0.1 kg m^2) spun up by the policy; then the IMU-like clock source dies
    (SAFE) while the joint encoders keep reporting: zero lets it coast at its speed, damping stops it."""
    def run(mode: str) -> np.ndarray:
        limits = {"action_lower": np.full(2, -5.0), "action_upper": np.full(2, 5.0)}
        card = effort_card_with_velocities(horizon=H, **limits)
        clock = FakeClock()
        config = ControlConfig(max_step_per_tick=0.5, obs_timeouts_s={"clock": 0.05}, safe_mode=mode,
                               damping_gain=2.0 if mode == "damping" else 0.0)  # fmt: skip
        spin = np.tile([1.0, -1.0], (H, 1))  # 1 N m until SAFE
        worker = SimWorker(clock, lambda s: 0.005)
        core = ControlCore(card, config, ScriptedPolicy(card, [spin]), worker=worker)
        q, qd, speeds = np.zeros(2), np.zeros(2), []
        for k in range(200):
            now = clock.t = k * P
            if k < 50:
                core.observe("clock", now, [now], now=now)
            core.observe("joint_position", now, [q[1], q[0], 0.0], now=now)
            core.observe("joint_velocity", now, [qd[1], qd[0], 0.0], now=now)
            u = core.tick(now).command
            qd = qd + (np.zeros(2) if u is None else u) / 0.1 * P
            q = q + qd * P
            speeds.append(np.abs(qd).max())
        return np.array(speeds)

    coast, braked = run("zero"), run("damping")
    assert coast[49] > 4.0 and braked[49] > 4.0  # spun up alike
    assert coast[-1] > 0.8 * coast[49]  # zero torque: it keeps spinning
    assert braked[-1] < 0.05 * braked[49]  # damping: braked to a stop


def test_wind_down_reaches_zero_at_the_rate_limit():
    f = SafetyFilter(LOWER, UPPER, 0.4, "zero", kind="effort")
    f.apply(np.array([-0.2, 0.0]))
    for _ in range(10):
        f.apply(np.array([-2.0, 3.0]))
    ramp = f.wind_down()
    assert len(ramp) == ramp_ticks(np.array([-2.0, 3.0]), 0.4)
    np.testing.assert_array_equal(ramp[-1], [0.0, 0.0])
    steps = np.abs(np.diff(np.vstack([[-2.0, 3.0], *ramp]), axis=0))
    assert np.all(steps <= 0.4 + 1e-12)
    assert f.wind_down() == []  # already at zero
    assert SafetyFilter(LOWER, UPPER, 0.4, "hold").wind_down() == []


# ---- the kinds on simple plants, closed loop in-process through the core -------------------------------


class PlantPolicy:
    """A proportional law toward `goal` from the newest observation row, as a constant chunk."""

    provider = "fake"
    supports_inpainting = True

    def __init__(self, card, law) -> None:
        self.card, self.law = card, law

    def predict(self, obs_history, **kw):
        row = np.asarray(obs_history)[-1]
        state = row[self.card.feature_slice("joint_position")][[1, 0]]  # the card's order is j2, j1, j3
        return np.tile(self.law(state), (self.card.horizon, 1))


def run_plant(kind, law, plant_step, state0, step, ticks, stop_at=None, stop_how="dropout"):
    """Tick the core against a plant: the plant reads each command for one period. From tick `stop_at`
    the sensors go quiet (SAFE) or the e-stop latches. Returns (states, commands, core states)."""
    card = clock_card(horizon=H, action_lower=np.full(2, -2.0), action_upper=np.full(2, 2.0),
                      action_kind=kind)  # fmt: skip
    clock = FakeClock()
    config = ControlConfig(max_step_per_tick=step, obs_timeout_s=0.05, safe_mode="zero")
    core = ControlCore(card, config, PlantPolicy(card, law), worker=SimWorker(clock, lambda s: 0.005))
    x = np.array(state0, dtype=float)
    states, commands, modes = [], [], []
    for k in range(ticks):
        now = clock.t = k * P
        if stop_at is not None and k == stop_at and stop_how == "estop":
            core.estop()
        quiet = stop_at is not None and k >= stop_at and stop_how == "dropout"
        if not quiet:
            core.observe("clock", now, [now], now=now)
            core.observe("joint_position", now, [x[1], x[0], 0.0], now=now)  # card order j2, j1, j3
        r = core.tick(now)
        u = np.zeros(2) if r.command is None else r.command
        x = plant_step(x, u, P)
        states.append(x.copy())
        commands.append(u.copy())
        modes.append(r.state)
    return np.array(states), np.array(commands), modes


def integrator(x, u, dt):
    """Two joints driven by velocity commands."""
    return x + u * dt


def unicycle(x, u, dt):
    """A base driven by a Twist (linear.x, angular.z): state [distance travelled, heading]."""
    return x + np.array([abs(u[0]), u[1]]) * dt


@pytest.mark.parametrize("stop_how", ["dropout", "estop"])
def test_velocity_kind_drives_a_joint_integrator_and_stops_it(stop_how):
    goal = np.array([0.8, -0.5])
    step = 0.05  # rad/s per 20 ms tick: 2.5 rad/s^2

    def law(q):
        return np.clip(2.0 * (goal - q), -1.0, 1.0)

    states, commands, modes = run_plant("velocity", law, integrator, [0.0, 0.0], step, 150)
    assert ControlState.RUNNING in modes
    np.testing.assert_allclose(states[-1], goal, atol=0.02)  # the policy steers the plant through the core
    # Now moving when the sensors die (or the e-stop latches): the joints stop within the ramp.
    def moving(q):
        return np.full(2, 1.0) * np.sign(goal - q + 10)

    states, commands, modes = run_plant("velocity", moving, integrator, [0.0, 0.0], step, 120, 60, stop_how)
    speed = np.max(np.abs(commands[59]))
    assert speed > 0.9
    stopped = next(k for k in range(60, 120) if np.all(commands[k] == 0.0))
    limit = 60 + (3 if stop_how == "dropout" else 0) + ramp_ticks(commands[59], step) + 1
    assert stopped <= limit, (stopped, limit)
    assert np.all(commands[stopped:] == 0.0)
    np.testing.assert_array_equal(states[-1], states[stopped])  # and it stays where it stopped
    assert np.all(np.abs(np.diff(commands, axis=0)) <= step + 1e-12)


def test_base_velocity_kind_drives_a_unicycle_and_brakes_it_within_its_acceleration():
    step = 0.04  # m/s per tick: 2 m/s^2 (and rad/s per tick for the yaw rate)

    def law(x):  # drive 1.5 m, turning 0.6 rad on the way
        return np.array([np.clip(1.5 * (1.5 - x[0]), 0.0, 1.0), np.clip(1.5 * (0.6 - x[1]), -1.0, 1.0)])

    states, _, modes = run_plant("base_velocity", law, unicycle, [0.0, 0.0], step, 250)
    assert ControlState.RUNNING in modes
    np.testing.assert_allclose(states[-1], [1.5, 0.6], atol=0.03)

    def cruise(_x):
        return np.array([1.0, 0.5])

    states, commands, _ = run_plant("base_velocity", cruise, unicycle, [0.0, 0.0], step, 150, 80)
    v = commands[79, 0]
    # Braking distance at 2 m/s^2 from v, plus the watchdog's timeout at v and one tick.
    allowed = v * v / (2 * step / P) + v * (0.05 + 2 * P) + 1e-9
    assert states[-1, 0] - states[79, 0] <= allowed
    assert np.all(commands[-20:] == 0.0)
