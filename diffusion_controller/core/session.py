"""Making a Policy's ONNX Runtime session: its options, which providers to try (with the TensorRT engine
cache), the session factory, and reading why a session did not start.

core/providers.py knows the providers (what is installed, their options, where a session's nodes run);
this module turns one model load's request into the candidates Policy.load tries in order, ONNX
Runtime's refusals into messages that say what to do (a missing operator names the export that fits),
and checks that a session's tensors are the ones its card implies.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from diffusion_controller.core import providers
from diffusion_controller.core.card import ModelCard
from diffusion_controller.core.card_source import ModelError
from diffusion_controller.core.providers import Candidate

#: Makes a session: (model path, options, providers argument) -> an ort.InferenceSession or a stand-in.
SessionFactory = Callable[[str, ort.SessionOptions, list], Any]


def ort_session(path: str, options: ort.SessionOptions, provider_entries: list) -> ort.InferenceSession:
    """The real session, from the path (not bytes: ORT parses bytes holding the GIL, ~90 ms for a
    DiffuseLoco-size file, which would stall the control loop during a swap; from a path it releases
    it). ORT's own fallback is off: it catches only ValueError/RuntimeError (not its Fail/EPFail) and
    retries with a provider list of its choosing, so load() does the falling back itself."""
    return ort.InferenceSession(path, options, providers=provider_entries, enable_fallback=0)


def session_options(threads: int, record_placement: bool) -> ort.SessionOptions:
    """What every Policy session runs with: `threads` intra-op threads that sleep when idle, sequential
    execution, all graph optimizations; record_placement keeps which EP runs each node."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning worker threads would steal the control loop's core on a small machine.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if record_placement:  # what runs where, for the report (providers.placement)
        so.add_session_config_entry(providers.RECORD_PLACEMENT, "1")
    so.log_severity_level = 3
    return so


def why(e: BaseException) -> str:
    """The line of an ONNX Runtime error that says why (its last), or the exception's type."""
    text = str(e).strip()
    return text.splitlines()[-1] if text else type(e).__name__


#: How ONNX Runtime says it lacks an operator: unknown to it, known without a kernel here, unknown at
#: that opset. (domain:op, op, op) groups.
_MISSING_OP = re.compile(
    r"(?:(?P<dom>[\w.]+):(?P<op1>\w+)\(-?\d+\) is not a registered function/op)"
    r"|(?:Could not find an implementation for (?P<op2>\w+)\(\d+\) node)"
    r"|(?:No Op registered for (?P<op3>\w+) with domain_version)"
)


def missing_operator(error: str) -> str | None:
    """The operator an ONNX Runtime session error says this runtime cannot run, or None."""
    m = _MISSING_OP.search(error)
    if m is None:
        return None
    if m["op1"]:
        return f"{m['op1']} ({m['dom']})"
    return m["op2"] or m["op3"]


def unrunnable(path: Path, card: ModelCard, op: str) -> ModelError:
    """The refusal of a graph whose operator this runtime lacks, with the export that fits it."""
    if card.graph is not None and card.graph.ops == "ort_fused":
        fix = (
            "its card says graph.ops ort_fused (ONNX Runtime's fused com.microsoft operators); export it "
            "with `export_policy --ops standard` (ONNX opset 17 only) for this runtime"
        )
    else:
        fix = "use an ONNX Runtime that supports the graph's opset, or export at a lower --opset"
    return ModelError(
        f"model {path}: ONNX Runtime cannot load it: this ONNX Runtime ({ort.__version__}) has no {op} "
        f"operator: {fix}"
    )


def engine_cache(root: str, path: Path, device_id: int, log: Callable[[str], None]) -> Path | None:
    """The TensorRT cache directory for this model and GPU, created; None (with a log line) when it
    cannot be, so TensorRT still starts, only without reusing engines."""
    base = Path(root).expanduser() if root else providers.default_engine_cache_dir()
    try:
        cache = providers.engine_cache_path(base, path, device_id, providers.gpu_name(device_id))
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        log(f"policy: TensorRT engine cache under {base} unusable ({e}); engines are rebuilt at every start")
        return None
    return cache


def nodes_text(nodes: dict[str, int] | None) -> str:
    """Node placement in words, most nodes first: "412 nodes on tensorrt, 3 nodes on cpu"."""
    if nodes is None:
        return "node placement not recorded"
    return ", ".join(f"{n} nodes on {p}" for p, n in sorted(nodes.items(), key=lambda kv: -kv[1]))


def provider_candidates(
    path: Path, card: ModelCard, provider: str, *, precision: str, cuda_graph: bool, device_id: int,
    engine_cache_dir: str, tf32: bool, log: Callable[[str], None],
) -> tuple[list[Candidate], Path | None]:  # fmt: skip
    """The sessions to try for this model, in order, and the TensorRT engine cache they use (None: no
    TensorRT to try, or no usable cache); ModelError for a request that cannot work here."""
    problems = providers.gpu_problems() if provider != "cpu" else {}
    if card.graph.ops == "ort_fused" and problems.get("tensorrt") is None and "tensorrt" in problems:
        problems = dict(problems) | {
            "tensorrt": "TensorRT cannot run an ort_fused graph's com.microsoft operators (Attention, "
            "MultiHeadAttention, SkipLayerNormalization, BiasGelu); export with --ops standard for it"
        }
    cache = None
    if provider in ("auto", "tensorrt") and problems.get("tensorrt") is None:
        cache = engine_cache(engine_cache_dir, path, device_id, log)
    try:
        candidates, notes = providers.plan(
            provider, precision=precision, cuda_graph=cuda_graph, device_id=device_id,
            engine_cache=cache, problems=problems, tf32=tf32,
        )  # fmt: skip
    except ValueError as e:
        raise ModelError(str(e)) from e
    for note in notes:
        log(note)
    return candidates, cache


_ORT_TYPES = {np.dtype(np.float32): "tensor(float)", np.dtype(np.int64): "tensor(int64)"}


def expected_tensors(card: ModelCard, steps: int, fused: bool) -> tuple[dict, dict]:
    """role -> (shape, dtype) of every input and output the card implies (a fused graph's first axis is
    the card's graph.batch: that many histories per run)."""
    h, a = card.horizon, card.action_dim
    b = card.graph.batch if fused else 1
    f32 = np.dtype(np.float32)
    ins = {"obs_history": ((b, card.history, card.obs_dim), f32)}
    if fused:
        noise = (b, steps + 1, h, a) if card.eta > 0 else (b, h, a)
        ins |= {"noise": (noise, f32), "prefix": ((b, h, a), f32), "prefix_mask": ((b, h), f32)}
        outs = {"actions": ((b, h, a), f32)}
    else:
        ins |= {"sample": ((1, h, a), f32), "timestep": ((1,), np.dtype(np.int64))}
        outs = {"model_output": ((1, h, a), f32)}
    return ins, outs


def check_tensors(path: Path, card: ModelCard, session: Any, expected_in: dict, expected_out: dict) -> None:
    """The graph's tensors must be exactly the card's, by name, element type and shape (ModelError)."""
    g = card.graph
    problems = []
    for kind, expected, names, actual in (
        ("input", expected_in, g.inputs, session.get_inputs()),
        ("output", expected_out, g.outputs, session.get_outputs()),
    ):
        by_name = {t.name: t for t in actual}
        wanted_names = {names[r] for r in expected}
        for role, (shape, dtype) in expected.items():
            name = names[role]
            t = by_name.get(name)
            if t is None:
                problems.append(
                    f"card graph.{kind}s.{role} = {name!r} but the graph has no {kind} of that name "
                    f"(graph {kind}s: {sorted(by_name)})"
                )
                continue
            got_shape = [d if isinstance(d, int) else None for d in t.shape]
            if len(got_shape) != len(shape) or any(
                g_ is not None and g_ != w for g_, w in zip(got_shape, shape, strict=False)
            ):
                problems.append(f"{kind} {name!r} has shape {list(t.shape)}, the card implies {list(shape)}")
            if t.type != _ORT_TYPES[dtype]:
                problems.append(f"{kind} {name!r} has type {t.type}, expected {_ORT_TYPES[dtype]}")
        extra = sorted(set(by_name) - wanted_names)
        if extra and kind == "input":
            problems.append(f"graph has inputs the card does not name: {extra}")
    if problems:
        raise ModelError(f"model {path} does not match its card: " + "; ".join(problems))
