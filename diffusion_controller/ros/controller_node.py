"""The diffusion_controller lifecycle node: observations in, commands out at a fixed rate.

A thin layer over `core.controller.ControlCore`, in rooms:
  controller_node.py  this lifecycle node: its hooks, the e-stop services, and main()
  params.py           parameters declared from the specification in config.py, and the check of a set
  swapper.py          the model: loaded on configure, swapped when model_path is set, reported on ~/model
  loop.py             the fixed-rate loop on a thread of its own: observations in, tick, command out
  node_diagnostics.py /diagnostics and the log lines about the input

Lifecycle (rclpy.lifecycle, like ros2/demos' lifecycle talker):
  configure  read parameters, check the model card against the configuration, load + warm up the model,
             create publishers, subscriptions and the control timer (which from now on takes the sensor
             queues every period, so observations stay current and /diagnostics can tell before activate)
  activate   start ticking and publishing (from a fresh chunk)
  deactivate stop ticking; cleanup releases everything; shutdown from any state
`autostart:=true` walks the node to active at startup.

Threads: the control loop has a thread of its own (`loop.ControlLoop`), so a parameter call never delays
a tick; that thread also takes the observation messages, right before each tick, with no Python callback
per message (`intake`: the node's cost does not grow with the sensor rate); services, parameters and
diagnostics share the main executor; the core's inference thread runs the model (ONNX Runtime releases
the GIL); a loader thread runs model swaps.
"""

from __future__ import annotations

import gc
import os
import sys
import threading
from typing import Any

import rclpy
from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor, SingleThreadedExecutor
from rclpy.lifecycle import Node as LifecycleNode
from rclpy.lifecycle import State, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.signals import SignalHandlerOptions
from std_srvs.srv import Trigger

from diffusion_controller.core.card import CardError
from diffusion_controller.core.control_config import ConfigError as CoreConfigError
from diffusion_controller.core.runtime import ModelError
from diffusion_controller.ros import config as cf
from diffusion_controller.ros import dds, process
from diffusion_controller.ros import diagnostics as dg
from diffusion_controller.ros.loop import ControlLoop, carried_command, normal_priority, set_thread_priority
from diffusion_controller.ros.node_diagnostics import NodeDiagnostics, NodeView
from diffusion_controller.ros.params import NodeParameters
from diffusion_controller.ros.swapper import Loaded, ModelSwapper

NODE_NAME = "diffusion_controller"
#: Longest deactivate waits for a velocity/effort command's ramp to zero (the ticks send it).
WIND_DOWN_TIMEOUT_S = 5.0


class ControllerNode(LifecycleNode):
    """Managed node running a diffusion policy at a fixed control rate.

    The hooks set `lifecycle` (the state label, kept here: rclpy has no public accessor for it), `loaded`
    (the model and what was built for it; None while unconfigured) and `loop`; the rooms get them as
    arguments or through getters (`_view` for /diagnostics, `lambda: self.loaded` for the swapper).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(NODE_NAME, **kwargs)
        self._log = self.get_logger()
        self.lifecycle = "unconfigured"
        self.lock = threading.Lock()  # a swap of loaded's parts vs the tick, e-stop and activate
        self.loaded: Loaded | None = None
        self.loop: ControlLoop | None = None
        # CPUs of the real-time threads: the creating thread's, or cpu_affinity's once main() pinned them.
        # The loop thread goes there; configure, which starts it, runs on the model threads' CPUs.
        self.realtime_cpus: set[int] | None = _affinity()
        self._estop_latched = False
        self._carried: tuple[Any, Any] = (None, None)  # what a loop leaves the next one (ControlLoop.carried)
        self._params = NodeParameters(self)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        if hasattr(self, "add_pre_set_parameters_callback"):  # rclpy from Iron on (Humble: rclpy refuses)
            self.add_pre_set_parameters_callback(self._params.coerce)
        misc = MutuallyExclusiveCallbackGroup()
        # Always available, whatever the lifecycle state.
        period = float(self._params.value("diagnostics_period_s"))
        self.diagnostics = NodeDiagnostics(self, period, misc, self._view)
        self.swapper = ModelSwapper(self, self.lock, self.diagnostics, lambda: self.loaded)
        self.create_service(Trigger, "~/emergency_stop", self._on_estop, callback_group=misc)
        self.create_service(Trigger, "~/resume", self._on_resume, callback_group=misc)

    def _view(self) -> NodeView:
        """What /diagnostics reports on, now."""
        return NodeView(self.lifecycle, self.loaded, self.loop, self.swapper)

    def _on_set_parameters(self, params: list[Parameter]) -> SetParametersResult:
        """Reject bad values with a reason; a model_path set on a configured node starts a swap."""
        configured = self.loaded is not None and not self.swapper.reverting
        reason = self._params.check(params, configured)
        path = next((p.value for p in params if p.name == "model_path"), None)
        if not reason and configured and path is not None:
            limit = next((p.value for p in params if p.name == "max_model_mb"), None)
            reason = self.swapper.begin(path, float(limit or self._params.value("max_model_mb")))
        if reason:
            return SetParametersResult(successful=False, reason=reason)
        self._params.accepted(params)
        return SetParametersResult(successful=True)

    # -- lifecycle ------------------------------------------------------------------------------------------
    def on_configure(self, state: State) -> TransitionCallbackReturn:
        with normal_priority(str(self.get_parameter("model_cpu_affinity").value)):
            return self._configure(state)

    def _configure(self, state: State) -> TransitionCallbackReturn:
        try:
            self._params.declare_sources()
            cfg = self._params.config()
            loaded = self.swapper.load(cfg)
            card = loaded.core.card
            carried = carried_command(self._carried[0], loaded.binding, len(card.action_joints))
            if carried is not None and loaded.core.continue_from(carried):
                self._log.info("first commands rate-limited against the last one this node sent")
        except (cf.ConfigError, CardError, ModelError, CoreConfigError, OSError) as exc:
            self._failed(f"configure failed: {exc}")
            return TransitionCallbackReturn.FAILURE
        except Exception as exc:  # anything else: still a clear line instead of rclpy's silent ERROR
            self._failed(f"configure failed: {type(exc).__name__}: {exc}")
            return TransitionCallbackReturn.FAILURE
        self.loaded = loaded
        self.diagnostics.configure(cfg)
        self.diagnostics.clear_error()
        self.loop = ControlLoop(self, self.lock, loaded, self.diagnostics, self.swapper, self._carried)
        self.loop.start()  # takes the sensor queues from now on; publishes only once active
        # Everything loaded so far lives as long as the node: take it out of the cyclic garbage collector's
        # view, so a full collection (~20 ms with rclpy + ONNX Runtime loaded) never pauses a tick.
        gc.collect()
        gc.freeze()
        policy = loaded.policy
        runs = f"on {policy.provider}, K={policy.steps}" if policy is not None else (
            f"computed remotely (chunks on {self.resolve_topic_name(cfg.chunk_topic)})")
        self._log.info(
            f"configured: model '{card.name}' {card.version} {runs}, "
            f"{1.0 / loaded.binding.period_s:.1f} Hz, sources {[s.name for s in cfg.sources]}"
        )
        self.swapper.publish("loaded", dg.OK, f"running '{card.name}' {card.version}")
        self.lifecycle = "inactive"
        return super().on_configure(state)

    def _failed(self, message: str) -> None:
        self.diagnostics.error(message)
        self.swapper.publish("failed", dg.ERROR, message)

    def on_activate(self, state: State) -> TransitionCallbackReturn:
        assert self.loaded is not None and self.loop is not None
        with self.lock:
            self.loaded.core.reset()
            if self._estop_latched:
                self.loaded.core.estop()
        self.loop.activate()
        ret = super().on_activate(state)
        self.lifecycle = "active"
        self._log.info("active: publishing commands")
        return ret

    def on_deactivate(self, state: State) -> TransitionCallbackReturn:
        if self.loop is not None and not self.loop.wind_down(WIND_DOWN_TIMEOUT_S):
            self._log.error(f"deactivate: the velocity/effort command did not reach zero within "
                            f"{WIND_DOWN_TIMEOUT_S} s (no ticks?); commands stopped anyway")  # fmt: skip
        self.lifecycle = "inactive"
        self._log.info("inactive: commands stopped")
        return super().on_deactivate(state)

    def on_cleanup(self, state: State) -> TransitionCallbackReturn:
        self._release()
        self.lifecycle = "unconfigured"
        self.swapper.publish("unloaded", dg.STALE, "no model loaded (cleanup)")
        return super().on_cleanup(state)

    def on_shutdown(self, state: State) -> TransitionCallbackReturn:
        self._release()
        self.lifecycle = "finalized"
        return super().on_shutdown(state)

    def on_error(self, state: State) -> TransitionCallbackReturn:
        self.diagnostics.error(f"error in transition from '{state.label}'; releasing resources")
        self._release()
        self.lifecycle = "unconfigured"
        return TransitionCallbackReturn.SUCCESS

    def _release(self) -> None:
        loop, self.loop = self.loop, None
        if loop is not None:
            loop.close()
            self._carried = loop.carried()
        with self.lock:
            loaded, self.loaded = self.loaded, None
        if loaded is not None:
            loaded.core.close()
        self.swapper.release()

    def autostart(self) -> None:
        """configure + activate when the `autostart` parameter says so (otherwise a manager does it)."""
        if not self._params.value("autostart"):
            self._log.info("autostart is false: waiting in 'unconfigured' for a lifecycle manager")
            return
        if self.trigger_configure() == TransitionCallbackReturn.SUCCESS:
            self.trigger_activate()

    def close(self) -> None:
        """Stop the threads the node owns (control loop, inference, loader) so the process can exit."""
        loop, self.loop = self.loop, None
        if loop is not None:
            loop.close()
        self.swapper.join(timeout=10.0)
        with self.lock:
            loaded, self.loaded = self.loaded, None
        if loaded is not None:
            loaded.core.close()

    # -- services ------------------------------------------------------------------------------------------
    def _on_estop(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        self._estop_latched = True
        with self.lock:
            if self.loaded is not None:
                self.loaded.core.estop()
        self._log.warning("emergency stop: holding the last command until ~/resume")
        response.success, response.message = True, "emergency stop latched: holding the last command"
        return response

    def _on_resume(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        was = self._estop_latched
        self._estop_latched = False
        with self.lock:
            if self.loaded is not None:
                self.loaded.core.resume()
        self._log.info("resume: waiting for a fresh chunk")
        response.success = True
        response.message = "resumed: control restarts from a fresh chunk" if was else "was not stopped"
        return response


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


def _raise_dds_threads(node: ControllerNode, priority: int) -> None:
    """The DDS receive threads to SCHED_FIFO `priority` (dds_priority; 0 = leave them), said on the log."""
    if priority <= 0:
        return
    names, why = dds.raise_receive_threads(priority)
    if why is None:
        node.get_logger().info(f"DDS receive threads: SCHED_FIFO priority {priority} ({', '.join(names)})")
    else:
        node.get_logger().warning(f"DDS receive threads: no real-time priority ({why}); normal priority")


def _affinity() -> set[int] | None:
    try:
        return set(os.sched_getaffinity(0))
    except (OSError, AttributeError):
        return None


def _pin_threads(node: ControllerNode, cpus: str, model_cpus: str) -> None:
    """cpu_affinity: every thread so far (main, DDS) onto `cpus`, said on the log; threads started later
    inherit it, except the model threads (model_cpu_affinity, set around configure and swaps: a list that
    cannot be applied is said here, once)."""
    if model_cpus:
        _, why = process.check_cpus(model_cpus)
        if why is not None:
            node.get_logger().error(
                f"model_cpu_affinity {model_cpus!r} not applied: {why}; model threads on the process' CPUs"
            )
    if not cpus:
        return
    chosen, why = process.pin_process(cpus)
    if why is None:
        node.realtime_cpus = set(chosen)
        node.get_logger().info(f"real-time threads on CPUs {sorted(chosen)} (cpu_affinity)")
    else:
        node.get_logger().error(f"cpu_affinity {cpus!r} not applied: {why}; the threads run on any CPU")


def main(args: list[str] | None = None) -> int:
    """Console script `controller_node`; exits 0 on SIGINT/SIGTERM like ros2/demos.

    The process handles the signals itself instead of rclpy's handler: that one shuts the context down
    from the signal, while the control-loop thread may be inside a wait on it (a crash on exit). Here a
    signal only sets a flag; the main loop sees it within 0.1 s and tears down in order: loop thread,
    inference thread, executor, node, context.
    """
    # Python hands the GIL over every 5 ms by default; a control loop needs it back sooner.
    sys.setswitchinterval(0.0005)
    transport = dds.choose_transport(os.environ)  # before the participant exists
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    stop = process.stop_on_signals()
    node = executor = None
    try:
        node = ControllerNode()
        if transport is not None:
            (node.get_logger().warning if transport.warning else node.get_logger().info)(transport.message)
        cpus, model_cpus = (str(node.get_parameter(n).value) for n in ("cpu_affinity", "model_cpu_affinity"))
        _pin_threads(node, cpus, model_cpus)  # before autostart starts any thread
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
        _raise_dds_threads(node, int(node.get_parameter("dds_priority").value))
        process.spin(executor, stop)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        process.tear_down(node, executor)
    return 0


if __name__ == "__main__":
    sys.exit(main())
