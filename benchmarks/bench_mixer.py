"""Benchmark one Mamba mixer block, forward + backward on CPU: `cpp` and `fast` vs `ref` vs mambapy's pscan MambaBlock.

Every (implementation, L, d_model) case runs in a fresh subprocess, which reports its time per iteration, its peak
resident set size (getrusage ru_maxrss of that process, so the figure includes the ~0.23 GB of the Python + torch
runtime) and that peak minus the RSS just before the first forward (the block's own memory: activations, gradients,
work buffers). A watchdog thread in the worker aborts a case whose RSS passes --max-rss-gb; cases whose estimated
peak is above it are skipped up front and marked so in the table.

    python benchmarks/bench_mixer.py                       # all shapes (the big ones take minutes)
    python benchmarks/bench_mixer.py --L 96 768 --d-model 128
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time

IMPLS = ("cpp", "fast", "ref", "mambapy")
OURS = ("cpp", "fast")  # the backends compared against the others
# Rough peak bytes per element of the (batch, L, d_inner, d_state) state tensor, from measured runs; used only to
# skip cases that would pass the RSS limit.
BYTES_PER_STATE_ELEMENT = {"cpp": 5.0, "fast": 5.0, "ref": 42.0, "mambapy": 50.0}
BASE_RSS_GB = 0.4


def estimated_gb(impl: str, batch: int, length: int, d_model: int, d_state: int = 16) -> float:
    return BASE_RSS_GB + BYTES_PER_STATE_ELEMENT[impl] * batch * length * 2 * d_model * d_state / 1e9


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux: KiB


def _current_rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


def _watchdog(limit_gb: float) -> None:
    while True:
        if _current_rss_gb() > limit_gb:
            print(json.dumps({"error": f"aborted: RSS above {limit_gb} GB"}), flush=True)
            os._exit(3)
        time.sleep(0.05)


def build_block(impl: str, d_model: int):
    if impl == "mambapy":
        from mambapy.mamba import MambaBlock, MambaConfig

        return MambaBlock(MambaConfig(d_model=d_model, n_layers=1, pscan=True))
    from mambadm.ssm import Mamba

    return Mamba(d_model, backend=impl)


def worker(args: argparse.Namespace) -> None:
    import torch

    threading.Thread(target=_watchdog, args=(args.max_rss_gb,), daemon=True).start()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    block = build_block(args.impl, args.d_model)
    x = torch.randn(args.batch, args.length, args.d_model, requires_grad=True)
    grad = torch.randn(args.batch, args.length, args.d_model)
    base_gb = _current_rss_gb()
    times = []
    for i in range(args.warmup + args.repeats):
        start = time.perf_counter()
        y = block(x)
        y.backward(grad)
        elapsed = time.perf_counter() - start
        block.zero_grad(set_to_none=True)
        x.grad = None
        if i >= args.warmup:
            times.append(elapsed)
    peak = _peak_rss_gb()
    print(json.dumps({"ms": 1000 * min(times), "peak_rss_gb": peak, "own_gb": peak - base_gb}), flush=True)


def run_case(impl: str, length: int, d_model: int, args: argparse.Namespace) -> dict:
    est = estimated_gb(impl, args.batch, length, d_model)
    if est > args.max_rss_gb:
        return {"skipped": f"est. {est:.0f} GB > {args.max_rss_gb:g} GB"}
    small = length * d_model <= 768 * 128
    repeats, warmup = (args.repeats, args.warmup) if small else (1, 0)  # big shapes: one timed iteration
    cmd = [sys.executable, __file__, "--worker", impl, str(length), str(d_model), "--batch", str(args.batch),
           "--threads", str(args.threads), "--repeats", str(repeats), "--warmup", str(warmup),
           "--max-rss-gb", str(args.max_rss_gb)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}"}
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=3, metavar=("IMPL", "L", "D_MODEL"), help=argparse.SUPPRESS)
    parser.add_argument("--impl", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--L", nargs="+", type=int, default=[96, 768, 3072])
    parser.add_argument("--d-model", nargs="+", type=int, default=[128, 512])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads per case")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed iterations (best of) after --warmup ones, for L * d_model <= 768 * 128; above: one, no warmup")
    parser.add_argument("--max-rss-gb", type=float, default=10.0)
    args = parser.parse_args()
    if args.worker:
        args.impl, args.length, args.d_model = args.worker[0], int(args.worker[1]), int(args.worker[2])
        worker(args)
        return

    from tqdm import tqdm

    cases = [(length, d) for d in args.d_model for length in args.L]
    results: dict[tuple[str, int, int], dict] = {}
    for (length, d), impl in tqdm([(c, i) for c in cases for i in args.impl], desc="cases"):
        results[(impl, length, d)] = run_case(impl, length, d, args)
        tqdm.write(f"{impl:8s} L={length:5d} d_model={d:4d}: {results[(impl, length, d)]}")

    def cell(r: dict) -> str:
        if "ms" not in r:
            return r.get("skipped", r.get("error", "?"))
        return f"{r['ms']:.0f} ms / {r['peak_rss_gb']:.2f} GB ({r['own_gb']:.2f})"

    def ratio(a: dict, b: dict, key: str) -> str:
        return f"{b[key] / a[key]:.1f}x" if key in a and key in b else "-"

    header = ["L", "d_model"] + [f"{i} (time / peak RSS (own))" for i in args.impl]
    ours = [o for o in OURS if o in args.impl]
    others = [i for i in args.impl if i not in OURS]
    extra = [f"{o} speed-up vs {i}" for o in ours for i in args.impl if i != o and not (o == "fast" and i == "cpp")]
    extra += [f"mambapy / {o}: peak RSS (own)" for o in ours if "mambapy" in others]
    print(f"\nbatch {args.batch}, forward + backward of one mixer block, {args.threads} torch thread(s); load average "
          f"{' / '.join(f'{x:.1f}' for x in os.getloadavg())} (1 / 5 / 15 min) at the end\n")
    print("| " + " | ".join(header + extra) + " |")
    print("|" + "---|" * (len(header) + len(extra)))
    for length, d in cases:
        row = [str(length), str(d)] + [cell(results[(i, length, d)]) for i in args.impl]
        for o in ours:
            row += [ratio(results[(o, length, d)], results[(i, length, d)], "ms")
                    for i in args.impl if i != o and not (o == "fast" and i == "cpp")]
        if "mambapy" in others:
            mp = results[("mambapy", length, d)]
            row += [f"{ratio(results[(o, length, d)], mp, 'peak_rss_gb')} ({ratio(results[(o, length, d)], mp, 'own_gb')})"
                    for o in ours]
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
