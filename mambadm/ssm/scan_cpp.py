"""`cpp` backend: the fused CPU selective scan and causal conv + SiLU in csrc/mamba_cpu.cpp, built on first use.

The same extension holds MambaDM's recurrent acting step (mambadm/model/csrc/gloma_step.cpp, the class
`torch.classes.mambadm_cpu.GLoMaStack`), which calls the scan forward directly (csrc/mamba_cpu.h).

The kernels are compiled once per machine with `torch.utils.cpp_extension.load` (a C++ compiler and ninja are
needed; the build lands in torch's extension cache, ~/.cache/torch_extensions or $TORCH_EXTENSIONS_DIR, and later
processes only load it; MAMBADM_NO_CPP_KERNELS=1 turns them off). The scan keeps each row's state in cache and
computes every term of the forward and of the backward in one pass over time, where the `fast` backend makes about
19 passes over chunk-sized state tensors. Flags: -O3 and fast-math for the compile step only (it lets the compiler
vectorise the per-channel `exp` / `log1p` calls; the linked library does not change the process's floating-point
mode), plus the vector ISA torch detects on this CPU. The ISA is part of the extension's name, so machines sharing
one cache never load a build made for another CPU. On Linux also -fopenmp: `at::parallel_for` is a header template
compiled into the extension, and without OpenMP it runs every row on the calling thread (the kernels ignored
`torch.set_num_threads`). Where torch ships its libgomp under the system's soname (libgomp.so.1, as the CPU
wheels used here do) the extension binds to the runtime torch has already loaded: one thread pool.

Dtypes: the sequence tensors (u, delta, B, C, z, the output and their gradients) are float32, float64 or bfloat16;
the kernels compute in float32 for bfloat16 (float64 for float64), and parameters, states and parameter gradients
are in that compute dtype. So under bf16 autocast the projections' bfloat16 outputs go in and come out without a
cast (`io_dtype`).
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import torch
from torch import Tensor

from mambadm.ssm.scan_ref import batch_first, compute_dtype, contiguous_as

logger = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
# The extension's sources: the scan and conv kernels, and MambaDM's recurrent acting step built on the scan.
SOURCES = (CSRC / "mamba_cpu.cpp", Path(__file__).parents[1] / "model" / "csrc" / "gloma_step.cpp")
DEFAULT_CHUNK = 64  # steps between the saved states the backward restarts from
STALE_LOCK_SECONDS = 600  # a build takes ~10-60 s: an older build lock was left by a process that was killed

_lock = threading.Lock()
_state: dict[str, object] = {}  # "ops" once loaded, or "error": why it cannot be


def _openmp_flags() -> list[str]:
    """Compile and link flags that make `at::parallel_for` in the kernels use torch's intra-op threads."""
    return ["-fopenmp"] if sys.platform.startswith("linux") else []


def _isa_flags() -> tuple[str, list[str]]:
    """(name, compiler flags) for the vector ISA torch detects on this CPU."""
    capability = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2", "DEFAULT", ...
    if capability == "AVX512":
        return "avx512", ["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx2", "-mfma", "-mprefer-vector-width=512"]
    if capability == "AVX2":
        return "avx2", ["-mavx2", "-mfma"]
    return "generic", []


def _put_ninja_on_path() -> None:
    """torch runs `ninja` from PATH: add the `ninja` wheel's binary when no system ninja is there (e.g. a venv that
    is not activated)."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _clear_stale_lock(name: str) -> None:
    """torch serialises builds with a lock file in the build directory and waits for it forever; a process killed
    while building leaves it behind. Remove one older than STALE_LOCK_SECONDS, saying so."""
    from torch.utils import cpp_extension

    try:
        lock = Path(cpp_extension._get_build_directory(name, verbose=False)) / "lock"
        if time.time() - lock.stat().st_mtime > STALE_LOCK_SECONDS:
            logger.warning("removing a stale build lock left by a killed build: %s", lock)
            lock.unlink()
    except (OSError, AttributeError):  # no lock (the usual case), or a torch without this helper
        pass


def cpp_missing() -> str | None:
    """None when the kernel is built and loaded (building it now if needed), else why it cannot be."""
    with _lock:
        if "ops" in _state:
            return None
        if "error" in _state:
            return str(_state["error"])
        if os.environ.get("MAMBADM_NO_CPP_KERNELS"):
            _state["error"] = "MAMBADM_NO_CPP_KERNELS is set"
            return str(_state["error"])
        try:
            from torch.utils import cpp_extension

            _put_ninja_on_path()
            isa, flags = _isa_flags()
            name = f"mambadm_cpu_{isa}"
            _clear_stale_lock(name)
            logger.info("building/loading the CPU Mamba kernels (%s); a first build takes ~10-60 s", isa)
            cpp_extension.load(
                name=name,
                sources=[str(s) for s in SOURCES],
                extra_include_paths=[str(CSRC)],
                extra_cflags=["-O3", "-ffast-math", "-fopenmp-simd", *flags, *_openmp_flags()],
                extra_ldflags=_openmp_flags(),
                is_python_module=False,
                verbose=False,
            )
            _state["ops"] = torch.ops.mambadm_cpu
            return None
        except Exception as exc:  # no compiler, no ninja, a failed build: say which
            _state["error"] = f"the CPU Mamba kernels could not be built ({type(exc).__name__}: {exc})"
            return str(_state["error"])


KERNEL_IO_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def io_dtype(t: Tensor) -> torch.dtype:
    """The dtype the kernels read and write t's sequence tensors in: t's own when they support it, else the compute
    dtype (float16 is cast to float32)."""
    return t.dtype if t.dtype in KERNEL_IO_DTYPES else compute_dtype(t)


def _ops():
    missing = cpp_missing()
    if missing is not None:
        raise RuntimeError(missing)
    return _state["ops"]


class _CppScan(torch.autograd.Function):
    """out (rows, L, d), last state (rows, d, n) from batch-first u, delta, z (rows, L, d), B, C (rows, L, n) of any
    strides, A (groups, d, n), D, delta_bias (d,) or (groups, d) or None; h0 (rows, d, n), keep (rows, L, 1) and
    delta_proj (d, R) or None (with delta_proj, delta is (rows, L, R): the step sizes are delta_proj delta). The rows
    form `groups` consecutive blocks, block g using group g's parameters."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, h0, delta_proj, keep, softplus: bool, chunk: int):
        need_backward = any(ctx.needs_input_grad[:10])  # else no chunk-start states are kept (acting)
        out, last, starts = _ops().scan_forward(u, delta, A, B, C, D, z, delta_bias, softplus, h0, keep, delta_proj,
                                                chunk, need_backward)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, h0, delta_proj, keep, starts)
        ctx.softplus, ctx.chunk = softplus, chunk
        return out, last

    @staticmethod
    def backward(ctx, grad_out: Tensor, grad_last: Tensor | None):
        u, delta, A, B, C, D, z, delta_bias, h0, delta_proj, keep, starts = ctx.saved_tensors
        g_u, g_delta, g_A_rows, g_B, g_C, g_D_rows, g_z, g_bias_rows, g_h0, g_proj_rows = _ops().scan_backward(
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
    out, last, _ = _ops().scan_forward(*args, delta_softplus, h0, keep, delta_proj, chunk, False)
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


def selective_scan_cpp(
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
    segment: int | None = None,
    delta_proj: Tensor | None = None,
    chunk: int = DEFAULT_CHUNK,
) -> Tensor | tuple[Tensor, Tensor]:
    """Fused CPU selective scan; same arguments and result as `selective_scan_ref`. `segment`: the state restarts
    from zero every `segment` steps (windows aligned to the start, each as its own sequence); `delta_proj`
    (d_inner, R): delta is (batch, R, L) and the step sizes are delta_proj @ delta, computed inside the kernel;
    `chunk`: backward restart interval in steps."""
    dtype_in, dtype = u.dtype, compute_dtype(u)
    args = (batch_first(u, dtype), batch_first(delta, dtype), contiguous_as(A, dtype)[None], batch_first(B, dtype),
            batch_first(C, dtype), contiguous_as(D, dtype), batch_first(z, dtype), contiguous_as(delta_bias, dtype))
    proj = None if delta_proj is None else delta_proj.to(dtype)
    keep = segment_keep(u.shape[0], u.shape[-1], segment, u.device)
    out, last = scan_rows(*args, delta_softplus=delta_softplus, keep=keep, chunk=chunk, delta_proj=proj)
    out = out.transpose(1, 2).to(dtype_in)
    return (out, last) if return_last_state else out


class _CppConv(torch.autograd.Function):
    """silu(causal depthwise conv) of x (rows, L, c) with nn.Conv1d's weight (c, 1, K) and bias (c,) or None;
    segment > 0: no tap reads across a start of a window of `segment` steps."""

    @staticmethod
    def forward(ctx, x, weight, bias, segment: int):
        taps = weight[:, 0, :].t().contiguous()  # (K, c)
        ctx.save_for_backward(x, taps, bias)
        ctx.segment = segment
        return _ops().conv_forward(x, taps, bias, segment)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, taps, bias = ctx.saved_tensors
        g_x, g_taps_rows, g_bias_rows = _ops().conv_backward(x, taps, bias, grad_out, ctx.segment)
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
