"""Which action runs now: the running chunk, stale actions skipped, and how a new chunk takes over.

Inference finishes at arbitrary times relative to the control ticks. The scheduler keeps the running chunk,
executes at every tick its action for that tick's slot (chunk.py's rule: neither stale nor early), discards
chunks that arrive out of order or entirely stale, and blends a new chunk into the running one by the
configured mode. A new chunk whose first action is later than the next slot (a card with first_offset > 1,
or a fast inference) does not run early: the chunk it replaces goes on until the new one has its slot.

- none: the new chunk replaces the old one at once (DiffuseLoco, Diffusion Policy).
- crossfade: over the first `crossfade_steps` slots the new chunk executes, weights ramp linearly from
  the old chunk's action for the same time slot to the new one ((k+1)/(steps+1) new at step k).
- inpaint: real-time chunking with a forward-only graph: the request freezes (prefix/prefix_mask) the
  slots that will execute from the old chunk before the new one can arrive, so the new chunk continues
  what the robot is doing; on arrival it simply replaces the old chunk.
- ensemble: ACT's temporal ensembling over the last `ensemble_chunks` chunks: every tick executes the
  mean of what each of them predicted for that slot. Each chunk is one draw of a stochastic sampler
  from a slightly different observation; the mean keeps the draws' common motion and cancels their
  independent noise, at no inference cost. A long window lags (older observations), so keep it short:
  at one chunk per tick, N chunks are N ticks of observation age.
"""

from __future__ import annotations

import math
from collections import deque
from typing import NamedTuple

import numpy as np

from .chunk import Chunk, is_stale

BLEND_MODES = ("none", "crossfade", "inpaint", "ensemble")


def inpaint_refusal(sampler_kind: str) -> str:
    """Why `blend: inpaint` cannot run on a model whose sampler a prefix cannot steer (card
    sampler.inpainting false); the same words at configure, in the config check and on a swap."""
    return (
        f"'inpaint' needs a sampler a prefix can steer; this model's {sampler_kind} sampler cannot "
        "(card sampler.inpainting false): use none, crossfade or ensemble"
    )


class Selection(NamedTuple):
    """The action a tick executes: its values, its scheduled time t_i, its index and its chunk."""

    action: np.ndarray
    action_time: float
    index: int
    chunk: Chunk


class ChunkScheduler:
    """Holds the running chunk and selects an action per tick; time enters only through `now`."""

    def __init__(
        self,
        period: float,
        exec_latency: float = 0.0,
        blend: str = "none",
        crossfade_steps: int = 4,
        ensemble_chunks: int = 4,
    ) -> None:
        if blend not in BLEND_MODES:
            raise ValueError(f"blend must be one of {BLEND_MODES}, got {blend!r}")
        if crossfade_steps < 0:
            raise ValueError(f"crossfade_steps must be >= 0, got {crossfade_steps}")
        if ensemble_chunks < 1:
            raise ValueError(f"ensemble_chunks must be >= 1, got {ensemble_chunks}")
        if not (period > 0 and exec_latency >= 0):
            raise ValueError(f"need period > 0 and exec_latency >= 0, got {period}, {exec_latency}")
        self.period = float(period)
        self.exec_latency = float(exec_latency)
        self.blend = blend
        self.crossfade_steps = int(crossfade_steps)
        # The newest chunks, newest last; the running one is the last (blend "ensemble" only).
        self.recent: deque[Chunk] = deque(maxlen=int(ensemble_chunks) if blend == "ensemble" else 1)
        self.newest_seq: int | None = None  # seq of the newest chunk applied (kept across clear())
        self._first_exec_time: float | None = None
        # The running chunk, then the newer ones whose first action is still ahead (first_offset > 1 or a
        # fast inference can have several waiting): a chunk runs until a newer one reaches its first slot.
        self._queue: deque[Chunk] = deque()

    @property
    def current(self) -> Chunk | None:
        """The newest chunk applied (the last one offered and not cleared)."""
        return self._queue[-1] if self._queue else None

    def clear(self) -> None:
        """Drop the running chunk (reset, safe state); older chunks stay rejected as out of order."""
        self._queue.clear()
        self.recent.clear()
        self._first_exec_time = None

    # -- arrivals ----------------------------------------------------------------------------------------

    def offer(self, chunk: Chunk, now: float) -> str | None:
        """Take a newly arrived chunk; None when applied, else why it was discarded."""
        if self.newest_seq is not None and chunk.seq <= self.newest_seq:
            return f"out of order: chunk {chunk.seq} arrived after chunk {self.newest_seq}"
        t_exec = now + self.exec_latency
        first = chunk.first_valid_index(t_exec)
        if first is None:
            late = t_exec - chunk.action_time(chunk.horizon - 1)
            return f"stale on arrival: its last action is {late:.3f} s before t_exec"
        if self.blend == "crossfade" and self.current is not None and self.crossfade_steps > 0:
            chunk = self._crossfade(chunk, first)
        while self._queue and self._queue[0].first_valid_index(t_exec) is None:
            self._queue.popleft()  # ran out: nothing of it can run any more
        self._queue.append(chunk)
        self.recent.append(chunk)
        self.newest_seq = chunk.seq
        self._first_exec_time = None
        return None

    def _crossfade(self, new: Chunk, first: int) -> Chunk:
        old = self.current
        actions = np.array(new.actions, dtype=float, copy=True)
        steps = self.crossfade_steps
        for k in range(steps):
            j = first + k
            if j >= new.horizon:
                break
            i = old.action_for_slot(new.action_time(j))
            if i is None or not np.all(np.isfinite(old.actions[i])):
                continue
            w = (k + 1) / (steps + 1)
            actions[j] = (1.0 - w) * old.actions[i] + w * actions[j]
        return Chunk(actions, new.t_obs, new.period, new.first_offset, new.seq, new.t_request, new.t_ready)

    # -- per tick ----------------------------------------------------------------------------------------

    def select(self, now: float) -> Selection | None:
        """The action for the slot of t_exec = now + exec_latency: the newest chunk's, else (its first
        action is later) that of the chunk running before it; None when no chunk has one."""
        t_exec = now + self.exec_latency
        for k in range(len(self._queue) - 1, -1, -1):  # the newest chunk that has an action for this slot
            chunk = self._queue[k]
            i = chunk.action_for_slot(t_exec)
            if i is not None:
                break
        else:
            return None
        for _ in range(k):  # older ones never run again
            self._queue.popleft()
        if chunk is self.current and self._first_exec_time is None:
            self._first_exec_time = chunk.action_time(i)
        t_i = chunk.action_time(i)
        action = chunk.actions[i]
        if len(self.recent) > 1:
            action = self._ensemble(chunk, action, t_i)
        return Selection(action, t_i, i, chunk)

    def _ensemble(self, running: Chunk, action: np.ndarray, t_slot: float) -> np.ndarray:
        """Mean of the running chunk's action for `t_slot` and the other recent chunks' actions for that
        slot (those that have one, finite)."""
        total, n = np.array(action, dtype=float, copy=True), 1
        for other in self.recent:
            if other is running:
                continue
            j = other.action_for_slot(t_slot)
            if j is not None and np.all(np.isfinite(other.actions[j])):
                total += other.actions[j]
                n += 1
        return total / n

    def handover_time(self, now: float, execute_steps: int) -> float:
        """Action time from which the next chunk should be running (-inf: needed now).

        The running chunk executes `execute_steps` actions from its first executed one, or until it runs
        out; Diffusion Policy's request-ahead asks for the next chunk so that it is ready by then.
        """
        chunk = self.current
        if chunk is None:
            return -math.inf
        base = self._first_exec_time
        if base is None:
            i = chunk.first_valid_index(now + self.exec_latency)
            if i is None:
                return -math.inf
            base = chunk.action_time(i)
        return min(base + execute_steps * self.period, chunk.action_time(chunk.horizon - 1) + self.period)

    # -- inpainting --------------------------------------------------------------------------------------

    def inpaint_prefix(self, t_obs_new: float, forecast_delay: float) -> tuple[np.ndarray, np.ndarray] | None:
        """Freeze the new chunk's slots that will run from the running chunk before the new one arrives.

        The new chunk (same layout as the running one) is stamped `t_obs_new`; `forecast_delay` is the
        forecast time from t_obs_new until its first command takes effect (observation age + inference
        delay + pickup + exec latency). Slots stale by then are frozen to the action the running chunk
        executes in that slot. Returns (prefix (horizon, action_dim), mask (horizon,)), or None without a
        running chunk.
        """
        old = self.current
        if old is None:
            return None
        prefix = np.zeros_like(old.actions, dtype=float)
        mask = np.zeros(old.horizon)
        t_first = t_obs_new + forecast_delay
        for j in range(old.horizon):
            t_j = t_obs_new + (old.first_offset + j) * self.period
            if not is_stale(t_j, t_first, self.period):
                break
            i = old.action_for_slot(t_j)
            if i is not None and np.all(np.isfinite(old.actions[i])):
                prefix[j] = old.actions[i]
                mask[j] = 1.0
        return prefix, mask
