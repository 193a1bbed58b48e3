"""Export: torch vs ONNX Runtime parity of both graph forms, checker, checkpoint format and CLI."""

from __future__ import annotations

import os
import stat

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from diffusers import DDIMScheduler
from tiny_models import tiny_card, tiny_network

from diffusion_controller.core import runtime
from diffusion_controller.core.card import CardError, ModelCard
from diffusion_controller.core.card_source import sidecar_path
from diffusion_controller.core.runtime import ModelError, Policy
from diffusion_controller.training import export as export_mod
from diffusion_controller.training.checkpoint import load_checkpoint, save_checkpoint
from diffusion_controller.training.export import DenoiserPolicy, FusedPolicy, export_onnx, main
from diffusion_controller.training.network import DiffusionTransformer, NetworkConfig

TOL = 1e-4


def session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def fused_inputs(card: ModelCard, steps: int, eta: float, seed: int) -> dict[str, np.ndarray]:
    """Fresh inputs (not the exporter's own check inputs), with a hard and a soft prefix row."""
    rng = np.random.default_rng(seed)
    h, a = card.horizon, card.action_dim
    obs = card.obs_mean + 2 * card.obs_std * rng.standard_normal((1, card.history, card.obs_dim))
    mask = np.zeros((1, h), np.float32)
    mask[0, :3] = [1.0, 1.0, 0.5]
    lo, hi = card.action_min, card.action_max
    return {
        "obs_history": obs.astype(np.float32),
        "noise": rng.standard_normal((1, steps + 1, h, a) if eta else (1, h, a)).astype(np.float32),
        "prefix": (lo + (hi - lo) * rng.random((1, h, a))).astype(np.float32),
        "prefix_mask": mask,
    }


@pytest.mark.parametrize(
    ("steps", "eta", "options"),
    [
        (3, 0.0, {}),
        (2, 0.6, {"prediction_type": "sample", "clip_sample": False}),
        (5, 0.0, {"clip_sample": False}),
    ],
)
def test_fused_graph_matches_torch(tmp_path, steps, eta, options):
    card = tiny_card(steps=steps, eta=eta, horizon=6, history=3, **options)
    net = tiny_network(card, layers=2, heads=2, width=32, seed=3)
    path = export_onnx(net, card, tmp_path / "f.onnx", graph="fused")
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    ops = {n.op_type for n in model.graph.node}
    assert not ops & {"Loop", "If", "Scan"}, "a CUDA-graph capturable graph has no control flow"
    assert model.opset_import[0].version == 17

    module = FusedPolicy(net, ModelCard.from_onnx(path), steps, eta).eval()
    sess = session(path)
    for seed in (11, 12):
        inputs = fused_inputs(card, steps, eta, seed)
        with torch.no_grad():
            want = module(*(torch.from_numpy(inputs[k]) for k in inputs)).numpy()
        got = sess.run(["actions"], inputs)[0]
        assert got.shape == (1, card.horizon, card.action_dim)
        assert np.max(np.abs(got - want)) <= TOL
        # the frozen rows are the prefix exactly, the soft row lies between, free rows are the model's
        np.testing.assert_array_equal(got[0, :2], inputs["prefix"][0, :2])
        assert np.all(np.abs(got[0, 3:] - inputs["prefix"][0, 3:]) > 0)


def diffusers_actions(net, card: ModelCard, spacing: str, obs: np.ndarray, noise: np.ndarray, k: int):
    """Reference chunk: diffusers' DDIMScheduler loop over the torch network, in robot units."""
    d = card.diffusion
    sched = DDIMScheduler(
        num_train_timesteps=d.train_timesteps,
        beta_start=d.beta_start,
        beta_end=d.beta_end,
        beta_schedule=d.beta_schedule,
        clip_sample=d.clip_sample,
        clip_sample_range=d.clip_sample_range,
        set_alpha_to_one=d.set_alpha_to_one,
        steps_offset=d.steps_offset,
        prediction_type=d.prediction_type,
        timestep_spacing=spacing,
    )
    sched.set_timesteps(k)
    o = torch.from_numpy(((obs - card.obs_mean) / card.obs_std).astype(np.float32))[None]
    x = torch.from_numpy(noise.astype(np.float32))[None]
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(net(x, t.reshape(1), o), t, x).prev_sample
    half, center = (card.action_max - card.action_min) / 2, (card.action_max + card.action_min) / 2
    return x[0].numpy() * half + center, sched.timesteps.tolist()


@pytest.mark.parametrize("graph", ["fused", "denoiser"])
def test_both_graph_forms_follow_the_timestep_spacing(tmp_path, graph):
    """K=2: leading visits [50, 0], trailing [99, 49]; each export matches diffusers with its spacing."""
    card = tiny_card(steps=2, horizon=6, history=3)
    net = tiny_network(card, layers=2, heads=2, width=32, seed=6)
    rng = np.random.default_rng(5)
    obs = card.obs_mean + card.obs_std * rng.standard_normal((card.history, card.obs_dim))
    noise = rng.standard_normal((card.horizon, card.action_dim))
    got = {}
    for spacing in ("leading", "trailing"):
        path = export_onnx(net, card, tmp_path / f"{spacing}.onnx", graph=graph, timestep_spacing=spacing)
        loaded = ModelCard.from_onnx(path)
        assert loaded.diffusion.timestep_spacing == spacing
        assert ModelCard.from_yaml(sidecar_path(path)).to_dict() == loaded.to_dict()
        got[spacing] = Policy.load(path, provider="cpu", log=lambda _m: None).predict(obs, noise=noise)
        want, timesteps = diffusers_actions(net, card, spacing, obs, noise, 2)
        assert timesteps == {"leading": [50, 0], "trailing": [99, 49]}[spacing]
        assert np.max(np.abs(got[spacing] - want)) <= 1e-4, spacing
    assert np.max(np.abs(got["leading"] - got["trailing"])) > 1e-2


def test_int8_fused_graph_stays_close_to_the_float_graph_and_says_so(tmp_path):
    card = tiny_card(steps=3, horizon=6, history=3)
    net = tiny_network(card, layers=2, heads=2, width=64, seed=3)
    f32 = export_onnx(net, card, tmp_path / "f32.onnx", graph="fused")
    i8 = export_onnx(net, card, tmp_path / "i8.onnx", graph="fused", weights="int8")
    # Every weight MatMul of every unrolled step is quantized, not only the first step's.
    f32_matmuls = sum(n.op_type == "MatMul" for n in onnx.load(str(f32)).graph.node)
    i8_ops = [n.op_type for n in onnx.load(str(i8)).graph.node]
    assert i8_ops.count("MatMulInteger") >= 0.6 * f32_matmuls, (i8_ops.count("MatMulInteger"), f32_matmuls)
    inside, beside = ModelCard.from_onnx(i8), ModelCard.from_yaml(sidecar_path(i8))
    assert inside.to_dict() == beside.to_dict()
    assert inside.network["weights"] == "int8" and ModelCard.from_onnx(f32).network["weights"] == "fp32"
    assert inside.network["int8_form"] == export_mod.INT8_FORM == "u8u8"  # saturates on no CPU
    assert "int8_form" not in ModelCard.from_onnx(f32).network
    recorded = inside.network["int8_max_abs_diff"]
    assert 0 < recorded <= export_mod.INT8_MAX_RANGE_FRACTION * np.max(card.action_max - card.action_min)
    span = np.max(card.action_max - card.action_min)
    for seed in (11, 12):
        inputs = fused_inputs(card, 3, 0.0, seed)
        want = session(f32).run(["actions"], inputs)[0]
        got = session(i8).run(["actions"], inputs)[0]
        assert 0 < np.max(np.abs(got - want)) <= 0.05 * span  # rounded, not broken


def test_int8_denoiser_graph_runs_with_k_chosen_at_run_time(tmp_path):
    from diffusion_controller.core.runtime import Policy

    card = tiny_card(steps=3, horizon=6, history=3)
    net = tiny_network(card, layers=2, heads=2, width=64, seed=1)
    f32 = export_onnx(net, card, tmp_path / "d.onnx", graph="denoiser")
    i8 = export_onnx(net, card, tmp_path / "dq.onnx", graph="denoiser", weights="int8")
    assert ModelCard.from_onnx(i8).network["weights"] == "int8"
    a, b = (Policy.load(p, provider="cpu", steps=4, log=lambda _m: None) for p in (f32, i8))
    obs = np.broadcast_to(card.obs_mean, (card.history, card.obs_dim))
    diff = np.abs(a.predict(obs, seed=1) - b.predict(obs, seed=1)).max()
    assert 0 < diff <= 0.05 * np.max(card.action_max - card.action_min)


@pytest.mark.parametrize("form", ["u8s7", "u8s8"])
def test_every_int8_form_exports_and_names_itself(tmp_path, form, monkeypatch):
    monkeypatch.setattr(runtime, "u8s8_problem", lambda: None)  # as on a CPU with VNNI
    card = tiny_card(steps=2, horizon=6, history=3)
    net = tiny_network(card, layers=2, heads=2, width=64, seed=3)
    path = export_onnx(net, card, tmp_path / "q.onnx", graph="fused", weights="int8", int8_form=form)
    policy = Policy.load(path, provider="cpu", log=lambda _m: None)
    assert policy.card.network["int8_form"] == form
    assert 0 < policy.card.network["int8_max_abs_diff"] <= 0.1 * np.max(card.action_max - card.action_min)
    with pytest.raises(ValueError, match="int8_form"):
        export_onnx(net, card, tmp_path / "x.onnx", weights="int8", int8_form="s4")


@pytest.mark.parametrize(
    ("form", "problem", "why"),
    [
        ("u8u8", None, r"this model.s weights do not survive 8-bit rounding"),
        ("u8s8", "this x86 CPU has no VNNI", r"form u8s8 saturates .*\(this x86 CPU has no VNNI\).*u8u8"),
        ("u8s8", None, r"form u8s8 saturates in ONNX Runtime.s x86 kernels without VNNI; u8u8 does not"),
    ],
)
def test_int8_export_that_moves_the_actions_too_far_is_refused_with_the_reason(
    tmp_path, monkeypatch, form, problem, why
):
    card = tiny_card(steps=2, horizon=6, history=3)
    monkeypatch.setattr(export_mod, "INT8_MAX_RANGE_FRACTION", 0.0)
    monkeypatch.setattr(export_mod, "u8s8_problem", lambda: problem)
    with pytest.raises(RuntimeError, match=f"int8 weights move the output .*: not exported, because {why}"):
        export_onnx(
            tiny_network(card), card, tmp_path / "i8.onnx", graph="fused", weights="int8", int8_form=form
        )
    assert not (tmp_path / "i8.onnx").exists() and list(tmp_path.iterdir()) == []


def test_u8s8_problem_reads_the_cpu_flags():
    flags = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma{}\n"
    assert runtime.u8s8_problem(flags.format(" avx512f avx512_vnni"), "x86_64") is None
    assert runtime.u8s8_problem(flags.format(" avx_vnni"), "x86_64") is None
    assert "no VNNI" in runtime.u8s8_problem(flags.format(" avx512f avx512bw"), "x86_64")
    assert "no VNNI" in runtime.u8s8_problem(flags.format(""), "AMD64")
    assert runtime.u8s8_problem("", "aarch64") is None  # other kernels, no int16 pair sums


def test_loader_refuses_signed_int8_weights_on_a_cpu_without_vnni(tmp_path, monkeypatch):
    """u8s8, and int8 exports made before the card named the form, saturate there: refused at load."""
    card = tiny_card(steps=2, horizon=6, history=3)
    path = export_onnx(tiny_network(card, width=64), card, tmp_path / "q.onnx", weights="int8")
    f32 = export_onnx(tiny_network(card, width=64), card, tmp_path / "f.onnx")
    loaded = ModelCard.from_onnx(path)
    monkeypatch.setattr(runtime, "u8s8_problem", lambda: "this x86 CPU has no VNNI (test)")
    Policy.load(path, provider="cpu", log=lambda _m: None)  # u8u8: fine anywhere
    Policy.load(f32, provider="cpu", log=lambda _m: None)
    for network, named in (
        (dict(loaded.network) | {"int8_form": "u8s8"}, "int8_form u8s8, and"),
        ({k: v for k, v in loaded.network.items() if k != "int8_form"}, "before the card named"),
    ):
        old = loaded.replace(network=network)
        old.to_onnx(path)
        old.to_yaml(sidecar_path(path))
        with pytest.raises(ModelError, match="saturate on x86 CPUs without VNNI") as info:
            Policy.load(path, provider="cpu", log=lambda _m: None)
        assert named in str(info.value) and "no VNNI (test)" in str(info.value)
        monkeypatch.setattr(runtime, "u8s8_problem", lambda: None)
        Policy.load(path, provider="cpu", log=lambda _m: None)  # with VNNI it loads
        monkeypatch.setattr(runtime, "u8s8_problem", lambda: "this x86 CPU has no VNNI (test)")


def test_denoiser_graph_matches_torch_at_every_timestep(tmp_path):
    card = tiny_card(steps=4, horizon=6, history=3)
    net = tiny_network(card, layers=2, heads=4, width=32, seed=4)
    path = export_onnx(net, card, tmp_path / "d.onnx", graph="denoiser")
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    module = DenoiserPolicy(net, card).eval()
    sess = session(path)
    rng = np.random.default_rng(0)
    obs = (card.obs_mean + card.obs_std * rng.standard_normal((1, 3, card.obs_dim))).astype(np.float32)
    outputs = []
    for t in (0, 1, 37, 99):
        sample = rng.standard_normal((1, 6, 8)).astype(np.float32)
        ts = np.array([t], np.int64)
        got = sess.run(["model_output"], {"obs_history": obs, "sample": sample, "timestep": ts})[0]
        with torch.no_grad():
            want = module(torch.from_numpy(obs), torch.from_numpy(sample), torch.from_numpy(ts)).numpy()
        assert np.max(np.abs(got - want)) <= TOL
        outputs.append(got)
    assert np.abs(outputs[0] - outputs[3]).max() > 1e-3  # the timestep matters


def test_card_beside_equals_card_inside(tmp_path):
    card = tiny_card()
    path = export_onnx(tiny_network(card), card, tmp_path / "m.onnx", graph="denoiser", steps=7)
    inside, beside = ModelCard.from_onnx(path), ModelCard.from_yaml(sidecar_path(path))
    assert inside.to_dict() == beside.to_dict()
    assert inside.graph.kind == "denoiser" and inside.steps == 7
    assert inside.network["parameters"] == tiny_network(card).parameter_count()
    names = {i.name for i in session(path).get_inputs()}
    assert names == set(inside.graph.inputs.values())


def test_exported_model_is_readable_like_any_new_file(tmp_path):
    """Written through an owner-only temporary file, the model still gets the umask's ordinary mode."""
    old = os.umask(0o022)
    try:
        card = tiny_card()
        path = export_onnx(tiny_network(card), card, tmp_path / "m.onnx", graph="denoiser", steps=2)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_network_forward_is_its_pieces_and_causal():
    """The fused graph's hoisting relies on forward == decode(join(time K/V, obs K/V))."""
    card = tiny_card()
    net = tiny_network(card, layers=2, width=32)
    rng = torch.Generator().manual_seed(0)
    x = torch.randn(1, card.horizon, 8, generator=rng)
    obs = torch.randn(1, card.history, card.obs_dim, generator=rng)
    t = torch.tensor([42])
    with torch.no_grad():
        full = net(x, t, obs)
        parts = net.decode(
            x, net.join_kv(net.memory_kv(net.time_token(t)), net.memory_kv(net.cond_tokens(obs)))
        )
        torch.testing.assert_close(full, parts, rtol=1e-5, atol=1e-5)
        # causal: changing the last action token leaves earlier outputs unchanged
        x2 = x.clone()
        x2[0, -1] += 1.0
        out2 = net(x2, t, obs)
        torch.testing.assert_close(out2[0, :-1], full[0, :-1], rtol=1e-5, atol=1e-6)
        assert (out2[0, -1] - full[0, -1]).abs().max() > 1e-4


def test_diffuseloco_default_size():
    net = DiffusionTransformer(NetworkConfig())
    assert net.cfg.cond_tokens == 17  # 1 timestep + 8 observation + 8 command tokens
    assert 6.0e6 < net.parameter_count() < 8.0e6  # DiffuseLoco reports about 6.9M


def test_checkpoint_round_trip_and_cli(tmp_path, capsys):
    card = tiny_card(steps=3)
    net = tiny_network(card, seed=5)
    ckpt = save_checkpoint(tmp_path / "c.pt", net, card.to_dict(), epoch=12, losses=[0.5, 0.25])
    loaded = load_checkpoint(ckpt)
    assert loaded.extra == {"epoch": 12, "losses": [0.5, 0.25]}
    assert loaded.card.to_dict() == card.to_dict()
    for a, b in zip(net.state_dict().values(), loaded.network.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not loaded.network.training

    out = tmp_path / "out" / "policy.onnx"
    assert main([str(ckpt), str(out), "--graph", "denoiser", "--steps", "5", "--name", "cli_policy"]) == 0
    c = ModelCard.from_onnx(out)
    assert (c.name, c.steps, c.graph.kind) == ("cli_policy", 5, "denoiser")
    # the checkpoint's card has no spacing (leading); a new export defaults to trailing
    assert loaded.card.diffusion.timestep_spacing == "leading"
    assert c.diffusion.timestep_spacing == "trailing" and c.diffusion.timesteps(5)[0] == 99
    assert main([str(ckpt), str(tmp_path / "l.onnx"), "--timestep-spacing", "leading"]) == 0
    assert ModelCard.from_onnx(tmp_path / "l.onnx").diffusion.timestep_spacing == "leading"
    assert sidecar_path(out).exists()
    assert main([str(ckpt), str(tmp_path / "f.onnx")]) == 0
    assert ModelCard.from_onnx(tmp_path / "f.onnx").graph.kind == "fused"
    capsys.readouterr()
    assert main([str(ckpt), str(tmp_path / "q.onnx"), "--weights", "int8"]) == 0
    assert "int8 weights (u8u8): max output change" in capsys.readouterr().out
    assert ModelCard.from_onnx(tmp_path / "q.onnx").network["weights"] == "int8"

    capsys.readouterr()
    assert main([str(tmp_path / "absent.pt"), str(tmp_path / "x.onnx")]) == 1
    assert "absent.pt" in capsys.readouterr().err
    assert main([str(ckpt), str(tmp_path / "x.onnx"), "--steps", "500"]) == 1
    assert "steps" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


def test_checkpoint_card_must_fit_the_network(tmp_path):
    card = tiny_card(horizon=8)
    net = tiny_network(tiny_card(horizon=6))
    with pytest.raises(CardError, match=r"action\.horizon"):
        save_checkpoint(tmp_path / "c.pt", net, card.to_dict())
    with pytest.raises(ValueError, match="clash"):
        save_checkpoint(tmp_path / "c.pt", tiny_network(card), card.to_dict(), state_dict={})
    torch.save({"format": "something/else"}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="checkpoint@1"):
        load_checkpoint(tmp_path / "bad.pt")
