"""Model card: the one description of a policy model that the node, the exporter and the tests share.

A model is one .onnx whose metadata_props key `model_card` holds the card as YAML text, with the same
YAML beside it (`<model>.yaml`). Loading validates everything the node relies on, and every error names
the field and what was expected, because a wrong card found on the robot is far costlier than one
rejected at load time. ONNX metadata is read and written with a small protobuf reader here so that the
core needs neither the `onnx` package nor an inference session to look at a card.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import yaml

from diffusion_controller.core.ddim import BETA_SCHEDULES, PREDICTION_TYPES, TIMESTEP_SPACINGS, DDIMConfig

FORMAT = "diffusion_controller/model_card@1"
METADATA_KEY = "model_card"
#: network.precision: the graph's weights and compute (inputs and outputs are float32 either way).
NETWORK_PRECISIONS = ("fp32", "fp16")
#: libyaml's safe loader where PyYAML has it (4x faster: the card is parsed on a running node's swaps).
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

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
    """Which graph form the .onnx holds and the tensor name of each logical input/output."""

    kind: str
    inputs: dict[str, str]
    outputs: dict[str, str]
    ops: str = "standard"


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


@dataclass(frozen=True, eq=False)
class ModelCard(Layout):
    """Validated card. Arrays are float64 and read-only; compare cards with `to_dict()`."""

    name: str
    version: str
    description: str
    horizon: int
    first_offset: int
    action_kind: str
    action_units: str
    obs_mean: np.ndarray
    obs_std: np.ndarray
    action_min: np.ndarray
    action_max: np.ndarray
    diffusion: DDIMConfig
    sampler_kind: str
    steps: int
    eta: float
    graph: GraphSpec | None = None
    #: Whether an inpainting prefix steers the rest of the chunk (blend: inpaint needs it).
    sampler_inpainting: bool = True
    network: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)

    def feature_slice(self, name: str) -> slice:
        """Columns of feature `name` in an observation row."""
        start = 0
        for f in self.features:
            if f.name == name:
                return slice(start, start + f.size)
            start += f.size
        raise KeyError(f"no observation feature named {name!r}; have {[f.name for f in self.features]}")

    def feature_of_kind(self, kind: str) -> Feature | None:
        """The first feature of this kind, or None."""
        return next((f for f in self.features if f.kind == kind), None)

    # -- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Any, *, require_graph: bool = True, source: str | None = None) -> ModelCard:
        """Validate a parsed card; raises CardError listing every problem found."""
        return _Parser(source).parse(d, require_graph)

    @classmethod
    def from_yaml_text(cls, text: str, *, require_graph: bool = True, source: str | None = None) -> ModelCard:
        try:
            d = yaml.load(text, Loader=_YAML_LOADER)
        except yaml.YAMLError as e:
            raise CardError(f"not valid YAML ({e})", source) from e
        return cls.from_dict(d, require_graph=require_graph, source=source)

    @classmethod
    def from_yaml(cls, path: str | Path, *, require_graph: bool = True) -> ModelCard:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise CardError(f"cannot read {path}: {e.strerror or e}", str(path)) from e
        return cls.from_yaml_text(text, require_graph=require_graph, source=str(path))

    @classmethod
    def from_onnx(cls, path: str | Path) -> ModelCard:
        """The card in the model's metadata_props (key `model_card`)."""
        path = Path(path)
        try:
            props = read_onnx_metadata(path)
        except (OSError, ValueError) as e:
            raise CardError(f"cannot read ONNX metadata of {path}: {e}", str(path)) from e
        if METADATA_KEY not in props:
            raise CardError(f"metadata_props has no {METADATA_KEY!r} key", str(path))
        return cls.from_yaml_text(props[METADATA_KEY], source=str(path))

    # -- serialization --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain-Python card in the schema's key order (round-trips through from_dict)."""

        def floats(a: np.ndarray) -> list[float]:
            return [float(v) for v in a]

        feats = [f.to_dict() for f in self.features]
        dif = self.diffusion
        d: dict[str, Any] = {
            "format": FORMAT,
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "control_period_s": float(self.control_period_s),
            "observation": {"history": self.history, "features": feats},
            "action": {
                "joints": list(self.action_joints),
                "kind": self.action_kind,
                "units": self.action_units,
                "lower": floats(self.action_lower),
                "upper": floats(self.action_upper),
                "horizon": self.horizon,
                "first_offset": self.first_offset,
            },
            "normalization": {
                "observation": {"mean": floats(self.obs_mean), "std": floats(self.obs_std)},
                "action": {"min": floats(self.action_min), "max": floats(self.action_max)},
            },
            "diffusion": {
                "train_timesteps": dif.train_timesteps,
                "beta_schedule": dif.beta_schedule,
                "beta_start": float(dif.beta_start),
                "beta_end": float(dif.beta_end),
                "prediction_type": dif.prediction_type,
                "clip_sample": dif.clip_sample,
                "clip_sample_range": float(dif.clip_sample_range),
                "set_alpha_to_one": dif.set_alpha_to_one,
                "steps_offset": dif.steps_offset,
                "timestep_spacing": dif.timestep_spacing,
            },
            "sampler": {
                "kind": self.sampler_kind,
                "steps": self.steps,
                "eta": float(self.eta),
                "inpainting": self.sampler_inpainting,
            },
        }
        if self.graph is not None:
            d["graph"] = {
                "kind": self.graph.kind,
                "inputs": dict(self.graph.inputs),
                "outputs": dict(self.graph.outputs),
                "ops": self.graph.ops,
            }
        d["network"] = _plain(self.network)
        d["training"] = _plain(self.training)
        return d

    def to_yaml_text(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=110)

    def to_yaml(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_yaml_text(), encoding="utf-8")
        return path

    def to_onnx(self, path: str | Path) -> Path:
        """Write this card into the model's metadata_props (replacing an existing card), with the `onnx`
        package: writing is export-time work, and `onnx` is a training/export dependency, not the node's."""
        import onnx

        path = Path(path)
        model = onnx.load(str(path), load_external_data=False)
        kept = [(p.key, p.value) for p in model.metadata_props if p.key != METADATA_KEY]
        del model.metadata_props[:]
        for key, value in [*kept, (METADATA_KEY, self.to_yaml_text())]:
            model.metadata_props.add(key=key, value=value)
        onnx.save(model, str(path))
        return path

    def inpaints_at(self, steps: int) -> bool:
        """Whether an inpainting prefix steers a run of this model at K=`steps` (a denoiser graph may run
        at another K than its card's): the card must allow it and some step must see the prefix."""
        return self.sampler_inpainting and self.diffusion.prefix_steers(steps)

    def replace(self, **changes: Any) -> ModelCard:
        """A re-validated copy with some fields changed (e.g. graph=GraphSpec(...))."""
        import dataclasses

        return ModelCard.from_dict(dataclasses.replace(self, **changes).to_dict(), require_graph=False)


def _plain(v: Any) -> Any:
    """YAML-safe copy of informational sections (numpy scalars/arrays become Python values)."""
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v


def sidecar_path(onnx_path: str | Path) -> Path:
    """`<model>.yaml` beside `<model>.onnx`."""
    return Path(onnx_path).with_suffix(".yaml")


# ------------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------------
_MISSING = object()


def layout_from_dict(d: Any, source: str | None = None) -> Layout:
    """Validate the layout fields of a card dict; CardError lists every problem."""
    p = _Parser(source)
    if not isinstance(d, dict):
        raise CardError(f"expected a mapping, got {type(d).__name__}", source)
    d = dict(d)
    # Fields a dataset does not need get placeholders; the card of the trained model states them.
    d["action"] = {"horizon": 1, "first_offset": 0, "kind": ACTION_KINDS[0], "units": "rad",
                   **(d.get("action") or {})}  # fmt: skip
    period = p.number(d, "control_period_s", "", positive=True)
    _, joints, lower, upper, *_ = p.action(d)
    history, features = p.observation(d, len(joints) if joints else None)
    if p.errors:
        raise CardError(p.errors, source)
    return Layout(float(period), int(history), tuple(features or ()), tuple(joints or ()), lower, upper)


def read_layout(path: str | Path) -> Layout:
    """A layout from a layout or card YAML, or the card inside an .onnx."""
    path = Path(path)
    if path.suffix == ".onnx":
        return ModelCard.from_onnx(path)
    try:
        d = yaml.load(path.read_text(encoding="utf-8"), Loader=_YAML_LOADER)
    except (OSError, yaml.YAMLError) as e:
        raise CardError(f"cannot read {path}: {e}", str(path)) from e
    return layout_from_dict(d, str(path))


class _Parser:
    """Collects every error (field path + expectation) instead of stopping at the first."""

    def __init__(self, source: str | None) -> None:
        self.source = source
        self.errors: list[str] = []

    def err(self, path: str, msg: str) -> None:
        self.errors.append(f"{path}: {msg}")

    # -- typed getters: return a usable fallback after recording an error ------------------------------
    def section(self, d: dict, key: str, path: str, allowed: tuple[str, ...]) -> dict:
        v = d.get(key, _MISSING)
        p = f"{path}.{key}" if path else key
        if v is _MISSING:
            self.err(p, "missing (expected a mapping)")
            return {}
        if not isinstance(v, dict):
            self.err(p, f"expected a mapping, got {type(v).__name__}")
            return {}
        self.unknown(v, p, allowed)
        return v

    def unknown(self, d: dict, path: str, allowed: tuple[str, ...]) -> None:
        for k in d:
            if k not in allowed:
                self.err(
                    f"{path}.{k}" if path else str(k), f"unknown field (expected one of {list(allowed)})"
                )

    def get(self, d: dict, key: str, path: str, default: Any = _MISSING) -> Any:
        v = d.get(key, _MISSING)
        if v is _MISSING:
            if default is _MISSING:
                self.err(f"{path}.{key}" if path else key, "missing")
            return default
        return v

    def integer(self, d: dict, key: str, path: str, lo: int, default: Any = _MISSING) -> int:
        v = self.get(d, key, path, default)
        p = f"{path}.{key}" if path else key
        if v is _MISSING:
            return lo
        if isinstance(v, bool) or not isinstance(v, int):
            self.err(p, f"expected an integer >= {lo}, got {v!r}")
            return lo
        if v < lo:
            self.err(p, f"expected an integer >= {lo}, got {v}")
            return lo
        return v

    def number(
        self, d: dict, key: str, path: str, *, positive: bool = False, default: Any = _MISSING
    ) -> float:
        v = self.get(d, key, path, default)
        p = f"{path}.{key}" if path else key
        if v is _MISSING:
            return 1.0
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            self.err(p, f"expected a finite number, got {v!r}")
            return 1.0
        if positive and v <= 0:
            self.err(p, f"expected a number > 0, got {v}")
            return 1.0
        return float(v)

    def boolean(self, d: dict, key: str, path: str, default: Any = _MISSING) -> bool:
        v = self.get(d, key, path, default)
        if v is _MISSING:
            return False
        if not isinstance(v, bool):
            self.err(f"{path}.{key}", f"expected true or false, got {v!r}")
            return False
        return v

    def string(
        self, d: dict, key: str, path: str, *, choices: tuple[str, ...] | None = None, default: Any = _MISSING
    ) -> str:
        v = self.get(d, key, path, default)
        p = f"{path}.{key}" if path else key
        if v is _MISSING:
            return ""
        if not isinstance(v, str):
            self.err(p, f"expected a string, got {v!r}")
            return ""
        if choices is not None and v not in choices:
            self.err(p, f"expected one of {list(choices)}, got {v!r}")
        return v

    def names(self, v: Any, path: str) -> tuple[str, ...] | None:
        if not isinstance(v, list) or not v or not all(isinstance(x, str) and x for x in v):
            self.err(path, f"expected a non-empty list of names, got {v!r}")
            return None
        dup = sorted({x for x in v if v.count(x) > 1})
        if dup:
            self.err(path, f"expected unique names, {dup} repeated")
        return tuple(v)

    def vector(self, d: dict, key: str, path: str, n: int | None, what: str) -> np.ndarray | None:
        v = self.get(d, key, path)
        p = f"{path}.{key}"
        if v is _MISSING:
            return None
        if not isinstance(v, list) or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in v
        ):
            self.err(p, f"expected a list of numbers, got {type(v).__name__}")
            return None
        a = np.array(v, dtype=np.float64)
        if not np.all(np.isfinite(a)):
            self.err(p, "expected finite numbers (found nan or inf)")
            return None
        if n is not None and a.size != n:
            self.err(p, f"expected {n} values ({what}), got {a.size}")
            return None
        a.setflags(write=False)
        return a

    # -- the card -------------------------------------------------------------------------------------
    def parse(self, d: Any, require_graph: bool) -> ModelCard:
        if not isinstance(d, dict):
            raise CardError(f"expected a mapping at the top level, got {type(d).__name__}", self.source)
        top = (
            "format",
            "name",
            "version",
            "description",
            "control_period_s",
            "observation",
            "action",
            "normalization",
            "diffusion",
            "sampler",
            "graph",
            "network",
            "training",
        )
        self.unknown(d, "", top)
        fmt = self.get(d, "format", "")
        if fmt is not _MISSING and fmt != FORMAT:
            self.err("format", f"expected {FORMAT!r}, got {fmt!r}")
        name = self.string(d, "name", "")
        if name and not NAME_RE.match(name):
            self.err("name", f"expected [a-z0-9_]+, got {name!r}")
        version = self.get(d, "version", "", "0.0.0")
        version = str(version) if isinstance(version, (str, int, float)) else self._bad("version", version)
        description = self.string(d, "description", "", default="")
        period = self.number(d, "control_period_s", "", positive=True)

        _, action_joints, lower, upper, horizon, first_offset, a_kind, units = self.action(d)
        n_act = len(action_joints) if action_joints else None
        history, features = self.observation(d, n_act)
        obs_dim = sum(f.size for f in features) if features is not None else None
        obs_mean, obs_std, act_min, act_max = self.normalization(d, obs_dim, n_act)
        diffusion = self.diffusion(d)
        s_kind, steps, eta, inpainting = self.sampler(d, diffusion)
        graph = self.graph(d, require_graph)
        network = self.free(d, "network")
        self.network_precision(network)
        training = self.free(d, "training")
        if self.errors:
            raise CardError(self.errors, self.source)
        return ModelCard(
            name=name,
            version=version,
            description=description,
            control_period_s=period,
            history=history,
            features=features,
            action_joints=action_joints,
            action_lower=lower,
            action_upper=upper,
            horizon=horizon,
            first_offset=first_offset,
            action_kind=a_kind,
            action_units=units,
            obs_mean=obs_mean,
            obs_std=obs_std,
            action_min=act_min,
            action_max=act_max,
            diffusion=diffusion,
            sampler_kind=s_kind,
            steps=steps,
            eta=eta,
            graph=graph,
            sampler_inpainting=inpainting,
            network=network,
            training=training,
        )

    def _bad(self, path: str, v: Any) -> str:
        self.err(path, f"expected a string, got {v!r}")
        return ""

    def free(self, d: dict, key: str) -> dict:
        v = d.get(key, {})
        if v is None:
            return {}
        if not isinstance(v, dict):
            self.err(key, f"expected a mapping, got {type(v).__name__}")
            return {}
        return v

    def network_precision(self, network: dict) -> None:
        """network.precision: fp32 (absent: the same) or fp16 (an fp16 graph, training/fp16.py)."""
        v = network.get("precision", "fp32")
        if v not in NETWORK_PRECISIONS:
            self.err("network.precision", f"expected one of {list(NETWORK_PRECISIONS)}, got {v!r}")
        elif v == "fp16" and network.get("weights", "fp32") != "fp32":
            why = f"fp16 with weights {network.get('weights')!r}: expected fp32 weights"
            self.err("network.precision", why)

    def action(self, d: dict):
        p = "action"
        a = self.section(
            d, "action", "", ("joints", "kind", "units", "lower", "upper", "horizon", "first_offset")
        )
        joints = (
            self.names(a.get("joints"), f"{p}.joints")
            if "joints" in a
            else self.err(f"{p}.joints", "missing")
        )
        n = len(joints) if joints else None
        lower = self.vector(a, "lower", p, n, "one per action.joints")
        upper = self.vector(a, "upper", p, n, "one per action.joints")
        if lower is not None and upper is not None and lower.shape == upper.shape:
            for i in np.flatnonzero(~(lower < upper)):
                self.err(f"{p}.lower[{i}]", f"expected < action.upper[{i}] ({upper[i]}), got {lower[i]}")
        horizon = self.integer(a, "horizon", p, 1)
        first_offset = self.integer(a, "first_offset", p, 0)
        kind = self.string(a, "kind", p, choices=ACTION_KINDS)
        units = self.string(a, "units", p)
        if "units" in a and not units:
            self.err(f"{p}.units", "expected a non-empty string")
        self.kind_limits(kind, units, joints, lower, upper)
        return a, joints, lower, upper, horizon, first_offset, kind, units

    def kind_limits(self, kind: Any, units: Any, joints: Any, lower: Any, upper: Any) -> None:
        """Units and limits that make sense for the action kind (safety drives zero-safe kinds to 0)."""
        p = "action"
        if kind not in ACTION_UNITS:
            return
        if units and units not in ACTION_UNITS[kind]:
            allowed = list(ACTION_UNITS[kind])
            self.err(f"{p}.units", f"expected one of {allowed} for kind {kind!r}, got {units!r}")
        if kind == "base_velocity" and joints:
            for i, j in enumerate(joints):
                if j not in TWIST_AXES:
                    self.err(f"{p}.joints[{i}]", f"expected a Twist field {list(TWIST_AXES)} for kind "
                             f"'base_velocity', got {j!r}")  # fmt: skip
        if kind in ZERO_SAFE_KINDS and lower is not None and upper is not None and lower.shape == upper.shape:
            for i in np.flatnonzero(~((lower <= 0.0) & (upper >= 0.0))):
                self.err(f"{p}.lower[{i}]", f"an action of kind {kind!r} must allow 0 (its safe command): "
                         f"[{lower[i]}, {upper[i]}] does not")  # fmt: skip

    def observation(self, d: dict, n_act: int | None):
        p = "observation"
        o = self.section(d, "observation", "", ("history", "features"))
        history = self.integer(o, "history", p, 1)
        fl = self.get(o, "features", p)
        if fl is _MISSING:
            return history, None
        if not isinstance(fl, list) or not fl:
            self.err(f"{p}.features", "expected a non-empty list of features")
            return history, None
        feats: list[Feature] = []
        ok = True
        for i, fd in enumerate(fl):
            fp = f"{p}.features[{i}]"
            if not isinstance(fd, dict):
                self.err(fp, f"expected a mapping {{name, kind, size[, joints | frequency_hz]}}, got {fd!r}")
                ok = False
                continue
            self.unknown(fd, fp, ("name", "kind", "size", "joints", "frequency_hz"))
            n0 = len(self.errors)
            fname = self.string(fd, "name", fp)
            kind = self.string(fd, "kind", fp, choices=tuple(FEATURE_SIZES))
            size = self.integer(fd, "size", fp, 1)
            joints = None
            if kind in JOINT_FEATURE_KINDS:
                if "joints" not in fd:
                    self.err(f"{fp}.joints", f"missing (a {kind} feature names its joints)")
                else:
                    joints = self.names(fd["joints"], f"{fp}.joints")
                    if joints is not None and len(joints) != size:
                        self.err(f"{fp}.size", f"expected {len(joints)} (= len(joints)), got {size}")
            elif "joints" in fd:
                self.err(f"{fp}.joints", f"expected no joints for kind {kind!r}")
            frequency = None
            if kind == "gait_clock":
                frequency = self.number(fd, "frequency_hz", fp, positive=True)
            elif "frequency_hz" in fd:
                self.err(f"{fp}.frequency_hz", f"expected no frequency_hz for kind {kind!r}")
            fixed = FEATURE_SIZES.get(kind)
            if fixed is not None and size != fixed:
                self.err(f"{fp}.size", f"expected {fixed} for kind {kind!r}, got {size}")
            if kind == "previous_action" and n_act is not None and size != n_act:
                self.err(
                    f"{fp}.size", f"expected {n_act} (= len(action.joints)) for previous_action, got {size}"
                )
            if len(self.errors) > n0:
                ok = False
            feats.append(Feature(fname, kind, size, joints, frequency))
        names = [f.name for f in feats]
        dup = sorted({x for x in names if names.count(x) > 1})
        if dup:
            self.err(f"{p}.features", f"expected unique feature names, {dup} repeated")
        if sum(f.kind == "velocity_command" for f in feats) > 1:
            self.err(f"{p}.features", "expected at most one velocity_command feature")
        if sum(f.kind == "previous_action" for f in feats) > 1:
            self.err(f"{p}.features", "expected at most one previous_action feature")
        return history, (tuple(feats) if ok else None)

    def normalization(self, d: dict, obs_dim: int | None, n_act: int | None):
        p = "normalization"
        n = self.section(d, "normalization", "", ("observation", "action"))
        o = self.section(n, "observation", p, ("mean", "std"))
        a = self.section(n, "action", p, ("min", "max"))
        mean = self.vector(o, "mean", f"{p}.observation", obs_dim, "observation row size")
        std = self.vector(o, "std", f"{p}.observation", obs_dim, "observation row size")
        if std is not None:
            for i in np.flatnonzero(~(std > 0)):
                self.err(f"{p}.observation.std[{i}]", f"expected > 0, got {std[i]}")
        amin = self.vector(a, "min", f"{p}.action", n_act, "one per action.joints")
        amax = self.vector(a, "max", f"{p}.action", n_act, "one per action.joints")
        if amin is not None and amax is not None and amin.shape == amax.shape:
            for i in np.flatnonzero(~(amin < amax)):
                self.err(
                    f"{p}.action.min[{i}]",
                    f"expected < normalization.action.max[{i}] ({amax[i]}), got {amin[i]}",
                )
        return mean, std, amin, amax

    def diffusion(self, d: dict) -> DDIMConfig:
        p = "diffusion"
        keys = (
            "train_timesteps",
            "beta_schedule",
            "beta_start",
            "beta_end",
            "prediction_type",
            "clip_sample",
            "clip_sample_range",
            "set_alpha_to_one",
            "steps_offset",
            "timestep_spacing",
        )
        s = self.section(d, "diffusion", "", keys)
        t = self.integer(s, "train_timesteps", p, 1)
        sched = self.string(s, "beta_schedule", p, choices=BETA_SCHEDULES)
        b0 = self.number(s, "beta_start", p, positive=True, default=0.0001)
        b1 = self.number(s, "beta_end", p, positive=True, default=0.02)
        if sched in ("linear", "scaled_linear") and not (b0 < b1 < 1):
            self.err(f"{p}.beta_end", f"expected beta_start ({b0}) < beta_end < 1, got {b1}")
        pred = self.string(s, "prediction_type", p, choices=PREDICTION_TYPES)
        clip = self.boolean(s, "clip_sample", p, default=True)
        clip_range = self.number(s, "clip_sample_range", p, positive=True, default=1.0)
        one = self.boolean(s, "set_alpha_to_one", p, default=True)
        offset = self.integer(s, "steps_offset", p, 0, default=0)
        if offset >= t:
            self.err(f"{p}.steps_offset", f"expected < train_timesteps ({t}), got {offset}")
        # A card without the field predates it: its model was made (and tuned) with "leading".
        spacing = self.string(s, "timestep_spacing", p, choices=TIMESTEP_SPACINGS, default="leading")
        if spacing not in TIMESTEP_SPACINGS:
            spacing = "leading"
        return DDIMConfig(
            t, sched or "linear", b0, b1, pred or "epsilon", clip, clip_range, one, offset, spacing
        )

    def sampler(self, d: dict, dif: DDIMConfig):
        p = "sampler"
        s = self.section(d, "sampler", "", ("kind", "steps", "eta", "inpainting"))
        kind = self.string(s, "kind", p, choices=SAMPLER_KINDS)
        steps = self.integer(s, "steps", p, 1)
        eta = self.number(s, "eta", p, default=0.0)
        if eta < 0:
            self.err(f"{p}.eta", f"expected >= 0, got {eta}")
        try:
            dif.check_steps(steps)
            steers = dif.prefix_steers(steps)
        except ValueError as e:
            self.err(f"{p}.{e}".split(":")[0], str(e).split(": ", 1)[1])
            steers = True  # no timesteps to judge by: only the step count is reported
        # A distilled one-step sampler never saw a prefix in training, and a DDIM run whose steps all see
        # the prefix buried in noise (K=1 at t=T-1) ignores it: by default neither can be steered.
        inpainting = self.boolean(s, "inpainting", p, default=kind != "distilled" and steers)
        if inpainting and not steers:
            self.err(
                f"{p}.inpainting",
                f"{steps} step(s) at timesteps {dif.timesteps(steps).tolist()} never see the prefix above "
                "the noise, so it cannot steer the chunk; set inpainting: false",
            )
        if kind == "distilled":
            if steps != 1:
                self.err(f"{p}.steps", f"a distilled sampler runs in exactly 1 step, got {steps}")
            if dif.prediction_type != "sample":
                self.err(
                    "diffusion.prediction_type",
                    f"a distilled sampler predicts the sample, got {dif.prediction_type!r}",
                )
            if eta != 0:
                self.err(f"{p}.eta", f"a distilled sampler is deterministic (eta 0), got {eta}")
        return kind, steps, eta, inpainting

    def graph(self, d: dict, required: bool) -> GraphSpec | None:
        if "graph" not in d:
            if required:
                self.err("graph", "missing (expected {kind, inputs, outputs})")
            return None
        p = "graph"
        g = self.section(d, "graph", "", ("kind", "inputs", "outputs", "ops"))
        kind = self.string(g, "kind", p, choices=GRAPH_KINDS)
        ops = self.string(g, "ops", p, choices=GRAPH_OPS, default="standard")
        if kind not in GRAPH_KINDS:
            return None
        maps = []
        for key, roles in (("inputs", GRAPH_INPUTS[kind]), ("outputs", GRAPH_OUTPUTS[kind])):
            m = self.section(g, key, p, roles)
            for r in roles:
                if r not in m:
                    self.err(f"{p}.{key}.{r}", f"missing (tensor name of {r} in a {kind} graph)")
                elif not isinstance(m[r], str) or not m[r]:
                    self.err(f"{p}.{key}.{r}", f"expected a tensor name, got {m[r]!r}")
            maps.append({r: m[r] for r in roles if isinstance(m.get(r), str)})
        return GraphSpec(kind, maps[0], maps[1], ops)


# ------------------------------------------------------------------------------------------------------
# Reading ONNX metadata_props on the node. ModelProto field 14 = repeated StringStringEntryProto
# {1: key, 2: value}; protobuf fields may come in any order and repeat. Neither kept library does this
# cheaply: ONNX Runtime shows custom_metadata_map only on a created session (weights loaded, graph
# optimized), and `onnx.load` parses every weight while holding the GIL; both would cost a running node's
# control loop on a swap, and `onnx` is not a run-time dependency. Writing uses `onnx` (to_onnx).
# ------------------------------------------------------------------------------------------------------
_METADATA_FIELD = 14


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if i >= len(buf):
            raise ValueError("truncated protobuf (varint runs past the end)")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7
        if shift > 63:
            raise ValueError("malformed protobuf varint")


def _fields(buf: bytes):
    """Yield (field_number, wire_type, start, end, value_start, value_end) for top-level fields."""
    i, n = 0, len(buf)
    while i < n:
        start = i
        key, i = _varint(buf, i)
        num, wt = key >> 3, key & 7
        if num == 0:
            raise ValueError("not an ONNX model (protobuf field number 0)")
        if wt == 0:
            _, i = _varint(buf, i)
            vs = ve = i
        elif wt == 1:
            vs, i = i, i + 8
            ve = i
        elif wt == 2:
            length, vs = _varint(buf, i)
            i = ve = vs + length
        elif wt == 5:
            vs, i = i, i + 4
            ve = i
        else:
            raise ValueError(f"not an ONNX model (unsupported protobuf wire type {wt})")
        if i > n:
            raise ValueError("truncated file (a protobuf field runs past the end)")
        yield num, wt, start, i, vs, ve


def _entry(buf: bytes) -> tuple[str, str]:
    kv = {1: "", 2: ""}
    for num, wt, _, _, vs, ve in _fields(buf):
        if wt == 2 and num in kv:
            kv[num] = buf[vs:ve].decode("utf-8")
    return kv[1], kv[2]


def _read_varint(f: BinaryIO) -> int | None:
    """A varint from a file; None at a clean end of file."""
    shift = result = 0
    while True:
        byte = f.read(1)
        if not byte:
            if shift:
                raise ValueError("truncated protobuf (varint runs past the end)")
            return None
        result |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return result
        shift += 7
        if shift > 63:
            raise ValueError("malformed protobuf varint")


def read_onnx_metadata(model: bytes | str | Path | BinaryIO) -> dict[str, str]:
    """metadata_props of a serialized ONNX ModelProto (bytes, a path, or a seekable binary file);
    ValueError on a truncated or non-ONNX model.

    Reads the top-level field headers and seeks past everything else, so a 30 MB model costs a few
    small reads: copying it into a bytes object held the GIL for ~7 ms, which a model swap on a running
    node must not do to its control loop.
    """
    if isinstance(model, (bytes, bytearray, memoryview)):
        return read_onnx_metadata(io.BytesIO(model))
    if isinstance(model, (str, Path)):
        with open(model, "rb") as f:
            return read_onnx_metadata(f)
    f = model
    size = f.seek(0, io.SEEK_END)
    f.seek(0)
    props: dict[str, str] = {}
    seen_graph = False
    while (key := _read_varint(f)) is not None:
        num, wt = key >> 3, key & 7
        if num == 0:
            raise ValueError("not an ONNX model (protobuf field number 0)")
        if wt == 0:
            if _read_varint(f) is None:
                raise ValueError("truncated protobuf (varint runs past the end)")
            continue
        if wt in (1, 5):
            length = 8 if wt == 1 else 4
        elif wt == 2:
            length = _read_varint(f)
            if length is None:
                raise ValueError("truncated protobuf (varint runs past the end)")
        else:
            raise ValueError(f"not an ONNX model (unsupported protobuf wire type {wt})")
        if f.tell() + length > size:
            raise ValueError("truncated file (a protobuf field runs past the end)")
        if num == _METADATA_FIELD and wt == 2:
            k, v = _entry(f.read(length))
            props[k] = v
            continue
        seen_graph = seen_graph or (num == 7 and wt == 2)
        f.seek(length, io.SEEK_CUR)
    if not seen_graph:
        raise ValueError("not an ONNX model (no graph)")
    return props
