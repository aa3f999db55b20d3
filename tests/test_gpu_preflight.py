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


def plant_tree(root: Path, package: str, files: dict[str, str], extension: str) -> None:
    """An unpacked source distribution: NAME-VERSION/ with setup.py (building `extension`) and the package's files."""
    tree = root / f"{package}-1.0"
    (tree / package).mkdir(parents=True)
    (tree / "setup.py").write_text(f'ext_modules = [CUDAExtension(\n    name="{extension}", sources=[])]\n')
    for name, text in files.items():
        (tree / package / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / package / name).write_text(text)


def test_kernel_sources_may_import_only_what_the_machine_has(tmp_path):
    plant_tree(tmp_path, "kern", {
        "__init__.py": "import os\nfrom kern.ops.scan import scan\nfrom .util import helper\n",
        "ops/__init__.py": "",
        "ops/scan.py": "import torch\nimport kern_cuda\nfrom . import fused\ntry:\n    import tilelang\n"
                       "except ImportError:\n    tilelang = None\ndef later():\n    import cutlass\n",
        "ops/fused.py": "from einops import rearrange\n",
        "util.py": "from huggingface_hub import hf_hub_download\nimport other_kernel\n",
        "unused.py": "import not_imported_by_anyone\n"}, extension="kern_cuda")
    plant_tree(tmp_path, "other_kernel", {"__init__.py": "import other_kernel_cuda\n"}, extension="other_kernel_cuda")
    imports = gpu_preflight.unguarded_imports(tmp_path / "kern-1.0", "kern")
    assert imports == {"os", "torch", "kern_cuda", "einops", "huggingface_hub", "other_kernel"}, imports
    assert gpu_preflight.source_imports_missing(tmp_path) == {}  # stdlib, image, built extensions, sibling tree
    (tmp_path / "kern-1.0" / "kern" / "ops" / "fused.py").write_text("import flash_attn\nimport einops\n")
    assert gpu_preflight.source_imports_missing(tmp_path) == {"kern-1.0": {"flash_attn"}}
    done = preflight("--sources", str(tmp_path))
    assert done.returncode == 1 and "kern-1.0 imports flash_attn, which the GPU machine lacks" in done.stderr
    done = preflight("--sources", str(tmp_path / "kern-1.0" / "kern"))
    assert done.returncode == 2 and "no unpacked source tree" in done.stderr, done.stderr


def test_kernel_sources_download_trimmed_and_checked(tmp_path):
    """benchmarks/gpu_kernel_sources.sh (from PyPI): both trees unpacked, trimmed for the lean build, their imports
    on the GPU image; a folder holding other files is refused and left alone."""
    target = tmp_path / "kernels"
    script = ["bash", "benchmarks/gpu_kernel_sources.sh", str(target)]
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(script, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    trees = sorted(p.name for p in target.iterdir())
    assert [t.split("-")[0] for t in trees] == ["causal_conv1d", "mamba_ssm"], trees
    mamba, conv = (target / t for t in reversed(trees))
    assert "selective_scan_cuda was built lean (LEAN=1)" in (mamba / "csrc/selective_scan/static_switch.h").read_text()
    assert "causal_conv1d_cuda was built lean (LEAN=1)" in (conv / "csrc/causal_conv1d_fwd.cu").read_text()
    assert "import only what the GPU machine has" in done.stdout
    (target / "notes.txt").write_text("mine")
    refused = subprocess.run(script, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "holds files other than kernel sources" in refused.stderr
    assert sorted(p.name for p in target.iterdir()) == sorted(trees + ["notes.txt"])


def test_download_scripts_refuse_a_file_as_their_folder(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    env = {**os.environ, "PYTHON": sys.executable}
    for script in ("gpu_kernel_sources.sh", "gpu_wheels.sh"):
        done = subprocess.run(["bash", f"benchmarks/{script}", str(target)], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 2 and f"{target} is not a folder" in done.stderr, (script, done.stderr)
        assert target.read_text() == "mine"
