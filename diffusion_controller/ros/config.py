"""Node configuration: the parameter specification, its checks, and the typed configuration built from it.

Plain Python (no rclpy) so the whole configuration story is unit-testable without a ROS graph. Each
parameter is specified once, in `PARAM_GROUPS` (name, type, default, description, range or choices, when
it is read); from that one list the node declares its parameters with their ROS types (`ros/params.py`),
`check_value` checks every value, `NodeConfig.from_params` builds the configuration, `ros/binding.py`
checks it against a model card and builds the core's `ControlConfig`, and `ros/parameter_reference.py`
renders docs/PARAMETERS.md (a test fails when it is out of date).

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
the observation time) must be filled by exactly one source; `binding.validate_against_card` names every
violation at once so a user fixes a config in one pass.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from diffusion_controller.core.card_schema import FEATURE_SIZES
from diffusion_controller.core.control_config import ControlConfig
from diffusion_controller.core.inputs import (
    FLOAT64_ARRAY,
    IMU,
    JOINT_STATE,
    ODOMETRY,
    TWIST,
    TWIST_STAMPED,
    SourceConfig,
)
from diffusion_controller.core.observation import COMPUTED_KINDS
from diffusion_controller.core.plausibility import POLICIES, PlausibilityLimits
from diffusion_controller.core.safety import SAFE_MODES
from diffusion_controller.core.scheduler import BLEND_MODES
from diffusion_controller.ros.outputs import TIMING_COLUMNS, TRAJECTORY_INTERFACES


class ConfigError(ValueError):
    """A configuration problem; the message names the parameter or feature and what was expected."""


# Message types a source may have (core/inputs.py, which decodes them), and the card feature kinds each can
# produce. Short forms ("sensor_msgs/JointState", "JointState") are accepted and normalized to these names.
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

PROVIDERS = ("auto", "cpu", "cuda", "tensorrt")
PRECISIONS = ("fp32", "fp16")  # core/providers.py: fp16 is TensorRT's
EXECUTORS = ("auto", "events", "single_threaded", "multi_threaded")
STAMP_MODES = ("header", "receipt")
IMPLAUSIBLE_POLICIES = ("auto", *POLICIES)
TRAJECTORY_STAMPS = ("zero", "absolute")
POLICY_SOURCES = ("local", "remote")
#: Watchdog timeout standing for "never stale" (the core wants a finite number).
NEVER_S = 1e9


def core_default(cls: type, name: str) -> Any:
    """The default of field `name` of the core's dataclass `cls`, as a parameter's default.

    One default per parameter, and its home is the core: the core runs without the node (tests, the
    simulator, the dataset converter and the demonstrator build ControlConfig and PlausibilityLimits
    themselves), so its dataclasses must have defaults, and the table one layer up reads them instead of
    writing them again. A parameter whose node default means something the core's cannot keeps its own:
    `default_pose` ([] = the middle of the card's limits; the core's None = no pose) and
    `policy.chunk_timeout_s` (0.2 s in remote mode; the core's None = no external chunks)."""
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    if field.default is dataclasses.MISSING:
        raise ValueError(f"{cls.__name__}.{name} has no default")
    return field.default


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
# Parameter specification

#: Parameter types as ROS names them (the reference's Type column), and the type of their configuration field.
KINDS = {
    "bool": "bool",
    "int": "int",
    "double": "float",
    "string": "str",
    "double[]": "tuple[float, ...]",
    "string[]": "tuple[str, ...]",
}
#: When a parameter is read: `live` ones may change while the node is configured; `configure` ones are read
#: on configure (set them while unconfigured, or cleanup + configure); `startup` ones once, when the process
#: starts (give them on the command line or in the params file; read-only afterwards).
WHEN = ("live", "configure", "startup")
#: Stands for a source's name in the per-source parameters `observations.<src>.*`.
SRC = "<src>"


@dataclass(frozen=True)
class ParamSpec:
    """One parameter, specified once: the node declares it, every value is checked and the configuration
    built from it, and the parameter reference (docs/PARAMETERS.md) is rendered from it."""

    name: str
    default: Any
    kind: str  # a KINDS key
    description: str
    range: tuple[float, float] | None = None
    choices: tuple[str, ...] | None = None
    when: str = "configure"  # a WHEN entry
    #: The NodeConfig (per-source: SourceConfig) field it fills; by default the name without its group
    #: (`outputs.commands.enabled` -> commands_enabled, `observations.<src>.topic` -> topic).
    field: str = ""
    #: The core's ControlConfig field it becomes, if any: the core's refusals are reported by this name.
    control: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS or self.when not in WHEN:
            raise ValueError(f"{self.name}: kind {self.kind!r} or when {self.when!r} unknown")
        if not self.field:
            parts = self.name.split(".")
            parts = [p for p in parts[1:] if p != SRC] if len(parts) > 1 else parts
            object.__setattr__(self, "field", "_".join(parts))


_P = ParamSpec


def _core(name: str) -> Any:
    return core_default(ControlConfig, name)


def _plausible(name: str) -> Any:
    return core_default(PlausibilityLimits, name)


def _source(name: str) -> Any:
    return core_default(SourceConfig, name)

_SOURCE = f"observations.{SRC}."

PARAM_GROUPS: tuple[tuple[str, tuple[ParamSpec, ...]], ...] = (
    ("Model", (
        _P("model_path", "", "string", "ONNX policy; its card is in the model's metadata or a `.yaml` beside "
           "it; empty = configure fails. Setting it while configured swaps the model: the call reads the "
           "card and refuses, with the reason, a model that does not fit the configuration; the model is "
           "loaded and warmed up in a loader thread and swapped in between two ticks; a failure there keeps "
           "the old model and sets model_path back (see ~/model).", when="live"),
        _P("provider", "auto", "string", "ONNX Runtime provider: auto tries tensorrt, cuda, then cpu, each "
           "until one starts; cuda or tensorrt fail the configure instead of running on the CPU.",
           choices=PROVIDERS),
        _P("precision", "fp32", "string", "TensorRT precision: fp16 builds the engine in half precision "
           "(TensorRT only: an error with provider cuda or cpu; auto's cuda/cpu fallback runs fp32).",
           choices=PRECISIONS),
        _P("cuda_graph", True, "bool", "Replay the policy as a captured CUDA graph where one GPU provider "
           "owns the whole graph (cuda, or tensorrt without nodes left to cuda); dropped with a log line "
           "where ONNX Runtime cannot capture it."),
        _P("tf32", False, "bool", "Let the cuda provider compute float32 matmuls in TensorFloat-32 (faster "
           "on Ampere and later, ~1e-3 action differences from the CPU); off = float32 as on the CPU. Said "
           "in the log line that describes the session."),
        _P("device_id", 0, "int", "CUDA device the cuda and tensorrt providers run on.", range=(0, 63)),
        _P("engine_cache_dir", "", "string", "TensorRT engine and timing cache root, one subdirectory per "
           "model and GPU, built once (ahead of time with `build_engine`); empty = "
           "`~/.cache/diffusion_controller/tensorrt`."),
        _P("threads", 1, "int", "ONNX Runtime intra-op threads on the CPU (spinning off); keep a core free "
           "for the control loop.", range=(1, 64)),
        _P("steps", 0, "int", "DDIM steps K for denoiser graphs; 0 = the card's `sampler.steps`.",
           range=(0, 1000)),
        _P("seed", _core("seed"), "int",
           "Noise seed (request k uses seed + k) for reproducible runs; -1 = random.",
           range=(-1, 2**31 - 1), control="seed"),
        _P("max_model_mb", 512.0, "double", "Largest model file configure or a swap will read (MiB); a "
           "larger `model_path` is refused before anything is read.", range=(0.001, 1e6), when="live"),
    )),
    ("Timing / blending", (
        _P("rate_hz", 0.0, "double", "Control rate; 0 = 1 / the card's `control_period_s`.",
           range=(0.0, 2000.0)),
        _P("exec_latency_s", _core("exec_latency_s"), "double",
           "Time from publishing a command to it taking effect; actions "
           "due before now + this are stale.", range=(0.0, 1.0), control="exec_latency_s"),
        _P("execute_steps", _core("execute_steps"), "int",
           "Actions executed from a chunk before the next inference starts (at "
           "most the model's horizon).", range=(1, 1024), control="execute_steps"),
        _P("blend", _core("blend"), "string",
           "How a new chunk joins the running one: none (replace), crossfade, "
           "inpaint (the new chunk's first actions frozen to the old one; needs a fused graph whose sampler "
           "can inpaint), or ensemble (each tick runs the mean of the last `ensemble_chunks` chunks' "
           "actions for it).", choices=BLEND_MODES, control="blend"),
        _P("crossfade_steps", _core("crossfade_steps"), "int",
           "Actions over which crossfade ramps old -> new (0 = replace; at "
           "most the model's horizon).", range=(0, 1024), control="crossfade_steps"),
        _P("ensemble_chunks", _core("ensemble_chunks"), "int",
           "Chunks averaged by blend ensemble (1 = replace); at one chunk per "
           "tick, also the ticks of observation age the mean reaches back.", range=(1, 1024),
           control="ensemble_chunks"),
        _P("compensate_delay", _core("compensate_delay"), "bool",
           "Stamp chunks with the observation time (true) or the inference "
           "start (false, delay ignored: for comparisons).", control="compensate_delay"),
    )),
    ("Safety", (
        _P("max_consecutive_misses", _core("max_consecutive_misses"), "int",
           "Ticks without a valid action before the safe state.",
           range=(1, 100000), control="max_consecutive_misses"),
        _P("safe_mode", _core("safe_mode"), "string",
           "Safe state: hold the last command or go to `default_pose` "
           "(position models); zero: ramp to zero at max_step_per_tick, never held (velocity, effort and "
           "base_velocity models); damping (effort models): ramp to -damping_gain x the measured joint "
           "velocity, to zero without a fresh one and on deactivate.",
           choices=SAFE_MODES, control="safe_mode"),
        _P("damping_gain", _core("damping_gain"), "double",
           "safe_mode damping: the braking torque per joint velocity, N m s/rad (> 0 there).",
           range=(0.0, 10000.0), control="damping_gain"),
        _P("default_pose", [], "double[]", "Pose of safe_mode default_pose, one value per output joint in "
           "`joints` order; empty = the middle of the card's limits.", control="default_pose"),
        _P("max_step_per_tick", _core("max_step_per_tick"), "double",
           "Largest change of a command per tick in the action kind's "
           "units (rad, rad/s: an acceleration limit, N m, m/s); "
           "holds across deactivate, cleanup/configure, e-stop and swaps.", range=(1e-6, 1000.0),
           control="max_step_per_tick"),
        _P("plausibility.joint_margin", _plausible("joint_margin"), "double",
           "Joint positions of action joints are plausible "
           "within the card's action limits widened by this (robot units; wide enough for a robot lying "
           "down before it stands: the card does not know the physical range).", range=(1e-6, 1000.0)),
        _P("plausibility.command_sigmas", _plausible("command_sigmas"), "double",
           "A velocity command is inside the training range "
           "within the card's normalization mean +- this many standard deviations.", range=(0.1, 1e6)),
        _P("plausibility.sensor_sigmas", _plausible("sensor_sigmas"), "double",
           "Any other observation is plausible within the "
           "card's normalization mean +- this many standard deviations (only garbage is outside).",
           range=(0.1, 1e9)),
    )),
    ("Joints", (
        _P("joints", [], "string[]", "Output joint order/names; empty = the card's action joints."),
        _P("model_joints", [], "string[]", "For each entry of `joints`, the card joint it carries; empty = "
           "same names. Renames apply to JointState inputs too."),
    )),
    ("Process", (
        _P("autostart", True, "bool", "Configure and activate at startup.", when="startup"),
        _P("loop_priority", 50, "int", "SCHED_FIFO priority of the control-loop thread (like ros2_control's "
           "controller_manager; needs rtprio rights, else a warning and normal priority); 0 = normal.",
           range=(0, 99)),
        _P("executor_priority", 49, "int", "SCHED_FIFO priority of the main executor thread (services, "
           "parameters, diagnostics); below loop_priority. Under CPU load a normal-priority thread holding "
           "Python's GIL would stall the loop thread; 0 = normal.", range=(0, 99), when="startup"),
        _P("dds_priority", 0, "int", "SCHED_FIFO priority of this process' Fast DDS receive threads, which "
           "deliver /clock and the sensors to the loop (a normal-priority one can wait for a CPU longer than "
           "a period on a loaded machine); below executor_priority (e.g. 48); 0 = leave them. They also "
           "handle discovery, which then preempts inference when processes join.", range=(0, 99),
           when="startup"),
        _P("cpu_affinity", "", "string", "CPUs of the node's real-time threads (control loop, executor, DDS "
           "receive threads) as a Linux CPU list ('1', '2-3'; quoted, a bare 1 is an integer to ROS), like "
           "ros2_control's cpu_affinity; model "
           "threads go to model_cpu_affinity. Empty = all CPUs.", when="startup"),
        _P("model_cpu_affinity", "", "string", "CPUs of the threads that load and run models (the inference "
           "worker, ONNX Runtime's threads, swaps) as a CPU list; keep them off cpu_affinity so inference "
           "never takes the loop's CPU. The worker shares the GIL with the loop: where its CPUs can be taken "
           "from it (a VM's host), the loop waits with it; run the policy in policy_node there. Empty = the "
           "process' CPUs.", when="startup"),
        _P("executor", "auto", "string", "Executor for services, parameters and diagnostics: auto = rclpy's "
           "EventsExecutor where rclpy has it (Kilted on), else single_threaded. The control loop has a "
           "thread of its own, which also takes the sensor messages (no executor callback per message).",
           choices=EXECUTORS, when="startup"),
        _P("diagnostics_period_s", 1.0, "double", "Period of /diagnostics.", range=(0.05, 60.0),
           when="startup"),
    )),
    ("Observations", (
        _P("observations.sources", [], "string[]", "Names of the observation sources (`[A-Za-z0-9_]+`; at "
           "least one); each has its own `observations.<src>.*` parameters, declared for the names listed "
           "here.", field="source_names"),
        _P("observations.max_future_s", _core("future_tolerance_s"), "double",
           "Reject observation stamps further than this ahead "
           "of the node clock.", range=(0.0, 10.0), control="future_tolerance_s"),
        _P(_SOURCE + "topic", f"~/{SRC}", "string", "Topic (relative, absolute or ~/; remappable)."),
        _P(_SOURCE + "type", "", "string", "Message type (required): " + ", ".join(sorted(KINDS_BY_TYPE))
           + " (`pkg/Type` and `Type` work too)."),
        _P(_SOURCE + "features", [], "string[]", "Names of the card features this source fills (required)."),
        _P(_SOURCE + "timeout_s", _source("timeout_s"), "double",
           "Watchdog: a feature whose newest sample is older than this "
           "is stale -> safe state; 0 = never. For a velocity_command: older reads as zero; 0 = hold.",
           range=(0.0, 3600.0)),
        _P(_SOURCE + "stamp", _source("stamp"), "string",
           "Sample time: the header stamp (falls back to receipt for types without a header or stamp 0) "
           "or the receipt time.", choices=STAMP_MODES),
        _P(_SOURCE + "frame", _source("frame"), "string",
           "Expected frame_id (Odometry: child_frame_id); empty = any."),
        _P(_SOURCE + "implausible", _source("implausible"), "string",
           "Values outside the card's plausible bounds: clamp them, reject the message, or safe (reject and "
           "hold the safe state until plausible input); "
           "auto = clamp for a source of velocity commands only, else reject.", choices=IMPLAUSIBLE_POLICIES),
    )),
    ("Remote policy", (
        _P("policy.source", "local", "string", "Where chunks come from: local (this node runs the model) or "
           "remote (a `policy_node`, maybe on another computer, publishes them on `policy.chunk_topic`; "
           "only the model card of `model_path` is read here: joints, limits, period, horizon).",
           choices=POLICY_SOURCES, field="policy_source"),
        _P("policy.chunk_topic", "policy/chunk", "string", "JointTrajectory chunks of a remote policy "
           "(best effort, keep last 10: a lost chunk is superseded by the next one, a resent one would "
           "arrive stale). The policy node publishes one per controller namespace.", field="chunk_topic"),
        _P("policy.executed_topic", "policy/executed", "string", "Remote mode: each command as a stamped "
           "JointState (tick time, card action joints), the previous_action the policy node conditions on.",
           field="executed_topic"),
        _P("policy.chunk_timeout_s", 0.2, "double", "Remote mode: no usable chunk for this long -> safe "
           "state (the loop never waits for the link).", range=(0.001, 60.0), field="chunk_timeout_s",
           control="chunk_timeout_s"),
        _P("policy.robots", [], "string[]", "Policy node: namespaces of the controllers it serves (one "
           "observation history each; requests due together run in one pass); empty = its own namespace.",
           when="startup", field="robots"),
        _P("policy.batch", False, "bool", "Policy node: true runs the requests of the robots due together in "
           "one worker thread, one model run per group of up to the card's graph.batch robots "
           "(export_policy --batch N; a batch-1 model runs them as a loop of single runs); false = a worker "
           "thread per robot.",
           when="startup", field="batch"),
    )),
    ("Outputs", (
        _P("outputs.commands.enabled", True, "bool", "Publish Float64MultiArray commands "
           "(forward_command_controller)."),
        _P("outputs.commands.topic", "~/commands", "string", "Command topic."),
        _P("outputs.trajectory.enabled", True, "bool", "Publish the remaining chunk as a JointTrajectory "
           "(joint_trajectory_controller)."),
        _P("outputs.trajectory.topic", "~/joint_trajectory", "string", "Trajectory topic."),
        _P("outputs.trajectory.stamp", "zero", "string", "Trajectory header stamp: zero (start on receipt) "
           "or absolute (time of the first point minus one tick).", choices=TRAJECTORY_STAMPS),
        _P("outputs.trajectory.interface", "position", "string", "The point field the actions go into; must "
           "be the card's action kind (positions, velocities or effort).", choices=TRAJECTORY_INTERFACES),
        _P("outputs.twist.enabled", False, "bool", "Publish geometry_msgs/Twist (a base_velocity model's "
           "only output, e.g. a diff_drive_controller's cmd_vel)."),
        _P("outputs.twist.topic", "~/cmd_vel", "string", "Twist topic."),
        _P("outputs.debug.enabled", True, "bool", "Publish ~/debug/command_timing every tick."),
        _P("outputs.debug.topic", "~/debug/command_timing", "string",
           f"Timing topic: [{', '.join(TIMING_COLUMNS)}]."),
    )),
)  # fmt: skip

#: The node's own parameters, and the per-source ones with SRC standing for the source name.
NODE_PARAMS = tuple(s for _, group in PARAM_GROUPS for s in group if SRC not in s.name)
SOURCE_PARAMS = tuple(s for _, group in PARAM_GROUPS for s in group if SRC in s.name)


def source_param_specs(source: str) -> tuple[ParamSpec, ...]:
    """The per-source parameters `observations.<source>.*`."""
    return tuple(
        dataclasses.replace(
            s,
            name=s.name.replace(SRC, source),
            default=s.default.replace(SRC, source) if isinstance(s.default, str) else s.default,
        )
        for s in SOURCE_PARAMS
    )


_SPEC_BY_NAME = {s.name: s for s in NODE_PARAMS}
_SOURCE_FIELDS = {s.field for s in SOURCE_PARAMS}


def launch_default(name: str) -> str:
    """Node parameter `name`'s default as a launch argument's default text (`true`, `local`): a launch file
    that passes the parameter on reads its default here instead of writing it again."""
    value = _SPEC_BY_NAME[name].default
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def spec_for(name: str) -> ParamSpec | None:
    """The specification of a parameter name, including per-source ones."""
    if name in _SPEC_BY_NAME:
        return _SPEC_BY_NAME[name]
    parts = name.split(".")
    if len(parts) == 3 and parts[0] == "observations" and parts[2] in _SOURCE_FIELDS:
        return next(s for s in source_param_specs(parts[1]) if s.name == name)
    return None


def check_value(spec: ParamSpec, value: Any) -> Any:
    """The value as its configuration field holds it, after the spec's type, range and choices; ConfigError
    otherwise. Where every bound is checked: on every set, on configure, in a params file (the descriptors
    hand rclpy the same ranges, so `ros2 param describe` shows them).

    Numbers are accepted as int or float (YAML `1` for a double parameter is no error here)."""
    name, kind = spec.name, spec.kind
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true/false, got {value!r}")
        return value
    if kind == "string":
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        if spec.choices and value not in spec.choices:
            raise ConfigError(f"{name}: '{value}' is not one of {', '.join(spec.choices)}")
        return value
    if kind in ("int", "double"):
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
    items = [] if value is None else value  # double[] | string[]
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
        raise ConfigError(f"{name}: expected a list, got {value!r}")
    if kind == "string[]":
        if not all(isinstance(v, str) for v in items):
            raise ConfigError(f"{name}: expected a list of strings, got {value!r}")
        return tuple(items)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items):
        raise ConfigError(f"{name}: expected a list of numbers, got {value!r}")
    out_list = tuple(float(v) for v in items)
    if not all(math.isfinite(v) for v in out_list):
        raise ConfigError(f"{name}: values must be finite, got {value!r}")
    return out_list


# ---------------------------------------------------------------------------------------------------------
# Typed configuration: one field per parameter (ParamSpec.field), values and defaults from the specification

@dataclass(frozen=True)
class NodeConfig:
    """The node's parameters as checked values (field names: ParamSpec.field; built by from_params)."""

    model_path: str
    provider: str
    precision: str
    cuda_graph: bool
    tf32: bool
    device_id: int
    engine_cache_dir: str
    threads: int
    steps: int
    seed: int
    max_model_mb: float
    rate_hz: float
    exec_latency_s: float
    execute_steps: int
    blend: str
    crossfade_steps: int
    ensemble_chunks: int
    compensate_delay: bool
    max_consecutive_misses: int
    safe_mode: str
    default_pose: tuple[float, ...]
    max_step_per_tick: float
    damping_gain: float
    joint_margin: float
    command_sigmas: float
    sensor_sigmas: float
    joints: tuple[str, ...]
    model_joints: tuple[str, ...]
    autostart: bool
    loop_priority: int
    executor_priority: int
    dds_priority: int
    cpu_affinity: str
    model_cpu_affinity: str
    executor: str
    diagnostics_period_s: float
    source_names: tuple[str, ...]
    max_future_s: float
    commands_enabled: bool
    commands_topic: str
    trajectory_enabled: bool
    trajectory_topic: str
    trajectory_stamp: str
    trajectory_interface: str
    twist_enabled: bool
    twist_topic: str
    debug_enabled: bool
    debug_topic: str
    policy_source: str
    chunk_topic: str
    executed_topic: str
    chunk_timeout_s: float
    robots: tuple[str, ...]
    batch: bool
    sources: tuple[SourceConfig, ...]

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

        v = {s.field: get(s) for s in NODE_PARAMS}
        names = v["source_names"]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            errors.append(f"observations.sources: duplicate source names {dupes}")
        sources = []
        for src in dict.fromkeys(names):
            if not src or not src.replace("_", "a").isalnum():
                errors.append(f"observations.sources: '{src}' is not a valid name ([A-Za-z0-9_]+)")
                continue
            sv = {s.field: get(s) for s in source_param_specs(src)}
            msg_type = sv["type"]
            if not msg_type:
                errors.append(f"observations.{src}.type: missing; one of {', '.join(sorted(KINDS_BY_TYPE))}")
            else:
                try:
                    sv["type"] = normalize_type(msg_type)
                except ConfigError as exc:
                    errors.append(f"observations.{src}.type: {exc}")
                    sv["type"] = ""
            if not sv["features"]:
                errors.append(f"observations.{src}.features: empty; list the card features it fills")
            sources.append(SourceConfig(name=src, **sv))
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
        return cls(**v, sources=tuple(sources))


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
