"""Convert a dataset into WebDataset shards + ``index.json`` (contract: docs/architecture.md, "Shards").

    python data_pipeline/shard.py --source {dqn-replay,d4rl,minari} --input PATH --output DIR [--workers N]
        [--shard-transitions 10000] [--zstd-level 1] [--verify]
    python data_pipeline/shard.py --output DIR --verify      # only re-check every shard of an existing index

One sample per episode, each step stored once, arrays compressed with zstd (format version 2). Units of the input
(checkpoints, blocks of episodes) are sharded in parallel, each into its own tars and a done record; ``index.json``
is written last, atomically, from the records. A rerun skips units whose shards verify and redoes the rest, so a
killed run resumes. A failure exits non-zero with the reader's message and leaves no index.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm  # noqa: E402

from data_pipeline.atomic import atomic_write_json  # noqa: E402
from data_pipeline.episode_sample import FORMAT_VERSION, ZSTD_LEVEL, check_shard  # noqa: E402
from data_pipeline.errors import DatasetFormatError  # noqa: E402
from data_pipeline.running_stats import RunningStats  # noqa: E402
from data_pipeline.shard_unit import UnitJob, sha256_file, shard_unit  # noqa: E402
from data_pipeline.sources import READERS, get_reader  # noqa: E402

FRAME_STACK = 4  # Atari frames stacked at load time
_counter = None  # per-worker shared progress counter


def _init_worker(counter) -> None:
    global _counter
    _counter = counter


def _progress(n: int) -> None:
    with _counter.get_lock():
        _counter.value += n


def _run_job(job: UnitJob) -> dict:
    return shard_unit(job, _progress)


def run_jobs(jobs: list[UnitJob], workers: int, total: int | None) -> list[dict]:
    """Shard every unit (in-process for one worker, else a spawn pool); records in unit order."""
    bar = tqdm(total=total, unit="transition", unit_scale=True, desc="shard", smoothing=0.1)
    try:
        if workers <= 1:
            return [shard_unit(job, bar.update) for job in jobs]
        ctx = mp.get_context("spawn")
        counter = ctx.Value("q", 0)
        with ctx.Pool(workers, initializer=_init_worker, initargs=(counter,)) as pool:
            pending = [pool.apply_async(_run_job, (job,)) for job in jobs]
            while unfinished := [r for r in pending if not r.ready()]:
                for r in pending:  # surface the first failure at once
                    if r.ready() and not r.successful():
                        r.get()
                unfinished[0].wait(0.2)  # returns as soon as that unit is done: no idle tail after the last one
                bar.update(counter.value - bar.n)
            records = [r.get() for r in pending]
            bar.update(counter.value - bar.n)
            return records
    finally:
        bar.close()


def build_index(desc: dict, source: str, zstd_level: int, records: list[dict], command: str) -> dict:
    returns, states = RunningStats(), None
    for r in records:
        returns.merge(RunningStats.from_dict(r["returns"]))
        if r["states"] is not None:
            states = states or RunningStats()
            states.merge(RunningStats.from_dict(r["states"]))
    shards = [s for r in records for s in r["shards"]]
    atari = desc["kind"] == "atari"
    max_length = max(r["max_length"] for r in records)
    return {
        "format_version": FORMAT_VERSION,
        "source": source,
        "env": desc["env"],
        "eval_env": desc["eval_env"],
        "env_spec": {"obs_kind": "atari" if atari else "vector",
                     "obs_shape": [FRAME_STACK, 84, 84] if atari else list(desc["obs_shape"]),
                     "act_dim": int(desc["act_dim"]), "discrete": bool(desc["discrete"]),
                     "max_timestep": int(math.ceil(max_length / 100) * 100)},
        "encoding": {"sample": "episode", "codec": "zstd", "zstd_level": zstd_level},
        "totals": {"episodes": sum(r["episodes"] for r in records),
                   "transitions": sum(r["transitions"] for r in records),
                   "samples": sum(r["samples"] for r in records), "bytes": sum(s["bytes"] for s in shards),
                   "max_episode_length": max_length},
        "shards": shards,
        "returns": {"mean": float(returns.mean), "std": float(returns.std), "min": float(returns.min),
                    "max": float(returns.max)},
        "state_mean": states.mean.tolist() if states is not None else None,
        "state_std": states.std.tolist() if states is not None else None,
        "command": command,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def verify(output: Path) -> list[str]:
    """Names (with the reason) of every shard in ``output/index.json`` whose size or sha256 does not match or whose
    samples do not decode to whole episodes."""
    index = json.loads((output / "index.json").read_text())
    if index.get("format_version") != FORMAT_VERSION:
        return [f"{output / 'index.json'}: format_version {index.get('format_version')}, this version writes and "
                f"reads {FORMAT_VERSION}: re-shard with python data_pipeline/shard.py --source "
                f"{index.get('source', 'SOURCE')} --input INPUT --output {output} (it was made by: "
                f"{index.get('command')})"]
    bad = []
    for shard in tqdm(index["shards"], desc="verify", unit="shard"):
        path = output / shard["name"]
        if not path.exists():
            bad.append(f"{path}: missing")
        elif path.stat().st_size != shard["bytes"]:
            bad.append(f"{path}: expected {shard['bytes']} bytes, found {path.stat().st_size}")
        elif sha256_file(path) != shard["sha256"]:
            bad.append(f"{path}: sha256 does not match index.json")
        else:
            bad += check_shard(path)
    return bad


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", choices=sorted(READERS), help="input format")
    p.add_argument("--input", help="dataset file or folder")
    p.add_argument("--output", required=True, help="folder for the shards and index.json")
    p.add_argument("--workers", type=int, default=1, help="processes sharding units in parallel")
    p.add_argument("--shard-transitions", type=int, default=10_000,
                   help="steps per shard (a shard ends at the first episode end past this many)")
    p.add_argument("--zstd-level", type=int, default=ZSTD_LEVEL, help="zstd level of the array members")
    p.add_argument("--verify", action="store_true",
                   help="re-check every shard's sha256 and decode its samples (alone: only that)")
    args = p.parse_args(argv)
    if args.input is None and not args.verify:
        p.error("--source and --input are required unless only --verify is asked for")
    if args.input is not None and args.source is None:
        p.error("--input needs --source")
    if args.workers < 1 or args.shard_transitions < 1:
        p.error("--workers and --shard-transitions must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    output = Path(args.output)
    if args.input is not None:
        command = shlex.join(["python", "data_pipeline/shard.py", *(sys.argv[1:] if argv is None else argv)])
        (output / "index.json").unlink(missing_ok=True)  # nothing looks complete until this run is
        try:
            reader = get_reader(args.source)
            desc = reader.describe(args.input)
            units = reader.list_units(args.input)
            if not units:
                raise DatasetFormatError(f"{args.input}: expected at least one episode, found an empty dataset")
            atari = desc["kind"] == "atari"
            output.mkdir(parents=True, exist_ok=True)
            jobs = [UnitJob(args.source, u, i, str(output), args.zstd_level, args.shard_transitions, not atari)
                    for i, u in enumerate(units)]
            sizes = [getattr(u, "transitions", 0) for u in units]
            if args.workers > len(jobs):
                print(f"shard.py: note: {len(jobs)} input unit(s) for --workers {args.workers}: units are sharded one "
                      f"per worker, so {args.workers - len(jobs)} worker(s) will have nothing to do", file=sys.stderr)
            started = time.perf_counter()
            records = run_jobs(jobs, args.workers, sum(sizes) if all(sizes) else None)
            sharding_seconds = time.perf_counter() - started
        except (DatasetFormatError, OSError) as e:
            print(f"shard.py: error: {e}", file=sys.stderr)
            return 2
        index = build_index(desc, args.source, args.zstd_level, records, command)
        atomic_write_json(output / "index.json", index, indent=1)
        t = index["totals"]
        print(f"wrote {len(index['shards'])} shards ({t['samples']} samples, {t['transitions']} transitions, "
              f"{t['episodes']} episodes, {t['bytes'] / 1e6:.1f} MB) from {len(jobs)} units in "
              f"{sharding_seconds:.3f} s of sharding with {args.workers} worker(s), and {output / 'index.json'}")
    if args.verify:
        if not (output / "index.json").exists():
            print(f"shard.py: error: {output / 'index.json'} not found: nothing to verify", file=sys.stderr)
            return 2
        bad = verify(output)
        if bad:
            print("shard.py: error: bad shards:\n  " + "\n  ".join(bad), file=sys.stderr)
            return 1
        print(f"verified every shard listed in {output / 'index.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
