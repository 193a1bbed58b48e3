"""A node process's life around its node: signals that only set a flag, the spin, the ordered teardown.

rclpy's own signal handler shuts the context down from the signal while a node's threads may be inside a
wait on it (a crash on exit). Here a signal only sets a flag; `spin` sees it within 0.1 s and `tear_down`
ends things in order: the node's own threads (node.close()), executor, node, context. Shared by
controller_node and policy_node.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
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


def parse_cpus(text: str) -> frozenset[int]:
    """A Linux CPU list as taskset -c and isolcpus take it ("1", "0,2", "2-3"); empty for "". Raises
    ValueError naming what is wrong."""
    cpus: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, sep, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi if sep else lo)
        except ValueError:
            raise ValueError(f"{text!r} is no CPU list (e.g. '1', '0,2', '2-3')") from None
        if first < 0 or last < first:
            raise ValueError(f"{text!r}: {part!r} is no CPU range")
        cpus.update(range(first, last + 1))
    return frozenset(cpus)


def check_cpus(text: str, allowed: Iterable[int] | None = None) -> tuple[frozenset[int], str | None]:
    """(the CPUs of `text`, None) when they are a CPU list within `allowed` (default: the machine's
    CPUs); else (empty, why)."""
    try:
        cpus = parse_cpus(text)
    except ValueError as exc:
        return frozenset(), str(exc)
    allowed = set(range(os.cpu_count() or 1) if allowed is None else allowed)
    if not cpus <= allowed:
        outside = sorted(cpus - allowed)
        return frozenset(), f"CPUs {outside} of {text!r} are not among this machine's ({sorted(allowed)})"
    return cpus, None


def pin_threads(
    cpus: Iterable[int],
    task_dir: Path = Path("/proc/self/task"),
    set_affinity: Callable[[int, set[int]], None] = os.sched_setaffinity,
) -> str | None:
    """Every thread of this process onto `cpus` (threads started later inherit their starter's CPUs); None
    when done, else why not (Linux only)."""
    try:
        tids = [int(t.name) for t in task_dir.iterdir()]
    except OSError as exc:
        return str(exc)
    for tid in tids:
        try:
            set_affinity(tid, set(cpus))
        except ProcessLookupError:
            continue  # the thread ended meanwhile
        except (OSError, AttributeError) as exc:
            return f"thread {tid}: {exc}"
    return None


def pin_process(text: str) -> tuple[frozenset[int], str | None]:
    """Every thread of this process onto the CPU list `text` (a cpu_affinity parameter): (the CPUs, None)
    when done, else (empty, why)."""
    cpus, why = check_cpus(text)
    why = why or pin_threads(cpus)
    return (cpus, None) if why is None else (frozenset(), why)
