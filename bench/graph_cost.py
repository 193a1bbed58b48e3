"""What one chunk of a policy costs apart from its latency: matmul FLOPs, this CPU's sgemm peak (the two
give bench/inference.py its FLOP-bound floor) and ONNX nodes per denoising step (in the file, after ONNX
Runtime's optimizations, and as a session places them per provider)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from diffusion_controller.core import providers
from diffusion_controller.core.card import ModelCard
from diffusion_controller.training.export import export_onnx
from diffusion_controller.training.network import DiffusionTransformer, NetworkConfig


def network_flops(cfg: NetworkConfig) -> tuple[float, float, float]:
    """(FLOPs of one full forward, FLOPs per step in the fused graph, FLOPs once per chunk there).

    Counts matmuls only (2 per multiply-add): linear layers and the attention products.
    """
    w, h, s, ff = cfg.width, cfg.horizon, cfg.cond_tokens, cfg.ff_mult * cfg.width
    n_obs = s - 1
    lin = lambda rows, i, o: 2.0 * rows * i * o  # noqa: E731
    # action tokens: input embedding, per layer self-attn (q, kv, out), cross (q, out), FF; head
    per_layer_tokens = (
        lin(h, w, 3 * w) + lin(h, w, w) + lin(h, w, w) + lin(h, w, w) + lin(h, w, ff) + lin(h, ff, w)
    )
    attn = 2.0 * (2 * h * h * w) + 2.0 * (2 * h * s * w)  # scores and weighted sums, self and cross
    decode = lin(h, cfg.action_dim, w) + cfg.layers * (per_layer_tokens + attn) + lin(h, w, cfg.action_dim)
    enc_token = lin(1, w, 4 * w) + lin(1, 4 * w, w)  # per cond token
    kv_token = cfg.layers * lin(1, w, 2 * w)  # cross-attention K/V per cond token, all layers
    obs_embed = lin(cfg.history, cfg.obs_dim, w) + (lin(cfg.history, 3, w) if cfg.command_slice else 0.0)
    full = decode + s * (enc_token + kv_token) + obs_embed
    per_chunk = n_obs * (enc_token + kv_token) + obs_embed  # the fused graph's hoisted part
    return full, decode, per_chunk  # the timestep token's share is constant-folded in the fused graph


def matmul_peak_gflops(threads: int, quick: bool) -> float:
    """Best sgemm rate (torch, same thread count) on large square matrices."""
    torch.set_num_threads(threads)
    n = 768 if quick else 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(5 if quick else 15):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best / 1e9


def count_nodes(path: Path) -> int:
    """Non-Constant nodes of an ONNX file's main graph (the onnx package's view of the file)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return sum(1 for n in graph.node if n.op_type != "Constant")


def placed_nodes(path: Path, provider: str, threads: int) -> dict[str, int] | None:
    """Nodes per EP after ONNX Runtime's optimizations, as a session on `provider` places them."""
    import onnxruntime as ort

    from diffusion_controller.core.session import session_options

    entries = [(providers.CUDA, {"use_tf32": "0"}), providers.CPU] if provider == "cuda" else [providers.CPU]
    sess = ort.InferenceSession(str(path), session_options(threads, True), providers=entries)
    return providers.placement(sess)


def optimized_nodes(path: Path, threads: int) -> int:
    """Non-Constant nodes of the graph ONNX Runtime's CPU optimizations make (optimized_model_filepath)."""
    import onnxruntime as ort

    from diffusion_controller.core.session import session_options

    so = session_options(threads, False)
    out = path.with_name(path.stem + "_ort_optimized.onnx")
    so.optimized_model_filepath = str(out)
    ort.InferenceSession(str(path), so, providers=[providers.CPU])
    return count_nodes(out)


def nodes_per_step(net: DiffusionTransformer, card: ModelCard, tmp: Path, threads: int,
                   gpu: bool, ops: str = "ort_fused") -> dict[str, dict[str, float]]:  # fmt: skip
    """Nodes per denoising step: the K=2 fused graph minus the K=1 one, in the file (non-Constant nodes),
    in the graph ONNX Runtime's CPU optimizations write out, and as a session places them (per provider:
    cpu, and cuda where usable; its session options, so what the node gets)."""
    paths = {k: export_onnx(net, card, tmp / f"count{ops}{k}.onnx", graph="fused", steps=k, verify=False,
                            ops=ops) for k in (1, 2)}  # fmt: skip
    out = {"file": {f"k{k}": float(count_nodes(p)) for k, p in paths.items()}}
    out["ort_cpu_optimized_file"] = {f"k{k}": float(optimized_nodes(p, threads)) for k, p in paths.items()}
    for prov in ("cpu", "cuda") if gpu else ("cpu",):
        placed = {k: placed_nodes(p, prov, threads) for k, p in paths.items()}
        if all(v is not None for v in placed.values()):
            out[f"ort_{prov}"] = {f"k{k}": float(sum(v.values())) for k, v in placed.items()}
            if prov != "cpu":
                out[f"ort_{prov}"] |= {f"k{k}_on_{prov}": float(v.get(prov, 0)) for k, v in placed.items()}
    for v in out.values():
        v["per_step"] = v["k2"] - v["k1"]
    return out
