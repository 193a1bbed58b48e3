"""Node configuration: the parameter schema, its validation, and the check against a model card.

Plain Python (no rclpy) so the whole configuration story is unit-testable without a ROS graph. The node
declares exactly the parameters listed here, validates every set through `check_value`, and builds a
`NodeConfig` on configure.

Observation sources. ROS parameters cannot hold a list of dicts, so sources follow the ros2_control idiom
of a name list plus per-name parameters:

    observations:
      sources: [joint_states, imu]          # names, free to choose
      joint_states:
        topic: /joint_states                # relative names and ~/ work; remappable like any topic
        type: sensor_msgs/msg/JointState
        features: [joint_position, joint_velocity]   # card feature NAMES this source fills
        timeout_s: 0.1                      # watchdog: older than this -> safe state (0 = never stale)
        stamp: header                       # header | receipt
        frame: ""                           # expected header.frame_id / Odometry child_frame_id ("" = any)

Every card feature except `previous_action` (the node's own last command) and `gait_clock` (computed from
the observation time) must be filled by exactly one source; `validate_against_card` names every violation
at once so a user fixes a config in one pass.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from diffusion_controller.core.card import FEATURE_SIZES
from diffusion_controller.core.observation import COMPUTED_KINDS
from diffusion_controller.core.plausibility import POLICIES
from diffusion_controller.core.safety import SAFE_MODES
from diffusion_controller.core.scheduler import BLEND_MODES, inpaint_refusal


class ConfigError(ValueError):
    """A configuration problem; the message names the parameter or feature and what was expected."""


# Message types a source may have, and the card feature kinds each can produce. Short forms
# ("sensor_msgs/JointState", "JointState") are accepted and normalized to these names.
JOINT_STATE = "sensor_msgs/msg/JointState"
IMU = "sensor_msgs/msg/Imu"
ODOMETRY = "nav_msgs/msg/Odometry"
TWIST = "geometry_msgs/msg/Twist"
TWIST_STAMPED = "geometry_msgs/msg/TwistStamped"
FLOAT64_ARRAY = "std_msgs/msg/Float64MultiArray"

ALL_KINDS = frozenset(FEATURE_SIZES)
#: What the node computes for each kind no source may fill (core/observation.py), as error messages name it.
COMPUTED_AS = {"previous_action": "own previous action", "gait_clock": "gait clock (from time)"}
KINDS_BY_TYPE: dict[str, frozenset[str]] = {
    JOINT_STATE: frozenset({"joint_position", "joint_velocity"}),
    IMU: frozenset({"projected_gravity", "base_angular_velocity"}),
    ODOMETRY: frozenset({"base_linear_velocity", "base_angular_velocity", "projected_gravity"}),
    TWIST: frozenset({"velocity_command"}),
    TWIST_STAMPED: frozenset({"velocity_command"}),
    # A raw vector may stand in for any feature (the values are taken as they come, size-checked).
    FLOAT64_ARRAY: ALL_KINDS - COMPUTED_KINDS,
}
HAS_HEADER = frozenset({JOINT_STATE, IMU, ODOMETRY, TWIST_STAMPED})

PROVIDERS = ("auto", "cpu", "cuda", "tensorrt")
PRECISIONS = ("fp32", "fp16")  # core/providers.py: fp16 is TensorRT's
EXECUTORS = ("auto", "events", "single_threaded", "multi_threaded")
STAMP_MODES = ("header", "receipt")
IMPLAUSIBLE_POLICIES = ("auto", *POLICIES)
TRAJECTORY_STAMPS = ("zero", "absolute")


def normalize_type(name: str) -> str:
    """Canonical `pkg/msg/Type` for the accepted spellings; raises ConfigError for unknown types."""
    text = str(name).strip()
    parts = [p for p in text.split("/") if p]
    candidates = {t: t for t in KINDS_BY_TYPE}
    for t in KINDS_BY_TYPE:
        pkg, _, cls = t.split("/")
        candidates[f"{pkg}/{cls}"] = t
        candidates[cls] = t
    key = "/".join(parts)
    if key in candidates:
        return candidates[key]
    raise ConfigError(f"unknown message type '{name}'; supported: {', '.join(sorted(KINDS_BY_TYPE))}")


# ---------------------------------------------------------------------------------------------------------
# Parameter schema


@dataclass(frozen=True)
class ParamSpec:
    """One declared parameter. `live` ones may change while the node is configured; `startup` ones are
    read once when the process starts (give them on the command line or in the params file); the rest
    are read on configure (set them while unconfigured, or cleanup + configure)."""

    name: str
    default: Any
    kind: str  # bool | int | float | str | float_list | str_list
    description: str
    range: tuple[float, float] | None = None
    choices: tuple[str, ...] | None = None
    live: bool = False
    startup: bool = False


NODE_PARAMS: tuple[ParamSpec, ...] = (
    ParamSpec("model_path", "", "str", "ONNX policy (card in its metadata). Setting it at runtime swaps the "
              "model: checked now, loaded and warmed up in the background, swapped in between ticks.",
              live=True),
    ParamSpec("provider", "auto", "str", "ONNX Runtime provider: auto tries tensorrt, cuda, then cpu, "
              "each until one starts; cuda or tensorrt fail the configure instead of running on the CPU.",
              choices=PROVIDERS),
    ParamSpec("precision", "fp32", "str", "TensorRT precision: fp16 builds the engine in half precision "
              "(TensorRT only: an error with provider cuda or cpu; auto's cuda/cpu fallback runs fp32).",
              choices=PRECISIONS),
    ParamSpec("cuda_graph", True, "bool", "Replay the policy as a captured CUDA graph where one GPU provider "
              "owns the whole graph (cuda, or tensorrt without nodes left to cuda); dropped with a log line "
              "where ONNX Runtime cannot capture it."),
    ParamSpec("device_id", 0, "int", "CUDA device the cuda and tensorrt providers run on.", range=(0, 63)),
    ParamSpec("engine_cache_dir", "", "str", "TensorRT engine and timing cache root, one subdirectory per "
              "model and GPU, built once (ahead of time with `build_engine`); empty = "
              "~/.cache/diffusion_controller/tensorrt."),
    ParamSpec("threads", 1, "int", "ONNX Runtime intra-op threads on the CPU (spinning off); keep a core "
              "free for the control loop.", range=(1, 64)),
    ParamSpec("steps", 0, "int", "DDIM steps K for denoiser graphs; 0 = the card's sampler.steps.",
              range=(0, 1000)),
    ParamSpec("seed", 0, "int", "Noise seed (request k uses seed + k) for reproducible runs; -1 = random.",
              range=(-1, 2**31 - 1)),
    ParamSpec("rate_hz", 0.0, "float", "Control rate; 0 = 1 / the card's control_period_s.",
              range=(0.0, 2000.0)),
    ParamSpec("exec_latency_s", 0.0, "float", "Time from publishing a command to it taking effect; actions "
              "scheduled before now + this are stale.", range=(0.0, 1.0)),
    ParamSpec("execute_steps", 1, "int", "Actions executed from a chunk before the next inference starts.",
              range=(1, 1024)),
    ParamSpec("blend", "none", "str", "How a new chunk joins the running one: none (replace), crossfade, "
              "inpaint (the new chunk's first actions frozen to the old one; needs a fused graph), or "
              "ensemble (each tick runs the mean of the last ensemble_chunks chunks' actions for it).",
              choices=BLEND_MODES),
    ParamSpec("crossfade_steps", 4, "int", "Actions over which crossfade ramps old -> new (0 = replace).",
              range=(0, 1024)),
    ParamSpec("ensemble_chunks", 4, "int", "Chunks averaged by blend ensemble (1 = replace); at one chunk "
              "per tick, also the ticks of observation age the mean reaches back.", range=(1, 1024)),
    ParamSpec("compensate_delay", True, "bool", "Stamp chunks with the observation time (true) or the "
              "inference start (false, delay ignored: for comparisons)."),
    ParamSpec("max_consecutive_misses", 5, "int", "Ticks without a valid action before the safe state.",
              range=(1, 100000)),
    ParamSpec("safe_mode", "hold", "str", "Safe state: hold the last command or go to default_pose.",
              choices=SAFE_MODES),
    ParamSpec("default_pose", [], "float_list", "Pose of safe_mode default_pose, one value per output "
              "joint in `joints` order; empty = the middle of the card's limits."),
    ParamSpec("max_step_per_tick", 0.2, "float", "Largest change of a joint command per tick (robot units).",
              range=(1e-6, 1000.0)),
    ParamSpec("joints", [], "str_list", "Output joint order/names; empty = the card's action joints."),
    ParamSpec("model_joints", [], "str_list", "For each entry of `joints`, the card joint it carries; empty "
              "= same names. Renames apply to JointState inputs too."),
    ParamSpec("autostart", True, "bool", "Configure and activate at startup.", startup=True),
    ParamSpec("loop_priority", 50, "int", "SCHED_FIFO priority of the control-loop thread (like "
              "ros2_control's controller_manager; needs rtprio rights, else a warning and normal priority); "
              "0 = normal.",
              range=(0, 99)),
    ParamSpec("executor_priority", 49, "int", "SCHED_FIFO priority of the main executor thread "
              "(services, parameters, diagnostics; read at startup); below loop_priority. Under CPU load a "
              "normal-priority thread holding Python's GIL would stall the loop thread; 0 = normal.",
              range=(0, 99), startup=True),
    ParamSpec("executor", "auto", "str", "Executor for services, parameters and diagnostics (read at "
              "startup): auto = rclpy's EventsExecutor where rclpy has it (Kilted on), else "
              "single_threaded. The control loop has a thread of its own, which also takes the sensor "
              "messages (no executor callback per message).", choices=EXECUTORS, startup=True),
    ParamSpec("diagnostics_period_s", 1.0, "float", "Period of /diagnostics.", range=(0.05, 60.0),
              startup=True),
    ParamSpec("observations.sources", [], "str_list", "Names of observation sources; each has "
              "observations.<name>.{topic,type,features,timeout_s,stamp,frame}."),
    ParamSpec("observations.max_future_s", 0.05, "float", "Reject observation stamps further than this in "
              "the future.", range=(0.0, 10.0)),
    ParamSpec("plausibility.joint_margin", 1.0, "float", "Joint positions of action joints are plausible "
              "within the card's action limits widened by this (robot units; wide enough for a robot "
              "lying down before it stands: the card does not know the physical range).",
              range=(1e-6, 1000.0)),
    ParamSpec("plausibility.command_sigmas", 3.0, "float", "A velocity command is inside the training range "
              "within the card's normalization mean +- this many standard deviations.", range=(0.1, 1e6)),
    ParamSpec("plausibility.sensor_sigmas", 50.0, "float", "Any other observation is plausible within the "
              "card's normalization mean +- this many standard deviations (only garbage is outside).",
              range=(0.1, 1e9)),
    ParamSpec("max_model_mb", 512.0, "float", "Largest model file configure or a swap will read (MiB); a "
              "larger model_path is refused before any reading.", range=(0.001, 1e6), live=True),
    ParamSpec("outputs.commands.enabled", True, "bool", "Publish Float64MultiArray commands "
              "(forward_command_controller)."),
    ParamSpec("outputs.commands.topic", "~/commands", "str", "Command topic."),
    ParamSpec("outputs.trajectory.enabled", True, "bool", "Publish the remaining chunk as a JointTrajectory "
              "(joint_trajectory_controller)."),
    ParamSpec("outputs.trajectory.topic", "~/joint_trajectory", "str", "Trajectory topic."),
    ParamSpec("outputs.trajectory.stamp", "zero", "str", "Trajectory header stamp: zero (start on receipt) "
              "or absolute (time of the first point minus one tick).", choices=TRAJECTORY_STAMPS),
    ParamSpec("outputs.debug.enabled", True, "bool", "Publish ~/debug/command_timing every tick."),
    ParamSpec("outputs.debug.topic", "~/debug/command_timing", "str", "Timing topic: [tick_time, exec_time, "
              "action_time, obs_stamp, chunk_seq, index, state, missed]."),
)


def source_param_specs(source: str) -> tuple[ParamSpec, ...]:
    """The per-source parameters `observations.<source>.*`."""
    p = f"observations.{source}."
    return (
        ParamSpec(p + "topic", f"~/{source}", "str", "Topic (relative, absolute or ~/; remappable)."),
        ParamSpec(p + "type", "", "str", "Message type: " + ", ".join(sorted(KINDS_BY_TYPE)) + "."),
        ParamSpec(p + "features", [], "str_list", "Names of the card features this source fills."),
        ParamSpec(p + "timeout_s", 0.1, "float", "Watchdog: a feature whose newest sample is older than this "
                  "is stale -> safe state; 0 = never. For a velocity_command: older reads as zero; 0 = hold.",
                  range=(0.0, 3600.0)),
        ParamSpec(p + "stamp", "header", "str", "Sample time: the header stamp (falls back to receipt for "
                  "types without a header or stamp 0) or the receipt time.", choices=STAMP_MODES),
        ParamSpec(p + "frame", "", "str", "Expected frame_id (Odometry: child_frame_id); '' = any."),
        ParamSpec(p + "implausible", "auto", "str", "Values outside the card's plausible bounds: clamp them, "
                  "reject the message, or safe (reject and hold the safe state until plausible input); "
                  "auto = clamp for a source of velocity commands only, else reject.",
                  choices=IMPLAUSIBLE_POLICIES),
    )


_SPEC_BY_NAME = {s.name: s for s in NODE_PARAMS}
_SOURCE_FIELDS = {s.name.split(".")[-1] for s in source_param_specs("x")}


def spec_for(name: str) -> ParamSpec | None:
    """The schema entry of a parameter name, including per-source ones."""
    if name in _SPEC_BY_NAME:
        return _SPEC_BY_NAME[name]
    parts = name.split(".")
    if len(parts) == 3 and parts[0] == "observations" and parts[2] in _SOURCE_FIELDS:
        return next(s for s in source_param_specs(parts[1]) if s.name == name)
    return None


def check_value(spec: ParamSpec, value: Any) -> Any:
    """Coerce a parameter value to the spec's kind and check range/choices; raise ConfigError otherwise.

    Numbers are accepted as int or float (YAML `1` for a float parameter is no error here)."""
    name, kind = spec.name, spec.kind
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true/false, got {value!r}")
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        if spec.choices and value not in spec.choices:
            raise ConfigError(f"{name}: '{value}' is not one of {', '.join(spec.choices)}")
        return value
    if kind in ("int", "float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        if kind == "int" and not float(value).is_integer():
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        out = int(value) if kind == "int" else float(value)
        if not math.isfinite(out):
            raise ConfigError(f"{name}: must be finite, got {value!r}")
        if spec.range and not spec.range[0] <= out <= spec.range[1]:
            raise ConfigError(f"{name}: {value} is outside [{spec.range[0]}, {spec.range[1]}]")
        return out
    if kind in ("float_list", "str_list"):
        items = [] if value is None else value
        if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        if kind == "str_list":
            if not all(isinstance(v, str) for v in items):
                raise ConfigError(f"{name}: expected a list of strings, got {value!r}")
            return tuple(items)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items):
            raise ConfigError(f"{name}: expected a list of numbers, got {value!r}")
        out_list = tuple(float(v) for v in items)
        if not all(math.isfinite(v) for v in out_list):
            raise ConfigError(f"{name}: values must be finite, got {value!r}")
        return out_list
    raise AssertionError(f"unknown kind {kind}")


# ---------------------------------------------------------------------------------------------------------
# Typed configuration


@dataclass(frozen=True)
class SourceConfig:
    name: str
    topic: str
    type: str
    features: tuple[str, ...]
    timeout_s: float = 0.1
    stamp: str = "header"
    frame: str = ""
    implausible: str = "auto"


def implausible_policy(src: SourceConfig, card: Any) -> str:
    """The source's plausibility policy; auto is clamp for a source that fills only velocity commands (an
    operator may overdrive a joystick; the policy gets the nearest command it was trained on) and reject
    for sensors (a glitch is dropped; the watchdog decides whether the stream is gone)."""
    if src.implausible != "auto":
        return src.implausible
    kinds = {f.name: f.kind for f in card.features}
    commands_only = all(kinds.get(name) == "velocity_command" for name in src.features)
    return "clamp" if commands_only and src.features else "reject"


@dataclass(frozen=True)
class NodeConfig:
    model_path: str = ""
    provider: str = "auto"
    precision: str = "fp32"
    cuda_graph: bool = True
    device_id: int = 0
    engine_cache_dir: str = ""
    threads: int = 1
    steps: int = 0
    seed: int = 0
    rate_hz: float = 0.0
    exec_latency_s: float = 0.0
    execute_steps: int = 1
    blend: str = "none"
    crossfade_steps: int = 4
    ensemble_chunks: int = 4
    compensate_delay: bool = True
    max_consecutive_misses: int = 5
    safe_mode: str = "hold"
    default_pose: tuple[float, ...] = ()
    max_step_per_tick: float = 0.2
    joints: tuple[str, ...] = ()
    model_joints: tuple[str, ...] = ()
    autostart: bool = True
    loop_priority: int = 50
    executor_priority: int = 49
    executor: str = "auto"
    diagnostics_period_s: float = 1.0
    max_future_s: float = 0.05
    joint_margin: float = 1.0
    command_sigmas: float = 3.0
    sensor_sigmas: float = 50.0
    max_model_mb: float = 512.0
    commands_enabled: bool = True
    commands_topic: str = "~/commands"
    trajectory_enabled: bool = True
    trajectory_topic: str = "~/joint_trajectory"
    trajectory_stamp: str = "zero"
    debug_enabled: bool = True
    debug_topic: str = "~/debug/command_timing"
    sources: tuple[SourceConfig, ...] = field(default_factory=tuple)

    @classmethod
    def from_params(cls, values: Mapping[str, Any]) -> NodeConfig:
        """Build from flat dotted parameter names (missing -> default); every problem is reported."""
        errors: list[str] = []

        def get(spec: ParamSpec) -> Any:
            raw = values.get(spec.name, spec.default)
            try:
                return check_value(spec, spec.default if raw is None else raw)
            except ConfigError as exc:
                errors.append(str(exc))
                return check_value(spec, spec.default)

        v = {s.name: get(s) for s in NODE_PARAMS}
        names = v["observations.sources"]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            errors.append(f"observations.sources: duplicate source names {dupes}")
        sources = []
        for src in dict.fromkeys(names):
            if not src or not src.replace("_", "a").isalnum():
                errors.append(f"observations.sources: '{src}' is not a valid name ([A-Za-z0-9_]+)")
                continue
            sv = {s.name.split(".")[-1]: get(s) for s in source_param_specs(src)}
            try:
                msg_type = normalize_type(sv["type"]) if sv["type"] else ""
            except ConfigError as exc:
                errors.append(f"observations.{src}.type: {exc}")
                msg_type = ""
            if not sv["type"]:
                errors.append(f"observations.{src}.type: missing; one of {', '.join(sorted(KINDS_BY_TYPE))}")
            if not sv["features"]:
                errors.append(f"observations.{src}.features: empty; list the card features it fills")
            sources.append(
                SourceConfig(
                    name=src,
                    topic=sv["topic"],
                    type=msg_type,
                    features=sv["features"],
                    timeout_s=sv["timeout_s"],
                    stamp=sv["stamp"],
                    frame=sv["frame"],
                    implausible=sv["implausible"],
                )
            )
        if not names:
            errors.append("observations.sources: empty; name at least one observation source")
        if v["model_joints"] and len(v["model_joints"]) != len(v["joints"]):
            errors.append(
                f"model_joints: {len(v['model_joints'])} entries but joints has {len(v['joints'])}; "
                "give one card joint per output joint"
            )
        if len(set(v["joints"])) != len(v["joints"]):
            errors.append(f"joints: duplicate names in {list(v['joints'])}")
        if v["precision"] == "fp16" and v["provider"] in ("cuda", "cpu"):
            errors.append(
                f"precision: fp16 is TensorRT's; provider {v['provider']} runs float32 (use provider "
                "tensorrt or auto, or precision fp32)"
            )
        if errors:
            raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))
        return cls(
            model_path=v["model_path"],
            provider=v["provider"],
            precision=v["precision"],
            cuda_graph=v["cuda_graph"],
            device_id=v["device_id"],
            engine_cache_dir=v["engine_cache_dir"],
            threads=v["threads"],
            steps=v["steps"],
            seed=v["seed"],
            rate_hz=v["rate_hz"],
            exec_latency_s=v["exec_latency_s"],
            execute_steps=v["execute_steps"],
            blend=v["blend"],
            crossfade_steps=v["crossfade_steps"],
            ensemble_chunks=v["ensemble_chunks"],
            compensate_delay=v["compensate_delay"],
            max_consecutive_misses=v["max_consecutive_misses"],
            safe_mode=v["safe_mode"],
            default_pose=v["default_pose"],
            max_step_per_tick=v["max_step_per_tick"],
            joints=v["joints"],
            model_joints=v["model_joints"],
            autostart=v["autostart"],
            loop_priority=v["loop_priority"],
            executor_priority=v["executor_priority"],
            executor=v["executor"],
            diagnostics_period_s=v["diagnostics_period_s"],
            max_future_s=v["observations.max_future_s"],
            joint_margin=v["plausibility.joint_margin"],
            command_sigmas=v["plausibility.command_sigmas"],
            sensor_sigmas=v["plausibility.sensor_sigmas"],
            max_model_mb=v["max_model_mb"],
            commands_enabled=v["outputs.commands.enabled"],
            commands_topic=v["outputs.commands.topic"],
            trajectory_enabled=v["outputs.trajectory.enabled"],
            trajectory_topic=v["outputs.trajectory.topic"],
            trajectory_stamp=v["outputs.trajectory.stamp"],
            debug_enabled=v["outputs.debug.enabled"],
            debug_topic=v["outputs.debug.topic"],
            sources=tuple(sources),
        )


@dataclass(frozen=True)
class Binding:
    """A configuration resolved against one model card: what the node wires up for that model."""

    output_joints: tuple[str, ...]  # published order (robot names)
    output_index: tuple[int, ...]  # output_joints[i] carries card action index output_index[i]
    rename: Mapping[str, str]  # card joint name -> robot joint name (JointState lookup)
    feature_source: Mapping[str, str]  # card feature name -> source name (previous_action absent)
    default_pose: tuple[float, ...]  # in card action order
    period_s: float  # tick period


def validate_against_card(cfg: NodeConfig, card: Any) -> Binding:
    """Check that `cfg` fits `card` (a core.card.ModelCard) and resolve the wiring; raise ConfigError
    naming every mismatch."""
    errors: list[str] = []
    features = {f.name: f for f in card.features}
    owner: dict[str, list[str]] = {}
    for src in cfg.sources:
        allowed = KINDS_BY_TYPE.get(src.type, frozenset())
        for name in src.features:
            feat = features.get(name)
            if feat is None:
                errors.append(
                    f"observations.{src.name}.features: '{name}' is not a feature of model card "
                    f"'{card.name}' (card features: {', '.join(features)})"
                )
                continue
            if feat.kind in COMPUTED_KINDS:
                errors.append(
                    f"observations.{src.name}.features: '{name}' is the node's {COMPUTED_AS[feat.kind]}; "
                    "no source may fill it"
                )
                continue
            if src.type and feat.kind not in allowed:
                errors.append(
                    f"observations.{src.name}: a {src.type} cannot fill '{name}' (kind {feat.kind}); "
                    f"it fills kinds {', '.join(sorted(allowed))}"
                )
            owner.setdefault(name, []).append(src.name)
    for name, feat in features.items():
        if feat.kind == "previous_action" and feat.size != card.action_dim:
            errors.append(f"card feature '{name}': previous_action size {feat.size} != action_dim "
                          f"{card.action_dim}")
        if feat.kind in COMPUTED_KINDS:
            continue
        srcs = owner.get(name, [])
        if not srcs:
            errors.append(
                f"card feature '{name}' (kind {feat.kind}, size {feat.size}) is filled by no observation "
                "source; add it to the features of one source"
            )
        elif len(srcs) > 1:
            errors.append(f"card feature '{name}' is filled by several sources ({', '.join(srcs)}); "
                          "exactly one must fill it")

    card_joints = tuple(card.action_joints)
    model_joints = cfg.model_joints or cfg.joints or card_joints
    output_joints = cfg.joints or card_joints
    rename = dict(zip(model_joints, output_joints, strict=False)) if cfg.joints else {}
    output_index: tuple[int, ...] = ()
    if sorted(model_joints) != sorted(card_joints):
        missing = [j for j in card_joints if j not in model_joints]
        extra = [j for j in model_joints if j not in card_joints]
        which = "model_joints" if cfg.model_joints else "joints"
        errors.append(
            f"{which}: must list each card action joint once (card: {', '.join(card_joints)}); "
            f"missing {missing}, unknown {extra}"
        )
    else:
        output_index = tuple(card_joints.index(j) for j in model_joints)

    default_pose: tuple[float, ...] = ()
    lower = [float(x) for x in card.action_lower]
    upper = [float(x) for x in card.action_upper]
    if cfg.default_pose:
        if len(cfg.default_pose) != len(card_joints):
            errors.append(f"default_pose: {len(cfg.default_pose)} values for {len(card_joints)} joints")
        elif output_index:
            pose = [0.0] * len(card_joints)
            for i, k in enumerate(output_index):
                pose[k] = cfg.default_pose[i]
            bad = [output_joints[i] for i, k in enumerate(output_index)
                   if not lower[k] <= pose[k] <= upper[k]]
            if bad:
                errors.append(f"default_pose: outside the card's action limits for joints {bad}")
            default_pose = tuple(pose)
    else:
        default_pose = tuple((lo + hi) / 2.0 for lo, hi in zip(lower, upper, strict=True))

    if cfg.execute_steps > card.horizon:
        errors.append(f"execute_steps: {cfg.execute_steps} exceeds the card's horizon {card.horizon}")
    if cfg.crossfade_steps > card.horizon:
        errors.append(f"crossfade_steps: {cfg.crossfade_steps} exceeds the card's horizon {card.horizon}")
    if cfg.blend == "inpaint" and not card.sampler_inpainting:
        errors.append(f"blend: {inpaint_refusal(card.sampler_kind)}")
    period = 1.0 / cfg.rate_hz if cfg.rate_hz > 0 else float(card.control_period_s)
    if errors:
        raise ConfigError(f"configuration does not fit model '{card.name}':\n  " + "\n  ".join(errors))
    return Binding(
        output_joints=tuple(output_joints),
        output_index=output_index,
        rename=rename,
        feature_source={n: s[0] for n, s in owner.items()},
        default_pose=default_pose,
        period_s=period,
    )


def load_params_file(path: str, node_name: str = "diffusion_controller") -> dict[str, Any]:
    """Flat parameters a ROS params file gives node `node_name` (`/**` first, then the node's own key),
    read by rclpy's own parser, so tests and tools see what `--params-file` gives the node."""
    from rclpy.parameter import parameter_dict_from_yaml_file, parameter_value_to_python

    try:
        msgs = parameter_dict_from_yaml_file(path, use_wildcard=True, target_nodes=[node_name])
    except (RuntimeError, AttributeError, TypeError) as exc:
        raise ConfigError(f"{path}: not a ROS 2 params file ({exc})") from exc
    return {name: parameter_value_to_python(m.value) for name, m in msgs.items()}


def unknown_parameters(values: Mapping[str, Any], sources: Sequence[str] | None = None) -> list[str]:
    """Problems with names in `values` that nothing reads: typos in a params file, or settings of a source
    that `observations.sources` does not list (`sources` defaults to the list in `values`)."""
    listed = set(values.get("observations.sources") or () if sources is None else sources)
    ros_own = ("use_sim_time", "start_type_description_service")
    problems = []
    orphans: dict[str, list[str]] = {}
    for name in sorted(values):
        if name in ros_own or name.startswith("qos_overrides."):
            continue
        parts = name.split(".")
        if len(parts) == 3 and parts[0] == "observations" and spec_for(name) is not None:
            if parts[1] not in listed:
                orphans.setdefault(parts[1], []).append(parts[2])
            continue
        if spec_for(name) is None:
            problems.append(f"unknown parameter '{name}'")
    for src, fields in orphans.items():
        names = ",".join(fields)
        problems.append(f"observations.{src}.{{{names}}} set but '{src}' is not in observations.sources")
    return problems
