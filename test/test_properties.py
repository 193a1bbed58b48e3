"""Properties of what reaches the motors, for any chunk arrivals, latencies and chunk contents.

Whatever arrives (out of order, late, NaN, Inf, 1e300), every command is finite, inside the joint limits,
within max_step of the previous command, and never taken from an action whose time has passed.
"""

from __future__ import annotations

import math

import numpy as np
from core_fakes import FakeClock, SimWorker, clock_card
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from diffusion_controller.core.chunk import Chunk, is_stale
from diffusion_controller.core.control_config import ControlConfig
from diffusion_controller.core.control_state import ControlState
from diffusion_controller.core.controller import ControlCore
from diffusion_controller.core.safety import SafetyFilter
from diffusion_controller.core.scheduler import BLEND_MODES, ChunkScheduler

P = 0.02
H = 6
LOWER = np.array([-1.0, 0.5])
UPPER = np.array([1.0, 2.0])
WILD = st.one_of(
    st.floats(-5.0, 5.0),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e300, -1e300, 0.0]),
)
FINITE = st.one_of(st.floats(-5.0, 5.0), st.sampled_from([1e300, -1e300, 0.0]))
# Mostly finite chunks (huge values included) so the controller runs, some with NaN/Inf in them.
ACTIONS = st.one_of(
    arrays(np.float64, (H, 2), elements=FINITE),
    arrays(np.float64, (H, 2), elements=FINITE),
    arrays(np.float64, (H, 2), elements=WILD),
)


def check_command(cmd, previous, step) -> None:
    assert cmd is None or cmd.shape == (2,)
    if cmd is None:
        assert previous is None, "a command once given is never withdrawn"
        return
    assert np.all(np.isfinite(cmd))
    assert np.all(cmd >= LOWER) and np.all(cmd <= UPPER)
    if previous is not None:
        assert np.all(np.abs(cmd - previous) <= step * (1 + 1e-9))


arrival = st.fixed_dictionaries(
    {
        "age": st.floats(0.0, 0.3),  # how old the chunk's observation is when it arrives
        "seq_jump": st.integers(-3, 3),  # <= 0: an older chunk arriving out of order
        "first_offset": st.integers(0, 2),
        "actions": ACTIONS,
    }
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    blend=st.sampled_from(BLEND_MODES),
    crossfade_steps=st.integers(0, 4),
    ensemble_chunks=st.integers(1, 4),
    exec_latency=st.floats(0.0, 0.03),
    step=st.floats(0.01, 0.5),
    jitter=st.lists(st.floats(-0.3, 0.3), min_size=40, max_size=40),
    arrivals=st.lists(st.one_of(st.none(), st.none(), arrival), min_size=40, max_size=40),
)
def test_scheduler_and_safety_filter_commands_are_always_safe(
    blend, crossfade_steps, ensemble_chunks, exec_latency, step, jitter, arrivals
):
    scheduler = ChunkScheduler(P, exec_latency, blend, crossfade_steps, ensemble_chunks)
    safety = SafetyFilter(LOWER, UPPER, step)
    seq, previous, now = 0, None, -math.inf
    for k, (j, a) in enumerate(zip(jitter, arrivals, strict=True)):
        now = max((k + j) * P, now)  # jittery ticks; time never runs backwards
        if a is not None:
            seq += a["seq_jump"]
            t_obs = now - a["age"]
            scheduler.offer(Chunk(a["actions"], t_obs, P, a["first_offset"], seq, t_obs, now), now)
        selection = scheduler.select(now)
        cmd, accepted = safety.apply(None if selection is None else selection.action)
        if selection is not None:
            assert not is_stale(selection.action_time, now + exec_latency, P)
            assert accepted == bool(np.all(np.isfinite(selection.action)))
            if accepted:
                target = np.clip(selection.action, LOWER, UPPER)
                if previous is not None:
                    target = np.clip(target, previous - step, previous + step)
                np.testing.assert_allclose(cmd, target)
        if not accepted and previous is not None:
            np.testing.assert_array_equal(cmd, previous)  # anything rejected holds
        check_command(cmd, previous, step)
        previous = cmd if cmd is not None else previous


class ScriptedPolicy:
    """Returns the drawn chunks in turn, whatever the observation (contents may be NaN or huge)."""

    provider = "fake"
    supports_inpainting = True

    def __init__(self, card, chunks) -> None:
        self.card = card
        self.chunks = chunks
        self.n = 0

    def predict(self, obs_history, **kw):
        chunk = self.chunks[self.n % len(self.chunks)]
        self.n += 1
        return chunk


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    blend=st.sampled_from(BLEND_MODES),
    execute_steps=st.integers(1, H),
    exec_latency=st.floats(0.0, 0.03),
    compensate=st.booleans(),
    step=st.floats(0.01, 0.5),
    misses=st.integers(1, 5),
    chunks=st.lists(ACTIONS, min_size=1, max_size=5),
    latencies=st.lists(st.floats(0.0, 0.2), min_size=1, max_size=8),
    obs_delay=st.floats(0.0, 0.08),
    dropouts=st.lists(st.booleans(), min_size=60, max_size=60),
)
def test_control_core_commands_are_always_safe(
    blend, execute_steps, exec_latency, compensate, step, misses, chunks, latencies, obs_delay, dropouts
):
    card = clock_card(horizon=H, action_lower=LOWER, action_upper=UPPER)
    clock = FakeClock()
    worker = SimWorker(clock, latency=lambda seq: latencies[seq % len(latencies)])
    config = ControlConfig(
        exec_latency_s=exec_latency,
        execute_steps=execute_steps,
        blend=blend,
        compensate_delay=compensate,
        max_consecutive_misses=misses,
        max_step_per_tick=step,
        obs_timeout_s=0.1,
    )
    core = ControlCore(card, config, ScriptedPolicy(card, chunks), worker=worker)
    previous, running = None, False
    for k, dropped in enumerate(dropouts):
        now = clock.t = k * P
        if not dropped:  # sensors go quiet now and then: the watchdog must cope
            stamp = now - obs_delay
            core.observe("clock", stamp, [stamp], now=now)
            core.observe("joint_position", stamp, [0.3, -0.2, 0.0], now=now)
        r = core.tick(now)
        check_command(r.command, previous, step)
        if r.state is ControlState.RUNNING and not r.missed:
            assert not is_stale(r.action_time, r.t_exec, P)
            np.testing.assert_array_equal(r.trajectory.positions[0], r.command)
            for a, b in zip(r.trajectory.positions[:-1], r.trajectory.positions[1:], strict=True):
                check_command(b, a, step)
        previous = r.command if r.command is not None else previous
        running = running or (r.state is ControlState.RUNNING and not r.missed)
    event("reached RUNNING" if running else "never RUNNING")


# Operator and environment events the core must survive between ticks, with the same guarantees.
EVENTS = st.sampled_from(
    ["tick", "tick", "tick", "tick", "clock_back", "estop", "resume", "swap", "swap_narrow", "bad_obs"]
)
NARROW = (LOWER + 0.4, UPPER - 0.4)  # a model swapped in at 3 a.m. with tighter joint limits


def outside(cmd: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """Per joint, how far a command is outside [lower, upper] (0 inside)."""
    return np.maximum(np.maximum(lower - cmd, cmd - upper), 0.0)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    events=st.lists(EVENTS, min_size=30, max_size=80),
    chunks=st.lists(ACTIONS, min_size=1, max_size=4),
    latency=st.floats(0.0, 0.1),
    step=st.floats(0.01, 0.5),
    jump=st.floats(0.05, 5.0),
)
def test_commands_stay_safe_across_clock_jumps_estops_swaps_and_bad_observations(
    events, chunks, latency, step, jump
):
    """A sim reset (clock back), e-stop and resume, model swaps (some with tighter limits) and NaN/Inf
    observations between ticks: every command finite and within max_step of the previous one (except the
    first after a clock jump: a new episode, DESIGN.md), never a stale action, the e-stop holds, and the
    command is inside the current model's limits -- or, after a swap tightened them, never farther outside
    than the command before (it converges at max_step instead of jumping)."""
    card = clock_card(horizon=H, action_lower=LOWER, action_upper=UPPER)
    narrow = clock_card(horizon=H, action_lower=NARROW[0], action_upper=NARROW[1])
    clock = FakeClock()
    worker = SimWorker(clock, latency=lambda seq: latency)
    config = ControlConfig(max_step_per_tick=step, obs_timeout_s=0.1, max_consecutive_misses=3)
    core = ControlCore(card, config, ScriptedPolicy(card, chunks), worker=worker)
    limits = (LOWER, UPPER)
    previous, now, new_episode, estopped, narrowed = None, 0.0, True, False, False
    for ev in events:
        if ev == "clock_back":
            now = max(now - jump, 0.0)
            new_episode = True
        elif ev == "estop":
            core.estop()
            estopped = True
        elif ev == "resume":
            core.resume()
            estopped = False
        elif ev in ("swap", "swap_narrow"):
            new = narrow if ev == "swap_narrow" else card
            core.swap_policy(ScriptedPolicy(new, chunks[::-1]))
            narrowed = narrowed or limits[0][0] < new.action_lower[0]
            limits = (new.action_lower, new.action_upper)
        now += P
        clock.t = now
        stamp = now - 0.01
        joints = [math.nan, 0.0, math.inf] if ev == "bad_obs" else [0.3, -0.2, 0.0]
        core.observe("clock", stamp, [stamp], now=now)
        core.observe("joint_position", stamp, joints, now=now)  # rejected when non-finite
        r = core.tick(now)
        if r.command is None:
            assert previous is None or new_episode, "a command once given is only withdrawn by a clock jump"
            continue
        assert r.command.shape == (2,) and np.all(np.isfinite(r.command))
        out = outside(r.command, *limits)
        if previous is None or new_episode:
            assert np.all(out == 0.0)  # a new episode starts inside the limits
            narrowed = False
        else:
            assert np.all(np.abs(r.command - previous) <= step * (1 + 1e-9))
            assert np.all(out <= outside(previous, *limits) + 1e-12), "moved away from the limits"
            assert narrowed or np.all(out == 0.0), "outside the limits without a swap that tightened them"
        if estopped and previous is not None and not new_episode:
            assert r.state is ControlState.ESTOP
            np.testing.assert_array_equal(r.command, previous)
        if r.state is ControlState.RUNNING and not r.missed:
            assert not is_stale(r.action_time, r.t_exec, P)
        previous, new_episode = r.command, False
