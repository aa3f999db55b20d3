"""Every Triton kernel of the project compiles for a Hopper GPU (sm_90: H100, H200) on a machine without one: Triton
lowers each to PTX and runs the ptxas its wheel ships, with the constants and the launch shape the launchers use and
the mixer's flags (D, z, dt bias, softplus), float32 and bfloat16 activations. The interpreter tests check what the
kernels compute; this one checks that a GPU's compiler accepts them (e.g. the chunked scan's tl.associative_scan,
which the interpreter does not run by default) before a device session spends its minutes on them. The launches
`bench_triton_scan.py --pick` tries compile too, each printed with the registers per thread and the spill stores
ptxas reports for it (the pick's list was chosen from these: none spills).

The kernels must be the compiled kind (TRITON_INTERPRET unset when triton is imported), so the test runs this file
as a script in a subprocess."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

TARGET = ("cuda", 90, 32)  # backend, compute capability, warp size
ACTIVATION_PTRS = {"u_ptr", "dl_ptr", "z_ptr", "b_ptr", "c_ptr", "out_ptr", "g_ptr", "du_ptr", "ddl_ptr", "dz_ptr"}


def kernels() -> list[tuple[str, object, dict, int]]:
    """(name, kernel, constexprs, warps) as the launchers launch them at the mixer's shapes (d_inner 1024)."""
    from mambadm.kernels import triton_conv, triton_scan
    from mambadm.ssm import conv_triton, scan_triton

    conv = dict(HAS_BIAS=True, K=4, BT=conv_triton.BLOCK_TOKENS, BD=conv_triton.BLOCK_CHANNELS)
    found = [("conv fwd", triton_conv.conv_silu_fwd, conv, 4), ("conv bwd", triton_conv.conv_silu_bwd, conv, 4)]
    mixer = dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, NP=16)
    for pair, fwd, bwd in (("serial", triton_scan.scan_fwd, triton_scan.scan_bwd),
                           ("chunked", triton_scan.scan_fwd_chunked, triton_scan.scan_bwd_chunked)):
        shape = dict(BD=scan_triton._block(1024, pair), CHUNK=scan_triton._chunk(pair))
        for sequential in ((False, True) if pair == "chunked" else (None,)):
            flags = {} if sequential is None else {"SEQUENTIAL": sequential}
            tag = pair if sequential is None else f"{pair}, {'sequential' if sequential else 'associative'}"
            found.append((f"scan fwd ({tag})", fwd, {**mixer, **shape, **flags, "SAVE_CKPT": True, "SAVE_LAST": False},
                          scan_triton._warps()))
            found.append((f"scan bwd ({tag})", bwd, {**mixer, **shape, **flags, "HAS_GLAST": False},
                          scan_triton._warps()))
    return found


def candidates() -> list[tuple[str, object, dict, int]]:
    """The scan launches `bench_triton_scan.py --pick` tries on a GPU (PICK_CANDIDATES), as that run compiles them:
    bfloat16 activations, the associative tile scan."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_triton_scan import PICK_CANDIDATES

    from mambadm.kernels import triton_scan
    from mambadm.ssm import scan_triton

    mixer = dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, NP=16)
    found = []
    for pair, block, warps, chunk in PICK_CANDIDATES:
        fwd, bwd = ((triton_scan.scan_fwd, triton_scan.scan_bwd) if pair == "serial" else
                    (triton_scan.scan_fwd_chunked, triton_scan.scan_bwd_chunked))
        shape = dict(BD=block, CHUNK=chunk or scan_triton.CHUNK, **({} if pair == "serial" else {"SEQUENTIAL": False}))
        name = f"{pair} block {block} warps {warps} chunk {chunk}"
        found.append((f"{name} fwd", fwd, {**mixer, **shape, "SAVE_CKPT": True, "SAVE_LAST": False}, warps))
        found.append((f"{name} bwd", bwd, {**mixer, **shape, "HAS_GLAST": False}, warps))
    return found


def ptxas_usage(ptx: str) -> tuple[int, int]:
    """(registers per thread, spill store bytes) of a kernel's PTX for sm_90, from the ptxas Triton's wheel ships."""
    import triton

    binaries = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    log = f"no ptxas in {binaries}"
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "k.ptx").write_text(ptx)
        for ptxas in ("ptxas-blackwell", "ptxas"):  # Triton 3.5 on ships two; the newer one reads its newer PTX
            if (binaries / ptxas).is_file():
                done = subprocess.run([str(binaries / ptxas), "-v", "--gpu-name=sm_90a", "k.ptx", "-o", "k.o"],
                                      cwd=tmp, capture_output=True, text=True)
                log = done.stderr
                if done.returncode == 0:
                    break
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    assert registers and spills, log
    return int(registers.group(1)), int(spills.group(1))


def source(kernel, constexprs: dict, activations: str):
    """The kernel as Triton's compiler takes it: pointer and integer types by argument name, the constexprs' values.
    Newer Triton (3.4 on, checked) names the constexprs in the signature (`constexprs=`); 3.0-3.2 take `constants=`."""
    from triton.compiler import ASTSource

    types = {p.name: (f"*{activations}" if p.name in ACTIVATION_PTRS else "*fp32") if p.name.endswith("_ptr")
             else "i32" for p in kernel.params if not p.is_constexpr}
    try:
        return ASTSource(fn=kernel, signature={p.name: types.get(p.name, "constexpr") for p in kernel.params},
                         constexprs=constexprs)
    except TypeError:  # an older triton
        return ASTSource(fn=kernel, signature=types, constants=constexprs)


def compile_all() -> None:
    import triton
    from triton.backends.compiler import GPUTarget

    print(f"triton {triton.__version__}", flush=True)
    for activations in ("fp32", "bf16"):
        for name, kernel, constexprs, warps in kernels():
            compiled = triton.compile(source(kernel, constexprs, activations), target=GPUTarget(*TARGET),
                                      options={"num_warps": warps})
            assert compiled.asm["cubin"], name
            print(f"compiled {name} {activations}", flush=True)
    print("| scan launch (bench_triton_scan.py --pick), bf16 | registers / thread | spill stores (bytes) |\n|---|---|---|")
    for name, kernel, constexprs, warps in candidates():
        compiled = triton.compile(source(kernel, constexprs, "bf16"), target=GPUTarget(*TARGET),
                                  options={"num_warps": warps})
        registers, spills = ptxas_usage(compiled.asm["ptx"])
        print(f"| {name} | {registers} | {spills} |", flush=True)


def test_every_triton_kernel_compiles_for_hopper():
    pytest.importorskip("triton.backends.nvidia")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1", "CUDA_VISIBLE_DEVICES": ""}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = f"{root}{os.pathsep}{env.get('PYTHONPATH', '')}"
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert done.stdout.count("compiled ") == 2 * len(kernels()), done.stdout
    usage = [line.split("|")[1:4] for line in done.stdout.splitlines() if line.startswith("| chunked") or
             line.startswith("| serial")]
    assert len(usage) == len(candidates()), done.stdout  # every launch the GPU run tries compiles
    assert all(0 < int(registers) <= 255 for _, registers, _ in usage), done.stdout
    print(done.stdout)


if __name__ == "__main__":
    compile_all()
