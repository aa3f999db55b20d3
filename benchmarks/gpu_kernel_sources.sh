#!/usr/bin/env bash
# Downloads, on a machine with PyPI, the source distributions of mamba-ssm and causal-conv1d (the `cuda` backend's
# kernels), unpacks them and trims them for the lean build (LEAN=1 of build_cuda_kernels.sh), so that a GPU machine
# without network builds them in under a minute and benchmarks/gpu_session.sh compares `cuda` with `triton`:
#
#     benchmarks/gpu_kernel_sources.sh [DIR]        # default .kernels (git-ignored); about 2 MB unpacked
#
# then send DIR with the working tree and pass it as gpu_session.sh's KERNEL_SRC_DIR. Versions: MAMBA_SSM and
# CAUSAL_CONV1D (default the ones the last GPU session built). The trees are made in a scratch folder first: DIR is
# replaced only once both are unpacked and trimmed.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.kernels}
mamba=${MAMBA_SSM:-2.3.2.post1}
conv=${CAUSAL_CONV1D:-1.7.0}
python=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
if [ -e "$dir" ] && [ ! -d "$dir" ]; then
    echo "gpu_kernel_sources: $dir is not a folder" >&2
    exit 2
fi
if [ -e "$dir" ] && [ -n "$(find "$dir" -mindepth 1 -maxdepth 1 ! -name 'mamba_ssm-*' ! -name 'causal_conv1d-*' \
        -print -quit)" ]; then
    echo "gpu_kernel_sources: $dir holds files other than kernel sources; name an empty or a sources-only folder" >&2
    exit 2
fi
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
# Their setup scripts run to read the metadata: without these they look for nvcc, which this machine need not have.
MAMBA_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE "$python" -m pip download -q --no-deps \
    --no-binary=:all: --no-build-isolation -d "$scratch" "mamba-ssm==$mamba" "causal-conv1d==$conv"
for archive in "$scratch"/mamba_ssm-"$mamba".tar.gz "$scratch"/causal_conv1d-"$conv".tar.gz; do
    if [ ! -f "$archive" ]; then
        echo "gpu_kernel_sources: pip did not save $(basename "$archive"); $dir left as it was" >&2
        exit 1
    fi
    tar xzf "$archive" -C "$scratch"
done
"$python" benchmarks/lean_selective_scan.py "$scratch/mamba_ssm-$mamba"
"$python" benchmarks/lean_causal_conv1d.py "$scratch/causal_conv1d-$conv"
"$python" benchmarks/gpu_preflight.py --sources "$scratch"  # they import only what the GPU machine has
mkdir -p "$dir"
rm -rf "$dir"/mamba_ssm-* "$dir"/causal_conv1d-*
mv "$scratch/mamba_ssm-$mamba" "$scratch/causal_conv1d-$conv" "$dir"/
du -sh "$dir"
ls "$dir"
