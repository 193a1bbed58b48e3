"""Runs the policy in its own thread so a slow denoising pass never delays a control tick.

The tick only hands over references: one request slot and one result slot, each "latest wins", guarded by
one lock held for a few instructions (never during predict). ONNX Runtime releases the GIL while it runs,
so the control loop keeps its timing while the worker computes.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class InferenceRequest:
    """One policy call: the history it conditions on, the times it belongs to, the optional inpainting."""

    seq: int
    t_obs: float
    t_request: float
    obs_history: np.ndarray
    prefix: np.ndarray | None = None
    prefix_mask: np.ndarray | None = None
    seed: int | None = None


@dataclass(frozen=True)
class InferenceResult:
    """The outcome of a request: actions, or the error that stopped them (never both).

    `policy` is the object that computed it, so a caller that swapped policies meanwhile can tell whether
    the result still fits its layout.
    """

    request: InferenceRequest
    actions: np.ndarray | None
    error: str | None
    policy: Any
    compute_s: float


class WorkerLike(Protocol):
    """What ControlCore needs from a worker (tests substitute a simulated-time one)."""

    @property
    def busy(self) -> bool: ...
    def submit(self, request: InferenceRequest) -> bool: ...
    def poll(self) -> InferenceResult | None: ...
    def set_policy(self, policy: Any) -> None: ...
    def cancel_pending(self) -> None: ...
    def uses(self, policy: Any) -> bool: ...
    def stop(self, timeout: float = 5.0) -> bool: ...


def check_actions(actions: Any, card: Any) -> tuple[np.ndarray | None, str | None]:
    """(actions as float64, None) when they have the card's shape and are finite, else (None, why)."""
    try:
        a = np.asarray(actions, dtype=float)
    except (TypeError, ValueError) as e:
        return None, f"actions not numeric: {e}"
    expected = (int(card.horizon), len(card.action_joints))
    if a.shape != expected:
        return None, f"actions shape {a.shape}, expected {expected}"
    if not np.all(np.isfinite(a)):
        return None, "non-finite actions"
    return a, None


class InferenceWorker:
    """A daemon thread that runs `policy.predict` for the latest submitted request.

    submit() replaces a request that has not started yet; poll() takes the newest finished result. Model
    exceptions and bad chunks come back as results with `error` set, never as actions.
    """

    def __init__(self, policy: Any = None, *, name: str = "diffusion_inference", start: bool = True) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._policy = policy
        self._pending: InferenceRequest | None = None
        self._result: InferenceResult | None = None
        self._running: Any = None  # the policy of the predict in flight
        self._in_flight = False
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        if start:
            self._thread.start()

    def start(self) -> None:
        if not self._thread.is_alive():
            self._thread.start()

    @property
    def busy(self) -> bool:
        """A request is waiting or being computed."""
        with self._cond:
            return self._pending is not None or self._in_flight

    def submit(self, request: InferenceRequest) -> bool:
        """Queue `request` (non-blocking); True when it replaced a request that had not started."""
        with self._cond:
            replaced = self._pending is not None
            self._pending = request
            self._cond.notify()
        return replaced

    def poll(self) -> InferenceResult | None:
        """The newest finished result, once (non-blocking)."""
        with self._cond:
            result, self._result = self._result, None
        return result

    def set_policy(self, policy: Any) -> None:
        """Use `policy` from the next request on; a predict already running finishes with the old one."""
        with self._cond:
            self._policy = policy

    def cancel_pending(self) -> None:
        """Forget a request that has not started and a result not yet taken."""
        with self._cond:
            self._pending = None
            self._result = None

    def uses(self, policy: Any) -> bool:
        """A predict with `policy` is in flight, or its result waits to be taken."""
        with self._cond:
            running = self._in_flight and self._running is policy
            return running or (self._result is not None and self._result.policy is policy)

    def stop(self, timeout: float = 5.0) -> bool:
        """Ask the thread to end after its current predict; True when it has ended within `timeout`."""
        with self._cond:
            self._stopping = True
            self._pending = None
            self._cond.notify_all()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while self._run_one():
            pass

    def _run_one(self) -> bool:
        """Wait for a request and compute it; False once stopping. A call of its own, so that no local of
        the thread keeps a replaced policy alive between requests (see uses())."""
        with self._cond:
            while self._pending is None and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return False
            request, self._pending = self._pending, None
            self._running = self._policy
            self._in_flight = True
        result = compute(self._running, request)
        with self._cond:
            self._in_flight = False
            self._running = None
            if not self._stopping:
                self._result = result
        return True


def compute(policy: Any, request: InferenceRequest) -> InferenceResult:
    """Run one request on `policy`, turning every failure into an error result."""
    t0 = time.perf_counter()
    if policy is None:
        return InferenceResult(request, None, "no policy loaded", policy, 0.0)
    kwargs: dict[str, Any] = {"seed": request.seed}
    if request.prefix is not None:
        kwargs["prefix"] = request.prefix
        kwargs["prefix_mask"] = request.prefix_mask
    try:
        raw = policy.predict(request.obs_history, **kwargs)
        actions, error = check_actions(raw, policy.card)
    except Exception as e:  # a model failure must never take the control loop down
        actions, error = None, f"{type(e).__name__}: {e}"
    return InferenceResult(request, actions, error, policy, time.perf_counter() - t0)


def compute_batch(policy: Any, requests: list[InferenceRequest]) -> list[InferenceResult]:
    """Run several requests (no inpainting prefix) in one `policy.predict_batch` call: one session run of
    a batch graph. A failed run is every request's error; a bad chunk only its own."""
    t0 = time.perf_counter()
    if policy is None:
        return [InferenceResult(r, None, "no policy loaded", policy, 0.0) for r in requests]
    try:
        if any(r.prefix is not None for r in requests):
            raise ValueError("compute_batch: requests with an inpainting prefix run one at a time (compute)")
        histories = np.stack([r.obs_history for r in requests])
        raw = policy.predict_batch(histories, seeds=[r.seed for r in requests])
        if len(raw) != len(requests):
            raise ValueError(f"predict_batch returned {len(raw)} chunks for {len(requests)} requests")
        checked = [check_actions(a, policy.card) for a in raw]
    except Exception as e:  # a model failure must never take the caller down
        checked = [(None, f"{type(e).__name__}: {e}")] * len(requests)
    dt = time.perf_counter() - t0
    return [InferenceResult(r, a, err, policy, dt) for r, (a, err) in zip(requests, checked, strict=True)]
