"""The `cuda` backend: mamba_ssm's fused kernels, imported lazily and only when present.

mamba_ssm needs CUDA (and triton) to import at all, so nothing here is imported at module load. `cuda_missing()`
says why the backend cannot be used (None when it can); the kernels are fetched on first use.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Callable

import torch


@lru_cache(maxsize=1)
def _import_error() -> str | None:
    try:
        import mamba_ssm.ops.selective_scan_interface  # noqa: F401
    except Exception as exc:  # ImportError, or a CUDA/triton failure raised while importing
        return f"mamba_ssm is not importable ({type(exc).__name__}: {exc})"
    return None


def cuda_missing() -> str | None:
    """None when the cuda backend can run here, else the reason it cannot."""
    if not torch.cuda.is_available():
        return "no CUDA device is available (torch.cuda.is_available() is False)"
    return _import_error()


def selective_scan_cuda() -> Callable:
    """mamba_ssm's `selective_scan_fn`."""
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    return selective_scan_fn


def causal_conv1d_cuda() -> Callable | None:
    """`causal_conv1d_fn` from the causal-conv1d package, or None when it is not installed."""
    try:
        from causal_conv1d import causal_conv1d_fn
    except ImportError:
        return None
    return causal_conv1d_fn
