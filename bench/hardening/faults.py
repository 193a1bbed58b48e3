"""Fault scenarios: streams that stop, model swaps that cannot work, slow inference, signals, clock jumps.

The node goes to the safe state and comes back by itself, keeps the old model when a swap cannot work,
exits 0 on SIGINT/SIGTERM even mid-inference, and starts a new episode when the sim clock jumps back.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable

import numpy as np
from ros_helpers import wait_until

from diffusion_controller.ros.outputs import INDEX, MISSED, OBS, SEQ, STATE, TICK
from hardening.bad_input import MAX_LOG_LINES
from hardening.harness import Harness, Result, Watch, check_running, scenario
from hardening.messages import STREAMS
from hardening.node import RUNNING, SAFE, TIMEOUTS, NodeRun
from hardening.sensors import Sensors


def _stream_stop(streams: tuple[str, ...], features: tuple[str, ...]) -> Callable:
    """Streams stop for 1.5 s: SAFE within the timeout (+ one tick) of the last stamp, commands held
    (safe_mode hold), /diagnostics and one log line name the stale features; RUNNING again after."""

    def body(h: Harness, r: Result) -> None:
        node = h.main
        r.check(node.wait_state(RUNNING, 10.0), f"not RUNNING before the scenario (state {node.state()})")
        w = Watch(node)
        t_stop_wall = time.time()  # the node's clock is ROS wall time: comparable with the stamps
        h.sensors.pause(*streams)
        try:
            safe = node.wait_state(SAFE, 3.0)
            time.sleep(1.0)
            loop = node.diag("control loop", after=time.monotonic())
        finally:
            h.sensors.resume(*streams)
        t_back = time.monotonic()
        recovered = node.wait_state(RUNNING, 5.0)
        r.figures["recovery_s"] = time.monotonic() - t_back
        a = w.verdict(r)
        rows = node.timing(w.t0)
        safe_rows = rows[rows[:, STATE] == SAFE]
        r.check(safe and len(safe_rows) > 0, f"never SAFE after {streams} stopped: {dict(a.states)}")
        if len(safe_rows):
            # Stamps are the publish time; the last one was at most one publish period before the pause.
            timeout = min(TIMEOUTS[s] for s in streams if s in TIMEOUTS)
            to_safe = safe_rows[0, TICK] - t_stop_wall
            r.figures["time_to_safe_s"] = to_safe
            r.check(
                to_safe <= timeout + 2 * node.period + 0.01,
                f"SAFE {to_safe:.3f} s after the streams stopped (timeout {timeout} s)",
            )
        text = f"{loop.get('_message', '')} {loop.get('reason', '')}"
        r.check(
            all(f in text for f in features) and loop.get("_level") == 2,
            f"/diagnostics control loop does not name {features}: {loop}",
        )
        r.check(w.lines("-> safe") == 1, f"{w.lines('-> safe')} '-> safe' log lines (want 1)")
        r.check(recovered, f"no recovery within 5 s (state {node.state()})")
        # safe_mode hold: every command published while SAFE equals the first one of that period.
        safe_cmds = _commands_in_state(node, w.t0, SAFE)
        r.check(
            len(safe_cmds) > 10 and np.ptp(safe_cmds, axis=0).max() < 1e-9,
            f"commands moved while SAFE (hold): {len(safe_cmds)} commands",
        )

    return body


def _commands_in_state(node: NodeRun, t0: float, state: float) -> np.ndarray:
    """Commands published at ticks in `state`, paired by order (one timing row per tick, command first)."""
    timing = node.received(node.timing_topic)
    cmds = node.received(node.cmd_topic)
    spans, start = [], None
    for t, m in timing:
        if t < t0:
            continue
        if m.data[STATE] == state and start is None:
            start = t
        elif m.data[STATE] != state and start is not None:
            spans.append((start, t))
            start = None
    if start is not None:
        spans.append((start, math.inf))
    # Receipt times of the two topics differ by a little: keep commands well inside each span.
    out = [m.data for t, m in cmds for a, b in spans if a + 0.05 <= t <= b - 0.05]
    return np.array(out, dtype=float).reshape(-1, 8)


scenario("faults", "imu_stops", "the IMU stream stops for 1.5 s, then comes back")(
    _stream_stop(("imu",), ("projected_gravity", "base_angular_velocity"))
)
scenario("faults", "all_streams_stop", "every observation stream stops for 1.5 s, then comes back")(
    _stream_stop(STREAMS, ("joint_position", "projected_gravity", "base_linear_velocity"))
)


def _swap_rejected(model_key: str | None, fragment: str, at_load: bool) -> Callable:
    """A model swap that cannot work: rejected (synchronously, or by the loader when only loading shows it),
    with the reason in the parameter result or the log and /diagnostics, and the old model keeps running."""

    def body(h: Harness, r: Result) -> None:
        node = h.main
        r.check(node.wait_state(RUNNING, 10.0), f"not RUNNING before the scenario (state {node.state()})")
        before = node.diag("policy", after=-math.inf)  # at least one report, also right after the start
        path = str(h.models.root / "no_such_model.onnx") if model_key is None else str(h.models[model_key])
        w = Watch(node)
        t_call = time.monotonic()
        res = node.set_params(model_path=path)[0]
        r.figures["param_call_s"] = time.monotonic() - t_call
        if at_load:
            # Only the card is read on the executor: the call answers at once, the loader says the rest.
            r.check(res.successful, f"swap refused before loading: {res.reason}")
            r.check(wait_until(lambda: w.lines("model swap to") > 0, 20.0), "no log line for the failed swap")
            failed = wait_until(
                lambda: any(
                    e.get("event") == "failed" and e.get("attempted_path") == path
                    for e in node.model_events(w.t0)
                ),
                5.0,
            )
            r.check(failed, f"~/model never said the swap failed: {node.model_events(w.t0)}")
        else:
            r.check(not res.successful, "a bad model_path was accepted")
            r.check("rejected" in res.reason, f"reason: {res.reason}")
        time.sleep(1.0)
        pol = node.diag("policy", after=time.monotonic())
        a = w.verdict(r)
        text = (res.reason or "") + node.log()[w.log_offset :] + str(pol.get("last_error", ""))
        r.check(fragment in text, f"{fragment!r} not in the reason/log/diagnostics: {res.reason}")
        said = res.reason if not at_load else node.log()[w.log_offset :]
        r.check("the old model keeps running" in said, f"does not say the old model keeps running: {said}")
        r.check(pol.get("model") == before.get("model") == "tiny_a", f"model now {pol.get('model')}")
        r.check(pol.get("path") == str(h.models["a"]), f"diagnostics path {pol.get('path')}")
        param = node.get_param("model_path")
        r.check(
            param == str(h.models["a"]), f"model_path parameter {param!r} does not name the running model"
        )
        check_running(r, a)
        r.check(w.lines("model swap to") <= 1, "more than one log line for one failed swap")
        r.check(
            int(pol.get("swap_failures", 0)) > int(before.get("swap_failures", 0)),
            f"swap_failures did not count it: {pol.get('swap_failures')}",
        )
        if pol.get("model") != "tiny_a":  # the swap went through: put the main node back for what follows
            node.set_params(model_path=str(h.models["a"]))
            wait_until(lambda: node.diag("policy", after=time.monotonic()).get("model") == "tiny_a", 20.0)
            node.wait_state(RUNNING, 10.0)

    return body


#: Model swaps that cannot work: (name, what is set, model, what the reason says, found by the loader).
#: The card is read and checked in the parameter call (issue 27): only what loading shows is the loader's.
SWAP_FAULTS = [
    ("swap_missing_file", "model_path set to a file that does not exist",
     None, "does not exist", False),
    ("swap_directory", "model_path set to a directory",
     "directory", "is a directory", False),
    ("swap_too_large", "model_path set to a file larger than max_model_mb",
     "too_large", "more than max_model_mb", False),
    ("swap_zeros_file", "model_path set to 256 MiB of zeros (under max_model_mb)",
     "zeros", "not an ONNX model", False),
    ("swap_truncated_file", "model_path set to an ONNX file cut in half",
     "truncated", "truncated", False),
    ("swap_card_mismatch", "a valid ONNX whose card says 100 Hz (the node runs 50 Hz)",
     "period", "control period", False),
    ("swap_reorders_joints", "a model whose action joints come in another order",
     "reordered", "change the published joints", False),
    ("swap_card_graph_mismatch", "a card that fits the config but not its own graph",
     "graph_mismatch", "does not match its card", True),
    ("swap_nan_model", "a valid model and card whose every output is NaN",
     "nan", "non-finite", True),
]  # fmt: skip
for _name, _description, _model, _fragment, _at_load in SWAP_FAULTS:
    scenario("faults", _name, _description)(_swap_rejected(_model, _fragment, at_load=_at_load))


#: Node parameters for the tunable models: their /cmd_vel yaw rate sets how long a predict takes, far
#: outside any training range, so the command plausibility bounds must not clamp it.
TUNABLE = {"plausibility.command_sigmas": 1e6}
#: Inference times (best case here) of the slow-inference scenarios: 2.5 control periods (inside the
#: 16-action horizon even if a loaded machine makes it 5x slower), and ~3.5x the 8-action horizon.
SLOW_S, TOO_SLOW_S = 0.05, 0.6


@scenario("faults")
def slow_inference(h: Harness, r: Result) -> None:
    """Inference becomes ~2.5x slower than the control period while the node runs: ticks go on at 50 Hz,
    the latency is compensated (later actions of each chunk run), no stale action is executed, control
    stays RUNNING; and it is fast again afterwards."""
    yaw = h.models.yaw_rate_for(SLOW_S, "tunable16")  # before the node starts: nothing else competes
    node = h.start(h.models["tunable16"], "/slow", params=TUNABLE)
    try:
        r.check(node.wait_state(RUNNING, 60.0), f"node never RUNNING: {node.log()[-2000:]}")
        w = Watch(node)
        h.sensors.set_command(yaw_rate=yaw)
        time.sleep(1.5)  # the command is out and the chunks running are the slow ones
        t_slow = time.monotonic()
        time.sleep(4.0)
        h.sensors.set_command()
        rows = node.timing(t_slow)
        run_rows = rows[(rows[:, STATE] == RUNNING) & (rows[:, MISSED] == 0)]
        # DiffuseLoco requests a chunk as soon as the last one is in: chunks per second = 1 / inference time.
        seqs = np.unique(run_rows[:, SEQ]) if len(run_rows) else np.zeros(0)
        span = rows[-1, TICK] - rows[0, TICK] if len(rows) > 1 else math.nan
        chunk_ms = 1000.0 * span / max(len(seqs) - 1, 1)
        r.figures.update(
            chunk_interval_ms=chunk_ms,
            target_predict_ms=1000.0 * SLOW_S,
            median_index=float(np.median(run_rows[:, INDEX])) if len(run_rows) else math.nan,
            obs_to_cmd_p50_ms=float(np.median(run_rows[:, TICK] - run_rows[:, OBS])) * 1000.0
            if len(run_rows)
            else math.nan,
        )
        r.check(chunk_ms > 1.5 * 1000 * node.period, f"a new chunk every {chunk_ms:.0f} ms: not slow")
        r.check(len(run_rows) >= 0.9 * len(rows), f"RUNNING only {len(run_rows)} of {len(rows)} ticks")
        r.check(
            len(run_rows) > 0 and np.median(run_rows[:, INDEX]) >= 2,
            "latency not compensated: the chunks' first actions ran although their time had passed",
        )
        time.sleep(1.5)
        rows = node.timing(time.monotonic() - 0.5)
        r.check(
            node.state() == RUNNING and len(rows) > 0 and np.median(rows[:, INDEX]) < 2,
            f"not RUNNING on fresh chunks once inference is fast again ({node.state()})",
        )
        w.verdict(r)
    finally:
        h.sensors.set_command()
        node.close()


@scenario("faults")
def inference_too_slow(h: Harness, r: Result) -> None:
    """Inference becomes ~3.5x slower than the whole horizon while the node runs: every chunk is stale on
    arrival. The node holds a safe command (SAFE after the configured misses), says why on /diagnostics
    and in a bounded number of log lines, and runs again by itself when inference is fast again."""
    yaw = h.models.yaw_rate_for(TOO_SLOW_S, "tunable8")
    node = h.start(h.models["tunable8"], "/tooslow", params=TUNABLE)
    try:
        r.check(node.wait_state(RUNNING, 60.0), f"node never RUNNING: {node.log()[-2000:]}")
        w = Watch(node)
        h.sensors.set_command(yaw_rate=yaw)
        r.check(node.wait_state(SAFE, 20.0), f"never SAFE with chunks that all arrive stale ({node.state()})")
        t_safe = time.monotonic()
        time.sleep(2.0)
        node.diag("control loop", after=time.monotonic())
        rows = node.timing(t_safe)
        reasons = [d.get("reason", "") for d in node.diags("control loop", t_safe) if d.get("_level") == 2]
        r.check(
            len(rows) > 0 and bool(np.all(rows[:, STATE] == SAFE)),
            f"not steadily SAFE while every chunk is stale: states {np.unique(rows[:, STATE])}",
        )
        why = ("stale on arrival", "has not answered")  # a chunk came too late, or none has come yet
        r.check(any(c in x for x in reasons for c in why), f"/diagnostics never said why: {reasons}")
        held = _commands_in_state(node, t_safe, SAFE)
        r.check(len(held) > 10 and np.ptp(held, axis=0).max() < 1e-9, "commands moved while SAFE (hold)")
        h.sensors.set_command()
        t_back = time.monotonic()
        r.check(node.wait_state(RUNNING, 20.0), f"no recovery once inference is fast again ({node.state()})")
        r.figures["recovery_s"] = time.monotonic() - t_back
        w.verdict(r)
        lines = [x for x in node.log()[w.log_offset :].splitlines() if "control state" in x or "missed" in x]
        r.check(len(lines) <= 2 * MAX_LOG_LINES, f"{len(lines)} state/missed-step log lines: {lines}")
    finally:
        h.sensors.set_command()
        node.close()


def _signal_during_inference(sig: int) -> Callable:
    """The signal arrives while a slow inference (~0.6 s) is in flight: the node exits 0 within 10 s."""

    def body(h: Harness, r: Result) -> None:
        h.sensors.set_command(yaw_rate=h.models.yaw_rate_for(TOO_SLOW_S, "tunable8"))
        node = h.start(h.models["tunable8"], f"/sig{int(sig)}", params=TUNABLE)
        try:
            # Requests go out from the first tick with fresh observations; each predict takes ~0.6 s, so
            # one is in flight nearly all the time.
            requested = wait_until(lambda: int(node.diag("policy").get("requests", 0)) > 1, 60.0)
            r.check(requested, f"no inference requested: {node.log()[-2000:]}")
            time.sleep(0.3)
            w = Watch(node)
            t0 = time.monotonic()
            rc = node.stop(sig, timeout=10.0)
            r.figures["exit_s"] = time.monotonic() - t0
            r.figures["exit_code"] = rc
            tail = "\n".join(x for x in node.log().splitlines() if not x.startswith("[INFO]"))[-3000:]
            r.check(rc == 0, f"exit code {rc} after {signal.Signals(sig).name}: {tail}")
            r.check(r.figures["exit_s"] < 10.0, f"took {r.figures['exit_s']:.1f} s to exit")
            w.verdict(r)
        finally:
            h.sensors.set_command()
            node.close()

    return body


scenario("faults", "sigterm_during_inference", "SIGTERM while a slow inference is running")(
    _signal_during_inference(signal.SIGTERM)
)
scenario("faults", "sigint_during_inference", "SIGINT while a slow inference is running")(
    _signal_during_inference(signal.SIGINT)
)


#: Seconds a freshly started node and sensor process get before a scenario that started them measures.
STARTUP_SETTLE_S = 4.0


@scenario("faults")
def sim_clock_jumps_back(h: Harness, r: Result) -> None:
    """use_sim_time, /clock from the sensor process; the clock jumps back 30 s (a simulator reset): the node
    starts a new episode (history cleared, WAITING, measured pose latched), says so once, runs again."""
    # Own sensor topics stamped in sim time; only sim-time nodes listen to /clock (not the main node).
    sensors = Sensors(prefix="/simt", sim_start=1000.0)
    node = h.start(
        h.models["a"], "/simt", params={"use_sim_time": "true"}, sensor_prefix="/simt", witness=sensors
    )
    try:
        r.check(node.wait_state(RUNNING, 60.0), f"sim-time node never RUNNING: {node.log()[-2000:]}")
        # Measure the jump, not the start: in about 1 run in 6 a node stalls once for ~350 ms within its
        # first seconds while DDS discovery of the new processes settles (0 in 8 runs after this wait);
        # an open issue of its own (README, robustness).
        time.sleep(STARTUP_SETTLE_S)
        w = Watch(node)
        time.sleep(1.0)
        sensors.jump(-30.0)
        time.sleep(0.5)
        r.check(node.wait_state(RUNNING, 10.0), f"no recovery after the clock jump ({node.state()})")
        time.sleep(1.0)
        a = w.verdict(r)
        gaps = sensors.stats()["max_gap"]
        r.figures["sim_feeder_max_gap_ms"] = 1000.0 * max(gaps[s] for s in ("joint_states", "imu", "odom"))
        r.check(a.clock_jumps == 1, f"{a.clock_jumps} backward tick jumps seen (want 1)")
        r.check(
            w.lines("clock jumped back") == 1, f"{w.lines('clock jumped back')} 'clock jumped back' lines"
        )
    finally:
        node.close()
        sensors.close()
