"""Stand-ins for ONNX Runtime GPU sessions on a CPU-only machine (test_providers, test_build_engine).

A session factory that refuses chosen providers the way ORT does (its Fail exception), or wraps a real
CPU session and reports the providers and node placement a GPU session would; device buffers that are
CPU OrtValues counting their copies.
"""

from __future__ import annotations

import threading
import time
from typing import ClassVar

import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import Fail

from diffusion_controller.core import providers as pv
from diffusion_controller.core import runtime
from diffusion_controller.core.providers import CPU, CUDA, TRT

BOTH = {"tensorrt": None, "cuda": None}


class Sub:
    """Stand-in for ORT's OrtEpAssignedSubgraph."""

    def __init__(self, ep: str, n: int) -> None:
        self.ep_name, self._n = ep, n

    def get_nodes(self) -> list[None]:
        return [None] * self._n


class GpuStandIn:
    """A real CPU session that reports what a GPU session would, and can fail its runs."""

    active = 0  # runs in progress, over all stand-ins (the swap tests read the maximum)
    max_active = 0
    capturing = 0  # capture runs in progress
    capture_overlaps = 0  # runs that met a capture in progress (ORT: the capture and that call fail)
    count_lock = threading.Lock()
    #: The run that captures in a session with capture on (ORT 1.31: 2 regular runs, then the capture).
    CAPTURE_RUN = 3

    released_on: ClassVar[list[tuple[str, bool]]] = []  # (thread, GPU_LOCK held) where each was freed

    def __init__(self, sess, registered, nodes, fail_runs: bool = False, run_sleep: float = 0.0,
                 graph: bool = False, run_hook=None):  # fmt: skip
        self._sess, self._registered, self._nodes = sess, registered, nodes
        self.fail_runs, self.run_sleep, self.runs = fail_runs, run_sleep, 0
        self.graph, self.run_hook = graph, run_hook  # run_hook(session, run number) inside each run
        self.threads: set[str] = set()  # names of the threads that ran it
        self.graph_ids: list[str | None] = []  # each run's gpu_graph_id run option (None: not set)

    def __del__(self):
        GpuStandIn.released_on.append((threading.current_thread().name, pv.GPU_LOCK.locked()))

    def get_providers(self):
        return self._registered

    def get_provider_graph_assignment_info(self):
        return [Sub(ep, n) for ep, n in self._nodes]

    def run_with_iobinding(self, io, run_options=None):
        self.threads.add(threading.current_thread().name)
        if self.fail_runs:
            raise Fail("CUDA failure 901: operation not permitted when stream is capturing")
        cls = GpuStandIn
        try:
            graph_id = run_options.get_run_config_entry(pv.SKIP_CAPTURE[0]) if run_options else None
        except RuntimeError:  # ORT: no such entry
            graph_id = None
        self.graph_ids.append(graph_id)
        # ORT's kCudaGraphAnnotationSkip: such a run never captures (nor replays)
        capture = self.graph and self.runs + 1 == cls.CAPTURE_RUN and graph_id != pv.SKIP_CAPTURE[1]
        with cls.count_lock:
            if cls.capturing or (capture and cls.active):
                cls.capture_overlaps += 1
            cls.active += 1
            cls.capturing += capture
            cls.max_active = max(cls.max_active, cls.active)
        try:
            if self.run_hook is not None:
                self.run_hook(self, self.runs + 1)
            time.sleep(self.run_sleep)
            self.runs += 1
            self._sess.run_with_iobinding(io, run_options)
        finally:
            with cls.count_lock:
                cls.active -= 1
                cls.capturing -= capture

    def __getattr__(self, name):
        return getattr(self._sess, name)


class Factory:
    """Plays ORT: `refuse` maps (provider, capture) to the message ORT's Fail carries; `runs_on` maps a
    provider to where the session really puts the nodes (default: on it)."""

    def __init__(self, refuse=None, runs_on=None, fail_capture_runs=False, run_sleep=0.0, create_hook=None,
                 run_hook=None):  # fmt: skip
        """create_hook(path) runs inside each GPU session's creation; run_hook: see GpuStandIn."""
        self.refuse, self.runs_on = refuse or {}, runs_on or {}
        self.fail_capture_runs, self.run_sleep = fail_capture_runs, run_sleep
        self.create_hook, self.run_hook = create_hook, run_hook
        self.calls: list[tuple[str, bool, list]] = []
        self.sessions: list = []

    def __call__(self, path, options, entries):
        first = entries[0][0] if isinstance(entries[0], tuple) else entries[0]
        short = pv.SHORT[first]
        o = {e[0]: e[1] for e in entries if isinstance(e, tuple)}
        graph = (
            o.get(TRT, {}).get("trt_cuda_graph_enable") == "1"
            or o.get(CUDA, {}).get("enable_cuda_graph") == "1"
        )
        self.calls.append((short, graph, entries))
        if (short, graph) in self.refuse:
            raise Fail(self.refuse[short, graph])
        sess = ort.InferenceSession(path, options, providers=[CPU])
        if short == "cpu":
            self.sessions.append(sess)
            return sess
        if self.create_hook is not None:
            self.create_hook(path)
        where = pv.PROVIDERS[self.runs_on.get(short, short)]
        registered = [e[0] if isinstance(e, tuple) else e for e in entries]
        s = GpuStandIn(
            sess, registered, [(where, 40), (CPU, 2)], graph and self.fail_capture_runs, self.run_sleep,
            graph, self.run_hook,
        )  # fmt: skip
        self.sessions.append(s)
        return s


class Uploads:
    """Device buffers as CPU OrtValues that count their copies and remember their device id."""

    def __init__(self):
        self.up: list[tuple[tuple, int]] = []
        self.down = 0
        self.devices: set[int] = set()

    def __call__(self, shape, dtype, device_id):
        ov = ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype.type, "cpu", 0)
        update, numpy = ov.update_inplace, ov.numpy
        self.devices.add(device_id)

        def counted_update(a):
            self.up.append((shape, device_id))
            update(a)

        def counted_numpy():
            self.down += 1
            return numpy()

        ov.update_inplace, ov.numpy = counted_update, counted_numpy
        return ov


def fake_gpu(monkeypatch) -> Uploads:
    """Make this process look like one where both GPU EPs load; returns the device-buffer counter."""
    monkeypatch.setattr(pv, "gpu_problems", lambda: dict(BOTH))
    monkeypatch.setattr(pv, "gpu_provider_problem", lambda _provider: None)
    uploads = Uploads()
    monkeypatch.setattr(runtime, "_device_buffer", uploads)
    return uploads
