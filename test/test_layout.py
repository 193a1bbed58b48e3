"""The package's shape, checked: dependencies that point one way, modules and functions a reader can hold
in their head, no path hacks, and a design document that names every module.

core <- ros <- (sim, training) <- bench: the core is plain Python + numpy + ONNX Runtime, the ROS layer
translates, the simulator and training sit on top and never import each other, and only training imports
torch. A violation names the file and the import, so the fix is obvious."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "diffusion_controller"
#: Which subpackages each subpackage may import (besides itself).
ALLOWED = {"core": set(), "ros": {"core"}, "sim": {"core", "ros"}, "training": {"core", "ros"}}
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 100
#: Top-level modules that need ROS (rclpy or message packages) to import.
ROS_MODULES = ("rclpy", "rosidl", "builtin_interfaces", "sensor_msgs", "std_msgs", "trajectory_msgs",
               "geometry_msgs", "nav_msgs", "diagnostic_msgs", "rosgraph_msgs", "lifecycle_msgs",
               "std_srvs")  # fmt: skip


def modules() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def subpackage(path: Path) -> str:
    rel = path.relative_to(PKG).parts
    return rel[0] if len(rel) > 1 else ""


def imported(path: Path) -> list[tuple[int, str]]:
    """Every module `path` imports, at any depth of its code (lazy imports count), absolute names."""
    tree = ast.parse(path.read_text())
    package = ["diffusion_controller", *path.relative_to(PKG).parts[:-1]]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.append((node.lineno, name))
            out += [(node.lineno, f"{name}.{a.name}") for a in node.names]
    return out


def test_subpackages_import_only_the_layers_below_them() -> None:
    bad = []
    for path in modules():
        sub = subpackage(path)
        if not sub:
            continue
        for line, name in imported(path):
            parts = name.split(".")
            if parts[0] != "diffusion_controller" or len(parts) < 2 or parts[1] not in ALLOWED:
                continue
            if parts[1] != sub and parts[1] not in ALLOWED[sub]:
                allowed = sorted(ALLOWED[sub])
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name} ({sub} may use {allowed})")
    assert not bad, "\n".join(sorted(set(bad)))


def test_only_training_imports_torch() -> None:
    bad = [f"{p.relative_to(ROOT)}:{line}" for p in modules() if subpackage(p) != "training"
           for line, name in imported(p) if name.split(".")[0] == "torch"]  # fmt: skip
    assert not bad, bad


def test_core_never_imports_ros() -> None:
    bad = [f"{p.relative_to(ROOT)}:{line} imports {name}" for p in modules() if subpackage(p) == "core"
           for line, name in imported(p) if name.split(".")[0] in ROS_MODULES]  # fmt: skip
    assert not bad, bad


@pytest.mark.parametrize("sub", ["core", "training"])
def test_core_and_training_import_without_any_ros_package(sub: str) -> None:
    """Imported in a process where rclpy and every message package are missing: training runs on a
    workstation with torch and no ROS (bags are read with `rosbags`)."""
    names = [".".join(p.relative_to(ROOT).with_suffix("").parts) for p in modules() if subpackage(p) == sub]
    code = (
        "import sys, importlib, importlib.abc\n"
        f"BLOCKED = {ROS_MODULES!r}\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in BLOCKED:\n"
        "            raise ModuleNotFoundError(f'{name} (blocked: a ROS package)')\n"
        "sys.meta_path.insert(0, Block())\n"
        f"for m in {names!r}:\n"
        "    importlib.import_module(m)\n"
        "print(len([m for m in sys.modules if m.startswith('diffusion_controller.')]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert int(out.stdout.split()[-1]) >= len(names)


def test_no_module_over_600_lines_and_no_function_over_100() -> None:
    long_modules, long_functions = [], []
    for path in modules():
        text = path.read_text()
        if (n := len(text.splitlines())) > MAX_MODULE_LINES:
            long_modules.append(f"{path.relative_to(ROOT)}: {n} lines")
        for node in ast.walk(ast.parse(text)):
            is_function = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            if is_function and (n := node.end_lineno - node.lineno + 1) > MAX_FUNCTION_LINES:
                long_functions.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines")
    assert not long_modules and not long_functions, "\n".join(long_modules + long_functions)


def test_bench_and_tests_import_without_editing_sys_path() -> None:
    """bench/ and test/ find each other through pytest.ini's `pythonpath` and bench/ being the script's
    own folder, never by editing sys.path at import time."""
    bad = []
    for folder in ("bench", "test", "scripts"):
        for path in sorted((ROOT / folder).iterdir()):
            if path.suffix != ".py" and not (folder == "scripts" and path.is_file()):
                continue
            text = path.read_text(errors="replace")
            if not text.startswith("#!") and path.suffix != ".py":
                continue
            try:
                tree = ast.parse(text)
            except SyntaxError:
                continue  # a shell script
            for node in ast.walk(tree):
                target = (getattr(node, "attr", ""), getattr(getattr(node, "value", None), "id", ""))
                if isinstance(node, ast.Attribute) and target == ("path", "sys"):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not bad, bad


def test_design_document_names_every_module() -> None:
    design = (ROOT / "docs" / "DESIGN.md").read_text()
    missing = [str(p.relative_to(PKG)) for p in modules() if p.name != "__init__.py"
               and str(p.relative_to(PKG)) not in design]  # fmt: skip
    assert not missing, f"docs/DESIGN.md does not name {missing}"


def test_readme_stays_a_guide() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    for section in ("## Install", "## Run", "## Configure your robot", "## Interface", "## Models",
                    "## Training", "## GPU", "## Troubleshooting"):  # fmt: skip
        assert f"\n{section}" in readme, section
    for doc in ("docs/RESULTS.md", "docs/PARAMETERS.md", "docs/DESIGN.md", "docs/INTERFACE.md"):
        assert doc in readme and (ROOT / doc).exists(), doc
