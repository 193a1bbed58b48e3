"""Expert demonstrations for training, straight from the MuJoCo ant (no ROS): ``generate_dataset``.

Each episode starts from a randomized standing pose and follows a random command schedule with skill
switches inside the episode (stand, walk forward, walk backward, turn left, turn right; varied
magnitudes). The expert (sim/expert.py) drives the ant at the control period; sensors carry noise.

File format: one ``.npz`` (``numpy.load(path)``), N rows over E episodes, concatenated:

- ``obs`` (N, 38) float32: card observation rows in the layout of ``layout`` (DESIGN.md order:
  projected_gravity 3, base_angular_velocity 3, base_linear_velocity 3, velocity_command 3,
  joint_position 8, joint_velocity 8, previous_action 8, gait_clock 2; joints hip_1, ankle_1, ...,
  hip_4, ankle_4).
  Row k is the observation at control step k's time t_k, taken BEFORE action k is applied (with
  ``--obs-delay d`` the sensors in it were measured at t_k - d). ``previous_action`` in row k is
  the target executed at step k-1 (``action[k-1]`` unless ``--action-noise`` perturbed it); at an
  episode's first row it is the standing pose. ``gait_clock`` is [sin, cos] of 2 pi 1.5 Hz times the
  sensors' time plus a random per-episode offset; the expert's trot follows this clock.
- ``action`` (N, 8) float32: the expert's joint position target (rad) for t_k to t_k + period. With
  ``--action-noise`` (DART) the ant executed a perturbed target, but the label is the expert's own.
- ``command`` (N, 3) float32: the velocity command [vx, vy, wz] at t_k (also inside ``obs``).
- ``true_velocity`` (N, 3) float32: ground-truth body-frame [vx, vy, wz] at t_k, for evaluation.
- ``episode_ends`` (E,) int64: cumulative end index (exclusive) of each episode.
- ``layout`` (str): JSON list of the features {name, kind, size[, joints | frequency_hz]}, the card's
  feature list.
- ``period`` (float): control period in seconds (0.02; 0.005 with ``--drive effort``).
- ``obs_delay_s`` (float): how old the sensors in each row are (``--obs-delay``; a whole number of
  periods). Training writes it into the card's ``first_offset``: the chunk's first action is
  ``obs_delay_s + period`` after the sensors' stamp, the time the node's delay compensation schedules it.
- ``action_kind`` (str): ``position`` (joint targets, rad) or ``effort`` (joint torques, N m, with
  ``--drive effort``: the ant's motors driven directly at 200 Hz by sim/expert.py's EffortExpert).
- ``action_joints`` (8,) str, ``action_lower`` / ``action_upper`` (8,) float: joint ranges in rad
  from ant.xml, in action order.
- ``meta`` (str): JSON with the generator's arguments, sensor noise and expert/ant settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import sys
import time

import numpy as np

from diffusion_controller.sim.ant import (
    CONTROL_PERIOD_S,
    EFFORT_PERIOD_S,
    EFFORT_TIMESTEP_S,
    GAIT_FREQUENCY_HZ,
    JOINTS,
    OBS_DIM,
    TORQUE_LIMIT,
    Ant,
    AntConfig,
    SensorNoise,
    layout_json,
)
from diffusion_controller.sim.evaluate import SKILLS, Schedule, rollout, tracking_errors
from diffusion_controller.sim.expert import EffortExpert, EffortExpertConfig, Expert, ExpertConfig

# Command ranges the expert tracks well (measured with sim/evaluate.py; about 0.5 m/s is the trot's top).
VX_RANGE = (0.1, 0.5)  # m/s, magnitude
WZ_RANGE = (0.3, 1.5)  # rad/s, magnitude
SEGMENT_S = (2.0, 5.0)
SKILL_WEIGHTS = {
    "stand": 0.2,
    "walk_forward": 0.25,
    "walk_backward": 0.15,
    "turn_left": 0.2,
    "turn_right": 0.2,
}


def random_schedule(rng: np.random.Generator, seconds: float, period: float = CONTROL_PERIOD_S) -> Schedule:
    """Constant-command segments of 2-5 s with a random skill and magnitude each, ``seconds`` in total."""
    names = list(SKILL_WEIGHTS)
    p = np.array([SKILL_WEIGHTS[n] for n in names])
    out: list[tuple[float, list[float]]] = []
    total = 0.0
    prev = None
    while total < seconds - 1e-9:
        dur = min(round(rng.uniform(*SEGMENT_S) / period) * period, seconds - total)
        skill = prev
        while skill == prev:  # every segment boundary is a real switch
            skill = names[rng.choice(len(names), p=p / p.sum())]
        vx = rng.uniform(*VX_RANGE)
        wz = rng.uniform(*WZ_RANGE)
        cmd = {
            "stand": [0.0, 0.0, 0.0],
            "walk_forward": [vx, 0.0, 0.0],
            "walk_backward": [-vx, 0.0, 0.0],
            "turn_left": [0.0, 0.0, wz],
            "turn_right": [0.0, 0.0, -wz],
        }[skill]
        out.append((dur, cmd))
        total += dur
        prev = skill
    return out


@dataclasses.dataclass
class EpisodeSpec:
    seed: int
    seconds: float
    obs_delay_s: float
    noise_scale: float
    action_noise: float = 0.0  # max std (rad) of DART noise on the executed targets; per episode U(0, max)
    drive: str = "position"  # "effort": joint torques at 200 Hz from EffortExpert (N m; noise in N m)

    @property
    def period(self) -> float:
        return EFFORT_PERIOD_S if self.drive == "effort" else CONTROL_PERIOD_S


class LowPassNoise:
    """Temporally correlated (first-order low-pass) Gaussian noise added to the executed joint targets.

    White noise at 50 Hz is mostly filtered out by the joint PD; correlated noise over ~0.1 s actually
    pushes the body off the expert's path, which is what the policy must learn to recover from.
    """

    def __init__(
        self, rng: np.random.Generator, std: float, tau_s: float = 0.1, period: float = CONTROL_PERIOD_S
    ):
        self.rng, self.std = rng, std
        self.a = float(np.exp(-period / tau_s))
        self.state = np.zeros(len(JOINTS))

    def __call__(self, target: np.ndarray) -> np.ndarray:
        w = self.rng.normal(0.0, self.std * np.sqrt(1 - self.a**2), self.state.shape)
        self.state = self.a * self.state + w
        return target + self.state


def run_episode(spec: EpisodeSpec) -> dict:
    """One episode: arrays for the file plus its tracking errors and whether it fell."""
    rng = np.random.default_rng(spec.seed)
    effort = spec.drive == "effort"
    ant = Ant(
        AntConfig(
            noise=SensorNoise.realistic(spec.noise_scale),
            obs_delay_s=spec.obs_delay_s,
            seed=int(rng.integers(2**31)),
            drive=spec.drive,
            **({"timestep": EFFORT_TIMESTEP_S} if effort else {}),
        )
    )
    ant.reset(randomize=True)
    # The effort expert knows its sensors' delay (EffortExpertConfig.lookahead_s).
    expert = EffortExpert(EffortExpertConfig(lookahead_s=spec.obs_delay_s)) if effort else Expert()
    clock_offset_s = float(rng.uniform()) / GAIT_FREQUENCY_HZ  # a random gait phase at the start
    schedule = random_schedule(rng, spec.seconds, spec.period)
    std = float(rng.uniform(0.0, spec.action_noise)) if spec.action_noise > 0 else 0.0
    perturb = (
        LowPassNoise(np.random.default_rng(int(rng.integers(2**31))), std, period=spec.period)
        if std > 0
        else None
    )
    r = rollout(ant, expert.act, schedule, spec.period, perturb=perturb, clock_offset_s=clock_offset_s)
    return {
        "obs": r.obs.astype(np.float32),
        "action": r.action.astype(np.float32),
        "command": r.command.astype(np.float32),
        "true_velocity": r.true_velocity.astype(np.float32),
        "fell": r.fell,
        "errors": tracking_errors(r, period=spec.period),
    }


def summarize(errors: list[dict]) -> dict[str, dict[str, float]]:
    """Seconds-weighted mean of per-episode tracking errors, per skill."""
    out = {}
    for s in SKILLS:
        rows = [e[s] for e in errors if s in e]
        if not rows:
            continue
        w = np.array([r["seconds"] for r in rows])
        out[s] = {k: float(np.average([r[k] for r in rows], weights=w)) for k in rows[0] if k != "seconds"}
        out[s]["seconds"] = float(w.sum())
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--episodes", type=int, default=150)
    ap.add_argument("--episode-seconds", type=float, default=20.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="data/ant_skills.npz")
    ap.add_argument("--obs-delay", type=float, default=0.0, help="sensor delay in seconds seen by the expert")
    ap.add_argument("--noise-scale", type=float, default=1.0, help="x SensorNoise.realistic(); 0 = no noise")
    ap.add_argument(
        "--action-noise",
        type=float,
        default=0.0,
        help="DART: max std (rad) of low-pass noise on executed targets, per episode U(0, max)",
    )
    ap.add_argument(
        "--drive",
        choices=("position", "effort"),
        default="position",
        help="position: joint targets at 50 Hz; effort: joint torques (N m) at 200 Hz (action noise in N m)",
    )
    ap.add_argument("--workers", type=int, default=1)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    seeds = np.random.SeedSequence(args.seed).generate_state(args.episodes)
    specs = [
        EpisodeSpec(
            int(s), args.episode_seconds, args.obs_delay, args.noise_scale, args.action_noise, args.drive
        )
        for s in seeds
    ]
    t0 = time.monotonic()
    results = []
    if args.workers > 1:
        with multiprocessing.Pool(args.workers) as pool:
            for i, res in enumerate(pool.imap(run_episode, specs)):
                results.append(res)
                _progress(i, len(specs), results, t0, specs[0].period)
    else:
        for i, spec in enumerate(specs):
            results.append(run_episode(spec))
            _progress(i, len(specs), results, t0, spec.period)

    lengths = [len(r["obs"]) for r in results]
    ant = Ant()
    effort = args.drive == "effort"
    period = specs[0].period
    expert = dataclasses.asdict(ExpertConfig())
    if effort:
        expert["effort"] = dataclasses.asdict(EffortExpertConfig(lookahead_s=args.obs_delay))
    meta = {
        "args": vars(args),
        "noise": dataclasses.asdict(SensorNoise.realistic(args.noise_scale)),
        "ant": {k: v for k, v in dataclasses.asdict(AntConfig()).items() if k not in ("noise", "seed")},
        "expert": {k: v if isinstance(v, dict) else np.asarray(v).tolist() for k, v in expert.items()},
        "vx_range": VX_RANGE,
        "wz_range": WZ_RANGE,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.savez_compressed(
        args.out,
        obs=np.concatenate([r["obs"] for r in results]).reshape(-1, OBS_DIM),
        action=np.concatenate([r["action"] for r in results]),
        command=np.concatenate([r["command"] for r in results]),
        true_velocity=np.concatenate([r["true_velocity"] for r in results]),
        episode_ends=np.cumsum(lengths).astype(np.int64),
        layout=np.array(layout_json()),
        period=np.array(period),
        obs_delay_s=np.array(float(args.obs_delay)),
        action_joints=np.array(JOINTS),
        action_lower=np.full(len(JOINTS), -TORQUE_LIMIT) if effort else ant.joint_lower,
        action_upper=np.full(len(JOINTS), TORQUE_LIMIT) if effort else ant.joint_upper,
        action_kind=np.array(args.drive),
        meta=np.array(json.dumps(meta)),
    )
    falls = sum(r["fell"] for r in results)
    summary = summarize([r["errors"] for r in results])
    print(
        f"wrote {args.out}: {sum(lengths)} rows, {sum(lengths) * period:.0f} s, "
        f"{len(results)} episodes, {falls} falls, {time.monotonic() - t0:.0f} s wall"
    )
    print("per-skill tracking (mean |cmd - v|, v averaged over one gait cycle; raw = per step):")
    for s, e in summary.items():
        print(
            f"  {s:14s} {e['seconds']:7.0f} s  vx {e['vx']:.3f} m/s  wz {e['wz']:.3f} rad/s  "
            f"(raw vx {e['vx_raw']:.3f}, wz {e['wz_raw']:.3f})"
        )
    return 0


def _progress(i: int, n: int, results: list[dict], t0: float, period: float) -> None:
    if (i + 1) % max(1, n // 10) == 0 or i + 1 == n:
        secs = sum(len(r["obs"]) for r in results) * period
        falls = sum(r["fell"] for r in results)
        print(
            f"[{i + 1}/{n}] {secs:.0f} s of data, {falls} falls, {time.monotonic() - t0:.0f} s wall",
            flush=True,
        )


if __name__ == "__main__":
    sys.exit(main())
