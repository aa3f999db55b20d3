"""Trims an unpacked causal-conv1d source tree so its extension builds many times faster.

    python benchmarks/lean_causal_conv1d.py CAUSAL_CONV1D_SRC_DIR

Keeps only what MambaDM's `cuda` backend calls: kernel width 4 (d_conv 4), the (batch, dim, L) layout, inputs in
float32 or bfloat16 and weights in float32 or bfloat16. The channel-last kernels, widths 2 and 3 and every float16
pair are not instantiated; each dispatcher checks its condition with TORCH_CHECK, so any other call fails with a clear
error instead of computing something else. Idempotent. Used by build_cuda_kernels.sh when LEAN=1.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

MARK = "// trimmed to width 4 (LEAN=1)"
KEPT = ("(std::is_same_v<input_t, float> || std::is_same_v<input_t, at::BFloat16>) && "
        "(std::is_same_v<weight_t, float> || std::is_same_v<weight_t, at::BFloat16>)")
# The width dispatch every *_cuda entry point has: one launch per width 2, 3, 4.
DISPATCH = re.compile(
    r"    if \(params\.width == 2\) \{\n        (?P<launch>\w+)<(?P<threads>\d+), 2, input_t, weight_t>\(params, stream\);\n"
    r"    \} else if \(params\.width == 3\) \{\n.*?\n    \} else if \(params\.width == 4\) \{\n.*?\n    \}\n")


def lean_dispatch(match: re.Match) -> str:
    launch, threads = match["launch"], match["threads"]
    if "channellast" in launch:
        return (f'    {MARK}\n    TORCH_CHECK(false, "causal_conv1d_cuda was built lean (LEAN=1): '
                f'no channel-last kernels");\n')
    return (f"    {MARK}\n    if constexpr ({KEPT}) {{\n"
            f'        TORCH_CHECK(params.width == 4, "causal_conv1d_cuda was built lean (LEAN=1): width 4 only");\n'
            f"        {launch}<{threads}, 4, input_t, weight_t>(params, stream);\n    }} else {{\n"
            f'        TORCH_CHECK(false, "causal_conv1d_cuda was built lean (LEAN=1): '
            f'float32 / bfloat16 inputs and weights only");\n    }}\n')


def trim(root: Path) -> None:
    csrc = root / "csrc"
    expected = {"causal_conv1d_fwd.cu": 2, "causal_conv1d_bwd.cu": 2, "causal_conv1d_update.cu": 1}
    for name, count in expected.items():
        path = csrc / name
        if not path.is_file():
            raise SystemExit(f"{root}: not an unpacked causal-conv1d source tree ({path} missing)")
        text = path.read_text()
        if MARK in text:
            continue
        text, n = DISPATCH.subn(lean_dispatch, text)
        if n != count:
            raise SystemExit(f"{path}: found {n} width dispatches, expected {count}; this causal-conv1d version "
                             "is not supported")
        path.write_text("#include <type_traits>\n" + text)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    trim(Path(sys.argv[1]))
