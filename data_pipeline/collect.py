"""Collect a small dataset in a real format from a real environment.

    python data_pipeline/collect.py {breakout,pong,hopper,halfcheetah,walker2d} --output DIR [--transitions N --seed S]

Atari games are written in the DQN-Replay layout, MuJoCo tasks as a D4RL HDF5 file.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline.sources.mujoco_tasks import TASKS as MUJOCO  # noqa: E402

ATARI = {"breakout": "Breakout", "pong": "Pong"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("env", choices=sorted([*ATARI, *MUJOCO]))
    parser.add_argument("--output", required=True, help="folder to write the dataset into")
    parser.add_argument("--transitions", type=int, default=100_000, help="environment steps to collect")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.transitions <= 0:
        parser.error("--transitions must be positive")
    try:
        if args.env in ATARI:
            from data_pipeline.collect_atari import collect_atari
            path = collect_atari(ATARI[args.env], args.output, args.transitions, args.seed)
        else:
            from data_pipeline.collect_mujoco import collect_mujoco
            path = collect_mujoco(args.env, args.output, args.transitions, args.seed)
    except FileExistsError as e:
        parser.error(str(e))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
