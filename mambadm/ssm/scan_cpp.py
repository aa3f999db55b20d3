"""`cpp` backend: autograd over the fused CPU selective scan and causal conv + SiLU (mambadm/kernels/csrc/mamba_cpu.cpp,
built and loaded by mambadm/kernels/build.py).

The scan keeps each row's state in cache and computes every term of the forward and of the backward in one pass over
time, where the `fast` backend makes about 19 passes over chunk-sized state tensors.

Dtypes: the sequence tensors (u, delta, B, C, z, the output and their gradients) are float32, float64 or bfloat16;
the kernels compute in float32 for bfloat16 (float64 for float64), and parameters, states and parameter gradients
are in that compute dtype. So under bf16 autocast the projections' bfloat16 outputs go in and come out without a
cast (`io_dtype`).
"""
from __future__ import annotations

import torch
from torch import Tensor

from mambadm.kernels.build import cpp_ops
from mambadm.ssm.scan_ref import compute_dtype

DEFAULT_CHUNK = 64  # steps between the saved states the backward restarts from


KERNEL_IO_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def io_dtype(t: Tensor) -> torch.dtype:
    """The dtype the kernels read and write t's sequence tensors in: t's own when they support it, else the compute
    dtype (float16 is cast to float32)."""
    return t.dtype if t.dtype in KERNEL_IO_DTYPES else compute_dtype(t)


class _CppScan(torch.autograd.Function):
    """out (rows, L, d), last state (rows, d, n) from batch-first u, delta, z (rows, L, d), B, C (rows, L, n) of any
    strides, A (groups, d, n), D, delta_bias (d,) or (groups, d) or None; h0 (rows, d, n), keep (rows, L, 1) and
    delta_proj (d, R) or None (with delta_proj, delta is (rows, L, R): the step sizes are delta_proj delta). The rows
    form `groups` consecutive blocks, block g using group g's parameters."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, h0, delta_proj, keep, softplus: bool, chunk: int):
        need_backward = any(ctx.needs_input_grad[:10])  # else no chunk-start states are kept (acting)
        out, last, starts = cpp_ops().scan_forward(u, delta, A, B, C, D, z, delta_bias, softplus, h0, keep, delta_proj,
                                                chunk, need_backward)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, h0, delta_proj, keep, starts)
        ctx.softplus, ctx.chunk = softplus, chunk
        return out, last

    @staticmethod
    def backward(ctx, grad_out: Tensor, grad_last: Tensor | None):
        u, delta, A, B, C, D, z, delta_bias, h0, delta_proj, keep, starts = ctx.saved_tensors
        g_u, g_delta, g_A_rows, g_B, g_C, g_D_rows, g_z, g_bias_rows, g_h0, g_proj_rows = cpp_ops().scan_backward(
            u, delta, A, B, C, D, z, delta_bias, ctx.softplus, h0, keep, delta_proj, ctx.chunk, starts, grad_out,
            grad_last,
        )
        groups = A.shape[0]

        def per_group(rows: Tensor, like: Tensor | None) -> Tensor | None:  # consecutive blocks of rows per group
            if like is None:
                return None
            total = rows.view(groups, -1, *rows.shape[1:]).sum(1)
            return total if like.dim() == total.dim() else total.sum(0)

        g_A, g_D, g_bias = per_group(g_A_rows, A), per_group(g_D_rows, D), per_group(g_bias_rows, delta_bias)
        g_proj = g_proj_rows.sum(0).t() if delta_proj is not None else None
        grads = (g_u, g_delta, g_A, g_B, g_C, g_D, g_z if z is not None else None, g_bias,
                 g_h0 if h0 is not None else None, g_proj)
        return tuple(g if n else None for g, n in zip(grads, ctx.needs_input_grad[:10])) + (None, None, None)


def scan_rows(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None, z: Tensor | None = None,
    delta_bias: Tensor | None = None, delta_softplus: bool = False, h0: Tensor | None = None,
    keep: Tensor | None = None, chunk: int = DEFAULT_CHUNK, check: bool = True, delta_proj: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The kernel on batch-first rows, as the mixer's forward calls it: (out, last state).

    u, delta, z (rows, L, d); B, C (rows, L, n); A (groups, d, n), the rows in `groups` consecutive blocks, block g
    using A[g]; D, delta_bias (d,) or (groups, d); h0 (rows, d, n) the starting state; keep (rows, L) zeros where
    the state resets before that step; delta_proj (d, R), with delta (rows, L, R). u, delta, B, C, z in one dtype
    (float32, float64 or bfloat16); A, D, delta_bias, h0, delta_proj in its compute dtype (float32 for bfloat16);
    out in u's dtype, the last state in the compute dtype. Without autograd the kernel is called directly.
    `check=False` skips `check_rows`: for callers whose arguments are built from the model's own tensors every call,
    as the mixer's are.
    """
    if check:
        check_rows(u, delta, A, B, C, D, z, delta_bias, h0, keep, chunk, delta_proj)
    keep = None if keep is None else keep.to(compute_dtype(u))[..., None]
    args = (u, delta, A, B, C, D, z, delta_bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (*args, h0, delta_proj)):
        return _CppScan.apply(*args, h0, delta_proj, keep, delta_softplus, chunk)
    out, last, _ = cpp_ops().scan_forward(*args, delta_softplus, h0, keep, delta_proj, chunk, False)
    return out, last


def check_rows(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
               delta_bias: Tensor | None, h0: Tensor | None, keep: Tensor | None, chunk: int,
               delta_proj: Tensor | None = None) -> None:
    """The kernel's own argument checks, made here first as ValueErrors naming the argument.

    The kernel checks again, but a C++ exception is not a safe way to report bad input: on one machine (g++ 13.3,
    torch 2.11) the first exception the extension threw crashed the process (SIGSEGV) instead of raising.
    """
    def fail(message: str) -> None:
        raise ValueError(f"selective_scan_cpu: {message}")

    if u.device.type != "cpu":
        fail(f"tensors must be on the CPU, got {u.device}")
    if u.dim() != 3:
        fail(f"u must be (rows, L, d_inner), got {tuple(u.shape)}")
    if u.dtype not in KERNEL_IO_DTYPES:
        fail(f"u must be float32, float64 or bfloat16, got {u.dtype}")
    rows, length, d_inner = u.shape
    if A.dim() != 3 or A.shape[1] != d_inner or A.shape[0] == 0 or rows % A.shape[0]:
        fail(f"A must be (groups dividing rows, d_inner, d_state), got {tuple(A.shape)}")
    groups, d_state = A.shape[0], A.shape[2]
    if delta_proj is not None and (delta_proj.dim() != 2 or delta_proj.shape[0] != d_inner):
        fail(f"delta_proj must be ({d_inner}, R), got {tuple(delta_proj.shape)}")
    delta_width = d_inner if delta_proj is None else delta_proj.shape[1]
    shapes = {"delta": (delta, (rows, length, delta_width)), "B": (B, (rows, length, d_state)),
              "C": (C, (rows, length, d_state)), "z": (z, (rows, length, d_inner)),
              "h0": (h0, (rows, d_inner, d_state)), "keep": (keep, (rows, length))}
    for name, (t, shape) in shapes.items():
        if t is not None and tuple(t.shape) != shape:
            fail(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and tuple(t.shape) not in ((d_inner,), (groups, d_inner)):
            fail(f"{name} must have shape ({d_inner}) or ({groups}, {d_inner}), got {tuple(t.shape)}")
    for name, t in (("delta", delta), ("B", B), ("C", C), ("z", z)):
        if t is not None and t.dtype != u.dtype:
            fail(f"{name} has dtype {t.dtype}, expected u's {u.dtype}")
    for name, t in (("A", A), ("D", D), ("delta_bias", delta_bias), ("h0", h0), ("delta_proj", delta_proj)):
        if t is not None and t.dtype != compute_dtype(u):
            fail(f"{name} has dtype {t.dtype}, expected {compute_dtype(u)} (the compute dtype of u's {u.dtype})")
    if chunk <= 0:
        fail(f"chunk must be positive, got {chunk}")


class _CppConv(torch.autograd.Function):
    """silu(causal depthwise conv) of x (rows, L, c) with nn.Conv1d's weight (c, 1, K) and bias (c,) or None;
    segment > 0: no tap reads across a start of a window of `segment` steps."""

    @staticmethod
    def forward(ctx, x, weight, bias, segment: int):
        taps = weight[:, 0, :].t().contiguous()  # (K, c)
        ctx.save_for_backward(x, taps, bias)
        ctx.segment = segment
        return cpp_ops().conv_forward(x, taps, bias, segment)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, taps, bias = ctx.saved_tensors
        g_x, g_taps_rows, g_bias_rows = cpp_ops().conv_backward(x, taps, bias, grad_out, ctx.segment)
        g_weight = g_taps_rows.sum(0).t()[:, None, :]
        return g_x, g_weight, g_bias_rows.sum(0) if bias is not None else None, None


def causal_conv_silu_cpp(x: Tensor, weight: Tensor, bias: Tensor | None, segment: int | None = None) -> Tensor:
    """silu(`causal_depthwise_conv(x, weight, bias)`) in one kernel: x (batch, L, channels) of any strides.

    With `segment`, the time axis is cut into windows of `segment` steps from its start and each window is
    convolved as its own sequence (zeros before its first step). A bfloat16 x is read and returned as it is (the
    kernel computes in float32, weight and bias taken in float32).
    """
    if x.device.type != "cpu" or x.dim() != 3:
        raise ValueError(f"causal_conv_silu_cpu: x must be a CPU tensor (rows, L, channels), got {tuple(x.shape)} "
                         f"on {x.device}")
    if weight.dim() != 3 or weight.shape[:2] != (x.shape[2], 1) or (bias is not None and bias.shape != (x.shape[2],)):
        raise ValueError(f"causal_conv_silu_cpu: weight must be ({x.shape[2]}, 1, K) and bias ({x.shape[2]},), got "
                         f"{tuple(weight.shape)} and {None if bias is None else tuple(bias.shape)}")
    io, dtype = io_dtype(x), compute_dtype(x)
    bias = None if bias is None else bias.to(dtype)
    return _CppConv.apply(x.to(io), weight.to(dtype), bias, _segment_steps(segment)).to(x.dtype)


def _segment_steps(segment: int | None) -> int:
    if segment is None:
        return 0
    if int(segment) < 1:
        raise ValueError(f"segment must be a positive number of steps or None, got {segment}")
    return int(segment)


def segment_keep(batch: int, length: int, segment: int | None, device=None) -> Tensor | None:
    """`scan_rows`'s keep (batch, L) for windows of `segment` steps from the start: 0 at every window start (None
    when one window covers all L steps)."""
    if segment is None or _segment_steps(segment) >= length:
        return None
    return (torch.arange(length, device=device) % segment != 0).expand(batch, length)
