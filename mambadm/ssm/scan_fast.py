"""Fast pure-PyTorch selective scan for CPU training: chunked, one fused autograd function, reused buffers.

Same conventions and result as `selective_scan_ref` (see scan_ref.py). With delta' = softplus(delta + delta_bias),
a_t = exp(delta'_t A) and x_t = delta'_t u_t B_t (both (batch, d_inner, d_state) per step), the core computes

    h_t = a_t * h_{t-1} + x_t,      y_t = <h_t, C_t>,      out_t = (y_t + D u_t) * silu(z_t)

in chunks of `chunk` steps. Inside a chunk every heavy term is one vectorised op over the whole chunk (a, x, the
C-contractions, all gradient terms); only the first-order recurrence itself is a loop, one in-place `addcmul_` per
step. Nothing of size (batch, d_inner, L, d_state) is ever kept: the forward saves its inputs and the state at each
chunk start, and the backward recomputes one chunk at a time, runs the adjoint recurrence

    g_t = C_t * dy_t + a_{t+1} * g_{t+1}

backwards and reduces the gradients of u, delta, A, B, C, D, z and delta_bias chunk by chunk. Only products of
factors <= 1 appear (a_t = exp(delta' A) with delta' >= 0, A < 0), so no exponent can overflow at any length.

Where the time goes on a CPU (benchmarks/RESULTS.md has the profile): state-sized element passes, and fresh
tensors, whose pages are faulted in on first touch and cost more than the pass that fills them. Hence:
- every state-sized tensor lives in a few chunk buffers allocated once per call and rewritten in place (`out=`,
  `exp_`-style ops, `addcmul_` on per-step views made once with `unbind`);
- the bias, softplus, D skip and silu gate are part of the same function, evaluated per chunk, so no full-length
  intermediate (and none of autograd's per-op gradients) is ever allocated: a call allocates its output, and its
  backward one gradient per input;
- inputs are read in the layout they arrive in (any strides): each chunk is a (T, batch, channels) view, so no
  full-length transposed copy is made.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mambadm.ssm.scan_ref import batch_first, compute_dtype, contiguous_as

# Steps per chunk: each chunk buffer holds chunk * batch * d_inner * d_state elements (measured best: ~2^19, 2 MiB).
_TARGET_CHUNK_ELEMENTS = 1 << 19
_MIN_CHUNK, _MAX_CHUNK = 4, 64


def chunk_size(batch: int, d_inner: int, d_state: int) -> int:
    """Chunk length for the given state size: about _TARGET_CHUNK_ELEMENTS per buffer, within [4, 64] steps."""
    per_step = max(1, batch * d_inner * d_state)
    return max(_MIN_CHUNK, min(_MAX_CHUNK, _TARGET_CHUNK_ELEMENTS // per_step))


def _steps(t: Tensor, s: int, e: int) -> Tensor:
    """Steps [s, e) of a batch-first (b, L, c) tensor as a time-major (T, b, c) view."""
    return t[:, s:e].transpose(0, 1)


class _ChunkBuffers:
    """The chunk-sized work tensors of one call: decays a (T, b, d, n) and states h (T + 1, b, d, n).

    `fill(...)` recomputes both for one chunk in place: h[0] is the chunk's start state, h[t + 1] is h_t. The
    per-step views are made once per call (`unbind`), so the recurrence loop is one op per step.
    """

    def __init__(self, chunk: int, batch: int, d_inner: int, d_state: int, like: Tensor) -> None:
        self.a = like.new_empty(chunk, batch, d_inner, d_state)
        self.h = like.new_empty(chunk + 1, batch, d_inner, d_state)
        self.a_steps, self.h_steps = self.a.unbind(0), self.h.unbind(0)

    def fill(self, h0: Tensor, delta: Tensor, du: Tensor, A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
        """a_t = exp(delta_t A), h_t = a_t h_{t-1} + du_t B_t for one chunk (delta, du: (T, b, d); B: (T, b, n))."""
        T = delta.shape[0]
        a, h, a_steps, h_steps = self.a[:T], self.h[: T + 1], self.a_steps, self.h_steps
        torch.exp(torch.mul(delta[..., None], A, out=a), out=a)
        h_steps[0].copy_(h0)
        torch.mul(du[..., None], B[:, :, None, :], out=h[1:])  # x_t, turned into h_t in place below
        for t in range(T):
            h_steps[t + 1].addcmul_(a_steps[t], h_steps[t])
        return a, h


def _contract_state(s: Tensor, v: Tensor) -> Tensor:
    """sum_n s[..., d, n] v[..., n] for s (T, b, d, n), v (T, b, n) -> (T, b, d).

    Written as the row-vector product v^T s^T: a matrix-vector product with d_state = 16 columns is about twice as
    slow in the batched GEMM as the same product with the state read transposed.
    """
    return torch.matmul(v[..., None, :], s.transpose(-1, -2)).squeeze(-2)


def _chunk_delta(delta: Tensor, bias: Tensor | None, softplus: bool) -> tuple[Tensor, Tensor]:
    """(pre-activation, delta') of one chunk: pre = delta + bias, delta' = softplus(pre) or pre."""
    pre = delta + bias if bias is not None else delta
    return pre, (F.softplus(pre) if softplus else pre)


class _FusedScan(torch.autograd.Function):
    """out (b, L, d), last state (b, d, n) from batch-first u, delta, z (b, L, d), B, C (b, L, n) of any strides,
    A (d, n), D, delta_bias (d,) or None."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus: bool, chunk: int):
        batch, length, d_inner = u.shape
        d_state = A.shape[1]
        starts = range(0, length, chunk)
        out = u.new_empty(batch, length, d_inner)
        chunk_states = u.new_empty(len(starts) + 1, batch, d_inner, d_state)  # state before chunk i; last: final
        chunk_states[0].zero_()
        bufs = _ChunkBuffers(min(chunk, length), batch, d_inner, d_state, u)
        for i, s in enumerate(starts):
            e = min(s + chunk, length)
            uc = _steps(u, s, e)
            _, dl = _chunk_delta(_steps(delta, s, e), delta_bias, softplus)
            _, h = bufs.fill(chunk_states[i], dl, dl * uc, A, _steps(B, s, e))
            y = _contract_state(h[1:], _steps(C, s, e))  # y_t = <h_t, C_t>: (T, b, d)
            if D is not None:
                y.addcmul_(uc, D)
            if z is not None:
                y.mul_(F.silu(_steps(z, s, e)))
            _steps(out, s, e).copy_(y)
            chunk_states[i + 1].copy_(h[e - s])
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, chunk_states)
        ctx.softplus, ctx.chunk = softplus, chunk
        return out, chunk_states[-1].clone()

    @staticmethod
    def backward(ctx, grad_out: Tensor, grad_last: Tensor | None):
        u, delta, A, B, C, D, z, delta_bias, chunk_states = ctx.saved_tensors
        chunk = ctx.chunk
        batch, length, d_inner = u.shape
        need = ctx.needs_input_grad
        # Each gradient takes its input's layout (empty_like keeps dense strides), so the ops upstream read it as is.
        g_u, g_delta, g_B, g_C = map(torch.empty_like, (u, delta, B, C))
        g_z = torch.empty_like(z) if z is not None else None
        g_A = torch.zeros_like(A)
        g_D = torch.zeros_like(D) if D is not None else None
        g_bias = torch.zeros_like(delta_bias) if delta_bias is not None else None
        T_max = min(chunk, length)
        bufs = _ChunkBuffers(T_max, batch, d_inner, A.shape[1], u)
        g_buf = torch.empty_like(bufs.a)
        g_steps, a_steps = g_buf.unbind(0), bufs.a_steps
        # carry = a_{s_next} * g_{s_next}: the gradient reaching the last state of a chunk from the next one.
        carry = grad_last.clone() if grad_last is not None else torch.zeros_like(chunk_states[0])
        for i in reversed(range(chunk_states.shape[0] - 1)):
            s = i * chunk
            e = min(s + chunk, length)
            T = e - s
            uc, Bc, Cc, go = _steps(u, s, e), _steps(B, s, e), _steps(C, s, e), _steps(grad_out, s, e)
            pre, dl = _chunk_delta(_steps(delta, s, e), delta_bias, ctx.softplus)
            du = dl * uc
            a, h = bufs.fill(chunk_states[i], dl, du, A, Bc)
            # out = (y + D u) * silu(z): gradient of y (gy), of z and of D
            if z is not None:
                zc = _steps(z, s, e)
                y = _contract_state(h[1:], Cc)
                if D is not None:
                    y.addcmul_(uc, D)
                _steps(g_z, s, e).copy_(torch.ops.aten.silu_backward(go * y, zc))
                gy = go * F.silu(zc)
            else:
                gy = go.contiguous()
            if D is not None:
                g_D.add_((gy * uc).sum((0, 1)))
            g = torch.mul(gy[..., None], Cc[:, :, None, :], out=g_buf[:T])  # C_t dy_t, becomes g_t below
            g_steps[T - 1].add_(carry)
            for t in range(T - 2, -1, -1):
                g_steps[t].addcmul_(a_steps[t + 1], g_steps[t + 1])
            torch.mul(a_steps[0], g_steps[0], out=carry)
            # y_t = <h_t, C_t>
            _steps(g_C, s, e).copy_(torch.matmul(gy[:, :, None, :], h[1:]).squeeze(2))
            # x_t = delta'_t u_t B_t
            gB_term = _contract_state(g, Bc)  # sum_n g B: (T, b, d)
            g_uc = gB_term * dl
            if D is not None:
                g_uc.addcmul_(gy, D)
            _steps(g_u, s, e).copy_(g_uc)
            g_dl = gB_term.mul_(uc)
            _steps(g_B, s, e).copy_(torch.matmul(du[:, :, None, :], g).squeeze(2))
            # a_t = exp(delta'_t A): d a / d(delta' A) = a; the state it multiplies is h_{t-1}
            g_dA = g.mul_(a).mul_(h[:-1]).view(T * batch, d_inner, -1)  # (T b, d, n), in g's memory
            per_d = g_dA.transpose(0, 1)  # (d, T b, n): batched over d for the two contractions below
            g_dl.view(T * batch, d_inner).add_(torch.bmm(A[:, None, :], per_d.transpose(1, 2)).squeeze(1).t())
            g_A.add_(torch.bmm(per_d.transpose(1, 2), dl.reshape(T * batch, d_inner).t()[:, :, None]).squeeze(-1))
            g_pre = torch.ops.aten.softplus_backward(g_dl, pre, 1.0, 20.0) if ctx.softplus else g_dl
            _steps(g_delta, s, e).copy_(g_pre)
            if delta_bias is not None:
                g_bias.add_(g_pre.sum((0, 1)))
        grads = (g_u, g_delta, g_A, g_B, g_C, g_D, g_z, g_bias)
        return tuple(g if n else None for g, n in zip(grads, need[:8])) + (None, None)


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

    out, last = _FusedScan.apply(
        batch_first(u, dtype), batch_first(delta, dtype), contiguous_as(A, dtype), batch_first(B, dtype),
        batch_first(C, dtype), contiguous_as(D, dtype), batch_first(z, dtype), contiguous_as(delta_bias, dtype),
        delta_softplus, chunk,
    )
    out = out.transpose(1, 2).to(dtype_in)  # (b, d, L) view of the batch-first result
    return (out, last) if return_last_state else out
