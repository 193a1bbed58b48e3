"""Observation inputs: what a source is, how its messages (or bag records) become feature values, and
every check on the way in.

ROS-free: a message is read by its field names only (`msg.name`, `msg.position`, `msg.orientation.x`,
...), so the node's deserialized messages and the bag reader's rosbags records go through the same code;
the source's declared `type` string says which fields to read. A `SourceReader` turns one message into
`(stamp, {feature: values})` or raises `InputError` with a short `cause` the node uses to rate-limit its
log (one line per cause, not a flood). Everything that derives a feature from sensor values goes through
`core.features`, the same code the dataset generator uses, so deployment preprocesses exactly like
training; the plausible bounds come from the card (`core.plausibility`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from diffusion_controller.core import features as fx
from diffusion_controller.core.card_schema import Layout
from diffusion_controller.core.plausibility import Plausibility, PublisherAgreement

# Message types a source may have (ros/conversions.py maps each to its ROS message class).
JOINT_STATE = "sensor_msgs/msg/JointState"
IMU = "sensor_msgs/msg/Imu"
ODOMETRY = "nav_msgs/msg/Odometry"
TWIST = "geometry_msgs/msg/Twist"
TWIST_STAMPED = "geometry_msgs/msg/TwistStamped"
FLOAT64_ARRAY = "std_msgs/msg/Float64MultiArray"
MESSAGE_TYPES = (JOINT_STATE, IMU, ODOMETRY, TWIST, TWIST_STAMPED, FLOAT64_ARRAY)
HAS_HEADER = frozenset({JOINT_STATE, IMU, ODOMETRY, TWIST_STAMPED})


@dataclass(frozen=True)
class SourceConfig:
    """One observation source as the parameters `observations.<name>.*` describe it (the parameter
    specification in ros/config.py takes its defaults from these fields)."""

    name: str
    topic: str
    type: str
    features: tuple[str, ...]
    timeout_s: float = 0.1
    stamp: str = "header"
    frame: str = ""
    implausible: str = "auto"


def implausible_policy(src: SourceConfig, card: Any) -> str:
    """The source's plausibility policy; auto is clamp for a source that fills only velocity commands (an
    operator may overdrive a joystick; the policy gets the nearest command it was trained on) and reject
    for sensors (a glitch is dropped; the watchdog decides whether the stream is gone)."""
    if src.implausible != "auto":
        return src.implausible
    kinds = {f.name: f.kind for f in card.features}
    commands_only = all(kinds.get(name) == "velocity_command" for name in src.features)
    return "clamp" if commands_only and src.features else "reject"


@dataclass(frozen=True, eq=False)
class LayoutCard(Layout):
    """The card a recorder or a bag reader checks its sources against, made from a Layout: no model
    exists yet, so only the layout is known; the horizon is unbounded and the sampler the default (DDIM
    with inpainting), so that nothing a model would add limits the configuration."""

    name: str = "dataset layout"
    horizon: int = 10**6
    sampler_inpainting: bool = True
    sampler_kind: str = "ddim"


def layout_card(layout: Layout) -> LayoutCard:
    """What the node's configuration check reads of a card, for a layout (no model exists yet)."""
    return LayoutCard(**{f.name: getattr(layout, f.name) for f in fields(Layout)})


class InputError(ValueError):
    """An observation message that was ignored; `cause` is a stable key for rate-limited logging."""

    def __init__(self, cause: str, message: str) -> None:
        super().__init__(message)
        self.cause = cause


class ImplausibleInputError(InputError):
    """A message with values outside the card's plausible bounds (core.plausibility), refused; with the
    `safe` policy the node also holds the safe state for `features` until a newer plausible sample."""

    def __init__(self, message: str, stamp: float, features: tuple[str, ...], go_safe: bool) -> None:
        super().__init__("implausible", message)
        self.stamp, self.features, self.go_safe = stamp, features, go_safe


def time_to_sec(t: Any) -> float:
    """Seconds of a builtin_interfaces Time (or any record with `sec` and `nanosec`)."""
    return float(t.sec) + 1e-9 * float(t.nanosec)


def _vec(v: Any) -> np.ndarray:
    return np.array([v.x, v.y, v.z], dtype=float)


def _quat(q: Any) -> np.ndarray:
    return np.array([q.x, q.y, q.z, q.w], dtype=float)


class SourceDecoder:
    """Extracts the card features one source fills from its messages (no timing logic)."""

    def __init__(self, source: SourceConfig, card_features: Sequence[Any],
                 rename: Mapping[str, str] | None = None) -> None:
        by_name = {f.name: f for f in card_features}
        if source.type not in MESSAGE_TYPES:
            raise KeyError(f"source '{source.name}': unknown message type '{source.type}'")
        self.source = source
        self.features = [by_name[n] for n in source.features]
        self._rename = dict(rename or {})
        self._index_cache: tuple[tuple[str, ...], dict[str, np.ndarray]] | None = None

    # -- per type ------------------------------------------------------------------------------------------
    def decode(self, msg: Any) -> dict[str, np.ndarray]:
        t = self.source.type
        if t == JOINT_STATE:
            out = self._joint_state(msg)
        elif t == IMU:
            out = self._imu(msg)
        elif t == ODOMETRY:
            out = self._odometry(msg)
        elif t in (TWIST, TWIST_STAMPED):
            tw = msg.twist if t == TWIST_STAMPED else msg
            cmd = np.array([tw.linear.x, tw.linear.y, tw.angular.z], dtype=float)
            out = {f.name: cmd for f in self.features}
        else:
            out = self._array(msg)
        for name, value in out.items():
            if not np.all(np.isfinite(value)):
                raise InputError("non_finite", f"'{name}' contains NaN/Inf; message ignored")
        return out

    def _joint_indices(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        key = tuple(names)
        if self._index_cache is not None and self._index_cache[0] == key:
            return self._index_cache[1]
        pos = {n: i for i, n in enumerate(key)}
        result: dict[str, np.ndarray] = {}
        for f in self.features:
            wanted = [self._rename.get(j, j) for j in (f.joints or ())]
            missing = [j for j in wanted if j not in pos]
            if missing:
                raise InputError("missing_joints",
                                 f"JointState lacks joints {missing} needed for '{f.name}'; message ignored")
            # A joint named twice has two values and no way to tell which is right: never pick one.
            twice = sorted({j for j in wanted if key.count(j) > 1})
            if twice:
                raise InputError("duplicate_joints",
                                 f"JointState names joints {twice} more than once; message ignored")
            result[f.name] = np.array([pos[j] for j in wanted], dtype=int)
        self._index_cache = (key, result)
        return result

    def _joint_state(self, msg: Any) -> dict[str, np.ndarray]:
        n = len(msg.name)
        idx = self._joint_indices(msg.name)
        out = {}
        for f in self.features:
            field = "position" if f.kind == "joint_position" else "velocity"
            values = getattr(msg, field)
            if len(values) != n:
                raise InputError(f"size_{field}", f"JointState has {n} names but {len(values)} {field} "
                                 "values; message ignored")
            out[f.name] = np.asarray(values, dtype=float)[idx[f.name]]
        return out

    def _imu(self, msg: Any) -> dict[str, np.ndarray]:
        out = {}
        for f in self.features:
            if f.kind == "projected_gravity":
                q = _quat(msg.orientation)
                if msg.orientation_covariance[0] == -1.0:
                    raise InputError("no_orientation", "Imu says it has no orientation (covariance[0] = -1); "
                                     "message ignored")
                if not fx.quat_is_valid(q):
                    raise InputError(
                        "bad_quaternion", f"Imu orientation {q.tolist()} is not a unit quaternion; ignored"
                    )
                out[f.name] = fx.projected_gravity(q)
            else:
                out[f.name] = _vec(msg.angular_velocity)
        return out

    def _odometry(self, msg: Any) -> dict[str, np.ndarray]:
        frame = self.source.frame
        if frame and msg.child_frame_id != frame:
            raise InputError("child_frame", f"Odometry child_frame_id '{msg.child_frame_id}' is not the body "
                             f"frame '{frame}'; message ignored")
        out = {}
        for f in self.features:
            if f.kind == "base_linear_velocity":
                out[f.name] = _vec(msg.twist.twist.linear)
            elif f.kind == "base_angular_velocity":
                out[f.name] = _vec(msg.twist.twist.angular)
            else:
                q = _quat(msg.pose.pose.orientation)
                if not fx.quat_is_valid(q):
                    raise InputError("bad_quaternion", f"Odometry orientation {q.tolist()} is not a unit "
                                     "quaternion; message ignored")
                out[f.name] = fx.projected_gravity(q)
        return out

    def _array(self, msg: Any) -> dict[str, np.ndarray]:
        data = np.asarray(msg.data, dtype=float)
        total = sum(f.size for f in self.features)
        if data.size != total:
            raise InputError("size", f"Float64MultiArray has {data.size} values, expected {total} "
                             f"({' + '.join(f'{f.name}:{f.size}' for f in self.features)}); message ignored")
        out, k = {}, 0
        for f in self.features:
            out[f.name] = data[k:k + f.size]
            k += f.size
        return out


class SourceReader:
    """A decoder plus the time rules: which stamp a sample gets, and which stamps are rejected.

    Header stamp by default (the time the sensor saw it, what delay compensation needs); receipt time for
    types without a header, for `stamp: receipt`, and for stamp 0 (a publisher that does not stamp --
    reported once as cause `zero_stamp`). Stamps more than `max_future_s` ahead of the node's clock, or
    older than the source's newest accepted stamp, are rejected -- unless the node's clock itself went
    back behind that stamp (a simulation reset), which starts a new timeline. Values outside the card's
    plausible bounds are clamped, or the message refused, by the source's `policy` (core.plausibility).
    """

    def __init__(self, decoder: SourceDecoder, max_future_s: float,
                 on_note: Callable[[str, str], None] | None = None,
                 plausibility: Plausibility | None = None, policy: str = "reject",
                 agreement: PublisherAgreement | None = None) -> None:
        self.decoder = decoder
        self.max_future_s = max_future_s
        self.on_note = on_note
        self.plausibility = plausibility
        self.policy = policy
        self.agreement = agreement  # read by the intake, which knows each message's publisher
        self.last_stamp: float | None = None
        self.zero_stamps = 0
        self.clamped = 0

    @property
    def source(self) -> SourceConfig:
        return self.decoder.source

    def read(
        self, msg: Any, now: float, received: float | None = None
    ) -> tuple[float, dict[str, np.ndarray]]:
        """(stamp, {feature: values}) for an accepted message; raises InputError otherwise. `received`: when
        the message arrived on the node's clock (default `now`), the stamp of receipt-time sources."""
        stamp = now if received is None else received
        src = self.source
        if src.frame and src.type in HAS_HEADER and src.type != ODOMETRY \
                and msg.header.frame_id != src.frame:
            raise InputError("frame", f"frame_id '{msg.header.frame_id}' is not '{src.frame}'; ignored")
        if src.stamp == "header" and src.type in HAS_HEADER:
            hs = time_to_sec(msg.header.stamp)
            if hs > 0.0:
                stamp = hs
            else:
                self.zero_stamps += 1
                if self.zero_stamps == 1 and self.on_note is not None:
                    # Not an error: said once so the user knows delay compensation sees receipt times.
                    self.on_note("zero_stamp", f"source '{src.name}' publishes header stamp 0; using the "
                                 "receipt time instead")
        values = self.decoder.decode(msg)
        if stamp > now + self.max_future_s:
            ahead = stamp - now
            raise InputError("future_stamp",
                             f"stamp {stamp:.3f} s is {ahead:.3f} s ahead of the node clock; message ignored")
        if self.last_stamp is not None and self.last_stamp > now + self.max_future_s:
            self.last_stamp = None  # the clock itself went back (a simulation reset): a new timeline
        if self.last_stamp is not None and stamp < self.last_stamp:
            raise InputError("stamp_backwards", f"stamp {stamp:.3f} s is older than the previous "
                             f"{self.last_stamp:.3f} s; message ignored")
        if self.plausibility is not None:
            values = self._plausible(stamp, values)
        self.last_stamp = stamp
        return stamp, values

    def _plausible(self, stamp: float, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`values` inside the card's bounds, clamped (policy clamp), or ImplausibleInputError."""
        check = self.plausibility
        assert check is not None
        problems = {name: why for name, v in values.items() if (why := check.check(name, v))}
        if not problems:
            return values
        text = "; ".join(problems.values())
        if self.policy == "clamp":
            self.clamped += 1
            if self.on_note is not None:
                self.on_note("clamped", f"{text}: clamped into the bounds")
            return {n: check.clamp(n, v) if n in problems else v for n, v in values.items()}
        safe = self.policy == "safe"
        then = ", safe state until plausible input" if safe else ""
        raise ImplausibleInputError(f"{text}; message ignored{then}", stamp, tuple(problems), safe)


def plain_readers(sources: Sequence[SourceConfig], max_future_s: float, features: Sequence[Any],
                  rename: Mapping[str, str]) -> dict[str, SourceReader]:  # fmt: skip
    """A reader per source with the node's decoding and stamp rules, without the plausibility checks
    (which need a trained card): what building a dataset and demonstrating through ROS read with."""
    return {s.name: SourceReader(SourceDecoder(s, features, rename), max_future_s) for s in sources}
