"""Test helpers: real data collected from real environments, sharded by the real shard.py, built once per session."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def real_shards(base: Path, env: str, transitions: int, shard_transitions: int) -> Path:
    """``base/<env>-shards``: ``collect.py`` then ``shard.py`` (skipped when the index already exists)."""
    out = base / f"{env}-{transitions}-shards"
    if (out / "index.json").exists():
        return out
    raw = base / f"{env}-{transitions}-raw"
    subprocess.run([sys.executable, "data_pipeline/collect.py", env, "--output", str(raw), "--transitions",
                    str(transitions), "--seed", "0"], cwd=REPO, env=ENV, check=True, capture_output=True)
    source, src = ("d4rl", raw) if env in ("hopper", "halfcheetah", "walker2d") else \
        ("dqn-replay", next(p for p in raw.iterdir() if p.is_dir()))
    subprocess.run([sys.executable, "data_pipeline/shard.py", "--source", source, "--input", str(src), "--output",
                    str(out), "--shard-transitions", str(shard_transitions)], cwd=REPO, env=ENV, check=True,
                   capture_output=True)
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TINY = ["model.family=mambadm", "model.n_layer=1", "model.d_model=32", "model.dropout=0.1", "data.context_len=10",
        "data.batch_size=16", "data.num_workers=0", "data.rtg_scale=1000", "data.shuffle_buffer=64",
        "optim.warmup_steps=5", "optim.lr=3e-3", "train.progress=false", "train.log_every=5"]


def train_cmd(shards: Path, run_dir: Path, *overrides: str, launch: list[str] | None = None) -> list[str]:
    """``accelerate launch [launch args] -m mambadm.train`` (or ``python -m`` when launch is None), tiny model."""
    head = [sys.executable, "-m", "mambadm.train"] if launch is None else \
        [str(Path(sys.executable).parent / "accelerate"), "launch", *launch, "-m", "mambadm.train"]
    return [*head, "configs/train/hopper-demo.yaml", f"data.shards={shards}", f"train.run_dir={run_dir}", *TINY,
            *overrides]


def run_train(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


def metrics(run_dir: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def rank_records(run_dir: Path) -> list[dict]:
    import json

    return [json.loads(p.read_text()) for p in sorted((run_dir / "ranks").glob("rank-*.json"))]
