"""Model card: validation errors that name the field, and YAML <-> ONNX metadata round trips."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from tiny_models import ANT_JOINTS, tiny_card

from diffusion_controller.core.card import CardError, ModelCard
from diffusion_controller.core.card_schema import FORMAT, METADATA_KEY
from diffusion_controller.core.onnx_metadata import read_onnx_metadata


def full_dict() -> dict:
    d = tiny_card().to_dict()
    d["graph"] = {
        "kind": "fused",
        "inputs": {"obs_history": "obs", "noise": "noise", "prefix": "prefix", "prefix_mask": "mask"},
        "outputs": {"actions": "actions"},
    }
    return d


def tiny_onnx_bytes(extra_props: dict[str, str] | None = None) -> bytes:
    node = helper.make_node("Identity", ["x"], ["y"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    for k, v in (extra_props or {}).items():
        model.metadata_props.add(key=k, value=v)
    return model.SerializeToString()


def test_valid_card_loads_and_describes_the_layout():
    card = ModelCard.from_dict(full_dict())
    assert card.obs_dim == 36 and card.action_dim == 8
    assert card.action_joints == ANT_JOINTS
    assert card.feature_slice("velocity_command") == slice(9, 12)
    assert card.feature_slice("previous_action") == slice(28, 36)
    assert card.feature_of_kind("joint_velocity").joints == ANT_JOINTS
    assert card.graph.inputs["prefix_mask"] == "mask"
    assert not card.action_lower.flags.writeable
    with pytest.raises(KeyError, match="no observation feature"):
        card.feature_slice("lidar")


def test_dict_and_yaml_round_trip(tmp_path):
    card = ModelCard.from_dict(full_dict())
    assert ModelCard.from_dict(card.to_dict()).to_dict() == card.to_dict()
    path = card.to_yaml(tmp_path / "m.yaml")
    again = ModelCard.from_yaml(path)
    assert again.to_dict() == card.to_dict()
    np.testing.assert_array_equal(again.obs_std, card.obs_std)  # floats survive YAML exactly


def test_onnx_metadata_round_trip_is_readable_by_onnx(tmp_path):
    card = ModelCard.from_dict(full_dict())
    path = tmp_path / "m.onnx"
    path.write_bytes(tiny_onnx_bytes({"author": "someone"}))
    card.to_onnx(path)
    card.to_onnx(path)  # writing twice replaces, never duplicates
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    props = {p.key: p.value for p in model.metadata_props}
    assert props["author"] == "someone"
    assert [p.key for p in model.metadata_props].count(METADATA_KEY) == 1
    assert ModelCard.from_yaml_text(props[METADATA_KEY]).to_dict() == card.to_dict()
    assert ModelCard.from_onnx(path).to_dict() == card.to_dict()


def test_metadata_written_by_onnx_is_read_by_the_core_reader():
    data = tiny_onnx_bytes({"a": "1", "b": "zwei ü"})
    assert read_onnx_metadata(data) == {"a": "1", "b": "zwei ü"}


@pytest.mark.parametrize("cut", [0.3, 0.9])
def test_truncated_or_garbage_onnx_is_rejected(cut):
    data = tiny_onnx_bytes({"model_card": "x" * 200})
    with pytest.raises(ValueError, match=r"truncated|not an ONNX"):
        read_onnx_metadata(data[: int(len(data) * cut)])
    with pytest.raises(ValueError, match=r"not an ONNX|truncated|protobuf"):
        read_onnx_metadata(b"\xff\xff\xff\xff garbage")


def test_missing_metadata_key_names_it(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(tiny_onnx_bytes())
    with pytest.raises(CardError, match="model_card"):
        ModelCard.from_onnx(path)


def mutate(path: str, value):
    """A full card dict with the dotted `path` set to value (or deleted when value is DELETE)."""
    d = full_dict()
    keys = path.split(".")
    node = d
    for k in keys[:-1]:
        node = node[int(k)] if isinstance(node, list) else node[k]
    last = keys[-1]
    if value is DELETE:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return d


DELETE = object()
BAD = [
    ("format", "other@2", "format", "diffusion_controller/model_card@1"),
    ("name", "Ant-Policy", "name", "[a-z0-9_]+"),
    ("control_period_s", 0, "control_period_s", "> 0"),
    ("observation.history", 0, "observation.history", ">= 1"),
    ("observation.features.0.kind", "lidar", "observation.features[0].kind", "one of"),
    ("observation.features.0.size", 4, "observation.features[0].size", "expected 3"),
    ("observation.features.4.size", 7, "observation.features[4].size", "len(joints)"),
    ("observation.features.6.size", 7, "observation.features[6].size", "previous_action"),
    ("observation.features.4.joints", DELETE, "observation.features[4].joints", "names its joints"),
    ("action.lower.0", 1.0, "action.lower[0]", "< action.upper[0]"),
    ("action.upper", [1.0] * 7, "action.upper", "expected 8 values"),
    ("action.kind", "torque", "action.kind", "one of"),
    ("action.horizon", 0, "action.horizon", ">= 1"),
    ("action.joints", ["a", "a"], "action.joints", "unique"),
    ("normalization.observation.std.3", 0.0, "normalization.observation.std[3]", "> 0"),
    ("normalization.observation.mean", [0.0] * 35, "normalization.observation.mean", "expected 36 values"),
    ("normalization.action.max", [0.0] * 8, "normalization.action.min[1]", "< normalization.action.max[1]"),
    ("diffusion.beta_schedule", "cosine", "diffusion.beta_schedule", "one of"),
    ("diffusion.prediction_type", "v_prediction", "diffusion.prediction_type", "one of"),
    ("diffusion.clip_sample", "yes", "diffusion.clip_sample", "true or false"),
    ("diffusion.timestep_spacing", "uniform", "diffusion.timestep_spacing", "one of"),
    ("sampler.steps", 101, "sampler.steps", "train_timesteps"),
    ("sampler.kind", "ddpm", "sampler.kind", "one of"),
    ("sampler.eta", -0.1, "sampler.eta", ">= 0"),
    ("graph.kind", "pipeline", "graph.kind", "one of"),
    ("graph.inputs.noise", DELETE, "graph.inputs.noise", "missing"),
    ("action.typo_field", 1, "action.typo_field", "unknown field"),
    ("graph", DELETE, "graph", "missing"),
]


@pytest.mark.parametrize(("path", "value", "field", "expected"), BAD, ids=[b[0] for b in BAD])
def test_invalid_fields_are_named_with_what_was_expected(path, value, field, expected):
    with pytest.raises(CardError) as info:
        ModelCard.from_dict(mutate(path, value))
    msg = str(info.value)
    assert field in msg, msg
    assert expected in msg, msg


def test_timestep_spacing_defaults_to_leading_is_validated_and_round_trips(tmp_path):
    d = full_dict()
    del d["diffusion"]["timestep_spacing"]  # a card written before the field existed
    assert ModelCard.from_dict(d).diffusion.timestep_spacing == "leading"
    d["diffusion"]["timestep_spacing"] = "sideways"
    with pytest.raises(CardError) as info:
        ModelCard.from_dict(d)
    msg = str(info.value)
    assert "diffusion.timestep_spacing: expected one of ['leading', 'trailing', 'linspace']" in msg, msg
    for spacing in ("trailing", "linspace"):
        d["diffusion"]["timestep_spacing"] = spacing
        card = ModelCard.from_dict(d)
        assert card.diffusion.timestep_spacing == spacing
        assert card.to_dict()["diffusion"]["timestep_spacing"] == spacing
        again = ModelCard.from_yaml(card.to_yaml(tmp_path / f"{spacing}.yaml"))
        assert again.to_dict() == card.to_dict() and again.diffusion == card.diffusion


def test_sampler_steps_are_checked_for_the_cards_spacing():
    """steps_offset only moves leading timesteps: K=T with offset 1 overflows there, not with trailing."""
    d = mutate("sampler.steps", 100)
    d["diffusion"]["steps_offset"] = 1
    with pytest.raises(CardError, match=r"sampler\.steps: 100 steps with steps_offset 1"):
        ModelCard.from_dict(d)
    d["diffusion"]["timestep_spacing"] = "trailing"
    assert ModelCard.from_dict(d).diffusion.timesteps(100)[0] == 99


def test_shipped_cards_name_their_spacing_and_without_the_field_a_card_means_leading():
    models = Path(__file__).resolve().parents[1] / "models"
    onnx_files = sorted(models.glob("*.onnx"))
    spacing = {p.stem: ModelCard.from_onnx(p).diffusion.timestep_spacing for p in onnx_files}
    # Every shipped model is a new export: trailing timesteps (the K=1 default runs at t=99).
    assert spacing == dict.fromkeys(["ant_effort", "ant_locomotion", "ant_locomotion_denoiser"], "trailing")
    for stem in spacing:
        from_yaml = ModelCard.from_yaml(models / f"{stem}.yaml", require_graph=False).to_dict()
        assert from_yaml == ModelCard.from_onnx(models / f"{stem}.onnx").to_dict()
    text = (models / "ant_locomotion.yaml").read_text().replace(", timestep_spacing: trailing", "")
    assert "timestep_spacing" not in text
    card = ModelCard.from_yaml_text(text)
    assert card.diffusion.timestep_spacing == "leading"
    assert card.diffusion.timesteps(2).tolist() == [50, 0]


def test_two_velocity_commands_are_rejected():
    d = full_dict()
    d["observation"]["features"].append({"name": "cmd2", "kind": "velocity_command", "size": 3})
    d["normalization"]["observation"]["mean"] += [0.0] * 3
    d["normalization"]["observation"]["std"] += [1.0] * 3
    with pytest.raises(CardError, match="at most one velocity_command"):
        ModelCard.from_dict(d)


def test_every_error_is_reported_at_once():
    d = mutate("action.horizon", 0)
    d["name"] = "BAD NAME"
    d["diffusion"]["beta_schedule"] = "nope"
    with pytest.raises(CardError) as info:
        ModelCard.from_dict(d)
    fields = " ".join(info.value.errors)
    assert "action.horizon" in fields and "name" in fields and "diffusion.beta_schedule" in fields


def test_not_a_mapping_and_bad_yaml_are_card_errors(tmp_path):
    with pytest.raises(CardError, match="mapping"):
        ModelCard.from_dict([1, 2])
    with pytest.raises(CardError, match="YAML"):
        ModelCard.from_yaml_text("a: [1, 2")
    with pytest.raises(CardError, match="cannot read"):
        ModelCard.from_yaml(tmp_path / "absent.yaml")


def test_graph_is_optional_only_when_asked():
    d = copy.deepcopy(full_dict())
    del d["graph"]
    card = ModelCard.from_dict(d, require_graph=False)
    assert card.graph is None and "graph" not in card.to_dict()
    assert card.to_dict()["format"] == FORMAT


def with_gait_clock(**feature) -> dict:
    """The full card with a gait_clock feature appended (normalization extended to match)."""
    d = full_dict()
    d["observation"]["features"].append({"name": "gait_clock", "kind": "gait_clock", "size": 2, **feature})
    d["normalization"]["observation"]["mean"] += [0.0, 0.0]
    d["normalization"]["observation"]["std"] += [0.7, 0.7]
    return d


def test_gait_clock_feature_keeps_its_frequency_through_yaml():
    card = ModelCard.from_dict(with_gait_clock(frequency_hz=1.5))
    f = card.features[-1]
    assert (f.kind, f.size, f.frequency_hz) == ("gait_clock", 2, 1.5)
    assert card.obs_dim == 38
    assert ModelCard.from_yaml_text(card.to_yaml_text()).to_dict() == card.to_dict()


@pytest.mark.parametrize(
    ("feature", "expected"),
    [
        ({}, "frequency_hz: missing"),
        ({"frequency_hz": 0.0}, "> 0"),
        ({"frequency_hz": "fast"}, "finite number"),
        ({"frequency_hz": 1.5, "size": 3}, "expected 2 for kind 'gait_clock'"),
    ],
)
def test_bad_gait_clock_is_named(feature, expected):
    with pytest.raises(CardError) as info:
        ModelCard.from_dict(with_gait_clock(**feature))
    msg = str(info.value)
    assert "observation.features[7]" in msg and expected in msg, msg


def test_frequency_on_another_kind_is_rejected():
    d = full_dict()
    d["observation"]["features"][0]["frequency_hz"] = 1.5
    with pytest.raises(CardError, match=r"features\[0\]\.frequency_hz: expected no frequency_hz"):
        ModelCard.from_dict(d)


def test_a_one_step_run_at_full_noise_cannot_claim_inpainting():
    d = full_dict()
    d["diffusion"]["timestep_spacing"] = "trailing"
    d["sampler"] = {"kind": "ddim", "steps": 1, "eta": 0.0}
    assert not ModelCard.from_dict(d).sampler_inpainting  # the default follows the timesteps
    d["sampler"]["inpainting"] = True
    with pytest.raises(CardError, match=r"sampler\.inpainting: 1 step\(s\) at timesteps \[99\] never see"):
        ModelCard.from_dict(d)
    d["sampler"]["steps"] = 2
    assert ModelCard.from_dict(d).sampler_inpainting
    d["diffusion"]["timestep_spacing"] = "leading"
    d["sampler"]["steps"] = 1
    assert ModelCard.from_dict(d).sampler_inpainting  # K=1 leading runs at t=0
