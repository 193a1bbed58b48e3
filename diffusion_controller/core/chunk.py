"""A chunk of predicted actions and the one rule that says which of its actions may still be executed.

Every action carries the time it was computed for (DESIGN.md, Times); the tick compares that time with the
time its command takes effect. Keeping the rule in one place is what lets the scheduler, the inpainting
prefix and the tests agree on which action runs when.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: Slack of the half-period rule, as a fraction of the period: stamps and clocks in float seconds are off by
#: a few ulps (2.4e-7 s at today's epoch), and a tick exactly half a period late (one physics step under
#: sim time at 200 Hz and 400 Hz physics) must not find its action stale AND the next one too early.
SLOT_TOLERANCE = 1e-3


def is_stale(t_action: float, t_exec: float, period: float) -> bool:
    """An action is stale when it was meant for more than half a period before `t_exec`.

    The half period absorbs tick jitter: a tick slightly late still executes the action of its own slot.
    """
    return t_action < t_exec - (0.5 + SLOT_TOLERANCE) * period


@dataclass(frozen=True)
class Chunk:
    """Predicted actions (horizon, action_dim) in robot units, stamped with the time they were computed for.

    `t_obs` is the stamp of the newest observation row (or the request time with delay compensation off);
    `t_request`/`t_ready` are when inference was asked for and when its result was picked up.
    """

    actions: np.ndarray
    t_obs: float
    period: float
    first_offset: int
    seq: int
    t_request: float
    t_ready: float

    @property
    def horizon(self) -> int:
        return int(self.actions.shape[0])

    def action_time(self, i: int) -> float:
        """t_i = t_obs + (first_offset + i) * period."""
        return self.t_obs + (self.first_offset + i) * self.period

    def times(self) -> np.ndarray:
        """All action times, (horizon,)."""
        return self.t_obs + (self.first_offset + np.arange(self.horizon)) * self.period

    def first_valid_index(self, t_exec: float) -> int | None:
        """Index of the earliest non-stale action at `t_exec`, or None when every action is stale."""
        guess = math.ceil((t_exec - 0.5 * self.period - self.t_obs) / self.period - self.first_offset)
        i = max(0, guess - 1)
        # The closed form is only a guess under rounding; the rule itself decides.
        while i < self.horizon and is_stale(self.action_time(i), t_exec, self.period):
            i += 1
        return i if i < self.horizon else None

    def action_for_slot(self, t_slot: float) -> int | None:
        """Index of the action this chunk executes at a tick whose command takes effect at `t_slot`.

        None when the chunk has no action near that time (all stale, or its first action is more than
        half a period later), so callers never mistake the chunk's first action for an earlier slot.
        """
        i = self.first_valid_index(t_slot)
        if i is None or self.action_time(i) >= t_slot + (0.5 + SLOT_TOLERANCE) * self.period:
            return None
        return i
