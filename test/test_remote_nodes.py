"""The policy on one process, the control loop in another, chunks over DDS (real processes, the tiny model).

- The policy node is killed mid-run: the controller never stops publishing, every command stays within
  the rate limit, it goes safe within chunk_timeout_s + one tick, and runs again within 1 s of the policy
  node's first chunk after its return.
- A 100 Hz controller behind a link that drops 20% of the chunks and reorders and duplicates some: no
  stale action is published and the loop misses no tick (within the suite's budget for a shared machine).
- One policy node serves two namespaced controllers, with a worker per robot, and with a batch-2 graph
  (the robots due together in one run of the model).
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import MISSED_TICK_BUDGET, MISSED_TICK_FLOOR
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from ros_helpers import NodeProcess, console_script, wait_until
from std_msgs.msg import Float64MultiArray
from test_controller_node import (
    CMD,
    RUNNING,
    SAFE,
    SENSOR_TOPICS,
    TIMING,
    Graph,
    SensorFeeder,
    diag_values,
    start,
)
from trajectory_msgs.msg import JointTrajectory

from diffusion_controller.core.chunk import is_stale
from diffusion_controller.ros.chunks import CHUNK_QOS
from diffusion_controller.ros.outputs import ACTION, EXEC, MISSED, STATE, TICK, TIMING_COLUMNS

pytestmark = pytest.mark.ros

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "config" / "ant.yaml"
CHUNKS = "/policy/chunk"
TIMEOUT = 0.2
#: The test's own sensor feeder (a Python thread in this process) may stall past the 0.1 s observation
#: timeouts while a node process starts on a shared machine; these tests are about the chunks.
RELAXED = [a for src in ("joint_states", "imu", "odom") for a in ("-p", f"observations.{src}.timeout_s:=0.5")]
MAX_STEP = 0.25  # config/ant.yaml


def policy_node(model: Path, *extra: str) -> NodeProcess:
    cmd = console_script("policy_node", "diffusion_controller.ros.policy_node")
    return NodeProcess([*cmd, "--ros-args", "--params-file", str(CONFIG), "-p", f"model_path:={model}",
                        *extra], cwd=str(ROOT))  # fmt: skip


def remote_controller(model: Path, *extra: str) -> NodeProcess:
    return start(model, "-p", "policy.source:=remote", "-p", f"policy.chunk_timeout_s:={TIMEOUT}", *extra)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    from tiny_models import make_tiny_model

    d = tmp_path_factory.mktemp("models")
    return {
        "50hz": make_tiny_model(d / "a", name="tiny_remote", horizon=16),
        "50hz_b": make_tiny_model(d / "c", name="tiny_remote_b", horizon=16, seed=1),
        "short": make_tiny_model(d / "d", name="tiny_short", horizon=8),
        "100hz": make_tiny_model(d / "b", name="tiny_remote_100", horizon=16, period=0.01),
        "50hz_batch2": make_tiny_model(d / "e", name="tiny_remote_batch", horizon=16, batch=2),
    }


@pytest.fixture(scope="module")
def graph():
    g = Graph()
    g.subscribe(CMD, Float64MultiArray)
    g.subscribe(TIMING, Float64MultiArray)
    g.subscribe(CHUNKS, JointTrajectory, CHUNK_QOS)
    yield g
    g.close()


def rows_since(graph: Graph, t0: float, t1: float = np.inf) -> np.ndarray:
    rows = [m.data for t, m in graph.received_timed(TIMING) if t0 <= t <= t1]
    return np.array(rows) if rows else np.zeros((0, len(TIMING_COLUMNS)))


def test_policy_node_killed_mid_run(models, graph):
    model = models["50hz"]
    latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL)  # fmt: skip
    graph.subscribe("/diffusion_policy/model", DiagnosticStatus, latched)
    feeder = SensorFeeder(graph)
    ctl = remote_controller(model, *RELAXED)
    pol = policy_node(model)
    try:
        assert wait_until(lambda: any(r[STATE] == RUNNING for r in rows_since(graph, 0.0)), 60.0), (
            ctl.output()[-2000:] + pol.output()[-2000:]
        )
        # What the chunks and ~/model say about the model, as `ros2 topic echo` shows it.
        chunk = graph.received(CHUNKS)[-1]
        assert (
            chunk.header.frame_id == "model=tiny_remote;version=0.0.1;K=2"
            or chunk.header.frame_id.startswith("model=tiny_remote;")
        )
        assert len(chunk.points) == 16 and chunk.joint_names[0] == "hip_1"
        assert wait_until(lambda: graph.received("/diffusion_policy/model"), 10.0)
        values = {kv.key: kv.value for kv in graph.received("/diffusion_policy/model")[-1].values}
        assert values["name"] == "tiny_remote" and values["model_id"] == chunk.header.frame_id

        # A chunk that does not fit the robot is refused, with the reason on /diagnostics.
        diag = graph.collect(DiagnosticArray, "/diagnostics")
        bad = graph.publisher(CHUNKS, JointTrajectory, CHUNK_QOS)
        wrong = JointTrajectory()
        wrong.header.stamp = chunk.header.stamp
        wrong.joint_names = ["elbow", *chunk.joint_names[1:]]
        wrong.points = chunk.points
        for _ in range(5):
            bad.publish(wrong)
            time.sleep(0.05)
        assert wait_until(lambda: int(diag_values(diag, "policy").get("chunks_refused", 0)) > 0, 5.0)
        assert "joint names" in diag_values(diag, "policy")["last_error"]

        # Swaps on the policy node: the same layout goes through, another horizon is refused.
        res = graph.set_parameters("/diffusion_policy", model_path=str(models["50hz_b"]))
        assert res is not None and res[0].successful
        assert wait_until(
            lambda: graph.received(CHUNKS)[-1].header.frame_id.startswith("model=tiny_remote_b;"), 20
        )
        res = graph.set_parameters("/diffusion_policy", model_path=str(models["short"]))
        assert res is not None and res[0].successful  # checked in the loader thread
        assert wait_until(
            lambda: any(
                kv.key == "event" and kv.value == "failed"
                for m in graph.received("/diffusion_policy/model")
                for kv in m.values
            ),
            20,
        )
        assert graph.received(CHUNKS)[-1].header.frame_id.startswith("model=tiny_remote_b;")
        # running steadily (one second of RUNNING rows) before the kill
        assert wait_until(lambda: (rows_since(graph, time.monotonic() - 1.0)[:, STATE] == RUNNING).all(), 20)

        t_mono0 = time.monotonic()
        t_kill = time.time()
        pol.stop(signal.SIGKILL)
        time.sleep(1.5)
        t_back = time.monotonic()
        pol = policy_node(model)
        assert wait_until(lambda: any(t > t_back for t, _ in graph.received_timed(CHUNKS)), 60.0), (
            pol.output()
        )
        first_chunk = min(t for t, _ in graph.received_timed(CHUNKS) if t > t_back)
        assert wait_until(
            lambda: any(m.data[STATE] == RUNNING for t, m in graph.received_timed(TIMING) if t > first_chunk),
            5.0,
        )
        running_again = min(
            t for t, m in graph.received_timed(TIMING) if t > first_chunk and m.data[STATE] == RUNNING
        )
        time.sleep(0.5)
    finally:
        feeder.close()
        rc_pol = pol.stop()
        out = ctl.output()
        rc_ctl = ctl.stop()

    rows = rows_since(graph, t_mono0)
    cmds = [(t, np.asarray(m.data)) for t, m in graph.received_timed(CMD) if t >= t_mono0]
    # Commands never stop: a tick every period on the node's clock (a loaded machine may skip one), each
    # publishing a command; the probe got (nearly) all of them.
    ticks = rows[:, TICK]
    assert np.diff(ticks).max() < 0.1, np.diff(ticks).max()
    assert len(cmds) >= 0.95 * len(rows), (len(cmds), len(rows))
    steps = np.abs(np.diff(np.array([c for _, c in cmds]), axis=0))
    assert steps.max() <= MAX_STEP + 1e-9
    # Safe within chunk_timeout_s + one tick of the kill (+10 ms for a chunk already on the wire and the
    # timer's own lateness on a shared machine).
    safe = rows[rows[:, STATE] == SAFE]
    assert len(safe), out[-3000:]
    assert safe[0, TICK] - t_kill <= TIMEOUT + 0.02 + 0.01, (safe[0, TICK] - t_kill, out[-3000:])
    # the chunks it still had kept it running until then
    assert safe[0, TICK] - t_kill > TIMEOUT - 0.05, (safe[0, TICK] - t_kill, out[-3000:])
    # RUNNING again within 1 s of the policy node's first chunk after its return.
    assert running_again - first_chunk < 1.0
    assert rc_ctl == 0 and rc_pol == 0


def test_100hz_loop_behind_a_lossy_reordering_link(models, graph):
    model = models["100hz"]
    graph.clear()
    feeder = SensorFeeder(graph)
    # Chunks stop when this test's own sensor feeder stalls (seen for 0.2 s at load average 8); the test is
    # about 20% loss and reordering, so the loop here tolerates a stalled feeder (the kill test holds the
    # default chunk timeout).
    stalls = ["-p", "policy.chunk_timeout_s:=0.5", "-p", "max_consecutive_misses:=50"]
    ctl = start(model, "-p", "policy.source:=remote", *RELAXED, *stalls)
    pol = policy_node(model, "-p", "policy.chunk_topic:=policy/chunk_tx")
    link_cmd = console_script("link_emulator", "diffusion_controller.sim.link_emulator")
    link = NodeProcess([*link_cmd, "--in", "/policy/chunk_tx", "--out", "/policy/chunk", "--delay", "0.01",
                        "--jitter", "0.005", "--loss", "0.2", "--reorder", "0.2", "--reorder-s", "0.02",
                        "--duplicate", "0.05", "--seed", "1"], cwd=str(ROOT))  # fmt: skip
    diag = graph.collect(DiagnosticArray, "/diagnostics")
    try:
        assert wait_until(lambda: any(r[STATE] == RUNNING for r in rows_since(graph, 0.0)), 60.0), (
            ctl.output()[-2000:] + pol.output()[-2000:] + link.output()[-2000:]
        )
        time.sleep(1.0)
        before = diag_values(diag, "control loop")
        t0 = time.monotonic()
        time.sleep(6.0)
        assert wait_until(lambda: diag.timed_since(t0 + 1.5), 5.0)
        after = diag_values(diag, "control loop")
        t1 = time.monotonic()
    finally:
        feeder.close()
        for p in (link, pol, ctl):
            p.stop()
    rows = rows_since(graph, t0, t1)
    assert len(rows) > 400, len(rows)
    run = rows[(rows[:, STATE] == RUNNING) & (rows[:, MISSED] == 0)]
    assert len(run) > 0.9 * len(rows), (np.unique(rows[:, STATE], return_counts=True), ctl.output()[-2500:])
    # No stale action published (DESIGN: stale iff t_i < t_exec - period / 2, core/chunk.py is_stale).
    assert not np.any(is_stale(run[:, ACTION], run[:, EXEC], 0.01))
    assert (rows[:, STATE] != SAFE).all(), ctl.output()[-3000:]
    ticks = int(after["ticks"]) - int(before["ticks"])
    missed = int(after["missed_ticks"]) - int(before["missed_ticks"])
    assert missed <= max(MISSED_TICK_FLOOR, MISSED_TICK_BUDGET * ticks), (missed, ticks)
    assert float(after["rate_hz"]) == pytest.approx(100.0, rel=0.1)


ROBOTS = ("robot1", "robot2")


def serve_two_robots(graph, model: Path, controller_args: tuple[str, ...], policy_args: tuple[str, ...]):
    """Two controllers (robot1, robot2; the feeder's sensors for both) and one policy node serving both,
    once both run: (feeder, controllers, policy node, /diagnostics collector)."""
    feeder = SensorFeeder(graph)
    sensors = [
        a for src, topic in SENSOR_TOPICS.items() for a in ("-p", f"observations.{src}.topic:={topic}")
    ]
    remote = ("-p", "policy.source:=remote", *controller_args)
    ctls = [start(model, *remote, namespace=f"/{ns}") for ns in ROBOTS]
    pol = policy_node(model, "-p", "policy.robots:=[robot1,robot2]", *policy_args, *sensors)
    diag = graph.collect(DiagnosticArray, "/diagnostics")
    try:
        for ns in ROBOTS:
            assert wait_until(
                lambda ns=ns: diag_values(diag, "control loop", f"/{ns}/diffusion_controller").get("state")
                == "running",
                60.0,
            ), pol.output()[-1500:] + ctls[0].output()[-2500:]
    except BaseException:
        stop_all(feeder, pol, ctls)
        raise
    return feeder, ctls, pol, diag


def stop_all(feeder: SensorFeeder, pol: NodeProcess, ctls: list[NodeProcess]) -> int | None:
    """Stop everything a serve_two_robots() started; the policy node's exit code."""
    feeder.close()
    rc = pol.stop()
    for c in ctls:
        c.stop()
    return rc


def test_one_policy_node_serves_two_namespaced_controllers(models, graph):
    """Two controllers (robot1, robot2; the feeder's sensors for both) and one policy node serving both."""
    feeder, ctls, pol, diag = serve_two_robots(
        graph, models["50hz"], ("-p", "outputs.debug.topic:=~/debug/command_timing"), ()
    )
    try:

        def chunks(ns: str) -> int:
            return int(diag_values(diag, "policy", "/diffusion_policy").get(f"chunks.{ns}", 0))

        assert wait_until(lambda: chunks("robot1") > 10 and chunks("robot2") > 10, 10.0)
    finally:
        rc = stop_all(feeder, pol, ctls)
    assert rc == 0


def test_one_batch_graph_run_serves_two_namespaced_controllers(models, graph):
    """`policy.batch: true` with a batch-2 graph: both robots' requests (the same sensors, so due at the
    same checks) go into one run of the model, and each controller runs on its own chunks."""
    t0 = time.monotonic()  # the policy node's diagnostics from here on (an earlier test's may be there)
    feeder, ctls, pol, diag = serve_two_robots(
        graph, models["50hz_batch2"], ("-p", "outputs.debug.enabled:=false"), ("-p", "policy.batch:=true")
    )
    try:

        def policy() -> dict[str, str]:
            for _, msg in reversed(diag.timed_since(t0)):
                for st in msg.status:
                    if st.name == "/diffusion_policy: policy":
                        return {kv.key: kv.value for kv in st.values}
            return {}

        def served() -> bool:
            v = policy()
            return int(v.get("chunks.robot1", 0)) > 20 and int(v.get("chunks.robot2", 0)) > 20

        assert wait_until(served, 10.0), policy()
        values = policy()
        chunks = int(values["chunks.robot1"]) + int(values["chunks.robot2"])
        assert values["graph_batch"] == "2"
        assert 0 < int(values["model_runs"]) <= 0.75 * chunks, values  # mostly one run for both robots
    finally:
        rc = stop_all(feeder, pol, ctls)
    assert rc == 0
    assert "one run of a batch-2 graph for up to 2 robots" in pol.output()
