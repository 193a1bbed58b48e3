"""Packaging facts colcon relies on, read from setup.py's syntax tree and package.xml (no build needed)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def setup_keywords() -> dict[str, object]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    out = {}
    for kw in call.keywords:
        try:
            out[kw.arg] = ast.literal_eval(kw.value)
        except ValueError:
            out[kw.arg] = None  # computed (data_files from glob, ...)
    return out


def test_colcon_test_runs_pytest_because_setup_py_declares_it():
    kw = setup_keywords()
    assert "pytest" in kw.get("extras_require", {}).get("test", [])
    # setuptools no longer knows tests_require: it printed "Unknown distribution option" on every colcon
    # build and test, which colcon reports as stderr output.
    assert "tests_require" not in kw


def test_setup_py_prints_no_warning():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stderr == "", out.stderr
    test_depends = {e.text for e in ET.parse(ROOT / "package.xml").getroot().iter("test_depend")}
    assert "python3-pytest" in test_depends


def test_every_console_script_named_in_the_readme_is_installed():
    scripts = {entry.split("=")[0].strip() for entry in setup_keywords()["entry_points"]["console_scripts"]}
    readme = (ROOT / "README.md").read_text()
    for name in ("controller_node", "sim_node", "generate_dataset", "train_policy", "export_policy",
                 "distill_policy", "build_engine"):  # fmt: skip
        assert name in scripts, name
        assert name in readme, name


def test_the_demo_finds_its_models_and_configs_in_a_colcon_install(tmp_path):
    """ament_python installs the code under <prefix>/lib/pythonX.Y/site-packages and the data under
    <prefix>/share/diffusion_controller: share_dir() must find the latter from the former (and say where it
    looked when there is nothing)."""
    import shutil

    site = tmp_path / "lib" / "python3.12" / "site-packages" / "diffusion_controller"
    site.mkdir(parents=True)
    shutil.copy(ROOT / "diffusion_controller" / "share.py", site / "share.py")
    code = "import runpy, sys; print(runpy.run_path(sys.argv[1])['share_dir']())"
    env = {k: v for k, v in os.environ.items() if k != "AMENT_PREFIX_PATH"}
    run = subprocess.run([sys.executable, "-c", code, str(site / "share.py")], capture_output=True, text=True,
                         env=env, timeout=60)  # fmt: skip
    assert run.returncode != 0 and "no config/ and models/" in run.stderr
    share = tmp_path / "share" / "diffusion_controller"
    for d in ("config", "models"):
        (share / d).mkdir(parents=True)
    run = subprocess.run([sys.executable, "-c", code, str(site / "share.py")], capture_output=True, text=True,
                         env=env, timeout=60)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert Path(run.stdout.strip()) == share
    from diffusion_controller.share import share_dir

    assert share_dir() == ROOT  # a source checkout is its own share directory
