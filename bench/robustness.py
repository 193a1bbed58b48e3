"""Robustness benchmark: faults, bad input and load against the controller node as a real process.

Not a test, but the same scenarios as test/test_hardening_*.py (bench/hardening/ holds them: setup ->
inject -> observe -> verdict), run in one go with the load at full length, held to zero missed ticks
(those inside a stall the real-time sensor process suffered too are shown apart as the machine's),
and summarized. Processes: the controller node(s) (config/ant.yaml, a tiny random policy, CPU, nice -10
by default as a controller is deployed beside other work; its control loop thread is SCHED_FIFO by
itself), a sensor process (SCHED_FIFO 20 where allowed, so the streams are not what starves) and this one,
which records every command, trajectory, timing row and /diagnostics message of the nodes.

Every command and trajectory point is checked against the card's limits and max_step_per_tick, every
RUNNING timing row against the stale rule (action_time < exec_time - period/2), tick gaps on the node's
clock count missed ticks, /proc gives resident memory. Figures are of this machine under whatever else
runs on it: the load average is printed beside them.

    .venv/bin/python bench/robustness.py [--quick] [--json] [--load-seconds 60] [--only NAME ...]

--quick: the load scenarios at 10 s / 5 s and one bad input per topic (about 3 minutes); default: every
scenario, sensor_load 60 s and flood_10x 20 s (about 7 minutes). --json: one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from diffusion_controller.ros import dds

if TYPE_CHECKING:  # the steps import the harness once main has set the DDS environment
    from hardening.harness import Result

#: One bad input per topic and the replace-mode ones (--quick).
QUICK_INPUT = {
    "joint_states_duplicated_joint",
    "imu_zero_quaternion",
    "odom_nan_twist",
    "cmd_vel_nan",
    "joint_states_nan_effort_unused",
    "joint_states_garbage_only",
    "imu_garbage_only",
    "odom_garbage_only",
    "wrong_message_types",
}


def fmt(v: object) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.3g}"
    return str(v)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short load, one bad input per topic")
    ap.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    ap.add_argument("--load-seconds", type=float, default=None, help="sensor_load duration (default 60)")
    ap.add_argument("--only", nargs="*", default=None, help="scenario names or groups (input, faults, load)")
    ap.add_argument("--node-nice", type=int, default=-10, help="nice value of the nodes (0 = normal)")
    ap.add_argument("--model-dir", type=Path, default=None, help="where the scenario models go")
    return ap.parse_args(argv)


def selected(args: argparse.Namespace) -> list[str]:
    """The scenarios to run, in the harness's order; the load ones lengthened to --load-seconds."""
    from hardening.load import LOAD_SECONDS
    from hardening.scenarios import in_order

    load_s = args.load_seconds or (10.0 if args.quick else 60.0)
    LOAD_SECONDS.update(baseline=min(load_s, 20.0), sensor_load=load_s, flood_10x=max(load_s / 3, 5.0))
    return [
        s.name
        for s in in_order()
        if (args.only is None or s.name in args.only or s.group in args.only)
        and not (args.quick and args.only is None and s.group == "input" and s.name not in QUICK_INPUT)
    ]


class Run(NamedTuple):
    """What one pass over the scenarios leaves: their results, the main node's memory and exit, the
    models' figures, and the machine's load around it."""

    results: list[Result]
    rss: list[float]
    main_exit: int | None
    calib: dict
    load0: tuple[float, float, float]
    load1: tuple[float, float, float]
    t_start: float


def run_scenarios(args: argparse.Namespace, names: list[str]) -> Run:
    """Each scenario in one harness (one set of models, one main node), a failure's report as it comes."""
    from hardening.harness import SCENARIOS, Harness
    from hardening.models import Models
    from hardening.scenarios import run

    model_dir = args.model_dir or Path(tempfile.mkdtemp(prefix="robustness_models_"))
    load0, t_start = os.getloadavg(), time.monotonic()
    results: list[Result] = []
    main_exit = None
    with Harness(Models(model_dir), node_nice=args.node_nice, missed_tick_budget=0.0) as h:
        for name in names:
            sc = SCENARIOS[name]
            print(f"[robustness] {sc.group:6s} {name} ...", file=sys.stderr, flush=True)
            r = run(h, name)
            results.append(r)
            if not r.passed:
                print("  " + r.report().replace("\n", "\n  "), file=sys.stderr, flush=True)
        main_node = h._main
        rss = [m for _, m in main_node.rss] if main_node is not None else []
        if main_node is not None:
            main_exit = main_node.stop()
        calib = dict(h.models.figures)
    load1 = os.getloadavg()
    return Run(results, rss, main_exit, calib, load0, load1, t_start)


#: The figures a scenario's table line shows, where it has them.
FIGURES = (
    "rejected",
    "log_lines",
    "param_call_s",
    "clear_s",
    "time_to_safe_s",
    "recovery_s",
    "chunk_interval_ms",
    "median_index",
    "exit_s",
    "obs_to_cmd_p50_ms",
    "obs_to_cmd_p99_ms",
    "jitter_p99_ms",
    "tick_cost_p99_ms",
    "rate_joint_states_hz",
    "rate_imu_hz",
    "cmd_gap_max_ms",
    "sensor_stall_max_ms",
    "wrong_type_named_s",
)


def print_table(args: argparse.Namespace, run: Run) -> None:
    """The machine line, one line per scenario, then the report of each that failed."""
    from hardening.harness import SCENARIOS

    results = run.results
    print(
        f"robustness: {len(results)} scenarios, {os.cpu_count()} cores, node nice {args.node_nice}, "
        f"load avg {run.load0[0]:.2f} -> {run.load1[0]:.2f}, {time.monotonic() - run.t_start:.0f} s"
    )
    header = (
        f"  {'scenario':34s} {'group':6s} {'result':6s} {'ticks':>6s} {'missed':>6s} {'stall':>5s} "
        f"{'unsafe':>6s} {'lost':>5s}  figures"
    )
    print(header)
    for r in results:
        figs = " ".join(f"{k}={fmt(r.figures[k])}" for k in FIGURES if k in r.figures)
        if not math.isnan(r.rss_growth_mb):
            figs += f" rss_growth_mb={r.rss_growth_mb:.2f}"
        unsafe = sum(r.unsafe.values())
        print(
            f"  {r.name:34s} {SCENARIOS[r.name].group:6s} {'pass' if r.passed else 'FAIL':6s} "
            f"{r.ticks:6d} {r.missed_ticks:6d} {r.stall_ticks:5d} {unsafe:6d} {r.lost_messages:5d}  {figs}"
        )
    for r in results:
        if not r.passed:
            print(r.report())


def summary(args: argparse.Namespace, run: Run) -> dict:
    """The totals against the targets (zero unsafe commands, crashes and missed ticks), and the figures."""
    from hardening.harness import SCENARIOS
    from hardening.load import LOAD_SECONDS

    results, rss, load0, load1 = run.results, run.rss, run.load0, run.load1
    growth = [r.rss_growth_mb for r in results if not math.isnan(r.rss_growth_mb)]
    unsafe_by_kind: dict[str, int] = {}
    for r in results:
        for k, v in r.unsafe.items():
            unsafe_by_kind[k] = unsafe_by_kind.get(k, 0) + v
    return {
        "scenarios": len(results),
        "passed": sum(r.passed for r in results),
        "failed": [r.name for r in results if not r.passed],
        "unsafe_commands": sum(unsafe_by_kind.values()),
        "unsafe_by_kind": unsafe_by_kind,
        "missed_ticks": sum(r.missed_ticks for r in results),
        # Of those, the ones inside a stall the real-time sensor process saw too: the machine's.
        "stall_ticks": sum(r.stall_ticks for r in results),
        "crashes": sum(r.crashes for r in results) + int(run.main_exit not in (0, None)),
        "rss_growth_mb": max(growth) if growth else math.nan,
        "main_node_rss_mb": {"first": rss[0], "last": rss[-1], "max": max(rss)} if rss else {},
        "main_node_exit_code": run.main_exit,
        "lost_messages": sum(r.lost_messages for r in results),
        "ticks": sum(r.ticks for r in results),
        "load": {
            r.name: {k: v for k, v in r.figures.items()} | {"rss_growth_mb": r.rss_growth_mb}
            for r in results
            if SCENARIOS[r.name].group == "load"
        },
        "models": run.calib,
        "machine": {
            "cores": os.cpu_count(),
            "loadavg_start": load0[0],
            "loadavg_end": load1[0],
            "node_nice": args.node_nice,
        },
        "load_seconds": dict(LOAD_SECONDS),
        "duration_s": time.monotonic() - run.t_start,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("ROS_DOMAIN_ID", str(60 + os.getpid() % 40))
    dds.one_host_udp(os.environ)  # before the steps import the harness (and rclpy with it)
    run = run_scenarios(args, selected(args))
    print_table(args, run)
    s = summary(args, run)
    print(
        f"targets: unsafe_commands 0 (got {s['unsafe_commands']}), "
        f"crashes 0 (got {s['crashes']}), missed_ticks 0 (got {s['missed_ticks']}, "
        f"{s['stall_ticks']} of them in machine stalls), "
        f"every scenario passes ({s['passed']}/{s['scenarios']})"
    )
    if args.json:
        print(json.dumps(s, default=float))
    return 0 if s["passed"] == s["scenarios"] and s["crashes"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
