"""The issue-18 targets against what one run of benchmarks/gpu_session.sh (step 0) measured, as a markdown table,
and what that run decides: the chunked Triton scan, the scan's launch, the fused Triton conv, `cuda` against `triton`.

    python benchmarks/gpu_targets.py OUT_DIR [--memory-gib 78]

Reads OUT_DIR/env.txt (the card), scale_tests.txt (the compiled GPU tests), scale_triton_ratio.txt (backward /
forward per kernel pair), scale_launch.txt and scan_launch.env (the launch picked), bench_gpu_fused.json and
bench_gpu_pairs.json (or, if its step was cut before writing it, the rows scale_pairs.txt had printed). Targets (one GPU, bf16):
- MambaDM tokens/s >= DT's at every parameter-matched pair from 28M (xxl) up: each family's best eager row;
- MFU >= 25% for both families at every preset >= 100M parameters (the best row; its batch is named);
- the 1B pair trains on one 80 GB GPU: a row of each family at 1b (plain or checkpointed) whose peak memory is at
  most --memory-gib (an 80 GB card leaves about 78 GiB to a program);
- Triton scan backward / forward <= 2 at L = 90 and L = 3072 (default launches), for the kernel pair the tables
  ran (scan_launch.env, the launch bench_triton_scan.py --pick chose, else the pair whose GPU tests passed);
and the launch picked, whether mamba_ssm's kernels (`cuda`, built from KERNEL_SRC_DIR) were timed beside `triton`
(the fused step).
A target whose rows are missing (a failed or cut step) reads "not measured", never "met".
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PAIR_SIZES = ("xxl", "100m", "300m", "1b")  # the pairs from 28M up
LARGE = ("100m", "300m", "1b")  # >= 100M parameters
MFU_TARGET, RATIO_TARGET = 0.25, 2.0


class BadOutput(ValueError):
    """A file of the session's folder that cannot be read as the session writes it."""


def read_json(path: Path, key: str) -> list[dict]:
    if not path.is_file():
        return []
    try:
        return json.loads(path.read_text()).get(key, [])
    except (ValueError, AttributeError) as exc:
        raise BadOutput(f"{path}: not the JSON object bench_gpu.py writes ({exc})") from exc


def table_cells(line: str) -> list[str]:
    """The cells of one markdown table row, stripped."""
    return [c.strip() for c in line.strip().strip("|").split("|")]


def pair_rows(out: Path) -> list[dict]:
    """bench_gpu.py's pair rows: from bench_gpu_pairs.json, or, where the step was cut before writing it, from the
    rows it had printed to scale_pairs.txt (| family | size | backend | ckpt | params | batch | K | step ms |
    tokens/s | TFLOP/s | MFU | peak GiB |)."""
    if (out / "bench_gpu_pairs.json").is_file():
        return read_json(out / "bench_gpu_pairs.json", "pairs")
    rows = []
    text = (out / "scale_pairs.txt").read_text() if (out / "scale_pairs.txt").is_file() else ""
    for line in text.splitlines():
        cells = table_cells(line)
        if len(cells) < 12 or cells[0] not in ("dt", "mambadm"):
            continue
        try:  # a row cut mid-print by the step's time limit is skipped
            row = {"family": cells[0], "size": cells[1], "grad_checkpoint": cells[3] == "True",
                   "batch": int(cells[5])}
            if cells[7] == "OOM":
                rows.append({**row, "oom": True})
                continue
            rows.append({**row, "step_ms": float(cells[7]), "tokens_per_s": float(cells[8].replace(",", "")),
                         "mfu": float(cells[10].rstrip("%")) / 100, "peak_gib": float(cells[11])})
        except ValueError:
            continue
    return rows


def ratio_rows(path: Path) -> list[dict]:
    """The rows of bench_triton_scan.py's backward / forward table that ran (a failed row has no ratio)."""
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        cells = table_cells(line)
        if len(cells) >= 8 and cells[0] in ("chunked", "serial"):
            try:
                rows.append({"kernel": cells[0], "L": int(cells[2]), "segment": cells[4], "fwd_ms": float(cells[5]),
                             "bwd_ms": float(cells[6]), "ratio": float(cells[7])})
            except ValueError:
                continue
    return rows


def launch_exports(path: Path) -> dict[str, str]:
    """The variables scan_launch.env exports (bench_triton_scan.py --pick): {} when the pick wrote none."""
    exports = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        name, sep, value = line.removeprefix("export ").partition("=")
        if sep and name in ("MAMBADM_TRITON_SCAN", "MAMBADM_TRITON_LAUNCH"):
            exports[name] = value.strip()
    return exports


def launch_decision(path: Path, picked: dict[str, str]) -> tuple[str, str, str]:
    """The launch bench_triton_scan.py --pick chose, and whether it differs from its pair's default launch (the
    pair's first row in the pick's table: the defaults are tried first)."""
    text = path.read_text() if path.is_file() else ""
    line = next((line for line in text.splitlines() if line.startswith("picked: ")), "")
    decision = "launch the tables ran (bench_triton_scan.py --pick)"
    if not picked or not line:
        return decision, "-", "not measured"
    defaults: dict[str, dict[str, str]] = {}
    for cells in map(table_cells, text.splitlines()):
        if len(cells) > 4 and cells[0] in ("chunked", "serial") and cells[1].isdigit():
            chunk = {} if cells[3] == "None" else {"chunk": cells[3]}
            defaults.setdefault(cells[0], {"block": cells[1], "warps": cells[2], **chunk})
    chosen = dict(item.split("=", 1) for item in picked.get("MAMBADM_TRITON_LAUNCH", "").split(",") if "=" in item)
    default = defaults.get(picked.get("MAMBADM_TRITON_SCAN", ""))
    return decision, line.removeprefix("picked: ").split(": ")[0], \
        "keep its pair's default launch" if chosen == default else "make it the default"


def best(rows: list[dict], key: str) -> dict | None:
    ran = [r for r in rows if r.get(key) is not None and not r.get("oom") and "failed" not in r]
    return max(ran, key=lambda r: r[key]) if ran else None


def verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("met" if ok else "not met")


def cuda_comparison(steps: list[dict]) -> tuple[str, str, str]:
    """mamba_ssm's kernels (`cuda`) against `triton` (its faster row, fused conv off or on) in the fused step's
    MambaDM training step: the issue keeps `cuda` selectable and compared in the same run."""
    ran = [r for r in steps if r.get("family") == "mambadm" and r.get("step_ms")]
    triton = min((r for r in ran if r["backend"] == "triton"), key=lambda r: r["step_ms"], default=None)
    cuda = next((r for r in ran if r["backend"] == "cuda"), None)
    failed = next((r["failed"] for r in steps if r.get("backend") == "cuda" and "failed" in r), None)
    target = "`cuda` (mamba_ssm) compared with `triton` in the same run"
    if triton is None or cuda is None:
        why = f"cuda row: {failed}" if failed else "no cuda row (KERNEL_SRC_DIR not given, or its build failed)"
        return target, why if triton or failed else "-", "not measured"
    return target, (f"MambaDM {cuda['size']} batch {cuda['batch']}: triton {triton['step_ms']:.1f} ms (fused conv "
                    f"{triton['fused_conv']}), cuda {cuda['step_ms']:.1f} ms: triton "
                    f"{cuda['step_ms'] / triton['step_ms']:.2f}x faster"), "compared"


def evaluate(out: Path, memory_gib: float) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) rows, then the two defaults as (decision, evidence, choice)."""
    pairs = pair_rows(out)
    plain = [r for r in pairs if not r.get("grad_checkpoint")]
    rows = []

    ratios, speed_ok = [], []
    for size in PAIR_SIZES:
        dt = best([r for r in plain if r["family"] == "dt" and r["size"] == size], "tokens_per_s")
        mdm = best([r for r in plain if r["family"] == "mambadm" and r["size"] == size], "tokens_per_s")
        if dt and mdm:
            ratios.append(f"{size} {mdm['tokens_per_s'] / dt['tokens_per_s']:.2f}x")
            speed_ok.append(mdm["tokens_per_s"] >= dt["tokens_per_s"])
        else:
            ratios.append(f"{size} -")
            speed_ok.append(None)
    rows.append(("MambaDM tokens/s >= DT, every pair from 28M", ", ".join(ratios),
                 verdict(None if None in speed_ok else all(speed_ok))))

    mfus, mfu_ok = [], []
    for size in LARGE:
        for family in ("dt", "mambadm"):
            top = best([r for r in plain if r["family"] == family and r["size"] == size], "mfu")
            mfus.append(f"{family}-{size} " + (f"{100 * top['mfu']:.1f}% (batch {top['batch']})" if top else "-"))
            mfu_ok.append(None if top is None else top["mfu"] >= MFU_TARGET)
    rows.append(("MFU >= 25%, both families, every preset >= 100M", ", ".join(mfus),
                 verdict(None if None in mfu_ok else all(mfu_ok))))

    fits, fit_ok = [], []
    for family in ("dt", "mambadm"):
        ran = [r for r in pairs if r["family"] == family and r["size"] == "1b" and r.get("peak_gib") is not None
               and not r.get("oom")]
        small = min(ran, key=lambda r: r["peak_gib"]) if ran else None
        fits.append(f"{family}-1b " + (f"{small['peak_gib']:.1f} GiB (batch {small['batch']}, checkpointed "
                                       f"{small['grad_checkpoint']}, {small['step_ms']:.0f} ms)" if small else "-"))
        fit_ok.append(None if small is None else small["peak_gib"] <= memory_gib)
    rows.append((f"1B pair trains on one 80 GB GPU (peak <= {memory_gib:g} GiB)", ", ".join(fits),
                 verdict(None if None in fit_ok else all(fit_ok))))

    scan = ratio_rows(out / "scale_triton_ratio.txt")
    tests = (out / "scale_tests.txt").read_text() if (out / "scale_tests.txt").is_file() else ""
    picked = launch_exports(out / "scan_launch.env")
    kernel = picked.get("MAMBADM_TRITON_SCAN") or ("serial" if "MAMBADM_TRITON_SCAN=serial" in tests else "chunked")
    mine = [r for r in scan if r["kernel"] == kernel]
    lengths = {r["L"] for r in mine}
    rows.append((f"Triton scan backward / forward <= 2 at L = 90 and 3072 ({kernel})",
                 ", ".join(f"L {r['L']} seg {r['segment']}: {r['ratio']:.2f}" for r in mine) or "-",
                 verdict(None if not {90, 3072} <= lengths else all(r["ratio"] <= RATIO_TARGET for r in mine))))

    def total(k: str) -> dict[tuple, float]:
        return {(r["L"], r["segment"]): r["fwd_ms"] + r["bwd_ms"] for r in scan if r["kernel"] == k}

    chunked, serial = total("chunked"), total("serial")
    chunked_passed = "== tests/test_ssm_triton.py exit 0" in tests
    faster = bool(chunked) and set(chunked) == set(serial) and all(chunked[s] < serial[s] for s in chunked)
    rows.append(("default scan: chunked", f"GPU tests passed {chunked_passed}; fwd + bwd faster than serial at "
                 f"every shape {faster}", "switch to chunked" if chunked_passed and faster else "keep serial"))
    rows.append(launch_decision(out / "scale_launch.txt", picked))
    steps = read_json(out / "bench_gpu_fused.json", "fused_steps")
    rows.append(cuda_comparison(steps))
    fused = [r for r in steps if r.get("fused_speedup")]
    conv_passed = "== tests/test_triton_conv.py exit 0" in tests
    speedup = fused[0]["fused_speedup"] if fused else None
    rows.append(("default conv: fused Triton", f"GPU tests passed {conv_passed}; step speed-up "
                 + ("-" if speedup is None else f"{speedup:.2f}x"),
                 "switch on" if conv_passed and speedup is not None and speedup > 1 else "keep off"))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the folder gpu_session.sh wrote")
    parser.add_argument("--memory-gib", type=float, default=78.0)
    args = parser.parse_args(argv)
    if not args.out.is_dir():
        print(f"gpu_targets: {args.out} is not a folder", file=sys.stderr)
        return 2
    env = (args.out / "env.txt").read_text().splitlines() if (args.out / "env.txt").is_file() else []
    card = next((line for line in env if "," in line and "MiB" in line), "card not named in env.txt")
    try:
        rows = evaluate(args.out, args.memory_gib)
    except BadOutput as exc:
        print(f"gpu_targets: {exc}", file=sys.stderr)
        return 2
    print(f"issue-18 targets, {card}\n\n| target | measured | status |\n|---|---|---|")
    for target, measured, status in rows:
        print(f"| {target} | {measured} | {status} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
