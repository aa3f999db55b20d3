"""The `triton` backend's fused conv: SiLU(causal depthwise conv + bias) in one Triton kernel pair.

The PyTorch conv (conv.py: a padded copy of u, K shifted multiply-adds, one masked weight tensor per tap where
windows restart, then SiLU, each a pass over the sequence and more again in its backward; float32 results from
bfloat16 inputs under autocast, cast back by the next matmul) becomes one pass forward and one backward. It reads u
in the batch-first layout in_proj produces, restarts at every window start of the GLoMa local branch in place
(t % segment in registers: no folding, no padding, no mask tensors), computes in float32 and returns u's dtype, as
the `cpp` backend's conv does. The backward recomputes the preactivations of the K tokens each input feeds (from
cached loads of u) instead of saving them; the weight and bias gradients are summed per program, then over
programs: no atomics, deterministic.

Off by default until a GPU session has tested and timed it (benchmarks/gpu_session.sh): $MAMBADM_TRITON_FUSED=1
(or FUSED["conv"] = True) selects it; the PyTorch conv (`causal_depthwise_conv`) stays the reference it is tested
against (tests/test_triton_conv.py). In Triton's interpreter on a CPU when TRITON_INTERPRET=1 is set before triton
is imported (the tests do).
"""
from __future__ import annotations

import os
from functools import lru_cache

import torch
from torch import Tensor

BLOCK_TOKENS, BLOCK_CHANNELS = 32, 64  # a program's tile (powers of two)
# FUSED["conv"]: True / False overrides $MAMBADM_TRITON_FUSED ("1" on, "0" or unset off).
FUSED: dict[str, bool | None] = {"conv": None}


def fused_conv_enabled() -> bool:
    """Whether the `triton` backend runs its conv through the fused kernel pair."""
    if FUSED["conv"] is not None:
        return FUSED["conv"]
    value = os.environ.get("MAMBADM_TRITON_FUSED", "0")
    if value not in ("0", "1"):
        raise ValueError(f"$MAMBADM_TRITON_FUSED must be 0 or 1, got {value!r}")
    return value == "1"


@lru_cache(maxsize=1)
def _kernels():
    """(triton, forward kernel, backward kernel), imported on first use."""
    import triton

    from mambadm.kernels import triton_conv as k

    return triton, k.conv_silu_fwd, k.conv_silu_bwd


class _TritonConvSilu(torch.autograd.Function):
    """u (R, L, D) with unit channel stride; weight (D, K) float32; bias (D,) or None; segment >= 1 (L + 1: one
    window)."""

    @staticmethod
    def forward(ctx, u, weight, bias, segment):
        triton, fwd, _ = _kernels()
        R, L, Dn = u.shape
        out = torch.empty(R, L, Dn, device=u.device, dtype=u.dtype)
        grid = (R, triton.cdiv(L, BLOCK_TOKENS), triton.cdiv(Dn, BLOCK_CHANNELS))
        fwd[grid](u, weight, weight if bias is None else bias, out, L, Dn, segment, u.stride(0), u.stride(1),
                  HAS_BIAS=bias is not None, K=weight.shape[1], BT=BLOCK_TOKENS, BD=BLOCK_CHANNELS)
        ctx.save_for_backward(u, weight, bias)
        ctx.segment = segment
        return out

    @staticmethod
    def backward(ctx, g):
        u, weight, bias = ctx.saved_tensors
        triton, _, bwd = _kernels()
        R, L, Dn = u.shape
        K = weight.shape[1]
        grid = (R, triton.cdiv(L, BLOCK_TOKENS), triton.cdiv(Dn, BLOCK_CHANNELS))
        f32 = dict(device=u.device, dtype=torch.float32)
        du = torch.empty(R, L, Dn, device=u.device, dtype=u.dtype)
        dw_part = torch.empty(R * grid[1], Dn, K, **f32)
        db_part = torch.empty(R * grid[1], Dn, **f32) if bias is not None else dw_part
        bwd[grid](u, weight, weight if bias is None else bias, g.contiguous(), du, dw_part, db_part, L, Dn,
                  ctx.segment, u.stride(0), u.stride(1), HAS_BIAS=bias is not None, K=K, BT=BLOCK_TOKENS,
                  BD=BLOCK_CHANNELS)
        return du, dw_part.sum(0), db_part.sum(0) if bias is not None else None, None


def causal_conv_silu_triton(u: Tensor, weight: Tensor, bias: Tensor | None, segment: int | None = None) -> Tensor:
    """SiLU(`causal_depthwise_conv(u, weight, bias, segment)`) in one kernel pair: u (batch, L, channels) with
    nn.Conv1d's depthwise weight (channels, 1, K) and bias (channels,) -> (batch, L, channels) in u's dtype.
    `segment`: windows of `segment` steps from the start, each convolved as its own sequence."""
    if segment is not None and (isinstance(segment, bool) or int(segment) < 1):
        raise ValueError(f"causal_conv_silu_triton: segment must be a positive number of steps or None, got {segment}")
    if u.dim() != 3 or weight.shape[:2] != (u.shape[2], 1) or (bias is not None and bias.shape != (u.shape[2],)):
        raise ValueError(f"causal_conv_silu_triton: u (batch, L, {u.shape[-1]}) needs weight ({u.shape[-1]}, 1, K) "
                         f"and bias ({u.shape[-1]},), got {tuple(u.shape)}, {tuple(weight.shape)}, "
                         f"{None if bias is None else tuple(bias.shape)}")
    u = u if u.stride(2) == 1 else u.contiguous()
    taps = weight[:, 0, :].float().contiguous()  # (channels, K); tap K - 1 multiplies the current input
    return _TritonConvSilu.apply(u, taps, None if bias is None else bias.float(), int(segment or u.shape[1] + 1))
