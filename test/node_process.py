"""Test helpers: start a node as a real process and talk to it over DDS from this pytest process.

`NodeProcess` owns one child process (killed by `stop()`, which tests call from fixture finalizers);
`Graph` is this process' own rclpy context with an executor spinning in a thread; `SensorFeeder`
publishes the demo robot's sensor streams at fixed rates and lets a test pause a stream or swap in bad
messages. The environment (ROS_DOMAIN_ID etc. from conftest.py) is inherited by the children.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import rclpy
from geometry_msgs.msg import Twist
from nav_msgs.msg import Odometry
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Imu, JointState

ROOT = Path(__file__).resolve().parents[1]


class NodeProcess:
    """A node started as `python -m <module> --ros-args ...`, its output in a log file."""

    def __init__(self, module: str, ros_args: list[str], log_path: Path) -> None:
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "w")  # noqa: SIM115 -- closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, "--ros-args", *ros_args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "RCUTILS_COLORIZED_OUTPUT": "0"},
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = 20.0) -> bool:
        return wait_until(lambda: text in self.log() or not self.alive(), timeout) and text in self.log()

    def stop(self, sig: int = signal.SIGINT, timeout: float = 15.0) -> int:
        """Send `sig`, wait, SIGKILL if it hangs; returns the exit code (-9 after a kill)."""
        if self.alive():
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode


def wait_until(predicate: Callable[[], bool], timeout: float, period: float = 0.02) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(period)
    return bool(predicate())


class Collector:
    """Every message of one topic with its receipt time (monotonic)."""

    def __init__(self) -> None:
        self.items: list[tuple[float, Any]] = []
        self._lock = threading.Lock()

    def __call__(self, msg: Any) -> None:
        with self._lock:
            self.items.append((time.monotonic(), msg))

    def since(self, t: float) -> list[Any]:
        with self._lock:
            return [m for r, m in self.items if r >= t]

    def timed_since(self, t: float) -> list[tuple[float, Any]]:
        with self._lock:
            return [(r, m) for r, m in self.items if r >= t]

    def last(self) -> Any:
        with self._lock:
            return self.items[-1][1] if self.items else None

    def count(self) -> int:
        with self._lock:
            return len(self.items)


class Graph:
    """This test process' side of the ROS graph: one node, spun in a background thread."""

    def __init__(self, name: str = "test_observer") -> None:
        self.context = Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node(name, context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self._clients: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        with contextlib.suppress(Exception):  # the context was shut down
            self.executor.spin()

    def collect(self, msg_type: type, topic: str, reliable: bool = True, depth: int = 1000) -> Collector:
        c = Collector()
        qos = QoSProfile(
            depth=depth, reliability=ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT
        )
        self.node.create_subscription(msg_type, topic, c, qos)
        return c

    def call(self, srv_type: type, name: str, request: Any, timeout: float = 10.0) -> Any:
        """Call a service and wait for the answer. Clients are kept: a fresh client may lose its first
        request while DDS still matches the reply path, so the first use waits a moment after discovery."""
        client = self._clients.get(name)
        if client is None:
            client = self.node.create_client(srv_type, name)
            if not client.wait_for_service(timeout_sec=timeout):
                self.node.destroy_client(client)
                raise TimeoutError(f"service {name} not available")
            time.sleep(0.3)
            self._clients[name] = client
        future = client.call_async(request)
        if not wait_until(future.done, timeout):
            raise TimeoutError(f"service {name} did not answer")
        return future.result()

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=1.0)
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)
        self._thread.join(2.0)


ANT_JOINTS = ("hip_1", "ankle_1", "hip_2", "ankle_2", "hip_3", "ankle_3", "hip_4", "ankle_4")


class SensorFeeder:
    """Publishes /joint_states, /imu_sensor_broadcaster/imu, /odom (and /cmd_vel once a second) at fixed
    rates, stamped with `clock()`. `paused` names streams to hold back; `override[stream]` may replace the
    message builder to inject bad input."""

    def __init__(
        self,
        graph: Graph,
        clock: Callable[[], float] = time.time,
        joint_hz: float = 200.0,
        imu_hz: float = 100.0,
        odom_hz: float = 50.0,
    ) -> None:
        node = graph.node
        self.clock = clock
        self.pubs = {
            "joint_states": node.create_publisher(JointState, "/joint_states", 10),
            "imu": node.create_publisher(Imu, "/imu_sensor_broadcaster/imu", 10),
            "odom": node.create_publisher(Odometry, "/odom", 10),
            "cmd_vel": node.create_publisher(Twist, "/cmd_vel", 10),
        }
        self.periods = {"joint_states": 1 / joint_hz, "imu": 1 / imu_hz, "odom": 1 / odom_hz, "cmd_vel": 1.0}
        self.paused: set[str] = set()
        self.override: dict[str, Callable[[float], Any]] = {}
        self.sent = dict.fromkeys(self.pubs, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def build(self, stream: str, t: float) -> Any:
        if stream in self.override:
            return self.override[stream](t)
        return getattr(self, f"_{stream}")(t)

    @staticmethod
    def stamp(msg: Any, t: float) -> None:
        ns = round(t * 1e9)
        msg.header.stamp.sec, msg.header.stamp.nanosec = ns // 1_000_000_000, ns % 1_000_000_000

    def _joint_states(self, t: float) -> JointState:
        msg = JointState()
        self.stamp(msg, t)
        msg.name = list(ANT_JOINTS)
        msg.position = [0.1 * math.sin(t + i) for i in range(len(ANT_JOINTS))]
        msg.velocity = [0.1 * math.cos(t + i) for i in range(len(ANT_JOINTS))]
        return msg

    def _imu(self, t: float) -> Imu:
        msg = Imu()
        self.stamp(msg, t)
        msg.header.frame_id = "imu_link"
        msg.orientation.w = 1.0
        msg.angular_velocity.z = 0.05 * math.sin(t)
        return msg

    def _odom(self, t: float) -> Odometry:
        msg = Odometry()
        self.stamp(msg, t)
        msg.header.frame_id, msg.child_frame_id = "odom", "base_link"
        msg.pose.pose.orientation.w = 1.0
        msg.twist.twist.linear.x = 0.2
        return msg

    def _cmd_vel(self, t: float) -> Twist:
        msg = Twist()
        msg.linear.x = 0.2
        return msg

    def _run(self) -> None:
        due = dict.fromkeys(self.pubs, time.monotonic())
        while not self._stop.is_set():
            now = time.monotonic()
            for stream, pub in self.pubs.items():
                if now >= due[stream]:
                    due[stream] = max(due[stream] + self.periods[stream], now)
                    if stream not in self.paused:
                        pub.publish(self.build(stream, self.clock()))
                        self.sent[stream] += 1
            time.sleep(max(0.0, min(due.values()) - time.monotonic()))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2.0)
