"""The selective-scan backends as objects, the rule that picks one, and the public `selective_scan` entry point.

Each backend offers the two sequence ops of the mixer on batch-first tensors (the layout the projections produce):
`conv(u, weight, bias, segment)` = SiLU(causal depthwise conv) and `scan(u, delta, A, B, C, ...)`, the selective
scan. It declares whether each restarts at window starts (`segment`) in place; where one does not, its op runs on
the windows folded into the batch (`conv.per_window`), here and nowhere else.

`ref`  sequential loop (scan_ref.py), the ground truth;
`fast` chunked pure-PyTorch scan with a hand-written backward (scan_fast.py), runs anywhere PyTorch does;
`cpp`  fused C++ CPU kernels (scan_cpp.py, built by mambadm/kernels/build.py where a C++ compiler and ninja are);
`cuda` mamba_ssm's fused kernel (scan_cuda.py), only when mamba_ssm imports and the tensors are on CUDA;
`triton` a Triton kernel for short rows (scan_triton.py), on CUDA tensors where triton imports; its conv fused in
         Triton too with $MAMBADM_TRITON_FUSED=1 (conv_triton.py);
`auto` on a GPU triton when it imports, else cuda, else fast; on a CPU cpp when it builds, else fast.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from mambadm.kernels.build import cpp_missing
from mambadm.ssm.conv import causal_depthwise_conv, per_window
from mambadm.ssm.conv_triton import causal_conv_silu_triton, fused_conv_enabled
from mambadm.ssm.scan_cpp import DEFAULT_CHUNK, causal_conv_silu_cpp, io_dtype, scan_rows, segment_keep
from mambadm.ssm.scan_cuda import causal_conv1d_cuda, cuda_missing, selective_scan_cuda
from mambadm.ssm.scan_fast import selective_scan_fast
from mambadm.ssm.scan_ref import compute_dtype, selective_scan_ref
from mambadm.ssm.scan_triton import selective_scan_triton, triton_missing

BACKENDS = ("auto", "ref", "fast", "cpp", "cuda", "triton")


class BackendUnavailableError(RuntimeError):
    """A backend was asked for explicitly but cannot run here."""


class Backend:
    """A concrete backend. Sequence tensors are batch-first: u, delta, z (b, L, d_inner), or delta (b, L, R) with
    delta_proj (d_inner, R); B, C (b, L, d_state); A (d_inner, d_state); D, delta_bias (d_inner,)."""

    name = ""
    conv_segments = True  # conv restarts at window starts in place
    scan_segments = False  # scan restarts at window starts in place

    def conv(self, u: Tensor, weight: Tensor, bias: Tensor | None, segment: int | None = None) -> Tensor:
        """SiLU(causal depthwise conv) of u (b, L, c) with nn.Conv1d's weight (c, 1, K) and bias (c,) -> (b, L, c);
        `segment`: windows of `segment` steps from the start, each convolved as its own sequence."""
        if segment is not None and not self.conv_segments:
            return per_window(lambda v: self._conv(v, weight, bias, None), segment, u)
        return self._conv(u, weight, bias, segment)

    def _conv(self, u: Tensor, weight: Tensor, bias: Tensor | None, segment: int | None) -> Tensor:
        return F.silu(causal_depthwise_conv(u, weight, bias, segment))

    def scan(self, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
             z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
             delta_proj: Tensor | None = None, segment: int | None = None, return_last_state: bool = False
             ) -> Tensor | tuple[Tensor, Tensor]:
        """out (b, L, d_inner) in u's dtype [, last state (b, d_inner, d_state)]; `segment`: the state restarts
        every `segment` steps (windows aligned to the start, each as its own sequence)."""
        params = dict(A=A, D=D, delta_bias=delta_bias, delta_softplus=delta_softplus, delta_proj=delta_proj)
        if segment is None or self.scan_segments:
            out, last = self._scan(u, delta, B, C, z, segment=segment, return_last_state=return_last_state, **params)
            return (out, last) if return_last_state else out
        if return_last_state:
            raise ValueError(f"selective_scan: the {self.name!r} backend runs windows folded into the batch and has "
                             "no last state with segment; use backend 'cpp' or 'triton', or segment=None")
        return per_window(lambda *seqs: self._scan(*seqs, segment=None, return_last_state=False, **params)[0],
                          segment, u, delta, B, C, z)

    def _scan(self, u, delta, B, C, z, *, A, D, delta_bias, delta_softplus, delta_proj, segment,
              return_last_state) -> tuple[Tensor, Tensor | None]:
        """The backend's channel-first function (scan_ref.py's conventions) on transposed views: no copies."""
        if delta_proj is not None:
            delta = F.linear(delta, delta_proj)
        extra = {} if segment is None else {"segment": segment}
        result = self.channel_first()(u.transpose(1, 2), delta.transpose(1, 2), A, B.transpose(1, 2),
                                      C.transpose(1, 2), D, None if z is None else z.transpose(1, 2), delta_bias,
                                      delta_softplus, return_last_state, **extra)
        out, last = result if return_last_state else (result, None)
        return out.transpose(1, 2), last

    def channel_first(self) -> Callable:
        raise NotImplementedError


class RefBackend(Backend):
    name = "ref"

    def channel_first(self) -> Callable:
        return selective_scan_ref


class FastBackend(Backend):
    """`chunk`: steps per chunk of the scan (None: chosen from the shapes)."""

    name = "fast"

    def __init__(self, chunk: int | None = None) -> None:
        self.chunk = chunk

    def channel_first(self) -> Callable:
        return lambda *args: selective_scan_fast(*args, chunk=self.chunk)


class CppBackend(Backend):
    """The fused CPU kernels on the batch-first tensors as they are (their own layout): no transposed views in and
    out, so autograd adds the two gradients of the mixer's u (from x_proj and from the scan) in place, and no
    argument checks (`selective_scan` checks the shapes; the mixer's tensors are its own): ~4% of a K=8 training
    step at d_model 64 against going through transposed views and `check_rows` (benchmarks/RESULTS.md). bfloat16
    sequence tensors go in and come out as they are. `chunk`: steps between the states the backward restarts from."""

    name = "cpp"
    scan_segments = True

    def __init__(self, chunk: int | None = None) -> None:
        if chunk is not None and chunk < 1:
            raise ValueError(f"CppBackend: chunk must be a positive number of steps or None, got {chunk}")
        self.chunk = chunk or DEFAULT_CHUNK

    def _conv(self, u, weight, bias, segment):
        return causal_conv_silu_cpp(u, weight, bias, segment)

    def _scan(self, u, delta, B, C, z, *, A, D, delta_bias, delta_softplus, delta_proj, segment,
              return_last_state) -> tuple[Tensor, Tensor | None]:
        dtype = compute_dtype(u)
        same = all(t is None or t.dtype == u.dtype for t in (delta, B, C, z))
        io = io_dtype(u) if same else dtype
        cast = lambda t, to: None if t is None else t.to(to)  # noqa: E731
        out, last = scan_rows(
            u.to(io), delta.to(io), A.to(dtype)[None], B.to(io), C.to(io), cast(D, dtype), cast(z, io),
            cast(delta_bias, dtype), delta_softplus=delta_softplus, chunk=self.chunk, check=False,
            keep=segment_keep(u.shape[0], u.shape[1], segment, u.device), delta_proj=cast(delta_proj, dtype),
        )
        return out.to(u.dtype), last


class CudaBackend(Backend):
    name = "cuda"
    conv_segments = False

    def _conv(self, u, weight, bias, segment):
        """causal_conv1d_fn when installed, else F.conv1d, on a contiguous (b, c, L) copy (the GPU kernels'
        layout)."""
        x = u.transpose(1, 2).contiguous()
        causal_conv1d_fn = causal_conv1d_cuda()
        if causal_conv1d_fn is not None:
            out = causal_conv1d_fn(x, weight.squeeze(1), bias, activation="silu")
        else:
            out = F.silu(F.conv1d(x, weight, bias, padding=weight.shape[-1] - 1, groups=x.shape[1])[..., : x.shape[-1]])
        return out.transpose(1, 2)

    def channel_first(self) -> Callable:
        return selective_scan_cuda()


class TritonBackend(Backend):
    """The Triton scan (scan_triton.py); its conv is the PyTorch one, or with $MAMBADM_TRITON_FUSED=1 the fused
    Triton conv + SiLU (conv_triton.py, off until a GPU session has tested and timed it)."""

    name = "triton"
    scan_segments = True

    def _conv(self, u, weight, bias, segment):
        if fused_conv_enabled():
            return causal_conv_silu_triton(u, weight, bias, segment)
        return super()._conv(u, weight, bias, segment)

    def channel_first(self) -> Callable:
        return selective_scan_triton


BACKEND_OBJECTS: dict[str, Backend] = {b.name: b for b in (RefBackend(), FastBackend(), CppBackend(), CudaBackend(),
                                                           TritonBackend())}


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Concrete backends that can run on `device` (default: CUDA if present, else CPU)."""
    names = ["ref", "fast"]
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(device).type == "cpu" and cpp_missing() is None:
        names.append("cpp")
    if torch.device(device).type == "cuda" and cuda_missing() is None:
        names.append("cuda")
    if torch.device(device).type == "cuda" and triton_missing(device) is None:
        names.append("triton")
    return names


def resolve_backend(name: str, device: torch.device | str) -> tuple[str, str]:
    """(concrete backend, reason) for a requested name on `device`; raises if an explicit request cannot run."""
    if name not in BACKENDS:
        raise ValueError(f"unknown selective-scan backend {name!r}; expected one of {BACKENDS}")
    device = torch.device(device)
    if name == "cuda":
        missing = cuda_missing()
        if missing is not None:
            raise BackendUnavailableError(f"backend='cuda' requested but {missing}; use backend='fast' or 'auto'")
        if device.type != "cuda":
            raise BackendUnavailableError(
                f"backend='cuda' requested but the tensors are on {device}; move the module to CUDA or use 'fast'"
            )
        return "cuda", "requested"
    if name == "cpp":
        if device.type != "cpu":
            raise BackendUnavailableError(
                f"backend='cpp' requested but the tensors are on {device}; it runs on the CPU only"
            )
        missing = cpp_missing()
        if missing is not None:
            raise BackendUnavailableError(f"backend='cpp' requested but {missing}; use backend='fast' or 'auto'")
        return "cpp", "requested"
    if name == "triton":
        missing = triton_missing(device)
        if missing is not None:
            raise BackendUnavailableError(f"backend='triton' requested but {missing}; use backend='fast' or 'auto'")
        return "triton", "requested"
    if name != "auto":
        return name, "requested"
    if device.type == "cpu":
        missing = cpp_missing()
        if missing is not None:
            return "fast", f"auto: {missing}"
        return "cpp", "auto: device is cpu and the CPU kernel is built"
    if device.type != "cuda":
        return "fast", f"auto: device is {device.type}"
    if triton_missing(device) is None:
        return "triton", "auto: device is CUDA and triton imports"
    missing = cuda_missing()
    if missing is not None:
        return "fast", f"auto: {missing}"
    return "cuda", "auto: mamba_ssm importable and device is CUDA"


def selective_scan(
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
    backend: str | Backend = "auto",
    segment: int | None = None,
    delta_proj: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Selective scan with mamba_ssm's `selective_scan_fn` conventions (see scan_ref.py for shapes), through the same
    `Backend.scan` the mixer calls (on batch-first views of the arguments).

    `backend`: a name (resolved on u's device) or a `Backend` object. `segment`: the state restarts every `segment`
    steps, windows aligned to the start (cpp and triton in place, the others on the windows folded into the batch).
    `delta_proj` (d_inner, R): delta is (batch, R, L), the low-rank step sizes before the mixer's dt_proj, and the
    step sizes are delta_proj @ delta: `cpp` computes them inside its kernels (neither they nor their gradient are
    ever stored), the other backends take the product first.
    """
    _check_shapes(u, delta, A, B, C, D, z, delta_bias, delta_proj)
    if segment is not None and (isinstance(segment, bool) or int(segment) < 1):
        raise ValueError(f"selective_scan: segment must be a positive number of steps or None, got {segment!r}")
    impl = backend if isinstance(backend, Backend) else BACKEND_OBJECTS[resolve_backend(backend, u.device)[0]]
    result = impl.scan(u.transpose(1, 2), delta.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), D,
                       None if z is None else z.transpose(1, 2), delta_bias, delta_softplus, delta_proj, segment,
                       return_last_state)
    if return_last_state:
        return result[0].transpose(1, 2), result[1]
    return result.transpose(1, 2)


def _check_shapes(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D, z, delta_bias, delta_proj) -> None:
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, d_inner, L), got shape {tuple(u.shape)}")
    batch, d_inner, length = u.shape
    if A.dim() != 2 or A.shape[0] != d_inner:
        raise ValueError(f"A must be (d_inner={d_inner}, d_state), got shape {tuple(A.shape)}")
    if delta_proj is not None and (delta_proj.dim() != 2 or delta_proj.shape[0] != d_inner):
        raise ValueError(f"selective_scan: delta_proj must be (d_inner={d_inner}, R), got {tuple(delta_proj.shape)}")
    expected = {
        "delta": (delta, (batch, d_inner if delta_proj is None else delta_proj.shape[1], length)),
        "B": (B, (batch, A.shape[1], length)),
        "C": (C, (batch, A.shape[1], length)),
        "D": (D, (d_inner,)),
        "z": (z, (batch, d_inner, length)),
        "delta_bias": (delta_bias, (d_inner,)),
    }
    for key, (tensor, shape) in expected.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"selective_scan: {key} must have shape {shape}, got {tuple(tensor.shape)}")
