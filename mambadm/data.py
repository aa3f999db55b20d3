"""Streaming training / validation loader over WebDataset shards.

Contracts: docs/architecture.md, "Shards" (what is read) and "Batches" (what is produced). Design notes in
docs/training.md. In short:

* ``read_index`` / ``select_shards`` pick the nested dataset-size subset and the held-out validation shards.
* Every shard sample is one *chunk* of an episode; the loader cuts K-step windows from the window starts a chunk
  owns, stacks Atari frames (zeros before the episode start), normalises vector states with the index's
  ``state_mean`` / ``state_std`` (+1e-6), divides returns-to-go by ``data.rtg_scale`` and right-pads + masks
  windows cut by the episode end.
* Training streams are infinite (``wds.ResampledShards``) and a pure function of ``(stream seed, rank, worker)``;
  validation is an exact, finite pass in which every owned start of every validation shard is served once.
* Shards are split explicitly per rank (``split_by_rank``) and per DataLoader worker (``wds.split_by_worker``).
  The loader is *not* passed through ``accelerator.prepare()``: for an IterableDataset Accelerate either makes
  rank 0 read and broadcast every batch or shards the already-split stream a second time, silently. Batches are
  moved to the device with ``to_device``.
"""
from __future__ import annotations

import io
import json
import math
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

STATE_STD_EPS = 1e-6  # added to the dataset's state std before dividing (as the DT code does)
WINDOWS_PER_OWNED_STEP = 0.05  # training: random windows drawn per owned start of a decoded chunk (5 per 100)
INDEX_KEYS = ("format_version", "env", "env_spec", "chunking", "totals", "shards")
MEMBERS = ("obs.npy", "actions.npy", "rtg.npy", "timesteps.npy", "meta.json")


class DataError(ValueError):
    """Shards or settings the loader cannot use; the message names the file or key."""


# ----------------------------------------------------------------------------------------------- index, subsets
def read_index(shard_dir: str | Path) -> dict:
    """Loads and checks ``shard_dir/index.json``; each shard entry gets ``path`` (absolute) added."""
    shard_dir = Path(shard_dir)
    path = shard_dir / "index.json"
    if not path.is_file():
        raise DataError(f"{path}: not found (make shards with: python data_pipeline/shard.py --output {shard_dir} "
                        f"...; an unfinished shard run leaves no index)")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON: {e}") from None
    missing = [k for k in INDEX_KEYS if k not in index]
    if missing:
        raise DataError(f"{path}: missing keys {missing}")
    if not index["shards"]:
        raise DataError(f"{path}: lists no shards")
    for i, shard in enumerate(index["shards"]):
        for key in ("name", "transitions", "samples"):
            if key not in shard:
                raise DataError(f"{path}: shards[{i}] has no '{key}'")
        shard["path"] = str((shard_dir / shard["name"]).resolve())
    spec = index["env_spec"]
    if spec.get("obs_kind") == "vector":
        dim = spec["obs_shape"][0]
        for key in ("state_mean", "state_std"):
            value = index.get(key)
            if value is None or len(value) != dim:
                got = None if value is None else len(value)
                raise DataError(f"{path}: '{key}' must list {dim} numbers for vector observations, got {got}")
    return index


def select_shards(index: dict, data_cfg: Any) -> tuple[list[dict], list[dict]]:
    """``(train_shards, val_shards)``: nested dataset-size subsets over one fixed permutation of the shards.

    The permutation is seeded by ``data.subset_seed``; its last ``data.val_shards`` shards are validation; the
    training subset is the shortest prefix of the rest whose owned transitions reach ``data.subset_transitions``
    (or ``data.subset_fraction`` of them when that is 0). Prefixes of one permutation are nested.
    """
    shards = index["shards"]
    n, n_val = len(shards), int(data_cfg.val_shards)
    if not 0 <= n_val < n:
        raise DataError(f"data.val_shards={n_val}: must be in [0, {n - 1}] for an index with {n} shards")
    order = np.random.default_rng(int(data_cfg.subset_seed)).permutation(n)
    perm = [shards[i] for i in order]
    pool, val = perm[:n - n_val], perm[n - n_val:]
    available = sum(s["transitions"] for s in pool)
    if data_cfg.subset_transitions > 0:
        target = int(data_cfg.subset_transitions)
    else:
        if not 0.0 < data_cfg.subset_fraction <= 1.0:
            raise DataError(f"data.subset_fraction={data_cfg.subset_fraction}: must be in (0, 1]")
        target = math.ceil(data_cfg.subset_fraction * available)
    if target > available:
        raise DataError(f"data.subset_transitions={target}: the {len(pool)} training shards hold only "
                        f"{available} transitions")
    train, total = [], 0
    for shard in pool:
        if total >= target:
            break
        train.append(shard)
        total += shard["transitions"]
    return train, val


def transitions_of(shards: list[dict]) -> int:
    return sum(s["transitions"] for s in shards)


# ----------------------------------------------------------------------------------------------- windows
class WindowMaker:
    """Turns decoded chunks into fixed-size K-step windows (numpy, before batching)."""

    def __init__(self, index: dict, data_cfg: Any):
        spec, chunking = index["env_spec"], index["chunking"]
        self.k = int(data_cfg.context_len)
        self.atari = spec["obs_kind"] == "atari"
        self.discrete = bool(spec["discrete"])
        self.rtg_scale = float(data_cfg.rtg_scale)
        self.frame_stack = int(data_cfg.frame_stack) if self.atari else 1
        if self.k > chunking["max_window"]:
            raise DataError(f"data.context_len={self.k} exceeds the shards' chunking.max_window="
                            f"{chunking['max_window']} (re-shard with --max-window {self.k})")
        if self.atari and chunking["frame_context"] < self.frame_stack - 1:
            raise DataError(f"data.frame_stack={self.frame_stack} needs chunking.frame_context >= "
                            f"{self.frame_stack - 1}, the shards have {chunking['frame_context']}")
        if not self.atari:
            self.mean = np.asarray(index["state_mean"], np.float32)
            self.std = np.asarray(index["state_std"], np.float32) + STATE_STD_EPS

    @staticmethod
    def decode(sample: dict) -> dict:
        """npy/json members of one shard sample → arrays (never unpickles)."""
        missing = [m for m in MEMBERS if m not in sample]
        if missing:
            raise DataError(f"{sample.get('__url__', '?')}: sample {sample.get('__key__')} lacks members {missing}")
        out = {m[:-4]: np.load(io.BytesIO(sample[m]), allow_pickle=False) for m in MEMBERS if m.endswith(".npy")}
        out["meta"] = json.loads(sample["meta.json"])
        return out

    def window(self, chunk: dict, start: int) -> dict:
        """The window whose first step is episode step ``start`` (an owned start of ``chunk``)."""
        k, fs, begin = self.k, self.frame_stack, chunk["meta"]["begin"]
        i = start - begin
        n = min(k, len(chunk["actions"]) - i)  # < k only when the episode ends inside the window
        obs = chunk["obs"]
        if self.atari:  # frames start-(fs-1) .. start+n-1, zeros before the episode start and after its end
            frames = np.zeros((k + fs - 1, *obs.shape[1:]), np.uint8)
            lo = i - (fs - 1)
            frames[max(0, -lo):fs - 1 + n] = obs[max(0, lo):i + n]
            states = frames
        else:
            states = np.zeros((k, obs.shape[1]), np.float32)
            states[:n] = (obs[i:i + n] - self.mean) / self.std
        actions = chunk["actions"]
        act = np.zeros((k, *actions.shape[1:]), np.int64 if self.discrete else np.float32)
        act[:n] = actions[i:i + n]
        rtg = np.zeros(k, np.float32)
        rtg[:n] = chunk["rtg"][i:i + n] / self.rtg_scale
        timesteps = np.zeros(k, np.int64)
        timesteps[:n] = chunk["timesteps"][i:i + n]
        mask = np.zeros(k, bool)
        mask[:n] = True
        return {"states": states, "actions": act, "rtg": rtg, "timesteps": timesteps, "mask": mask}

    def all_windows(self, chunks: Iterator[dict]) -> Iterator[dict]:
        """Exact mode: every owned start of every chunk, in order."""
        for sample in chunks:
            chunk = self.decode(sample)
            for start in range(chunk["meta"]["own_begin"], chunk["meta"]["own_end"]):
                yield self.window(chunk, start)

    def random_windows(self, chunks: Iterator[dict], rng: np.random.Generator) -> Iterator[dict]:
        """Training: about ``WINDOWS_PER_OWNED_STEP`` random owned starts per owned step (stochastic rounding)."""
        for sample in chunks:
            chunk = self.decode(sample)
            lo, hi = chunk["meta"]["own_begin"], chunk["meta"]["own_end"]
            expected = (hi - lo) * WINDOWS_PER_OWNED_STEP
            count = int(expected) + int(rng.random() < expected - int(expected))
            for start in rng.integers(lo, hi, size=count):
                yield self.window(chunk, int(start))

    def collate(self, windows: list[dict]) -> dict[str, torch.Tensor]:
        """Stacks windows into a batch. Atari frames stay unstacked, "frames" (B, K + frame_stack - 1, 84, 84): the
        model stacks them as a view where it runs (`mambadm.model.base.batch_states`), so workers neither write nor
        ship the frame_stack-times larger stacks (most of a worker's time when they did, benchmarks/RESULTS.md)."""
        batch = {key: torch.from_numpy(np.stack([w[key] for w in windows])) for key in windows[0]}
        if self.atari:
            batch["frames"] = batch.pop("states")
        return batch


# ----------------------------------------------------------------------------------------------- streams
def split_by_rank(rank: int, world_size: int):
    """WebDataset node splitter for an explicit rank (never inferred from global state)."""
    def splitter(src: Iterator[dict]) -> Iterator[dict]:
        for i, item in enumerate(src):
            if i % world_size == rank:
                yield item
    return splitter


def stream_seed(*parts: int) -> int:
    """A 63-bit seed that is a pure function of integer parts (stable across processes and runs)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


class WindowStream(IterableDataset):
    """K-step windows from a list of shards for one rank; split further over DataLoader workers.

    ``exact=False``: infinite stream of random windows from resampled shards; rank ``r`` of ``world_size`` and
    worker ``w`` take every ``world_size``-th, then every ``num_workers``-th shard of one resampled shard
    sequence drawn from ``seed``, so the stream is a pure function of ``(seed, rank, worker)``.
    ``exact=True``: one pass over the shards split by rank and worker, every owned start once.
    """

    def __init__(self, shards: list[dict], maker: WindowMaker, rank: int, world_size: int, seed: int,
                 exact: bool, shuffle_buffer: int = 0):
        self.urls = [s["path"] for s in shards]
        self.maker, self.rank, self.world_size = maker, rank, world_size
        self.seed, self.exact, self.shuffle_buffer = seed, exact, shuffle_buffer

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if self.exact and len(self.urls) < self.world_size * workers:
            raise DataError(f"exact pass over {len(self.urls)} shards needs at least one shard per rank and "
                            f"worker ({self.world_size} ranks x {workers} workers): hold out more shards or use "
                            f"fewer workers")
        if self.exact:
            source = wds.SimpleShardList(self.urls)
        else:
            source = wds.ResampledShards(self.urls, seed=self.seed, deterministic=True, worker_seed=lambda: 0)
        stages = [source, split_by_rank(self.rank, self.world_size), wds.split_by_worker,
                  wds.tarfile_to_samples()]
        if self.exact:
            stages.append(self.maker.all_windows)
        else:
            rng = np.random.default_rng([self.seed & 0xFFFFFFFF, self.rank, worker])
            stages.append(lambda chunks: self.maker.random_windows(chunks, rng))
            if self.shuffle_buffer > 1:
                stages.append(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer,
                                          rng=random.Random(stream_seed(self.seed, self.rank, worker))))
        return iter(wds.DataPipeline(*stages))


def make_loader(shards: list[dict], index: dict, data_cfg: Any, rank: int, world_size: int, seed: int,
                exact: bool, num_workers: int | None = None) -> DataLoader:
    """A per-rank DataLoader of batches (contract "Batches"). Not for ``accelerator.prepare()``."""
    maker = WindowMaker(index, data_cfg)
    workers = int(data_cfg.num_workers if num_workers is None else num_workers)
    dataset = WindowStream(shards, maker, rank, world_size, seed, exact,
                           0 if exact else int(data_cfg.shuffle_buffer))
    return DataLoader(dataset, batch_size=int(data_cfg.batch_size), num_workers=workers, collate_fn=maker.collate,
                      pin_memory=torch.cuda.is_available(), prefetch_factor=4 if workers else None,
                      worker_init_fn=_share_by_file_name if workers else None)


def _share_by_file_name(_worker_id: int) -> None:
    """In a loader worker only: hand batch tensors over as named shared-memory files, which the main process opens
    by name, instead of passing one file descriptor per tensor over a socket round trip: 1.8 -> 1.0 ms per Hopper
    batch (benchmarks/RESULTS.md, Training), next to 10-50 ms steps. The main process's strategy is untouched."""
    torch.multiprocessing.set_sharing_strategy("file_system")


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
