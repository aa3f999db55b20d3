"""Reader for local Minari datasets in the HDF5 layout (``<root>/<namespace>/<env>/<name>-vN/data/``).

``data/main_data.hdf5`` holds one group ``episode_<id>`` per episode with ``observations`` (T+1 entries: the last
is the observation after the final step, dropped here), ``actions``, ``rewards``, ``terminations`` and
``truncations`` (T entries each); ``data/metadata.json`` holds the spaces and the gymnasium env spec. The input may
be the dataset folder, its ``data`` folder or ``main_data.hdf5``. Episodes are read one group at a time.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from data_pipeline.episode import Episode
from data_pipeline.errors import DatasetFormatError
from data_pipeline.sources.mujoco_tasks import task_from_name
from data_pipeline.sources.unit import Unit

UNIT_TRANSITIONS = 100_000  # steps per unit of parallel work (whole episodes)
_GROUP = re.compile(r"episode_(\d+)$")


def data_file(path: str | Path) -> Path:
    """``main_data.hdf5`` of a dataset given as the dataset folder, its ``data`` folder or the file itself."""
    path = Path(path)
    for candidate in (path, path / "main_data.hdf5", path / "data" / "main_data.hdf5"):
        if candidate.is_file():
            if not h5py.is_hdf5(candidate):
                raise DatasetFormatError(f"{candidate}: expected an HDF5 file, found something else")
            return candidate
    raise DatasetFormatError(f"{path}: expected a Minari dataset folder with data/main_data.hdf5, found none "
                             "(only the HDF5 data format is read)")


def metadata(path: str | Path) -> dict:
    file = data_file(path).parent / "metadata.json"
    try:
        meta = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise DatasetFormatError(f"{file}: expected Minari metadata JSON, found {e}") from e
    if meta.get("data_format", "hdf5") != "hdf5":
        raise DatasetFormatError(f"{file}: expected data_format 'hdf5', found {meta['data_format']!r}")
    return meta


def _episode_ids(f: h5py.File, file: Path) -> list[int]:
    ids = sorted(int(m.group(1)) for m in map(_GROUP.match, f.keys()) if m)
    if not ids:
        raise DatasetFormatError(f"{file}: expected episode_<id> groups, found an empty dataset")
    return ids


def list_units(path: str | Path) -> list[Unit]:
    """Runs of whole episodes of about ``UNIT_TRANSITIONS`` steps."""
    file = data_file(path)
    units = []
    with h5py.File(file, "r") as f:
        ids = _episode_ids(f, file)
        start, steps = 0, 0
        for i, eid in enumerate(ids):
            steps += _length(f, eid, file)
            if steps >= UNIT_TRANSITIONS or i == len(ids) - 1:
                units.append(Unit(str(file), start, i + 1, steps, ids[start]))
                start, steps = i + 1, 0
    return units


def _length(f: h5py.File, eid: int, file: Path) -> int:
    group = f[f"episode_{eid}"]
    if "rewards" not in group or not isinstance(group["rewards"], h5py.Dataset):
        raise DatasetFormatError(f"{file}: expected array 'episode_{eid}/rewards', found keys {sorted(group.keys())}")
    return group["rewards"].shape[0]


def _array(group: h5py.Group, name: str, length: int, file: Path) -> np.ndarray:
    where = f"{group.name.lstrip('/')}/{name}"
    if name not in group:
        raise DatasetFormatError(f"{file}: expected array '{where}', found keys {sorted(group.keys())}")
    if not isinstance(group[name], h5py.Dataset):
        raise DatasetFormatError(f"{file}: expected '{where}' as one array (Box or Discrete space), found a group "
                                 "(Dict/Tuple spaces are not supported)")
    data = group[name][()]
    if data.ndim == 0 or data.shape[0] != length:
        raise DatasetFormatError(f"{file}: expected '{where}' with {length} entries, found shape {data.shape}")
    return data


def read_unit(unit: Unit) -> Iterator[Episode]:
    file = Path(unit.path)
    with h5py.File(file, "r") as f:
        ids = _episode_ids(f, file)[unit.start:unit.stop]
        for eid in ids:
            group = f[f"episode_{eid}"]
            t = _length(f, eid, file)
            if t == 0:
                raise DatasetFormatError(f"{file}: expected at least one step in 'episode_{eid}', found none")
            obs = _array(group, "observations", t + 1, file)[:t]
            actions = _array(group, "actions", t, file)
            rewards = _array(group, "rewards", t, file)
            terminations = _array(group, "terminations", t, file)
            truncations = _array(group, "truncations", t, file)
            for name, value in (("observations", obs), ("rewards", rewards)):
                if not np.issubdtype(value.dtype, np.number) or not np.isfinite(value).all():
                    raise DatasetFormatError(f"{file}: expected finite numbers in 'episode_{eid}/{name}', "
                                             f"found dtype {value.dtype} with NaN/inf or non-numbers")
            discrete = np.issubdtype(actions.dtype, np.integer)
            yield Episode(obs.reshape(t, -1).astype(np.float32), actions.astype(np.int64 if discrete else np.float32),
                          rewards.astype(np.float32), bool(terminations[-1]), bool(truncations[-1]),
                          source=str(Path(*file.parts[-4:-2])), episode_id=eid)


def describe(path: str | Path) -> dict:
    meta = metadata(path)
    try:
        obs_space, act_space = json.loads(meta["observation_space"]), json.loads(meta["action_space"])
        env_id = json.loads(meta["env_spec"])["id"] if meta.get("env_spec") else ""
    except (KeyError, TypeError, ValueError) as e:
        raise DatasetFormatError(f"{data_file(path).parent / 'metadata.json'}: expected observation_space, "
                                 f"action_space and env_spec, found {e!r}") from e
    if obs_space.get("type") != "Box" or act_space.get("type") not in ("Box", "Discrete"):
        raise DatasetFormatError(f"{data_file(path).parent / 'metadata.json'}: expected Box observations and Box or "
                                 f"Discrete actions, found {obs_space.get('type')} and {act_space.get('type')}")
    discrete = act_space["type"] == "Discrete"
    task = task_from_name(env_id) or task_from_name(meta.get("dataset_id", ""))
    eval_env = {"kind": "mujoco", "task": task} if task else {"kind": "gymnasium", "id": env_id}
    return {"kind": "mujoco" if task else "gymnasium", "env": meta.get("dataset_id", env_id), "eval_env": eval_env,
            "obs_shape": [int(np.prod(obs_space["shape"]))],
            "act_dim": int(act_space["n"]) if discrete else int(np.prod(act_space["shape"])), "discrete": discrete}
