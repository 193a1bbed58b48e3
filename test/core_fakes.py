"""Small stand-ins for the model card, the policy and the inference worker, for the control core tests.

The clock policy makes time visible: every observation row carries its sample time in the `clock` feature,
and action j of a chunk is the time it is scheduled for, t_obs + (first_offset + j) * period. A command's
value then says which action time it came from, so the tests check scheduling without knowing any numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from diffusion_controller.core.card_schema import Feature as FakeFeature  # a feature is plain data
from diffusion_controller.core.inference import InferenceRequest, InferenceResult, compute


@dataclass(frozen=True)
class FakeCard:
    features: tuple[FakeFeature, ...]
    action_joints: tuple[str, ...] = ("j1", "j2")
    action_lower: np.ndarray = field(default_factory=lambda: np.array([-1000.0, -1000.0]))
    action_upper: np.ndarray = field(default_factory=lambda: np.array([1000.0, 1000.0]))
    history: int = 4
    horizon: int = 8
    first_offset: int = 1
    control_period_s: float = 0.02
    name: str = "fake"
    action_kind: str = "position"

    @property
    def obs_dim(self) -> int:
        return sum(f.size for f in self.features)

    @property
    def action_dim(self) -> int:
        return len(self.action_joints)

    def feature_slice(self, name: str) -> slice:
        start = 0
        for f in self.features:
            if f.name == name:
                return slice(start, start + f.size)
            start += f.size
        raise KeyError(name)


def clock_card(**changes) -> FakeCard:
    """Observation row: [clock, joint positions (j2, j1, j3), velocity command, previous action]."""
    features = (
        FakeFeature("clock", "generic", 1),
        FakeFeature("joint_position", "joint_position", 3, ("j2", "j1", "j3")),
        FakeFeature("velocity_command", "velocity_command", 3),
        FakeFeature("previous_action", "previous_action", 2),
    )
    return FakeCard(features=features, **changes)


class ClockPolicy:
    """Action j (every joint) = the time it is scheduled for, read from the newest row's clock feature.

    `offset` is added to every action; `error`/`nan` make predict raise or return non-finite values.
    Every call is recorded in `calls` (obs_history, prefix, prefix_mask, seed).
    """

    provider = "fake"

    def __init__(self, card: FakeCard, offset: float = 0.0, supports_inpainting: bool = True) -> None:
        self.card = card
        self.offset = offset
        self.supports_inpainting = supports_inpainting
        self.calls: list[dict] = []
        self.error: Exception | None = None
        self.nan = False

    def predict(self, obs_history, *, noise=None, seed=None, prefix=None, prefix_mask=None):
        obs_history = np.asarray(obs_history)
        assert obs_history.shape == (self.card.history, self.card.obs_dim)
        self.calls.append({"obs": obs_history.copy(), "prefix": prefix, "mask": prefix_mask, "seed": seed})
        if self.error is not None:
            raise self.error
        t_obs = obs_history[-1, self.card.feature_slice("clock")][0]
        period, offset = self.card.control_period_s, self.card.first_offset
        times = t_obs + (offset + np.arange(self.card.horizon)) * period
        actions = np.repeat(times[:, None], self.card.action_dim, axis=1) + self.offset
        if self.nan:
            actions[2, 0] = np.nan
        return actions


class FakeClock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class SimWorker:
    """The InferenceWorker interface on a simulated clock: a result is ready `latency(seq)` seconds after
    its submission (computed at submission with the policy set at that moment, like a predict in flight).
    """

    def __init__(self, clock: FakeClock, latency=lambda seq: 0.005) -> None:
        self.clock = clock
        self.latency = latency
        self.policy = None
        self.submitted: list[InferenceRequest] = []
        self._in_flight: tuple[float, InferenceResult] | None = None

    @property
    def busy(self) -> bool:
        return self._in_flight is not None and self.clock() < self._in_flight[0]

    def submit(self, request: InferenceRequest) -> bool:
        assert not self.busy, "the core submitted while the worker was busy"
        self.submitted.append(request)
        self._in_flight = (self.clock() + self.latency(request.seq), compute(self.policy, request))
        return False

    def poll(self) -> InferenceResult | None:
        if self._in_flight is not None and self.clock() >= self._in_flight[0]:
            result, self._in_flight = self._in_flight[1], None
            return result
        return None

    def set_policy(self, policy) -> None:
        self.policy = policy

    def cancel_pending(self) -> None:
        pass  # nothing waits un-started; a result in flight still arrives, as with the thread

    def uses(self, policy) -> bool:
        return self._in_flight is not None and self._in_flight[1].policy is policy

    def stop(self, timeout: float = 5.0) -> bool:
        return True
