"""DQN-Replay: checkpoints written by the Dopamine-style buffer from real Breakout frames read back exactly."""
from __future__ import annotations

import gzip
import pickle
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.collect_atari import make_env
from data_pipeline.errors import DatasetFormatError
from data_pipeline.formats.dopamine import LoggedReplayBuffer, ReplayBuffer, write_npy_gz
from data_pipeline.policies.epsilon import EpsilonPlayer
from data_pipeline.sources import dqn_replay
from data_pipeline.sources.npy_gzip import NpyRowStream

PAD = 3  # stack_size - 1


@pytest.fixture(scope="module")
def real_episodes() -> list[dict]:
    """Episodes of real Breakout play, cut at short random lengths so that buffers hold many of them."""
    env = make_env("Breakout")
    rng = np.random.default_rng(0)
    player = EpsilonPlayer("Breakout", int(env.action_space.n), rng)
    obs, _ = env.reset(seed=0)
    episodes = []
    for _ in range(24):
        length, ep = int(rng.integers(1, 40)), {"obs": [], "actions": [], "rewards": []}
        for _ in range(length):
            action = player.act(env.unwrapped.ale.getRAM(), 0.3)
            nxt, reward, terminated, truncated, _ = env.step(action)
            ep["obs"].append(obs), ep["actions"].append(action), ep["rewards"].append(float(np.clip(reward, -1, 1)))
            obs = nxt
            if terminated or truncated:
                obs, _ = env.reset()
                break
        episodes.append({k: np.array(v) for k, v in ep.items()})
    env.close()
    assert any(ep["rewards"].sum() > 0 for ep in episodes) and len({len(ep["actions"]) for ep in episodes}) > 5
    return episodes


class Labelled:
    """Feeds episodes to a buffer, remembering which (episode, step) each row holds (-1 = padding)."""

    def __init__(self, buffer: ReplayBuffer):
        self.buffer = buffer
        self.labels = np.full((buffer.capacity, 2), -2)  # rows never written: -2
        self.snapshots: list[tuple[np.ndarray, int]] = []  # labels and saved add_count per checkpoint
        original_add, original_save = buffer._add, buffer.save

        def add(obs, action, reward, terminal):
            self.labels[buffer.cursor()] = self.current if obs.any() else (-1, -1)
            original_add(obs, action, reward, terminal)

        def save(directory, index, add_count=None):
            original_save(directory, index, add_count)
            self.snapshots.append((self.labels.copy(), int(buffer.add_count if add_count is None else add_count)))

        buffer._add, buffer.save = add, save  # instrumentation only: the real methods still do the work

    def feed(self, episodes: list[dict], stop_after: int | None = None, last_terminal: bool = True) -> None:
        for e, ep in enumerate(episodes):
            n = len(ep["actions"]) if stop_after is None or e < len(episodes) - 1 else min(stop_after, n_last := len(
                ep["actions"]))
            if stop_after is not None and e == len(episodes) - 1:
                assert n < n_last or not last_terminal
            for t in range(n):
                self.current = (e, t)
                end = t == len(ep["actions"]) - 1 and (last_terminal or e < len(episodes) - 1)
                self.buffer.add(ep["obs"][t], int(ep["actions"][t]), float(ep["rewards"][t]), end)


def expected(labels: np.ndarray, add_count: int, episodes: list[dict]) -> list[tuple[int, int, bool]]:
    """(episode, steps held, ends with its terminal) of the episodes the reader must return, oldest first:
    those whose first step and its padding are held and follow either the start of a never-wrapped buffer or the
    previous episode's terminal row."""
    capacity = len(labels)
    order = np.r_[add_count % capacity:capacity, 0:add_count % capacity] if add_count >= capacity \
        else np.arange(add_count)
    seq = [tuple(labels[i]) for i in order]
    out = []
    for i, (e, t) in enumerate(seq):
        if t != 0:
            continue
        before = seq[max(0, i - PAD - 1):i]
        starts_buffer = add_count < capacity and i == PAD and all(x == (-1, -1) for x in before)
        after_terminal = e > 0 and i >= PAD + 1 and all(x == (-1, -1) for x in before[1:]) and before[0][0] == e - 1 \
            and before[0][1] == len(episodes[e - 1]["actions"]) - 1
        if starts_buffer or after_terminal:
            held = sum(1 for x in seq[i:] if x[0] == e)
            out.append((e, held, held == len(episodes[e]["actions"])))
    return out


def check(replay_logs: Path, labelled: Labelled, episodes: list[dict], block_rows: int = 5) -> list:
    units = dqn_replay.list_units(replay_logs)
    assert len(units) == len(labelled.snapshots)
    got_all = []
    for unit, (labels, add_count) in zip(units, labelled.snapshots):
        got = list(dqn_replay.read_unit(unit, block_rows=block_rows))
        want = expected(labels, add_count, episodes)
        assert [(len(g), g.terminated, g.truncated) for g in got] == [(n, term, not term) for _, n, term in want]
        for g, (e, n, _) in zip(got, want):
            np.testing.assert_array_equal(g.observations, episodes[e]["obs"][:n])
            np.testing.assert_array_equal(g.actions, episodes[e]["actions"][:n])
            np.testing.assert_array_equal(g.rewards, episodes[e]["rewards"][:n].astype(np.float32))
            assert g.actions.dtype == np.int64 and g.observations.dtype == np.uint8
        got_all += got
    ids = [g.episode_id for g in got_all]
    assert len(set(ids)) == len(ids)
    return got_all


def test_logged_buffer_checkpoints_read_back_exactly(real_episodes, tmp_path):
    logs = tmp_path / "Breakout" / "1" / "replay_logs"
    labelled = Labelled(LoggedReplayBuffer(logs, capacity=150))
    labelled.feed(real_episodes, stop_after=5, last_terminal=False)
    labelled.buffer.log_final()
    got = check(logs.parent.parent, labelled, real_episodes)
    counts = [c for _, c in labelled.snapshots]
    assert counts[0] == 149 and all(c > 150 for c in counts[1:-1]) and counts[-1] < 150  # batch_rl's pattern
    assert any(g.truncated for g in got) and sum(g.terminated for g in got) >= 10
    # every checkpoint after the first starts inside an episode: that head is dropped, not returned
    assert sum(len(g) for g in got) < sum(len(ep["actions"]) for ep in real_episodes)


def test_wrapped_buffer_with_cursor_mid_file(real_episodes, tmp_path):
    logs = tmp_path / "Breakout" / "1" / "replay_logs"
    labelled = Labelled(ReplayBuffer(capacity=200))
    labelled.feed(real_episodes[:14])
    labelled.buffer.save(logs, 0)
    assert int(labelled.buffer.add_count) > 200 and 0 < labelled.buffer.cursor() < 180
    got = check(logs, labelled, real_episodes)
    assert all(g.terminated for g in got) and len(got) >= 3


def test_block_size_does_not_change_results_and_whole_file_matches(real_episodes, tmp_path):
    logs = tmp_path / "Pong" / "3" / "replay_logs"
    labelled = Labelled(ReplayBuffer(capacity=120))
    labelled.feed(real_episodes[:9])
    labelled.buffer.save(logs, 7)
    unit = dqn_replay.list_units(logs)[0]
    results = {b: list(dqn_replay.read_unit(unit, block_rows=b)) for b in (1, 7, 4096)}
    for b in (1, 7):
        assert len(results[b]) == len(results[4096])
        for a, c in zip(results[b], results[4096]):
            np.testing.assert_array_equal(a.observations, c.observations)
            assert (a.episode_id, a.terminated, a.source) == (c.episode_id, c.terminated, c.source)
    # plain gzip + np.load of the whole array agrees with the streamed frames row by row
    with gzip.open(logs / "$store$_observation_ckpt.7.gz") as f:
        whole = np.load(f, allow_pickle=False)
    np.testing.assert_array_equal(whole, labelled.buffer.store["observation"])
    with NpyRowStream(logs / "$store$_observation_ckpt.7.gz", block_rows=3) as s:
        np.testing.assert_array_equal(s.read(100, 120), whole[100:120])
        np.testing.assert_array_equal(s.read(5, 9), whole[5:9])  # behind: reopened
        assert s.opens == 2 and s.verified
    assert unit.first_episode == 7 * dqn_replay.IDS_PER_CHECKPOINT
    assert results[1][0].source == "Pong/3/replay_logs/$store$_observation_ckpt.7.gz"


def test_saved_arrays_have_dopamine_dtypes(real_episodes, tmp_path):
    buffer = ReplayBuffer(capacity=64)
    for t in range(10):
        buffer.add(real_episodes[0]["obs"][0], 2, 1.0, t == 9)
    buffer.save(tmp_path, 0)
    want = {"$store$_observation": (np.uint8, (64, 84, 84)), "$store$_action": (np.int32, (64,)),
            "$store$_reward": (np.float32, (64,)), "$store$_terminal": (np.uint8, (64,)),
            "add_count": (np.int64, ()), "invalid_range": (np.int64, (5,))}
    for name, (dtype, shape) in want.items():
        with gzip.GzipFile(tmp_path / f"{name}_ckpt.0.gz", mode="rb") as f:
            a = np.load(f, allow_pickle=False)
        assert a.dtype == dtype and a.shape == shape, name
    assert int(buffer.add_count) == 13 and buffer.invalid_range.tolist() == [12, 13, 14, 15, 16]
    assert buffer.store["terminal"][:13].tolist() == [0] * 12 + [1] and not buffer.store["observation"][:3].any()


def test_peak_memory_does_not_grow_with_the_file(real_episodes, tmp_path):
    frames = np.stack([f for ep in real_episodes for f in ep["obs"]])
    buffer = ReplayBuffer(capacity=3000)
    k = 0
    while int(buffer.add_count) < 2990:  # many short episodes of real frames
        for t in range(20):
            buffer.add(frames[k % len(frames)], 1, 0.0, t == 19)
            k += 1
    buffer.save(tmp_path, 0)
    del buffer
    unit = dqn_replay.list_units(tmp_path)[0]
    tracemalloc.start()
    try:
        n = sum(len(ep) for ep in dqn_replay.read_unit(unit, block_rows=64))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == k
    file_bytes = 3000 * 84 * 84
    assert peak < file_bytes / 5, f"peak {peak / 1e6:.1f} MB for a {file_bytes / 1e6:.1f} MB observation array"


class _Trap:
    """Unpickling this creates the marker file: proof that something was unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_unknown_and_pickled_files_are_ignored(real_episodes, tmp_path):
    logs = tmp_path / "Breakout" / "1" / "replay_logs"
    labelled = Labelled(ReplayBuffer(capacity=100))
    labelled.feed(real_episodes[:4])
    labelled.buffer.save(logs, 0)
    marker = tmp_path / "unpickled"
    with gzip.GzipFile(logs / "episode_end_indices_ckpt.0.gz", mode="wb") as f:  # as newer Dopamine (a pickle)
        pickle.dump({5, 9, _Trap(marker)}, f)
    with gzip.GzipFile(logs / "something_else_ckpt.3.gz", mode="wb") as f:
        pickle.dump(_Trap(marker), f)
    (logs / "notes.txt").write_text("not a checkpoint")
    assert len(dqn_replay.list_units(logs)) == 1
    check(logs, labelled, real_episodes)
    assert dqn_replay.describe(tmp_path / "Breakout")["act_dim"] == 4
    assert not marker.exists()


def test_describe_and_runs_of_a_game_folder(real_episodes, tmp_path):
    for run in ("1", "2"):
        buffer = ReplayBuffer(capacity=50)
        for t, a in enumerate(real_episodes[3]["actions"]):
            buffer.add(real_episodes[3]["obs"][t], int(a), 0.0, t == len(real_episodes[3]["actions"]) - 1)
        buffer.save(tmp_path / "Pong" / run / "replay_logs", 0)
    units = dqn_replay.list_units(tmp_path / "Pong")
    assert [Path(u.path).parent.name for u in units] == ["1", "2"]
    ids = [ep.episode_id for u in units for ep in dqn_replay.read_unit(u)]
    assert len(ids) == 2 and len(set(ids)) == 2
    d = dqn_replay.describe(tmp_path / "Pong" / "2")
    assert d == {"kind": "atari", "env": "Pong", "game": "Pong", "eval_env": {"kind": "atari", "game": "Pong"},
                 "obs_shape": [84, 84], "act_dim": 6, "discrete": True}
    shutil.copytree(tmp_path / "Pong", tmp_path / "NoSuchGame")  # unknown to ale-py: largest action + 1
    assert dqn_replay.describe(tmp_path / "NoSuchGame")["act_dim"] == int(real_episodes[3]["actions"].max()) + 1


# ---- bad input: each case must raise DatasetFormatError naming the file ----

def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _replace(name: str, array) -> callable:
    return lambda logs: write_npy_gz(logs / f"{name}_ckpt.0.gz", array(logs))


def _load(logs: Path, name: str) -> np.ndarray:
    with gzip.open(logs / f"{name}_ckpt.0.gz") as f:
        return np.load(f)


def _pickled_actions(logs: Path) -> None:
    arr = np.array([_Trap(logs.parent / "unpickled")] * 100, dtype=object)
    with gzip.GzipFile(logs / "$store$_action_ckpt.0.gz", mode="wb") as f:
        np.save(f, arr, allow_pickle=True)


def _nonzero_padding(logs: Path) -> None:
    obs = _load(logs, "$store$_observation")
    first_terminal = int(np.flatnonzero(_load(logs, "$store$_terminal"))[0])
    obs[first_terminal + 2, 40, 40] = 7  # the second padding row of the second episode
    write_npy_gz(logs / "$store$_observation_ckpt.0.gz", obs)


BAD = {
    "truncated observation gzip": ("$store$_observation",
                                   lambda logs: _truncate(logs / "$store$_observation_ckpt.0.gz")),
    "truncated terminal gzip": ("$store$_terminal", lambda logs: _truncate(logs / "$store$_terminal_ckpt.0.gz")),
    "not gzip": ("$store$_reward", lambda logs: (logs / "$store$_reward_ckpt.0.gz").write_bytes(b"NUMPY!" * 9)),
    "missing action file": ("$store$_action", lambda logs: (logs / "$store$_action_ckpt.0.gz").unlink()),
    "missing add_count": ("add_count", lambda logs: (logs / "add_count_ckpt.0.gz").unlink()),
    "length mismatch": ("$store$_reward", _replace("$store$_reward", lambda logs: np.zeros(99, np.float32))),
    "wrong observation dtype": ("$store$_observation", _replace(
        "$store$_observation", lambda logs: _load(logs, "$store$_observation").astype(np.float32))),
    "wrong observation shape": ("$store$_observation", _replace(
        "$store$_observation", lambda logs: _load(logs, "$store$_observation")[:, :, :80].copy())),
    "float actions": ("$store$_action", _replace("$store$_action", lambda logs: np.zeros(100, np.float32))),
    "nan reward": ("$store$_reward", _replace(
        "$store$_reward", lambda logs: np.where(np.arange(100) == 10, np.nan, 0).astype(np.float32))),
    "inf reward": ("$store$_reward", _replace(
        "$store$_reward", lambda logs: np.where(np.arange(100) == 10, np.inf, 0).astype(np.float32))),
    "empty dataset": ("add_count", _replace("add_count", lambda logs: np.array(0, np.int64))),
    "pickled object array": ("$store$_action", _pickled_actions),
    "bad invalid_range": ("invalid_range", _replace("invalid_range", lambda logs: np.array([1, 5, 9], np.int64))),
    "non-zero padding": ("$store$_observation", _nonzero_padding),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_raises_naming_the_file(case, real_episodes, tmp_path):
    logs = tmp_path / "Breakout" / "1" / "replay_logs"
    buffer = ReplayBuffer(capacity=100)
    for ep in real_episodes[:3]:
        for t, a in enumerate(ep["actions"]):
            buffer.add(ep["obs"][t], int(a), float(ep["rewards"][t]), t == len(ep["actions"]) - 1)
    buffer.save(logs, 0)
    name, damage = BAD[case]
    damage(logs)
    with pytest.raises(DatasetFormatError) as info:
        dqn_replay.describe(logs)
        for unit in dqn_replay.list_units(logs):
            list(dqn_replay.read_unit(unit, block_rows=16))
    message = str(info.value)
    assert f"{name}_ckpt.0.gz" in message, message
    assert not (tmp_path / "Breakout" / "1" / "unpickled").exists()


def test_no_checkpoints_is_an_error(tmp_path):
    (tmp_path / "Breakout" / "1" / "replay_logs").mkdir(parents=True)
    with pytest.raises(DatasetFormatError, match="checkpoint files"):
        dqn_replay.list_units(tmp_path / "Breakout")
    with pytest.raises(DatasetFormatError, match="expected"):
        dqn_replay.list_units(tmp_path / "nothing-here")


def test_empty_checkpoint_is_skipped_and_episode_cap_is_truncation(real_episodes, tmp_path, monkeypatch):
    logs = tmp_path / "Breakout" / "1" / "replay_logs"
    ep = real_episodes[5]
    buffer = ReplayBuffer(capacity=100)
    for t in range(5):
        buffer.add(ep["obs"][t], int(ep["actions"][t]), 0.0, t == 4)
    buffer.save(logs, 0)
    ReplayBuffer(capacity=100).save(logs, 1)  # add_count 0: holds nothing
    units = dqn_replay.list_units(logs)
    assert [u.start for u in units] == [0]
    monkeypatch.setattr(dqn_replay, "MAX_EPISODE_STEPS", 5)  # an episode as long as the cap ended by the cap
    (got,) = dqn_replay.read_unit(units[0])
    assert len(got) == 5 and got.truncated and not got.terminated


def test_logged_buffer_skips_a_log_point_reached_by_padding(real_episodes, tmp_path):
    buffer = LoggedReplayBuffer(tmp_path, capacity=10)
    frame = real_episodes[0]["obs"][0]
    for t in range(5):  # 3 padding + 5 rows: add_count 8
        buffer.add(frame, 0, 0.0, t == 4)
    buffer.add(frame, 0, 0.0, False)  # 3 padding rows pass the cursor over row 9, then the step: add_count 12
    assert int(buffer.add_count) == 12 and buffer.log_count == 0 and buffer.skipped_logs == 1
    for _ in range(7):  # add_count 19: cursor 9 after a real step
        buffer.add(frame, 0, 0.0, False)
    assert buffer.log_count == 1 and (tmp_path / "add_count_ckpt.0.gz").exists()
