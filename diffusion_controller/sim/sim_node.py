"""ROS 2 node around the MuJoCo ant that speaks what Gazebo + ros_gz_bridge + gz_ros2_control speak.

Why: the controller node must not know whether it drives Gazebo, this stand-in or the robot, so the
topics, message fields, QoS and controller semantics are the ros2_control ones (DESIGN.md "Demo
robot and topics", REFERENCES.md):

- publishes ``/clock`` and stamps everything with the simulator's own time (the node is the clock, so
  it never waits on ``/clock`` itself); ``real_time_factor`` 1.0 paces to the wall clock, 0 runs as
  fast as possible;
- ``joint_states`` (JointState), ``imu_sensor_broadcaster/imu`` (Imu), ``odom`` (Odometry, frame
  ``odom``, child ``base_link``, twist in the child frame) at their own rates, with Gaussian noise;
  each message carries its measurement time and is published ``obs_delay_s`` later;
- ``forward_position_controller/commands`` (Float64MultiArray, joints in controller order; a wrong
  size or a non-finite value is logged and ignored; the last command is held forever);
- with ``drive:=effort`` instead: ``forward_effort_controller/commands`` (Float64MultiArray, joint
  torques in N m, clipped to the motors' 150 N m, held until the next one, as ros2_control's forward
  effort controller does); the motors are then plain torque motors, no PD servo in the physics;
- ``joint_trajectory_controller/joint_trajectory`` (JointTrajectory: joints by name, stamp 0 = now,
  linear between position-only points, cubic with velocities, a new one replaces the running one,
  the last point is held);
- ``~/reset`` (std_srvs/Trigger) and ``~/ground_truth`` (Odometry, noise- and delay-free).

Sensor and command names are relative, as gz_ros2_control's are, so a namespace (``-r __ns:=/robot1``)
moves them with the node and two simulated robots never share a topic. ``/clock`` is absolute (one
world, one clock, as in Gazebo); each of several stand-in sims is a world of its own, so give each its
own clock with ``-r /clock:=clock`` (the controller beside it takes the same remap).

Publishers and command subscribers are RELIABLE (a sensor-data subscriber still receives).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import signal
import sys
import threading
import time

import numpy as np
import rclpy
from builtin_interfaces.msg import Time
from nav_msgs.msg import Odometry
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy
from rclpy.signals import SignalHandlerOptions
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import Imu, JointState
from std_msgs.msg import Float64MultiArray
from std_srvs.srv import Trigger
from trajectory_msgs.msg import JointTrajectory

from diffusion_controller.ros.process import pin_process
from diffusion_controller.sim.ant import (
    JOINTS,
    N_JOINTS,
    STANDING_POSE,
    Ant,
    AntConfig,
    Measurement,
    SensorNoise,
)

EPS = 1e-9


def stamp(t: float) -> Time:
    """Seconds of sim time -> builtin_interfaces/Time."""
    ns = round(t * 1e9)
    return Time(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)


def to_seconds(t: Time) -> float:
    return t.sec + t.nanosec * 1e-9


@dataclasses.dataclass
class Knot:
    t: float  # absolute sim time
    pos: np.ndarray
    vel: np.ndarray | None  # None: a positions-only point


class TrajectoryPlayer:
    """joint_trajectory_controller sampling: from the current desired state through the points.

    Segments are linear when either end has no velocities, cubic Hermite when both have them; before
    the start the start state is held, after the end the last point (with zero velocity).
    """

    def __init__(self, knots: list[Knot]):
        self.knots = knots

    @property
    def end_time(self) -> float:
        return self.knots[-1].t

    def sample(self, t: float) -> tuple[np.ndarray, np.ndarray]:
        k = self.knots
        if t <= k[0].t:
            return k[0].pos.copy(), np.zeros_like(k[0].pos)
        if t >= k[-1].t:
            return k[-1].pos.copy(), np.zeros_like(k[-1].pos)
        i = max(j for j in range(len(k) - 1) if k[j].t <= t)
        a, b = k[i], k[i + 1]
        h = b.t - a.t
        if h <= EPS:
            return b.pos.copy(), np.zeros_like(b.pos)
        s = (t - a.t) / h
        if a.vel is None or b.vel is None:
            return a.pos + s * (b.pos - a.pos), (b.pos - a.pos) / h
        h00, h10, h01, h11 = 2 * s**3 - 3 * s**2 + 1, s**3 - 2 * s**2 + s, -2 * s**3 + 3 * s**2, s**3 - s**2
        pos = h00 * a.pos + h10 * h * a.vel + h01 * b.pos + h11 * h * b.vel
        d00, d10, d01, d11 = 6 * s**2 - 6 * s, 3 * s**2 - 4 * s + 1, -6 * s**2 + 6 * s, 3 * s**2 - 2 * s
        vel = (d00 * a.pos + d01 * b.pos) / h + d10 * a.vel + d11 * b.vel
        return pos, vel


def trajectory_from_msg(
    msg: JointTrajectory, now: float, start_pos: np.ndarray, start_vel: np.ndarray
) -> TrajectoryPlayer:
    """Validate a JointTrajectory like joint_trajectory_controller does; ValueError says why not."""
    names = list(msg.joint_names)
    if sorted(names) != sorted(JOINTS) or len(set(names)) != len(names):
        raise ValueError(f"joint_names must name each of {list(JOINTS)} once, got {names}")
    if not msg.points:
        raise ValueError("trajectory has no points")
    order = [names.index(j) for j in JOINTS]
    start = (
        now if (msg.header.stamp.sec == 0 and msg.header.stamp.nanosec == 0) else to_seconds(msg.header.stamp)
    )
    with_vel = bool(msg.points[0].velocities)
    knots = [Knot(start, start_pos.copy(), start_vel.copy() if with_vel else None)]
    last_tfs = -1.0
    for n, p in enumerate(msg.points):
        tfs = p.time_from_start.sec + p.time_from_start.nanosec * 1e-9
        if tfs <= last_tfs:
            raise ValueError(f"point {n}: time_from_start must increase strictly")
        last_tfs = tfs
        if len(p.positions) != N_JOINTS:
            raise ValueError(f"point {n}: {len(p.positions)} positions, expected {N_JOINTS}")
        if bool(p.velocities) != with_vel or (with_vel and len(p.velocities) != N_JOINTS):
            raise ValueError(f"point {n}: velocities must be given for all points and joints, or none")
        pos = np.asarray(p.positions, dtype=float)[order]
        vel = np.asarray(p.velocities, dtype=float)[order] if with_vel else None
        if not np.all(np.isfinite(pos)) or (vel is not None and not np.all(np.isfinite(vel))):
            raise ValueError(f"point {n}: non-finite value")
        knots.append(Knot(start + tfs, pos, vel))
    if knots[-1].t < now - EPS:
        raise ValueError("trajectory ends in the past")
    return TrajectoryPlayer(knots)


class Pacer:
    """Paces the physics steps to the wall clock: each step's end waits until its wall time.

    A step that ends late is not made up by running the next ones back to back: a burst of clock steps
    (two /clock messages 0.3 ms apart) moved sim time a whole control period under a controller whose
    /clock subscription keeps only the newest message (rclpy's: depth 1), and its timer skipped that
    period. So the sim catches up at most half a step (sleep overshoot, a short hiccup) and otherwise goes
    on from where it is, as a robot's clock never runs faster than the wall clock: its steps are then at
    least half a step apart in wall time, and the real-time factor dips below 1 only when the machine
    cannot keep up. `clock` and `sleep` are for tests."""

    def __init__(self, step_s: float, clock=time.monotonic, sleep=time.sleep) -> None:
        self.step_s, self._clock, self._sleep = step_s, clock, sleep
        self._due = clock() + step_s  # wall time the current step should end at

    def wait(self) -> None:
        """Called at the end of each step: sleep until it is due, or move the schedule if behind."""
        ahead = self._due - self._clock()
        if ahead > 0:
            self._sleep(ahead)
        elif ahead < -self.step_s / 2:
            self._due = self._clock()  # behind: go on from here
        self._due += self.step_s


def _param(node: Node, name: str, default, description: str):
    return node.declare_parameter(
        name, default, ParameterDescriptor(description=description, read_only=True)
    ).value


class SimNode(Node):
    """Owns the Ant; ``run()`` is the physics loop (main thread), callbacks run in an executor thread."""

    def __init__(self, **kwargs):
        super().__init__("sim_node", **kwargs)
        p = lambda *a: _param(self, *a)  # noqa: E731
        timestep = p("physics_timestep", 0.002, "Physics step in seconds (joint PD runs at this rate).")
        self.rtf = p("real_time_factor", 1.0, "Sim seconds per wall second; 0 = as fast as possible.")
        rates = {
            "clock": p("clock_rate_hz", 250.0, "/clock publication rate in sim time."),
            "joints": p("joint_states_rate_hz", 100.0, "joint_states rate (joint_state_broadcaster)."),
            "imu": p(
                "imu_rate_hz", 250.0, "imu_sensor_broadcaster/imu rate (a divisor of the physics rate)."
            ),
            "odom": p("odom_rate_hz", 50.0, "odom rate."),
            "truth": p("ground_truth_rate_hz", 50.0, "~/ground_truth rate (noise- and delay-free)."),
        }
        noise = SensorNoise(
            joint_position=p("noise.joint_position", 0.0, "Std of joint position noise, rad."),
            joint_velocity=p("noise.joint_velocity", 0.0, "Std of joint velocity noise, rad/s."),
            orientation=p("noise.orientation", 0.0, "Std of IMU orientation noise, rad."),
            angular_velocity=p("noise.angular_velocity", 0.0, "Std of IMU angular velocity noise, rad/s."),
            linear_velocity=p("noise.linear_velocity", 0.0, "Std of odometry twist noise, m/s."),
        )
        self.accel_noise = p("noise.linear_acceleration", 0.0, "Std of IMU acceleration noise, m/s^2.")
        self.delay = p("obs_delay_s", 0.0, "Sensor messages are published this long after their stamp.")
        seed = p("seed", 0, "Seed of sensor noise and reset randomization.")
        self.initial_pose = np.asarray(
            p("initial_pose", STANDING_POSE.tolist(), f"Initial joint targets, rad, order {list(JOINTS)}."),
            dtype=float,
        )
        self.randomize_reset = p("randomize_reset", False, "Random heading/joints/position on reset.")
        self.fall_reset = p("fall_reset", True, "Reset automatically after the ant lies fallen for 1 s.")
        self.cpu_affinity = p(
            "cpu_affinity", "", "CPUs of the sim's threads as a Linux CPU list ('1', '2-3'); empty = any. A "
            "controller under use_sim_time on the same CPUs stops with the sim when the machine holds them.",
        )
        self.drive = p("drive", "position", "Command interface: position (PD servos in the physics, "
                       "position commands) or effort (torque motors, forward_effort_controller).")
        if self.drive not in ("position", "effort"):
            raise ValueError(f"drive must be 'position' or 'effort', got {self.drive!r}")
        kp = p("kp", AntConfig.kp, "Joint PD stiffness, N m/rad (position interface).")
        kd = p("kd", AntConfig.kd, "Joint PD damping, N m s/rad.")
        if self.initial_pose.shape != (N_JOINTS,):
            raise ValueError(f"initial_pose needs {N_JOINTS} values, got {self.initial_pose.size}")
        if self.rtf < 0 or self.delay < 0 or timestep <= 0:
            raise ValueError("real_time_factor, obs_delay_s must be >= 0 and physics_timestep > 0")

        self.ant = Ant(AntConfig(timestep=timestep, kp=kp, kd=kd, noise=noise, seed=seed, drive=self.drive))
        self.ant.reset(randomize=self.randomize_reset, pose=self.initial_pose)
        self.periods = {k: (1.0 / v if v > 0 else None) for k, v in rates.items()}
        self.next_due = {k: 0.0 for k in rates}

        reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        self.pub_clock = self.create_publisher(Clock, "/clock", reliable)
        self.pub_joints = self.create_publisher(JointState, "joint_states", reliable)
        self.pub_imu = self.create_publisher(Imu, "imu_sensor_broadcaster/imu", reliable)
        self.pub_odom = self.create_publisher(Odometry, "odom", reliable)
        self.pub_truth = self.create_publisher(Odometry, "~/ground_truth", reliable)
        if self.drive == "effort":
            self.create_subscription(
                Float64MultiArray, "forward_effort_controller/commands", self._on_effort, reliable
            )
        else:
            self.create_subscription(
                Float64MultiArray, "forward_position_controller/commands", self._on_forward, reliable
            )
            self.create_subscription(
                JointTrajectory, "joint_trajectory_controller/joint_trajectory", self._on_trajectory, reliable
            )
        self.create_service(Trigger, "~/reset", self._on_reset)

        self.lock = threading.Lock()
        self.desired_pos = self.ant.target.copy()
        self.desired_vel = np.zeros(N_JOINTS)
        self.effort = np.zeros(N_JOINTS)  # drive effort: the torques held until the next command
        self.trajectory: TrajectoryPlayer | None = None
        self.reset_requested = False
        self.fallen_since: float | None = None
        self.outbox: collections.deque[tuple[float, object, object]] = collections.deque()
        self.stop = threading.Event()
        self.get_logger().info(
            f"ant sim: {1 / timestep:.0f} Hz physics, {self.drive} drive, real_time_factor {self.rtf}, "
            f"obs_delay {self.delay} s"
        )

    # ---- command callbacks (executor thread) -----------------------------------------------------
    def _on_forward(self, msg: Float64MultiArray) -> None:
        data = np.asarray(msg.data, dtype=float)
        if data.shape != (N_JOINTS,):
            self.get_logger().error(
                f"forward_position_controller: command has {data.size} values, expected {N_JOINTS}; ignored"
            )
            return
        if not np.all(np.isfinite(data)):
            self.get_logger().error("forward_position_controller: non-finite command; ignored")
            return
        with self.lock:
            self.trajectory = None
            self.desired_pos = data
            self.desired_vel = np.zeros(N_JOINTS)

    def _on_effort(self, msg: Float64MultiArray) -> None:
        data = np.asarray(msg.data, dtype=float)
        if data.shape != (N_JOINTS,) or not np.all(np.isfinite(data)):
            self.get_logger().error(
                f"forward_effort_controller: command must be {N_JOINTS} finite torques, got {data.size} "
                "values; ignored"
            )
            return
        with self.lock:
            self.effort = data

    def _on_trajectory(self, msg: JointTrajectory) -> None:
        with self.lock:
            now = self.ant.time
            if self.trajectory is not None:
                pos, vel = self.trajectory.sample(now)
            else:
                pos, vel = self.desired_pos, self.desired_vel
            try:
                self.trajectory = trajectory_from_msg(msg, now, pos, vel)
            except ValueError as e:
                self.get_logger().error(f"joint_trajectory_controller: trajectory rejected: {e}")

    def _on_reset(self, _req: Trigger.Request, resp: Trigger.Response) -> Trigger.Response:
        with self.lock:
            self.reset_requested = True
        resp.success = True
        resp.message = "reset scheduled at the next physics step"
        return resp

    # ---- physics loop (main thread) ------------------------------------------------------------
    def run(self) -> None:
        dt = self.ant.model.opt.timestep
        pacer = Pacer(dt / self.rtf) if self.rtf > 0 else None
        while not self.stop.is_set():
            with self.lock:
                if self.reset_requested:
                    self._reset("reset requested")
                if self.drive == "effort":
                    self.ant.set_effort(self.effort)
                else:
                    if self.trajectory is not None:
                        self.desired_pos, self.desired_vel = self.trajectory.sample(self.ant.time + dt)
                    self.ant.set_target(self.desired_pos)
            self.ant.step(dt)
            self._publish_due()
            self._check_fall()
            if pacer is not None:
                pacer.wait()

    def _reset(self, why: str) -> None:
        self.ant.reset(randomize=self.randomize_reset, pose=self.initial_pose, keep_time=True)
        self.trajectory = None
        self.desired_pos = self.ant.target.copy()
        self.desired_vel = np.zeros(N_JOINTS)
        self.effort = np.zeros(N_JOINTS)
        self.reset_requested = False
        self.fallen_since = None
        self.get_logger().warning(f"ant reset ({why})")

    def _check_fall(self) -> None:
        if not self.fall_reset:
            return
        if not self.ant.fallen():
            self.fallen_since = None
        elif self.fallen_since is None:
            self.fallen_since = self.ant.time
        elif self.ant.time - self.fallen_since > 1.0:
            with self.lock:
                self._reset("fallen")

    def _due(self, key: str, t: float) -> bool:
        period = self.periods[key]
        if period is None or t + EPS < self.next_due[key]:
            return False
        self.next_due[key] = max(self.next_due[key] + period, t - period / 2)
        return True

    def _publish_due(self) -> None:
        t = self.ant.time
        due = [k for k in ("joints", "imu", "odom", "truth") if self._due(k, t)]
        if due:
            m = self.ant.measure()
            for k in due:
                if k == "truth":
                    self.pub_truth.publish(self._odom(self.ant.ground_truth()))
                else:
                    pub, msg = {
                        "joints": (self.pub_joints, self._joint_state),
                        "imu": (self.pub_imu, self._imu),
                        "odom": (self.pub_odom, self._odom),
                    }[k]
                    self.outbox.append((t + self.delay, pub, msg(m)))
        while self.outbox and self.outbox[0][0] <= t + EPS:
            _, pub, msg = self.outbox.popleft()
            pub.publish(msg)
        # The step's sensors first, then its /clock: a controller ticking on /clock has the sensors of that
        # instant, as ros2_control's broadcasters publish in the update the clock ticks.
        if self._due("clock", t):
            self.pub_clock.publish(Clock(clock=stamp(t)))

    # ---- messages ------------------------------------------------------------------------------
    def _joint_state(self, m: Measurement) -> JointState:
        msg = JointState()
        msg.header.stamp = stamp(m.t)
        msg.name = list(JOINTS)
        msg.position = m.joint_position.tolist()
        msg.velocity = m.joint_velocity.tolist()
        msg.effort = self.ant.joint_torque().tolist()
        return msg

    def _imu(self, m: Measurement) -> Imu:
        msg = Imu()
        msg.header.stamp = stamp(m.t)
        msg.header.frame_id = "base_link"
        x, y, z, w = m.orientation
        msg.orientation.x, msg.orientation.y, msg.orientation.z, msg.orientation.w = x, y, z, w
        msg.angular_velocity.x, msg.angular_velocity.y, msg.angular_velocity.z = m.angular_velocity.tolist()
        acc = self.ant.specific_force() + self.ant.rng.normal(size=3) * self.accel_noise
        msg.linear_acceleration.x, msg.linear_acceleration.y, msg.linear_acceleration.z = acc.tolist()
        n = self.ant.cfg.noise
        msg.orientation_covariance = _diag3(n.orientation**2)
        msg.angular_velocity_covariance = _diag3(n.angular_velocity**2)
        msg.linear_acceleration_covariance = _diag3(self.accel_noise**2)
        return msg

    def _odom(self, m: Measurement) -> Odometry:
        msg = Odometry()
        msg.header.stamp = stamp(m.t)
        msg.header.frame_id = "odom"
        msg.child_frame_id = "base_link"
        pose = msg.pose.pose
        pose.position.x, pose.position.y, pose.position.z = m.position.tolist()
        x, y, z, w = m.orientation
        pose.orientation.x, pose.orientation.y, pose.orientation.z, pose.orientation.w = x, y, z, w
        tw = msg.twist.twist
        tw.linear.x, tw.linear.y, tw.linear.z = m.linear_velocity.tolist()
        tw.angular.x, tw.angular.y, tw.angular.z = m.angular_velocity.tolist()
        return msg


def _diag3(v: float) -> list[float]:
    return [v, 0.0, 0.0, 0.0, v, 0.0, 0.0, 0.0, v]


def main(args: list[str] | None = None) -> int:
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    try:
        node = SimNode()
    except ValueError as e:
        print(f"sim_node: bad parameters: {e}", file=sys.stderr)
        rclpy.try_shutdown()
        return 2
    if node.cpu_affinity:
        _, why = pin_process(node.cpu_affinity)
        if why is not None:
            node.get_logger().error(f"cpu_affinity {node.cpu_affinity!r} not applied: {why}")
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: node.stop.set())
    executor = SingleThreadedExecutor()
    executor.add_node(node)

    def spin() -> None:
        """Spin until the node stops: the thread leaves the executor by itself, before the context is
        shut down (shutting it down under a spinning executor raised RCLError 'the given context is not
        valid' from this thread on Ctrl-C)."""
        with contextlib.suppress(ExternalShutdownException):
            while not node.stop.is_set() and rclpy.ok():
                executor.spin_once(timeout_sec=0.1)

    spinner = threading.Thread(target=spin, daemon=True)
    spinner.start()
    try:
        node.run()
    finally:
        # A second signal must not interrupt the cleanup: Ctrl-C under `ros2 launch` reaches the node
        # twice (the terminal signals the whole process group, then launch signals each process).
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        node.stop.set()
        spinner.join(timeout=5.0)  # within one spin_once timeout (plus a callback in progress)
        executor.shutdown(timeout_sec=1.0)
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
