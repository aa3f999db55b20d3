"""Kill -9 in the middle of a run, rerun with resume=auto: it continues at the saved step and ends with the same
weights as an uninterrupted run with the same seed; a tmp checkpoint is never loaded."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import torch

from tests.real_shards import ENV, REPO, metrics, real_shards, run_train, train_cmd

pytestmark = pytest.mark.slow
ARGS = ("train.steps=40", "train.ckpt_every=10", "train.val_every=10", "train.keep_last=1", "data.num_workers=1",
        "data.val_shards=1", "train.val_batches=3")


@pytest.fixture(scope="module")
def hopper(tmp_path_factory):
    return real_shards(tmp_path_factory.getbasetemp(), "hopper", 3000, 300)


def test_kill_and_resume_matches_an_uninterrupted_run(hopper, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_train(train_cmd(hopper, straight, *ARGS))

    proc = subprocess.Popen(train_cmd(hopper, killed, *ARGS), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while not (killed / "checkpoints" / "step-00000010").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # at once: with the CPU kernels the 30 remaining steps take about a second
    proc.wait()
    assert not (killed / "export").exists()
    # a stale tmp checkpoint from a later step must never be loaded
    fake = killed / "checkpoints" / "tmp-step-99999999"
    fake.mkdir(parents=True, exist_ok=True)
    (fake / "trainer_state.json").write_text(json.dumps({"step": 99999999}))

    result = run_train(train_cmd(hopper, killed, *ARGS))
    assert "resumed from" in result.stdout and "step-00000099" not in result.stdout
    steps = [r["step"] for r in metrics(killed)]
    assert steps == sorted(set(steps)) and steps[-1] == 40  # no duplicated rows from the killed run
    a = torch.load(straight / "export" / "model.pt", weights_only=True)
    b = torch.load(killed / "export" / "model.pt", weights_only=True)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7, msg=key)
    assert not list((killed / "checkpoints").glob("tmp-*"))
    kept = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert "step-00000040" in kept and len(kept) <= 2  # keep_last=1 plus the best


def test_compiled_training_matches_eager(hopper, tmp_path):
    """train.compile=true compiles the model in place: same losses as eager (to compiler rounding), loadable export."""
    from mambadm.export import load_export

    runs = {}
    for compiled in (False, True):
        runs[compiled] = tmp_path / f"compile-{compiled}"
        result = run_train(train_cmd(hopper, runs[compiled], "train.steps=10", "train.val_every=10",
                                     "train.ckpt_every=10", "model.dropout=0.0", f"train.compile={str(compiled).lower()}"),
                           timeout=600)
        assert ("the model is compiled with torch.compile" in result.stdout) == compiled
    losses = {c: [r["loss"] for r in metrics(run) if r.get("loss") is not None] for c, run in runs.items()}
    assert len(losses[True]) == len(losses[False]) >= 2
    for eager, compiled in zip(losses[False], losses[True]):
        assert abs(eager - compiled) <= 1e-3 * max(1.0, abs(eager)), (losses[False], losses[True])
    model, *_ = load_export(runs[True] / "export")
    assert not any(key.startswith("_orig_mod") for key in model.state_dict())


def test_bf16_autocast_on_cpu(hopper, tmp_path):
    """train.mixed_precision=bf16 on a CPU: bf16 autocast (up to 1.5x faster steps where the CPU has AMX,
    benchmarks/RESULTS.md); losses near the float32 run's but not equal to them, parameters float32 in the export."""
    from mambadm.export import load_export

    runs, outputs = {}, {}
    for precision in ("no", "bf16"):
        runs[precision] = tmp_path / precision
        outputs[precision] = run_train(train_cmd(hopper, runs[precision], "train.steps=10", "train.val_every=10",
                                                 "train.ckpt_every=10", "model.dropout=0.0",
                                                 f"train.mixed_precision={precision}")).stdout
        assert f"precision {precision}" in outputs[precision]
    losses = {p: [r["loss"] for r in metrics(run) if r.get("loss") is not None] for p, run in runs.items()}
    assert len(losses["bf16"]) == len(losses["no"]) >= 2
    assert losses["bf16"] != losses["no"]  # autocast really ran
    for full, low in zip(losses["no"], losses["bf16"]):
        assert abs(full - low) <= 5e-2 * max(1.0, abs(full)), (losses["no"], losses["bf16"])
    model, *_ = load_export(runs["bf16"] / "export")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
