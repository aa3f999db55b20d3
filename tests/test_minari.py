"""Minari: a dataset created by minari itself from the real Hopper env is read and sharded exactly."""
from __future__ import annotations

import json
import os
from pathlib import Path

import gymnasium as gym
import h5py
import numpy as np
import pytest

from data_pipeline import shard
from data_pipeline.sources import minari as minari_reader
from shard_readback import check_against_episodes, read_samples

DATASET_ID = "mujoco/hopper/random-test-v0"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, list[dict]]:
    """A Minari dataset of 8 random-policy Hopper episodes (40-step time limit), and what was stepped."""
    root = tmp_path_factory.mktemp("minari")
    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(root)
    try:
        import minari

        env = minari.DataCollector(gym.make("Hopper-v5", max_episode_steps=40), record_infos=False)
        env.action_space.seed(0)
        recorded = []
        for episode in range(8):
            obs, _ = env.reset(seed=episode)
            steps = {"observations": [obs], "actions": [], "rewards": []}
            while True:
                action = env.action_space.sample()
                obs, reward, terminated, truncated, _ = env.step(action)
                steps["observations"].append(obs)
                steps["actions"].append(action)
                steps["rewards"].append(reward)
                if terminated or truncated:
                    break
            recorded.append({k: np.asarray(v) for k, v in steps.items()} | {"terminated": terminated,
                                                                            "truncated": truncated})
        env.create_dataset(dataset_id=DATASET_ID, algorithm_name="uniform random", author="test",
                           author_email="test@example.org", code_permalink="https://example.org",
                           description="random Hopper episodes for the reader test", eval_env="Hopper-v5")
        env.close()
    finally:
        if old is None:
            os.environ.pop("MINARI_DATASETS_PATH")
        else:
            os.environ["MINARI_DATASETS_PATH"] = old
    return root / DATASET_ID, recorded


def test_reader_matches_what_was_stepped(dataset):
    path, recorded = dataset
    assert (path / "data" / "main_data.hdf5").exists()
    units = minari_reader.list_units(path)
    episodes = [ep for u in units for ep in minari_reader.read_unit(u)]
    assert len(episodes) == len(recorded) == 8
    assert any(r["terminated"] for r in recorded) and any(r["truncated"] for r in recorded)
    for i, (ep, rec) in enumerate(zip(episodes, recorded)):
        assert ep.episode_id == i and len(ep) == len(rec["rewards"])
        np.testing.assert_allclose(ep.observations, rec["observations"][:-1].astype(np.float32))
        np.testing.assert_array_equal(ep.actions, rec["actions"])
        np.testing.assert_allclose(ep.rewards, rec["rewards"].astype(np.float32))
        assert (ep.terminated, ep.truncated) == (rec["terminated"], rec["truncated"])
        np.testing.assert_allclose(ep.returns_to_go()[0], rec["rewards"].sum(), rtol=1e-5)
    assert minari_reader.describe(path) == {"kind": "mujoco", "env": DATASET_ID,
                                            "eval_env": {"kind": "mujoco", "task": "hopper"},
                                            "obs_shape": [11], "act_dim": 3, "discrete": False}


def test_shard_round_trip(dataset, tmp_path):
    path, recorded = dataset
    out = tmp_path / "shards"
    assert shard.main(["--source", "minari", "--input", str(path), "--output", str(out),
                       "--shard-transitions", "50"]) == 0
    index = json.loads((out / "index.json").read_text())
    episodes = [ep for u in minari_reader.list_units(path) for ep in minari_reader.read_unit(u)]
    check_against_episodes(read_samples(out), episodes)
    assert index["totals"]["transitions"] == sum(len(r["rewards"]) for r in recorded)
    assert index["env_spec"]["max_timestep"] == 100 and len(index["shards"]) >= 2
    all_obs = np.concatenate([r["observations"][:-1] for r in recorded]).astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(index["state_mean"], all_obs.mean(0), rtol=1e-9, atol=1e-12)


def test_bad_minari_inputs(dataset, tmp_path, capsys):
    path, _ = dataset
    out = tmp_path / "out"
    assert shard.main(["--source", "minari", "--input", str(tmp_path), "--output", str(out)]) == 2
    assert "expected a Minari dataset folder" in capsys.readouterr().err
    broken = tmp_path / "broken"
    (broken / "data").mkdir(parents=True)
    (broken / "data" / "metadata.json").write_bytes((path / "data" / "metadata.json").read_bytes())
    with h5py.File(path / "data" / "main_data.hdf5", "r") as src, h5py.File(broken / "data" / "main_data.hdf5",
                                                                           "w") as dst:
        for name in src:
            src.copy(src[name], dst, name)
        actions = dst["episode_3/actions"][()]
        del dst["episode_3/actions"]
        dst["episode_3/actions"] = actions[:-2]
    assert shard.main(["--source", "minari", "--input", str(broken), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "main_data.hdf5" in err and "expected 'episode_3/actions' with" in err, err
    assert not (out / "index.json").exists()
