"""fp16 graphs (training/fp16.py, export --precision fp16): converted, checked, carded, loaded, refused."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from tiny_models import tiny_card, tiny_network

from diffusion_controller.core.card import CardError, ModelCard
from diffusion_controller.core.runtime import Policy
from diffusion_controller.training import fp16
from diffusion_controller.training.export import export_onnx, main

F16, F32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("fp16")
    card = tiny_card(steps=2, name="tiny_fp16")
    net = tiny_network(card)
    return {
        "fp32": export_onnx(net, card, d / "fp32.onnx", graph="fused", steps=2),
        "fp16": export_onnx(net, card, d / "fp16.onnx", graph="fused", steps=2, precision="fp16"),
        "card": card,
        "net": net,
        "dir": d,
    }


def test_the_converter_ships_with_onnxruntime():
    assert fp16.available() is None


def test_weights_and_compute_fp16_inputs_and_outputs_float32(exported):
    m32 = onnx.load(exported["fp32"])
    m16 = fp16.to_fp16(m32)
    assert all(t.data_type == F32 for t in m32.graph.initializer if t.data_type in (F16, F32))  # unchanged
    floats = [t.data_type for t in m16.graph.initializer if t.data_type in (F16, F32)]
    assert floats and floats.count(F16) >= 0.9 * len(floats)
    for v in (*m16.graph.input, *m16.graph.output):
        assert v.type.tensor_type.elem_type == F32, v.name
    assert {p.key for p in m16.metadata_props} == {p.key for p in m32.metadata_props}


def test_an_fp16_export_is_carded_and_runs_close_to_float32(exported):
    card = ModelCard.from_onnx(exported["fp16"])
    assert card.network["precision"] == "fp16" and card.network["weights"] == "fp32"
    assert 0 < card.network["fp16_max_abs_diff"] < 0.02
    assert "precision" not in ModelCard.from_onnx(exported["fp32"]).network
    lines: list[str] = []
    p16 = Policy.load(exported["fp16"], provider="cpu", log=lines.append)
    p32 = Policy.load(exported["fp32"], provider="cpu", log=lambda _m: None)
    assert p16.precision == "fp16" and p32.precision == "fp32"
    assert "provider cpu, fp16 graph" in lines[-1]
    rng = np.random.default_rng(0)
    obs = card.obs_mean + card.obs_std * rng.standard_normal((card.history, card.obs_dim))
    diff = np.abs(p16.predict(obs, seed=3) - p32.predict(obs, seed=3)).max()
    assert 0 < diff < 0.02 * float(np.max(card.action_max - card.action_min))


def test_the_card_field_is_validated(exported):
    d = ModelCard.from_onnx(exported["fp16"]).to_dict()
    for bad, match in (({"precision": "fp8"}, "network.precision"),
                       ({"precision": "fp16", "weights": "int8"}, "fp32 weights")):  # fmt: skip
        with pytest.raises(CardError, match=match):
            ModelCard.from_dict(d | {"network": d["network"] | bad})
    with pytest.raises(ValueError, match="precision"):
        export_onnx(exported["net"], exported["card"], exported["dir"] / "x.onnx", precision="fp8")
    with pytest.raises(ValueError, match="weights 'int8' cannot be combined"):
        export_onnx(exported["net"], exported["card"], exported["dir"] / "x.onnx", precision="fp16",
                    weights="int8")  # fmt: skip


def test_export_policy_precision_option(exported, tmp_path, capsys, monkeypatch):
    from diffusion_controller.training import export

    seen = {}

    def fake_export(*args, **kw):
        seen.update(kw)
        return exported["fp16"]

    class Ckpt:
        card, network = exported["card"], exported["net"]

    monkeypatch.setattr(export, "load_checkpoint", lambda _p: Ckpt)
    monkeypatch.setattr(export, "export_onnx", fake_export)
    assert main([str(tmp_path / "c.pt"), str(tmp_path / "m.onnx"), "--precision", "fp16"]) == 0
    assert seen["precision"] == "fp16" and "fp16: max output change" in capsys.readouterr().out
