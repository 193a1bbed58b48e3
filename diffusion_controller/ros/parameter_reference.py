"""The parameter reference, docs/PARAMETERS.md, rendered from the parameter specification (ros/config.py).

    python -m diffusion_controller.ros.parameter_reference          # print the table
    python -m diffusion_controller.ros.parameter_reference --docs   # rewrite docs/PARAMETERS.md

The file is generated as a whole (a header saying so, then the table); a test fails when it differs from
what this module renders, so the reference a user reads is the specification the node runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from diffusion_controller.ros.config import PARAM_GROUPS

DOC = Path(__file__).resolve().parents[2] / "docs" / "PARAMETERS.md"
COMMAND = "python -m diffusion_controller.ros.parameter_reference --docs"
HEADER = f"""# Parameters

Generated from the parameter specification (`PARAM_GROUPS` in `diffusion_controller/ros/config.py`)
by `{COMMAND}`;
do not edit it by hand (a test fails when it is out of date).

When each parameter is read: **live** ones can be changed while the node is configured; **configure** ones
are read on configure (cleanup, set, configure again); **startup** ones only when the process starts
(read-only afterwards).

"""


def _shown(value: Any) -> str:
    """A default as a params file would write it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_shown(v) for v in value) + "]"
    return '""' if value == "" else str(value)


def _number(x: float, kind: str) -> str:
    return str(int(x)) if kind == "int" else f"{x:g}"


def parameter_table_markdown() -> str:
    """The parameter table: one row per parameter, a bold row per group."""
    rows = ["| Name | Type | Default | When | Meaning |", "|---|---|---|---|---|"]
    for title, specs in PARAM_GROUPS:
        rows.append(f"| **{title}** | | | | |")
        for s in specs:
            meaning = s.description
            if s.choices:
                meaning += " One of " + ", ".join(f"`{c}`" for c in s.choices) + "."
            if s.range:
                meaning += f" Range {_number(s.range[0], s.kind)} to {_number(s.range[1], s.kind)}."
            meaning = meaning.replace("|", "\\|")
            rows.append(f"| `{s.name}` | {s.kind} | `{_shown(s.default)}` | {s.when} | {meaning} |")
    return "\n".join(rows) + "\n"


def parameter_document() -> str:
    """docs/PARAMETERS.md as it must read: the header, then the table."""
    return HEADER + parameter_table_markdown()


def main(argv: list[str] | None = None) -> int:
    """Print the parameter table, or (`--docs`) write docs/PARAMETERS.md."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument(
        "--docs",
        nargs="?",
        const=str(DOC),
        metavar="PATH",
        help="write the parameter reference to this file (default: the repository's docs/PARAMETERS.md)",
    )
    args = parser.parse_args(argv)
    if args.docs is None:
        sys.stdout.write(parameter_table_markdown())
        return 0
    path = Path(args.docs)
    new = parameter_document()
    old = path.read_text() if path.exists() else None
    if new != old:
        path.write_text(new)
    print(f"{path}: parameter reference {'already up to date' if new == old else 'written'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
