"""Start the policy node: the model on this computer (a GPU workstation), chunks to remote controllers.

    ros2 launch diffusion_controller policy_node.launch.py \
        config:=/path/to/robot.yaml model_path:=/path/to/policy.onnx use_sim_time:=false namespace:=robot1

The robot runs the other half: `ros2 launch diffusion_controller diffusion_controller.launch.py
policy_source:=remote` (same config and model file: the controller reads only its card). The policy node
reads the same params file as the controller (observation sources, provider, steps, seed); `namespace`
puts it beside one robot's topics. To serve several robots, list their namespaces in the params file
(`policy.robots: [robot1, robot2]`) and leave `namespace` empty. A `model_path` set swaps the model.
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution, PythonExpression
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue
from launch_ros.substitutions import FindPackageShare

NODE_NAME = "diffusion_policy"
LOG_LEVELS = ["debug", "info", "warn", "error", "fatal"]


def logger_name(node_name: str) -> PythonExpression:
    """The node's logger (`robot1.diffusion_policy`), so `log_level` is the node's and not rcl's too (as in
    diffusion_controller.launch.py)."""
    ns, base = LaunchConfiguration("namespace"), LaunchConfiguration("ros_namespace", default="")
    full = ["('", ns, "' if '", ns, "'.startswith('/') else '", base, "/", ns, "')"]
    return PythonExpression(["'.'.join([p for p in ", *full, f".split('/') if p] + ['{node_name}'])"])


def generate_launch_description() -> LaunchDescription:
    share = FindPackageShare("diffusion_controller")
    args = [
        DeclareLaunchArgument(
            "config",
            default_value=PathJoinSubstitution([share, "config", "ant.yaml"]),
            description="ROS params file (the controller's: observation sources, provider, steps).",
        ),
        DeclareLaunchArgument(
            "model_path",
            default_value=PathJoinSubstitution([share, "models", "ant_locomotion.onnx"]),
            description="ONNX policy with its model card in the metadata.",
        ),
        DeclareLaunchArgument("use_sim_time", default_value="false", description="Follow /clock."),
        DeclareLaunchArgument(
            "namespace", default_value="", description="Namespace of the node and its relative topics."
        ),
        DeclareLaunchArgument(
            "log_level", default_value="info", choices=LOG_LEVELS, description="The node's log level."
        ),
    ]
    node = Node(
        package="diffusion_controller",
        executable="policy_node",
        name=NODE_NAME,
        namespace=LaunchConfiguration("namespace"),
        output="screen",
        emulate_tty=True,
        parameters=[
            LaunchConfiguration("config"),
            {
                "model_path": ParameterValue(LaunchConfiguration("model_path"), value_type=str),
                "use_sim_time": ParameterValue(LaunchConfiguration("use_sim_time"), value_type=bool),
            },
        ],
        arguments=[
            "--ros-args", "--log-level", [logger_name(NODE_NAME), ":=", LaunchConfiguration("log_level")]
        ],
    )
    return LaunchDescription([*args, node])
