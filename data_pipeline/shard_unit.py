"""Shard one input unit: its episodes -> episode samples -> ``shard-UUUU-KKKK.tar`` files + a done record.

Every tar is written under a temporary name and renamed when complete; the done record (``done/unit-UUUU.json``:
counts, sha256 and bytes per shard, return and state statistics) is written last, atomically, so a unit either has a
valid record or is redone. Tars are byte-reproducible (fixed mtime), so a redone unit gives identical files.

The tars hold the bytes the standard library's ``tarfile`` writes (``data_pipeline.tar_writer``) in the member layout
of ``webdataset.TarWriter`` (``<key>.<ext>`` in sorted order, mode 0444, fixed mtime; plain USTAR headers), sha256
computed while writing: importing webdataset imports torch, which costs every worker process 1-4 s of start-up and
~200 MB of memory. The tests read the shards back with webdataset and tarfile. A finished tar is fsynced and renamed
into place by a background thread while the next one is written; the done record waits for all of them.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from data_pipeline.atomic import atomic_write_json
from data_pipeline.episode import Episode
from data_pipeline.episode_sample import FORMAT_VERSION, episode_sample, make_compressor
from data_pipeline.running_stats import RunningStats
from data_pipeline.sources import get_reader
from data_pipeline.tar_writer import archive_end, member_header, member_padding

DELAY_ENV = "MAMBADM_SHARD_EPISODE_DELAY"  # seconds to sleep after each episode: lets tests kill a run midway


@dataclass(frozen=True)
class UnitJob:
    source: str  # reader name in data_pipeline.sources
    unit: Any  # the reader's unit
    index: int  # position in list_units(): names the unit's shards
    output: str  # output folder
    zstd_level: int  # of the array members
    shard_transitions: int  # steps per shard before the next one starts (at an episode boundary)
    vector_obs: bool  # collect state statistics

    def record_path(self) -> Path:
        return Path(self.output) / "done" / f"unit-{self.index:04d}.json"

    def identity(self) -> dict:
        """What a done record must match to be reused."""
        return {"source": self.source, "unit": str(self.unit), "format_version": FORMAT_VERSION,
                "zstd_level": self.zstd_level, "shard_transitions": self.shard_transitions}


def sha256_file(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def load_valid_record(job: UnitJob) -> dict | None:
    """The unit's done record if it matches the job and every shard it lists verifies; else None."""
    try:
        record = json.loads(job.record_path().read_text())
    except (OSError, ValueError):
        return None
    if record.get("identity") != job.identity():
        return None
    for shard in record["shards"]:
        path = Path(job.output) / shard["name"]
        if not path.exists() or path.stat().st_size != shard["bytes"] or sha256_file(path) != shard["sha256"]:
            return None
    return record


def clear_unit(job: UnitJob) -> None:
    """Remove whatever an interrupted run left of this unit."""
    job.record_path().unlink(missing_ok=True)
    for path in Path(job.output).glob(f"*shard-{job.index:04d}-*"):
        path.unlink()


class TarStream:
    """A tar file being written (``data_pipeline.tar_writer``'s bytes), counting its bytes and computing sha256."""

    def __init__(self, path: Path):
        self.file = open(path, "wb")
        self.sha, self.bytes = hashlib.sha256(), 0

    def write(self, data) -> None:
        self.sha.update(data)
        self.bytes += len(data)
        self.file.write(data)

    def add(self, name: str, data: bytes) -> None:
        """One regular file holding ``data``."""
        self.write(member_header(name, len(data)))
        self.write(data)
        self.write(member_padding(len(data)))

    def finish(self) -> None:
        """End the archive and hand it to the OS; ``bytes`` and ``sha`` are final from here on."""
        self.write(archive_end(self.bytes))
        self.file.flush()

    def sync_close(self) -> None:
        """Wait until the file is on disk (fsync), then close it. Safe to run in another thread after finish()."""
        os.fsync(self.file.fileno())
        self.file.close()


class FrameBuffer:
    """One growing uint8 buffer that every episode's frames are read into (``empty`` is the reader's allocator):
    the reader decompresses into pages already mapped, not into a new array per episode. Each episode's frames are
    overwritten by the next one's, so only a consumer done with an episode before it asks for the next may use it:
    the sharder, which compresses the episode first."""

    def __init__(self):
        self.memory = np.empty(0, np.uint8)

    def empty(self, shape: tuple[int, ...]) -> np.ndarray:
        size = math.prod(shape)
        if size > len(self.memory):
            self.memory = np.empty(size, np.uint8)
        return self.memory[:size].reshape(shape)


def read_episodes(reader, unit) -> Iterator[Episode]:
    """The unit's episodes, frames read into one reused ``FrameBuffer`` when the reader takes an allocator."""
    if "empty_frames" in inspect.signature(reader.read_unit).parameters:
        return reader.read_unit(unit, empty_frames=FrameBuffer().empty)
    return reader.read_unit(unit)


def write_sample(tar: TarStream, sample: dict) -> None:
    """One WebDataset sample: members ``<__key__>.<name>`` in sorted order."""
    key = sample["__key__"]
    for name in sorted(k for k in sample if k != "__key__"):
        tar.add(f"{key}.{name}", sample[name])


class ShardSeries:
    """The tars of one unit: ``shard-UUUU-0000.tar``, ``-0001`` ..., each rolled over after enough steps.

    Use as a context manager: leaving it waits for every finished tar to be fsynced and renamed (and re-raises a
    failure of that)."""

    def __init__(self, out: Path, unit_index: int, shard_transitions: int):
        self.out, self.unit_index, self.shard_transitions = out, unit_index, shard_transitions
        self.shards: list[dict] = []  # finished shards' entries for index.json
        self.tar: TarStream | None = None
        self.current: dict | None = None
        self._syncer = ThreadPoolExecutor(1, thread_name_prefix="shard-sync")
        self._pending: list[Future] = []

    def __enter__(self) -> ShardSeries:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if self.tar is not None:  # left by an error: the temporary file stays for the rerun to delete
            self.tar.file.close()
        self._syncer.shutdown(wait=True)
        if exc_type is None:
            for done in self._pending:
                done.result()

    def add(self, sample: dict, steps: int, episode_id: int) -> None:
        if self.current is not None and self.current["transitions"] >= self.shard_transitions:
            self.close()
        if self.current is None:
            name = f"shard-{self.unit_index:04d}-{len(self.shards):04d}.tar"
            self.tar = TarStream(self.out / f".{name}.tmp")
            self.current = {"name": name, "samples": 0, "transitions": 0, "episodes": set()}
        write_sample(self.tar, sample)
        self.current["samples"] += 1
        self.current["transitions"] += steps
        self.current["episodes"].add(episode_id)

    def close(self) -> None:
        """Finish the open tar (if any), record its counts and checksum; fsync + rename it in the background."""
        if self.current is None:
            return
        self.tar.finish()
        name = self.current["name"]
        self._pending.append(self._syncer.submit(self._sync_and_rename, self.tar, name))
        self.shards.append({"name": name, "samples": self.current["samples"],
                            "transitions": self.current["transitions"], "episodes": len(self.current["episodes"]),
                            "bytes": self.tar.bytes, "sha256": self.tar.sha.hexdigest()})
        self.tar = self.current = None

    def _sync_and_rename(self, tar: TarStream, name: str) -> None:
        tar.sync_close()
        os.replace(self.out / f".{name}.tmp", self.out / name)


def shard_unit(job: UnitJob, progress: Callable[[int], None] | None = None) -> dict:
    """Write the unit's shards and done record; return the record. ``progress(n)`` is called per episode."""
    record = load_valid_record(job)
    if record is not None:
        if progress:
            progress(record["transitions"])
        return record
    clear_unit(job)
    reader = get_reader(job.source)
    delay = float(os.environ.get(DELAY_ENV, "0") or 0)
    returns, states = RunningStats(), None
    compressor = make_compressor(job.zstd_level)
    totals = {"episodes": 0, "transitions": 0, "samples": 0, "max_length": 0}
    with ShardSeries(Path(job.output), job.index, job.shard_transitions) as series:
        for ep in read_episodes(reader, job.unit):
            if job.vector_obs:
                states = states or RunningStats(ep.observations.shape[1])
                states.update(ep.observations)
            returns.update(np.array([ep.total_return]))
            totals["episodes"] += 1
            totals["transitions"] += len(ep)
            totals["max_length"] = max(totals["max_length"], len(ep))
            series.add(episode_sample(ep, compressor), len(ep), ep.episode_id)
            totals["samples"] += 1
            if progress:
                progress(len(ep))
            if delay:
                time.sleep(delay)
        series.close()
    record = {"identity": job.identity(), "shards": series.shards, **totals, "returns": returns.to_dict(),
              "states": states.to_dict() if states is not None else None}
    atomic_write_json(job.record_path(), record, indent=1)
    return record
