"""Atomic training checkpoints: ``RUN/checkpoints/step-XXXXXXXX`` (never a ``tmp-*`` directory).

A checkpoint is written by ``accelerator.save_state`` into ``tmp-step-XXXXXXXX`` (every rank writes its part),
then the main process adds ``trainer_state.json`` and ``config.yaml``, syncs them to disk and renames the directory
to ``step-XXXXXXXX``. A ``step-*`` directory therefore always holds a complete checkpoint; a kill at any moment
leaves at worst a ``tmp-*`` directory, which is ignored and later removed.
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from data_pipeline.atomic import atomic_write_json, atomic_write_text, replace_dir

STEP_RE = re.compile(r"^step-(\d{8})$")
STATE_FILE = "trainer_state.json"


@dataclass
class TrainerState:
    step: int = 0  # optimizer updates done
    samples_seen: int = 0  # windows, all ranks
    transitions_seen: int = 0  # unpadded timesteps, all ranks
    tokens_seen: int = 0  # 3 tokens (return-to-go, state, action) per transition
    best_val: Optional[float] = None
    best_step: Optional[int] = None
    last_val: Optional[float] = None  # validation loss measured at this checkpoint's step

    @classmethod
    def load(cls, ckpt: Path) -> "TrainerState":
        return cls(**json.loads((ckpt / STATE_FILE).read_text()))


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir(run_dir: str | Path, step: int) -> Path:
    return checkpoints_dir(run_dir) / f"step-{step:08d}"


def tmp_dir(run_dir: str | Path, step: int) -> Path:
    return checkpoints_dir(run_dir) / f"tmp-step-{step:08d}"


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (``step-*`` with a trainer state; ``tmp-*`` never counts)."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_RE.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(STEP_RE.match(p.name).group(1)))


def resolve_resume(run_dir: str | Path, resume: str) -> Optional[Path]:
    """The checkpoint to continue from: ``auto`` = the latest complete one (or None), ``never`` = None, else a
    path that must be a complete checkpoint."""
    if resume == "never":
        return None
    if resume == "auto":
        done = complete_checkpoints(run_dir)
        return done[-1] if done else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file() or not STEP_RE.match(path.name):
        raise FileNotFoundError(f"train.resume={resume}: not a complete checkpoint (expected a step-XXXXXXXX "
                                f"directory with {STATE_FILE})")
    return path


def save_checkpoint(accelerator: Any, run_dir: str | Path, state: TrainerState, config_yaml: str) -> Path:
    """Collective: every rank must call it. Returns the final ``step-*`` path."""
    tmp, final = tmp_dir(run_dir, state.step), step_dir(run_dir, state.step)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(tmp / STATE_FILE, asdict(state))
        atomic_write_text(tmp / "config.yaml", config_yaml)
        replace_dir(tmp, final)  # over the same step saved before (a rerun after a kill right after the rename)
    accelerator.wait_for_everyone()
    return final


def prune(run_dir: str | Path, keep_last: int, best_step: Optional[int]) -> None:
    """Keeps the last ``keep_last`` complete checkpoints and the best one; removes stale ``tmp-*`` dirs."""
    done = complete_checkpoints(run_dir)
    keep = set(done[-keep_last:]) if keep_last > 0 else set()
    if best_step is not None:
        keep.add(step_dir(run_dir, best_step))
    for path in done:
        if path not in keep:
            shutil.rmtree(path, ignore_errors=True)
    for path in checkpoints_dir(run_dir).glob("tmp-*"):
        shutil.rmtree(path, ignore_errors=True)
