"""DDIM sampler math in numpy: the one place where schedules, timesteps and the step are defined.

The exported fused graph (training/ddim_torch.py), the runtime's per-step loop and the tests all take
their constants from here, so the three cannot drift apart. The math follows diffusers' DDIMScheduler
(float32 schedule constants as diffusers computes them) so that a policy trained with diffusers'
schedulers samples the same way here. The card's `timestep_spacing` picks which K timesteps are
visited, as diffusers' option of that name: "leading" (the default, what models without the field were
made with), "trailing" (starts at T-1: Lin et al. 2024, "Common Diffusion Noise Schedules and Sample
Steps Are Flawed") or "linspace".

Overwrite-inpainting (real-time chunking without gradients): before every denoising step, the masked
positions of x_t are replaced by the prefix noised to the current level, sqrt(a_t) p + sqrt(1-a_t) n0,
with n0 the initial noise; after the last step they are replaced by the prefix itself. A mask value m in
(0, 1) blends the two linearly (m = 1 frozen, m = 0 free).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "sample")
#: diffusers' DDIMScheduler `timestep_spacing` values; the card takes its choices from here.
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def make_betas(schedule: str, train_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    """Per-step betas (float32, as diffusers builds them, so alphas_cumprod matches bit for bit)."""
    n = int(train_timesteps)
    if schedule == "linear":
        betas = np.linspace(beta_start, beta_end, n, dtype=np.float64)
    elif schedule == "scaled_linear":
        betas = np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2
    elif schedule == "squaredcos_cap_v2":

        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)])
    else:
        raise ValueError(f"beta_schedule: expected one of {BETA_SCHEDULES}, got {schedule!r}")
    return betas.astype(np.float32)


def make_alphas_cumprod(
    schedule: str, train_timesteps: int, beta_start: float, beta_end: float
) -> np.ndarray:
    """Cumulative product of (1 - beta), float32 like diffusers (torch.cumprod is sequential too)."""
    alphas = np.float32(1.0) - make_betas(schedule, train_timesteps, beta_start, beta_end)
    return np.cumprod(alphas, dtype=np.float32)


@dataclass(frozen=True)
class StepCoefficients:
    """Scalars of one DDIM step t -> t_prev; everything the step needs besides the tensors."""

    timestep: int
    prev_timestep: int
    sqrt_alpha: float  # sqrt(a_t)
    sqrt_one_minus_alpha: float  # sqrt(1 - a_t)
    sqrt_alpha_prev: float  # sqrt(a_prev)
    direction: float  # sqrt(1 - a_prev - std^2): weight of the predicted noise
    std: float  # eta * sigma_t: weight of the fresh variance noise


#: Weight of the prefix in a noised sample below which a denoising step cannot be steered by it.
PREFIX_SIGNAL_MIN = 0.1


@dataclass(frozen=True)
class DDIMConfig:
    """The card's `diffusion` section plus the sampler's eta; builds the per-K step plan."""

    train_timesteps: int = 100
    beta_schedule: str = "squaredcos_cap_v2"
    beta_start: float = 0.0001
    beta_end: float = 0.02
    prediction_type: str = "epsilon"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    timestep_spacing: str = "leading"

    def alphas_cumprod(self) -> np.ndarray:
        return make_alphas_cumprod(self.beta_schedule, self.train_timesteps, self.beta_start, self.beta_end)

    def check_steps(self, steps: int) -> None:
        """Raise ValueError unless K steps stay inside the trained timesteps with this spacing."""
        check_steps(steps, self.train_timesteps, self.steps_offset, self.timestep_spacing)

    def timesteps(self, steps: int) -> np.ndarray:
        """The K timesteps, highest first, as diffusers' DDIMScheduler.set_timesteps makes them.

        steps_offset counts for "leading" only, as in diffusers.
        """
        self.check_steps(steps)
        t, k = self.train_timesteps, int(steps)
        if self.timestep_spacing == "leading":
            return (np.arange(k, dtype=np.int64) * (t // k))[::-1].copy() + self.steps_offset
        if self.timestep_spacing == "trailing":
            # diffusers' arange over a float step gives K+1 values for some K (T=100: K=29, 31, 58, ...),
            # the extra one rounding to -1; the first K are diffusers' timesteps.
            return (np.round(np.arange(t, 0, -t / k))[:k] - 1).astype(np.int64)
        return np.linspace(0, t - 1, k).round()[::-1].astype(np.int64)

    def prefix_steers(self, steps: int) -> bool:
        """Whether overwrite-inpainting can steer a K-step run: some step must see the prefix above the
        noise (sqrt(a_t) >= PREFIX_SIGNAL_MIN). A single step at t=T-1 of a squared-cosine schedule sees it
        at 0.0005: the rest of the chunk ignores the prefix, which is only pasted over its start."""
        ac = self.alphas_cumprod()
        return bool(np.sqrt(ac[self.timesteps(steps)]).max() >= PREFIX_SIGNAL_MIN)

    def plan(self, steps: int, eta: float = 0.0) -> tuple[StepCoefficients, ...]:
        """Coefficients of every step of a K-step DDIM run (float64 from the float32 schedule)."""
        if not (eta >= 0.0 and math.isfinite(eta)):
            raise ValueError(f"eta: expected a finite value >= 0, got {eta!r}")
        ac = self.alphas_cumprod().astype(np.float64)
        final = 1.0 if self.set_alpha_to_one else float(ac[0])
        timesteps = self.timesteps(steps)
        # diffusers' step() always goes to t - T // K, whatever the spacing: with "trailing" or
        # "linspace" that need not be the next visited timestep (T=100, K=7 trailing: 85 -> a_71, then
        # t=70). Reproduced as it is, so a model samples here as it did under diffusers.
        ratio = self.train_timesteps // steps
        out = []
        for t in timesteps:
            t = int(t)
            prev = t - ratio
            a_t = float(ac[t])
            a_prev = float(ac[prev]) if prev >= 0 else final
            variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
            std = eta * math.sqrt(max(variance, 0.0))
            out.append(
                StepCoefficients(
                    timestep=t,
                    prev_timestep=prev,
                    sqrt_alpha=math.sqrt(a_t),
                    sqrt_one_minus_alpha=math.sqrt(1 - a_t),
                    sqrt_alpha_prev=math.sqrt(a_prev),
                    direction=math.sqrt(max(1 - a_prev - std * std, 0.0)),
                    std=std,
                )
            )
        return tuple(out)


def check_steps(
    steps: int, train_timesteps: int, steps_offset: int = 0, timestep_spacing: str = "leading"
) -> None:
    """Raise ValueError unless K steps with this spacing (and offset) stay inside the trained timesteps."""
    if timestep_spacing not in TIMESTEP_SPACINGS:
        raise ValueError(
            f"timestep_spacing: expected one of {list(TIMESTEP_SPACINGS)}, got {timestep_spacing!r}"
        )
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps: expected an integer >= 1, got {steps!r}")
    if steps > train_timesteps:
        raise ValueError(f"steps: expected <= train_timesteps ({train_timesteps}), got {steps}")
    if timestep_spacing != "leading":
        return  # trailing and linspace start at T-1 (linspace K=1: at 0) and ignore steps_offset
    top = (steps - 1) * (train_timesteps // steps) + steps_offset
    if top >= train_timesteps:
        raise ValueError(
            f"steps: {steps} steps with steps_offset {steps_offset} reach timestep {top}, "
            f"expected < train_timesteps ({train_timesteps})"
        )


class StepWorkspace:
    """Preallocated scratch arrays for `step`, so a sampling loop allocates nothing per call."""

    def __init__(self, shape: tuple[int, ...], dtype=np.float32) -> None:
        self.x0 = np.empty(shape, dtype)
        self.eps = np.empty(shape, dtype)


def step(
    sample: np.ndarray,
    model_output: np.ndarray,
    c: StepCoefficients,
    config: DDIMConfig,
    *,
    variance_noise: np.ndarray | None = None,
    out: np.ndarray | None = None,
    work: StepWorkspace | None = None,
) -> np.ndarray:
    """One DDIM step x_t -> x_prev (diffusers' DDIMScheduler.step, use_clipped_model_output=False)."""
    if work is None:
        work = StepWorkspace(sample.shape, np.result_type(sample, model_output))
    x0, eps = work.x0, work.eps
    if config.prediction_type == "epsilon":
        np.copyto(eps, model_output)
        np.multiply(model_output, -c.sqrt_one_minus_alpha, out=x0)
        x0 += sample
        x0 /= c.sqrt_alpha
    elif config.prediction_type == "sample":
        np.copyto(x0, model_output)
        np.multiply(model_output, -c.sqrt_alpha, out=eps)
        eps += sample
        eps /= c.sqrt_one_minus_alpha
    else:
        raise ValueError(
            f"prediction_type: expected one of {PREDICTION_TYPES}, got {config.prediction_type!r}"
        )
    if config.clip_sample:
        np.clip(x0, -config.clip_sample_range, config.clip_sample_range, out=x0)
    if out is None:
        out = np.empty_like(x0)
    np.multiply(x0, c.sqrt_alpha_prev, out=out)
    eps *= c.direction
    out += eps
    if c.std > 0.0:
        if variance_noise is None:
            raise ValueError("variance_noise: expected an array when eta > 0")
        np.multiply(variance_noise, c.std, out=eps)
        out += eps
    return out


def blend(
    x: np.ndarray, target: np.ndarray, m: np.ndarray, m_inv: np.ndarray, *, out: np.ndarray, tmp: np.ndarray
) -> np.ndarray:
    """out = m*target + (1-m)*x with m, m_inv = 1-m shaped (horizon, 1); equals target where m == 1.

    Same operation order as the exported graph, so ORT and numpy agree to the last bit.
    """
    np.multiply(x, m_inv, out=out)
    np.multiply(target, m, out=tmp)
    out += tmp
    return out


def sample_loop(
    denoise: Callable[[np.ndarray, int], np.ndarray],
    noise: np.ndarray,
    plan: tuple[StepCoefficients, ...],
    config: DDIMConfig,
    *,
    prefix: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    variance_noise: np.ndarray | None = None,
    final_blend: bool = True,
) -> np.ndarray:
    """Reference K-step DDIM with overwrite-inpainting in normalized action space (allocating version).

    `denoise(x_t, t)` returns the model output; `mask` is (horizon,); `variance_noise[i]` is step i's
    fresh noise (needed when eta > 0). final_blend=False leaves the last overwrite to the caller.
    """
    x = noise.copy()
    work = StepWorkspace(x.shape, x.dtype)
    tmp, tmp2 = np.empty_like(x), np.empty_like(x)
    inpaint = prefix is not None and mask is not None
    if inpaint:
        m = np.asarray(mask, x.dtype)[:, None]
        m_inv = np.asarray(1.0 - m, x.dtype)
        prefix = np.asarray(prefix, x.dtype)
    for i, c in enumerate(plan):
        if inpaint:
            noised = c.sqrt_alpha * prefix + c.sqrt_one_minus_alpha * noise
            blend(x, noised, m, m_inv, out=tmp, tmp=tmp2)
            x, tmp = tmp, x
        model_output = denoise(x, c.timestep)
        vn = None if variance_noise is None else variance_noise[i]
        step(x, model_output, c, config, variance_noise=vn, out=tmp, work=work)
        x, tmp = tmp, x
    if inpaint and final_blend:
        blend(x, prefix, m, m_inv, out=tmp, tmp=tmp2)
        x = tmp
    return x
