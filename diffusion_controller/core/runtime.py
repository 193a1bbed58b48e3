"""Policy: one ONNX Runtime session per model, with validated card, chosen provider and fixed buffers.

Everything that can fail (path, file, card, tensor names and shapes, provider) fails at load time with a
message that says what differs, because the node loads models off the control path and must be able to
refuse a bad one while the running policy keeps going. predict() copies into buffers bound once (IO
binding), so a call allocates only its returned array; on a GPU the bound device buffers also let ORT
capture the run as a CUDA graph, and only the inputs that changed since the last run are uploaded. Which
providers are tried, and what a session really runs on, is core/providers.py; how a session is made
(options, candidates, ORT's refusals) is core/session.py; load() tries the candidates in order. A
Policy serializes its own predict calls with a lock; separate CPU Policy objects (e.g. the running one
and one being loaded for a swap) share nothing. A GPU Policy runs its session on a thread of its own
(core/device_thread.py: ORT keeps a CUDA graph per calling thread, so the graph load() captures is the one
every predict replays), and all GPU sessions pass providers.GPU_LOCK (a GpuGate): only the runs that may
capture (and freeing a session) are exclusive, so a new session's capture never overlaps the running
one's device work, while its creation and first, slow run do not hold the running policy's chunks.

Graph forms (see training/export.py): `fused` runs the whole DDIM chain in one session run, with K
fixed by the card and inpainting in the graph; `denoiser` runs the K-step loop here with core/ddim.py,
so K can be chosen at load time. A fused graph exported with `--batch N` (card graph.batch) has N rows in
every buffer: predict() runs row 0, predict_batch() up to N robots' histories in one run (the policy node
serving several robots).

int8 graphs (export --weights int8) say in `network.int8_form` how their weights are stored; a form
whose ONNX Runtime kernels compute wrong actions on this CPU is refused at load (see u8s8_problem).
"""

from __future__ import annotations

import os
import platform
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from diffusion_controller.core import ddim, providers
from diffusion_controller.core.card import ModelCard
from diffusion_controller.core.card_source import ModelError, card_of_model
from diffusion_controller.core.device_thread import DeviceThread
from diffusion_controller.core.providers import CPU, CUDA, GPU_LOCK, PROVIDERS, SHORT, TRT, Candidate
from diffusion_controller.core.session import (
    SessionFactory,
    check_tensors,
    expected_tensors,
    missing_operator,
    nodes_text,
    ort_session,
    provider_candidates,
    session_options,
    unrunnable,
    why,
)

__all__ = ["CPU", "CUDA", "PROVIDERS", "SHORT", "TRT", "ModelError", "Policy", "SessionFactory"]
#: int8 weight forms (card network.int8_form); activations are uint8, quantized per call, in all three.
#: u8u8: uint8 weights; u8s7: int8 weights limited to 7 bits (reduce_range): neither saturates on any
#: CPU. u8s8: full int8 weights, which saturate unless u8s8_problem() is None.
INT8_FORMS = ("u8u8", "u8s7", "u8s8")
#: The form of int8 exports made before the card named it.
INT8_FORM_BEFORE_CARD_FIELD = "u8s8"
_X86 = ("x86_64", "amd64", "i386", "i686", "x86")


def u8s8_problem(cpuinfo: str | None = None, machine: str | None = None) -> str | None:
    """Why ONNX Runtime's uint8 x int8 matrix kernels may saturate on this CPU, or None where exact.

    Without VNNI, x86 kernels (SSE4.1, AVX2, AVX-512) add pairs of uint8*int8 products in int16
    (VPMADDUBSW), which saturates for large weights and moved a DiffuseLoco-size graph's actions by up
    to half their range on an AVX2-only CPU; VNNI (avx512_vnni, avx_vnni) accumulates in int32, and other
    architectures have other kernels. `cpuinfo`/`machine` stand in for /proc/cpuinfo and the platform.
    """
    if (machine or platform.machine()).lower() not in _X86:
        return None
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "cannot tell whether this x86 CPU has VNNI (no /proc/cpuinfo)"
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            break
    if flags & {"avx512_vnni", "avx_vnni"}:
        return None
    return "this x86 CPU has no VNNI (neither avx512_vnni nor avx_vnni in /proc/cpuinfo)"


def int8_problem(card: ModelCard) -> str | None:
    """Why this card's int8 graph would compute wrong actions on this CPU, or None."""
    if card.network.get("weights") != "int8":
        return None
    form = card.network.get("int8_form", INT8_FORM_BEFORE_CARD_FIELD)
    if form != "u8s8":
        return None
    why = u8s8_problem()
    if why is None:
        return None
    named = "" if "int8_form" in card.network else " (exported before the card named its int8 form)"
    return (
        f"its int8 weights are signed 8-bit, network.int8_form u8s8{named}, and ONNX Runtime's kernels "
        f"for them saturate on x86 CPUs without VNNI: {why}; its actions could be far from the float "
        "model's. Re-export with `export_policy --weights int8` (form u8u8, which saturates nowhere) or use "
        "the float model"
    )


def _device_buffer(shape: tuple[int, ...], dtype: np.dtype, device_id: int) -> ort.OrtValue:
    """A tensor in GPU memory (CUDA and TensorRT sessions both read CUDA memory)."""
    return ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype.type, "cuda", device_id)


def _runnable_steps(path: Path, card: ModelCard, steps: int | None) -> int:
    """The DDIM steps K a load runs: the card's, or `steps` where the graph lets K be chosen; ModelError
    for a card this runtime cannot run (no graph, an int8 form that saturates here) or a K it cannot."""
    if card.graph is None:
        raise ModelError(f"model {path}: its card has no graph section")
    problem = int8_problem(card)
    if problem is not None:
        raise ModelError(f"model {path}: {problem}")
    if steps is not None and card.sampler_kind != "ddim" and steps != card.steps:
        raise ModelError(
            f"steps: a {card.sampler_kind} sampler runs in exactly {card.steps} step(s), requested {steps}"
        )
    if steps is None:
        steps = card.steps
    elif card.graph.kind == "fused" and steps != card.steps:
        raise ModelError(
            f"steps: this fused graph has K={card.steps} unrolled; export a denoiser graph to choose K "
            f"at run time (requested {steps})"
        )
    try:
        card.diffusion.check_steps(steps)
    except ValueError as e:
        raise ModelError(str(e)) from e
    return steps


class Policy:
    """A loaded policy model. Create with Policy.load(); predict() from one thread at a time is fastest."""

    card: ModelCard
    provider: str  # the EP that runs the graph (tensorrt | cuda | cpu), from the session's node placement
    precision: str  # fp16 only where TensorRT runs with trt_fp16_enable
    cuda_graph: bool  # the runs replay a captured CUDA graph
    steps: int
    supports_inpainting: bool

    def __init__(self) -> None:  # use Policy.load
        raise TypeError("use Policy.load(path, ...)")

    # -- loading --------------------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        path: str | Path,
        provider: str = "auto",
        threads: int = 1,
        steps: int | None = None,
        warmup: int = 3,
        log: Callable[[str], None] = print,
        *,
        precision: str = "fp32",
        cuda_graph: bool = True,
        device_id: int = 0,
        engine_cache_dir: str = "",
        session_factory: SessionFactory = ort_session,
        tf32: bool = False,
    ) -> Policy:
        """Load, validate and warm up a model. Raises ModelError (or CardError for an invalid card).

        provider auto | tensorrt | cuda | cpu, precision fp32 | fp16 (TensorRT), cuda_graph (capture where
        one GPU EP owns the graph), device_id (CUDA device), engine_cache_dir (TensorRT engines; "" = the
        user cache), tf32 (the CUDA EP's TensorFloat-32 matmuls; off: float32 as on the CPU): see
        core/providers.py. `session_factory` stands in for ort.InferenceSession in tests. An fp16 graph
        (card network.precision fp16, export --precision fp16) loads like any other; precision is the
        TensorRT build flag.
        """
        t0 = time.perf_counter()
        path = Path(path)
        if not isinstance(threads, int) or threads < 1:
            raise ModelError(f"threads: expected an integer >= 1, got {threads!r}")
        card = card_of_model(path, log)
        steps = _runnable_steps(path, card, steps)
        candidates, cache = provider_candidates(
            path, card, provider, precision=precision, cuda_graph=cuda_graph, device_id=device_id,
            engine_cache_dir=engine_cache_dir, tf32=tf32, log=log,
        )  # fmt: skip
        self, probe = cls._first_that_runs(
            path, card, steps, threads, candidates, provider, device_id, session_factory, tf32, log
        )
        if cache is not None and self.provider == "tensorrt":
            self.engine_cache = cache
        if self.provider != "cpu" and self.graph_kind == "denoiser":
            log(
                f"policy: a denoiser graph on {self.provider} runs {self.steps} session runs per chunk with "
                "the DDIM math on the host (2 uploads and 1 download per step); a fused graph runs the "
                "chunk in one, captured whole (export_policy --graph fused)"
            )
        self.warm_up(max(0, warmup - probe))
        self.load_time_s = time.perf_counter() - t0
        log(
            f"policy: loaded {card.name} {card.version} from {path}: {card.graph.kind} graph, K={steps}, "
            f"provider {self.describe()}, {threads} CPU thread(s), {self.load_time_s * 1000:.0f} ms"
        )
        return self

    @classmethod
    def _first_that_runs(
        cls, path: Path, card: ModelCard, steps: int, threads: int, candidates: list[Candidate],
        provider: str, device_id: int, session_factory: SessionFactory, tf32: bool,
        log: Callable[[str], None],
    ) -> tuple[Policy, int]:  # fmt: skip
        """The Policy on the first candidate whose session starts, runs on that candidate's provider and
        survives its first runs, with the number of predicts those runs took; ModelError naming every
        candidate's failure when none does (or at once for an operator even the CPU lacks)."""
        errors: list[str] = []
        skip: set[str] = set()
        for cand in candidates:
            if cand.provider in skip:
                continue
            try:
                sess = session_factory(str(path), session_options(threads, cand.provider != "cpu"),
                                       list(cand.entries))  # fmt: skip
            except Exception as e:  # ORT's Fail / EPFail / InvalidGraph derive from Exception only
                op = missing_operator(str(e))
                if op is not None and cand.provider == "cpu":  # the CPU runs every standard operator
                    raise unrunnable(path, card, op) from e
                errors.append(f"{cand.label}: {why(e)}")
                if cand.provider != "cpu":
                    log(f"policy: {cand.label} did not start: {why(e)}")
                if not (cand.cuda_graph and providers.capture_refused(why(e))):
                    skip.add(cand.provider)  # not about capture: the same EP without it fails alike
                continue
            nodes = providers.placement(sess)
            got = providers.runs_on(sess.get_providers(), nodes)
            if got != cand.provider:  # ORT dropped the EP (e.g. CUDA libraries missing) or gave it no node
                errors.append(f"{cand.label}: the session runs on {got} ({nodes_text(nodes)})")
                log(f"policy: {cand.label} not used: the session runs on {got} ({nodes_text(nodes)})")
                skip.add(cand.provider)
                continue
            self = cls._open(path, card, steps, threads, sess, cand, nodes, device_id)
            self.tf32 = tf32 and cand.provider != "cpu"
            # A GPU session's first runs are where capture happens and engines meet real inputs: run
            # them here, so a failure moves on to the next candidate instead of failing the first tick.
            # A CUDA-graph session runs here until the last run that may capture (providers.CAPTURE_RUNS).
            probe = self._probe_predicts(cand)
            try:
                self.warm_up(probe)
            except ModelError:
                raise
            except Exception as e:
                errors.append(f"{cand.label}: first runs failed: {why(e)}")
                log(f"policy: {cand.label} failed in its first runs: {why(e)}")
                continue
            return self, probe
        if provider in providers.GPU:
            raise ModelError(
                f"model {path}: provider {provider!r} requested but it did not start: {'; '.join(errors)}"
            )
        raise ModelError(f"model {path}: ONNX Runtime cannot load it: {'; '.join(errors)}")

    def _probe_predicts(self, cand: Candidate) -> int:
        """Predicts to run before a session counts as started: on a CUDA graph, up to the last run that
        may capture (providers.CAPTURE_RUNS); one on another GPU session (engines meet real inputs);
        none on the CPU."""
        if not cand.cuda_graph:
            return int(cand.provider != "cpu")
        per_predict = 1 if self.graph_kind == "fused" else self.steps  # session runs per chunk
        return -(-providers.CAPTURE_RUNS[-1] // per_predict)

    @classmethod
    def _open(
        cls, path: Path, card: ModelCard, steps: int, threads: int, sess: Any, cand: Candidate,
        nodes: dict[str, int] | None, device_id: int,
    ) -> Policy:  # fmt: skip
        """A Policy around a created session: attributes, tensor check, bound buffers (no run yet)."""
        self = object.__new__(cls)
        self.path, self.card, self.steps, self.threads = path, card, steps, threads
        self.session = sess
        self.providers = list(sess.get_providers())  # registered, in order
        self.placement = nodes  # nodes per EP as ORT placed them (None: not recorded)
        self.provider = cand.provider
        # fp16: TensorRT's build flag, or an fp16 graph (training/fp16.py) on any provider
        self.graph_precision = card.network.get("precision", "fp32")
        trt_fp16 = cand.provider == "tensorrt" and cand.precision == "fp16"
        self.precision = "fp16" if trt_fp16 or self.graph_precision == "fp16" else "fp32"
        self.tf32 = False
        self.cuda_graph = cand.cuda_graph  # checked by the first runs in load()
        self.device_id = device_id if cand.provider != "cpu" else None
        self.engine_cache: Path | None = None
        self.supports_inpainting = card.inpaints_at(steps)
        self.graph_kind = card.graph.kind
        self.batch = card.graph.batch  # histories one session run takes (predict_batch)
        self._lock = threading.Lock()
        self._rng = np.random.default_rng()
        self._runs = 0  # session runs so far (which of them may capture: providers.CAPTURE_RUNS)
        self._setup(self.graph_kind == "fused")
        self._device_thread = None
        if cand.provider != "cpu":
            self._device_thread = DeviceThread(f"policy_gpu_{card.name}")
            weakref.finalize(self, self._device_thread.release, sess, self._io, self._device)
        return self

    def describe(self) -> str:
        """What runs, in words: e.g. "tensorrt fp16, CUDA graph, GPU 0 (412 nodes on tensorrt)"."""
        graph16 = self.graph_precision == "fp16"
        if self.provider == "cpu":
            return "cpu, fp16 graph" if graph16 else "cpu"
        parts = [self.provider] + (["fp16"] if self.precision == "fp16" else [])
        text = " ".join(parts) + (" graph" if graph16 else "") + (", CUDA graph" if self.cuda_graph else "")
        if self.provider == "cuda":  # the CUDA EP's matmul mode (TensorRT decides its own)
            text += ", TF32 on" if self.tf32 else ", TF32 off"
        return f"{text}, GPU {self.device_id} ({nodes_text(self.placement)})"

    def warm_up(self, n: int = 3) -> None:
        """Run `n` predicts on the observation mean (first runs allocate and tune); raises ModelError when
        the actions are not finite. Separate from load() so a caller can run it at another priority."""
        card = self.card
        for i in range(n):
            actions = self.predict(np.broadcast_to(card.obs_mean, (card.history, card.obs_dim)), seed=i)
            if not np.all(np.isfinite(actions)):
                # A model that fails on the most ordinary input would only ever feed the safety filter
                # rejects: refuse it here, where a swap can still keep the running model.
                hint = " (or out of fp16 range: try precision fp32)" if self.precision == "fp16" else ""
                raise ModelError(
                    f"model {self.path}: non-finite actions on its warm-up input (the observation mean); "
                    f"the graph or its weights are broken{hint}"
                )

    def _setup(self, fused: bool) -> None:
        """Allocate every buffer once and bind it (host memory on CPU, device buffers on a GPU)."""
        exp_in, exp_out = expected_tensors(self.card, self.steps, fused)
        check_tensors(self.path, self.card, self.session, exp_in, exp_out)
        c, g = self.card, self.card.graph
        self._host = {r: np.zeros(s, d) for r, (s, d) in (exp_in | exp_out).items()}
        self._names = dict(g.inputs) | dict(g.outputs)
        self._io = self.session.io_binding()
        self._device: dict[str, ort.OrtValue] = {}
        on_gpu = self.provider != "cpu"
        for role, arr in self._host.items():
            name = self._names[role]
            is_out = role in exp_out
            if on_gpu:
                ov = _device_buffer(arr.shape, arr.dtype, self.device_id)
                self._device[role] = ov
                (self._io.bind_ortvalue_output if is_out else self._io.bind_ortvalue_input)(name, ov)
            elif is_out:
                self._io.bind_output(name, "cpu", 0, arr.dtype, arr.shape, arr.ctypes.data)
            else:
                self._io.bind_input(name, "cpu", 0, arr.dtype, arr.shape, arr.ctypes.data)
        self._out_role = next(iter(exp_out))
        # Inputs written since the last run: only those are uploaded (a denoiser's observation once per
        # chunk, not once per step). Every input starts dirty so the first run uploads the zeros too.
        self._dirty = {r for r in self._host if r != self._out_role}
        self._mask_clear = True  # prefix_mask is all zero (no upload needed to keep it so)
        self._run_options = ort.RunOptions()
        self._first_run_options = ort.RunOptions()  # run 1 of a CUDA-graph session: never captures
        self._first_run_options.add_run_config_entry(*providers.SKIP_CAPTURE)
        h, a = c.horizon, c.action_dim
        self._noise_shape = (self.steps + 1, h, a) if c.eta > 0 else (h, a)
        self._noise = self._host["noise"][0] if fused else np.zeros(self._noise_shape, np.float32)
        self._prefix64 = np.zeros((h, a))
        self._mask64 = np.zeros(h)
        self._center = (c.action_max + c.action_min) / 2
        self._half = (c.action_max - c.action_min) / 2
        if not fused:
            self._plan = c.diffusion.plan(self.steps, c.eta)
            self._work = ddim.StepWorkspace((h, a))
            self._tmp = np.zeros((h, a), np.float32)
            self._prefix_n = np.zeros((h, a), np.float32)
            self._m = np.zeros((h, 1), np.float32)
            self._m_inv = np.ones((h, 1), np.float32)

    # -- inference ------------------------------------------------------------------------------------
    def _run(self) -> None:
        """One session run. On a GPU: upload the changed inputs, run, download the output, through
        GPU_LOCK: exclusive for the runs that may capture (no other GPU call may meet a capture), shared
        otherwise (see GpuGate). The CPU reads host buffers."""
        if self._device:
            self._runs += 1
            capture = self.cuda_graph and self._runs in providers.CAPTURE_RUNS
            options = self._first_run_options if self.cuda_graph and self._runs == 1 else self._run_options
            with GPU_LOCK.exclusive() if capture else GPU_LOCK.shared():
                for role in self._dirty:
                    self._device[role].update_inplace(self._host[role])
                self._dirty.clear()
                self.session.run_with_iobinding(self._io, options)
                np.copyto(self._host[self._out_role], self._device[self._out_role].numpy())
        else:
            self.session.run_with_iobinding(self._io, self._run_options)

    @staticmethod
    def _array(name: str, value, shape: tuple[int, ...]) -> np.ndarray:
        try:
            arr = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise ModelError(
                f"{name}: expected a numeric array of shape {shape}, got {type(value).__name__}"
            ) from e
        if arr.shape != shape:
            raise ModelError(f"{name}: expected shape {shape}, got {arr.shape}")
        if not np.all(np.isfinite(arr)):
            bad = np.argwhere(~np.isfinite(arr))[0].tolist()
            raise ModelError(f"{name}: expected finite values, got {arr[tuple(bad)]} at index {bad}")
        return arr

    def predict(
        self,
        obs_history: np.ndarray,
        *,
        noise: np.ndarray | None = None,
        seed: int | None = None,
        prefix: np.ndarray | None = None,
        prefix_mask: np.ndarray | None = None,
    ) -> np.ndarray:
        """Action chunk (horizon, action_dim) float64 in robot units from a raw (history, obs_dim) history.

        noise: the initial noise (horizon, action_dim) — or (steps+1, horizon, action_dim) with eta > 0 —
        else drawn from `seed` or the policy's own generator. prefix (horizon, action_dim) robot units
        with prefix_mask (horizon,) in [0, 1]: rows with mask 1 are returned exactly as given (and steer
        the rest of the chunk), 0 rows are free, fractions blend. A prefix of n < horizon rows without a
        mask freezes the first n actions.
        """
        c = self.card
        h, a = c.horizon, c.action_dim
        obs = self._array("obs_history", obs_history, (c.history, c.obs_dim))
        if noise is not None and seed is not None:
            raise ModelError("noise and seed: give one or the other")
        if noise is not None:
            noise = self._array("noise", noise, self._noise_shape)
        if prefix_mask is not None and prefix is None:
            raise ModelError("prefix_mask: given without a prefix")
        if prefix is not None:
            pre = np.asarray(prefix, dtype=np.float64)
            if prefix_mask is None and pre.ndim == 2 and 1 <= pre.shape[0] <= h and pre.shape[1] == a:
                n = pre.shape[0]
                pre = np.concatenate([self._array("prefix", pre, (n, a)), np.zeros((h - n, a))])
                mask = np.concatenate([np.ones(n), np.zeros(h - n)])
            else:
                if prefix_mask is None:
                    raise ModelError(
                        f"prefix: expected shape (n <= {h}, {a}) without a mask, got {pre.shape}"
                    )
                pre = self._array("prefix", pre, (h, a))
                mask = self._array("prefix_mask", prefix_mask, (h,))
                if np.any((mask < 0) | (mask > 1)):
                    raise ModelError(
                        f"prefix_mask: expected values in [0, 1], got {mask.min()}..{mask.max()}"
                    )
        with self._lock:
            self._host["obs_history"][0] = obs
            self._dirty.add("obs_history")
            self._draw_noise(self._noise, noise, seed)
            inpaint = prefix is not None and bool(np.any(mask > 0))
            if inpaint:
                np.copyto(self._prefix64, pre)
                np.copyto(self._mask64, mask)
            run = self._predict_fused if self.graph_kind == "fused" else self._predict_denoiser
            if self._device_thread is None:
                out = run(inpaint)
            else:  # all of a GPU session's runs on its own thread (see DeviceThread)
                out = self._device_thread.call(lambda: run(inpaint))
            if inpaint:
                m = self._mask64[:, None]
                if self.graph_kind == "denoiser":  # the fused graph blends in robot units itself
                    out *= 1.0 - m
                    out += self._prefix64 * m
                # exact in float64 too (the graph is exact only to the float32 prefix it was given)
                np.copyto(out, self._prefix64, where=m == 1.0)
            return out

    def predict_batch(
        self, histories: np.ndarray, *, noise: np.ndarray | None = None,
        seeds: Sequence[int | None] | None = None,
    ) -> np.ndarray:  # fmt: skip
        """Action chunks (n, horizon, action_dim) float64 for n raw histories (n, history, obs_dim): ONE
        session run of a batch-N graph (card graph.batch N >= n; unused rows repeat row 0), or predict()
        per row on a batch-1 model. Row i is predict(histories[i], noise=noise[i] or seed=seeds[i]) (to
        float32 rounding): the same seed draws the same noise. No inpainting prefix."""
        c = self.card
        try:
            shape = np.shape(histories)
        except (TypeError, ValueError):  # ragged
            shape = None
        want = f"(n, {c.history}, {c.obs_dim}) with 1 <= n" + (f" <= {self.batch}" if self.batch > 1 else "")
        if shape is None or len(shape) != 3 or shape[0] < 1 or tuple(shape[1:]) != (c.history, c.obs_dim):
            raise ModelError(f"histories: expected shape {want}, got {shape}")
        n = shape[0]
        if n > self.batch > 1:
            raise ModelError(
                f"histories: this graph runs at most {self.batch} per run (card graph.batch "
                f"{self.batch}), got {n}; split them, or export with `export_policy --batch {n}`"
            )
        obs = self._array("histories", histories, tuple(shape))
        if seeds is not None and (noise is not None or len(seeds) != n):
            raise ModelError(f"seeds: expected {n} seeds (one per history) and no noise, got {len(seeds)}")
        if noise is not None:
            noise = self._array("noise", noise, (n, *self._noise_shape))
        if self.batch == 1:  # one code path for callers: a loop of single runs
            rows = [(None, None if seeds is None else seeds[i]) if noise is None else (noise[i], None)
                    for i in range(n)]  # fmt: skip
            return np.stack([self.predict(obs[i], noise=z, seed=k) for i, (z, k) in enumerate(rows)])
        with self._lock:
            host = self._host
            host["obs_history"][:n] = obs
            host["obs_history"][n:] = obs[0]  # padding: a real history keeps the unused rows finite
            self._dirty.add("obs_history")
            for i in range(n):
                self._draw_noise(host["noise"][i], None if noise is None else noise[i],
                                 None if seeds is None else seeds[i])  # fmt: skip
            run = lambda: self._predict_fused(False, rows=n)  # noqa: E731
            return run() if self._device_thread is None else self._device_thread.call(run)

    def _draw_noise(self, out: np.ndarray, noise: np.ndarray | None, seed: int | None) -> None:
        """`out` = the given noise, else a draw from `seed` (from the policy's own generator without one):
        predict and each row of predict_batch draw alike, so the same seed gives the same chunk."""
        if noise is not None:
            np.copyto(out, noise, casting="same_kind")
        else:
            rng = self._rng if seed is None else np.random.default_rng(seed)
            rng.standard_normal(out=out, dtype=np.float32)

    def _predict_fused(self, inpaint: bool, rows: int | None = None) -> np.ndarray:
        """One run; row 0's chunk (predict), or the first `rows` chunks (predict_batch)."""
        host = self._host
        self._dirty.add("noise")
        if inpaint:
            host["prefix"][0] = self._prefix64
            host["prefix_mask"][0] = self._mask64
            self._dirty |= {"prefix", "prefix_mask"}
            self._mask_clear = False
        elif not self._mask_clear:
            host["prefix_mask"].fill(0.0)
            self._dirty.add("prefix_mask")
            self._mask_clear = True
        self._run()
        return host["actions"][0 if rows is None else slice(rows)].astype(np.float64)

    def _predict_denoiser(self, inpaint: bool) -> np.ndarray:
        host, cfg, work = self._host, self.card.diffusion, self._work
        x, model_output, tmp = host["sample"][0], host["model_output"][0], self._tmp
        x0_noise = self._noise if self.card.eta == 0 else self._noise[0]
        np.copyto(x, x0_noise)
        if inpaint:
            np.subtract(self._prefix64, self._center, out=tmp, casting="same_kind")
            np.divide(tmp, self._half, out=self._prefix_n, casting="same_kind")
            self._m[:, 0] = self._mask64
            np.subtract(1.0, self._m, out=self._m_inv)
        for i, step in enumerate(self._plan):
            if inpaint:
                np.multiply(self._prefix_n, step.sqrt_alpha, out=tmp)
                np.multiply(x0_noise, step.sqrt_one_minus_alpha, out=work.eps)
                tmp += work.eps
                ddim.blend(x, tmp, self._m, self._m_inv, out=x, tmp=tmp)
            host["timestep"][0] = step.timestep
            self._dirty |= {"sample", "timestep"}
            self._run()
            vn = self._noise[i + 1] if self.card.eta > 0 else None
            ddim.step(x, model_output, step, cfg, variance_noise=vn, out=x, work=work)
        out = x.astype(np.float64)
        out *= self._half
        out += self._center
        return out

    def __repr__(self) -> str:
        return f"Policy({self.card.name!r}, {self.graph_kind}, K={self.steps}, provider={self.describe()!r})"


def default_threads() -> int:
    """A sensible intra-op thread count: half the cores (the control loop and ROS need the rest)."""
    return max(1, (os.cpu_count() or 2) // 2)
