"""Time-stamped observation buffers, sampled on the control grid the policy was trained on.

Sensors arrive at their own rates and delays; the policy was trained on rows sampled every control period.
Each feature keeps its recent samples with their stamps, and a request samples every feature by
zero-order hold at t_obs - (history-1-k) * period (DESIGN.md, Times), so the row the policy sees is what
the robot knew at that instant, not whatever arrived last.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from diffusion_controller.core.features import gait_clock

PREVIOUS_ACTION = "previous_action"
GAIT_CLOCK = "gait_clock"
VELOCITY_COMMAND = "velocity_command"
JOINT_POSITION = "joint_position"
JOINT_VELOCITY = "joint_velocity"
#: Kinds the core computes itself, and how (what `push` answers a source that tries to fill one): no source
#: fills them and no buffer holds them.
COMPUTED_FROM: Mapping[str, str] = {
    PREVIOUS_ACTION: "recorded from the controller's own commands",
    GAIT_CLOCK: "computed from the observation time",
}
COMPUTED_KINDS = frozenset(COMPUTED_FROM)
#: Kinds that never make the controller wait or go unhealthy: the computed ones, and a velocity command is
#: an operator input (zeros until the first one), not a sensor.
NOT_REQUIRED_KINDS = COMPUTED_KINDS | {VELOCITY_COMMAND}


class ObservationError(ValueError):
    """An observation that was not stored; `reason` is a short sentence naming the feature and the fault."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def action_joint_map(card, kind: str = JOINT_POSITION) -> tuple[str, np.ndarray] | None:
    """(feature name, indices) reading the action joints out of the first feature of `kind` (joint
    positions or velocities) that has them all, if any."""
    action_joints = tuple(card.action_joints)
    for f in card.features:
        if f.kind != kind:
            continue
        joints = tuple(f.joints) if f.joints else None
        if joints is None and int(f.size) == len(action_joints):
            return f.name, np.arange(len(action_joints))
        if joints is not None and set(action_joints) <= set(joints):
            return f.name, np.array([joints.index(j) for j in action_joints])
    return None


class _StampedBuffer:
    """Bounded, chronologically ordered samples of one feature.

    Samples closer than `min_spacing` to the one before the newest overwrite the newest, so a sensor
    flooding at any rate keeps a bounded number of samples spanning enough time, and the newest sample is
    always the latest one received. Zero-order hold reads at most `min_spacing` too early because of it.
    Storage is a doubled array compacted when full: contiguous for searchsorted, amortized O(1) appends.
    """

    def __init__(self, size: int, capacity: int, min_spacing: float) -> None:
        self._capacity = capacity
        self._min_spacing = min_spacing
        self._stamps = np.empty(2 * capacity)
        self._values = np.empty((2 * capacity, size))
        self._start = 0
        self._end = 0

    def __len__(self) -> int:
        return self._end - self._start

    @property
    def newest_stamp(self) -> float | None:
        return float(self._stamps[self._end - 1]) if self._end > self._start else None

    def newest_value(self) -> np.ndarray | None:
        return self._values[self._end - 1].copy() if self._end > self._start else None

    def push(self, stamp: float, value: np.ndarray) -> None:
        n = self._end - self._start
        if n >= 1 and stamp == self._stamps[self._end - 1]:
            overwrite = True
        else:
            overwrite = n >= 2 and stamp - self._stamps[self._end - 2] < self._min_spacing
        if not overwrite:
            if self._end == len(self._stamps):
                keep = min(n, self._capacity - 1)
                self._stamps[:keep] = self._stamps[self._end - keep : self._end]
                self._values[:keep] = self._values[self._end - keep : self._end]
                self._start, self._end = 0, keep
            self._end += 1
            if self._end - self._start > self._capacity:
                self._start += 1
        self._stamps[self._end - 1] = stamp
        self._values[self._end - 1] = value

    def hold(self, times: np.ndarray, strict: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Zero-order-hold values at `times` and the stamps of the samples used (buffer must not be empty).

        strict: use the last sample strictly before each time (at-or-before otherwise). Times before the
        oldest sample get the oldest one, as after a history reset.
        """
        stamps = self._stamps[self._start : self._end]
        idx = np.maximum(np.searchsorted(stamps, times, side="left" if strict else "right") - 1, 0)
        return self._values[self._start + idx], stamps[idx]

    def keep_newest(self) -> None:
        if self._end > self._start:
            self._start = self._end - 1

    def clear(self) -> None:
        self._start = self._end = 0


class ObservationHistory:
    """Per-feature stamped buffers of one model card's observation layout.

    `push` validates and stores sensor samples, `record_command` stores the controller's own published
    commands (the previous_action feature), `sample(t_obs)` builds the (history, obs_dim) input; a
    gait_clock feature is computed from each row's time.
    """

    def __init__(
        self,
        card,
        *,
        future_tolerance_s: float = 0.05,
        expire_s: Mapping[str, float] | None = None,
        min_spacing_s: float | None = None,
    ) -> None:
        self.period = float(card.control_period_s)
        self.history = int(card.history)
        self.action_dim = len(card.action_joints)
        self.future_tolerance_s = float(future_tolerance_s)
        self._expire = dict(expire_s or {})
        spacing = self.period / 10.0 if min_spacing_s is None else float(min_spacing_s)
        #: Samples of one feature closer than this are coalesced (see _StampedBuffer): nothing finer is kept.
        self.spacing = spacing
        # Enough samples to reach back 2*history + 8 periods even at the densest coalesced spacing (two
        # samples per spacing), so a slow feature lagging t_obs still finds its grid points.
        capacity = 2 * math.ceil((2 * self.history + 8) * self.period / spacing) + 4
        self._features = tuple(card.features)
        self._slices: dict[str, slice] = {}
        offset = 0
        for f in self._features:
            self._slices[f.name] = slice(offset, offset + int(f.size))
            offset += int(f.size)
        self.obs_dim = offset
        self._kinds = {f.name: f.kind for f in self._features}
        self._sizes = {f.name: int(f.size) for f in self._features}
        self.required = tuple(f.name for f in self._features if f.kind not in NOT_REQUIRED_KINDS)
        self._buffers = {
            f.name: _StampedBuffer(int(f.size), capacity, spacing)
            for f in self._features
            if f.kind not in COMPUTED_KINDS
        }
        self._commands = _StampedBuffer(self.action_dim, capacity, spacing)
        self._joint_map = action_joint_map(card)
        self._velocity_map = action_joint_map(card, JOINT_VELOCITY)
        self._grid_offsets = -(self.history - 1 - np.arange(self.history)) * self.period

    # -- input -------------------------------------------------------------------------------------------

    def push(self, feature: str, stamp: float, value, now: float | None = None) -> None:
        """Store one sample; raises ObservationError (state unchanged) when it cannot be trusted."""
        buffer = self._buffers.get(feature)
        if buffer is None:
            computed = COMPUTED_FROM.get(self._kinds.get(feature, ""))
            if computed is not None:
                raise ObservationError(f"{feature}: {computed}")
            raise ObservationError(f"{feature}: not a feature of this model ({', '.join(self._kinds)})")
        stamp = float(stamp)
        if not math.isfinite(stamp):
            raise ObservationError(f"{feature}: stamp {stamp} is not finite")
        try:
            v = np.asarray(value, dtype=float).reshape(-1)
        except (TypeError, ValueError) as e:
            raise ObservationError(f"{feature}: value is not numeric ({e})") from None
        if v.shape[0] != self._sizes[feature]:
            raise ObservationError(f"{feature}: expected {self._sizes[feature]} values, got {v.shape[0]}")
        if not np.all(np.isfinite(v)):
            raise ObservationError(f"{feature}: non-finite value")
        newest = buffer.newest_stamp
        if newest is not None and stamp < newest:
            raise ObservationError(f"{feature}: stamp went backwards by {newest - stamp:.6f} s")
        if now is not None and stamp > now + self.future_tolerance_s:
            raise ObservationError(f"{feature}: stamp {stamp - now:.6f} s in the future")
        buffer.push(stamp, v)

    def record_command(self, stamp: float, command: np.ndarray) -> None:
        """Remember a published command: previous_action at t is the last one published strictly before t."""
        newest = self._commands.newest_stamp
        if newest is not None and stamp < newest:
            return  # the clock went back: the controller resets us; never corrupt the order meanwhile
        self._commands.push(float(stamp), np.asarray(command, dtype=float))

    # -- queries -----------------------------------------------------------------------------------------

    def newest_common_stamp(self) -> float | None:
        """t_obs: the oldest of the newest stamps of the required features; None until all were seen."""
        t = math.inf
        for name in self.required:
            s = self._buffers[name].newest_stamp
            if s is None:
                return None
            t = min(t, s)
        return t if self.required else None

    def age(self, feature: str, now: float) -> float:
        """Seconds since the newest sample of `feature` was stamped (inf when none)."""
        s = self._buffers[feature].newest_stamp
        return math.inf if s is None else now - s

    def ages(self, now: float) -> dict[str, float]:
        """Age of every required feature (the watchdog's input)."""
        return {name: self.age(name, now) for name in self.required}

    def missing(self) -> tuple[str, ...]:
        """Required features never received since the last reset."""
        return tuple(n for n in self.required if self._buffers[n].newest_stamp is None)

    def measured_action(self) -> np.ndarray | None:
        """Newest measured joint positions in action-joint order (None without a joint_position feature)."""
        if self._joint_map is None:
            return None
        name, idx = self._joint_map
        v = self._buffers[name].newest_value()
        return None if v is None else v[idx]

    def measured_velocity(self) -> tuple[np.ndarray, str, float] | None:
        """Newest measured joint velocities in action-joint order, with their feature and stamp (None
        without such a feature or before its first sample)."""
        if self._velocity_map is None:
            return None
        name, idx = self._velocity_map
        buffer = self._buffers[name]
        v = buffer.newest_value()
        return None if v is None else (v[idx], name, float(buffer.newest_stamp))

    def grid(self, t_obs: float) -> np.ndarray:
        """The sample times of the rows, oldest first: t_obs - (history-1-k) * period."""
        return t_obs + self._grid_offsets

    def sample(self, t_obs: float) -> np.ndarray:
        """The (history, obs_dim) observation history for a chunk conditioned on `t_obs`.

        Zero-order hold per feature on the control grid; a grid time older than a buffer repeats its oldest
        sample (DiffuseLoco's reset to the newest observation). Features never received read as zeros
        (velocity_command before the first command).
        """
        times = self.grid(t_obs)
        out = np.zeros((self.history, self.obs_dim))
        for f in self._features:
            sl = self._slices[f.name]
            if f.kind == PREVIOUS_ACTION:
                out[:, sl] = self._previous_actions(times)
                continue
            if f.kind == GAIT_CLOCK:
                out[:, sl] = gait_clock(times, f.frequency_hz)
                continue
            buffer = self._buffers[f.name]
            if len(buffer) == 0:
                continue
            values, stamps = buffer.hold(times)
            out[:, sl] = values
            expire = self._expire.get(f.name)
            if expire is not None:
                out[times - stamps > expire, sl] = 0.0
        return out

    def _previous_actions(self, times: np.ndarray) -> np.ndarray:
        """Last command strictly before each time; before any command, the measured joint positions."""
        if len(self._commands) > 0:
            values, _ = self._commands.hold(times, strict=True)
            return values
        if self._joint_map is not None:
            name, idx = self._joint_map
            buffer = self._buffers[name]
            if len(buffer) > 0:
                values, _ = buffer.hold(times)
                return values[:, idx]
        return np.zeros((len(times), self.action_dim))

    # -- resets ------------------------------------------------------------------------------------------

    def reset(self, keep_newest: bool = False) -> None:
        """Forget the history (skill switch, recovery, clock jump).

        keep_newest: each feature keeps only its newest sample, so the next history repeats the newest
        observation in every row (DiffuseLoco) and the watchdog still sees the features as fresh.
        """
        for buffer in (*self._buffers.values(), self._commands):
            if keep_newest:
                buffer.keep_newest()
            else:
                buffer.clear()
