"""The scripted closed-loop episode and the expert baseline it is scored against (no ROS).

An episode is a velocity-command sequence (stand, walk, turn, stop, with switches) that depends on the
episode number only, so the policy through ROS (`closed_loop`) and the expert in-process (`run_expert`)
drive the same sequences with the same observation delay and sensor noise; `vel_error` is the score.
"""

from __future__ import annotations

import math

import numpy as np

from diffusion_controller.sim.ant import EFFORT_TIMESTEP_S, Ant, AntConfig, SensorNoise
from diffusion_controller.sim.evaluate import rollout, tracking_errors
from diffusion_controller.sim.expert import EffortExpert, EffortExpertConfig, Expert

# Sensor noise of the training data (sim/dataset.py), so the policy sees what it was trained on.
NOISE = {
    "joint_position": 0.002,
    "joint_velocity": 0.05,
    "orientation": 0.005,
    "angular_velocity": 0.02,
    "linear_velocity": 0.03,
}
SEGMENTS = [  # (skill, command) building blocks of the scripted sequence
    ("walk_forward", (0.3, 0.0, 0.0)),
    ("turn_left", (0.0, 0.0, 0.8)),
    ("walk_backward", (-0.2, 0.0, 0.0)),
    ("turn_right", (0.0, 0.0, -1.0)),
    ("walk_forward", (0.45, 0.0, 0.0)),
]


def command_sequence(episode: int, seconds: float) -> list[tuple[float, tuple[float, float, float]]]:
    """2 s stand, then 3 s skill blocks in an episode-dependent order (a 1.5 s stop after the second),
    then 2 s stand; the last block shortens to fit."""
    rng = np.random.default_rng(1000 + episode)
    order = rng.permutation(len(SEGMENTS))
    stand = (0.0, 0.0, 0.0)
    seq: list[tuple[float, tuple[float, float, float]]] = [(2.0, stand)]
    left = seconds - 4.0
    n = 0
    while left >= 2.0:
        if n == 2 and left >= 3.5:
            seq.append((1.5, stand))
            left -= 1.5
        block = min(3.0, left)
        seq.append((block, SEGMENTS[order[n % len(order)]][1]))
        left -= block
        n += 1
    seq.append((2.0 + left, stand))
    return seq


def vel_error(errors: dict[str, dict[str, float]]) -> float:
    """Time-weighted mean over skills of |vx err| + |vy err| + |wz err| (gait-cycle averaged)."""
    total = sum(e["seconds"] for e in errors.values())
    if total == 0:
        return math.nan
    return sum((e["vx"] + e["vy"] + e["wz"]) * e["seconds"] for e in errors.values()) / total


def merge_errors(runs: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for r in runs:
        for skill, e in r.items():
            acc = out.setdefault(skill, {"vx": 0.0, "vy": 0.0, "wz": 0.0, "seconds": 0.0})
            for k in ("vx", "vy", "wz"):
                acc[k] += e[k] * e["seconds"]
            acc["seconds"] += e["seconds"]
    for e in out.values():
        for k in ("vx", "vy", "wz"):
            e[k] = e[k] / e["seconds"] if e["seconds"] else math.nan
    return out


def run_expert(episodes: int, seconds: float, obs_delay: float, seed: int, effort: bool = False) -> dict:
    """The expert on the same sequences, delay and noise; `effort`: the torque expert at 200 Hz on the
    effort-driven ant (knowing its sensor delay, as in its training data)."""
    errs, falls = [], 0
    for ep in range(episodes):
        noise = SensorNoise(**NOISE)
        if effort:
            ant = Ant(AntConfig(noise=noise, seed=seed + ep, obs_delay_s=obs_delay, drive="effort",
                                timestep=EFFORT_TIMESTEP_S))  # fmt: skip
            expert = EffortExpert(EffortExpertConfig(lookahead_s=obs_delay))
        else:
            ant = Ant(AntConfig(noise=noise, seed=seed + ep, obs_delay_s=obs_delay))
            expert = Expert()
        ant.reset(randomize=False)
        period = expert.period
        r = rollout(ant, expert.act, command_sequence(ep, seconds), period, stop_on_fall=True)
        falls += int(r.fell)
        errs.append(tracking_errors(r, period=period))
    merged = merge_errors(errs)
    return {"falls": falls, "vel_err": vel_error(merged), "per_skill": merged}

