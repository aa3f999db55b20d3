"""Loader throughput: shard format version 2 against version 1 on the same data, and against what training consumes.

    python benchmarks/bench_loader.py [--transitions 60000] [--hopper-transitions 20000] [--batches 40]
        [--repeats 2] [--mixing-batches 100] [--configs default paper demo] [--steps 5] [--work DIR]

Data: Breakout (by default the demo's 60,000 steps) and Hopper collected by the project's collectors
(``collect.py`` defaults) and sharded by ``shard.py`` with ``--shard-transitions 2000``, once by this checkout
(version 2) and once by the sharder of ``bench_shard.V1_COMMIT`` (version 1, chunked and uncompressed, extracted
with ``git archive``).

Formats table: windows/s of one DataLoader worker of the training stream (random windows, shuffling, frame
stacking, collation) at the papers' configs (Breakout: configs/data/breakout.yaml, K = 30, batch 128; Hopper:
configs/data/hopper-medium.yaml, K = 20, batch 64), timed over ``--batches`` after the shuffle buffer has filled,
version 1's loader (``mambadm/data.py`` of that commit) and this one alternating, best of ``--repeats``; the
worker's CPU time per window over the same batches (less disturbed by other jobs than wall time) and its peak RSS
(VmHWM, which counts the pages it shares with the main process since the fork). Bound: the bytes a window must be
written (its K + 3 frames into the batch) at this machine's memory copy rate, plus the frames decoded per window
(1 / WINDOWS_PER_STEP) at the zstd decompression rate of these shards; and the same with the write rate into new
shared memory (page faults included), where a worker that allocated every batch anew would have to put it (the
workers reuse their batch buffers instead, mambadm/batch_slots.py, so the memory-copy bound is the one that
applies); all measured in the same run.
Mixing: over ``--mixing-batches`` batches of the same stream, the mean share of a batch's windows that come from
its most common episode, and the mean number of episodes in a batch.

Configs table (``--configs``; none to skip): windows/s of ``mambadm.data.make_loader`` with 1 and 2 workers at
``default`` (mambadm/config.py), ``paper`` and ``demo`` (configs/train/breakout-demo.yaml) and samples/s of the
training step at that config (forward + loss + backward + AdamW, median of ``--steps`` after 2 untimed ones).
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zstandard

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mambadm import data as D  # noqa: E402
from mambadm.config import EnvSpec, load_config  # noqa: E402
from mambadm.model import build_model  # noqa: E402
from mambadm.optim import make_optimizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_shard import V1_COMMIT, v1_tree  # noqa: E402
from bench_train import train_step  # noqa: E402

CONFIGS = {"default": None, "paper": "configs/data/breakout.yaml", "demo": "configs/train/breakout-demo.yaml"}


def make_shards(work: Path, env: str, transitions: int, tree: Path = REPO) -> Path:
    """Collect real play of ``env`` once and shard it with the sharder of ``tree`` (reused when complete)."""
    raw, out = work / f"{env}-{transitions}-raw", work / f"{env}-{transitions}-shards-{tree.name}"
    if not raw.exists():
        subprocess.run([sys.executable, "data_pipeline/collect.py", env, "--output", str(raw), "--transitions",
                        str(transitions)], cwd=REPO, check=True, capture_output=True)
    if not (out / "index.json").exists():
        source, src = ("d4rl", raw) if env == "hopper" else ("dqn-replay", raw / "Breakout")
        subprocess.run([sys.executable, "data_pipeline/shard.py", "--source", source, "--input", str(src),
                        "--output", str(out), "--shard-transitions", "2000"], cwd=tree, check=True,
                       capture_output=True, env=os.environ | {"PYTHONPATH": str(tree)})
    return out


def v1_loader_module(tree: Path):
    """``mambadm/data.py`` of the version-1 commit, imported under its own name (it imports no other project
    module)."""
    spec = importlib.util.spec_from_file_location("data_v1", tree / "mambadm" / "data.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["data_v1"] = module  # DataLoader workers fork: the module must be importable by name
    spec.loader.exec_module(module)
    return module


def loader_rate(loader, batches: int, warmup: int) -> tuple[float, float, float]:
    """Windows/s of a training loader with one worker, timed over ``batches`` batches after ``warmup`` ones; the
    worker's CPU seconds (user + system) per window over the same batches, and its peak RSS (MiB)."""
    stream = iter(loader)
    for _ in range(warmup):
        next(stream)
    proc = Path(f"/proc/{stream._workers[0].pid}")

    def cpu_seconds() -> float:
        fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    start, cpu = time.perf_counter(), cpu_seconds()
    windows = sum(len(next(stream)["actions"]) for _ in range(batches))
    rate, cpu = windows / (time.perf_counter() - start), (cpu_seconds() - cpu) / windows
    rss = int(next(line for line in (proc / "status").read_text().splitlines()
                   if line.startswith("VmHWM")).split()[1]) / 1024
    del stream  # shuts the workers down
    return rate, cpu, rss


def tag_episodes(loader, version: str):
    """Adds ``episode`` (the episode id of every window) to the batches of an in-process loader."""
    maker = loader.dataset.maker
    if version == "v1":
        window = maker.window
        maker.window = lambda chunk, start: {**window(chunk, start), "episode": chunk["meta"]["episode_id"]}
    else:
        collate = maker.collate
        loader.collate_fn = lambda refs: {**collate(refs), "episode": [ep["meta"]["episode_id"] for ep, _ in refs]}
    return loader


def mixing(loader, batches: int, warmup: int) -> tuple[float, float]:
    """Mean share of a batch's windows from its most common episode, and mean number of episodes per batch."""
    stream = iter(loader)
    for _ in range(warmup):
        next(stream)
    top, distinct = [], []
    for _ in range(batches):
        ids = np.asarray(next(stream)["episode"])
        counts = np.unique(ids, return_counts=True)[1]
        top.append(counts.max() / len(ids))
        distinct.append(len(counts))
    return float(np.mean(top)), float(np.mean(distinct))


def write_rates() -> tuple[float, float]:
    """Bytes/s of copying a 256 MiB array into another (this machine's memory copy rate) and of writing a batch of
    frames (128 x 33 x 84 x 84 bytes) into new shared memory, as a loader worker allocating each batch anew would
    hand it over (the page faults included); best of 3 each."""
    src, dst = np.ones(256 << 20, np.uint8), np.empty(256 << 20, np.uint8)
    copy = src.nbytes / min(timed(lambda: np.copyto(dst, src)) for _ in range(3))
    shape = (128, 33, 84, 84)

    def shared_write() -> None:
        elem = torch.empty(0, dtype=torch.uint8)
        elem.new(elem._typed_storage()._new_shared(math.prod(shape), device=elem.device)).resize_(shape).fill_(1)

    return copy, math.prod(shape) / min(timed(shared_write) for _ in range(3))


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def zstd_frame_rate(shards: Path) -> tuple[float, int]:
    """Decompressed bytes/s of the ``obs`` members of a version-2 shard folder (best of 3) and the bytes of one
    observation."""
    import webdataset as wds

    index = D.read_index(shards)
    members = [s["obs.npy.zst"] for s in wds.WebDataset([x["path"] for x in index["shards"]], shardshuffle=False)]
    dctx = zstandard.ZstdDecompressor()
    size = sum(len(dctx.decompress(m)) for m in members)
    seconds = min(timed(lambda: [dctx.decompress(m) for m in members]) for _ in range(3))
    return size / seconds, D.decode(next(iter(wds.WebDataset(index["shards"][0]["path"]))))["obs"][0].nbytes


FORMAT_CONFIGS = {"breakout": "configs/data/breakout.yaml", "hopper": "configs/data/hopper-medium.yaml"}


def bench_formats(env: str, transitions: int, work: Path, batches: int, repeats: int,
                  mixing_batches: int) -> tuple[str, str]:
    tree = v1_tree(work)
    modules = {"v1": v1_loader_module(tree), "v2": D}
    shards = {"v1": make_shards(work, env, transitions, tree), "v2": make_shards(work, env, transitions)}
    cfg = load_config(REPO / FORMAT_CONFIGS[env], [f"data.shards={shards['v2']}"])
    k, batch = int(cfg.data.context_len), int(cfg.data.batch_size)
    warmup = -(-int(cfg.data.shuffle_buffer) // batch) + 2  # fill the shuffle buffer first
    runs: dict[str, list[tuple[float, float, float]]] = {"v1": [], "v2": []}
    mixed = {}
    for _ in range(repeats):
        for version, module in modules.items():
            index = module.read_index(shards[version])
            train, _ = module.select_shards(index, cfg.data)
            loader = module.make_loader(train, index, cfg.data, 0, 1, seed=0, exact=False, num_workers=1)
            runs[version].append(loader_rate(loader, batches, warmup))
            if version not in mixed:
                loader = module.make_loader(train, index, cfg.data, 0, 1, seed=0, exact=False, num_workers=0)
                mixed[version] = mixing(tag_episodes(loader, version), mixing_batches, warmup)
    bytes_per = {v: sum(s["bytes"] for s in modules[v].read_index(shards[v])["shards"]) /
                 modules[v].read_index(shards[v])["totals"]["transitions"] for v in modules}
    zstd_rate, obs_bytes = zstd_frame_rate(shards["v2"])
    frames = k + int(cfg.data.frame_stack) - 1 if env == "breakout" else k
    window_bytes, decoded_bytes = frames * obs_bytes, obs_bytes / D.WINDOWS_PER_STEP
    copy, shared = write_rates()
    bound, shared_bound = (1 / (window_bytes / rate + decoded_bytes / zstd_rate) for rate in (copy, shared))
    rate = {v: max(r[0] for r in rs) for v, rs in runs.items()}
    cpu = {v: min(r[1] for r in rs) * 1e6 for v, rs in runs.items()}
    rss = {v: min(r[2] for r in rs) for v, rs in runs.items()}
    return (f"| {env} | {k} | {batch} | {bytes_per['v1']:,.0f} | {bytes_per['v2']:,.0f} | {rate['v1']:,.0f} | "
            f"{rate['v2']:,.0f} | {rate['v2'] / rate['v1']:.2f} | {cpu['v1']:.0f} | {cpu['v2']:.0f} | "
            f"{cpu['v1'] / cpu['v2']:.2f} | {bound:,.0f} / {shared_bound:,.0f} | {rate['v2'] / bound:.2f} / "
            f"{rate['v2'] / shared_bound:.2f} | {rss['v1']:.0f} | {rss['v2']:.0f} | "
            f"{mixed['v1'][0]:.3f} / {mixed['v1'][1]:.1f} | {mixed['v2'][0]:.3f} / {mixed['v2'][1]:.1f} |",
            f"window {window_bytes / 1e3:.1f} kB written + {decoded_bytes / 1e3:.1f} kB decoded; memory copy "
            f"{copy / 1e9:.2f} GB/s, write into new shared memory {shared / 1e9:.2f} GB/s, zstd decompression "
            f"{zstd_rate / 1e9:.2f} GB/s")


FORMATS_HEADER = ("| data | K | batch | v1 bytes/step | v2 bytes/step | v1 windows/s | v2 windows/s | v2 / v1 "
                  "| v1 worker CPU µs/window | v2 worker CPU µs/window | v1 / v2 CPU "
                  "| v2 bound windows/s: memory copy / new shared memory | v2 / bound | v1 worker peak RSS MiB "
                  "| v2 worker peak RSS MiB | v1 mixing: top-episode share / episodes per batch | v2 mixing |\n"
                  + "|---" * 17 + "|")


def bench_config(name: str, shards: Path, batches: int, steps: int) -> str:
    path = CONFIGS[name]
    cfg = load_config(REPO / path if path else None, [f"data.shards={shards}"])
    index = D.read_index(shards)
    train_shards, _ = D.select_shards(index, cfg.data)
    warmup = -(-int(cfg.data.shuffle_buffer) // int(cfg.data.batch_size)) + 2  # fill the shuffle buffer first
    rates = {}
    for workers in (1, 2):
        loader = D.make_loader(train_shards, index, cfg.data, 0, 1, seed=0, exact=False, num_workers=workers)
        rates[workers] = loader_rate(loader, batches, warmup)[0]
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
    p.add_argument("--transitions", type=int, default=60_000, help="Breakout steps to collect")
    p.add_argument("--hopper-transitions", type=int, default=20_000, help="Hopper steps to collect (0: none)")
    p.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--batches", type=int, default=40, help="loader batches timed per measurement")
    p.add_argument("--repeats", type=int, default=2, help="alternating runs per format (the best is kept)")
    p.add_argument("--mixing-batches", type=int, default=100, help="batches inspected for the mixing columns")
    p.add_argument("--steps", type=int, default=5, help="training steps timed per config (median)")
    p.add_argument("--work", help="scratch folder kept between runs (default: a temporary one)")
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_loader_"))
    try:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; version 1 = "
              f"{V1_COMMIT[:8]}\n\n{FORMATS_HEADER}")
        envs = [("breakout", args.transitions)] + ([("hopper", args.hopper_transitions)] if args.hopper_transitions
                                                   else [])
        notes = []
        for env, transitions in envs:
            row, note = bench_formats(env, transitions, work, args.batches, args.repeats, args.mixing_batches)
            print(row, flush=True)
            notes.append(f"{env}: {note}")
        print("\n" + "\n".join(notes))
        if args.configs:
            print("\n| config | K | batch | model (params) | loader windows/s, 1 worker | loader windows/s, 2 workers "
                  "| training samples/s | ratio, 1 worker | ratio, 2 workers |\n|---|---|---|---|---|---|---|---|---|")
            for name in args.configs:
                print(bench_config(name, make_shards(work, "breakout", args.transitions), args.batches, args.steps),
                      flush=True)
        print(f"\nload average {os.getloadavg()[0]:.1f} at the end")
    finally:
        if not args.work:
            shutil.rmtree(work)


if __name__ == "__main__":
    main()
