"""Machine stalls: moments this machine ran none of our threads, and the ticks they cost the node.

On a virtual machine the host can hold a vCPU for milliseconds (this 2-core VM: 5-17 ms, a few times a
minute per vCPU, idle or not; the kernel reports no steal time). No thread inside can run then, SCHED_FIFO
or not, so a tick skipped in such a hold says nothing about the node. A probe per CPU, SCHED_FIFO 99 and
pinned, wakes every millisecond; a wake-up later than `min_s` is a stall (only the machine can hold up the
highest-priority thread of a CPU). A benchmark reports the skipped ticks that overlap one apart from the
others (`missed_in`), never instead of them.

`Holds` makes such stalls on purpose: a SCHED_FIFO 99 thread pinned to one CPU busy-waits `hold_ms`
every `every_ms`, which is what a host's hold of that vCPU looks like from inside (nothing else runs
there meanwhile). A run with holds on one CPU tells which of the node's couplings to that CPU cost ticks.

    python bench/machine_stalls.py --cpu 0 --log stalls.jsonl --min-s 0.0025   # one probe (child mode)
    python bench/machine_stalls.py --cpu 0 --log holds.jsonl --hold 10:200     # hold CPU 0 10 ms in 200
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

#: [start, end] wall times (time.time()) of one stall.
Stall = tuple[float, float]
#: (wall time before, wall time after, slots skipped) of one gap between two ticks (closed_loop.tick_gaps).
Gap = tuple[float, float, int]


def missed_in(gaps: Iterable[Gap], stalls: Sequence[Stall], margin_s: float = 0.0) -> int:
    """Slots skipped in the gaps that overlap a stall; `margin_s` widens each gap backwards (wall times
    taken on receipt lag the ticks)."""
    return sum(n for a, b, n in gaps if any(s0 < b and s1 > a - margin_s for s0, s1 in stalls))


def _top_of(cpu: int, log: Path) -> bool:
    """This process pinned to `cpu` at SCHED_FIFO 99 (nothing in the guest preempts it there); else False
    with the reason as the log's only line ({"error": ...})."""
    try:
        os.sched_setaffinity(0, {cpu})
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(99))
    except (OSError, AttributeError) as exc:
        log.write_text(json.dumps({"error": f"cpu {cpu}: {exc}"}) + "\n")
        return False
    return True


def probe(cpu: int, log: Path, min_s: float, duration_s: float = float("inf")) -> int:
    """Child mode: the probe of one CPU until SIGTERM (or `duration_s`). Exits 3 with the reason on the
    log's first line when it cannot be real-time: a normal-priority probe would report scheduling delays."""
    if not _top_of(cpu, log):
        return 3
    log.write_text("")
    end = time.monotonic() + duration_s
    last = time.monotonic()
    with contextlib.suppress(KeyboardInterrupt), open(log, "a") as f:
        while last < end:
            time.sleep(0.001)
            now = time.monotonic()
            if now - last > min_s + 0.001:
                wall = time.time()
                f.write(json.dumps([wall - (now - last), wall]) + "\n")
                f.flush()
            last = now
    return 0


def hold(cpu: int, log: Path, hold_s: float, every_s: float, duration_s: float = float("inf")) -> int:
    """Child mode: hold `cpu` for `hold_s` every `every_s` until SIGTERM (or `duration_s`); then the log
    gets the count of holds, whole (written beside it and renamed: SIGTERM may come at any instruction),
    or, exit 3, why it cannot hold (without SCHED_FIFO 99 it would only share the CPU)."""
    if not _top_of(cpu, log):
        return 3
    n, end = 0, time.monotonic() + duration_s
    with contextlib.suppress(KeyboardInterrupt):
        while time.monotonic() < end:
            start = time.monotonic()
            while time.monotonic() < start + hold_s:
                pass
            n += 1
            time.sleep(max(0.0, start + every_s - time.monotonic()))
    part = log.with_suffix(".part")
    part.write_text(json.dumps({"holds": n}) + "\n")
    part.replace(log)
    return 0


class Holds:
    """Holds of one CPU (`hold`) in a child process, from construction until `stop()`."""

    def __init__(self, directory: Path, cpu: int, hold_s: float, every_s: float) -> None:
        if not 0.0 < hold_s < every_s:
            raise ValueError(f"a hold of {hold_s} s every {every_s} s: need 0 < hold < every")
        self.log = directory / f"holds_cpu{cpu}.json"
        self.log.write_text("")
        self.proc = subprocess.Popen([sys.executable, __file__, "--cpu", str(cpu), "--log", str(self.log),
                                      "--hold", f"{1000 * hold_s:g}:{1000 * every_s:g}"])  # fmt: skip

    def stop(self) -> tuple[int, str | None]:
        """End the holds; (how many there were, None or why there were none)."""
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(timeout=10)
        text = self.log.read_text().strip()
        if not text:
            return 0, f"the holder left no count (exit code {self.proc.returncode})"
        item = json.loads(text)
        return int(item.get("holds", 0)), item.get("error")


def parse_hold(text: str) -> tuple[int, float, float]:
    """--hold-cpu CPU:HOLD_MS:EVERY_MS ("0:10:200") as (cpu, hold_s, every_s); ValueError says why."""
    parts = text.split(":")
    try:
        cpu, hold_ms, every_ms = int(parts[0]), float(parts[1]), float(parts[2])
    except (ValueError, IndexError):
        raise ValueError(f"{text!r} is not CPU:HOLD_MS:EVERY_MS (e.g. 0:10:200)") from None
    if len(parts) != 3 or cpu < 0 or not 0.0 < hold_ms < every_ms:
        raise ValueError(f"{text!r}: need one CPU >= 0 and 0 < HOLD_MS < EVERY_MS")
    return cpu, hold_ms / 1000.0, every_ms / 1000.0


class Probes:
    """One probe process per CPU of this process' affinity, from construction until `stop()`."""

    def __init__(self, directory: Path, min_s: float) -> None:
        self.logs = [directory / f"stalls_cpu{cpu}.jsonl" for cpu in sorted(os.sched_getaffinity(0))]
        self.procs = [
            subprocess.Popen([sys.executable, __file__, "--cpu", log.stem.removeprefix("stalls_cpu"),
                              "--log", str(log), "--min-s", str(min_s)])
            for log in self.logs
        ]  # fmt: skip

    def stop(self) -> tuple[list[Stall], str | None]:
        """End the probes; (the stalls they saw, sorted; None or why there are no figures)."""
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            p.wait(timeout=10)
        stalls: list[Stall] = []
        for log in self.logs:
            lines = log.read_text().splitlines() if log.exists() else []
            for line in lines:
                item = json.loads(line)
                if isinstance(item, dict):
                    return [], item["error"]
                stalls.append((float(item[0]), float(item[1])))
        return sorted(stalls), None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", type=int, required=True)
    ap.add_argument("--log", type=Path, required=True)
    ap.add_argument("--min-s", type=float, default=0.0025, help="a wake-up this late is a stall")
    ap.add_argument("--duration", type=float, default=float("inf"))
    ap.add_argument("--hold", default="", help="HOLD_MS:EVERY_MS: hold the CPU instead of probing it")
    args = ap.parse_args(argv)
    import signal

    signal.signal(signal.SIGTERM, signal.default_int_handler)
    if args.hold:
        _, hold_s, every_s = parse_hold(f"{args.cpu}:{args.hold}")
        return hold(args.cpu, args.log, hold_s, every_s, args.duration)
    return probe(args.cpu, args.log, args.min_s, args.duration)


if __name__ == "__main__":
    sys.exit(main())
