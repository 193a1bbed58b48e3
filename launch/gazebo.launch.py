"""The ant in Gazebo (gz-sim Harmonic) with ros_gz and gz_ros2_control, for users who have them.

    ros2 launch diffusion_controller gazebo.launch.py
    ros2 launch diffusion_controller diffusion_controller.launch.py use_sim_time:=true   # beside it

Needs (apt, ROS 2 Jazzy): ros-jazzy-ros-gz, ros-jazzy-gz-ros2-control, ros-jazzy-ros2-controllers,
ros-jazzy-xacro, ros-jazzy-robot-state-publisher. Not run by this repository's tests (Gazebo cannot
run here); what can be checked without it (bridge arguments, frames, plugin names, the controllers
config/ant.yaml talks to) is checked by test/test_gazebo_files.py.

It exposes the topics the MuJoCo stand-in (sim.launch.py) does, so the controller runs unchanged:

- /clock through ros_gz_bridge (gz.msgs.Clock -> rosgraph_msgs/Clock);
- joint_states from joint_state_broadcaster, imu_sensor_broadcaster/imu from imu_sensor_broadcaster
  (the Gazebo IMU sensor ``imu_sensor`` on base_link; the world must run ``gz-sim-imu-system``, which
  worlds/ant_world.sdf does and gz-sim's empty.sdf does not);
- odom through ros_gz_bridge from the model's ``gz-sim-odometry-publisher-system`` (gz topic
  /model/<robot_name>/odometry, 3 dimensions, child frame ``base_link`` as config/ant.yaml expects:
  the system's default ``<model>/base_footprint`` would get every message dropped);
- forward_position_controller/commands (active) and joint_trajectory_controller/joint_trajectory
  (loaded inactive: both claim the joints' position interfaces; switch with
  ``ros2 control switch_controllers --activate joint_trajectory_controller
  --deactivate forward_position_controller``).

The robot is urdf/ant.urdf.xacro, generated from the MJCF the policy was trained on
(diffusion_controller/sim/urdf.py says what does not carry over to Gazebo), with the controllers of
config/ant_gz_controllers.yaml. One robot, in the root namespace.
"""

from launch import LaunchDescription
from launch.actions import (
    DeclareLaunchArgument,
    GroupAction,
    IncludeLaunchDescription,
    RegisterEventHandler,
)
from launch.event_handlers import OnProcessExit
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import Command, FindExecutable, LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue
from launch_ros.substitutions import FindPackageShare

#: Spawned and activated once the robot exists in Gazebo.
ACTIVE_CONTROLLERS = ("joint_state_broadcaster", "imu_sensor_broadcaster", "forward_position_controller")
#: Loaded and configured but left inactive (claims the same interfaces as forward_position_controller).
INACTIVE_CONTROLLERS = ("joint_trajectory_controller",)
SPAWN_Z = "0.6"  # m: the torso's height standing (legs at the URDF's initial positions) plus a margin


def generate_launch_description() -> LaunchDescription:
    share = FindPackageShare("diffusion_controller")
    use_sim_time = ParameterValue(LaunchConfiguration("use_sim_time"), value_type=bool)
    robot_name = LaunchConfiguration("robot_name")
    controllers = LaunchConfiguration("controllers")
    args = [
        DeclareLaunchArgument(
            "robot_description",
            default_value=PathJoinSubstitution([share, "urdf", "ant.urdf.xacro"]),
            description="URDF/xacro of the robot with gz_ros2_control, an IMU and odometry (see docstring).",
        ),
        DeclareLaunchArgument(
            "controllers",
            default_value=PathJoinSubstitution([share, "config", "ant_gz_controllers.yaml"]),
            description="ros2_control controllers file (xacro argument `controllers` and the spawners').",
        ),
        DeclareLaunchArgument(
            "world",
            default_value=PathJoinSubstitution([share, "worlds", "ant_world.sdf"]),
            description="Gazebo world; it must run gz-sim-imu-system for the IMU to publish.",
        ),
        DeclareLaunchArgument("robot_name", default_value="ant", description="Model name in Gazebo."),
        DeclareLaunchArgument(
            "use_sim_time",
            default_value="true",
            description="robot_state_publisher and the bridge follow /clock.",
        ),
    ]
    xacro = [FindExecutable(name="xacro"), " ", LaunchConfiguration("robot_description")]
    description = ParameterValue(Command([*xacro, " controllers:=", controllers]), value_type=str)
    robot_state_publisher = Node(
        package="robot_state_publisher",
        executable="robot_state_publisher",
        output="screen",
        parameters=[{"robot_description": description, "use_sim_time": use_sim_time}],
    )
    # gz_sim.launch.py sees only these two (not forwarded: its other arguments keep their defaults, and
    # `--show-args` of this file does not list arguments of that one that this one would override).
    gazebo = GroupAction(
        [
            IncludeLaunchDescription(
                PythonLaunchDescriptionSource(
                    PathJoinSubstitution([FindPackageShare("ros_gz_sim"), "launch", "gz_sim.launch.py"])
                )
            )
        ],
        scoped=True,
        forwarding=False,
        launch_configurations={"gz_args": ["-r ", LaunchConfiguration("world")], "on_exit_shutdown": "true"},
    )
    spawn = Node(
        package="ros_gz_sim",
        executable="create",
        output="screen",
        arguments=["-topic", "robot_description", "-name", robot_name, "-z", SPAWN_Z],
    )
    bridge = Node(
        package="ros_gz_bridge",
        executable="parameter_bridge",
        output="screen",
        arguments=[
            "/clock@rosgraph_msgs/msg/Clock[gz.msgs.Clock",
            ["/model/", robot_name, "/odometry@nav_msgs/msg/Odometry[gz.msgs.Odometry"],
        ],
        remappings=[(["/model/", robot_name, "/odometry"], "odom")],
        parameters=[{"use_sim_time": use_sim_time}],
    )
    spawners = [
        Node(
            package="controller_manager",
            executable="spawner",
            output="screen",
            arguments=[name, "--param-file", controllers, *(["--inactive"] if inactive else [])],
        )
        for names, inactive in ((ACTIVE_CONTROLLERS, False), (INACTIVE_CONTROLLERS, True))
        for name in names
    ]
    # Controllers can only be loaded once gz_ros2_control's controller manager exists, i.e. after the
    # robot was spawned.
    after_spawn = RegisterEventHandler(OnProcessExit(target_action=spawn, on_exit=spawners))
    return LaunchDescription([*args, robot_state_publisher, gazebo, spawn, bridge, after_spawn])
