"""benchmarks/gpu_preflight.py: what the GPU session imports is on the GPU machine's image or among the wheels it
carries (with their own requirements), and a missing package stops the session at once, named."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_preflight  # noqa: E402

ENV = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}


def preflight(*args: str, block: str | None = None) -> subprocess.CompletedProcess:
    """Runs the script in a fresh interpreter; `block` makes that module unimportable there."""
    code = "import runpy, sys\n"
    if block:
        code += f"sys.modules[{block!r}] = None\n"  # import raises ModuleNotFoundError, as on a machine without it
    code += f"sys.argv = ['gpu_preflight.py', *{list(args)!r}]\n"
    code += "runpy.run_path('benchmarks/gpu_preflight.py', run_name='__main__')\n"
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=300)


def test_what_the_session_loads_is_on_the_machine_or_carried():
    done = preflight("--dists")
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = set(done.stdout.split())
    assert {"torch", "triton", "accelerate", "omegaconf", "webdataset", "zstandard"} <= loaded, loaded
    missing = loaded - gpu_preflight.MACHINE - {gpu_preflight.canonical(c) for c in gpu_preflight.CARRY}
    assert not missing, f"add to gpu_preflight.CARRY (the GPU image lacks them): {sorted(missing)}"


def test_carried_wheels_are_needed_and_complete():
    carry = {gpu_preflight.canonical(c) for c in gpu_preflight.CARRY}
    assert not carry & gpu_preflight.MACHINE, "already on the image: carrying them would shadow its versions"
    for name in gpu_preflight.CARRY:
        needs = gpu_preflight.requirements(name) - gpu_preflight.MACHINE - carry
        assert not needs, (name, needs)
    pins = preflight("--wheels").stdout.split()
    assert [p.split("==")[0] for p in pins] == list(gpu_preflight.CARRY) and all("==" in p for p in pins), pins


def test_a_missing_package_stops_the_session_and_names_it():
    done = preflight(block="zstandard")
    assert done.returncode == 1
    assert "cannot import zstandard" in done.stderr and "gpu_wheels.sh" in done.stderr, done.stderr[-2000:]
    assert preflight().returncode == 0
