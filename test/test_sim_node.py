"""sim_node as a real process over DDS: clock, sensor topics and rates, commands, delay, reset, exit."""

from __future__ import annotations

import itertools
import os
import signal
import statistics
import time
from pathlib import Path

import numpy as np
import pytest
from builtin_interfaces.msg import Duration
from nav_msgs.msg import Odometry
from rclpy.qos import QoSProfile, ReliabilityPolicy
from ros_helpers import NodeProcess, Probe, console_script, ros_args, thread_cpus, wait_until
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import Imu, JointState
from std_msgs.msg import Float64MultiArray
from std_srvs.srv import Trigger
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from diffusion_controller.sim.ant import JOINTS, STANDING_POSE

pytestmark = pytest.mark.ros

SIM = console_script("sim_node", "diffusion_controller.sim.sim_node")
JOINT_RATE = 50.0  # not the default (100), so the test also shows parameters reach the node
FWD = "/forward_position_controller/commands"
JTC = "/joint_trajectory_controller/joint_trajectory"


def t_of(stamp) -> float:
    return stamp.sec + stamp.nanosec * 1e-9


def positions(msg: JointState) -> np.ndarray:
    return np.array([msg.position[list(msg.name).index(j)] for j in JOINTS])


@pytest.fixture(scope="module")
def sim():
    params = {"real_time_factor": 1.0, "joint_states_rate_hz": JOINT_RATE, "seed": 3}
    with NodeProcess(SIM + ros_args(params)) as proc, Probe("sim_probe") as probe:
        for topic, typ in [
            ("/clock", Clock),
            ("/joint_states", JointState),
            ("/imu_sensor_broadcaster/imu", Imu),
            ("/odom", Odometry),
            ("/sim_node/ground_truth", Odometry),
        ]:
            probe.subscribe(topic, typ)
        assert probe.wait_for("/joint_states", lambda m: len(m) > 20, timeout=30), proc.output()
        yield proc, probe


def latest_positions(probe: Probe) -> np.ndarray:
    return positions(probe.received("/joint_states")[-1])


def test_clock_advances_at_real_time(sim) -> None:
    _, probe = sim
    timed = probe.received_timed("/clock")
    assert len(timed) > 10
    t0 = t_of(timed[0][1].clock)
    assert wait_until(lambda: t_of(probe.received("/clock")[-1].clock) > t0 + 1.0, timeout=10)
    (w0, c0), (w1, c1) = timed[0], probe.received_timed("/clock")[-1]
    clocks = [t_of(m.clock) for _, m in probe.received_timed("/clock")]
    assert all(b >= a for a, b in itertools.pairwise(clocks))
    assert (t_of(c1.clock) - t_of(c0.clock)) / (w1 - w0) == pytest.approx(1.0, rel=0.3)


def test_joint_states_carry_the_named_joints_at_the_configured_rate(sim) -> None:
    _, probe = sim
    msgs = probe.received("/joint_states")
    assert all(list(m.name) == list(JOINTS) for m in msgs)
    assert all(len(m.position) == len(m.velocity) == len(m.effort) == 8 for m in msgs)
    stamps = [t_of(m.header.stamp) for m in msgs]
    assert statistics.median(np.diff(stamps)) == pytest.approx(1.0 / JOINT_RATE, rel=0.05)
    timed = probe.received_timed("/joint_states")
    wall = timed[-1][0] - timed[0][0]
    assert len(timed) / wall == pytest.approx(JOINT_RATE, rel=0.3)  # nothing piles up or gets dropped
    assert np.allclose(positions(msgs[-1]), STANDING_POSE, atol=0.1)  # standing at start


def test_imu_and_odom_follow_the_ros_conventions(sim) -> None:
    _, probe = sim
    assert probe.wait_for("/odom") and probe.wait_for("/imu_sensor_broadcaster/imu")
    imu = probe.received("/imu_sensor_broadcaster/imu")[-1]
    q = [imu.orientation.x, imu.orientation.y, imu.orientation.z, imu.orientation.w]
    assert np.linalg.norm(q) == pytest.approx(1.0)
    assert imu.linear_acceleration.z == pytest.approx(9.81, abs=1.0)  # accelerometer reads +g at rest
    odom = probe.received("/odom")[-1]
    assert (odom.header.frame_id, odom.child_frame_id) == ("odom", "base_link")
    assert odom.pose.pose.position.z > 0.4
    imu_stamps = [t_of(m.header.stamp) for m in probe.received("/imu_sensor_broadcaster/imu")]
    assert statistics.median(np.diff(imu_stamps)) == pytest.approx(1.0 / 250.0, rel=0.05)  # default


def test_forward_command_moves_the_joints(sim) -> None:
    _, probe = sim
    pub = probe.publisher(FWD, Float64MultiArray)
    assert probe.wait_for_subscriber(pub)
    target = STANDING_POSE + np.array([0.25, 0.1, -0.25, -0.1, 0.25, -0.1, -0.25, 0.1])
    pub.publish(Float64MultiArray(data=target.tolist()))
    assert wait_until(lambda: np.allclose(latest_positions(probe), target, atol=0.03), timeout=5), (
        latest_positions(probe)
    )


def test_wrong_size_command_is_ignored_and_node_keeps_running(sim) -> None:
    proc, probe = sim
    pub = probe.publisher(FWD, Float64MultiArray)
    assert probe.wait_for_subscriber(pub)
    pub.publish(Float64MultiArray(data=STANDING_POSE.tolist()))
    assert wait_until(lambda: np.allclose(latest_positions(probe), STANDING_POSE, atol=0.03), timeout=5)
    pub.publish(Float64MultiArray(data=[0.4, 0.4, 0.4]))
    assert wait_until(lambda: "expected 8" in proc.output(), timeout=5), proc.output()
    n = len(probe.received("/joint_states"))
    assert probe.wait_for("/joint_states", lambda m: len(m) > n + 25, timeout=5)
    assert proc.alive
    assert np.allclose(latest_positions(probe), STANDING_POSE, atol=0.03)


def test_trajectory_is_followed_by_joint_name_and_held_at_the_end(sim) -> None:
    proc, probe = sim
    pub = probe.publisher(JTC, JointTrajectory)
    assert probe.wait_for_subscriber(pub)
    goal = STANDING_POSE + np.array([-0.2, 0.15, 0.2, -0.15, -0.2, -0.15, 0.2, 0.15])
    order = list(reversed(JOINTS))  # the controller maps by name, not by position
    msg = JointTrajectory(joint_names=order)
    for tfs, frac in ((0.4, 0.5), (0.8, 1.0)):
        q = STANDING_POSE + frac * (goal - STANDING_POSE)
        msg.points.append(
            JointTrajectoryPoint(
                positions=[float(q[JOINTS.index(j)]) for j in order],
                time_from_start=Duration(sec=0, nanosec=int(tfs * 1e9)),
            )
        )
    pub.publish(msg)
    assert wait_until(lambda: np.allclose(latest_positions(probe), goal, atol=0.03), timeout=5), (
        latest_positions(probe),
        proc.output()[-2000:],
    )
    n = len(probe.received("/joint_states"))
    assert probe.wait_for("/joint_states", lambda m: len(m) > n + 25, timeout=5)
    assert np.allclose(latest_positions(probe), goal, atol=0.03)  # held


def test_bad_trajectory_is_rejected(sim) -> None:
    proc, probe = sim
    pub = probe.publisher(JTC, JointTrajectory)
    assert probe.wait_for_subscriber(pub)
    msg = JointTrajectory(joint_names=["hip_1", "ankle_1"])
    msg.points.append(JointTrajectoryPoint(positions=[0.0, 1.0], time_from_start=Duration(sec=1)))
    pub.publish(msg)
    assert wait_until(lambda: "trajectory rejected" in proc.output(), timeout=5), proc.output()
    assert proc.alive


def test_reset_service_and_ground_truth(sim) -> None:
    _, probe = sim
    assert probe.wait_for("/sim_node/ground_truth")
    resp = probe.call(Trigger, "/sim_node/reset", Trigger.Request())
    assert resp is not None and resp.success
    assert wait_until(lambda: np.allclose(latest_positions(probe), STANDING_POSE, atol=0.03), timeout=5)
    truth = probe.received("/sim_node/ground_truth")[-1]
    assert abs(truth.pose.pose.position.x) < 0.05 and truth.pose.pose.position.z > 0.4


def test_sigint_exits_zero(sim) -> None:
    proc, _ = sim
    assert proc.alive
    assert proc.stop(signal.SIGINT) == 0
    assert "Traceback" not in proc.output()


def test_effort_drive_takes_torques_and_holds_them() -> None:
    """drive:=effort: forward_effort_controller/commands are joint torques held until the next one."""
    params = {"real_time_factor": 1.0, "drive": "effort", "physics_timestep": 0.0025}
    with NodeProcess(SIM + ros_args(params)) as proc, Probe("effort_probe") as probe:
        probe.subscribe("/joint_states", JointState)
        assert probe.wait_for("/joint_states", lambda m: len(m) > 20, timeout=30), proc.output()
        pub = probe.publisher("/forward_effort_controller/commands", Float64MultiArray)
        assert probe.wait_for_subscriber(pub)
        torque = np.zeros(len(JOINTS))
        hip = JOINTS.index("hip_1")
        torque[hip] = 30.0  # one command, then silence: the torque is held, the hip goes to its stop
        pub.publish(Float64MultiArray(data=torque.tolist()))
        assert wait_until(lambda: latest_positions(probe)[hip] > 0.45, timeout=5), latest_positions(probe)
        assert np.allclose(probe.received("/joint_states")[-1].effort[hip], 30.0)
        pub.publish(Float64MultiArray(data=[1.0, 2.0]))
        assert wait_until(lambda: "forward_effort_controller: command must be 8" in proc.output(), timeout=5)
        assert proc.stop(signal.SIGINT) == 0
        assert "Traceback" not in proc.output()


def test_a_second_sigint_during_the_cleanup_still_exits_zero() -> None:
    """Ctrl-C under `ros2 launch`: the terminal signals the process group, then launch signals each
    process again while it is already tearing down."""
    with NodeProcess(SIM + ros_args({"real_time_factor": 0.0})) as proc, Probe("twice_probe") as probe:
        probe.subscribe("/clock", Clock, qos=QoSProfile(depth=1, reliability=ReliabilityPolicy.BEST_EFFORT))
        assert probe.wait_for("/clock", lambda m: len(m) > 20, timeout=30), proc.output()
        proc.proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
        assert proc.stop(signal.SIGINT) == 0, proc.output()
        assert "Traceback" not in proc.output()


def test_observation_delay() -> None:
    """Messages keep their measurement stamp but leave obs_delay_s later (paced at real time)."""
    delay = 0.1
    params = {"real_time_factor": 1.0, "obs_delay_s": delay, "clock_rate_hz": 500.0}
    with NodeProcess(SIM + ros_args(params)) as proc, Probe("delay_probe") as probe:
        probe.subscribe("/clock", Clock)
        probe.subscribe("/joint_states", JointState)
        assert probe.wait_for("/joint_states", lambda m: len(m) > 100, timeout=30), proc.output()
        # Lag of each joint state behind the newest /clock received before it (a clock tick leaves at
        # every physics step): about the delay, whatever the machine's load does to the pacing.
        clocks = probe.received_timed("/clock")
        wall = np.array([w for w, _ in clocks])
        sim_t = np.array([t_of(m.clock) for _, m in clocks])
        lags = []
        for w, m in probe.received_timed("/joint_states"):
            i = np.searchsorted(wall, w, side="right") - 1
            if 0 <= i < len(wall):
                lags.append(sim_t[i] - t_of(m.header.stamp))
        assert len(lags) > 50
        assert statistics.median(lags) == pytest.approx(delay, abs=0.015)
        assert proc.stop(signal.SIGINT) == 0


def test_fast_mode_outruns_the_wall_clock_and_sigterm_exits_zero() -> None:
    with NodeProcess(SIM + ros_args({"real_time_factor": 0.0})) as proc, Probe("fast_probe") as probe:
        probe.subscribe("/clock", Clock, qos=QoSProfile(depth=1, reliability=ReliabilityPolicy.BEST_EFFORT))
        assert probe.wait_for("/clock", lambda m: len(m) > 20, timeout=30), proc.output()
        t0 = t_of(probe.received("/clock")[-1].clock)
        time.sleep(1.0)
        t1 = t_of(probe.received("/clock")[-1].clock)
        assert t1 - t0 > 1.5
        assert proc.stop(signal.SIGTERM) == 0


def _traj(points, names=JOINTS, stamp_s: float = 0.0) -> JointTrajectory:
    msg = JointTrajectory(joint_names=list(names))
    msg.header.stamp.sec, msg.header.stamp.nanosec = int(stamp_s), round((stamp_s % 1) * 1e9)
    for tfs, pos, vel in points:
        msg.points.append(
            JointTrajectoryPoint(
                positions=list(map(float, pos)),
                velocities=[] if vel is None else list(map(float, vel)),
                time_from_start=Duration(sec=int(tfs), nanosec=round((tfs % 1) * 1e9)),
            )
        )
    return msg


def test_trajectory_interpolation_like_joint_trajectory_controller() -> None:
    from diffusion_controller.sim.sim_node import trajectory_from_msg

    start = np.zeros(8)
    a, b = np.full(8, 1.0), np.full(8, 3.0)
    lin = trajectory_from_msg(_traj([(1.0, a, None), (2.0, b, None)]), 10.0, start, np.zeros(8))
    assert np.allclose(lin.sample(10.5)[0], 0.5)  # stamp 0 = start now, from the current state
    assert np.allclose(lin.sample(11.5)[0], 2.0) and np.allclose(lin.sample(11.5)[1], 2.0)
    assert np.allclose(lin.sample(99.0)[0], 3.0) and np.allclose(lin.sample(99.0)[1], 0.0)  # held
    assert np.allclose(lin.sample(9.0)[0], 0.0)
    va, vb = np.full(8, 2.0), np.zeros(8)
    cub = trajectory_from_msg(_traj([(1.0, a, va), (2.0, b, vb)]), 0.0, start, np.zeros(8))
    for t, pos, vel in ((1.0, a, va), (2.0, b, vb)):  # passes through points with their velocities
        p, v = cub.sample(t - 1e-7)
        assert np.allclose(p, pos, atol=1e-5) and np.allclose(v, vel, atol=1e-4)
    mid = cub.sample(1.5)[0]
    assert not np.allclose(mid, 2.0)  # cubic, not linear
    # a stamp in the future delays the start; joints are mapped by name
    names = list(reversed(JOINTS))
    q = np.arange(8.0) / 10
    later = trajectory_from_msg(_traj([(1.0, q[::-1], None)], names, stamp_s=5.0), 0.0, start, np.zeros(8))
    assert np.allclose(later.sample(4.0)[0], 0.0)
    assert np.allclose(later.sample(6.0)[0], q)


@pytest.mark.parametrize(
    "msg, why",
    [
        (_traj([(1.0, np.zeros(8), None)], names=JOINTS[:7]), "joint_names"),
        (_traj([(1.0, np.zeros(8), None), (1.0, np.zeros(8), None)]), "increase"),
        (_traj([(1.0, np.zeros(7), None)]), "positions"),
        (_traj([(1.0, np.zeros(8), None)], stamp_s=1.0), "past"),
        (_traj([(1.0, np.full(8, np.nan), None)]), "non-finite"),
    ],
)
def test_bad_trajectories_are_rejected_with_a_reason(msg, why) -> None:
    from diffusion_controller.sim.sim_node import trajectory_from_msg

    with pytest.raises(ValueError, match=why):
        trajectory_from_msg(msg, 5.0, np.zeros(8), np.zeros(8))


@pytest.mark.parametrize("namespace", ["", "/robot1"])
def test_shipped_params_file_is_what_the_node_runs_with(namespace: str) -> None:
    """Every key of config/sim.yaml is a declared parameter and takes effect (a typo would not), in the
    root namespace and in a robot's (a `sim_node:` key would only match /sim_node)."""
    from rcl_interfaces.srv import GetParameters
    from rclpy.parameter import parameter_value_to_python

    from diffusion_controller.ros.params_file import load_params_file

    path = Path(__file__).resolve().parents[1] / "config" / "sim.yaml"
    params = load_params_file(str(path), "/**/sim_node")
    cmd = [*SIM, "--ros-args", "--params-file", str(path), "-p", "real_time_factor:=0.0"]
    cmd += ["-r", f"__ns:={namespace}"] if namespace else []
    with NodeProcess(cmd) as proc, Probe("params_probe") as probe:
        request = GetParameters.Request(names=list(params))
        resp = probe.call(GetParameters, f"{namespace}/sim_node/get_parameters", request)
        assert resp is not None, proc.output()
        got = dict(zip(params, (parameter_value_to_python(v) for v in resp.values), strict=True))
        expected = {**params, "real_time_factor": 0.0}
        for name, value in expected.items():
            assert got[name] == pytest.approx(value), name
        assert proc.stop() == 0


def test_the_sensors_of_a_step_leave_before_its_clock() -> None:
    """A controller ticking on /clock conditions on the sensors of that instant (as ros2_control's
    broadcasters publish in the update the clock ticks): every sensor message due at a physics step is
    published before that step's /clock, so its age at the tick is the configured delay, not a step more.
    (The other order made the effort controller see 45 ms old sensors two ticks in three at 40 ms delay.)"""
    import rclpy
    from rclpy.parameter import Parameter

    from diffusion_controller.sim.sim_node import SimNode

    context = rclpy.Context()
    rclpy.init(context=context)
    try:
        params = {"obs_delay_s": 0.01, "physics_timestep": 0.0025, "clock_rate_hz": 400.0,
                  "joint_states_rate_hz": 200.0, "imu_rate_hz": 200.0, "odom_rate_hz": 200.0}
        overrides = [Parameter(k, value=v) for k, v in params.items()]
        node = SimNode(context=context, parameter_overrides=overrides)
        sent: list[tuple[str, float]] = []

        class Recorder:
            def __init__(self, topic: str) -> None:
                self.topic = topic

            def publish(self, msg) -> None:
                stamp = msg.clock if self.topic == "clock" else msg.header.stamp
                sent.append((self.topic, t_of(stamp)))

        for name in ("clock", "joints", "imu", "odom", "truth"):
            setattr(node, f"pub_{name}", Recorder(name))
        for _ in range(40):
            node.ant.step(0.0025)
            node._publish_due()
        node.destroy_node()
    finally:
        rclpy.shutdown(context=context)
    clocks = [i for i, (topic, _) in enumerate(sent) if topic == "clock"]
    assert len(clocks) == 40
    sensors = [(i, stamp) for i, (topic, stamp) in enumerate(sent) if topic in ("joints", "imu", "odom")]
    assert len(sensors) > 40
    for i in clocks:
        now = sent[i][1]
        late = [stamp for j, stamp in sensors if j > i and stamp + 0.01 <= now + 1e-9]
        assert not late, f"/clock {now:.4f} left before sensors stamped {late} (due at it)"


def test_the_pacer_never_bursts_clock_steps_and_keeps_real_time() -> None:
    """The physics loop's pacing (sim_node.Pacer) on a fake clock: steps of random cost, sleeps that
    overshoot, and stalls of up to 8 steps. Consecutive steps start at least half a step apart in wall
    time (a burst of /clock steps moved sim time a whole control period under a controller that keeps
    only the newest /clock, and its timer skipped that period), and without stalls the sim keeps the
    wall clock's pace."""
    from diffusion_controller.sim.sim_node import Pacer

    step = 0.0025
    rng = np.random.default_rng(0)
    now = [0.0]

    def sleep(s: float) -> None:
        now[0] += s + rng.uniform(0.0, 2e-4)  # Linux sleeps overshoot by tens of microseconds

    pacer = Pacer(step, clock=lambda: now[0], sleep=sleep)
    starts, stalled = [], 0.0
    for i in range(20000):
        starts.append(now[0])
        cost = rng.uniform(2e-4, 5e-4)
        if i % 500 == 250:  # a hiccup: the process was not scheduled for a while
            cost += rng.uniform(0.5, 8.0) * step
            stalled += cost
        now[0] += cost
        pacer.wait()
    gaps = np.diff(starts)
    assert gaps.min() >= step / 2
    assert np.mean(gaps) == pytest.approx(step, rel=0.01 + stalled / (len(gaps) * step))
    quiet = gaps[:240]  # before the first stall: the wall clock's pace, no drift from the overshoots
    assert np.mean(quiet) == pytest.approx(step, rel=0.01)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two CPUs")
def test_cpu_affinity_puts_every_thread_of_the_sim_on_its_cpus() -> None:
    """cpu_affinity:='1' (bench/closed_loop.py --rt-cpus): every thread of the sim (physics, executor,
    DDS) on CPU 1, so a controller pinned beside it stops with it when the machine holds that CPU."""
    with NodeProcess([*SIM, "--ros-args", "-p", "cpu_affinity:='1'"]) as proc, Probe("pin_probe") as probe:
        probe.subscribe("/clock", Clock)
        assert probe.wait_for("/clock", lambda m: len(m) > 20, timeout=30), proc.output()
        allowed = [cpus for cpus, _, _ in thread_cpus(proc.proc.pid)]
        assert len(allowed) > 3 and set(allowed) == {"1"}, allowed
        assert proc.stop(signal.SIGINT) == 0
