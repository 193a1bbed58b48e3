"""Processes joining the graph beside the running node: does the node's input pause?

Fast DDS's shared-memory port check can stop a participant's whole reception for 333 ms when it
discovers a new process (eProsima/Fast-DDS#6535; diffusion_controller/ros/dds.py). This starts the node
(tiny policy, the hardening harness's sensor process) and a witness process subscribing to the joint
states, then, `--joins` times, a process that joins the graph for 2 s (the wrong-type driver of the
hardening scenarios), and counts the node's non-RUNNING episodes (stale inputs: SAFE) and the witness's
receive gaps over 50 ms. The pause hits a few joins in a hundred, so it takes tens of joins to see.

--transport (set before any process starts; every process inherits it):
  profile       all on config/fastdds_localhost_udp.xml (what the tests use): UDP on loopback only;
  node-default  ROS's default discovery (SUBNET: multicast on this machine's network, isolated by a
                random ROS_DOMAIN_ID) and Fast DDS's default transports (shared memory + UDP) for every
                process but the node, which leaves shared memory out by itself;
  shm           the same with the node on shared memory too (FASTDDS_BUILTIN_TRANSPORTS=DEFAULT): the
                baseline the node's default is measured against.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from diffusion_controller.ros import dds
from diffusion_controller.ros.outputs import STATE, TICK

TRANSPORTS = ("profile", "node-default", "shm")
JOIN_S, BETWEEN_S = 2.0, 1.0
GAP_S = 0.05


def witness_main(seconds: float, out: Path) -> int:
    """Child mode: record the receive time of every joint state for `seconds`, write them to `out`."""
    import rclpy
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import JointState

    rclpy.init()
    node = rclpy.create_node("join_witness")
    stamps: list[float] = []
    node.create_subscription(JointState, "/joint_states", lambda _: stamps.append(time.time()),
                             qos_profile_sensor_data)  # fmt: skip
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        rclpy.spin_once(node, timeout_sec=0.05)
    out.write_text(json.dumps(stamps))
    node.destroy_node()
    rclpy.try_shutdown()
    return 0


def set_transport(kind: str) -> None:
    os.environ.setdefault("ROS_DOMAIN_ID", str(random.randint(1, 100)))
    if kind == "profile":
        dds.one_host_udp(os.environ)
        return
    os.environ["RMW_IMPLEMENTATION"] = "rmw_fastrtps_cpp"
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "SUBNET"
    for name in dds.USER_CONFIG:
        os.environ.pop(name, None)
    if kind == "shm":
        os.environ["FASTDDS_BUILTIN_TRANSPORTS"] = "DEFAULT"  # a user's choice: the node keeps it


def episodes(ticks: np.ndarray, running: np.ndarray, period: float) -> list[tuple[float, int]]:
    """(start time, ticks) of each run of non-RUNNING ticks after the first RUNNING one."""
    first = np.flatnonzero(running)
    if not len(first):
        return [(float(ticks[0]), len(ticks))] if len(ticks) else []
    out: list[tuple[float, int]] = []
    last = -np.inf
    for t, ok in zip(ticks[first[0]:], running[first[0]:], strict=True):
        if ok:
            continue
        if out and t - last <= 1.5 * period:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((float(t), 1))
        last = t
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--transport", choices=TRANSPORTS, default="node-default")
    ap.add_argument("--joins", type=int, default=40)
    ap.add_argument("--quick", action="store_true", help="10 joins")
    ap.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    ap.add_argument("--witness", nargs=2, metavar=("SECONDS", "OUT"), help=argparse.SUPPRESS)  # child mode
    args = ap.parse_args(argv)
    if args.witness:
        return witness_main(float(args.witness[0]), Path(args.witness[1]))
    joins = 10 if args.quick else args.joins
    set_transport(args.transport)

    from hardening.harness import Harness
    from hardening.models import Models
    from hardening.node import RUNNING
    from hardening.sensors import child

    out = Path(tempfile.mkdtemp(prefix="participant_join_"))
    witness_file = out / "witness.json"
    join_times: list[float] = []
    with Harness(Models(out / "models")) as h:
        node = h.main
        time.sleep(2.0)
        seconds = 4.0 + joins * (JOIN_S + BETWEEN_S)
        witness = subprocess.Popen([sys.executable, __file__, "--witness", str(seconds), str(witness_file)])
        time.sleep(3.0)  # the witness's own join is over
        t0 = time.time()
        for _ in range(joins):
            join_times.append(time.time())
            other = child("--wrong-types", stdin=subprocess.PIPE)
            time.sleep(JOIN_S)
            other.stdin.close()
            other.wait(10.0)
            time.sleep(BETWEEN_S)
        witness.wait(seconds + 30.0)
        timing = node.timing()
        transport_line = next((ln for ln in node.log().splitlines() if "DDS:" in ln), "")
    ticks, state = timing[:, TICK], timing[:, STATE]
    after = ticks >= t0
    node_eps = episodes(ticks[after], state[after] == RUNNING, node.period)
    stamps = np.array(json.loads(witness_file.read_text())) if witness_file.exists() else np.zeros(0)
    stamps = stamps[stamps >= t0]
    gaps = np.diff(stamps)
    result = {
        "transport": args.transport,
        "joins": joins,
        "node_ticks": int(after.sum()),
        "node_non_running_episodes": len(node_eps),
        "node_non_running_ticks": int(sum(n for _, n in node_eps)),
        "witness_messages": len(stamps),
        "witness_gaps_over_50ms": int((gaps > GAP_S).sum()),
        "witness_gap_max_ms": float(1000.0 * gaps.max()) if len(gaps) else float("nan"),
        "node_transport_log": transport_line.split("]: ", 1)[-1],
    }
    print(
        f"participant_join: transport {args.transport}, {joins} joins, {os.cpu_count()} cores\n"
        f"  node: {result['node_non_running_episodes']} non-RUNNING episodes "
        f"({result['node_non_running_ticks']} ticks of {result['node_ticks']})\n"
        f"  witness: {result['witness_gaps_over_50ms']} receive gaps > 50 ms, longest "
        f"{result['witness_gap_max_ms']:.0f} ms ({result['witness_messages']} messages)\n"
        f"  node log: {result['node_transport_log']}"
    )
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
