"""A node process's life around its node: signals that only set a flag, the spin, the ordered teardown.

rclpy's own signal handler shuts the context down from the signal while a node's threads may be inside a
wait on it (a crash on exit). Here a signal only sets a flag; `spin` sees it within 0.1 s and `tear_down`
ends things in order: the node's own threads (node.close()), executor, node, context. Shared by
controller_node and policy_node.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import rclpy

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def stop_on_signals() -> threading.Event:
    """An event SIGINT and SIGTERM set (call after rclpy.init(signal_handler_options=NO))."""
    stop = threading.Event()
    for sig in SIGNALS:
        signal.signal(sig, lambda *_: stop.set())
    return stop


def spin(executor: Any, stop: threading.Event) -> None:
    """Spin until a signal or the context's shutdown."""
    while not stop.is_set() and rclpy.ok():
        executor.spin_once(timeout_sec=0.1)


def tear_down(node: Any | None, executor: Any | None) -> None:
    """Close the node's threads, shut the executor down, destroy the node, end the context; a second signal
    must not interrupt it."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if node is not None:
        node.close()
    if executor is not None:
        executor.shutdown(timeout_sec=5.0)
    if node is not None:
        node.destroy_node()
    rclpy.try_shutdown()
