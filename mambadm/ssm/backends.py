"""One entry point over the selective-scan backends, and the rule that picks one.

`ref`  sequential loop (scan_ref.py), the ground truth;
`fast` chunked pure-PyTorch scan with a hand-written backward (scan_fast.py), runs anywhere PyTorch does;
`cpp`  fused C++ CPU kernel (scan_cpp.py), built on first use where a C++ compiler and ninja are present;
`cuda` mamba_ssm's fused kernel (scan_cuda.py), only when mamba_ssm imports and the tensors are on CUDA;
`triton` a Triton kernel for short rows (scan_triton.py), on CUDA tensors where triton imports;
`auto` on a GPU triton when it imports, else cuda, else fast; on a CPU cpp when it builds, else fast.
"""
from __future__ import annotations

import torch
from torch import Tensor

from mambadm.ssm.scan_cpp import cpp_missing, selective_scan_cpp
from mambadm.ssm.scan_cuda import cuda_missing, selective_scan_cuda
from mambadm.ssm.scan_fast import selective_scan_fast
from mambadm.ssm.scan_ref import project_delta, selective_scan_ref
from mambadm.ssm.scan_triton import selective_scan_triton, triton_missing

BACKENDS = ("auto", "ref", "fast", "cpp", "cuda", "triton")
SEGMENTED = ("cpp", "triton")  # the backends that restart the state every `segment` steps in place


class BackendUnavailableError(RuntimeError):
    """A backend was asked for explicitly but cannot run here."""


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
    backend: str = "auto",
    segment: int | None = None,
    delta_proj: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Selective scan with mamba_ssm's `selective_scan_fn` conventions (see scan_ref.py for shapes).

    `segment` (cpp and triton): the state restarts every `segment` steps, windows aligned to the start. The
    mixer runs the other backends on the windows folded into the batch instead (`Mamba.forward`).
    `delta_proj` (d_inner, R): delta is (batch, R, L), the low-rank step sizes before the mixer's dt_proj, and the
    step sizes are delta_proj @ delta: `cpp` computes them inside its kernels (neither they nor their gradient are
    ever stored), the other backends take the product first.
    """
    _check_shapes(u, delta, A, B, C, D, z, delta_bias, delta_proj)
    name, _ = resolve_backend(backend, u.device)
    if name == "cpp":
        return selective_scan_cpp(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                  segment=segment, delta_proj=delta_proj)
    delta = project_delta(delta, delta_proj)
    if segment is not None:
        if name not in SEGMENTED:
            raise ValueError(f"selective_scan: segment is supported by the {' and '.join(SEGMENTED)} backends only,"
                             f" not {name!r}")
        return selective_scan_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                     segment=segment)
    if name == "ref":
        fn = selective_scan_ref
    elif name == "fast":
        fn = selective_scan_fast
    elif name == "triton":
        fn = selective_scan_triton
    else:
        fn = selective_scan_cuda()
    return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


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
