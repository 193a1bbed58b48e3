"""Chunk stale rule and ChunkScheduler: selection, delay compensation, modes, crossfade, inpaint, ordering."""

import numpy as np
import pytest

from diffusion_controller.core.chunk import SLOT_TOLERANCE, Chunk, is_stale
from diffusion_controller.core.scheduler import ChunkScheduler

P = 0.02
H = 8


def timed_chunk(t_obs: float, seq: int, first_offset: int = 1, dim: int = 2, horizon: int = H) -> Chunk:
    """Action i = its own scheduled time, so a value tells which slot it was meant for."""
    times = t_obs + (first_offset + np.arange(horizon)) * P
    return Chunk(np.repeat(times[:, None], dim, axis=1), t_obs, P, first_offset, seq, t_obs, t_obs)


def const_chunk(t_obs: float, seq: int, value: float) -> Chunk:
    return Chunk(np.full((H, 2), value), t_obs, P, 1, seq, t_obs, t_obs)


def test_stale_rule_boundary_is_half_a_period():
    assert not is_stale(1.0, 1.0 + P / 2, P)
    assert not is_stale(1.0, 1.0 + P / 2 + 0.5 * SLOT_TOLERANCE * P, P)  # float slack at the boundary
    assert is_stale(1.0, 1.0 + P / 2 + 2 * SLOT_TOLERANCE * P, P)
    assert not is_stale(1.0, 0.5, P)  # future actions are never stale


@pytest.mark.parametrize("epoch", [0.0, 1.79e9])  # sim time from zero; wall time (float ulp 2.4e-7 s)
def test_a_tick_half_a_period_late_always_has_an_action(epoch):
    """Under sim time at 200 Hz with 400 Hz physics a tick runs exactly half a period late when the clock
    advanced one physics step before its callback: stamps of integer nanoseconds made float seconds then
    left the slot's action stale and the next one too early for 1 tick in 20 (a missed step, an effort
    ramping toward zero). The half-period rule has a slack, so one of the two always runs."""
    period, missing = 0.005, 0
    for k in range(4000, 12000):
        t_ns = k * 5_000_000
        t_obs = epoch + (t_ns - 40_000_000) * 1e-9
        c = Chunk(np.zeros((16, 2)), t_obs, period, 9, 1, t_obs, t_obs)
        for late_ns in (2_500_000, -2_500_000):  # half a period late, and early
            i = c.action_for_slot(epoch + (t_ns + 5_000_000 + late_ns) * 1e-9)
            missing += i is None
            assert i is None or i in (0, 1)
    assert missing == 0


def test_first_valid_index_is_the_earliest_non_stale_action():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        c = timed_chunk(rng.uniform(0, 10), 0, first_offset=int(rng.integers(0, 3)))
        t_exec = c.t_obs + rng.uniform(-0.1, 0.3)
        i = c.first_valid_index(t_exec)
        stale = [is_stale(c.action_time(k), t_exec, P) for k in range(H)]
        if i is None:
            assert all(stale)
        else:
            assert not stale[i] and all(stale[:i])


@pytest.mark.parametrize(
    ("obs_delay", "exec_latency", "index"),
    # t_i = now - obs_delay + (1 + i) * P must be the first one >= now + exec_latency - P / 2; with no
    # delay at all the first action is meant for the next tick, so nothing runs now (never early).
    [(0.0, 0.0, None), (0.013, 0.0, 0), (0.055, 0.0, 2), (0.055, 0.01, 2), (0.087, 0.0, 3), (0.087, 0.01, 4)],
)
def test_select_compensates_observation_delay_and_exec_latency(obs_delay, exec_latency, index):
    now = 10.0
    s = ChunkScheduler(P, exec_latency)
    assert s.offer(timed_chunk(now - obs_delay, 1), now) is None
    sel = s.select(now)
    if index is None:
        assert sel is None
        sel, now = s.select(now + P), now + P
        index = 0
    assert sel.index == index
    assert sel.action[0] == pytest.approx(sel.action_time)
    t_exec = now + exec_latency
    assert sel.action_time >= t_exec - P / 2
    assert sel.index == 0 or sel.action_time < t_exec + P / 2


def test_select_walks_the_chunk_then_reports_none_when_all_actions_are_stale():
    s = ChunkScheduler(P)
    s.offer(timed_chunk(0.0, 1), 0.0)
    indices = [s.select(k * P).index for k in range(1, H + 1)]
    assert indices == list(range(H))
    assert s.select((H + 1) * P) is None


def test_out_of_order_and_stale_on_arrival_chunks_are_discarded():
    s = ChunkScheduler(P)
    assert s.offer(timed_chunk(1.0, 5), 1.0) is None
    assert "out of order" in s.offer(timed_chunk(1.02, 3), 1.02)
    assert s.current.seq == 5
    assert "stale on arrival" in s.offer(timed_chunk(0.5, 6), 1.02)
    assert s.current.seq == 5, "an entirely stale chunk must not replace a running one"
    s.clear()
    assert s.select(1.02) is None
    assert "out of order" in s.offer(timed_chunk(1.02, 4), 1.02), "order survives clear()"


def test_handover_time_diffuseloco_vs_diffusion_policy():
    s = ChunkScheduler(P)
    assert s.handover_time(0.0, 1) == -np.inf  # no chunk: request now
    s.offer(timed_chunk(0.0, 1), 0.0)
    first = s.select(P).action_time
    assert s.handover_time(P, 1) == pytest.approx(first + P)
    assert s.handover_time(P, 4) == pytest.approx(first + 4 * P)
    # A chunk runs out before execute_steps: the next one is needed after its last action.
    last = s.current.action_time(H - 1)
    assert s.handover_time(P, 50) == pytest.approx(last + P)


def test_crossfade_ramps_linearly_from_old_to_new_over_the_overlap():
    steps = 3
    s = ChunkScheduler(P, blend="crossfade", crossfade_steps=steps)
    s.offer(const_chunk(0.0, 1, 0.0), 0.0)
    now = 2 * P
    s.offer(const_chunk(P, 2, 1.0), now)  # the new grid lies one period after the old one
    first = s.current.first_valid_index(now)
    blended = s.current.actions[:, 0]
    expected_w = [(k + 1) / (steps + 1) for k in range(steps)]
    np.testing.assert_allclose(blended[first : first + steps], expected_w)
    np.testing.assert_allclose(blended[first + steps :], 1.0)
    # Slots the old chunk does not reach are the new chunk alone.
    s2 = ChunkScheduler(P, blend="crossfade", crossfade_steps=steps)
    s2.offer(const_chunk(0.0, 1, 0.0), 0.0)
    late = 0.0 + (H + 1) * P
    s2.offer(const_chunk(late - P, 2, 1.0), late - P / 4)
    np.testing.assert_allclose(s2.current.actions, 1.0)


def test_mode_none_replaces_and_crossfade_zero_steps_is_none():
    for s in (ChunkScheduler(P), ChunkScheduler(P, blend="crossfade", crossfade_steps=0)):
        s.offer(const_chunk(0.0, 1, 0.0), 0.0)
        s.offer(const_chunk(P, 2, 1.0), 2 * P)
        np.testing.assert_allclose(s.current.actions, 1.0)


def test_ensemble_executes_the_mean_of_the_last_chunks_for_the_slot():
    for n, expected in ((3, 3.0), (2, 4.5), (1, 6.0)):
        s = ChunkScheduler(P, blend="ensemble", ensemble_chunks=n)
        for k, value in enumerate((0.0, 3.0, 6.0)):  # one chunk per tick
            s.offer(const_chunk(k * P, k + 1, value), k * P)
        # At 3P every chunk has an action for the slot, the newest its first one.
        np.testing.assert_allclose(s.select(3 * P).action, expected)


@pytest.mark.parametrize("jitter", [0.0, 0.004, -0.007])
def test_ensemble_averages_each_chunks_action_for_the_same_slot(jitter):
    s = ChunkScheduler(P, blend="ensemble", ensemble_chunks=4)
    for k in range(4):  # observation stamps off the tick grid by up to `jitter`
        t_obs = 1.0 + k * P + (jitter if k % 2 else 0.0)
        s.offer(timed_chunk(t_obs, k + 1), t_obs)
    now = 1.0 + 5 * P
    sel = s.select(now)
    # Every chunk contributes its action for this slot (its own time within half a period), never its
    # first action: the mean stays within half a period of the slot's time.
    assert abs(sel.action[0] - sel.action_time) <= abs(jitter) / 2 + 1e-12
    assert not is_stale(sel.action_time, now, P)


def test_ensemble_leaves_out_chunks_without_a_finite_action_for_the_slot_and_forgets_on_clear():
    s = ChunkScheduler(P, blend="ensemble", ensemble_chunks=4)
    s.offer(const_chunk(0.0, 1, 100.0), 0.0)  # runs out before the slot below
    late = (H + 2) * P
    nan = const_chunk(late - 2 * P, 2, 0.0)
    nan.actions[:] = np.nan
    s.offer(nan, late - 2 * P)
    s.offer(const_chunk(late - P, 3, 2.0), late - P)
    s.offer(const_chunk(late, 4, 4.0), late)
    np.testing.assert_allclose(s.select(late + P).action, 3.0)  # 2 and 4; not 100, not NaN
    s.clear()
    s.offer(const_chunk(late + P, 5, 8.0), late + P)
    np.testing.assert_allclose(s.select(late + 2 * P).action, 8.0)


def test_ensemble_config_is_checked():
    with pytest.raises(ValueError, match="ensemble_chunks"):
        ChunkScheduler(P, blend="ensemble", ensemble_chunks=0)


@pytest.mark.parametrize("grid_shift", [0.0, 0.004, -0.007])
def test_inpaint_prefix_freezes_the_slots_that_run_before_the_new_chunk_arrives(grid_shift):
    s = ChunkScheduler(P, blend="inpaint")
    s.offer(timed_chunk(1.0, 1), 1.0)
    t_obs_new = 1.0 + 2 * P + grid_shift
    delay = 3.4 * P  # observation age + inference + pickup + exec latency
    prefix, mask = s.inpaint_prefix(t_obs_new, delay)
    new_times = t_obs_new + (1 + np.arange(H)) * P
    stale_at_arrival = np.array([is_stale(t, t_obs_new + delay, P) for t in new_times])
    np.testing.assert_array_equal(mask.astype(bool), stale_at_arrival)
    assert mask.sum() >= 2
    frozen = mask.astype(bool)
    # Frozen values are the old chunk's actions for the same slot (the old actions encode their times).
    assert np.all(np.abs(prefix[frozen, 0] - new_times[frozen]) <= P / 2)
    assert np.all(prefix[~frozen] == 0)


def test_inpaint_prefix_leaves_slots_the_old_chunk_cannot_cover_free():
    s = ChunkScheduler(P, blend="inpaint")
    assert s.inpaint_prefix(0.0, 0.1) is None
    s.offer(timed_chunk(1.0, 1), 1.0)
    # A new chunk stamped before the old chunk's first action: those slots have no old action.
    _, mask = s.inpaint_prefix(1.0 - 3 * P, 6 * P)
    new_times = 1.0 - 3 * P + (1 + np.arange(H)) * P
    old_first = 1.0 + P
    assert not mask[new_times < old_first - P / 2].any()
    assert mask[(new_times >= old_first - P / 2) & (new_times < 1.0 + 2.5 * P)].all()


def test_a_chunk_that_starts_later_waits_while_the_running_one_goes_on():
    s = ChunkScheduler(P)
    assert s.offer(timed_chunk(1.0, 1, first_offset=1), 1.0) is None
    assert s.select(1.0 + P).chunk.seq == 1
    # Two newer chunks arrive whose first actions are one and two periods ahead (first_offset 3).
    assert s.offer(timed_chunk(1.0 + P, 2, first_offset=3), 1.0 + 2 * P) is None
    assert s.offer(timed_chunk(1.0 + 2 * P, 3, first_offset=3), 1.0 + 2 * P) is None
    for k, seq in ((2, 1), (3, 1), (4, 2), (5, 3), (6, 3)):
        sel = s.select(1.0 + k * P)
        assert sel.chunk.seq == seq, k
        assert sel.action[0] == pytest.approx(1.0 + k * P)  # the action meant for this very slot
