"""bench/participant_join.py: its episode count, and its quick mode as the product's promise that
processes joining the graph (on the suite's UDP profile) never make the running node go SAFE."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import participant_join as pj

ROOT = Path(__file__).resolve().parents[1]


def test_episodes_are_runs_of_non_running_ticks_after_the_first_running_one():
    ticks = np.arange(12) * 0.02
    running = np.array([0, 0, 1, 1, 0, 0, 0, 1, 1, 0, 1, 1], bool)  # start-up, then 3 ticks, then 1
    assert pj.episodes(ticks, running, 0.02) == [(0.08, 3), (0.18, 1)]
    assert pj.episodes(ticks, np.ones(12, bool), 0.02) == []


def test_ten_joins_beside_the_node_leave_it_running():
    cmd = [sys.executable, str(ROOT / "bench" / "participant_join.py"), "--quick", "--transport", "profile"]
    out = subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=300, cwd=str(ROOT))
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["joins"] == 10 and result["node_ticks"] > 1000, result
    assert result["node_non_running_episodes"] == 0, result
    assert "FASTDDS_DEFAULT_PROFILES_FILE" in result["node_transport_log"], result
