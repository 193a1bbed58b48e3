"""Closed-loop evaluation: the controller node drives the simulated ant through ROS, against the expert.

Two processes talk over DDS exactly as on a robot: `sim_node` (MuJoCo, /clock, sensors with injected
observation delay, ros2_control command topics) and `controller_node` (the shipped model, use_sim_time).
This process is the operator: it publishes a scripted velocity-command sequence on /cmd_vel (stand, walk,
turn, stop, with switches), watches the ground truth for falls and velocity tracking, and reads the
controller's /diagnostics and timing topic for latency, missed steps and stale actions. The expert gait
runs the same sequences, with the same delay and sensor noise, in-process in the same run as the baseline.
That machinery is the product's demo (diffusion_controller/sim/closed_loop.py, episode.py, demo.py);
this script adds the evaluation's episode counts and the sweeps.

    python bench/closed_loop.py --demo          # the demo (diffusion_controller_demo, scripts/demo)
    python bench/closed_loop.py --quick         # a few short episodes, < 3 minutes
    python bench/closed_loop.py                 # 20 episodes of 20 s, 40 ms observation delay
    python bench/closed_loop.py --sweep         # K x timestep spacing, delay x compensation, blending
    python bench/closed_loop.py --sweep k       # one of them (k, delay, blend)
    python bench/closed_loop.py --model PATH    # any exported fused model (e.g. a distilled one)
    python bench/closed_loop.py --remote --link-delay 0.1 --link-jitter 0.02 --link-loss 0.05
                                                # policy_node + controller (policy.source remote) + a link
    python bench/closed_loop.py --sweep remote  # local, link 100 +- 20 ms 5% loss, link 250 ms
    python bench/closed_loop.py --model models/ant_effort.onnx   # the effort-driven ant (200 Hz torques;
                                                # config/ant_effort.yaml, its expert at the same rate)
    python bench/closed_loop.py --model models/ant_effort.onnx --rt-cpus 1
                                                # the sim and the node's real-time threads on CPU 1, the
                                                # model and this process on the others (a VM's host
                                                # holding one vCPU then stops the sim with the node)
    add --stall-probes to count the skipped ticks that fell in machine stalls (bench/machine_stalls.py)
    add --hold-cpu 0:10:200 to make such stalls: CPU 0 held 10 ms in every 200 (SCHED_FIFO 99 busy-wait),
    which shows what holds of each CPU cost the node (docs/RESULTS.md 2026-12-05, second entry)
    add --json for one JSON object on the last line
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import machine_stalls

from diffusion_controller.core.card_source import card_of_model
from diffusion_controller.core.ddim import TIMESTEP_SPACINGS
from diffusion_controller.core.scheduler import BLEND_MODES
from diffusion_controller.ros import process
from diffusion_controller.sim import demo
from diffusion_controller.sim.closed_loop import DENOISER, Setting

SWEEPS = ("k", "delay", "blend", "remote")


def sweep_settings(args: argparse.Namespace) -> list[Setting]:
    """The rows of the sweeps `args.sweep` names (all of them when it names none)."""
    sweeps = args.sweep or list(SWEEPS)
    settings = []
    if "k" in sweeps:
        settings += [
            Setting(steps=k, obs_delay_s=args.obs_delay, blend=args.blend, spacing=sp)
            for sp in args.spacings
            for k in args.ks
        ]
    if "delay" in sweeps:
        settings += [
            Setting(obs_delay_s=d, compensate_delay=c, blend=args.blend)
            for d in (0.0, 0.02, 0.04, 0.08)
            for c in (True, False)
        ]
    if "blend" in sweeps:
        # A model no prefix can steer (one pass from full noise, distilled) cannot inpaint: that row
        # runs the denoiser at its card's K instead, and its setting says so (K=...).
        steerable = card_of_model(args.model).sampler_inpainting
        den_k = card_of_model(args.denoiser).steps
        for b in BLEND_MODES:
            k = den_k if b == "inpaint" and not steerable else 0
            settings.append(Setting(obs_delay_s=args.obs_delay, blend=b, steps=k))
    if "remote" in sweeps:  # issue 25's target rows: local vs the policy behind a link
        base = Setting(obs_delay_s=args.obs_delay, blend=args.blend)
        settings += [
            base,
            dataclasses.replace(base, remote=True, link_delay_s=0.1, link_jitter_s=0.02, link_loss=0.05),
            dataclasses.replace(base, remote=True, link_delay_s=0.25),
        ]
    return settings


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="closed-loop evaluation through ROS (see module docstring)")
    p.add_argument("--demo", action="store_true", help="one 20 s episode: what scripts/demo shows")
    p.add_argument("--quick", action="store_true", help="3 episodes of 14 s (< 3 minutes)")
    p.add_argument(
        "--sweep", nargs="*", choices=SWEEPS, default=None,
        help="sweeps to run (all without a name): K x timestep spacing, delay x compensation, blending",
    )  # fmt: skip
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument(
        "--rt-cpus", default="",
        help="CPU list of the sim and the node's real-time threads (the sim's cpu_affinity, the node's "
             "cpu_affinity); the node's model threads and this process get the other CPUs",
    )  # fmt: skip
    p.add_argument(
        "--hold-cpu", default="", metavar="CPU:HOLD_MS:EVERY_MS",
        help="hold a CPU as a VM's host does (bench/machine_stalls.py Holds) during the run",
    )  # fmt: skip
    p.add_argument(
        "--stall-probes", action="store_true",
        help="attribute skipped ticks to machine stalls (bench/machine_stalls.py); the probes wake each CPU "
             "1000 times a second and slow the policy, so tracking figures come from runs without them",
    )  # fmt: skip
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--sweep-episodes", type=int, default=2)
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3, 5, 10], help="K of the K sweep")
    p.add_argument(
        "--spacings", nargs="+", choices=TIMESTEP_SPACINGS, default=["leading", "trailing"],
        help="timestep spacings of the K sweep",
    )  # fmt: skip
    demo.add_options(p)
    p.add_argument("--denoiser", type=Path, default=DENOISER, help="denoiser .onnx for the K sweep")
    args = p.parse_args(argv)
    if args.demo:
        args.seconds = demo.DEMO_SECONDS
        return demo.run(p, args)
    if args.quick:
        args.episodes, args.seconds, args.sweep_episodes = 3, 14.0, 1
    prepared = demo.prepare(p, args)
    if prepared is None:
        return 2
    reference, effort, log_dir = prepared
    settings = [reference] if args.sweep is None else sweep_settings(args)
    episodes = args.sweep_episodes if args.sweep is not None else args.episodes
    args.cpus = split_cpus(args.rt_cpus)
    if args.rt_cpus:
        os.sched_setaffinity(0, process.parse_cpus(args.cpus[1]))  # the operator and the expert
    period = float(card_of_model(args.model).control_period_s)
    probes = machine_stalls.Probes(log_dir, min_s=period / 2) if args.stall_probes else None
    try:
        held = machine_stalls.parse_hold(args.hold_cpu) if args.hold_cpu else None
    except ValueError as exc:
        p.error(f"--hold-cpu: {exc}")
    holds = machine_stalls.Holds(log_dir, *held) if held else None
    try:
        rows = demo.evaluate(settings, args, episodes, effort, log_dir)
    finally:
        stalls, why = probes.stop() if probes is not None else ([], "run with --stall-probes")
        n_holds, hold_why = holds.stop() if holds is not None else (0, None)
    for row in rows:
        row.update(stall_figures(row, stalls, why, period))
        print(stall_line(row))
    if held:
        print(hold_line(held, n_holds, hold_why))
        for row in rows:
            row.update(held_cpu=held[0], held_ms=1000 * held[1], held_every_ms=1000 * held[2],
                       holds=n_holds, holds_why=hold_why)  # fmt: skip
    demo.report(rows, reference, args, log_dir, sweep=args.sweep is not None, demo=False)
    return 0


def split_cpus(rt_cpus: str) -> tuple[str, str]:
    """--rt-cpus: (its CPU list, the machine's other CPUs as a list) or ("", "")."""
    if not rt_cpus:
        return "", ""
    rt = process.parse_cpus(rt_cpus)
    rest = sorted(set(range(os.cpu_count() or 1)) - rt)
    if not rest:
        raise SystemExit(f"--rt-cpus {rt_cpus}: no CPU left for the model threads")
    return ",".join(map(str, sorted(rt))), ",".join(map(str, rest))


def stall_figures(row: dict, stalls: list[machine_stalls.Stall], why: str | None, period: float) -> dict:
    """The machine stalls of the run and the skipped ticks inside them (bench/machine_stalls.py): a
    skipped tick is counted in a stall when the gap between the timing rows around it overlaps one."""
    if why is not None:
        return {"machine_stalls": None, "machine_stalls_why": why}
    return {
        "machine_stalls": len(stalls),
        "machine_stall_max_ms": max((1000.0 * (b - a) for a, b in stalls), default=0.0),
        "missed_ticks_in_rows": sum(n for _, _, n in row["tick_gaps"]),
        "missed_ticks_in_machine_stalls": machine_stalls.missed_in(row["tick_gaps"], stalls, 2 * period),
    }


def hold_line(held: tuple[int, float, float], n: int, why: str | None) -> str:
    cpu, hold_s, every_s = held
    if why is not None:
        return f"no holds of CPU {cpu}: {why}"
    return f"CPU {cpu} held {n} times, {1000 * hold_s:g} ms in every {1000 * every_s:g} ms (--hold-cpu)"


def stall_line(row: dict) -> str:
    text = f"skipped ticks ({row['setting']}): {row['missed_ticks']:.0f} (the node's count)"
    if row["machine_stalls"] is None:
        return text + f"; no machine-stall probe ({row['machine_stalls_why']})"
    in_rows, in_stalls = row["missed_ticks_in_rows"], row["missed_ticks_in_machine_stalls"]
    return text + (
        f", {in_rows} in the timing rows, {in_stalls} of them while the machine held a CPU "
        f"({row['machine_stalls']} stalls seen by the SCHED_FIFO 99 probes, "
        f"longest {row['machine_stall_max_ms']:.1f} ms)"
    )


if __name__ == "__main__":
    sys.exit(main())
