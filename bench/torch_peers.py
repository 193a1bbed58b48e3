"""The torch rows bench/inference.py compares ONNX Runtime with: eager torch and the torch CUDA-graph peer.

Both run the training network with the same sampler loop (ddim_torch) and normalization as the exported
graphs, so their actions match the ORT rows' and their latency is what a PyTorch user would get.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from diffusion_controller.core.card import ModelCard
from diffusion_controller.training import ddim_torch
from diffusion_controller.training.network import DiffusionTransformer


def torch_chunk(
    net: DiffusionTransformer, card: ModelCard, k: int
) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """Eager torch: the training network, same sampler loop, normalization on both ends."""
    plan = card.diffusion.plan(k, 0.0)
    mean = torch.tensor(card.obs_mean, dtype=torch.float32)
    std = torch.tensor(card.obs_std, dtype=torch.float32)
    center = torch.tensor((card.action_max + card.action_min) / 2, dtype=torch.float32)
    half = torch.tensor((card.action_max - card.action_min) / 2, dtype=torch.float32)
    tsteps = {c.timestep: torch.tensor([c.timestep]) for c in plan}

    def run(obs: np.ndarray, noise: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            o = (torch.from_numpy(obs).float()[None] - mean) / std
            x = ddim_torch.sample_loop(
                lambda x, c: net(x, tsteps[c.timestep], o),
                torch.from_numpy(noise)[None],
                plan,
                card.diffusion,
            )
            return (x[0] * half + center).numpy().astype(np.float64)

    return run


def torch_cuda_graph_problem() -> str | None:
    """Why the torch CUDA-graph peer cannot run here, or None."""
    if not torch.cuda.is_available():
        built = torch.version.cuda or "no CUDA"
        return f"torch has no usable CUDA device here (torch {torch.__version__}, built for {built})"
    return None


def torch_cuda_graph_chunk(
    net: DiffusionTransformer, card: ModelCard, k: int, device: int = 0
) -> tuple[Callable[[np.ndarray, np.ndarray], np.ndarray], str]:
    """What a PyTorch user would deploy on a GPU: the training network with the same sampler loop and
    normalization, captured once in a torch.cuda.CUDAGraph over static device buffers; a call copies the
    observation and noise in (through pinned host buffers), replays, and copies the actions out. Returns
    (chunk function, what it runs on). The network is a copy; `net` stays on the CPU."""
    import copy

    dev = torch.device("cuda", device)
    gnet = copy.deepcopy(net).to(dev).eval()
    plan = card.diffusion.plan(k, 0.0)
    f32 = dict(dtype=torch.float32, device=dev)
    mean, std = torch.tensor(card.obs_mean, **f32), torch.tensor(card.obs_std, **f32)
    center = torch.tensor((card.action_max + card.action_min) / 2, **f32)
    half = torch.tensor((card.action_max - card.action_min) / 2, **f32)
    tsteps = {c.timestep: torch.tensor([c.timestep], device=dev) for c in plan}
    obs_host = torch.zeros((1, card.history, card.obs_dim), dtype=torch.float32).pin_memory()
    noise_host = torch.zeros((1, card.horizon, card.action_dim), dtype=torch.float32).pin_memory()
    out_host = torch.zeros((card.horizon, card.action_dim), dtype=torch.float32).pin_memory()
    obs_dev, noise_dev = obs_host.to(dev), noise_host.to(dev)

    def chain() -> torch.Tensor:
        o = (obs_dev - mean) / std
        den = lambda x, c: gnet(x, tsteps[c.timestep], o)  # noqa: E731
        x = ddim_torch.sample_loop(den, noise_dev, plan, card.diffusion)
        return x[0] * half + center

    graph = torch.cuda.CUDAGraph()
    with torch.no_grad():  # not inference_mode: run() writes into the static inputs outside of it
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # warm-up off the default stream, as torch's docs ask before capture
            for _ in range(3):
                chain()
        torch.cuda.current_stream(dev).wait_stream(side)
        with torch.cuda.graph(graph):
            out_dev = chain()
    torch.cuda.synchronize(dev)

    def run(obs: np.ndarray, noise: np.ndarray) -> np.ndarray:
        obs_host[0].copy_(torch.from_numpy(np.asarray(obs, dtype=np.float32)))
        noise_host[0].copy_(torch.from_numpy(noise))
        obs_dev.copy_(obs_host, non_blocking=True)
        noise_dev.copy_(noise_host, non_blocking=True)
        graph.replay()
        out_host.copy_(out_dev, non_blocking=True)
        torch.cuda.current_stream(dev).synchronize()
        return out_host.numpy().astype(np.float64)

    tf32 = "TF32 on" if torch.backends.cuda.matmul.allow_tf32 else "TF32 off"
    return run, f"torch CUDA graph, {tf32}, GPU {device} ({torch.cuda.get_device_name(dev)})"
