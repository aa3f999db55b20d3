"""Shard bytes, sharding throughput, worker scaling and peak memory: format version 2 against version 1, one run.

    python benchmarks/bench_shard.py [--demo-steps 60000] [--hopper-steps 20000] [--d4rl 50000 200000]
        [--atari 20000 100000] [--repeats 2] [--sources d4rl dqn-replay] [--work DIR]
        [--workers-input STEPS UNITS [--workers-out DIR ...]]

Version 1 (chunked, uncompressed) is the sharder of commit ``V1_COMMIT``, extracted with ``git archive`` into the
work folder and run from there; version 2 is this checkout's. Every pair runs side by side, alternating, best of
``--repeats`` (the box is shared: the minimum is the least disturbed run).

1. Bytes: the demo's Breakout collection (``collect.py`` defaults: checkpoints of 10,000 rows) and a collected
   Hopper D4RL file, sharded by both versions (defaults): all shards together against the input's bytes.
2. Throughput per worker: Hopper files (real env) and Breakout collected into one Dopamine checkpoint of the given
   number of frames, sharded with ``--workers 1`` by both versions. Frames/s are over shard.py's own sharding phase
   (the unit through the worker, without interpreter start-up and the dataset description); peak RSS is the
   process's VmHWM. The bound of version 2 is the work it cannot avoid, timed on the same frames in the same run:
   isal decompression of the checkpoint + zstd compression (the shards' level) of the decompressed frames; the
   DQN-Replay reader alone (decompression + cutting episodes) is timed beside it.
3. ``--workers-input STEPS UNITS``: 1 vs 2 workers (version 2) on Breakout of STEPS agent steps in UNITS checkpoints:
   wall time and the sharding phase.
``--work DIR`` keeps the collected inputs (and the extracted version-1 tree) there for the next run.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

V1_COMMIT = "142ab6acbd72c8a4e35ae326aeaaae97e97861c5"  # the last commit that wrote and read version-1 shards

# Runs a script and reports its own peak RSS (VmHWM: per address space, so not inherited across fork + exec).
PEAK_WRAPPER = ("import atexit, runpy, sys; atexit.register(lambda: print(next(l for l in open('/proc/self/status') "
                "if l.startswith('VmHWM')), file=sys.stderr)); sys.argv = sys.argv[1:]; "
                "runpy.run_path(sys.argv[0], run_name='__main__')")
SHARDING_SECONDS = re.compile(r"in ([0-9.]+) s of sharding")


def v1_tree(work: Path) -> Path:
    """The repository at ``V1_COMMIT`` (``git archive``), extracted once into ``work``: the version-1 code."""
    tree = work / f"v1-{V1_COMMIT[:8]}"
    if not (tree / ".complete").exists():
        shutil.rmtree(tree, ignore_errors=True)
        tree.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", V1_COMMIT], cwd=REPO, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
        (tree / ".complete").touch()
    return tree


def run_measured(cmd: list[str], tree: Path = REPO) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (MiB) and stdout of ``python SCRIPT ARGS...`` run in ``tree`` as a subprocess."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PEAK_WRAPPER, *cmd], cwd=tree, capture_output=True, text=True,
                          env=os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(tree)})
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{cmd} failed: {done.stderr[-2000:]}")
    return seconds, int(done.stderr.strip().splitlines()[-1].split()[1]) / 1024, done.stdout


def shard_run(source: str, src: Path, out: Path, workers: int, tree: Path = REPO) -> dict:
    """One shard.py run (of the code in ``tree``): wall seconds, the seconds of its sharding phase, peak RSS, bytes
    of the shards."""
    shutil.rmtree(out, ignore_errors=True)
    seconds, rss, stdout = run_measured(["data_pipeline/shard.py", "--source", source, "--input", str(src),
                                         "--output", str(out), "--workers", str(workers)], tree)
    return {"wall": seconds, "sharding": float(SHARDING_SECONDS.search(stdout).group(1)), "rss": rss,
            "bytes": sum(p.stat().st_size for p in out.glob("*.tar"))}


def both_versions(source: str, src: Path, work: Path, repeats: int) -> dict[str, dict]:
    """``{"v1": run, "v2": run}``, alternating, each field the best (smallest) of ``repeats`` runs."""
    tree = v1_tree(work)
    runs: dict[str, list[dict]] = {"v1": [], "v2": []}
    for _ in range(repeats):
        for version, code in (("v1", tree), ("v2", REPO)):
            runs[version].append(shard_run(source, src, work / "out", 1, code))
    shutil.rmtree(work / "out", ignore_errors=True)
    return {v: {k: min(r[k] for r in rs) for k in rs[0]} for v, rs in runs.items()}


def best_of(fn, repeats: int = 3) -> float:
    """The fastest of ``repeats`` timings of ``fn()``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def collected_atari(work: Path, n: int, capacity: int) -> Path:
    """Breakout, ``n`` agent steps in checkpoints of ``capacity`` rows, reused from ``work`` when complete."""
    from data_pipeline.collect_atari import collect_atari

    folder = work / f"atari-{n}-per-{capacity}"
    if not (folder / ".complete").exists():
        shutil.rmtree(folder, ignore_errors=True)
        collect_atari("Breakout", folder, n, 0, capacity=capacity, progress=True)
        (folder / ".complete").touch()
    return folder / "Breakout"


def collected_hopper(work: Path, n: int) -> Path:
    from data_pipeline.collect_mujoco import collect_mujoco

    folder = work / f"d4rl-{n}"
    found = sorted(folder.glob("*.hdf5"))
    return found[0] if found else collect_mujoco("hopper", folder, transitions=n, seed=0)


def bench_bytes(work: Path, demo_steps: int, hopper_steps: int, repeats: int, sources: list[str]) -> list[str]:
    inputs = []
    if "dqn-replay" in sources and demo_steps:
        root = collected_atari(work, demo_steps, 10_000)
        inputs.append((f"Breakout, the demo's {demo_steps:,} steps (Dopamine .gz)", "dqn-replay", root,
                       sum(p.stat().st_size for p in root.rglob("*.gz"))))
    if "d4rl" in sources and hopper_steps:
        path = collected_hopper(work, hopper_steps)
        inputs.append((f"Hopper, {hopper_steps:,} steps (D4RL HDF5)", "d4rl", path, path.stat().st_size))
    lines = []
    for name, source, src, input_bytes in inputs:
        runs = both_versions(source, src, work, repeats)
        steps = demo_steps if source == "dqn-replay" else hopper_steps
        lines.append(f"| {name} | {input_bytes / 1e6:.2f} | {runs['v1']['bytes'] / 1e6:.2f} "
                     f"({runs['v1']['bytes'] / input_bytes:.2f}x) | {runs['v2']['bytes'] / 1e6:.2f} "
                     f"({runs['v2']['bytes'] / input_bytes:.2f}x) | {input_bytes / steps:,.1f} | "
                     f"{runs['v1']['bytes'] / steps:,.1f} | {runs['v2']['bytes'] / steps:,.1f} |")
    return lines


BYTES_HEADER = ("| input | input MB | version 1 shards MB (/ input) | version 2 shards MB (/ input) | input bytes per "
                "step | v1 bytes per step | v2 bytes per step |\n|---|---|---|---|---|---|---|")


def version_rows(name: str, steps: int, runs: dict[str, dict], bound: float | None = None) -> list[str]:
    v1, v2 = runs["v1"], runs["v2"]
    ratio = f"{v1['sharding'] / v2['sharding']:.2f}"
    bound_cells = "| | |" if bound is None else f"| {steps / bound:,.0f} | {bound / v2['sharding']:.2f} |"
    return [f"| {name} | {steps:,} | {steps / v1['sharding']:,.0f} | {steps / v2['sharding']:,.0f} | {ratio} "
            f"{bound_cells} {v1['rss']:.0f} | {v2['rss']:.0f} | {v1['bytes'] / 1e6:.1f} | {v2['bytes'] / 1e6:.1f} |"]


THROUGHPUT_HEADER = ("| input | steps | v1 steps/s | v2 steps/s | v2 / v1 | v2 bound steps/s | v2 / bound "
                     "| v1 peak RSS MiB | v2 peak RSS MiB | v1 MB | v2 MB |\n" + "|---" * 11 + "|")


def v2_bound_seconds(root: Path) -> tuple[float, float, float]:
    """Seconds of isal decompression of the checkpoints' frame files, of zstd compression of their frames, and of
    the DQN-Replay reader alone (decompression + cutting the episodes, no output)."""
    import numpy as np
    from isal import igzip

    from data_pipeline.episode_sample import make_compressor
    from data_pipeline.sources import dqn_replay

    gz = sorted(root.rglob("$store$_observation_ckpt.*.gz"))

    def decompress() -> None:
        for p in gz:
            with igzip.open(p, "rb") as f:
                while f.read(1 << 18):
                    pass

    frames = [ep.observations for u in dqn_replay.list_units(root) for ep in dqn_replay.read_unit(u)]
    compressor = make_compressor()
    compress = best_of(lambda: [compressor.compress(np.ascontiguousarray(f)) for f in frames])
    read = best_of(lambda: [len(ep) for u in dqn_replay.list_units(root) for ep in dqn_replay.read_unit(u)])
    return best_of(decompress), compress, read


def bench_throughput(work: Path, d4rl_sizes: list[int], atari_sizes: list[int], repeats: int,
                     sources: list[str]) -> list[str]:
    lines = []
    if "d4rl" in sources:
        for n in d4rl_sizes:
            lines += version_rows(f"Hopper D4RL {n:,}", n, both_versions("d4rl", collected_hopper(work, n), work,
                                                                         repeats))
    if "dqn-replay" in sources:
        for n in atari_sizes:
            root = collected_atari(work, n, n + 10_000)
            decompress, compress, read = v2_bound_seconds(root)
            runs = both_versions("dqn-replay", root, work, repeats)
            lines += version_rows(f"Breakout, one checkpoint of {n:,} frames", n, runs, decompress + compress)
            lines.append(f"| (bound of the row above: isal decompression {n / decompress:,.0f} frames/s, zstd "
                         f"compression {n / compress:,.0f} frames/s; the reader alone {n / read:,.0f} frames/s) "
                         f"| | | | | | | | | | |")
    return lines


def bench_workers(work: Path, n: int, units: int, repeats: int, out: Path) -> list[str]:
    """1 vs 2 workers on Breakout in ``units`` checkpoints, shards written to ``out``: wall time and the sharding
    phase alone, best of ``repeats`` runs each (alternating)."""
    root = collected_atari(work, n, -(-n // units))
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo-steps", type=int, default=60_000, help="Breakout steps of the bytes comparison (0: none)")
    p.add_argument("--hopper-steps", type=int, default=20_000, help="Hopper steps of the bytes comparison (0: none)")
    p.add_argument("--d4rl", type=int, nargs="*", default=[50_000, 200_000], help="Hopper sizes for throughput")
    p.add_argument("--atari", type=int, nargs="*", default=[20_000, 100_000], help="Breakout checkpoint sizes")
    p.add_argument("--repeats", type=int, default=2, help="runs per version (or worker count); the best is kept")
    p.add_argument("--sources", nargs="+", default=["d4rl", "dqn-replay"], choices=["d4rl", "dqn-replay"])
    p.add_argument("--work", default=None, help="scratch folder kept between runs (default: a temporary one)")
    p.add_argument("--workers-input", type=int, nargs=2, metavar=("STEPS", "UNITS"), default=None,
                   help="also time 1 vs 2 workers on Breakout of STEPS agent steps in UNITS checkpoints")
    p.add_argument("--workers-out", nargs="+", default=[], metavar="DIR",
                   help="for --workers-input: also write the shards under each DIR (e.g. /dev/shm: no disk)")
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_shard_"))
    work.mkdir(parents=True, exist_ok=True)
    sizes = bench_bytes(work, args.demo_steps, args.hopper_steps, args.repeats, args.sources)
    speed = bench_throughput(work, args.d4rl, args.atari, args.repeats, args.sources)
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end; version 1 = {V1_COMMIT[:8]}\n")
    print(BYTES_HEADER + "\n" + "\n".join(sizes) + "\n\n" + THROUGHPUT_HEADER + "\n" + "\n".join(speed))
    if args.workers_input:
        print("\n" + WORKERS_HEADER)
        for out in [work, *map(Path, args.workers_out)]:
            print("\n".join(bench_workers(work, *args.workers_input, args.repeats, out / "bench-shard-out")))
    if not args.work:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
