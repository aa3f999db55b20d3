"""Reference selective scan: a readable sequential loop over time, float32 accumulation (float64 for float64 inputs).

This is the ground truth the other backends are tested against. It follows mamba_ssm's `selective_scan_fn`
argument conventions:

    u, delta   (batch, d_inner, L)
    A          (d_inner, d_state)
    B, C       (batch, d_state, L)
    D          (d_inner,)            optional skip connection
    z          (batch, d_inner, L)   optional gate: out = y * silu(z)
    delta_bias (d_inner,)            optional, added to delta before the optional softplus

Recurrence, per batch b, channel d, state n and step t:

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
    y_t = <h_t, C_t> + D * u_t

The loop collects per-step outputs in a list and stacks once, so autograd stays linear in L.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def compute_dtype(u: Tensor) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs, float64 for float64 inputs (gradcheck)."""
    return torch.promote_types(u.dtype, torch.float32)


def prepare_delta(delta: Tensor, delta_bias: Tensor | None, delta_softplus: bool, dtype: torch.dtype) -> Tensor:
    """delta in `dtype` with the optional bias and softplus applied."""
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    return F.softplus(delta) if delta_softplus else delta


def project_delta(delta: Tensor, delta_proj: Tensor | None) -> Tensor:
    """The step sizes (batch, d_inner, L) from low-rank ones (batch, R, L) and delta_proj (d_inner, R) - the Mamba
    mixer's dt_proj weight - as a view of the batch-first product; delta unchanged when delta_proj is None."""
    if delta_proj is None:
        return delta
    return F.linear(delta.transpose(1, 2), delta_proj).transpose(1, 2)


def batch_first(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """(b, channels, L) -> a (b, L, channels) view in `dtype` (the fused backends' layout); None stays None."""
    return None if t is None else t.to(dtype).transpose(1, 2)


def contiguous_as(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A parameter (A, D, delta_bias) in `dtype`, contiguous; None stays None."""
    return None if t is None else t.to(dtype).contiguous()


def finish_output(y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None) -> Tensor:
    """Add the D skip connection and apply the silu(z) gate (in y's dtype)."""
    if D is not None:
        y = y + u * D.to(y.dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def selective_scan_ref(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Sequential selective scan; returns out (batch, d_inner, L) in u's dtype [, last state (batch, d_inner,
    d_state)]."""
    dtype_in, dtype = u.dtype, compute_dtype(u)
    u = u.to(dtype)
    delta = prepare_delta(delta, delta_bias, delta_softplus, dtype)  # (b, d, L)
    A, B, C = A.to(dtype), B.to(dtype), C.to(dtype)
    batch, d_inner, length = u.shape
    # Time-major, split once with unbind: indexing [t] in the loop would make autograd build a zero tensor of the
    # full size per step in backward (quadratic in L); unbind's backward stacks the per-step gradients once.
    deltaA = torch.exp(torch.einsum("bdl,dn->lbdn", delta, A)).unbind(0)  # L x (b, d, n)
    deltaB_u = torch.einsum("bdl,bnl,bdl->lbdn", delta, B, u).unbind(0)  # L x (b, d, n)
    C_t = C.permute(2, 0, 1).unbind(0)  # L x (b, n)
    h = u.new_zeros(batch, d_inner, A.shape[1])
    ys = []
    for t in range(length):
        h = deltaA[t] * h + deltaB_u[t]
        ys.append(torch.einsum("bdn,bn->bd", h, C_t[t]))
    y = torch.stack(ys, dim=2) if ys else u.new_zeros(batch, d_inner, 0)
    out = finish_output(y, u, D, z).to(dtype_in)
    return (out, h) if return_last_state else out
