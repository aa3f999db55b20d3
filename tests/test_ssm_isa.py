"""The CPU kernels as built for a machine with a lesser vector ISA than this one.

The extension is compiled for the ISA torch reports (mambadm/kernels/build.py): AVX-512 machines get the intrinsics
state loop (decays in base 2 with A pre-scaled), AVX2 and older ones the portable loop (natural-base exp). A
subprocess with ATEN_CPU_CAPABILITY lowered makes torch report the lesser ISA, so the portable build is compiled
and every kernel test of the scan, the conv, the mixer and the recurrent stack step runs against it.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ORDER = {"DEFAULT": 0, "AVX2": 1, "AVX512": 2}


@pytest.mark.slow
@pytest.mark.parametrize("capability, isa", [("avx2", "avx2"), ("default", "generic")])
def test_kernel_tests_pass_with_the_build_for_a_lesser_isa(capability, isa):
    here = ORDER.get(torch.backends.cpu.get_cpu_capability(), 0)
    if ORDER[capability.upper()] >= here:
        pytest.skip(f"this machine's own build is {torch.backends.cpu.get_cpu_capability()}: nothing lesser to test")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    probe = subprocess.run(
        [sys.executable, "-c",
         "from mambadm.kernels import build; print(build._isa_flags()[0], build.cpp_missing())"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    assert probe.stdout.split() == [isa, "None"], probe.stdout + probe.stderr
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_ssm_scan.py",
         "tests/test_ssm_mixer.py", "tests/test_model.py", "-k", "cpp or stack_step"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and " failed" not in run.stdout, run.stdout[-2000:]
