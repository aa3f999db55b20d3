"""MuJoCo locomotion tasks the project evaluates on, and how to recognise one from a dataset name."""
from __future__ import annotations

import re

# task -> (gymnasium id, obs_dim, act_dim); the dimensions are the same in D4RL (v2 envs) and gymnasium v5.
TASKS = {
    "hopper": ("Hopper-v5", 11, 3),
    "halfcheetah": ("HalfCheetah-v5", 17, 6),
    "walker2d": ("Walker2d-v5", 17, 6),
}


def task_from_name(name: str) -> str | None:
    """``hopper-medium-v2`` / ``Hopper-v5`` / ``mujoco/hopper/expert-v0`` -> ``hopper``; None if no task matches."""
    words = re.split(r"[-/_\s.]+", name.lower())
    for word in words:
        if word in TASKS:
            return word
    return None
