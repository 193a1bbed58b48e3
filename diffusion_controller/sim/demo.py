"""The demo: the shipped model drives the simulated ant through ROS, and it says what it achieved.

    diffusion_controller_demo                   # what `scripts/demo` runs: one 20 s episode, 40 ms delay
    diffusion_controller_demo --remote          # the policy in a policy_node process of its own
    diffusion_controller_demo --remote --link-delay 0.1 --link-jitter 0.02 --link-loss 0.05
    diffusion_controller_demo --model models/ant_effort.onnx   # the torque-driven ant (its config, 200 Hz)
    add --json for one JSON object on the last line (also written to --out/results.json)

`sim_node` and `controller_node` (and `policy_node`, `link_emulator` with --remote) run as processes that
talk over DDS as on a robot (`closed_loop`); this process is the operator: a scripted stand / walk / turn
/ stop sequence on /cmd_vel, the ground truth for falls and velocity tracking, the controller's
/diagnostics for latency and misses. The expert gait drives the same sequence in-process as the baseline.
bench/closed_loop.py's evaluation and sweeps use the same functions (`add_options`, `prepare`, `evaluate`,
`report`); its `--demo` is `run`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

from diffusion_controller.core.card_source import card_of_model
from diffusion_controller.core.scheduler import BLEND_MODES
from diffusion_controller.ros import dds
from diffusion_controller.sim.closed_loop import (
    CONFIG,
    CONFIG_BLEND,
    DENOISER,
    EFFORT_CONFIG,
    MODEL,
    Setting,
    node_config,
    run_setting,
)
from diffusion_controller.sim.episode import run_expert

#: What the demo runs: one episode of this many seconds (sim time).
DEMO_EPISODES, DEMO_SECONDS = 1, 20.0


def add_options(p: argparse.ArgumentParser) -> None:
    """The options of one closed-loop setting and its outputs: the demo's, which bench/closed_loop.py adds
    to its own."""
    p.add_argument("--obs-delay", type=float, default=0.04)
    p.add_argument(
        "--no-compensation", action="store_true",
        help="compensate_delay false: chunks stamped with the inference start (sweeps vary it)",
    )  # fmt: skip
    p.add_argument(
        "--blend", choices=BLEND_MODES, default=None,
        help=f"the node's blend (default: the config's; config/ant.yaml: {CONFIG_BLEND}; sweeps vary it)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--remote",
        action="store_true",
        help="policy_node + controller_node (policy.source remote) instead of one node",
    )
    p.add_argument("--link-delay", type=float, default=0.0, help="--remote: one-way chunk link delay (s)")
    p.add_argument("--link-jitter", type=float, default=0.0, help="--remote: uniform +- jitter (s)")
    p.add_argument("--link-loss", type=float, default=0.0, help="--remote: chunk loss probability")
    p.add_argument(
        "--real-time-factor", type=float, default=1.0,
        help="the sim's pace (sim s per wall s); 0.5 halves the CPU load per sim second (diagnostics)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true")
    p.add_argument("--model", type=Path, default=MODEL, help="fused .onnx to evaluate")
    p.add_argument(
        "--config", type=Path, default=None,
        help="the node's params file (default: config/ant.yaml; config/ant_effort.yaml for an effort model)",
    )  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("runs") / "closed_loop")


def prepare(p: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[Setting, bool, Path] | None:
    """Check `args` and fill in the config's defaults; set up DDS for this machine only. Returns the
    reference setting, whether the model drives efforts, and the log folder; None when there is no model."""
    if not args.model.exists():
        print(f"no model at {args.model}", file=sys.stderr)
        return None
    if args.seconds < 10.0:
        p.error("--seconds must be at least 10 (stand, two skills, stand)")
    effort = card_of_model(args.model).action_kind == "effort"
    if args.config is None:
        args.config = EFFORT_CONFIG if effort else CONFIG
    if args.blend is None:
        args.blend = node_config(args.config).blend
    args.out.mkdir(parents=True, exist_ok=True)
    dds.one_host_udp(os.environ)
    os.environ.setdefault("ROS_DOMAIN_ID", str(100 + os.getpid() % 100))
    log_dir = Path(tempfile.mkdtemp(prefix="closed_loop_"))

    # The config's delay compensation unless --no-compensation.
    compensate = not args.no_compensation and node_config(args.config).compensate_delay
    reference = Setting(obs_delay_s=args.obs_delay, compensate_delay=compensate, blend=args.blend,
                        remote=args.remote, link_delay_s=args.link_delay, link_jitter_s=args.link_jitter,
                        link_loss=args.link_loss, real_time_factor=args.real_time_factor)  # fmt: skip
    return reference, effort, log_dir


def evaluate(
    settings: list[Setting], args: argparse.Namespace, episodes: int, effort: bool, log_dir: Path
) -> list[dict]:
    """Each setting through ROS for `episodes` of `args.seconds`, beside the expert at the same delay."""
    rows = []
    expert_cache: dict[float, dict] = {}
    denoiser = getattr(args, "denoiser", DENOISER)  # bench/closed_loop.py's K sweep sets it
    for s in settings:
        print(f"[closed_loop] {s.label()}: {episodes} episode(s) of {args.seconds:.0f} s", flush=True)
        row = run_setting(
            s, episodes, args.seconds, args.seed, log_dir, args.model, denoiser, config=args.config,
            cpus=getattr(args, "cpus", ("", "")),  # bench/closed_loop.py --rt-cpus
        )
        if s.obs_delay_s not in expert_cache:
            expert_cache[s.obs_delay_s] = run_expert(episodes, args.seconds, s.obs_delay_s, args.seed, effort)
        ex = expert_cache[s.obs_delay_s]
        row["expert_vel_err"] = ex["vel_err"]
        row["expert_falls"] = ex["falls"]
        row["expert_per_skill"] = ex["per_skill"]
        row["ratio_to_expert"] = row["policy_vel_err"] / ex["vel_err"] if ex["vel_err"] else math.nan
        rows.append(row)
    return rows


def achieved(r: dict, model: Path, seconds: float) -> str:
    """The demo's last words: what the policy did, against the expert."""
    where = ""
    if r["remote"]:
        where = " from a policy node in its own process"
        if r["link_delay_s"] or r["link_jitter_s"] or r["link_loss"]:
            where += (f" behind a {r['link_delay_s'] * 1000:.0f} +- {r['link_jitter_s'] * 1000:.0f} ms "
                      f"link losing {r['link_loss'] * 100:.0f}% of the chunks")  # fmt: skip
    return (
        f"\nThe diffusion policy ({model.name}){where} drove the simulated ant through ROS for "
        f"{seconds:.0f} s of stand/walk/turn commands with {r['obs_delay_s'] * 1000:.0f} ms sensor "
        f"delay: {'no fall' if r['falls'] == 0 else 'it FELL'}, "
        f"velocity-tracking error {r['policy_vel_err']:.3f} "
        f"(the expert gait: {r['expert_vel_err']:.3f}), {r['stale_actions_published']} stale actions, "
        + (
            f"model {r['compute_ms_p50']:.1f} ms per chunk on {r['provider']}."
            if not r["remote"]
            else f"chunks {r['inference_ms_p50']:.0f} ms old on arrival (p50), "
            f"{r['missed_steps']:.0f} missed steps."
        )
    )


def summarize(rows: list[dict], reference: Setting) -> dict:
    """The --json object: totals over all rows; the headline errors are the reference setting's row (what a
    plain run measures), not whichever row of a sweep ran first."""
    ref = next((r for r in rows if r["setting"] == reference.label()), rows[0])
    return {
        "episodes": sum(r["episodes"] for r in rows),
        "falls": sum(r["falls"] for r in rows),
        "reference_setting": reference.label(),
        "policy_vel_err": ref["policy_vel_err"],
        "expert_vel_err": ref["expert_vel_err"],
        "missed_steps": sum(r["missed_steps"] for r in rows if not math.isnan(r["missed_steps"])),
        "rows": rows,
    }


def report(
    rows: list[dict], reference: Setting, args: argparse.Namespace, log_dir: Path, sweep: bool, demo: bool
) -> dict:
    """Print the table (per skill without a sweep, the demo's sentence with `demo`), write results.json and
    velocity.png under `args.out`, print the JSON object with --json; returns it."""
    print()
    print(
        f"{'setting':<80} {'falls':>5} {'policy err':>10} {'expert err':>10} {'ratio':>6} {'missed':>6} "
        f"{'stale':>5} {'model ms p50/p99':>17}"
    )
    for r in rows:
        print(
            f"{r['setting']:<80} {r['falls']:>2}/{r['episodes']:<2} {r['policy_vel_err']:>10.3f} "
            f"{r['expert_vel_err']:>10.3f} {r['ratio_to_expert']:>6.2f} {r['missed_steps']:>6.0f} "
            f"{r['stale_actions_published']:>5} {r['compute_ms_p50']:>8.2f}/{r['compute_ms_p99']:<8.2f}"
        )
    if not sweep:
        r = rows[0]
        print()
        for who, key in (("policy", "per_skill"), ("expert", "expert_per_skill")):
            per_skill = ", ".join(f"{k} {v['vx'] + v['vy'] + v['wz']:.3f}" for k, v in r[key].items())
            print(f"per skill ({who}): {per_skill}")
    if demo:
        print(achieved(rows[0], args.model, args.seconds))
    summary = summarize(rows, reference)
    (args.out / "results.json").write_text(json.dumps(summary, indent=1, default=str))
    pngs = sorted(log_dir.glob("velocity_*.png"))
    if pngs:
        (args.out / "velocity.png").write_bytes(pngs[0].read_bytes())
        print(f"plot of commanded vs achieved velocity: {args.out / 'velocity.png'}")
    if args.json:
        print(json.dumps(summary, default=str))
    return summary


def run(p: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """The demo: one episode of `args.seconds` with the setting `args` describes, reported."""
    prepared = prepare(p, args)
    if prepared is None:
        return 2
    reference, effort, log_dir = prepared
    rows = evaluate([reference], args, DEMO_EPISODES, effort, log_dir)
    report(rows, reference, args, log_dir, sweep=False, demo=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="the shipped model drives the simulated ant through ROS (see module docstring)"
    )
    add_options(p)
    p.add_argument("--seconds", type=float, default=DEMO_SECONDS, help="length of the episode (sim s)")
    return run(p, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
