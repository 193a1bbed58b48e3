"""Chunk latency of a DiffuseLoco-size policy: torch eager vs ONNX Runtime (per-step loop and fused graph).

Not a test. For K in {1, 2, 5, 10} it times one action chunk (K denoising steps, normalization included)
on the same random weights and the same sampler: torch eager (the training network in inference mode
with ddim_torch's loop), ORT per-step (denoiser graph, K-step loop in core/ddim.py), ORT fused (the whole
chain in one graph) and the fused graph with int8 weights (export --weights int8 --int8-form F;
numerics change, so its largest action difference is printed). It prints median and p99 latency, the
speedup over torch of the best float ORT path (same numerics) and of the int8 graph, and a FLOP-bound
floor: the model's FLOPs per chunk (K full network evaluations) divided by the matmul peak of this CPU
measured in the same run with the same thread count. `floor_min_ms` uses the FLOPs the fused graph
really executes (observation tokens and their cross-attention K/V once per chunk). The machine may be
shared: the load average at start and end is printed; compare runs only when it was low.

The int8 row is optional: when it cannot be exported or loaded here (its output moves too far, or its
form is refused on this CPU) it is printed as skipped with the reason (`int8_skipped` in the JSON) and
the rest of the benchmark goes on.

GPU rows (`--provider cuda|tensorrt|all`, default all): the fused graph per K on CUDA without and with
CUDA graphs and on TensorRT fp32 and fp16 (each as Policy.load reports it really runs: a capture ONNX
Runtime refuses is dropped and said so), timed in the same interleaved runs. Where a provider cannot
load here, its rows are printed as skipped with the reason (`gpu_skipped` in the JSON); `--provider cpu`
leaves them out. The CPU rows always run on the CPU. Beside them, in the same interleaved runs: the
fused graph converted to fp16 (export --precision fp16) on CUDA with a CUDA graph (`cuda_graph_fp16`),
and the torch peer (`torch_cuda_graph`, `--no-torch-cuda-graph` leaves it out): the training network with
the same sampler loop captured in a torch.cuda.CUDAGraph over static buffers, host copies included, i.e.
what a PyTorch user would deploy; `ort_vs_torch_cuda_graph` is each ORT GPU row's p50 over the peer's
(< 1: ORT faster). Where torch has no CUDA the peer is skipped with the reason (`gpu_skipped`).

Also printed: the fp16 graph's largest action error against the float32 graph (both on ORT CPU,
`max_abs_diff_fp16_vs_fp32`), and nodes per denoising step (`nodes_per_step`: the K=2 fused graph minus
the K=1 one) in the file (non-Constant nodes), in ORT's CPU-optimized graph, and as a session places them
per provider (cpu; cuda where it loads).

Model rows (`--models`, default: every fused model shipped in models/, then the denoiser at the card's
K): each exported model times one chunk as the node runs it (Policy.predict on the same observation,
interleaved), with its latency as a fraction of the first model's, so a new shipped default is compared
with the old one in the same run (pass the old file first, e.g. from `git show`). `--models-only` skips
the DiffuseLoco-size rows.

    .venv/bin/python bench/inference.py [--quick] [--json] [--threads N] [--runs N] [--ks 1,2,5,10]
        [--provider cpu|cuda|tensorrt|all] [--engine-cache-dir DIR] [--models A.onnx B.onnx ...]
        [--models-only] [--no-torch-cuda-graph] [--no-fp16] [--tf32]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from diffuseloco import diffuseloco_card
from graph_cost import matmul_peak_gflops, network_flops, nodes_per_step
from torch_peers import torch_chunk, torch_cuda_graph_chunk, torch_cuda_graph_problem

from diffusion_controller.core import providers
from diffusion_controller.core.card_source import card_of_model
from diffusion_controller.core.runtime import INT8_FORMS, ModelError, Policy
from diffusion_controller.training.export import INT8_FORM, export_onnx
from diffusion_controller.training.network import DiffusionTransformer, NetworkConfig

#: GPU rows: name -> (provider, precision, cuda_graph) as the node's parameters.
GPU_CONFIGS = {
    "cuda": ("cuda", "fp32", False),
    "cuda_graph": ("cuda", "fp32", True),
    "cuda_graph_standard": ("cuda", "fp32", True),  # the traced opset-17 graph (export --ops standard)
    "tensorrt_fp32": ("tensorrt", "fp32", True),
    "tensorrt_fp16": ("tensorrt", "fp16", True),
}


def gpu_configs(which: str) -> tuple[dict[str, tuple[str, str, bool]], dict[str, str]]:
    """The GPU rows `--provider which` asks for that can load here, and the others with the reason."""
    problems = providers.gpu_problems() if which != "cpu" else {}
    run: dict[str, tuple[str, str, bool]] = {}
    skipped: dict[str, str] = {}
    for name, conf in GPU_CONFIGS.items():
        if which in ("all", conf[0]):
            why = problems.get(conf[0])
            if why is None:
                run[name] = conf
            else:
                skipped[name] = f"no {conf[0]} here: {why}"
    return run, skipped


def gpu_rows(a: argparse.Namespace) -> tuple[dict[str, tuple[str, str, bool]], dict[str, str], bool]:
    """The GPU rows to time and those skipped with the reason, the fp16 graph's and the torch peer's
    included; and whether the torch peer runs."""
    gpu_run, gpu_skipped = gpu_configs(a.provider)
    if a.fp16 and "cuda_graph" in gpu_run:
        gpu_run["cuda_graph_fp16"] = ("cuda", "fp32", True)  # the fp16 graph (precision is TensorRT's flag)
    elif a.fp16 and "cuda_graph" in gpu_skipped:
        gpu_skipped["cuda_graph_fp16"] = gpu_skipped["cuda_graph"]
    torch_graph_why = torch_cuda_graph_problem() if a.provider in ("all", "cuda") else None
    if a.provider in ("all", "cuda") and a.torch_cuda_graph and torch_graph_why is not None:
        gpu_skipped["torch_cuda_graph"] = torch_graph_why
    use_torch_graph = a.provider in ("all", "cuda") and a.torch_cuda_graph and torch_graph_why is None
    return gpu_run, gpu_skipped, use_torch_graph


def timed_interleaved(
    fns: dict[str, Callable[[], object]], runs: int, warmup: int = 3
) -> dict[str, list[float]]:
    """Round-robin timing, so load changes on a shared machine hit every path alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(runs):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            out[k].append(time.perf_counter() - t)
    return out


def p50_p99(ts: list[float]) -> tuple[float, float]:
    a = np.sort(np.array(ts)) * 1e3
    return float(np.median(a)), float(a[min(len(a) - 1, int(np.ceil(0.99 * len(a))) - 1)])


ROOT = Path(__file__).resolve().parents[1]


def shipped_models() -> list[Path]:
    """The fused models in models/ (the node's default first), then the denoiser."""
    found = sorted(ROOT.glob("models/*.onnx"))
    fused = [p for p in found if card_of_model(p).graph.kind == "fused"]
    fused.sort(key=lambda p: p.name != "ant_locomotion.onnx")
    return fused + [p for p in found if p not in fused]


def model_rows(paths: list[Path], threads: int, runs: int) -> list[dict]:
    """Chunk latency of exported models as the node runs them; `vs_first` relative to the first one."""
    quiet = lambda _m: None  # noqa: E731
    policies = {str(p): Policy.load(p, threads=threads, log=quiet) for p in paths}
    first = next(iter(policies.values())).card
    rng = np.random.default_rng(0)
    obs = first.obs_mean + first.obs_std * rng.standard_normal((first.history, first.obs_dim))
    for name, pol in policies.items():
        if (pol.card.history, pol.card.obs_dim) != (first.history, first.obs_dim):
            raise SystemExit(f"--models: {name} takes another observation shape than {paths[0]}")
    ts = timed_interleaved({n: (lambda p=p: p.predict(obs, seed=0)) for n, p in policies.items()}, runs)
    base = p50_p99(ts[str(paths[0])])[0]
    rows = []
    for name, pol in policies.items():
        p50, p99 = p50_p99(ts[name])
        c = pol.card
        rows.append({
            "model": name, "graph": c.graph.kind, "sampler": c.sampler_kind, "steps": pol.steps,
            "spacing": c.diffusion.timestep_spacing, "weights": c.network.get("weights", "fp32"),
            "ms_p50": p50, "ms_p99": p99, "vs_first": p50 / base, "runs_on": pol.describe(),
        })  # fmt: skip
    return rows


def print_model_rows(rows: list[dict]) -> None:
    print(
        f"{'model':<40} {'graph':>8} {'sampler':>9} {'K':>3} {'spacing':>9} {'p50':>9} {'p99':>9} "
        f"{'vs 1st':>7}"
    )
    for r in rows:
        print(
            f"{Path(r['model']).name:<40} {r['graph']:>8} {r['sampler']:>9} {r['steps']:>3} "
            f"{r['spacing']:>9} "
            f"{r['ms_p50']:>7.2f}ms {r['ms_p99']:>7.2f}ms {r['vs_first']:>7.2f}"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="few runs, finishes in well under a minute")
    ap.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads for torch and ORT (default 1)")
    ap.add_argument(
        "--runs", type=int, default=None, help="timed chunks per configuration (default 500, quick 15)"
    )
    ap.add_argument("--ks", default="1,2,5,10", help="comma-separated DDIM step counts")
    ap.add_argument(
        "--int8",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the fused graph with int8 weights (export --weights int8; default: on)",
    )
    ap.add_argument("--int8-form", choices=INT8_FORMS, default=INT8_FORM, help="export --int8-form")
    ap.add_argument(
        "--provider", choices=["cpu", "cuda", "tensorrt", "all"], default="all",
        help="GPU rows to add to the CPU rows: cuda (with and without CUDA graphs), tensorrt (fp32, fp16), "
        "all (default; skipped with the reason where there is no GPU), cpu (none)",
    )  # fmt: skip
    ap.add_argument("--engine-cache-dir", default="", help="TensorRT engines (default: the node's default)")
    ap.add_argument("--models", type=Path, nargs="+", default=None, help="exported models to time")
    ap.add_argument("--models-only", action="store_true", help="only the model rows")
    ap.add_argument(
        "--torch-cuda-graph", action=argparse.BooleanOptionalAction, default=True,
        help="time the torch peer on the GPU: the training network with the same sampler loop captured in "
        "a torch CUDA graph (default: on; skipped with the reason where torch has no CUDA)",
    )  # fmt: skip
    ap.add_argument(
        "--fp16", action=argparse.BooleanOptionalAction, default=True,
        help="the fused graph converted to fp16 (export --precision fp16): its largest action error against "
        "float32 on the CPU, and a cuda CUDA-graph row where cuda loads (default: on)",
    )  # fmt: skip
    ap.add_argument("--tf32", action="store_true", help="ORT cuda rows with TF32 matmuls (node param tf32)")
    return ap.parse_args(argv)


class Bench:
    """One run of the DiffuseLoco-size rows: the options, the network and its input, the GPU rows to add
    (and those skipped, with the reason), where the exports go, and the machine's figures.

    Plain classes here, not dataclasses: the tests load this file without registering it in sys.modules."""

    def __init__(self, a: argparse.Namespace, runs: int) -> None:
        """The network (random weights, seed 0), the start figures, one input, and the GPU rows asked for."""
        self.a, self.runs = a, runs
        self.load0 = os.getloadavg()[0]
        torch.manual_seed(0)
        torch.set_num_threads(a.threads)
        self.card = card = diffuseloco_card()
        self.cfg = NetworkConfig()  # 6 layers, 8 heads, width 256, 45 x 8 obs, 16 x 12 actions
        self.net = DiffusionTransformer(self.cfg).eval()
        self.peak_start = matmul_peak_gflops(a.threads, a.quick)
        self.flops = network_flops(self.cfg)  # full forward, fused step, once per chunk
        rng = np.random.default_rng(0)
        self.obs = rng.standard_normal((card.history, card.obs_dim))
        self.noise = rng.standard_normal((card.horizon, card.action_dim)).astype(np.float32)
        self.gpu_run, self.gpu_skipped, self.use_torch_graph = gpu_rows(a)
        self.tmp = Path()  # where the exports go (measure)
        self.nodes: dict[str, dict[str, float]] = {}
        self.nodes_standard: dict[str, dict[str, float]] = {}
        self.setup_s = self.load1 = self.peak = 0.0


class Chunks:
    """One K's chunk functions (timed interleaved, in this order) and what its row says about them."""

    def __init__(self, fns: dict[str, Callable[[], object]], fused: Policy, files: dict[str, Path | None]):
        self.fns, self.fused = fns, fused
        self.files = files  # fused, standard, fp16 (None where it could not be made)
        self.int8_skipped: str | None = None
        self.fp16_err: float | None = None
        self.fp16_why: str | None = None
        self.gpu: dict[str, Policy] = {}
        self.torch_graph_on: str | None = None


QUIET = lambda _m: None  # noqa: E731


def cpu_paths(b: Bench, k: int, den_path: Path) -> Chunks:
    """torch eager, ORT per-step, ORT fused, the traced fused graph, and the int8 graph where it loads."""
    a, net, card, obs, noise, tmp = b.a, b.net, b.card, b.obs, b.noise, b.tmp
    fused_path = export_onnx(net, card, tmp / f"fused{k}.onnx", graph="fused", steps=k, verify=False)
    fused = Policy.load(fused_path, provider="cpu", threads=a.threads, log=QUIET)
    # the traced graph the node ran before the ort_fused one: the baseline of the same run
    standard_path = export_onnx(net, card, tmp / f"standard{k}.onnx", steps=k, verify=False, ops="standard")
    standard = Policy.load(standard_path, provider="cpu", threads=a.threads, log=QUIET)
    step = Policy.load(den_path, provider="cpu", threads=a.threads, steps=k, log=QUIET)
    eager = torch_chunk(net, card, k)
    fns = {
        "torch": lambda eager=eager: eager(obs, noise),
        "step": lambda p=step: p.predict(obs, noise=noise),
        "fused": lambda p=fused: p.predict(obs, noise=noise),
        "fused_standard": lambda p=standard: p.predict(obs, noise=noise),
    }
    ch = Chunks(fns, fused, {"fused": fused_path, "standard": standard_path, "fp16": None})
    if a.int8:
        try:
            int8_path = export_onnx(
                net, card, tmp / f"fused{k}_int8.onnx", graph="fused", steps=k,
                weights="int8", int8_form=a.int8_form,
            )  # fmt: skip
            int8 = Policy.load(int8_path, provider="cpu", threads=a.threads, log=QUIET)
        except Exception as e:  # an optional row: say why, keep benchmarking the rest
            ch.int8_skipped = f"{type(e).__name__}: {e}"
        else:
            fns["int8"] = lambda p=int8: p.predict(obs, noise=noise)
    return ch


def add_fp16(b: Bench, k: int, ch: Chunks) -> None:
    """The fp16 graph: its largest action error against float32 on the CPU; the file for the GPU row."""
    try:
        ch.files["fp16"] = export_onnx(
            b.net, b.card, b.tmp / f"fused{k}_fp16.onnx", graph="fused", steps=k, precision="fp16"
        )
        fp16_cpu = Policy.load(ch.files["fp16"], provider="cpu", threads=b.a.threads, log=QUIET)
        a16, a32 = fp16_cpu.predict(b.obs, noise=b.noise), ch.fused.predict(b.obs, noise=b.noise)
        ch.fp16_err = float(np.abs(a16 - a32).max())
        del fp16_cpu  # timed on the GPU only: fp16 kernels on the CPU are slow, not the point
    except Exception as e:  # an optional figure: say why, keep benchmarking the rest
        ch.files["fp16"], ch.fp16_why = None, f"{type(e).__name__}: {e}"


def add_gpu(b: Bench, k: int, ch: Chunks) -> None:
    """The ORT GPU rows that load (the others skipped with the reason), then the torch CUDA-graph peer."""
    a, obs, noise = b.a, b.obs, b.noise
    for name, (prov, prec, graph) in b.gpu_run.items():
        path = ch.files["fp16"] if name.endswith("_fp16") and prov == "cuda" else ch.files["fused"]
        path = ch.files["standard"] if name.endswith("_standard") else path
        if path is None:
            continue
        try:
            ch.gpu[name] = Policy.load(
                path, provider=prov, precision=prec, cuda_graph=graph, threads=a.threads,
                engine_cache_dir=a.engine_cache_dir, log=QUIET, tf32=a.tf32,
            )  # fmt: skip
        except ModelError as e:  # a provider present but failing: say so, time the rest
            b.gpu_skipped[f"{name} K={k}"] = str(e)
        else:
            ch.fns[name] = lambda pol=ch.gpu[name]: pol.predict(obs, noise=noise)
    if b.use_torch_graph:
        try:
            peer, ch.torch_graph_on = torch_cuda_graph_chunk(b.net, b.card, k)
        except Exception as e:  # say why, time the rest
            b.gpu_skipped[f"torch_cuda_graph K={k}"] = f"{type(e).__name__}: {e}"
        else:
            ch.fns["torch_cuda_graph"] = lambda peer=peer: peer(obs, noise)


def measure_k(b: Bench, k: int, den_path: Path) -> dict:
    """One K's row: every path's chunk, checked against eager torch and timed interleaved."""
    ch = cpu_paths(b, k, den_path)
    if b.a.fp16:
        add_fp16(b, k, ch)
    add_gpu(b, k, ch)
    fns = ch.fns
    ref = fns["torch"]()
    diffs = {name: float(np.abs(fn() - ref).max()) for name, fn in fns.items() if name != "torch"}
    ts = timed_interleaved(fns, b.runs)
    (tp50, tp99), (sp50, sp99), (fp50, fp99) = (p50_p99(ts[n]) for n in ("torch", "step", "fused"))
    best = min(sp50, fp50)
    r = {
        "k": k,
        "torch_ms_p50": tp50,
        "torch_ms_p99": tp99,
        "ort_fused_ms_p50": fp50,
        "ort_fused_ms_p99": fp99,
        "ort_step_ms_p50": sp50,
        "ort_step_ms_p99": sp99,
        "speedup_vs_torch": tp50 / best,
        "floor_ms": 0.0,  # floors: filled in by add_floors with the best peak measured
        "ratio_to_floor": 0.0,
        "floor_min_ms": 0.0,
        "ratio_to_floor_min": 0.0,
        "provider": ch.fused.provider,
        "max_abs_diff_step": diffs["step"],
        "max_abs_diff_fused": diffs["fused"],
    }
    stp50, stp99 = p50_p99(ts["fused_standard"])
    r |= {"ort_fused_standard_ms_p50": stp50, "ort_fused_standard_ms_p99": stp99,
          "fused_vs_standard_p50": fp50 / stp50}  # fmt: skip
    paths = {"step": sp50, "fused": fp50}
    if ch.int8_skipped is not None:
        r["int8_skipped"] = ch.int8_skipped
    elif b.a.int8:
        ip50, ip99 = p50_p99(ts["int8"])
        paths["int8"] = ip50
        r |= {
            "ort_int8_ms_p50": ip50,
            "ort_int8_ms_p99": ip99,
            "speedup_int8_vs_torch": tp50 / ip50,
            "max_abs_diff_int8": diffs["int8"],
        }
    r["gpu"] = {}
    for name, pol in ch.gpu.items():
        gp50, gp99 = p50_p99(ts[name])
        r["gpu"][name] = {
            "ms_p50": gp50, "ms_p99": gp99, "speedup_vs_torch": tp50 / gp50, "provider": pol.provider,
            "precision": pol.precision, "cuda_graph": pol.cuda_graph, "runs_on": pol.describe(),
            "max_abs_diff": diffs[name],
        }  # fmt: skip
    if ch.fp16_err is not None:
        r["max_abs_diff_fp16_vs_fp32"] = ch.fp16_err  # fp16 graph vs float32 graph, both ORT CPU
    if ch.fp16_why is not None:
        r["fp16_skipped"] = ch.fp16_why
    if ch.torch_graph_on is not None:
        gp50, gp99 = p50_p99(ts["torch_cuda_graph"])
        r["gpu"]["torch_cuda_graph"] = {
            "ms_p50": gp50, "ms_p99": gp99, "speedup_vs_torch": tp50 / gp50, "provider": "torch",
            "precision": "fp32", "cuda_graph": True, "runs_on": ch.torch_graph_on,
            "max_abs_diff": diffs["torch_cuda_graph"],
        }  # fmt: skip
        # ORT's GPU rows over the torch peer (p50; < 1: ORT faster)
        r["ort_vs_torch_cuda_graph"] = {
            n: g["ms_p50"] / gp50 for n, g in r["gpu"].items() if n != "torch_cuda_graph"
        }
    r["best_path"] = min(paths, key=paths.__getitem__)
    r["speedup_best_vs_torch"] = tp50 / paths[r["best_path"]]  # int8 included (numerics differ)
    return r


def measure(b: Bench, ks: list[int]) -> list[dict]:
    """Nodes per denoising step, then one row per K; every export in one temporary folder."""
    with tempfile.TemporaryDirectory() as tmp:
        b.tmp = Path(tmp)
        t0 = time.perf_counter()
        gpu = "cuda" in b.gpu_run
        b.nodes = nodes_per_step(b.net, b.card, b.tmp, b.a.threads, gpu=gpu)
        b.nodes_standard = nodes_per_step(b.net, b.card, b.tmp, b.a.threads, gpu, ops="standard")
        den_path = export_onnx(b.net, b.card, b.tmp / "denoiser.onnx", graph="denoiser", verify=False)
        results = [measure_k(b, k, den_path) for k in ks]
        b.setup_s = time.perf_counter() - t0
    return results


def add_floors(b: Bench, results: list[dict]) -> None:
    """The FLOP-bound floors. A busy start would understate the peak, so the better of two measurements."""
    b.load1 = os.getloadavg()[0]
    b.peak = peak = max(b.peak_start, matmul_peak_gflops(b.a.threads, b.a.quick))
    full, per_step, per_chunk = b.flops
    for r in results:
        k, best = r["k"], min(r["ort_step_ms_p50"], r["ort_fused_ms_p50"])
        r["floor_ms"] = k * full / (peak * 1e9) * 1e3
        r["floor_min_ms"] = (k * per_step + per_chunk) / (peak * 1e9) * 1e3
        r["ratio_to_floor"], r["ratio_to_floor_min"] = best / r["floor_ms"], best / r["floor_min_ms"]


def print_table(b: Bench, results: list[dict]) -> None:
    """The policy and machine lines, then one line per K: CPU paths, floors, the int8 row."""
    a, cfg, card, net = b.a, b.cfg, b.card, b.net
    full, per_step, per_chunk = b.flops
    print(
        f"DiffuseLoco-size policy: {cfg.layers}x{cfg.heads}x{cfg.width}, {net.parameter_count() / 1e6:.2f}M "
        f"params, obs {card.history}x{card.obs_dim}, chunk {card.horizon}x{card.action_dim}; "
        f"{b.runs} runs each, interleaved"
    )
    print(
        f"CPU {os.cpu_count()} cores, threads={a.threads}, sgemm peak {b.peak:.1f} GFLOP/s; forward "
        f"{full / 1e6:.0f} MFLOP, fused step {per_step / 1e6:.0f} MFLOP + {per_chunk / 1e6:.0f} MFLOP "
        f"per chunk; load average {b.load0:.2f} -> {b.load1:.2f} (others share this machine)"
    )
    cols = ["K", "torch p50", "step p50", "fused p50", "fused p99", "speedup", "floor", "ratio", "floor_min",
            "ratio"]  # fmt: skip
    if a.int8:
        cols += ["int8 p50", "int8 x", "int8 err"]
    print(" ".join(f"{c:>10}" for c in cols))
    for r in results:
        row = [
            f"{r['k']}",
            f"{r['torch_ms_p50']:.2f}ms",
            f"{r['ort_step_ms_p50']:.2f}ms",
            f"{r['ort_fused_ms_p50']:.2f}ms",
            f"{r['ort_fused_ms_p99']:.2f}ms",
            f"{r['speedup_vs_torch']:.2f}x",
            f"{r['floor_ms']:.2f}ms",
            f"{r['ratio_to_floor']:.2f}",
            f"{r['floor_min_ms']:.2f}ms",
            f"{r['ratio_to_floor_min']:.2f}",
        ]
        if a.int8 and "int8_skipped" in r:
            row += ["skipped", "-", "-"]
        elif a.int8:
            row += [
                f"{r['ort_int8_ms_p50']:.2f}ms",
                f"{r['speedup_int8_vs_torch']:.2f}x",
                f"{r['max_abs_diff_int8']:.1e}",
            ]
        print(" ".join(f"{c:>10}" for c in row))


def print_notes(b: Bench, results: list[dict]) -> None:
    """Below the table: skipped rows, the GPU rows, ratios to the torch peer, fp16 errors, node counts."""
    for r in results:
        if "int8_skipped" in r:
            print(f"K={r['k']}: int8 ({b.a.int8_form}) skipped: {r['int8_skipped']}")
    if any(r["gpu"] for r in results):
        print(f"{'K':>3} {'GPU row':>14} {'p50':>9} {'p99':>9} {'vs torch':>9} {'max err':>9}  runs on")
        for r in results:
            for name, g in r["gpu"].items():
                print(
                    f"{r['k']:>3} {name:>14} {g['ms_p50']:>7.3f}ms {g['ms_p99']:>7.3f}ms "
                    f"{g['speedup_vs_torch']:>8.1f}x {g['max_abs_diff']:>9.1e}  {g['runs_on']}"
                )
    for r in results:
        if "ort_vs_torch_cuda_graph" in r:
            ratios = ", ".join(f"{n} {v:.2f}" for n, v in r["ort_vs_torch_cuda_graph"].items())
            print(f"K={r['k']}: ORT / torch CUDA graph (p50): {ratios}")
    if any("max_abs_diff_fp16_vs_fp32" in r for r in results):
        errs = ", ".join(f"K={r['k']} {r['max_abs_diff_fp16_vs_fp32']:.1e}" for r in results
                         if "max_abs_diff_fp16_vs_fp32" in r)  # fmt: skip
        print(f"fp16 graph, largest action error against float32 (ORT CPU, rad): {errs}")
    placed = " ".join(
        f"{src} {v['per_step']:.0f} (K=1 {v['k1']:.0f}, K=2 {v['k2']:.0f});" for src, v in b.nodes.items()
    )
    print(f"nodes per denoising step (fused graph, K=2 minus K=1): {placed}")
    placed = " ".join(f"{src} {v['per_step']:.0f};" for src, v in b.nodes_standard.items())
    print(f"  the same with the traced graph (export --ops standard): {placed}")
    ratios = ", ".join(
        f"K={r['k']} {r['ort_fused_ms_p50']:.2f} / {r['ort_fused_standard_ms_p50']:.2f} ms = "
        f"{r['fused_vs_standard_p50']:.2f}" for r in results
    )
    print(f"CPU fused p50, ort_fused / standard graph (same run; < 1: the new graph is faster): {ratios}")
    for name, why in b.gpu_skipped.items():
        print(f"GPU row {name} skipped: {why}")
    for r in results:
        if "fp16_skipped" in r:
            print(f"K={r['k']}: fp16 graph skipped: {r['fp16_skipped']}")


def report(b: Bench, results: list[dict], models: list[dict]) -> dict:
    """The JSON object (--json)."""
    a = b.a
    return {
        "results": results,
        "models": models,
        "threads": a.threads,
        "runs": b.runs,
        "peak_gflops": b.peak,
        "peak_gflops_start": b.peak_start,
        "forward_mflop": b.flops[0] / 1e6,
        "params": b.net.parameter_count(),
        "load_avg": [b.load0, b.load1],
        "setup_s": b.setup_s,
        "cpu_count": os.cpu_count(),
        "quick": a.quick,
        "int8": a.int8,
        "int8_form": a.int8_form,
        "provider": a.provider,
        "gpu_skipped": b.gpu_skipped,
        "nodes_per_step": b.nodes,
        "nodes_per_step_standard": b.nodes_standard,
        "tf32": a.tf32,
    }


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    runs = a.runs or (15 if a.quick else 500)
    models = model_rows(a.models or shipped_models(), a.threads, max(runs, 50))
    print_model_rows(models)
    if a.models_only:
        if a.json:
            print(json.dumps({"models": models, "threads": a.threads, "load_avg": os.getloadavg()[0]}))
        return 0
    ks = [int(k) for k in a.ks.split(",")]
    b = Bench(a, runs)
    results = measure(b, ks)
    add_floors(b, results)
    print_table(b, results)
    print_notes(b, results)
    if a.json:
        print(json.dumps(report(b, results, models)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
