"""The one thread that makes a GPU session's CUDA calls, so the CUDA graph load() captures is the one
every predict replays (ORT keeps a captured graph per calling thread)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

from diffusion_controller.core.providers import GPU_LOCK


class DeviceThread:
    """The one thread that makes a GPU session's CUDA calls (uploads, runs, downloads, release).

    ORT's CUDA EP keeps a captured CUDA graph in the calling thread's context and captures on that
    thread's first runs. Were predict() to run on whatever thread calls it, the capture load() checks
    (on the loader thread) would not be the graph the inference worker replays: the worker would capture
    again, unchecked, at its first ticks. Here every run of the session is on this thread.
    """

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._serve, args=(self._jobs,), name=name, daemon=True).start()

    @staticmethod
    def _serve(jobs: queue.SimpleQueue) -> None:  # holds no Policy between jobs, so one can be freed
        while (job := jobs.get()) is not None:
            fn, box, done = job
            try:
                box.append((True, fn()))
            except BaseException as e:  # handed back to the caller
                box.append((False, e))
            done.set()
            del job, fn, box, done

    def call(self, fn: Callable[[], Any]) -> Any:
        """fn() on this thread; its result, or its exception raised here."""
        box: list[tuple[bool, Any]] = []
        done = threading.Event()
        self._jobs.put((fn, box, done))
        done.wait()
        ok, value = box[0]
        if ok:
            return value
        raise value

    def release(self, *objects: Any) -> None:
        """Drop the last references to a freed Policy's session and device buffers on this thread under
        GPU_LOCK's exclusive side (freeing CUDA memory during another session's capture would break it),
        then end."""

        keep = list(objects)
        del objects

        def drop() -> None:
            with GPU_LOCK:
                keep.clear()

        self._jobs.put((drop, [], threading.Event()))
        self._jobs.put(None)
