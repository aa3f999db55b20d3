"""DT's Atari data selection (data_pipeline/selection/dt_atari.py) against a plain transcription of the reference loop
(kzl/decision-transformer atari/create_dataset.py:22-73) over the raw arrays of a collected multi-checkpoint run."""
from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.collect_atari import collect_atari
from data_pipeline.errors import DatasetFormatError
from data_pipeline.selection import dt_atari
from tests.real_shards import ENV, REPO
from tests.shard_readback import read_samples

CAPACITY = 2000  # rows per collected checkpoint; checkpoint 0 holds CAPACITY - 1 of them
ROW_LIMIT = CAPACITY - 1  # DT's 100,000, scaled to the collected run
NUM_STEPS = 6000
ARRAYS = ("$store$_observation", "$store$_action", "$store$_reward", "$store$_terminal", "add_count", "invalid_range")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """Real Breakout play in 2000-row checkpoints 0..5; the partial last checkpoint is removed (DT never draws
    run 1's partial checkpoint 50), so checkpoints 6..49 are missing and DT skips their draws."""
    logs = collect_atari("Breakout", tmp_path_factory.mktemp("dqn"), 12_000, seed=0, capacity=CAPACITY,
                         progress=False)
    last = max(int(p.name.split(".")[-2]) for p in logs.iterdir())
    for p in logs.glob(f"*_ckpt.{last}.gz"):
        p.unlink()
    assert last == 6
    return logs.parent


def load_buffer(logs: Path, b: int) -> dict | None:
    """Dopamine's OutOfGraphReplayBuffer.load: every array of checkpoint b, or None (NotFoundError) if one is
    missing."""
    files = {name: logs / f"{name}_ckpt.{b}.gz" for name in ARRAYS}
    if not all(f.is_file() for f in files.values()):
        return None
    return {name.replace("$store$_", ""): np.load(gzip.open(f), allow_pickle=False) for name, f in files.items()}


def reference_loop(logs: Path, num_buffers: int, num_steps: int, trajectories_per_buffer: int, capacity: int,
                   seed: int) -> dict:
    """create_dataset.py's loop, line by line, with DT's seeding (np.random.seed, then nothing before the loop).
    A state is the stack of physical rows i-3..i mod capacity; the loop also logs each visit."""
    np.random.seed(seed)
    obss, actions, stepwise_returns, done_idxs, rows, terminal_at, visits = [], [], [], [], [], [], []
    transitions_per_buffer = np.zeros(50, dtype=int)
    while len(obss) < num_steps:
        buffer_num = np.random.choice(np.arange(50 - num_buffers, 50), 1)[0]
        i = transitions_per_buffer[buffer_num]
        frb = load_buffer(logs, buffer_num)
        if frb is None:
            continue
        done, start, kept = False, i, True
        curr_num_transitions = len(obss)
        trajectories_to_load = trajectories_per_buffer
        while not done:
            np.random.randint(1)  # FixedReplayBuffer.sample_transition_batch picks its one buffer
            obss += [frb["observation"][[(i - 3 + k) % capacity for k in range(4)]]]
            actions += [frb["action"][i]]
            stepwise_returns += [frb["reward"][i]]
            rows += [(int(buffer_num), int(i))]
            terminal_at += [bool(frb["terminal"][i])]
            if frb["terminal"][i]:
                done_idxs += [len(obss)]
                if trajectories_to_load == 0:
                    done = True
                else:
                    trajectories_to_load -= 1
            i += 1
            if i >= capacity:
                obss, actions = obss[:curr_num_transitions], actions[:curr_num_transitions]
                stepwise_returns, rows = stepwise_returns[:curr_num_transitions], rows[:curr_num_transitions]
                terminal_at = terminal_at[:curr_num_transitions]
                i = transitions_per_buffer[buffer_num]
                done, kept = True, False
        visits.append((int(buffer_num), int(start), int(i) if kept else capacity, kept))
        transitions_per_buffer[buffer_num] = i
    return {"obss": obss, "actions": np.array(actions), "rewards": np.array(stepwise_returns),
            "done_idxs": done_idxs, "rows": rows, "terminal_at": terminal_at, "visits": visits}


def trajectories_of(ref: dict) -> list[dict]:
    """The reference's rows split after every terminal row (the terminals of its kept rows; its done_idxs also hold
    stale entries from dropped visits, see test_reference_keeps_stale_done_idxs)."""
    out, start = [], 0
    for end in range(1, len(ref["rows"]) + 1):
        b, i = ref["rows"][end - 1]
        if end == len(ref["rows"]) or ref["rows"][end][1] != i + 1 or ref["rows"][end][0] != b \
                or ref["terminal_at"][end - 1]:
            out.append({"rows": ref["rows"][start:end], "frames": np.stack([o[-1] for o in ref["obss"][start:end]]),
                        "actions": ref["actions"][start:end], "rewards": ref["rewards"][start:end]})
            start = end
    return out


PARAMS = [(1, 123), (0, 312)]  # (trajectories_per_buffer, seed): both visit a checkpoint again and hit the row limit


@pytest.mark.parametrize("trajectories_per_buffer,seed", PARAMS)
def test_visits_match_the_reference_loop(run, trajectories_per_buffer, seed):
    params = dt_atari.Params(seed, NUM_STEPS, trajectories_per_buffer, 50, ROW_LIMIT)
    visits = dt_atari.select_visits(dt_atari.load_terminals(run / "replay_logs", params), params)
    ref = reference_loop(run / "replay_logs", 50, NUM_STEPS, trajectories_per_buffer, ROW_LIMIT, seed)
    assert [(v.checkpoint, v.start, v.stop, v.kept) for v in visits] == ref["visits"]
    kept = [v for v in visits if v.kept]
    assert [(v.checkpoint, r) for v in kept for r in range(v.start, v.stop)] == ref["rows"]  # rows taken, in order
    assert any(not v.kept for v in visits)  # the row limit was reached ...
    assert len({v.checkpoint for v in kept}) < len(kept)  # ... and a checkpoint was visited more than once
    assert NUM_STEPS <= len(ref["rows"]) < NUM_STEPS + ROW_LIMIT  # the total is checked between visits only
    terminals = dt_atari.load_terminals(run / "replay_logs", params)
    for v in kept:  # each kept visit ends at its (trajectories_per_buffer + 1)-th terminal
        assert terminals[v.checkpoint][v.start:v.stop].sum() == trajectories_per_buffer + 1
        assert terminals[v.checkpoint][v.stop - 1]


def test_reference_keeps_stale_done_idxs(run):
    """Bug (a) of the reference, which episodes cannot carry: a dropped visit's terminals stay in done_idxs."""
    ref = reference_loop(run / "replay_logs", 50, NUM_STEPS, 1, ROW_LIMIT, 123)
    terminals = dt_atari.load_terminals(run / "replay_logs", dt_atari.Params(123, NUM_STEPS, 1, 50, ROW_LIMIT))
    stale = sum(int(terminals[b][s:e].sum()) for b, s, e, kept in ref["visits"] if not kept)
    assert stale > 0 and len(ref["done_idxs"]) == sum(ref["terminal_at"]) + stale


@pytest.mark.parametrize("keep_padding_rows", [True, False])
def test_shards_hold_the_reference_rows(run, tmp_path, keep_padding_rows):
    """selection CLI -> shard.py --source dqn-replay-dt -> shards: the episodes are the reference's trajectories
    (frames, actions, rewards, returns-to-go), padding rows kept as steps or left out."""
    selection = tmp_path / "selection.json"
    argv = [str(run), "--output", str(selection), "--num-steps", str(NUM_STEPS), "--trajectories-per-buffer", "1",
            "--row-limit", str(ROW_LIMIT)] + ([] if keep_padding_rows else ["--drop-padding-rows"])
    assert dt_atari.main(argv) == 0
    out = tmp_path / "shards"
    subprocess.run([sys.executable, "data_pipeline/shard.py", "--source", "dqn-replay-dt", "--input", str(selection),
                    "--output", str(out), "--shard-transitions", "1000"], cwd=REPO, env=ENV, check=True,
                   capture_output=True)
    samples = sorted(read_samples(out), key=lambda s: s["meta"]["episode_id"])  # one sample per whole episode
    assert all(len(s["obs"]) == s["meta"]["episode_length"] for s in samples)
    got = [[s[k] for k in ("obs", "actions", "rewards", "rtg")] for s in samples]
    ref = reference_loop(run / "replay_logs", 50, NUM_STEPS, 1, ROW_LIMIT, 123)
    expected = sorted(trajectories_of(ref), key=lambda t: t["rows"][0])  # the shards are in checkpoint, row order
    assert len(got) == len(expected) > 2 * len([v for v in ref["visits"] if v[3]]) - 1
    index = json.loads((out / "index.json").read_text())
    dropped = 0
    for (frames, actions, rewards, rtg), traj in zip(got, expected):
        pad = 0
        if not keep_padding_rows:  # Dopamine's zero rows: three after every terminal, or at the very first add
            while pad < 3 and not (traj["frames"][pad].any() or traj["actions"][pad]):
                pad += 1
            assert pad == 3 or traj["rows"][0][1] == 0
        dropped += pad
        np.testing.assert_array_equal(frames, traj["frames"][pad:])
        np.testing.assert_array_equal(actions, traj["actions"][pad:])
        np.testing.assert_array_equal(rewards, traj["rewards"][pad:])
        rewards64 = traj["rewards"].astype(np.float64)
        dt_rtg = np.array([rewards64[j:].sum() for j in range(len(rewards64))])  # create_dataset.py:82-90
        np.testing.assert_allclose(rtg, dt_rtg[pad:], atol=1e-4)
    assert index["totals"]["transitions"] == len(ref["rows"]) - dropped
    assert index["source"] == "dqn-replay-dt" and index["env"] == "Breakout"
    assert (dropped > 0) == (not keep_padding_rows)


def test_selection_errors_name_the_cause(run, tmp_path):
    with pytest.raises(DatasetFormatError, match="row_limit=5000"):
        dt_atari.load_terminals(run / "replay_logs", dt_atari.Params(row_limit=5000))
    params = dt_atari.Params(123, 10**9, 10, 50, ROW_LIMIT)
    with pytest.raises(ValueError, match="loop forever"):
        dt_atari.select_visits(dt_atari.load_terminals(run / "replay_logs", params), params)
    with pytest.raises(ValueError, match="no loadable checkpoint"):
        dt_atari.select_visits({}, params)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"selection": "other"}))
    with pytest.raises(DatasetFormatError, match="expected selection 'dt_atari'"):
        dt_atari.list_units(bad)
