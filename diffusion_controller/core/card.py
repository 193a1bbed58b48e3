"""Model card: the one description of a policy model that the node, the exporter and the tests share.

A model is one .onnx whose metadata_props key `model_card` holds the card as YAML text, with the same
YAML beside it (`<model>.yaml`). Loading validates everything the node relies on, and every error names
the field and what was expected, because a wrong card found on the robot is far costlier than one
rejected at load time. This module holds ModelCard (its fields, the views the node reads, and its YAML,
dict and ONNX forms); the vocabulary and parts are core/card_schema.py, the checks core/card_parser.py,
the metadata reader (no `onnx` package, no session) core/onnx_metadata.py, and which card a model file
has (metadata or the .yaml beside it) core/card_source.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from diffusion_controller.core.card_parser import CardParser
from diffusion_controller.core.card_schema import FORMAT, METADATA_KEY, CardError, Feature, GraphSpec, Layout
from diffusion_controller.core.ddim import DDIMConfig
from diffusion_controller.core.onnx_metadata import read_onnx_metadata

__all__ = ["CardError", "ModelCard"]

#: libyaml's safe loader where PyYAML has it (4x faster: the card is parsed on a running node's swaps).
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


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
        return cls(**CardParser(source).parse(d, require_graph))

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
            if self.graph.batch != 1:  # absent = 1: a batch-1 card reads as before
                d["graph"]["batch"] = self.graph.batch
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
