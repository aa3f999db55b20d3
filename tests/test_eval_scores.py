"""Score normalisation, per-episode seeds, aggregation and lockstep rollouts (real envs, random policy)."""
import math

import numpy as np
import pytest
from omegaconf import OmegaConf

from evaluation.envs import make_env
from evaluation.policy import RandomPolicy
from evaluation.results import markdown_table, summarize
from evaluation.rollout import episode_seed, groups_of, make_tasks, run_group
from evaluation.scores import default_targets, normalized
from mambadm.config import EvalConfig

HOPPER = {"kind": "mujoco", "task": "hopper"}
BREAKOUT = {"kind": "atari", "game": "Breakout"}


def test_normalised_scores_follow_the_reference_tables():
    assert normalized(HOPPER, -20.272305) == pytest.approx(0.0)
    assert normalized(HOPPER, 3234.3) == pytest.approx(100.0)
    assert normalized({"kind": "mujoco", "task": "walker2d"}, 2297.0) == pytest.approx(
        100 * (2297.0 - 1.629008) / (4592.3 - 1.629008))
    assert normalized(BREAKOUT, 30.5) == pytest.approx(100.0)
    assert normalized({"kind": "atari", "game": "Pong"}, -20.7) == pytest.approx(0.0)
    assert normalized({"kind": "atari", "game": "Tennis"}, 1.0) is None
    assert default_targets(HOPPER) == [3600.0, 1800.0] and default_targets(BREAKOUT) == [90.0]
    with pytest.raises(ValueError, match="known"):
        default_targets({"kind": "atari", "game": "Tennis"})


def test_episode_seeds_depend_only_on_seed_target_index():
    tasks = make_tasks([3600.0, 1800.0], 3, eval_seed=7)
    assert len({t.seed for t in tasks}) == 6
    assert tasks[4].seed == episode_seed(7, 1800.0, 1)
    assert episode_seed(8, 1800.0, 1) != tasks[4].seed
    assert [len(g) for g in groups_of(tasks, 4)] == [4, 2]


def test_summary_statistics():
    eps = [{"target": 90.0, "return": r, "length": 10} for r in (1.0, 3.0, 8.0)]
    (row,) = summarize(eps, [90.0], BREAKOUT)
    assert row["mean"] == pytest.approx(4.0) and row["std"] == pytest.approx(np.std([1, 3, 8], ddof=1))
    assert row["stderr"] == pytest.approx(row["std"] / math.sqrt(3))
    assert row["normalized_mean"] == pytest.approx(100 * (4.0 - 1.7) / (30.5 - 1.7))
    table = markdown_table({"env": BREAKOUT, "targets": [row]})
    assert "| Breakout | 90 | 3 | 4.0 ±" in table


def test_lockstep_group_matches_one_episode_at_a_time():
    cfg = OmegaConf.structured(EvalConfig)
    envs = [make_env(HOPPER, cfg) for _ in range(3)]
    tasks = make_tasks([3600.0], 3, eval_seed=1)
    together = run_group(envs, RandomPolicy(envs[0].action_space), tasks)
    alone = [run_group(envs[:1], RandomPolicy(envs[0].action_space), [t])[0] for t in tasks]
    for a, b in zip(together, alone):
        assert a["seed"] == b["seed"] and a["length"] == b["length"] and a["return"] == pytest.approx(b["return"])
        assert a["end"] in ("terminated", "truncated") and a["length"] > 0
    assert len({r["return"] for r in together}) == 3


def test_cli_rejects_bad_settings_before_starting_ray():
    from evaluation.evaluate import main

    for argv, message in ((["--episodes", "0"], "must be >= 1"), (["--set", "mujoco_version=v3"], "mujoco_version"),
                          (["--set", "nosuchkey=1"], "nosuchkey")):
        with pytest.raises(SystemExit, match=message):
            main(["--random-env", "hopper", *argv])
