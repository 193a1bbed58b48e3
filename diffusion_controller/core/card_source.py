"""Where the card of a model file comes from: its ONNX metadata, else the `.yaml` beside it.

One rule for every reader (the runtime, the node's swap check, the policy node, the exporter's report,
the benchmarks): a card in metadata_props['model_card'] is the model's card; a `.yaml` beside the model
stands in when the metadata has none; both present and different is refused with the keys that differ,
because which one is right cannot be told (a stale .yaml beside a re-exported model, or a hand-edited one).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import yaml

from diffusion_controller.core.card import _YAML_LOADER, ModelCard
from diffusion_controller.core.card_parser import layout_from_dict
from diffusion_controller.core.card_schema import METADATA_KEY, CardError, Layout
from diffusion_controller.core.onnx_metadata import read_onnx_metadata


class ModelError(RuntimeError):
    """A model that cannot be used: bad path, corrupt file, tensor mismatch, provider, bad inputs."""


def sidecar_path(onnx_path: str | Path) -> Path:
    """`<model>.yaml` beside `<model>.onnx`."""
    return Path(onnx_path).with_suffix(".yaml")


def card_of_model(
    path: str | Path, log: Callable[[str], None] | None = None, *, reconcile: bool = True
) -> ModelCard:
    """The card of the model file at `path`: from its metadata, else from the .yaml beside it.

    Reads only the metadata (the weights are seeked past), so it is cheap for any model size. `log` is
    told when the .yaml stands in for a missing metadata card. reconcile=False takes a metadata card
    without opening the .yaml beside it: for a swap's parameter call, whose loader then loads the model
    (reconciling both) off the executor. Raises ModelError for a file that cannot be read, is not ONNX,
    has no card, or has two cards that differ; CardError for an invalid card.
    """
    path = Path(path)
    try:
        props = read_onnx_metadata(path)
    except OSError as e:
        raise ModelError(f"model {path}: cannot read it ({e.strerror or e})") from e
    except ValueError as e:
        raise ModelError(f"model {path} is not a valid ONNX file: {e}") from e
    side = sidecar_path(path)
    if METADATA_KEY in props:
        card = ModelCard.from_yaml_text(props[METADATA_KEY], source=f"{path} (metadata)")
        if reconcile and side.exists():
            other = ModelCard.from_yaml(side)
            a, b = card.to_dict(), other.to_dict()
            diff = [k for k in a.keys() | b.keys() if a.get(k) != b.get(k)]
            if diff:
                raise ModelError(
                    f"model {path}: its metadata card and {side} differ in {sorted(diff)}; "
                    "re-export the model or delete the stale .yaml"
                )
        return card
    if side.exists():
        if log is not None:
            log(f"policy: {path} has no card in its metadata; using {side}")
        return ModelCard.from_yaml(side)
    raise ModelError(f"model {path}: no model card (no metadata_props[{METADATA_KEY!r}] and no {side})")


def read_layout(path: str | Path) -> Layout:
    """A layout from a layout or card YAML, or the card of a model file (`card_of_model`'s rule)."""
    path = Path(path)
    if path.suffix == ".onnx":
        return card_of_model(path)
    try:
        d = yaml.load(path.read_text(encoding="utf-8"), Loader=_YAML_LOADER)
    except (OSError, yaml.YAMLError) as e:
        raise CardError(f"cannot read {path}: {e}", str(path)) from e
    return layout_from_dict(d, str(path))
