"""The sharder as a process: parallel workers, resume after SIGKILL, --verify, and the DQN-Replay source."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest

from data_pipeline.collect_mujoco import collect_mujoco
from data_pipeline.episode_sample import ZSTD_LEVEL
from data_pipeline.formats.d4rl import DTYPES, write_d4rl
from data_pipeline.shard_unit import DELAY_ENV

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def d4rl_dir(tmp_path_factory) -> Path:
    """Three D4RL files (three units) cut from one real Hopper collection at episode ends."""
    work = tmp_path_factory.mktemp("d4rl3")
    source = collect_mujoco("hopper", work, transitions=3_000, seed=1)
    with h5py.File(source, "r") as f:
        data = {k: f[k][()] for k in DTYPES}
    ends = [i + 1 for i in (data["terminals"] | data["timeouts"]).nonzero()[0]]
    cuts = [0, ends[len(ends) // 3], ends[2 * len(ends) // 3], len(data["rewards"])]
    out = work / "hopper"
    for part, (lo, hi) in enumerate(zip(cuts, cuts[1:])):
        write_d4rl(out / f"hopper-mixed-part{part}.hdf5", {k: v[lo:hi] for k, v in data.items()})
    return out


def shard_cmd(src: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "data_pipeline/shard.py", "--source", "d4rl", "--input", str(src), "--output", str(out),
            "--shard-transitions", "300", *extra]


def shard_files(out: Path) -> dict[str, str]:
    index = json.loads((out / "index.json").read_text())
    return {s["name"]: s["sha256"] for s in index["shards"]}


def test_rerun_redoes_only_damaged_units(d4rl_dir, tmp_path):
    """In-process: a missing done record or a damaged shard makes exactly that unit be redone."""
    from data_pipeline import shard

    out = tmp_path / "out"
    args = ["--source", "d4rl", "--input", str(d4rl_dir), "--output", str(out), "--shard-transitions", "300"]
    assert shard.main(args) == 0
    expected = shard_files(out)
    (out / "done" / "unit-0001.json").unlink()
    damaged = sorted(out.glob("shard-0002-*.tar"))[-1]
    damaged.write_bytes(damaged.read_bytes()[:-512])  # truncated as by a crash
    (out / ".shard-0002-0099.tar.tmp").write_bytes(b"partial")  # leftover of a killed writer
    untouched = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-0000-*.tar")}
    assert shard.main(args) == 0
    assert shard_files(out) == expected
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-0000-*.tar")} == untouched
    assert not (out / ".shard-0002-0099.tar.tmp").exists()


def test_parallel_run_resume_after_kill_and_verify(d4rl_dir, tmp_path):
    clean = tmp_path / "clean"
    done = subprocess.run(shard_cmd(d4rl_dir, clean, "--workers", "2"), cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "from 3 units in" in done.stdout and "s of sharding with 2 worker(s)" in done.stdout, done.stdout
    expected = shard_files(clean)
    assert {name.split("-")[1] for name in expected} == {"0000", "0001", "0002"}

    # Kill -9 a slowed-down run once the first unit is complete, then rerun.
    out = tmp_path / "resumed"
    proc = subprocess.Popen(shard_cmd(d4rl_dir, out), cwd=REPO, env=os.environ | {DELAY_ENV: "0.1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    record = out / "done" / "unit-0000.json"
    deadline = time.time() + 120
    while not record.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert record.exists() and not (out / "done" / "unit-0002.json").exists(), "kill should land mid-run"
    assert not (out / "index.json").exists()
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-0000-*.tar")}
    rerun = subprocess.run(shard_cmd(d4rl_dir, out, "--verify"), cwd=REPO, capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert shard_files(out) == expected  # byte-identical to the clean run
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-0000-*.tar")} == kept  # unit 0 was skipped
    assert not list(out.glob(".*.tmp")) and not list(out.glob("*.tmp"))
    a, b = (json.loads((d / "index.json").read_text()) for d in (clean, out))
    for key in ("env_spec", "totals", "returns", "state_mean", "state_std", "encoding", "eval_env"):
        assert a[key] == b[key], key

    # Corrupt one byte of one shard: --verify names it and fails.
    victim = sorted(out.glob("shard-0001-*.tar"))[0]
    blob = bytearray(victim.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    victim.write_bytes(bytes(blob))
    check = subprocess.run([sys.executable, "data_pipeline/shard.py", "--output", str(out), "--verify"], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 1 and victim.name in check.stderr and "sha256" in check.stderr


@pytest.fixture(scope="module")
def breakout_root(tmp_path_factory) -> Path:
    """A real Breakout collection in the DQN-Replay layout: random play, short episodes, several per checkpoint of
    1,000 rows."""
    collect_atari = pytest.importorskip("data_pipeline.collect_atari").collect_atari
    return collect_atari("Breakout", tmp_path_factory.mktemp("raw"), 2_500, 0, capacity=1_000, epsilons=(1.0,),
                         progress=False)


def test_dqn_replay_source_round_trip(breakout_root, tmp_path):
    """The Atari path: a real Breakout collection in the DQN-Replay layout, sharded with the frame context."""
    dqn_replay = pytest.importorskip("data_pipeline.sources.dqn_replay")
    from data_pipeline import shard
    from shard_readback import check_against_episodes, read_samples

    root = breakout_root
    out = tmp_path / "shards"
    assert shard.main(["--source", "dqn-replay", "--input", str(root), "--output", str(out),
                       "--shard-transitions", "500", "--verify"]) == 0
    index = json.loads((out / "index.json").read_text())
    episodes = [ep for u in dqn_replay.list_units(root) for ep in dqn_replay.read_unit(u)]
    check_against_episodes(read_samples(out), episodes)
    assert index["env_spec"]["obs_kind"] == "atari" and index["env_spec"]["obs_shape"] == [4, 84, 84]
    assert index["env_spec"]["discrete"] and index["eval_env"] == {"kind": "atari", "game": "Breakout"}
    assert index["format_version"] == 2 and index["state_mean"] is None
    assert index["encoding"] == {"sample": "episode", "codec": "zstd", "zstd_level": ZSTD_LEVEL}
    assert index["totals"]["transitions"] == sum(len(ep) for ep in episodes)
    units = dqn_replay.list_units(root)
    assert len(units) >= 2 and len(episodes) >= 6
    assert {s["name"][:10] for s in index["shards"]} == {f"shard-{i:04d}" for i, u in enumerate(units)
                                                         if any(True for _ in dqn_replay.read_unit(u))}


def test_reused_frame_buffer_gives_byte_identical_shards(breakout_root, tmp_path, monkeypatch):
    """The sharder reads every episode's frames into one reused buffer; the tars are those of a new array per
    episode, byte for byte."""
    from data_pipeline import shard, shard_unit

    used, original = [], shard_unit.FrameBuffer.empty

    def counted(self, shape):
        used.append(shape)
        return original(self, shape)

    monkeypatch.setattr(shard_unit.FrameBuffer, "empty", counted)
    args = ["--source", "dqn-replay", "--input", str(breakout_root), "--shard-transitions", "500"]
    assert shard.main([*args, "--output", str(tmp_path / "reused")]) == 0
    assert len(used) >= 6
    monkeypatch.setattr(shard_unit, "read_episodes", lambda reader, unit: reader.read_unit(unit))
    assert shard.main([*args, "--output", str(tmp_path / "new")]) == 0
    reused, new = (sorted((tmp_path / name).glob("*.tar")) for name in ("reused", "new"))
    assert [p.name for p in reused] == [p.name for p in new] and len(new) >= 2
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(reused, new))


def test_a_failing_unit_in_a_worker_fails_the_run_clearly(d4rl_dir, tmp_path):
    """A unit that only turns out bad while a pool worker reads it: the run exits non-zero, names the file, and
    leaves no index that looks complete."""
    src = tmp_path / "hopper"
    src.mkdir()
    for part in sorted(d4rl_dir.glob("*.hdf5")):
        with h5py.File(part, "r") as f:
            data = {k: f[k][()] for k in DTYPES}
        if part.name.endswith("part2.hdf5"):
            data["rewards"][len(data["rewards"]) // 2] = float("nan")
        write_d4rl(src / part.name, data)
    out = tmp_path / "out"
    done = subprocess.run(shard_cmd(src, out, "--workers", "2"), cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stderr
    assert "part2.hdf5" in done.stderr and "NaN" in done.stderr, done.stderr
    assert not (out / "index.json").exists()


def test_more_workers_than_units_says_so(d4rl_dir, tmp_path):
    done = subprocess.run(shard_cmd(d4rl_dir, tmp_path / "out", "--workers", "5"), cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "3 input unit(s) for --workers 5" in done.stderr and "2 worker(s) will have nothing to do" in done.stderr
    quiet = subprocess.run(shard_cmd(d4rl_dir, tmp_path / "out2", "--workers", "3"), cwd=REPO, capture_output=True,
                           text=True, timeout=300)
    assert quiet.returncode == 0 and "nothing to do" not in quiet.stderr, quiet.stderr
