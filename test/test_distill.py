"""One-step distillation (training/distill.py): the student learns the teacher's DDIM map, its card says
what it is, every graph form runs it as one pass, and the node's layers refuse inpainting with it."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from test_train import synthetic_dataset, tiny_config  # noqa: E402

from diffusion_controller.core.card import CardError, ModelCard  # noqa: E402
from diffusion_controller.core.control_config import ConfigError, ControlConfig  # noqa: E402
from diffusion_controller.core.controller import ControlCore  # noqa: E402
from diffusion_controller.core.runtime import ModelError, Policy  # noqa: E402
from diffusion_controller.training.checkpoint import load_checkpoint  # noqa: E402
from diffusion_controller.training.distill import DistillConfig, Teacher, distill, one_step  # noqa: E402
from diffusion_controller.training.export import export_onnx  # noqa: E402
from diffusion_controller.training.train import train  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    data = synthetic_dataset(root / "d.npz")
    teacher = train(tiny_config(data, root / "teacher", 150), progress=False)
    cfg = DistillConfig(
        teacher=str(teacher), data=str(data), out=str(root / "student"), teacher_steps=5, pairs=2048,
        val_pairs=256, iterations=300, batch_size=64, lr=1e-3, warmup=10, save_every=100,
    )  # fmt: skip
    return teacher, distill(cfg, progress=False), root


def test_the_student_gets_closer_to_the_teacher_than_the_teacher_at_one_step(runs):
    _, student, _ = runs
    card = load_checkpoint(student).card
    t = card.training
    assert t["distill_val_mse"] < 0.5 * t["teacher_k1_mse"], t
    assert t["teacher_sampler"] == "ddim K=5 trailing, eta 0"


def test_the_student_card_names_a_one_step_sampler_that_cannot_be_steered(runs):
    _, student, _ = runs
    card = load_checkpoint(student).card
    assert (card.sampler_kind, card.steps, card.eta, card.sampler_inpainting) == ("distilled", 1, 0.0, False)
    assert card.diffusion.prediction_type == "sample"
    assert card.diffusion.timesteps(1).tolist() == [card.diffusion.train_timesteps - 1]
    d = card.to_dict()
    d["sampler"]["steps"] = 2
    with pytest.raises(CardError, match=r"sampler\.steps.*exactly 1"):
        ModelCard.from_dict(d, require_graph=False)
    d = card.to_dict()
    d["diffusion"]["prediction_type"] = "epsilon"
    with pytest.raises(CardError, match=r"diffusion\.prediction_type"):
        ModelCard.from_dict(d, require_graph=False)


@pytest.mark.parametrize("graph", ["fused", "denoiser"])
def test_both_graph_forms_run_the_student_as_one_network_pass(runs, graph):
    _, student, root = runs
    ck = load_checkpoint(student)
    path = export_onnx(ck.network, ck.card, root / f"student_{graph}.onnx", graph=graph)
    policy = Policy.load(path, provider="cpu", warmup=1)
    assert policy.steps == 1 and not policy.supports_inpainting
    with pytest.raises(ModelError, match="exactly 1 step"):
        Policy.load(path, provider="cpu", steps=3, warmup=0)
    card = policy.card
    rng = np.random.default_rng(3)
    obs = card.obs_mean + card.obs_std * rng.standard_normal((card.history, card.obs_dim))
    noise = rng.standard_normal((card.horizon, card.action_dim)).astype(np.float32)
    got = policy.predict(obs, noise=noise)
    obs_n = torch.from_numpy(((obs - card.obs_mean) / card.obs_std).astype(np.float32))[None]
    with torch.no_grad():
        x0 = one_step(ck.network, torch.from_numpy(noise)[None], obs_n, card.diffusion)[0].numpy()
    want = x0 * (card.action_max - card.action_min) / 2 + (card.action_max + card.action_min) / 2
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_blend_inpaint_is_refused_for_the_student_with_a_reason(runs):
    _, student, root = runs
    ck = load_checkpoint(student)
    policy = Policy.load(export_onnx(ck.network, ck.card, root / "s.onnx", graph="fused"), provider="cpu")
    with pytest.raises(ConfigError, match=r"cannot.*sampler\.inpainting false"):
        ControlCore(policy.card, ControlConfig(blend="inpaint"), policy)
    core = ControlCore(policy.card, ControlConfig(blend="ensemble"), policy)
    with pytest.raises(ConfigError, match="inpaint"):
        ControlCore(policy.card, ControlConfig(blend="inpaint"), None).swap_policy(policy)
    core.close()


def test_the_teacher_pairs_are_the_teacher_sampling_with_its_own_plan(runs):
    teacher_ckpt, _, root = runs
    ck = load_checkpoint(teacher_ckpt)
    pairs = np.load(root / "student" / "teacher_pairs.npz")
    t = Teacher(ck.network, ck.card, 5, "trailing")
    got = t.sample(torch.from_numpy(pairs["noise"][:8]), torch.from_numpy(pairs["obs_n"][:8])).numpy()
    np.testing.assert_allclose(got, pairs["x0"][:8], atol=1e-5)
