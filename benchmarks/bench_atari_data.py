"""Atari data throughput, measured side by side in one run.

    python benchmarks/bench_atari_data.py [--transitions 6000 --capacity 3000]

1. collection: the bare env with random actions vs the collector (scripted player + Dopamine buffer + gzip -9);
2. reading: ``dqn_replay.read_unit`` streaming with isal vs the standard gzip module, vs ``np.load`` of whole
   arrays (what an unbounded reader does), as frames per second over the same checkpoints.
"""
from __future__ import annotations

import argparse
import gzip
import tempfile
import time
from pathlib import Path

import numpy as np

from data_pipeline.collect_atari import collect_atari, make_env
from data_pipeline.sources import dqn_replay, npy_gzip


def bare_env_steps_per_s(steps: int) -> float:
    env = make_env("Breakout")
    rng = np.random.default_rng(0)
    env.reset(seed=0)
    t = time.perf_counter()
    for _ in range(steps):
        _, _, term, trunc, _ = env.step(int(rng.integers(4)))
        if term or trunc:
            env.reset()
    return steps / (time.perf_counter() - t)


def read_streamed(path: Path, module) -> tuple[int, float]:
    npy_gzip._gzip = module
    t = time.perf_counter()
    n = sum(len(ep) for u in dqn_replay.list_units(path) for ep in dqn_replay.read_unit(u))
    return n, time.perf_counter() - t


def read_whole(path: Path) -> tuple[int, float]:
    t = time.perf_counter()
    n = 0
    for f in sorted(path.glob("$store$_observation_ckpt.*.gz")):
        with gzip.open(f) as g:
            n += len(np.load(g, allow_pickle=False))
    return n, time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--transitions", type=int, default=6000)
    p.add_argument("--capacity", type=int, default=3000)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bare = bare_env_steps_per_s(args.transitions)
        t = time.perf_counter()
        logs = collect_atari("Breakout", tmp, args.transitions, seed=0, capacity=args.capacity, progress=False)
        collected = args.transitions / (time.perf_counter() - t)
        print(f"{'collection':<40}{'steps/s':>10}{'ratio':>8}")
        print(f"{'bare env, random actions':<40}{bare:>10.0f}{1.0:>8.2f}")
        print(f"{'collector (player + buffer + gzip -9)':<40}{collected:>10.0f}{collected / bare:>8.2f}")

        import isal.igzip
        n_isal, t_isal = read_streamed(logs, isal.igzip)
        n_gzip, t_gzip = read_streamed(logs, gzip)
        n_rows, t_whole = read_whole(logs)
        npy_gzip._gzip = isal.igzip
        assert n_isal == n_gzip
        mb = n_rows * 84 * 84 / 1e6  # every reader decompresses every stored frame once
        print(f"\n{f'reading {mb:.0f} MB of frames ({n_isal} steps)':<40}{'MB/s':>10}{'ratio':>8}")
        for name, dt in (("np.load whole arrays (gzip)", t_whole), ("read_unit streamed, gzip", t_gzip),
                         ("read_unit streamed, isal", t_isal)):
            print(f"{name:<40}{mb / dt:>10.0f}{t_whole / dt:>8.2f}")


if __name__ == "__main__":
    main()
