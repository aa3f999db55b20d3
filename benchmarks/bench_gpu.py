"""GPU checks and throughput in one run: backend parity, mixer tokens/s, training tokens/s and MFU.

    python benchmarks/bench_gpu.py [--parts parity mixer train] [--json OUT.json] [--peak-tflops 989]

- parity: one Mamba mixer, float32 on the GPU, forward + backward on odd shapes; every available backend (`fast`,
  and `cuda` when mamba_ssm imports) against `ref`: relative error of the output and of every parameter gradient.
- mixer: one Mamba mixer block forward + backward (batch 16, L in {96, 768, 3072}, d_model in {128, 512}, float32),
  tokens/s per backend, timed with CUDA events (median of the repeats after a warm-up).
- train: full training steps (bf16 autocast, loss, backward, grad clip, AdamW) on an in-memory Atari batch
  (84x84x4 frames, 4 actions) for every size preset of both families; tokens/s = 3 K batch / step time and
  MFU = model.flops_per_token(K) x tokens/s / the card's dense bf16 peak (--peak-tflops; looked up from the device
  name when omitted). The matmul rate actually reached by one 8192^3 bf16 product is printed beside it.
- mfu: the same training step for the --sizes presets (default the largest) of --families, over --mfu-batches,
  eager and, for --compile-batches, with the model compiled (`model.compile()`, what `accelerate launch
  --dynamo_backend inductor` does to the module); a batch that does not fit is printed as OOM.
- profile: torch.profiler over 3 training steps of each --families' first --sizes preset at --batch (MambaDM on
  each fused backend): the kernels that take the GPU's time, most first.
- pairs: one table per parameter-matched preset pair (--pair-sizes, default xxl 100m 300m 1b): DT and MambaDM (the
  fused backend) over --pair-batches, eager, each row with step ms, tokens/s, MFU, the peak GPU memory of the step
  and its batch; a batch that does not fit prints OOM and ends that family's sweep. The last pair also runs with
  model.grad_checkpoint at --checkpoint-batch. Models are built on the GPU directly.
- fused: the `triton` backend's fused conv (mambadm/ssm/conv_triton.py, $MAMBADM_TRITON_FUSED) on a GPU. First its
  parity: the mixer on `triton` with the fused conv against `ref`, float32, forward + backward, with and without the
  local branch's windows. Then the training step of MambaDM at the --sizes preset (default the largest) over
  --fused-batches on `triton` with the fused conv off and on, on `cuda` where mamba_ssm imports, and DT at the same
  batch: step ms, tokens/s, MFU, the speed-up of the fused conv and MambaDM's time per token over DT's.

Everything printed is measured in this run on the card named in the first line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mambadm.config import EnvSpec, load_config  # noqa: E402
from mambadm.model import build_model  # noqa: E402
from mambadm.model.embeddings import TokenEmbedding  # noqa: E402
from mambadm.optim import make_optimizer  # noqa: E402
from mambadm.ssm import Mamba, available_backends  # noqa: E402
from mambadm.ssm import scan_triton  # noqa: E402
from mambadm.ssm.conv_triton import FUSED  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, matched against the device name.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0}
SIZES = ["xs", "s", "m", "l", "xl", "xxl"]
MIXER_SHAPES = [(d, length) for d in (128, 512) for length in (96, 768, 3072)]  # (d_model, L)


DEVICE = "cuda"


def cuda_time(fn, warmup: int, repeats: int) -> float:
    """Median seconds of fn() over `repeats` calls after `warmup`, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if DEVICE == "cpu":  # --device cpu: a dry run of this script on a machine without a GPU
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def peak_tflops(name: str, override: float | None) -> float:
    if override:
        return override
    for key, value in BF16_PEAK_TFLOPS.items():
        if key in name:
            return value
    raise SystemExit(f"unknown card {name!r}: pass --peak-tflops")


def matmul_tflops() -> float:
    a = torch.randn(8192, 8192, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=DEVICE, dtype=torch.bfloat16)
    seconds = cuda_time(lambda: a @ b, warmup=3, repeats=10)
    return 2 * 8192**3 / seconds / 1e12


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def mixer_grads(name: str, state: dict, x: torch.Tensor, grad: torch.Tensor, segment: int | None = None):
    """(output, grad of x, parameter grads) of a Mamba mixer on backend `name` with the weights `state`."""
    mixer = Mamba(x.shape[-1], backend=name).to(DEVICE)
    mixer.load_state_dict(state)
    xi = x.clone().requires_grad_(True)
    y = mixer(xi, segment=segment)
    y.backward(grad)
    return y.detach(), xi.grad, {k: p.grad for k, p in mixer.named_parameters()}


def parity_row(label: str, mine, ref, **shape) -> dict:
    """Relative errors of one backend's (output, grad x, parameter grads) against ref's; the worst parameter named."""
    (y, gx, g), (y0, gx0, g0) = mine, ref
    worst = max(g, key=lambda k: _rel(g[k], g0[k]))
    return {"backend": label, **shape, "out": _rel(y, y0), "grad_x": _rel(gx, gx0),
            "grad_param_max": _rel(g[worst], g0[worst]), "worst_param": worst}


def parity(backends: list[str]) -> list[dict]:
    rows = []
    for d_model, length in ((64, 37), (128, 301), (96, 1024)):
        torch.manual_seed(0)
        state = Mamba(d_model, backend="ref").state_dict()
        x = torch.randn(3, length, d_model, device=DEVICE)
        grad = torch.randn(3, length, d_model, device=DEVICE)
        ref = mixer_grads("ref", state, x, grad)
        rows += [parity_row(name, mixer_grads(name, state, x, grad), ref, d_model=d_model, L=length)
                 for name in backends]
    print(f"\n| backend vs ref (float32, {DEVICE}) | d_model | L | output rel. err | grad x rel. err | "
          "worst param grad rel. err |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backend']} | {r['d_model']} | {r['L']} | {r['out']:.2e} | {r['grad_x']:.2e} | "
              f"{r['grad_param_max']:.2e} ({r['worst_param']}) |")
    return rows


def mixer_throughput(backends: list[str]) -> list[dict]:
    rows = []
    print("\n| L | d_model | " + " | ".join(f"{b} tokens/s" for b in backends) + " | "
          + " | ".join(f"{b} / ref" for b in backends if b != "ref") + " |")
    print("|---|---|" + "---|" * (2 * len(backends) - 1))
    for d_model, length in MIXER_SHAPES:
        rate = {}
        for name in backends:
            torch.manual_seed(0)
            mixer = Mamba(d_model, backend=name).to(DEVICE)
            x = torch.randn(16, length, d_model, device=DEVICE, requires_grad=True)
            grad = torch.randn_like(x)

            def step():
                mixer(x).backward(grad)

            repeats = 3 if name == "ref" or length == 3072 else 10
            rate[name] = 16 * length / cuda_time(step, warmup=1, repeats=repeats)
        rows.append({"L": length, "d_model": d_model, **{f"{k}_tokens_per_s": v for k, v in rate.items()}})
        print(f"| {length} | {d_model} | " + " | ".join(f"{rate[b]:,.0f}" for b in backends) + " | "
              + " | ".join(f"{rate[b] / rate['ref']:.1f}x" for b in backends if b != "ref") + " |", flush=True)
    return rows


def atari_batch(batch: int, k: int, device: str | None = None) -> dict[str, torch.Tensor]:
    """A random Breakout-shaped training batch on `device` (default DEVICE)."""
    device = device or DEVICE
    g = torch.Generator(device=device).manual_seed(0)
    return {
        "rtg": torch.rand(batch, k, device=device, generator=g) * 20,
        "states": torch.randint(0, 256, (batch, k, 4, 84, 84), device=device, dtype=torch.uint8, generator=g),
        "actions": torch.randint(0, 4, (batch, k), device=device, generator=g),
        "timesteps": torch.randint(0, 1000, (batch, k), device=device, generator=g),
        "mask": torch.ones(batch, k, dtype=torch.bool, device=device),
    }


ATARI = EnvSpec(obs_kind="atari", obs_shape=[4, 84, 84], act_dim=4, discrete=True)
TRAIN_HEADER = ("\n| family | size | backend | compiled | params | batch | K | step ms | tokens/s | TFLOP/s | MFU |"
                "\n|---|---|---|---|---|---|---|---|---|---|---|")
PAIR_HEADER = ("\n| family | size | backend | ckpt | params | batch | K | step ms | tokens/s | TFLOP/s | MFU | peak GiB |"
               "\n|---|---|---|---|---|---|---|---|---|---|---|---|")


def training_step(family: str, size: str, backend: str, batch: int, k: int, compiled: bool = False,
                  grad_checkpoint: bool = False):
    """(model, step): one full training step (bf16 autocast, loss, backward, clip, AdamW) on an in-memory batch."""
    overrides = [f"model.family={family}", f"model.size={size}", f"model.grad_checkpoint={grad_checkpoint}"]
    if family == "mambadm":
        overrides.append(f"model.backend={backend}")
    cfg = load_config(None, overrides)
    torch.manual_seed(0)
    with torch.device(DEVICE):  # built where it runs: a 1B model's init on the host would take minutes
        model = build_model(cfg.model, ATARI).train()
    if compiled:
        model.compile()  # compiles the module's __call__, which model.loss goes through
    opt = make_optimizer(model, cfg.optim)
    data = atari_batch(batch, k)

    def step():
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss, _ = model.loss(data)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, step


def measure_step(family: str, size: str, backend: str, batch: int, k: int, compiled: bool = False,
                 grad_checkpoint: bool = False, warmup: int = 3, repeats: int = 10) -> tuple[float, float] | None:
    """(seconds per training step, peak GPU bytes or nan on CPU) of one configuration, or None when it does not fit
    (CUDA out of memory); the model is freed either way."""
    model = step = None
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        model, step = training_step(family, size, backend, batch, k, compiled, grad_checkpoint=grad_checkpoint)
        seconds = cuda_time(step, warmup=warmup, repeats=repeats)
        return seconds, (torch.cuda.max_memory_allocated() if DEVICE == "cuda" else float("nan"))
    except torch.cuda.OutOfMemoryError:
        return None
    finally:
        del model, step
        if DEVICE == "cuda":
            torch.cuda.empty_cache()


def time_training(family: str, size: str, backend: str, batch: int, k: int, peak: float,
                  compiled: bool = False) -> dict:
    """Times one training configuration and prints its table row; a batch that does not fit prints OOM."""
    row = {"family": family, "size": size, "backend": backend, "compiled": compiled, "batch": batch, "K": k}
    measured = measure_step(family, size, backend, batch, k, compiled)
    if measured is None:
        print(f"| {family} | {size} | {backend} | {compiled} | - | {batch} | {k} | OOM | | | |", flush=True)
        return {**row, "oom": True}
    seconds = measured[0]
    tokens = 3 * k * batch / seconds
    flops = build_flops(family, size, k)
    row.update(params=flops["params"], step_ms=1000 * seconds, tokens_per_s=tokens,
               tflops=flops["per_token"] * tokens / 1e12)
    row["mfu"] = row["tflops"] / peak
    print(f"| {family} | {size} | {backend} | {compiled} | {row['params']:,} | {batch} | {k} | {row['step_ms']:.1f} | "
          f"{tokens:,.0f} | {row['tflops']:.1f} | {100 * row['mfu']:.2f}% |", flush=True)
    return row


def build_flops(family: str, size: str, k: int) -> dict:
    """Parameter count and analytic training FLOPs per token of a preset (built on the meta device: no memory)."""
    cfg = load_config(None, [f"model.family={family}", f"model.size={size}"])
    with torch.device("meta"):
        model = build_model(cfg.model, ATARI)
    return {"params": model.num_params(), "per_token": model.flops_per_token(k)}


def time_pair_row(family: str, size: str, backend: str, batch: int, k: int, peak: float,
                  grad_checkpoint: bool = False) -> dict:
    """One row of a pair table: the eager training step's time, tokens/s, MFU and peak GPU memory; OOM is a row."""
    row = {"family": family, "size": size, "backend": backend, "grad_checkpoint": grad_checkpoint, "batch": batch,
           "K": k}
    flops = build_flops(family, size, k)
    measured = measure_step(family, size, backend, batch, k, grad_checkpoint=grad_checkpoint, warmup=2, repeats=5)
    if measured is None:
        print(f"| {family} | {size} | {backend} | {grad_checkpoint} | {flops['params']:,} | {batch} | {k} | OOM | | | "
              "| |", flush=True)
        return {**row, "oom": True}
    seconds, peak_bytes = measured
    tokens = 3 * k * batch / seconds
    tflops = flops["per_token"] * tokens / 1e12
    row.update(params=flops["params"], step_ms=1000 * seconds, tokens_per_s=tokens, tflops=tflops, mfu=tflops / peak,
               peak_gib=peak_bytes / 2**30)
    print(f"| {family} | {size} | {backend} | {grad_checkpoint} | {flops['params']:,} | {batch} | {k} | "
          f"{row['step_ms']:.1f} | {tokens:,.0f} | {tflops:.1f} | {100 * row['mfu']:.2f}% | {row['peak_gib']:.1f} |",
          flush=True)
    return row


def pair_tables(sizes: list[str], backend: str, peak: float, k: int, batches: list[int],
                checkpoint_batch: int) -> list[dict]:
    """One table per preset pair, DT then MambaDM, over the batches (ascending; the first OOM ends a sweep)."""
    rows = []
    for size in sizes:
        print(f"\n### pair {size} (K = {k}, bf16 autocast, eager, AdamW; MFU against {peak:.0f} TFLOP/s)")
        print(PAIR_HEADER)
        for family in ("dt", "mambadm"):
            fam_backend = backend if family == "mambadm" else "-"
            for batch in sorted(batches):
                rows.append(time_pair_row(family, size, fam_backend, batch, k, peak))
                if rows[-1].get("oom"):
                    break
            if size == sizes[-1] and checkpoint_batch:  # the largest pair: the checkpointed step too
                rows.append(time_pair_row(family, size, fam_backend, checkpoint_batch, k, peak, grad_checkpoint=True))
    return rows


def train_throughput(backends: list[str], peak: float, batch: int, k: int) -> list[dict]:
    rows = []
    print(TRAIN_HEADER)
    for family in ("mambadm", "dt"):
        for size in SIZES:
            for backend in (backends if family == "mambadm" else ["-"]):
                rows.append(time_training(family, size, backend, batch, k, peak))
    return rows


def mfu_sweep(families: list[str], sizes: list[str], backends: list[str], peak: float, k: int,
              batches: list[int], compile_batches: list[int]) -> list[dict]:
    rows = []
    print(TRAIN_HEADER)
    for family in families:
        for size in sizes:
            for backend in (backends if family == "mambadm" else ["-"]):
                for batch in batches:
                    rows.append(time_training(family, size, backend, batch, k, peak))
                for batch in compile_batches:
                    rows.append(time_training(family, size, backend, batch, k, peak, compiled=True))
    return rows


def profile_step(family: str, size: str, backend: str, batch: int, k: int) -> None:
    """Prints the GPU kernels of 3 training steps, by total GPU time."""
    from torch.profiler import ProfilerActivity, profile

    model, step = training_step(family, size, backend, batch, k)
    for _ in range(3):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    started = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(3):
            step()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
    wall = (time.perf_counter() - started) / 3
    sort = "self_cuda_time_total" if DEVICE == "cuda" else "self_cpu_time_total"
    print(f"\nprofile: {family} {size} {backend} batch {batch} K {k}: {1000 * wall:.1f} ms per step (wall, profiled)")
    print(prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=70))
    del model, step


FUSED_PARITY_SHAPES = [(64, 37, None), (128, 90, None), (128, 90, 15), (96, 301, 15)]  # d_model, L, segment
FUSED_TIMING = {"warmup": 2, "repeats": 5}  # steps per row of the fused part
FUSED_HEADER = ("| family | size | backend | fused conv | batch | K | step ms | tokens/s | MFU | fused / unfused "
                "| step / DT's |\n|---|---|---|---|---|---|---|---|---|---|---|")


def fused_conv_parity() -> list[dict]:
    """The mixer on `triton` with its fused conv against `ref` (float32, forward + backward; segment: the local
    branch's windows, in place on triton, folded into the batch on ref)."""
    rows = []
    FUSED["conv"] = True
    try:
        for d_model, length, segment in FUSED_PARITY_SHAPES:
            torch.manual_seed(0)
            state = Mamba(d_model, backend="ref").state_dict()
            x = torch.randn(3, length, d_model, device=DEVICE)
            grad = torch.randn(3, length, d_model, device=DEVICE)
            ref = mixer_grads("ref", state, x, grad, segment)
            try:
                rows.append(parity_row("triton, fused conv", mixer_grads("triton", state, x, grad, segment), ref,
                                       d_model=d_model, L=length, segment=segment))
            except Exception as exc:  # e.g. a kernel the compiler refuses on this card
                rows.append({"backend": "triton, fused conv", "d_model": d_model, "L": length, "segment": segment,
                             "failed": f"{type(exc).__name__}: {exc}"})
    finally:
        FUSED["conv"] = None
    print(f"\n| backend vs ref (float32, {DEVICE}) | d_model | L | segment | output rel. err | grad x rel. err | "
          "worst param grad rel. err |\n|---|---|---|---|---|---|---|")
    for r in rows:
        cells = (f"failed: {r['failed'][:200]} | | " if "failed" in r else
                 f"{r['out']:.2e} | {r['grad_x']:.2e} | {r['grad_param_max']:.2e} ({r['worst_param']}) ")
        print(f"| {r['backend']} | {r['d_model']} | {r['L']} | {r['segment']} | {cells}|", flush=True)
    return rows


def fused_conv_steps(size: str, batches: list[int], k: int, peak: float, backends: list[str]) -> list[dict]:
    """MambaDM's training step on `triton` with the fused conv off and on (and on `cuda` where available) beside
    DT's at the same batch: eager, bf16 autocast, AdamW; a failing or OOM configuration is a row."""
    rows = []
    flops = {family: build_flops(family, size, k) for family in ("dt", "mambadm")}
    variants = [("dt", "-", None), ("mambadm", "triton", False), ("mambadm", "triton", True)]
    variants += [("mambadm", "cuda", None)] if "cuda" in backends else []
    print(f"\n(size {size}, K = {k}, bf16 autocast, eager; the triton scan pair: {scan_triton._kernel()})")
    print(FUSED_HEADER)
    for batch in batches:
        ms = {}
        for family, backend, fused in variants:
            row = {"family": family, "size": size, "backend": backend, "fused_conv": fused, "batch": batch, "K": k}
            FUSED["conv"] = fused
            try:
                measured = measure_step(family, size, backend, batch, k, **FUSED_TIMING)
            except Exception as exc:  # e.g. a kernel the compiler refuses on this card
                measured = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
            finally:
                FUSED["conv"] = None
            if not isinstance(measured, tuple):
                print(f"| {family} | {size} | {backend} | {fused} | {batch} | {k} | {measured or 'OOM'} | | | | |",
                      flush=True)
                rows.append({**row, "failed": measured or "OOM"})
                continue
            ms[(backend, fused)] = step_ms = 1000 * measured[0]
            tokens = 3 * k * batch / measured[0]
            mfu = flops[family]["per_token"] * tokens / 1e12 / peak
            speedup = ms[("triton", False)] / step_ms if fused and ("triton", False) in ms else None
            vs_dt = step_ms / ms[("-", None)] if family == "mambadm" and ("-", None) in ms else None
            rows.append({**row, "step_ms": step_ms, "tokens_per_s": tokens, "mfu": mfu, "fused_speedup": speedup,
                         "step_over_dt": vs_dt})
            print(f"| {family} | {size} | {backend} | {fused} | {batch} | {k} | {step_ms:.1f} | {tokens:,.0f} | "
                  f"{100 * mfu:.2f}% | {'' if speedup is None else f'{speedup:.2f}x'} | "
                  f"{'' if vs_dt is None else f'{vs_dt:.2f}x'} |", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="*", default=["parity", "mixer", "train"])
    p.add_argument("--backends", nargs="*", help="default: every backend available on the GPU")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--families", nargs="*", default=["mambadm", "dt"], help="mfu and profile parts")
    p.add_argument("--sizes", nargs="*", default=["xxl"], help="mfu and profile parts")
    p.add_argument("--mfu-batches", nargs="*", type=int, default=[128, 256, 512])
    p.add_argument("--compile-batches", nargs="*", type=int, default=[256])
    p.add_argument("--context", type=int, default=30)
    p.add_argument("--frames-nchw", action="store_true",
                   help="feed Atari frames to the CNN in NCHW (the A/B baseline of the channels-last default)")
    p.add_argument("--pair-sizes", nargs="*", default=["xxl", "100m", "300m", "1b"], help="pairs part")
    p.add_argument("--pair-batches", nargs="*", type=int, default=[64, 128, 256], help="pairs part")
    p.add_argument("--checkpoint-batch", type=int, default=256,
                   help="pairs part: batch of the checkpointed step of the last pair (0: none)")
    p.add_argument("--fused-batches", nargs="*", type=int, default=[256], help="fused part")
    p.add_argument("--peak-tflops", type=float)
    p.add_argument("--json", help="also write every measurement to this file")
    p.add_argument("--device", default="cuda", help="cpu: a quick dry run of the script itself (tiny shapes)")
    args = p.parse_args()
    global DEVICE
    DEVICE = args.device
    TokenEmbedding.channels_last_on_cuda = not args.frames_nchw
    if DEVICE == "cpu":
        SIZES[:] = ["xs"]
        MIXER_SHAPES[:] = [(32, 24)]
        args.batch, args.context, args.peak_tflops = 2, 6, args.peak_tflops or 1.0
        args.sizes, args.mfu_batches, args.compile_batches = ["xs"], [2], [2]
        args.pair_sizes, args.pair_batches, args.checkpoint_batch = ["xs"], [1], 1
        args.fused_batches = [1]
        FUSED_PARITY_SHAPES[:] = [(16, 11, None), (16, 11, 3)]
        FUSED_TIMING.update(warmup=0, repeats=1)
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False  # parity and float32 timings in true float32
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    backends = args.backends or available_backends(DEVICE)
    peak = peak_tflops(name, args.peak_tflops)
    measured = matmul_tflops() if DEVICE == "cuda" else float("nan")
    print(f"{name}; torch {torch.__version__}; backends {backends}; dense bf16 peak {peak:.0f} TFLOP/s "
          f"(data sheet), one 8192^3 bf16 matmul reached {measured:.0f} TFLOP/s here", flush=True)
    out = {"device": name, "torch": torch.__version__, "peak_tflops": peak, "matmul_tflops": measured}
    started = time.time()
    if "parity" in args.parts:
        out["parity"] = parity([b for b in backends if b != "ref"])
    if "mixer" in args.parts:
        out["mixer"] = mixer_throughput(backends)
    if "train" in args.parts:
        out["train"] = train_throughput([b for b in backends if b != "ref"], peak, args.batch, args.context)
    fast_backends = [b for b in backends if b not in ("ref", "fast")] or ["fast"]  # the fused kernels when present
    if "profile" in args.parts:
        for family in args.families:
            for backend in (fast_backends if family == "mambadm" else fast_backends[:1]):
                profile_step(family, args.sizes[0], backend, args.batch, args.context)
    if "pairs" in args.parts:
        out["pairs"] = pair_tables(args.pair_sizes, fast_backends[0], peak, args.context, args.pair_batches,
                                   args.checkpoint_batch)
    if "fused" in args.parts:
        out["fused_parity"] = fused_conv_parity()
        out["fused_steps"] = fused_conv_steps(args.sizes[0], args.fused_batches, args.context, peak, backends)
    if "mfu" in args.parts:
        out["mfu"] = mfu_sweep(args.families, args.sizes, fast_backends, peak, args.context, args.mfu_batches,
                               args.compile_batches)
    print(f"\n(total {time.time() - started:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
