"""The Mamba mixer (mamba_ssm's parameter layout) and its selective-scan backends ref / fast / cuda."""
from mambadm.ssm.backends import BackendUnavailableError, available_backends, resolve_backend, selective_scan
from mambadm.ssm.mixer import Mamba, MambaCache

__all__ = [
    "BackendUnavailableError",
    "Mamba",
    "MambaCache",
    "available_backends",
    "resolve_backend",
    "selective_scan",
]
