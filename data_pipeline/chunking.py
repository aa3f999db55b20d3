"""Cut an episode into overlapping chunks, one WebDataset sample each (contract in docs/architecture.md, "Shards").

Chunk ``i`` owns window starts ``[own_begin, own_end) = [i*stride, min(T, (i+1)*stride))`` and stores steps
``[begin, end)`` with ``begin = max(0, own_begin - frame_context)`` and ``end = min(T, own_end + max_window - 1)``,
so every window of up to ``max_window`` steps starting at an owned step (and the frames stacked before it) lies
inside one chunk. Returns-to-go are computed over the whole episode before cutting.

A sample's ``.npy`` members are ``(header, data)`` pairs: the NPY header ``np.save`` would write and a memoryview of
the episode's own array slice, so a chunk's frames are not copied before they reach the tar file.
"""
from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from data_pipeline.episode import Episode


@dataclass(frozen=True)
class Chunking:
    stride: int = 100  # window starts owned by one chunk
    max_window: int = 120  # longest training window a chunk must hold from each owned start
    frame_context: int = 0  # steps kept before the first owned step (frame_stack - 1 for Atari)

    def __post_init__(self) -> None:
        if self.stride < 1 or self.max_window < 1 or self.frame_context < 0:
            raise ValueError(f"chunking needs stride >= 1, max_window >= 1, frame_context >= 0; got {self}")


def chunk_bounds(length: int, c: Chunking) -> list[tuple[int, int, int, int]]:
    """``(own_begin, own_end, begin, end)`` of every chunk of an episode of ``length`` steps."""
    bounds = []
    for own_begin in range(0, length, c.stride):
        own_end = min(length, own_begin + c.stride)
        bounds.append((own_begin, own_end, max(0, own_begin - c.frame_context),
                       min(length, own_end + c.max_window - 1)))
    return bounds


def npy_parts(array: np.ndarray) -> tuple[bytes, memoryview]:
    """The bytes of ``np.save(array, allow_pickle=False)`` as (header, zero-copy view of the data)."""
    array = np.ascontiguousarray(array)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(array))
    return header.getvalue(), memoryview(array.reshape(-1).view(np.uint8))


def chunk_samples(ep: Episode, c: Chunking) -> Iterator[tuple[dict, int]]:
    """WebDataset samples of an episode, each with its count of owned steps: ``__key__`` + members, a member being
    a tuple of bytes-like parts to concatenate. The views point into the episode's arrays."""
    rtg = ep.returns_to_go()
    timesteps = np.arange(len(ep), dtype=np.int64)
    rewards = ep.rewards.astype(np.float32, copy=False)
    episode_return = ep.total_return
    for index, (own_begin, own_end, begin, end) in enumerate(chunk_bounds(len(ep), c)):
        meta = {"source_file": ep.source, "episode_id": int(ep.episode_id), "chunk_index": index,
                "episode_return": episode_return, "episode_length": len(ep), "begin": begin,
                "own_begin": own_begin, "own_end": own_end, "terminated": bool(ep.terminated)}
        sample = {
            "__key__": f"e{ep.episode_id:09d}c{index:05d}",
            "obs.npy": npy_parts(ep.observations[begin:end]),
            "actions.npy": npy_parts(ep.actions[begin:end]),
            "rewards.npy": npy_parts(rewards[begin:end]),
            "rtg.npy": npy_parts(rtg[begin:end]),
            "timesteps.npy": npy_parts(timesteps[begin:end]),
            "meta.json": (json.dumps(meta, sort_keys=True).encode(),),
        }
        yield sample, own_end - own_begin
