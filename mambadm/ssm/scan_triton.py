"""The `triton` backend: a selective scan written in Triton for the short rows of decision making.

mamba_ssm's CUDA kernel gives every (row, channel) pair a thread block that walks the row's tokens in chunks of
128 or more; a trajectory context is 3K = 90 tokens, and the GLoMa local branch, folded into rows of 3w = 15 tokens,
leaves most of those threads idle (tokens/s measured flat in the batch size, benchmarks/RESULTS.md). Here one program
owns a row and a block of channels and walks the row's tokens with the (channels x d_state) state in registers, so
short rows cost what their tokens cost. It reads the batch-first layout the projections produce, restarts the state
every `segment` tokens in place (the local branch needs no folding), and fuses softplus(delta + bias), the D skip
and the silu(z) gate.

Two kernel pairs (LAUNCH["kernel"], default from $MAMBADM_TRITON_SCAN, else "serial": the pair measured on a GPU;
"chunked" has run only in Triton's interpreter so far and becomes the default once benchmarks/gpu_session.sh has
tested and timed it on a card):
- "chunked": a program takes a chunk of tokens at a time as (tokens x channels x d_state) tiles in registers; the
  recurrence h_t = a_t h_{t-1} + b_t runs over the chunk as an associative scan, the forward keeps each chunk's
  start state, and the backward recomputes a chunk's states from it in registers and runs the adjoint
  lam_t = gy_t C_t + a_{t+1} lam_{t+1} as a reverse scan (a_{t+1} from the next token's inputs): no scratch buffer
  and no token-by-token recompute before the adjoint.
- "serial": the first design, kept for comparison (benchmarks/bench_triton_scan.py): one token at a time; the
  backward recomputes each chunk's states token by token into a per-program scratch buffer, then runs the adjoint
  backwards through it.
Per-channel parameter gradients (A, D, dt bias) are summed per program and then over rows; the B and C
gradients, sums over channels, are written per channel block and summed after: no atomics, deterministic.

Same conventions as scan_ref.py (the ground truth it is tested against). On a machine without a GPU the kernels run
in Triton's interpreter when TRITON_INTERPRET=1 is set before this module is imported (the tests do).
"""
from __future__ import annotations

import os
from functools import lru_cache

import torch
from torch import Tensor

CHUNK = 16  # tokens between saved states (serial kernels)
KERNELS = ("chunked", "serial")
# Launch shape: the kernel pair, channels per program (a power of two), warps per program and, for the chunked
# kernels, tokens per chunk (a power of two); None = the defaults in _kernel, _block, _warps and _chunk.
# benchmarks/bench_triton_scan.py sweeps them on a GPU.
# "tile_scan" (chunked): "associative" (tl.associative_scan) or "sequential" (the chunk's tokens one by one in
# registers); None = sequential in Triton's interpreter (fast there), associative compiled.
# A key left None here is read from $MAMBADM_TRITON_LAUNCH ("block=32,warps=4,chunk=16,tile_scan=associative", any
# subset) before the default: what `bench_triton_scan.py --pick` writes for a card, so a run uses the launch picked
# there without a code change.
LAUNCH: dict[str, int | str | None] = {"kernel": None, "block_channels": None, "num_warps": None, "chunk": None,
                                       "tile_scan": None}
TILE_SCANS = ("associative", "sequential")
LAUNCH_ENV = "MAMBADM_TRITON_LAUNCH"
_ENV_KEYS = {"block": "block_channels", "warps": "num_warps", "chunk": "chunk", "tile_scan": "tile_scan"}
_POWERS_OF_TWO = {"block_channels": (1, 256), "num_warps": (1, 32), "chunk": (2, 64)}


@lru_cache(maxsize=1)
def _import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    return None


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_missing(device: torch.device | str) -> str | None:
    """None when the triton backend can run on `device`, else the reason it cannot."""
    missing = _import_error()
    if missing is not None:
        return missing
    if torch.device(device).type == "cuda" or interpreted():
        return None
    return "the triton kernels need CUDA tensors (or TRITON_INTERPRET=1, the slow interpreter used by the tests)"


@lru_cache(maxsize=8)
def _env_launch(text: str) -> dict[str, int | str]:
    """$MAMBADM_TRITON_LAUNCH parsed into LAUNCH's keys; a ValueError naming the variable and the bad item."""
    launch: dict[str, int | str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key.strip() not in _ENV_KEYS:
            raise ValueError(f"${LAUNCH_ENV}: {item!r} is not KEY=VALUE with KEY one of {list(_ENV_KEYS)} (got "
                             f"{text!r})")
        name, value = _ENV_KEYS[key.strip()], value.strip()
        if name == "tile_scan":
            if value not in TILE_SCANS:
                raise ValueError(f"${LAUNCH_ENV}: tile_scan must be one of {list(TILE_SCANS)}, got {value!r}")
            launch[name] = value
            continue
        low, high = _POWERS_OF_TWO[name]
        if not value.isdigit() or int(value) & (int(value) - 1) or not low <= int(value) <= high:
            raise ValueError(f"${LAUNCH_ENV}: {key.strip()} must be a power of two in [{low}, {high}], got {value!r}")
        launch[name] = int(value)
    return launch


def _setting(key: str) -> int | str | None:
    """LAUNCH[key], else the launch $MAMBADM_TRITON_LAUNCH names, else None (the built-in default)."""
    if LAUNCH[key] is not None:
        return LAUNCH[key]
    return _env_launch(os.environ.get(LAUNCH_ENV, "")).get(key)


def _kernel() -> str:
    name = LAUNCH["kernel"] or os.environ.get("MAMBADM_TRITON_SCAN") or "serial"
    if name not in KERNELS:
        raise ValueError(f"triton scan kernel must be one of {list(KERNELS)} (LAUNCH['kernel'] or "
                         f"$MAMBADM_TRITON_SCAN), got {name!r}")
    return name


@lru_cache(maxsize=2)
def _kernels(name: str = "chunked"):
    """(triton, forward kernel, backward kernel) of the pair `name`, imported on first use."""
    import triton

    from mambadm.kernels import triton_scan as k

    return (triton, k.scan_fwd, k.scan_bwd) if name == "serial" else (triton, k.scan_fwd_chunked, k.scan_bwd_chunked)


def _unit_inner(t: Tensor | None) -> Tensor | None:
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _strides(t: Tensor | None) -> tuple[int, int]:
    return (0, 0) if t is None else (t.stride(0), t.stride(1))


def _block(Dn: int, kernel: str = "serial") -> int:
    return _setting("block_channels") or (16 if kernel == "chunked" else (32 if Dn <= 256 else 64))


def _warps() -> int:
    return _setting("num_warps") or 4


def _chunked_flags(kernel: str) -> dict[str, bool]:
    """The chunked kernels' compile-time switch (none for the serial ones)."""
    if kernel != "chunked":
        return {}
    scan = _setting("tile_scan") or ("sequential" if interpreted() else "associative")
    if scan not in TILE_SCANS:
        raise ValueError(f"LAUNCH['tile_scan'] must be one of {list(TILE_SCANS)} or None, got {scan!r}")
    return {"SEQUENTIAL": scan == "sequential"}


def _chunk(kernel: str) -> int:
    """Tokens per chunk: between saved states (serial), or the length of a register tile (chunked)."""
    return CHUNK if kernel == "serial" else (_setting("chunk") or 8)


def _explained(kernel):
    """The kernel launch, with a failure (e.g. a GPU or driver the Triton compiler does not support) re-raised
    saying how to run without it."""
    def launch(*args, **kwargs):
        try:
            return kernel(*args, **kwargs)
        except Exception as exc:
            raise RuntimeError(f"the triton selective scan failed on this device ({type(exc).__name__}: {exc}); "
                               "model.backend=cuda (mamba_ssm) or fast (pure PyTorch) run without it") from exc
    return launch


class _TritonScan(torch.autograd.Function):
    """Rows in the batch-first layout: u, delta, z (R, L, D); B, C (R, L, N); A (D, N); D, delta_bias (D,)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus, return_last, segment):
        kernel = _kernel()
        triton, scan_fwd, _ = _kernels(kernel)
        R, L, Dn = u.shape
        N = A.shape[1]
        chunk = _chunk(kernel)
        n_chunks = triton.cdiv(L, chunk)
        needs_grad = any(ctx.needs_input_grad)
        out = torch.empty(R, L, Dn, device=u.device, dtype=u.dtype)
        f32 = dict(device=u.device, dtype=torch.float32)
        ckpt = torch.empty(R, n_chunks, Dn, N, **f32) if needs_grad else out
        last = torch.empty(R, Dn, N, **f32) if return_last else torch.empty(0, **f32)
        BD = _block(Dn, kernel)
        flags = _chunked_flags(kernel)
        ctx.param_dtypes = tuple(None if t is None else t.dtype for t in (A, D, delta_bias))
        A = A.float().contiguous()
        D = None if D is None else D.contiguous()
        delta_bias = None if delta_bias is None else delta_bias.contiguous()
        launch = _explained(scan_fwd[(R, triton.cdiv(Dn, BD))])
        launch(
            u, delta, z if z is not None else u, B, C, A, D if D is not None else A, delta_bias if delta_bias is not None
            else A, out, ckpt, last, L, Dn, N, segment, n_chunks, *_strides(u), *_strides(delta), *_strides(z),
            *_strides(B), *_strides(C), HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=softplus, SAVE_CKPT=needs_grad, SAVE_LAST=return_last, NP=triton.next_power_of_2(N), BD=BD,
            CHUNK=chunk, num_warps=_warps(), **flags)
        if needs_grad:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, ckpt)
            ctx.flags = (softplus, segment, kernel, chunk, BD, flags)
        return out, last

    @staticmethod
    def backward(ctx, g_out, g_last):
        u, delta, A, B, C, D, z, delta_bias, ckpt = ctx.saved_tensors
        softplus, segment, kernel, chunk, BD, flags = ctx.flags  # as the forward launched (LAUNCH may change between)
        triton, _, scan_bwd = _kernels(kernel)
        g_last = g_last if g_last is not None and g_last.numel() else None
        R, L, Dn = u.shape
        N = A.shape[1]
        NP = triton.next_power_of_2(N)
        n_chunks, n_dblocks = ckpt.shape[1], triton.cdiv(Dn, BD)
        g_out = g_out.contiguous()
        f32 = dict(device=u.device, dtype=torch.float32)
        du = torch.empty_like(u, memory_format=torch.contiguous_format)
        ddelta = torch.empty(R, L, Dn, device=u.device, dtype=delta.dtype)  # rounded as stored: no cast pass after
        dz = torch.empty(R, L, Dn, device=u.device, dtype=z.dtype) if z is not None else du
        dB_part, dC_part = torch.empty(R, L, n_dblocks, N, **f32), torch.empty(R, L, n_dblocks, N, **f32)
        dA_rows, dD_rows, dbias_rows = torch.empty(R, Dn, N, **f32), torch.empty(R, Dn, **f32), torch.empty(R, Dn, **f32)
        scratch = [torch.empty(R * n_dblocks * chunk * BD * NP, **f32)] if kernel == "serial" else []
        launch = _explained(scan_bwd[(R, n_dblocks)])
        launch(
            u, delta, z if z is not None else u, B, C, A, D if D is not None else A, delta_bias if delta_bias is not None
            else A, ckpt, g_out, g_last.contiguous() if g_last is not None else ckpt, du, ddelta, dz, dB_part, dC_part,
            dA_rows, dD_rows, dbias_rows, *scratch, L, Dn, N, segment, n_chunks, n_dblocks, *_strides(u),
            *_strides(delta), *_strides(z), *_strides(B), *_strides(C), HAS_D=D is not None, HAS_Z=z is not None,
            HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus, HAS_GLAST=g_last is not None, NP=NP, BD=BD,
            CHUNK=chunk, num_warps=_warps(), **flags)
        A_dtype, D_dtype, bias_dtype = ctx.param_dtypes
        return (du, ddelta, dA_rows.sum(0).to(A_dtype), dB_part.sum(2).to(B.dtype),
                dC_part.sum(2).to(C.dtype), dD_rows.sum(0).to(D_dtype) if D is not None else None,
                dz if z is not None else None, dbias_rows.sum(0).to(bias_dtype) if delta_bias is not None else None,
                None, None, None)


def selective_scan_triton(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                          z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                          return_last_state: bool = False, segment: int | None = None
                          ) -> Tensor | tuple[Tensor, Tensor]:
    """selective_scan_fn's conventions (u, delta, z (b, d, L); B, C (b, n, L)); `segment`: restart the state every
    `segment` steps from the start. Views of batch-first tensors (what the mixer passes) are read without a copy.
    Computes in float32 whatever the input dtype; returns u's dtype."""
    if segment is not None and (isinstance(segment, bool) or int(segment) < 1):
        raise ValueError(f"selective_scan_triton: segment must be a positive number of steps or None, got {segment}")
    length = u.shape[-1]
    rows = [_unit_inner(t.transpose(1, 2)) if t is not None else None for t in (u, delta, B, C, z)]
    out, last = _TritonScan.apply(rows[0], rows[1], A, rows[2], rows[3], D, rows[4], delta_bias, delta_softplus,
                                  return_last_state, segment or length + 1)
    out = out.transpose(1, 2)
    return (out, last) if return_last_state else out
