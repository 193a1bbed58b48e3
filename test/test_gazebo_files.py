"""Gazebo (gz-sim Harmonic + ros_gz + gz_ros2_control) files, checked without Gazebo.

Gazebo cannot run here, so what can go wrong between it and the controller is read from the files:
the URDF is the MJCF the policy was trained on; the plugins carry their Harmonic names; odometry's child
frame, the IMU's frame and the topics are the ones config/ant.yaml expects; the bridge arguments are in
ros_gz_bridge's `topic@ros_type[gz_type` form with type pairs it converts; every controller
config/ant.yaml talks to is configured and spawned with the joints in the node's order.
"""

from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import yaml
from launch_ast import LaunchFile, call_name, config_of

from diffusion_controller.ros import config as cf
from diffusion_controller.ros.params_file import load_params_file
from diffusion_controller.sim import urdf
from diffusion_controller.sim.ant import JOINTS, STANDING_POSE

ROOT = Path(__file__).resolve().parents[1]
URDF_PATH = ROOT / "urdf" / "ant.urdf.xacro"
ROBOT = ET.parse(URDF_PATH).getroot()
WORLD = ET.parse(ROOT / "worlds" / "ant_world.sdf").getroot()
CONTROLLERS = yaml.safe_load((ROOT / "config" / "ant_gz_controllers.yaml").read_text())
GAZEBO = LaunchFile(ROOT / "launch" / "gazebo.launch.py")
NODE = cf.NodeConfig.from_params(load_params_file(str(ROOT / "config" / "ant.yaml")))
SOURCES = {s.name: s for s in NODE.sources}

#: Harmonic (gz-sim 8) system plugins: library file -> class; `ignition-gazebo-*` are the old names.
HARMONIC_SYSTEMS = {
    "gz-sim-physics-system": "gz::sim::systems::Physics",
    "gz-sim-user-commands-system": "gz::sim::systems::UserCommands",
    "gz-sim-scene-broadcaster-system": "gz::sim::systems::SceneBroadcaster",
    "gz-sim-imu-system": "gz::sim::systems::Imu",
    "gz-sim-odometry-publisher-system": "gz::sim::systems::OdometryPublisher",
    "gz_ros2_control-system": "gz_ros2_control::GazeboSimROS2ControlPlugin",
}
#: ros_gz_bridge conversions used here (its README's table).
BRIDGE_TYPES = {"rosgraph_msgs/msg/Clock": "gz.msgs.Clock", "nav_msgs/msg/Odometry": "gz.msgs.Odometry"}
#: ros2_controllers' topics, relative to the controller's name.
CONTROLLER_TOPICS = {
    "joint_state_broadcaster/JointStateBroadcaster": "joint_states",  # published in the namespace, not ~/
    "imu_sensor_broadcaster/IMUSensorBroadcaster": "{name}/imu",
    "forward_command_controller/ForwardCommandController": "{name}/commands",
    "joint_trajectory_controller/JointTrajectoryController": "{name}/joint_trajectory",
}


def rpy_matrix(roll: float, pitch: float, yaw: float) -> np.ndarray:
    """URDF's rpy: R = Rz(yaw) Ry(pitch) Rx(roll)."""
    (cr, cp, cy), (sr, sp, sy) = np.cos([roll, pitch, yaw]), np.sin([roll, pitch, yaw])
    rx = np.array([[1, 0, 0], [0, cr, -sr], [0, sr, cr]])
    ry = np.array([[cp, 0, sp], [0, 1, 0], [-sp, 0, cp]])
    rz = np.array([[cy, -sy, 0], [sy, cy, 0], [0, 0, 1]])
    return rz @ ry @ rx


def plugins(root: ET.Element) -> dict[str, ET.Element]:
    """Gazebo system plugins by library (ros2_control's `<hardware><plugin>` has no filename)."""
    return {p.get("filename"): p for p in root.iter("plugin") if p.get("filename")}


def test_the_urdf_is_what_the_generator_makes_from_the_mjcf() -> None:
    assert URDF_PATH.read_text() == urdf.ant_urdf(), "run `python -m diffusion_controller.sim.urdf`"


def test_the_urdf_has_the_mjcf_robot() -> None:
    import mujoco

    from diffusion_controller.sim.ant import ant_xml_path

    m = mujoco.MjModel.from_xml_path(ant_xml_path())
    mass = sum(float(link.find("inertial/mass").get("value")) for link in ROBOT.iter("link"))
    assert mass == pytest.approx(float(m.body_mass.sum()), rel=1e-5)
    joints = {j.get("name"): j for j in ROBOT.findall("joint") if j.get("type") == "revolute"}
    assert sorted(joints) == sorted(JOINTS)
    for name, joint in joints.items():
        j = m.joint(name).id
        limit = joint.find("limit")
        assert [float(limit.get(k)) for k in ("lower", "upper")] == pytest.approx(m.jnt_range[j], abs=1e-5)
        axis = [float(x) for x in joint.find("axis").get("xyz").split()]
        assert axis == pytest.approx(m.jnt_axis[j], abs=1e-5)
    links = {link.get("name") for link in ROBOT.iter("link")}
    children = {j.find("child").get("link") for j in ROBOT.findall("joint")}
    assert links - children == {urdf.BASE_LINK}, "one tree rooted at base_link"
    # ankle_1's capsule runs from 0 0 0 to 0.4 0.4 0 (MJCF fromto): end spheres there, and the cylinder's
    # rpy turns its z axis along that line.
    shapes = ROBOT.find("link[@name='ankle_1_link']").findall("collision")
    ends = {c.find("origin").get("xyz") for c in shapes if c.find("geometry/sphere") is not None}
    assert ends == {"0 0 0", "0.4 0.4 0"}
    (cylinder,) = [c for c in shapes if c.find("geometry/cylinder") is not None]
    roll, pitch, yaw = (float(x) for x in cylinder.find("origin").get("rpy").split())
    z_axis = rpy_matrix(roll, pitch, yaw)[:, 2]
    assert abs(z_axis @ np.array([1.0, 1.0, 0.0]) / np.sqrt(2)) == pytest.approx(1.0)


def test_ros2_control_exposes_position_commands_and_the_imu() -> None:
    control = ROBOT.find("ros2_control")
    assert control.find("hardware/plugin").text == "gz_ros2_control/GazeboSimSystem"
    joints = control.findall("joint")
    assert [j.get("name") for j in joints] == list(JOINTS)
    for joint, standing in zip(joints, STANDING_POSE, strict=True):
        assert [c.get("name") for c in joint.findall("command_interface")] == ["position"]
        states = [s.get("name") for s in joint.findall("state_interface")]
        assert states == ["position", "velocity", "effort"]
        lo, hi = (float(joint.find(f"command_interface/param[@name='{k}']").text) for k in ("min", "max"))
        initial = float(joint.find("state_interface/param[@name='initial_value']").text)
        assert initial == pytest.approx(standing) and lo <= initial <= hi
    (sensor,) = control.findall("sensor")
    assert [s.get("name") for s in sensor.findall("state_interface")] == list(urdf.IMU_STATES)
    # The ros2_control sensor is the Gazebo IMU sensor of that name, on the link the broadcaster names.
    gz_imu = [(g.get("reference"), s) for g in ROBOT.findall("gazebo") for s in g.findall("sensor")]
    assert [(ref, s.get("name"), s.get("type")) for ref, s in gz_imu] == [("base_link", "imu_sensor", "imu")]
    assert sensor.get("name") == "imu_sensor"
    broadcaster = CONTROLLERS["imu_sensor_broadcaster"]["ros__parameters"]
    assert (broadcaster["sensor_name"], broadcaster["frame_id"]) == (sensor.get("name"), "base_link")


def test_plugins_have_their_harmonic_names_and_the_world_runs_the_imu_system() -> None:
    for root in (ROBOT, WORLD):
        for filename, plugin in plugins(root).items():
            assert filename in HARMONIC_SYSTEMS, filename
            assert plugin.get("name") == HARMONIC_SYSTEMS[filename], filename
    assert {"gz_ros2_control-system", "gz-sim-odometry-publisher-system"} <= set(plugins(ROBOT))
    # No IMU sensor publishes without the IMU system; spawning needs user commands.
    needed = {"gz-sim-imu-system", "gz-sim-physics-system", "gz-sim-user-commands-system"}
    assert needed <= set(plugins(WORLD))
    step = float(WORLD.find("world/physics/max_step_size").text)
    assert CONTROLLERS["controller_manager"]["ros__parameters"]["update_rate"] == pytest.approx(1 / step)
    control = plugins(ROBOT)["gz_ros2_control-system"]
    assert control.find("parameters").text == "$(arg controllers)"
    xacro_arg = ROBOT.find("{http://www.ros.org/wiki/xacro}arg")
    if xacro_arg is None:  # ElementTree keeps an undeclared prefix literally
        xacro_arg = ROBOT.find("xacro:arg")
    assert xacro_arg.get("default") == "$(find diffusion_controller)/config/ant_gz_controllers.yaml"


def test_odometry_carries_the_frame_the_node_accepts() -> None:
    odom = plugins(ROBOT)["gz-sim-odometry-publisher-system"]
    # Without <robot_base_frame> gz-sim uses <model>/base_footprint, and the node drops every message.
    assert odom.find("robot_base_frame").text == SOURCES["odom"].frame == "base_link"
    assert odom.find("dimensions").text == "3"  # 2 would leave out z and roll/pitch rates
    assert odom.find("odom_topic") is None  # so the gz topic is /model/<name>/odometry, bridged below


def bridge_arguments() -> list[list[ast.AST]]:
    """Each parameter_bridge argument as its parts (strings and substitutions)."""
    (bridge,) = [n for n in GAZEBO.nodes if n.literal("executable") == "parameter_bridge"]
    return [a.elts if isinstance(a, ast.List) else [a] for a in bridge.arguments]


def text_of(parts: list[ast.AST], robot_name: str) -> str:
    """The argument as launch performs it, `robot_name` (the argument, or a local holding it) substituted."""
    resolved = [GAZEBO.assigned(p.id) if isinstance(p, ast.Name) else p for p in parts]
    return "".join(robot_name if config_of(p) == "robot_name" else ast.literal_eval(p) for p in resolved)


def test_bridge_arguments_are_valid_and_feed_what_the_node_reads() -> None:
    (bridge,) = [n for n in GAZEBO.nodes if n.literal("executable") == "parameter_bridge"]
    robot_name = ast.literal_eval(GAZEBO.default("robot_name"))
    bridged = {}
    for parts in bridge_arguments():
        text = text_of(parts, robot_name)
        match = re.fullmatch(r"(/[\w/]+)@(\w+/msg/\w+)\[(gz\.msgs\.\w+)", text)
        assert match, f"not topic@ros_type[gz_type (gz -> ROS): {text}"
        topic, ros_type, gz_type = match.groups()
        assert BRIDGE_TYPES.get(ros_type) == gz_type, text
        bridged[topic] = ros_type
    odometry = f"/model/{robot_name}/odometry"  # the OdometryPublisher's default gz topic
    assert bridged == {"/clock": "rosgraph_msgs/msg/Clock", odometry: "nav_msgs/msg/Odometry"}
    # The odometry is remapped to the topic config/ant.yaml's odom source reads, of its type.
    remaps = next(k.value for k in bridge.call.keywords if k.arg == "remappings").elts
    ((src, dst),) = [(text_of(e.elts[0].elts, robot_name), ast.literal_eval(e.elts[1])) for e in remaps]
    assert src == odometry and dst == SOURCES["odom"].topic == "odom"
    assert cf.normalize_type(bridged[src]) == SOURCES["odom"].type


def spawned() -> dict[str, bool]:
    """Controller -> spawned active?"""
    active = GAZEBO.literal_constant("ACTIVE_CONTROLLERS")
    inactive = GAZEBO.literal_constant("INACTIVE_CONTROLLERS")
    spawners = [n for n in GAZEBO.nodes if n.literal("executable") == "spawner"]
    assert len(spawners) == 1 and call_name(spawners[0].call) == "Node"  # one per name (a comprehension)
    return {**dict.fromkeys(active, True), **dict.fromkeys(inactive, False)}


def test_every_controller_the_node_talks_to_is_configured_and_spawned() -> None:
    manager = CONTROLLERS["controller_manager"]["ros__parameters"]
    types = {name: body["type"] for name, body in manager.items() if isinstance(body, dict)}
    controllers = spawned()
    assert set(controllers) == set(types), "every configured controller is spawned, and only those"
    topics = {CONTROLLER_TOPICS[t].format(name=name): name for name, t in types.items()}
    wanted = {s.topic for s in NODE.sources if s.name != "cmd_vel"}  # cmd_vel is the operator's
    wanted |= {NODE.commands_topic} if NODE.commands_enabled else set()
    wanted |= {NODE.trajectory_topic} if NODE.trajectory_enabled else set()
    for topic in wanted:
        assert topic in topics or topic == "odom", f"{topic}: no Gazebo controller or bridge provides it"
    # The command controllers claim the same position interfaces: exactly one of them is active.
    commanders = [topics[t] for t in (NODE.commands_topic, NODE.trajectory_topic)]
    assert sorted(controllers[c] for c in commanders) == [False, True]
    assert controllers[topics[NODE.commands_topic]], "the node's per-tick commands reach an active controller"
    assert all(controllers[topics[s.topic]] for s in NODE.sources if s.topic in topics)


def test_command_controllers_take_the_nodes_joint_order() -> None:
    forward = CONTROLLERS["forward_position_controller"]["ros__parameters"]
    # config/ant.yaml sets no `joints`: the node publishes in the card's order, the ant's JOINTS.
    assert NODE.joints == ()
    assert forward["joints"] == list(JOINTS) and forward["interface_name"] == "position"
    trajectory = CONTROLLERS["joint_trajectory_controller"]["ros__parameters"]
    assert sorted(trajectory["joints"]) == sorted(JOINTS)
    assert trajectory["command_interfaces"] == ["position"]
    control_joints = [j.get("name") for j in ROBOT.find("ros2_control").findall("joint")]
    assert sorted(control_joints) == sorted(JOINTS)
