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
        timestep_spacing=cfg.timestep_spacing,
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


def diffusers_chain(cfg: DDIMConfig, k: int, eta: float, x_T: np.ndarray, vnoise: np.ndarray):
    """diffusers' DDIMScheduler step loop over fake_model: (timesteps, final sample)."""
    sched = reference(cfg)
    sched.set_timesteps(k)
    x = torch.from_numpy(x_T.copy())
    for i, t in enumerate(sched.timesteps):
        mo = torch.from_numpy(fake_model(x.numpy(), int(t), cfg.prediction_type))
        vn = torch.from_numpy(vnoise[i]) if eta > 0 else None
        x = sched.step(mo, t, x, eta=eta, variance_noise=vn).prev_sample
    return sched.timesteps.numpy(), x.numpy()


SPACING_KS = (1, 2, 3, 5, 7, 10, 16)
SPACING_CASES = list(
    itertools.product(ddim.TIMESTEP_SPACINGS, (100, 1000), ("epsilon", "sample"), (0, 1))  # offset
)


@pytest.mark.parametrize(("spacing", "train_timesteps", "prediction_type", "offset"), SPACING_CASES)
def test_every_timestep_spacing_matches_diffusers(spacing, train_timesteps, prediction_type, offset):
    """Timesteps, the numpy chain and the torch mirror follow diffusers for every K and eta in {0, 1}.

    Epsilon chains clip x0 (as the shipped models do): at T=1000 alphas_cumprod[999] is ~1e-9, and the
    unclipped x0 = (x - sqrt(1-a) eps) / sqrt(a) would be float32 noise in both implementations.
    """
    cfg = DDIMConfig(
        train_timesteps=train_timesteps,
        beta_schedule="squaredcos_cap_v2" if train_timesteps == 100 else "linear",
        prediction_type=prediction_type,
        clip_sample=prediction_type == "epsilon",
        steps_offset=offset,
        timestep_spacing=spacing,
    )
    rng = np.random.default_rng(train_timesteps + offset)
    x_T = rng.standard_normal(SHAPE).astype(np.float32)
    vnoise = rng.standard_normal((max(SPACING_KS), *SHAPE)).astype(np.float32)
    for k, eta in itertools.product(SPACING_KS, (0.0, 1.0)):
        case = f"K={k} eta={eta}"
        want_t, want = diffusers_chain(cfg, k, eta, x_T, vnoise)
        np.testing.assert_array_equal(cfg.timesteps(k), want_t, err_msg=case)
        plan = cfg.plan(k, eta)
        assert [c.timestep for c in plan] == want_t.tolist(), case
        model = lambda x, t: fake_model(x, t, prediction_type)  # noqa: E731
        got = ddim.sample_loop(model, x_T, plan, cfg, variance_noise=vnoise[:k] if eta else None)
        got_t = ddim_torch.sample_loop(
            lambda x, c: torch.from_numpy(fake_model(x.numpy(), c.timestep, prediction_type)),
            torch.from_numpy(x_T.copy())[None],
            plan,
            cfg,
            variance_noise=torch.from_numpy(vnoise[:k])[None] if eta else None,
        )[0].numpy()
        # With eta = 1 diffusers' float32 sqrt(1 - a_prev - std^2) cancels where a_t ~ 0 (t = T-1); ours
        # is float64. Largest difference seen: 1.1e-5 at eta 0, 5.1e-5 at eta 1.
        atol = (2e-4 if eta else 2e-5) * max(1.0, float(np.abs(want).max()))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=atol, err_msg=case)
        np.testing.assert_allclose(got_t, want, rtol=1e-5, atol=atol, err_msg=case)


@pytest.mark.parametrize("spacing", ddim.TIMESTEP_SPACINGS)
def test_timesteps_differ_by_spacing_as_in_lin_et_al(spacing):
    """With T=100, leading starts K=1 at t=0 and K=2 at t=50; trailing starts every K at T-1."""
    cfg = DDIMConfig(train_timesteps=100, timestep_spacing=spacing)
    first = {k: int(cfg.timesteps(k)[0]) for k in (1, 2, 5)}
    want = {
        "leading": {1: 0, 2: 50, 5: 80},
        "trailing": {1: 99, 2: 99, 5: 99},
        "linspace": {1: 0, 2: 99, 5: 99},
    }[spacing]
    assert first == want


@pytest.mark.parametrize(("train_timesteps", "k"), [(100, 29), (100, 58), (1000, 61), (1000, 1000)])
def test_trailing_keeps_k_timesteps_where_diffusers_float_arange_makes_one_more(train_timesteps, k):
    """diffusers' trailing arange yields K+1 values here (the extra one is -1); ours are its first K."""
    cfg = DDIMConfig(train_timesteps=train_timesteps, timestep_spacing="trailing")
    sched = reference(cfg)
    sched.set_timesteps(k)
    theirs = sched.timesteps.numpy()
    ours = cfg.timesteps(k)
    assert len(ours) == k and len(np.unique(ours)) == k
    assert ours[0] == train_timesteps - 1 and ours.min() >= 0 and np.all(np.diff(ours) < 0)
    np.testing.assert_array_equal(ours, theirs[:k])
    if len(theirs) > k:
        assert theirs[k:].tolist() == [-1]


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
    ("steps", "offset", "spacing", "field"),
    [
        (0, 0, "leading", "steps"),
        (101, 0, "leading", "steps"),
        (100, 1, "leading", "steps"),
        (2.5, 0, "leading", "steps"),
        (101, 0, "trailing", "steps"),
        (0, 0, "linspace", "steps"),
        (5, 0, "uniform", "timestep_spacing"),
    ],
)
def test_bad_step_counts_are_rejected(steps, offset, spacing, field):
    with pytest.raises(ValueError, match=field):
        ddim.check_steps(steps, 100, offset, spacing)
    with pytest.raises(ValueError, match=field):
        DDIMConfig(steps_offset=offset, timestep_spacing=spacing).timesteps(steps)


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_offset_does_not_limit_trailing_or_linspace(spacing):
    """diffusers adds steps_offset for leading only, so K=T with offset 1 is valid there."""
    cfg = DDIMConfig(steps_offset=1, timestep_spacing=spacing)
    sched = reference(cfg)
    sched.set_timesteps(100)
    np.testing.assert_array_equal(cfg.timesteps(100), sched.timesteps.numpy())
    assert cfg.timesteps(100)[0] == 99


def test_unknown_schedule_is_rejected():
    with pytest.raises(ValueError, match="beta_schedule"):
        ddim.make_betas("cosine", 100, 1e-4, 0.02)


def test_a_prefix_steers_only_a_run_that_sees_it_above_the_noise():
    """Overwrite-inpainting shows each step the prefix at weight sqrt(a_t): K=1 at t=T-1 of a squared-cosine
    schedule sees it at 0.0005 and cannot be steered by it; any later step or a flatter schedule can."""
    trailing = DDIMConfig(timestep_spacing="trailing")
    assert not trailing.prefix_steers(1)
    assert trailing.prefix_steers(2)  # t=49 sees it at 0.69
    assert DDIMConfig(timestep_spacing="leading").prefix_steers(1)  # K=1 leading is t=0
    assert DDIMConfig(beta_schedule="linear", timestep_spacing="trailing").prefix_steers(1)  # 0.60 at t=99
    linear_1000 = DDIMConfig(beta_schedule="linear", train_timesteps=1000, timestep_spacing="trailing")
    assert not linear_1000.prefix_steers(1)  # 0.006 at t=999
