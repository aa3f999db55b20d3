"""Decision Transformer baseline: GPT-style pre-norm blocks with causal self-attention over (R, s, a) tokens.

Positions come only from the shared global timestep embedding (no per-token position table). Acting re-runs the
last K steps, as the reference code does.
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from mambadm.config import EnvSpec, ModelConfig
from mambadm.model.base import DecisionModel


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int, dropout: float) -> None:
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"model.d_model={d_model} must be divisible by model.n_head={n_head}")
        self.n_head, self.dropout = n_head, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        B, T, d = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, d // self.n_head).permute(2, 0, 3, 1, 4)  # (B, nh, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, T, d)))


class Block(nn.Module):
    def __init__(self, d_model: int, n_head: int, ffn_mult: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_head, dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, ffn_mult * d_model), nn.GELU(),
                                 nn.Linear(ffn_mult * d_model, d_model), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class DecisionTransformer(DecisionModel):
    def __init__(self, cfg: ModelConfig, spec: EnvSpec) -> None:
        super().__init__(cfg, spec)
        self.layers = nn.ModuleList(Block(cfg.d_model, cfg.n_head, cfg.ffn_mult, cfg.dropout)
                                    for _ in range(cfg.n_layer))
        self.norm_f = nn.LayerNorm(cfg.d_model)

    def backbone(self, tokens: Tensor) -> Tensor:
        for layer in self.layers:
            tokens = layer(tokens)
        return self.norm_f(tokens)

    def backbone_flops_per_token(self, context_len: int) -> float:
        c, T = self.cfg, 3 * context_len
        d = c.d_model
        # qkv + output projections, attention scores and weighted values (causal: T/2 keys on average, 2 * 2 * T/2 * d),
        # FFN
        return c.n_layer * (2 * d * 3 * d + 2 * d * d + 2 * T * d + 2 * 2 * d * c.ffn_mult * d)
