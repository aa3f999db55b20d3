"""benchmarks/gpu_targets.py reads a gpu_session.sh output folder and says met / not met / not measured per issue-18
target, and which defaults the run decides. Planted folders in the session's formats (the dry run's real files are
read in tests/test_gpu_session.py)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_targets  # noqa: E402


def row(family, size, batch, tokens, mfu, peak, ckpt=False):
    return {"family": family, "size": size, "batch": batch, "grad_checkpoint": ckpt, "tokens_per_s": tokens,
            "mfu": mfu, "peak_gib": peak, "step_ms": 100.0}


def session(tmp_path: Path, mambadm_speed: float, chunked_bwd: float, fused_speedup: float) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    (out / "env.txt").write_text("gpu_preflight: ok\nNVIDIA H100 80GB HBM3, 81559 MiB, 580.159.04\n16\n")
    (out / "scale_tests.txt").write_text("== tests/test_ssm_triton.py exit 0\n== tests/test_triton_conv.py exit 0\n")
    pairs = []
    for size in gpu_targets.PAIR_SIZES:
        pairs += [row("dt", size, 128, 1e6, 0.30, 40.0), row("dt", size, 256, 1.1e6, 0.31, 70.0),
                  row("mambadm", size, 128, mambadm_speed * 1.1e6, 0.28, 35.0),
                  {"family": "mambadm", "size": size, "batch": 256, "grad_checkpoint": False, "oom": True}]
    pairs.append(row("mambadm", "1b", 256, 5e5, 0.2, 30.0, ckpt=True))
    (out / "bench_gpu_pairs.json").write_text(json.dumps({"device": "H100", "pairs": pairs}))
    fused = {"size": "xxl", "batch": 256}
    (out / "bench_gpu_fused.json").write_text(json.dumps({"fused_steps": [
        {**fused, "family": "dt", "backend": "-", "fused_conv": None, "step_ms": 50.0, "fused_speedup": None},
        {**fused, "family": "mambadm", "backend": "triton", "fused_conv": False, "step_ms": 120.0,
         "fused_speedup": None},
        {**fused, "family": "mambadm", "backend": "triton", "fused_conv": True, "step_ms": 120.0 / fused_speedup,
         "fused_speedup": fused_speedup}]}))
    table = ["| kernel | rows | L | d_inner | segment | fwd ms | bwd ms | bwd / fwd | grads |", "|---|---|---|---|---|---|---|---|---|"]
    for kernel, bwd in (("chunked", chunked_bwd), ("serial", 4.0)):
        for rows, length, seg in ((256, 90, "None"), (256, 90, "15"), (16, 3072, "None")):
            table.append(f"| {kernel} | {rows} | {length} | 1024 | {seg} | 1.000 | {bwd:.3f} | {bwd:.2f} | 1e-06 |")
    (out / "scale_triton_ratio.txt").write_text("\n".join(table) + "\nexit 0\n")
    return out


def status(rows, prefix: str) -> str:
    return next(s for t, _, s in rows if t.startswith(prefix))


def test_targets_met_and_defaults_switched(tmp_path):
    rows = gpu_targets.evaluate(session(tmp_path, mambadm_speed=1.05, chunked_bwd=1.8, fused_speedup=1.2), 78.0)
    assert status(rows, "MambaDM tokens/s") == "met"
    assert status(rows, "MFU") == "met"  # best rows: DT 31%, MambaDM 28%
    assert status(rows, "1B pair") == "met"
    assert status(rows, "Triton scan") == "met"
    assert status(rows, "default scan") == "switch to chunked" and status(rows, "default conv") == "switch on"


def test_targets_not_met_and_defaults_kept(tmp_path):
    out = session(tmp_path, mambadm_speed=0.5, chunked_bwd=4.5, fused_speedup=0.9)
    rows = gpu_targets.evaluate(out, 30.0)  # DT's smallest 1b peak is 40 GiB: over a 30 GiB card
    assert status(rows, "MambaDM tokens/s") == "not met"
    assert "1b 0.50x" in next(m for t, m, _ in rows if t.startswith("MambaDM tokens/s"))
    assert status(rows, "1B pair") == "not met" and status(rows, "Triton scan") == "not met"
    assert status(rows, "default scan") == "keep serial" and status(rows, "default conv") == "keep off"


def test_missing_rows_read_not_measured_and_the_cli_names_the_card(tmp_path):
    out = session(tmp_path, 1.05, 1.8, 1.2)
    pairs = json.loads((out / "bench_gpu_pairs.json").read_text())
    pairs["pairs"] = [r for r in pairs["pairs"] if r["size"] != "300m"]  # the step was cut before 300m
    (out / "bench_gpu_pairs.json").write_text(json.dumps(pairs))
    (out / "scale_triton_ratio.txt").write_text("exit 124\n")
    rows = gpu_targets.evaluate(out, 78.0)
    assert status(rows, "MambaDM tokens/s") == status(rows, "MFU") == status(rows, "Triton scan") == "not measured"
    assert status(rows, "1B pair") == "met"
    done = subprocess.run([sys.executable, "benchmarks/gpu_targets.py", str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "NVIDIA H100 80GB HBM3" in done.stdout and "| not measured |" in done.stdout
    bad = subprocess.run([sys.executable, "benchmarks/gpu_targets.py", str(tmp_path / "nope")], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "is not a folder" in bad.stderr
    (out / "bench_gpu_fused.json").write_text('{"fused_steps": [{"family": "dt", ')  # cut mid-write
    bad = subprocess.run([sys.executable, "benchmarks/gpu_targets.py", str(out)], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "bench_gpu_fused.json: not the JSON object" in bad.stderr, bad.stderr
    assert "| target |" not in bad.stdout


def test_pair_rows_read_from_the_printed_table_when_the_json_is_missing(tmp_path):
    out = session(tmp_path, 1.05, 1.8, 1.2)
    (out / "bench_gpu_pairs.json").unlink()
    (out / "scale_pairs.txt").write_text(
        "### pair 1b (K = 30, bf16 autocast, eager, AdamW; MFU against 989 TFLOP/s)\n" + gpu_targets_header() +
        "| dt | 1b | - | False | 1,072,886,788 | 64 | 30 | 412.5 | 13,963 | 90.2 | 9.12% | 41.3 |\n"
        "| dt | 1b | - | False | 1,072,886,788 | 128 | 30 | OOM | | | | |\n"
        "| dt | 1b | - | True | 1,072,886,788 | 256 | 30 | 1530.2 | 15,0 | | | |\n"  # cut mid-print: skipped
        "| mambadm | 1b | triton | True | 1,046,104,324 | 256 | 30 | 2110.0 | 10,919 | 70.1 | 7.09% | 22.4 |\n")
    rows = gpu_targets.pair_rows(out)
    assert [r["family"] for r in rows] == ["dt", "dt", "mambadm"]  # the cut row left out
    assert abs(rows[0].pop("mfu") - 0.0912) < 1e-12
    assert rows[0] == {"family": "dt", "size": "1b", "grad_checkpoint": False, "batch": 64, "step_ms": 412.5,
                       "tokens_per_s": 13963.0, "peak_gib": 41.3}
    assert rows[1]["oom"] and rows[2]["grad_checkpoint"] and rows[2]["peak_gib"] == 22.4
    verdicts = gpu_targets.evaluate(out, 78.0)
    assert status(verdicts, "1B pair") == "met" and status(verdicts, "MFU") == "not measured"


def gpu_targets_header() -> str:
    return ("| family | size | backend | ckpt | params | batch | K | step ms | tokens/s | TFLOP/s | MFU | peak GiB |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|\n")


def test_cuda_compared_with_triton_when_its_row_ran(tmp_path):
    out = session(tmp_path, 1.05, 1.8, 1.2)  # triton: 120 ms with the fused conv off, 100 ms with it on
    rows = gpu_targets.evaluate(out, 78.0)
    assert status(rows, "`cuda` (mamba_ssm)") == "not measured"
    assert "no cuda row" in next(m for t, m, _ in rows if t.startswith("`cuda`"))
    fused = json.loads((out / "bench_gpu_fused.json").read_text())
    cuda = {"family": "mambadm", "size": "xxl", "backend": "cuda", "fused_conv": None, "batch": 256}
    fused["fused_steps"].append({**cuda, "failed": "failed: RuntimeError: selective_scan_cuda was built lean"})
    (out / "bench_gpu_fused.json").write_text(json.dumps(fused))
    rows = gpu_targets.evaluate(out, 78.0)
    assert status(rows, "`cuda` (mamba_ssm)") == "not measured"
    assert "built lean" in next(m for t, m, _ in rows if t.startswith("`cuda`"))
    fused["fused_steps"][-1] = {**cuda, "step_ms": 340.0, "tokens_per_s": 67764.7}
    (out / "bench_gpu_fused.json").write_text(json.dumps(fused))
    rows = gpu_targets.evaluate(out, 78.0)
    measured = next(m for t, m, _ in rows if t.startswith("`cuda`"))
    assert status(rows, "`cuda` (mamba_ssm)") == "compared"
    assert "triton 100.0 ms (fused conv True), cuda 340.0 ms: triton 3.40x faster" in measured, measured
    assert status(rows, "default conv") == "switch on"  # the cuda row leaves the fused conv's decision alone


def test_the_picked_launch_decides_which_pair_the_ratio_target_reads(tmp_path):
    out = session(tmp_path, 1.05, 1.8, 1.2)  # chunked: backward 1.8x its forward, serial: 4x
    rows = gpu_targets.evaluate(out, 78.0)
    assert status(rows, "launch the tables ran") == "not measured" and status(rows, "Triton scan") == "met"
    (out / "scan_launch.env").write_text("export MAMBADM_TRITON_SCAN=serial\nexport MAMBADM_TRITON_LAUNCH=block=64,"
                                         "warps=8\n")
    table = ("| kernel | block | warps | chunk | L 90 seg None fwd+bwd ms | L 90 seg 15 fwd+bwd ms | total ms | vs first | "
             "max rel. diff vs its default |\n|---|---|---|---|---|---|---|---|---|\n"
             "| chunked | 16 | 4 | 8 | 1.6 | 1.4 | 3.0 | 1.00x | 0.0e+00 |\n"
             "| serial | 64 | 4 | None | 1.6 | 1.5 | 3.1 | 0.97x | 0.0e+00 |\n"
             "| serial | 64 | 8 | None | 1.2 | 1.1 | 2.3 | 1.30x | 2.0e-03 |\n")
    (out / "scale_launch.txt").write_text(table + "picked: serial block=64,warps=8 (1.30x the first launch that ran): "
                                          "/tmp/s/scan_launch.env\nexit 0\n")
    rows = gpu_targets.evaluate(out, 78.0)
    assert status(rows, "launch the tables ran") == "make it the default"
    assert next(m for t, m, _ in rows if t.startswith("launch the tables ran")) == \
        "serial block=64,warps=8 (1.30x the first launch that ran)"
    assert status(rows, "Triton scan backward / forward <= 2 at L = 90 and 3072 (serial)") == "not met"
    (out / "scan_launch.env").write_text("export MAMBADM_TRITON_SCAN=chunked\n"
                                         "export MAMBADM_TRITON_LAUNCH=block=16,warps=4,chunk=8\n")
    (out / "scale_launch.txt").write_text(table + "picked: chunked block=16,warps=4,chunk=8 (1.00x the first launch "
                                          "that ran): /tmp/s/scan_launch.env\nexit 0\n")
    rows = gpu_targets.evaluate(out, 78.0)
    assert status(rows, "launch the tables ran") == "keep its pair's default launch"
    assert status(rows, "Triton scan backward / forward <= 2 at L = 90 and 3072 (chunked)") == "met"
