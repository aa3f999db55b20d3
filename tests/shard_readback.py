"""Test helpers: read shards back with webdataset and check them against the episodes they came from."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import webdataset as wds

from data_pipeline.episode import Episode
from data_pipeline.episode_sample import ARRAYS, decode_npy_zst

MEMBERS = {"meta.json", *(f"{name}.npy.zst" for name in ARRAYS)}


def read_samples(out: Path) -> list[dict]:
    """Every sample of every shard listed in index.json, members decoded (zstd + np.load without pickle, json)."""
    index = json.loads((out / "index.json").read_text())
    urls = [str(out / s["name"]) for s in index["shards"]]
    samples = []
    for raw in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        assert set(raw) - {"__key__", "__url__", "__local_path__"} == MEMBERS, sorted(raw)
        sample = {"__key__": raw["__key__"], "meta": json.loads(raw["meta.json"])}
        for name in ARRAYS:
            sample[name] = decode_npy_zst(raw[f"{name}.npy.zst"])
        samples.append(sample)
    return samples


def check_against_episodes(samples: list[dict], episodes: list[Episode]) -> None:
    """One sample per episode, each step stored once: every array equal to the episode's, returns-to-go over the
    whole episode."""
    by_id = {ep.episode_id: ep for ep in episodes}
    assert sorted(s["meta"]["episode_id"] for s in samples) == sorted(by_id)
    for s in samples:
        m = s["meta"]
        ep = by_id[m["episode_id"]]
        assert s["__key__"] == f"e{ep.episode_id:09d}"
        assert m["episode_length"] == len(ep) and m["source_file"] == ep.source
        assert (m["terminated"], m["truncated"]) == (ep.terminated, ep.truncated)
        np.testing.assert_array_equal(s["obs"], ep.observations)
        np.testing.assert_array_equal(s["actions"], ep.actions)
        np.testing.assert_array_equal(s["rewards"], ep.rewards)
        np.testing.assert_array_equal(s["timesteps"], np.arange(len(ep)))
        np.testing.assert_array_equal(s["rtg"], ep.returns_to_go())
        full_rtg = np.cumsum(ep.rewards[::-1].astype(np.float64))[::-1]
        np.testing.assert_allclose(s["rtg"], full_rtg, rtol=1e-5, atol=1e-4)
        assert abs(m["episode_return"] - float(full_rtg[0])) < 1e-6 * max(1.0, abs(full_rtg[0]))
        assert s["obs"].dtype == ep.observations.dtype and s["actions"].dtype == ep.actions.dtype
