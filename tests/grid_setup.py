"""Shared by the grid tests: tiny real Hopper shards, tiny model presets and a tiny training config."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRESETS = {"t1": "n_layer: 1\nd_model: 16\nd_state: 4\nlocal_window: 2\nn_head: 2\nbackend: ref\n",
           "t2": "n_layer: 2\nd_model: 32\nd_state: 4\nlocal_window: 2\nn_head: 2\nbackend: ref\n"}


def make_workspace(root: Path) -> Path:
    """Collects 6,000 real Hopper steps (D4RL format), shards them (6 shards), writes presets and a base config.
    Point MAMBADM_CONFIGS at ``root / 'configs'`` to use the presets."""
    raw, shards = root / "raw", root / "shards"
    for cmd in ([sys.executable, "data_pipeline/collect.py", "hopper", "--output", str(raw), "--transitions", "6000"],
                [sys.executable, "data_pipeline/shard.py", "--source", "d4rl", "--input", str(raw), "--output",
                 str(shards), "--shard-transitions", "1000", "--workers", "1"]):
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    (root / "configs" / "model").mkdir(parents=True)
    for family in ("mambadm", "dt"):
        for size, text in PRESETS.items():
            (root / "configs" / "model" / f"{family}-{size}.yaml").write_text(text)
    (root / "base.yaml").write_text(
        f"data:\n  shards: {shards}\n  context_len: 5\n  batch_size: 8\n  num_workers: 0\n  rtg_scale: 1000.0\n"
        "  shuffle_buffer: 50\ntrain:\n  steps: 10\n  log_every: 5\n  val_every: 5\n  val_batches: 2\n"
        "  ckpt_every: 5\n  tensorboard: false\n  progress: false\n"
        "model:\n  d_model: 24\n")  # a base config that sets a size key: the presets must still win
    return root


def write_grid(path: Path, **fields: str) -> Path:
    """A grid YAML on the tiny workspace; `fields` replace or add top-level keys (YAML text values)."""
    keys = {"name": "tiny", "base": "base.yaml", "families": "[mambadm, dt]", "sizes": "[t1, t2]",
            "transitions": "[1500, 3000]", "seeds": "[0]", "step_rule": "equal_steps", "steps": "6",
            "eval": "{episodes: 2, actors: 1, args: ['--targets', '3600', '--no-progress']}", **fields}
    path.write_text("".join(f"{k}: {v}\n" for k, v in keys.items()))
    return path
