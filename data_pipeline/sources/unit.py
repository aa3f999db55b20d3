"""A unit of reading work: one file, optionally restricted to a range of rows or episodes."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Unit:
    path: str  # the file this unit reads
    start: int = 0  # first row (D4RL) or episode index (Minari) of the unit
    stop: int = 0  # one past the last
    transitions: int = 0  # steps in the unit (for progress reporting)
    first_episode: int = 0  # dataset-wide id of the unit's first episode

    def __str__(self) -> str:
        return f"{self.path}[{self.start}:{self.stop}]"
