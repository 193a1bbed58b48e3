"""Bad input against the running node: every observation topic of config/ant.yaml gets malformed messages
(wrong sizes, missing and duplicated joints, NaN/Inf, zero quaternions, future/backward/zero stamps, empty
messages, wrong message types). Scenarios and verdicts live in bench/hardening/ (shared with
bench/robustness.py); each scenario is one test here."""

from __future__ import annotations

import pytest
from hardening.scenarios import names, run

pytestmark = pytest.mark.ros


@pytest.mark.parametrize("name", names("input"))
def test_bad_input(hardening_harness, name):
    result = run(hardening_harness, name)
    assert result.passed, result.report()
