"""Closed-loop rollouts on the ant and velocity-tracking metrics (no ROS).

One rollout loop serves the dataset generator, the expert tests and the tuning runs, so the numbers
reported for the expert are measured exactly the way the training data is produced.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence

import numpy as np

from diffusion_controller.sim.ant import (
    CONTROL_PERIOD_S,
    N_JOINTS,
    OBS_DIM,
    STANDING_POSE,
    TORQUE_LIMIT,
    Ant,
    card_observation,
)

Schedule = Sequence[tuple[float, Sequence[float]]]  # (duration s, [vx, vy, wz])
SKILLS = ("stand", "walk_forward", "walk_backward", "turn_left", "turn_right", "other")


def skill_of(cmd: Sequence[float], eps: float = 1e-6) -> str:
    """Skill label of a command (the dominant non-zero component decides)."""
    vx, vy, wz = cmd
    if abs(vx) < eps and abs(vy) < eps and abs(wz) < eps:
        return "stand"
    if abs(vy) < eps and abs(wz) < eps:
        return "walk_forward" if vx > 0 else "walk_backward"
    if abs(vx) < eps and abs(vy) < eps:
        return "turn_left" if wz > 0 else "turn_right"
    return "other"


@dataclasses.dataclass
class Rollout:
    obs: np.ndarray  # (N, OBS_DIM) card observation rows the controller saw
    action: np.ndarray  # (N, 8) position targets applied from t_k to t_k + period
    command: np.ndarray  # (N, 3)
    true_velocity: np.ndarray  # (N, 3) ground-truth body-frame [vx, vy, wz] at t_k
    time: np.ndarray  # (N,)
    fell: bool


def rollout(
    ant: Ant,
    policy: Callable[[np.ndarray], np.ndarray],
    schedule: Schedule,
    period: float = CONTROL_PERIOD_S,
    stop_on_fall: bool = True,
    perturb: Callable[[np.ndarray], np.ndarray] | None = None,
    clock_offset_s: float = 0.0,
) -> Rollout:
    """Run ``policy(obs_row) -> targets`` on the ant through the command schedule.

    Row k: observation at t_k (before action k), previous_action = the target applied at step k-1
    (standing pose at k=0); with a sensor delay, the target in force at the sensors' time, as the node
    records its own commands. An effort-driven ant (AntConfig.drive) takes ``policy``'s output as joint
    torques (previous_action zero at k=0). With ``perturb`` (DART-style data collection), the ant executes
    ``perturb(target)`` while the recorded action stays the policy's own target: the data then shows how
    the expert recovers from states its clean execution would never reach. ``clock_offset_s`` shifts the
    gait clock (a random gait phase at the start of a dataset episode).
    """
    n = round(sum(d for d, _ in schedule) / period)
    commands = np.concatenate([np.tile(np.asarray(c, float), (round(d / period), 1)) for d, c in schedule])[
        :n
    ]
    obs = np.zeros((n, OBS_DIM))
    act = np.zeros((n, N_JOINTS))
    vel = np.zeros((n, 3))
    times = np.zeros(n)
    effort = ant.cfg.drive == "effort"
    prev = np.zeros(N_JOINTS) if effort else STANDING_POSE.copy()
    sent: list[tuple[float, np.ndarray]] = []  # (time applied, action), newest last
    fell = False
    k = 0
    for k in range(n):
        m = ant.observe()
        # previous_action as the node computes it: the last command sent strictly before the row's sensor
        # time (with no sensor delay, the one of step k-1).
        while len(sent) > 1 and sent[1][0] < m.t - 1e-9:
            sent.pop(0)
        row_prev = sent[0][1] if sent and sent[0][0] < m.t - 1e-9 else prev
        o = card_observation(m, commands[k], row_prev, clock_offset_s)
        gt = ant.ground_truth()
        target = policy(o)
        apply = ant.set_effort if effort else ant.set_target
        a = apply(target if perturb is None else perturb(target))
        obs[k], times[k] = o, ant.time
        if perturb is None:
            act[k] = a
        elif effort:
            act[k] = np.clip(target, -TORQUE_LIMIT, TORQUE_LIMIT)
        else:
            act[k] = np.clip(target, ant.joint_lower, ant.joint_upper)
        vel[k] = [gt.linear_velocity[0], gt.linear_velocity[1], gt.angular_velocity[2]]
        sent.append((ant.time, a))
        ant.step(period)
        if ant.fallen():
            fell = True
            if stop_on_fall:
                k += 1
                break
    else:
        k = n
    return Rollout(obs[:k], act[:k], commands[:k], vel[:k], times[:k], fell)


def tracking_errors(
    r: Rollout, period: float = CONTROL_PERIOD_S, settle_s: float = 1.0, window_s: float = 2.0 / 3.0
) -> dict[str, dict[str, float]]:
    """Per skill: mean |cmd - v| of vx, vy, wz after ``settle_s`` into each constant-command segment.

    ``v`` is the ground-truth body velocity averaged over ``window_s`` (one 1.5 Hz gait cycle), so the error
    measures tracking, not the gait's own within-stride oscillation. Also reports the raw per-step error.
    """
    acc: dict[str, list[np.ndarray]] = {s: [] for s in SKILLS}
    raw: dict[str, list[np.ndarray]] = {s: [] for s in SKILLS}
    w = max(1, round(window_s / period))
    settle = round(settle_s / period)
    change = np.flatnonzero(np.any(np.diff(r.command, axis=0) != 0, axis=1)) + 1
    bounds = [0, *change.tolist(), len(r.command)]
    for a, b in itertools.pairwise(bounds):
        if b - a - settle < w:
            continue
        v = r.true_velocity[a + settle : b]
        smooth = np.stack([np.convolve(v[:, j], np.ones(w) / w, mode="valid") for j in range(3)], axis=1)
        cmd = r.command[a]
        skill = skill_of(cmd)
        acc[skill].append(np.abs(smooth - cmd))
        raw[skill].append(np.abs(v - cmd))
    out = {}
    for s in SKILLS:
        if acc[s]:
            e = np.concatenate(acc[s])
            er = np.concatenate(raw[s])
            out[s] = {
                "vx": float(e[:, 0].mean()),
                "vy": float(e[:, 1].mean()),
                "wz": float(e[:, 2].mean()),
                "vx_raw": float(er[:, 0].mean()),
                "wz_raw": float(er[:, 2].mean()),
                "seconds": len(e) * period,
            }
    return out


def expert_report(seconds_per_command: float = 8.0, noise_scale: float = 1.0, seed: int = 0) -> list[dict]:
    """Expert tracking per command over the dataset's command range (stand between commands)."""
    from diffusion_controller.sim.ant import AntConfig, SensorNoise
    from diffusion_controller.sim.expert import Expert

    commands = [(0.0, 0.0, 0.0)]
    commands += [(s * v, 0.0, 0.0) for s in (1, -1) for v in (0.1, 0.3, 0.5)]
    commands += [(0.0, 0.0, s * w) for s in (1, -1) for w in (0.3, 0.9, 1.5)]
    rows = []
    for i, cmd in enumerate(commands):
        ant = Ant(AntConfig(noise=SensorNoise.realistic(noise_scale), seed=seed + i))
        ant.reset(randomize=True)
        r = rollout(ant, Expert().act, [(1.0, (0.0, 0.0, 0.0)), (seconds_per_command, cmd)])
        err = tracking_errors(r)[skill_of(cmd)]
        mean = r.true_velocity[round(2.0 / CONTROL_PERIOD_S) :].mean(axis=0)
        rows.append({"command": cmd, "skill": skill_of(cmd), "fell": r.fell, "mean_velocity": mean, **err})
    return rows


def main() -> int:
    """Print the expert's tracking table (``python -m diffusion_controller.sim.evaluate``)."""
    print("command [vx, vy, wz]     skill           mean [vx, vy, wz]       |e_vx|  |e_wz|  fell")
    for r in expert_report():
        cmd = "[" + ", ".join(f"{c:+.1f}" for c in r["command"]) + "]"
        mean = "[" + ", ".join(f"{c:+.2f}" for c in r["mean_velocity"]) + "]"
        print(f"{cmd:24s} {r['skill']:15s} {mean:23s} {r['vx']:.3f}   {r['wz']:.3f}   {r['fell']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
