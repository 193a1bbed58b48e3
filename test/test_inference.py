"""InferenceWorker with a real thread: latest-wins handoff, error reporting, policy swap, stop, and a
control tick that never waits for a slow predict."""

from __future__ import annotations

import threading
import time
import weakref

import numpy as np
import pytest
from core_fakes import ClockPolicy, clock_card

from diffusion_controller.core.control_config import ControlConfig
from diffusion_controller.core.control_state import ControlState
from diffusion_controller.core.controller import ControlCore
from diffusion_controller.core.inference import InferenceRequest, InferenceWorker

CARD = clock_card()


def request(seq: int, t: float = 1.0) -> InferenceRequest:
    obs = np.zeros((CARD.history, CARD.obs_dim))
    obs[:, CARD.feature_slice("clock")] = t
    return InferenceRequest(seq, t, t, obs, seed=seq)


class GatedPolicy(ClockPolicy):
    """Blocks in predict until released, so a test controls what is in flight."""

    def __init__(self, card, **kw) -> None:
        super().__init__(card, **kw)
        self.started = threading.Semaphore(0)
        self.release = threading.Semaphore(0)

    def predict(self, obs_history, **kw):
        self.started.release()
        assert self.release.acquire(timeout=5)
        return super().predict(obs_history, **kw)


def wait_result(worker: InferenceWorker, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = worker.poll()
        if r is not None:
            return r
        time.sleep(0.001)
    raise AssertionError("no result")


@pytest.fixture
def worker():
    w = InferenceWorker()
    yield w
    assert w.stop(timeout=5)


def test_a_request_comes_back_as_actions(worker):
    worker.set_policy(ClockPolicy(CARD))
    worker.submit(request(0, t=2.0))
    r = wait_result(worker)
    assert r.error is None and r.request.seq == 0
    assert r.actions.shape == (CARD.horizon, CARD.action_dim)
    assert r.actions[0, 0] == pytest.approx(2.0 + CARD.first_offset * CARD.control_period_s)
    assert not worker.busy


def test_latest_request_wins_while_one_is_in_flight(worker):
    policy = GatedPolicy(CARD)
    worker.set_policy(policy)
    worker.submit(request(0))
    assert policy.started.acquire(timeout=5)
    assert worker.busy
    assert worker.submit(request(1)) is False
    assert worker.submit(request(2)) is True  # replaced 1 before it started
    policy.release.release()
    assert wait_result(worker).request.seq == 0
    assert policy.started.acquire(timeout=5)
    policy.release.release()
    assert wait_result(worker).request.seq == 2
    assert [c["seed"] for c in policy.calls] == [0, 2]


def test_model_exceptions_and_bad_chunks_come_back_as_errors(worker):
    policy = ClockPolicy(CARD)
    worker.set_policy(policy)
    policy.error = ValueError("bad tensor name")
    worker.submit(request(0))
    r = wait_result(worker)
    assert r.actions is None and r.error == "ValueError: bad tensor name"
    policy.error, policy.nan = None, True
    worker.submit(request(1))
    r = wait_result(worker)
    assert r.actions is None and "non-finite" in r.error
    policy.nan = False
    worker.submit(request(2))
    assert wait_result(worker).error is None, "the thread survives model failures"


def test_no_policy_is_an_error_result(worker):
    worker.submit(request(0))
    r = wait_result(worker)
    assert r.actions is None and "no policy" in r.error


def test_set_policy_applies_from_the_next_request_and_the_in_flight_one_finishes(worker):
    old, new = GatedPolicy(CARD), ClockPolicy(CARD, offset=1.0)
    worker.set_policy(old)
    worker.submit(request(0))
    assert old.started.acquire(timeout=5)
    worker.set_policy(new)
    old.release.release()
    r = wait_result(worker)
    assert r.policy is old and r.error is None
    worker.submit(request(1))
    r = wait_result(worker)
    assert r.policy is new and r.actions[0, 0] - r.request.t_obs == pytest.approx(1.0 + 0.02)


def test_cancel_pending_drops_waiting_requests_and_results(worker):
    policy = GatedPolicy(CARD)
    worker.set_policy(policy)
    worker.submit(request(0))
    assert policy.started.acquire(timeout=5)
    worker.submit(request(1))
    worker.cancel_pending()
    policy.release.release()
    deadline = time.monotonic() + 5
    while worker.busy and time.monotonic() < deadline:
        time.sleep(0.001)
    worker.cancel_pending()
    assert worker.poll() is None
    assert len(policy.calls) == 1


def test_stop_waits_for_the_predict_in_flight():
    policy = GatedPolicy(CARD)
    w = InferenceWorker(policy)
    w.submit(request(0))
    assert policy.started.acquire(timeout=5)
    assert w.stop(timeout=0.05) is False  # still inside predict
    policy.release.release()
    assert w.stop(timeout=5) is True
    assert w.poll() is None, "a result finished after stop() is not delivered"


def test_a_replaced_policy_is_in_use_until_its_result_is_taken_then_nothing_holds_it():
    """uses() is how the node knows when to free a model a swap replaced: while a predict with it runs or
    its result waits, and after that no reference of the worker keeps it alive."""
    old, new = GatedPolicy(CARD), ClockPolicy(CARD)
    w = InferenceWorker(old)
    try:
        w.submit(request(0))
        assert old.started.acquire(timeout=5)
        w.set_policy(new)
        assert w.uses(old) and not w.uses(new)  # the predict in flight
        old.release.release()
        deadline = time.monotonic() + 5
        while w.busy and time.monotonic() < deadline:
            time.sleep(0.001)
        assert w.uses(old)  # its result, not yet taken
        assert wait_result(w).policy is old
        assert not w.uses(old)
        ref = weakref.ref(old)
        del old  # by reference count, at once: the node frees a model right after a tick this way
        assert ref() is None, "something in the worker still holds the replaced policy"
    finally:
        assert w.stop(timeout=5)


def test_control_ticks_never_wait_for_a_slow_predict():
    class SlowPolicy(ClockPolicy):
        def predict(self, obs_history, **kw):
            time.sleep(0.15)
            return super().predict(obs_history, **kw)

    policy = SlowPolicy(CARD)
    config = ControlConfig(max_step_per_tick=1000.0, max_consecutive_misses=1000)
    with ControlCore(CARD, config, policy) as core:
        period = CARD.control_period_s
        t0 = time.monotonic()
        worst, states = 0.0, []
        for k in range(40):
            now = k * period
            core.observe("clock", now, [now], now=now)
            core.observe("joint_position", now, [0.0, 0.0, 0.0], now=now)
            start = time.perf_counter()
            states.append(core.tick(now).state)
            worst = max(worst, time.perf_counter() - start)
            time.sleep(max(0.0, t0 + (k + 1) * period - time.monotonic()))
        assert worst < 0.03, f"a tick took {worst * 1e3:.1f} ms"
        assert ControlState.RUNNING in states


def test_control_core_runs_a_real_exported_policy(tmp_path):
    """The real card, runtime Policy and worker thread, on a simulated clock (waiting for each result)."""
    from tiny_models import make_tiny_model

    from diffusion_controller.core.runtime import Policy

    policy = Policy.load(make_tiny_model(tmp_path, graph="fused"), provider="cpu", log=lambda s: None)
    card = policy.card
    config = ControlConfig(blend="inpaint", execute_steps=2, max_step_per_tick=0.05)
    joints = (card.action_lower + card.action_upper) / 2
    with ControlCore(card, config, policy) as core:
        period, previous, running = card.control_period_s, None, 0
        for k in range(60):
            now = k * period
            for f in card.features:
                if f.kind == "previous_action":
                    continue
                value = joints if f.kind == "joint_position" else np.zeros(f.size)
                if f.kind == "projected_gravity":
                    value = np.array([0.0, 0.0, -1.0])
                assert core.observe(f.name, now, value, now=now) is None
            r = core.tick(now)
            deadline = time.monotonic() + 5
            while core._worker.busy and time.monotonic() < deadline:  # deterministic: one chunk per tick
                time.sleep(0.001)
            if r.command is not None:
                assert np.all(r.command >= card.action_lower) and np.all(r.command <= card.action_upper)
                if previous is not None:
                    assert np.all(np.abs(r.command - previous) <= 0.05 + 1e-12)
                previous = r.command
            running += r.state is ControlState.RUNNING and not r.missed
        stats = core.stats()
    assert running >= 50, stats
    assert stats.inference_errors == 0 and stats.missed_steps == 0, stats
    assert stats.inference_p50_s >= period
    # the model's own compute time is reported apart from the tick-quantized delay, and is below it
    assert 0.0 < stats.compute_p50_s <= stats.inference_p50_s
    assert stats.compute_p50_s <= stats.compute_p99_s
