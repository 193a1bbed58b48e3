"""A network link on one machine: relays a topic with delay, jitter, loss, duplication and reordering.

For tests and benchmarks of the remote policy (no root, no network namespaces, no tc/netem): the policy
node publishes its chunks on one topic, this relay republishes them on the topic the controller reads,
each message after the delay `LinkModel` draws for it (seeded, so a run can be repeated).

    link_emulator --in /policy/chunk_tx --out /policy/chunk --delay 0.1 --jitter 0.02 --loss 0.05

`LinkModel` is plain Python (unit-tested); `Relay` moves the serialized bytes (no deserialization), on a
thread that sleeps until the next message is due, on the wall clock (a network's delays are wall time).
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class LinkConfig:
    """One-way link: delay +- jitter (uniform), loss, duplication and reordering probabilities per message.

    A reordered message is held `reorder_s` longer, so the ones sent after it overtake it; a duplicate is a
    second copy delivered up to `reorder_s` after the first."""

    delay_s: float = 0.0
    jitter_s: float = 0.0
    loss: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    reorder_s: float = 0.03
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("delay_s", "jitter_s", "reorder_s"):
            if not getattr(self, name) >= 0.0:
                raise ValueError(f"LinkConfig.{name}: expected >= 0, got {getattr(self, name)!r}")
        for name in ("loss", "duplicate", "reorder"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(
                    f"LinkConfig.{name}: expected a probability in [0, 1], got {getattr(self, name)!r}"
                )
        if self.jitter_s > self.delay_s:
            raise ValueError(
                "LinkConfig.jitter_s: at most delay_s (a message cannot arrive before it is sent)"
            )


class LinkModel:
    """Draws what happens to each message; deterministic for a seed and a sequence of sends."""

    def __init__(self, config: LinkConfig) -> None:
        self.config = config
        self._rng = np.random.default_rng(config.seed)
        self.sent = self.lost = self.duplicated = self.reordered = 0

    def deliveries(self, t_sent: float) -> list[float]:
        """Arrival times of one message sent at `t_sent` (empty: lost; two: duplicated)."""
        c, rng = self.config, self._rng
        self.sent += 1
        u = rng.random(4)
        if u[0] < c.loss:
            self.lost += 1
            return []
        t = t_sent + c.delay_s + c.jitter_s * (2.0 * u[1] - 1.0)
        if u[2] < c.reorder:
            self.reordered += 1
            t += c.reorder_s
        out = [t]
        if u[3] < c.duplicate:
            self.duplicated += 1
            out.append(t + c.reorder_s * rng.random())
        return out


class Relay:
    """Subscribes `topic_in` (raw), republishes each message on `topic_out` when the link delivers it."""

    def __init__(self, node: Any, msg_class: type, topic_in: str, topic_out: str, model: LinkModel,
                 qos: Any) -> None:  # fmt: skip
        self.model = model
        self._node = node
        self._pub = node.create_publisher(msg_class, topic_out, qos)
        self._queue: list[tuple[float, int, bytes]] = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._stop = False
        self.delivered = 0
        node.create_subscription(msg_class, topic_in, self._on_message, qos, raw=True)
        self._thread = threading.Thread(target=self._run, name="link", daemon=True)
        self._thread.start()

    def _on_message(self, raw: bytes) -> None:
        now = time.monotonic()
        with self._cond:
            for t in self.model.deliveries(now):
                heapq.heappush(self._queue, (t, next(self._order), raw))
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop and (not self._queue or self._queue[0][0] > time.monotonic()):
                    wait = self._queue[0][0] - time.monotonic() if self._queue else None
                    self._cond.wait(timeout=wait)
                if self._stop:
                    return
                _, _, raw = heapq.heappop(self._queue)
            self._pub.publish(raw)
            self.delivered += 1

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=2.0)


def message_class(name: str) -> type:
    """The message class of `pkg/msg/Type`."""
    import importlib

    pkg, _, cls = name.replace("/msg/", "/").partition("/")
    return getattr(importlib.import_module(f"{pkg}.msg"), cls)


def main(argv: list[str] | None = None) -> int:
    """Console script `link_emulator` (ROS arguments after --ros-args go to rclpy)."""
    import rclpy
    from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
    from rclpy.signals import SignalHandlerOptions

    from diffusion_controller.ros import dds
    from diffusion_controller.ros.chunks import CHUNK_QOS

    argv = sys.argv[1:] if argv is None else argv
    ros_args = argv[argv.index("--ros-args") :] if "--ros-args" in argv else []
    own = argv[: len(argv) - len(ros_args)]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--in", dest="topic_in", default="policy/chunk_tx", help="topic the sender publishes")
    p.add_argument("--out", dest="topic_out", default="policy/chunk", help="topic the receiver reads")
    p.add_argument("--type", default="trajectory_msgs/msg/JointTrajectory")
    p.add_argument("--delay", type=float, default=0.0, help="one-way delay (s)")
    p.add_argument("--jitter", type=float, default=0.0, help="uniform +- jitter (s)")
    p.add_argument("--loss", type=float, default=0.0, help="probability a message is lost")
    p.add_argument("--duplicate", type=float, default=0.0, help="probability a message arrives twice")
    p.add_argument("--reorder", type=float, default=0.0, help="probability a message is overtaken")
    p.add_argument("--reorder-s", type=float, default=0.03, help="how much later a reordered one arrives")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(own)
    config = LinkConfig(a.delay, a.jitter, a.loss, a.duplicate, a.reorder, a.reorder_s, a.seed)
    transport = dds.choose_transport(__import__("os").environ)
    rclpy.init(args=["link_emulator", *ros_args], signal_handler_options=SignalHandlerOptions.NO)
    import signal

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    node = rclpy.create_node("link_emulator")
    if transport is not None:
        node.get_logger().info(transport.message)
    relay = Relay(node, message_class(a.type), a.topic_in, a.topic_out, LinkModel(config), CHUNK_QOS)
    node.get_logger().info(f"relaying {node.resolve_topic_name(a.topic_in)} -> "
                           f"{node.resolve_topic_name(a.topic_out)}: {config}")  # fmt: skip
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    try:
        while not stop.is_set() and rclpy.ok():
            executor.spin_once(timeout_sec=0.1)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        m = relay.model
        node.get_logger().info(f"sent {m.sent}, lost {m.lost}, duplicated {m.duplicated}, reordered "
                               f"{m.reordered}, delivered {relay.delivered}")  # fmt: skip
        relay.close()
        executor.shutdown(timeout_sec=2.0)
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
