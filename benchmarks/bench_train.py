"""Training throughput on CPU: MambaDM vs the Decision Transformer at matched parameter counts, and the cost of
streaming real shards vs reusing one in-memory batch.

    python benchmarks/bench_train.py [--shards DIR] [--steps 8] [--batch 16] [--contexts 8 30 120] [--compile]
                                     [--bf16] [--presets s m]

Table 1: samples/s and tokens/s of full training steps (forward, loss, backward, AdamW step) on in-memory batches of
vector (Hopper-shaped) data, the median of --steps steps of each model taken alternately (so both see the same load
on a shared machine), both models --layers deep, the DT's width chosen so its parameter count is closest to
MambaDM's; both built by ``build_model`` from the same config apart from the family and width. Table 1b: the same
for the size presets named by --presets, each MambaDM preset against the DT preset of the same name, the
parameter-matched pairs that the scaling grids train (configs/model/: same width, DT about twice as deep, since a
GLoMa layer holds about 20 d^2 parameters and a transformer layer 12 d^2). Table 2: the same MambaDM step fed by the
streaming loader over real shards (``--shards``; collected + sharded Hopper data is made when omitted) vs by one
batch kept in memory, the two feeds alternating step by step (next() included in the streamed step's time).
--compile: both models compiled in place (`model.compile()`, what `train.compile=true` does; the warm-up steps pay
the compilation). --bf16: the forward passes of tables 1 and 1b under bf16 autocast, what
`train.mixed_precision=bf16` does on a CPU (worth it where the CPU has AMX). Every number is measured in this run,
side by side.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mambadm import data as D  # noqa: E402
from mambadm.config import EnvSpec, load_config  # noqa: E402
from mambadm.model import build_model  # noqa: E402
from mambadm.optim import make_optimizer  # noqa: E402


def make_shards(tmp: Path) -> Path:
    raw, out = tmp / "raw", tmp / "shards"
    subprocess.run([sys.executable, "data_pipeline/collect.py", "hopper", "--output", str(raw), "--transitions",
                    "20000"], cwd=REPO, check=True, capture_output=True)
    subprocess.run([sys.executable, "data_pipeline/shard.py", "--source", "d4rl", "--input", str(raw), "--output",
                    str(out), "--shard-transitions", "2000"], cwd=REPO, check=True, capture_output=True)
    return out


def matched_dt_width(mamba_params: int, base: list[str], spec) -> int:
    """The DT d_model (multiple of n_head) whose parameter count is closest to ``mamba_params``."""
    best = None
    for d in range(32, 513, 4):
        cfg = load_config(None, [*base, "model.family=dt", f"model.d_model={d}"])
        n = build_model(cfg.model, spec).num_params()
        if best is None or abs(n - mamba_params) < abs(best[1] - mamba_params):
            best = (d, n)
    return best[0]


def train_step(model, opt, batch, bf16: bool = False) -> float:
    """Seconds for one full training step: forward, loss (under bf16 autocast if asked), backward, optimizer step."""
    t = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss, _ = model.loss(batch)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def interleaved_feed_times(model, feeds: dict, steps: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per training step of one model fed by each iterator of batches in ``feeds`` (next() timed too), the
    feeds alternating step by step, so that every feed sees the same load and the same state of the model."""
    opt = make_optimizer(model, load_config(None, []).optim)
    model.train()
    times = {name: [] for name in feeds}
    for i in range(warmup + steps):
        for name, batches in feeds.items():
            t = time.perf_counter()
            train_step(model, opt, next(batches))
            if i >= warmup:
                times[name].append(time.perf_counter() - t)
    return times


def interleaved_step_times(models: dict, batch, steps: int, warmup: int = 2, bf16: bool = False
                           ) -> dict[str, list[float]]:
    """Seconds per training step of each model, their steps alternating, so that every model sees the same load."""
    opts = {name: make_optimizer(model, load_config(None, []).optim) for name, model in models.items()}
    times = {name: [] for name in models}
    for i in range(warmup + steps):
        for name, model in models.items():
            model.train()
            elapsed = train_step(model, opts[name], batch, bf16)
            if i >= warmup:
                times[name].append(elapsed)
    return times


def repeat(batch):
    while True:
        yield batch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", help="shard directory (default: collect and shard Hopper data into a temp dir)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--contexts", type=int, nargs="*", default=[8, 30, 120], help="none: only table 2")
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--compile", action="store_true", help="compile both models (train.compile=true) in tables 1 and 1b")
    p.add_argument("--bf16", action="store_true",
                   help="tables 1 and 1b under bf16 autocast (train.mixed_precision=bf16)")
    p.add_argument("--presets", nargs="*", default=["s", "m"],
                   help="size presets for table 1b (configs/model/<family>-<size>.yaml); none: skip it")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (on a shared box, threads beyond the free cores make every op wait)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(args.shards) if args.shards else make_shards(Path(tmp))
        index = D.read_index(shards)
        spec = EnvSpec.from_dict(index["env_spec"])
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; data {index['env']}; batch {args.batch}"
              f"{'; both models compiled' if args.compile else ''}{'; table 1 in bf16 autocast' if args.bf16 else ''}")
        if args.contexts:
            print("\n| K | MambaDM params | DT params (d_model) | MambaDM samples/s | DT samples/s | MambaDM tokens/s "
              "| DT tokens/s | MambaDM / DT |\n|---|---|---|---|---|---|---|---|")
        for k in args.contexts:
            base = [f"data.shards={shards}", f"data.context_len={k}", f"data.batch_size={args.batch}",
                    "data.num_workers=0", "data.rtg_scale=1000", f"model.n_layer={args.layers}", "model.dropout=0.1"]
            cfg = load_config(None, [*base, "model.family=mambadm", f"model.d_model={args.d_model}"])
            batch = next(iter(D.make_loader(index["shards"], index, cfg.data, 0, 1, seed=0, exact=False)))
            mamba = build_model(cfg.model, spec)
            d_dt = matched_dt_width(mamba.num_params(), base, spec)
            dt = build_model(load_config(None, [*base, "model.family=dt", f"model.d_model={d_dt}"]).model, spec)
            if args.compile:
                mamba.compile()
                dt.compile()
            times = interleaved_step_times({"mambadm": mamba, "dt": dt}, batch, args.steps, bf16=args.bf16)
            rate = {name: args.batch / statistics.median(t) for name, t in times.items()}
            tok = 3 * k
            print(f"| {k} | {mamba.num_params():,} | {dt.num_params():,} ({d_dt}) | {rate['mambadm']:.1f} | "
                  f"{rate['dt']:.1f} | {rate['mambadm'] * tok:.0f} | {rate['dt'] * tok:.0f} | "
                  f"{rate['mambadm'] / rate['dt']:.2f} |", flush=True)
        if args.contexts and args.presets:
            print("\n| size | K | MambaDM params (layers x d) | DT params (layers x d) | MambaDM samples/s "
                  "| DT samples/s | MambaDM tokens/s | DT tokens/s | MambaDM / DT |")
            print("|---|---|---|---|---|---|---|---|---|")
        for size in args.presets if args.contexts else []:
            for k in args.contexts:
                base = [f"data.shards={shards}", f"data.context_len={k}", f"data.batch_size={args.batch}",
                        "data.num_workers=0", "data.rtg_scale=1000", "model.dropout=0.1", f"model.size={size}"]
                cfgs = {fam: load_config(None, [*base, f"model.family={fam}"]) for fam in ("mambadm", "dt")}
                batch = next(iter(D.make_loader(index["shards"], index, cfgs["mambadm"].data, 0, 1, seed=0,
                                                exact=False)))
                models = {fam: build_model(c.model, spec) for fam, c in cfgs.items()}
                if args.compile:
                    for model in models.values():
                        model.compile()
                times = interleaved_step_times(models, batch, args.steps, bf16=args.bf16)
                rate = {name: args.batch / statistics.median(t) for name, t in times.items()}
                shape = {fam: f"{c.model.n_layer} x {c.model.d_model}" for fam, c in cfgs.items()}
                tok = 3 * k
                print(f"| {size} | {k} | {models['mambadm'].num_params():,} ({shape['mambadm']}) | "
                      f"{models['dt'].num_params():,} ({shape['dt']}) | {rate['mambadm']:.1f} | {rate['dt']:.1f} | "
                      f"{rate['mambadm'] * tok:.0f} | {rate['dt'] * tok:.0f} | {rate['mambadm'] / rate['dt']:.2f} |",
                      flush=True)

        k = 30
        cfg = load_config(None, [f"data.shards={shards}", f"data.context_len={k}", f"data.batch_size={args.batch}",
                                 "data.num_workers=1", "data.rtg_scale=1000", f"model.n_layer={args.layers}",
                                 f"model.d_model={args.d_model}"])
        loader = D.make_loader(index["shards"], index, cfg.data, 0, 1, seed=1, exact=False)
        stream = iter(loader)
        batch = next(stream)
        model = build_model(cfg.model, spec)
        times = interleaved_feed_times(model, {"memory": repeat(batch), "streamed": stream}, max(args.steps, 20))
        memory, streamed = (statistics.median(times[name]) for name in ("memory", "streamed"))
        print("\n| MambaDM step, K=30 | in-memory batch | streamed from real shards (1 worker) | streamed / in-memory |"
              f"\n|---|---|---|---|\n| seconds per step | {memory:.4f} | {streamed:.4f} | {streamed / memory:.3f} |")
    print(f"\nload average {' / '.join(f'{x:.1f}' for x in os.getloadavg())} (1 / 5 / 15 min) at the end")


if __name__ == "__main__":
    main()
