"""Where the package's data lives (config/, models/, launch/, urdf/): a source checkout, or the
`share/diffusion_controller` directory of a colcon install, so the demo and the demonstrator run from both."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE = "diffusion_controller"


def share_dir() -> Path:
    """The source checkout when this module runs from one, else `<prefix>/share/diffusion_controller` of
    the install it runs from (ament_python puts the code under `<prefix>/lib/pythonX.Y/site-packages`),
    else of a prefix on AMENT_PREFIX_PATH. FileNotFoundError names where it looked."""
    here = Path(__file__).resolve()
    candidates = [here.parents[1]]
    candidates += [p / "share" / PACKAGE for p in here.parents]
    prefixes = [p for p in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep) if p]
    candidates += [Path(p) / "share" / PACKAGE for p in prefixes]
    for c in candidates:
        if (c / "config").is_dir() and (c / "models").is_dir():
            return c
    looked = ", ".join(map(str, candidates[:3]))
    raise FileNotFoundError(f"{PACKAGE}: no config/ and models/ in {looked}, ... (a source checkout, or an "
                            "install with its share/ directory)")
