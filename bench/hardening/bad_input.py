"""Bad input scenarios: malformed, impossible and contradictory messages, wrong message types.

Every bad message is dropped (counted on /diagnostics, one log line per cause) while control goes on, or
takes the node to the safe state when it is all that comes; the node says what is wrong and recovers.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from ros_helpers import wait_until
from sensor_msgs.msg import JointState
from std_msgs.msg import Float64MultiArray

from diffusion_controller.core.card import ModelCard
from hardening.harness import Harness, Result, Watch, check_running, scenario
from hardening.messages import BAD_INPUTS, MUTATIONS, TOPICS, BadInput, build
from hardening.node import RUNNING, SAFE, NodeRun
from hardening.sensors import child

#: Bad messages per scenario and their rate (beside the good stream at its normal rate).
BAD_COUNT, BAD_RATE = 200, 200.0
#: How long the node may take to name a wrong-type publisher (process start + discovery, loaded machine).
WRONG_TYPE_NAMED_S = 20.0
#: Log lines allowed for one cause repeated BAD_COUNT times (the first, maybe one summary of repeats).
MAX_LOG_LINES = 3


def _rejected(node: NodeRun, stream: str, after: float | None) -> int:
    return int(node.diag("observations", after=after).get(f"rejected.{stream}", 0))


def bad_input_scenario(bad: BadInput) -> Callable[[Harness, Result], None]:
    """Interleave BAD_COUNT bad messages with the good stream: every one is dropped (counted on
    /diagnostics, one log line for the cause), control never leaves RUNNING, nothing unsafe is published.
    For a message that is fine where it matters (`fragment` None) nothing is rejected."""

    def body(h: Harness, r: Result) -> None:
        node = h.main
        r.check(node.wait_state(RUNNING, 10.0), f"not RUNNING before the scenario (state {node.state()})")
        before = _rejected(node, bad.stream, None)  # up to date: the last scenario waited for its count
        key = f"{bad.counter}.{bad.stream}"
        counted_before = int(node.diag("observations").get(key, 0)) if bad.counter else 0
        w = Watch(node)
        # Rejected input comes between good messages (control must go on); usable input replaces the good
        # stream (control must run on it alone).
        h.sensors.inject(bad.name, BAD_COUNT, BAD_RATE, replace=not bad.rejected)
        t_end = time.monotonic()
        time.sleep(0.3)
        after = _rejected(node, bad.stream, t_end + 0.1)
        loop = node.diag("control loop")
        a = w.verdict(r)
        rejected = after - before
        r.figures.update(rejected=rejected, safe_ticks=a.states["safe"] + a.states["waiting"])
        r.check(
            a.states["safe"] + a.states["waiting"] + a.states["estop"] == 0,
            f"control left RUNNING while good messages kept coming: {dict(a.states)}",
        )
        r.check(loop.get("state") == "running", f"/diagnostics control loop: {loop}")
        if not bad.rejected:
            # Back from receipt-time stamps (stamp 0) to header stamps, the first good message or two can
            # be older than the last receipt time, and are dropped as going backwards: that is the rule.
            allowed = 2 if "zero_stamp" in bad.name or bad.name == "imu_empty" else 0
            r.check(rejected <= allowed, f"{rejected} usable messages were rejected (allowed {allowed})")
        else:
            r.check(
                rejected >= 0.5 * BAD_COUNT,
                f"/diagnostics rejected.{bad.stream} grew by {rejected}, {BAD_COUNT} bad messages sent",
            )
        if bad.counter:
            counted = int(node.diag("observations", after=t_end + 0.1).get(key, 0)) - counted_before
            r.check(counted >= 0.5 * BAD_COUNT, f"/diagnostics {key} grew by {counted}, {BAD_COUNT} sent")
        if bad.fragment is not None:
            lines = w.lines(bad.fragment)
            r.figures["log_lines"] = lines
            # The cause is logged once, then rate-limited (an earlier scenario may have logged it already).
            r.check(
                lines <= MAX_LOG_LINES, f"{lines} log lines with {bad.fragment!r} (want <= {MAX_LOG_LINES})"
            )
            r.check(node.log_lines(bad.fragment) > 0, f"the node never logged {bad.fragment!r}")

    body.__doc__ = f"{bad.stream}: {bad.name.removeprefix(bad.stream + '_').replace('_', ' ')}"
    return body


for _bad in BAD_INPUTS:
    scenario("input", _bad.name)(bad_input_scenario(_bad))


def _garbage_only(mutation: str, feature: str) -> Callable:
    """Only bad messages on a required stream for 1 s: the watchdog takes the node to SAFE (hold) within
    the stream's timeout, /diagnostics names the stale feature, and it recovers when good data returns."""

    stream = MUTATIONS[mutation][0]

    def body(h: Harness, r: Result) -> None:
        node = h.main
        r.check(node.wait_state(RUNNING, 10.0), f"not RUNNING before the scenario (state {node.state()})")
        w = Watch(node)
        h.sensors.inject(mutation, 200, 200.0, replace=True, wait=False)
        time.sleep(0.6)
        obs = node.diag("observations", after=time.monotonic())
        loop = node.diag("control loop")
        h.sensors.wait_injected(10.0)
        t_back = time.monotonic()
        recovered = node.wait_state(RUNNING, 5.0)
        r.figures["recovery_s"] = time.monotonic() - t_back
        a = w.verdict(r)
        r.check(a.states["safe"] > 0, f"never SAFE while {stream} was garbage: {dict(a.states)}")
        r.check(
            feature in str(obs.get("_message", "")) and obs.get("_level") == 2,
            f"/diagnostics observations does not name stale {feature}: {obs}",
        )
        r.check(feature in str(loop.get("reason", "")), f"/diagnostics control loop reason: {loop}")
        r.check(recovered, f"no recovery within 5 s (state {node.state()})")
        r.check(w.lines("-> safe") == 1, f"{w.lines('-> safe')} '-> safe' log lines (want 1)")

    return body


scenario("input", "joint_states_garbage_only")(_garbage_only("joint_states_nan_everywhere", "joint_position"))
scenario("input", "imu_garbage_only")(_garbage_only("imu_zero_quaternion_only", "projected_gravity"))
scenario("input", "odom_garbage_only")(_garbage_only("odom_wrong_frame_only", "base_linear_velocity"))


@scenario("input")
def wrong_message_types(h: Harness, r: Result) -> None:
    """Publishers of the wrong type on /joint_states (String) and /cmd_vel (TwistStamped, the Jazzy-era
    mix-up): DDS never delivers them, the node keeps running on the real streams, and it says once in the
    log and on /diagnostics (while they exist) that they are there."""
    node = h.main
    r.check(node.wait_state(RUNNING, 10.0), f"not RUNNING before the scenario (state {node.state()})")
    w = Watch(node)
    # A process of its own, like a misconfigured driver (a second participant in this one is not found
    # reliably by discovery on localhost).
    other = child("--wrong-types", stdin=subprocess.PIPE)
    wrong = ((TOPICS["joint_states"], "std_msgs/msg/String"), (TOPICS["cmd_vel"], "TwistStamped"))
    seen: dict[str, Any] = {}

    def named() -> bool:
        seen["obs"] = node.diag("observations", after=time.monotonic())
        return all(t in str(seen["obs"].get(f"wrong_type.{topic}", "")) for topic, t in wrong)

    t0 = time.monotonic()
    try:
        # Starting a process and discovering it takes a second or several on a loaded machine.
        if wait_until(named, WRONG_TYPE_NAMED_S, period=0.2):
            r.figures["wrong_type_named_s"] = time.monotonic() - t0
        obs = seen.get("obs", {})
    finally:
        other.stdin.close()  # the publishers go away
        other.wait(10.0)
    a = w.verdict(r)
    check_running(r, a)
    text = str(obs.get("_message", ""))
    r.check("wrong type" in text and obs.get("_level") == 1, f"/diagnostics observations: {obs}")
    for topic, wrong_type in wrong:
        r.check(
            wrong_type in str(obs.get(f"wrong_type.{topic}", "")),
            f"/diagnostics does not name {wrong_type} within {WRONG_TYPE_NAMED_S:.0f} s: {obs}",
        )
        lines = w.lines(f"{topic} also has publishers of another type")
        r.check(lines == 1, f"{lines} log lines about the wrong type on {topic} (want 1)")
    # Gone with the publishers: /diagnostics no longer warns about them.
    gone = wait_until(lambda: "wrong_type" not in str(node.diag("observations", after=time.monotonic())), 5.0)
    r.check(gone, "/diagnostics still reports the wrong-type publishers after they left")


@scenario("input")
def competing_publishers(h: Harness, r: Result) -> None:
    """Another node gets a publisher on the node's command topic (two controllers on one robot) and
    publishes joint states that contradict the sensor's: /diagnostics names both at WARN, each is logged
    once, control goes on, and the command-topic warning leaves with that publisher."""
    node = h.main
    r.check(node.wait_state(RUNNING, 10.0), f"not RUNNING before the scenario (state {node.state()})")
    w = Watch(node)
    card = ModelCard.from_onnx(h.models["a"])
    std = card.obs_std[card.feature_slice("joint_position")]
    j = int(np.argmin(std))  # joint_position and action joints share the ant order
    middle = (card.action_lower[j] + card.action_upper[j]) / 2
    offset = 1.5 * std[j] * (1.0 if middle >= 0 else -1.0)  # disagrees, and still plausible
    pn = h.probe.node
    # Its presence in the graph is the fault: nothing is published on it (the probe records that topic).
    intruder = pn.create_publisher(Float64MultiArray, node.cmd_topic, 10)
    liar = pn.create_publisher(JointState, TOPICS["joint_states"], 10)
    key = f"other_publishers.{node.cmd_topic}"
    seen: dict[str, Any] = {}

    def named() -> bool:
        t = time.time()
        msg = build("joint_states", t)
        msg.position = [v + (offset if i == j else 0.0) for i, v in enumerate(msg.position)]
        liar.publish(msg)
        seen["obs"] = node.diag("observations")
        return (
            "hardening_probe" in str(seen["obs"].get(key, ""))
            and int(seen["obs"].get("contradictions.joint_states", 0)) > 0
        )

    try:
        found = wait_until(named, WRONG_TYPE_NAMED_S, period=0.02)
        obs = seen.get("obs", {})
    finally:
        pn.destroy_publisher(liar)
        pn.destroy_publisher(intruder)
    a = w.verdict(r)
    check_running(r, a)
    r.check(found, f"/diagnostics did not name both within {WRONG_TYPE_NAMED_S:.0f} s: {obs}")
    r.check(obs.get("_level") == 1, f"/diagnostics observations not WARN: {obs}")
    lines = w.lines("other publishers besides this node")
    r.check(lines == 1, f"{lines} log lines about the other command publisher (want 1)")
    lines = w.lines(f"contradictory publishers on {TOPICS['joint_states']}")
    r.check(
        1 <= lines <= MAX_LOG_LINES, f"{lines} log lines about the contradiction (want 1..{MAX_LOG_LINES})"
    )
    gone = wait_until(lambda: key not in node.diag("observations", after=time.monotonic()), 10.0)
    left = h.probe.node.get_publishers_info_by_topic(node.cmd_topic)
    r.check(gone, f"/diagnostics still reports the other command publisher after it left (graph: {left})")


@scenario("input")
def implausible_goes_safe(h: Harness, r: Result) -> None:
    """A node whose joint_states source has the `safe` plausibility policy: impossible joint positions
    take it to SAFE at once (before any watchdog timeout), the reason names the topic, and it runs
    again by itself once the positions are plausible."""
    node = h.start(h.models["a"], "/plaus", params={"observations.joint_states.implausible": "safe"})
    try:
        r.check(node.wait_state(RUNNING, 60.0), f"node never RUNNING: {node.log()[-2000:]}")
        w = Watch(node)
        t_bad = time.monotonic()
        # 1 s of bad positions: several /diagnostics periods (DIAG_PERIOD) fall inside it whatever the phase.
        h.sensors.inject("joint_states_implausible_position", 200, 200.0, replace=True, wait=False)
        safe = node.wait_state(SAFE, 2.0)
        r.figures["time_to_safe_s"] = time.monotonic() - t_bad
        h.sensors.wait_injected(10.0)
        recovered = node.wait_state(RUNNING, 5.0)
        a = w.verdict(r)
        r.check(safe, f"never SAFE on implausible joint positions: {dict(a.states)}")
        # While the positions are implausible, the control loop's status says so; once they are plausible
        # again it says what it waits for (a new chunk), so every status since the injection is looked at.
        loops = node.diags("control loop", t_bad)
        named = [d for d in loops if all(k in f"{d.get('_message', '')} {d.get('reason', '')}"
                                         for k in ("implausible", "/joint_states"))]  # fmt: skip
        r.check(bool(named), f"no /diagnostics control loop status named the cause: {loops[-4:]}")
        r.check(recovered, f"no recovery within 5 s (state {node.state()})")
    finally:
        node.close()


#: The node's window for "recent" problems on /diagnostics (node_diagnostics.RECENT_S), and some slack.
RECENT_WINDOW_S, CLEAR_SLACK_S = 10.0, 5.0


@scenario("input")
def diagnostics_clear(h: Harness, r: Result) -> None:
    """/diagnostics describes the present: a burst of bad messages and a failed swap turn the observations
    and policy sections to WARN, which clear by themselves once the input is clean and nothing fails; the
    lifetime counts stay."""
    node = h.main
    r.check(node.wait_state(RUNNING, 10.0), f"not RUNNING before the scenario (state {node.state()})")
    h.sensors.inject("cmd_vel_nan", 20, 200.0, replace=False)
    res = node.set_params(model_path=str(h.models["graph_mismatch"]))[0]  # fails in the loader
    r.check(res.successful, f"swap refused before loading: {res.reason}")
    t_bad = time.monotonic()
    warned = wait_until(
        lambda: node.diag("observations", after=time.monotonic()).get("_level") == 1
        and node.diag("policy").get("_level") == 1,
        5.0,
    )
    r.check(warned, f"no WARN after bad input and a failed swap: {node.diag('observations')}")
    rejected = int(node.diag("observations").get("rejected.cmd_vel", 0))

    def clear() -> bool:
        obs, pol = node.diag("observations", after=time.monotonic()), node.diag("policy")
        return obs.get("_level") == 0 and pol.get("_level") == 0

    cleared = wait_until(clear, RECENT_WINDOW_S + CLEAR_SLACK_S, period=0.5)
    r.figures["clear_s"] = time.monotonic() - t_bad
    r.check(
        cleared, f"still not OK {RECENT_WINDOW_S + CLEAR_SLACK_S:.0f} s after: {node.diag('observations')}"
    )
    after = int(node.diag("observations").get("rejected.cmd_vel", 0))
    r.check(after >= rejected > 0, f"the lifetime count went away: rejected.cmd_vel {rejected} -> {after}")
