"""Reader for DQN-Replay: Dopamine replay-buffer checkpoints, ``<Game>/<run>/replay_logs/*_ckpt.<i>.gz``.

PATH may be a game folder (``Breakout``: every run folder under it that has ``replay_logs/``, runs in numeric
order), a run folder (``Breakout/1``) or its ``replay_logs`` folder (any folder holding the checkpoint files; the
game is then the name two levels up). One unit = one checkpoint index of one run.

Per checkpoint, six files are read: ``$store$_observation`` (capacity, 84, 84) uint8, ``$store$_action`` integer,
``$store$_reward`` float, ``$store$_terminal`` 0/1, ``add_count`` (0-d) and ``invalid_range``. Other files
(``episode_end_indices``, written pickled by newer Dopamine, or anything else) are ignored and never unpickled.

Layout, as Dopamine writes it: row i = (o_i, a_i, r_i, terminal_i). Before every episode's first step (and at the
very first add) there are ``stack_size - 1`` zero padding rows. The buffer is circular: with ``add_count >=
capacity`` the oldest row is at ``cursor = add_count % capacity`` and rows are read in the order cursor, ..., end,
0, ..., cursor - 1; otherwise rows ``[0, add_count)`` are read. ``stack_size`` and ``update_horizon`` are recovered
from ``invalid_range`` (which must be the rows ``cursor - update_horizon ... cursor + stack_size - 1``).

Episodes: an episode runs from the row after its padding to its terminal row. Rows before the first terminal of a
wrapped buffer belong to an episode whose beginning is not in this checkpoint (overwritten, or in the previous
one): they are dropped (its remaining steps would carry wrong timesteps). The same holds for a non-wrapped buffer
that does not start with zero padding rows (batch_rl's final buffer, saved with ``add_count`` = cursor). Steps after
the last terminal (an episode the checkpoint cuts) form a final episode with ``truncated=True``. An episode of
exactly 27,000 steps ending in a terminal is DQN-Replay's episode cap: ``terminated=False, truncated=True``.
Padding rows are checked to be zero (observation, action, reward, terminal).

Memory: actions, rewards and terminals (13 bytes a row once converted) are loaded whole; observations are
streamed from the gzip stream block by block, straight into each episode's array, so memory is one block plus one
episode. A wrapped buffer whose oldest row is not at the end of the file needs the end of the file before its
start: the file is opened a second time and decompressed from the beginning (at most one extra pass over
``cursor`` rows). Every file is read to its end once, so truncation and CRC errors are always detected.

Episode ids: ``(run_position * 1000 + checkpoint) * 10_000_000 + k`` for the k-th episode emitted from that
checkpoint (run_position counts the runs under PATH from 0).
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_pipeline.episode import Episode
from data_pipeline.errors import DatasetFormatError
from data_pipeline.formats.dopamine import STORE_PREFIX, checkpoint_filename, invalid_range
from data_pipeline.sources.npy_gzip import NpyRowStream, header, load_small
from data_pipeline.sources.unit import Unit

FRAME_SHAPE = (84, 84)
MAX_EPISODE_STEPS = 27_000  # DQN-Replay's cap on agent steps per episode (terminal=1 at the cap)
IDS_PER_CHECKPOINT = 10_000_000
BLOCK_ROWS = 2048  # observation rows decompressed per read (2048 x 7 KB = 14 MB)
NAMES = {"observation": STORE_PREFIX + "observation", "action": STORE_PREFIX + "action",
         "reward": STORE_PREFIX + "reward", "terminal": STORE_PREFIX + "terminal",
         "add_count": "add_count", "invalid_range": "invalid_range"}
_CKPT = re.compile(r"^(?P<name>.+)_ckpt\.(?P<index>\d+)\.gz$")


@dataclass(frozen=True)
class Run:
    game: str
    run: str
    replay_logs: Path


def runs(path: str | Path) -> list[Run]:
    """The runs under PATH: a ``replay_logs`` folder, a run folder or a game folder."""
    path = Path(path)
    if not path.is_dir():
        raise DatasetFormatError(f"{path}: expected a DQN-Replay game, run or replay_logs folder, found none")
    if path.name == "replay_logs" or checkpoint_indices(path):
        return [Run(path.resolve().parent.parent.name, path.resolve().parent.name, path)]
    if (path / "replay_logs").is_dir():
        return [Run(path.resolve().parent.name, path.resolve().name, path / "replay_logs")]
    found = [d for d in path.iterdir() if (d / "replay_logs").is_dir()]
    if not found:
        raise DatasetFormatError(f"{path}: expected <run>/replay_logs folders (DQN-Replay layout), found none")
    found.sort(key=lambda d: (0, int(d.name), "") if d.name.isdigit() else (1, 0, d.name))
    return [Run(path.resolve().name, d.name, d / "replay_logs") for d in found]


def checkpoint_indices(replay_logs: Path) -> list[int]:
    """Indices i for which any of the six checkpoint files exists (unknown names are ignored)."""
    known = set(NAMES.values())
    indices = set()
    for p in replay_logs.iterdir():
        m = _CKPT.match(p.name)
        if m and m["name"] in known:
            indices.add(int(m["index"]))
    return sorted(indices)


def _file(replay_logs: Path, key: str, index: int) -> Path:
    return replay_logs / checkpoint_filename(NAMES[key], index)


def list_units(path: str | Path) -> list[Unit]:
    """One unit per non-empty checkpoint of every run under PATH; ``transitions`` = rows held (padding
    included). Checkpoints with ``add_count`` 0 hold nothing and are left out; if all are, that is an error."""
    units, empty = [], []
    for position, run in enumerate(runs(path)):
        for index in checkpoint_indices(run.replay_logs):
            count = _load_add_count(run.replay_logs, index)
            capacity = _check_observation_header(run.replay_logs, index)[0]
            if count == 0:
                empty.append(_file(run.replay_logs, "add_count", index))
                continue
            rows = min(count, capacity)
            units.append(Unit(str(run.replay_logs), index, index + 1, rows,
                              (position * 1000 + index) * IDS_PER_CHECKPOINT))
    if not units and empty:
        raise DatasetFormatError(f"{empty[0]}: expected a positive add_count in some checkpoint, found 0 in all "
                                 f"{len(empty)} (an empty dataset)")
    if not units:
        raise DatasetFormatError(f"{path}: expected DQN-Replay checkpoint files (*_ckpt.<i>.gz), found none")
    return units


def _load_add_count(replay_logs: Path, index: int) -> int:
    file = _file(replay_logs, "add_count", index)
    count = load_small(file)
    if count.shape != () or not np.issubdtype(count.dtype, np.integer):
        raise DatasetFormatError(f"{file}: expected a 0-d integer array, found shape {count.shape} {count.dtype}")
    if int(count) < 0:
        raise DatasetFormatError(f"{file}: expected add_count >= 0, found {int(count)}")
    return int(count)


def _check_observation_header(replay_logs: Path, index: int) -> tuple[int, ...]:
    file = _file(replay_logs, "observation", index)
    if not file.is_file():
        raise DatasetFormatError(f"{file}: expected this checkpoint file, found none")
    shape, dtype = header(file)
    if dtype != np.uint8 or len(shape) != 3 or shape[1:] != FRAME_SHAPE:
        raise DatasetFormatError(f"{file}: expected uint8 frames of shape (capacity, 84, 84), "
                                 f"found {dtype} {shape}")
    return shape


@dataclass
class Checkpoint:
    """The small arrays of one checkpoint, validated, in logical (oldest-first) row order."""
    observation_file: Path
    capacity: int
    offset: int  # physical row of logical row 0
    rows: int  # valid rows
    stack_size: int
    actions: np.ndarray
    rewards: np.ndarray
    terminals: np.ndarray

    def physical(self, start: int, stop: int) -> list[tuple[int, int]]:
        """Physical row ranges of logical rows ``[start, stop)`` (two when they cross the end of the file)."""
        a, b = self.offset + start, self.offset + stop
        if b <= self.capacity:
            return [(a, b)]
        if a >= self.capacity:
            return [(a - self.capacity, b - self.capacity)]
        return [(a, self.capacity), (0, b - self.capacity)]


def load_checkpoint(replay_logs: Path, index: int) -> Checkpoint:
    capacity = _check_observation_header(replay_logs, index)[0]
    arrays = {}
    for key, kind in (("action", "integer"), ("reward", "floating"), ("terminal", "integer")):
        file = _file(replay_logs, key, index)
        a = load_small(file)
        ok = np.issubdtype(a.dtype, np.integer) or a.dtype == bool if kind == "integer" else \
            np.issubdtype(a.dtype, np.floating)
        if not ok or a.ndim != 1:
            raise DatasetFormatError(f"{file}: expected a 1-d {kind} array, found {a.dtype} {a.shape}")
        if len(a) != capacity:
            raise DatasetFormatError(f"{file}: expected {capacity} rows like {NAMES['observation']}, "
                                     f"found {len(a)}")
        arrays[key] = a
    count = _load_add_count(replay_logs, index)
    if count == 0:
        raise DatasetFormatError(f"{_file(replay_logs, 'add_count', index)}: expected a positive add_count, "
                                 "found 0 (an empty buffer)")
    full = count >= capacity
    cursor = count % capacity
    rows, offset = (capacity, cursor) if full else (count, 0)
    stack_size = _stack_size(_file(replay_logs, "invalid_range", index), cursor, capacity)

    def logical(a: np.ndarray, dtype: type) -> np.ndarray:  # the valid rows, oldest first, converted in one copy
        out = np.empty(rows, dtype)
        out[:rows - offset] = a[offset:rows]
        out[rows - offset:] = a[:offset]
        return out

    valid = {key: a[:rows] for key, a in arrays.items()}  # physical order (the valid rows are [0, rows))
    bad = np.flatnonzero(~np.isfinite(valid["reward"]))
    if len(bad):
        raise DatasetFormatError(f"{_file(replay_logs, 'reward', index)}: expected finite rewards, "
                                 f"found NaN/inf at row {int(bad[0])}")
    if (valid["action"] < 0).any():
        raise DatasetFormatError(f"{_file(replay_logs, 'action', index)}: expected actions >= 0, "
                                 f"found {int(valid['action'].min())}")
    if not np.isin(valid["terminal"], (0, 1)).all():
        raise DatasetFormatError(f"{_file(replay_logs, 'terminal', index)}: expected terminals 0 or 1, "
                                 f"found {sorted(set(np.unique(valid['terminal']).tolist()) - {0, 1})[:5]}")
    return Checkpoint(_file(replay_logs, "observation", index), capacity, offset, rows, stack_size,
                      logical(arrays["action"], np.int64), logical(arrays["reward"], np.float32),
                      logical(arrays["terminal"], bool))


def _stack_size(file: Path, cursor: int, capacity: int) -> int:
    """Dopamine's stack size, from ``invalid_range`` = rows ``cursor - horizon ... cursor + stack_size - 1``."""
    r = load_small(file)
    if r.ndim != 1 or not len(r) or not np.issubdtype(r.dtype, np.integer):
        raise DatasetFormatError(f"{file}: expected a 1-d integer array, found {r.dtype} {r.shape}")
    horizon = (cursor - int(r[0])) % capacity
    stack = len(r) - horizon
    if stack < 1 or not np.array_equal(r, invalid_range(cursor, capacity, stack, horizon)):
        raise DatasetFormatError(f"{file}: expected consecutive rows around the cursor {cursor} (capacity "
                                 f"{capacity}), found {r.tolist()[:10]}")
    return stack


def new_frames(shape: tuple[int, ...]) -> np.ndarray:
    return np.empty(shape, np.uint8)


@dataclass(frozen=True)
class Span:
    start: int  # logical rows [start, stop)
    stop: int
    kind: str  # "episode" | "padding"
    terminated: bool = False


def spans(ck: Checkpoint, starts_with_padding: bool) -> list[Span]:
    """Episodes and padding rows in logical order; the head of a buffer with no known start is left out."""
    pad, n = ck.stack_size - 1, ck.rows
    terminals = np.flatnonzero(ck.terminals)
    out: list[Span] = []
    if starts_with_padding:
        out.append(Span(0, min(pad, n), "padding"))
        pos = pad
    elif len(terminals):
        pos = int(terminals[0]) + 1
        out.append(Span(pos, min(pos + pad, n), "padding"))
        pos += pad
    else:
        return []  # one episode whose start is not in this checkpoint
    for t in terminals[np.searchsorted(terminals, pos):]:
        t = int(t)
        out.append(Span(pos, t + 1, "episode", True))
        out.append(Span(t + 1, min(t + 1 + pad, n), "padding"))
        pos = t + 1 + pad
    if pos < n:
        out.append(Span(pos, n, "episode", False))
    out = [s for s in out if s.stop > s.start]
    for s in out:
        if s.kind == "padding" and (ck.actions[s.start:s.stop].any() or ck.rewards[s.start:s.stop].any()
                                    or ck.terminals[s.start:s.stop].any()):
            rows = [r for a, b in ck.physical(s.start, s.stop) for r in range(a, b)]
            raise DatasetFormatError(f"{ck.observation_file.parent}: expected zero padding rows {rows} "
                                     f"(action, reward, terminal) before an episode, found non-zero values")
    return out


def read_unit(unit: Unit, block_rows: int = BLOCK_ROWS,
              empty_frames: Callable[[tuple[int, ...]], np.ndarray] = new_frames) -> Iterator[Episode]:
    """The episodes of one checkpoint, oldest first.

    ``empty_frames(shape)`` gives the uint8 array (C-contiguous, of that shape) each episode's frames are read into;
    by default a new one per episode. An allocator that hands out the same memory again (the sharder's
    ``FrameBuffer``) makes an episode's observations valid only until the next episode is asked for."""
    replay_logs, index = Path(unit.path), unit.start
    ck = load_checkpoint(replay_logs, index)
    source = str(Path(replay_logs.parent.parent.name) / replay_logs.parent.name / replay_logs.name
                 / ck.observation_file.name)
    pad = ck.stack_size - 1
    with NpyRowStream(ck.observation_file, block_rows) as stream:
        # a buffer that never wrapped starts with the first episode's padding, unless batch_rl saved its final
        # partial buffer (add_count = cursor): then row 0 continues an older episode
        starts_with_padding = ck.rows < ck.capacity and ck.rows > pad and not (
            ck.actions[:pad].any() or ck.rewards[:pad].any() or ck.terminals[:pad].any()
            or stream.read(0, pad).any())
        episode_id = unit.first_episode
        for span in spans(ck, starts_with_padding):
            if starts_with_padding and span.start == 0:
                continue  # its frames were read and checked just above
            frames = empty_frames((span.stop - span.start, *FRAME_SHAPE))
            at = 0
            for a, b in ck.physical(span.start, span.stop):
                stream.read(a, b, frames[at:at + b - a])
                at += b - a
            if span.kind == "padding":
                if frames.any():
                    raise DatasetFormatError(f"{ck.observation_file}: expected zero frames in the padding rows "
                                             f"{ck.physical(span.start, span.stop)}, found non-zero pixels")
                continue
            capped = span.terminated and len(frames) == MAX_EPISODE_STEPS
            yield Episode(frames, ck.actions[span.start:span.stop], ck.rewards[span.start:span.stop],
                          terminated=span.terminated and not capped, truncated=not span.terminated or capped,
                          source=source, episode_id=episode_id)
            episode_id += 1
        stream.finish()


def describe(path: str | Path) -> dict:
    """Env spec: the game from the folder name; ``act_dim`` from the game's minimal action set in ale-py
    (or, for a game ale-py does not know, the largest action in the first checkpoint + 1)."""
    run = runs(path)[0]
    indices = checkpoint_indices(run.replay_logs)
    if not indices:
        raise DatasetFormatError(f"{run.replay_logs}: expected DQN-Replay checkpoint files, found none")
    actions = load_small(_file(run.replay_logs, "action", indices[0]))
    largest = int(actions.max()) if actions.size else 0
    act_dim = minimal_action_count(run.game)
    if act_dim is None:
        act_dim = largest + 1
    elif largest >= act_dim:
        raise DatasetFormatError(f"{_file(run.replay_logs, 'action', indices[0])}: expected actions below "
                                 f"{act_dim} (the minimal action set of {run.game}), found {largest}")
    return {"kind": "atari", "env": run.game, "game": run.game, "eval_env": {"kind": "atari", "game": run.game},
            "obs_shape": list(FRAME_SHAPE), "act_dim": act_dim, "discrete": True}


def minimal_action_count(game: str) -> int | None:
    """Size of the minimal action set of ``ALE/<game>-v5``, or None when ale-py has no such game."""
    import gymnasium as gym
    import ale_py

    gym.register_envs(ale_py)
    try:
        env = gym.make(f"ALE/{game}-v5")
    except Exception:  # noqa: BLE001 - any failure means the game is unknown to this ale-py
        return None
    try:
        return int(env.action_space.n)
    finally:
        env.close()
