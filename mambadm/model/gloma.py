"""The GLoMa block: a global Mamba over all tokens and a local Mamba over windows of w timesteps, fused.

    h = LN(x);  g = GlobalMamba(h);  l = LocalMamba(h, windows of 3w tokens);  x = x + Drop(fuse(g, l, h))
    x = x + Drop(FFN(LN(x)))

Local windows are non-overlapping and aligned to the start of the sequence: window j holds tokens
[3wj, 3w(j+1)), i.e. timesteps [wj, w(j+1)), and the local state starts from zero at each window start.

`step` runs a short chunk of tokens (one env step adds three) from a cache, each branch through `Mamba.step`.
Segment starts - a window start for the local branch, the episode start for both - reset the state exactly as a
fresh window / sequence would, so stepping token by token reproduces `forward` (tests/test_model.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from mambadm.ssm import Mamba, MambaCache, SegmentMasks

FUSIONS = ("add", "gate", "concat")


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

    def segment_masks(self, token_index: Tensor, length: int) -> tuple[Optional[SegmentMasks], Optional[SegmentMasks]]:
        """(global, local) `SegmentMasks` for the chunk of `length` tokens whose first has index `token_index` (B,)."""
        d_conv = self.global_mamba.d_conv
        return tuple(SegmentMasks.build(starts, d_conv) for starts in self.segment_starts(token_index, length))

    def step(self, x: Tensor, cache: GLoMaCache, token_index: Optional[Tensor] = None,
             masks: Optional[tuple[Optional[SegmentMasks], Optional[SegmentMasks]]] = None) -> Tensor:
        """x (B, d) one token or (B, L, d) a chunk whose first token has index `token_index` (B,) in its sequence.

        The local state restarts at token indices that are multiples of 3w, both states at index 0. `masks`
        (global, local) may be passed instead of `token_index` when the caller shares them across layers.
        """
        single = x.dim() == 2
        x = x[:, None] if single else x
        masks = self.segment_masks(token_index, x.shape[1]) if masks is None else masks
        h = self.norm1(x)
        g = self.global_mamba.step(h, cache.global_, masks[0])
        l = self.local_mamba.step(h, cache.local, masks[1])
        x = x + self.drop1(self.fuse(g, l, h))
        x = x + self.ffn(self.norm2(x))
        return x[:, 0] if single else x
