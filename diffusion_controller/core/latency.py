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

    `window` recent values feed the forecast (max); `stats_window` values feed the p50/p99 diagnostics.
    """

    def __init__(self, window: int = 10, stats_window: int = 1000) -> None:
        if window < 1 or stats_window < window:
            raise ValueError(f"window must be >= 1 and <= stats_window, got {window}, {stats_window}")
        self._recent: deque[float] = deque(maxlen=window)
        self._inference: deque[float] = deque(maxlen=stats_window)
        self._obs_age: deque[float] = deque(maxlen=window)

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
        if not self._inference:
            return math.nan
        return float(np.percentile(np.fromiter(self._inference, float), q))

    def clear(self) -> None:
        self._recent.clear()
        self._inference.clear()
        self._obs_age.clear()
