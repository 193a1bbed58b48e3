"""The node's DDS transport: UDP, not Fast DDS's shared memory, unless the user configured Fast DDS.

Fast DDS (rmw_fastrtps, ROS 2's default middleware) checks a shared-memory port's health when a
participant first opens it, and a check that lands between two watchdog rounds sleeps the port's wait
timeout (333 ms by default) while the opening thread holds the participant's discovery lock
(eProsima/Fast-DDS#6535). Every receive thread of that participant takes the same lock for each message,
so when a process joins the host's graph the participant that discovers it can stop receiving anything
for a third of a second (measured here: 5 joins in 167; docs/RESULTS.md). For this node that is
every input stale and the robot held. Over UDP (loopback on one host) no thread waits on another process,
so the node's own participant leaves shared memory out; its messages are small, UDP costs nothing here.

Decided in `main()` before `rclpy.init` (Fast DDS reads its transports when the participant is made), and
reported on the node's log once it exists. What the node does not override: a Fast DDS configuration the
user gave (FASTDDS_BUILTIN_TRANSPORTS, an XML profile) and another middleware. With
ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST rmw_fastrtps adds shared memory itself, so the node can only warn;
`config/fastdds_localhost_udp.xml` with SYSTEM_DEFAULT is the one-host setup without it (`one_host_udp`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path

#: Environment variables through which a user configures Fast DDS's transports (an XML profile may also
#: be found by Fast DDS itself as DEFAULT_FASTDDS_PROFILES.xml in the working directory).
USER_CONFIG = (
    "FASTDDS_BUILTIN_TRANSPORTS",
    "FASTDDS_DEFAULT_PROFILES_FILE",
    "FASTRTPS_DEFAULT_PROFILES_FILE",
)
DEFAULT_PROFILE_FILE = "DEFAULT_FASTDDS_PROFILES.xml"
PROFILE_NAME = "fastdds_localhost_udp.xml"
ISSUE = "eProsima/Fast-DDS#6535"


@dataclass(frozen=True)
class TransportChoice:
    """What `choose_transport` decided: the log line and whether it is a warning."""

    message: str
    warning: bool = False


def _is_fastdds(environ: MutableMapping[str, str]) -> bool:
    rmw = environ.get("RMW_IMPLEMENTATION", "")
    return rmw == "" or rmw.startswith("rmw_fastrtps")


def _localhost(environ: MutableMapping[str, str]) -> bool:
    """Whether rmw_fastrtps builds a LOCALHOST participant (SHM + UDP, whatever else is configured)."""
    discovery = environ.get("ROS_AUTOMATIC_DISCOVERY_RANGE", "").strip().upper()
    return discovery == "LOCALHOST" or (discovery == "" and environ.get("ROS_LOCALHOST_ONLY") == "1")


def choose_transport(environ: MutableMapping[str, str], cwd: Path | None = None) -> TransportChoice | None:
    """Set FASTDDS_BUILTIN_TRANSPORTS=UDPv4 in `environ` where that is ours to decide; None for another
    middleware. Call before rclpy.init."""
    if not _is_fastdds(environ):
        return None
    hazard = (
        f"a process joining the graph can stop this node's reception for up to 333 ms ({ISSUE}): "
        "inputs stale, the robot held"
    )
    if _localhost(environ):
        return TransportChoice(
            "DDS: ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST makes rmw_fastrtps use Fast DDS shared memory; "
            f"{hazard}. For one host without it: ROS_AUTOMATIC_DISCOVERY_RANGE=SYSTEM_DEFAULT and "
            f"FASTDDS_DEFAULT_PROFILES_FILE=<share>/diffusion_controller/config/{PROFILE_NAME}",
            warning=True,
        )
    given = [name for name in USER_CONFIG if environ.get(name)]
    if (cwd or Path.cwd()).joinpath(DEFAULT_PROFILE_FILE).is_file():
        given.append(DEFAULT_PROFILE_FILE)
    if given:
        return TransportChoice(f"DDS: Fast DDS transports as configured ({', '.join(given)})")
    environ["FASTDDS_BUILTIN_TRANSPORTS"] = "UDPv4"
    return TransportChoice(
        f"DDS: UDP only for this node's participant (Fast DDS shared memory: {hazard}); "
        "set FASTDDS_BUILTIN_TRANSPORTS or an XML profile to choose otherwise"
    )


def profile_path() -> Path:
    """The shipped one-host profile: in the source tree, else where setup.py installs config/ (the package's
    share directory in a colcon workspace, under the environment's prefix after pip)."""
    source = Path(__file__).resolve().parents[2] / "config" / PROFILE_NAME
    if source.is_file():
        return source
    try:
        from ament_index_python.packages import get_package_share_directory

        return Path(get_package_share_directory("diffusion_controller")) / "config" / PROFILE_NAME
    except (ImportError, LookupError):  # no ament index, or the package not in it (pip install): sys.prefix
        return Path(sys.prefix) / "share" / "diffusion_controller" / "config" / PROFILE_NAME


def one_host_udp(environ: MutableMapping[str, str]) -> None:
    """DDS for the tests, benchmarks and demo: discovery on this host only, over UDP on loopback, no shared
    memory in any process (the profile), Fast DDS. Set, not defaulted: a shell's LOCALHOST would bring the
    333 ms stalls back."""
    environ.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
    environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "SYSTEM_DEFAULT"
    environ["FASTDDS_DEFAULT_PROFILES_FILE"] = str(profile_path())
    environ.pop("FASTDDS_BUILTIN_TRANSPORTS", None)


#: Fast DDS names its receive threads by transport and port (dds.udp.7400, dds.shm.<port>, dds.tcp.<port>).
RECEIVE_THREADS = ("dds.udp.", "dds.shm.", "dds.tcp")


def _set_fifo(tid: int, priority: int) -> None:
    os.sched_setscheduler(tid, os.SCHED_FIFO, os.sched_param(priority))


def raise_receive_threads(
    priority: int, task_dir: Path = Path("/proc/self/task"), set_fifo: Callable[[int, int], None] = _set_fifo
) -> tuple[list[str], str | None]:
    """SCHED_FIFO at `priority` for this process' Fast DDS receive threads; (their names, why not or None).

    They deliver /clock and the sensors to the control loop. At normal priority, on a loaded machine one
    can wait for a CPU for more than a control period while the loop thread (SCHED_FIFO) idles: with the
    effort ant at 200 Hz on 2 shared cores, /clock reached the loop thread 5.9 ms after it was sent
    (p99.99; 2.8 ms with these raised) and 5 of 6 skipped ticks in 2 minutes came after such a wait
    (docs/RESULTS.md). Call after the participant exists (rclpy.init and the node); Linux only."""
    names: list[str] = []
    try:
        tasks = sorted(task_dir.iterdir())
    except OSError as exc:
        return names, str(exc)
    for task in tasks:
        try:
            name = (task / "comm").read_text().strip()
        except OSError:
            continue  # the thread ended meanwhile
        if not name.startswith(RECEIVE_THREADS):
            continue
        try:
            set_fifo(int(task.name), priority)
        except (OSError, AttributeError) as exc:
            return names, f"{name}: {exc}"
        names.append(name)
    return names, None if names else "no Fast DDS receive thread in this process"
