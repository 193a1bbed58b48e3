"""The fused K-step DDIM graph built node by node from the network's weights (graph ops `ort_fused`).

Why not torch.onnx.export: the traced graph spends ~450 nodes on each denoising step (per-head
Reshape/Transpose chains, attention as MatMul + Softmax + MatMul, separate bias Adds, the sampler's
arithmetic as written), and a GPU replays a captured graph at ~2 us a kernel, so the GPU waited on
launches rather than on arithmetic. Here every layer of every step is 11 nodes of ONNX Runtime's fused
kernels (com.microsoft domain, CPU and CUDA):

    Attention (self: QKV projection, bias and causal attention in one node) -> MatMul (out) ->
    SkipLayerNormalization (bias + residual + norm2) -> MatMul (q) -> MultiHeadAttention (cross, q bias)
    -> MatMul (out) -> SkipLayerNormalization -> MatMul -> BiasGelu -> MatMul -> SkipLayerNormalization
    (the next layer's norm1, or the final norm)

plus 2 nodes for the action embedding, 2 for the head and 6-8 for the DDIM step with its coefficients
folded into constants: about 80 per step against 452. Static shapes, batch B fixed at export (1, or
`export_policy --batch B`: B histories and noise draws in, B chunks out, the same nodes per step): no
Shape, Gather or Concat runs per step. Work that does not depend on the step is hoisted and done once
per chunk: observation normalization and tokens, the encoder, every layer's cross-attention keys/values
for every step (the timestep token's keys/values are constants computed here; one Concat and one Split
make them all), and the inpainting targets of every step.

The arithmetic is the torch module's (`export.FusedPolicy`): the export compares both on random inputs
and refuses a graph that differs by more than 1e-4. Only ONNX Runtime runs these operators; the card says
`graph.ops: ort_fused` and the loader names the operator a runtime lacks (export `--ops standard` for
TensorRT or another runtime).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from diffusion_controller.core.card import ModelCard
from diffusion_controller.core.ddim import DDIMConfig, StepCoefficients
from diffusion_controller.training.network import DiffusionTransformer

OPSET = 17
MS = "com.microsoft"
LN_EPS = 1e-5


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().numpy().copy()


class _Graph:
    """Collects nodes and float32 initializers with unique names."""

    def __init__(self) -> None:
        from onnx import helper

        self.helper = helper
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self._consts: dict[tuple, str] = {}
        self._n = 0

    def name(self, stem: str) -> str:
        self._n += 1
        return f"{stem}_{self._n}"

    def const(self, stem: str, value: np.ndarray, dtype: Any = np.float32) -> str:
        """An initializer; the same stem and value asked again (every step's clip bounds, the action
        scaling of the inpainting and of the output) is the same initializer."""
        from onnx import numpy_helper

        arr = np.ascontiguousarray(value, dtype=dtype)
        key = (stem, arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.name(stem)
            self.inits.append(numpy_helper.from_array(arr, self._consts[key]))
        return self._consts[key]

    def node(self, op: str, inputs: list[str], n_out: int = 1, domain: str = "", **attrs: Any) -> list[str]:
        outs = [self.name(op.lower()) for _ in range(n_out)]
        self.nodes.append(self.helper.make_node(op, inputs, outs, name=self.name(op), domain=domain, **attrs))
        return outs

    def op(self, op: str, *inputs: str, domain: str = "", **attrs: Any) -> str:
        return self.node(op, list(inputs), 1, domain, **attrs)[0]

    def linear(self, x: str, layer: torch.nn.Linear, stem: str) -> str:
        """x W^T + b (MatMul, Add)."""
        y = self.op("MatMul", x, self.const(f"{stem}.w", _np(layer.weight).T))
        return self.op("Add", y, self.const(f"{stem}.b", _np(layer.bias)))

    def shape(self, *dims: int) -> str:
        return self.const("shape", np.array(dims), np.int64)

    def skip_norm(self, x: str, skip: str, norm: torch.nn.LayerNorm, bias: torch.Tensor | None, stem: str):
        """(norm(x + skip + bias), x + skip + bias) in one SkipLayerNormalization node."""
        gamma, beta = (
            self.const(f"{stem}.gamma", _np(norm.weight)),
            self.const(f"{stem}.beta", _np(norm.bias)),
        )
        ins = [x, skip, gamma, beta]
        if bias is not None:
            ins.append(self.const(f"{stem}.bias", _np(bias)))
        y, _, _, s = self.node("SkipLayerNormalization", ins, 4, MS, epsilon=LN_EPS)
        return y, s


def _step_nodes(
    g: _Graph, x: str, model_output: str, c: StepCoefficients, config: DDIMConfig, vn: str | None
) -> str:
    """One DDIM step x_t -> x_prev with the coefficients folded (core.ddim.step's arithmetic)."""
    lim = float(config.clip_sample_range)
    clip_bounds = [g.const("clip.lo", np.array(-lim)), g.const("clip.hi", np.array(lim))]

    def scaled(t: str, k: float, stem: str) -> str:
        return t if k == 1.0 else g.op("Mul", t, g.const(stem, np.array(k)))

    if config.prediction_type == "sample":
        x0_raw = model_output
        x0 = g.op("Clip", x0_raw, *clip_bounds) if config.clip_sample else x0_raw
        # eps = (x - sqrt_a x0_raw) / sqrt_1ma, so
        # out = x0 sqrt_a_prev + x dir / sqrt_1ma - x0_raw sqrt_a dir / sqrt_1ma
        out = scaled(x0, c.sqrt_alpha_prev, "sqrt_alpha_prev")
        if c.direction != 0.0:
            k = c.direction / c.sqrt_one_minus_alpha
            out = g.op("Add", out, g.op("Mul", x, g.const("dir_x", np.array(k))))
            out = g.op("Sub", out, g.op("Mul", x0_raw, g.const("dir_x0", np.array(k * c.sqrt_alpha))))
    elif config.prediction_type == "epsilon":
        eps = model_output
        x0 = g.op(
            "Add",
            g.op("Mul", x, g.const("inv_sqrt_alpha", np.array(1.0 / c.sqrt_alpha))),
            g.op("Mul", eps, g.const("eps_x0", np.array(-c.sqrt_one_minus_alpha / c.sqrt_alpha))),
        )
        if config.clip_sample:
            x0 = g.op("Clip", x0, *clip_bounds)
        out = scaled(x0, c.sqrt_alpha_prev, "sqrt_alpha_prev")
        if c.direction != 0.0:
            out = g.op("Add", out, g.op("Mul", eps, g.const("dir", np.array(c.direction))))
    else:
        raise ValueError(f"prediction_type: unknown {config.prediction_type!r}")
    if c.std > 0.0:
        if vn is None:
            raise ValueError("variance noise: expected a tensor when eta > 0")
        out = g.op("Add", out, g.op("Mul", vn, g.const("std", np.array(c.std))))
    return out


def _cond_memory(g: _Graph, net: DiffusionTransformer, card: ModelCard, plan, batch: int) -> list[str]:
    """Once per chunk: every step's and layer's cross-attention keys and values, [B, C, D] each, ordered
    (step, layer, k|v). The observation tokens' part is computed once; the timestep token's is a constant
    per step (repeated for each of the B rows), prepended as `DiffusionTransformer.join_kv` does."""
    cfg, b = net.cfg, batch
    d, n_layers, k_steps, c_obs = cfg.width, cfg.layers, len(plan), cfg.cond_tokens - 1
    obs = g.op(
        "Div",
        g.op("Sub", "obs_history", g.const("obs_mean", card.obs_mean)),
        g.const("obs_std", card.obs_std),
    )
    w_tok = _np(net.obs_emb.weight).T
    b_tok = _np(net.obs_emb.bias)[None, :]
    if cfg.command_slice is not None:  # [obs | cmd] per row, interleaved into tokens by the Reshape
        lo, hi = cfg.command_slice
        w_cmd = np.zeros((cfg.obs_dim, d), np.float32)
        w_cmd[lo:hi] = _np(net.cmd_emb.weight).T
        w_tok = np.concatenate([w_tok, w_cmd], axis=1)
        b_tok = np.stack([_np(net.obs_emb.bias), _np(net.cmd_emb.bias)])
    tok = g.op("Reshape", g.op("MatMul", obs, g.const("obs_emb.w", w_tok)), g.shape(b, c_obs, d))
    tok_bias = np.tile(b_tok, (cfg.history, 1)) + _np(net.cond_pos_emb[0, 1:])
    e = g.linear(g.op("Add", tok, g.const("obs_emb.b+pos", tok_bias)), net.encoder[0], "enc0")
    e = g.op("Mul", e, g.op("Tanh", g.op("Softplus", e)))  # Mish (an ONNX op from opset 18 only)
    cond = g.linear(e, net.encoder[2], "enc2")

    kv_layers = [layer.cross_attn.kv for layer in net.layers]
    w_kv = np.concatenate([_np(m.weight).T for m in kv_layers], axis=1)  # [D, L*2D]: k_0 v_0 k_1 v_1 ...
    b_kv = np.concatenate([_np(m.bias) for m in kv_layers])
    kv = g.op("Add", g.op("MatMul", cond, g.const("cross_kv.w", w_kv)), g.const("cross_kv.b", b_kv))
    # [B, C_obs, 2L, D] -> [2L, B, C_obs, D] -> every step's copy [K, 2L, B, C_obs, D]
    kv = g.op("Transpose", g.op("Reshape", kv, g.shape(b, c_obs, 2 * n_layers, d)), perm=[2, 0, 1, 3])
    kv = g.op("Expand", kv, g.shape(k_steps, 2 * n_layers, b, c_obs, d))
    time_kv = np.zeros((k_steps, 2 * n_layers, 1, 1, d), np.float32)
    for i, c in enumerate(plan):
        tt = net.time_token(torch.full((1,), c.timestep, dtype=torch.int64))
        for j, m in enumerate(kv_layers):
            time_kv[i, 2 * j : 2 * j + 2, 0, 0] = _np(m(tt)[0, 0]).reshape(2, d)
    time_kv = np.repeat(time_kv, b, axis=2)
    kv = g.op("Concat", g.const("time_kv", time_kv), kv, axis=3)
    # (step, layer, k|v) blocks of B rows: an even Split gives each its [B, C, D]
    kv = g.op("Reshape", kv, g.shape(k_steps * 2 * n_layers * b, cfg.cond_tokens, d))
    return g.node("Split", [kv], k_steps * 2 * n_layers, axis=0)


def _inpainting(g: _Graph, card: ModelCard, plan, eta: float, batch: int):
    """Once per chunk: the mask, its complement, x_T, the variance noise per step, and every step's
    overwrite target (prefix sqrt_a + noise sqrt_1ma) * mask as `ddim_torch.sample_loop` blends it,
    [B, H, A] each."""
    h, a, k_steps, b = card.horizon, card.action_dim, len(plan), batch
    center, half = (card.action_max + card.action_min) / 2, (card.action_max - card.action_min) / 2
    prefix_n = g.op("Div", g.op("Sub", "prefix", g.const("act_center", center)), g.const("act_half", half))
    m = g.op("Unsqueeze", "prefix_mask", g.const("axes", np.array([-1]), np.int64))
    m_inv = g.op("Sub", g.const("one", np.array(1.0)), m)
    x_t = "noise"
    vns: list[str | None] = [None] * k_steps
    if eta > 0:
        parts = g.node("Split", ["noise"], k_steps + 1, axis=1)  # [B, 1, H, A] each
        parts = [g.op("Reshape", p, g.shape(b, h, a)) for p in parts]
        x_t, vns = parts[0], parts[1:]
    per_step = (k_steps, 1, 1) if b == 1 else (k_steps, 1, 1, 1)  # [K, H, A] or [K, B, H, A]
    sa = np.array([c.sqrt_alpha for c in plan]).reshape(per_step)
    s1ma = np.array([c.sqrt_one_minus_alpha for c in plan]).reshape(per_step)
    noised = g.op(
        "Add", g.op("Mul", prefix_n, g.const("sqrt_alpha", sa)), g.op("Mul", x_t, g.const("sqrt_1ma", s1ma))
    )
    target = g.op("Mul", noised, m)
    if b > 1:  # [K, B, H, A] -> [K*B, H, A]: an even Split gives each step its [B, H, A]
        target = g.op("Reshape", target, g.shape(k_steps * b, h, a))
    targets = g.node("Split", [target], k_steps, axis=0) if k_steps > 1 else [target]
    return m, m_inv, x_t, vns, targets


def _decoder(g: _Graph, net: DiffusionTransformer) -> Any:
    """The per-step network as a function of (sample, that step's K/V list) -> model output; the
    weights are initializers shared by every step."""
    cfg = net.cfg
    d, heads = cfg.width, cfg.heads
    w_in, pos = g.const("input_emb.w", _np(net.input_emb.weight).T), g.const("pos_emb", _np(net.pos_emb))
    layers = []
    for li, layer in enumerate(net.layers):
        sa, ca = layer.self_attn, layer.cross_attn
        qkv_w = np.concatenate([_np(sa.q.weight).T, _np(sa.kv.weight).T], axis=1)
        layers.append(
            {
                "qkv_w": g.const(f"l{li}.qkv.w", qkv_w),
                "qkv_b": g.const(f"l{li}.qkv.b", np.concatenate([_np(sa.q.bias), _np(sa.kv.bias)])),
                "o_w": g.const(f"l{li}.self_out.w", _np(sa.out.weight).T),
                "q_w": g.const(f"l{li}.cross_q.w", _np(ca.q.weight).T),
                "q_b": g.const(
                    f"l{li}.cross_q.b", np.concatenate([_np(ca.q.bias), np.zeros(2 * d, np.float32)])
                ),
                "co_w": g.const(f"l{li}.cross_out.w", _np(ca.out.weight).T),
                "ff1_w": g.const(f"l{li}.ff1.w", _np(layer.ff[0].weight).T),
                "ff1_b": g.const(f"l{li}.ff1.b", _np(layer.ff[0].bias)),
                "ff2_w": g.const(f"l{li}.ff2.w", _np(layer.ff[2].weight).T),
            }
        )
    w_head, b_head = g.const("head.w", _np(net.head.weight).T), g.const("head.b", _np(net.head.bias))

    def decode(x: str, kv: list[str]) -> str:
        h, res = g.skip_norm(g.op("MatMul", x, w_in), pos, net.layers[0].norm1, net.input_emb.bias, "in")
        for li, layer in enumerate(net.layers):
            w = layers[li]
            att = g.op("Attention", h, w["qkv_w"], w["qkv_b"], domain=MS, num_heads=heads, unidirectional=1)
            out = g.op("MatMul", att, w["o_w"])
            h, res = g.skip_norm(out, res, layer.norm2, layer.self_attn.out.bias, "n2")
            q = g.op("MatMul", h, w["q_w"])
            cross = g.op(
                "MultiHeadAttention", q, kv[2 * li], kv[2 * li + 1], w["q_b"], domain=MS, num_heads=heads
            )
            h, res = g.skip_norm(
                g.op("MatMul", cross, w["co_w"]), res, layer.norm3, layer.cross_attn.out.bias, "n3"
            )
            ff = g.op("BiasGelu", g.op("MatMul", h, w["ff1_w"]), w["ff1_b"], domain=MS)
            nxt = net.layers[li + 1].norm1 if li + 1 < len(net.layers) else net.norm
            h, res = g.skip_norm(g.op("MatMul", ff, w["ff2_w"]), res, nxt, layer.ff[2].bias, "n1")
        return g.op("Add", g.op("MatMul", h, w_head), b_head)

    return decode


def build_fused(
    network: DiffusionTransformer, card: ModelCard, plan: tuple[StepCoefficients, ...], eta: float,
    batch: int = 1,
) -> Any:  # fmt: skip
    """The fused graph (inputs obs_history, noise, prefix, prefix_mask -> actions) as an onnx ModelProto,
    every tensor with `batch` rows."""
    from onnx import TensorProto, helper

    net, cfg = network.eval(), network.cfg
    h, a, n_layers = cfg.horizon, cfg.action_dim, cfg.layers
    f32 = TensorProto.FLOAT
    b = batch
    noise_shape = [b, len(plan) + 1, h, a] if eta > 0 else [b, h, a]
    inputs = [
        helper.make_tensor_value_info("obs_history", f32, [b, cfg.history, cfg.obs_dim]),
        helper.make_tensor_value_info("noise", f32, noise_shape),
        helper.make_tensor_value_info("prefix", f32, [b, h, a]),
        helper.make_tensor_value_info("prefix_mask", f32, [b, h]),
    ]
    g = _Graph()
    with torch.no_grad():
        mem = _cond_memory(g, net, card, plan, b)
        m, m_inv, x, vns, targets = _inpainting(g, card, plan, eta, b)
        decode = _decoder(g, net)
        for i, c in enumerate(plan):
            x = g.op("Add", g.op("Mul", x, m_inv), targets[i])
            out = decode(x, mem[2 * n_layers * i : 2 * n_layers * (i + 1)])
            x = _step_nodes(g, x, out, c, card.diffusion, vns[i])
    center, half = (card.action_max + card.action_min) / 2, (card.action_max - card.action_min) / 2
    act = g.op("Add", g.op("Mul", x, g.const("act_half", half)), g.const("act_center", center))
    g.nodes.append(helper.make_node("Add", [g.op("Mul", act, m_inv), g.op("Mul", "prefix", m)], ["actions"]))
    outputs = [helper.make_tensor_value_info("actions", f32, [b, h, a])]
    graph = helper.make_graph(g.nodes, "fused_ddim", inputs, outputs, g.inits)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=8)
