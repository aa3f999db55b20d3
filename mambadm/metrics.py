"""Training metrics on the main process: ``RUN/metrics.jsonl`` rows, TensorBoard scalars, a tqdm bar."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

from tqdm import tqdm

from data_pipeline.atomic import atomic_write_text

ROW_KEYS = ("step", "loss", "val_loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "params",
            "tokens_seen", "transitions_seen", "samples_seen", "flops")


def truncate_after(path: Path, step: int) -> None:
    """Drops rows logged after ``step`` (by a run killed after its last checkpoint), atomically."""
    if not path.is_file():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in rows if json.loads(line).get("step", 0) <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


class MetricsLogger:
    """Writes on the main process only; every other rank gets a logger whose calls do nothing."""

    def __init__(self, accelerator: Any, run_dir: Path, start_step: int, total_steps: int, show_bar: bool):
        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        self.path = Path(run_dir) / "metrics.jsonl"
        self.bar: Optional[tqdm] = None
        if self.main:
            truncate_after(self.path, start_step)
            self.file = open(self.path, "a")
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                            disable=not show_bar, dynamic_ncols=True)

    def log(self, row: dict) -> None:
        if not self.main:
            return
        row = {**{k: None for k in ROW_KEYS}, **row}
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()
        scalars = {k: v for k, v in clean.items() if k != "step" and isinstance(v, (int, float))}
        self.accelerator.log(scalars, step=row["step"])

    def progress(self, step: int, loss: float, samples_per_s: float, tokens_per_s: float) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{samples_per_s:.0f}", tokens_s=f"{tokens_per_s:.0f}")

    def close(self) -> None:
        if self.main:
            self.bar.close()
            self.file.close()
