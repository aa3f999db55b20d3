"""Fast pure-PyTorch selective scan for CPU training: chunked, with a hand-written backward.

Same conventions and result as `selective_scan_ref` (see scan_ref.py). The core computes, with a_t = exp(delta_t A)
and x_t = delta_t u_t B_t (both (batch, d_inner, d_state) per step),

    h_t = a_t * h_{t-1} + x_t,      y_t = <h_t, C_t>

in time-major chunks of `chunk` steps. Inside a chunk every heavy term is one vectorised op over the whole chunk
(a, x, the C-contractions, all gradient terms); only the first-order recurrence itself is a loop, one fused
`addcmul` per step. Nothing of size (batch, d_inner, L, d_state) is ever kept: the forward saves the inputs and the
state at each chunk start, and the backward recomputes one chunk at a time, runs the adjoint recurrence

    g_t = C_t * dy_t + a_{t+1} * g_{t+1}

backwards and reduces the gradients of u, delta, A, B, C chunk by chunk. Only products of factors <= 1 appear
(a_t = exp(delta A) with delta >= 0, A < 0), so no exponent can overflow whatever the sequence length.

The skip term D, the gate silu(z), delta_bias and the softplus act on (batch, d_inner, L) tensors and are left to
autograd around the core.
"""
from __future__ import annotations

import torch
from torch import Tensor

from mambadm.ssm.scan_ref import compute_dtype, finish_output, prepare_delta

# Steps per chunk: each per-chunk buffer holds chunk * batch * d_inner * d_state elements; aim at a few MiB.
_TARGET_CHUNK_ELEMENTS = 1 << 20
_MIN_CHUNK, _MAX_CHUNK = 4, 64


def chunk_size(batch: int, d_inner: int, d_state: int) -> int:
    """Chunk length for the given state size: about _TARGET_CHUNK_ELEMENTS per buffer, within [4, 64] steps."""
    per_step = max(1, batch * d_inner * d_state)
    return max(_MIN_CHUNK, min(_MAX_CHUNK, _TARGET_CHUNK_ELEMENTS // per_step))


def _chunk_terms(delta: Tensor, u: Tensor, A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """a = exp(delta A) and x = delta u B for one time-major chunk: (T, b, d, n) each."""
    a = torch.exp(delta[..., None] * A)
    x = (delta * u)[..., None] * B[:, :, None, :]
    return a, x


def _run_chunk(h0: Tensor, a: Tensor, x: Tensor) -> Tensor:
    """States (T + 1, b, d, n) of one chunk: row 0 is h0, row t + 1 is h_t."""
    states = torch.empty((a.shape[0] + 1,) + a.shape[1:], dtype=a.dtype, device=a.device)
    states[0] = h0
    for t in range(a.shape[0]):
        torch.addcmul(x[t], a[t], states[t], out=states[t + 1])
    return states


class _ChunkedScan(torch.autograd.Function):
    """y (L, b, d), last state (b, d, n) from time-major u, delta (L, b, d), A (d, n), B, C (L, b, n)."""

    @staticmethod
    def forward(ctx, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk: int):
        length, batch, d_inner = u.shape
        h = u.new_zeros(batch, d_inner, A.shape[1])
        y = u.new_empty(length, batch, d_inner)
        starts = list(range(0, length, chunk))
        chunk_states = u.new_empty(len(starts), batch, d_inner, A.shape[1])
        for i, s in enumerate(starts):
            e = min(s + chunk, length)
            chunk_states[i] = h
            a, x = _chunk_terms(delta[s:e], u[s:e], A, B[s:e])
            states = _run_chunk(h, a, x)
            torch.matmul(states[1:], C[s:e, :, :, None], out=y[s:e, :, :, None])  # y_t = <h_t, C_t>
            h = states[-1].clone()
        ctx.save_for_backward(u, delta, A, B, C, chunk_states)
        ctx.chunk = chunk
        return y, h

    @staticmethod
    def backward(ctx, grad_y: Tensor, grad_last: Tensor | None):
        u, delta, A, B, C, chunk_states = ctx.saved_tensors
        chunk = ctx.chunk
        length = u.shape[0]
        grad_y = grad_y.contiguous()
        g_u, g_delta, g_B, g_C = map(torch.empty_like, (u, delta, B, C))
        g_A = torch.zeros_like(A)
        # carry = a_{s_next} * g_{s_next}: the gradient reaching the last state of a chunk from the next one.
        carry = grad_last.clone() if grad_last is not None else torch.zeros_like(chunk_states[0])
        for i in reversed(range(chunk_states.shape[0])):
            s = i * chunk
            e = min(s + chunk, length)
            a, x = _chunk_terms(delta[s:e], u[s:e], A, B[s:e])
            states = _run_chunk(chunk_states[i], a, x)  # (T + 1, b, d, n)
            gy = grad_y[s:e]  # (T, b, d)
            g = gy[..., None] * C[s:e, :, None, :]  # C_t dy_t, becomes g_t below
            g[-1] += carry
            for t in range(e - s - 2, -1, -1):
                g[t].addcmul_(a[t + 1], g[t + 1])
            carry = a[0] * g[0]
            # y_t = <h_t, C_t>
            g_C[s:e] = torch.matmul(gy[:, :, None, :], states[1:]).squeeze(2)
            # x_t = delta_t u_t B_t
            gB_term = torch.matmul(g, B[s:e, :, :, None]).squeeze(-1)  # sum_n g B: (T, b, d)
            g_u[s:e] = gB_term * delta[s:e]
            g_delta[s:e] = gB_term * u[s:e]
            g_B[s:e] = torch.matmul((delta[s:e] * u[s:e])[:, :, None, :], g).squeeze(2)
            # a_t = exp(delta_t A): d a / d(delta A) = a; the state it multiplies is h_{t-1}
            g_dA = g.mul_(states[:-1]).mul_(a)  # (T, b, d, n), reuses g's memory
            g_delta[s:e] += (g_dA * A).sum(-1)
            g_A += (g_dA * delta[s:e, :, :, None]).sum((0, 1))
        return g_u, g_delta, g_A, g_B, g_C, None


def selective_scan_fast(
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
    chunk: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Chunked selective scan; same arguments and result as `selective_scan_ref` (`chunk`: steps per chunk)."""
    dtype_in, dtype = u.dtype, compute_dtype(u)
    batch, d_inner, length = u.shape
    chunk = chunk or chunk_size(batch, d_inner, A.shape[1])
    u = u.to(dtype)
    delta = prepare_delta(delta, delta_bias, delta_softplus, dtype)
    y, last = _ChunkedScan.apply(
        u.permute(2, 0, 1).contiguous(),
        delta.permute(2, 0, 1).contiguous(),
        A.to(dtype).contiguous(),
        B.to(dtype).permute(2, 0, 1).contiguous(),
        C.to(dtype).permute(2, 0, 1).contiguous(),
        chunk,
    )
    out = finish_output(y.permute(1, 2, 0), u, D, z).to(dtype_in)
    return (out, last) if return_last_state else out
