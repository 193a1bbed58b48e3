"""Load against the running node: joint states at 2 kHz and IMU at 1 kHz, and every topic at 10x its
normal rate, after a baseline at the normal rates: no missed tick, nothing unsafe, control RUNNING,
latency and jitter bounded, memory flat. Short here (hardening.load.LOAD_SECONDS); bench/robustness.py runs
60 s. Scenarios and verdicts live in bench/hardening/ (shared with bench/robustness.py); each is one test."""

from __future__ import annotations

import pytest
from hardening.scenarios import names, run

pytestmark = pytest.mark.ros


@pytest.mark.parametrize("name", names("load"))
def test_load(hardening_harness, name):
    result = run(hardening_harness, name)
    assert result.passed, result.report()
