"""ControlCore end to end on a simulated 50 Hz clock with a fake policy and simulated inference latency.

The clock policy's actions are their own scheduled times (core_fakes), so a command's value tells which
time slot it was computed for; the simulated worker delivers each result a chosen delay after its request.
"""

from __future__ import annotations

import numpy as np
import pytest
from core_fakes import ClockPolicy, FakeClock, SimWorker, clock_card

from diffusion_controller.core.control_config import ConfigError, ControlConfig
from diffusion_controller.core.control_state import ControlState, TickResult
from diffusion_controller.core.controller import ControlCore

P = 0.02
WIDE = {"max_step_per_tick": 1000.0}  # the clock policy's actions jump by ~1 s at the start


class Rig:
    """A core, its fake policy and worker, sensors stamped `obs_delay` late, ticks every P seconds."""

    def __init__(self, config=None, latency=lambda s: 0.005, obs_delay=0.0, card=None):
        self.clock = FakeClock(0.0)
        self.card = card or clock_card()
        self.policy = ClockPolicy(self.card)
        self.worker = SimWorker(self.clock, latency)
        self.core = ControlCore(self.card, config or ControlConfig(**WIDE), self.policy, worker=self.worker)
        self.obs_delay = obs_delay
        self.feeding = {"clock", "joint_position"}
        self.joints = np.array([0.1, 0.2, 0.3])  # (j2, j1, j3)
        self.k = 0
        self.log: list[tuple[float, TickResult]] = []

    def step(self) -> TickResult:
        now = self.k * P
        self.clock.t = now
        stamp = now - self.obs_delay
        if "clock" in self.feeding:
            assert self.core.observe("clock", stamp, [stamp], now=now) is None
        if "joint_position" in self.feeding:
            assert self.core.observe("joint_position", stamp, self.joints, now=now) is None
        result = self.core.tick(now)
        self.log.append((now, result))
        self.k += 1
        return result

    def run(self, n: int) -> list[TickResult]:
        return [self.step() for _ in range(n)]

    def until(self, state: ControlState, limit: int = 200) -> TickResult:
        for _ in range(limit):
            r = self.step()
            if r.state is state:
                return r
        raise AssertionError(f"never reached {state}; last: {self.log[-1][1]}")


def test_waits_for_observations_then_holds_the_measured_pose_then_runs():
    rig = Rig(latency=lambda seq: 0.03)
    r = rig.core.tick(0.0)
    assert r.state is ControlState.WAITING and r.command is None and "observations" in r.reason
    rig.k = 1
    r = rig.step()
    assert r.state is ControlState.WAITING
    np.testing.assert_allclose(r.command, [0.2, 0.1])  # measured j1, j2 in action-joint order
    rig.joints = np.array([0.5, 0.6, 0.7])  # the robot sags: the hold is latched, not followed
    r = rig.step()
    assert r.state is ControlState.WAITING
    np.testing.assert_allclose(r.command, [0.2, 0.1])
    r = rig.until(ControlState.RUNNING)
    assert r.command[0] == pytest.approx(r.action_time) and r.chunk_seq is not None


@pytest.mark.parametrize("obs_delay", [0.0, 0.037, 0.071])
def test_commands_are_the_actions_scheduled_for_t_exec_under_observation_delay(obs_delay):
    config = ControlConfig(exec_latency_s=0.004, **WIDE)
    rig = Rig(config, latency=lambda seq: 0.025, obs_delay=obs_delay)
    rig.until(ControlState.RUNNING)
    for r in rig.run(100):
        assert r.state is ControlState.RUNNING and not r.missed
        # The command is the action meant for the slot in which it takes effect.
        assert abs(r.command[0] - r.t_exec) <= P / 2 + 1e-9
    assert rig.core.stats().missed_steps == 0


def test_without_delay_compensation_commands_lag_by_the_observation_delay():
    obs_delay = 0.071
    config = ControlConfig(compensate_delay=False, **WIDE)
    rig = Rig(config, latency=lambda seq: 0.025, obs_delay=obs_delay)
    rig.until(ControlState.RUNNING)
    lags = [r.t_exec - r.command[0] for r in rig.run(50)]
    assert min(lags) > P / 2, "compensation off must execute actions computed for an earlier time"
    assert all(abs(lag - obs_delay) <= P / 2 + 1e-9 for lag in lags)


def test_late_inference_holds_counts_misses_then_goes_safe_and_recovers_with_a_fresh_chunk():
    card = clock_card(horizon=4)
    stall = {3}
    config = ControlConfig(max_consecutive_misses=3, **WIDE)
    rig = Rig(config, latency=lambda seq: 1.0 if seq in stall else 0.005, card=card)
    rig.until(ControlState.RUNNING)
    before = rig.core.stats()
    results = rig.run(12)
    states = [r.state for r in results]
    assert ControlState.SAFE in states
    first_miss = next(i for i, r in enumerate(results) if r.missed)
    previous = results[first_miss - 1].command
    for r in results[first_miss : first_miss + 2]:
        assert r.missed and r.state is ControlState.RUNNING
        np.testing.assert_array_equal(r.command, previous)  # hold the last command
    safe = results[first_miss + 2]
    assert safe.state is ControlState.SAFE and "3 consecutive" in safe.reason
    assert "inference requested" in safe.reason and "has not answered" in safe.reason  # the stall
    stats = rig.core.stats()
    assert stats.missed_steps - before.missed_steps == 3 and stats.safe_entries == 1
    # The stalled chunk (requested before the fault) arrives late and is dropped; a fresh one resumes.
    r = rig.until(ControlState.RUNNING, limit=100)
    assert r.chunk_seq > 3
    assert rig.core.stats().chunks_dropped >= 1


def test_chunks_that_arrive_stale_name_the_cause_in_the_safe_reason():
    """Inference slower than the whole horizon: every chunk is stale on arrival, and SAFE says so."""
    card = clock_card(horizon=4)
    rig = Rig(ControlConfig(max_consecutive_misses=3, **WIDE), card=card)
    rig.until(ControlState.RUNNING)
    rig.worker.latency = lambda seq: 0.2  # 10 periods > horizon 4 + first_offset
    safe = rig.until(ControlState.SAFE)
    assert "3 consecutive missed steps (limit 3): inference requested" in safe.reason, safe.reason
    # Logged once at the change; the current reason (/diagnostics) follows the chunks that come in stale.
    rig.run(20)
    reason = rig.core.stats().reason
    assert rig.core.state is ControlState.SAFE
    assert reason.startswith("3 consecutive missed steps (limit 3): chunk dropped: stale on arrival"), reason


def test_safe_reason_follows_the_cause_once_observations_are_fresh_again():
    """SAFE entered on stale observations, then the observations recover while every chunk arrives stale:
    the reason must say the chunks are the problem now, not keep the old observation ages."""
    card = clock_card(horizon=4)
    rig = Rig(ControlConfig(obs_timeout_s=0.1, max_consecutive_misses=3, **WIDE), card=card)
    rig.until(ControlState.RUNNING)
    rig.worker.latency = lambda seq: 0.2  # every chunk from now on is stale on arrival
    rig.feeding.discard("joint_position")
    r = rig.until(ControlState.SAFE, limit=10)
    assert "stale observation" in r.reason and "joint_position" in r.reason, r.reason
    rig.feeding.add("joint_position")
    results = rig.run(40)
    assert all(x.state is ControlState.SAFE for x in results)
    reason = rig.core.stats().reason
    assert "stale observation" not in reason, reason
    expected = "observations fresh again, no usable chunk yet: chunk dropped: stale on arrival"
    assert reason.startswith(expected), reason


def test_watchdog_goes_safe_naming_the_feature_then_recovers_with_a_fresh_history():
    rig = Rig(ControlConfig(obs_timeout_s=0.1, **WIDE))
    rig.until(ControlState.RUNNING)
    rig.feeding.discard("joint_position")
    r = rig.until(ControlState.SAFE, limit=10)
    assert "joint_position" in r.reason and "clock" not in r.reason
    held = r.command
    submitted = len(rig.worker.submitted)
    for r in rig.run(10):
        assert r.state is ControlState.SAFE
        np.testing.assert_array_equal(r.command, held)
    assert len(rig.worker.submitted) == submitted, "no requests on stale observations"
    rig.feeding.add("joint_position")
    recovered_at = rig.k * P
    r = rig.until(ControlState.RUNNING, limit=10)
    stats = rig.core.stats()
    assert stats.stale_obs_events == 1 and stats.safe_entries == 1
    pairs = zip(rig.policy.calls, rig.worker.submitted, strict=True)
    first_fresh = next(c for c, req in pairs if req.t_request >= recovered_at)
    clock_rows = first_fresh["obs"][:, rig.card.feature_slice("clock")]
    assert np.all(clock_rows == clock_rows[-1]), "history restarts at the newest observation"


def test_safe_default_pose_moves_gently_to_the_pose():
    pose = (0.5, -0.5)
    config = ControlConfig(safe_mode="default_pose", default_pose=pose, max_step_per_tick=0.01)
    rig = Rig(config)
    rig.run(5)
    rig.feeding.clear()
    previous = rig.log[-1][1].command
    for _ in range(300):
        r = rig.step()
        assert np.all(np.abs(r.command - previous) <= 0.01 + 1e-12)
        previous = r.command
    assert r.state is ControlState.SAFE
    np.testing.assert_allclose(previous, pose)


def test_estop_latches_the_hold_and_resume_requires_a_fresh_chunk():
    rig = Rig()
    rig.until(ControlState.RUNNING)
    rig.run(3)
    rig.core.estop()
    held = rig.log[-1][1].command
    submitted = len(rig.worker.submitted)
    for r in rig.run(10):
        assert r.state is ControlState.ESTOP
        np.testing.assert_array_equal(r.command, held)
    assert len(rig.worker.submitted) == submitted
    rig.core.resume()
    r = rig.step()
    assert r.state is ControlState.WAITING
    np.testing.assert_array_equal(r.command, held)
    r = rig.until(ControlState.RUNNING)
    assert r.chunk_seq >= submitted
    assert rig.core.stats().estops == 1


def executed_per_chunk(results: list[TickResult]) -> list[int]:
    seqs = [r.chunk_seq for r in results]
    counts, current = [], None
    for s in seqs:
        if s != current:
            counts.append(0)
            current = s
        counts[-1] += 1
    return counts


def test_diffusion_policy_mode_requests_ahead_and_executes_n_actions_per_chunk():
    card = clock_card(horizon=8)
    rig = Rig(ControlConfig(execute_steps=4, **WIDE), latency=lambda seq: 0.015, card=card)
    rig.until(ControlState.RUNNING)
    rig.run(10)  # let the latency forecast settle
    requests = rig.core.stats().requests
    results = rig.run(200)
    assert all(r.state is ControlState.RUNNING and not r.missed for r in results)
    assert rig.core.stats().requests - requests == pytest.approx(200 / 4, abs=2)
    assert set(executed_per_chunk(results)[1:-1]) == {4}


def test_diffuseloco_mode_requests_a_chunk_every_tick():
    rig = Rig(ControlConfig(execute_steps=1, **WIDE), latency=lambda seq: 0.015)
    rig.until(ControlState.RUNNING)
    requests = rig.core.stats().requests
    results = rig.run(100)
    assert rig.core.stats().requests - requests == 100
    assert set(executed_per_chunk(results)) == {1}


def test_inpaint_requests_freeze_what_runs_while_inference_is_in_flight():
    card = clock_card(horizon=12)
    config = ControlConfig(blend="inpaint", **WIDE)
    rig = Rig(config, latency=lambda seq: 0.045, obs_delay=0.013, card=card)
    rig.until(ControlState.RUNNING)
    rig.run(20)
    call = rig.policy.calls[-1]
    request = rig.worker.submitted[-1]
    mask = call["mask"].astype(bool)
    # Forecast delay: observation age + 3 ticks of inference; those slots run from the old chunk.
    assert 3 <= mask.sum() <= 6 and mask[: mask.sum()].all()
    slot_times = request.t_obs + (card.first_offset + np.arange(card.horizon)) * P
    assert np.all(np.abs(call["prefix"][mask, 0] - slot_times[mask]) <= P / 2 + 1e-9)
    for r in rig.run(50):
        assert r.state is ControlState.RUNNING and not r.missed


def test_swap_policy_with_the_same_layout_keeps_running_on_the_new_policy():
    rig = Rig()
    rig.until(ControlState.RUNNING)
    new = ClockPolicy(rig.card, offset=0.5)
    rig.core.swap_policy(new)
    results = rig.run(10)
    assert all(r.state is ControlState.RUNNING for r in results)
    assert results[-1].command[0] - results[-1].action_time == pytest.approx(0.5)
    assert new.calls


def test_swap_policy_with_a_new_layout_restarts_and_drops_the_old_chunks():
    rig = Rig(latency=lambda seq: 0.05)
    rig.until(ControlState.RUNNING)
    rig.step()  # a request of the old layout is now in flight
    card = clock_card(history=6)
    new = ClockPolicy(card)
    dropped = rig.core.stats().chunks_dropped
    rig.core.swap_policy(new)
    assert rig.core.card is card
    r = rig.step()
    assert r.state is ControlState.WAITING
    r = rig.until(ControlState.RUNNING)
    assert rig.core.stats().chunks_dropped > dropped
    assert new.calls and all(c["obs"].shape == (6, card.obs_dim) for c in new.calls)


def test_swap_to_a_policy_that_cannot_inpaint_is_refused_with_the_field():
    rig = Rig(ControlConfig(blend="inpaint", **WIDE))
    with pytest.raises(ConfigError) as e:
        rig.core.swap_policy(ClockPolicy(rig.card, supports_inpainting=False))
    assert e.value.field == "blend"


def test_model_errors_and_non_finite_chunks_never_reach_the_command():
    rig = Rig(ControlConfig(max_consecutive_misses=2, **WIDE))
    rig.until(ControlState.RUNNING)
    rig.policy.nan = True
    results = rig.run(30)
    assert all(np.all(np.isfinite(r.command)) for r in results)
    assert results[-1].state is ControlState.SAFE
    # The reason (and so the node's one log line for the state change) names the cause.
    entered = next(r for r in results if r.state is ControlState.SAFE)
    assert "inference failed: non-finite actions" in entered.reason, entered.reason
    assert rig.core.stats().inference_errors > 0 and "non-finite" in rig.core.stats().last_error
    rig.policy.nan = False
    rig.policy.error = RuntimeError("cuda exploded")
    rig.run(5)
    assert "RuntimeError: cuda exploded" in rig.core.stats().last_error
    rig.policy.error = None
    rig.until(ControlState.RUNNING)


def test_previous_action_rows_are_the_commands_published_before_each_row():
    rig = Rig(obs_delay=0.037)
    rig.until(ControlState.RUNNING)
    rig.run(30)
    call, request = rig.policy.calls[-1], rig.worker.submitted[-1]
    published = [(t, r.command) for t, r in rig.log if r.command is not None and t <= request.t_request]
    grid = request.t_obs - (rig.card.history - 1 - np.arange(rig.card.history)) * P
    rows = call["obs"][:, rig.card.feature_slice("previous_action")]
    for g, row in zip(grid, rows, strict=True):
        before = [c for t, c in published if t < g]
        np.testing.assert_allclose(row, before[-1])


def test_trajectory_is_the_filtered_rest_of_the_chunk_and_agrees_with_the_next_commands():
    card = clock_card(horizon=16)
    rig = Rig(ControlConfig(execute_steps=16, max_step_per_tick=0.005), card=card)
    rig.until(ControlState.RUNNING)
    previous = None
    for r in rig.run(30):
        times, positions = r.trajectory
        np.testing.assert_array_equal(positions[0], r.command)
        assert times[0] == r.action_time and np.all(np.diff(times) > 0)
        assert np.all(np.abs(np.diff(positions, axis=0)) <= 0.005 + 1e-12)
        if previous is not None and previous.chunk_seq == r.chunk_seq:
            np.testing.assert_allclose(previous.trajectory.positions[1], r.command)
        previous = r


def test_clock_jumping_back_restarts_in_waiting():
    rig = Rig()
    rig.until(ControlState.RUNNING)
    rig.run(40)
    rig.k = 0  # the simulation was reset
    r = rig.step()
    assert r.state is ControlState.WAITING and "clock jumped back" in r.reason
    rig.until(ControlState.RUNNING)


def test_observe_slightly_behind_the_last_tick_is_thread_interleaving_not_a_jump():
    rig = Rig()
    rig.until(ControlState.RUNNING)
    last = rig.log[-1][0]
    assert rig.core.observe("clock", last - 0.003, [last - 0.003], now=last - 0.003) is not None  # backwards
    assert rig.step().state is ControlState.RUNNING
    rig.run(40)
    # A sim reset is seen by observe() already, so the new episode's first samples are kept.
    rig.k = 0
    assert rig.core.observe("clock", 0.0, [0.0], now=0.0) is None
    assert rig.core.state is ControlState.WAITING


def test_rejected_observations_return_the_reason_and_are_counted():
    rig = Rig()
    assert "expected 3 values" in rig.core.observe("joint_position", 0.0, [1.0, 2.0])
    assert "non-finite" in rig.core.observe("clock", 0.0, [np.nan])
    assert rig.core.stats().rejected_observations == 2


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("exec_latency_s", -0.1),
        ("execute_steps", 0),
        ("execute_steps", 1.5),
        ("blend", "average"),
        ("crossfade_steps", -1),
        ("ensemble_chunks", 0),
        ("max_consecutive_misses", 0),
        ("compensate_delay", "yes"),
        ("obs_timeout_s", 0.0),
        ("obs_timeouts_s", {"clock": -1.0}),
        ("command_timeout_s", float("nan")),
        ("safe_mode", "freeze"),
        ("default_pose", ["a", "b"]),
        ("max_step_per_tick", float("inf")),
        ("latency_window", 0),
        ("seed", 1.5),
    ],
)
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ConfigError) as e:
        ControlConfig(**{field: value})
    assert e.value.field == field and str(e.value).startswith(f"ControlConfig.{field}:")


@pytest.mark.parametrize(
    ("field", "kw"),
    [
        ("execute_steps", {"execute_steps": 9}),
        ("default_pose", {"default_pose": (0.0, 0.0, 0.0)}),
        ("obs_timeouts_s", {"obs_timeouts_s": {"previous_action": 0.1}}),
        ("default_pose", {"safe_mode": "default_pose"}),
    ],
)
def test_config_errors_that_need_the_card_name_the_field(field, kw):
    card = clock_card(horizon=8)
    with pytest.raises(ConfigError) as e:
        ControlCore(card, ControlConfig(**kw), ClockPolicy(card), worker=SimWorker(FakeClock()))
    assert e.value.field == field


def test_a_new_core_continues_from_a_command_already_sent_at_max_step():
    # A reconfigure builds a new core; the robot still holds the last command the node sent. The new core
    # must rate-limit from it, not jump to the measured pose (0.2, 0.1 here) in one tick.
    config = ControlConfig(max_step_per_tick=0.01)
    rig = Rig(config)
    assert rig.core.continue_from(np.array([0.5, -0.3]))
    assert not rig.core.continue_from(np.array([0.0, 0.0]))  # only before this core's first command
    previous = np.array([0.5, -0.3])
    for r in rig.run(60):
        if r.command is not None:
            assert np.all(np.abs(r.command - previous) <= 0.01 + 1e-12), (r.state, r.command, previous)
            previous = r.command
    first = next(r.command for _, r in rig.log if r.command is not None)
    assert np.all(np.abs(first - [0.5, -0.3]) <= 0.01 + 1e-12)  # not the measured pose (0.2, 0.1)
    assert rig.log[-1][1].state is ControlState.RUNNING


def test_continue_from_refuses_a_command_that_does_not_fit():
    rig = Rig()
    assert not rig.core.continue_from(np.array([0.1, 0.2, 0.3]))
    assert not rig.core.continue_from(np.array([np.nan, 0.2]))
    rig.k = 1
    np.testing.assert_allclose(rig.step().command, [0.2, 0.1])  # the measured pose, as without it


def test_a_refused_unsafe_input_holds_safe_until_a_newer_good_sample():
    rig = Rig(ControlConfig(obs_timeout_s=0.1, **WIDE))
    rig.until(ControlState.RUNNING)
    bad_stamp = rig.k * P + 0.001  # newer than the sample stored at this step
    rig.core.fault("joint_position", bad_stamp, "/joint_states: hip_1 = 1e+308 outside [-1, 1]")
    r = rig.step()
    assert r.state is ControlState.SAFE and "implausible observation" in r.reason and "hip_1" in r.reason
    # The samples fed from the next step on are newer: the fault clears, control restarts from a fresh chunk.
    rig.until(ControlState.RUNNING, limit=10)
    assert rig.core.stats().safe_entries == 1


def test_an_older_good_sample_does_not_clear_a_refused_newer_input():
    rig = Rig(ControlConfig(obs_timeout_s=0.1, **WIDE))
    rig.until(ControlState.RUNNING)
    rig.core.fault("joint_position", 1e6, "from the future of this rig")  # every fed sample is older
    for r in rig.run(20):
        assert r.state is ControlState.SAFE
    assert "from the future of this rig" in rig.core.stats().reason


@pytest.mark.parametrize("first_offset", [0, 1, 2, 3])
@pytest.mark.parametrize("rate_hz", [50.0, 100.0, 200.0])
def test_an_action_never_runs_outside_its_slot(first_offset, rate_hz):
    """Whatever the card's first_offset, the rate and the inference latency, every command is the action
    scheduled for the slot in which it takes effect (within half a period: never a tick early); when the
    newest chunk starts later, the running one goes on."""
    period = 1.0 / rate_hz
    rng = np.random.default_rng(int(1000 * first_offset + rate_hz))
    card = clock_card(first_offset=first_offset, control_period_s=period, horizon=8)
    latencies = rng.uniform(0.1, 2.5, size=10_000) * period
    core = ControlCore(card, ControlConfig(exec_latency_s=0.3 * period, **WIDE), ClockPolicy(card),
                       worker=(worker := SimWorker(clock := FakeClock(0.0), lambda s: latencies[s])))
    worker.set_policy(ClockPolicy(card))
    running = 0
    for k in range(400):
        now = clock.t = k * period
        core.observe("clock", now, [now], now=now)
        core.observe("joint_position", now, np.zeros(3), now=now)
        r = core.tick(now)
        if r.state is ControlState.RUNNING and not r.missed:  # a missed step holds the last command
            running += 1
            assert abs(r.command[0] - r.t_exec) <= 0.5 * period + 1e-9, (k, r.command[0] - r.t_exec)
    # A newer chunk that starts later must not stop control: the running one goes on meanwhile.
    assert running > 300, f"only {running} of 400 ticks RUNNING"
