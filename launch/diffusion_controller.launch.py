"""Start the diffusion_controller lifecycle node with a robot config and a model.

    ros2 launch diffusion_controller diffusion_controller.launch.py \
        config:=/path/to/robot.yaml model_path:=/path/to/policy.onnx use_sim_time:=true namespace:=robot1

With autostart:=true (default) the node configures and activates itself; with false it waits in
`unconfigured` for a lifecycle manager (`ros2 lifecycle set /diffusion_controller configure`).
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import LifecycleNode
from launch_ros.parameter_descriptions import ParameterValue
from launch_ros.substitutions import FindPackageShare


def generate_launch_description() -> LaunchDescription:
    share = FindPackageShare("diffusion_controller")
    args = [
        DeclareLaunchArgument(
            "config",
            default_value=PathJoinSubstitution([share, "config", "ant.yaml"]),
            description="ROS params file of the node (observation sources, outputs, safety).",
        ),
        DeclareLaunchArgument(
            "model_path",
            default_value=PathJoinSubstitution([share, "models", "ant_locomotion.onnx"]),
            description="ONNX policy with its model card in the metadata.",
        ),
        DeclareLaunchArgument("use_sim_time", default_value="false", description="Follow /clock."),
        DeclareLaunchArgument("namespace", default_value="", description="Namespace of the node."),
        DeclareLaunchArgument("log_level", default_value="info", description="debug, info, warn, error."),
        DeclareLaunchArgument(
            "autostart", default_value="true", description="Configure and activate at startup."
        ),
    ]
    node = LifecycleNode(
        package="diffusion_controller",
        executable="controller_node",
        name="diffusion_controller",
        namespace=LaunchConfiguration("namespace"),
        output="screen",
        emulate_tty=True,
        parameters=[
            LaunchConfiguration("config"),
            {
                "model_path": ParameterValue(LaunchConfiguration("model_path"), value_type=str),
                "use_sim_time": ParameterValue(LaunchConfiguration("use_sim_time"), value_type=bool),
                "autostart": ParameterValue(LaunchConfiguration("autostart"), value_type=bool),
            },
        ],
        arguments=["--ros-args", "--log-level", LaunchConfiguration("log_level")],
    )
    return LaunchDescription([*args, node])
