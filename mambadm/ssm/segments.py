"""Where the recurrent state resets inside a chunk of tokens: the masks `Mamba.step` applies at segment starts."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


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
