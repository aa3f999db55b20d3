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
from mambadm.optim import make_optimizer  # noqa: E402
from mambadm.ssm import Mamba, available_backends  # noqa: E402

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


def parity(backends: list[str]) -> list[dict]:
    rows = []
    for d_model, length in ((64, 37), (128, 301), (96, 1024)):
        torch.manual_seed(0)
        ref = Mamba(d_model, backend="ref").to(DEVICE)
        x = torch.randn(3, length, d_model, device=DEVICE)
        grad = torch.randn(3, length, d_model, device=DEVICE)
        results = {}
        for name in ["ref", *backends]:
            mixer = Mamba(d_model, backend=name).to(DEVICE)
            mixer.load_state_dict(ref.state_dict())
            xi = x.clone().requires_grad_(True)
            y = mixer(xi)
            y.backward(grad)
            grads = {k: p.grad for k, p in mixer.named_parameters()}
            results[name] = (y.detach(), xi.grad, grads)
        y0, gx0, g0 = results["ref"]
        for name in backends:
            y, gx, g = results[name]
            worst = max(g, key=lambda k: _rel(g[k], g0[k]))
            rows.append({"backend": name, "d_model": d_model, "L": length, "out": _rel(y, y0), "grad_x": _rel(gx, gx0),
                         "grad_param_max": _rel(g[worst], g0[worst]), "worst_param": worst})
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


def atari_batch(batch: int, k: int) -> dict[str, torch.Tensor]:
    g = torch.Generator(device=DEVICE).manual_seed(0)
    return {
        "rtg": torch.rand(batch, k, device=DEVICE, generator=g) * 20,
        "states": torch.randint(0, 256, (batch, k, 4, 84, 84), device=DEVICE, dtype=torch.uint8, generator=g),
        "actions": torch.randint(0, 4, (batch, k), device=DEVICE, generator=g),
        "timesteps": torch.randint(0, 1000, (batch, k), device=DEVICE, generator=g),
        "mask": torch.ones(batch, k, dtype=torch.bool, device=DEVICE),
    }


def train_throughput(backends: list[str], peak: float, batch: int, k: int) -> list[dict]:
    spec = EnvSpec(obs_kind="atari", obs_shape=[4, 84, 84], act_dim=4, discrete=True)
    data = atari_batch(batch, k)
    rows = []
    print(f"\n| family | size | backend | params | batch | K | step ms | tokens/s | TFLOP/s | MFU |"
          "\n|---|---|---|---|---|---|---|---|---|---|")
    for family in ("mambadm", "dt"):
        for size in SIZES:
            for backend in (backends if family == "mambadm" else ["-"]):
                overrides = [f"model.family={family}", f"model.size={size}"]
                if family == "mambadm":
                    overrides.append(f"model.backend={backend}")
                cfg = load_config(None, overrides)
                torch.manual_seed(0)
                model = build_model(cfg.model, spec).to(DEVICE).train()
                opt = make_optimizer(model, cfg.optim)

                def step():
                    with torch.autocast(DEVICE, dtype=torch.bfloat16):
                        loss, _ = model.loss(data)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                    opt.step()
                    opt.zero_grad(set_to_none=True)

                seconds = cuda_time(step, warmup=3, repeats=10)
                tokens = 3 * k * batch / seconds
                tflops = model.flops_per_token(k) * tokens / 1e12
                row = {"family": family, "size": size, "backend": backend, "params": model.num_params(),
                       "batch": batch, "K": k, "step_ms": 1000 * seconds, "tokens_per_s": tokens,
                       "tflops": tflops, "mfu": tflops / peak}
                rows.append(row)
                print(f"| {family} | {size} | {backend} | {row['params']:,} | {batch} | {k} | {row['step_ms']:.1f} | "
                      f"{tokens:,.0f} | {tflops:.1f} | {100 * row['mfu']:.2f}% |", flush=True)
                del model, opt
                torch.cuda.empty_cache()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="*", default=["parity", "mixer", "train"])
    p.add_argument("--backends", nargs="*", help="default: every backend available on the GPU")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--context", type=int, default=30)
    p.add_argument("--peak-tflops", type=float)
    p.add_argument("--json", help="also write every measurement to this file")
    p.add_argument("--device", default="cuda", help="cpu: a quick dry run of the script itself (tiny shapes)")
    args = p.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cpu":
        SIZES[:] = ["xs"]
        MIXER_SHAPES[:] = [(32, 24)]
        args.batch, args.context, args.peak_tflops = 2, 6, args.peak_tflops or 1.0
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
    print(f"\n(total {time.time() - started:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
