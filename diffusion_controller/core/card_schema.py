"""The model card's schema: the vocabulary a card may use and the value types it is made of.

Constants name every kind, unit, graph form and tensor role a card may declare (the parser checks against
them, the node and the exporter build from them); Feature, GraphSpec and Layout are the card's parts, and
CardError is how any of it is refused. ModelCard itself (a Layout with the rest) is in core/card.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

FORMAT = "diffusion_controller/model_card@1"
METADATA_KEY = "model_card"
#: network.precision: the graph's weights and compute (inputs and outputs are float32 either way).
NETWORK_PRECISIONS = ("fp32", "fp16")

#: Feature kinds and their fixed size (None: size given by `joints` or free for `generic`).
FEATURE_SIZES: dict[str, int | None] = {
    "projected_gravity": 3,
    "base_angular_velocity": 3,
    "base_linear_velocity": 3,
    "velocity_command": 3,
    "joint_position": None,
    "joint_velocity": None,
    "previous_action": None,
    "gait_clock": 2,
    "generic": None,
}
JOINT_FEATURE_KINDS = ("joint_position", "joint_velocity")
ACTION_KINDS = ("position", "velocity", "effort", "base_velocity")
#: Units each action kind may declare (action.units): joint space for the first three (revolute or
#: prismatic joints), a geometry_msgs/Twist's for a base.
ACTION_UNITS = {
    "position": ("rad", "m"),
    "velocity": ("rad/s", "m/s"),
    "effort": ("N m", "N"),
    "base_velocity": ("m/s, rad/s",),
}
#: The Twist fields a base_velocity action may name in action.joints (its "axes").
TWIST_AXES = ("linear.x", "linear.y", "linear.z", "angular.x", "angular.y", "angular.z")
#: Kinds whose safe command is zero: a held velocity or effort keeps the robot moving.
ZERO_SAFE_KINDS = ("velocity", "effort", "base_velocity")
#: ddim: K-step DDIM over a noise-predicting (or sample-predicting) network. distilled: a network trained
#: to map the initial noise to the chunk in one pass (training/distill.py), run as one DDIM step with sample
#: prediction at t = T-1 (which returns the clipped network output), so every graph form runs it as it is.
SAMPLER_KINDS = ("ddim", "distilled")
GRAPH_KINDS = ("fused", "denoiser")
#: Logical tensor roles of each graph form; the card maps them to the graph's tensor names.
GRAPH_INPUTS = {
    "fused": ("obs_history", "noise", "prefix", "prefix_mask"),
    "denoiser": ("obs_history", "sample", "timestep"),
}
GRAPH_OUTPUTS = {"fused": ("actions",), "denoiser": ("model_output",)}
#: Which operators a graph uses. standard: ONNX opset 17 only (any ONNX runtime, TensorRT, older ONNX
#: Runtime). ort_fused: opset 17 plus ONNX Runtime's com.microsoft fused kernels (Attention,
#: MultiHeadAttention, SkipLayerNormalization, BiasGelu), about 80 nodes per denoising step instead of
#: about 450, which is what a GPU's launch-bound replay needs; only ONNX Runtime runs it.
GRAPH_OPS = ("standard", "ort_fused")
NAME_RE = re.compile(r"^[a-z0-9_]+$")


class CardError(ValueError):
    """An invalid model card; the message names each bad field and what was expected."""

    def __init__(self, errors: list[str] | str, source: str | None = None) -> None:
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        head = f"invalid model card{f' {source}' if source else ''}"
        super().__init__(head + ": " + "; ".join(self.errors))


@dataclass(frozen=True)
class Feature:
    """One named slice of an observation row."""

    name: str
    kind: str
    size: int
    joints: tuple[str, ...] | None = None
    frequency_hz: float | None = None  # gait_clock only

    def to_dict(self) -> dict[str, Any]:
        """The card's (and a dataset layout's) form of this feature."""
        fd: dict[str, Any] = {"name": self.name, "kind": self.kind, "size": self.size}
        if self.joints is not None:
            fd["joints"] = list(self.joints)
        if self.frequency_hz is not None:
            fd["frequency_hz"] = float(self.frequency_hz)
        return fd


@dataclass(frozen=True)
class GraphSpec:
    """Which graph form the .onnx holds and the tensor name of each logical input/output. batch: how many
    observation histories one run takes (fused graphs only; the card's graph.batch, absent = 1)."""

    kind: str
    inputs: dict[str, str]
    outputs: dict[str, str]
    ops: str = "standard"
    batch: int = 1


@dataclass(frozen=True, eq=False)
class Layout:
    """The part of a card a dataset is built for, before any model exists: the control period, the
    observation history and features, and the action joints with their limits. A layout file is a card
    YAML with only these fields (a full card, or an .onnx with one, works as well); every ModelCard is
    a Layout."""

    control_period_s: float
    history: int
    features: tuple[Feature, ...]
    action_joints: tuple[str, ...]
    action_lower: np.ndarray
    action_upper: np.ndarray

    @property
    def obs_dim(self) -> int:
        return sum(f.size for f in self.features)

    @property
    def action_dim(self) -> int:
        return len(self.action_joints)
