"""The whole control loop without ROS: observations in, one safe command per tick out.

ControlCore ties the observation history, the inference worker, the chunk scheduler, the safety filter and
the watchdog into one state machine (WAITING, RUNNING, SAFE, ESTOP), so the ROS node only converts
messages, parameters and timers. See DESIGN.md "Control core API" for the contract the node relies on.
Its configuration is core/control_config.py; what it reports (states, tick results, statistics) is
core/control_state.py.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from .chunk import Chunk
from .control_config import ControlConfig
from .control_state import ControlState, ControlStats, TickResult, Trajectory
from .external import ExternalChunks, NoWorker
from .inference import InferenceRequest, InferenceWorker, WorkerLike, check_actions
from .latency import LatencyForecaster
from .observation import ObservationError
from .safety import SafetyFilter, Watchdog, WatchdogStatus
from .scheduler import ChunkScheduler

#: observe(now) earlier than the last tick by more than this is a clock jump, not thread interleaving.
OBSERVE_JUMP_TOLERANCE_S = 0.5


def layout_of(card: Any) -> tuple:
    """What must match for observations, requests and chunks to be interchangeable between two cards."""
    features = tuple(
        (f.name, f.kind, int(f.size), tuple(f.joints) if f.joints else None) for f in card.features
    )
    return (
        int(card.history),
        float(card.control_period_s),
        features,
        tuple(card.action_joints),
        int(card.horizon),
        int(card.first_offset),
        getattr(card, "action_kind", "position"),
    )


@dataclass
class _Counters:
    ticks: int = 0
    missed_steps: int = 0
    consecutive_misses: int = 0
    safe_entries: int = 0
    estops: int = 0
    stale_obs_events: int = 0
    rejected_observations: int = 0
    requests: int = 0
    chunks_received: int = 0
    chunks_dropped: int = 0
    inference_errors: int = 0
    last_error: str = ""


# ---------------------------------------------------------------------------------------------------------
# the core


class ControlCore:
    """observe() sensor samples, tick(now) once per control period, publish TickResult.command."""

    def __init__(
        self, card: Any, config: ControlConfig, policy: Any = None, *, worker: WorkerLike | None = None,
        external: bool = False,
    ) -> None:  # fmt: skip
        if policy is not None and layout_of(policy.card) != layout_of(card):
            raise ValueError("policy.card has a different observation/action layout than the card given")
        if external and policy is not None:
            raise ValueError("external: chunks come from offer_chunk(), no policy runs here")
        config.check_card(card, policy)
        self.config = config
        self._lock = threading.Lock()
        self._policy = policy
        # external: chunks computed elsewhere (a policy node) enter through offer_chunk(); no worker runs.
        self._external = ExternalChunks() if external else None
        if worker is None:
            worker = NoWorker() if external else InferenceWorker(policy)
        else:
            worker.set_policy(policy)
        self._worker: WorkerLike = worker
        self._forecaster = LatencyForecaster(config.latency_window)
        self._counters = _Counters()
        self._next_seq = 0
        self._min_seq = 0
        self._last_request_t_obs: float | None = None
        self._last_now: float | None = None
        self._estopped = False
        self._state = ControlState.WAITING
        self._reason = "waiting for observations"
        self._last_drop = ""
        self._miss_cause = ""  # why the newest chunk did not arrive usable (error, rejected, stale)
        self._safe_why = ""  # the standing part of the SAFE reason; the current cause of no chunk follows it
        self._last_request_now = -math.inf
        self._wait_cause = ""  # why the core last restarted, kept in the reason while WAITING
        self._scheduler: ChunkScheduler | None = None
        self._build(card)

    def _build(self, card: Any) -> None:
        """(Re)create everything that depends on the model layout."""
        cfg = self.config
        self.card = card
        self._layout = layout_of(card)
        self._faults: dict[str, tuple[float, str]] = {}  # feature -> (stamp, why) of refused unsafe input
        self._period = float(card.control_period_s)
        self._history = cfg.history_for(card)
        self._watchdog = Watchdog(cfg.timeouts_for(self._history.required))
        self._watchdog.healthy = False  # unhealthy until every required feature has been seen
        newest_seq = self._scheduler.newest_seq if self._scheduler is not None else None
        self._scheduler = ChunkScheduler(
            self._period, cfg.exec_latency_s, cfg.blend, cfg.crossfade_steps, cfg.ensemble_chunks
        )
        self._scheduler.newest_seq = newest_seq
        self._build_safety_from(card, None)

    # -- public API --------------------------------------------------------------------------------------

    @property
    def state(self) -> ControlState:
        return self._state

    @property
    def observation_spacing_s(self) -> float:
        """The history keeps no two samples of a feature closer than this: finer input is wasted work."""
        return self._history.spacing

    def observe(self, feature: str, stamp: float, value: Any, now: float | None = None) -> str | None:
        """Store a sensor sample; None when accepted, else why not (the sample is dropped)."""
        with self._lock:
            if now is not None:
                self._check_clock(float(now), OBSERVE_JUMP_TOLERANCE_S)
            try:
                self._history.push(feature, stamp, value, now)
            except ObservationError as e:
                self._counters.rejected_observations += 1
                return e.reason
            fault = self._faults.get(feature)
            if fault is not None and stamp > fault[0]:
                del self._faults[feature]  # a newer good sample: the input is plausible again
            return None

    def offer_chunk(self, actions: Any, t_obs: float, received: float, source: str = "") -> None:
        """A chunk computed elsewhere (external mode): actions (horizon, action_dim) in card order for the
        observations stamped `t_obs`, received at node time `received`. It enters at the next tick exactly
        where the inference worker's results enter (same checks, scheduler, blending, stale rule, safety).
        Never blocks; a burst keeps only the newest few."""
        if self._external is None:
            raise RuntimeError("offer_chunk: this core runs its own policy (built without external=True)")
        with self._lock:
            self._external.offer(actions, float(t_obs), float(received), source)

    def fault(self, feature: str, stamp: float, reason: str) -> None:
        """An input of `feature` stamped `stamp` was refused as unsafe to act on (a source with the `safe`
        plausibility policy): the safe state from the next tick until a sample newer than it is stored."""
        with self._lock:
            old = self._faults.get(feature)
            if old is None or stamp >= old[0]:
                self._faults[feature] = (float(stamp), reason)

    def tick(self, now: float) -> TickResult:
        """One control step at node time `now`: the command to publish and why. Never blocks."""
        with self._lock:
            return self._tick(float(now))

    def estop(self) -> None:
        """Latch the emergency stop: hold the last command, stop requesting, until resume()."""
        with self._lock:
            if not self._estopped:
                self._counters.estops += 1
            self._estopped = True
            self._safety.estop()
            self._scheduler.clear()
            self._require_fresh_chunk()
            self._state, self._reason = ControlState.ESTOP, "emergency stop"

    def resume(self) -> None:
        """Release the e-stop: WAITING with the history restarted and a fresh chunk required."""
        with self._lock:
            if not self._estopped:
                return
            self._estopped = False
            self._safety.resume()
            self._restart("resumed after emergency stop")

    def continue_from(self, command: np.ndarray) -> bool:
        """Start from a command already sent (action-joint order), by this node before a reconfigure: the
        first commands are rate-limited against it instead of jumping to the measured pose, so the max
        step per tick holds whatever the lifecycle did. False (ignored) once this core has commanded, or
        for a command that is not a finite vector of the action's size."""
        with self._lock:
            if self._safety.last is not None or not self._safety.valid(command):
                return False
            self._safety.reset(np.asarray(command, dtype=float), clamp=False)
            return True

    @property
    def winds_down(self) -> bool:
        """The action kind must be brought to zero when commanding stops (velocity, effort, base velocity)."""
        return self._safety.stops

    def stop_step(self) -> np.ndarray | None:
        """The next command of a wind-down when the node stops commanding (deactivate): one rate-limited step
        toward zero for a velocity or effort action (zero once there), None for a position action (the
        robot's controller holds it). Call once per period until it returns zeros."""
        with self._lock:
            return self._safety.stop() if self._safety.stops else None

    def reset(self) -> None:
        """Drop the running chunk and the history (to the newest observation): WAITING for a fresh chunk."""
        with self._lock:
            self._restart("reset")

    def reset_history(self) -> None:
        """Skill switch (DiffuseLoco): the history restarts from the newest observation; control goes on."""
        with self._lock:
            self._history.reset(keep_newest=True)
            self._last_request_t_obs = None

    def swap_policy(self, policy: Any) -> None:
        """Run `policy` from the next request on. A different layout restarts the core in WAITING."""
        with self._lock:
            card = policy.card
            self.config.check_card(card, policy)
            self._policy = policy
            self._worker.set_policy(policy)
            if layout_of(card) == self._layout:
                last = self._safety.last
                self.card = card  # limits may differ: a new filter, continuing from the last command (never
                # snapped into narrower limits in one tick: it converges at max_step, see SafetyFilter)
                self._build_safety_from(card, last)
                return
            last, joints = self._safety.last, tuple(self.card.action_joints)
            kind = getattr(self.card, "action_kind", "position")
            self._build(card)
            if tuple(card.action_joints) == joints and getattr(card, "action_kind", "position") == kind:
                self._safety.reset(last, clamp=False)
            self._scheduler.clear()
            self._require_fresh_chunk()
            self._wait_cause = "new model layout"
            if not self._estopped:
                self._state, self._reason = ControlState.WAITING, self._wait_cause

    def uses(self, policy: Any) -> bool:
        """`policy` is the running one, or a predict with it is in flight or its result not yet taken: a
        caller that replaced it can free it once this is False (its last use is over)."""
        with self._lock:
            return policy is self._policy or self._worker.uses(policy)

    def ages(self, now: float) -> dict[str, float]:
        """Age (s) of the newest sample of every required feature; inf when never received."""
        with self._lock:
            return self._history.ages(now)

    def stats(self) -> ControlStats:
        with self._lock:
            c, f = self._counters, self._forecaster
            return ControlStats(
                state=self._state,
                reason=self._reason,
                ticks=c.ticks,
                missed_steps=c.missed_steps,
                consecutive_misses=c.consecutive_misses,
                safe_entries=c.safe_entries,
                estops=c.estops,
                stale_obs_events=c.stale_obs_events,
                rejected_observations=c.rejected_observations,
                requests=c.requests,
                chunks_received=c.chunks_received,
                chunks_dropped=c.chunks_dropped,
                inference_errors=c.inference_errors,
                last_error=c.last_error,
                inference_p50_s=f.percentile(50),
                inference_p99_s=f.percentile(99),
                inference_forecast_s=f.inference_forecast(),
                obs_age_forecast_s=f.obs_age_forecast(),
                compute_p50_s=f.compute_percentile(50),
                compute_p99_s=f.compute_percentile(99),
            )

    def close(self) -> None:
        """Stop the inference thread (waits for a predict in progress)."""
        self._worker.stop()

    def __enter__(self) -> ControlCore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------------------

    def _build_safety_from(self, card: Any, last: np.ndarray | None) -> None:
        cfg = self.config
        pose = None if cfg.default_pose is None else np.asarray(cfg.default_pose)
        limits = (card.action_lower, card.action_upper)
        kind = getattr(card, "action_kind", "position")
        self._safety = SafetyFilter(
            *limits, cfg.max_step_per_tick, cfg.safe_mode, pose, kind, damping_gain=cfg.damping_gain
        )
        self._safety.reset(last, clamp=False)
        if self._estopped:
            self._safety.estop()

    def _require_fresh_chunk(self) -> None:
        """Only chunks requested from now on count; anything queued or in flight is dropped."""
        self._min_seq = self._next_seq
        self._worker.cancel_pending()
        self._last_request_t_obs = None
        if self._external is not None:  # a remote chunk must be conditioned on observations from now on
            self._external.require_after(self._history.newest_common_stamp())

    def _restart(self, reason: str, clear_history: bool = False) -> None:
        self._history.reset(keep_newest=not clear_history)
        self._scheduler.clear()
        self._require_fresh_chunk()
        self._counters.consecutive_misses = 0
        self._miss_cause = self._safe_why = ""
        if clear_history:
            self._watchdog.healthy = False
            self._faults.clear()  # stamps of another timeline
            if self._external is not None:
                self._external.new_timeline()
        self._wait_cause = reason
        if not self._estopped:
            self._state, self._reason = ControlState.WAITING, reason

    def _check_clock(self, now: float, tolerance: float = 0.0) -> None:
        """A clock going back (sim reset) means every stamp we hold belongs to another timeline.

        Ticks are sequential, so any step back is a jump, and only ticks advance the reference. observe()
        may read its `now` just before a tick reads a later one; it only detects jumps beyond `tolerance`
        (sparing the samples that arrive between a reset and the next tick).
        """
        last = self._last_now
        if last is not None and now < last - tolerance:
            self._restart(f"clock jumped back by {last - now:.3f} s", clear_history=True)
            if not self._safety.stops:  # a velocity or effort keeps ramping to zero from where it was
                self._safety.reset(None)  # a new episode: latch the measured pose again, not the old command
            self._last_now = None
        if tolerance == 0.0:
            self._last_now = now

    def _enter_safe(self, reason: str) -> None:
        if self._state is not ControlState.SAFE:
            self._counters.safe_entries += 1
        self._state, self._reason = ControlState.SAFE, reason
        self._safe_why = ""

    def _why_no_chunk(self, now: float) -> str:
        """Why no usable action is there: the last chunk's fate, or the inference still running."""
        if self._miss_cause:
            return self._miss_cause
        if self._external is not None:
            return self._external.silence(now)
        if self._worker.busy:
            return f"inference requested {now - self._last_request_now:.3f} s ago has not answered"
        return "no new chunk in time"

    def _tick(self, now: float) -> TickResult:
        if not math.isfinite(now):
            raise ValueError(f"tick: now must be finite, got {now}")
        self._counters.ticks += 1
        self._check_clock(now)
        t_exec = now + self.config.exec_latency_s

        self._collect(now)
        status = self._watchdog.update(
            self._history.ages(now), {f: why for f, (_, why) in self._faults.items()}
        )
        if status.changed:
            self._on_watchdog_change(status)

        result = self._decide(now, t_exec, status)
        if result.command is not None:
            self._history.record_command(now, result.command)
        self._maybe_request(now, status)
        return result

    def _on_watchdog_change(self, status: WatchdogStatus) -> None:
        self._scheduler.clear()
        self._require_fresh_chunk()
        if status.healthy:
            # Fresh again: restart the history at the newest samples so no row mixes the gap in.
            self._history.reset(keep_newest=True)
            self._miss_cause = ""  # belongs to a chunk from before the gap
            if self._state is ControlState.SAFE:  # the stale-observation reason no longer holds
                self._safe_why = "observations fresh again, no usable chunk yet"
        else:
            self._counters.stale_obs_events += 1

    def _decide(self, now: float, t_exec: float, status: WatchdogStatus) -> TickResult:
        c = self._counters
        v = self._damping_velocity(now)  # None unless safe_mode damping has a fresh joint velocity
        if self._estopped:
            self._state, self._reason = ControlState.ESTOP, "emergency stop"
            return self._hold_result(t_exec, self._safety.hold(v))

        if not status.healthy:
            if self._state in (ControlState.RUNNING, ControlState.SAFE):
                self._enter_safe(status.reason())
                return self._hold_result(t_exec, self._safety.safe_command(v))
            self._state, self._reason = ControlState.WAITING, self._waiting_reason(status)
            return self._hold_result(t_exec, self._waiting_command(v))

        timeout = self.config.chunk_timeout_s
        if self._external is not None and timeout is not None and self._state is ControlState.RUNNING:
            silent = now - self._external.last_accepted
            if silent > timeout:  # the link or the policy node is gone: safe now, whatever is left
                self._scheduler.clear()
                self._require_fresh_chunk()
                why = f"no chunk from the policy for {silent:.3f} s (chunk_timeout_s {timeout:g})"
                self._enter_safe(why)
                self._safe_why = "chunk timeout"
                return self._hold_result(t_exec, self._safety.safe_command(v))

        selection = self._scheduler.select(now)
        if selection is not None:
            command, accepted = self._safety.apply(selection.action)
            if accepted:
                self._state, self._reason, self._wait_cause = ControlState.RUNNING, "", ""
                self._safe_why = ""
                c.consecutive_misses = 0
                times = selection.chunk.times()[selection.index :]
                rest = self._safety.preview(selection.chunk.actions[selection.index + 1 :], command)
                return TickResult(
                    ControlState.RUNNING,
                    command,
                    "",
                    t_exec,
                    selection.action_time,
                    selection.index,
                    selection.chunk.seq,
                    False,
                    Trajectory(times, np.vstack([command[None, :], rest])),
                )

        if self._state is ControlState.RUNNING:
            c.missed_steps += 1
            c.consecutive_misses += 1
            n, limit = c.consecutive_misses, self.config.max_consecutive_misses
            # The cause goes into the reason, so the one log line of the state change says it.
            cause = self._why_no_chunk(now)
            if n >= limit:
                self._scheduler.clear()
                self._require_fresh_chunk()
                self._enter_safe(f"{n} consecutive missed steps (limit {limit}): {cause}")
                self._safe_why = f"{n} consecutive missed steps (limit {limit})"
                return self._hold_result(t_exec, self._safety.safe_command(v), missed=True)
            self._reason = f"no valid action: missed step {n} of {limit} ({cause})"
            return self._hold_result(t_exec, self._safety.hold(v), missed=True)
        if self._state is ControlState.SAFE:
            if self._safe_why:  # keep saying why no chunk is usable (the entry reason was logged)
                self._reason = f"{self._safe_why}: {self._why_no_chunk(now)}"
            return self._hold_result(t_exec, self._safety.safe_command(v))
        self._state, self._reason = ControlState.WAITING, self._waiting_reason(status)
        return self._hold_result(t_exec, self._waiting_command(v))

    def _hold_result(self, t_exec: float, command: np.ndarray | None, missed: bool = False) -> TickResult:
        trajectory = None if command is None else Trajectory(np.array([t_exec]), command[None, :].copy())
        return TickResult(self._state, command, self._reason, t_exec, missed=missed, trajectory=trajectory)

    def _damping_velocity(self, now: float) -> np.ndarray | None:
        """safe_mode damping: the newest joint velocities (action order) when no older than their watchdog
        timeout; None otherwise (the effort then ramps to zero)."""
        if self._safety.damping_gain == 0.0:
            return None
        measured = self._history.measured_velocity()
        if measured is None:
            return None
        v, name, stamp = measured
        return v if now - stamp <= self._watchdog.timeouts.get(name, self.config.obs_timeout_s) else None

    def _waiting_command(self, velocity: np.ndarray | None = None) -> np.ndarray | None:
        """Hold the last command; before the first one, latch the measured joint positions once known. A
        velocity or effort ramps to zero (zero from the start), an effort under safe_mode damping toward
        the damping torque of `velocity`."""
        if self._safety.stops:
            return self._safety.stop(velocity)
        if self._safety.last is None:
            measured = self._history.measured_action()
            if measured is not None:
                self._safety.reset(measured)
        return self._safety.hold()

    def _waiting_reason(self, status: WatchdogStatus) -> str:
        if self._policy is None and self._external is None:
            return "waiting for a policy"
        missing = self._history.missing()
        if missing:
            return "waiting for observations: " + ", ".join(missing)
        if not status.healthy:
            return status.reason()
        cause = f" after {self._wait_cause}" if self._wait_cause else ""
        if self._last_drop:
            return f"waiting for the first chunk{cause} (the last one was dropped: {self._last_drop})"
        return f"waiting for the first chunk{cause}"

    def _collect(self, now: float) -> None:
        """Take a finished inference result, if any, and offer it to the scheduler."""
        if self._external is not None:
            for actions, t_obs, received, source in self._external.take():
                self._collect_external(now, actions, t_obs, received, source)
            return
        result = self._worker.poll()
        if result is None:
            return
        c = self._counters
        request = result.request
        if result.error is not None:
            c.inference_errors += 1
            c.last_error = result.error
            self._miss_cause = f"inference failed: {result.error}"
            return
        self._forecaster.record_inference(now - request.t_request)
        self._forecaster.record_compute(result.compute_s)
        c.chunks_received += 1
        if request.seq < self._min_seq:
            c.chunks_dropped += 1  # requested before a reset, a fault or a layout change
            return
        if result.policy is not None and layout_of(result.policy.card) != self._layout:
            c.chunks_dropped += 1
            return
        actions, error = check_actions(result.actions, self.card)
        if actions is None:
            c.chunks_dropped += 1
            c.last_error = error or ""
            self._miss_cause = f"chunk rejected: {error}"
            return
        offset = int(self.card.first_offset)
        chunk = Chunk(actions, request.t_obs, self._period, offset, request.seq, request.t_request, now)
        why = self._scheduler.offer(chunk, now)
        if why is not None:
            c.chunks_dropped += 1
        self._last_drop = why or ""
        self._miss_cause = f"chunk dropped: {why}" if why else ""

    def _collect_external(self, now: float, actions: Any, t_obs: float, received: float, source: str) -> None:
        """One chunk from elsewhere into the scheduler, as _collect does with the worker's results."""
        c, ext = self._counters, self._external
        assert ext is not None
        c.chunks_received += 1
        self._forecaster.record_inference(max(0.0, received - t_obs))  # observation -> arrival here
        why = ext.refusal(t_obs, now + self.config.future_tolerance_s)
        if why is None:
            checked, error = check_actions(actions, self.card)
            why = None if checked is not None else f"chunk rejected: {error}"
        if why is not None:
            c.chunks_dropped += 1
            self._miss_cause = why
            self._last_drop = why
            return
        seq = self._next_seq
        self._next_seq += 1
        offset = int(self.card.first_offset)
        chunk = Chunk(checked, t_obs, self._period, offset, seq, received, now)
        dropped = self._scheduler.offer(chunk, now)
        ext.accepted(t_obs, received, usable=dropped is None)
        if dropped is not None:
            c.chunks_dropped += 1
        self._last_drop = dropped or ""
        self._miss_cause = f"chunk dropped: {dropped}" if dropped else ""

    def _maybe_request(self, now: float, status: WatchdogStatus) -> None:
        """Hand the worker a new request when it is free and the schedule calls for one."""
        cfg = self.config
        if self._estopped or not status.healthy or self._policy is None or self._worker.busy:
            return
        t_obs = self._history.newest_common_stamp() if self._history.required else now
        if t_obs is None or (self._last_request_t_obs is not None and t_obs <= self._last_request_t_obs):
            return  # nothing new to condition on
        # A result is picked up at a tick after this one at the earliest.
        delay = max(self._forecaster.inference_forecast(), self._period)
        if self._state is ControlState.RUNNING and cfg.execute_steps > 1:
            handover = self._scheduler.handover_time(now, cfg.execute_steps)
            if now + delay + 0.5 * self._period < handover - cfg.exec_latency_s:
                return  # Diffusion Policy: the running chunk still covers the next chunk's arrival
        stamp = t_obs if cfg.compensate_delay else now
        prefix = mask = None
        if cfg.blend == "inpaint":
            frozen = self._scheduler.inpaint_prefix(stamp, (now - stamp) + delay + cfg.exec_latency_s)
            if frozen is not None:
                prefix, mask = frozen
        seq = self._next_seq
        self._next_seq += 1
        seed = None if cfg.seed is None else (cfg.seed + seq) % 2**32
        obs = self._history.sample(t_obs)
        self._worker.submit(InferenceRequest(seq, stamp, now, obs, prefix, mask, seed))
        self._forecaster.record_obs_age(now - t_obs)
        self._last_request_t_obs = t_obs
        self._last_request_now = now
        self._counters.requests += 1
