"""The diffusion_controller lifecycle node: observations in, commands out at a fixed rate.

A thin layer over `core.controller.ControlCore`: it turns messages into time-stamped features
(`conversions`, taken from the sensor queues at tick time by `intake`), parameters into a validated
configuration (`config`), and a timer into `ControlCore.tick` calls whose commands it publishes. The policy
runs in the core's inference thread, so the timer callback never waits for a model.

Lifecycle (rclpy.lifecycle, like ros2/demos' lifecycle talker):
  configure  read parameters, check the model card against the configuration, load + warm up the model,
             create publishers, subscriptions and the control timer (which from now on takes the sensor
             queues every period, so observations stay current and /diagnostics can tell before activate)
  activate   start ticking and publishing (from a fresh chunk)
  deactivate stop ticking; cleanup releases everything; shutdown from any state
`autostart:=true` walks the node to active at startup.

Threads: the control timer runs on a thread of its own (`ControlLoop`), so a parameter call never delays
a tick; that thread also takes the observation messages, right before each tick, with no Python callback
per message (`intake`: the node's cost does not grow with the sensor rate); services, parameters and
diagnostics share the main executor; the core's inference thread runs the model (ONNX Runtime releases
the GIL); a loader thread runs model swaps.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticStatus, KeyValue
from rcl_interfaces.msg import (
    FloatingPointRange,
    IntegerRange,
    ParameterDescriptor,
    ParameterType,
    SetParametersResult,
)
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.clock import Clock, ClockType
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor, SingleThreadedExecutor
from rclpy.lifecycle import Node as LifecycleNode
from rclpy.lifecycle import State, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from rclpy.signals import SignalHandlerOptions
from std_srvs.srv import Trigger

from diffusion_controller.core.card import CardError, ModelCard, sidecar_path
from diffusion_controller.core.controller import ConfigError as CoreConfigError
from diffusion_controller.core.controller import ControlConfig, ControlCore, ControlState
from diffusion_controller.core.plausibility import Plausibility, PlausibilityLimits, PublisherAgreement
from diffusion_controller.core.runtime import ModelError, Policy
from diffusion_controller.ros import config as cf
from diffusion_controller.ros import conversions as cv
from diffusion_controller.ros import diagnostics as dg
from diffusion_controller.ros.intake import Intake, hidden_node

NODE_NAME = "diffusion_controller"
#: Codes of ControlState in the debug timing topic.
STATE_CODES = {
    ControlState.WAITING: 0.0,
    ControlState.RUNNING: 1.0,
    ControlState.SAFE: 2.0,
    ControlState.ESTOP: 3.0,
}
#: Watchdog timeout standing for "never stale" (the core wants a finite number).
NEVER_S = 1e9
#: Commands must reach reliable controller subscriptions (a best-effort publisher cannot).
COMMAND_QOS = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
#: ~/model is latched: a late subscriber (a dashboard, a test) gets the current model at once.
MODEL_QOS = QoSProfile(
    depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL
)
MIB = 1024 * 1024
_KIND_TYPES = {
    "bool": ParameterType.PARAMETER_BOOL,
    "int": ParameterType.PARAMETER_INTEGER,
    "str": ParameterType.PARAMETER_STRING,
}


def _descriptor(spec: cf.ParamSpec) -> ParameterDescriptor:
    """ROS descriptor of a schema entry. Float and list parameters are dynamically typed so a YAML
    `1` for a float is not a type error; `config.check_value` enforces the kind and range instead."""
    text = spec.description
    if spec.choices:
        text += f" One of: {', '.join(spec.choices)}."
    if spec.startup:
        text += " Read at process start."
    elif not spec.live:
        text += " Read on configure."
    d = ParameterDescriptor(description=text)
    if spec.kind in _KIND_TYPES:
        d.type = _KIND_TYPES[spec.kind]
    else:
        d.dynamic_typing = True
    if spec.range and spec.kind == "int":
        d.integer_range = [IntegerRange(from_value=int(spec.range[0]), to_value=int(spec.range[1]), step=0)]
    elif spec.range and spec.kind == "float":
        d.floating_point_range = [
            FloatingPointRange(from_value=float(spec.range[0]), to_value=float(spec.range[1]), step=0.0)
        ]
    return d


def set_thread_priority(priority: int) -> str | None:
    """SCHED_FIFO at `priority` (> 0) or normal scheduling (0) for the calling thread only (threads it
    starts later inherit it); None when done, else why not (no rtprio rights, not Linux)."""
    try:
        if priority > 0:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
        else:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    except (OSError, AttributeError) as exc:
        return str(exc)
    return None


def carried_command(
    last_sent: tuple[Sequence[str], np.ndarray] | None, binding: cf.Binding, action_dim: int
) -> np.ndarray | None:
    """The last command this node sent, in the new core's action order, when it names every output joint
    of the new binding (a reconfigure may reorder or rename them); else None. The robot's controller still
    holds that command, so a new core must start from it, not jump to the measured pose."""
    if last_sent is None:
        return None
    names, values = last_sent
    sent = dict(zip(names, np.asarray(values, dtype=float), strict=True))
    out = list(binding.output_index)
    if sorted(out) != list(range(action_dim)) or any(j not in sent for j in binding.output_joints):
        return None
    command = np.empty(action_dim)
    command[out] = [sent[j] for j in binding.output_joints]
    return command


#: An error or a refused message this recent keeps its diagnostics section at WARN or ERROR.
RECENT_S = 10.0
#: A wrong-type publisher not seen for this long is reported again when it reappears.
WRONG_TYPE_FORGET_S = 10.0
#: How much nicer than the node a model-swap loader thread runs: its warm-up predicts share the CPU with
#: the inference of the model that is still driving the robot, which must win.
LOADER_NICE_INCREMENT = 10


@contextlib.contextmanager
def nicer_thread(increment: int):
    """Run a block with the calling thread's nice value raised by `increment` (Linux nice is per thread;
    raising it needs no rights; going back may not be allowed, then the thread stays nicer). Threads
    created inside the block inherit it, so create sessions and workers outside."""
    try:
        tid = threading.get_native_id()
        before = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, before + increment))
    except (OSError, AttributeError):
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, tid, before)


@contextlib.contextmanager
def normal_priority():
    """Run a block at normal priority, and so the threads it starts (the inference worker): loading and
    running a model must never be real-time work."""
    try:
        policy, param = os.sched_getscheduler(0), os.sched_getparam(0)
    except (OSError, AttributeError):
        yield
        return
    if policy == os.SCHED_OTHER:
        yield
        return
    set_thread_priority(0)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, policy, param)


def file_sha256(path: str) -> str:
    """The model file's SHA-256 (hex), published on ~/model so an operator knows which weights drive."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(4 * MIB), b""):
            digest.update(block)  # hashlib releases the GIL for blocks this large
    return digest.hexdigest()


def check_model_file(path: str, max_mb: float) -> int:
    """Size of the model file at `path` (bytes) after the checks that need no reading; ConfigError else."""
    if not path:
        raise cf.ConfigError("model_path is empty; set it to an .onnx policy with a model card")
    if os.path.isdir(path):
        raise cf.ConfigError(f"model_path '{path}' is a directory, not an .onnx model file")
    if not os.path.isfile(path):
        raise cf.ConfigError(f"model_path '{path}' does not exist")
    size = os.path.getsize(path)
    if size > max_mb * MIB:
        raise cf.ConfigError(
            f"model_path '{path}' is {size / MIB:.1f} MiB, more than max_model_mb ({max_mb:g}); raise "
            "max_model_mb to load it"
        )
    return size


def read_card(path: str) -> ModelCard:
    """The card of a model file without creating a session: its metadata, else the .yaml beside it."""
    try:
        return ModelCard.from_onnx(path)
    except CardError as exc:
        side = sidecar_path(path)
        if "has no" in str(exc) and side.exists():
            return ModelCard.from_yaml(side)
        raise


class ControlLoop:
    """The fixed-rate control timer on a thread of its own.

    rclpy runs all callbacks of one node in the executor that spins it, so a timer of the main node would
    wait behind whatever that executor is doing: a burst of 500 Hz sensor callbacks, a parameter call
    that parses a model card. The loop timer therefore lives on a small hidden helper node
    (`_<name>_loop`, same namespace and `use_sim_time`) spun by its own single-threaded executor, which
    waits on nothing but that timer (and /clock under sim time). The callback publishes on the main node's
    lifecycle publishers. rcl timer semantics are kept: fixed grid, sim time, skipped (not bunched) ticks.
    """

    def __init__(self, node: rclpy.node.Node, period_s: float, callback: Any, priority: int = 0) -> None:
        use_sim_time = bool(node.get_parameter("use_sim_time").value)
        self.node = hidden_node(node, "loop", [Parameter("use_sim_time", value=use_sim_time)])
        self.timer = self.node.create_timer(period_s, callback)
        self.timer.cancel()
        self.executor = SingleThreadedExecutor(context=node.context)
        self.executor.add_node(self.node)
        self._log = node.get_logger()
        self._priority = priority
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._spin, name="control_loop", daemon=True)
        self.thread.start()

    def _spin(self) -> None:
        """Spin until close(): the thread leaves the executor by itself, so nothing it waits on is ever
        destroyed under it (shutting an executor down from another thread can)."""
        self._set_priority()
        with contextlib.suppress(ExternalShutdownException, RuntimeError):  # context shut down
            while not self._stop.is_set() and self.node.context.ok():
                self.executor.spin_once(timeout_sec=0.1)

    def _set_priority(self) -> None:
        """Real-time (SCHED_FIFO) scheduling for this thread only, like ros2_control's update thread: the
        tick then preempts sensor processing and other programs the moment its timer is due."""
        if self._priority <= 0:
            return
        why = set_thread_priority(self._priority)
        if why is None:
            self._log.info(f"control loop thread: SCHED_FIFO priority {self._priority}")
        else:
            self._log.warning(
                f"control loop thread: no real-time priority ({why}); running at normal priority. Allow it "
                "with rtprio limits (e.g. limits.conf '@realtime - rtprio 99') or set loop_priority:=0"
            )

    def now(self) -> float:
        """Node-clock seconds as the timer sees them (sim time under use_sim_time)."""
        return self.node.get_clock().now().nanoseconds * 1e-9

    def start(self) -> None:
        self.timer.reset()

    def close(self) -> None:
        self.timer.cancel()
        self._stop.set()
        self.thread.join()  # within one spin_once timeout
        self.executor.shutdown(timeout_sec=2.0)
        self.node.destroy_node()


class ControllerNode(LifecycleNode):
    """Managed node running a diffusion policy at a fixed control rate."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(NODE_NAME, **kwargs)
        self._log = self.get_logger()
        self._declare(cf.NODE_PARAMS)
        self._declare_sources()
        self._reverting = False
        self.add_on_set_parameters_callback(self._on_set_parameters)

        self._misc_group = MutuallyExclusiveCallbackGroup()

        self._lock = threading.Lock()  # core/binding/readers swap vs tick and observation callbacks
        self._cfg: cf.NodeConfig | None = None
        self._binding: cf.Binding | None = None
        self._policy: Any = None
        self._core: ControlCore | None = None
        self._readers: dict[str, cv.SourceReader] = {}
        self._intake: Intake | None = None
        self._taken_before: dict[str, tuple[float, int]] = {}  # source -> (time, messages) at the last report
        self._pub_cmd = self._pub_traj = self._pub_dbg = None
        self._loop: ControlLoop | None = None
        self._active = False
        self._estop_latched = False
        self._model_path = ""
        self._stats = dg.LoopStats(period_s=0.02)
        self._last_state: ControlState | None = None
        self._last_error = ""
        self._last_error_time = -math.inf
        self._last_fault_time = -math.inf
        # (output joints, values) of the last command published; outlives cleanup (see carried_command).
        self._last_sent: tuple[tuple[str, ...], np.ndarray] | None = None
        self._swap_thread: threading.Thread | None = None
        self._swap_target = ""
        self._swaps = 0
        self._swap_failures = 0
        self._model_sha256 = ""
        self._retired: list[Any] = []  # replaced policies, freed right after a tick (see _free_retired)
        self._faults = dg.RateLimitedLog(self._log.warning)  # rejected input, per source and cause
        self._events = dg.RateLimitedLog(self._log.warning)  # missed steps
        self._warnings = dg.RateLimitedLog(self._log.warning)  # clamped input, contradicting publishers
        self._source_faults: dict[str, int] = {}
        self._topics: dict[str, str] = {}  # source -> resolved topic
        # source -> count, and when last, of: clamped or refused implausible input, contradicting publishers
        self._clamped: dict[str, int] = {}
        self._implausible: dict[str, int] = {}
        self._contradictions: dict[str, int] = {}
        self._last_warning_time = -math.inf
        self._intruders: dict[str, str] = {}  # command topic -> other nodes publishing on it
        self._wrong_types: dict[str, str] = {}  # source topic -> publishers of another type on it
        self._wrong_types_logged: dict[tuple[str, str], float] = {}  # (topic, types) -> last seen (s)
        self._wall_time = not self.get_parameter("use_sim_time").value

        # Always available, whatever the lifecycle state.
        steady = Clock(clock_type=ClockType.STEADY_TIME)
        self._pub_diag = self.create_publisher(dg.DiagnosticArray, "/diagnostics", 10)
        self._pub_model = self.create_publisher(DiagnosticStatus, "~/model", MODEL_QOS)
        self._diag_timer = self.create_timer(
            float(self.get_parameter("diagnostics_period_s").value), self._publish_diagnostics,
            callback_group=self._misc_group, clock=steady,
        )  # fmt: skip
        self.create_service(Trigger, "~/emergency_stop", self._on_estop, callback_group=self._misc_group)
        self.create_service(Trigger, "~/resume", self._on_resume, callback_group=self._misc_group)

    # -- parameters ---------------------------------------------------------------------------------------
    def _declare(self, specs: tuple[cf.ParamSpec, ...]) -> None:
        for spec in specs:
            if not self.has_parameter(spec.name):
                default = list(spec.default) if isinstance(spec.default, (list, tuple)) else spec.default
                if isinstance(default, list) and not default:
                    default = None  # an empty list has no ROS type; None = "not set" (dynamic typing)
                self.declare_parameter(spec.name, default, _descriptor(spec))

    def _declare_sources(self) -> None:
        """Per-source parameters exist only for the names in observations.sources (ros2_control style)."""
        for name in self.get_parameter("observations.sources").value or []:
            if name and name.replace("_", "a").isalnum():
                self._declare(cf.source_param_specs(name))

    def _param_values(self) -> dict[str, Any]:
        names = self.list_parameters([], 0).names
        return {p.name: p.value for p in self.get_parameters(names)}

    def _on_set_parameters(self, params: list[Parameter]) -> SetParametersResult:
        """Reject bad values with a reason; route model_path changes of a configured node to a swap."""
        for p in params:
            spec = cf.spec_for(p.name)
            if spec is None:
                continue
            try:
                value = cf.check_value(spec, p.value)
            except cf.ConfigError as exc:
                return SetParametersResult(successful=False, reason=str(exc))
            if self._core is None or self._reverting:
                continue
            if not spec.live:
                return SetParametersResult(
                    successful=False,
                    reason=f"{p.name} is read on configure: deactivate, cleanup, set it, configure again",
                )
            if p.name == "model_path":
                limit = next((q.value for q in params if q.name == "max_model_mb"), None)
                reason = self._begin_swap(value, float(limit or self.get_parameter("max_model_mb").value))
                if reason:  # said where an operator looks, not only in the caller's reply
                    self._swap_failures += 1
                    # Not _error(): rclpy refuses two severities from one logging call site.
                    self._last_error, self._last_error_time = reason, time.monotonic()
                    self._log.warning(reason)
                    return SetParametersResult(successful=False, reason=reason)
        return SetParametersResult(successful=True)

    # -- lifecycle ------------------------------------------------------------------------------------------
    def on_configure(self, state: State) -> TransitionCallbackReturn:
        with normal_priority():
            return self._configure(state)

    def _configure(self, state: State) -> TransitionCallbackReturn:
        try:
            self._declare_sources()
            cfg = cf.NodeConfig.from_params(self._param_values())
            for problem in cf.unknown_parameters(self._overrides(), [s.name for s in cfg.sources]):
                self._log.warning(f"{problem}: ignored")
            card, binding = self._check_model(cfg, cfg.model_path, cfg.max_model_mb)
            policy = self._load_policy(cfg, cfg.model_path)
            sha256 = file_sha256(cfg.model_path)
            core = ControlCore(policy.card, self._control_config(cfg, binding, policy.card), policy)
            carried = carried_command(self._last_sent, binding, len(policy.card.action_joints))
            if carried is not None and core.continue_from(carried):
                self._log.info("first commands rate-limited against the last one this node sent")
        except (cf.ConfigError, CardError, ModelError, CoreConfigError, OSError) as exc:
            self._error(f"configure failed: {exc}")
            self._publish_model("failed", dg.ERROR, f"configure failed: {exc}")
            return TransitionCallbackReturn.FAILURE
        except Exception as exc:  # anything else: still a clear line instead of rclpy's silent ERROR
            self._error(f"configure failed: {type(exc).__name__}: {exc}")
            self._publish_model("failed", dg.ERROR, f"configure failed: {type(exc).__name__}: {exc}")
            return TransitionCallbackReturn.FAILURE
        self._cfg, self._binding, self._policy, self._core = cfg, binding, policy, core
        self._model_path, self._model_sha256 = cfg.model_path, sha256
        self._topics = {s.name: self.resolve_topic_name(s.topic) for s in cfg.sources}
        self._readers = self._make_readers(cfg, policy.card, binding)
        self._stats = dg.LoopStats(period_s=binding.period_s)
        self._last_error = ""
        if cfg.commands_enabled:
            self._pub_cmd = self.create_lifecycle_publisher(
                cv.Float64MultiArray, cfg.commands_topic, COMMAND_QOS
            )
        if cfg.trajectory_enabled:
            self._pub_traj = self.create_lifecycle_publisher(
                cv.JointTrajectory, cfg.trajectory_topic, COMMAND_QOS
            )
        if cfg.debug_enabled:
            self._pub_dbg = self.create_lifecycle_publisher(
                cv.Float64MultiArray,
                cfg.debug_topic,
                QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE),
            )
        self._intake = Intake(self, cfg.sources, cv.MESSAGE_CLASSES, binding.period_s)
        self._loop = ControlLoop(self, binding.period_s, self._on_tick, cfg.loop_priority)
        self._loop.start()  # takes the sensor queues from now on; publishes only once active
        # Everything loaded so far lives as long as the node: take it out of the cyclic garbage collector's
        # view, so a full collection (~20 ms with rclpy + ONNX Runtime loaded) never pauses a tick.
        gc.collect()
        gc.freeze()
        self._log.info(
            f"configured: model '{card.name}' {card.version} on {policy.provider}, K={policy.steps}, "
            f"{1.0 / binding.period_s:.1f} Hz, sources {[s.name for s in cfg.sources]}"
        )
        self._publish_model("loaded", dg.OK, f"running '{card.name}' {card.version}")
        return super().on_configure(state)

    def on_activate(self, state: State) -> TransitionCallbackReturn:
        assert self._core is not None and self._loop is not None
        with self._lock:
            self._core.reset()
            if self._estop_latched:
                self._core.estop()
        self._stats.reset_phase()
        self._active = True
        ret = super().on_activate(state)
        self._log.info("active: publishing commands")
        return ret

    def on_deactivate(self, state: State) -> TransitionCallbackReturn:
        self._active = False
        self._log.info("inactive: commands stopped")
        return super().on_deactivate(state)

    def on_cleanup(self, state: State) -> TransitionCallbackReturn:
        self._release()
        self._publish_model("unloaded", dg.STALE, "no model loaded (cleanup)")
        return super().on_cleanup(state)

    def on_shutdown(self, state: State) -> TransitionCallbackReturn:
        self._release()
        return super().on_shutdown(state)

    def on_error(self, state: State) -> TransitionCallbackReturn:
        self._error(f"error in transition from '{state.label}'; releasing resources")
        self._release()
        return TransitionCallbackReturn.SUCCESS

    def _release(self) -> None:
        if self._loop is not None:
            self._loop.close()
        if self._intake is not None:
            self._intake.close()
        for pub in (self._pub_cmd, self._pub_traj, self._pub_dbg):
            if pub is not None:
                self.destroy_lifecycle_publisher(pub)
        with self._lock:
            core, self._core = self._core, None
        if core is not None:
            core.close()
        self._loop = self._intake = self._pub_cmd = self._pub_traj = self._pub_dbg = None
        self._readers, self._retired = {}, []
        self._policy = self._binding = self._cfg = None
        self._active = False

    def autostart(self) -> None:
        """configure + activate when the `autostart` parameter says so (otherwise a manager does it)."""
        if not self.get_parameter("autostart").value:
            self._log.info("autostart is false: waiting in 'unconfigured' for a lifecycle manager")
            return
        if self.trigger_configure() == TransitionCallbackReturn.SUCCESS:
            self.trigger_activate()

    def close(self) -> None:
        """Stop the threads the node owns (control loop, inference, loader) so the process can exit."""
        if self._loop is not None:
            self._loop.close()
            self._loop = None
        swap = self._swap_thread
        if swap is not None:
            swap.join(timeout=10.0)
        with self._lock:
            core, self._core = self._core, None
        if core is not None:
            core.close()

    # -- model loading and swapping --------------------------------------------------------------------------
    def _check_model(self, cfg: cf.NodeConfig, path: str, max_mb: float) -> tuple[ModelCard, cf.Binding]:
        """The part before any session exists: the file, its card, and the card vs the config."""
        check_model_file(path, max_mb)
        card = read_card(path)
        return card, cf.validate_against_card(cfg, card)

    def _load_policy(self, cfg: cf.NodeConfig, path: str, warmup: int = 3) -> Any:
        return Policy.load(
            path, provider=cfg.provider, threads=cfg.threads, steps=cfg.steps or None, warmup=warmup,
            log=lambda m: self._log.info(str(m)), precision=cfg.precision, cuda_graph=cfg.cuda_graph,
            device_id=cfg.device_id, engine_cache_dir=cfg.engine_cache_dir,
        )  # fmt: skip

    def _control_config(self, cfg: cf.NodeConfig, binding: cf.Binding, card: ModelCard) -> ControlConfig:
        """Per-source timeouts become per-feature watchdog timeouts (0 = never stale); a velocity command
        source's timeout is the core's command timeout (0 = hold the last command)."""
        kinds = {f.name: f.kind for f in card.features}
        timeouts: dict[str, float] = {}
        command_timeout: float | None = None
        for feature, source in binding.feature_source.items():
            timeout = next(s.timeout_s for s in cfg.sources if s.name == source)
            if kinds.get(feature) == "velocity_command":
                command_timeout = timeout if timeout > 0 else None
            else:
                timeouts[feature] = timeout if timeout > 0 else NEVER_S
        return ControlConfig(
            exec_latency_s=cfg.exec_latency_s,
            execute_steps=cfg.execute_steps,
            blend=cfg.blend,
            crossfade_steps=cfg.crossfade_steps,
            ensemble_chunks=cfg.ensemble_chunks,
            max_consecutive_misses=cfg.max_consecutive_misses,
            compensate_delay=cfg.compensate_delay,
            obs_timeouts_s=timeouts,
            command_timeout_s=command_timeout,
            future_tolerance_s=cfg.max_future_s,
            safe_mode=cfg.safe_mode,
            default_pose=binding.default_pose if cfg.safe_mode == "default_pose" else None,
            max_step_per_tick=cfg.max_step_per_tick,
            seed=None if cfg.seed < 0 else cfg.seed,
        )

    def _make_readers(
        self, cfg: cf.NodeConfig, card: ModelCard, binding: cf.Binding
    ) -> dict[str, cv.SourceReader]:
        readers = {}
        plausible = Plausibility(
            card, PlausibilityLimits(cfg.joint_margin, cfg.command_sigmas, cfg.sensor_sigmas)
        )
        for src in cfg.sources:
            decoder = cv.SourceDecoder(src, card.features, binding.rename)
            readers[src.name] = cv.SourceReader(
                decoder, cfg.max_future_s, on_note=lambda cause, text, n=src.name: self._note(n, cause, text),
                plausibility=plausible, policy=cf.implausible_policy(src, card),
                agreement=PublisherAgreement(card),
            )  # fmt: skip
        return readers

    def _begin_swap(self, path: str, max_mb: float) -> str:
        """Start loading a new model_path in the background; '' or why not. Only what needs no reading
        is checked here (the parameter call answers at once); the loader thread does the rest."""
        cfg, binding = self._cfg, self._binding
        if cfg is None or binding is None:
            return ""
        if self._swap_thread is not None:
            return f"a model swap to '{self._swap_target}' is still loading; try again when it is done"
        try:
            check_model_file(path, max_mb)
        except (cf.ConfigError, OSError) as exc:
            return f"model_path rejected, the old model keeps running: {exc}"
        self._swap_target = path
        self._swap_thread = threading.Thread(
            target=self._swap, args=(cfg, path, max_mb, binding, self._model_path),
            name="model_swap", daemon=True,
        )  # fmt: skip
        self._swap_thread.start()
        self._log.info(f"model swap: loading '{path}' in the background")
        self._publish_model("loading", dg.WARN, f"loading '{path}'; the old model keeps running meanwhile")
        return ""

    def _swap(self, cfg: cf.NodeConfig, path: str, max_mb: float, running: cf.Binding, old_path: str) -> None:
        """Loader thread: read and check the card, hash, load + warm up, then swap between two ticks; on
        any failure keep the old model, say why (log, /diagnostics, ~/model) and put model_path back."""
        set_thread_priority(0)  # started from a real-time executor thread: loading is not real-time work
        try:
            card, binding = self._check_model(cfg, path, max_mb)
            check_swap_fits(running, binding)
            sha256 = file_sha256(path)
            policy = self._load_policy(cfg, path, warmup=0)
            with nicer_thread(LOADER_NICE_INCREMENT):  # warm-up must not take CPU from the running model
                policy.warm_up()
            readers = self._make_readers(cfg, policy.card, binding)
            with self._lock:
                if self._core is None:
                    return
                self._core.swap_policy(policy)
                self._retired.append(self._policy)
                self._policy, self._binding, self._readers = policy, binding, readers
                self._model_path, self._model_sha256 = path, sha256
            gc.freeze()  # the new model's objects are long-lived too (see on_configure)
            self._swaps += 1
            self._log.info(f"model swap: now running '{card.name}' {card.version} on {policy.provider}")
            self._publish_model("swapped", dg.OK, f"running '{card.name}' {card.version}")
        except Exception as exc:  # any failure: the old model keeps running
            self._swap_failures += 1
            why = f"model swap to '{path}' failed, the old model keeps running: {exc}"
            self._error(why)
            self._publish_model("failed", dg.ERROR, why, attempted=path)
            self._reverting = True
            try:
                self.set_parameters([Parameter("model_path", value=old_path)])
            finally:
                self._reverting = False
        finally:
            self._swap_thread = None

    def _publish_model(self, event: str, level: int, message: str, attempted: str = "") -> None:
        """One ~/model status: what runs now (name, version, path, SHA-256, provider) and what happened."""
        policy, card = self._policy, getattr(self._policy, "card", None)
        values = {
            "event": event,
            "path": self._model_path if policy is not None else "",
            "name": card.name if card is not None else "",
            "version": card.version if card is not None else "",
            "sha256": self._model_sha256 if policy is not None else "",
            "provider": str(getattr(policy, "provider", "")),
            "steps": str(getattr(policy, "steps", "")),
            "swaps": str(self._swaps),
            "swap_failures": str(self._swap_failures),
            "attempted_path": attempted,
        }
        msg = DiagnosticStatus(
            level=bytes([level]), name=f"{self.get_fully_qualified_name()}: model", message=message[:1000]
        )
        msg.values = [KeyValue(key=k, value=v) for k, v in values.items()]
        with contextlib.suppress(Exception):  # a status message must never cost a swap or a transition
            self._pub_model.publish(msg)

    # -- callbacks -----------------------------------------------------------------------------------------
    def _now(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    def _take_observations(self, core: ControlCore, now: float) -> None:
        """Everything the sensors sent since the last period into the core's history (under the lock, so
        a model swap cannot change the layout meanwhile)."""

        def accept(source: str, stamp: float, values: dict[str, np.ndarray]) -> None:
            for feature, value in values.items():
                reason = core.observe(feature, stamp, value, now)
                if reason:
                    self._fault(source, "rejected", f"{feature}: {reason}")

        def reject(source: str, exc: cv.InputError) -> None:
            if isinstance(exc, cv.ImplausibleInputError):
                topic = self._topics.get(source, source)
                self._implausible[source] = self._implausible.get(source, 0) + 1
                if exc.go_safe:
                    for feature in exc.features:
                        core.fault(feature, exc.stamp, f"{topic}: {exc}")
                # One log line per source and feature set: another feature going wrong is news.
                self._fault(source, f"{exc.cause}:{','.join(exc.features)}", f"{topic}: {exc}")
                return
            self._fault(source, exc.cause, str(exc))

        self._intake.drain(
            self._readers, now, core.observation_spacing_s, accept, reject, self._contradiction
        )

    def _on_tick(self) -> None:
        """One control period: take the observations, ask the core for the command and publish it."""
        t0, t_wall = time.perf_counter(), time.monotonic()  # jitter is when the tick started, not ended
        loop = self._loop
        now = loop.now() if loop is not None else self._now()
        with self._lock:
            core, binding = self._core, self._binding
            if core is None or binding is None or self._intake is None:
                return
            self._take_observations(core, now)
            if not self._active:
                return
            res = core.tick(now)
        if res.command is not None:
            sent = res.command[list(binding.output_index)]
            self._last_sent = (binding.output_joints, sent)
            if self._pub_cmd is not None:
                self._pub_cmd.publish(cv.command_msg(sent))
            if self._pub_traj is not None and res.trajectory is not None:
                self._publish_trajectory(res.trajectory, binding, now)
        if self._pub_dbg is not None:
            self._pub_dbg.publish(cv.array_msg(self._timing_row(now, res, core)))
        self._stats.tick(t_wall if self._wall_time else now, time.perf_counter() - t0)
        if res.missed:
            self._events("missed_step", f"missed step: {res.reason}")
        if self._retired:
            self._free_retired()
        if res.state != self._last_state:
            self._state_changed(res.state, res.reason)

    def _free_retired(self) -> None:
        """Free a policy replaced by a swap, here, right after a tick has published. Destroying an ONNX
        Runtime session holds the GIL (~10 ms for a DiffuseLoco-size model); here that falls into the
        slack before the next tick instead of delaying one. Waits while anything else still holds it
        (a predict in flight, a result not yet taken)."""
        obj = self._retired[0]
        if sys.getrefcount(obj) > 3:  # the list, `obj`, getrefcount's argument
            return
        self._retired.pop(0)
        del obj

    def _publish_trajectory(self, traj: Any, binding: cf.Binding, now: float) -> None:
        times = np.asarray(traj.times, dtype=float)
        positions = np.asarray(traj.positions, dtype=float)[:, list(binding.output_index)]
        # First point one tick after the start, each later one at its scheduled spacing.
        tfs = times - times[0] + binding.period_s
        stamp = None
        if self._cfg is not None and self._cfg.trajectory_stamp == "absolute":
            stamp = cv.sec_to_time(max(times[0] - binding.period_s, 0.0))
        keep = np.concatenate([[True], np.diff(tfs) > 1e-9])  # strictly increasing, whatever the core gives
        self._pub_traj.publish(cv.trajectory_msg(binding.output_joints, positions[keep], tfs[keep], stamp))

    def _timing_row(self, now: float, res: Any, core: ControlCore) -> list[float]:
        nan = math.nan
        action_time = res.action_time if res.action_time is not None else nan
        index = res.action_index if res.action_index is not None else nan
        obs_stamp = nan
        if res.action_time is not None and res.action_index is not None:
            card = core.card
            obs_stamp = res.action_time - (card.first_offset + res.action_index) * card.control_period_s
        return [
            now, res.t_exec, action_time, obs_stamp,
            res.chunk_seq if res.chunk_seq is not None else nan, index,
            STATE_CODES.get(res.state, nan), 1.0 if res.missed else 0.0,
        ]  # fmt: skip

    def _state_changed(self, state: ControlState, reason: str) -> None:
        """One log line per state change (the reason as it was then; /diagnostics has the current one)."""
        old = self._last_state
        self._last_state = state
        text = f"control state {old.value if old else '-'} -> {state.value}"
        text += f": {reason}" if reason else ""
        if state in (ControlState.SAFE, ControlState.ESTOP):
            self._log.warning(text)
        else:
            self._log.info(text)

    def _on_estop(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        self._estop_latched = True
        with self._lock:
            if self._core is not None:
                self._core.estop()
        self._log.warning("emergency stop: holding the last command until ~/resume")
        response.success, response.message = True, "emergency stop latched: holding the last command"
        return response

    def _on_resume(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        was = self._estop_latched
        self._estop_latched = False
        with self._lock:
            if self._core is not None:
                self._core.resume()
        self._log.info("resume: waiting for a fresh chunk")
        response.success = True
        response.message = "resumed: control restarts from a fresh chunk" if was else "was not stopped"
        return response

    # -- faults and diagnostics ----------------------------------------------------------------------------
    def _fault(self, source: str, cause: str, message: str) -> None:
        self._source_faults[source] = self._source_faults.get(source, 0) + 1
        self._last_fault_time = time.monotonic()
        self._faults(f"{source}:{cause}", f"[{source}] {message}")

    def _note(self, source: str, cause: str, message: str) -> None:
        """A message the reader used but has something to say about (clamped values, stamp 0)."""
        if cause != "clamped":
            self._log.info(message)
            return
        self._clamped[source] = self._clamped.get(source, 0) + 1
        self._last_warning_time = time.monotonic()
        self._warnings(f"{source}:clamped", f"[{source}] {self._topics.get(source, source)}: {message}")

    def _contradiction(self, source: str, why: str) -> None:
        """Two publishers on one observation topic disagree: say so (which one is right is not knowable)."""
        self._contradictions[source] = self._contradictions.get(source, 0) + 1
        self._last_warning_time = time.monotonic()
        topic = self._topics.get(source, source)
        nodes = ""
        with contextlib.suppress(Exception):
            nodes = ", ".join(sorted(_node_names(self.get_publishers_info_by_topic(topic))))
        self._warnings(
            f"{source}:contradiction",
            f"[{source}] contradictory publishers on {topic} ({nodes or 'nodes unknown'}): {why}",
        )

    def _error(self, message: str) -> None:
        self._last_error, self._last_error_time = message, time.monotonic()
        self._log.error(message)

    def _overrides(self) -> dict[str, Any]:
        return {name: p.value for name, p in getattr(self, "_parameter_overrides", {}).items()}

    def _check_topic_types(self) -> None:
        """A publisher of another message type on a source topic never reaches this node (DDS does not
        match the two, and this rmw raises no incompatible-type event): find it in the graph, log it once,
        and keep it on /diagnostics while it is there."""
        cfg, found, now = self._cfg, {}, time.monotonic()
        for src in cfg.sources if cfg is not None else ():
            topic = self.resolve_topic_name(src.topic)
            infos = [i for i in self.get_publishers_info_by_topic(topic) if i.topic_type != src.type]
            if infos:
                names = {f"{i.topic_type} from {i.node_namespace.rstrip('/')}/{i.node_name}" for i in infos}
                found[topic] = ", ".join(sorted(names))
                # Keyed by the types only: a publisher's node name can arrive after its endpoint is
                # discovered, and a graph query can miss it for a poll; neither is a new publisher.
                key = (topic, ", ".join(sorted({i.topic_type for i in infos})))
                if key not in self._wrong_types_logged:
                    self._log.warning(
                        f"[{src.name}] {topic} also has publishers of another type ({found[topic]}); this "
                        f"node reads {src.type}: their messages never arrive"
                    )
                self._wrong_types_logged[key] = now
        # Forgotten once gone for a while: a wrong publisher that comes back later is a new incident.
        for key, seen in list(self._wrong_types_logged.items()):
            if now - seen > WRONG_TYPE_FORGET_S:
                del self._wrong_types_logged[key]
        self._wrong_types = found

    def _check_command_topics(self) -> None:
        """Another node publishing on this node's command topics means two controllers fight over one
        robot: find it in the graph and keep it on /diagnostics (WARN) while it is there."""
        cfg, found = self._cfg, {}
        if cfg is None:
            self._intruders = {}
            return
        own = (self.get_namespace().rstrip("/"), self.get_name())
        for enabled, name in (
            (cfg.commands_enabled, cfg.commands_topic),
            (cfg.trajectory_enabled, cfg.trajectory_topic),
        ):
            if not enabled:
                continue
            topic = self.resolve_topic_name(name)
            others = [
                i
                for i in self.get_publishers_info_by_topic(topic)
                if (i.node_namespace.rstrip("/"), i.node_name) != own
            ]
            if others:
                found[topic] = ", ".join(sorted(_node_names(others)))
                if topic not in self._intruders:
                    self._log.warning(
                        f"{topic}: other publishers besides this node ({found[topic]}); two controllers "
                        "commanding one robot fight each other"
                    )
        self._intruders = found

    def _publish_diagnostics(self) -> None:
        with contextlib.suppress(Exception):  # a graph query must never cost the diagnostics
            self._check_topic_types()
        with contextlib.suppress(Exception):
            self._check_command_topics()
        label = self._state_machine.current_state[1]
        sections = self._diagnostic_sections(label)
        self._pub_diag.publish(
            dg.diagnostic_array(self.get_fully_qualified_name(), self.get_clock().now().to_msg(), sections)
        )

    def _diagnostic_sections(self, lifecycle: str) -> list[dg.Section]:
        core, policy = self._core, self._policy
        recent_error = time.monotonic() - self._last_error_time < RECENT_S
        if core is None or policy is None:
            level = dg.ERROR if recent_error else dg.STALE
            msg = self._last_error if recent_error else lifecycle
            return [
                dg.Section(
                    "control loop", level, msg, {"lifecycle": lifecycle, "last error": self._last_error}
                )
            ]
        st = core.stats()
        s = self._stats
        if not self._active:
            loop_level, loop_msg = dg.STALE, f"{lifecycle}: not publishing"
        elif st.state == ControlState.ESTOP:
            loop_level, loop_msg = dg.ERROR, "emergency stop (call ~/resume)"
        elif st.state == ControlState.SAFE:
            loop_level, loop_msg = dg.ERROR, f"safe state: {st.reason}"
        elif st.state == ControlState.WAITING:
            loop_level, loop_msg = dg.WARN, f"waiting: {st.reason or 'for observations and a first chunk'}"
        else:
            loop_level, loop_msg = dg.OK, "running"
        period = self._binding.period_s if self._binding else math.nan
        loop = dg.Section(
            "control loop",
            loop_level,
            loop_msg,
            {
                "lifecycle": lifecycle,
                "state": st.state.value,
                "reason": st.reason,
                "rate_hz": s.rate_hz,
                "target_rate_hz": 1.0 / period,
                "ticks": s.ticks,
                "missed_ticks": s.missed_ticks,
                "jitter_p50_ms": s.jitter_ms(50),
                "jitter_p99_ms": s.jitter_ms(99),
                "jitter_max_ms": 1000.0 * s.max_jitter_s,
                "tick_cost_p99_ms": s.cost_ms(99),
                "missed_steps": st.missed_steps,
                "consecutive_misses": st.consecutive_misses,
                "safe_entries": st.safe_entries,
                "estops": st.estops,
            },
        )
        card = core.card
        summary = self._last_error if recent_error else f"{card.name} {card.version}"
        pol = dg.Section(
            "policy",
            dg.WARN if recent_error else dg.OK,
            summary,
            {
                "model": card.name,
                "version": card.version,
                "path": self._model_path,
                "provider": getattr(policy, "provider", "?"),  # what runs (node placement), and how:
                "precision": getattr(policy, "precision", "?"),
                "cuda_graph": getattr(policy, "cuda_graph", False),
                "runs_on": policy.describe() if hasattr(policy, "describe") else "?",
                "steps": getattr(policy, "steps", "?"),
                "compute_p50_ms": 1000.0 * st.compute_p50_s,
                "compute_p99_ms": 1000.0 * st.compute_p99_s,
                "inference_p50_ms": 1000.0 * st.inference_p50_s,
                "inference_p99_ms": 1000.0 * st.inference_p99_s,
                "inference_forecast_ms": 1000.0 * st.inference_forecast_s,
                "requests": st.requests,
                "chunks_received": st.chunks_received,
                "chunks_dropped": st.chunks_dropped,
                "inference_errors": st.inference_errors,
                "swaps": self._swaps,
                "swap_failures": self._swap_failures,
                "replaced_models_not_freed": len(self._retired),
                "swap_loading": self._swap_target if self._swap_thread else "",
                "sha256": self._model_sha256,
                "last_error": self._last_error or st.last_error,
            },
        )
        ages = core.ages(self._now())
        values: dict[str, object] = {f"age_ms.{k}": 1000.0 * v for k, v in ages.items()}
        values.update({f"rejected.{k}": v for k, v in self._source_faults.items()})
        values.update({f"implausible.{k}": v for k, v in self._implausible.items()})
        values.update({f"clamped.{k}": v for k, v in self._clamped.items()})
        values.update({f"contradictions.{k}": v for k, v in self._contradictions.items()})
        values.update({f"other_publishers.{k}": v for k, v in self._intruders.items()})
        values.update({f"wrong_type.{k}": v for k, v in self._wrong_types.items()})
        values.update(self._input_rates())
        values["stale_events"] = st.stale_obs_events
        values["rejected_total"] = self._faults.total  # the core's refusals come through _fault too
        timeouts = self._control_timeouts()
        stale = [k for k, v in ages.items() if v > timeouts.get(k, math.inf)]
        if stale:
            obs_level, obs_msg = dg.ERROR, f"stale: {', '.join(stale)}"
        elif self._wrong_types:
            obs_level, obs_msg = dg.WARN, "publishers of the wrong type on " + ", ".join(self._wrong_types)
        elif self._intruders:
            obs_level, obs_msg = (
                dg.WARN,
                "other publishers on the command topics " + ", ".join(self._intruders),
            )
        elif time.monotonic() - self._last_fault_time < RECENT_S:
            obs_level, obs_msg = dg.WARN, f"rejected messages: {self._faults.last_message}"
        elif time.monotonic() - self._last_warning_time < RECENT_S:
            obs_level, obs_msg = dg.WARN, self._warnings.last_message
        else:
            obs_level, obs_msg = dg.OK, "fresh"
        return [loop, pol, dg.Section("observations", obs_level, obs_msg, values)]

    def _input_rates(self) -> dict[str, float]:
        """Messages per second each source delivered since the last report, and how many the transport
        or a full queue lost (publisher sequence gaps) so far."""
        intake, t = self._intake, time.monotonic()
        if intake is None:
            return {}
        out: dict[str, float] = {}
        for name, counts in intake.counts().items():
            t0, n0 = self._taken_before.get(name, (t, counts.taken))
            out[f"input_hz.{name}"] = (counts.taken - n0) / (t - t0) if t > t0 else 0.0
            out[f"lost.{name}"] = counts.lost
            self._taken_before[name] = (t, counts.taken)
        return out

    def _control_timeouts(self) -> dict[str, float]:
        core = self._core
        return dict(core.config.obs_timeouts_s) if core is not None else {}


def check_swap_fits(running: cf.Binding, new: cf.Binding) -> None:
    """A swap keeps what the robot side is wired to: the published joints and the control period."""
    if new.output_joints != running.output_joints:
        raise cf.ConfigError(
            f"its action joints {list(new.output_joints)} change the published joints "
            f"{list(running.output_joints)}; set `joints` to pin the order"
        )
    if abs(new.period_s - running.period_s) > 1e-9:
        raise cf.ConfigError(
            f"control period {new.period_s:.4f} s differs from the running {running.period_s:.4f} s; "
            "set rate_hz or reconfigure"
        )


def _node_names(infos: Sequence[Any]) -> set[str]:
    """Fully qualified node names of graph endpoint infos."""
    return {f"{i.node_namespace.rstrip('/')}/{i.node_name}" for i in infos}


def make_executor(kind: str, context: Any = None) -> tuple[Any, str]:
    """The executor named by the `executor` parameter and what it is.

    Under sensor load the main executor is the node's biggest CPU user: at 3 kHz of observations the
    single-threaded executor took ~80% of a core here, rclpy's EventsExecutor ~30%. As a real-time
    thread, a saturated executor gets the CPU's real-time runqueue throttled and the control loop with it.
    """
    if kind == "multi_threaded":
        return MultiThreadedExecutor(num_threads=2, context=context), "multi_threaded"
    if kind in ("auto", "events"):
        try:
            from rclpy.experimental import EventsExecutor
        except ImportError as exc:  # rclpy before Kilted
            if kind == "events":
                raise SystemExit(
                    f"executor:=events needs rclpy's EventsExecutor (ROS 2 Kilted or newer): {exc}; "
                    "use executor:=auto or single_threaded"
                ) from exc
        else:
            return EventsExecutor(context=context), "events"
    return SingleThreadedExecutor(context=context), "single_threaded"


def main(args: list[str] | None = None) -> int:
    """Console script `controller_node`; exits 0 on SIGINT/SIGTERM like ros2/demos.

    The process handles the signals itself instead of rclpy's handler: that one shuts the context down
    from the signal, while the control-loop thread may be inside a wait on it (a crash on exit). Here a
    signal only sets a flag; the main loop sees it within 0.1 s and tears down in order: loop thread,
    inference thread, executor, node, context.
    """
    # Python hands the GIL over every 5 ms by default; a control loop needs it back sooner.
    sys.setswitchinterval(0.0005)
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    node = executor = None
    try:
        node = ControllerNode()
        executor, kind = make_executor(str(node.get_parameter("executor").value))
        node.get_logger().info(f"main executor: {kind}")
        executor.add_node(node)
        node.autostart()
        priority = int(node.get_parameter("executor_priority").value)
        if priority > 0:
            why = set_thread_priority(priority)
            if why is None:
                node.get_logger().info(f"executor thread: SCHED_FIFO priority {priority}")
            else:
                node.get_logger().warning(f"executor thread: no real-time priority ({why}); normal priority")
        while not stop.is_set() and rclpy.ok():
            executor.spin_once(timeout_sec=0.1)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second signal must not interrupt the cleanup
            signal.signal(sig, signal.SIG_IGN)
        if node is not None:
            node.close()
        if executor is not None:
            executor.shutdown(timeout_sec=5.0)
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
