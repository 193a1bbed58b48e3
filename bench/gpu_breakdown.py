"""Where a GPU chunk's time goes: the session run against the host work around it, and the GPU's duty cycle.

Not a test; needs a CUDA GPU (without one it says so and exits 0). For the DiffuseLoco-size ort_fused graph
at each K (and the shipped default model), on CUDA with a captured graph:

- `predict_busy`: Policy.predict back to back (what bench/inference.py times, interleaved with other GPU
  rows that keep the clocks up);
- `predict_gap_<ms>`: the same with the robot's idle time between chunks (a chunk every 10 or 20 ms), where
  the GPU may lower its clocks between runs;
- `session_run`: the session run alone on the policy's device thread (graph replay and its synchronization;
  inputs already on the GPU);
- `upload` / `download`: one input's host-to-GPU update and the output's copy back;
- `tf32`: predict_busy with TF32 on, and its largest action difference from float32.

    python3 bench/gpu_breakdown.py [--ks 1,10] [--runs 200] [--json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _bench_inference():
    spec = importlib.util.spec_from_file_location("bench_inference", ROOT / "bench" / "inference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _p(ts: list[float]) -> dict[str, float]:
    a = np.asarray(ts) * 1e3
    return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99))}


def breakdown(policy, runs: int) -> dict:
    """The figures above for one loaded CUDA-graph policy."""
    obs = np.broadcast_to(policy.card.obs_mean, (policy.card.history, policy.card.obs_dim)).copy()
    noise = np.random.default_rng(0).standard_normal(policy._noise_shape).astype(np.float32)
    out = {}
    for _ in range(20):
        policy.predict(obs, noise=noise)
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        policy.predict(obs, noise=noise)
        ts.append(time.perf_counter() - t0)
    out["predict_busy"] = _p(ts)
    for gap_ms in (10, 20):
        ts = []
        for _ in range(max(50, runs // 4)):
            time.sleep(gap_ms / 1e3)
            t0 = time.perf_counter()
            policy.predict(obs, noise=noise)
            ts.append(time.perf_counter() - t0)
        out[f"predict_gap_{gap_ms}ms"] = _p(ts)

    def on_device(fn) -> list[float]:
        def job():
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return times

        return policy._device_thread.call(job)

    session, io, options = policy.session, policy._io, policy._run_options
    out["session_run"] = _p(on_device(lambda: session.run_with_iobinding(io, options)))
    role = "obs_history"
    out["upload"] = _p(on_device(lambda: policy._device[role].update_inplace(policy._host[role])))
    out_role = policy._out_role
    out["download"] = _p(on_device(lambda: policy._device[out_role].numpy()))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ks", default="1,10")
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    import torch

    from diffusion_controller.core import providers
    from diffusion_controller.core.runtime import Policy
    from diffusion_controller.training.export import export_onnx
    from diffusion_controller.training.network import DiffusionTransformer, NetworkConfig

    why = providers.gpu_provider_problem(providers.CUDA)
    if why is not None or providers.gpu_name(0) is None:
        print(f"gpu_breakdown: no CUDA GPU here ({why or 'no device 0'}); nothing to measure")
        return 0
    quiet = lambda _m: None  # noqa: E731
    card = _bench_inference().diffuseloco_card()
    torch.manual_seed(0)
    net = DiffusionTransformer(NetworkConfig()).eval()
    report: dict = {"gpu": providers.gpu_name(0), "rows": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for k in (int(x) for x in a.ks.split(",")):
            try:
                path = export_onnx(net, card, Path(tmp) / f"k{k}.onnx", steps=k, verify=False)
                p32 = Policy.load(path, provider="cuda", log=quiet)
                row = breakdown(p32, a.runs)
                p_tf = Policy.load(path, provider="cuda", log=quiet, tf32=True)
                obs = np.broadcast_to(card.obs_mean, (card.history, card.obs_dim))
                diff = float(np.abs(p_tf.predict(obs, seed=3) - p32.predict(obs, seed=3)).max())
                row["tf32"] = breakdown(p_tf, a.runs)["predict_busy"] | {"max_abs_diff_vs_fp32": diff}
                del p32, p_tf
            except Exception as e:  # a diagnostic: say what failed, measure the rest
                row = {"error": f"{type(e).__name__}: {e}"}
            report["rows"][f"diffuseloco_k{k}"] = row
    try:
        shipped = Policy.load(ROOT / "models" / "ant_locomotion.onnx", provider="cuda", log=quiet)
        report["rows"]["shipped"] = breakdown(shipped, a.runs)
    except Exception as e:
        report["rows"]["shipped"] = {"error": f"{type(e).__name__}: {e}"}
    for name, row in report["rows"].items():
        parts = row.get("error") or ", ".join(
            f"{key} {v['p50']:.3f}/{v['p99']:.3f}" for key, v in row.items() if isinstance(v, dict)
        )
        print(f"{name} (p50/p99 ms): {parts}")
    if a.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
