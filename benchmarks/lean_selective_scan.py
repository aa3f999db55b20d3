"""Trims an unpacked mamba-ssm source tree so its selective-scan extension builds several times faster.

    python benchmarks/lean_selective_scan.py MAMBA_SSM_SRC_DIR

Keeps only what MambaDM's `cuda` backend calls: float32 and bfloat16 inputs with a real float32 A (the float16 and
complex instantiations are dropped), and kernels specialised for variable B and C, a gate z and delta_softplus
(the Mamba block's case; mamba_ssm's own `Mamba` module calls it the same way). Each pinned switch keeps its runtime
condition as a TORCH_CHECK, so any other call fails with a clear error instead of computing something else.
Idempotent: a tree already trimmed is left as it is. Used by build_cuda_kernels.sh when LEAN=1.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

PINNED = ("params.is_variable_B, kIsVariableB", "params.is_variable_C, kIsVariableC",
          "params.delta_softplus, kDeltaSoftplus", "params.z_ptr != nullptr , kHasZ")
TRUE_ONLY_SWITCH = r"""
#define TRUE_ONLY_SWITCH(COND, CONST_NAME, ...)                                                           \
    [&] {                                                                                                 \
        TORCH_CHECK((COND), "selective_scan_cuda was built lean (LEAN=1): only " #CONST_NAME " = true"); \
        constexpr bool CONST_NAME = true;                                                                 \
        return __VA_ARGS__();                                                                             \
    }()
"""


def drop_branch(lines: list[str], marker: str) -> None:
    """Removes the 3-line `if (...) { using ...; __VA_ARGS__(); ` branch that starts at the line holding `marker`."""
    i = next((i for i, line in enumerate(lines) if marker in line), None)
    if i is None:
        raise SystemExit(f"selective_scan.cpp: {marker!r} not found; this mamba-ssm version is not supported")
    if "} else if" not in lines[i]:  # the first branch of the chain: the next one becomes the `if`
        lines[i + 3] = lines[i + 3].replace("} else if", "if", 1)
    del lines[i:i + 3]


def trim(root: Path) -> None:
    csrc = root / "csrc" / "selective_scan"
    switch = csrc / "static_switch.h"
    if not switch.is_file() or not (root / "setup.py").is_file():
        raise SystemExit(f"{root}: not an unpacked mamba-ssm source tree ({switch} or setup.py missing)")
    if "TRUE_ONLY_SWITCH" in switch.read_text():
        return
    for name in ("selective_scan_fwd_kernel.cuh", "selective_scan_bwd_kernel.cuh"):
        path = csrc / name
        text = path.read_text()
        for cond in PINNED:
            text = text.replace(f"BOOL_SWITCH({cond}", f"TRUE_ONLY_SWITCH({cond}")
        path.write_text(text)
    cpp = csrc / "selective_scan.cpp"
    lines = cpp.read_text().split("\n")
    drop_branch(lines, "if (ITYPE == at::ScalarType::Half)")
    drop_branch(lines, "(WTYPE == at::ScalarType::ComplexFloat)")
    cpp.write_text("\n".join(lines))
    for name in ("selective_scan_fwd_fp32.cu", "selective_scan_fwd_bf16.cu"):
        path = csrc / name
        path.write_text("\n".join(line for line in path.read_text().split("\n") if "complex_t>" not in line))
    setup = root / "setup.py"
    dropped = re.compile(r"csrc/selective_scan/selective_scan_\w*(fp16|complex)\w*\.cu")
    setup.write_text("\n".join(line for line in setup.read_text().split("\n") if not dropped.search(line)))
    switch.write_text(switch.read_text() + TRUE_ONLY_SWITCH)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    trim(Path(sys.argv[1]))
