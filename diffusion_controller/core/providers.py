"""Execution providers: which sessions to try, with which options, and what a session really runs on.

The decision is a pure function (`plan`) of the requested provider, precision, capture wish, device and
what this process can load, so the fallback policy is tested without a GPU; runtime.Policy.load runs the
candidates in order. The rules follow ONNX Runtime 1.31's documented behaviour:

- `auto` tries TensorRT, then CUDA, then the CPU, a provider at a time: an EP that fails to start (an
  engine build ending in EP_FAIL, a missing library) costs one log line, not the load. An explicit
  `tensorrt` or `cuda` never falls back to the CPU: it starts on that provider or the load fails.
- CUDA graph capture is requested from ONE EP only. ORT captures with a single EP and refuses the session
  when nodes sit elsewhere: TensorRT (trt_cuda_graph_enable) needs every node on TensorRT, CUDA
  (enable_cuda_graph) allows CPU nodes only for shape arithmetic. So a TensorRT session asks for capture
  from TensorRT alone (the CUDA EP beside it, for nodes TensorRT cannot take, never captures); if ORT
  refuses, the same provider is tried once more without capture. Enabling it for both, as before, made
  every TensorRT session with a CUDA node fail capture and dropped graphs for both.
- fp16 is TensorRT's build flag (trt_fp16_enable); the CUDA and CPU EPs run the graph's float32.
- TensorRT engines and its timing cache go to a directory per model content and GPU (`engine_cache_path`):
  built once, reused at every start; ORT itself adds the precision and compute capability to the names.
- What runs is read back from the session's node placement (session.record_ep_graph_assignment_info),
  not from get_providers(), which only lists what was registered.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnxruntime as ort

TRT, CUDA, CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
PROVIDERS = {"tensorrt": TRT, "cuda": CUDA, "cpu": CPU}
SHORT = {v: k for k, v in PROVIDERS.items()}
CHOICES = ("auto", *PROVIDERS)
PRECISIONS = ("fp32", "fp16")
GPU = ("tensorrt", "cuda")
_PROVIDER_LIBS = {TRT: "libonnxruntime_providers_tensorrt.so", CUDA: "libonnxruntime_providers_cuda.so"}
#: Session config key that makes ORT keep each node's EP (get_provider_graph_assignment_info).
RECORD_PLACEMENT = "session.record_ep_graph_assignment_info"

class GpuGate:
    """Which GPU work may overlap: a shared side for ordinary runs, an exclusive side for captures.

    ORT captures a CUDA graph in the global stream-capture mode (cudaStreamCaptureModeGlobal), where any
    other thread's potentially unsafe CUDA call (a synchronous copy, an allocation) breaks the capture and
    fails that call. So a session's capture runs take the exclusive side, and so does freeing a session
    (cudaFree during a capture). Everything else takes the shared side and may overlap: the running
    policy's replays, a new session's first (regular) run, where cuDNN/cuBLAS start and the arena grows
    (the slow part of a load), and runs without capture. Before, one lock held every run, so the running
    policy's chunks waited behind a swap's whole warm-up. A waiting exclusive request stops new shared
    entries (writer preference), so a capture is not starved by a 100 Hz loop. Session creation takes
    neither (a TensorRT engine build would hold the running policy for minutes; it captures nothing).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._shared = 0
        self._exclusive = False
        self._waiting = 0  # exclusive requests waiting

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive and not self._waiting)
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    def acquire(self) -> None:
        """Take the exclusive side (waits for every shared holder to leave)."""
        with self._cond:
            self._waiting += 1
            try:
                self._cond.wait_for(lambda: not self._exclusive and not self._shared)
            finally:
                self._waiting -= 1
            self._exclusive = True

    def release(self) -> None:
        with self._cond:
            self._exclusive = False
            self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        self.acquire()
        try:
            yield
        finally:
            self.release()

    def __enter__(self) -> None:  # `with GPU_LOCK:` is the exclusive side
        self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def locked(self) -> bool:
        """Whether the exclusive side is held."""
        with self._cond:
            return self._exclusive


#: The process-wide gate of every GPU session (see GpuGate).
GPU_LOCK = GpuGate()
#: A CUDA-graph session's runs that may capture (1-based), which take the exclusive side. Run 1 is told
#: not to capture (SKIP_CAPTURE) and stays shared: it is the slow one (cuBLAS and cuDNN handles, arena
#: growth), and the running policy must not wait on it. ORT's CUDA and TensorRT EPs capture after
#: min_num_runs_before_cuda_graph_capture_ regular runs (1 or 2 by release, counted with or without the
#: skipped run), so in run 2, 3 or 4; on an H200 with ORT 1.31 a capture outside runs 2-3 met the running
#: policy's replay (CUDA error 900), hence the margin. Policy.load makes these runs, so a session leaves
#: load() captured and every later run is a shared replay.
CAPTURE_RUNS = range(2, 6)
#: Run option that makes a run skip CUDA graph capture and replay (ORT's kCudaGraphAnnotationSkip).
SKIP_CAPTURE = ("gpu_graph_id", "-1")


def gpu_provider_problem(provider: str) -> str | None:
    """Why `provider` cannot load in this process, or None when its libraries load (cheap, no session).

    ORT's own fallback prints pages of errors and only says "falling back"; loading the provider library
    ourselves names the missing piece (driver, CUDA, cuDNN, TensorRT).
    """
    if provider not in ort.get_available_providers():
        return f"not built into this onnxruntime ({ort.__version__}, package without GPU support)"
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return "no NVIDIA driver (libcuda.so.1 cannot be loaded): no GPU on this machine"
    capi = Path(ort.__file__).parent / "capi"
    try:
        ctypes.CDLL(str(capi / "libonnxruntime_providers_shared.so"), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(str(capi / _PROVIDER_LIBS[provider]))
    except OSError as e:
        if "cannot open shared object" in str(e):
            return f"a library it needs is missing: {e}"
    return None


def gpu_problems() -> dict[str, str | None]:
    """gpu_provider_problem for each GPU provider, by short name (the `problems` argument of plan)."""
    return {short: gpu_provider_problem(PROVIDERS[short]) for short in GPU}


def default_engine_cache_dir() -> Path:
    """Where TensorRT engines go when engine_cache_dir is empty: the user's cache, so that the node and
    `build_engine` agree without configuration and the working directory stays clean."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "diffusion_controller" / "tensorrt"


def gpu_name(device_id: int) -> str | None:
    """The CUDA device's marketing name from the driver (None without one): part of the cache key, since
    an engine is tuned for one GPU model."""
    try:
        cu = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    dev, buf = ctypes.c_int(), ctypes.create_string_buffer(256)
    if cu.cuInit(0) or cu.cuDeviceGet(ctypes.byref(dev), device_id) or cu.cuDeviceGetName(buf, 256, dev):
        return None
    return buf.value.decode(errors="replace") or None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._]+", "-", text).strip("-") or "x"


def engine_cache_path(root: str | Path, model: Path, device_id: int, gpu: str | None = None) -> Path:
    """`root/<model stem>-<content hash>/<gpu>-ort<version>`: TensorRT engines for one model on one GPU.

    ORT names engines by the graph, not by the weights, and does not notice a new ORT version; a
    directory per file content, GPU model and ORT version means a changed model or upgrade builds anew
    instead of loading a stale engine. (After a TensorRT upgrade, delete the directory.)
    """
    digest = hashlib.sha256()
    with open(model, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    gpu = gpu or f"device{device_id}"
    return (
        Path(root).expanduser()
        / f"{_slug(model.stem)}-{digest.hexdigest()[:12]}"
        / _slug(f"{gpu}-ort{ort.__version__}")
    )


@dataclass(frozen=True)
class Candidate:
    """One session to try: the EP meant to run the graph, the providers argument, capture, precision."""

    provider: str
    entries: tuple[Any, ...]
    cuda_graph: bool
    precision: str = "fp32"

    @property
    def label(self) -> str:
        extra = [self.precision] if self.provider == "tensorrt" else []
        extra += ["CUDA graph"] if self.cuda_graph else []
        return self.provider + (f" ({', '.join(extra)})" if extra else "")


def _device_option(device_id: int) -> dict[str, str]:
    """The device_id provider option, left out for device 0 (ORT's default device).

    Since 1.26, ORT's Python binding (onnxruntime_pybind_state.cc, CreateExecutionProviderFactoryInstance)
    first looks for a *plugin* EP device registered for the provider (register_execution_provider_library)
    matching the `device_id` option, and only then falls back to the built-in CUDA/TensorRT EP; when the
    options carry `device_id` and no plugin device matches, it logs "No registered plugin EP device found
    for 'CUDAExecutionProvider' with device_id=0" on the process-wide logger (the session's
    log_severity_level does not reach it) for every session. Nothing here registers plugin EPs, so the
    lookup can only fail: without the key ORT skips the warning and uses device 0 all the same. Another
    device must be named, and then ORT still prints that line once per session (harmless: the built-in
    EP runs on that device).
    """
    return {"device_id": str(device_id)} if device_id else {}


def _entries(short: str, cuda_graph: bool, precision: str, device_id: int, cache: Path | None,
             cuda_ok: bool, tf32: bool = False) -> tuple[Any, ...]:  # fmt: skip
    dev = _device_option(device_id)
    cuda = (CUDA, dev | {
        "enable_cuda_graph": "1" if cuda_graph and short == "cuda" else "0",
        # ORT's CUDA EP default is TF32 on (10-bit mantissa in float32 matmuls: 4e-3 action differences
        # from the CPU on an H200); off unless asked, so the GPU computes what the CPU does.
        "use_tf32": "1" if tf32 else "0",
    })  # fmt: skip
    if short == "cuda":
        return (cuda, CPU)
    opts = dev | {
        "trt_fp16_enable": "1" if precision == "fp16" else "0",
        "trt_cuda_graph_enable": "1" if cuda_graph else "0",
    }
    if cache is not None:
        opts |= {
            "trt_engine_cache_enable": "1",
            "trt_engine_cache_path": str(cache),
            "trt_timing_cache_enable": "1",
            "trt_timing_cache_path": str(cache),
        }
    return ((TRT, opts), cuda, CPU) if cuda_ok else ((TRT, opts), CPU)


def plan(
    provider: str,
    *,
    precision: str = "fp32",
    cuda_graph: bool = True,
    device_id: int = 0,
    engine_cache: Path | None = None,
    problems: Mapping[str, str | None],
    tf32: bool = False,
) -> tuple[list[Candidate], list[str]]:
    """The sessions to try in order, and notes to log; raises ValueError for a request that cannot work.

    `problems` maps tensorrt/cuda to why it cannot load here (None: it can; absent: not checked, so not
    used), see gpu_problems(). `engine_cache` is the TensorRT engine and timing cache directory (None:
    no cache). `tf32`: the CUDA EP's use_tf32 (TensorFloat-32 matmuls; off: float32 as on the CPU).
    """

    def ok(p: str) -> bool:
        return p in problems and problems[p] is None

    if provider not in CHOICES:
        raise ValueError(f"provider: expected one of {list(CHOICES)}, got {provider!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {list(PRECISIONS)}, got {precision!r}")
    if isinstance(device_id, bool) or not isinstance(device_id, int) or device_id < 0:
        raise ValueError(f"device_id: expected an integer >= 0, got {device_id!r}")
    if precision == "fp16" and provider in ("cuda", "cpu"):
        raise ValueError(
            f"precision fp16 is TensorRT's (trt_fp16_enable); provider {provider} runs the graph in "
            "float32: use provider tensorrt or auto, or precision fp32"
        )
    notes: list[str] = []
    if provider == "cpu":
        return [Candidate("cpu", (CPU,), False)], notes
    why = {p: problems.get(p) or "not checked" for p in GPU if not ok(p)}
    if provider in why:
        raise ValueError(f"provider {provider!r} requested but it cannot be used here: {why[provider]}")
    usable = [p for p in GPU if (provider == "auto" or p == provider) and ok(p)]
    if provider == "auto":
        notes += [f"policy: {p} not used: {w}" for p, w in why.items()]
    cands = []
    for short in usable:
        prec = precision if short == "tensorrt" else "fp32"
        for graph in (True, False) if cuda_graph else (False,):
            entries = _entries(short, graph, prec, device_id, engine_cache, ok("cuda"), tf32)
            cands.append(Candidate(short, entries, graph, prec))
    if provider == "auto":
        if precision == "fp16" and usable != ["tensorrt"]:
            notes.append("policy: precision fp16 is TensorRT's; a cuda or cpu fallback runs float32")
        cands.append(Candidate("cpu", (CPU,), False))
    return cands, notes


def placement(session: Any) -> dict[str, int] | None:
    """Nodes per EP (short names) as ORT placed them, or None where the session did not record it."""
    try:
        info = session.get_provider_graph_assignment_info()
    except Exception:  # older ORT (no such method), or recording not enabled: ORT's Fail
        return None
    out: dict[str, int] = {}
    for sub in info:
        name = SHORT.get(sub.ep_name, sub.ep_name)
        out[name] = out.get(name, 0) + len(sub.get_nodes())
    return out


def runs_on(registered: list[str], nodes: Mapping[str, int] | None) -> str:
    """The EP that runs the graph: TensorRT if it holds any node, else CUDA if it does, else the CPU.

    Without placement, the first registered provider (all a session without the record can tell).
    """
    if nodes is None:
        return SHORT.get(registered[0], registered[0]) if registered else "cpu"
    return next((p for p in GPU if nodes.get(p, 0) > 0), "cpu")


def capture_refused(error: str) -> bool:
    """Whether a session-creation error is ORT refusing CUDA graph capture (then retry without it)."""
    return "graph capture" in error.lower()
