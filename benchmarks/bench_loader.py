"""Loader throughput vs what a training step consumes, at the same configs, measured side by side in one run.

    python benchmarks/bench_loader.py [--shards DIR] [--transitions 20000] [--configs default paper demo]
        [--batches 40] [--steps 5] [--work DIR]

Data: Breakout collected by the project's collector and sharded by ``shard.py`` with its defaults but
``--shard-transitions 2000`` (several training shards + one held out; ``--shards`` to use existing Atari shards). Configs: ``default`` (mambadm/config.py as is), ``paper``
(configs/data/breakout.yaml, the DT paper's Atari setting) and ``demo`` (configs/train/breakout-demo.yaml).

For each config: windows/s of ``mambadm.data.make_loader`` over the training shards (the training stream: random
windows, shuffle buffer, frame stacking, collation) with 1 and 2 DataLoader workers, timed over ``--batches`` after
the shuffle buffer has filled; and samples/s of the training step at that config (model built by ``build_model``,
forward + loss + backward + the config's AdamW step) on batches taken from the same loader and kept in memory,
median of ``--steps`` after 2 untimed ones. The ratio is loader windows/s over training samples/s (target >= 10).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mambadm import data as D  # noqa: E402
from mambadm.config import EnvSpec, load_config  # noqa: E402
from mambadm.model import build_model  # noqa: E402
from mambadm.optim import make_optimizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import train_step  # noqa: E402

CONFIGS = {"default": None, "paper": "configs/data/breakout.yaml", "demo": "configs/train/breakout-demo.yaml"}


def make_shards(work: Path, transitions: int) -> Path:
    """Collect real Breakout play and shard it with the defaults (reused from ``work`` when complete)."""
    raw, out = work / "raw", work / "shards"
    if not (out / "index.json").exists():
        shutil.rmtree(work, ignore_errors=True)
        for cmd in (["data_pipeline/collect.py", "breakout", "--output", str(raw), "--transitions", str(transitions)],
                    ["data_pipeline/shard.py", "--source", "dqn-replay", "--input", str(raw / "Breakout"),
                     "--output", str(out), "--shard-transitions", "2000"]):
            subprocess.run([sys.executable, *cmd], cwd=REPO, check=True, capture_output=True)
    return out


def loader_rate(loader, batches: int, warmup: int) -> float:
    """Windows/s of a training loader, timed over ``batches`` batches after ``warmup`` ones."""
    stream = iter(loader)
    for _ in range(warmup):
        next(stream)
    start = time.perf_counter()
    windows = sum(len(next(stream)["actions"]) for _ in range(batches))
    rate = windows / (time.perf_counter() - start)
    del stream  # shuts the workers down
    return rate


def train_seconds(model, optim_cfg, batches: list[dict], warmup: int = 2) -> float:
    """Median seconds of a full training step (forward, loss, backward, AdamW step) over ``batches[warmup:]``."""
    opt = make_optimizer(model, optim_cfg)
    model.train()
    times = []
    for i, batch in enumerate(batches):
        seconds = train_step(model, opt, batch)
        if i >= warmup:
            times.append(seconds)
    return statistics.median(times)


def bench_config(name: str, shards: Path, batches: int, steps: int) -> str:
    path = CONFIGS[name]
    cfg = load_config(REPO / path if path else None, [f"data.shards={shards}"])
    index = D.read_index(shards)
    train_shards, _ = D.select_shards(index, cfg.data)
    warmup = -(-int(cfg.data.shuffle_buffer) // int(cfg.data.batch_size)) + 2  # fill the shuffle buffer first
    rates = {}
    for workers in (1, 2):
        loader = D.make_loader(train_shards, index, cfg.data, 0, 1, seed=0, exact=False, num_workers=workers)
        rates[workers] = loader_rate(loader, batches, warmup)
    loader = D.make_loader(train_shards, index, cfg.data, 0, 1, seed=1, exact=False, num_workers=1)
    stream = iter(loader)
    kept = [next(stream) for _ in range(steps + 2)]  # the same kind of batches, decoded before timing
    del stream
    torch.manual_seed(0)
    model = build_model(cfg.model, EnvSpec.from_dict(index["env_spec"]))
    train = cfg.data.batch_size / train_seconds(model, cfg.optim, kept)
    return (f"| {name} | {cfg.data.context_len} | {cfg.data.batch_size} | {cfg.model.family} {cfg.model.n_layer}x"
            f"{cfg.model.d_model} ({model.num_params():,}) | {rates[1]:,.0f} | {rates[2]:,.0f} | {train:,.1f} | "
            f"{rates[1] / train:,.1f} | {rates[2] / train:,.1f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", help="existing Atari shards (default: collect and shard Breakout)")
    p.add_argument("--transitions", type=int, default=20_000, help="Breakout steps to collect when no --shards")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--batches", type=int, default=40, help="loader batches timed per measurement")
    p.add_argument("--steps", type=int, default=5, help="training steps timed per config (median)")
    p.add_argument("--work", help="scratch folder kept between runs (default: a temporary one)")
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_loader_"))
    try:
        shards = Path(args.shards) if args.shards else make_shards(work / "data", args.transitions)
        index = D.read_index(shards)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; data "
              f"{index['env']}: {index['totals']['transitions']:,} transitions in {len(index['shards'])} shards, "
              f"max_window {index['chunking']['max_window']}\n")
        print("| config | K | batch | model (params) | loader windows/s, 1 worker | loader windows/s, 2 workers | "
              "training samples/s | ratio, 1 worker | ratio, 2 workers |\n|---|---|---|---|---|---|---|---|---|")
        for name in args.configs:
            print(bench_config(name, shards, args.batches, args.steps), flush=True)
        print(f"\nload average {os.getloadavg()[0]:.1f} at the end")
    finally:
        if not args.work:
            shutil.rmtree(work)


if __name__ == "__main__":
    main()
