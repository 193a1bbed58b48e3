"""The package installs the way colcon and pip install it: data files, ament marker, console scripts.

Builds a real wheel and sdist from this checkout and checks them against the tree, so a launch file,
config or model added to the repo but not to setup.py fails here rather than on a robot.
"""

from __future__ import annotations

import ast
import configparser
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = "diffusion_controller"

# Python modules that come from ROS packages (rosdep keys) rather than from pip.
ROS_MODULES = {
    "rclpy", "sensor_msgs", "std_msgs", "trajectory_msgs", "geometry_msgs", "nav_msgs",
    "diagnostic_msgs", "rosgraph_msgs", "lifecycle_msgs", "std_srvs", "builtin_interfaces",
    "rcl_interfaces", "launch", "launch_ros", "ament_index_python",
}


def _data_files() -> list[Path]:
    files = [*ROOT.glob("launch/*.py"), *ROOT.glob("config/*.yaml"), *ROOT.glob("config/*.xml")]
    files += [*ROOT.glob("urdf/*.xacro"), *ROOT.glob("worlds/*.sdf")]
    files += [*ROOT.glob("models/*.onnx"), *ROOT.glob("models/*.yaml")]
    return files


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(ROOT)],
        check=True, cwd=ROOT,
    )
    subprocess.run(
        [sys.executable, "setup.py", "-q", "sdist", "-d", str(out)], check=True, cwd=ROOT,
        capture_output=True,
    )
    return out


def _console_scripts() -> dict[str, str]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                if isinstance(key, ast.Constant) and key.value == "console_scripts":
                    entries = ast.literal_eval(value)
                    return {e.split("=")[0].strip(): e.split("=")[1].strip() for e in entries}
    raise AssertionError("setup.py declares no console_scripts")


def test_wheel_carries_launch_config_models_and_marker(built: Path) -> None:
    wheel = next(built.glob("*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    data_prefix = f"{PKG}-0.1.0.data/data/share/"
    assert data_prefix + f"ament_index/resource_index/packages/{PKG}" in names
    assert data_prefix + f"{PKG}/package.xml" in names
    expected = _data_files()
    assert any(p.parent.name == "launch" for p in expected), "no launch files in the tree"
    for path in expected:
        rel = path.relative_to(ROOT).as_posix()
        assert data_prefix + f"{PKG}/{rel}" in names, f"{rel} is not installed by setup.py"


def test_wheel_declares_every_console_script(built: Path) -> None:
    wheel = next(built.glob("*.whl"))
    zf = zipfile.ZipFile(wheel)
    entry_points = zf.read(f"{PKG}-0.1.0.dist-info/entry_points.txt").decode()
    scripts = _console_scripts()
    assert "controller_node" in scripts and "sim_node" in scripts
    for name, target in scripts.items():
        assert f"{name} = {target}" in entry_points
        module, func = target.split(":")
        source = ROOT / (module.replace(".", "/") + ".py")
        assert source.exists(), f"console script {name} points at missing {source}"
        assert f"def {func}(" in source.read_text(), f"{module} has no {func}()"


def test_sdist_carries_ros_package_files(built: Path) -> None:
    sdist = next(built.glob("*.tar.gz"))
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for rel in ["package.xml", "setup.cfg", f"resource/{PKG}"]:
        assert rel in names
    for path in _data_files():
        assert path.relative_to(ROOT).as_posix() in names


def test_setup_cfg_puts_scripts_where_ros2_run_looks() -> None:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert cfg["develop"]["script_dir"] == f"$base/lib/{PKG}"
    assert cfg["install"]["install_scripts"] == f"$base/lib/{PKG}"


def test_package_xml_declares_what_the_code_imports() -> None:
    root = ET.parse(ROOT / "package.xml").getroot()
    assert root.get("format") == "3"
    assert root.findtext("name") == PKG
    assert root.find("export/build_type").text == "ament_python"
    exec_deps = {e.text for e in root.findall("exec_depend")}
    test_deps = {e.text for e in root.findall("test_depend")}
    assert {"launch_testing", "launch_testing_ros", "python3-pytest"} <= test_deps
    imported: set[str] = set()
    for path in [*(ROOT / PKG).rglob("*.py"), *ROOT.glob("launch/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module.split(".")[0])
    missing = sorted((imported & ROS_MODULES) - exec_deps)
    assert not missing, f"package.xml lacks exec_depend for {missing}"
    if "numpy" in imported:
        assert "python3-numpy" in exec_deps
    if "yaml" in imported:
        assert "python3-yaml" in exec_deps
