"""The demo: the simulated ant (sim.launch.py) and the controller driving it, both on sim time.

    ros2 launch diffusion_controller demo.launch.py [model_path:=...] [log_level:=info]
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, IncludeLaunchDescription
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.substitutions import FindPackageShare


def generate_launch_description() -> LaunchDescription:
    share = FindPackageShare("diffusion_controller")
    args = [
        DeclareLaunchArgument(
            "model_path",
            default_value=PathJoinSubstitution([share, "models", "ant_locomotion.onnx"]),
            description="ONNX policy with its model card in the metadata.",
        ),
        DeclareLaunchArgument(
            "config",
            default_value=PathJoinSubstitution([share, "config", "ant.yaml"]),
            description="Controller params file.",
        ),
        DeclareLaunchArgument("log_level", default_value="info", description="debug, info, warn, error."),
    ]
    sim = IncludeLaunchDescription(
        PythonLaunchDescriptionSource(PathJoinSubstitution([share, "launch", "sim.launch.py"])),
        launch_arguments={"log_level": LaunchConfiguration("log_level")}.items(),
    )
    controller = IncludeLaunchDescription(
        PythonLaunchDescriptionSource(
            PathJoinSubstitution([share, "launch", "diffusion_controller.launch.py"])
        ),
        launch_arguments={
            "config": LaunchConfiguration("config"),
            "model_path": LaunchConfiguration("model_path"),
            "use_sim_time": "true",
            "log_level": LaunchConfiguration("log_level"),
            "autostart": "true",
        }.items(),
    )
    return LaunchDescription([*args, sim, controller])
