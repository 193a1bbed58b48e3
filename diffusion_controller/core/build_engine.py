"""build_engine: build and cache a model's TensorRT engine ahead of time (console script `build_engine`).

TensorRT builds an engine the first time a session is created for a model on a GPU, which takes seconds
to minutes; on a robot that would happen on configure, with the robot waiting. This command creates the
same TensorRT session the node would (same cache directory per model and GPU, same precision, device
and ONNX Runtime), runs it once, and leaves the engine and timing cache where the node finds them.

Where TensorRT cannot load (no onnxruntime-gpu, no driver, no TensorRT libraries) there is nothing to
build: it says why and exits 0, so an install script may run it on any machine. Exit 1: a build failed.

    build_engine MODEL.onnx [MODEL.onnx ...] [--precision fp32|fp16|both] [--device-id N]
        [--engine-cache-dir DIR]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

from diffusion_controller.core import providers
from diffusion_controller.core.card import CardError
from diffusion_controller.core.runtime import ModelError, Policy
from diffusion_controller.core.session import SessionFactory, ort_session


def _engines(cache: Path | None) -> set[Path]:
    return set(cache.glob("*.engine")) if cache is not None and cache.is_dir() else set()


def build(
    model: Path,
    precision: str,
    device_id: int,
    engine_cache_dir: str,
    log: Callable[[str], None] = print,
    session_factory: SessionFactory = ort_session,
) -> Policy:
    """Create the node's TensorRT session for `model` (building or reusing its engine) and run it once."""
    t0 = time.perf_counter()
    policy = Policy.load(
        model, provider="tensorrt", precision=precision, cuda_graph=False, device_id=device_id,
        engine_cache_dir=engine_cache_dir, warmup=1, log=lambda _m: None, session_factory=session_factory,
    )  # fmt: skip
    cache = policy.engine_cache
    log(
        f"build_engine: {model} {precision} on GPU {device_id}: {policy.describe()}, "
        f"{time.perf_counter() - t0:.1f} s; engines in {cache} ({len(_engines(cache))} file(s))"
    )
    if policy.placement and policy.placement.get("cuda", 0) > 0:
        log(
            f"build_engine: {policy.placement['cuda']} node(s) stay on CUDA: TensorRT does not own the "
            "whole graph, so no TensorRT CUDA graph (cuda_graph) for this model"
        )
    return policy


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", type=Path, nargs="+", help="exported policies (.onnx with their card)")
    ap.add_argument(
        "--precision", choices=[*providers.PRECISIONS, "both"], default="fp32",
        help="engine precision, as the node's `precision` parameter (default fp32)",
    )  # fmt: skip
    ap.add_argument("--device-id", type=int, default=0, help="CUDA device, as the node's `device_id`")
    ap.add_argument(
        "--engine-cache-dir", default="",
        help=f"as the node's `engine_cache_dir` (default: {providers.default_engine_cache_dir()})",
    )  # fmt: skip
    a = ap.parse_args(argv)
    why = providers.gpu_provider_problem(providers.TRT)
    if why is not None:
        print(
            f"build_engine: TensorRT is not available here ({why}); nothing to build. The node (provider "
            "auto) falls back to cuda or the cpu."
        )
        return 0
    precisions = list(providers.PRECISIONS) if a.precision == "both" else [a.precision]
    failed = 0
    for model in a.models:
        for precision in precisions:
            try:
                build(model, precision, a.device_id, a.engine_cache_dir)
            except (ModelError, CardError) as e:
                print(f"build_engine: {model} {precision}: {e}", file=sys.stderr)
                failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
