"""Builds and loads the CPU extension: csrc/mamba_cpu.cpp (the `cpp` backend's scan and conv kernels, as the ops
`torch.ops.mambadm_cpu.*`) and csrc/gloma_step.cpp (MambaDM's acting step, the class
`torch.classes.mambadm_cpu.GLoMaStack`, which calls the scan forward directly through csrc/mamba_cpu.h).

The sources are compiled once per machine with `torch.utils.cpp_extension.load` (a C++ compiler and ninja are
needed; the build lands in torch's extension cache, ~/.cache/torch_extensions or $TORCH_EXTENSIONS_DIR, and later
processes only load it; MAMBADM_NO_CPP_KERNELS=1 turns them off). Flags: -O3 and fast-math for the compile step
only (it lets the compiler vectorise the per-channel `exp` / `log1p` calls; the linked library does not change the
process's floating-point mode), plus the vector ISA torch detects on this CPU. The ISA and a digest of the sources
and flags are part of the extension's name (`build_name`), so machines sharing one cache never load a build made for
another CPU, and two source trees (another checkout, an older commit a benchmark runs beside this one) never
rebuild over each other's build directory in turn. On Linux also -fopenmp:
`at::parallel_for` is a header template compiled into the extension, and without OpenMP it runs every row on the
calling thread (the kernels ignored `torch.set_num_threads`). Where torch ships its libgomp under the system's
soname (libgomp.so.1, as the CPU wheels used here do) the extension binds to the runtime torch has already loaded:
one thread pool.
"""
from __future__ import annotations

import logging
import hashlib
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


def build_name(isa: str, flags: list[str], sources: tuple[Path, ...] = SOURCES) -> str:
    """The extension's name: its ISA and the first 10 hex digits of a sha256 over the flags and every source's bytes
    (the header included), so a changed source or flag gets a build directory of its own."""
    digest = hashlib.sha256(" ".join(flags).encode())
    for path in (*sources, CSRC / "mamba_cpu.h"):
        digest.update(path.read_bytes())
    return f"mambadm_cpu_{isa}_{digest.hexdigest()[:10]}"


def _put_ninja_on_path() -> None:
    """torch runs `ninja` from PATH: add the `ninja` wheel's binary when no system ninja is there (e.g. a venv that
    is not activated)."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _wait_for_build_lock(name: str, poll_s: float = 0.5) -> None:
    """torch serialises builds with a lock file in the build directory, and a process that finds it waits for it
    forever; a process killed while building leaves it behind. Wait here instead: until the lock is gone (another
    process finished building), or until it is older than STALE_LOCK_SECONDS, then remove it, saying so."""
    from torch.utils import cpp_extension

    try:
        lock = Path(cpp_extension._get_build_directory(name, verbose=False)) / "lock"
    except AttributeError:  # a torch without this helper: leave the waiting to torch
        return
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except OSError:  # no lock: the usual case
            return
        if age > STALE_LOCK_SECONDS:
            logger.warning("removing a stale build lock left by a killed build: %s", lock)
            lock.unlink(missing_ok=True)
            return
        time.sleep(poll_s)


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
            isa, isa_flags = _isa_flags()
            cflags = ["-O3", "-ffast-math", "-fopenmp-simd", *isa_flags, *_openmp_flags()]
            name = build_name(isa, cflags)
            _wait_for_build_lock(name)
            logger.info("building/loading the CPU Mamba kernels (%s); a first build takes ~10-60 s", isa)
            cpp_extension.load(
                name=name,
                sources=[str(s) for s in SOURCES],
                extra_include_paths=[str(CSRC)],
                extra_cflags=cflags,
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
