"""Export: torch vs ONNX Runtime parity of both graph forms, checker, checkpoint format and CLI."""

from __future__ import annotations

import os
import stat

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from diffusion_controller.core.card import CardError, ModelCard, sidecar_path
from diffusion_controller.training import export as export_mod
from diffusion_controller.training.checkpoint import load_checkpoint, save_checkpoint
from diffusion_controller.training.export import DenoiserPolicy, FusedPolicy, export_onnx, main
from diffusion_controller.training.network import DiffusionTransformer, NetworkConfig
from diffusion_controller.training.tiny import tiny_card, tiny_network

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
    a, b = (Policy.load(p, steps=4, log=lambda _m: None) for p in (f32, i8))
    obs = np.broadcast_to(card.obs_mean, (card.history, card.obs_dim))
    diff = np.abs(a.predict(obs, seed=1) - b.predict(obs, seed=1)).max()
    assert 0 < diff <= 0.05 * np.max(card.action_max - card.action_min)


def test_int8_export_that_moves_the_actions_too_far_is_refused(tmp_path, monkeypatch):
    card = tiny_card(steps=2, horizon=6, history=3)
    monkeypatch.setattr(export_mod, "INT8_MAX_RANGE_FRACTION", 0.0)
    with pytest.raises(RuntimeError, match="int8 weights move the output"):
        export_onnx(tiny_network(card), card, tmp_path / "i8.onnx", graph="fused", weights="int8")
    assert not (tmp_path / "i8.onnx").exists() and list(tmp_path.iterdir()) == []


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
    assert sidecar_path(out).exists()
    assert main([str(ckpt), str(tmp_path / "f.onnx")]) == 0
    assert ModelCard.from_onnx(tmp_path / "f.onnx").graph.kind == "fused"
    capsys.readouterr()
    assert main([str(ckpt), str(tmp_path / "q.onnx"), "--weights", "int8"]) == 0
    assert "int8 weights: max output change" in capsys.readouterr().out
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
