"""Write a D4RL MuJoCo HDF5 file laid out as D4RL's generation scripts write them.

Top-level arrays: ``observations``, ``next_observations``, ``actions``, ``rewards`` (float32), ``terminals``,
``timeouts`` (bool); ``infos/qpos``, ``infos/qvel``, ``infos/action_log_probs`` (float32); ``metadata/*`` (strings,
numbers, small arrays). Arrays are gzip-compressed like D4RL's. The file appears atomically (temp name, then rename).
"""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from data_pipeline.atomic import atomic_path

DTYPES = {
    "observations": np.float32, "next_observations": np.float32, "actions": np.float32, "rewards": np.float32,
    "terminals": bool, "timeouts": bool,
    "infos/qpos": np.float32, "infos/qvel": np.float32, "infos/action_log_probs": np.float32,
}


def write_d4rl(path: str | Path, data: dict[str, np.ndarray], metadata: dict | None = None) -> Path:
    """Write ``data`` (every key of ``DTYPES``, equal lengths) and ``metadata`` (flat ``name -> value``)."""
    path = Path(path)
    missing = sorted(set(DTYPES) - set(data))
    if missing:
        raise ValueError(f"{path}: missing arrays {missing}")
    rows = {name: len(data[name]) for name in DTYPES}
    if len(set(rows.values())) != 1:
        raise ValueError(f"{path}: arrays must have equal lengths, found {rows}")
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        for name, dtype in DTYPES.items():
            f.create_dataset(name, data=np.asarray(data[name]).astype(dtype), compression="gzip")
        for name, value in (metadata or {}).items():
            f.create_dataset(f"metadata/{name}", data=value)
    return path
