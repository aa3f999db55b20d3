"""Builds and loads the CPU extension: csrc/mamba_cpu.cpp (the `cpp` backend's scan and conv kernels, as the ops
`torch.ops.mambadm_cpu.*`) and csrc/gloma_step.cpp (MambaDM's acting step, the class
`torch.classes.mambadm_cpu.GLoMaStack`, which calls the scan forward directly through csrc/mamba_cpu.h).

The sources are compiled once per machine with `torch.utils.cpp_extension.load` (a C++ compiler and ninja are
needed; the build lands in torch's extension cache, ~/.cache/torch_extensions or $TORCH_EXTENSIONS_DIR, and later
processes only load it; MAMBADM_NO_CPP_KERNELS=1 turns them off). Flags: -O3 and fast-math for the compile step
only (it lets the compiler vectorise the per-channel `exp` / `log1p` calls; the linked library does not change the
process's floating-point mode), plus the vector ISA torch detects on this CPU. The ISA is part of the extension's
name, so machines sharing one cache never load a build made for another CPU. On Linux also -fopenmp:
`at::parallel_for` is a header template compiled into the extension, and without OpenMP it runs every row on the
calling thread (the kernels ignored `torch.set_num_threads`). Where torch ships its libgomp under the system's
soname (libgomp.so.1, as the CPU wheels used here do) the extension binds to the runtime torch has already loaded:
one thread pool.
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

logger = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = (CSRC / "mamba_cpu.cpp", CSRC / "gloma_step.cpp")
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
    """None when the extension is built and loaded (building it now if needed), else why it cannot be."""
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


def cpp_ops():
    """`torch.ops.mambadm_cpu` (scan_forward, scan_backward, conv_forward, conv_backward); raises RuntimeError saying
    why when the extension cannot be built."""
    missing = cpp_missing()
    if missing is not None:
        raise RuntimeError(missing)
    return _state["ops"]


def gloma_stack_class():
    """The registered C++ class `GLoMaStack` of csrc/gloma_step.cpp; raises RuntimeError saying why when the
    extension cannot be built."""
    cpp_ops()
    return torch.classes.mambadm_cpu.GLoMaStack
