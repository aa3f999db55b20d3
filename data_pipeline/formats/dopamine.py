"""Writer of Dopamine replay-buffer checkpoints, the format of the DQN-Replay dataset.

Behaves like Dopamine's ``OutOfGraphReplayBuffer`` (2019, the version that produced DQN-Replay) together with
batch_rl's ``OutOfGraphLoggedReplayBuffer``, which wrote the dataset:

- ``add(obs, action, reward, terminal)``: at the first add and after every terminal, ``stack_size - 1`` zero
  transitions (padding) are added first; rows go to ``add_count % capacity`` (a circular buffer); after each add,
  ``invalid_range`` = the ``update_horizon + stack_size`` rows ``cursor - update_horizon ... cursor + stack_size - 1``
  (mod capacity).
- logging: after an add that leaves the cursor at ``capacity - 1``, the whole buffer is written as checkpoint
  ``log_count`` (so checkpoint 0 holds ``capacity - 1`` rows and every later one is a wrapped buffer whose oldest row
  sits at the cursor). As in batch_rl, the check happens once per ``add()``: when the padding rows step over
  ``capacity - 1`` that log is skipped and its rows are overwritten before the next one.
- ``log_final()``: the last, partial buffer, written with ``add_count`` set to the cursor, as batch_rl does at the end
  of training (skipped here when nothing was added since the last log, which batch_rl would write twice, or
  when the cursor is 0: that would save an empty buffer).

Files, per checkpoint ``i``, in ``replay_logs/``: ``$store$_{observation,action,reward,terminal}_ckpt.i.gz``,
``add_count_ckpt.i.gz``, ``invalid_range_ckpt.i.gz``; each is ``np.save(..., allow_pickle=False)`` inside a gzip
stream (compression level 9, Python's default, as Dopamine). The gzip header's mtime is 0 so that a seeded
collection is byte-reproducible; files are written under a temporary name and renamed.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from data_pipeline.atomic import atomic_path

STORE_PREFIX = "$store$_"
STORE_ARRAYS = ("observation", "action", "reward", "terminal")
OTHER_ARRAYS = ("add_count", "invalid_range")


def checkpoint_filename(name: str, index: int) -> str:
    """``<name>_ckpt.<index>.gz``, as Dopamine's ``_generate_filename``."""
    return f"{name}_ckpt.{index}.gz"


def invalid_range(cursor: int, capacity: int, stack_size: int, update_horizon: int) -> np.ndarray:
    """Rows whose transition straddles the cursor: ``cursor - update_horizon ... cursor + stack_size - 1``."""
    return np.array([(cursor - update_horizon + i) % capacity for i in range(stack_size + update_horizon)],
                    dtype=np.int64)


def write_npy_gz(path: Path, array: np.ndarray) -> None:
    """One checkpoint file: an NPY stream inside gzip, written atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as raw:
        with gzip.GzipFile(filename=path.name, mode="wb", fileobj=raw, mtime=0) as f:
            np.save(f, array, allow_pickle=False)


class ReplayBuffer:
    """Dopamine's circular replay buffer (storage, padding, cursor, invalid range) and its checkpoint writer."""

    def __init__(self, capacity: int, observation_shape: tuple[int, ...] = (84, 84), stack_size: int = 4,
                 update_horizon: int = 1):
        if capacity < stack_size + update_horizon:
            raise ValueError(f"capacity {capacity} must be at least stack_size + update_horizon "
                             f"= {stack_size + update_horizon}")
        self.capacity, self.stack_size, self.update_horizon = capacity, stack_size, update_horizon
        # Dopamine allocates with np.empty; rows never written read as zeros there in practice, and here
        self.store = {"observation": np.zeros((capacity, *observation_shape), np.uint8),
                      "action": np.zeros(capacity, np.int32), "reward": np.zeros(capacity, np.float32),
                      "terminal": np.zeros(capacity, np.uint8)}
        self.add_count = np.array(0, dtype=np.int64)
        self.invalid_range = np.zeros(stack_size)  # float64, as Dopamine's initial value
        self._episode_start = True

    def cursor(self) -> int:
        return int(self.add_count) % self.capacity

    def add(self, observation: np.ndarray, action: int, reward: float, terminal: bool) -> None:
        """Add one real transition (preceded by padding at an episode start)."""
        if observation.shape != self.store["observation"].shape[1:]:
            raise ValueError(f"observation has shape {observation.shape}, expected "
                             f"{self.store['observation'].shape[1:]}")
        if self._episode_start:
            for _ in range(self.stack_size - 1):
                self._add(np.zeros_like(observation), 0, 0.0, 0)
            self._episode_start = False
        if terminal:
            self._episode_start = True
        self._add(observation, action, reward, int(terminal))

    def _add(self, observation: np.ndarray, action: int, reward: float, terminal: int) -> None:
        c = self.cursor()
        self.store["observation"][c] = observation
        self.store["action"][c] = action
        self.store["reward"][c] = reward
        self.store["terminal"][c] = terminal
        self.add_count += 1
        self.invalid_range = invalid_range(self.cursor(), self.capacity, self.stack_size, self.update_horizon)

    def save(self, directory: str | Path, index: int, add_count: int | None = None) -> None:
        """Write checkpoint ``index`` into ``directory`` (``add_count`` overrides the saved counter)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name in STORE_ARRAYS:
            write_npy_gz(directory / checkpoint_filename(STORE_PREFIX + name, index), self.store[name])
        count = self.add_count if add_count is None else np.array(add_count, dtype=np.int64)
        write_npy_gz(directory / checkpoint_filename("add_count", index), count)
        write_npy_gz(directory / checkpoint_filename("invalid_range", index), self.invalid_range)


class LoggedReplayBuffer(ReplayBuffer):
    """batch_rl's logging buffer: writes a checkpoint each time the cursor reaches ``capacity - 1``."""

    def __init__(self, log_dir: str | Path, capacity: int, **kwargs):
        super().__init__(capacity, **kwargs)
        self.log_dir = Path(log_dir)
        self.log_count = 0  # checkpoints written
        self.skipped_logs = 0  # log points stepped over by padding rows (their rows are lost, as in batch_rl)
        self._logged_at = 0  # add_count at the last log

    def add(self, observation: np.ndarray, action: int, reward: float, terminal: bool) -> None:
        before = int(self.add_count)
        super().add(observation, action, reward, terminal)
        if self.cursor() == self.capacity - 1:
            self._log()
        elif any((k + 1) % self.capacity == 0 for k in range(before + 1, int(self.add_count))):
            self.skipped_logs += 1  # a padding row, not the checked last row, left the cursor at capacity - 1

    def _log(self, add_count: int | None = None) -> None:
        self.save(self.log_dir, self.log_count, add_count)
        self.log_count += 1
        self._logged_at = int(self.add_count)

    def log_final(self) -> None:
        """Write the partial buffer left at the end, with ``add_count`` set to the cursor (as batch_rl)."""
        if int(self.add_count) > self._logged_at and self.cursor() > 0:  # cursor 0 would save an empty buffer
            self._log(self.cursor())
