"""Sharding throughput and peak memory, measured side by side in one run.

    python benchmarks/bench_shard.py [--d4rl-small 50000] [--d4rl-large 200000] [--atari-small 20000]
        [--atari-large 100000]
        [--sources d4rl dqn-replay] [--work DIR]

D4RL: shard a small and a large collected Hopper file (real env) with 1 and 2 workers; compare with only reading the
episodes (the reader's limit). DQN-Replay (when the Atari collector is present): shard a small and a large
checkpoint and compare with decompressing the same ``.gz`` files alone with the standard ``gzip`` module and with
``isal`` (the decompression limit). Peak RSS is the sharding process's own (``--workers 1``), its VmHWM.
"""
from __future__ import annotations

import argparse
import gzip
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


# Runs a script and reports its own peak RSS (VmHWM: per address space, so not inherited across fork + exec).
PEAK_WRAPPER = ("import atexit, runpy, sys; atexit.register(lambda: print(next(l for l in open('/proc/self/status') "
                "if l.startswith('VmHWM')), file=sys.stderr)); sys.argv = sys.argv[1:]; "
                "runpy.run_path(sys.argv[0], run_name='__main__')")


def run_measured(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of ``python SCRIPT ARGS...`` run as a subprocess."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PEAK_WRAPPER, *cmd], cwd=REPO, capture_output=True, text=True,
                          env=os.environ | {"OMP_NUM_THREADS": "1"})
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{cmd} failed: {done.stderr[-2000:]}")
    return seconds, int(done.stderr.strip().splitlines()[-1].split()[1]) / 1024


def shard(source: str, src: Path, out: Path, workers: int) -> tuple[float, float, int]:
    shutil.rmtree(out, ignore_errors=True)
    seconds, rss = run_measured(["data_pipeline/shard.py", "--source", source, "--input", str(src),
                                 "--output", str(out), "--workers", str(workers)])
    return seconds, rss, sum(p.stat().st_size for p in out.glob("*.tar"))


def row(name: str, steps: int, seconds: float, mb_in: float, rss: float | str = "") -> str:
    rss = f"{rss:.0f}" if isinstance(rss, float) else rss
    return f"| {name} | {steps:,} | {seconds:.2f} | {steps / seconds:,.0f} | {mb_in / seconds:.1f} | {rss} |"


HEADER = "| what | steps | s | steps/s | input MB/s | peak RSS MiB |\n|---|---|---|---|---|---|"


def bench_d4rl(work: Path, sizes: list[int]) -> list[str]:
    from data_pipeline.collect_mujoco import collect_mujoco
    from data_pipeline.sources import d4rl

    lines = []
    for n in sizes:
        path = collect_mujoco("hopper", work / f"d4rl-{n}", transitions=n, seed=0)
        mb = path.stat().st_size / 1e6
        start = time.perf_counter()
        steps = sum(len(ep) for u in d4rl.list_units(path) for ep in d4rl.read_unit(u))
        lines.append(row(f"D4RL {n:,}: read episodes only (limit)", steps, time.perf_counter() - start, mb))
        for workers in (1, 2):
            seconds, rss, out_bytes = shard("d4rl", path, work / "out", workers)
            lines.append(row(f"D4RL {n:,}: shard, {workers} worker(s) → {out_bytes / 1e6:.0f} MB tars", n, seconds,
                             mb, rss if workers == 1 else "—"))
    return lines


def bench_dqn(work: Path, sizes: list[int]) -> list[str]:
    from isal import igzip

    from data_pipeline.collect_atari import collect_atari

    lines = []
    for n in sizes:
        root = collect_atari("Breakout", work / f"atari-{n}", n, 0, capacity=n, progress=False)  # one checkpoint
        gz = sorted(Path(root).rglob("*.gz"))
        mb = sum(p.stat().st_size for p in gz) / 1e6
        for name, module in (("gzip", gzip), ("isal igzip", igzip)):
            start = time.perf_counter()
            for p in gz:
                with module.open(p, "rb") as f:
                    while f.read(1 << 22):
                        pass
            lines.append(row(f"Atari {n:,}: decompress .gz only, {name}", n, time.perf_counter() - start, mb))
        for workers in (1, 2):
            seconds, rss, out_bytes = shard("dqn-replay", Path(root), work / "out", workers)
            lines.append(row(f"Atari {n:,}: shard, {workers} worker(s) → {out_bytes / 1e6:.0f} MB tars", n,
                             seconds, mb, rss if workers == 1 else "—"))
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d4rl-small", type=int, default=50_000)
    p.add_argument("--d4rl-large", type=int, default=200_000)
    p.add_argument("--atari-small", type=int, default=20_000)
    p.add_argument("--atari-large", type=int, default=100_000)
    p.add_argument("--sources", nargs="+", default=["d4rl", "dqn-replay"], choices=["d4rl", "dqn-replay"])
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_shard_"))
    lines = bench_d4rl(work, [args.d4rl_small, args.d4rl_large]) if "d4rl" in args.sources else []
    if "dqn-replay" in args.sources:
        if importlib.util.find_spec("data_pipeline.collect_atari"):
            lines += bench_dqn(work, [args.atari_small, args.atari_large])
        else:
            lines.append("| DQN-Replay: skipped (no data_pipeline.collect_atari) | | | | | |")
    print(HEADER)
    print("\n".join(lines))
    if not args.work:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
