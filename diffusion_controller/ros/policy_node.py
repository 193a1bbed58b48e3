"""The policy node: the model on one computer (a GPU workstation, an edge server), the fixed-rate control
loop on the robot (`controller_node` with `policy.source: remote`), chunks between them over DDS.

It reads the same parameters as the controller (the one specification in config.py: model, provider,
steps, seed, observation sources) and takes the observations through the same intake, readers and
observation history, so a chunk computed here is the chunk the controller would compute locally. Each
chunk goes out as a JointTrajectory stamped with the observations' time (ros/chunks.py); nothing here
writes a stamp from its own clock, so the two computers need no synchronized clocks. previous_action comes
from the controller's stamped commands (`policy.executed_topic`).

Several robots: `policy.robots: [robot1, robot2, ...]` serves one controller per namespace (its sensors,
commands and chunk topic under that namespace). Every period/4 the node takes the sensor queues; a robot
whose observations advanced (at most once a period) is due. Each robot has a worker thread of its own, or
with `policy.batch: true` the due robots run together in one pass of one worker: with a model exported
with `export_policy --batch N` (card graph.batch N) up to N due robots go into ONE run of the graph
(Policy.predict_batch; each chunk still stamped with its own robot's observation time, published to its
own namespace, and drawn from the same per-robot seed as a single run); with a batch-1 model a pass is a
loop of single runs, which bench/remote_policy.py measured to save no CPU and to make the later robots of
a pass wait for the earlier ones, hence the default.

Model swaps: setting `model_path` loads and warms up the new model in a loader thread and swaps it in
between two passes; a model with another observation or action layout is refused; a failure keeps the old
model and sets model_path back. ~/model (latched) says what runs, with `ros2 topic echo`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import threading
import time
from collections import deque
from typing import Any

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticStatus, KeyValue
from rcl_interfaces.msg import SetParametersResult
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.expand_topic_name import expand_topic_name
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.signals import SignalHandlerOptions

from diffusion_controller.core import inputs
from diffusion_controller.core.card import CardError, ModelCard
from diffusion_controller.core.card_source import card_of_model
from diffusion_controller.core.controller import layout_of
from diffusion_controller.core.external import model_id_text
from diffusion_controller.core.inference import InferenceRequest, InferenceResult, compute, compute_batch
from diffusion_controller.core.observation import ObservationError
from diffusion_controller.core.plausibility import Plausibility, PlausibilityLimits
from diffusion_controller.core.runtime import ModelError, Policy
from diffusion_controller.ros import chunks as ch
from diffusion_controller.ros import config as cf
from diffusion_controller.ros import conversions as cv
from diffusion_controller.ros import dds, process
from diffusion_controller.ros import diagnostics as dg
from diffusion_controller.ros.binding import control_config, validate_against_card
from diffusion_controller.ros.intake import Intake
from diffusion_controller.ros.loop import normal_priority
from diffusion_controller.ros.params import NodeParameters
from diffusion_controller.ros.swapper import MODEL_QOS, ModelPathRevert, check_model_file

NODE_NAME = "diffusion_policy"
#: Sensor queues are taken this many times per control period: a chunk starts at most period/4 after its
#: observations arrived (the controller's own tick adds up to one more period).
CHECKS_PER_PERIOD = 4
#: Stamps going back this many messages in a row on one robot: its clock went back (a new timeline).
BACKWARDS_LIMIT = 20
#: A robot is due at most once per PACE control periods (< 1: a check landing a little early still counts).
PACE = 0.9
#: With `policy.batch`, a robot joins the run of others that are due once this much of its period has
#: passed since its last request: robots whose controllers started at other phases fall into step after
#: one run instead of staying a check apart (and running one by one) for good.
JOIN_PACE = 0.5
#: Observation stamps further apart than this between two requests: the history restarts at the newest.
GAP_S = 0.5


class Robot:
    """One controller served: its sensor intake and readers, observation history, stamped commands
    (previous_action) and chunk publisher, all under its namespace."""

    def __init__(self, node: PolicyNode, index: int, namespace: str, cfg: cf.NodeConfig) -> None:
        self.name = namespace.strip("/") or node.get_namespace()
        card, binding = node.card, node.binding

        def topic(name: str) -> str:
            if not namespace:
                return node.resolve_topic_name(name)
            return expand_topic_name(name, node.get_name(), "/" + namespace.strip("/"))

        sources = [dataclasses.replace(s, topic=topic(s.topic)) for s in cfg.sources]
        self.intake = Intake(node, sources, cv.MESSAGE_CLASSES, binding.period_s, role=f"intake{index}")
        plausible = Plausibility(
            card, PlausibilityLimits(cfg.joint_margin, cfg.command_sigmas, cfg.sensor_sigmas)
        )
        # No future-stamp check: this computer's clock need not agree with the robot's.
        self.readers = {
            s.name: inputs.SourceReader(
                inputs.SourceDecoder(s, card.features, binding.rename), cf.NEVER_S, plausibility=plausible,
                policy=inputs.implausible_policy(s, card),
            )
            for s in cfg.sources
        }  # fmt: skip
        self.history = control_config(cfg, binding, card).history_for(card)
        self.executed = ch.RawQueue(
            self.intake.node, ch.JointState, topic(cfg.executed_topic), ch.EXECUTED_QOS
        )
        self.chunk_topic = topic(cfg.chunk_topic)
        self.pub = node.create_publisher(cv.JointTrajectory, self.chunk_topic, ch.CHUNK_QOS)
        self.last_t_obs: float | None = None
        self.last_request = -math.inf  # node clock; paces requests to one per control period
        self.period = binding.period_s
        self.seq = 0
        self.backwards = 0
        self.rejected = 0
        self.chunks = 0
        self.errors = 0
        self.last_error = ""

    def take(self, now: float, joints: tuple[str, ...]) -> None:
        """Everything the sensors and the controller sent since the last check into the history."""

        def accept(_source: str, stamp: float, values: dict[str, np.ndarray]) -> None:
            self.backwards = 0
            for feature, value in values.items():
                try:
                    self.history.push(feature, stamp, value)
                except ObservationError:
                    self.rejected += 1

        def reject(_source: str, exc: inputs.InputError) -> None:
            self.rejected += 1
            if exc.cause == "stamp_backwards":
                self.backwards += 1

        self.intake.drain(self.readers, now, self.history.spacing, accept, reject)
        for msg, _received in self.executed.take(now):
            if msg is None:
                continue
            try:
                stamp, command = ch.read_executed(msg, joints)
            except ValueError:
                self.rejected += 1
                continue
            self.history.record_command(stamp, command)
        if self.backwards > BACKWARDS_LIMIT:  # the robot's clock went back (a simulation reset)
            self.new_timeline()

    def new_timeline(self) -> None:
        self.history.reset()
        self.last_request = -math.inf
        for reader in self.readers.values():
            reader.last_stamp = None
        self.last_t_obs = None
        self.backwards = 0

    def request(self, now: float, seed: int | None, pace: float = PACE) -> InferenceRequest | None:
        """A request when the observations advanced since the last one, at most one per `pace` control
        periods (as the controller's tick asks: faster sensors would only spend the model on near-equal
        chunks), else None. The node's clock only paces; no stamp comes from it."""
        if now < self.last_request:
            self.last_request = -math.inf  # the node's clock went back (sim time reset)
        if now - self.last_request < pace * self.period:
            return None
        t_obs = self.history.newest_common_stamp()
        if t_obs is None or (self.last_t_obs is not None and t_obs <= self.last_t_obs):
            return None
        if self.last_t_obs is not None and t_obs - self.last_t_obs > GAP_S:
            self.history.reset(keep_newest=True)  # no row may mix the gap in (as the controller does)
        try:
            obs = self.history.sample(t_obs)
        except ObservationError:
            return None
        self.last_t_obs = t_obs
        self.last_request = now
        self.seq += 1
        request_seed = None if seed is None else (seed + self.seq) % 2**32
        return InferenceRequest(self.seq, t_obs, now, obs, None, None, request_seed)

    def close(self, node: Node) -> None:
        self.executed.close()
        self.intake.close()
        node.destroy_publisher(self.pub)


def pass_plan(batch_param: bool, graph_batch: int, robots: int) -> str:
    """How the due robots' requests run, in words (the start and swap log lines)."""
    n = graph_batch
    if not batch_param:
        return "a worker per robot" + (f" (the batch-{n} graph computes {n} rows a run)" if n > 1 else "")
    if n > 1:
        runs = f"; {math.ceil(robots / n)} runs when all {robots} are due" if robots > n else ""
        return f"one run of a batch-{n} graph for up to {n} robots{runs}"
    return "a loop of single runs: the model has batch 1"


class Worker:
    """A thread that runs one pass at a time: the requests of the robots due together on the current
    policy, in groups of its graph's batch size (one run per group; batch 1: one after the other),
    publishing each group's chunks as soon as they are computed."""

    def __init__(self, node: PolicyNode, name: str) -> None:
        self._node = node
        self._cond = threading.Condition()
        self._batch: list[tuple[Robot, InferenceRequest]] | None = None
        self._busy = False
        self._stop = False
        self.policy: Any = node.policy
        self.passes = 0
        self.runs = 0  # model runs (a group of due robots on a batch graph is one)
        self.pass_times: deque[float] = deque(maxlen=1000)  # seconds per pass
        self.compute_times: deque[float] = deque(maxlen=1000)  # seconds per model run
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        with self._cond:
            return self._busy or self._batch is not None

    def submit(self, batch: list[tuple[Robot, InferenceRequest]]) -> None:
        with self._cond:
            self._batch = batch
            self._cond.notify()

    def set_policy(self, policy: Any) -> None:
        """Run `policy` from the next pass on (a pass in progress finishes with the old one)."""
        with self._cond:
            self.policy = policy

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=5.0)

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._batch is None and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                batch, self._batch = self._batch, None
                self._busy = True
                policy = self.policy
            t0 = time.perf_counter()
            size = max(1, int(getattr(policy, "batch", 1)))
            for i in range(0, len(batch), size):
                group = batch[i : i + size]
                requests = [request for _, request in group]
                one = len(group) == 1
                results = [compute(policy, requests[0])] if one else compute_batch(policy, requests)
                self.runs += 1
                self.compute_times.append(results[0].compute_s)
                for (robot, _), result in zip(group, results, strict=True):
                    self._node.publish(robot, result, policy)
            self.pass_times.append(time.perf_counter() - t0)
            self.passes += 1
            with self._cond:
                self._busy = False


class PolicyNode(Node):
    """Runs the policy for one or several remote controllers; see the module docstring."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(NODE_NAME, **kwargs)
        self._log = self.get_logger()
        self._params = NodeParameters(self)
        cfg = self._params.config()
        self.cfg = cfg
        check_model_file(cfg.model_path, cfg.max_model_mb)
        self.card: ModelCard = card_of_model(cfg.model_path)
        self.binding = validate_against_card(cfg, self.card)
        with normal_priority(cfg.model_cpu_affinity):
            self.policy = self._load(cfg.model_path)
        self.path = cfg.model_path
        self.model_id = model_id_text(self.card.name, self.card.version, self.policy.steps)
        self._lock = threading.Lock()
        self.swaps = self.swap_failures = 0
        self._loader: threading.Thread | None = None
        self._revert = ModelPathRevert(self)
        self._model_pub = self.create_publisher(DiagnosticStatus, "~/model", MODEL_QOS)
        self._diag_pub = self.create_publisher(dg.DiagnosticArray, "/diagnostics", 10)
        self.robots = [Robot(self, i, ns, cfg) for i, ns in enumerate(cfg.robots or ("",))]
        with normal_priority(cfg.model_cpu_affinity):
            if cfg.batch:
                shared = Worker(self, "policy_pass")
                self.workers = {r.name: shared for r in self.robots}
            else:
                self.workers = {r.name: Worker(self, f"policy_{i}") for i, r in enumerate(self.robots)}
        self._errors = dg.RateLimitedLog(self._log.warning)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        period = self.binding.period_s
        self.create_timer(period / CHECKS_PER_PERIOD, self._check)
        self.create_timer(float(cfg.diagnostics_period_s), self._publish_diagnostics)
        passes = pass_plan(cfg.batch, getattr(self.policy, "batch", 1), len(self.robots))
        self._publish_model("loaded", dg.OK, f"running '{self.card.name}' {self.card.version}")
        self._log.info(
            f"serving {[r.chunk_topic for r in self.robots]} with '{self.card.name}' {self.card.version} "
            f"on {self.policy.provider}, K={self.policy.steps} ({passes})"
        )

    def _load(self, path: str, warmup: int = 3) -> Any:
        cfg = self.cfg
        return Policy.load(
            path, provider=cfg.provider, threads=cfg.threads, steps=cfg.steps or None, warmup=warmup,
            log=lambda m: self._log.info(str(m)), precision=cfg.precision, cuda_graph=cfg.cuda_graph,
            device_id=cfg.device_id, engine_cache_dir=cfg.engine_cache_dir,
        )  # fmt: skip

    def now(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    # -- every period/4 --
    def _check(self) -> None:
        """Take every robot's queues; hand the due robots to their worker when it is free."""
        now = self.now()
        joints = tuple(self.card.action_joints)
        seed = None if self.cfg.seed < 0 else self.cfg.seed
        due: dict[int, list[tuple[Robot, InferenceRequest]]] = {}
        waiting = []
        for robot in self.robots:
            robot.take(now, joints)
            worker = self.workers[robot.name]
            if worker.busy:
                continue  # latest wins: the next check samples the newest observations
            request = robot.request(now, seed)
            if request is not None:
                due.setdefault(id(worker), []).append((robot, request))
            else:
                waiting.append(robot)
        if self.cfg.batch and due:  # one worker: the others join the run if they are nearly due
            for robot in waiting:
                request = robot.request(now, seed, JOIN_PACE)
                if request is not None:
                    due[id(self.workers[robot.name])].append((robot, request))
        for robot_requests in due.values():
            self.workers[robot_requests[0][0].name].submit(robot_requests)

    def publish(self, robot: Robot, result: InferenceResult, policy: Any) -> None:
        """Worker thread: one robot's chunk out, stamped with its observations' time."""
        if result.error is not None or result.actions is None:
            robot.errors += 1
            robot.last_error = result.error or "no actions"
            self._errors(f"{robot.name}:inference", f"[{robot.name}] inference failed: {robot.last_error}")
            return
        card = policy.card
        msg = ch.chunk_msg(card.action_joints, result.actions, result.request.t_obs,
                           float(card.control_period_s), int(card.first_offset), self.model_id,
                           card.action_kind)  # fmt: skip
        robot.pub.publish(msg)
        robot.chunks += 1

    # -- model swaps --
    def _on_set_parameters(self, params: list[Parameter]) -> SetParametersResult:
        reason = self._params.check(params, configured=not self._revert.active)
        if reason and "read on configure" in reason:
            reason = reason.split(":")[0] + " is read at startup: restart the policy node to change it"
        path = next((p.value for p in params if p.name == "model_path"), None)
        if not reason and path is not None and not self._revert.active:
            if self._loader is not None:
                reason = "a model swap is still loading; try again when it is done"
            else:
                try:
                    check_model_file(path, self.cfg.max_model_mb)
                except (cf.ConfigError, OSError) as exc:
                    reason = f"model_path rejected, the old model keeps running: {exc}"
            if not reason:
                self._loader = threading.Thread(
                    target=self._swap, args=(path,), name="model_swap", daemon=True
                )
                self._loader.start()
        if reason:
            return SetParametersResult(successful=False, reason=reason)
        self._params.accepted(params)
        return SetParametersResult(successful=True)

    def _swap(self, path: str) -> None:
        old = self.path
        try:
            card = card_of_model(path)
            validate_against_card(self.cfg, card)
            if layout_of(card) != layout_of(self.card):
                raise cf.ConfigError(
                    "its observation or action layout differs from the running model's; "
                    "restart the policy node (and reconfigure the controllers) to change it"
                )
            policy = self._load(path)
            for worker in set(self.workers.values()):
                worker.set_policy(policy)
            self.policy, self.card, self.path = policy, card, path
            self.model_id = model_id_text(card.name, card.version, policy.steps)
            self.swaps += 1
            plan = pass_plan(self.cfg.batch, getattr(policy, "batch", 1), len(self.robots))
            self._log.info(f"model swap: now running '{card.name}' {card.version} on {policy.provider} "
                           f"({plan})")  # fmt: skip
            self._publish_model("swapped", dg.OK, f"running '{card.name}' {card.version}")
        except Exception as exc:  # any failure: the old model keeps running
            self._revert(path, old)
            self.swap_failures += 1
            why = f"model swap to '{path}' failed, the old model keeps running: {exc}"
            self._log.error(why)
            self._publish_model("failed", dg.ERROR, why, attempted=path)
        finally:
            self._loader = None

    # -- what runs --
    def _publish_model(self, event: str, level: int, message: str, attempted: str = "") -> None:
        values = {
            "event": event, "path": self.path, "name": self.card.name, "version": self.card.version,
            "steps": str(self.policy.steps), "provider": str(self.policy.provider), "model_id": self.model_id,
            "robots": ",".join(r.name for r in self.robots), "swaps": str(self.swaps),
            "swap_failures": str(self.swap_failures), "attempted_path": attempted,
        }  # fmt: skip
        msg = DiagnosticStatus(level=bytes([level]), name=f"{self.get_fully_qualified_name()}: model",
                               message=message[:1000])  # fmt: skip
        msg.values = [KeyValue(key=k, value=v) for k, v in values.items()]
        self._model_pub.publish(msg)

    def _publish_diagnostics(self) -> None:
        workers = set(self.workers.values())
        compute_ms = [1000 * t for w in workers for t in w.compute_times]
        pass_ms = [1000 * t for w in workers for t in w.pass_times]
        values: dict[str, object] = {
            "model_id": self.model_id, "provider": self.policy.provider,
            "passes": sum(w.passes for w in workers), "model_runs": sum(w.runs for w in workers),
            "graph_batch": int(getattr(self.policy, "batch", 1)),
            "pass_p50_ms": float(np.percentile(pass_ms, 50)) if pass_ms else float("nan"),
            "pass_p99_ms": float(np.percentile(pass_ms, 99)) if pass_ms else float("nan"),
            "run_p50_ms": float(np.percentile(compute_ms, 50)) if compute_ms else float("nan"),
        }  # fmt: skip
        errors = []
        for r in self.robots:
            values[f"chunks.{r.name}"] = r.chunks
            values[f"errors.{r.name}"] = r.errors
            values[f"rejected.{r.name}"] = r.rejected
            if r.last_error:
                errors.append(f"{r.name}: {r.last_error}")
        level, message = (dg.WARN, "; ".join(errors)) if errors else (dg.OK, f"serving {len(self.robots)}")
        stamp = self.get_clock().now().to_msg()
        section = dg.Section("policy", level, message, values)
        self._diag_pub.publish(dg.diagnostic_array(self.get_fully_qualified_name(), stamp, [section]))

    def close(self) -> None:
        for worker in set(self.workers.values()):
            worker.stop()
        loader = self._loader
        if loader is not None:
            loader.join(timeout=10.0)
        for r in self.robots:
            r.close(self)


def main(args: list[str] | None = None) -> int:
    """Console script `policy_node`; exits 0 on SIGINT/SIGTERM (teardown as controller_node's main)."""
    transport = dds.choose_transport(os.environ)
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    stop = process.stop_on_signals()
    node = executor = None
    code = 0
    try:
        try:
            node = PolicyNode()
        except (cf.ConfigError, CardError, ModelError, OSError) as exc:
            rclpy.logging.get_logger(NODE_NAME).fatal(f"cannot start: {exc}")
            code = 1
            return code
        if transport is not None:
            (node.get_logger().warning if transport.warning else node.get_logger().info)(transport.message)
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        process.spin(executor, stop)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        process.tear_down(node, executor)
    return code


if __name__ == "__main__":
    sys.exit(main())
