"""Shard one input unit: its episodes -> chunk samples -> ``shard-UUUU-KKKK.tar`` files + a done record.

Every tar is written under a temporary name and renamed when complete; the done record (``done/unit-UUUU.json``:
counts, sha256 and bytes per shard, return and state statistics) is written last, atomically, so a unit either has a
valid record or is redone. Tars are byte-reproducible (fixed mtime), so a redone unit gives identical files.

The tars are written with the standard library's ``tarfile`` in the member layout of ``webdataset.TarWriter``
(``<key>.<ext>`` in sorted order, mode 0444; plain USTAR headers): importing webdataset imports torch, which costs
every worker process 1-4 s of start-up and ~200 MB of memory. The tests read the shards back with webdataset.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from data_pipeline.chunking import Chunking, chunk_samples
from data_pipeline.running_stats import RunningStats
from data_pipeline.sources import get_reader

DELAY_ENV = "MAMBADM_SHARD_EPISODE_DELAY"  # seconds to sleep after each episode: lets tests kill a run midway


@dataclass(frozen=True)
class UnitJob:
    source: str  # reader name in data_pipeline.sources
    unit: Any  # the reader's unit
    index: int  # position in list_units(): names the unit's shards
    output: str  # output folder
    chunking: Chunking
    shard_transitions: int  # owned steps per shard before the next one starts
    vector_obs: bool  # collect state statistics

    def record_path(self) -> Path:
        return Path(self.output) / "done" / f"unit-{self.index:04d}.json"

    def identity(self) -> dict:
        """What a done record must match to be reused."""
        return {"source": self.source, "unit": str(self.unit), "chunking": asdict(self.chunking),
                "shard_transitions": self.shard_transitions}


class _HashingFile:
    """Write-through file wrapper counting bytes and computing sha256."""

    def __init__(self, path: Path):
        self.f, self.sha, self.bytes = open(path, "wb"), hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.bytes += len(data)
        return self.f.write(data)

    def close(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()


def sha256_file(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def write_json_atomic(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


def write_sample(tar: tarfile.TarFile, sample: dict) -> None:
    """One WebDataset sample: members ``<__key__>.<name>`` in sorted order, fixed mtime (reproducible bytes)."""
    key = sample["__key__"]
    for name in sorted(k for k in sample if k != "__key__"):
        info = tarfile.TarInfo(f"{key}.{name}")
        info.size, info.mtime, info.mode, info.uname, info.gname = len(sample[name]), 0, 0o444, "bigdata", "bigdata"
        tar.addfile(info, io.BytesIO(sample[name]))


class ShardSeries:
    """The tars of one unit: ``shard-UUUU-0000.tar``, ``-0001`` ..., each rolled over after enough owned steps."""

    def __init__(self, out: Path, unit_index: int, shard_transitions: int):
        self.out, self.unit_index, self.shard_transitions = out, unit_index, shard_transitions
        self.shards: list[dict] = []  # finished shards' entries for index.json
        self.writer = self.file = self.current = None

    def add(self, sample: dict, owned: int, episode_id: int) -> None:
        if self.current is not None and self.current["transitions"] >= self.shard_transitions:
            self.close()
        if self.current is None:
            name = f"shard-{self.unit_index:04d}-{len(self.shards):04d}.tar"
            self.file = _HashingFile(self.out / f".{name}.tmp")
            self.writer = tarfile.open(fileobj=self.file, mode="w|", format=tarfile.USTAR_FORMAT)
            self.current = {"name": name, "samples": 0, "transitions": 0, "episodes": set()}
        write_sample(self.writer, sample)
        self.current["samples"] += 1
        self.current["transitions"] += owned
        self.current["episodes"].add(episode_id)

    def close(self) -> None:
        """Finish the open tar (if any): close, rename into place, record counts and checksum."""
        if self.current is None:
            return
        self.writer.close()
        self.file.close()
        name = self.current["name"]
        os.replace(self.out / f".{name}.tmp", self.out / name)
        self.shards.append({"name": name, "samples": self.current["samples"],
                            "transitions": self.current["transitions"], "episodes": len(self.current["episodes"]),
                            "bytes": self.file.bytes, "sha256": self.file.sha.hexdigest()})
        self.writer = self.file = self.current = None


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
    series = ShardSeries(Path(job.output), job.index, job.shard_transitions)
    returns, states = RunningStats(), None
    totals = {"episodes": 0, "transitions": 0, "samples": 0, "max_length": 0}
    for ep in reader.read_unit(job.unit):
        if job.vector_obs:
            states = states or RunningStats(ep.observations.shape[1])
            states.update(ep.observations)
        returns.update(np.array([ep.total_return]))
        totals["episodes"] += 1
        totals["transitions"] += len(ep)
        totals["max_length"] = max(totals["max_length"], len(ep))
        for sample, owned in chunk_samples(ep, job.chunking):
            series.add(sample, owned, ep.episode_id)
            totals["samples"] += 1
        if progress:
            progress(len(ep))
        if delay:
            time.sleep(delay)
    series.close()
    record = {"identity": job.identity(), "shards": series.shards, **totals, "returns": returns.to_dict(),
              "states": states.to_dict() if states is not None else None}
    write_json_atomic(job.record_path(), record)
    return record
