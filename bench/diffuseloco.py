"""The DiffuseLoco-size policy's card: the shape every DiffuseLoco-size row of bench/inference.py times
(and bench/gpu_breakdown.py breaks down) with random weights."""

from __future__ import annotations

from diffusion_controller.core.card import ModelCard

JOINTS = [f"{leg}_{j}" for leg in ("fr", "fl", "rr", "rl") for j in ("hip", "thigh", "calf")]


def diffuseloco_card() -> ModelCard:
    """DiffuseLoco's 45-column observation (8 rows), 12 joint targets, horizon 16."""
    feats = [
        {"name": "projected_gravity", "kind": "projected_gravity", "size": 3},
        {"name": "projected_forward", "kind": "generic", "size": 3},
        {"name": "velocity_command", "kind": "velocity_command", "size": 3},
        {"name": "joint_position", "kind": "joint_position", "size": 12, "joints": JOINTS},
        {"name": "joint_velocity", "kind": "joint_velocity", "size": 12, "joints": JOINTS},
        {"name": "previous_action", "kind": "previous_action", "size": 12},
    ]
    return ModelCard.from_dict(
        {
            "format": "diffusion_controller/model_card@1",
            "name": "bench_diffuseloco",
            "version": "0.0.0",
            "description": "random weights, benchmark only",
            "control_period_s": 0.02,
            "observation": {"history": 8, "features": feats},
            "action": {
                "joints": JOINTS,
                "kind": "position",
                "units": "rad",
                "lower": [-1.0] * 12,
                "upper": [1.0] * 12,
                "horizon": 16,
                "first_offset": 1,
            },
            "normalization": {
                "observation": {"mean": [0.0] * 45, "std": [1.0] * 45},
                "action": {"min": [-1.0] * 12, "max": [1.0] * 12},
            },
            "diffusion": {
                "train_timesteps": 100,
                "beta_schedule": "squaredcos_cap_v2",
                "prediction_type": "epsilon",
                "clip_sample": True,
                "clip_sample_range": 1.0,
                "set_alpha_to_one": True,
                "steps_offset": 0,
            },
            "sampler": {"kind": "ddim", "steps": 10, "eta": 0.0},
        },
        require_graph=False,
    )
