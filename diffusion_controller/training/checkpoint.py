"""Training checkpoint format: what a training run hands to `export_policy`.

A checkpoint is one `torch.save` dict (loadable with `weights_only=True`):

    {
      "format": "diffusion_controller/checkpoint@1",
      "network": NetworkConfig.to_dict(),     # sizes: obs_dim, action_dim, horizon, history, ...
      "state_dict": network.state_dict(),     # the weights to export (EMA weights, if used)
      "card": {...},                          # model card fields minus `graph` (observation, action,
                                              # normalization, diffusion, sampler, training, ...)
      ...extra                                # free: epoch, optimizer state, losses (plain types/tensors)
    }

The card section is validated when saving and loading, so a checkpoint whose normalization or joint
lists do not fit the network is rejected before any export is attempted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffusion_controller.core.card import CardError, ModelCard
from diffusion_controller.training.network import DiffusionTransformer, NetworkConfig

CHECKPOINT_FORMAT = "diffusion_controller/checkpoint@1"
_RESERVED = ("format", "network", "state_dict", "card")


@dataclass
class Checkpoint:
    """A loaded checkpoint: the network in eval mode, its validated card (graph None) and the extras."""

    network: DiffusionTransformer
    card: ModelCard
    extra: dict[str, Any] = field(default_factory=dict)


def check_card_fits(card: ModelCard, cfg: NetworkConfig) -> None:
    """Raise CardError when the card's sizes disagree with the network's."""
    errors = []
    if card.obs_dim != cfg.obs_dim:
        errors.append(
            f"observation.features: sizes sum to {card.obs_dim}, network expects obs_dim {cfg.obs_dim}"
        )
    if card.action_dim != cfg.action_dim:
        errors.append(f"action.joints: {card.action_dim} joints, network expects action_dim {cfg.action_dim}")
    if card.horizon != cfg.horizon:
        errors.append(f"action.horizon: {card.horizon}, network expects horizon {cfg.horizon}")
    if card.history != cfg.history:
        errors.append(f"observation.history: {card.history}, network expects history {cfg.history}")
    cmd = card.feature_of_kind("velocity_command")
    want = None
    if cmd is not None:
        s = card.feature_slice(cmd.name)
        want = (s.start, s.stop)
    if want != cfg.command_slice:
        errors.append(
            f"observation.features: velocity_command columns {want}, network expects {cfg.command_slice}"
        )
    if errors:
        raise CardError(errors)


def save_checkpoint(
    path: str | Path, network: DiffusionTransformer, card_dict: dict | ModelCard, **extra: Any
) -> Path:
    """Write a checkpoint; `card_dict` is a card without `graph` (a ModelCard or its dict)."""
    card = (
        card_dict if isinstance(card_dict, ModelCard) else ModelCard.from_dict(card_dict, require_graph=False)
    )
    check_card_fits(card, network.cfg)
    clash = [k for k in extra if k in _RESERVED]
    if clash:
        raise ValueError(f"extra keys {clash} clash with the checkpoint's own keys {list(_RESERVED)}")
    d = card.to_dict()
    d.pop("graph", None)
    path = Path(path)
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "network": network.cfg.to_dict(),
            "state_dict": {k: v.detach().cpu() for k, v in network.state_dict().items()},
            "card": d,
            **extra,
        },
        path,
    )
    return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read and validate a checkpoint written by save_checkpoint (weights_only: no code is unpickled)."""
    path = Path(path)
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for missing/corrupt files
        raise ValueError(f"cannot load checkpoint {path}: {e}") from e
    if not isinstance(d, dict) or d.get("format") != CHECKPOINT_FORMAT:
        got = d.get("format") if isinstance(d, dict) else type(d).__name__
        raise ValueError(f"{path}: expected format {CHECKPOINT_FORMAT!r}, got {got!r}")
    for key in ("network", "state_dict", "card"):
        if key not in d:
            raise ValueError(f"{path}: checkpoint has no {key!r} entry")
    cfg = NetworkConfig.from_dict(d["network"])
    card_d = dict(d["card"])
    card_d.pop("graph", None)
    card = ModelCard.from_dict(card_d, require_graph=False, source=str(path))
    check_card_fits(card, cfg)
    net = DiffusionTransformer(cfg)
    net.load_state_dict(d["state_dict"])
    net.eval()
    return Checkpoint(net, card, {k: v for k, v in d.items() if k not in _RESERVED})
