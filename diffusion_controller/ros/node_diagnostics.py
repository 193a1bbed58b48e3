"""What the controller node tells an operator: /diagnostics, and the log lines about its input.

Three statuses, `<node>: control loop | policy | observations`, about once a second. The control loop
reports here what the input did (rejected, implausible, clamped, contradicting publishers; each counted
and logged rate-limited per source and cause); the graph is checked here for publishers DDS never
delivers (another message type on a source topic) and for other nodes commanding the same robot.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rclpy.callback_groups import CallbackGroup
from rclpy.clock import Clock, ClockType
from rclpy.node import Node

from diffusion_controller.core.control_state import ControlState, ControlStats
from diffusion_controller.core.inputs import ImplausibleInputError, InputError
from diffusion_controller.ros import config as cf
from diffusion_controller.ros import diagnostics as dg
from diffusion_controller.ros.intake import Intake
from diffusion_controller.ros.loop import ControlLoop
from diffusion_controller.ros.swapper import Loaded, ModelSwapper

#: An error or a refused message this recent keeps its diagnostics section at WARN or ERROR.
RECENT_S = 10.0
#: A wrong-type publisher not seen for this long is reported again when it reappears.
WRONG_TYPE_FORGET_S = 10.0


@dataclass(frozen=True)
class NodeView:
    """What a report is about, as the node holds it at that moment (the node's `view` getter makes one)."""

    lifecycle: str  # the lifecycle state label
    loaded: Loaded | None  # the model and what configure built for it; None while unconfigured
    loop: ControlLoop | None  # None while unconfigured
    swapper: ModelSwapper


def _node_names(infos: Sequence[Any]) -> set[str]:
    """Fully qualified node names of graph endpoint infos."""
    return {f"{i.node_namespace.rstrip('/')}/{i.node_name}" for i in infos}


class NodeDiagnostics:
    """The node's /diagnostics publisher and the bookkeeping behind it.

    `node` is used for what rclpy does (the publisher and its timer, the log, graph queries, topic names);
    `view` returns what a report is about (the lifecycle label, the loaded model, the loop, the swapper),
    called at each report; everything else it counts itself.
    """

    def __init__(
        self, node: Node, period_s: float, callback_group: CallbackGroup, view: Callable[[], NodeView]
    ) -> None:
        self._node = node
        self._view = view
        self._log = node.get_logger()
        self._faults = dg.RateLimitedLog(self._log.warning)  # rejected input, per source and cause
        self._events = dg.RateLimitedLog(self._log.warning)  # missed steps
        self._warnings = dg.RateLimitedLog(self._log.warning)  # clamped input, contradicting publishers
        self._ages = dg.AgeWatch()  # observation ages at the ticks, per source
        self._late = dg.RateLimitedLog(self._log.warning, interval_s=30.0)  # ages near their timeout
        self._last_error = ""
        self._last_error_time = -math.inf
        self._last_fault_time = -math.inf
        self._last_warning_time = -math.inf
        self._cfg: cf.NodeConfig | None = None
        self._topics: dict[str, str] = {}  # source -> resolved topic
        # source -> count of: rejected messages, refused implausible input, clamped input, contradictions
        self._source_faults: dict[str, int] = {}
        self._implausible: dict[str, int] = {}
        self._clamped: dict[str, int] = {}
        self._contradictions: dict[str, int] = {}
        self._intruders: dict[str, str] = {}  # command topic -> other nodes publishing on it
        self._wrong_types: dict[str, str] = {}  # source topic -> publishers of another type on it
        self._wrong_types_logged: dict[tuple[str, str], float] = {}  # (topic, types) -> last seen (s)
        self._taken_before: dict[str, tuple[float, int]] = {}  # source -> (time, messages) at the last report
        self.chunks_refused = 0  # remote chunks that did not fit the card
        self.remote_model = ""  # what the newest remote chunk said about its model
        self._pub = node.create_publisher(dg.DiagnosticArray, "/diagnostics", 10)
        steady = Clock(clock_type=ClockType.STEADY_TIME)
        self._timer = node.create_timer(period_s, self.publish, callback_group=callback_group, clock=steady)

    def configure(self, cfg: cf.NodeConfig) -> None:
        """The configuration the checks and the topic names in messages refer to."""
        self._cfg = cfg
        self._ages.clear()
        self._topics = {s.name: self._node.resolve_topic_name(s.topic) for s in cfg.sources}

    def topic(self, source: str) -> str:
        return self._topics.get(source, source)

    # -- what happened -------------------------------------------------------------------------------------
    def error(self, message: str) -> None:
        """Log an error and keep it on /diagnostics for RECENT_S."""
        self.record_error(message)
        self._log.error(message)

    def record_error(self, message: str) -> None:
        """Keep an error on /diagnostics that the caller logs itself (rclpy refuses two severities from one
        logging call site)."""
        self._last_error, self._last_error_time = message, time.monotonic()

    def clear_error(self) -> None:
        self._last_error = ""

    def fault(self, source: str, cause: str, message: str) -> None:
        """A message of `source` refused for `cause`."""
        self._source_faults[source] = self._source_faults.get(source, 0) + 1
        self._last_fault_time = time.monotonic()
        self._faults(f"{source}:{cause}", f"[{source}] {message}")

    def rejected(self, source: str, exc: InputError) -> None:
        """A message of `source` the reader refused; implausible values are counted apart, one log line per
        source and feature set (another feature going wrong is news)."""
        if isinstance(exc, ImplausibleInputError):
            self._implausible[source] = self._implausible.get(source, 0) + 1
            self.fault(source, f"{exc.cause}:{','.join(exc.features)}", f"{self.topic(source)}: {exc}")
            return
        self.fault(source, exc.cause, str(exc))

    def note(self, source: str, cause: str, message: str) -> None:
        """A message the reader used but has something to say about (clamped values, stamp 0)."""
        if cause != "clamped":
            self._log.info(message)
            return
        self._clamped[source] = self._clamped.get(source, 0) + 1
        self._last_warning_time = time.monotonic()
        self._warnings(f"{source}:clamped", f"[{source}] {self.topic(source)}: {message}")

    def contradiction(self, source: str, why: str) -> None:
        """Two publishers on one observation topic disagree: say so (which one is right is not knowable)."""
        self._contradictions[source] = self._contradictions.get(source, 0) + 1
        self._last_warning_time = time.monotonic()
        topic = self.topic(source)
        nodes = ""
        with contextlib.suppress(Exception):
            nodes = ", ".join(sorted(_node_names(self._node.get_publishers_info_by_topic(topic))))
        self._warnings(
            f"{source}:contradiction",
            f"[{source}] contradictory publishers on {topic} ({nodes or 'nodes unknown'}): {why}",
        )

    def chunk_refused(self, why: str) -> None:
        """A remote chunk that does not fit the robot: counted, logged once per 10 s, on /diagnostics."""
        self.chunks_refused += 1
        self.record_error(why)
        self._faults("chunk_refused", why)

    def tick_ages(self, ages: dict[str, float], feature_source: dict[str, str]) -> None:
        """The observation ages the watchdog saw at a tick (control loop thread)."""
        self._ages.add(ages, feature_source)

    def _late_sources(self) -> list[str]:
        """One WARN line per source (rate-limited) whose age p95 passed 80 % of its timeout_s; the texts."""
        cfg = self._cfg
        if cfg is None:
            return []
        texts = []
        for src, p95, timeout in self._ages.near_timeout({s.name: s.timeout_s for s in cfg.sources}):
            text = (f"observations.{src}.timeout_s: {self.topic(src)} age p95 {p95:.3f} s is "
                    f"{100.0 * p95 / timeout:.0f} % of its timeout {timeout:.3f} s; past it the node stops "
                    "commanding (raise the timeout or reduce the sensor latency)")  # fmt: skip
            self._late(src, text)
            texts.append(text)
        return texts

    def missed_step(self, reason: str) -> None:
        self._events("missed_step", f"missed step: {reason}")

    # -- the graph -----------------------------------------------------------------------------------------
    def _check_topic_types(self, cfg: cf.NodeConfig | None) -> None:
        """A publisher of another message type on a source topic never reaches this node (DDS does not
        match the two, and this rmw raises no incompatible-type event): find it in the graph, log it once,
        and keep it on /diagnostics while it is there. `cfg`: the running configuration, None when none."""
        node, found, now = self._node, {}, time.monotonic()
        for src in cfg.sources if cfg is not None else ():
            topic = node.resolve_topic_name(src.topic)
            infos = [i for i in node.get_publishers_info_by_topic(topic) if i.topic_type != src.type]
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

    def _check_command_topics(self, cfg: cf.NodeConfig | None) -> None:
        """Another node publishing on this node's command topics means two controllers fight over one
        robot: find it in the graph and keep it on /diagnostics (WARN) while it is there."""
        node, found = self._node, {}
        if cfg is None:
            self._intruders = {}
            return
        own = (node.get_namespace().rstrip("/"), node.get_name())
        for enabled, name in (
            (cfg.commands_enabled, cfg.commands_topic),
            (cfg.trajectory_enabled, cfg.trajectory_topic),
        ):
            if not enabled:
                continue
            topic = node.resolve_topic_name(name)
            others = [
                i
                for i in node.get_publishers_info_by_topic(topic)
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

    # -- /diagnostics --------------------------------------------------------------------------------------
    def publish(self) -> None:
        view = self._view()
        configured = self._cfg if view.loaded is not None else None
        with contextlib.suppress(Exception):  # a graph query must never cost the diagnostics
            self._check_topic_types(configured)
        with contextlib.suppress(Exception):
            self._check_command_topics(configured)
        node = self._node
        sections = self.sections(view)
        stamp = node.get_clock().now().to_msg()
        self._pub.publish(dg.diagnostic_array(node.get_fully_qualified_name(), stamp, sections))

    def sections(self, view: NodeView) -> list[dg.Section]:
        """The three statuses: control loop, policy, observations (only the first while unconfigured)."""
        loaded, loop, lifecycle = view.loaded, view.loop, view.lifecycle
        recent_error = time.monotonic() - self._last_error_time < RECENT_S
        if loaded is None or loop is None:
            level = dg.ERROR if recent_error else dg.STALE
            msg = self._last_error if recent_error else lifecycle
            return [
                dg.Section(
                    "control loop", level, msg, {"lifecycle": lifecycle, "last error": self._last_error}
                )
            ]
        st = loaded.core.stats()
        return [
            self._control_section(lifecycle, loaded, loop, st),
            self._policy_section(loaded, view.swapper, st, recent_error),
            self._observations_section(loaded, loop, st),
        ]

    def _control_section(
        self, lifecycle: str, loaded: Loaded, loop: ControlLoop, st: ControlStats
    ) -> dg.Section:
        """The loop: its state (why not running), rate, jitter and the core's misses."""
        s = loop.stats
        if not loop.active:
            loop_level, loop_msg = dg.STALE, f"{lifecycle}: not publishing"
        elif st.state == ControlState.ESTOP:
            loop_level, loop_msg = dg.ERROR, "emergency stop (call ~/resume)"
        elif st.state == ControlState.SAFE:
            loop_level, loop_msg = dg.ERROR, f"safe state: {st.reason}"
        elif st.state == ControlState.WAITING:
            loop_level, loop_msg = dg.WARN, f"waiting: {st.reason or 'for observations and a first chunk'}"
        else:
            loop_level, loop_msg = dg.OK, "running"
        return dg.Section(
            "control loop",
            loop_level,
            loop_msg,
            {
                "lifecycle": lifecycle,
                "state": st.state.value,
                "reason": st.reason,
                "rate_hz": s.rate_hz,
                "target_rate_hz": 1.0 / loaded.binding.period_s,
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

    def _policy_section(
        self, loaded: Loaded, swapper: ModelSwapper, st: ControlStats, recent_error: bool
    ) -> dg.Section:
        """The model: what runs and how, its timing, chunks, swaps, and the newest error."""
        card, policy = loaded.core.card, loaded.policy
        summary = self._last_error if recent_error else f"{card.name} {card.version}"
        return dg.Section(
            "policy",
            dg.WARN if recent_error else dg.OK,
            summary,
            {
                "model": card.name,
                "version": card.version,
                "path": loaded.path,
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
                "swaps": swapper.swaps,
                "swap_failures": swapper.failures,
                "replaced_models_not_freed": len(swapper.retired),
                "swap_loading": swapper.target if swapper.thread else "",
                "sha256": loaded.sha256,
                "last_error": self._last_error or st.last_error,
                "source": "local" if policy is not None else "remote",
                "remote_model": self.remote_model,
                "chunks_refused": self.chunks_refused,
            },
        )

    def _observations_section(self, loaded: Loaded, loop: ControlLoop, st: ControlStats) -> dg.Section:
        """The input: ages, refusals, rates and losses per source; the most urgent problem as the message."""
        core = loaded.core
        ages = core.ages(self._node.get_clock().now().nanoseconds * 1e-9)
        values: dict[str, object] = {f"age_ms.{k}": 1000.0 * v for k, v in ages.items()}
        values.update({f"rejected.{k}": v for k, v in self._source_faults.items()})
        values.update({f"implausible.{k}": v for k, v in self._implausible.items()})
        values.update({f"clamped.{k}": v for k, v in self._clamped.items()})
        values.update({f"contradictions.{k}": v for k, v in self._contradictions.items()})
        values.update({f"other_publishers.{k}": v for k, v in self._intruders.items()})
        values.update({f"wrong_type.{k}": v for k, v in self._wrong_types.items()})
        values.update(self._input_rates(loop.intake))
        values.update({f"age_p95_ms.{k}": 1000.0 * v for k, v in self._ages.p95().items()})
        late = self._late_sources()
        values["near_timeout"] = "; ".join(late)  # also when a more urgent message is shown
        values["stale_events"] = st.stale_obs_events
        values["rejected_total"] = self._faults.total  # the core's refusals come through fault() too
        timeouts = core.config.obs_timeouts_s
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
        elif late:  # the least urgent WARN: nothing is refused or stale yet
            obs_level, obs_msg = dg.WARN, "; ".join(late)
        else:
            obs_level, obs_msg = dg.OK, "fresh"
        return dg.Section("observations", obs_level, obs_msg, values)

    def _input_rates(self, intake: Intake) -> dict[str, float]:
        """Messages per second each source delivered since the last report, and how many the transport
        or a full queue lost (publisher sequence gaps) so far."""
        t = time.monotonic()
        out: dict[str, float] = {}
        for name, counts in intake.counts().items():
            t0, n0 = self._taken_before.get(name, (t, counts.taken))
            out[f"input_hz.{name}"] = (counts.taken - n0) / (t - t0) if t > t0 else 0.0
            out[f"lost.{name}"] = counts.lost
            self._taken_before[name] = (t, counts.taken)
        return out
