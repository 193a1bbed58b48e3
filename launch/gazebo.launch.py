"""The ant in real Gazebo (gz sim) with gz_ros2_control, for users who have them installed.

    ros2 launch diffusion_controller gazebo.launch.py robot_description:=/path/to/ant.urdf.xacro

NOT exercised in this repository's tests (Gazebo, ros_gz and gz_ros2_control are not installed here);
it is written against the documented launch APIs of ros_gz_sim, ros_gz_bridge and controller_manager
and exposes the same topics as sim.launch.py, so the controller node runs unchanged on either:

- /clock through ros_gz_bridge (gz.msgs.Clock -> rosgraph_msgs/Clock);
- /joint_states from joint_state_broadcaster, /imu_sensor_broadcaster/imu from imu_sensor_broadcaster;
- /odom through ros_gz_bridge from the model's OdometryPublisher system (gz topic /model/ant/odometry);
- /forward_position_controller/commands (forward_command_controller, position interfaces).

The robot description (URDF or xacro) must carry the ant's links and joints (hip_1 ... ankle_4, limits
as in gymnasium's ant.xml), an IMU sensor named ``imu_sensor`` on base_link, the
``gz_ros2_control/GazeboSimSystem`` hardware with a position command interface per joint, the
``gz_ros2_control-system`` plugin pointing at a controllers file like::

    controller_manager:
      ros__parameters:
        update_rate: 500
        joint_state_broadcaster: {type: joint_state_broadcaster/JointStateBroadcaster}
        imu_sensor_broadcaster: {type: imu_sensor_broadcaster/IMUSensorBroadcaster}
        forward_position_controller: {type: forward_command_controller/ForwardCommandController}
    imu_sensor_broadcaster:
      ros__parameters: {sensor_name: imu_sensor, frame_id: base_link}
    forward_position_controller:
      ros__parameters:
        joints: [hip_1, ankle_1, hip_2, ankle_2, hip_3, ankle_3, hip_4, ankle_4]
        interface_name: position

and a ``gz-sim-odometry-publisher-system`` (dimensions 3) for /odom.
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, IncludeLaunchDescription, RegisterEventHandler
from launch.event_handlers import OnProcessExit
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import Command, LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue
from launch_ros.substitutions import FindPackageShare

CONTROLLERS = ("joint_state_broadcaster", "imu_sensor_broadcaster", "forward_position_controller")


def generate_launch_description() -> LaunchDescription:
    use_sim_time = ParameterValue(LaunchConfiguration("use_sim_time"), value_type=bool)
    args = [
        DeclareLaunchArgument(
            "robot_description", description="URDF or xacro of the ant with gz_ros2_control (see docstring)."
        ),
        DeclareLaunchArgument("world", default_value="empty.sdf", description="Gazebo world file."),
        DeclareLaunchArgument("robot_name", default_value="ant", description="Model name in Gazebo."),
        DeclareLaunchArgument("use_sim_time", default_value="true", description="Nodes follow /clock."),
    ]
    description = ParameterValue(
        Command(["xacro ", LaunchConfiguration("robot_description")]), value_type=str
    )
    robot_state_publisher = Node(
        package="robot_state_publisher",
        executable="robot_state_publisher",
        output="screen",
        parameters=[{"robot_description": description, "use_sim_time": use_sim_time}],
    )
    gazebo = IncludeLaunchDescription(
        PythonLaunchDescriptionSource(
            PathJoinSubstitution([FindPackageShare("ros_gz_sim"), "launch", "gz_sim.launch.py"])
        ),
        launch_arguments={"gz_args": ["-r ", LaunchConfiguration("world")]}.items(),
    )
    spawn = Node(
        package="ros_gz_sim",
        executable="create",
        output="screen",
        arguments=["-topic", "robot_description", "-name", LaunchConfiguration("robot_name"), "-z", "0.6"],
    )
    bridge = Node(
        package="ros_gz_bridge",
        executable="parameter_bridge",
        output="screen",
        arguments=[
            "/clock@rosgraph_msgs/msg/Clock[gz.msgs.Clock",
            [
                "/model/",
                LaunchConfiguration("robot_name"),
                "/odometry@nav_msgs/msg/Odometry[gz.msgs.Odometry",
            ],
        ],
        remappings=[(["/model/", LaunchConfiguration("robot_name"), "/odometry"], "/odom")],
        parameters=[{"use_sim_time": use_sim_time}],
    )
    spawners = [
        Node(
            package="controller_manager",
            executable="spawner",
            output="screen",
            arguments=[name, "--controller-manager", "/controller_manager"],
            parameters=[{"use_sim_time": use_sim_time}],
        )
        for name in CONTROLLERS
    ]
    # Controllers can only be loaded once gz_ros2_control's controller manager exists, i.e. after the
    # robot was spawned.
    after_spawn = RegisterEventHandler(OnProcessExit(target_action=spawn, on_exit=spawners))
    return LaunchDescription([*args, robot_state_publisher, gazebo, spawn, bridge, after_spawn])
