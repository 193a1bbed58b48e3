"""The simulated ant (MuJoCo stand-in for Gazebo + ros_gz_bridge + gz_ros2_control).

    ros2 launch diffusion_controller sim.launch.py [obs_delay_s:=0.05] [real_time_factor:=0.0]

Publishes /clock, joint_states, imu_sensor_broadcaster/imu, odom and sim_node/ground_truth; listens on
forward_position_controller/commands and joint_trajectory_controller/joint_trajectory; service
sim_node/reset. Those names are relative: `namespace:=robot1` moves them under /robot1. The node stamps
with its own sim time; use_sim_time only affects its logs. Its params file is `sim_config`, not
`config`, so that a launch file including this one beside diffusion_controller.launch.py (whose
`config` is the controller's) cannot hand the controller's file to the simulator by accident.
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution, PythonExpression
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue
from launch_ros.substitutions import FindPackageShare

NODE_NAME = "sim_node"
LOG_LEVELS = ["debug", "info", "warn", "error", "fatal"]


def logger_name(node_name: str) -> PythonExpression:
    """The node's logger (`robot1.sim_node`), so `log_level` is the node's and not rcl's too (as in
    diffusion_controller.launch.py)."""
    ns, base = LaunchConfiguration("namespace"), LaunchConfiguration("ros_namespace", default="")
    full = ["('", ns, "' if '", ns, "'.startswith('/') else '", base, "/", ns, "')"]
    return PythonExpression(["'.'.join([p for p in ", *full, f".split('/') if p] + ['{node_name}'])"])


def generate_launch_description() -> LaunchDescription:
    share = FindPackageShare("diffusion_controller")
    args = [
        DeclareLaunchArgument(
            "sim_config",
            default_value=PathJoinSubstitution([share, "config", "sim.yaml"]),
            description="Params file of sim_node (rates, sensor noise as in training, PD gains).",
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
        DeclareLaunchArgument(
            "namespace", default_value="", description="Namespace of the node and its relative topics."
        ),
        DeclareLaunchArgument(
            "log_level", default_value="info", choices=LOG_LEVELS, description="The node's log level."
        ),
    ]
    node = Node(
        package="diffusion_controller",
        executable="sim_node",
        name=NODE_NAME,
        namespace=LaunchConfiguration("namespace"),
        output="screen",
        emulate_tty=True,
        parameters=[
            LaunchConfiguration("sim_config"),
            {
                "obs_delay_s": ParameterValue(LaunchConfiguration("obs_delay_s"), value_type=float),
                "real_time_factor": ParameterValue(LaunchConfiguration("real_time_factor"), value_type=float),
                "use_sim_time": ParameterValue(LaunchConfiguration("use_sim_time"), value_type=bool),
            },
        ],
        arguments=[
            "--ros-args", "--log-level", [logger_name(NODE_NAME), ":=", LaunchConfiguration("log_level")]
        ],
    )
    return LaunchDescription([*args, node])
