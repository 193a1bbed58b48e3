"""What the core reports: the state of its state machine, each tick's result, and its statistics."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np


class ControlState(enum.Enum):
    WAITING = "waiting"  # no valid chunk yet (start, reset, resume, layout change): hold
    RUNNING = "running"  # executing the policy's chunks
    SAFE = "safe"  # stale observations or too many misses: hold or go to the default pose
    ESTOP = "estop"  # latched emergency stop: hold until resume()


class Trajectory(NamedTuple):
    """The rest of the running chunk as the safety filter will send it; positions[0] is the command."""

    times: np.ndarray
    positions: np.ndarray


@dataclass(frozen=True)
class TickResult:
    state: ControlState
    command: np.ndarray | None
    reason: str
    t_exec: float
    action_time: float | None = None
    action_index: int | None = None
    chunk_seq: int | None = None
    missed: bool = False
    trajectory: Trajectory | None = None


@dataclass(frozen=True)
class ControlStats:
    state: ControlState
    reason: str
    ticks: int
    missed_steps: int
    consecutive_misses: int
    safe_entries: int
    estops: int
    stale_obs_events: int
    rejected_observations: int
    requests: int
    chunks_received: int
    chunks_dropped: int
    inference_errors: int
    last_error: str
    inference_p50_s: float
    inference_p99_s: float
    inference_forecast_s: float
    obs_age_forecast_s: float
    compute_p50_s: float
    compute_p99_s: float
