"""The demo: the simulated ant (sim.launch.py) and the controller driving it, both on the sim's clock.

    ros2 launch diffusion_controller demo.launch.py [model_path:=...] [namespace:=robot1] [log_level:=info]
    ros2 launch diffusion_controller demo.launch.py policy_source:=remote   # + policy_node.launch.py

Every argument shown here is handed to the included files explicitly, each include in a scope of its
own: launch configurations are global to a launch, so an include would otherwise read whatever the
including file or the other include set under the same name (the controller's `config` used to reach
the simulator, which then ran without its sensor noise). The simulator takes `sim_config`; the
controller takes `config`.

With a namespace, both nodes and their topics move under it, and so does the clock: the sim publishes
and both nodes follow `<namespace>/clock`, so several demos can share one graph, each robot in a world
of its own. (In Gazebo, robots in one world share its /clock.)
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, GroupAction, IncludeLaunchDescription
from launch.conditions import IfCondition
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution, PythonExpression
from launch_ros.actions import SetRemap
from launch_ros.substitutions import FindPackageShare

from diffusion_controller.ros.config import launch_default

LOG_LEVELS = ["debug", "info", "warn", "error", "fatal"]


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
            description="The controller's params file.",
        ),
        DeclareLaunchArgument(
            "sim_config",
            default_value=PathJoinSubstitution([share, "config", "sim.yaml"]),
            description="The simulator's params file (rates, sensor noise as in training, PD gains).",
        ),
        DeclareLaunchArgument(
            "obs_delay_s", default_value="0.0", description="Simulated sensor delay (s)."
        ),
        DeclareLaunchArgument(
            "real_time_factor", default_value="1.0", description="Sim seconds per wall second."
        ),
        DeclareLaunchArgument(
            "use_sim_time",
            default_value="true",
            description="Both nodes follow the sim's clock. The sim stamps its messages in sim time, so "
            "with false the controller finds every observation stale and holds still.",
        ),
        DeclareLaunchArgument(
            "autostart",
            default_value=launch_default("autostart"),
            description="The controller configures and activates itself; false: it waits in unconfigured.",
        ),
        DeclareLaunchArgument(
            "namespace", default_value="", description="Namespace of both nodes, their topics and clock."
        ),
        DeclareLaunchArgument(
            "log_level", default_value="info", choices=LOG_LEVELS, description="Both nodes' log level."
        ),
        DeclareLaunchArgument(
            "policy_source",
            default_value=launch_default("policy.source"),
            choices=["local", "remote"],
            description="remote: the policy in a policy_node process of its own, chunks over DDS.",
        ),
    ]

    def include(launch_file: str, arguments: list[str], condition: IfCondition | None = None) -> GroupAction:
        """`launch_file` with exactly `arguments` passed on, in a scope that ends with it; the clock is
        the namespace's (`clock` resolves to /clock without one)."""
        source = PythonLaunchDescriptionSource(PathJoinSubstitution([share, "launch", launch_file]))
        passed = {name: LaunchConfiguration(name) for name in arguments}
        return GroupAction(
            [
                SetRemap(src="/clock", dst="clock"),
                IncludeLaunchDescription(source, launch_arguments=passed.items()),
            ],
            scoped=True,
            condition=condition,
        )

    sim = include(
        "sim.launch.py",
        ["sim_config", "obs_delay_s", "real_time_factor", "use_sim_time", "namespace", "log_level"],
    )
    controller = include(
        "diffusion_controller.launch.py",
        ["config", "model_path", "use_sim_time", "autostart", "namespace", "log_level", "policy_source"],
    )
    remote = IfCondition(PythonExpression(["'", LaunchConfiguration("policy_source"), "' == 'remote'"]))
    policy = include(
        "policy_node.launch.py", ["config", "model_path", "use_sim_time", "namespace", "log_level"], remote
    )
    return LaunchDescription([*args, sim, controller, policy])
