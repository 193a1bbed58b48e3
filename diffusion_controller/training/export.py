"""Checkpoint -> ONNX policy with its model card (console script `export_policy`).

Input: a checkpoint as defined in training/checkpoint.py (`save_checkpoint` / `load_checkpoint`): a
torch.save dict {"format": "diffusion_controller/checkpoint@1", "network": NetworkConfig dict,
"state_dict": weights, "card": card fields minus graph, ...extra}.

Output: `<out>.onnx` with the card in metadata_props["model_card"] and the same card as `<out>.yaml`.
Two graph forms (tensor names and shapes as in docs/DESIGN.md):

- fused: the whole K-step DDIM chain unrolled in one graph (one session run per chunk, CUDA-graph
  capturable). Inputs raw `obs_history`, `noise`, `prefix` (robot units) and `prefix_mask`; output
  `actions` in robot units. Observation normalization, overwrite-inpainting at every step and action
  denormalization are in the graph; the observation tokens and their cross-attention keys/values are
  computed once per chunk, and the timestep tokens are constants folded at export.
- denoiser: one network evaluation (`obs_history`, normalized `sample`, int64 `timestep`) ->
  `model_output`, so that the runtime can choose K.

Both forms follow the card's `diffusion.timestep_spacing` (which K timesteps DDIM visits; the fused
graph bakes that plan's coefficients, the runtime's loop reads the card). A checkpoint's card keeps what
training wrote (no field: "leading"); the export decides: `export_policy --timestep-spacing` defaults to
"trailing", which starts at t = T-1, the noise level the sample really has. With "leading" and T=100,
K=1 starts at t=0 and K=2 at t=50 (Lin et al. 2024), which is why few steps looked hopeless.
`export_onnx(timestep_spacing=None)` keeps the card's.

Every export is checked with onnx.checker and compared with the torch module on random inputs (max abs
difference must be <= 1e-4) before the files are written in place.

`weights="int8"` then quantizes the checked graph's matrix weights (ONNX Runtime dynamic quantization,
per output channel; activations are quantized to uint8 per call). The model may run on another CPU than
the one exporting it, so the default form is one whose kernels cannot saturate on any CPU: `int8_form`
u8u8 (uint8 weights). u8s7 (int8 weights limited to 7 bits, ORT's reduce_range) cannot saturate either
and is as fast as u8s8 but with coarser weights. u8s8 (full int8 weights, what exports made before the
card named the form) saturates in ORT's x86 kernels without VNNI: on an emulated AVX2-only CPU (qemu -cpu
Haswell) the bench's DiffuseLoco-size fused graph moved by 0.35 / 0.79 / 1.02 at K=2 / 5 / 10 (range 2;
0.03 / 0.07 / 0.14 with VNNI), the shipped model by 0.21 rad (0.014 with VNNI); the loader refuses u8s8
on such a CPU. u8u8 moved them by 0.027 / 0.061 / 0.132 and 0.0074 rad on both CPUs, u8s7 by 0.043 /
0.125 / 0.221 and 0.023. Speed on this project's 2-core AMD EPYC VM with AVX-512 VNNI (one thread, p50):
DiffuseLoco-size K=5 fp32 16.3 ms, u8s8 7.7, u8s7 7.6, u8u8 10.9 ms; the shipped 3x96 model K=5 2.71 /
2.05 / 1.93 / 2.12 ms. The card's network section records the form and the largest output difference from
the float model (which the float graph matches within 1e-4) on the check inputs; an int8 graph that moves
the output by more than 10% of its range is refused with the reason.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import math
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from diffusion_controller.core.card import ModelCard
from diffusion_controller.core.card_schema import GRAPH_INPUTS, GRAPH_OPS, GRAPH_OUTPUTS, GraphSpec
from diffusion_controller.core.card_source import card_of_model, sidecar_path
from diffusion_controller.core.ddim import TIMESTEP_SPACINGS
from diffusion_controller.core.runtime import INT8_FORMS, u8s8_problem
from diffusion_controller.training import ddim_torch
from diffusion_controller.training.checkpoint import check_card_fits, load_checkpoint
from diffusion_controller.training.fused_graph import build_fused
from diffusion_controller.training.network import DiffusionTransformer

OPSET = 17
PARITY_TOL = 1e-4
WEIGHTS = ("fp32", "int8")
#: Graph precisions (card network.precision; fp16: training/fp16.py).
PRECISIONS = ("fp32", "fp16")
#: Default int8 form: no saturation on any CPU (runtime.INT8_FORMS says what each form is).
INT8_FORM = "u8u8"
#: What a new export's timesteps are unless asked otherwise (export_policy --timestep-spacing).
TIMESTEP_SPACING = "trailing"
#: An int8 graph whose actions move more than this fraction of the action range from the float graph's
#: is refused: the quantization broke the model rather than rounding it.
INT8_MAX_RANGE_FRACTION = 0.1
#: The same bound for an fp16 graph (rounding to 11 significant bits moves actions by ~1e-3).
FP16_MAX_RANGE_FRACTION = 0.02


class _Normalizer(nn.Module):
    """Observation standardization and action [-1, 1] <-> robot-unit mapping from the card."""

    def __init__(self, card: ModelCard) -> None:
        super().__init__()
        f32 = torch.float32
        self.register_buffer("obs_mean", torch.tensor(card.obs_mean, dtype=f32))
        self.register_buffer("obs_std", torch.tensor(card.obs_std, dtype=f32))
        lo, hi = card.action_min, card.action_max
        self.register_buffer("act_center", torch.tensor((hi + lo) / 2, dtype=f32))
        self.register_buffer("act_half", torch.tensor((hi - lo) / 2, dtype=f32))

    def obs(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.obs_mean) / self.obs_std


class FusedPolicy(nn.Module):
    """forward(obs_history, noise, prefix, prefix_mask) -> actions (robot units), K steps unrolled."""

    def __init__(self, network: DiffusionTransformer, card: ModelCard, steps: int, eta: float) -> None:
        super().__init__()
        self.net, self.norm = network, _Normalizer(card)
        self.config = card.diffusion
        self.plan = card.diffusion.plan(steps, eta)
        self.eta = eta

    def forward(self, obs_history, noise, prefix, prefix_mask):
        net, norm = self.net, self.norm
        cond_kv = net.memory_kv(net.cond_tokens(norm.obs(obs_history)))
        prefix_n = (prefix - norm.act_center) / norm.act_half
        if self.eta > 0:
            x_T, variance_noise = noise[:, 0], noise[:, 1:]
        else:
            x_T, variance_noise = noise, None

        def denoise(x, c):
            t = torch.full((x.shape[0],), c.timestep, dtype=torch.int64)
            return net.decode(x, net.join_kv(net.memory_kv(net.time_token(t)), cond_kv))

        x = ddim_torch.sample_loop(
            denoise,
            x_T,
            self.plan,
            self.config,
            prefix=prefix_n,
            mask=prefix_mask,
            variance_noise=variance_noise,
            final_blend=False,
        )
        actions = x * norm.act_half + norm.act_center
        m = prefix_mask.unsqueeze(-1)
        return ddim_torch.blend(actions, prefix, m, 1.0 - m)


class DenoiserPolicy(nn.Module):
    """forward(obs_history, sample, timestep) -> model_output; one network call, K chosen at run time."""

    def __init__(self, network: DiffusionTransformer, card: ModelCard) -> None:
        super().__init__()
        self.net, self.norm = network, _Normalizer(card)

    def forward(self, obs_history, sample, timestep):
        return self.net(sample, timestep, self.norm.obs(obs_history))


def example_inputs(
    card: ModelCard, graph: str, steps: int, eta: float, seed: int = 0, batch: int = 1
) -> dict[str, np.ndarray]:
    """Random but plausible inputs by logical role (obs near the normalization mean, a 2-row prefix),
    `batch` rows each."""
    rng = np.random.default_rng(seed)
    h, a, b = card.horizon, card.action_dim, batch
    obs = card.obs_mean + card.obs_std * rng.standard_normal((b, card.history, card.obs_dim))
    inputs = {"obs_history": obs.astype(np.float32)}
    if graph == "fused":
        shape = (b, steps + 1, h, a) if eta > 0 else (b, h, a)
        lo, hi = card.action_min, card.action_max
        mask = np.zeros((b, h), np.float32)
        mask[:, : min(2, h)] = 1.0
        inputs |= {
            "noise": rng.standard_normal(shape).astype(np.float32),
            "prefix": (lo + (hi - lo) * rng.random((b, h, a))).astype(np.float32),
            "prefix_mask": mask,
        }
    else:
        inputs |= {
            "sample": rng.standard_normal((1, h, a)).astype(np.float32),
            "timestep": np.array([card.diffusion.timesteps(steps)[0]], np.int64),
        }
    return inputs


def _file_mode() -> int:
    """The mode an ordinary new file gets under this process's umask (0644 under the usual 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


class _Check(NamedTuple):
    """What an exported graph is checked against: example inputs (by role), the graph's input roles in
    order, torch's output for them, and the graph kind."""

    inputs: dict[str, np.ndarray]
    in_names: tuple[str, ...]
    expected: np.ndarray
    graph: str


def export_onnx(
    network: DiffusionTransformer,
    card: ModelCard,
    out_path: str | Path,
    *,
    graph: str = "fused",
    steps: int | None = None,
    eta: float | None = None,
    opset: int = OPSET,
    verify: bool = True,
    weights: str = "fp32",
    int8_form: str = INT8_FORM,
    timestep_spacing: str | None = None,
    ops: str | None = None,
    precision: str = "fp32",
    batch: int = 1,
) -> Path:
    """Export `network` with `card` (graph section ignored) to out_path (.onnx) and its .yaml card.

    timestep_spacing: the card's diffusion.timestep_spacing for this export (None keeps the card's).
    ops: the card's graph.ops (None: ort_fused for a fused graph, standard for a denoiser); ort_fused is
    built by training/fused_graph.py, standard by torch.onnx.export at `opset`.
    precision fp16: the checked float32 graph converted to fp16 (training/fp16.py), checked again.
    batch: a fused graph taking `batch` histories and noise draws per run, returning as many chunks
    (card graph.batch; a denoiser graph is batch 1).
    """
    import onnx

    ops = _checked_options(graph, weights, ops, opset, int8_form, precision)
    counted = isinstance(batch, int) and not isinstance(batch, bool) and batch >= 1
    if not counted or (graph != "fused" and batch != 1):
        raise ValueError(f"batch: expected an integer >= 1 (a denoiser graph: 1), got {batch!r} ({graph})")
    card = _export_card(network, card, graph, steps, eta, ops, weights, timestep_spacing)
    card = card.replace(graph=dataclasses.replace(card.graph, batch=batch))
    steps, eta = card.steps, card.eta
    in_names, out_names = GRAPH_INPUTS[graph], GRAPH_OUTPUTS[graph]

    module = FusedPolicy(network, card, steps, eta) if graph == "fused" else DenoiserPolicy(network, card)
    module.eval()  # the exporter restores the module's mode afterwards: it must be eval (no dropout)
    inputs = example_inputs(card, graph, steps, eta, batch=batch)
    args = tuple(torch.from_numpy(inputs[r]) for r in in_names)
    with torch.no_grad():
        expected = module(*args).numpy()
    if ops == "ort_fused":
        model = build_fused(network, card, card.diffusion.plan(steps, eta), eta, batch)
    else:
        model = _torch_export(module, args, in_names, out_names, opset)
    model.producer_name = "diffusion_controller.export"
    sampler = f"DDIM K={steps} ({card.diffusion.timestep_spacing}), eta={eta}"
    model.doc_string = f"{card.name} {card.version}: {graph} graph, {ops} ops, {sampler}" + (
        f", batch {batch}" if batch > 1 else ""
    )
    onnx.checker.check_model(model, full_check=True)

    out_path = Path(out_path)
    check = _Check(inputs, in_names, expected, graph)
    data = model.SerializeToString()
    card = _write_checked(data, out_path, card, check, verify, weights, int8_form, precision)
    card.to_yaml(sidecar_path(out_path))
    return out_path


def _checked_options(
    graph: str, weights: str, ops: str | None, opset: int, int8_form: str, precision: str
) -> str:
    """The export's graph ops (`ops`, or the graph's default) once every option is known and they combine."""
    if graph not in GRAPH_INPUTS:
        raise ValueError(f"graph: expected one of {list(GRAPH_INPUTS)}, got {graph!r}")
    if weights not in WEIGHTS:
        raise ValueError(f"weights: expected one of {list(WEIGHTS)}, got {weights!r}")
    ops = ops or ("ort_fused" if graph == "fused" else "standard")
    if ops not in GRAPH_OPS:
        raise ValueError(f"ops: expected one of {list(GRAPH_OPS)}, got {ops!r}")
    if ops == "ort_fused" and graph != "fused":
        raise ValueError("ops: ort_fused is built for the fused graph only; a denoiser is exported standard")
    if ops == "ort_fused" and opset != OPSET:
        raise ValueError(f"opset: the ort_fused graph is built at opset {OPSET}; got {opset}")
    if int8_form not in INT8_FORMS:
        raise ValueError(f"int8_form: expected one of {list(INT8_FORMS)}, got {int8_form!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {list(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and weights != "fp32":
        raise ValueError(f"precision fp16 converts fp32 weights; weights {weights!r} cannot be combined")
    return ops


def _export_card(
    network: DiffusionTransformer, card: ModelCard, graph: str, steps: int | None, eta: float | None,
    ops: str, weights: str, timestep_spacing: str | None,
) -> ModelCard:  # fmt: skip
    """The exported model's card: `card` with the sampler (K, eta, spacing), graph and network sections of
    this export, after checking that it fits the network and that K and eta are valid."""
    if timestep_spacing is not None:  # card.replace validates it (CardError, a ValueError)
        card = card.replace(diffusion=dataclasses.replace(card.diffusion, timestep_spacing=timestep_spacing))
    check_card_fits(card, network.cfg)
    steps = card.steps if steps is None else int(steps)
    eta = card.eta if eta is None else float(eta)
    card.diffusion.check_steps(steps)
    if not (eta >= 0 and math.isfinite(eta)):
        raise ValueError(f"eta: expected a finite value >= 0, got {eta}")
    in_names, out_names = GRAPH_INPUTS[graph], GRAPH_OUTPUTS[graph]
    spec = GraphSpec(graph, {r: r for r in in_names}, {r: r for r in out_names}, ops)
    info = dict(card.network) | {
        "architecture": "diffusion_transformer",
        "layers": network.cfg.layers,
        "heads": network.cfg.heads,
        "width": network.cfg.width,
        "parameters": network.parameter_count(),
        "weights": weights,
    }
    # K=1 at t=T-1 never sees an inpainting prefix above the noise: such a card says it cannot be steered.
    inpainting = card.inpaints_at(steps)
    return card.replace(steps=steps, eta=eta, graph=spec, network=info, sampler_inpainting=inpainting)


def _write_checked(
    data: bytes, out_path: Path, card: ModelCard, check: _Check, verify: bool, weights: str, int8_form: str,
    precision: str,
) -> ModelCard:  # fmt: skip
    """Write the graph `data` with `card` to `out_path` through a temporary file in its folder: checked
    against torch (always for int8), quantized or converted to fp16 as asked; returns the final card."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out_path.parent, suffix=".onnx", delete=False) as tmp:
        tmp.write(data)
    tmp_path = Path(tmp.name)
    inputs, in_names, expected, graph = check
    try:
        tmp_path.chmod(_file_mode())  # a temporary file is owner-only; a model is read by the robot's user
        card.to_onnx(tmp_path)
        if verify or weights == "int8":
            diff = _ort_parity(tmp_path, inputs, in_names, expected)
            if not diff <= PARITY_TOL:
                raise RuntimeError(f"ONNX Runtime output differs from torch by {diff:.3g} (> {PARITY_TOL})")
        if weights == "int8":
            card = _quantize_int8(tmp_path, card, inputs, in_names, expected, graph, int8_form)
        if precision == "fp16":
            card = _convert_fp16(tmp_path, card, inputs, in_names, expected, graph)
        tmp_path.replace(out_path)
    finally:
        tmp_path.unlink(missing_ok=True)
    return card


def _torch_export(module: nn.Module, args: tuple, in_names, out_names, opset: int) -> Any:
    """The module traced by torch.onnx.export (graph ops standard)."""
    import onnx

    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # The legacy exporter is deprecated upstream but is the one that needs no onnxscript.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            module,
            args,
            buf,
            input_names=list(in_names),
            output_names=list(out_names),
            opset_version=opset,
            dynamo=False,
            do_constant_folding=True,
        )
    return _inline_weight_identities(onnx.load_from_string(buf.getvalue()))


def _inline_weight_identities(model: Any) -> Any:
    """Point the consumers of `Identity(initializer)` at the initializer itself.

    The exporter shares a weight used by the K unrolled steps through Identity nodes; ONNX Runtime folds
    them away at load, but the int8 quantizer only recognises MatMul weights that are initializers, and
    would quantize the first step alone."""
    inits = {i.name for i in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}
    alias: dict[str, str] = {}
    kept = []
    for node in model.graph.node:
        if node.op_type == "Identity" and node.input[0] in inits and node.output[0] not in outputs:
            alias[node.output[0]] = node.input[0]
        else:
            kept.append(node)
    for node in kept:
        for i, name in enumerate(node.input):
            node.input[i] = alias.get(name, name)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return model


def _ort_parity(path: Path, inputs: dict[str, np.ndarray], names, expected: np.ndarray) -> float:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3  # an fp16 graph's "cannot constant fold" notes are not errors
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    got = sess.run(None, {n: inputs[n] for n in names})[0]
    return float(np.max(np.abs(got - expected)))


def _quantize_int8(
    path: Path,
    card: ModelCard,
    inputs: dict[str, np.ndarray],
    names,
    expected: np.ndarray,
    graph: str,
    form: str = INT8_FORM,
) -> ModelCard:
    """Replace the checked float graph at `path` by its int8-weight version; returns the card it carries
    (network.int8_form, and int8_max_abs_diff: largest output difference from the float model on the
    check inputs)."""
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic

    options = {
        "u8u8": {"weight_type": QuantType.QUInt8},
        "u8s7": {"weight_type": QuantType.QInt8, "reduce_range": True},
        "u8s8": {"weight_type": QuantType.QInt8},
    }[form]
    q_path = path.with_name(path.stem + "_int8.onnx")
    try:
        # onnx's shape inference gives no type to the outputs of ONNX Runtime's com.microsoft operators
        # (graph ops ort_fused): every tensor here is float32.
        extra = {"DefaultTensorType": TensorProto.FLOAT}
        quantize_dynamic(path, q_path, per_channel=True, extra_options=extra, **options)
        diff = _ort_parity(q_path, inputs, names, expected)
        # Fused graphs output robot units; a denoiser outputs the normalized model prediction (~N(0, 1)).
        span = float(np.max(card.action_max - card.action_min)) if graph == "fused" else 2.0
        if not diff <= INT8_MAX_RANGE_FRACTION * span:
            if form == "u8s8":  # (flags from /proc/cpuinfo: under an emulator they are the host's)
                problem = u8s8_problem()
                here = f" ({problem})" if problem else ""
                why = f"form u8s8 saturates in ONNX Runtime's x86 kernels without VNNI{here}; u8u8 does not"
            else:
                why = f"this model's weights do not survive 8-bit rounding (form {form}); keep fp32 weights"
            raise RuntimeError(
                f"int8 weights move the output by {diff:.3g} (> {INT8_MAX_RANGE_FRACTION:.0%} of its range "
                f"{span:.3g}): not exported, because {why}"
            )
        info = dict(card.network) | {"int8_form": form, "int8_max_abs_diff": round(diff, 6)}
        card = card.replace(network=info)
        card.to_onnx(q_path)
        q_path.replace(path)
    finally:
        q_path.unlink(missing_ok=True)
    return card


def _convert_fp16(
    path: Path, card: ModelCard, inputs: dict[str, np.ndarray], names, expected: np.ndarray, graph: str
) -> ModelCard:
    """Replace the float32 graph at `path` by its fp16 version; returns the card it carries
    (network.precision fp16, fp16_max_abs_diff: largest output difference on the check inputs)."""
    import onnx

    from diffusion_controller.training import fp16

    why = fp16.available()
    if why is not None:
        raise RuntimeError(f"precision fp16: {why}")
    onnx.save(fp16.to_fp16(onnx.load(str(path))), str(path))
    diff = _ort_parity(path, inputs, names, expected)
    span = float(np.max(card.action_max - card.action_min)) if graph == "fused" else 2.0
    if not diff <= FP16_MAX_RANGE_FRACTION * span:
        raise RuntimeError(
            f"fp16 moves the output by {diff:.3g} (> {FP16_MAX_RANGE_FRACTION:.0%} of its range {span:.3g}): "
            "not exported; keep precision fp32"
        )
    info = dict(card.network) | {"precision": "fp16", "fp16_max_abs_diff": round(diff, 6)}
    card = card.replace(network=info)
    card.to_onnx(path)
    return card


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="export_policy", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, help="checkpoint written by training.checkpoint.save_checkpoint")
    p.add_argument("out", type=Path, help="output .onnx path (the card goes beside it as .yaml)")
    p.add_argument("--graph", choices=list(GRAPH_INPUTS), default="fused")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps K (default: the checkpoint card's)")
    p.add_argument("--eta", type=float, default=None, help="DDIM eta (default: the checkpoint card's)")
    p.add_argument("--name", default=None, help="card name override ([a-z0-9_]+)")
    p.add_argument("--version", default=None, help="card version override")
    p.add_argument(
        "--ops", choices=GRAPH_OPS, default=None,
        help="fused graph: ort_fused (default; ONNX Runtime's fused attention and normalization kernels, "
        "~80 nodes per denoising step, what a GPU needs) or standard (ONNX opset 17 only, ~450 nodes per "
        "step: TensorRT, older or other runtimes); a denoiser is always standard",
    )  # fmt: skip
    p.add_argument("--opset", type=int, default=OPSET, help="ONNX opset of a standard graph")
    p.add_argument("--batch", type=int, default=1, help="fused graph: histories per run (card graph.batch; "
                   "one policy node serving several robots runs their due requests in one run)")
    p.add_argument("--no-verify", action="store_true", help="skip the torch vs ONNX Runtime parity check")
    p.add_argument(
        "--timestep-spacing",
        choices=TIMESTEP_SPACINGS,
        default=TIMESTEP_SPACING,
        help="which K timesteps DDIM visits, as diffusers' option (default trailing: starts at t=T-1, the "
        "noise level the sample has; a checkpoint's card means leading, which with T=100 starts K=1 at t=0 "
        "and K=2 at t=50); written to the card's diffusion.timestep_spacing",
    )
    p.add_argument(
        "--weights",
        choices=WEIGHTS,
        default="fp32",
        help="int8: per-channel 8-bit matrix weights (faster on CPU; changes numerics, recorded in the card)",
    )
    p.add_argument(
        "--int8-form", choices=INT8_FORMS, default=INT8_FORM,
        help="with --weights int8: u8u8 (uint8 weights, saturates on no CPU; default), u8s7 (7-bit int8 "
        "weights, saturates nowhere, coarser), u8s8 (int8 weights: saturates on x86 CPUs without VNNI, "
        "where the loader refuses it)",
    )  # fmt: skip
    p.add_argument(
        "--precision", choices=PRECISIONS, default="fp32",
        help="fp16: weights and compute in half precision, inputs and outputs float32 (for the cuda "
        "provider; checked against the float32 graph, written to the card's network.precision)",
    )  # fmt: skip
    a = p.parse_args(argv)
    if a.out.suffix != ".onnx":
        p.error(f"out: expected a path ending in .onnx, got {a.out}")
    try:
        ckpt = load_checkpoint(a.checkpoint)
        card = ckpt.card
        changes = {k: v for k, v in (("name", a.name), ("version", a.version)) if v is not None}
        if changes:
            card = card.replace(**changes)
        out = export_onnx(
            ckpt.network,
            card,
            a.out,
            graph=a.graph,
            steps=a.steps,
            eta=a.eta,
            opset=a.opset,
            verify=not a.no_verify,
            weights=a.weights,
            int8_form=a.int8_form,
            timestep_spacing=a.timestep_spacing,
            ops=a.ops,
            precision=a.precision,
            batch=a.batch,
        )
    except (ValueError, RuntimeError) as e:
        print(f"export_policy: error: {e}", file=sys.stderr)
        return 1
    card = card_of_model(out)
    note = ""
    if a.weights == "int8":
        net = card.network
        form, diff = net.get("int8_form"), net.get("int8_max_abs_diff")
        note = f", int8 weights ({form}): max output change {diff} on the check inputs"
    if a.precision == "fp16":
        note += f", fp16: max output change {card.network.get('fp16_max_abs_diff')}"
    what = f"{a.graph} graph, {card.graph.ops} ops, batch {card.graph.batch}, {a.timestep_spacing} timesteps"
    what += note
    print(f"wrote {out} and {sidecar_path(out)} ({what})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
