"""MuJoCo locomotion tasks the project collects, reads and evaluates, and how to recognise one from a dataset name.

The one table of them: the collector, the D4RL / Minari readers and evaluation all read it.
"""
from __future__ import annotations

import re
from typing import NamedTuple


class MujocoTask(NamedTuple):
    name: str  # gymnasium's env name, without the version
    obs_dim: int  # the same in D4RL (v2 envs) and gymnasium v4 / v5
    act_dim: int


TASKS = {
    "hopper": MujocoTask("Hopper", 11, 3),
    "halfcheetah": MujocoTask("HalfCheetah", 17, 6),
    "walker2d": MujocoTask("Walker2d", 17, 6),
}


def gym_id(task: str, version: str = "v5") -> str:
    """``hopper`` -> ``Hopper-v5``; an unknown task is an error naming the known ones."""
    if task not in TASKS:
        raise ValueError(f"unknown MuJoCo task {task!r}; expected one of {sorted(TASKS)}")
    return f"{TASKS[task].name}-{version}"


def task_from_name(name: str) -> str | None:
    """``hopper-medium-v2`` / ``Hopper-v5`` / ``mujoco/hopper/expert-v0`` -> ``hopper``; None if no task matches."""
    words = re.split(r"[-/_\s.]+", name.lower())
    for word in words:
        if word in TASKS:
            return word
    return None
