"""Atari collector: real Breakout/Pong through ale-py into DQN-Replay checkpoints, read back by the reader."""
from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.collect_atari import collect_atari, make_env
from data_pipeline.policies.breakout import BALL_X, BALL_Y, FIRE, LEFT, PADDLE_X, RIGHT
from data_pipeline.sources import dqn_replay

REPO = Path(__file__).resolve().parents[1]


def test_breakout_ram_addresses():
    env = make_env("Breakout", sticky=0.0)
    env.reset(seed=0)
    ram = lambda: env.unwrapped.ale.getRAM()  # noqa: E731
    assert ram()[BALL_Y] == 0  # no ball in play before FIRE
    env.step(FIRE)
    env.step(FIRE)
    assert ram()[BALL_Y] > 0 and 50 < ram()[BALL_X] < 200
    x0 = int(ram()[PADDLE_X])
    for _ in range(4):
        env.step(RIGHT)
    x1 = int(ram()[PADDLE_X])
    for _ in range(8):
        env.step(LEFT)
    x2 = int(ram()[PADDLE_X])
    assert x1 > x0 and x2 < x1
    env.close()


@pytest.fixture(scope="module")
def breakout(tmp_path_factory) -> Path:
    return collect_atari("Breakout", tmp_path_factory.mktemp("atari"), transitions=1_200, seed=3, capacity=400,
                         epsilons=(1.0, 0.6), progress=False)


def test_collector_files_decode_with_plain_gzip_and_numpy(breakout):
    assert breakout.name == "replay_logs" and breakout.parent.name == "1" and breakout.parent.parent.name == "Breakout"
    counts = []
    for i in range(4):  # 1,200 steps + padding in 400-row buffers: three full logs and the final partial one
        arrays = {}
        for name in ("$store$_observation", "$store$_action", "$store$_reward", "$store$_terminal", "add_count",
                     "invalid_range"):
            with gzip.GzipFile(breakout / f"{name}_ckpt.{i}.gz", mode="rb") as f:
                arrays[name] = np.load(f, allow_pickle=False)
        assert arrays["$store$_observation"].shape == (400, 84, 84) and arrays["$store$_observation"].dtype == np.uint8
        assert arrays["$store$_action"].dtype == np.int32 and arrays["$store$_action"].max() < 4
        assert arrays["$store$_reward"].dtype == np.float32 and np.abs(arrays["$store$_reward"]).max() <= 1
        assert arrays["$store$_terminal"].dtype == np.uint8 and arrays["add_count"].dtype == np.int64
        counts.append(int(arrays["add_count"]))
    assert counts[0] == 399 and counts[1] > 400 and counts[1] % 400 == 399 and counts[-1] < 400
    summary = json.loads((breakout.parent / "collection.json").read_text())
    assert summary["protocol"]["sticky_actions"] == 0.25 and summary["checkpoints"] == 4
    assert sum(e["steps"] for e in summary["episodes"]) == 1_200


def test_collected_episodes_read_back(breakout):
    summary = json.loads((breakout.parent / "collection.json").read_text())
    complete = [e for e in summary["episodes"] if e["complete"]]
    episodes = [ep for u in dqn_replay.list_units(breakout.parent.parent) for ep in dqn_replay.read_unit(u)]
    lengths = {e["steps"] for e in complete}
    # every complete episode read back is one that was played, with its clipped return
    played = {(e["steps"], e["clipped_return"]) for e in complete}
    for ep in episodes:
        if ep.terminated:
            assert len(ep) in lengths and (len(ep), ep.total_return) in played
    assert sum(ep.terminated for ep in episodes) >= 2
    assert all(ep.observations.any(axis=(1, 2)).all() for ep in episodes)  # no padding frame leaks through


def test_collection_is_deterministic(tmp_path):
    paths = [collect_atari("Pong", tmp_path / str(k), transitions=300, seed=5, capacity=120, progress=False)
             for k in range(2)]
    names = sorted(p.name for p in paths[0].iterdir())
    assert len(names) == 6 * 3
    for name in names:
        assert (paths[0] / name).read_bytes() == (paths[1] / name).read_bytes(), name
    assert dqn_replay.describe(paths[0])["act_dim"] == 6
    with pytest.raises(FileExistsError):
        collect_atari("Pong", tmp_path / "0", transitions=10, seed=5, progress=False)


@pytest.mark.slow  # ~15-25 s: real Breakout play at ~500 steps/s
def test_scripted_player_beats_random(tmp_path):
    logs = collect_atari("Breakout", tmp_path, transitions=7_000, seed=1, capacity=10_000, epsilons=(0.0, 1.0),
                         progress=False)
    by_eps = json.loads((logs.parent / "collection.json").read_text())["by_epsilon"]
    assert by_eps["0.0"]["episodes"] >= 2 and by_eps["1.0"]["episodes"] >= 2
    assert by_eps["0.0"]["score_mean"] > by_eps["1.0"]["score_mean"] + 10
    episodes = list(dqn_replay.read_unit(dqn_replay.list_units(logs)[0]))
    returns = sorted(ep.total_return for ep in episodes if ep.terminated)
    assert returns[-1] > 10 * max(1.0, returns[0])


@pytest.mark.slow  # the CLI dispatcher as a subprocess (imports gymnasium + ale-py): ~5-10 s
def test_collect_cli(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "data_pipeline" / "collect.py"), "breakout", "--output",
                          str(tmp_path), "--transitions", "200", "--seed", "2"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    units = dqn_replay.list_units(tmp_path / "Breakout")
    assert len(units) == 1 and units[0].transitions == 203  # one unfinished episode: its padding + 200 steps


def test_collect_cli_refuses_a_non_empty_output_with_a_clear_error(tmp_path, capsys):
    from data_pipeline.collect import main
    logs = tmp_path / "Breakout" / "1" / "replay_logs"
    logs.mkdir(parents=True)
    (logs / "$store$_action_ckpt.0.gz").write_bytes(b"old")
    with pytest.raises(SystemExit) as exit_info:
        main(["breakout", "--output", str(tmp_path), "--transitions", "10"])
    assert exit_info.value.code == 2
    assert "already holds files" in capsys.readouterr().err
    assert (logs / "$store$_action_ckpt.0.gz").read_bytes() == b"old"
