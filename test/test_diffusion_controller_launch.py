"""launch_testing: diffusion_controller.launch.py as users start it (ros2_control_demos style).

Runs where launch_testing is installed (colcon test on a ROS 2 machine) and skips cleanly elsewhere; the
same behaviour (node up and active, commands flowing, clean exit on SIGINT) is covered without launch by
test_controller_node.py. A tiny model is generated into a temporary directory, so no shipped model is
needed; a sensor publisher inside the test feeds the node.
"""

from __future__ import annotations

import math
import tempfile
import threading
import time
import unittest
from pathlib import Path

import pytest

pytest.importorskip("launch_testing")
pytest.importorskip("launch_ros")

import launch
import launch_testing.actions
import launch_testing.asserts
import rclpy
from launch.launch_description_sources import PythonLaunchDescriptionSource
from lifecycle_msgs.srv import GetState
from nav_msgs.msg import Odometry
from sensor_msgs.msg import Imu, JointState
from std_msgs.msg import Float64MultiArray

ROOT = Path(__file__).resolve().parents[1]
JOINTS = ["hip_1", "ankle_1", "hip_2", "ankle_2", "hip_3", "ankle_3", "hip_4", "ankle_4"]


def _model() -> str:
    """The shipped model when there is one, else a tiny one (needs torch); no model -> skip."""
    shipped = ROOT / "models" / "ant_locomotion.onnx"
    if shipped.exists():
        return str(shipped)
    pytest.importorskip("torch")
    from tiny_models import make_tiny_model

    return str(make_tiny_model(Path(tempfile.mkdtemp(prefix="dc_launch_")), name="tiny_launch"))


MODEL = _model()


def _launch_file() -> str:
    """The installed launch file (colcon), else the one in this checkout."""
    try:
        from ament_index_python.packages import get_package_share_directory

        installed = Path(get_package_share_directory("diffusion_controller")) / "launch"
        if (installed / "diffusion_controller.launch.py").exists():
            return str(installed / "diffusion_controller.launch.py")
    except Exception:  # not installed: the checkout
        pass
    return str(ROOT / "launch" / "diffusion_controller.launch.py")


@pytest.mark.launch_test
def generate_test_description():
    controller = launch.actions.IncludeLaunchDescription(
        PythonLaunchDescriptionSource(_launch_file()),
        launch_arguments={
            "config": str(ROOT / "config" / "ant.yaml"),
            "model_path": MODEL,
            "use_sim_time": "false",
            "autostart": "true",
            "log_level": "info",
        }.items(),
    )
    return launch.LaunchDescription([controller, launch_testing.actions.ReadyToTest()])


class TestControllerRuns(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        rclpy.init()
        cls.node = rclpy.create_node("test_diffusion_controller_launch")

    @classmethod
    def tearDownClass(cls):
        cls.node.destroy_node()
        rclpy.shutdown()

    def _feed(self, stop: threading.Event) -> None:
        js = self.node.create_publisher(JointState, "/joint_states", 10)
        imu = self.node.create_publisher(Imu, "/imu_sensor_broadcaster/imu", 10)
        odom = self.node.create_publisher(Odometry, "/odom", 10)
        while not stop.is_set():
            stamp = self.node.get_clock().now().to_msg()
            m = JointState(name=JOINTS, position=[0.0] * 8, velocity=[0.0] * 8)
            m.header.stamp = stamp
            js.publish(m)
            i = Imu()
            i.header.stamp, i.orientation.w = stamp, 1.0
            imu.publish(i)
            o = Odometry()
            o.header.stamp, o.child_frame_id, o.pose.pose.orientation.w = stamp, "base_link", 1.0
            odom.publish(o)
            time.sleep(0.005)

    def test_node_is_active_and_commands_flow(self, proc_output):
        client = self.node.create_client(GetState, "/diffusion_controller/get_state")
        self.assertTrue(client.wait_for_service(timeout_sec=30.0))
        received: list = []
        self.node.create_subscription(
            Float64MultiArray, "/forward_position_controller/commands", received.append, 10
        )
        stop = threading.Event()
        feeder = threading.Thread(target=self._feed, args=(stop,), daemon=True)
        feeder.start()
        try:
            end = time.monotonic() + 30.0
            while time.monotonic() < end and len(received) < 50:
                rclpy.spin_once(self.node, timeout_sec=0.1)
            future = client.call_async(GetState.Request())
            rclpy.spin_until_future_complete(self.node, future, timeout_sec=10.0)
        finally:
            stop.set()
            feeder.join(2.0)
        self.assertEqual(future.result().current_state.label, "active")
        self.assertGreaterEqual(len(received), 50)
        for msg in received:
            self.assertEqual(len(msg.data), 8)
            self.assertTrue(all(math.isfinite(v) for v in msg.data))
        proc_output.assertWaitFor("active: publishing commands", timeout=5)


@launch_testing.post_shutdown_test()
class TestShutdown(unittest.TestCase):
    def test_exit_codes(self, proc_info):
        # launch sends SIGINT at shutdown: the node exits 0.
        launch_testing.asserts.assertExitCodes(proc_info)


