"""Torch mirror of core/ddim.py, for the exported fused graph and for torch-side sampling.

The step coefficients come from core/ddim.py as Python floats, so in an exported graph they become
constants and the sampler math cannot differ from the runtime's numpy loop; the operation order is the
same as core.ddim.step and core.ddim.blend so that results agree to float32 rounding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from diffusion_controller.core.ddim import DDIMConfig, StepCoefficients


def step(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    c: StepCoefficients,
    config: DDIMConfig,
    variance_noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One DDIM step x_t -> x_prev (see core.ddim.step)."""
    if config.prediction_type == "epsilon":
        eps = model_output
        x0 = (sample + model_output * (-c.sqrt_one_minus_alpha)) / c.sqrt_alpha
    elif config.prediction_type == "sample":
        x0 = model_output
        eps = (sample + model_output * (-c.sqrt_alpha)) / c.sqrt_one_minus_alpha
    else:
        raise ValueError(f"prediction_type: unknown {config.prediction_type!r}")
    if config.clip_sample:
        x0 = x0.clamp(-config.clip_sample_range, config.clip_sample_range)
    out = x0 * c.sqrt_alpha_prev + eps * c.direction
    if c.std > 0.0:
        if variance_noise is None:
            raise ValueError("variance_noise: expected a tensor when eta > 0")
        out = out + variance_noise * c.std
    return out


def blend(x: torch.Tensor, target: torch.Tensor, m: torch.Tensor, m_inv: torch.Tensor) -> torch.Tensor:
    """m*target + (1-m)*x (see core.ddim.blend); equals target where m == 1."""
    return x * m_inv + target * m


def sample_loop(
    denoise: Callable[[torch.Tensor, StepCoefficients], torch.Tensor],
    noise: torch.Tensor,
    plan: tuple[StepCoefficients, ...],
    config: DDIMConfig,
    *,
    prefix: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    variance_noise: torch.Tensor | None = None,
    final_blend: bool = True,
) -> torch.Tensor:
    """K-step DDIM with overwrite-inpainting: noise/prefix (B,H,A), mask (B,H), variance_noise (B,K,H,A).

    final_blend=False leaves the last overwrite to the caller (the fused graph does it in robot units).
    """
    x = noise
    m = m_inv = None
    if prefix is not None and mask is not None:
        m = mask.unsqueeze(-1)
        m_inv = 1.0 - m
    for i, c in enumerate(plan):
        if m is not None:
            x = blend(x, prefix * c.sqrt_alpha + noise * c.sqrt_one_minus_alpha, m, m_inv)
        vn = None if variance_noise is None else variance_noise[:, i]
        x = step(x, denoise(x, c), c, config, vn)
    if m is not None and final_blend:
        x = blend(x, prefix, m, m_inv)
    return x
