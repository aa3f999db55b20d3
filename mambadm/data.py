"""Streaming training / validation loader over WebDataset shards.

Contracts: docs/architecture.md, "Shards" (what is read) and "Batches" (what is produced). Design notes in
docs/training.md. In short:

* ``read_index`` / ``select_shards`` pick the nested dataset-size subset and the held-out validation shards.
* Every shard sample is one whole episode, each array one zstd-compressed NPY member (format version 2; a
  version-1 folder fails at once, naming the re-shard command). The loader decodes an episode once and cuts K-step
  windows from it: Atari frames stacked at load time (zeros before the episode start), vector states normalised
  with the index's ``state_mean`` / ``state_std`` (+1e-6), returns-to-go divided by ``data.rtg_scale``, windows cut
  by the episode end right-padded + masked (training windows shifted back to end at the episode end instead with
  ``data.window_cut=shifted``, as DT's Atari code does; validation stays padded). Training windows are drawn from
  a pool of decoded episodes holding ``data.shuffle_buffer / WINDOWS_PER_STEP`` steps, which mixes them across
  episodes; a window stays a reference (episode, start) until ``collate`` copies its steps, once, straight into the
  batch.
* Training streams are infinite (``wds.ResampledShards``) and a pure function of ``(stream seed, rank, worker)``;
  validation is an exact, finite pass in which every step (or every ``data.val_stride``-th step) of every
  validation shard starts one window.
* Shards are split explicitly per rank (``split_by_rank``) and per DataLoader worker (``wds.split_by_worker``).
  The loader is *not* passed through ``accelerator.prepare()``: for an IterableDataset Accelerate either makes
  rank 0 read and broadcast every batch or shards the already-split stream a second time, silently. Batches are
  moved to the device with ``to_device``.
"""
from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
import zstandard
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mambadm.batch_slots import SLOT_KEY, BatchSlots, SlotReturningIter, shared_tensor

STATE_STD_EPS = 1e-6  # added to the dataset's state std before dividing (as the DT code does)
WINDOWS_PER_STEP = 0.05  # training: random windows drawn per step of a decoded episode (5 per 100, as before)
FORMAT_VERSION = 2  # of the shards this loader reads (index.json's format_version)
INDEX_KEYS = ("format_version", "env", "env_spec", "encoding", "totals", "shards")
MEMBERS = ("obs.npy.zst", "actions.npy.zst", "rtg.npy.zst", "timesteps.npy.zst", "meta.json")  # those it reads


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
    if index.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path}: format_version {index.get('format_version')}; this loader reads only "
                        f"format_version {FORMAT_VERSION} (one compressed sample per episode). Re-shard the input "
                        f"into this folder with: python data_pipeline/shard.py --source "
                        f"{index.get('source', 'SOURCE')} --input INPUT --output {shard_dir} (these shards were made "
                        f"by: {index.get('command')})")
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
    training subset is the shortest prefix of the rest whose transitions reach ``data.subset_transitions``
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


# ----------------------------------------------------------------------------------------------- samples
def load_npy_zst(data: bytes, decompressor: zstandard.ZstdDecompressor, where: str) -> np.ndarray:
    """The array of one ``<name>.npy.zst`` member: a zstd frame holding an NPY file. Zero-copy after decompression
    (the array is a read-only view of the decompressed bytes); never unpickles."""
    try:
        raw = decompressor.decompress(data)
    except zstandard.ZstdError as e:
        raise DataError(f"{where}: damaged compressed member ({e}); check every shard with: python "
                        f"data_pipeline/shard.py --output <shard folder> --verify") from None
    buf = io.BytesIO(raw)
    try:
        version = np.lib.format.read_magic(buf)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(buf)
    except ValueError as e:
        raise DataError(f"{where}: not an NPY array: {e}") from None
    count = math.prod(shape)
    if dtype.hasobject or fortran or len(raw) - buf.tell() != count * dtype.itemsize:
        raise DataError(f"{where}: expected {count} C-ordered {dtype} items in {len(raw) - buf.tell()} bytes")
    return np.frombuffer(raw, dtype, count, buf.tell()).reshape(shape)


def episode_length(sample: dict) -> int:
    """The episode length a shard sample's ``meta.json`` records."""
    try:
        return int(json.loads(sample["meta.json"])["episode_length"])
    except (KeyError, ValueError, TypeError) as e:
        raise DataError(f"{sample.get('__url__', '?')}: sample {sample.get('__key__')}: meta.json without a valid "
                        f"episode_length ({e!r})") from None


def decode(sample: dict) -> dict:
    """One shard sample (one whole episode) -> ``obs``, ``actions``, ``rtg``, ``timesteps`` arrays + ``meta``."""
    where = f"{sample.get('__url__', '?')}: sample {sample.get('__key__')}"
    missing = [m for m in MEMBERS if m not in sample]
    if missing:
        raise DataError(f"{where}: lacks members {missing}")
    decompressor = zstandard.ZstdDecompressor()
    episode = {m.split(".")[0]: load_npy_zst(sample[m], decompressor, f"{where}, member {m}")
               for m in MEMBERS if m.endswith(".npy.zst")}
    episode["meta"] = json.loads(sample["meta.json"])
    lengths = {len(a) for name, a in episode.items() if name != "meta"}
    if lengths != {episode["meta"]["episode_length"]}:
        raise DataError(f"{where}: array lengths {sorted(lengths)}, expected episode_length "
                        f"{episode['meta']['episode_length']}")
    return episode


# ----------------------------------------------------------------------------------------------- windows
class WindowMaker:
    """Cuts K-step windows from decoded episodes: a window is ``(episode, start)`` until ``collate`` writes a batch.

    ``window`` is the readable definition of one window; ``collate`` writes the same numbers straight into the
    batch tensors (tested against each other), so a window's frames are copied once, from the decoded episode into
    the batch."""

    def __init__(self, index: dict, data_cfg: Any):
        spec = index["env_spec"]
        self.k = int(data_cfg.context_len)
        self.atari = spec["obs_kind"] == "atari"
        self.discrete = bool(spec["discrete"])
        self.rtg_scale = float(data_cfg.rtg_scale)
        self.frame_stack = int(data_cfg.frame_stack) if self.atari else 1
        self.shift = data_cfg.window_cut == "shifted"
        self.val_stride = int(data_cfg.val_stride)
        if self.val_stride < 1:
            raise DataError(f"data.val_stride={self.val_stride}: must be >= 1 (1 starts a validation window at "
                            f"every step)")
        self.slots: BatchSlots | None = None  # set by SlotLoader for each iteration with workers
        if not self.atari:
            self.mean = np.asarray(index["state_mean"], np.float32)
            self.std = np.asarray(index["state_std"], np.float32) + STATE_STD_EPS

    def training_start(self, start: int, length: int) -> int:
        """Where a training window drawn at ``start`` begins: there (padded), or moved back so that it ends at the
        episode end when it would cross it (shifted; an episode shorter than K still gives one padded window)."""
        return max(0, min(start, length - self.k)) if self.shift else start

    def window(self, episode: dict, start: int) -> dict:
        """The window whose first step is episode step ``start``, as numpy arrays (the readable path)."""
        k, fs = self.k, self.frame_stack
        n = min(k, len(episode["actions"]) - start)  # < k only when the episode ends inside the window
        obs = episode["obs"]
        if self.atari:  # frames start-(fs-1) .. start+n-1, zeros before the episode start and after its end
            frames = np.zeros((k + fs - 1, *obs.shape[1:]), np.uint8)
            lo = start - (fs - 1)
            frames[max(0, -lo):fs - 1 + n] = obs[max(0, lo):start + n]
            states = frames
        else:
            states = np.zeros((k, obs.shape[1]), np.float32)
            states[:n] = (obs[start:start + n] - self.mean) / self.std
        actions = episode["actions"]
        act = np.zeros((k, *actions.shape[1:]), np.int64 if self.discrete else np.float32)
        act[:n] = actions[start:start + n]
        rtg = np.zeros(k, np.float32)
        rtg[:n] = episode["rtg"][start:start + n] / self.rtg_scale
        timesteps = np.zeros(k, np.int64)
        timesteps[:n] = episode["timesteps"][start:start + n]
        mask = np.zeros(k, bool)
        mask[:n] = True
        return {"states": states, "actions": act, "rtg": rtg, "timesteps": timesteps, "mask": mask}

    def all_windows(self, samples: Iterator[dict]) -> Iterator[tuple[dict, int]]:
        """Exact mode: every start of every episode, in order (every ``data.val_stride``-th start: a validation
        budget of a few batches then spans the whole validation set instead of its first episode)."""
        for sample in samples:
            episode = decode(sample)
            for start in range(0, len(episode["actions"]), self.val_stride):
                yield episode, start

    def random_windows(self, samples: Iterator[dict], rng: np.random.Generator,
                       pool_windows: int) -> Iterator[tuple[dict, int]]:
        """Training: windows drawn from a pool of decoded episodes. An episode of T steps read from the shard stream
        serves ``WINDOWS_PER_STEP * T`` windows (stochastic rounding), each from a uniform random start, so sampling
        stays uniform over transitions; every window comes from an episode chosen uniformly from the pool. The pool
        is refilled from the shard stream while its episodes hold fewer than ``pool_windows / WINDOWS_PER_STEP``
        steps (the data a shuffle buffer of ``pool_windows`` windows draws from) and fewer than ``10 * pool_windows``
        windows are left to serve. An episode read again while in the pool (the shards are resampled) adds its
        windows to the decoded copy. An episode leaves the pool when its windows are served."""
        pool: list[list] = []  # [key, episode, windows it still serves]
        where: dict[tuple, int] = {}  # key -> position in pool
        pending = held = 0
        samples = iter(samples)
        while True:
            while (held < pool_windows / WINDOWS_PER_STEP and pending < 10 * pool_windows) or not pool:
                sample = next(samples, None)
                if sample is None:
                    break
                key = (sample.get("__url__"), sample.get("__key__"))
                expected = episode_length(sample) * WINDOWS_PER_STEP
                count = int(expected) + int(rng.random() < expected - int(expected))
                if not count:
                    continue
                if key in where:
                    pool[where[key]][2] += count
                else:
                    where[key] = len(pool)
                    pool.append([key, decode(sample), count])
                    held += len(pool[-1][1]["actions"])
                pending += count
            if not pool:
                return
            i = int(rng.integers(len(pool)))
            episode = pool[i][1]
            length = len(episode["actions"])
            yield episode, self.training_start(int(rng.integers(length)), length)
            pending -= 1
            pool[i][2] -= 1
            if not pool[i][2]:
                held -= len(episode["actions"])
                del where[pool[i][0]]
                last = pool.pop()
                if i < len(pool):
                    pool[i] = last
                    where[last[0]] = i

    def collate(self, windows: list[tuple[dict, int]]) -> dict[str, torch.Tensor]:
        """Writes windows into a batch (the fast path of ``window``). Atari frames stay unstacked, "frames"
        (B, K + frame_stack - 1, 84, 84): the model stacks them as a view where it runs
        (`mambadm.model.base.batch_states`), so workers neither write nor ship the frame_stack-times larger
        stacks."""
        b, k, fs = len(windows), self.k, self.frame_stack
        first = windows[0][0]
        obs_shape, act_shape = first["obs"].shape[1:], first["actions"].shape[1:]
        states_shape = (b, k + fs - 1, *obs_shape) if self.atari else (b, k, *obs_shape)
        layout = {"frames" if self.atari else "states": (states_shape, torch.uint8 if self.atari else torch.float32),
                  "actions": ((b, k, *act_shape), torch.int64 if self.discrete else torch.float32),
                  "rtg": ((b, k), torch.float32), "timesteps": ((b, k), torch.int64), "mask": ((b, k), torch.bool)}
        slot, batch = self.batch_tensors(layout)
        for tensor in list(batch.values())[1:]:  # the small arrays; the states are written whole below
            tensor.zero_()
        states_np, act, rtg, timesteps, mask = (t.numpy() for t in batch.values())
        for row, (episode, start) in enumerate(windows):
            obs = episode["obs"]
            end = min(start + k, len(obs))
            n = end - start
            if self.atari:
                lo = start - (fs - 1)  # first frame of the window; negative: zeros before the episode start
                states_np[row, :max(0, -lo)] = 0
                states_np[row, max(0, -lo):fs - 1 + n] = obs[max(0, lo):end]
                states_np[row, fs - 1 + n:] = 0
            else:
                np.subtract(obs[start:end], self.mean, out=states_np[row, :n])
                states_np[row, :n] /= self.std
                states_np[row, n:] = 0
            act[row, :n] = episode["actions"][start:end]
            np.divide(episode["rtg"][start:end], self.rtg_scale, out=rtg[row, :n])
            timesteps[row, :n] = episode["timesteps"][start:end]
            mask[row, :n] = True
        return batch if slot is None else {**batch, SLOT_KEY: torch.tensor(slot)}

    def batch_tensors(self, layout: dict) -> tuple[tuple[int, int] | None, dict[str, torch.Tensor]]:
        """Uninitialised batch tensors of ``layout`` (name -> (shape, dtype)). In a loader worker they are in shared
        memory, so handing the batch to the main process copies nothing, and come from a reused slot when the
        loader has them (mambadm/batch_slots.py); the slot is returned as (worker, slot), else None."""
        info = get_worker_info()
        if info is None:
            return None, {k: torch.empty(shape, dtype=dtype) for k, (shape, dtype) in layout.items()}
        if self.slots is None:
            return None, {k: shared_tensor(shape, dtype) for k, (shape, dtype) in layout.items()}
        slot, tensors = self.slots.tensors(layout)
        return (info.id, slot), tensors


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
    ``exact=True``: one pass over the shards split by rank and worker, every step of every episode starting one
    window.
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
            stages.append(lambda samples: self.maker.random_windows(samples, rng, self.shuffle_buffer))
        return iter(wds.DataPipeline(*stages))


def make_loader(shards: list[dict], index: dict, data_cfg: Any, rank: int, world_size: int, seed: int,
                exact: bool, num_workers: int | None = None) -> DataLoader:
    """A per-rank DataLoader of batches (contract "Batches"). Not for ``accelerator.prepare()``."""
    maker = WindowMaker(index, data_cfg)
    workers = int(data_cfg.num_workers if num_workers is None else num_workers)
    dataset = WindowStream(shards, maker, rank, world_size, seed, exact,
                           0 if exact else int(data_cfg.shuffle_buffer))
    return SlotLoader(dataset, batch_size=int(data_cfg.batch_size), num_workers=workers, collate_fn=maker.collate,
                      pin_memory=torch.cuda.is_available(), prefetch_factor=4 if workers else None,
                      worker_init_fn=_share_by_file_name if workers else None)


class SlotLoader(DataLoader):
    """A DataLoader whose workers reuse their batch buffers (mambadm/batch_slots.py): each iteration with workers
    gets fresh slot flags before its workers start, and its iterator hands freed slots back."""

    def __iter__(self):
        maker = self.dataset.maker
        if not self.num_workers:
            maker.slots = None
            return super().__iter__()
        maker.slots = BatchSlots(self.num_workers)
        return SlotReturningIter(super().__iter__(), maker.slots)


def _share_by_file_name(_worker_id: int) -> None:
    """In a loader worker only: hand batch tensors over as named shared-memory files, which the main process opens
    by name, instead of passing one file descriptor per tensor over a socket round trip: 1.8 -> 1.0 ms per Hopper
    batch (benchmarks/RESULTS.md, Training), next to 10-50 ms steps. The main process's strategy is untouched."""
    torch.multiprocessing.set_sharing_strategy("file_system")


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
