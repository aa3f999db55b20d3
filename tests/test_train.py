"""Learning: a small MambaDM trained on collected Breakout data (DQN-Replay format) lowers its validation loss."""
from __future__ import annotations

import sys

import pytest

from tests.real_shards import metrics, real_shards, run_train

pytestmark = pytest.mark.slow


def test_breakout_demo_validation_loss_falls(tmp_path_factory):
    shards = real_shards(tmp_path_factory.getbasetemp(), "breakout", 4000, 500)
    run = tmp_path_factory.mktemp("breakout-run")
    run_train([sys.executable, "-m", "mambadm.train", "configs/train/breakout-demo.yaml", f"data.shards={shards}",
               f"train.run_dir={run}", "train.steps=60", "train.val_every=20", "train.ckpt_every=60",
               "train.val_batches=8", "data.num_workers=1", "train.progress=false",
               # half the demo's peak lr: 60 steps on 4,000 transitions at 6e-4 end on a rise of the held-out loss
               "optim.lr=3e-4"], timeout=600)
    val = [r["val_loss"] for r in metrics(run) if r["val_loss"] is not None]
    assert len(val) == 4 and val[-1] < val[0] - 0.05, val
    assert (run / "export" / "model.pt").is_file()
