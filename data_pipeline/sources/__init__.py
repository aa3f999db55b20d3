"""Registry of dataset readers. Each reader module exposes the same three functions:

- ``list_units(path) -> list[Unit]``: independent pieces of work (a checkpoint, a block of episodes), in a fixed order;
- ``read_unit(unit) -> Iterator[Episode]``: the episodes of one unit, read with bounded memory;
- ``describe(path) -> dict``: ``kind`` (``atari`` | ``mujoco``), ``env``, ``eval_env``, ``obs_shape``, ``act_dim``,
  ``discrete``.

Readers are imported lazily so a missing optional dependency of one format does not break the others.
"""
from __future__ import annotations

import importlib
from types import ModuleType

READERS = {
    "dqn-replay": "data_pipeline.sources.dqn_replay",
    "dqn-replay-dt": "data_pipeline.selection.dt_atari",  # a DQN-Replay run under DT's data selection
    "d4rl": "data_pipeline.sources.d4rl",
    "minari": "data_pipeline.sources.minari",
}


def get_reader(source: str) -> ModuleType:
    """The reader module for a ``--source`` name."""
    if source not in READERS:
        raise KeyError(f"unknown source {source!r}; expected one of {sorted(READERS)}")
    return importlib.import_module(READERS[source])
