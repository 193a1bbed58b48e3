"""bench/inference.py keeps working: one short run at K=1 prints the JSON the issue names.

Latencies are not asserted (the machine is shared); the keys, their sanity and the int8 path are, and
that an int8 row which cannot be made is reported as skipped instead of ending the benchmark.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from diffusion_controller.core import providers, runtime
from diffusion_controller.training.network import NetworkConfig

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
    assert 0 < row["max_abs_diff_fp16_vs_fp32"] < 0.05  # the fp16 graph: rounded, not broken
    assert "fp16 graph, largest action error against float32" in out.stdout
    nodes = report["nodes_per_step"]
    for src in ("file", "ort_cpu_optimized_file", "ort_cpu"):
        assert nodes[src]["per_step"] == nodes[src]["k2"] - nodes[src]["k1"] > 0, (src, nodes[src])
    assert "nodes per denoising step (fused graph, K=2 minus K=1): file " in out.stdout
    if providers.gpu_provider_problem(providers.CUDA) is not None:  # no GPU: the GPU rows say so
        ort_rows = set(load_bench().GPU_CONFIGS) | {"cuda_graph_fp16"}
        assert ort_rows <= set(report["gpu_skipped"]) and row["gpu"] == {}
        assert "GPU row cuda_graph skipped: no cuda here:" in out.stdout
    else:  # a GPU: the node's CUDA-graph path against the torch peer, nodes as placed on cuda
        assert {"cuda_graph", "cuda_graph_fp16"} <= set(row["gpu"]) and "ort_cuda" in nodes
        assert row["gpu"]["cuda_graph"]["max_abs_diff"] <= 1e-3
    if load_bench().torch_cuda_graph_problem() is not None:
        assert "torch has no usable CUDA device" in report["gpu_skipped"]["torch_cuda_graph"]
        assert "GPU row torch_cuda_graph skipped: torch has no usable CUDA device" in out.stdout
    else:
        peer = row["gpu"]["torch_cuda_graph"]
        assert peer["max_abs_diff"] <= 1e-3 and peer["ms_p50"] > 0
        assert set(row["ort_vs_torch_cuda_graph"]) == set(row["gpu"]) - {"torch_cuda_graph"}


def test_the_torch_cuda_graph_peer_matches_eager_torch():
    """The peer replays the same chain as the eager torch row (skipped where torch has no CUDA)."""
    import numpy as np
    import torch

    bench = load_bench()
    why = bench.torch_cuda_graph_problem()
    if why is not None:
        assert "torch has no usable CUDA device here" in why
        pytest.skip(why)
    card = bench.diffuseloco_card()
    torch.manual_seed(0)
    net = bench.DiffusionTransformer(NetworkConfig(layers=1, heads=2, width=32)).eval()
    rng = np.random.default_rng(0)
    obs = rng.standard_normal((card.history, card.obs_dim))
    for k in (1, 3):
        peer, runs_on = bench.torch_cuda_graph_chunk(net, card, k)
        eager = bench.torch_chunk(net, card, k)
        for _ in range(2):  # replayed twice with new inputs: the static buffers take them
            noise = rng.standard_normal((card.horizon, card.action_dim)).astype(np.float32)
            np.testing.assert_allclose(peer(obs, noise), eager(obs, noise), atol=1e-4)
        assert runs_on.startswith("torch CUDA graph, TF32 ")


def test_gpu_rows_are_chosen_by_provider_and_skipped_with_the_reason(monkeypatch):
    bench = load_bench()
    monkeypatch.setattr(providers, "gpu_problems", lambda: {"tensorrt": "no TensorRT (test)", "cuda": None})
    run, skipped = bench.gpu_configs("all")
    assert list(run) == ["cuda", "cuda_graph", "cuda_graph_standard"]
    assert [c[2] for c in run.values()] == [False, True, True]
    assert skipped == {n: "no tensorrt here: no TensorRT (test)" for n in ("tensorrt_fp32", "tensorrt_fp16")}
    assert bench.gpu_configs("cuda") == (run, {})
    assert bench.gpu_configs("cpu") == ({}, {})
    assert {c[1] for c in bench.GPU_CONFIGS.values() if c[0] == "tensorrt"} == {"fp32", "fp16"}


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_inference", ROOT / "bench" / "inference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REFUSED = "int8 weights move the output by 0.349 (> 10% of its range 2): not exported, because (test)"


@pytest.mark.parametrize("failure", ["export", "load"])
def test_an_int8_row_that_cannot_be_made_is_skipped_with_its_reason(monkeypatch, capsys, failure):
    """export: the exporter refuses the int8 graph; load: the loader refuses its form on this CPU."""
    bench = load_bench()
    real_export = bench.export_onnx

    def export(*args, weights="fp32", **kw):
        if weights == "int8" and failure == "export":
            raise RuntimeError(REFUSED)
        return real_export(*args, weights=weights, **kw)

    monkeypatch.setattr(bench, "export_onnx", export)
    monkeypatch.setattr(runtime, "u8s8_problem", lambda: "this x86 CPU has no VNNI (test)")
    monkeypatch.setattr(bench, "NetworkConfig", lambda: NetworkConfig(layers=1, heads=2, width=32))
    argv = ["--quick", "--ks", "1,2", "--runs", "2", "--json", "--int8-form", "u8s8"]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    report = json.loads(out.strip().splitlines()[-1])
    assert [r["k"] for r in report["results"]] == [1, 2] and report["int8_form"] == "u8s8"
    want = f"RuntimeError: {REFUSED}" if failure == "export" else "ModelError: model "
    for r in report["results"]:
        assert r["int8_skipped"].startswith(want), r["int8_skipped"]
        assert "ort_int8_ms_p50" not in r and r["best_path"] in ("step", "fused")
        assert math.isfinite(r["ort_fused_ms_p50"]) and r["max_abs_diff_fused"] <= 1e-3
        assert f"K={r['k']}: int8 (u8s8) skipped: {want}" in out
    if failure == "load":
        assert "saturate on x86 CPUs without VNNI" in report["results"][0]["int8_skipped"]


def test_model_rows_time_the_shipped_models_against_the_first():
    spec = importlib.util.spec_from_file_location("bench_inference", ROOT / "bench" / "inference.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    paths = bench.shipped_models()
    assert paths[0].name == "ant_locomotion.onnx"  # the node's default leads
    assert paths[-1].name == "ant_locomotion_denoiser.onnx"
    rows = bench.model_rows(paths, threads=1, runs=3)
    assert [r["model"] for r in rows] == [str(p) for p in paths]
    assert rows[0]["vs_first"] == 1.0
    for r in rows:
        assert r["ms_p50"] > 0 and r["ms_p99"] >= r["ms_p50"]
        assert r["steps"] >= 1 and r["spacing"] in ("leading", "trailing", "linspace")
