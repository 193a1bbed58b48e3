"""The fixed-rate control loop: every period, take the sensor queues, tick the core, publish the command.

The loop runs on a thread of its own (`ControlLoop`), from configure to cleanup: while inactive it only
takes the observations (so they stay current and /diagnostics can tell before activate); while active it
also ticks the core and publishes. Thread scheduling lives here too: the loop thread's real-time priority,
and the normal (or nicer) priority of the threads that load and run models.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.lifecycle import Node as LifecycleNode
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, ReliabilityPolicy

try:
    from rclpy.timer import TimerInfo
except ImportError:  # rclpy before Jazzy: no expected call times (missed ticks counted from intervals)
    TimerInfo = None

from diffusion_controller.core.control_state import ControlState, TickResult
from diffusion_controller.core.controller import ControlCore
from diffusion_controller.core.external import ChunkFitError
from diffusion_controller.core.inputs import ImplausibleInputError, InputError, SourceReader
from diffusion_controller.ros import chunks as ch
from diffusion_controller.ros import conversions as cv
from diffusion_controller.ros import diagnostics as dg
from diffusion_controller.ros.binding import Binding
from diffusion_controller.ros.intake import Intake, hidden_node
from diffusion_controller.ros.process import check_cpus

if TYPE_CHECKING:  # both import this module (thread priorities): imported for the annotations only
    from diffusion_controller.ros.node_diagnostics import NodeDiagnostics
    from diffusion_controller.ros.swapper import Loaded, ModelSwapper

#: Codes of ControlState in the debug timing topic.
STATE_CODES = {
    ControlState.WAITING: 0.0,
    ControlState.RUNNING: 1.0,
    ControlState.SAFE: 2.0,
    ControlState.ESTOP: 3.0,
}
#: Commands must reach reliable controller subscriptions (a best-effort publisher cannot).
COMMAND_QOS = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)


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


def set_thread_cpus(cpus: str) -> str | None:
    """The calling thread (and the threads it starts later) onto the CPU list `cpus`; "" leaves it. None
    when done (or nothing to do), else why not."""
    if not cpus:
        return None
    chosen, why = check_cpus(cpus)
    if why is None:
        try:
            os.sched_setaffinity(0, chosen)
        except (OSError, AttributeError) as exc:
            why = str(exc)
    return why


@contextlib.contextmanager
def normal_priority(cpus: str = ""):
    """Run a block at normal priority, on the CPU list `cpus` ("" = unchanged), and so the threads it
    starts (the inference worker): loading and running a model must never be real-time work, nor run on
    the loop's CPUs when model_cpu_affinity keeps them apart."""
    before = None
    if cpus:
        with contextlib.suppress(OSError, AttributeError):
            before = os.sched_getaffinity(0)
        if set_thread_cpus(cpus) is not None:
            before = None
    try:
        policy, param = os.sched_getscheduler(0), os.sched_getparam(0)
    except (OSError, AttributeError):
        policy = param = None
    lowered = policy not in (None, os.SCHED_OTHER) and set_thread_priority(0) is None
    try:
        yield
    finally:
        if lowered:
            with contextlib.suppress(OSError):
                os.sched_setscheduler(0, policy, param)
        if before is not None:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, before)


def carried_command(
    last_sent: tuple[Sequence[str], np.ndarray] | None, binding: Binding, action_dim: int
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


class ControlLoop:
    """The control timer on a thread of its own, and what it does each period.

    rclpy runs all callbacks of one node in the executor that spins it, so a timer of the main node would
    wait behind whatever that executor is doing: a burst of 500 Hz sensor callbacks, a parameter call
    that parses a model card. The loop timer therefore lives on a small hidden helper node
    (`_<name>_loop`, same namespace and `use_sim_time`) spun by its own single-threaded executor, which
    waits on nothing but that timer (and /clock under sim time). rcl timer semantics are kept: fixed grid,
    sim time, skipped (not bunched) ticks. The tick publishes on the main node's lifecycle publishers,
    which this loop creates and destroys; the observation subscriptions are its `Intake`.

    `loaded` (swapper.Loaded) is read under `lock` every tick: a model swap replaces its parts between two
    ticks. `diagnostics` counts and logs what the input did; `swapper` frees a replaced model after a tick.
    """

    def __init__(
        self, node: LifecycleNode, lock: threading.Lock, loaded: Loaded, diagnostics: NodeDiagnostics,
        swapper: ModelSwapper, carried: tuple[Any, ControlState | None] = (None, None),
    ) -> None:  # fmt: skip
        cfg, binding = loaded.cfg, loaded.binding
        self._lock, self._loaded, self._diag, self._swapper = lock, loaded, diagnostics, swapper
        self._cfg = cfg
        self._log = node.get_logger()
        self._node = node
        use_sim_time = bool(node.get_parameter("use_sim_time").value)
        self._wall_time = not use_sim_time
        self.active = False
        self.stats = dg.LoopStats(period_s=binding.period_s)
        # (output joints, values) of the last command published (see carried_command), and the last control
        # state logged: both outlive a cleanup (carried()), the robot still holds that command.
        self.last_sent: tuple[tuple[str, ...], np.ndarray] | None = carried[0]
        self._last_state: ControlState | None = carried[1]
        self._pub_cmd = self._pub_traj = self._pub_dbg = self._pub_twist = None
        if cfg.twist_enabled:
            self._pub_twist = node.create_lifecycle_publisher(cv.Twist, cfg.twist_topic, COMMAND_QOS)
        self._winding_down: threading.Event | None = None  # set by the tick that sent the wind-down's zero
        if cfg.commands_enabled:
            self._pub_cmd = node.create_lifecycle_publisher(
                cv.Float64MultiArray, cfg.commands_topic, COMMAND_QOS
            )
        if cfg.trajectory_enabled:
            self._pub_traj = node.create_lifecycle_publisher(
                cv.JointTrajectory, cfg.trajectory_topic, COMMAND_QOS
            )
        if cfg.debug_enabled:
            self._pub_dbg = node.create_lifecycle_publisher(
                cv.Float64MultiArray,
                cfg.debug_topic,
                QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE),
            )
        self.intake = Intake(node, cfg.sources, cv.MESSAGE_CLASSES, binding.period_s)
        # Remote policy: its chunks are taken right before each tick, like the observations; the commands
        # go back stamped (previous_action of the policy node's observation history).
        self._chunks: ch.RawQueue | None = None
        self._pub_exec = None
        if cfg.policy_source == "remote":
            topic = node.resolve_topic_name(cfg.chunk_topic)
            self._chunks = ch.RawQueue(self.intake.node, cv.JointTrajectory, topic, ch.CHUNK_QOS)
            self._pub_exec = node.create_lifecycle_publisher(
                ch.JointState, cfg.executed_topic, ch.EXECUTED_QOS
            )

        self._timer_node = hidden_node(node, "loop", [Parameter("use_sim_time", value=use_sim_time)])
        self._timer = self._timer_node.create_timer(binding.period_s, self._on_tick)
        self._timer.cancel()
        self._period_ns = round(binding.period_s * 1e9)
        self._phase_timer = None  # under sim time: the one-shot that moves the grid onto the clock's grid
        self._grid_tries = 3  # a clock whose steps never land on the grid gets no more than these
        self._executor = SingleThreadedExecutor(context=node.context)
        self._executor.add_node(self._timer_node)
        self._priority = cfg.loop_priority
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._spin, name="control_loop", daemon=True)
        self._thread.start()

    # -- the thread ------------------------------------------------------------------------------------------
    def _spin(self) -> None:
        """Spin until close(): the thread leaves the executor by itself, so nothing it waits on is ever
        destroyed under it (shutting an executor down from another thread can)."""
        self._set_priority()
        with contextlib.suppress(ExternalShutdownException, RuntimeError):  # context shut down
            while not self._stop.is_set() and self._timer_node.context.ok():
                self._executor.spin_once(timeout_sec=0.1)

    def _set_priority(self) -> None:
        """Real-time (SCHED_FIFO) scheduling for this thread only, like ros2_control's update thread: the
        tick then preempts sensor processing and other programs the moment its timer is due. On the
        node's real-time CPUs (cpu_affinity, else the process'): configure, which starts this thread, runs
        on the model threads' CPUs (model_cpu_affinity)."""
        cpus = getattr(self._node, "realtime_cpus", None)
        if cpus:
            with contextlib.suppress(OSError, AttributeError):
                os.sched_setaffinity(0, cpus)
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
        return self._timer_node.get_clock().now().nanoseconds * 1e-9

    def start(self) -> None:
        """Start the timer: from now on the observations are taken every period."""
        self._timer.reset()

    def activate(self) -> None:
        """Tick and publish from the next period on."""
        self.stats.reset_phase()
        self.active = True

    def wind_down(self, timeout_s: float) -> bool:
        """Stop commanding: a velocity or effort model's command ramps to zero at its rate limit, one step
        per tick (the core's stop_step), before the ticks stop; a position model stops at once (its
        controller holds the target). Blocks until the zero is sent or `timeout_s`; True when it was."""
        done = threading.Event()
        with self._lock:
            if not self.active or not self._loaded.core.winds_down:
                self.active = False
                return True
            self._winding_down = done
        ok = done.wait(timeout_s)
        with self._lock:
            self._winding_down = None
            self.active = False
        return ok

    def _publish(self, command: np.ndarray, binding: Binding) -> None:
        """The command on every enabled command output (Float64MultiArray or Twist)."""
        sent = command[list(binding.output_index)]
        self.last_sent = (binding.output_joints, sent)
        if self._pub_cmd is not None:
            self._pub_cmd.publish(cv.command_msg(sent))
        if self._pub_twist is not None:
            self._pub_twist.publish(cv.twist_msg(binding.output_joints, sent))

    def carried(self) -> tuple[Any, ControlState | None]:
        """What the next configure's loop continues from (its `carried` argument)."""
        return self.last_sent, self._last_state

    def close(self) -> None:
        """Stop the thread, then release the intake and the publishers."""
        self._timer.cancel()
        self._stop.set()
        self._thread.join()  # within one spin_once timeout
        self._executor.shutdown(timeout_sec=2.0)
        self._timer_node.destroy_node()
        if self._chunks is not None:
            self._chunks.close()
            self._chunks = None
        self.intake.close()
        for pub in (self._pub_cmd, self._pub_traj, self._pub_dbg, self._pub_exec, self._pub_twist):
            if pub is not None:
                self._node.destroy_lifecycle_publisher(pub)
        self._pub_cmd = self._pub_traj = self._pub_dbg = self._pub_exec = self._pub_twist = None
        self.active = False

    # -- one period ----------------------------------------------------------------------------------------
    def _take_observations(self, core: ControlCore, readers: dict[str, SourceReader], now: float) -> None:
        """Everything the sensors sent since the last period into the core's history (under the lock, so
        a model swap cannot change the layout meanwhile)."""
        diag = self._diag

        def accept(source: str, stamp: float, values: dict[str, np.ndarray]) -> None:
            for feature, value in values.items():
                reason = core.observe(feature, stamp, value, now)
                if reason:
                    diag.fault(source, "rejected", f"{feature}: {reason}")

        def reject(source: str, exc: InputError) -> None:
            if isinstance(exc, ImplausibleInputError) and exc.go_safe:
                topic = diag.topic(source)
                for feature in exc.features:
                    core.fault(feature, exc.stamp, f"{topic}: {exc}")
            diag.rejected(source, exc)

        self.intake.drain(readers, now, core.observation_spacing_s, accept, reject, diag.contradiction)

    def _take_chunks(self, core: ControlCore, now: float) -> None:
        """Every chunk the policy node sent since the last period into the core (non-blocking); one that
        does not fit the card is refused with the reason on /diagnostics."""
        assert self._chunks is not None
        for msg, received in self._chunks.take(now):
            if msg is None:
                self._diag.chunk_refused("chunk refused: the message does not deserialize")
                continue
            self._diag.remote_model = ch.model_of(msg) or repr(msg.header.frame_id)
            try:
                actions, t_obs = ch.read_chunk(msg, core.card)
            except ChunkFitError as exc:
                self._diag.chunk_refused(f"chunk refused ({self._diag.remote_model}): {exc}")
                continue
            core.offer_chunk(actions, t_obs, received)

    def _on_tick(self, info: Any = None) -> None:
        """One control period: take the observations, ask the core for the command and publish it.
        `info`: rclpy's TimerInfo (the slot of the timer's grid this call is for), None before Jazzy."""
        t0, t_wall = time.perf_counter(), time.monotonic()  # jitter is when the tick started, not ended
        now = self.now()
        if info is not None and not self._wall_time:
            self._keep_on_the_clock_grid(info.expected_call_time.nanoseconds)
        loaded = self._loaded
        with self._lock:
            core, binding = loaded.core, loaded.binding
            self._take_observations(core, loaded.readers, now)
            if self._chunks is not None:
                self._take_chunks(core, now)
            self._diag.tick_ages(core.ages(now), binding.feature_source)
            if not self.active:
                return
            if self._winding_down is not None:
                self._wind_down_tick(core, binding)
                return
            res = core.tick(now)
        if res.command is not None and self._pub_exec is not None:
            self._pub_exec.publish(ch.executed_msg(core.card.action_joints, res.command, now))
        if res.command is not None:
            self._publish(res.command, binding)
            if self._pub_traj is not None and res.trajectory is not None:
                self._publish_trajectory(res.trajectory, binding)
        slot = actual = None
        if info is not None:  # the grid slot this call is for, and when rcl called it
            slot = info.expected_call_time.nanoseconds * 1e-9
            actual = info.actual_call_time.nanoseconds * 1e-9
        if self._pub_dbg is not None:
            self._pub_dbg.publish(cv.array_msg(self._timing_row(now, res, core, slot)))
        self.stats.tick(t_wall if self._wall_time else now, time.perf_counter() - t0, slot, actual)
        if res.missed:
            self._diag.missed_step(res.reason)
        if self._swapper.retired:
            self._swapper.free_retired(core)
        if res.state != self._last_state:
            self._state_changed(res.state, res.reason)

    def _keep_on_the_clock_grid(self, slot_ns: int) -> None:
        """Under sim time, tick on whole multiples of the period of the simulator's clock, as controllers
        stepped by the simulator do (ros2_control in Gazebo): the node is then in step with the simulated
        sensors whatever the clock read when the timer started. A policy trained on data in step with its
        controller (the shipped effort model: sensors exactly 40 ms old at every tick) tracked at 1.6x its
        expert with its ticks half a period off that grid and 1.2x on it. rcl starts a timer's grid when
        it is reset, so a one-shot timer resets it on the grid (and ticks there itself: no slot is lost)."""
        off = slot_ns % self._period_ns
        if off == 0 or self._phase_timer is not None or self._grid_tries == 0:
            return
        self._grid_tries -= 1
        self._phase_timer = self._timer_node.create_timer((self._period_ns - off) * 1e-9, self._on_grid)

    def _on_grid(self) -> None:
        """The one-shot of _keep_on_the_clock_grid: restart the tick grid here and tick now."""
        phase_timer, self._phase_timer = self._phase_timer, None
        if phase_timer is not None:
            phase_timer.cancel()
            self._timer_node.destroy_timer(phase_timer)
        self._timer.reset()
        self.stats.reset_phase()
        self._on_tick()

    def _wind_down_tick(self, core: ControlCore, binding: Binding) -> None:
        """One step of the deactivate wind-down (under the lock); the zero ends it."""
        command = core.stop_step()
        if command is not None:
            self._publish(command, binding)
        if (command is None or not np.any(command)) and self._winding_down is not None:
            self._winding_down.set()

    def _publish_trajectory(self, traj: Any, binding: Binding) -> None:
        times = np.asarray(traj.times, dtype=float)
        positions = np.asarray(traj.positions, dtype=float)[:, list(binding.output_index)]
        # First point one tick after the start, each later one at its scheduled spacing.
        tfs = times - times[0] + binding.period_s
        stamp = None
        if self._cfg.trajectory_stamp == "absolute":
            stamp = cv.sec_to_time(max(times[0] - binding.period_s, 0.0))
        keep = np.concatenate([[True], np.diff(tfs) > 1e-9])  # strictly increasing, whatever the core gives
        interface = self._cfg.trajectory_interface
        if interface == "position":
            msg = cv.trajectory_msg(binding.output_joints, positions[keep], tfs[keep], stamp)
        else:  # the rows are velocities or efforts (ros/outputs.py checked the kind at configure)
            msg = cv.kind_trajectory_msg(binding.output_joints, positions[keep], tfs[keep], interface, stamp)
        self._pub_traj.publish(msg)

    @staticmethod
    def _timing_row(now: float, res: TickResult, core: ControlCore, slot: float | None) -> list[float]:
        """One row of ~/debug/command_timing, in the order of outputs.TIMING_COLUMNS; `slot` is the timer's
        grid time this tick is for (NaN without TimerInfo): a tick one clock step late still names its own
        slot, so a reader counts skipped slots from it exactly (rounded tick times count lateness as a
        skip)."""
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
            slot if slot is not None else nan,
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


if TimerInfo is not None:  # rclpy hands a TimerInfo to the parameter annotated with the class itself
    ControlLoop._on_tick.__annotations__["info"] = TimerInfo
