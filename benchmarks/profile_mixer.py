"""Where the CPU time of the Mamba path goes: the selective scan vs everything around it.

Part 1, one `Mamba` mixer block, forward + backward, batch 16, 1 thread: the block's time, the time of its
`selective_scan` call alone on the same inputs (bias, softplus, recurrence, D skip, silu gate), the rest (in_proj,
conv, x_proj, dt_proj, out_proj, layout) as the difference, and the number of ops the profiler records, for each
backend in --backends. `fast` and `ref` share every non-scan op (`cpp` also fuses the conv), so for them
block(ref) / rest is the largest speed-up over `ref` any scan could reach.

Part 2, one MambaDM training step (forward, loss, backward, AdamW) at each context K, with the time inside the
fused scan function (`cpp` or `fast`, whichever the model's `auto` backend runs; forward and backward, timed by
wrapping it) and a DT step of matched size beside it:
DT step / (MambaDM step - scan) is the largest MambaDM / DT throughput ratio a free scan could give.

    python benchmarks/profile_mixer.py [--shapes 96x128 768x128 96x512] [--backends cpp fast ref]
                                       [--contexts 30 120] [--shards DIR]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import (  # noqa: E402
    D, EnvSpec, build_model, load_config, make_optimizer, make_shards, matched_dt_width, train_step,
)

import mambadm.ssm.scan_cpp as scan_cpp  # noqa: E402
import mambadm.ssm.scan_fast as scan_fast  # noqa: E402
from mambadm.ssm import Mamba, selective_scan  # noqa: E402


def best_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def profile_block(length: int, d_model: int, backend: str, repeats: int) -> dict:
    torch.manual_seed(0)
    m = Mamba(d_model, backend=backend)
    x = torch.randn(16, length, d_model, requires_grad=True)
    gy = torch.randn(16, length, d_model)
    with torch.no_grad():
        u, z, dt, B, C = (t.transpose(1, 2) for t in m._ssm_inputs(x, m.kernels))  # selective_scan's layout
    args = [t.detach().clone().requires_grad_()
            for t in (u, dt, m.A_continuous(), B, C, m.D, z, m.dt_proj.bias, m.dt_proj.weight)]
    gs = torch.randn(u.shape)

    def scan():
        return selective_scan(*args[:5], D=args[5], z=args[6], delta_bias=args[7], delta_softplus=True,
                              backend=backend, delta_proj=args[8])

    r = {"block_fwd": best_ms(lambda: m(x), repeats), "block": best_ms(lambda: m(x).backward(gy), repeats),
         "scan_fwd": best_ms(scan, repeats), "scan": best_ms(lambda: scan().backward(gs), repeats)}
    with torch.profiler.profile() as prof:
        m(x).backward(gy)
    r["ops"] = sum(1 for e in prof.events() if e.name.startswith("aten::"))
    return r


class ScanTimer:
    """Accumulates the seconds spent in the fused scans' forward and backward (wraps the autograd.Functions)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        for fn in (scan_fast._FusedScan, scan_cpp._CppScan):
            fn.forward = staticmethod(self._timed(fn.forward))
            fn.backward = staticmethod(self._timed(fn.backward))

    def _timed(self, f):
        def wrapper(ctx, *args):
            start = time.perf_counter()
            out = f(ctx, *args)
            self.seconds += time.perf_counter() - start
            return out
        return wrapper


def train_step_ms(model, batch, timer: ScanTimer, steps: int = 6, warmup: int = 2) -> tuple[float, float]:
    """Median (step ms, of which scan ms)."""
    opt = make_optimizer(model, load_config(None, []).optim)
    model.train()
    totals, scans = [], []
    for i in range(warmup + steps):
        timer.seconds = 0.0
        seconds = train_step(model, opt, batch)
        if i >= warmup:
            totals.append(seconds)
            scans.append(timer.seconds)
    return 1000 * statistics.median(totals), 1000 * statistics.median(scans)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="*", default=["96x128", "768x128", "96x512"], help="LxD_MODEL")
    p.add_argument("--backends", nargs="+", default=["cpp", "fast", "ref"], choices=["cpp", "fast", "ref"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--contexts", type=int, nargs="*", default=[30, 120])
    p.add_argument("--shards", help="shard directory (default: collect and shard Hopper data into a temp dir)")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.shapes:
        print("| L | d_model | backend | block fwd / fwd+bwd ms | scan fwd / fwd+bwd ms | scan share | rest ms "
              "| aten ops | block(ref) / rest |\n|---|---|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        length, d_model = map(int, shape.split("x"))
        res = {b: profile_block(length, d_model, b, args.repeats) for b in args.backends}
        for b, r in res.items():
            rest = r["block"] - r["scan"]
            bound = f"{res['ref']['block'] / rest:.1f}x" if rest > 0 and "ref" in res else "-"
            print(f"| {length} | {d_model} | {b} | {r['block_fwd']:.0f} / {r['block']:.0f} | {r['scan_fwd']:.0f} / "
                  f"{r['scan']:.0f} | {100 * r['scan'] / r['block']:.0f}% | {rest:.0f} | {r['ops']} | {bound} |",
                  flush=True)

    if args.contexts:
        timer = ScanTimer()
        with tempfile.TemporaryDirectory() as tmp:
            shards = Path(args.shards) if args.shards else make_shards(Path(tmp))
            index = D.read_index(shards)
            spec = EnvSpec.from_dict(index["env_spec"])
            print("\n| K | MambaDM step ms | of which scan ms | DT step ms (d_model) | MambaDM / DT samples/s "
                  "| bound with a free scan |\n|---|---|---|---|---|---|")
            for k in args.contexts:
                base = [f"data.shards={shards}", f"data.context_len={k}", "data.batch_size=16", "data.num_workers=0",
                        "data.rtg_scale=1000", f"model.n_layer={args.layers}", "model.dropout=0.1"]
                cfg = load_config(None, [*base, "model.family=mambadm", f"model.d_model={args.d_model}"])
                batch = next(iter(D.make_loader(index["shards"], index, cfg.data, 0, 1, seed=0, exact=False)))
                torch.manual_seed(0)
                mamba = build_model(cfg.model, spec)
                d_dt = matched_dt_width(mamba.num_params(), base, spec)
                dt = build_model(load_config(None, [*base, "model.family=dt", f"model.d_model={d_dt}"]).model, spec)
                m_ms, scan_ms = train_step_ms(mamba, batch, timer)
                dt_ms, _ = train_step_ms(dt, batch, timer)
                print(f"| {k} | {m_ms:.0f} | {scan_ms:.0f} ({100 * scan_ms / m_ms:.0f}%) | {dt_ms:.0f} ({d_dt}) | "
                      f"{dt_ms / m_ms:.2f} | {dt_ms / (m_ms - scan_ms):.2f} |", flush=True)
    print(f"\nload average {' / '.join(f'{x:.1f}' for x in os.getloadavg())} (1 / 5 / 15 min), 1 torch thread")


if __name__ == "__main__":
    main()
