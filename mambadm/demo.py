"""The main job on embedded data, end to end: collect → shard → train → evaluate.

    python -m mambadm.demo [--out runs/demo] [--game breakout] [--transitions 60000] [--steps N]

Each stage runs the project's own command line, printed before it runs, so the demo doubles as a tour of the
commands a study uses on real data. Stages whose output already exists are skipped (delete ``--out`` to start over).
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

GAMES = {  # collector name -> (shard source, what the collector writes under --output, training config)
    "breakout": ("dqn-replay", "Breakout", "configs/train/breakout-demo.yaml"),
    "hopper": ("d4rl", "hopper-mixed-v2.hdf5", "configs/train/hopper-demo.yaml"),
}
REPO = Path(__file__).resolve().parents[1]


def run(cmd: list[str], what: str) -> None:
    print(f"\n=== {what}\n$ {shlex.join(cmd)}", flush=True)
    start = time.time()
    result = subprocess.run(cmd, cwd=REPO)
    if result.returncode != 0:
        sys.exit(f"demo: '{what}' failed with exit code {result.returncode} (command above)")
    print(f"=== {what}: done in {time.time() - start:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="working directory for data, shards and the run")
    parser.add_argument("--game", default="breakout", choices=sorted(GAMES))
    parser.add_argument("--transitions", type=int, default=60_000, help="environment steps to collect")
    parser.add_argument("--steps", type=int, help="training updates (default: the game's training config)")
    parser.add_argument("--episodes", type=int, default=4, help="evaluation episodes per target return")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    out = Path(args.out).resolve()
    source, collected, train_config = GAMES[args.game]
    raw, shards, run_dir = out / "raw", out / "shards", out / "run"
    py = sys.executable

    if not (raw / ".complete").exists():
        run([py, "data_pipeline/collect.py", args.game, "--output", str(raw),
             "--transitions", str(args.transitions), "--seed", str(args.seed)],
            f"collect {args.transitions} real {args.game} steps in the {source} format")
        (raw / ".complete").touch()
    if not (shards / "index.json").exists():
        run([py, "data_pipeline/shard.py", "--source", source, "--input", str(raw / collected), "--output", str(shards),
             "--workers", "2"], "shard into WebDataset tars")
    if not (run_dir / "export" / "model.pt").exists():
        steps = [] if args.steps is None else [f"train.steps={args.steps}"]
        run([py, "-m", "mambadm.train", train_config, f"data.shards={shards}", f"train.run_dir={run_dir}", *steps,
             f"train.seed={args.seed}"], "train MambaDM")
    run([py, "-m", "evaluation.evaluate", "--checkpoint", str(run_dir / "export"), "--episodes", str(args.episodes),
         "--actors", "2", "--output", str(out / "results.json")], "evaluate in the real environment with Ray")
    print(f"\nDone. Results: {out / 'results.json'}; training metrics: {run_dir / 'metrics.jsonl'}; "
          f"TensorBoard: tensorboard --logdir {run_dir}")


if __name__ == "__main__":
    main()
