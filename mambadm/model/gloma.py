"""The GLoMa block: a global Mamba over all tokens and a local Mamba over windows of w timesteps, fused.

    h = LN(x);  g = GlobalMamba(h);  l = LocalMamba(h, windows of 3w tokens);  x = x + Drop(fuse(g, l, h))
    x = x + Drop(FFN(LN(x)))

Local windows are non-overlapping and aligned to the start of the sequence: window j holds tokens
[3wj, 3w(j+1)), i.e. timesteps [wj, w(j+1)), and the local state starts from zero at each window start.

`step` runs a short chunk of tokens (one env step adds three) from a cache. Segment starts - a window start for the
local branch, the episode start for both - reset the state exactly as a fresh window / sequence would, so stepping
token by token reproduces `forward` (tests/test_model.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from mambadm.ssm import Mamba, MambaCache

FUSIONS = ("add", "gate", "concat")


@dataclass
class SegmentMasks:
    """Where state resets inside chunks of L tokens, for starts of shape (..., L); None when nowhere (common).

    conv (..., L, d_conv): 1 where conv tap k of token j reads an input of the token's own segment;
    conv_keep (..., d_conv): 1 for the conv inputs kept as state after the chunk;
    ssm_keep (..., L): 0 where the token starts a segment (the SSM state before it is dropped).
    """

    conv: Tensor
    conv_keep: Tensor
    ssm_keep: Tensor

    @staticmethod
    def build(starts: Tensor, d_conv: int) -> Optional["SegmentMasks"]:
        """From starts (..., L) bool - True where a token begins a new segment."""
        if not bool(starts.any()):
            return None
        seg_tok = starts.long().cumsum(-1)  # segment id of each chunk token; the cached history is segment 0
        seg = torch.cat([seg_tok.new_zeros(*starts.shape[:-1], d_conv - 1), seg_tok], dim=-1)
        conv = seg.unfold(-1, d_conv, 1) == seg_tok[..., None]  # (..., L, d_conv)
        conv_keep = seg[..., -d_conv:] == seg_tok[..., -1:]
        f = torch.float32
        return SegmentMasks(conv.to(f), conv_keep.to(f), (~starts).to(f))


def mamba_chunk_step(m: Mamba, x: Tensor, cache: MambaCache, masks: Optional[SegmentMasks]) -> Tensor:
    """Runs the mixer `m` over a chunk x (B, L, d) continuing from `cache` (updated in place) -> (B, L, d).

    The same computation as `m.step` applied L times, but with one matmul per projection for the whole chunk.
    """
    k = m.d_conv
    u, z = F.linear(x, m.in_proj.weight, m.in_proj.bias).chunk(2, dim=-1)  # (B, L, d_inner) each
    xs = torch.cat([cache.conv_state[:, :, 1:], u.transpose(1, 2)], dim=2)  # (B, d_inner, k - 1 + L)
    windows = xs.unfold(2, k, 1)  # (B, d_inner, L, k)
    if masks is not None:
        windows = windows * masks.conv[:, None]
    u = torch.einsum("bdlk,dk->bld", windows, m.conv1d.weight[:, 0, :])
    u = F.silu(u if m.conv1d.bias is None else u + m.conv1d.bias)  # (B, L, d_inner)
    new_conv = xs[:, :, -k:]
    cache.conv_state.copy_(new_conv * masks.conv_keep[:, None] if masks is not None else new_conv)

    h = cache.ssm_state  # (B, d_inner, d_state), float32
    dt, B, C = torch.split(m.x_proj(u), [m.dt_rank, m.d_state, m.d_state], dim=-1)
    delta = F.softplus(F.linear(dt, m.dt_proj.weight, m.dt_proj.bias)).to(h.dtype)  # (B, L, d_inner)
    dA = torch.exp(delta[..., None] * m.A_continuous().to(h.dtype))  # (B, L, d_inner, d_state)
    if masks is not None:
        dA = dA * masks.ssm_keep[..., None, None]
    dBu = (delta * u.to(h.dtype))[..., None] * B.to(h.dtype)[:, :, None, :]  # (B, L, d_inner, d_state)
    states = []
    for j in range(x.shape[1]):
        h = torch.addcmul(dBu[:, j], dA[:, j], h)
        states.append(h)
    cache.ssm_state.copy_(h)
    y = torch.matmul(torch.stack(states, 1), C.to(h.dtype)[..., None])[..., 0]  # (B, L, d_inner)
    y = (y + m.D.to(y.dtype) * u.to(y.dtype)) * F.silu(z.to(y.dtype))
    return m.out_proj(y.to(x.dtype))


@dataclass
class GLoMaCache:
    global_: MambaCache
    local: MambaCache


class GLoMaBlock(nn.Module):
    """Pre-norm global + local Mamba with fusion and a pre-norm FFN, each with a residual."""

    def __init__(self, d_model: int, d_state: int, d_conv: int, expand: int, local_window: int, fusion: str,
                 ffn_mult: int, dropout: float, backend: str = "auto") -> None:
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"model.fusion must be one of {list(FUSIONS)}, got {fusion!r}")
        if local_window < 1:
            raise ValueError(f"model.local_window must be >= 1 timestep, got {local_window}")
        self.fusion, self.window_tokens = fusion, 3 * local_window
        self.norm1 = nn.LayerNorm(d_model)
        self.global_mamba = Mamba(d_model, d_state=d_state, d_conv=d_conv, expand=expand, backend=backend)
        self.local_mamba = Mamba(d_model, d_state=d_state, d_conv=d_conv, expand=expand, backend=backend)
        if fusion == "gate":
            self.gate = nn.Linear(d_model, d_model)  # gate from the normed input: y = s * g + (1 - s) * l
        elif fusion == "concat":
            self.merge = nn.Linear(2 * d_model, d_model)
        self.drop1 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, ffn_mult * d_model), nn.GELU(),
                                 nn.Linear(ffn_mult * d_model, d_model), nn.Dropout(dropout))

    def fuse(self, g: Tensor, l: Tensor, h: Tensor) -> Tensor:
        if self.fusion == "add":
            return g + l
        if self.fusion == "gate":
            s = torch.sigmoid(self.gate(h))
            return s * g + (1 - s) * l
        return self.merge(torch.cat([g, l], dim=-1))

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1(x)
        local = self.local_mamba(h, segment=self.window_tokens)  # each window of 3w tokens as its own sequence
        x = x + self.drop1(self.fuse(self.global_mamba(h), local, h))
        return x + self.ffn(self.norm2(x))

    # ------------------------------------------------------------------------------------------- recurrence
    def allocate_cache(self, batch_size: int, device=None, dtype=None) -> GLoMaCache:
        return GLoMaCache(self.global_mamba.allocate_cache(batch_size, device, dtype),
                          self.local_mamba.allocate_cache(batch_size, device, dtype))

    def segment_starts(self, token_index: Tensor, length: int) -> tuple[Tensor, Tensor]:
        """(global, local) starts (B, length) bool for the chunk whose first token has index `token_index` (B,)."""
        idx = token_index[:, None] + torch.arange(length, device=token_index.device)  # (B, L)
        return idx == 0, idx % self.window_tokens == 0

    def step(self, x: Tensor, cache: GLoMaCache, token_index: Optional[Tensor] = None,
             masks: Optional[tuple[Optional[SegmentMasks], Optional[SegmentMasks]]] = None) -> Tensor:
        """x (B, d) one token or (B, L, d) a chunk whose first token has index `token_index` (B,) in its sequence.

        The local state restarts at token indices that are multiples of 3w, both states at index 0. `masks`
        (global, local) may be passed instead of `token_index` when the caller shares them across layers.
        """
        single = x.dim() == 2
        x = x[:, None] if single else x
        if masks is None:
            g_starts, l_starts = self.segment_starts(token_index, x.shape[1])
            d_conv = self.global_mamba.d_conv
            masks = (SegmentMasks.build(g_starts, d_conv), SegmentMasks.build(l_starts, d_conv))
        h = self.norm1(x)
        g = mamba_chunk_step(self.global_mamba, h, cache.global_, masks[0])
        l = mamba_chunk_step(self.local_mamba, h, cache.local, masks[1])
        x = x + self.drop1(self.fuse(g, l, h))
        x = x + self.ffn(self.norm2(x))
        return x[:, 0] if single else x
