"""The trainer's boundary cadences: which finished steps log, validate and checkpoint."""
from __future__ import annotations

import pytest

from mambadm.config import TrainConfig
from mambadm.train import boundary_at


def steps_where(kind: str, **intervals) -> list[int]:
    cfg = TrainConfig(**intervals)
    return [step for step in range(1, cfg.steps + 1) if getattr(boundary_at(step, cfg), kind)]


def test_each_cadence_and_the_final_step():
    intervals = dict(steps=47, log_every=5, val_every=20, ckpt_every=30)
    assert steps_where("checkpoint", **intervals) == [30, 47]
    assert steps_where("validate", **intervals) == [20, 30, 40, 47]
    assert steps_where("log", **intervals) == [5, 10, 15, 20, 25, 30, 35, 40, 45, 47]


def test_validation_and_checkpoints_off_the_log_grid_still_log():
    intervals = dict(steps=30, log_every=4, val_every=7, ckpt_every=10)
    assert steps_where("checkpoint", **intervals) == [10, 20, 30]
    assert steps_where("validate", **intervals) == [7, 10, 14, 20, 21, 28, 30]
    assert steps_where("log", **intervals) == [4, 7, 8, 10, 12, 14, 16, 20, 21, 24, 28, 30]


@pytest.mark.parametrize("steps", [1, 10, 11])
def test_the_last_step_checkpoints_once_whatever_the_intervals(steps):
    intervals = dict(steps=steps, log_every=100, val_every=100, ckpt_every=10)
    expected = sorted({s for s in range(10, steps + 1, 10)} | {steps})
    for kind in ("checkpoint", "validate", "log"):
        assert steps_where(kind, **intervals) == expected, kind
