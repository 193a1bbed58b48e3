"""build_engine: no-op with its reason where TensorRT cannot load (here); the node's session where it can."""

from __future__ import annotations

import subprocess
import sys

import pytest
from gpu_fakes import Factory, fake_gpu
from tiny_models import make_tiny_model

from diffusion_controller.core import build_engine, providers


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("engine_model"), graph="fused", steps=2, ops="standard")


def test_without_tensorrt_it_says_why_and_exits_0(model, tmp_path):
    if providers.gpu_provider_problem(providers.TRT) is None:
        pytest.skip("TensorRT loads on this machine")
    cmd = [sys.executable, "-m", "diffusion_controller.core.build_engine", str(model),
           "--engine-cache-dir", str(tmp_path)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "TensorRT is not available here" in out.stdout and "nothing to build" in out.stdout
    assert list(tmp_path.iterdir()) == []


def test_it_builds_into_the_cache_the_node_uses(model, tmp_path, monkeypatch):
    fake_gpu(monkeypatch)
    f = Factory()
    lines: list[str] = []
    p = build_engine.build(model, "fp16", 0, str(tmp_path), lines.append, session_factory=f)
    ((provider, graph, entries),) = f.calls  # one TensorRT session, no CPU fallback
    trt = entries[0][1]
    assert (provider, graph, trt["trt_fp16_enable"]) == ("tensorrt", False, "1")
    assert trt["trt_engine_cache_path"] == str(p.engine_cache)
    assert p.engine_cache.parent.parent == tmp_path and p.engine_cache.is_dir()
    assert f.sessions[0].runs >= 1  # run once, so the engine met real inputs
    assert "tensorrt fp16" in lines[0] and str(p.engine_cache) in lines[0]
    assert "stay on CUDA" not in "\n".join(lines)


def test_a_failed_build_exits_1(model, monkeypatch):
    def refuse(*_args, **_kw):
        raise build_engine.ModelError("engine build failed")

    monkeypatch.setattr(providers, "gpu_provider_problem", lambda _p: None)
    monkeypatch.setattr(build_engine, "build", refuse)
    assert build_engine.main([str(model), "--precision", "both"]) == 1
