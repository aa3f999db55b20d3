"""The Mamba mixer (mamba_ssm's parameter layout), its backends as objects (ref / fast / cpp / cuda / triton) and
the segment masks of its recurrent step."""
from mambadm.ssm.backends import (BACKENDS, Backend, BackendUnavailableError, available_backends, resolve_backend,
                                  selective_scan)
from mambadm.ssm.mixer import Mamba, MambaCache
from mambadm.ssm.segments import SegmentMasks

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendUnavailableError",
    "Mamba",
    "MambaCache",
    "SegmentMasks",
    "available_backends",
    "resolve_backend",
    "selective_scan",
]
