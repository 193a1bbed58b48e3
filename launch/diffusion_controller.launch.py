"""Start the diffusion_controller lifecycle node with a robot config and a model.

    ros2 launch diffusion_controller diffusion_controller.launch.py \
        config:=/path/to/robot.yaml model_path:=/path/to/policy.onnx use_sim_time:=true namespace:=robot1

With autostart:=true (default) the node configures and activates itself; with false it waits in
`unconfigured` for a lifecycle manager (`ros2 lifecycle set /diffusion_controller configure`).
`namespace` moves the node and, because the shipped configs name topics relatively, its sensor and
command topics too. `policy_source:=remote` runs the robot half of a remote policy: no model is loaded (the
card of `model_path` is still read), chunks come from a `policy_node` (policy_node.launch.py, maybe on
another computer) on `policy/chunk`. `log_level` is the node's own (rcl and rmw keep theirs).
Everything else (provider, threads, blending, safety) is set in the config file.
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution, PythonExpression
from launch_ros.actions import LifecycleNode
from launch_ros.parameter_descriptions import ParameterValue
from launch_ros.substitutions import FindPackageShare

from diffusion_controller.ros.config import launch_default

NODE_NAME = "diffusion_controller"
LOG_LEVELS = ["debug", "info", "warn", "error", "fatal"]


def logger_name(node_name: str) -> PythonExpression:
    """The node's logger, `<namespace with dots>.<name>` as rcl names it (`robot1.diffusion_controller`), so
    `--log-level <logger>:=<level>` sets the node's level and not every logger's (rcl's debug output alone
    is thousands of lines). The namespace is the node's as launch_ros resolves it: a relative `namespace`
    goes below an enclosing PushRosNamespace (launch configuration `ros_namespace`)."""
    ns, base = LaunchConfiguration("namespace"), LaunchConfiguration("ros_namespace", default="")
    full = ["('", ns, "' if '", ns, "'.startswith('/') else '", base, "/", ns, "')"]
    return PythonExpression(["'.'.join([p for p in ", *full, f".split('/') if p] + ['{node_name}'])"])


def generate_launch_description() -> LaunchDescription:
    share = FindPackageShare("diffusion_controller")
    args = [
        DeclareLaunchArgument(
            "config",
            default_value=PathJoinSubstitution([share, "config", "ant.yaml"]),
            description="ROS params file of the node (observation sources, outputs, provider, safety).",
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
        DeclareLaunchArgument(
            "autostart",
            default_value=launch_default("autostart"),
            description="Configure and activate at startup.",
        ),
        DeclareLaunchArgument(
            "policy_source",
            default_value=launch_default("policy.source"),
            choices=["local", "remote"],
            description="local: run the model here; remote: take chunks from a policy_node.",
        ),
    ]
    node = LifecycleNode(
        package="diffusion_controller",
        executable="controller_node",
        name=NODE_NAME,
        namespace=LaunchConfiguration("namespace"),
        output="screen",
        emulate_tty=True,
        parameters=[
            LaunchConfiguration("config"),
            {
                "model_path": ParameterValue(LaunchConfiguration("model_path"), value_type=str),
                "use_sim_time": ParameterValue(LaunchConfiguration("use_sim_time"), value_type=bool),
                "autostart": ParameterValue(LaunchConfiguration("autostart"), value_type=bool),
                "policy.source": ParameterValue(LaunchConfiguration("policy_source"), value_type=str),
            },
        ],
        arguments=[
            "--ros-args", "--log-level", [logger_name(NODE_NAME), ":=", LaunchConfiguration("log_level")]
        ],
    )
    return LaunchDescription([*args, node])
