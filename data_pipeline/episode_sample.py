"""One episode -> one WebDataset sample of format version 2 (contract in docs/architecture.md, "Shards").

Every step is stored once: the sample's array members are the episode's whole arrays, each an NPY file (the bytes
``np.save(array, allow_pickle=False)`` writes) compressed into one zstd frame that records its content size and a
checksum, so a damaged member fails to decode instead of decoding to wrong numbers. Returns-to-go are computed over
the whole episode. Windows are cut from the decoded episode by the loader, not here.
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import zstandard

from data_pipeline.episode import Episode

FORMAT_VERSION = 2  # index.json's format_version for shards of these samples
ARRAYS = ("obs", "actions", "rewards", "rtg", "timesteps")  # member <name>.npy.zst of every sample
ZSTD_LEVEL = -1  # docs/data.md, "Sharding": against the other levels, measured on collected Breakout frames


def npy_parts(array: np.ndarray) -> tuple[bytes, memoryview]:
    """The bytes of ``np.save(array, allow_pickle=False)`` as (header, zero-copy view of the data)."""
    array = np.ascontiguousarray(array)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(array))
    return header.getvalue(), memoryview(array.reshape(-1).view(np.uint8))


def compress_npy(array: np.ndarray, compressor: zstandard.ZstdCompressor) -> bytes:
    """One zstd frame holding the NPY file of ``array`` (content size and checksum in the frame)."""
    header, data = npy_parts(array)
    stream = compressor.compressobj(size=len(header) + len(data))
    return stream.compress(header) + stream.compress(data) + stream.flush()


def make_compressor(level: int = ZSTD_LEVEL) -> zstandard.ZstdCompressor:
    return zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)


def episode_sample(ep: Episode, compressor: zstandard.ZstdCompressor) -> dict:
    """The WebDataset sample of an episode: ``__key__`` + members (name -> bytes)."""
    meta = {"source_file": ep.source, "episode_id": int(ep.episode_id), "episode_return": ep.total_return,
            "episode_length": len(ep), "terminated": bool(ep.terminated), "truncated": bool(ep.truncated)}
    arrays = (ep.observations, ep.actions, ep.rewards.astype(np.float32, copy=False), ep.returns_to_go(),
              np.arange(len(ep), dtype=np.int64))
    sample = {"__key__": f"e{ep.episode_id:09d}", "meta.json": json.dumps(meta, sort_keys=True).encode()}
    for name, array in zip(ARRAYS, arrays):
        sample[f"{name}.npy.zst"] = compress_npy(array, compressor)
    return sample



def decode_npy_zst(data: bytes) -> np.ndarray:
    """The array of a member written by ``compress_npy`` (the plain way: zstd, then ``np.load``; never unpickles)."""
    return np.load(io.BytesIO(zstandard.ZstdDecompressor().decompress(data)), allow_pickle=False)


def check_shard(path: Path) -> list[str]:
    """Decode every sample of a shard: what is wrong with it (each line names the shard and sample), or nothing."""
    members: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(path) as tar:
            for info in tar:
                key, _, name = info.name.partition(".")
                members.setdefault(key, {})[name] = tar.extractfile(info).read()
    except (OSError, tarfile.TarError) as e:
        return [f"{path}: not a readable tar: {e}"]
    bad = []
    for key, sample in members.items():
        expected = {"meta.json", *(f"{a}.npy.zst" for a in ARRAYS)}
        if set(sample) != expected:
            bad.append(f"{path}: sample {key}: members {sorted(sample)}, expected {sorted(expected)}")
            continue
        try:
            length = json.loads(sample["meta.json"])["episode_length"]
            lengths = {a: len(decode_npy_zst(sample[f"{a}.npy.zst"])) for a in ARRAYS}
        except (ValueError, KeyError, zstandard.ZstdError) as e:
            bad.append(f"{path}: sample {key}: does not decode: {e}")
            continue
        if set(lengths.values()) != {length}:
            bad.append(f"{path}: sample {key}: array lengths {lengths}, expected episode_length {length}")
    return bad
