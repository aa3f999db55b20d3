"""Sharding throughput, worker scaling and peak memory, measured side by side in one run.

    python benchmarks/bench_shard.py [--d4rl-small 50000] [--d4rl-large 200000] [--atari-small 20000]
        [--atari-large 100000] [--sources d4rl dqn-replay] [--work DIR]

D4RL: shard a small and a large collected Hopper file (real env) with 1 and 2 workers; compare with only reading the
episodes (the reader's limit). DQN-Replay: Breakout collected by the project's collector in Dopamine checkpoints of
a quarter of the frames each (4 full checkpoints + the partial last one, i.e. 5 units for the workers); shard with
1 and 2 workers and compare with decompressing the same ``.gz`` files alone with the standard ``gzip`` module and
with ``isal`` (the decompression limit). The work any sharder must do beyond decompressing is measured in the same
run: sha256 and writing (to the page cache) of as many bytes as the shards hold; their sum with the isal time is the
"required work" bound. Peak RSS is the sharding process's own (``--workers 1``), its VmHWM. ``--work DIR`` keeps the
collected inputs there and reuses them on the next run. ``--workers-input STEPS UNITS`` adds a worker-scaling table
on a larger input cut into more units: wall time, and the sharding phase that shard.py reports (the units going
through the pool, without interpreter start-up and dataset description).
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import re
import resource
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


SHARDING_SECONDS = re.compile(r"in ([0-9.]+) s of sharding")


def run_measured(cmd: list[str]) -> tuple[float, float, float, str]:
    """Wall seconds, peak RSS (MiB), CPU seconds (user + sys, its pool workers included) and stdout of
    ``python SCRIPT ARGS...`` run as a subprocess."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PEAK_WRAPPER, *cmd], cwd=REPO, capture_output=True, text=True,
                          env=os.environ | {"OMP_NUM_THREADS": "1"})
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{cmd} failed: {done.stderr[-2000:]}")
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return seconds, int(done.stderr.strip().splitlines()[-1].split()[1]) / 1024, cpu, done.stdout


def shard_run(source: str, src: Path, out: Path, workers: int, *extra: str) -> dict:
    """One shard.py run: wall seconds, the seconds of its sharding phase (units through the workers, as shard.py
    reports them: no interpreter start-up, imports or dataset description), peak RSS, tar bytes and CPU seconds."""
    shutil.rmtree(out, ignore_errors=True)
    seconds, rss, cpu, stdout = run_measured(["data_pipeline/shard.py", "--source", source, "--input", str(src),
                                              "--output", str(out), "--workers", str(workers), *extra])
    return {"wall": seconds, "sharding": float(SHARDING_SECONDS.search(stdout).group(1)), "rss": rss,
            "bytes": sum(p.stat().st_size for p in out.glob("*.tar")), "cpu": cpu}


def shard(source: str, src: Path, out: Path, workers: int, *extra: str) -> tuple[float, float, int, float]:
    """Wall seconds, peak RSS, bytes of tars written and CPU seconds of one shard.py run."""
    r = shard_run(source, src, out, workers, *extra)
    return r["wall"], r["rss"], r["bytes"], r["cpu"]


def row(name: str, steps: int, seconds: float, mb_in: float, rss: float | str = "", cpu: float | None = None) -> str:
    rss = f"{rss:.0f}" if isinstance(rss, float) else rss
    cpu = "" if cpu is None else f"{cpu:.2f}"
    return f"| {name} | {steps:,} | {seconds:.2f} | {steps / seconds:,.0f} | {mb_in / seconds:.1f} | {rss} | {cpu} |"


HEADER = ("| what | steps | s | steps/s | input MB/s | peak RSS MiB | CPU s (all processes) |\n"
          "|---|---|---|---|---|---|---|")


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
            seconds, rss, out_bytes, cpu = shard("d4rl", path, work / "out", workers)
            lines.append(row(f"D4RL {n:,}: shard, {workers} worker(s) → {out_bytes / 1e6:.0f} MB tars", n, seconds,
                             mb, rss if workers == 1 else "—", cpu))
    return lines


def best_of(fn, repeats: int = 3) -> float:
    """The fastest of ``repeats`` timings of ``fn()`` (the box is shared: the minimum is the least disturbed)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def required_work_rates(work: Path) -> tuple[float, float]:
    """Bytes/s of sha256 and of writing a file to the page cache (64 MiB blocks, 512 MiB file, no fsync)."""
    block = os.urandom(64 << 20)
    sha = len(block) / best_of(lambda: hashlib.sha256(block).digest())
    path = work / "write-probe.bin"

    def write() -> None:
        with open(path, "wb") as f:
            for _ in range(8):
                f.write(block)
        path.unlink()

    return sha, 8 * len(block) / best_of(write)


def decompress_seconds(gz: list[Path], module) -> float:
    def run() -> None:
        for p in gz:
            with module.open(p, "rb") as f:
                while f.read(1 << 22):
                    pass
    return best_of(run)


def collected_atari(work: Path, n: int, capacity: int | None = None) -> Path:
    """Breakout, ``n`` agent steps in checkpoints of ``capacity`` rows (default ``n // 4``), reused from ``work``
    when complete."""
    from data_pipeline.collect_atari import collect_atari

    capacity = capacity or n // 4
    folder = work / (f"atari-{n}" if capacity == n // 4 else f"atari-{n}-per-{capacity}")
    if not (folder / ".complete").exists():
        shutil.rmtree(folder, ignore_errors=True)
        collect_atari("Breakout", folder, n, 0, capacity=capacity, progress=True)
        (folder / ".complete").touch()
    return folder / "Breakout"


def bench_workers(work: Path, n: int, units: int, repeats: int, out: Path) -> list[str]:
    """1 vs 2 workers on Breakout in ``units`` checkpoints, shards written to ``out``: wall time and the sharding
    phase alone, best of ``repeats`` runs each (alternating)."""
    root = collected_atari(work, n, capacity=-(-n // units))
    runs: dict[int, list[dict]] = {1: [], 2: []}
    for _ in range(repeats):
        for workers in (1, 2):
            runs[workers].append(shard_run("dqn-replay", root, out, workers))
    shutil.rmtree(out, ignore_errors=True)
    best = {w: {k: min(r[k] for r in rs) for k in ("wall", "sharding")} for w, rs in runs.items()}
    n_units = len({p.name.split("ckpt.")[1] for p in root.rglob("*.gz")})
    return [f"| Atari {n:,} ({n_units} units) → {out.parent} | {best[1]['wall']:.2f} | {best[2]['wall']:.2f} | "
            f"{best[1]['wall'] / best[2]['wall']:.2f} | {best[1]['sharding']:.2f} | {best[2]['sharding']:.2f} | "
            f"{best[1]['sharding'] / best[2]['sharding']:.2f} |"]


WORKERS_HEADER = ("| input | wall s, 1 worker | wall s, 2 workers | wall speed-up | sharding phase s, 1 worker "
                  "| sharding phase s, 2 workers | sharding-phase speed-up |\n|---|---|---|---|---|---|---|")


def bench_dqn(work: Path, sizes: list[int]) -> tuple[list[str], list[str]]:
    """Rows of the main table and of the ratio table."""
    from isal import igzip

    from data_pipeline.sources import dqn_replay

    sha_rate, write_rate = required_work_rates(work)
    lines = [f"| sha256 alone (required per output byte) | | | | {sha_rate / 1e6:,.0f} MB/s | | |",
             f"| write to page cache alone (required per output byte) | | | | {write_rate / 1e6:,.0f} MB/s | | |"]
    ratios = []
    for n in sizes:
        root = collected_atari(work, n)
        gz = sorted(root.rglob("*.gz"))
        mb = sum(p.stat().st_size for p in gz) / 1e6
        limit = {}
        for name, module in (("gzip", gzip), ("isal igzip", igzip)):
            limit[name] = decompress_seconds(gz, module)
            lines.append(row(f"Atari {n:,}: decompress .gz only, {name}", n, limit[name], mb))
        read = best_of(lambda: sum(len(ep) for u in dqn_replay.list_units(root) for ep in dqn_replay.read_unit(u)))
        lines.append(row(f"Atari {n:,}: read episodes only (reader: decompress + episodes)", n, read, mb))
        seconds = {}
        for workers in (1, 2):
            seconds[workers], rss, out_bytes, cpu = shard("dqn-replay", root, work / "out", workers)
            lines.append(row(f"Atari {n:,}: shard, {workers} worker(s) → {out_bytes / 1e6:.0f} MB tars", n,
                             seconds[workers], mb, rss if workers == 1 else "—", cpu))
        bound = limit["isal igzip"] + out_bytes / sha_rate + out_bytes / write_rate
        lines.append(row(f"Atari {n:,}: required work: isal decompress + sha256 + write of the tars", n, bound, mb))
        units = len({p.name.split("ckpt.")[1] for p in gz})
        ratios.append(f"| Atari {n:,} ({units} units), --max-window 120 | {out_bytes / (n * 84 * 84):.2f} | "
                      f"{limit['isal igzip'] / read:.3f} | {limit['isal igzip'] / seconds[1]:.3f} | "
                      f"{limit['isal igzip'] / bound:.3f} | {bound / seconds[1]:.2f} | {seconds[1] / seconds[2]:.2f} |")
        # Atari DT's context (K=30): less overlap between chunks, fewer bytes to hash and write
        short, _, short_bytes, cpu = shard("dqn-replay", root, work / "out", 1, "--max-window", "30")
        lines.append(row(f"Atari {n:,}: shard, 1 worker, --max-window 30 → {short_bytes / 1e6:.0f} MB tars", n, short,
                         mb, "", cpu))
        short_bound = limit["isal igzip"] + short_bytes / sha_rate + short_bytes / write_rate
        ratios.append(f"| Atari {n:,} ({units} units), --max-window 30 | {short_bytes / (n * 84 * 84):.2f} | "
                      f"{limit['isal igzip'] / read:.3f} | {limit['isal igzip'] / short:.3f} | "
                      f"{limit['isal igzip'] / short_bound:.3f} | {short_bound / short:.2f} | |")
    return lines, ratios


RATIO_HEADER = ("| input | output bytes / input frame bytes | reader alone / isal limit "
                "| shard (1 worker) / isal limit | required-work bound / isal limit | shard (1 worker) / bound "
                "| speed-up, 2 workers vs 1 |\n|---|---|---|---|---|---|---|")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d4rl-small", type=int, default=50_000)
    p.add_argument("--d4rl-large", type=int, default=200_000)
    p.add_argument("--atari-small", type=int, default=20_000)
    p.add_argument("--atari-large", type=int, default=100_000)
    p.add_argument("--sources", nargs="+", default=["d4rl", "dqn-replay"], choices=["d4rl", "dqn-replay"])
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--workers-input", type=int, nargs=2, metavar=("STEPS", "UNITS"), default=None,
                   help="also time 1 vs 2 workers on Breakout of STEPS agent steps in UNITS checkpoints "
                        "(collected once into --work: ~6 min for 200,000 steps)")
    p.add_argument("--repeats", type=int, default=2, help="runs per worker count for --workers-input (best kept)")
    p.add_argument("--workers-out", nargs="+", default=[], metavar="DIR",
                   help="for --workers-input: also write the shards under each DIR (e.g. /dev/shm: no disk)")
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_shard_"))
    work.mkdir(parents=True, exist_ok=True)
    lines = bench_d4rl(work, [args.d4rl_small, args.d4rl_large]) if "d4rl" in args.sources else []
    ratios = []
    if "dqn-replay" in args.sources:
        more, ratios = bench_dqn(work, [args.atari_small, args.atari_large])
        lines += more
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end\n")
    print(HEADER)
    print("\n".join(lines))
    if ratios:
        print("\n" + RATIO_HEADER)
        print("\n".join(ratios))
    if args.workers_input:
        print("\n" + WORKERS_HEADER)
        for out in [work, *map(Path, args.workers_out)]:
            print("\n".join(bench_workers(work, *args.workers_input, args.repeats, out / "bench-shard-out")))
    shutil.rmtree(work / "out", ignore_errors=True)
    if not args.work:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
