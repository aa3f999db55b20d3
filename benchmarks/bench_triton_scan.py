"""Launch-shape sweep of the `triton` selective scan on a GPU: channels per program x warps per program.

    python benchmarks/bench_triton_scan.py [--blocks 16 32 64 128] [--warps 1 2 4 8] [--device cuda]

For each shape (rows, tokens, d_inner, segment) the scan's forward + backward (bf16 activations, float32 A, D and
dt bias, softplus, z gate: the mixer under autocast) is timed with CUDA events, median of 20 after 3 warm-ups, for
every (block, warps); the table gives ms and the speed-up over the default launch (scan_triton._block / _warps), and
checks each launch's output and gradients against the default's (max relative difference), so a launch that
computes something else shows. Shapes: MambaDM xxl at K = 30 and batch 256 (global branch: rows of 90 tokens;
local: the same rows restarted every 15), and one long row set (16 x 3072). --device cpu: a dry run of the script
in Triton's interpreter (set TRITON_INTERPRET=1), at tiny shapes.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mambadm.ssm import scan_triton  # noqa: E402
from mambadm.ssm.scan_triton import selective_scan_triton  # noqa: E402

SHAPES = [(256, 90, 1024, None), (256, 90, 1024, 15), (16, 3072, 1024, None)]  # rows, L, d_inner, segment


def make_inputs(rows: int, length: int, d_inner: int, device: str, d_state: int = 16) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)

    def act(*shape, scale=1.0):  # activations: bf16 as under autocast, as the mixer's (b, channels, L) views
        return (torch.randn(*shape, generator=g) * scale).to(device, torch.bfloat16).requires_grad_()

    return {"u": act(rows, d_inner, length), "delta": act(rows, d_inner, length, scale=0.5),
            "A": (-torch.rand(d_inner, d_state, generator=g) * 4 - 0.1).to(device).requires_grad_(),
            "B": act(rows, d_state, length), "C": act(rows, d_state, length),
            "D": torch.randn(d_inner, generator=g).to(device).requires_grad_(), "z": act(rows, d_inner, length),
            "delta_bias": (torch.randn(d_inner, generator=g) * 0.5).to(device).requires_grad_()}


def run(x: dict, segment: int | None, grad: torch.Tensor) -> list[torch.Tensor]:
    out = selective_scan_triton(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], True,
                                segment=segment)
    return [out, *torch.autograd.grad(out, list(x.values()), grad)]


def timed(fn, device: str, warmup: int = 3, repeats: int = 20) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, nargs="*", default=[16, 32, 64, 128])
    p.add_argument("--warps", type=int, nargs="*", default=[1, 2, 4, 8])
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    shapes, warmup, repeats = SHAPES, 3, 20
    if args.device == "cpu":
        if not scan_triton.interpreted():
            raise SystemExit("--device cpu runs in Triton's interpreter: set TRITON_INTERPRET=1")
        shapes, warmup, repeats = [(2, 20, 64, None), (2, 20, 64, 6)], 0, 1
    elif not torch.cuda.is_available():
        raise SystemExit("bench_triton_scan.py needs a CUDA device (or --device cpu with TRITON_INTERPRET=1)")
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (Triton interpreter)"
    print(f"{name}; torch {torch.__version__}; default launch: block {scan_triton._block(1024)} channels for "
          f"d_inner > 256, {scan_triton._warps()} warps")
    print("\n| rows | L | d_inner | segment | block | warps | fwd+bwd ms | vs default | max rel. diff vs default |"
          "\n|---|---|---|---|---|---|---|---|---|")
    for rows, length, d_inner, segment in shapes:
        x = make_inputs(rows, length, d_inner, args.device)
        grad = torch.randn(rows, d_inner, length, device=args.device).to(torch.bfloat16)
        scan_triton.LAUNCH.update(block_channels=None, num_warps=None)
        reference = run(x, segment, grad)
        base = timed(lambda: run(x, segment, grad), args.device, warmup, repeats)
        for block in args.blocks:
            for warps in args.warps:
                scan_triton.LAUNCH.update(block_channels=block, num_warps=warps)
                try:
                    results = run(x, segment, grad)
                    ms = timed(lambda: run(x, segment, grad), args.device, warmup, repeats)
                except Exception as exc:  # a launch the compiler or the card refuses (e.g. too many registers)
                    print(f"| {rows} | {length} | {d_inner} | {segment} | {block} | {warps} | failed: "
                          f"{type(exc).__name__} | | |", flush=True)
                    continue
                diff = max(((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()
                           for a, b in zip(results, reference))
                print(f"| {rows} | {length} | {d_inner} | {segment} | {block} | {warps} | {ms:.3f} | "
                      f"{base / ms:.2f}x | {diff:.1e} |", flush=True)
    scan_triton.LAUNCH.update(block_channels=None, num_warps=None)


if __name__ == "__main__":
    main()
