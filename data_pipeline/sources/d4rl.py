"""Reader for D4RL MuJoCo HDF5 files (``<env>-<quality>-v2.hdf5``), one file or a folder of them.

Layout: ``observations`` (N, obs_dim) float32, ``actions`` (N, act_dim) float32, ``rewards`` (N,) float32,
``terminals`` / ``timeouts`` (N,) bool, plus ``next_observations``, ``infos/*`` and ``metadata/*`` (not needed here).
An episode ends after row i where ``terminals[i] or timeouts[i]``; rows after the last end form a final episode
marked truncated. Rows are read in blocks, so memory is bounded by the block and the longest episode.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from data_pipeline.episode import Episode
from data_pipeline.errors import DatasetFormatError
from data_pipeline.sources.mujoco_tasks import TASKS, task_from_name
from data_pipeline.sources.unit import Unit

UNIT_TRANSITIONS = 100_000  # rows per unit of parallel work (cut at the next episode end)
BLOCK_ROWS = 20_000  # rows read from disk at a time
ARRAYS = {"observations": 2, "actions": 2, "rewards": 1, "terminals": 1, "timeouts": 1}  # name -> ndim
SUFFIXES = (".hdf5", ".h5")


def input_files(path: str | Path) -> list[Path]:
    """The HDF5 files of an input: the file itself, or the ``*.hdf5`` / ``*.h5`` files of a folder, sorted."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES)
        if not files:
            raise DatasetFormatError(f"{path}: expected D4RL files (*.hdf5, *.h5) in this folder, found none")
        return files
    if not path.exists():
        raise DatasetFormatError(f"{path}: no such file or folder")
    return [path]


def open_checked(file: Path) -> tuple[h5py.File, int]:
    """Open a D4RL file and check its arrays' presence, shapes, dtypes and lengths; return (file, rows)."""
    if not h5py.is_hdf5(file):
        raise DatasetFormatError(f"{file}: expected an HDF5 file, found something else")
    f = h5py.File(file, "r")
    try:
        rows = None
        for name, ndim in ARRAYS.items():
            if name not in f or not isinstance(f[name], h5py.Dataset):
                raise DatasetFormatError(f"{file}: expected array '{name}', found keys {sorted(f.keys())}")
            d = f[name]
            if d.ndim != ndim:
                raise DatasetFormatError(f"{file}: expected '{name}' with {ndim} dimension(s), found shape {d.shape}")
            floating = name in ("observations", "actions", "rewards")
            ok = np.issubdtype(d.dtype, np.floating) if floating else (d.dtype == bool or np.issubdtype(
                d.dtype, np.integer))
            if not ok:
                want = "a float dtype" if floating else "bool"
                raise DatasetFormatError(f"{file}: expected '{name}' of {want}, found {d.dtype}")
            if rows is None:
                rows = d.shape[0]
            elif d.shape[0] != rows:
                raise DatasetFormatError(
                    f"{file}: expected '{name}' to have {rows} rows like 'observations', found {d.shape[0]}")
        if rows == 0:
            raise DatasetFormatError(f"{file}: expected at least one row, found an empty dataset")
        return f, rows
    except Exception:
        f.close()
        raise


def _episode_stops(f: h5py.File, rows: int) -> np.ndarray:
    """One past the last row of every episode, the unterminated tail included."""
    stops = []
    for lo in range(0, rows, BLOCK_ROWS * 10):
        hi = min(rows, lo + BLOCK_ROWS * 10)
        ends = np.asarray(f["terminals"][lo:hi], bool) | np.asarray(f["timeouts"][lo:hi], bool)
        stops.append(np.flatnonzero(ends) + lo + 1)
    stops = np.concatenate(stops)
    if len(stops) == 0 or stops[-1] != rows:
        stops = np.append(stops, rows)
    return stops


def list_units(path: str | Path) -> list[Unit]:
    """Blocks of whole episodes of about ``UNIT_TRANSITIONS`` rows, file by file."""
    units, episode = [], 0
    for file in input_files(path):
        f, rows = open_checked(file)
        with f:
            stops = _episode_stops(f, rows)
        start, first = 0, episode
        for stop in stops:
            episode += 1
            if stop - start >= UNIT_TRANSITIONS or stop == rows:
                units.append(Unit(str(file), int(start), int(stop), int(stop - start), first))
                start, first = int(stop), episode
    return units


def read_unit(unit: Unit) -> Iterator[Episode]:
    """The unit's episodes in order; ids continue the dataset-wide count."""
    file = Path(unit.path)
    f, rows = open_checked(file)
    with f:
        if unit.stop > rows:
            raise DatasetFormatError(f"{file}: expected at least {unit.stop} rows, found {rows}")
        episode_id, pending = unit.first_episode, []
        for lo in range(unit.start, unit.stop, BLOCK_ROWS):
            hi = min(unit.stop, lo + BLOCK_ROWS)
            block = {name: f[name][lo:hi] for name in ARRAYS}
            for name in ("observations", "actions", "rewards"):
                bad = ~np.isfinite(block[name])
                if bad.any():
                    row = lo + int(np.flatnonzero(bad.reshape(len(bad), -1).any(1))[0])
                    raise DatasetFormatError(f"{file}: expected finite '{name}', found NaN/inf at row {row}")
            terminals = np.asarray(block["terminals"], bool)
            ends = terminals | np.asarray(block["timeouts"], bool)
            cut = 0
            for i in np.flatnonzero(ends):
                pending.append({k: v[cut:i + 1] for k, v in block.items()})
                yield _episode(pending, bool(terminals[i]), not terminals[i] or bool(block["timeouts"][i]),
                               file, episode_id)
                episode_id, pending, cut = episode_id + 1, [], int(i) + 1
            if cut < hi - lo:
                pending.append({k: v[cut:] for k, v in block.items()})
        if pending:  # rows after the last end: cut by the end of the file
            yield _episode(pending, False, True, file, episode_id)


def _episode(pieces: list[dict], terminated: bool, truncated: bool, file: Path, episode_id: int) -> Episode:
    join = lambda name, dtype: np.concatenate([p[name] for p in pieces]).astype(dtype, copy=False)  # noqa: E731
    return Episode(join("observations", np.float32), join("actions", np.float32), join("rewards", np.float32),
                   terminated, truncated, source=file.name, episode_id=episode_id)


def describe(path: str | Path) -> dict:
    """Env spec of a D4RL file (or folder): the task is recognised from the file name, dimensions checked."""
    files = input_files(path)
    f, _ = open_checked(files[0])
    with f:
        obs_dim, act_dim = f["observations"].shape[1], f["actions"].shape[1]
    env = files[0].stem if len(files) == 1 else Path(path).name
    task = task_from_name(files[0].stem) or task_from_name(env)
    if task is None:
        raise DatasetFormatError(
            f"{files[0]}: expected a file name starting with one of {sorted(TASKS)} (e.g. hopper-medium-v2.hdf5), "
            f"found '{files[0].name}'")
    _, want_obs, want_act = TASKS[task]
    if (obs_dim, act_dim) != (want_obs, want_act):
        raise DatasetFormatError(f"{files[0]}: expected {task} observations of {want_obs} and actions of {want_act}, "
                                 f"found {obs_dim} and {act_dim}")
    return {"kind": "mujoco", "env": env, "eval_env": {"kind": "mujoco", "task": task},
            "obs_shape": [int(obs_dim)], "act_dim": int(act_dim), "discrete": False}
