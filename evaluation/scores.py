"""Protocol constants and score normalisation: target returns, D4RL reference returns, Atari random/human scores.

Sources:
- D4RL reference min/max (random and expert policy returns) for the MuJoCo v2 datasets: Fu et al. 2020, "D4RL:
  Datasets for Deep Data-Driven Reinforcement Learning", the ``REF_MIN_SCORE`` / ``REF_MAX_SCORE`` tables of
  Farama-Foundation/D4RL ``d4rl/infos.py``. Normalised score = 100 · (score − min) / (max − min).
- Atari random and human scores: the tables used by Decision Transformer (Chen et al. 2021) and Agarwal et al. 2020
  ("An Optimistic Perspective on Offline RL", google-research/batch_rl); gamer-normalised score =
  100 · (score − random) / (human − random).
- Target returns: Decision Transformer's code (kzl/decision-transformer@e2d82e68f330: Atari
  ``atari/mingpt/trainer_atari.py:161-168``, MuJoCo ``gym/experiment.py:41-51``), copied by Decision ConvFormer and
  Decision Mamba. The DT paper's Table 8 is reported to list Qbert 2500 and Seaquest 1450 instead (not checked here).
  Asterix, Frostbite, Assault and Gopher are not in the DT code; their targets are this project's choice.
"""
from __future__ import annotations

import math

# task -> (random policy return, expert policy return) — D4RL v2 reference returns
D4RL_REF = {
    "hopper": (-20.272305, 3234.3),
    "halfcheetah": (-280.178953, 12135.0),
    "walker2d": (1.629008, 4592.3),
}

# game -> (random, human) raw game scores
ATARI_REF = {
    "Breakout": (1.7, 30.5),
    "Qbert": (163.9, 13455.0),
    "Pong": (-20.7, 14.6),
    "Seaquest": (68.4, 42054.7),
    "Asterix": (210.0, 8503.3),
    "Frostbite": (65.2, 4334.7),
    "Assault": (222.4, 742.0),
    "Gopher": (257.6, 2412.5),
}

# Decision Transformer's target returns (raw, unscaled)
ATARI_TARGETS = {
    "Breakout": [90.0], "Qbert": [14000.0], "Pong": [20.0], "Seaquest": [1150.0],
    "Asterix": [520.0], "Frostbite": [950.0], "Assault": [780.0], "Gopher": [2750.0],
}
MUJOCO_TARGETS = {"hopper": [3600.0, 1800.0], "halfcheetah": [12000.0, 6000.0], "walker2d": [5000.0, 2500.0]}


def env_name(eval_env: dict) -> str:
    """``{"kind": "atari", "game": "Breakout"}`` -> ``Breakout``; ``{"kind": "mujoco", "task": "hopper"}`` -> ``hopper``."""
    kind = eval_env.get("kind")
    if kind == "atari":
        return str(eval_env["game"])
    if kind == "mujoco":
        return str(eval_env["task"])
    if kind == "gymnasium":
        return str(eval_env["id"])
    raise ValueError(f"eval_env: kind must be 'atari', 'mujoco' or 'gymnasium', got {eval_env!r}")


def default_targets(eval_env: dict) -> list[float]:
    """The protocol's target returns for an environment; an error names the known ones when there are none."""
    name = env_name(eval_env)
    table = {"atari": ATARI_TARGETS, "mujoco": MUJOCO_TARGETS}.get(eval_env["kind"], {})
    if name not in table:
        raise ValueError(f"no default target return for {eval_env['kind']} env '{name}' (known: {sorted(table)}); "
                         f"pass targets explicitly")
    return list(table[name])


def reference(eval_env: dict) -> tuple[float, float] | None:
    """(low, high) reference returns for normalisation, or None when the env has no published reference."""
    name = env_name(eval_env)
    return {"atari": ATARI_REF, "mujoco": D4RL_REF}.get(eval_env["kind"], {}).get(name)


def normalized(eval_env: dict, score: float) -> float | None:
    """100 · (score − low) / (high − low) with the env's reference; None when there is no reference."""
    ref = reference(eval_env)
    if ref is None or not math.isfinite(score):
        return None
    low, high = ref
    return 100.0 * (score - low) / (high - low)
