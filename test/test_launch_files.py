"""The launch files as `ros2 launch` users meet them, read from their syntax trees (launch is absent here).

What launch_testing would show by running them, checked statically: every argument a file declares is
used and goes where it says (a node parameter the node declares, of the right type, or an include that
declares it), the demo hands each include exactly the arguments it reads (launch configurations are
global: an include reads whatever else is set under its names), `log_level` is the node's logger's level,
and every argument the README, the launch files' own docstrings and the config template pass exists.
test_diffusion_controller_launch.py runs the controller's launch file where launch_testing is installed.
"""

from __future__ import annotations

import ast
import math
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest
import yaml
from launch_ast import LAUNCH_ROS_CONFIGS, LaunchFile, call_name, config_of, keyword, launch_commands

from diffusion_controller.ros import config as cf
from diffusion_controller.ros.controller_node import NODE_NAME as CONTROLLER_NAME
from diffusion_controller.ros.params_file import load_params_file

ROOT = Path(__file__).resolve().parents[1]
FILES = {p.name: LaunchFile(p) for p in sorted((ROOT / "launch").glob("*.launch.py"))}
CONTROLLER, SIM, DEMO, POLICY = (FILES[f"{n}.launch.py"] for n in ("diffusion_controller", "sim", "demo",
                                                                    "policy_node"))
#: Parameters rclpy declares on every node.
ROS_OWN = {"use_sim_time"}
#: The Python type a ParameterValue(value_type=...) names for a parameter kind; the controller's kinds
#: are ROS type names (config.KINDS), sim_node's Python ones.
TYPES = {**{k: v for k, v in cf.KINDS.items() if "[" not in v}, "str": "str", "float": "float"}


def sim_node_parameters() -> set[str]:
    """Names sim_node declares: the first argument of each `p("name", default, description)` call."""
    tree = ast.parse((ROOT / "diffusion_controller" / "sim" / "sim_node.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SimNode")
    return {
        n.args[0].value
        for n in ast.walk(cls)
        if call_name(n) == "p" and n.args and isinstance(n.args[0], ast.Constant)
    } | ROS_OWN


SIM_PARAMS = sim_node_parameters()


def controller_parameter_kind(name: str) -> str | None:
    if name in ROS_OWN:
        return "bool"
    spec = cf.spec_for(name)
    return None if spec is None else spec.kind


def share_path(f: LaunchFile, node: ast.AST | None) -> Path:
    """The file a `PathJoinSubstitution([FindPackageShare("diffusion_controller"), "a", "b"])` names."""
    assert call_name(node) == "PathJoinSubstitution", ast.dump(node) if node else None
    first, *rest = node.args[0].elts
    if isinstance(first, ast.Name):  # share = FindPackageShare(...)
        first = f.assigned(first.id)
    assert call_name(first) == "FindPackageShare"
    assert ast.literal_eval(first.args[0]) == "diffusion_controller"
    return ROOT.joinpath(*(ast.literal_eval(p) for p in rest))


@pytest.mark.parametrize("name", FILES)
def test_every_declared_argument_is_used_and_every_read_one_declared(name: str) -> None:
    f = FILES[name]
    assert f.declared, name
    used = f.used | ({n for names in demo_includes().values() for n in names} if f is DEMO else set())
    assert set(f.declared) - used == set(), f"{name}: declared but never used"
    assert f.used - set(f.declared) - LAUNCH_ROS_CONFIGS == set(), f"{name}: read but not declared"


def test_controller_launch_passes_each_argument_to_a_node_parameter_of_its_type() -> None:
    (node,) = CONTROLLER.nodes
    assert call_name(node.call) == "LifecycleNode"
    assert node.literal("executable") == "controller_node"
    assert ast.literal_eval(CONTROLLER.constant("NODE_NAME")) == CONTROLLER_NAME
    assert config_of(keyword(node.call, "namespace")) == "namespace"
    assert node.parameter_files == ["config"]  # the params file first, the arguments override it
    params = node.parameter_dicts
    assert set(params) == {"model_path", "use_sim_time", "autostart", "policy.source"}
    for name, value in params.items():
        kind = controller_parameter_kind(name)
        assert kind is not None, f"{name} is not a parameter of the node"
        argument = name.replace(".", "_")  # launch argument policy_source -> parameter policy.source
        assert config_of(value) == argument, f"parameter {name} takes argument {config_of(value)}"
        assert keyword(value, "value_type").id == TYPES[kind], name
    assert share_path(CONTROLLER, CONTROLLER.default("config")) == ROOT / "config" / "ant.yaml"
    assert share_path(CONTROLLER, CONTROLLER.default("model_path")) == ROOT / "models" / "ant_locomotion.onnx"
    assert (ROOT / "models" / "ant_locomotion.onnx").exists()
    assert CONTROLLER.choices("policy_source") == list(cf.POLICY_SOURCES)
    # The shipped params file holds only parameters the node declares.
    assert cf.unknown_parameters(load_params_file(str(ROOT / "config" / "ant.yaml"))) == []


def test_arguments_that_set_a_node_parameter_take_its_default_from_the_specification() -> None:
    """A launch argument passed on as a node parameter overrides the params file, so its default must be
    the parameter's own: read from the specification (`launch_default`), never written again."""
    for f in (CONTROLLER, DEMO):
        for argument in ("autostart", "policy_source"):
            default = f.default(argument)
            assert call_name(default) == "launch_default", (f.path.name, argument)
            parameter = ast.literal_eval(default.args[0])
            assert parameter.replace(".", "_") == argument, (f.path.name, argument)
            assert cf.launch_default(parameter) in ("true", "false", *(cf.spec_for(parameter).choices or ()))


def test_policy_launch_passes_each_argument_to_a_node_parameter_of_its_type() -> None:
    from diffusion_controller.ros.policy_node import NODE_NAME as POLICY_NAME

    f = FILES["policy_node.launch.py"]
    (node,) = f.nodes
    assert node.literal("executable") == "policy_node"
    assert ast.literal_eval(f.constant("NODE_NAME")) == POLICY_NAME
    assert node.parameter_files == ["config"]
    params = node.parameter_dicts
    assert set(params) == {"model_path", "use_sim_time"}
    for name, value in params.items():
        assert config_of(value) == name
        assert keyword(value, "value_type").id == TYPES[controller_parameter_kind(name)], name
    assert share_path(f, f.default("config")) == ROOT / "config" / "ant.yaml"


def test_sim_launch_passes_each_argument_to_a_sim_node_parameter() -> None:
    (node,) = SIM.nodes
    assert node.literal("executable") == "sim_node"
    assert ast.literal_eval(SIM.constant("NODE_NAME")) == "sim_node"
    assert config_of(keyword(node.call, "namespace")) == "namespace"
    assert node.parameter_files == ["sim_config"]
    for name, value in node.parameter_dicts.items():
        assert name in SIM_PARAMS, f"{name} is not a sim_node parameter"
        assert config_of(value) == name
    sim_yaml = share_path(SIM, SIM.default("sim_config"))
    assert sim_yaml == ROOT / "config" / "sim.yaml"
    (key,) = yaml.safe_load(sim_yaml.read_text())
    assert key == "/**/sim_node", "the params file must reach sim_node in any namespace"
    body = yaml.safe_load(sim_yaml.read_text())[key]["ros__parameters"]
    flat: set[str] = set()
    for k, v in body.items():
        flat |= {f"{k}.{kk}" for kk in v} if isinstance(v, dict) else {k}
    assert flat <= SIM_PARAMS, flat - SIM_PARAMS


def demo_includes() -> dict[str, list[str]]:
    """Included file -> the argument names demo.launch.py hands it (its `include(file, [names])` calls)."""
    return {
        ast.literal_eval(n.args[0]): ast.literal_eval(n.args[1])
        for n in ast.walk(DEMO.tree)
        if call_name(n) == "include"
    }


def test_demo_hands_each_include_exactly_the_arguments_that_file_declares() -> None:
    includes = demo_includes()
    assert set(includes) == {"sim.launch.py", "diffusion_controller.launch.py", "policy_node.launch.py"}
    for file, names in includes.items():
        assert sorted(names) == sorted(FILES[file].declared), file
        assert set(names) <= set(DEMO.declared), file
    assert set(DEMO.declared) == {n for names in includes.values() for n in names}
    # The controller's `config` never reaches the simulator: it reads `sim_config`.
    assert "config" not in includes["sim.launch.py"]
    # Same defaults where the demo shows a file or a choice of an included file.
    for file, names in includes.items():
        for name in names:
            if call_name(DEMO.default(name)) == "PathJoinSubstitution":
                demo_default = share_path(DEMO, DEMO.default(name))
                assert demo_default == share_path(FILES[file], FILES[file].default(name)), name
            assert DEMO.choices(name) == FILES[file].choices(name), name


def test_demo_scopes_each_include_and_gives_it_the_namespaces_clock() -> None:
    include = next(n for n in DEMO.tree.body if isinstance(n, ast.FunctionDef)).body
    helper = next(n for n in ast.walk(ast.Module(body=include, type_ignores=[]))
                  if isinstance(n, ast.FunctionDef) and n.name == "include")  # fmt: skip
    group = next(n for n in ast.walk(helper) if call_name(n) == "GroupAction")
    assert ast.literal_eval(keyword(group, "scoped")) is True
    remap = next(n for n in ast.walk(group) if call_name(n) == "SetRemap")
    assert ast.literal_eval(keyword(remap, "src")) == "/clock"
    assert ast.literal_eval(keyword(remap, "dst")) == "clock"  # relative: <namespace>/clock
    include_call = next(n for n in ast.walk(group) if call_name(n) == "IncludeLaunchDescription")
    assert keyword(include_call, "launch_arguments") is not None


class _Config:
    """Stand-in for launch's LaunchConfiguration: performs to a value given per test."""

    values: ClassVar[dict[str, str]] = {}

    def __init__(self, name: str, default: str | None = None) -> None:
        self.name, self.default = name, default

    def __str__(self) -> str:
        return self.values.get(self.name, self.default or "")


def logger_of(f: LaunchFile, namespace: str, pushed: str) -> str:
    """What the file's `logger_name(NODE_NAME)` substitution performs to, evaluated the way launch's
    PythonExpression does (eval with math's names as locals)."""
    _Config.values = {"namespace": namespace, "ros_namespace": pushed}
    build = f.function("logger_name", LaunchConfiguration=_Config, PythonExpression=lambda parts: parts)
    text = "".join(str(part) for part in build(f.literal_constant("NODE_NAME")))
    return str(eval(text, {}, vars(math)))  # the file's own expression


def node_namespace(namespace: str, pushed: str) -> str:
    """The namespace launch_ros gives a node (`namespace` below an enclosing PushRosNamespace)."""
    if namespace.startswith("/"):
        return namespace
    return "/" + "/".join(p for p in (pushed + "/" + namespace).split("/") if p)


@pytest.mark.parametrize("f", [CONTROLLER, SIM, POLICY], ids=["controller", "sim", "policy_node"])
def test_log_level_sets_the_nodes_own_logger(f: LaunchFile) -> None:
    """`--log-level <logger>:=<level>` with the logger rcl gives the node in its namespace: a bare
    `--log-level debug` would set every logger (rcl's debug output alone is thousands of lines)."""
    (node,) = f.nodes
    args = node.arguments
    assert [ast.literal_eval(a) for a in args[:2]] == ["--ros-args", "--log-level"]
    logger, sep, level = args[2].elts
    assert call_name(logger) == "logger_name" and ast.literal_eval(sep) == ":="
    assert config_of(level) == "log_level"
    assert f.choices("log_level") == ["debug", "info", "warn", "error", "fatal"]

    import rclpy

    name = f.literal_constant("NODE_NAME")
    context = rclpy.Context()
    rclpy.init(context=context)
    try:
        cases = [("", ""), ("robot1", ""), ("/robot1", ""), ("a/b", ""), ("robot1", "/fleet"),
                 ("/robot1", "/fleet"), ("", "/fleet")]  # (namespace argument, PushRosNamespace)
        for namespace, pushed in cases:
            ros_node = rclpy.create_node(name, namespace=node_namespace(namespace, pushed), context=context)
            try:
                assert logger_of(f, namespace, pushed) == ros_node.get_logger().name, (namespace, pushed)
            finally:
                ros_node.destroy_node()
    finally:
        rclpy.shutdown(context=context)


def test_the_per_logger_form_leaves_rcl_at_info() -> None:
    """The form the launch files pass, in a fresh process (rcl configures logging once per process)."""
    logger = logger_of(CONTROLLER, "robot1", "")
    code = (
        "import rclpy, rclpy.logging as L\n"
        f"rclpy.init(args=['x', '--ros-args', '-r', '__ns:=/robot1', '--log-level', '{logger}:=debug'])\n"
        f"n = rclpy.create_node('{CONTROLLER_NAME}')\n"
        "print(n.get_logger().get_effective_level(), L.get_logger('rcl').get_effective_level())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    node_level, rcl_level = (int(x) for x in out.stdout.split()[-2:])
    assert (node_level, rcl_level) == (10, 20)  # DEBUG for the node, INFO for rcl


def documents() -> dict[str, str]:
    docs = {"README.md": (ROOT / "README.md").read_text(), "config/template.yaml": (ROOT / "config" /
            "template.yaml").read_text()}  # fmt: skip
    docs |= {f"launch/{name}": ast.get_docstring(f.tree) or "" for name, f in FILES.items()}
    return docs


def test_every_launch_argument_the_docs_pass_is_declared() -> None:
    seen = 0
    for doc, text in documents().items():
        for name, f in FILES.items():
            for command in launch_commands(text, name):
                seen += 1
                unknown = set(command) - set(f.declared)
                assert not unknown, f"{doc}: {name} has no argument {unknown}"
    assert seen >= 5
    readme = launch_commands(documents()["README.md"], "diffusion_controller.launch.py")
    assert any("namespace" in command for command in readme)
    assert not any("provider" in command for command in readme)  # a config-file setting, not an argument


def test_every_name_assignment_in_the_readme_prose_is_a_launch_argument() -> None:
    """`autostart:=true` in a sentence must be an argument some launch file declares (`-p x:=` and
    `-r a:=b` are node arguments, not launch ones)."""
    import re

    declared = {n for f in FILES.values() for n in f.declared}
    text = documents()["README.md"]
    named = set(re.findall(r"(?<![-\w/.~])(?<!-p )(?<!-r )([a-z][a-z_]*):=", text))
    assert named, "the README names no launch argument"
    assert named <= declared, named - declared
