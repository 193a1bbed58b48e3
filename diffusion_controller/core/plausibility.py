"""Observation plausibility: per-feature bounds from the model card, and what to do with values outside.

A finite value can still be impossible: a joint reported 1e308 rad away (it overflows the network's
float32 input), random values up to 1e6, a 100 m/s velocity command ~500 standard deviations outside what
the policy was trained on. The card already knows what is plausible:

- joint positions of the action joints: the action limits widened by `joint_margin` (a measured joint
  sits near its commanded range, or within a margin of it when the robot lies folded before standing;
  far outside it the encoder or the message is wrong);
- the velocity command: the training range, mean +- `command_sigmas` standard deviations of the card's
  normalization (a uniform command range is mean +- 1.73 std);
- every other feature a source fills: mean +- `sensor_sigmas` standard deviations, far beyond anything a
  robot does, so only garbage stops here;
- projected gravity: a unit vector.

What happens outside is the source's policy: `clamp` (use the value clipped into the bounds: right for a
command an operator may overdrive), `reject` (drop the message: a sensor glitch, the watchdog decides if
the stream is gone) or `safe` (drop it and hold the safe state until a plausible message arrives).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

POLICIES = ("clamp", "reject", "safe")
#: How far a projected-gravity component may exceed 1 (it is a unit vector; the quaternion check upstream
#: allows a 10% norm error, which normalization removes).
GRAVITY_TOLERANCE = 1e-6
#: Kinds no source fills (the node computes them), so nothing to check.
UNCHECKED_KINDS = frozenset({"previous_action", "gait_clock"})


@dataclass(frozen=True)
class PlausibilityLimits:
    """How wide the bounds are; see the module docstring."""

    joint_margin: float = 1.0
    command_sigmas: float = 3.0
    sensor_sigmas: float = 50.0

    def __post_init__(self) -> None:
        for name in ("joint_margin", "command_sigmas", "sensor_sigmas"):
            v = getattr(self, name)
            if not (np.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be finite and > 0, got {v}")


@dataclass(frozen=True)
class FeatureBounds:
    lower: np.ndarray
    upper: np.ndarray
    labels: tuple[str, ...]  # one per column: a joint name or feature[i]
    what: str  # where the bounds come from, for the message


class Plausibility:
    """The bounds of every feature of one card; `check` says what is outside, `clamp` clips into them."""

    def __init__(self, card, limits: PlausibilityLimits | None = None) -> None:
        self.limits = limits or PlausibilityLimits()
        self.bounds: dict[str, FeatureBounds] = {}
        lim = self.limits
        action = {j: i for i, j in enumerate(card.action_joints)}
        offset = 0
        for f in card.features:
            sl = slice(offset, offset + f.size)
            offset += f.size
            if f.kind in UNCHECKED_KINDS:
                continue
            mean, std = np.asarray(card.obs_mean[sl], float), np.asarray(card.obs_std[sl], float)
            labels = tuple(f.joints) if f.joints else tuple(f"{f.name}[{i}]" for i in range(f.size))
            if f.kind == "projected_gravity":
                one = np.full(f.size, 1.0 + GRAVITY_TOLERANCE)
                self.bounds[f.name] = FeatureBounds(-one, one, labels, "a unit vector")
                continue
            sigmas = lim.command_sigmas if f.kind == "velocity_command" else lim.sensor_sigmas
            lower, upper = mean - sigmas * std, mean + sigmas * std
            what = (
                f"the training range (mean +- {sigmas:g} std)"
                if f.kind == "velocity_command"
                else (f"mean +- {sigmas:g} std of the training data")
            )
            if f.kind == "joint_position" and f.joints:
                for i, joint in enumerate(f.joints):
                    k = action.get(joint)
                    if k is not None:
                        lower[i] = card.action_lower[k] - lim.joint_margin
                        upper[i] = card.action_upper[k] + lim.joint_margin
                if any(j in action for j in f.joints):
                    what = f"the action limits +- {lim.joint_margin:g}"
            self.bounds[f.name] = FeatureBounds(lower, upper, labels, what)

    def check(self, feature: str, value: np.ndarray) -> str:
        """'' when every value of `feature` is inside its bounds, else what is outside (up to 3 columns)."""
        b = self.bounds.get(feature)
        if b is None:
            return ""
        v = np.asarray(value, dtype=float)
        out = np.flatnonzero(~((v >= b.lower) & (v <= b.upper)))
        if out.size == 0:
            return ""
        parts = [f"{b.labels[i]} = {v[i]:.4g} outside [{b.lower[i]:.4g}, {b.upper[i]:.4g}]" for i in out[:3]]
        more = f" and {out.size - 3} more" if out.size > 3 else ""
        return f"{feature}: {', '.join(parts)}{more} ({b.what})"

    def clamp(self, feature: str, value: np.ndarray) -> np.ndarray:
        """`value` clipped into the bounds of `feature` (unchanged for unchecked features)."""
        b = self.bounds.get(feature)
        v = np.asarray(value, dtype=float)
        return v if b is None else np.clip(v, b.lower, b.upper)


#: Two publishers of one feature disagree when their newest samples, at most CONTRADICTION_WINDOW_S
#: apart, differ by more than CONTRADICTION_STDS standard deviations of the training data in some column.
CONTRADICTION_STDS, CONTRADICTION_WINDOW_S = 1.0, 0.1


class PublisherAgreement:
    """Whether the publishers of one source agree: a second node publishing joint states that contradict
    the first makes the controller flip between two robots. Samples are keyed by publisher (its DDS GID)."""

    def __init__(self, card) -> None:
        self._scale: dict[str, np.ndarray] = {}
        offset = 0
        for f in card.features:
            self._scale[f.name] = CONTRADICTION_STDS * np.asarray(
                card.obs_std[offset : offset + f.size], float
            )
            offset += f.size
        self._newest: dict[bytes, tuple[float, dict[str, np.ndarray]]] = {}

    def update(self, publisher: bytes, stamp: float, values: dict[str, np.ndarray]) -> str:
        """Record `publisher`'s sample; '' or how it contradicts another publisher's newest sample."""
        self._newest[publisher] = (stamp, values)
        for other, (t, theirs) in list(self._newest.items()):
            if other == publisher:
                continue
            if abs(t - stamp) > CONTRADICTION_WINDOW_S:
                if t < stamp - 10 * CONTRADICTION_WINDOW_S:
                    del self._newest[other]  # gone quiet: forget it
                continue
            for name, v in values.items():
                w, scale = theirs.get(name), self._scale.get(name)
                if w is None or scale is None or w.shape != v.shape:
                    continue
                diff = np.abs(np.asarray(v, float) - np.asarray(w, float))
                i = int(np.argmax(diff - scale))
                if diff[i] > scale[i]:
                    return (
                        f"{name}[{i}] is {v[i]:.4g} from one publisher and {w[i]:.4g} from another "
                        f"(|difference| {diff[i]:.3g} > {scale[i]:.3g})"
                    )
        return ""
