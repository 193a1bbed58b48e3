"""The last line before the motors: command limits, rate limit, safe states, e-stop, and the watchdog.

Whatever the policy, the scheduler or a bug produce, every command leaving the core passes SafetyFilter:
finite, inside the card's action limits, and at most `max_step` from the previous command, in the action
kind's units (rad, rad/s, N m, m/s). The watchdog decides when observations are too old to act on; the
controller then switches to the safe state.

What "safe" means depends on the action kind (card action.kind): a held position target keeps the robot
where it is, a held velocity or effort keeps it moving. Position commands hold (or go to the default pose);
velocity, effort and base-velocity commands are never repeated: every tick without a fresh policy action
(a missed step, SAFE, ESTOP, WAITING, the wind-down after deactivate) moves them one `max_step` toward
zero, i.e. they ramp to zero within the rate limit (for a velocity, an acceleration limit) and stay there.
An effort may instead go to a damping torque (`damping`: -damping_gain x the measured joint velocity, at
the same rate limit): a torque-controlled joint is braked rather than let fall limp. The torque is
computed anew every tick from fresh measurements, never held; without them, and when the node stops
commanding (deactivate), it ramps to zero.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from .card_schema import ZERO_SAFE_KINDS

#: hold / default_pose: position actions; zero: velocity, effort and base-velocity actions (ramp to zero);
#: damping: effort actions (ramp to -damping_gain x joint velocity; to zero without a fresh one).
SAFE_MODES = ("hold", "default_pose", "zero", "damping")


def safe_mode_refusal(kind: str, safe_mode: str) -> str | None:
    """Why `safe_mode` cannot guard actions of `kind`, or None when it can."""
    if safe_mode == "damping":
        if kind == "effort":
            return None
        fits = "'zero'" if kind in ZERO_SAFE_KINDS else "'hold' or 'default_pose'"
        return f"'damping' is for effort actions (torque against joint velocity); a {kind} action: {fits}"
    if kind in ZERO_SAFE_KINDS and safe_mode != "zero":
        return (f"{kind} actions are never held (a held {kind} keeps the robot moving): expected 'zero' "
                f"(ramp to zero at the rate limit), got {safe_mode!r}")  # fmt: skip
    if kind not in ZERO_SAFE_KINDS and safe_mode == "zero":
        return (f"'zero' is for velocity, effort and base_velocity actions; a {kind} action holds: 'hold' "
                "or 'default_pose'")  # fmt: skip
    return None


class SafetyFilter:
    """Clamps and rate-limits commands; holds or returns to a default pose in the safe state.

    The invariant it keeps: `last` is None or finite, within [lower, upper], and each new output differs
    from the previous output by at most `max_step` per joint. A rejected action holds the last command
    (position) or takes one step toward zero (velocity, effort, base velocity: `stops`).
    After a model swap narrowed the limits (`reset(last, clamp=False)`), a last command outside them is
    not snapped inside in one tick: commands move toward the limits by `max_step` per tick instead.
    """

    def __init__(
        self,
        lower: np.ndarray,
        upper: np.ndarray,
        max_step: float,
        safe_mode: str = "hold",
        default_pose: np.ndarray | None = None,
        kind: str = "position",
        damping_gain: float = 0.0,
    ) -> None:
        self.lower = np.asarray(lower, dtype=float)
        self.upper = np.asarray(upper, dtype=float)
        if self.lower.shape != self.upper.shape or self.lower.ndim != 1:
            shapes = f"{self.lower.shape}, {self.upper.shape}"
            raise ValueError(f"lower, upper: need equal-length vectors, got {shapes}")
        if not np.all(self.lower <= self.upper):  # also false for any nan
            raise ValueError("lower must be <= upper for every joint")
        if not (math.isfinite(max_step) and max_step > 0):
            raise ValueError(f"max_step must be finite and > 0, got {max_step}")
        if safe_mode not in SAFE_MODES:
            raise ValueError(f"safe_mode must be one of {SAFE_MODES}, got {safe_mode!r}")
        why = safe_mode_refusal(kind, safe_mode)
        if why:
            raise ValueError(f"safe_mode: {why}")
        self.kind = kind
        #: Commands of this kind must not persist: no tick repeats one, they ramp to zero instead.
        self.stops = kind in ZERO_SAFE_KINDS
        if self.stops and not np.all((self.lower <= 0.0) & (self.upper >= 0.0)):
            raise ValueError(f"a {kind} action's limits must include 0 (its safe command)")
        self.max_step = float(max_step)
        self.safe_mode = safe_mode
        self.default_pose: np.ndarray | None = None
        if default_pose is not None:
            pose = np.asarray(default_pose, dtype=float)
            if pose.shape != self.lower.shape or not np.all(np.isfinite(pose)):
                raise ValueError(f"default_pose must be {self.lower.shape[0]} finite values")
            self.default_pose = np.clip(pose, self.lower, self.upper)
        if safe_mode == "default_pose" and self.default_pose is None:
            raise ValueError("safe_mode 'default_pose' needs a default_pose")
        if safe_mode == "damping" and not (math.isfinite(damping_gain) and damping_gain > 0):
            raise ValueError(f"safe_mode 'damping' needs a damping_gain > 0, got {damping_gain}")
        self.damping_gain = float(damping_gain) if safe_mode == "damping" else 0.0
        self.last: np.ndarray | None = None
        self.latched = False

    @property
    def dim(self) -> int:
        return int(self.lower.shape[0])

    def valid(self, action) -> bool:
        """True for a finite vector of the right length (anything else must never reach a motor)."""
        a = np.asarray(action)
        return a.shape == self.lower.shape and bool(np.all(np.isfinite(a)))

    def _limit(self, target: np.ndarray, previous: np.ndarray | None) -> np.ndarray:
        cmd = np.minimum(np.maximum(target, self.lower), self.upper)
        if previous is not None:
            np.minimum(np.maximum(cmd, previous - self.max_step, out=cmd), previous + self.max_step, out=cmd)
            # A previous inside the limits keeps this inside them; clamp again against rounding. One outside
            # (limits narrowed by a swap) is left to converge at max_step rather than jump.
            inside = (previous >= self.lower) & (previous <= self.upper)
            cmd = np.where(inside, np.minimum(np.maximum(cmd, self.lower), self.upper), cmd)
        return cmd

    def apply(self, action) -> tuple[np.ndarray | None, bool]:
        """Filter one action into the next command; (command, accepted).

        A non-finite or misshapen action, or any action while the e-stop is latched, is not accepted and
        the last command is held (None when there never was one).
        """
        if self.latched or action is None or not self.valid(action):
            return self.hold(), False
        self.last = self._limit(np.asarray(action, dtype=float), self.last)
        return self.last.copy(), True

    def hold(self, velocity: np.ndarray | None = None) -> np.ndarray | None:
        """What a tick without a policy action sends: the last command again (position), or one max-step
        toward zero (a velocity or effort is never repeated while nonzero; zero before any command), or
        toward the damping torque of `velocity` (safe_mode damping, a fresh measurement in action order)."""
        if self.stops:
            return self.stop(velocity)
        return None if self.last is None else self.last.copy()

    def stop(self, velocity: np.ndarray | None = None) -> np.ndarray:
        """One max-step toward zero, or toward -damping_gain x `velocity` under safe_mode damping (from zero
        when there was no command): the next command of a wind-down, SAFE, ESTOP or WAITING."""
        target = np.zeros(self.dim)
        if self.damping_gain > 0 and velocity is not None and self.valid(velocity):
            target = -self.damping_gain * np.asarray(velocity, dtype=float)
        self.last = self._limit(target, np.zeros(self.dim) if self.last is None else self.last)
        return self.last.copy()

    def wind_down(self) -> list[np.ndarray]:
        """The commands that bring a velocity or effort to zero at the rate limit, zero last (none for a
        position, which holds); the filter ends at zero. Sent when the node stops commanding (deactivate)."""
        out: list[np.ndarray] = []
        if not self.stops or self.last is None:
            return out
        while np.any(self.last != 0.0):
            out.append(self.stop())
        return out

    def safe_command(self, velocity: np.ndarray | None = None) -> np.ndarray | None:
        """The safe state's command: hold, or one max-step toward the default pose, or toward zero (or the
        damping torque of `velocity`)."""
        if self.stops:
            return self.hold(velocity)
        if self.safe_mode == "hold" or self.last is None or self.latched:
            return self.hold()
        self.last = self._limit(self.default_pose, self.last)
        return self.last.copy()

    def preview(self, actions: np.ndarray, start: np.ndarray) -> np.ndarray:
        """The commands the following actions would become after `start`, without changing state.

        Used for the trajectory output so it agrees with the commands the next ticks will send.
        """
        actions = np.asarray(actions, dtype=float)
        out = np.empty((len(actions), self.dim))
        if len(actions) == 0:
            return out
        finite = np.all(np.isfinite(actions), axis=1)
        targets = np.minimum(np.maximum(actions, self.lower), self.upper)
        previous = np.asarray(start, dtype=float)
        for k in range(len(actions)):
            if finite[k]:
                previous = self._limit(targets[k], previous)
            out[k] = previous
        return out

    def reset(self, anchor: np.ndarray | None = None, clamp: bool = True) -> None:
        """Start over from `anchor` (clamped to the limits unless `clamp` is False: a command already sent,
        which later commands must not jump away from). None: no previous, the next is not rate-limited."""
        if anchor is None or not self.valid(anchor):
            self.last = None
        else:
            anchor = np.asarray(anchor, dtype=float)
            self.last = np.clip(anchor, self.lower, self.upper) if clamp else anchor.copy()

    def estop(self) -> None:
        """Latch: every command holds the last one (ramps to zero, for `stops` kinds) until resume()."""
        self.latched = True

    def resume(self) -> None:
        self.latched = False


class StaleFeature(NamedTuple):
    name: str
    age: float
    timeout: float

    def describe(self) -> str:
        if math.isinf(self.age):
            return f"{self.name} never received"
        return f"{self.name} age {self.age:.3f} s > {self.timeout:.3f} s"


class WatchdogStatus(NamedTuple):
    healthy: bool
    stale: tuple[StaleFeature, ...]
    changed: bool  # healthy flipped on this update
    faults: tuple[str, ...] = ()  # features whose newest input was refused as unsafe, with why

    def reason(self) -> str:
        parts = []
        if self.stale:
            parts.append("stale observation: " + ", ".join(s.describe() for s in self.stale))
        if self.faults:
            parts.append("implausible observation: " + "; ".join(self.faults))
        return "; ".join(parts)


class Watchdog:
    """Per-feature observation timeouts: unhealthy while any required feature is older than its timeout.

    Recovery is automatic once every feature is fresh again; the caller decides what recovery costs (the
    controller resets the history and waits for a fresh chunk).
    """

    def __init__(self, timeouts: Mapping[str, float]) -> None:
        for name, t in timeouts.items():
            if not (math.isfinite(t) and t > 0):
                raise ValueError(f"timeout of {name} must be finite and > 0, got {t}")
        self.timeouts = dict(timeouts)
        self.healthy = True

    def update(self, ages: Mapping[str, float], faults: Mapping[str, str] | None = None) -> WatchdogStatus:
        """Check the ages (seconds; inf = never received) of the watched features; `faults` (feature ->
        why) are features whose newest input said the robot is not safe to drive (see
        core.plausibility): unhealthy as long as they are there."""
        stale = tuple(
            StaleFeature(name, ages.get(name, math.inf), timeout)
            for name, timeout in self.timeouts.items()
            if not ages.get(name, math.inf) <= timeout
        )
        faulted = tuple(faults.values()) if faults else ()
        healthy = not stale and not faulted
        changed = healthy != self.healthy
        self.healthy = healthy
        return WatchdogStatus(healthy, stale, changed, faulted)
