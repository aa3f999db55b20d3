"""D4RL: the collector writes D4RL's layout from the real Hopper env; the reader and sharder recover it exactly."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from data_pipeline import shard
from data_pipeline.collect_mujoco import collect_mujoco
from data_pipeline.formats.d4rl import DTYPES, write_d4rl
from data_pipeline.sources import d4rl
from shard_readback import check_against_episodes, read_samples

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hopper_file(tmp_path_factory) -> Path:
    # 2,500 steps: the PD policy reaches the 1000-step time limit, and the step budget cuts the last episode.
    return collect_mujoco("hopper", tmp_path_factory.mktemp("d4rl"), transitions=2_500, seed=0)


def raw(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in DTYPES}


def test_collector_writes_d4rl_layout(hopper_file):
    with h5py.File(hopper_file, "r") as f:
        assert f["observations"].shape == (2_500, 11) and f["actions"].shape == (2_500, 3)
        for name, dtype in DTYPES.items():
            assert f[name].dtype == np.dtype(dtype), name
            assert f[name].shape[0] == 2_500 and f[name].compression == "gzip"
        assert f["infos/qpos"].shape == (2_500, 6) and f["infos/qvel"].shape == (2_500, 6)
        assert "metadata/algorithm" in f and f["metadata/env"][()].decode() == "Hopper-v5"
        obs, nxt = f["observations"][()], f["next_observations"][()]
        ends = f["terminals"][()] | f["timeouts"][()]
        # within an episode, next_observations[i] is observations[i + 1]; qpos[1:] is the observation's head
        np.testing.assert_array_equal(nxt[:-1][~ends[:-1]], obs[1:][~ends[:-1]])
        np.testing.assert_allclose(f["infos/qpos"][:, 1:], obs[:, :5], atol=1e-6)
        assert f["timeouts"][()].sum() >= 1 and f["terminals"][()].sum() >= 1
        assert not ends[-1], "the last episode should be cut by the step budget"
        assert np.all(np.abs(f["actions"][()]) <= 1.0) and np.isfinite(f["infos/action_log_probs"][()]).all()


def test_reader_recovers_episodes_exactly(hopper_file, monkeypatch):
    data = raw(hopper_file)
    stops = np.flatnonzero(data["terminals"] | data["timeouts"]) + 1
    stops = np.append(stops, len(data["rewards"]))
    monkeypatch.setattr(d4rl, "BLOCK_ROWS", 333)  # episodes straddle blocks
    monkeypatch.setattr(d4rl, "UNIT_TRANSITIONS", 700)  # several units
    units = d4rl.list_units(hopper_file)
    assert len(units) > 1 and units[0].start == 0 and units[-1].stop == 2_500
    episodes = [ep for u in units for ep in d4rl.read_unit(u)]
    assert [len(ep) for ep in episodes] == np.diff(np.concatenate([[0], stops])).tolist()
    assert [ep.episode_id for ep in episodes] == list(range(len(stops)))
    start = 0
    for ep, stop in zip(episodes, stops):
        np.testing.assert_array_equal(ep.observations, data["observations"][start:stop])
        np.testing.assert_array_equal(ep.actions, data["actions"][start:stop])
        np.testing.assert_array_equal(ep.rewards, data["rewards"][start:stop])
        assert ep.terminated == bool(data["terminals"][stop - 1])
        assert ep.truncated == (bool(data["timeouts"][stop - 1]) or stop == 2_500)
        start = stop
    assert episodes[-1].truncated and not episodes[-1].terminated
    assert any(len(ep) == 1000 and ep.truncated for ep in episodes)
    assert d4rl.describe(hopper_file) == {"kind": "mujoco", "env": "hopper-mixed-v2",
                                          "eval_env": {"kind": "mujoco", "task": "hopper"},
                                          "obs_shape": [11], "act_dim": 3, "discrete": False}


def test_shard_round_trip(hopper_file, tmp_path):
    out = tmp_path / "shards"
    assert shard.main(["--source", "d4rl", "--input", str(hopper_file), "--output", str(out),
                       "--shard-transitions", "300", "--verify"]) == 0
    index = json.loads((out / "index.json").read_text())
    episodes = [ep for u in d4rl.list_units(hopper_file) for ep in d4rl.read_unit(u)]
    check_against_episodes(read_samples(out), episodes)
    data = raw(hopper_file)
    returns = [ep.total_return for ep in episodes]
    assert index["source"] == "d4rl" and index["eval_env"] == {"kind": "mujoco", "task": "hopper"}
    assert index["env_spec"] == {"obs_kind": "vector", "obs_shape": [11], "act_dim": 3, "discrete": False,
                                 "max_timestep": 1000}
    assert index["format_version"] == 2 and index["encoding"]["sample"] == "episode"
    assert index["totals"]["transitions"] == 2_500 and index["totals"]["episodes"] == len(episodes)
    assert sum(s["transitions"] for s in index["shards"]) == 2_500 and len(index["shards"]) >= 3
    assert sum(s["samples"] for s in index["shards"]) == index["totals"]["samples"]
    np.testing.assert_allclose(index["state_mean"], data["observations"].astype(np.float64).mean(0), rtol=1e-9,
                               atol=1e-9)
    np.testing.assert_allclose(index["state_std"], data["observations"].astype(np.float64).std(0), rtol=1e-9)
    assert index["returns"]["max"] == pytest.approx(max(returns)) and index["returns"]["min"] == pytest.approx(
        min(returns))
    assert index["returns"]["mean"] == pytest.approx(np.mean(returns))
    assert index["command"].startswith("python data_pipeline/shard.py --source d4rl")


def _bad(kind: str, good: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    data = {k: v.copy() for k, v in good.items()}
    if kind == "missing":
        del data["timeouts"]
    elif kind == "lengths":
        data["rewards"] = data["rewards"][:-5]
    elif kind == "dtype":
        data["terminals"] = data["terminals"].astype(np.float32)
    elif kind == "shape":
        data["rewards"] = data["rewards"][:, None]
    elif kind == "nan":
        data["rewards"][1234] = np.nan
    elif kind == "empty":
        data = {k: v[:0] for k, v in data.items()}
    return data


@pytest.mark.parametrize("kind, expected", [
    ("missing", "expected array 'timeouts'"), ("lengths", "expected 'rewards' to have 2500 rows"),
    ("dtype", "expected 'terminals' of bool, found float32"), ("shape", "expected 'rewards' with 1 dimension"),
    ("nan", "NaN/inf at row 1234"), ("empty", "found an empty dataset"), ("not-hdf5", "expected an HDF5 file")])
def test_bad_input_fails_clearly(hopper_file, tmp_path, capsys, kind, expected):
    bad = tmp_path / "hopper-bad-v2.hdf5"
    if kind == "not-hdf5":
        bad.write_bytes(b"\x1f\x8b not an hdf5 file at all")
    else:
        with h5py.File(bad, "w") as f:
            for name, value in _bad(kind, raw(hopper_file)).items():
                f.create_dataset(name, data=value)
    out = tmp_path / "out"
    out.mkdir()
    (out / "index.json").write_text("{}")  # a stale index must not survive a failed run
    assert shard.main(["--source", "d4rl", "--input", str(bad), "--output", str(out)]) != 0
    err = capsys.readouterr().err
    assert str(bad) in err and expected in err, err
    assert not (out / "index.json").exists()


def test_cli_subprocess_exit_code(tmp_path):
    bad = tmp_path / "hopper-x-v2.hdf5"
    write_d4rl(bad, {k: np.zeros((0, 3)) if k not in ("rewards", "terminals", "timeouts", "infos/action_log_probs")
                     else np.zeros(0) for k in DTYPES})
    result = subprocess.run([sys.executable, "data_pipeline/shard.py", "--source", "d4rl", "--input", str(bad),
                             "--output", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "empty dataset" in result.stderr and str(bad) in result.stderr
    assert not (tmp_path / "out" / "index.json").exists()
