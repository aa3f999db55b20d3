"""Test helpers: read shards back with webdataset and check them against the episodes they came from."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import webdataset as wds

from data_pipeline.episode import Episode

MEMBERS = {"obs.npy", "actions.npy", "rewards.npy", "rtg.npy", "timesteps.npy", "meta.json"}


def read_samples(out: Path) -> list[dict]:
    """Every sample of every shard listed in index.json, members decoded (npy without pickle, json)."""
    index = json.loads((out / "index.json").read_text())
    urls = [str(out / s["name"]) for s in index["shards"]]
    samples = []
    for raw in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        assert set(raw) - {"__key__", "__url__", "__local_path__"} == MEMBERS, sorted(raw)
        sample = {"__key__": raw["__key__"], "meta": json.loads(raw["meta.json"])}
        for name in MEMBERS - {"meta.json"}:
            sample[name[:-4]] = np.load(io.BytesIO(raw[name]), allow_pickle=False)
        samples.append(sample)
    return samples


def check_against_episodes(samples: list[dict], episodes: list[Episode], max_window: int, stride: int,
                           frame_context: int = 0) -> None:
    """Every step owned exactly once; stored slices equal the episode; every window fits inside its chunk."""
    by_id = {ep.episode_id: ep for ep in episodes}
    owned = {eid: np.zeros(len(ep), int) for eid, ep in by_id.items()}
    for s in samples:
        m = s["meta"]
        ep = by_id[m["episode_id"]]
        T, begin = len(ep), m["begin"]
        end = begin + len(s["rewards"])
        assert s["__key__"] == f"e{ep.episode_id:09d}c{m['chunk_index']:05d}"
        assert m["episode_length"] == T and m["terminated"] == ep.terminated
        assert m["own_begin"] == m["chunk_index"] * stride and m["own_end"] == min(T, m["own_begin"] + stride)
        assert begin == max(0, m["own_begin"] - frame_context)
        assert end == min(T, m["own_end"] + max_window - 1)
        for t in range(m["own_begin"], m["own_end"]):  # every window starting at an owned step is inside
            assert begin <= max(0, t - frame_context) and min(T, t + max_window) <= end
        owned[ep.episode_id][m["own_begin"]:m["own_end"]] += 1
        np.testing.assert_array_equal(s["obs"], ep.observations[begin:end])
        np.testing.assert_array_equal(s["actions"], ep.actions[begin:end])
        np.testing.assert_array_equal(s["rewards"], ep.rewards[begin:end])
        np.testing.assert_array_equal(s["timesteps"], np.arange(begin, end))
        full_rtg = np.cumsum(ep.rewards[::-1].astype(np.float64))[::-1]
        np.testing.assert_allclose(s["rtg"], full_rtg[begin:end], rtol=1e-5, atol=1e-4)
        assert abs(m["episode_return"] - float(full_rtg[0])) < 1e-6 * max(1.0, abs(full_rtg[0]))
    for eid, counts in owned.items():
        assert (counts == 1).all(), f"episode {eid}: steps owned {set(counts.tolist())} times"
