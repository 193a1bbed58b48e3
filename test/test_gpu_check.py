"""scripts/gpu_check: its exit where there is no GPU, and its reading of the benchmarks' JSON."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check"


def load():
    loader = importlib.machinery.SourceFileLoader("gpu_check", str(SCRIPT))
    spec = importlib.util.spec_from_loader("gpu_check", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_without_a_gpu_it_says_so_writes_the_json_and_exits_0(tmp_path):
    gc = load()
    why = gc.gpu_problem()
    if why is None:
        pytest.skip("this machine has a GPU: gpu_check runs for real")
    out = tmp_path / "sub" / "gpu.json"
    # as the GPU machine runs it: a plain interpreter, the checkout on PYTHONPATH, not from the repo root
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("gpu_check: no GPU here, nothing to check: ")
    report = json.loads(out.read_text())
    assert report["gpu"] is False and report["reason"] == why
    assert not (tmp_path / "sub" / "gpu_logs").exists()  # nothing was started


def test_no_gpu_reasons_name_the_missing_piece(monkeypatch):
    from diffusion_controller.core import providers

    gc = load()
    monkeypatch.setattr(providers, "gpu_provider_problem", lambda _p: "no NVIDIA driver (test)")
    assert gc.gpu_problem() == "onnxruntime's CUDA provider cannot be used: no NVIDIA driver (test)"
    monkeypatch.setattr(providers, "gpu_provider_problem", lambda _p: None)
    monkeypatch.setattr(providers, "gpu_name", lambda _d: None)
    assert "no CUDA device 0" in gc.gpu_problem()


def gpu_row(p50, p99, err=1e-5, runs_on="cuda, CUDA graph, TF32 off, GPU 0 (40 nodes on cuda)"):
    return {"ms_p50": p50, "ms_p99": p99, "max_abs_diff": err, "runs_on": runs_on}


BENCH = {
    "results": [
        {"k": 1, "max_abs_diff_fp16_vs_fp32": 2e-4,
         "gpu": {"cuda": gpu_row(3.4, 4.1), "cuda_graph": gpu_row(0.30, 0.34),
                 "cuda_graph_fp16": gpu_row(0.2, 0.25),
                 "torch_cuda_graph": gpu_row(0.64, 0.71, runs_on="torch CUDA graph")}},
        {"k": 10,
         "gpu": {"cuda_graph": gpu_row(7.1, 7.33), "torch_cuda_graph": gpu_row(5.37, 5.45)}},
        {"k": 5, "gpu": {}},
    ],
    "models": [{"model": "/x/models/ant_locomotion.onnx", "graph": "fused", "ms_p50": 0.2, "ms_p99": 0.31,
                "runs_on": "cuda, CUDA graph"}],
    "nodes_per_step": {"file": {"k1": 564.0, "k2": 1016.0, "per_step": 452.0}},
    "gpu_skipped": {"tensorrt_fp32": "no tensorrt here: a library it needs is missing"},
}  # fmt: skip


def test_the_bench_summary_reads_each_k_against_the_targets():
    gc = load()
    s = gc.bench_summary(BENCH)
    k1, k10, k5 = s["rows"]
    assert k1["ratio"] == pytest.approx(0.30 / 0.64) and k1["ratio_ok"]
    assert k1["p99_target_ms"] == 0.35 and k1["p99_ok"]
    assert (k1["ort_p50"], k1["fp16_graph_p50"], k1["fp16_err"]) == (3.4, 0.2, 2e-4)
    assert k10["ratio"] == pytest.approx(7.1 / 5.37) and not k10["ratio_ok"]
    assert k10["p99_target_ms"] == 2.0 and not k10["p99_ok"]
    assert k5 == {"k": 5}  # no GPU rows for it: nothing claimed
    assert s["shipped"] == {"model": "ant_locomotion.onnx", "p50": 0.2, "p99": 0.31,
                            "runs_on": "cuda, CUDA graph", "p99_ok": False}  # fmt: skip
    assert s["nodes_per_step"]["file"]["per_step"] == 452.0 and "tensorrt_fp32" in s["skipped"]


def test_the_loop_and_test_summaries(capsys):
    gc = load()
    loop = {"rate_hz": 100.0, "missed_ticks": 0, "stale_actions_published": 0, "swap_missed_ticks": 0,
            "swaps": 11, "failed_swaps": 0, "jitter_ms_p99": 0.4, "obs_to_cmd_ms_p99": 3.0,
            "provider": "cuda"}  # fmt: skip
    assert gc.loop_summary(loop)["ok"] and not gc.loop_summary(loop | {"missed_ticks": 2})["ok"]
    t = gc.tests_summary("....\n= 40 passed, 3 skipped, 1 failed in 12.3s =\n", 1)
    assert t == {"exit_code": 1, "passed": 40, "skipped": 3, "failed": 1}
    text = "noise\n" + json.dumps(BENCH) + "\n"
    assert gc.last_json(text) == BENCH and gc.last_json("no json") is None
    result = {"gpu_name": "NVIDIA H200", "bench": {"summary": gc.bench_summary(BENCH)},
              "control_loop": {"summary": gc.loop_summary(loop)}, "tests": t, "seconds": 200.0,
              "out": "x.json"}  # fmt: skip
    gc.print_table(result)
    out = capsys.readouterr().out
    assert "0.47 ok" in out and "1.32 MISS" in out and "7.330*" in out
    assert "control loop 100 Hz on cuda with swaps: missed ticks 0" in out
    assert "shipped model ant_locomotion.onnx" in out and "MISS" in out


def test_where_rclpy_does_not_import_the_node_level_part_says_so(tmp_path, monkeypatch, capsys):
    from diffusion_controller.core import providers

    gc = load()
    monkeypatch.setattr(gc, "gpu_problem", lambda: None)
    monkeypatch.setattr(providers, "gpu_name", lambda _d: "NVIDIA H200 (test)")
    monkeypatch.setattr(gc, "rclpy_problem", lambda: "rclpy does not import here (test)")
    out = tmp_path / "g.json"
    assert gc.main(["--out", str(out), "--skip-bench", "--skip-tests"]) == 0
    report = json.loads(out.read_text())
    assert report["gpu"] and report["gpu_name"] == "NVIDIA H200 (test)"
    assert report["control_loop"] == {"skipped": "node-level part skipped: rclpy does not import here (test)"}
    printed = capsys.readouterr().out
    assert "control loop: node-level part skipped: rclpy does not import here (test)" in printed
