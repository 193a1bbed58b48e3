"""The simulated ant (MuJoCo stand-in for Gazebo + ros_gz_bridge + gz_ros2_control).

    ros2 launch diffusion_controller sim.launch.py [obs_delay_s:=0.05] [real_time_factor:=0.0]

Publishes /clock, /joint_states, /imu_sensor_broadcaster/imu, /odom and /sim_node/ground_truth;
listens on /forward_position_controller/commands and /joint_trajectory_controller/joint_trajectory;
service /sim_node/reset. The node stamps with its own sim time; use_sim_time only affects its logs.
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue
from launch_ros.substitutions import FindPackageShare


def generate_launch_description() -> LaunchDescription:
    share = FindPackageShare("diffusion_controller")
    args = [
        DeclareLaunchArgument(
            "config",
            default_value=PathJoinSubstitution([share, "config", "sim.yaml"]),
            description="Params file of sim_node (rates, noise, PD gains).",
        ),
        DeclareLaunchArgument(
            "obs_delay_s",
            default_value="0.0",
            description="Sensor messages leave this long after their stamp.",
        ),
        DeclareLaunchArgument(
            "real_time_factor", default_value="1.0", description="Sim seconds per wall second; 0 = flat out."
        ),
        DeclareLaunchArgument("use_sim_time", default_value="true", description="Node clock follows /clock."),
        DeclareLaunchArgument("log_level", default_value="info", description="debug, info, warn, error."),
    ]
    node = Node(
        package="diffusion_controller",
        executable="sim_node",
        name="sim_node",
        output="screen",
        emulate_tty=True,
        parameters=[
            LaunchConfiguration("config"),
            {
                "obs_delay_s": ParameterValue(LaunchConfiguration("obs_delay_s"), value_type=float),
                "real_time_factor": ParameterValue(LaunchConfiguration("real_time_factor"), value_type=float),
                "use_sim_time": ParameterValue(LaunchConfiguration("use_sim_time"), value_type=bool),
            },
        ],
        arguments=["--ros-args", "--log-level", LaunchConfiguration("log_level")],
    )
    return LaunchDescription([*args, node])
