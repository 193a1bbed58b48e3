"""DDIM math (core/ddim.py and its torch mirror) against diffusers' DDIMScheduler, the reference."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from diffusion_controller.core import ddim
from diffusion_controller.core.ddim import DDIMConfig
from diffusion_controller.training import ddim_torch

SHAPE = (8, 6)


def reference(cfg: DDIMConfig) -> DDIMScheduler:
    return DDIMScheduler(
        num_train_timesteps=cfg.train_timesteps,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        beta_schedule=cfg.beta_schedule,
        clip_sample=cfg.clip_sample,
        clip_sample_range=cfg.clip_sample_range,
        set_alpha_to_one=cfg.set_alpha_to_one,
        steps_offset=cfg.steps_offset,
        prediction_type=cfg.prediction_type,
        timestep_spacing="leading",
    )


def fake_model(x: np.ndarray, t: int, prediction_type: str) -> np.ndarray:
    """A smooth stand-in for the network: noise-like for epsilon, sample-like (in [-1, 1]) for sample."""
    mix = 0.2 * x.mean(axis=-2, keepdims=True)  # rows influence each other, like attention does
    if prediction_type == "epsilon":
        return (0.8 * x + 0.3 * np.sin(x * 3.0 + t * 0.05) + mix).astype(np.float32)
    return np.tanh(1.5 * x + 0.01 * t + mix).astype(np.float32)


@pytest.mark.parametrize("schedule", ddim.BETA_SCHEDULES)
def test_alphas_cumprod_match_diffusers(schedule):
    cfg = DDIMConfig(train_timesteps=100, beta_schedule=schedule)
    ours = cfg.alphas_cumprod()
    theirs = reference(cfg).alphas_cumprod.numpy()
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    ("k", "offset", "t"), [(1, 0, 100), (2, 0, 100), (5, 1, 100), (10, 0, 100), (7, 3, 1000)]
)
def test_timesteps_match_diffusers(k, offset, t):
    cfg = DDIMConfig(train_timesteps=t, steps_offset=offset)
    sched = reference(cfg)
    sched.set_timesteps(k)
    np.testing.assert_array_equal(cfg.timesteps(k), sched.timesteps.numpy())


CASES = list(
    itertools.product(
        (1, 2, 5, 10),  # K
        ("epsilon", "sample"),
        (True, False),  # clip_sample
        (0.0, 0.7),  # eta
    )
)


@pytest.mark.parametrize(("k", "prediction_type", "clip", "eta"), CASES)
def test_sampling_chain_matches_diffusers(k, prediction_type, clip, eta):
    """Whole K-step chains (numpy and torch) follow diffusers' DDIMScheduler.step to 1e-5."""
    cfg = DDIMConfig(
        train_timesteps=100,
        beta_schedule="squaredcos_cap_v2" if clip else "linear",
        prediction_type=prediction_type,
        clip_sample=clip,
        clip_sample_range=0.8,
        set_alpha_to_one=k % 2 == 0,
        steps_offset=1 if k == 5 else 0,
    )
    rng = np.random.default_rng(k)
    x_T = rng.standard_normal(SHAPE).astype(np.float32)
    vnoise = rng.standard_normal((k, *SHAPE)).astype(np.float32)

    sched = reference(cfg)
    sched.set_timesteps(k)
    x_ref = torch.from_numpy(x_T.copy())
    for i, t in enumerate(sched.timesteps):
        mo = torch.from_numpy(fake_model(x_ref.numpy(), int(t), prediction_type))
        vn = torch.from_numpy(vnoise[i]) if eta > 0 else None
        x_ref = sched.step(mo, t, x_ref, eta=eta, variance_noise=vn).prev_sample
    x_ref = x_ref.numpy()

    plan = cfg.plan(k, eta)
    assert [c.timestep for c in plan] == sched.timesteps.tolist()
    x_np = ddim.sample_loop(
        lambda x, t: fake_model(x, t, prediction_type), x_T, plan, cfg, variance_noise=vnoise if eta else None
    )
    x_t = x_T_t = torch.from_numpy(x_T.copy())[None]
    x_t = ddim_torch.sample_loop(
        lambda x, c: torch.from_numpy(fake_model(x.numpy(), c.timestep, prediction_type)),
        x_T_t,
        plan,
        cfg,
        variance_noise=torch.from_numpy(vnoise)[None] if eta else None,
    )[0].numpy()
    scale = max(1.0, float(np.abs(x_ref).max()))
    np.testing.assert_allclose(x_np, x_ref, rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(x_t, x_ref, rtol=1e-5, atol=1e-5 * scale)
    if k > 1:  # (K=1 "leading" spacing only visits t=0, which barely changes the sample)
        assert np.abs(x_ref - x_T).max() > 1e-2


def test_single_step_matches_diffusers_at_every_timestep():
    cfg = DDIMConfig(train_timesteps=50, beta_schedule="scaled_linear", beta_end=0.012, clip_sample=False)
    sched = reference(cfg)
    sched.set_timesteps(10)
    rng = np.random.default_rng(3)
    for c in cfg.plan(10, 0.3):
        x = rng.standard_normal(SHAPE).astype(np.float32)
        mo = rng.standard_normal(SHAPE).astype(np.float32)
        vn = rng.standard_normal(SHAPE).astype(np.float32)
        x_t, mo_t, vn_t = (torch.from_numpy(a) for a in (x, mo, vn))
        want = sched.step(mo_t, c.timestep, x_t, eta=0.3, variance_noise=vn_t).prev_sample.numpy()
        got = ddim.step(x, mo, c, cfg, variance_noise=vn)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_step_in_place_equals_out_of_place():
    """The runtime steps in place (out=sample); aliasing must not change the result."""
    cfg = DDIMConfig(prediction_type="sample")
    c = cfg.plan(4, 0.5)[1]
    rng = np.random.default_rng(0)
    x, mo, vn = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(3))
    want = ddim.step(x.copy(), mo, c, cfg, variance_noise=vn)
    work = ddim.StepWorkspace(SHAPE)
    ddim.step(x, mo, c, cfg, variance_noise=vn, out=x, work=work)
    np.testing.assert_array_equal(x, want)


def test_inpainting_freezes_masked_rows_exactly_and_only_them():
    cfg = DDIMConfig()
    plan = cfg.plan(5)
    rng = np.random.default_rng(1)
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    prefix = rng.uniform(-0.9, 0.9, SHAPE).astype(np.float32)
    mask = np.array([1, 1, 1, 0, 0, 0, 0, 0], np.float32)
    seen = []

    def model(x, t):
        seen.append(x.copy())
        return fake_model(x, t, "epsilon")

    out = ddim.sample_loop(model, noise, plan, cfg, prefix=prefix, mask=mask)
    np.testing.assert_array_equal(out[:3], prefix[:3])
    assert np.all(np.abs(out[3:] - prefix[3:]) > 1e-6)
    # before each model call the frozen rows sit at the prefix noised to that step's level
    for x, c in zip(seen, plan, strict=True):
        want = c.sqrt_alpha * prefix[:3] + c.sqrt_one_minus_alpha * noise[:3]
        np.testing.assert_allclose(x[:3], want, rtol=0, atol=1e-6)
    free = ddim.sample_loop(lambda x, t: fake_model(x, t, "epsilon"), noise, plan, cfg)
    assert np.abs(free[3:] - out[3:]).max() > 1e-4  # the prefix steers the free rows too


@pytest.mark.parametrize(
    ("steps", "offset", "field"),
    [(0, 0, "steps"), (101, 0, "steps"), (100, 1, "steps"), (2.5, 0, "steps")],
)
def test_bad_step_counts_are_rejected(steps, offset, field):
    with pytest.raises(ValueError, match=field):
        ddim.check_steps(steps, 100, offset)


def test_unknown_schedule_is_rejected():
    with pytest.raises(ValueError, match="beta_schedule"):
        ddim.make_betas("cosine", 100, 1e-4, 0.02)
