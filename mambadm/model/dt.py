"""Decision Transformer baseline: GPT-style pre-norm blocks with causal self-attention over (R, s, a) tokens.

Positions come from the shared timestep embedding: per token by default, or DT's Atari scheme (one timestep per
window + a per-token position table, ``model.timestep_encoding=dt_global``, embeddings.py). Acting re-runs the last
K steps, as the reference code does. ``model.activation`` picks the FFN's GELU (DT's Atari code) or ReLU (its gym
code); ``model.init=dt`` gives the blocks and the final norm GPT's init (Linear weights N(0, 0.02), biases 0), as
both reference models do; ``project`` keeps PyTorch's defaults.
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from mambadm.config import EnvSpec, ModelConfig
from mambadm.model.base import DecisionModel, WindowState
from mambadm.model.embeddings import dt_init

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


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
    def __init__(self, d_model: int, n_head: int, ffn_mult: int, dropout: float, activation: str = "gelu") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"model.activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_head, dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, ffn_mult * d_model), ACTIVATIONS[activation](),
                                 nn.Linear(ffn_mult * d_model, d_model), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class DecisionTransformer(DecisionModel):
    def __init__(self, cfg: ModelConfig, spec: EnvSpec) -> None:
        super().__init__(cfg, spec)
        self.layers = nn.ModuleList(Block(cfg.d_model, cfg.n_head, cfg.ffn_mult, cfg.dropout, cfg.activation)
                                    for _ in range(cfg.n_layer))
        self.norm_f = nn.LayerNorm(cfg.d_model)
        if cfg.init == "dt":
            dt_init(self.layers)

    def init_state(self, batch_size: int, mode: str = "window", context_len: int = 30, reencode: bool = False):
        """As the base class; with ``dt_global`` timesteps the window is re-encoded every call, since its one
        timestep (the current step's) changes the embedding of every token in it."""
        return super().init_state(batch_size, mode, context_len, reencode or self.embed.global_timestep)

    def act_window(self, state, rtg, obs, prev_action, t):
        """As the base class; with ``dt_global`` the window's timestep is the current step, as DT acts
        (trainer_atari.py:217), where training uses the window's first step: every slot of the window is set to t."""
        if self.embed.global_timestep and isinstance(state, WindowState):
            state.timesteps.copy_(t[:, None].expand_as(state.timesteps))
        return super().act_window(state, rtg, obs, prev_action, t)

    def backbone(self, tokens: Tensor) -> Tensor:
        return self.norm_f(self.run_layers(tokens))

    def backbone_flops_per_token(self, context_len: int) -> float:
        c, T = self.cfg, 3 * context_len
        d = c.d_model
        # qkv + output projections, attention scores and weighted values (causal: T/2 keys on average, 2 * 2 * T/2 * d),
        # FFN
        return c.n_layer * (2 * d * 3 * d + 2 * d * d + 2 * T * d + 2 * 2 * d * c.ffn_mult * d)
