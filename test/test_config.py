"""Node configuration without a ROS graph: parameter checks, params files, and the match against a card."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from diffusion_controller.core import inputs
from diffusion_controller.core.card import ModelCard
from diffusion_controller.core.control_config import ControlConfig
from diffusion_controller.core.observation import COMPUTED_KINDS
from diffusion_controller.ros import config as cf
from diffusion_controller.ros import parameter_reference
from diffusion_controller.ros.binding import control_config, validate_against_card
from diffusion_controller.ros.params_file import load_params_file

ROOT = Path(__file__).resolve().parents[1]
JOINTS = ["hip_1", "ankle_1", "hip_2", "ankle_2", "hip_3", "ankle_3", "hip_4", "ankle_4"]


def ant_card(**action_overrides) -> ModelCard:
    """A card with the demo robot's layout (DESIGN.md), without a graph: config checks need no model."""
    feats = [
        {"name": "projected_gravity", "kind": "projected_gravity", "size": 3},
        {"name": "base_angular_velocity", "kind": "base_angular_velocity", "size": 3},
        {"name": "base_linear_velocity", "kind": "base_linear_velocity", "size": 3},
        {"name": "velocity_command", "kind": "velocity_command", "size": 3},
        {"name": "joint_position", "kind": "joint_position", "size": 8, "joints": JOINTS},
        {"name": "joint_velocity", "kind": "joint_velocity", "size": 8, "joints": JOINTS},
        {"name": "previous_action", "kind": "previous_action", "size": 8},
        {"name": "gait_clock", "kind": "gait_clock", "size": 2, "frequency_hz": 1.5},
    ]
    obs_dim = sum(f["size"] for f in feats)
    action = {
        "joints": JOINTS, "kind": "position", "units": "rad", "lower": [-1.0] * 8, "upper": [1.0] * 8,
        "horizon": 16, "first_offset": 1,
    }  # fmt: skip
    action.update(action_overrides)
    return ModelCard.from_dict(
        {
            "format": "diffusion_controller/model_card@1",
            "name": "ant_test",
            "version": "1.0.0",
            "control_period_s": 0.02,
            "observation": {"history": 8, "features": feats},
            "action": action,
            "normalization": {
                "observation": {"mean": [0.0] * obs_dim, "std": [1.0] * obs_dim},
                "action": {"min": [-1.0] * 8, "max": [1.0] * 8},
            },
            "diffusion": {
                "train_timesteps": 100, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "epsilon"
            },
            "sampler": {"kind": "ddim", "steps": 5, "eta": 0.0},
        },
        require_graph=False,
    )


@pytest.fixture
def ant_params() -> dict:
    return load_params_file(str(ROOT / "config" / "ant.yaml"))


def errors_of(params: dict, card: ModelCard | None = None) -> str:
    with pytest.raises(cf.ConfigError) as exc:
        cfg = cf.NodeConfig.from_params(params)
        validate_against_card(cfg, card or ant_card())
    return str(exc.value)


# -- the shipped configs ------------------------------------------------------------------------------------


def test_ant_yaml_fits_the_demo_card(ant_params):
    cfg = cf.NodeConfig.from_params(ant_params)
    binding = validate_against_card(cfg, ant_card())
    assert binding.feature_source == {
        "joint_position": "joint_states",
        "joint_velocity": "joint_states",
        "projected_gravity": "imu",
        "base_angular_velocity": "imu",
        "base_linear_velocity": "odom",
        "velocity_command": "cmd_vel",
    }
    assert binding.output_joints == tuple(JOINTS)
    assert binding.output_index == tuple(range(8))
    assert binding.period_s == pytest.approx(0.02)
    # Relative names: a namespace moves them, so robots in one graph never share a topic.
    assert cfg.commands_topic == "forward_position_controller/commands"
    assert cfg.trajectory_topic == "joint_trajectory_controller/joint_trajectory"
    topics = {s.topic for s in cfg.sources}
    assert topics == {"joint_states", "imu_sensor_broadcaster/imu", "odom", "cmd_vel"}
    assert cf.unknown_parameters(ant_params) == []


def test_template_yaml_is_a_valid_params_file_for_the_demo_card():
    params = load_params_file(str(ROOT / "config" / "template.yaml"))
    cfg = cf.NodeConfig.from_params(params)
    validate_against_card(cfg, ant_card())
    assert cf.unknown_parameters(params) == []
    # Every node parameter is shown (and so explained) in the template.
    shown = set(params)
    missing = [s.name for s in cf.NODE_PARAMS if s.name not in shown and s.name != "model_path"]
    assert missing == []


def test_template_yaml_shows_the_defaults():
    """The template is a copy users edit, so it writes each node parameter at its default: a default
    changed in the specification must be changed there too. Only the robot's wiring is an example."""
    params = load_params_file(str(ROOT / "config" / "template.yaml"))
    wiring = {"observations.sources", "outputs.commands.topic", "outputs.trajectory.topic"}
    for s in cf.NODE_PARAMS:
        if s.name in params and s.name not in wiring:
            assert cf.check_value(s, params[s.name]) == cf.check_value(s, s.default), s.name


def test_shipped_configs_set_only_what_differs_from_the_defaults():
    """config/ant*.yaml name what the demo robot sets (docs/PARAMETERS.md has the defaults), so a default
    is written once: a node parameter there at its default value is a copy that would go stale."""
    for name in ("ant.yaml", "ant_effort.yaml"):
        params = load_params_file(str(ROOT / "config" / name))
        repeated = [
            s.name for s in cf.NODE_PARAMS
            if s.name in params and cf.check_value(s, params[s.name]) == cf.check_value(s, s.default)
        ]  # fmt: skip
        assert repeated == [], f"{name} repeats defaults: {repeated}"


def test_params_file_node_key_and_wildcard_merge(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text(
        "/**:\n  ros__parameters:\n    threads: 2\n    rate_hz: 10.0\n"
        "diffusion_controller:\n  ros__parameters:\n    threads: 3\n"
        "other_node:\n  ros__parameters:\n    threads: 9\n"
    )
    flat = load_params_file(str(f))
    assert flat == {"threads": 3, "rate_hz": 10.0}


# -- validation against the card ------------------------------------------------------------------------


def test_feature_filled_by_no_source_is_named(ant_params):
    ant_params["observations.sources"] = ["joint_states", "imu", "cmd_vel"]
    msg = errors_of(ant_params)
    assert "base_linear_velocity" in msg and "no observation source" in msg


def test_source_feature_unknown_to_card_is_named(ant_params):
    ant_params["observations.odom.features"] = ["base_linear_velocity", "foot_contacts"]
    msg = errors_of(ant_params)
    assert "foot_contacts" in msg and "not a feature of model card 'ant_test'" in msg


def test_feature_filled_twice_is_named(ant_params):
    ant_params["observations.odom.features"] = ["base_linear_velocity", "base_angular_velocity"]
    msg = errors_of(ant_params)
    assert "base_angular_velocity" in msg and "imu" in msg and "odom" in msg


def test_unknown_message_type_is_named(ant_params):
    ant_params["observations.imu.type"] = "sensor_msgs/msg/MagneticField"
    msg = errors_of(ant_params)
    assert "MagneticField" in msg and "observations.imu.type" in msg


def test_type_that_cannot_fill_the_kind(ant_params):
    ant_params["observations.cmd_vel.features"] = ["velocity_command", "joint_position"]
    ant_params["observations.joint_states.features"] = ["joint_velocity"]
    msg = errors_of(ant_params)
    assert "geometry_msgs/msg/Twist cannot fill 'joint_position'" in msg


def test_previous_action_is_not_a_source_feature(ant_params):
    ant_params["observations.joint_states.features"] = ["joint_position", "joint_velocity", "previous_action"]
    assert "previous action" in errors_of(ant_params)


def test_every_computed_kind_has_a_name_in_messages():
    assert set(cf.COMPUTED_AS) == COMPUTED_KINDS


def test_gait_clock_is_not_a_source_feature(ant_params):
    ant_params["observations.imu.features"] = ["projected_gravity", "base_angular_velocity", "gait_clock"]
    assert "'gait_clock' is the node's gait clock (from time); no source may fill it" in errors_of(ant_params)


def test_all_problems_reported_at_once(ant_params):
    ant_params["observations.imu.type"] = "Nope"
    ant_params["observations.odom.features"] = ["typo_feature"]
    msg = errors_of(ant_params)
    assert "Nope" in msg
    ant_params["observations.imu.type"] = "sensor_msgs/msg/Imu"
    msg = errors_of(ant_params)
    assert "typo_feature" in msg and "base_linear_velocity" in msg


@pytest.mark.parametrize(
    ("spelling", "canonical"),
    [
        ("sensor_msgs/msg/Imu", cf.IMU),
        ("sensor_msgs/Imu", cf.IMU),
        ("Imu", cf.IMU),
        ("TwistStamped", cf.TWIST_STAMPED),
    ],
)
def test_type_spellings(spelling, canonical):
    assert cf.normalize_type(spelling) == canonical


def test_joints_reorder_and_rename(ant_params):
    robot = [f"leg_{j}" for j in JOINTS]
    order = [3, 0, 1, 2, 7, 6, 5, 4]
    ant_params["joints"] = [robot[i] for i in order]
    ant_params["model_joints"] = [JOINTS[i] for i in order]
    b = validate_against_card(cf.NodeConfig.from_params(ant_params), ant_card())
    assert b.output_joints == tuple(robot[i] for i in order)
    assert b.output_index == tuple(order)
    assert b.rename["hip_1"] == "leg_hip_1"


def test_joints_reorder_by_card_names(ant_params):
    order = [7, 6, 5, 4, 3, 2, 1, 0]
    ant_params["joints"] = [JOINTS[i] for i in order]
    b = validate_against_card(cf.NodeConfig.from_params(ant_params), ant_card())
    assert b.output_index == tuple(order)


def test_joints_that_miss_a_card_joint(ant_params):
    ant_params["joints"] = [*JOINTS[:7], "elbow"]
    msg = errors_of(ant_params)
    assert "ankle_4" in msg and "elbow" in msg


def test_default_pose_in_output_order_and_checked(ant_params):
    order = [7, 6, 5, 4, 3, 2, 1, 0]
    ant_params["joints"] = [JOINTS[i] for i in order]
    ant_params["default_pose"] = [0.1 * i for i in range(8)]
    b = validate_against_card(cf.NodeConfig.from_params(ant_params), ant_card())
    assert b.default_pose[7] == pytest.approx(0.0) and b.default_pose[0] == pytest.approx(0.7)
    ant_params["default_pose"] = [0.0] * 7
    assert "default_pose: 7 values for 8 joints" in errors_of(ant_params)
    ant_params["default_pose"] = [0.0] * 7 + [5.0]
    assert "outside the card's action limits" in errors_of(ant_params)


def test_default_pose_defaults_to_mid_limits(ant_params):
    card = ant_card(lower=[-1.0] * 8, upper=[0.5] * 8)
    b = validate_against_card(cf.NodeConfig.from_params(ant_params), card)
    assert b.default_pose == pytest.approx([-0.25] * 8)


def test_execute_steps_beyond_horizon(ant_params):
    ant_params["execute_steps"] = 17
    assert "horizon 16" in errors_of(ant_params)


def test_rate_override(ant_params):
    ant_params["rate_hz"] = 100
    b = validate_against_card(cf.NodeConfig.from_params(ant_params), ant_card())
    assert b.period_s == pytest.approx(0.01)


# -- parameter values ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("provider", "opencl", "not one of"),
        ("threads", 0, "outside"),
        ("threads", 1.5, "integer"),
        ("exec_latency_s", -0.1, "outside"),
        ("exec_latency_s", float("nan"), "finite"),
        ("compensate_delay", "yes", "true/false"),
        ("safe_mode", "freeze", "not one of"),
        ("default_pose", [0.0, float("inf")], "finite"),
        ("observations.sources", "imu", "list"),
        ("observations.imu.stamp", "sensor", "not one of"),
        ("observations.imu.timeout_s", -1.0, "outside"),
        ("blend", "average", "not one of"),
        ("precision", "int8", "not one of"),
        ("cuda_graph", "yes", "true/false"),
        ("device_id", -1, "outside"),
        ("engine_cache_dir", 3, "string"),
    ],
)
def test_bad_values_rejected_with_reason(name, value, fragment):
    spec = cf.spec_for(name)
    assert spec is not None
    with pytest.raises(cf.ConfigError) as exc:
        cf.check_value(spec, value)
    assert name in str(exc.value) and fragment in str(exc.value)


def test_gpu_parameters_reach_the_config_and_fp16_needs_tensorrt(ant_params):
    ant_params |= {"provider": "tensorrt", "precision": "fp16", "cuda_graph": False, "device_id": 1,
                   "engine_cache_dir": "/var/cache/engines"}  # fmt: skip
    cfg = cf.NodeConfig.from_params(ant_params)
    assert (cfg.provider, cfg.precision, cfg.cuda_graph, cfg.device_id, cfg.engine_cache_dir) == (
        "tensorrt", "fp16", False, 1, "/var/cache/engines"
    )  # fmt: skip
    assert cf.NodeConfig.from_params(ant_params | {"provider": "auto"}).precision == "fp16"
    for provider in ("cuda", "cpu"):
        msg = errors_of(ant_params | {"provider": provider})
        assert "precision: fp16 is TensorRT's" in msg and f"provider {provider}" in msg


def test_numbers_are_coerced():
    assert cf.check_value(cf.spec_for("exec_latency_s"), 0) == 0.0
    assert isinstance(cf.check_value(cf.spec_for("exec_latency_s"), 0), float)
    assert cf.check_value(cf.spec_for("default_pose"), [0, 1]) == (0.0, 1.0)
    assert cf.check_value(cf.spec_for("default_pose"), None) == ()


def test_from_params_reports_bad_values(ant_params):
    ant_params["threads"] = -2
    ant_params["observations.sources"] = ["imu", "imu"]
    msg = errors_of(ant_params)
    assert "threads" in msg and "duplicate" in msg


def test_empty_sources_is_an_error():
    assert "observations.sources: empty" in errors_of({})


def test_typo_parameters_are_found(ant_params):
    ant_params["exec_latency"] = 0.01
    assert cf.unknown_parameters(ant_params) == ["unknown parameter 'exec_latency'"]
    ant_params["observations.sources"] = ["joint_states", "imu", "cmd_vel"]
    problems = cf.unknown_parameters(ant_params)
    assert len(problems) == 2
    assert "odom.{features,frame,stamp,timeout_s,topic,type} set but 'odom' is not" in problems[1]


def test_schema_is_documented():
    names = [s.name for s in cf.NODE_PARAMS]
    assert len(names) == len(set(names))
    for s in (*cf.NODE_PARAMS, *cf.source_param_specs("x")):
        assert len(s.description) > 10, s.name
        cf.check_value(s, s.default)  # defaults pass their own checks


def test_each_parameter_fills_one_typed_config_field():
    """NodeConfig (SourceConfig) has exactly one field per parameter, of the parameter's type: from_params
    builds it from the specification without naming parameters one by one."""
    fields = {f.name: f.type for f in dataclasses.fields(cf.NodeConfig)}
    assert fields.pop("sources") == "tuple[SourceConfig, ...]"
    assert fields == {s.field: cf.KINDS[s.kind] for s in cf.NODE_PARAMS}
    source_fields = {f.name: f.type for f in dataclasses.fields(inputs.SourceConfig)}
    assert source_fields.pop("name") == "str"
    assert source_fields == {s.field: cf.KINDS[s.kind] for s in cf.SOURCE_PARAMS}
    default = cf.spec_for("observations.s.timeout_s").default
    assert inputs.SourceConfig("s", "/t", cf.IMU, ("x",)).timeout_s == default
    # The core's SourceConfig declares the per-source defaults the specification has.
    plain = inputs.SourceConfig("s", "/t", cf.IMU, ("x",))
    for s in cf.SOURCE_PARAMS:
        if s.field not in ("topic", "type", "features"):
            assert getattr(plain, s.field) == s.default, s.name


def test_parameters_reach_the_core_under_their_control_name(ant_params):
    """ParamSpec.control names the ControlConfig field a parameter becomes; a refusal of the core is
    reported under the parameter's name (the core alone checks what it checks against a card)."""
    control_fields = {f.name for f in dataclasses.fields(ControlConfig)}
    assert {s.control for s in cf.NODE_PARAMS if s.control} <= control_fields
    ant_params |= {"max_step_per_tick": 0.05, "observations.max_future_s": 0.02, "seed": -1}
    cfg = cf.NodeConfig.from_params(ant_params)
    card = ant_card()
    control = control_config(cfg, validate_against_card(cfg, card), card)
    assert (control.max_step_per_tick, control.future_tolerance_s, control.seed) == (0.05, 0.02, None)
    assert control.command_timeout_s is None  # cmd_vel's timeout_s 0 = hold the last command
    no_inpainting = dataclasses.replace(card, sampler_inpainting=False)
    ant_params["blend"] = "inpaint"
    assert "blend: 'inpaint' needs a sampler a prefix can steer" in errors_of(ant_params, no_inpainting)


def test_control_config_sets_every_core_field_from_its_parameter():
    """control_config names each ControlConfig field once, as a keyword (greppable, no loop over the
    table), except the core-only ones; a parameter naming a field (ParamSpec.control) is the value it gets."""
    import ast
    import inspect

    from diffusion_controller.ros import binding

    tree = ast.parse(inspect.getsource(binding.control_config))
    (call,) = [n for n in ast.walk(tree) if getattr(getattr(n, "func", None), "id", "") == "ControlConfig"]
    given = {k.arg: ast.unparse(k.value) for k in call.keywords}
    assert None not in given, "no **values: every field by name"
    fields = {f.name for f in dataclasses.fields(ControlConfig)}
    assert set(given) | set(binding.CORE_ONLY_FIELDS) == fields
    assert not set(given) & set(binding.CORE_ONLY_FIELDS)
    for s in cf.NODE_PARAMS:
        if s.control:
            # default_pose arrives resolved against the card (binding.default_pose, card order)
            value = given[s.control]
            assert f"cfg.{s.field}" in value or f"binding.{s.field}" in value, (s.name, value)


def test_each_default_has_one_home():
    """A parameter that configures the core takes its default from the core's dataclass (ros/config.py
    core_default); only default_pose and policy.chunk_timeout_s mean something else at the node."""
    from diffusion_controller.core.plausibility import PlausibilityLimits

    own = {"default_pose", "policy.chunk_timeout_s"}
    for s in cf.NODE_PARAMS:
        if s.control and s.name not in own:
            assert s.default == cf.core_default(ControlConfig, s.control), s.name
    for name in ("joint_margin", "command_sigmas", "sensor_sigmas"):
        assert cf.spec_for(f"plausibility.{name}").default == cf.core_default(PlausibilityLimits, name)
    assert cf.spec_for("observations.x.timeout_s").default == ControlConfig().obs_timeout_s
    with pytest.raises(ValueError, match="has no default"):
        cf.core_default(cf.SourceConfig, "name")


def test_the_parameter_reference_is_the_specification():
    """docs/PARAMETERS.md is rendered from PARAM_GROUPS; after changing a parameter, run
    `python -m diffusion_controller.ros.parameter_reference --docs`."""
    text = (ROOT / "docs" / "PARAMETERS.md").read_text()
    assert text == parameter_reference.parameter_document(), (
        "docs/PARAMETERS.md differs from the specification in ros/config.py: run "
        f"`{parameter_reference.COMMAND}`"
    )
    assert parameter_reference.COMMAND in text  # the file says how it is made
    table = parameter_reference.parameter_table_markdown()
    for s in (*cf.NODE_PARAMS, *cf.SOURCE_PARAMS):
        assert f"| `{s.name}` | {s.kind} |" in table


def test_the_parameter_reference_command_writes_the_file(tmp_path, capsys):
    """The command rewrites a stale reference and leaves a current one alone."""
    doc = tmp_path / "PARAMETERS.md"
    doc.write_text("stale\n")
    assert parameter_reference.main(["--docs", str(doc)]) == 0
    assert doc.read_text() == parameter_reference.parameter_document()
    assert parameter_reference.main(["--docs", str(doc)]) == 0
    assert "already up to date" in capsys.readouterr().out


def test_descriptors_declare_real_types_ranges_and_read_only():
    from rcl_interfaces.msg import ParameterType

    from diffusion_controller.ros.params import descriptor

    d = descriptor(cf.spec_for("rate_hz"))
    assert d.type == ParameterType.PARAMETER_DOUBLE and not d.dynamic_typing
    assert (d.floating_point_range[0].from_value, d.floating_point_range[0].to_value) == (0.0, 2000.0)
    d = descriptor(cf.spec_for("threads"))
    assert d.type == ParameterType.PARAMETER_INTEGER and d.integer_range[0].from_value == 1
    assert descriptor(cf.spec_for("provider")).type == ParameterType.PARAMETER_STRING
    assert descriptor(cf.spec_for("executor")).read_only
    assert not descriptor(cf.spec_for("model_path")).read_only
    assert descriptor(cf.spec_for("joints")).dynamic_typing  # an empty list has no ROS type


# -- the shipped models (what the launch files default to; the launch files: test_launch_files.py) --------


def test_every_shipped_model_fits_the_demo_config(ant_params):
    """models/*.onnx are what the launch files default to: each must configure with config/ant.yaml, an
    effort model with config/ant_effort.yaml (and not with ant.yaml: a position output cannot carry it)."""
    from diffusion_controller.core.card_source import card_of_model

    cfg = cf.NodeConfig.from_params(ant_params)
    effort = cf.NodeConfig.from_params(load_params_file(str(ROOT / "config" / "ant_effort.yaml")))
    for path in sorted((ROOT / "models").glob("*.onnx")):
        card = card_of_model(str(path))
        if card.action_kind == "effort":
            with pytest.raises(cf.ConfigError, match="cannot carry model 'ant_effort''s effort actions"):
                validate_against_card(cfg, card)
            binding = validate_against_card(effort, card)
        else:
            binding = validate_against_card(cfg, card)
        assert binding.output_joints == tuple(JOINTS), path


def test_params_files_are_read_as_a_node_reads_them_and_bad_ones_are_named(tmp_path):
    """`/**` first, then the node's own key (plain or absolute), nested names dotted; anything else is a
    ConfigError naming the file, so `dataset_from_bag --config` and the demonstrator fail clearly."""
    f = tmp_path / "p.yaml"
    f.write_text("/**:\n  ros__parameters:\n    rate_hz: 50.0\n    threads: 1\n"
                 "diffusion_controller:\n  ros__parameters:\n    threads: 2\n"
                 "    observations: {sources: [a], a: {timeout_s: 0.2}}\n"
                 "other_node:\n  ros__parameters:\n    threads: 9\n")  # fmt: skip
    assert load_params_file(str(f)) == {"rate_hz": 50.0, "threads": 2, "observations.sources": ["a"],
                                        "observations.a.timeout_s": 0.2}  # fmt: skip
    assert load_params_file(str(f), "other_node")["threads"] == 9
    for text, why in [("- a\n- b\n", "top level"), ("x: [\n", "cannot read"),
                      ("diffusion_controller: {threads: 1}\n", "ros__parameters"),
                      ("someone_else:\n  ros__parameters: {a: 1}\n", "no parameters"),
                      ("diffusion_controller:\n  ros__parameters: {joints: [a, 1]}\n",
                       "mixes types")]:  # fmt: skip
        f.write_text(text)
        with pytest.raises(cf.ConfigError, match=why):
            load_params_file(str(f))
    with pytest.raises(cf.ConfigError, match="cannot read"):
        load_params_file(str(tmp_path / "missing.yaml"))


def test_the_effort_model_can_be_braked_by_damping_instead_of_zero_torque():
    """safe_mode damping with the shipped effort model (it sees its joints' velocities): damping_gain
    reaches the core; without a gain, or for the position model, the parameter named in the refusal."""
    from diffusion_controller.core.card_source import card_of_model

    params = load_params_file(str(ROOT / "config" / "ant_effort.yaml"))
    card = card_of_model(str(ROOT / "models" / "ant_effort.onnx"))
    cfg = cf.NodeConfig.from_params({**params, "safe_mode": "damping", "damping_gain": 8.0})
    assert control_config(cfg, validate_against_card(cfg, card), card).damping_gain == 8.0
    cfg = cf.NodeConfig.from_params({**params, "safe_mode": "damping"})
    with pytest.raises(cf.ConfigError, match="damping_gain: expected a finite number > 0"):
        control_config(cfg, validate_against_card(cfg, card), card)
    position = card_of_model(str(ROOT / "models" / "ant_locomotion.onnx"))
    cfg = cf.NodeConfig.from_params({**load_params_file(str(ROOT / "config" / "ant.yaml")),
                                     "safe_mode": "damping", "damping_gain": 8.0})  # fmt: skip
    with pytest.raises(cf.ConfigError, match="safe_mode: 'damping' is for effort actions"):
        control_config(cfg, validate_against_card(cfg, position), position)
