"""Forecasts how late the next chunk will be, from the delays measured on recent ones.

Real-time chunking forecasts the delay as the maximum of the last 10 measured delays: a max reacts at once
to a slow spell and forgets it after N chunks, where a mean would under-forecast every second chunk.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np


class LatencyForecaster:
    """Measured inference delays (ready - request) and observation ages (request - t_obs).

    The delay is what scheduling needs: from the request until the tick that can use the chunk, so it is
    quantized to ticks. The pure model time (`record_compute`) is kept apart for diagnostics, because it
    says how much headroom the model leaves. `window` recent delays feed the forecast (max);
    `stats_window` values feed the p50/p99 diagnostics.
    """

    def __init__(self, window: int = 10, stats_window: int = 1000) -> None:
        if window < 1 or stats_window < window:
            raise ValueError(f"window must be >= 1 and <= stats_window, got {window}, {stats_window}")
        self._recent: deque[float] = deque(maxlen=window)
        self._inference: deque[float] = deque(maxlen=stats_window)
        self._obs_age: deque[float] = deque(maxlen=window)
        self._compute: deque[float] = deque(maxlen=stats_window)

    def record_compute(self, compute_s: float) -> None:
        """Time predict() itself took (no queueing, no waiting for a tick)."""
        if math.isfinite(compute_s) and compute_s >= 0.0:
            self._compute.append(float(compute_s))

    def record_inference(self, delay_s: float) -> None:
        if math.isfinite(delay_s) and delay_s >= 0.0:
            self._recent.append(float(delay_s))
            self._inference.append(float(delay_s))

    def record_obs_age(self, age_s: float) -> None:
        if math.isfinite(age_s) and age_s >= 0.0:
            self._obs_age.append(float(age_s))

    def inference_forecast(self) -> float:
        """Max of the last `window` inference delays; 0.0 before the first measurement."""
        return max(self._recent) if self._recent else 0.0

    def obs_age_forecast(self) -> float:
        """Max of the last `window` observation ages; 0.0 before the first measurement."""
        return max(self._obs_age) if self._obs_age else 0.0

    def percentile(self, q: float) -> float:
        """q-th percentile (0..100) of the inference delays kept for diagnostics; nan when none."""
        return _percentile(self._inference, q)

    def compute_percentile(self, q: float) -> float:
        """q-th percentile (0..100) of the model compute times; nan when none."""
        return _percentile(self._compute, q)

    def clear(self) -> None:
        self._recent.clear()
        self._inference.clear()
        self._obs_age.clear()
        self._compute.clear()


def _percentile(values: deque[float], q: float) -> float:
    if not values:
        return math.nan
    return float(np.percentile(np.fromiter(values, float), q))
