"""Tiny random policies for tests and benchmarks: a real exported model with a valid card in well under 2 s.

A fixture, not part of the product: in bench/ (the top layer, beside the hardening harness that uses it;
tests import it through pytest.ini's `pythonpath`). Used by the policy-core tests, the node's tests and
the benchmarks that need a model of a given shape, so the defaults follow the demo ant layout of
docs/DESIGN.md (36 observation columns, 8 joints, 50 Hz). The weights are random but scaled so that
the output depends visibly on every input (a test that swaps two inputs sees a different chunk).

    from tiny_models import make_tiny_model
    path = make_tiny_model(tmp_path)                      # fused graph, K=2, horizon 8, history 4
    path = make_tiny_model(tmp_path, graph="denoiser")    # K chosen at run time
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffusion_controller.core.card import ModelCard
from diffusion_controller.training.network import DiffusionTransformer, NetworkConfig

ANT_JOINTS = ("hip_1", "ankle_1", "hip_2", "ankle_2", "hip_3", "ankle_3", "hip_4", "ankle_4")
_D = math.pi / 180
#: gymnasium ant.xml joint ranges (rad), in ANT_JOINTS order.
ANT_LOWER = (-30 * _D, 30 * _D, -30 * _D, -70 * _D, -30 * _D, -70 * _D, -30 * _D, 30 * _D)
ANT_UPPER = (30 * _D, 70 * _D, 30 * _D, -30 * _D, 30 * _D, -30 * _D, 30 * _D, 70 * _D)


def ant_features(joints: tuple[str, ...] = ANT_JOINTS) -> list[dict[str, Any]]:
    """The demo observation row: 3+3+3+3+8+8+8 = 36 columns."""
    n = len(joints)
    return [
        {"name": "projected_gravity", "kind": "projected_gravity", "size": 3},
        {"name": "base_angular_velocity", "kind": "base_angular_velocity", "size": 3},
        {"name": "base_linear_velocity", "kind": "base_linear_velocity", "size": 3},
        {"name": "velocity_command", "kind": "velocity_command", "size": 3},
        {"name": "joint_position", "kind": "joint_position", "size": n, "joints": list(joints)},
        {"name": "joint_velocity", "kind": "joint_velocity", "size": n, "joints": list(joints)},
        {"name": "previous_action", "kind": "previous_action", "size": n},
    ]


def _obs_stats(features: list[dict[str, Any]], rng: np.random.Generator) -> tuple[list[float], list[float]]:
    """Plausible normalization: gravity near -z, joint positions near mid-range, unit-ish spreads."""
    center = (np.array(ANT_LOWER) + np.array(ANT_UPPER)) / 2
    mean, std = [], []
    for f in features:
        m = np.zeros(f["size"])
        if f["kind"] == "projected_gravity":
            m[2] = -1.0
        elif f["kind"] in ("joint_position", "previous_action") and f["size"] == len(center):
            m = center.copy()
        mean += m.tolist()
        std += (0.5 + rng.random(f["size"])).tolist()
    return mean, std


def tiny_card(
    *,
    features: list[dict[str, Any]] | None = None,
    horizon: int = 8,
    history: int = 4,
    steps: int = 2,
    eta: float = 0.0,
    name: str = "tiny_ant",
    prediction_type: str = "epsilon",
    clip_sample: bool = True,
    beta_schedule: str = "squaredcos_cap_v2",
    train_timesteps: int = 100,
    period: float = 0.02,
    first_offset: int = 1,
    seed: int = 0,
) -> ModelCard:
    """A valid card without graph section for the ant joints (or for `features`)."""
    features = ant_features() if features is None else [dict(f) for f in features]
    rng = np.random.default_rng(seed)
    mean, std = _obs_stats(features, rng)
    d = {
        "format": "diffusion_controller/model_card@1",
        "name": name,
        "version": "0.0.1",
        "description": "tiny random policy for tests (not trained)",
        "control_period_s": period,
        "observation": {"history": history, "features": features},
        "action": {
            "joints": list(ANT_JOINTS),
            "kind": "position",
            "units": "rad",
            "lower": list(ANT_LOWER),
            "upper": list(ANT_UPPER),
            "horizon": horizon,
            "first_offset": first_offset,
        },
        "normalization": {
            "observation": {"mean": mean, "std": std},
            "action": {"min": list(ANT_LOWER), "max": list(ANT_UPPER)},
        },
        "diffusion": {
            "train_timesteps": train_timesteps,
            "beta_schedule": beta_schedule,
            "beta_start": 0.0001,
            "beta_end": 0.02,
            "prediction_type": prediction_type,
            "clip_sample": clip_sample,
            "clip_sample_range": 1.0,
            "set_alpha_to_one": True,
            "steps_offset": 0,
        },
        "sampler": {"kind": "ddim", "steps": steps, "eta": eta},
        "training": {"dataset": "none (random weights)", "seed": seed},
    }
    return ModelCard.from_dict(d, require_graph=False)


def tiny_network(
    card: ModelCard, *, layers: int = 1, heads: int = 2, width: int = 32, seed: int = 0
) -> DiffusionTransformer:
    """A random network sized for `card`, weights scaled ~1/sqrt(fan_in) so outputs are O(1)."""
    cmd = card.feature_of_kind("velocity_command")
    sl = card.feature_slice(cmd.name) if cmd is not None else None
    cfg = NetworkConfig(
        obs_dim=card.obs_dim,
        action_dim=card.action_dim,
        horizon=card.horizon,
        history=card.history,
        command_slice=(sl.start, sl.stop) if sl is not None else None,
        layers=layers,
        heads=heads,
        width=width,
    )
    gen = torch.Generator().manual_seed(seed)
    net = DiffusionTransformer(cfg)
    with torch.no_grad():
        for p in net.parameters():
            fan_in = p.shape[-1] if p.dim() > 1 else 1
            p.copy_(torch.randn(p.shape, generator=gen) * (0.1 if p.dim() == 1 else 1.0 / math.sqrt(fan_in)))
    return net.eval()


def make_tiny_model(
    out_dir: str | Path,
    *,
    graph: str = "fused",
    steps: int = 2,
    features: list[dict[str, Any]] | None = None,
    horizon: int = 8,
    history: int = 4,
    seed: int = 0,
    eta: float = 0.0,
    name: str | None = None,
    layers: int = 1,
    heads: int = 2,
    width: int = 32,
    ops: str | None = None,
    batch: int = 1,
    **card_options: Any,
) -> Path:
    """Build, export and card a random tiny policy; returns `<out_dir>/<name>.onnx` (card beside it).

    name defaults to `tiny_ant_<graph>`; `card_options` go to `tiny_card` (prediction_type, clip_sample,
    beta_schedule, train_timesteps, period, first_offset); ops: the export's graph ops (None: its default);
    batch: histories per run of a fused graph (card graph.batch).
    """
    from diffusion_controller.training.export import export_onnx

    name = name or f"tiny_ant_{graph}"
    card = tiny_card(
        features=features,
        horizon=horizon,
        history=history,
        steps=steps,
        eta=eta,
        name=name,
        seed=seed,
        **card_options,
    )
    net = tiny_network(card, layers=layers, heads=heads, width=width, seed=seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return export_onnx(net, card, out_dir / f"{name}.onnx", graph=graph, steps=steps, eta=eta, ops=ops,
                      batch=batch)  # fmt: skip
