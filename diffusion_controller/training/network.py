"""DiffuseLoco-style denoising transformer (Diffusion Policy's TransformerForDiffusion, low-dim obs).

Its output is what the card's `diffusion.prediction_type` says: the clean action sample ("sample", what
train.py trains by default and the shipped models use) or the noise ("epsilon"); the network is the same.

Conditioning tokens: one sinusoidal timestep token, then per observation-history row one observation
token (the whole row through a linear embedding) and, when the card has a velocity_command feature, one
command token with its own embedding (1 + 2 x history tokens, 17 for DiffuseLoco). Cond tokens get a
learned position embedding and go through a per-token MLP encoder (n_cond_layers = 0 in Diffusion
Policy). The action tokens run through a causal pre-norm transformer decoder that cross-attends to all
cond tokens (every observation precedes every predicted action, so no memory mask is needed).

Attention is written with explicit matmuls and softmax so that the legacy ONNX exporter produces plain
MatMul/Softmax nodes, and so that the work that does not depend on the denoising step (observation
tokens and their cross-attention keys/values) can be computed once per chunk by the fused graph.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class NetworkConfig:
    """Sizes of the network; stored as a dict in checkpoints (`network` key)."""

    obs_dim: int = 45
    action_dim: int = 12
    horizon: int = 16
    history: int = 8
    command_slice: tuple[int, int] | None = (6, 9)  # [start, stop) of velocity_command in a row, or None
    layers: int = 6
    heads: int = 8
    width: int = 256
    ff_mult: int = 4
    attn_dropout: float = 0.1
    emb_dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"width ({self.width}) must be divisible by heads ({self.heads})")
        if self.command_slice is not None:
            object.__setattr__(self, "command_slice", tuple(int(v) for v in self.command_slice))

    @property
    def cond_tokens(self) -> int:
        return 1 + self.history * (2 if self.command_slice is not None else 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["command_slice"] = list(self.command_slice) if self.command_slice is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> NetworkConfig:
        d = dict(d)
        if d.get("command_slice") is not None:
            d["command_slice"] = tuple(d["command_slice"])
        return cls(**d)


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Diffusion Policy's SinusoidalPosEmb: [sin(t w), cos(t w)], w = 10000^(-i/(dim/2-1))."""
    half = dim // 2
    freqs = torch.exp(
        torch.arange(half, dtype=torch.float32, device=t.device) * (-math.log(10000.0) / (half - 1))
    )
    args = t.to(torch.float32).reshape(-1, 1) * freqs.reshape(1, -1)
    return torch.cat([args.sin(), args.cos()], dim=-1)


class Attention(nn.Module):
    """Multi-head attention with explicit matmuls (exports to plain ONNX ops)."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)
        self.drop = nn.Dropout(dropout)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.reshape(b, n, self.heads, self.head_dim).transpose(1, 2)

    def keys_values(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head keys and values (B, heads, S, head_dim) of a memory sequence."""
        k, v = self.kv(memory).chunk(2, dim=-1)
        return self.split(k), self.split(v)

    def attend(
        self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        q = self.split(self.q(x)) * (self.head_dim**-0.5)
        scores = q @ k.transpose(-1, -2)
        if bias is not None:
            scores = scores + bias
        y = self.drop(scores.softmax(dim=-1)) @ v
        b, _, n, _ = y.shape
        return self.out(y.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer: causal self-attention, cross-attention, GELU feed-forward."""

    def __init__(self, cfg: NetworkConfig) -> None:
        super().__init__()
        w = cfg.width
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(w), nn.LayerNorm(w), nn.LayerNorm(w)
        self.self_attn = Attention(w, cfg.heads, cfg.attn_dropout)
        self.cross_attn = Attention(w, cfg.heads, cfg.attn_dropout)
        self.ff = nn.Sequential(nn.Linear(w, cfg.ff_mult * w), nn.GELU(), nn.Linear(cfg.ff_mult * w, w))
        self.drop = nn.Dropout(cfg.attn_dropout)

    def forward(
        self, x: torch.Tensor, mem_k: torch.Tensor, mem_v: torch.Tensor, causal: torch.Tensor
    ) -> torch.Tensor:
        h = self.norm1(x)
        k, v = self.self_attn.keys_values(h)
        x = x + self.drop(self.self_attn.attend(h, k, v, causal))
        x = x + self.drop(self.cross_attn.attend(self.norm2(x), mem_k, mem_v, None))
        return x + self.drop(self.ff(self.norm3(x)))


class DiffusionTransformer(nn.Module):
    """f(noisy_sample, timestep, obs_history_normalized) -> (B, horizon, action_dim): the clean sample or
    the noise, by the card's prediction type.

    The forward pass is split in three so the fused export can hoist step-invariant work:
    `cond_memory` (observation tokens -> per-layer cross-attention K/V), `time_memory` (the timestep
    token's K/V, a constant per unrolled step) and `decode`.
    """

    def __init__(self, cfg: NetworkConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.input_emb = nn.Linear(cfg.action_dim, w)
        self.pos_emb = nn.Parameter(torch.zeros(1, cfg.horizon, w))
        self.obs_emb = nn.Linear(cfg.obs_dim, w)
        if cfg.command_slice is not None:
            a, b = cfg.command_slice
            self.cmd_emb = nn.Linear(b - a, w)
        self.cond_pos_emb = nn.Parameter(torch.zeros(1, cfg.cond_tokens, w))
        self.encoder = nn.Sequential(nn.Linear(w, 4 * w), nn.Mish(), nn.Linear(4 * w, w))
        self.drop = nn.Dropout(cfg.emb_dropout)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(w)
        self.head = nn.Linear(w, cfg.action_dim)
        causal = torch.full((cfg.horizon, cfg.horizon), float("-inf")).triu(1)
        self.register_buffer("causal", causal, persistent=False)
        self.apply(self._init)
        nn.init.normal_(self.pos_emb, std=0.02)
        nn.init.normal_(self.cond_pos_emb, std=0.02)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- pieces ---------------------------------------------------------------------------------------
    def cond_tokens(self, obs: torch.Tensor) -> torch.Tensor:
        """Encoded observation (and command) tokens (B, cond_tokens - 1, width); no timestep token."""
        toks = self.obs_emb(obs)
        if self.cfg.command_slice is not None:
            a, b = self.cfg.command_slice
            cmd = self.cmd_emb(obs[:, :, a:b])
            # interleave per history row: obs_0, cmd_0, obs_1, cmd_1, ...
            toks = torch.stack([toks, cmd], dim=2).reshape(obs.shape[0], -1, self.cfg.width)
        toks = self.drop(toks + self.cond_pos_emb[:, 1:])
        return self.encoder(toks)

    def time_token(self, timestep: torch.Tensor) -> torch.Tensor:
        """Encoded timestep token (B, 1, width)."""
        t = sinusoidal_embedding(timestep, self.cfg.width).unsqueeze(1)
        return self.encoder(self.drop(t + self.cond_pos_emb[:, :1]))

    def memory_kv(self, memory: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Cross-attention keys/values of each layer for a memory sequence."""
        return [layer.cross_attn.keys_values(memory) for layer in self.layers]

    def decode(self, sample: torch.Tensor, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        x = self.drop(self.input_emb(sample) + self.pos_emb)
        for layer, (k, v) in zip(self.layers, kv, strict=True):
            x = layer(x, k, v, self.causal)
        return self.head(self.norm(x))

    @staticmethod
    def join_kv(time_kv, cond_kv) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the timestep token's K/V followed by the observation tokens' K/V."""
        return [
            (torch.cat([tk, ck], dim=2), torch.cat([tv, cv], dim=2))
            for (tk, tv), (ck, cv) in zip(time_kv, cond_kv, strict=True)
        ]

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        """sample (B, horizon, action_dim), timestep (B,) or (1,), obs (B, history, obs_dim), normalized."""
        b = sample.shape[0]
        t = self.time_token(timestep.reshape(-1).expand(b))
        memory = torch.cat([t, self.cond_tokens(obs)], dim=1)
        return self.decode(sample, self.memory_kv(memory))
