"""Chunks computed elsewhere (a policy node on another computer) entering the control core.

The core takes them where the inference worker's results enter (`ControlCore.offer_chunk`), so they go
through the same checks, scheduler, blending, stale rule, safety filter and watchdog as local chunks.
What is particular to them lives here: the order rule (a link may reorder or duplicate), the rule that a
chunk after a fault must come from observations after it, the check that a chunk fits the robot, and the
model identity a chunk carries (`model=<name>;version=<v>;K=<steps>`, readable with `ros2 topic echo`).
"""

from __future__ import annotations

import math
import re
from collections import deque
from typing import Any, NamedTuple

import numpy as np

#: Chunks kept between two ticks; a burst (a link that held them back) keeps the newest.
MAX_PENDING = 8
#: Largest difference (s) between a point's time_from_start and the card's schedule: nanosecond rounding.
TIME_TOLERANCE_S = 1e-6


class ChunkFitError(ValueError):
    """A chunk that does not fit the robot's card; the message says what differs."""


class ModelId(NamedTuple):
    """Which model made a chunk: what the controller reports, and checks against its card's name."""

    name: str
    version: str
    steps: int


_ID = re.compile(r"^model=([^;]*);version=([^;]*);K=(\d+)$")


def model_id_text(name: str, version: str, steps: int) -> str:
    """The identity a chunk carries (JointTrajectory header.frame_id)."""
    return f"model={name};version={version};K={int(steps)}"


def parse_model_id(text: str) -> ModelId | None:
    """ModelId of model_id_text's output; None for anything else."""
    m = _ID.match(text or "")
    return None if m is None else ModelId(m.group(1), m.group(2), int(m.group(3)))


def chunk_times(card: Any) -> np.ndarray:
    """time_from_start of each action after the chunk's observation time: (first_offset + i) * period."""
    return (int(card.first_offset) + np.arange(int(card.horizon))) * float(card.control_period_s)


def fit_chunk(card: Any, joint_names: Any, times_from_start: Any, positions: Any) -> np.ndarray:
    """The actions (horizon, action_dim) in the card's joint order, when the chunk fits the card: every
    action joint named once, the card's horizon, and points at the card's period and first offset. Raises
    ChunkFitError naming the difference (the controller reports it on /diagnostics)."""
    joints = tuple(card.action_joints)
    names = [str(n) for n in joint_names]
    if sorted(names) != sorted(joints) or len(set(names)) != len(names):
        missing = [j for j in joints if j not in names]
        extra = [n for n in names if n not in joints]
        raise ChunkFitError(f"joint names differ from the card's: missing {missing}, unknown {extra}")
    times = np.asarray(times_from_start, dtype=float)
    expected = chunk_times(card)
    if times.shape != expected.shape:
        raise ChunkFitError(f"{times.size} points, the card's horizon is {expected.size}")
    bad = np.flatnonzero(np.abs(times - expected) > TIME_TOLERANCE_S)
    if bad.size:
        i = int(bad[0])
        period, offset = float(card.control_period_s), int(card.first_offset)
        raise ChunkFitError(
            f"point {i} at {times[i]:.6f} s, expected {expected[i]:.6f} s (period {period:g} s, first "
            f"offset {offset}): another control period or offset"
        )
    try:
        a = np.asarray(positions, dtype=float)
    except (TypeError, ValueError) as exc:
        raise ChunkFitError(f"positions not numeric: {exc}") from None
    if a.shape != (expected.size, len(joints)):
        raise ChunkFitError(f"positions {a.shape}, expected {(expected.size, len(joints))}")
    order = [names.index(j) for j in joints]
    return a[:, order]


class NoWorker:
    """The worker of a core whose chunks come from elsewhere: never busy, never computes."""

    busy = False

    def submit(self, request: Any) -> bool:
        return False

    def poll(self) -> None:
        return None

    def set_policy(self, policy: Any) -> None:
        pass

    def cancel_pending(self) -> None:
        pass

    def uses(self, policy: Any) -> bool:
        return False

    def stop(self, timeout: float = 5.0) -> bool:
        return True


class ExternalChunks:
    """Chunks offered between ticks, and the rules on their observation stamps.

    Order: a chunk whose t_obs is not newer than the newest one taken is a duplicate or was overtaken on
    the link (reordering): refused. Freshness: after a fault, reset or e-stop, only chunks conditioned on
    observations at or after the newest one then are taken (as local mode takes only chunks requested
    after it). Future: a chunk stamped after the node's clock is of another timeline (a sim reset).
    """

    def __init__(self) -> None:
        self._pending: deque[tuple[Any, float, float, str]] = deque(maxlen=MAX_PENDING)
        self.newest_t_obs = -math.inf
        self.floor = -math.inf
        self.last_accepted = -math.inf  # node time a usable chunk was last received (chunk timeout)

    def offer(self, actions: Any, t_obs: float, received: float, source: str) -> None:
        self._pending.append((actions, t_obs, received, source))

    def take(self) -> list[tuple[Any, float, float, str]]:
        """Everything offered since the last tick, oldest first."""
        out = list(self._pending)
        self._pending.clear()
        return out

    def require_after(self, stamp: float | None) -> None:
        """From now on only chunks of observations at or after `stamp` (None: any)."""
        if stamp is not None:
            self.floor = max(self.floor, float(stamp))
        self._pending.clear()

    def new_timeline(self) -> None:
        """The clock went back: stamps of the old timeline mean nothing now."""
        self.newest_t_obs = self.floor = self.last_accepted = -math.inf
        self._pending.clear()

    def refusal(self, t_obs: float, latest: float) -> str | None:
        """Why a chunk stamped t_obs is refused before its actions are looked at; None when taken."""
        if not math.isfinite(t_obs):
            return "chunk rejected: non-finite observation stamp"
        if t_obs > latest:
            return f"chunk rejected: observation stamp {t_obs:.3f} s is ahead of the node clock"
        if t_obs <= self.newest_t_obs:
            return (f"chunk dropped: out of order (observations at {t_obs:.3f} s, a chunk of "
                    f"{self.newest_t_obs:.3f} s was already taken)")  # fmt: skip
        if t_obs < self.floor:
            return f"chunk dropped: observations at {t_obs:.3f} s predate the last fault or reset"
        return None

    def accepted(self, t_obs: float, received: float, usable: bool) -> None:
        self.newest_t_obs = max(self.newest_t_obs, t_obs)
        if usable:
            self.last_accepted = max(self.last_accepted, received)

    def silence(self, now: float) -> str:
        """The current cause of no usable action, in the reason the core gives."""
        if not math.isfinite(self.last_accepted):
            return "no chunk from the policy yet"
        return f"no chunk from the policy for {now - self.last_accepted:.3f} s"
