"""benchmarks/bench_activation_memory.py: the saved-for-backward bytes it measures with the Triton kernels' launches
skipped equal those of the kernels running (Triton's interpreter), they are linear in the batch as its fit assumes,
a checkpointed step keeps exactly the blocks' inputs, the models keep the dtypes CUDA autocast would give them and
DT's attention the flash kernel's saves, and its predictions and CLI hold together."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_activation_memory as am  # noqa: E402

from mambadm.ssm import conv_triton, scan_triton  # noqa: E402

K = 4  # steps per sample: 12 tokens, enough for several chunks of the scan


def measured(label: str, batch: int, skip: bool, grad_checkpoint: bool = False) -> dict[str, int]:
    family, kernel, fused = am.VARIANTS[label]
    with am.triton_setting(kernel, fused):
        model = am.build(family, "xs", grad_checkpoint)
        with torch.no_grad():  # real weights for the running kernels (build leaves zeros)
            for p in model.parameters():
                p.normal_(0, 0.1)
        if not skip:
            return am.saved_bytes(model, batch, K)
        with am.kernel_launches_skipped():
            return am.saved_bytes(model, batch, K)


@pytest.mark.parametrize("label", ["mambadm serial", "mambadm chunked", "mambadm chunked + fused conv"])
def test_skipped_launches_save_what_running_kernels_save(label):
    running = measured(label, 2, skip=False)
    assert set(running) == {am.OUTSIDE, "block 0", "block 1"}  # xs: two blocks
    assert all(nbytes > 0 for nbytes in running.values())
    assert measured(label, 2, skip=True) == running


@pytest.mark.parametrize("interpret", [None, "0"])
def test_settings_kernels_and_environment_restored(interpret, monkeypatch):
    if interpret is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
    before = scan_triton.LAUNCH["kernel"], conv_triton.FUSED["conv"], scan_triton._kernels, conv_triton._kernels
    with am.triton_setting("chunked", True), am.kernel_launches_skipped():
        assert scan_triton.LAUNCH["kernel"] == "chunked" and conv_triton.FUSED["conv"] is True
        assert scan_triton._kernels is not before[2] and conv_triton._kernels is not before[3]
        assert os.environ["TRITON_INTERPRET"] == "1"
    assert (scan_triton.LAUNCH["kernel"], conv_triton.FUSED["conv"], scan_triton._kernels,
            conv_triton._kernels) == before
    assert os.environ.get("TRITON_INTERPRET") == interpret


@pytest.mark.parametrize("label", ["dt", "mambadm chunked"])
def test_saved_bytes_are_linear_in_the_batch(label):
    fit = am.linear_fit(measured(label, 1, skip=True), measured(label, 2, skip=True))
    at_five = measured(label, 5, skip=True)
    assert set(at_five) == set(fit)
    for name, (fixed, per_sample) in fit.items():
        assert per_sample > 0, name
        assert at_five[name] == fixed + 5 * per_sample, name


@pytest.mark.parametrize("label", ["dt", "mambadm chunked"])
def test_a_checkpointed_step_keeps_the_block_inputs(label):
    family, kernel, fused = am.VARIANTS[label]
    with am.triton_setting(kernel, fused), am.kernel_launches_skipped():
        model = am.build(family, "xs", grad_checkpoint=False)
        inputs = []
        handles = [layer.register_forward_pre_hook(lambda m, args: inputs.append(args[0].nbytes))
                   for layer in model.layers]
        plain = am.saved_bytes(model, 3, K)
        for h in handles:
            h.remove()
    checkpointed = measured(label, 3, skip=True, grad_checkpoint=True)
    assert set(checkpointed) == {am.OUTSIDE}  # nothing inside a block is kept
    assert len(inputs) == len(model.layers)
    assert checkpointed[am.OUTSIDE] == plain[am.OUTSIDE] + sum(inputs)


def test_predictions_and_the_table(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert am.main(["--sizes", "xs", "--k", str(K), "--batches", "8", "64", "--memory-gib", "0.01",
                    "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["variant"] for r in rows] == list(am.VARIANTS)
    printed = capsys.readouterr().out
    for row in rows:
        assert row["size"] == "xs" and row["params"] > 0
        row["plain"] = {k: tuple(v) for k, v in row["plain"].items()}
        row["checkpointed"] = {k: tuple(v) for k, v in row["checkpointed"].items()}
        plain = [am.predicted_bytes(row, b, False) for b in (1, 8, 64)]
        ckpt = [am.predicted_bytes(row, b, True) for b in (1, 8, 64)]
        assert plain == sorted(plain) and ckpt == sorted(ckpt)
        assert ckpt[2] < plain[2]  # xs keeps less with checkpointing at batch 64
        assert plain[0] >= am.STATIC_BYTES_PER_PARAM * row["params"]
        budget = 0.01 * 2**30
        for checkpointed in (False, True):
            batch = am.largest_fitting_batch(row, checkpointed, budget)
            assert batch >= 1 and am.predicted_bytes(row, batch, checkpointed) <= budget
            assert am.predicted_bytes(row, 2 * batch, checkpointed) > budget
        assert f"| xs | {row['variant']} | " in printed


@pytest.mark.parametrize("args, named", [
    (["--json", "{tmp}/missing/rows.json"], "missing"),
    (["--sizes", "2b"], "2b"),
    (["--k", "0"], "--k"),
    (["--batches", "64", "0"], "--batches"),
])
def test_refuses_bad_arguments_naming_them(args, named, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        am.main(["--sizes", "xs"] + [a.format(tmp=tmp_path) for a in args])
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err


def test_nothing_outlives_a_measurement():
    """The graph's nodes hold the pack hook: a measurement must not keep the model's tensors alive (at 1B, each
    leaked forward would hold gigabytes)."""
    import gc
    import weakref

    with am.triton_setting("chunked", False), am.kernel_launches_skipped():
        model = am.build("mambadm", "xs", grad_checkpoint=False)
        weight = weakref.ref(next(model.parameters()))
        assert am.saved_bytes(model, 2, K)
    del model
    gc.collect()
    assert weight() is None


class _OpLog(TorchDispatchMode):
    """Records each aten op with the floating dtypes of its tensor arguments."""

    def __init__(self):
        super().__init__()
        self.calls: set[tuple[str, frozenset]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        dtypes = frozenset(t.dtype for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point())
        self.calls.add((func.overloadpacket.__name__, dtypes))
        return func(*args, **kwargs)


@pytest.mark.parametrize("label", list(am.VARIANTS))
def test_the_cpu_forward_keeps_the_dtypes_and_attention_of_a_gpu(label):
    """No op that CUDA autocast would run in float32 gets a bfloat16 input under CPU autocast (so both save the same
    dtypes); DT's attention is the flash kernel (no (L x L) matrix saved), as on a GPU."""
    family, kernel, fused = am.VARIANTS[label]
    log = _OpLog()
    with am.triton_setting(kernel, fused), am.kernel_launches_skipped():
        model = am.build(family, "xs", grad_checkpoint=False)
        with torch.autocast("cpu", dtype=torch.bfloat16), log:
            model.loss(am.atari_batch(2, K, device="cpu"))
    ops = {name for name, _ in log.calls}
    assert "native_layer_norm" in ops and "_log_softmax" in ops  # the list's names are those the mode sees
    upcast = sorted(name for name, dtypes in log.calls if name in am.CUDA_FLOAT32 and torch.bfloat16 in dtypes)
    assert upcast == [], f"{label}: CUDA autocast would run these in float32: {upcast}"
    if family == "dt":
        assert "_scaled_dot_product_flash_attention_for_cpu" in ops
        assert "bmm" not in ops and "_safe_softmax" not in ops  # no math-path attention
