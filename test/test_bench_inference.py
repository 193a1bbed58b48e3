"""bench/inference.py keeps working: one short run at K=1 prints the JSON the issue names.

Latencies are not asserted (the machine is shared); the keys, their sanity and the int8 path are.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEYS = (
    "k", "torch_ms_p50", "ort_fused_ms_p50", "ort_fused_ms_p99", "ort_step_ms_p50", "speedup_vs_torch",
    "floor_ms", "ratio_to_floor", "provider", "ort_int8_ms_p50", "speedup_int8_vs_torch", "best_path",
    "speedup_best_vs_torch",
)  # fmt: skip


def test_quick_inference_bench_prints_every_figure():
    bench = str(ROOT / "bench" / "inference.py")
    cmd = [sys.executable, bench, "--quick", "--ks", "1", "--runs", "3", "--json"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    (row,) = report["results"]
    missing = [k for k in KEYS if k not in row]
    assert not missing, missing
    assert row["k"] == 1 and row["provider"] == "cpu"
    for k in KEYS:
        if k not in ("k", "provider", "best_path"):
            assert math.isfinite(row[k]) and row[k] > 0, (k, row[k])
    assert row["best_path"] in ("step", "fused", "int8")
    assert row["max_abs_diff_fused"] <= 1e-3  # same numerics as torch
    assert 0 < row["max_abs_diff_int8"] < 1.0  # rounded by int8, not broken
