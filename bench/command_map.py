"""Velocity-command map: the steady velocity a policy reaches for each constant command, against the expert.

Not a test. A quick in-process diagnostic (no ROS, a few seconds per command): for each command the ant
stands for 1 s, then holds the command; the mean ground-truth body velocity over the last 4 s (6 gait
cycles) is what the controller achieved. A policy that stands still for small commands (a dead zone) or
over-strides shows here long before a closed-loop average does. The policy loop is the node's
scheduling in its simplest form: a new chunk every tick from the delayed observations, one period of
inference latency, and the action for the current time taken from the newest chunk (blend none, delay
compensated). `bench/closed_loop.py` measures the real node through ROS.

    .venv/bin/python bench/command_map.py [--quick] [--json] [--model models/ant_locomotion.onnx]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from diffusion_controller.core.runtime import Policy
from diffusion_controller.sim.ant import CONTROL_PERIOD_S, Ant, AntConfig, SensorNoise
from diffusion_controller.sim.evaluate import rollout
from diffusion_controller.sim.expert import Expert

ROOT = Path(__file__).resolve().parents[1]

MODEL = ROOT / "models" / "ant_locomotion.onnx"
# (axis, value): axis 0 = vx (m/s), 2 = wz (rad/s); the dataset covers |vx| 0.1-0.5 and |wz| 0.3-1.5.
COMMANDS = [(0, v) for v in (-0.45, -0.3, -0.2, -0.1, 0.1, 0.2, 0.3, 0.45)] + [
    (2, w) for w in (-1.0, -0.5, 0.5, 0.8, 1.2)
]
QUICK_COMMANDS = [(0, -0.2), (0, 0.1), (0, 0.45), (2, 0.5)]
SETTLE_S, MEASURE_S = 1.0, 4.0


def policy_controller(policy: Policy, obs_delay_s: float, seed: int) -> Callable[[np.ndarray], np.ndarray]:
    """A new chunk every tick; each tick runs the newest chunk's action for now (made one tick ago)."""
    card = policy.card
    index = round(obs_delay_s / card.control_period_s) + 1 - card.first_offset
    if not 0 <= index < card.horizon:
        raise ValueError(f"observation delay {obs_delay_s} s is outside the chunk of {card.horizon} actions")
    rows: collections.deque[np.ndarray] = collections.deque(maxlen=card.history)
    rng = np.random.default_rng(seed)
    chunk: list[np.ndarray | None] = [None]

    def act(row: np.ndarray) -> np.ndarray:
        rows.append(row)
        while len(rows) < card.history:  # DiffuseLoco's start: repeat the first observation
            rows.appendleft(row)
        previous = chunk[0]
        noise = rng.standard_normal((card.horizon, card.action_dim)).astype(np.float32)
        chunk[0] = policy.predict(np.array(rows), noise=noise)
        return row[card.feature_slice("previous_action")] if previous is None else previous[index]

    return act


def achieved(controller: Callable[[np.ndarray], np.ndarray], axis: int, value: float, seconds: float,
             obs_delay_s: float, seed: int) -> float:
    """Mean achieved velocity along `axis` over the last MEASURE_S of holding the command."""
    command = [0.0, 0.0, 0.0]
    command[axis] = value
    noise = SensorNoise.realistic()
    ant = Ant(AntConfig(noise=noise, seed=seed, obs_delay_s=obs_delay_s))
    ant.reset(randomize=False)
    r = rollout(ant, controller, [(SETTLE_S, (0.0, 0.0, 0.0)), (seconds, tuple(command))], stop_on_fall=True)
    if r.fell:
        return float("nan")
    n = round(min(MEASURE_S, seconds) / CONTROL_PERIOD_S)
    return float(r.true_velocity[-n:, axis].mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 commands of 5 s")
    ap.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    ap.add_argument("--model", type=Path, default=MODEL, help="fused .onnx to evaluate")
    ap.add_argument("--obs-delay", type=float, default=0.04)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    commands, seconds = (QUICK_COMMANDS, 5.0) if args.quick else (COMMANDS, 7.0)
    policy = Policy.load(args.model, threads=1, log=lambda _m: None)

    rows = []
    print(f"{'command':>14} {'expert':>8} {'policy':>8}   (steady velocity, {args.model.name})")
    for i, (axis, value) in enumerate(commands):
        seed = args.seed + i
        expert = achieved(Expert().act, axis, value, seconds, args.obs_delay, seed)
        controller = policy_controller(policy, args.obs_delay, seed)
        pol = achieved(controller, axis, value, seconds, args.obs_delay, seed)
        unit = "m/s" if axis == 0 else "rad/s"
        name = "vx" if axis == 0 else "wz"
        rows.append({"axis": name, "command": value, "expert": expert, "policy": pol})
        print(f"{name} {value:+6.2f} {unit:<5} {expert:+8.3f} {pol:+8.3f}", flush=True)
    err = {who: float(np.mean([abs(r[who] - r["command"]) for r in rows])) for who in ("expert", "policy")}
    print(f"mean |achieved - command|: expert {err['expert']:.3f}, policy {err['policy']:.3f}")
    if args.json:
        print(json.dumps({"model": str(args.model), "obs_delay_s": args.obs_delay, "rows": rows,
                          "expert_mean_abs_err": err["expert"], "policy_mean_abs_err": err["policy"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
