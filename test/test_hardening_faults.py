"""Faults against the running node: observation streams stop, inference slower than the control period
and slower than the whole horizon, model swaps to files that cannot work (missing, truncated, a card that
does not fit, a card that does not match its graph, a NaN model), SIGINT/SIGTERM during inference, the
sim clock jumping back. Scenarios and verdicts live in bench/hardening/ (shared with bench/robustness.py);
each is one test here."""

from __future__ import annotations

import pytest
from hardening.scenarios import names, run

pytestmark = pytest.mark.ros


@pytest.mark.parametrize("name", names("faults"))
def test_fault(hardening_harness, name):
    result = run(hardening_harness, name)
    assert result.passed, result.report()
