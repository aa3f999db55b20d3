"""The `triton` selective scan on a GPU: backward / forward time per kernel pair, then a launch-shape sweep.

    python benchmarks/bench_triton_scan.py [--kernels chunked serial] [--blocks 16 32 64 128] [--warps 1 2 4 8]
        [--chunks 4 8 16] [--no-sweep] [--device cuda]
    python benchmarks/bench_triton_scan.py --pick FILE [--kernels chunked serial] [--pick-budget-s 60]

First table: for each kernel pair (scan_triton.KERNELS) at its default launch, the forward alone and the backward
alone (ms, CUDA events, median of 20 after 3 warm-ups) and their ratio, at L = 90 (MambaDM's K = 30 rows, global and
local branch) and L = 3072, with the backward's outputs checked against the `ref` scan's gradients at a small shape
of the same kind. The issue-18 target is backward / forward <= 2 at L = 90 and L = 3072.

For each shape (rows, tokens, d_inner, segment) the scan's forward + backward (bf16 activations, float32 A, D and
dt bias, softplus, z gate: the mixer under autocast) is timed with CUDA events, median of 20 after 3 warm-ups, for
every (block, warps); the table gives ms and the speed-up over the default launch (scan_triton._block / _warps), and
checks each launch's output and gradients against the default's (max relative difference), so a launch that
computes something else shows. Shapes: MambaDM xxl at K = 30 and batch 256 (global branch: rows of 90 tokens;
local: the same rows restarted every 15), and one long row set (16 x 3072). --device cpu: a dry run of the script
in Triton's interpreter (set TRITON_INTERPRET=1), at tiny shapes.

--pick FILE: instead of the tables, the launch a training step should use on this card. A short list of launches
(PICK_CANDIDATES, the defaults first) of the --kernels pairs is timed, forward + backward, on MambaDM xxl's two
scans at K = 30 and batch 256 (global rows of 90 tokens, local rows restarted every 15); a launch whose outputs or
gradients differ from its pair's default launch by more than bfloat16 rounding explains (PICK_TOLERANCE) is left
out; no new launch is tried once --pick-budget-s have passed. FILE gets the fastest as shell exports
(MAMBADM_TRITON_SCAN, MAMBADM_TRITON_LAUNCH; `. FILE` before training), written only when a launch ran.
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
# --pick: (kernel, channels per program, warps, tokens per chunk); each pair's default launch first, then launches
# whose backward ptxas fits in fewer registers per thread (more warps per SM) without spilling, for sm_90 and bf16
# (tests/test_triton_compile.py prints each one's registers and spills; benchmarks/RESULTS.md, "GPU scale").
PICK_CANDIDATES = [("chunked", 16, 4, 8), ("serial", 64, 4, None), ("chunked", 8, 4, 4), ("chunked", 16, 4, 4),
                   ("chunked", 8, 8, 4), ("chunked", 32, 8, 4), ("chunked", 32, 4, 4), ("chunked", 16, 8, 8),
                   ("serial", 64, 8, None), ("serial", 128, 8, None)]
PICK_TOLERANCE = 3e-2  # max relative difference of outputs and gradients from the default launch (bf16 inputs)


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


def ratio_table(kernels: list[str], shapes, device: str, warmup: int, repeats: int) -> None:
    """Forward ms, backward ms and backward / forward per kernel pair at its default launch."""
    from mambadm.ssm.scan_ref import selective_scan_ref

    print("\n| kernel | rows | L | d_inner | segment | fwd ms | bwd ms | bwd / fwd | grads vs ref (max rel.) |"
          "\n|---|---|---|---|---|---|---|---|---|")
    for kernel in kernels:
        scan_triton.LAUNCH.update(kernel=kernel, block_channels=None, num_warps=None, chunk=None)
        for rows, length, d_inner, segment in shapes:
            try:
                check = parity_vs_ref(selective_scan_ref, min(length, 40), segment, device)
                x = make_inputs(rows, length, d_inner, device)
                grad = torch.randn(rows, d_inner, length, device=device).to(torch.bfloat16)
                leaves = list(x.values())

                def forward():
                    return selective_scan_triton(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"],
                                                 x["delta_bias"], True, segment=segment)

                fwd = timed(forward, device, warmup, repeats)
                out = forward()
                bwd = timed(lambda: torch.autograd.grad(out, leaves, grad, retain_graph=True), device, warmup,
                            repeats)
            except Exception as exc:  # e.g. a kernel the compiler refuses on this card
                print(f"| {kernel} | {rows} | {length} | {d_inner} | {segment} | failed: {type(exc).__name__}: "
                      f"{str(exc)[:200]} | | | |", flush=True)
                continue
            print(f"| {kernel} | {rows} | {length} | {d_inner} | {segment} | {fwd:.3f} | {bwd:.3f} | "
                  f"{bwd / fwd:.2f} | {check:.1e} |", flush=True)
    scan_triton.LAUNCH.update(kernel=None)


def parity_vs_ref(ref_scan, length: int, segment: int | None, device: str) -> float:
    """Max relative error of the output and every gradient against `ref` (float32, 2 rows of `length`)."""
    channels = 64 if device == "cuda" else 16  # the interpreter (--device cpu) is slow
    x = {k: v.detach().float().requires_grad_() for k, v in make_inputs(2, length, channels, device).items()}
    args = [x[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    out = selective_scan_triton(*args, True, segment=segment)
    seg = segment or length
    ref = torch.cat([ref_scan(*[a[..., s:s + seg] if a.dim() == 3 else a for a in args[:5]], args[5],
                              args[6][..., s:s + seg], args[7], True) for s in range(0, length, seg)], -1)
    grad = torch.randn_like(ref)
    errs = [(out - ref).norm() / ref.norm()]
    for a, b in zip(torch.autograd.grad(out, args, grad), torch.autograd.grad(ref, args, grad)):
        errs.append((a - b).norm() / b.norm().clamp_min(1e-30))
    return max(e.item() for e in errs)


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


def pick_launch(kernels: list[str], device: str, budget_s: float, path: Path) -> dict | None:
    """Times PICK_CANDIDATES of `kernels` on MambaDM's two scan shapes and writes the fastest correct one to `path`."""
    shapes = [s for s in SHAPES if s[1] == 90] if device == "cuda" else [(2, 12, 16, None), (2, 12, 16, 6)]
    warmup, repeats = (3, 20) if device == "cuda" else (0, 1)
    candidates = [c for c in PICK_CANDIDATES if c[0] in kernels]
    if device != "cuda":  # the interpreter: one launch per pair, blocks that fit 16 channels
        candidates = [(k, min(block, 8), warps, chunk) for k, block, warps, chunk in
                      [next(c for c in candidates if c[0] == k) for k in dict.fromkeys(c[0] for c in candidates)]]
    inputs = [(make_inputs(rows, length, d_inner, device), segment) for rows, length, d_inner, segment in shapes]
    grads = [torch.randn(rows, d_inner, length, device=device).to(torch.bfloat16) for rows, length, d_inner, _ in shapes]
    print(f"\n| kernel | block | warps | chunk | {' | '.join(f'L {s[1]} seg {s[3]} fwd+bwd ms' for s in shapes)} | "
          f"total ms | vs first | max rel. diff vs its default |\n|{'---|' * (len(shapes) + 7)}")
    started, rows, reference = time.time(), [], {}
    for kernel, block, warps, chunk in candidates:
        if rows and time.time() - started > budget_s:
            print(f"(budget of {budget_s:.0f} s spent: {len(candidates) - len(rows)} launches not tried)")
            break
        scan_triton.LAUNCH.update(kernel=kernel, block_channels=block, num_warps=warps, chunk=chunk)
        label = f"| {kernel} | {block} | {warps} | {chunk} |"
        try:
            results = [run(x, segment, g) for (x, segment), g in zip(inputs, grads)]
            ms = [timed(lambda: run(x, segment, g), device, warmup, repeats) for (x, segment), g in zip(inputs, grads)]
        except Exception as exc:  # a launch the compiler or the card refuses (too many registers)
            print(f"{label} failed: {type(exc).__name__}: {str(exc)[:160]} |{' |' * (len(shapes) + 2)}", flush=True)
            continue
        reference.setdefault(kernel, results)  # the pair's first launch tried: its default
        diff = max(((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()
                   for mine, ref in zip(results, reference[kernel]) for a, b in zip(mine, ref))
        rows.append({"kernel": kernel, "block": block, "warps": warps, "chunk": chunk, "ms": sum(ms), "diff": diff})
        print(f"{label} {' | '.join(f'{m:.3f}' for m in ms)} | {sum(ms):.3f} | {rows[0]['ms'] / sum(ms):.2f}x | "
              f"{diff:.1e}{'' if diff <= PICK_TOLERANCE else ' (left out)'} |", flush=True)
    scan_triton.LAUNCH.update(kernel=None, block_channels=None, num_warps=None, chunk=None)
    ran = [r for r in rows if r["diff"] <= PICK_TOLERANCE]
    if not ran:
        print(f"no launch ran correctly: {path} not written")
        return None
    best = min(ran, key=lambda r: r["ms"])
    launch = f"block={best['block']},warps={best['warps']}" + (f",chunk={best['chunk']}" if best["chunk"] else "")
    path.write_text(f"export MAMBADM_TRITON_SCAN={best['kernel']}\nexport MAMBADM_TRITON_LAUNCH={launch}\n")
    print(f"picked: {best['kernel']} {launch} ({rows[0]['ms'] / best['ms']:.2f}x the first launch that ran): {path}")
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernels", nargs="*", default=list(scan_triton.KERNELS))
    p.add_argument("--blocks", type=int, nargs="*", default=[16, 32, 64, 128])
    p.add_argument("--warps", type=int, nargs="*", default=[1, 2, 4, 8])
    p.add_argument("--chunks", type=int, nargs="*", default=[4, 8, 16], help="tokens per tile (chunked kernels)")
    p.add_argument("--no-sweep", action="store_true", help="only the backward / forward table")
    p.add_argument("--device", default="cuda")
    p.add_argument("--pick", type=Path, metavar="FILE", help="write the fastest launch of PICK_CANDIDATES to FILE")
    p.add_argument("--pick-budget-s", type=float, default=60.0, help="--pick: try no new launch after this")
    args = p.parse_args()
    if args.pick and not args.pick.parent.is_dir():
        raise SystemExit(f"--pick {args.pick}: folder {args.pick.parent} does not exist")
    unknown = sorted(set(args.kernels) - set(scan_triton.KERNELS))
    if unknown:
        raise SystemExit(f"--kernels: unknown {unknown}; known: {list(scan_triton.KERNELS)}")
    shapes, warmup, repeats = SHAPES, 3, 20
    if args.device == "cpu":
        if not scan_triton.interpreted():
            raise SystemExit("--device cpu runs in Triton's interpreter: set TRITON_INTERPRET=1")
        shapes, warmup, repeats = [(1, 12, 16, None), (1, 12, 16, 6)], 0, 1
        args.blocks, args.warps, args.chunks = args.blocks[:1], args.warps[:1], args.chunks[:1]
    elif not torch.cuda.is_available():
        raise SystemExit("bench_triton_scan.py needs a CUDA device (or --device cpu with TRITON_INTERPRET=1)")
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (Triton interpreter)"
    defaults = {k: (scan_triton._block(1024, k), scan_triton._warps(), scan_triton._chunk(k)) for k in args.kernels}
    print(f"{name}; torch {torch.__version__}; default launch (channels per program for d_inner > 256, warps, "
          f"tokens per chunk): {defaults}")
    if args.pick:
        pick_launch(args.kernels, args.device, args.pick_budget_s, args.pick)
        return
    ratio_table(args.kernels, shapes, args.device, warmup, repeats)
    if args.no_sweep:
        return
    print("\n| kernel | rows | L | d_inner | segment | block | warps | chunk | fwd+bwd ms | vs default | "
          "max rel. diff vs default |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for kernel in args.kernels:
        for rows, length, d_inner, segment in shapes:
            x = make_inputs(rows, length, d_inner, args.device)
            grad = torch.randn(rows, d_inner, length, device=args.device).to(torch.bfloat16)
            scan_triton.LAUNCH.update(kernel=kernel, block_channels=None, num_warps=None, chunk=None)
            try:
                reference = run(x, segment, grad)
                base = timed(lambda: run(x, segment, grad), args.device, warmup, repeats)
            except Exception as exc:
                print(f"| {kernel} | {rows} | {length} | {d_inner} | {segment} | default | | | failed: "
                      f"{type(exc).__name__} | | |", flush=True)
                continue
            for block in args.blocks:
                for warps in args.warps:
                    for chunk in (args.chunks if kernel == "chunked" else [None]):
                        scan_triton.LAUNCH.update(block_channels=block, num_warps=warps, chunk=chunk)
                        try:
                            results = run(x, segment, grad)
                            ms = timed(lambda: run(x, segment, grad), args.device, warmup, repeats)
                        except Exception as exc:  # a launch the compiler or the card refuses (too many registers)
                            print(f"| {kernel} | {rows} | {length} | {d_inner} | {segment} | {block} | {warps} | "
                                  f"{chunk} | failed: {type(exc).__name__} | | |", flush=True)
                            continue
                        diff = max(((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()
                                   for a, b in zip(results, reference))
                        print(f"| {kernel} | {rows} | {length} | {d_inner} | {segment} | {block} | {warps} | {chunk} "
                              f"| {ms:.3f} | {base / ms:.2f}x | {diff:.1e} |", flush=True)
    scan_triton.LAUNCH.update(kernel=None, block_channels=None, num_warps=None, chunk=None)


if __name__ == "__main__":
    main()
