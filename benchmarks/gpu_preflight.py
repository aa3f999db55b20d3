"""Can the GPU machine run benchmarks/gpu_session.sh? Its first step imports what the session imports and stops it in
seconds, naming the missing package, instead of letting every step fail on the same import.

    python3 benchmarks/gpu_preflight.py            # exit 0, or 1 naming what is missing and how to bring it
    python3 benchmarks/gpu_preflight.py --wheels   # NAME==VERSION (as installed here) of the wheels to carry
    python3 benchmarks/gpu_preflight.py --dists    # the distributions that importing the session's code loads
    python3 benchmarks/gpu_preflight.py --sources DIR   # the kernel sources to build there import only what it has

The GPU machine has no network: a package its image lacks travels as a wheel (benchmarks/gpu_wheels.sh downloads
them for its Python, gpu_session.sh's WHEEL_DIR installs them). MACHINE lists the image's distributions as read on
that machine (2026-11-17; Python 3.12, torch 2.11, triton 3.6); CARRY is what the session needs beyond them.
tests/test_gpu_preflight.py checks that what the session's modules load here is in MACHINE or CARRY, and that
CARRY's own requirements are too, so a new dependency cannot cost a device session. `--sources` reads the unpacked
mamba-ssm / causal-conv1d trees (benchmarks/gpu_kernel_sources.sh) without importing them (they need CUDA): what
importing each package imports outside a try block must be the standard library, the package itself, the CUDA
extension its setup.py builds, or in MACHINE.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import importlib.metadata as metadata
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# What the session's steps import at start-up: the training CLI and its data path, the Triton kernels, the two
# benchmark scripts, and the tests it runs (through their own imports).
ENTRY = ("mambadm.train", "mambadm.data", "mambadm.export", "mambadm.model", "mambadm.optim",
         "mambadm.ssm.scan_triton", "mambadm.ssm.conv_triton", "accelerate", "pytest")
SCRIPTS = ("benchmarks/bench_gpu.py", "benchmarks/bench_triton_scan.py", "tests/test_ssm_triton.py",
           "tests/test_triton_conv.py")

CARRY = ("omegaconf", "webdataset", "braceexpand", "zstandard")

MACHINE = frozenset("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy
seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy
tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())


def canonical(name: str) -> str:
    """A distribution name as pip compares them (PEP 503): lower case, runs of -_. as one '-'."""
    return re.sub(r"[-_.]+", "-", name).lower()


def load_entry() -> None:
    """Imports ENTRY and SCRIPTS' modules (the scripts are run up to their first line of work: imported, not run)."""
    sys.path[:0] = [str(REPO), str(REPO / "tests")]
    for name in ENTRY:
        importlib.import_module(name)
    for script in SCRIPTS:
        path = REPO / script
        spec = importlib.util.spec_from_file_location(f"_preflight_{path.stem}", path)
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


def loaded_distributions() -> set[str]:
    """The third-party distributions (canonical names) that provide a module loaded now; the project excluded. A
    namespace shared by several distributions (google.*) counts only those that hold a loaded subpackage."""
    owners = metadata.packages_distributions()
    subs: dict[str, set[str]] = {}
    for name in sys.modules:
        top, _, rest = name.partition(".")
        subs.setdefault(top, set()).add(rest.split(".")[0])
    found = set()
    for top, loaded in subs.items():
        dists = owners.get(top, [])
        for dist in dists:
            provides = {f.parts[1].removesuffix(".py") for f in metadata.files(dist) or []
                        if len(f.parts) > 1 and f.parts[0] == top}
            if len(dists) == 1 or provides & loaded:
                found.add(canonical(dist))
    return found - {"mambadm"}


def unguarded_imports(root: Path, package: str) -> set[str]:
    """Top-level names of the modules outside `package` that `import package` imports (its tree unpacked under
    `root`), following its own modules' imports; imports inside try blocks or functions are optional and skipped."""
    seen, todo, outside = set(), [package], set()
    while todo:
        name = todo.pop()
        base = root / Path(*name.split("."))
        path = next((f for f in (base.with_suffix(".py"), base / "__init__.py") if f.is_file()), None)
        if name in seen or path is None:  # a name imported from a module rather than a module
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # importing a.b.c runs a and a.b first
        for node in ast.parse(path.read_text(), str(path)).body:
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                module = node.module or ""
                if node.level:  # relative: from the package holding this module
                    here = parts if path.name == "__init__.py" else parts[:-1]
                    module = ".".join(here[: len(here) - node.level + 1] + ([module] if module else []))
                names = [module] + [f"{module}.{alias.name}" for alias in node.names]
            else:
                continue
            for imported in names:
                (todo.append(imported) if imported.split(".")[0] == package else outside.add(imported.split(".")[0]))
    return outside


def source_imports_missing(src: Path) -> dict[str, set[str]]:
    """For each unpacked kernel source tree under `src` (NAME-VERSION/ with NAME/ and setup.py): the modules its
    package imports that the GPU machine lacks (not stdlib, not itself, not its built extension, not in MACHINE)."""
    trees = sorted(d for d in src.iterdir() if d.is_dir() and (d / "setup.py").is_file())
    if not trees:
        raise FileNotFoundError(f"{src}: no unpacked source tree (NAME-VERSION/setup.py) in it")
    extension = re.compile(r"CUDAExtension\(\s*name=[\"'](\w+)")
    built = {m for d in trees for m in extension.findall((d / "setup.py").read_text())}
    packages = {d.name.split("-")[0] for d in trees}
    missing = {}
    for tree in trees:
        package = tree.name.split("-")[0]
        if not (tree / package / "__init__.py").is_file():
            raise FileNotFoundError(f"{tree}: no package {package}/ in it")
        lacking = {m for m in unguarded_imports(tree, package)
                   if m not in sys.stdlib_module_names and m not in built | packages and canonical(m) not in MACHINE}
        if lacking:
            missing[tree.name] = lacking
    return missing


def requirements(dist: str) -> set[str]:
    """Canonical names of the distributions `dist` (installed here) requires on this machine, extras left out."""
    from packaging.requirements import Requirement

    needs = set()
    for line in metadata.requires(dist) or []:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            needs.add(canonical(req.name))
    return needs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheels", action="store_true", help="print CARRY as NAME==VERSION installed here")
    parser.add_argument("--dists", action="store_true", help="print the distributions the session's code loads")
    parser.add_argument("--sources", type=Path, metavar="DIR",
                        help="check the unpacked kernel sources in DIR against the machine's packages")
    args = parser.parse_args(argv)
    if args.sources:
        try:
            missing = source_imports_missing(args.sources)
        except (FileNotFoundError, NotADirectoryError, SyntaxError) as exc:
            print(f"gpu_preflight: {exc}", file=sys.stderr)
            return 2
        for tree, modules in missing.items():
            print(f"gpu_preflight: {tree} imports {', '.join(sorted(modules))}, which the GPU machine lacks: carry "
                  "their wheels too (gpu_session.sh WHEEL_DIR), or the `cuda` backend will not import there",
                  file=sys.stderr)
        if not missing:
            print(f"gpu_preflight: the kernel sources in {args.sources} import only what the GPU machine has")
        return 1 if missing else 0
    if args.wheels:
        try:
            pins = [f"{name}=={metadata.version(name)}" for name in CARRY]
        except metadata.PackageNotFoundError as exc:
            print(f"gpu_preflight: {exc.name} is not installed here, so its version is unknown: install the project "
                  "(bash scripts/setup.sh) first", file=sys.stderr)
            return 2
        print("\n".join(pins))
        return 0
    try:
        load_entry()
    except ImportError as exc:  # ModuleNotFoundError names the module
        print(f"gpu_preflight: this machine cannot import {exc.name or exc}: {exc}. Carry the wheels of "
              f"{', '.join(CARRY)} (benchmarks/gpu_wheels.sh writes them; gpu_session.sh WHEEL_DIR installs them).",
              file=sys.stderr)
        return 1
    if args.dists:
        print("\n".join(sorted(loaded_distributions())))
    else:
        print(f"gpu_preflight: the session's modules import (python {sys.version.split()[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
