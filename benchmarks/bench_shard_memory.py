"""Peak memory of sharding one DQN-Replay observation checkpoint of 1,000,000 rows vs one of 100,000 rows.

    python benchmarks/bench_shard_memory.py [--sizes 100000 1000000] [--source-steps 100000] [--work DIR]

A real DQN-Replay checkpoint holds 1,000,000 rows (7 GB of frames). Collecting that many frames from the emulator
takes too long on a small machine, so the checkpoints are built from real collected play: Breakout is collected
by the project's collector (``--source-steps`` agent steps), its terminated episodes are read back by the
DQN-Replay reader and added, in a cycle, to the project's Dopamine writer (``LoggedReplayBuffer``, padding and all)
until it logs its first checkpoint, of ``size - 1`` rows, exactly as batch_rl logs a full buffer. The writer's
observation store is file-backed (``np.memmap`` in ``--work``) so that this script does not itself hold 7 GB;
the checkpoint files are the same. Each checkpoint is then sharded by ``shard.py`` (defaults, ``--workers 1``) in
a subprocess whose own peak RSS (VmHWM) is reported, with the frames/s of its sharding phase. Everything written
is deleted at the end unless ``--work`` is given (then only the shards are deleted). Needs about 7 GB of free
disk per million rows (the file-backed store, deleted once the checkpoint is written; the checkpoint itself is
~75 MB, its shards ~40 MB).
"""
from __future__ import annotations

import argparse
import itertools
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_shard import collected_atari, shard_run  # noqa: E402
from data_pipeline.formats.dopamine import LoggedReplayBuffer  # noqa: E402
from data_pipeline.sources import dqn_replay  # noqa: E402


def real_episodes(work: Path, steps: int) -> list:
    """Terminated episodes of ``steps`` agent steps of real Breakout play (collected once into ``work``, in one
    checkpoint: the input bench_shard.py shards)."""
    units = dqn_replay.list_units(collected_atari(work, steps, steps + 10_000))
    return [ep for u in units for ep in dqn_replay.read_unit(u) if ep.terminated]


def tiled_checkpoint(work: Path, size: int, episodes: list) -> tuple[Path, int]:
    """A Dopamine checkpoint of ``size - 1`` rows holding the episodes in a cycle; its folder and agent steps."""
    logs = work / f"tiled-{size}" / "Breakout" / "1" / "replay_logs"
    if (logs.parent / ".complete").exists():
        return logs.parents[1], int((logs.parent / ".complete").read_text())
    shutil.rmtree(logs.parents[1], ignore_errors=True)
    buffer = LoggedReplayBuffer(logs, size)
    store = work / f"store-{size}.npy"
    buffer.store["observation"] = np.lib.format.open_memmap(store, mode="w+", dtype=np.uint8,
                                                            shape=(size, 84, 84))
    steps = 0
    for ep in itertools.cycle(episodes):
        # stop before an add that would step past the first log point (it logs when the cursor is size - 1)
        if int(buffer.add_count) + buffer.stack_size - 1 + len(ep) > size - 1:
            break
        for t in range(len(ep)):
            buffer.add(ep.observations[t], int(ep.actions[t]), float(ep.rewards[t]), t == len(ep) - 1)
        steps += len(ep)
    # the first rows of the episode that did not fit complete the buffer: cut by the log, as in batch_rl
    for t in range(size - 1 - int(buffer.add_count) - (buffer.stack_size - 1)):
        buffer.add(ep.observations[t], int(ep.actions[t]), float(ep.rewards[t]), False)
        steps += 1
    if buffer.log_count != 1:
        raise RuntimeError(f"expected one logged checkpoint of {size - 1} rows, the writer logged {buffer.log_count}")
    del buffer
    store.unlink()
    (logs.parent / ".complete").write_text(str(steps))
    return logs.parents[1], steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000], help="checkpoint capacities")
    p.add_argument("--source-steps", type=int, default=100_000, help="real Breakout steps collected and tiled")
    p.add_argument("--work", default=None, help="scratch folder kept between runs (default: a temporary one)")
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_shard_memory_"))
    work.mkdir(parents=True, exist_ok=True)
    episodes = real_episodes(work, args.source_steps)
    print(f"{len(episodes)} terminated real episodes, {sum(len(e) for e in episodes):,} frames, tiled into:")
    lines = []
    for size in args.sizes:
        start = time.perf_counter()
        root, steps = tiled_checkpoint(work, size, episodes)
        built = time.perf_counter() - start
        gz = sorted(root.rglob("*.gz"))
        obs = next(p for p in gz if "observation" in p.name)
        out = work / "out"
        run = shard_run("dqn-replay", root, out, 1)
        shutil.rmtree(out)
        lines.append(f"| {size - 1:,} | {steps:,} | {obs.stat().st_size / 1e6:.0f} | {(size - 1) * 84 * 84 / 1e9:.2f} "
                     f"| {run['bytes'] / 1e6:.1f} | {run['wall']:.1f} | {steps / run['sharding']:,.0f} | "
                     f"{run['rss']:.0f} |")
        print(f"  checkpoint of {size - 1:,} rows built in {built:.0f} s, sharded in {run['wall']:.1f} s", flush=True)
    print("\n| checkpoint rows | agent steps | observation .gz MB | frames GB (uncompressed) | shards MB | shard.py "
          "wall s | steps/s (sharding phase) | shard.py peak RSS MiB |\n|---|---|---|---|---|---|---|---|")
    print("\n".join(lines))
    if not args.work:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
