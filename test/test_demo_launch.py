"""launch_testing: demo.launch.py as `ros2 launch` users start it, with the arguments it shows.

Runs where launch_testing is installed and the package is installed (colcon test: the demo finds the
files it includes through the package's share directory); skips cleanly elsewhere. The same facts are
checked without launch by test_launch_files.py (statically) and test_namespaces.py (two namespaced
pairs over DDS). Two runs:

- `namespace:=robot1`: the simulator runs with its own params file (sim.yaml's sensor noise, not the
  controller's config), both nodes and their topics and clock are under /robot1, the controller is active
  on sim time and commands the simulator;
- `autostart:=false use_sim_time:=false`: both values reach the nodes that read them.
"""

from __future__ import annotations

import time
import unittest
from pathlib import Path

import pytest

pytest.importorskip("launch_testing")
pytest.importorskip("launch_ros")

import launch
import launch_testing
import launch_testing.actions
import launch_testing.asserts
import rclpy
import yaml
from launch.launch_description_sources import PythonLaunchDescriptionSource
from lifecycle_msgs.srv import GetState
from rcl_interfaces.srv import GetParameters
from rclpy.parameter import parameter_value_to_python
from std_msgs.msg import Float64MultiArray


def _share() -> Path:
    """The installed package's share directory; not installed -> skip (the demo includes by package)."""
    try:
        from ament_index_python.packages import PackageNotFoundError, get_package_share_directory
    except ImportError:
        pytest.skip("ament_index_python is not available", allow_module_level=True)
    try:
        return Path(get_package_share_directory("diffusion_controller"))
    except (PackageNotFoundError, OSError):  # OSError: no AMENT_PREFIX_PATH at all
        pytest.skip("diffusion_controller is not installed (colcon build)", allow_module_level=True)


SHARE = _share()
SIM_YAML = yaml.safe_load((SHARE / "config" / "sim.yaml").read_text())
SIM_NOISE = SIM_YAML["/**/sim_node"]["ros__parameters"]["noise"]
RUNS = [
    {"namespace": "robot1"},
    {"autostart": "false", "use_sim_time": "false"},
]


@pytest.mark.launch_test
@launch_testing.parametrize("arguments", RUNS)
def generate_test_description(arguments):
    demo = launch.actions.IncludeLaunchDescription(
        PythonLaunchDescriptionSource(str(SHARE / "launch" / "demo.launch.py")),
        launch_arguments={
            **arguments,
            "model_path": str(SHARE / "models" / "ant_locomotion.onnx"),  # one network pass
        }.items(),
    )
    return launch.LaunchDescription([demo, launch_testing.actions.ReadyToTest()])


class TestDemo(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        rclpy.init()
        cls.node = rclpy.create_node("test_demo_launch")

    @classmethod
    def tearDownClass(cls):
        cls.node.destroy_node()
        rclpy.shutdown()

    def call(self, srv_type, name: str, request):
        client = self.node.create_client(srv_type, name)
        self.assertTrue(client.wait_for_service(timeout_sec=30.0), name)
        future = client.call_async(request)
        rclpy.spin_until_future_complete(self.node, future, timeout_sec=10.0)
        return future.result()

    def parameters(self, node: str, names: list[str]) -> dict:
        response = self.call(GetParameters, f"{node}/get_parameters", GetParameters.Request(names=names))
        return dict(zip(names, (parameter_value_to_python(v) for v in response.values), strict=True))

    def test_arguments_reach_the_nodes_that_read_them(self, arguments):
        ns = f"/{arguments['namespace']}" if "namespace" in arguments else ""
        sim_time = arguments.get("use_sim_time", "true") == "true"
        autostart = arguments.get("autostart", "true") == "true"
        noise = self.parameters(f"{ns}/sim_node", [f"noise.{k}" for k in SIM_NOISE])
        self.assertEqual(noise, {f"noise.{k}": v for k, v in SIM_NOISE.items()})  # sim.yaml, not ant.yaml
        self.assertEqual(self.parameters(f"{ns}/sim_node", ["use_sim_time"]), {"use_sim_time": sim_time})
        params = self.parameters(f"{ns}/diffusion_controller", ["use_sim_time", "autostart"])
        self.assertEqual(params, {"use_sim_time": sim_time, "autostart": autostart})
        received: list = []
        self.node.create_subscription(
            Float64MultiArray, f"{ns}/forward_position_controller/commands", received.append, 10
        )
        end = time.monotonic() + (30.0 if autostart else 3.0)
        while time.monotonic() < end and len(received) < 50:
            rclpy.spin_once(self.node, timeout_sec=0.1)
        state = self.call(GetState, f"{ns}/diffusion_controller/get_state", GetState.Request())
        self.assertEqual(state.current_state.label, "active" if autostart else "unconfigured")
        if autostart:
            self.assertGreaterEqual(len(received), 50)
            graph = self.node
            commanded = graph.get_subscriptions_info_by_topic(f"{ns}/forward_position_controller/commands")
            self.assertIn("sim_node", {i.node_name for i in commanded})
            clock = graph.get_publishers_info_by_topic(f"{ns}/clock")
            self.assertEqual({(i.node_namespace, i.node_name) for i in clock}, {(ns or "/", "sim_node")})
        else:
            self.assertEqual(received, [])


@launch_testing.post_shutdown_test()
class TestShutdown(unittest.TestCase):
    def test_exit_codes(self, proc_info):
        # launch sends SIGINT at shutdown: both nodes exit 0.
        launch_testing.asserts.assertExitCodes(proc_info)
