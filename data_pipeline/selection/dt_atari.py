"""The Decision Transformer's Atari training rows, chosen from one DQN-Replay run exactly as its code chooses them.

    python -m data_pipeline.selection.dt_atari RUN --output SELECTION.json [--seed 123] [--num-steps 500000]
        [--trajectories-per-buffer 10] [--num-buffers 50] [--row-limit 100000] [--drop-padding-rows]
    python data_pipeline/shard.py --source dqn-replay-dt --input SELECTION.json --output DIR

RUN is a DQN-Replay run folder (``Breakout/1``, DT reads run 1) or its ``replay_logs``. The loop of
kzl/decision-transformer ``atari/create_dataset.py:30-73`` (commit e2d82e68f330), seeded as ``run_dt_atari.py:36``
seeds it (``np.random.seed(seed)``; nothing draws from numpy's global generator before the loop, and the
``np.random.randint(1)`` of ``FixedReplayBuffer.sample_transition_batch`` returns 0 without advancing it):

- each *visit* draws a checkpoint ``b = np.random.choice(np.arange(50 - num_buffers, 50), 1)[0]`` (with
  replacement); a checkpoint whose files are missing is skipped, its draw still consumed;
- rows are read in physical order from the checkpoint's cursor (0 at first, kept between visits), only rows below
  ``row_limit`` (Dopamine's buffer is built with ``replay_capacity=100000``, so ``load()`` keeps the file's arrays
  but reads rows mod 100,000);
- a visit ends at its ``trajectories_per_buffer + 1``-th terminal row (11 by default); if the row after the last one
  read reaches the row limit first, the visit's rows are dropped and the cursor stays where it was;
- the loop stops once the kept rows reach ``num_steps``, checked between visits, so the data ends at a terminal and
  holds a little more than ``num_steps`` rows.

``select_visits`` is that loop over the terminal flags; ``write_selection`` stores its visits and parameters in a
JSON file. The ``dqn-replay-dt`` reader (``list_units`` / ``read_unit`` / ``describe``) turns a selection into
episodes for the sharder, so the shards hold exactly the selected rows and the loader needs no change: every
stretch between terminals of a kept visit is one episode (a visit that starts at row 0 of a wrapped checkpoint
starts with the tail of an episode, as in DT). Dopamine writes ``stack_size - 1`` zero padding rows before every
episode; DT trains on them as ordinary steps (target action 0). ``keep_padding_rows`` (default, as DT) keeps them
as the episode's first steps; ``--drop-padding-rows`` leaves out the leading all-zero rows (at most
``stack_size - 1``) of every episode.

What the episodes cannot carry (docs/protocol.md): DT's timesteps are off by one after the first trajectory and its
``done_idxs`` keep entries of dropped visits; frame stacks of the first three rows of a trajectory read the rows
before it (the previous episode's last frames, or rows ``row_limit - 3 ...`` at row 0), where the loader stacks
zeros. Only the rows below the row limit of each checkpoint are decompressed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from data_pipeline.episode import Episode  # noqa: E402
from data_pipeline.errors import DatasetFormatError  # noqa: E402
from data_pipeline.formats.dopamine import checkpoint_filename  # noqa: E402
from data_pipeline.sources import dqn_replay  # noqa: E402
from data_pipeline.sources.npy_gzip import NpyRowStream, header, load_small  # noqa: E402
from data_pipeline.sources.unit import Unit  # noqa: E402

BUFFERS = 50  # DT draws from checkpoints [50 - num_buffers, 50) and keeps a cursor for each of the 50
PAD_ROWS = 3  # Dopamine's stack_size - 1 zero rows before every episode
SELECTION = "dt_atari"


@dataclass(frozen=True)
class Params:
    """DT's arguments (``run_dt_atari.py:23-33``, ``run.sh``) and the project's padding switch."""

    seed: int = 123  # run.sh: 123, 231, 312
    num_steps: int = 500_000
    trajectories_per_buffer: int = 10  # a visit ends at the (this + 1)-th terminal
    num_buffers: int = 50
    row_limit: int = 100_000  # Dopamine's replay_capacity in create_dataset.py:45
    keep_padding_rows: bool = True  # as DT: Dopamine's zero rows before each episode are training steps

    def __post_init__(self) -> None:
        if not 1 <= self.num_buffers <= BUFFERS or self.num_steps < 1 or self.trajectories_per_buffer < 0 \
                or self.row_limit < 1:
            raise ValueError(f"dt_atari selection: expected 1 <= num_buffers <= {BUFFERS}, num_steps >= 1, "
                             f"trajectories_per_buffer >= 0, row_limit >= 1; got {self}")


@dataclass(frozen=True)
class Visit:
    checkpoint: int
    start: int  # first physical row read (the checkpoint's cursor)
    stop: int  # one past the last row kept; for a dropped visit, the row limit
    kept: bool  # False: the row limit came before the visit's last terminal, and its rows were discarded


def select_visits(terminals: Mapping[int, np.ndarray], params: Params) -> list[Visit]:
    """DT's visits, in order, over ``terminals[b]`` (the physical terminal flags of every loadable checkpoint b,
    at least ``row_limit`` rows each). Raises ValueError where DT's loop would never end."""
    in_range = range(BUFFERS - params.num_buffers, BUFFERS)
    ends = {b: np.flatnonzero(np.asarray(t[:params.row_limit])) for b, t in terminals.items() if b in in_range}
    if not ends:
        raise ValueError(f"dt_atari selection: no loadable checkpoint among {list(in_range)}")
    rng = np.random.RandomState(params.seed)
    cursor = np.zeros(BUFFERS, dtype=int)
    need = params.trajectories_per_buffer + 1
    visits: list[Visit] = []
    total, exhausted = 0, set()
    while total < params.num_steps:
        b = int(rng.choice(np.arange(BUFFERS - params.num_buffers, BUFFERS), 1)[0])
        if b not in ends:
            continue
        start = int(cursor[b])
        later = ends[b][np.searchsorted(ends[b], start):]
        if len(later) >= need and later[need - 1] + 1 < params.row_limit:
            stop = int(later[need - 1]) + 1
            visits.append(Visit(b, start, stop, True))
            total, cursor[b] = total + stop - start, stop
        else:
            visits.append(Visit(b, start, params.row_limit, False))
            exhausted.add(b)
            if exhausted == set(ends):
                raise ValueError(f"dt_atari selection: every checkpoint {sorted(ends)} reaches the row limit "
                                 f"{params.row_limit} after {total} of {params.num_steps} rows (DT would loop "
                                 f"forever); lower num_steps or trajectories_per_buffer")
    return visits


# ----------------------------------------------------------------------------------------------- files
def replay_logs_of(run: str | Path) -> Path:
    run = Path(run)
    logs = run if run.name == "replay_logs" else run / "replay_logs"
    if not logs.is_dir():
        raise DatasetFormatError(f"{run}: expected a DQN-Replay run folder (holding replay_logs/) or a replay_logs "
                                 f"folder, found none")
    return logs


def loadable(replay_logs: Path, index: int) -> bool:
    """Whether Dopamine's ``load`` finds every file of checkpoint ``index`` (else DT skips the draw)."""
    return all((replay_logs / checkpoint_filename(name, index)).is_file() for name in dqn_replay.NAMES.values())


def physical_rows(replay_logs: Path, index: int) -> int:
    """Rows of the checkpoint written so far, in physical order: all of them once the buffer has wrapped."""
    capacity = header(replay_logs / checkpoint_filename(dqn_replay.NAMES["observation"], index))[0][0]
    return min(capacity, int(load_small(replay_logs / checkpoint_filename("add_count", index))))


def load_terminals(replay_logs: Path, params: Params) -> dict[int, np.ndarray]:
    """Physical terminal flags of every loadable checkpoint DT may draw; each must hold ``row_limit`` rows."""
    out = {}
    for index in range(BUFFERS - params.num_buffers, BUFFERS):
        if not loadable(replay_logs, index):
            continue
        rows = physical_rows(replay_logs, index)
        if rows < params.row_limit:
            raise DatasetFormatError(f"{replay_logs / checkpoint_filename(dqn_replay.NAMES['terminal'], index)}: "
                                     f"expected at least row_limit={params.row_limit} written rows, found {rows}")
        out[index] = load_small(replay_logs / checkpoint_filename(dqn_replay.NAMES["terminal"], index))
    return out


def write_selection(run: str | Path, output: str | Path, params: Params) -> dict:
    """Select DT's rows from ``run`` and write them to ``output`` (JSON; the run path relative to it)."""
    replay_logs, output = replay_logs_of(run), Path(output)
    visits = select_visits(load_terminals(replay_logs, params), params)
    kept = [v for v in visits if v.kept]
    selection = {
        "selection": SELECTION, "reference": "kzl/decision-transformer@e2d82e68f330 atari/create_dataset.py",
        "replay_logs": os.path.relpath(replay_logs.resolve(), output.resolve().parent), "params": asdict(params),
        "rows": sum(v.stop - v.start for v in kept), "visits": [asdict(v) for v in visits],
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(selection, indent=1))
    return selection


def read_selection(path: str | Path) -> tuple[dict, Path, Params, list[Visit]]:
    path = Path(path)
    try:
        selection = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DatasetFormatError(f"{path}: expected a selection JSON written by data_pipeline.selection.dt_atari "
                                 f"({e})") from None
    if selection.get("selection") != SELECTION:
        raise DatasetFormatError(f"{path}: expected selection '{SELECTION}', found {selection.get('selection')!r}")
    replay_logs = replay_logs_of(path.resolve().parent / selection["replay_logs"])
    return selection, replay_logs, Params(**selection["params"]), [Visit(**v) for v in selection["visits"]]


# ----------------------------------------------------------------------------------------------- reader
def list_units(path: str | Path) -> list[Unit]:
    """One unit per checkpoint with kept visits (``start`` = the checkpoint index), in checkpoint order."""
    _, replay_logs, _, visits = read_selection(path)
    rows: dict[int, int] = {}
    for v in visits:
        if v.kept:
            rows[v.checkpoint] = rows.get(v.checkpoint, 0) + v.stop - v.start
    return [Unit(str(Path(path).resolve()), b, b + 1, n, b * dqn_replay.IDS_PER_CHECKPOINT)
            for b, n in sorted(rows.items())]


def leading_padding(frames: np.ndarray, actions: np.ndarray, rewards: np.ndarray, terminals: np.ndarray) -> int:
    """Leading all-zero rows (frame, action, reward, terminal), at most ``PAD_ROWS``: Dopamine's padding."""
    n = 0
    while n < min(PAD_ROWS, len(actions)) and not (frames[n].any() or actions[n] or rewards[n] or terminals[n]):
        n += 1
    return n


def trajectories(visit: Visit, terminals: np.ndarray) -> list[tuple[int, int]]:
    """Physical row ranges of a kept visit's trajectories: from its start, split after every terminal."""
    ends = np.flatnonzero(terminals[visit.start:visit.stop]) + visit.start + 1
    bounds = [visit.start, *ends.tolist()]
    return list(zip(bounds[:-1], bounds[1:]))


def read_unit(unit: Unit) -> Iterator[Episode]:
    """The episodes of one checkpoint's kept visits, in row order."""
    _, replay_logs, params, visits = read_selection(unit.path)
    index = unit.start
    small = {key: load_small(replay_logs / checkpoint_filename(dqn_replay.NAMES[key], index))
             for key in ("action", "reward", "terminal")}
    actions = small["action"].astype(np.int64)
    rewards, terminals = small["reward"].astype(np.float32), small["terminal"].astype(bool)
    observation_file = replay_logs / checkpoint_filename(dqn_replay.NAMES["observation"], index)
    source = str(Path(replay_logs.parent.parent.name) / replay_logs.parent.name / replay_logs.name
                 / observation_file.name)
    episode_id = unit.first_episode
    with NpyRowStream(observation_file, dqn_replay.BLOCK_ROWS) as stream:
        for visit in sorted((v for v in visits if v.kept and v.checkpoint == index), key=lambda v: v.start):
            for a, b in trajectories(visit, terminals):
                frames = stream.read(a, b)
                pad = leading_padding(frames, actions[a:b], rewards[a:b], terminals[a:b])
                first = 0 if params.keep_padding_rows else pad
                capped = b - a - pad == dqn_replay.MAX_EPISODE_STEPS
                yield Episode(frames[first:], actions[a + first:b], rewards[a + first:b], terminated=not capped,
                              truncated=capped, source=source, episode_id=episode_id)
                episode_id += 1


def describe(path: str | Path) -> dict:
    """The run's env spec (``dqn_replay.describe``)."""
    return dqn_replay.describe(read_selection(path)[1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="DQN-Replay run folder (e.g. Breakout/1) or its replay_logs folder")
    p.add_argument("--output", required=True, help="selection JSON to write")
    defaults = Params()
    for name in ("seed", "num_steps", "trajectories_per_buffer", "num_buffers", "row_limit"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name),
                       help=f"default {getattr(defaults, name)}")
    p.add_argument("--drop-padding-rows", action="store_true",
                   help="leave out Dopamine's zero rows before each episode (DT trains on them)")
    args = p.parse_args(argv)
    try:
        params = Params(args.seed, args.num_steps, args.trajectories_per_buffer, args.num_buffers, args.row_limit,
                        keep_padding_rows=not args.drop_padding_rows)
        selection = write_selection(args.run, args.output, params)
    except (DatasetFormatError, ValueError, OSError) as e:
        print(f"dt_atari: error: {e}", file=sys.stderr)
        return 2
    kept = [v for v in selection["visits"] if v["kept"]]
    print(f"wrote {args.output}: {selection['rows']} rows from {len(kept)} visits "
          f"({len(selection['visits']) - len(kept)} dropped at the row limit)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
