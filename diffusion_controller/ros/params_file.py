"""A ROS 2 params file read as plain YAML: the dataset converter and the demonstrator read the node's
params file on machines without ROS, and tests and tools see the parameters `--params-file` gives a node."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from diffusion_controller.ros.config import ConfigError


def load_params_file(path: str, node_name: str = "diffusion_controller") -> dict[str, Any]:
    """Flat parameters a ROS params file gives node `node_name` (`/**` first, then the node's own key,
    nested names joined with "."), with the lookup rules of rclpy's `parameter_dict_from_yaml_file`, in
    plain YAML: the dataset converter and the demonstrator read params files on machines without ROS."""
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read it as YAML ({exc})") from exc
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: not a ROS 2 params file (its top level is not a mapping of node names)")
    name = node_name if node_name.startswith("/") else "/" + node_name
    ns, base = name.rsplit("/", 1)
    in_ns = doc.get(ns) if ns else doc
    found = [doc.get("/**"), doc.get(name), in_ns.get(base) if isinstance(in_ns, dict) else None]
    flat: dict[str, Any] = {}
    for entry in found:
        if entry is None:
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("ros__parameters"), dict):
            raise ConfigError(f"{path}: not a ROS 2 params file (no `ros__parameters` mapping under a node)")
        _flatten(entry["ros__parameters"], "", flat, path)
    if not flat:
        raise ConfigError(f"{path}: not a ROS 2 params file (no parameters for `/**` or {node_name!r})")
    return flat


def _flatten(tree: Mapping[str, Any], prefix: str, out: dict[str, Any], path: str) -> None:
    """Nested YAML mappings as dotted parameter names; a list must hold one type, as a ROS parameter does."""
    for key, value in tree.items():
        if isinstance(value, dict):
            _flatten(value, f"{prefix}{key}.", out, path)
            continue
        if isinstance(value, list) and len({type(v) for v in value}) > 1:
            raise ConfigError(f"{path}: parameter {prefix}{key} mixes types in one list: {value!r}")
        out[f"{prefix}{key}"] = value
