"""Read a launch file's syntax tree: what launch_testing would exercise, checked where launch cannot run.

The launch and launch_ros packages are not installable everywhere this suite runs, so the tests read the
files instead of loading them: the arguments each declares (`DeclareLaunchArgument`), where each launch
configuration goes (`LaunchConfiguration`), the nodes it starts with their parameters and arguments, and
the `ros2 launch` command lines documentation shows.
"""

from __future__ import annotations

import ast
import re
import shlex
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

#: Launch configurations launch_ros sets itself (PushRosNamespace), not arguments of a file.
LAUNCH_ROS_CONFIGS = frozenset({"ros_namespace"})


def call_name(node: ast.AST) -> str:
    """`Foo` of a call `Foo(...)` or `mod.Foo(...)`; '' for anything else."""
    if not isinstance(node, ast.Call):
        return ""
    func = node.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""


def keyword(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def configs_in(node: ast.AST) -> set[str]:
    """Names of the launch configurations read anywhere below `node`."""
    return {
        n.args[0].value
        for n in ast.walk(node)
        if call_name(n) == "LaunchConfiguration" and n.args and isinstance(n.args[0], ast.Constant)
    }


def config_of(node: ast.AST) -> str | None:
    """The configuration a value reads: `LaunchConfiguration("x")` or `ParameterValue(LaunchConfiguration
    ("x"), value_type=...)` -> "x"; None for anything else."""
    if call_name(node) == "ParameterValue":
        node = node.args[0]
    if call_name(node) == "LaunchConfiguration" and isinstance(node.args[0], ast.Constant):
        return node.args[0].value
    return None


@dataclass(frozen=True)
class NodeAction:
    """A `Node(...)`/`LifecycleNode(...)` of a launch file."""

    call: ast.Call

    def literal(self, name: str) -> Any:
        value = keyword(self.call, name)
        return None if value is None else ast.literal_eval(value)

    @property
    def parameter_dicts(self) -> dict[str, ast.AST]:
        """Parameter name -> value expression, from the dicts in `parameters=[...]`."""
        out: dict[str, ast.AST] = {}
        params = keyword(self.call, "parameters")
        for item in getattr(params, "elts", []):
            if isinstance(item, ast.Dict):
                out.update({ast.literal_eval(k): v for k, v in zip(item.keys, item.values, strict=True)})
        return out

    @property
    def parameter_files(self) -> list[str]:
        """Launch configurations given as whole params files in `parameters=[...]`."""
        params = keyword(self.call, "parameters")
        return [c for item in getattr(params, "elts", []) if (c := config_of(item)) is not None]

    @property
    def arguments(self) -> list[ast.AST]:
        return list(getattr(keyword(self.call, "arguments"), "elts", []))


@dataclass
class LaunchFile:
    path: Path

    @cached_property
    def text(self) -> str:
        return self.path.read_text()

    @cached_property
    def tree(self) -> ast.Module:
        return ast.parse(self.text)

    @cached_property
    def declared(self) -> dict[str, ast.Call]:
        """Argument name -> its DeclareLaunchArgument call."""
        return {
            n.args[0].value: n for n in ast.walk(self.tree) if call_name(n) == "DeclareLaunchArgument"
        }

    def default(self, name: str) -> ast.AST | None:
        return keyword(self.declared[name], "default_value")

    def choices(self, name: str) -> list[str] | None:
        value = keyword(self.declared[name], "choices")
        if isinstance(value, ast.Name):  # a module constant
            value = self.constant(value.id)
        return None if value is None else ast.literal_eval(value)

    @cached_property
    def used(self) -> set[str]:
        """Launch configurations read outside the argument declarations."""
        in_declarations = {id(n) for d in self.declared.values() for n in ast.walk(d)}
        return {
            n.args[0].value
            for n in ast.walk(self.tree)
            if call_name(n) == "LaunchConfiguration"
            and isinstance(n.args[0], ast.Constant)
            and id(n) not in in_declarations
        }

    @cached_property
    def nodes(self) -> list[NodeAction]:
        return [NodeAction(n) for n in ast.walk(self.tree) if call_name(n) in ("Node", "LifecycleNode")]

    def constant(self, name: str) -> ast.AST:
        """The value expression of a module-level `NAME = ...`."""
        for stmt in self.tree.body:
            if isinstance(stmt, ast.Assign) and any(getattr(t, "id", "") == name for t in stmt.targets):
                return stmt.value
            if isinstance(stmt, ast.AnnAssign) and getattr(stmt.target, "id", "") == name:
                return stmt.value
        raise KeyError(f"{self.path.name} has no module constant {name}")

    def assigned(self, name: str) -> ast.AST:
        """The value of the first `name = ...` anywhere in the file (a local like `share = ...`)."""
        for n in ast.walk(self.tree):
            if isinstance(n, ast.Assign) and any(getattr(t, "id", "") == name for t in n.targets):
                return n.value
        raise KeyError(f"{self.path.name} assigns no {name}")

    def literal_constant(self, name: str) -> Any:
        return ast.literal_eval(self.constant(name))

    def function(self, name: str, **globals_: Any) -> Any:
        """A module-level function of the file, compiled alone against the given globals (stand-ins for
        the launch classes it calls)."""
        fn = next(s for s in self.tree.body if isinstance(s, ast.FunctionDef) and s.name == name)
        module = ast.Module(body=[fn], type_ignores=[])
        namespace = dict(globals_)
        exec(compile(module, str(self.path), "exec"), namespace)  # our own file
        return namespace[name]


def launch_commands(text: str, launch_file: str) -> list[dict[str, str]]:
    """The `name:=value` arguments of every `ros2 launch diffusion_controller <launch_file>` command in
    `text` (a README, a docstring, a YAML comment), continuation lines joined."""
    joined = re.sub(r"\\\s*\n\s*#?\s*", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.lstrip("# ")
        start = line.find(f"ros2 launch diffusion_controller {launch_file}")
        if start < 0:
            continue
        words = shlex.split(line[start:].split("`")[0].split("#")[0])
        out.append(dict(w.strip("[]").split(":=", 1) for w in words[4:] if ":=" in w))
    return out
