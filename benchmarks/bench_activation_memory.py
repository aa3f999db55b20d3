"""The presets' training memory on one GPU, predicted from what autograd saves, measured on a CPU.

    python benchmarks/bench_activation_memory.py [--sizes xxl 100m 300m 1b] [--k 30] [--batches 64 128 256]
        [--memory-gib 78] [--json OUT.json]

For each preset pair (DT, and MambaDM on the `triton` backend with each scan kernel pair and the fused conv off and
on), one forward of the training step under bf16 autocast on an Atari batch, as bench_gpu.py's pair tables run it,
records every tensor autograd saves for the backward (torch.autograd.graph.saved_tensors_hooks; each storage once,
parameters left out). Two batch sizes split the bytes into a fixed part (autocast's bf16 copies of the weights) and
bytes per sample; the hooks on each block attribute them to the blocks or to what lies outside them (embeddings, the
Atari CNN, the head, the loss).

Where a CPU would save other tensors than a GPU, the model is set to save what the GPU does: DT's attention runs with
dropout probability 0 here, since with dropout the CPU's scaled_dot_product_attention falls back to its math path,
which keeps float32 (L x L) attention matrices, where CUDA's flash kernel keeps, with or without dropout, q, k, v,
the output and the log-sum-exp, as the CPU's flash kernel does at 0. And CPU autocast's op lists differ from CUDA's:
tests/test_activation_memory.py checks that no op of these models that CUDA autocast runs in float32 (CUDA_FLOAT32)
gets a bfloat16 input here, so both keep the same dtypes.

The `triton` backend's autograd Functions run as on a GPU, but with their kernel launches skipped (outputs left
unwritten): what they save depends on shapes, dtypes and the kernel pair alone, and the interpreter would take
minutes per block at these sizes (tests/test_activation_memory.py checks both agree at a small preset).

Predicted peak = 16 bytes a parameter (float32 weights and gradients, AdamW's two moments) + the saved bytes:
  plain:          fixed + batch x per sample;
  checkpointed:   (model.grad_checkpoint: each block keeps only its input, saved by torch.utils.checkpoint outside
                  the block, and is recomputed one at a time in the backward) what the checkpointed forward saves +
                  the plain forward's largest block (fixed + batch x per sample).
Not counted: the backward's transient buffers, CUDA / cuBLAS workspaces and the allocator's slack: the GPU run's
"peak GiB" column (bench_gpu.py --parts pairs) is the measurement, this the expectation it is read against. The
largest batch that fits is the largest power of two whose prediction stays under --memory-gib (default 78: what an
80 GB card leaves a program).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_gpu import ATARI, atari_batch  # noqa: E402
from mambadm.config import load_config  # noqa: E402
from mambadm.model import build_model  # noqa: E402
from mambadm.model.dt import CausalSelfAttention  # noqa: E402
from mambadm.model.sizes import preset_sizes  # noqa: E402
from mambadm.ssm import conv_triton, scan_triton  # noqa: E402

STATIC_BYTES_PER_PARAM = 16  # float32 weight + gradient + AdamW's exp_avg and exp_avg_sq
VARIANTS = {  # label -> (family, triton scan kernel pair, fused conv)
    "dt": ("dt", None, None),
    "mambadm serial": ("mambadm", "serial", False),
    "mambadm chunked": ("mambadm", "chunked", False),
    "mambadm chunked + fused conv": ("mambadm", "chunked", True),
}
OUTSIDE = "outside"
# The ops CUDA autocast runs in float32 (PyTorch's automatic mixed precision op reference), by their aten names as
# a dispatch mode sees them (layer_norm as native_layer_norm, softmax as _softmax, ...).
CUDA_FLOAT32 = frozenset("""
    acos asin cosh erfinv exp expm1 log log10 log2 log1p reciprocal rsqrt sinh tan pow softplus layer_norm
    native_layer_norm group_norm native_group_norm norm nuclear_norm frobenius_norm linalg_vector_norm
    cosine_similarity poisson_nll_loss cosine_embedding_loss nll_loss nll_loss_forward nll_loss2d
    nll_loss2d_forward hinge_embedding_loss kl_div l1_loss smooth_l1_loss huber_loss mse_loss margin_ranking_loss
    multilabel_margin_loss soft_margin_loss triplet_margin_loss multi_margin_loss binary_cross_entropy_with_logits
    dist pdist cdist renorm logsumexp prod softmax _softmax _safe_softmax log_softmax _log_softmax cumprod cumsum
    sum""".split())


class _NoLaunch:
    """Stands in for a Triton kernel: `kernel[grid](...)` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def kernel_launches_skipped():
    """The triton backend's Functions run on CPU tensors (allocating and saving what they do on a GPU), their kernels
    do not. (TRITON_INTERPRET=1 for the duration: the backend's check for CPU tensors; no kernel is compiled.)"""
    import triton

    saved = scan_triton._kernels, conv_triton._kernels, os.environ.get("TRITON_INTERPRET")
    scan_triton._kernels = lambda name="chunked": (triton, _NoLaunch(), _NoLaunch())
    conv_triton._kernels = lambda: (triton, _NoLaunch(), _NoLaunch())
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        scan_triton._kernels, conv_triton._kernels = saved[:2]
        if saved[2] is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved[2]


@contextlib.contextmanager
def triton_setting(kernel: str | None, fused: bool | None):
    """scan_triton.LAUNCH['kernel'] and conv_triton.FUSED['conv'] for the duration (None: leave as they are)."""
    before = scan_triton.LAUNCH["kernel"], conv_triton.FUSED["conv"]
    if kernel is not None:
        scan_triton.LAUNCH["kernel"], conv_triton.FUSED["conv"] = kernel, fused
    try:
        yield
    finally:
        scan_triton.LAUNCH["kernel"], conv_triton.FUSED["conv"] = before


def build(family: str, size: str, grad_checkpoint: bool) -> torch.nn.Module:
    """The preset in training mode on the CPU, built on the meta device and given zero weights (no init time: the
    bytes saved depend on shapes alone); DT's attention without dropout (module docstring)."""
    overrides = [f"model.family={family}", f"model.size={size}", f"model.grad_checkpoint={grad_checkpoint}"]
    if family == "mambadm":
        overrides.append("model.backend=triton")
    cfg = load_config(None, overrides)
    with torch.device("meta"):
        model = build_model(cfg.model, ATARI)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    for module in model.modules():
        if isinstance(module, CausalSelfAttention):
            module.dropout = 0.0  # the flash kernel's saves, as CUDA's (module docstring)
    return model.train()


def saved_bytes(model: torch.nn.Module, batch: int, k: int) -> dict[str, int]:
    """{block or OUTSIDE: bytes}: the storages autograd saves in one forward of model.loss under bf16 autocast
    (parameters left out; each storage counted once, under the block whose forward saved it first). A checkpointed
    block's saves are its input, kept by torch.utils.checkpoint outside the block."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    where, saved, kept = [OUTSIDE], {}, []

    def pack(t: torch.Tensor) -> None:
        # Held here until the forward ends, so that no storage is freed and its address reused by another
        kept.append(t)
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and storage.data_ptr() not in saved:
            saved[storage.data_ptr()] = (where[0], storage.nbytes())

    def enter(name: str):
        def hook(module, args):
            where[0] = name
        return hook

    def leave(module, args, output):
        where[0] = OUTSIDE

    handles = []
    for i, layer in enumerate(model.layers):
        handles += [layer.register_forward_pre_hook(enter(f"block {i}")), layer.register_forward_hook(leave)]
    try:
        data = atari_batch(batch, k, device="cpu")
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda nothing: None), \
                torch.autocast("cpu", dtype=torch.bfloat16):
            model.loss(data)
    finally:
        kept.clear()  # (the graph's nodes hold `pack`, and so `kept`: cleared, nothing outlives this call)
        for h in handles:
            h.remove()
    totals: dict[str, int] = defaultdict(int)
    for name, nbytes in saved.values():
        totals[name] += nbytes
    return dict(totals)


def linear_fit(one: dict[str, int], two: dict[str, int]) -> dict[str, tuple[int, int]]:
    """{name: (fixed bytes, bytes per sample)} from the bytes at batch 1 and batch 2."""
    return {name: (2 * one.get(name, 0) - two.get(name, 0), two.get(name, 0) - one.get(name, 0))
            for name in sorted(set(one) | set(two))}


def measure(label: str, size: str, k: int) -> dict:
    """Parameters and the fitted saved bytes of one variant of one preset (plain and checkpointed)."""
    family, kernel, fused = VARIANTS[label]
    row = {"variant": label, "size": size, "K": k}
    with triton_setting(kernel, fused), kernel_launches_skipped():
        for ckpt in (False, True):
            model = build(family, size, grad_checkpoint=ckpt)
            row["params"] = sum(p.numel() for p in model.parameters())
            row["checkpointed" if ckpt else "plain"] = linear_fit(saved_bytes(model, 1, k), saved_bytes(model, 2, k))
            del model
    return row


def predicted_bytes(row: dict, batch: int, checkpointed: bool) -> int:
    """The predicted peak of one training step (module docstring)."""
    static = STATIC_BYTES_PER_PARAM * row["params"]
    if not checkpointed:
        fixed, per_sample = (sum(part) for part in zip(*row["plain"].values()))
        return static + fixed + batch * per_sample
    blocks = [part for name, part in row["plain"].items() if name != OUTSIDE]
    largest = max(fixed + batch * per_sample for fixed, per_sample in blocks) if blocks else 0
    kept_fixed, kept_per_sample = (sum(part) for part in zip(*row["checkpointed"].values()))
    return static + kept_fixed + batch * kept_per_sample + largest


def largest_fitting_batch(row: dict, checkpointed: bool, memory_bytes: float, limit: int = 1 << 14) -> int:
    """The largest power-of-two batch whose predicted peak stays under memory_bytes (0: not even batch 1)."""
    batch = 0
    while batch < limit and predicted_bytes(row, max(1, 2 * batch), checkpointed) <= memory_bytes:
        batch = max(1, 2 * batch)
    return batch


def per_token_kib(row: dict, key: str) -> float:
    """Saved bytes per token (per sample / 3K) in KiB: the plain step's, or what a checkpointed step keeps."""
    return sum(per_sample for _, per_sample in row[key].values()) / (3 * row["K"]) / 1024


def table(rows: list[dict], batches: list[int], memory_gib: float) -> str:
    gib = 2**30
    head = ("| preset | variant | params | saved KiB / token plain | kept KiB / token ckpt | "
            + " | ".join(f"GiB at {b} plain / ckpt" for b in batches)
            + f" | largest batch <= {memory_gib:g} GiB plain / ckpt |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        cells = [row["size"], row["variant"], f"{row['params'] / 1e6:,.1f}M", f"{per_token_kib(row, 'plain'):,.1f}",
                 f"{per_token_kib(row, 'checkpointed'):,.1f}"]
        cells += [f"{predicted_bytes(row, b, False) / gib:,.1f} / {predicted_bytes(row, b, True) / gib:,.1f}"
                  for b in batches]
        cells.append(" / ".join(str(largest_fitting_batch(row, c, memory_gib * gib)) for c in (False, True)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sizes = [size for size in preset_sizes("mambadm") if size in preset_sizes("dt")]  # the pairs
    parser.add_argument("--sizes", nargs="+", choices=sizes, default=["xxl", "100m", "300m", "1b"])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--k", type=int, default=30, help="context length in steps (3 tokens each)")
    parser.add_argument("--batches", nargs="+", type=int, default=[64, 128, 256])
    parser.add_argument("--memory-gib", type=float, default=78.0)
    parser.add_argument("--json", type=Path, help="also write the rows (bytes by block) here")
    args = parser.parse_args(argv)
    if args.k < 1 or min(args.batches) < 1 or args.memory_gib <= 0:
        parser.error(f"--k, --batches and --memory-gib must be positive (got {args.k}, {args.batches}, "
                     f"{args.memory_gib})")
    if args.json is not None and not args.json.parent.is_dir():
        parser.error(f"--json: folder {args.json.parent} does not exist")
    torch.set_flush_denormal(True)
    rows = []
    for size in args.sizes:
        for label in args.variants:
            print(f"measuring {size} {label} ...", file=sys.stderr, flush=True)
            rows.append(measure(label, size, args.k))
    print(f"Saved-for-backward bytes measured on this CPU (torch {torch.__version__}, bf16 autocast, Atari batch, "
          f"K = {args.k}); peaks predicted as the module docstring says.\n")
    print(table(rows, args.batches, args.memory_gib))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
