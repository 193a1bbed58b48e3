"""Runtime Policy on tiny models generated here: predict, inpainting, providers, errors, threads."""

from __future__ import annotations

import dataclasses
import shutil
import threading

import numpy as np
import onnx
import pytest
import yaml
from tiny_models import make_tiny_model

from diffusion_controller.core.card import CardError, ModelCard
from diffusion_controller.core.card_schema import METADATA_KEY
from diffusion_controller.core.card_source import sidecar_path
from diffusion_controller.core.providers import gpu_provider_problem as _gpu_provider_problem
from diffusion_controller.core.runtime import CUDA, TRT, ModelError, Policy


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Same weights (seed) exported as fused K=2, denoiser, and an eta > 0 pair."""
    d = tmp_path_factory.mktemp("models")
    return {
        "fused": make_tiny_model(d, graph="fused", steps=2, layers=2),
        "denoiser": make_tiny_model(d, graph="denoiser", steps=2, layers=2),
        "fused_eta": make_tiny_model(d, graph="fused", steps=3, eta=0.5, name="eta_fused", layers=2),
        "denoiser_eta": make_tiny_model(d, graph="denoiser", steps=3, eta=0.5, name="eta_denoiser", layers=2),
    }


def quiet(_msg: str) -> None:
    pass


def load(path, **kw) -> Policy:
    """On the CPU unless a test asks for a provider: these are the CPU path's semantics (exact repeats,
    provider "cpu"), which must hold on a machine with a GPU too (where `auto` would pick it)."""
    kw.setdefault("provider", "cpu")
    return Policy.load(path, log=kw.pop("log", quiet), **kw)


def obs_of(card: ModelCard, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return card.obs_mean + card.obs_std * rng.standard_normal((card.history, card.obs_dim))


def copy_model(src, dst_dir, name="m"):
    dst = dst_dir / f"{name}.onnx"
    shutil.copy(src, dst)
    shutil.copy(sidecar_path(src), sidecar_path(dst))
    return dst


def test_predict_shape_units_and_determinism(models):
    p = load(models["fused"])
    c = p.card
    assert (p.provider, p.steps, p.supports_inpainting) == ("cpu", 2, True)
    obs = obs_of(c)
    a = p.predict(obs, seed=3)
    assert a.shape == (c.horizon, c.action_dim) and a.dtype == np.float64
    np.testing.assert_array_equal(a, p.predict(obs, seed=3))
    assert np.abs(a - p.predict(obs, seed=4)).max() > 1e-6
    assert np.abs(a - p.predict(obs_of(c, 1), seed=3)).max() > 1e-6  # the observation matters
    noise = np.random.default_rng(3).standard_normal((c.horizon, c.action_dim))
    np.testing.assert_array_equal(p.predict(obs, noise=noise), p.predict(obs, noise=noise))
    # with clip_sample the denormalized chunk stays inside the normalization range
    assert np.all(a >= c.action_min - 1e-6) and np.all(a <= c.action_max + 1e-6)
    # the returned array is the caller's: a later call does not overwrite it
    first = a.copy()
    p.predict(obs_of(c, 2))
    np.testing.assert_array_equal(a, first)


@pytest.mark.parametrize(
    ("fused", "denoiser", "shape"), [("fused", "denoiser", (8, 8)), ("fused_eta", "denoiser_eta", (4, 8, 8))]
)
def test_fused_graph_and_runtime_loop_agree(models, fused, denoiser, shape):
    f, d = load(models[fused]), load(models[denoiser])
    obs = obs_of(f.card)
    noise = np.random.default_rng(0).standard_normal(shape)
    prefix = np.random.default_rng(1).uniform(f.card.action_min, f.card.action_max, (8, 8))
    mask = np.array([1, 1, 0.5, 0, 0, 0, 0, 0.0])
    for kw in ({}, {"prefix": prefix, "prefix_mask": mask}):
        np.testing.assert_allclose(
            f.predict(obs, noise=noise, **kw), d.predict(obs, noise=noise, **kw), atol=1e-5
        )


def test_inpainting_prefix_is_exact_where_masked_and_only_there(models):
    for key in ("fused", "denoiser"):
        p = load(models[key])
        c = p.card
        obs = obs_of(c)
        # a prefix inside the range but unlike anything the model produces (not at the clip limits)
        prefix = c.action_min + (c.action_max - c.action_min) * np.linspace(0.3, 0.7, c.horizon)[:, None]
        mask = np.zeros(c.horizon)
        mask[[0, 1, 4]] = 1.0
        out = p.predict(obs, seed=0, prefix=prefix, prefix_mask=mask)
        np.testing.assert_array_equal(out[mask == 1], prefix[mask == 1])
        assert np.all(out[mask == 0] != prefix[mask == 0])
        free = p.predict(obs, seed=0)
        assert np.abs(free[mask == 0] - out[mask == 0]).max() > 1e-6, "the prefix must steer the free rows"
        # a short prefix without a mask freezes its rows
        short = p.predict(obs, seed=0, prefix=prefix[:3])
        np.testing.assert_array_equal(short[:3], prefix[:3])
        assert np.all(short[3:] != prefix[3:])


def test_runtime_steps_for_denoiser_and_fixed_steps_for_fused(models):
    d2, d5 = load(models["denoiser"]), load(models["denoiser"], steps=5)
    assert d5.steps == 5
    obs = obs_of(d2.card)
    assert np.abs(d2.predict(obs, seed=0) - d5.predict(obs, seed=0)).max() > 1e-6
    with pytest.raises(ModelError, match="steps"):
        load(models["denoiser"], steps=101)
    with pytest.raises(ModelError, match="K=2"):
        load(models["fused"], steps=5)
    assert load(models["fused"], steps=2).steps == 2


def test_a_denoiser_run_at_one_step_from_full_noise_cannot_be_steered(models, tmp_path):
    """The K chosen at run time decides whether a prefix can steer: K=1 trailing sees only t=99."""
    card = ModelCard.from_onnx(models["denoiser"])
    path = tmp_path / "trailing.onnx"
    shutil.copyfile(models["denoiser"], path)
    card.replace(diffusion=dataclasses.replace(card.diffusion, timestep_spacing="trailing")).to_onnx(path)
    assert load(path).supports_inpainting
    assert not load(path, steps=1).supports_inpainting
    assert load(models["denoiser"], steps=1).supports_inpainting  # leading: t=0


def test_auto_provider_logs_what_it_got_and_why_not_the_others(models):
    lines: list[str] = []
    p = Policy.load(models["fused"], provider="auto", log=lines.append)
    text = "\n".join(lines)
    for gpu in (TRT, CUDA):
        problem = _gpu_provider_problem(gpu)
        if problem is not None:  # here (no GPU): the log says why it was not used
            assert problem in text
    if _gpu_provider_problem(CUDA) is not None:
        assert p.provider == "cpu" and p.providers[0] == "CPUExecutionProvider"
    assert f"provider {p.provider}" in text


@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_explicit_gpu_provider_fails_loudly_when_not_obtained(models, provider):
    problem = _gpu_provider_problem(CUDA if provider == "cuda" else TRT)
    if problem is None:  # a machine with a working GPU stack gets what it asked for
        assert load(models["fused"], provider=provider).provider == provider
    else:
        with pytest.raises(ModelError, match=f"provider '{provider}' requested"):
            load(models["fused"], provider=provider)


def test_explicit_cpu_and_unknown_provider(models):
    assert load(models["fused"], provider="cpu", threads=2).provider == "cpu"
    with pytest.raises(ModelError, match="provider"):
        load(models["fused"], provider="npu")
    with pytest.raises(ModelError, match="threads"):
        load(models["fused"], threads=0)


def test_missing_corrupt_and_truncated_files_name_path_and_cause(models, tmp_path):
    missing = tmp_path / "absent.onnx"
    with pytest.raises(ModelError, match=r"absent\.onnx.*cannot read"):
        load(missing)
    data = models["fused"].read_bytes()
    cases = {
        "truncated": data[: len(data) // 2],
        "garbage": b"\x08\x07 this is not a model at all" * 10,
        "empty": b"",
    }
    for name, content in cases.items():
        path = tmp_path / f"{name}.onnx"
        path.write_bytes(content)
        with pytest.raises(ModelError) as info:
            load(path)
        msg = str(info.value)
        assert str(path) in msg and ("not a valid ONNX" in msg or "cannot load" in msg), msg


def test_graph_damaged_behind_a_valid_card_is_reported(models, tmp_path):
    """Metadata intact, graph bytes broken: ORT's refusal is wrapped with the path."""
    m = onnx.load(str(models["fused"]))
    m.graph.node[3].op_type = "NoSuchOp"
    path = tmp_path / "broken.onnx"
    onnx.save(m, str(path))
    with pytest.raises(ModelError, match=r"broken\.onnx: ONNX Runtime cannot load it"):
        load(path)


def test_card_from_sidecar_when_metadata_is_absent_and_conflicts_are_errors(models, tmp_path):
    m = onnx.load(str(models["fused"]))
    del m.metadata_props[:]
    path = tmp_path / "bare.onnx"
    onnx.save(m, str(path))
    with pytest.raises(ModelError, match="no model card"):
        load(path)
    shutil.copy(sidecar_path(models["fused"]), sidecar_path(path))
    lines: list[str] = []
    assert load(path, log=lines.append).card.name == "tiny_ant_fused"
    assert any("using" in line and "bare.yaml" in line for line in lines)

    other = copy_model(models["fused"], tmp_path, "conflict")
    d = yaml.safe_load(sidecar_path(other).read_text())
    d["control_period_s"] = 0.01
    sidecar_path(other).write_text(yaml.safe_dump(d, sort_keys=False))
    with pytest.raises(ModelError, match=r"differ in \['control_period_s'\]"):
        load(other)


def rewrite_card(path, change) -> None:
    """Replace the card in metadata (and beside) with a changed one."""
    d = ModelCard.from_onnx(path).to_dict()
    change(d)
    card = ModelCard.from_dict(d)
    card.to_onnx(path)
    card.to_yaml(sidecar_path(path))


def test_tensor_names_and_shapes_must_match_the_card(models, tmp_path):
    renamed = copy_model(models["fused"], tmp_path, "renamed")
    rewrite_card(renamed, lambda d: d["graph"]["inputs"].update(obs_history="observations"))
    with pytest.raises(ModelError, match="obs_history = 'observations' but the graph has no input"):
        load(renamed)

    longer = copy_model(models["fused"], tmp_path, "longer")
    rewrite_card(longer, lambda d: d["observation"].update(history=5))
    with pytest.raises(
        ModelError, match=r"'obs_history' has shape \[1, 4, 36\], the card implies \[1, 5, 36\]"
    ):
        load(longer)

    eta = copy_model(models["fused"], tmp_path, "eta")
    rewrite_card(eta, lambda d: d["sampler"].update(eta=0.3))
    with pytest.raises(ModelError, match=r"'noise' has shape \[1, 8, 8\], the card implies \[1, 3, 8, 8\]"):
        load(eta)

    kind = copy_model(models["fused"], tmp_path, "kind")

    def to_denoiser(d):
        d["graph"] = {
            "kind": "denoiser",
            "inputs": {"obs_history": "obs_history", "sample": "sample", "timestep": "timestep"},
            "outputs": {"model_output": "model_output"},
        }

    rewrite_card(kind, to_denoiser)
    with pytest.raises(ModelError, match="does not match its card"):
        load(kind)


def test_invalid_card_in_metadata_is_a_card_error(models, tmp_path):
    path = copy_model(models["fused"], tmp_path, "bad")
    m = onnx.load(str(path))
    for p in m.metadata_props:
        if p.key == METADATA_KEY:
            p.value = p.value.replace("horizon: 8", "horizon: 0")
    onnx.save(m, str(path))
    sidecar_path(path).unlink()
    with pytest.raises(CardError, match=r"action\.horizon"):
        load(path)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"obs_history": np.zeros((3, 36))}, r"obs_history: expected shape \(4, 36\), got \(3, 36\)"),
        ({"obs_history": "nan"}, "obs_history"),
        ({"nan_obs": True}, r"obs_history: expected finite values, got nan at index \[2, 5\]"),
        ({"noise": np.zeros((8, 7))}, r"noise: expected shape \(8, 8\)"),
        ({"noise": np.zeros((8, 8)), "seed": 1}, "noise and seed"),
        ({"prefix_mask": np.ones(8)}, "prefix_mask: given without a prefix"),
        ({"prefix": np.zeros((9, 8))}, "prefix: expected shape"),
        (
            {"prefix": np.zeros((8, 8)), "prefix_mask": np.full(8, 2.0)},
            r"prefix_mask: expected values in \[0, 1\]",
        ),
        ({"prefix": np.full((8, 8), np.inf), "prefix_mask": np.ones(8)}, "prefix: expected finite"),
    ],
)
def test_bad_inputs_raise_clear_model_errors(models, kwargs, match):
    p = load(models["fused"], warmup=0)
    obs = kwargs.pop("obs_history", obs_of(p.card))
    if kwargs.pop("nan_obs", False):
        obs = obs.copy()
        obs[2, 5] = np.nan
    with pytest.raises(ModelError, match=match):
        p.predict(obs, **kwargs)
    p.predict(obs_of(p.card))  # the policy still works after a rejected call


@pytest.mark.parametrize("provider", ["cpu", "cuda"])
def test_predict_in_a_worker_while_another_policy_loads(models, provider):
    """Model swap: a worker keeps predicting while the main thread loads the next model. On cuda (where
    it loads) the new models capture their CUDA graphs meanwhile, for real: GpuGate keeps the running one's
    replays off those captures and lets the rest overlap."""
    if provider == "cuda" and _gpu_provider_problem(CUDA) is not None:
        pytest.skip(f"no cuda here: {_gpu_provider_problem(CUDA)}")
    running = load(models["fused"], provider=provider)
    obs = obs_of(running.card)
    want = running.predict(obs, seed=1)
    results, errors = [], []
    stop = threading.Event()

    def worker():
        try:
            while not stop.is_set():
                results.append(running.predict(obs, seed=1))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    t = threading.Thread(target=worker)
    t.start()
    try:
        loaded = [load(models[k], provider=provider) for k in ("denoiser", "fused_eta", "fused")]
    finally:
        stop.set()
        t.join(10)
    assert not errors and results
    for r in results:  # the running session's replays repeat exactly, whatever loaded meanwhile
        np.testing.assert_array_equal(r, want)
    # another session of the same file: exact on the CPU; on a GPU its kernels may be chosen apart
    atol = 0.0 if provider == "cpu" else 1e-5
    np.testing.assert_allclose(loaded[-1].predict(obs, seed=1), want, rtol=0, atol=atol)


def test_a_model_that_outputs_nan_is_refused_at_load(models, tmp_path):
    """Valid file, valid card, broken graph (output x NaN): refused while loading, not at the first tick."""
    path = copy_model(models["fused"], tmp_path, "nan")
    m = onnx.load(str(path))
    out = m.graph.output[0].name
    for node in m.graph.node:
        node.output[:] = [o + "_raw" if o == out else o for o in node.output]
    m.graph.initializer.append(onnx.numpy_helper.from_array(np.array(np.nan, dtype=np.float32), "nan"))
    m.graph.node.append(onnx.helper.make_node("Mul", [out + "_raw", "nan"], [out]))
    onnx.save(m, str(path))
    with pytest.raises(ModelError, match="non-finite actions on its warm-up input"):
        load(path)
    assert np.isnan(load(path, warmup=0).predict(obs_of(ModelCard.from_onnx(path)))).all()  # no warm-up


def test_policy_cannot_be_constructed_directly():
    with pytest.raises(TypeError, match=r"Policy\.load"):
        Policy()
