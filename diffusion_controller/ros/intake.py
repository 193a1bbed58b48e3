"""Observation intake at tick time: the sensor messages that arrived since the last tick, taken from DDS
queues by the control loop itself, so the node's cost grows little with the sensor rate.

With one Python callback per message, the executor thread spent ~150 us a message (2-core AMD EPYC:
11% of a core at 500 Hz joint states + 200 Hz IMU, 47% at 2 kHz + 800 Hz): dispatch, and the GIL handed
back and forth with the control loop and inference threads at every message. As a real-time thread that
could not keep up it also got the CPU's real-time runqueue throttled, the loop with it: missed ticks.
Here no executor spins the observation subscriptions. Right before each tick the control loop takes
each keep-last queue as serialized bytes (a C call, ~5 us a message) and deserializes and checks every
message (~20 us; every bad message is still found and counted), but stores only the newest good one of
each `spacing`-wide time bin: the history keeps no two samples closer than its `spacing` anyway
(core/observation.py). All in one thread that already holds the GIL, and the tick sees everything that
arrived before it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import rclpy
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.serialization import deserialize_message

from diffusion_controller.core.inputs import InputError, SourceConfig, SourceReader

#: The fastest sensor stream of which every message of one control period is still in the queue when the
#: tick takes it; a faster one loses its oldest messages between two ticks (counted as `lost`).
MAX_SENSOR_RATE_HZ = 5000.0
#: Queue depth bounds: a slow control rate must not make the reader hold thousands of messages.
MIN_DEPTH, MAX_DEPTH = 10, 1000


def queue_depth(period_s: float) -> int:
    """Keep-last depth that holds one control period of messages at MAX_SENSOR_RATE_HZ."""
    return int(min(MAX_DEPTH, max(MIN_DEPTH, math.ceil(MAX_SENSOR_RATE_HZ * period_s) + 2)))


def same_bin(a: float, b: float, spacing: float) -> bool:
    """Two stamps the history would keep only one of (see `drain`)."""
    return spacing > 0.0 and math.floor(a / spacing) == math.floor(b / spacing)


@dataclass
class SourceCounts:
    """What one source's intake did: messages taken from the queue, and lost before they were taken."""

    taken: int = 0
    lost: int = 0


class SourceIntake:
    """One observation source's never-spun raw subscription and what it takes per tick."""

    def __init__(self, node: Any, source: SourceConfig, topic: str, msg_class: type, depth: int) -> None:
        self.source = source
        self.msg_class = msg_class
        qos = QoSProfile(
            history=HistoryPolicy.KEEP_LAST, depth=depth, reliability=ReliabilityPolicy.BEST_EFFORT
        )
        # The callback never runs: no executor spins `node`; drain() takes the messages.
        self.subscription = node.create_subscription(msg_class, topic, _never, qos, raw=True)
        self.depth = depth
        self.counts = SourceCounts()
        self._last_seq: dict[bytes, int] = {}

    def take(self) -> list[tuple[bytes, dict]]:
        """Everything queued now, oldest first (bounded, so a flood cannot hold the tick)."""
        handle, out = self.subscription.handle, []
        for _ in range(2 * self.depth):
            got = handle.take_message(self.msg_class, True)
            if got is None:
                break
            out.append(got)
        self.counts.taken += len(out)
        return out

    def _count_lost(self, info: dict) -> None:
        """Gaps in a publisher's sequence numbers: messages the transport or a full queue dropped."""
        seq, key = info.get("publication_sequence_number"), _publisher(info)
        if not isinstance(seq, int) or not key:
            return
        last = self._last_seq.get(key)
        if last is not None and seq > last + 1:
            self.counts.lost += seq - last - 1
        self._last_seq[key] = seq

    def drain(
        self,
        reader: SourceReader,
        now: float,
        spacing: float,
        accept: Callable[[float, dict], None],
        reject: Callable[[InputError], None],
        contradict: Callable[[str], None] | None = None,
    ) -> None:
        """Take the queue; decode and check every message in arrival order (the reader's stamp rules see
        them all), hand the newest good one of each time bin to `accept(stamp, values)`, each refused
        message to `reject(error)`, and what a second publisher contradicts to `contradict(why)`."""
        batch = self.take()
        wall = time.time_ns()
        pending: tuple[float, dict] | None = None  # the newest good sample of the current bin
        for raw, info in batch:
            self._count_lost(info)
            # Receipt time on the node's clock: `now` less the time the message waited in the queue.
            received = now - max(0.0, 1e-9 * (wall - int(info.get("received_timestamp") or wall)))
            try:
                msg = deserialize_message(raw, self.msg_class)
                stamp, values = reader.read(msg, now, received=received)
            except InputError as exc:
                reject(exc)
                continue
            except Exception as exc:  # bytes that do not even deserialize
                reject(InputError("malformed", f"message cannot be deserialized ({exc}); ignored"))
                continue
            if reader.agreement is not None and contradict is not None:
                why = reader.agreement.update(_publisher(info), stamp, values)
                if why:
                    contradict(why)
            if pending is not None and not same_bin(pending[0], stamp, spacing):
                accept(*pending)
            pending = (stamp, values)
        if pending is not None:
            accept(*pending)


def _publisher(info: dict) -> bytes:
    """The publishing endpoint's GID from a take's message info (b'' where the rmw gives none)."""
    gid = info.get("publisher_gid")
    return bytes(gid.get("data", b"")) if isinstance(gid, dict) else b""


def hidden_node(owner: Any, role: str, parameter_overrides: Sequence[Any] = ()) -> Any:
    """A helper node `_<owner>_<role>` beside `owner` (same namespace and context; hidden from
    `ros2 node list` by its leading underscore). It takes none of the process' --ros-args: a
    `-r __node:=...` meant for the main node would rename it too (two nodes, one name). Only the
    owner's clock topic is passed on (`-r /clock:=/robot1/clock` for one of several simulators), so
    a timer under use_sim_time follows the clock the owner follows."""
    clock = owner.resolve_topic_name("/clock")
    return rclpy.create_node(
        f"_{owner.get_name()}_{role}",
        namespace=owner.get_namespace(),
        context=owner.context,
        cli_args=["--ros-args", "-r", f"/clock:={clock}"] if clock != "/clock" else None,
        parameter_overrides=list(parameter_overrides),
        use_global_arguments=False,
        start_parameter_services=False,
        enable_rosout=False,
    )


def _never(_msg: Any) -> None:
    """Callback of the intake subscriptions; never called (nothing spins their node)."""


class Intake:
    """The observation subscriptions of a node, on a hidden node of their own that nothing spins.

    Topic names are resolved by the main node (its namespace, `~`, and the user's remappings), so the
    hidden node takes no command-line arguments of its own.
    """

    def __init__(
        self,
        node: Any,
        sources: Sequence[SourceConfig],
        classes: dict,
        period_s: float,
        role: str = "intake",
    ) -> None:
        self.node = hidden_node(node, role)
        depth = queue_depth(period_s)
        self.sources = {
            s.name: SourceIntake(self.node, s, node.resolve_topic_name(s.topic), classes[s.type], depth)
            for s in sources
        }

    def drain(
        self,
        readers: dict[str, SourceReader],
        now: float,
        spacing: float,
        accept: Callable[[str, float, dict], None],
        reject: Callable[[str, InputError], None],
        contradict: Callable[[str, str], None] | None = None,
    ) -> None:
        """Take every source's queue (see SourceIntake.drain); `accept(source, stamp, values)`."""
        for name, source in self.sources.items():
            reader = readers.get(name)
            if reader is None:
                continue
            source.drain(
                reader,
                now,
                spacing,
                lambda stamp, values, n=name: accept(n, stamp, values),
                lambda exc, n=name: reject(n, exc),
                None if contradict is None else (lambda why, n=name: contradict(n, why)),
            )

    def counts(self) -> dict[str, SourceCounts]:
        return {name: s.counts for name, s in self.sources.items()}

    def close(self) -> None:
        for s in self.sources.values():
            self.node.destroy_subscription(s.subscription)
        self.sources = {}
        self.node.destroy_node()
