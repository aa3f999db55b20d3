#!/usr/bin/env bash
# Builds the `cuda` backend's kernels in place from the unpacked mamba-ssm and causal-conv1d source distributions,
# for ONE GPU architecture (the visible GPU's unless ARCH is given, e.g. 90), which takes minutes instead of the
# release build's dozens of architectures. Afterwards
#     export PYTHONPATH=SRC_DIR/mamba_ssm-<version>:SRC_DIR/causal_conv1d-<version>:$PYTHONPATH
# makes `mamba_ssm` and `causal_conv1d` importable. Needs nvcc, ninja and a CUDA build of torch.
#
#     [LEAN=1] benchmarks/build_cuda_kernels.sh SRC_DIR [ARCH]
#
# LEAN=1 first trims both trees to what MambaDM calls (benchmarks/lean_selective_scan.py and
# benchmarks/lean_causal_conv1d.py): several times fewer kernels to compile.
#
# On a machine with network access `pip install -e .[cuda]` (prebuilt wheels where they exist) is simpler.
set -euo pipefail
src=${1:?usage: build_cuda_kernels.sh SRC_DIR [ARCH]}
arch=${2:-$(python3 -c 'import torch; print("%d%d" % torch.cuda.get_device_capability())')}
jobs=$(nproc)

# Both setup.py files list their -gencode flags in `cc_flag`; keep only the one architecture asked for.
restrict_arch() {
    python3 - "$1" "$arch" <<'EOF'
import sys
path, arch = sys.argv[1], sys.argv[2]
text = open(path).read()
marker = "    # HACK: The compiler flag"
if "restricted to one architecture" not in text:
    if marker not in text:
        sys.exit(f"{path}: cannot find where to restrict the architectures ({marker.strip()!r} not found)")
    line = (f"    cc_flag = [f for f in cc_flag if f != '-gencode' and not f.startswith('arch=')]"
            f" + ['-gencode', 'arch=compute_{arch},code=sm_{arch}']  # restricted to one architecture\n")
    open(path, "w").write(text.replace(marker, line + marker, 1))
EOF
}

build() {  # build DIR ENV_PREFIX MAX_JOBS
    local dir=$1 prefix=$2 max_jobs=$3
    restrict_arch "$dir/setup.py"
    (cd "$dir" && env "${prefix}_FORCE_BUILD=TRUE" MAX_JOBS="$max_jobs" NVCC_THREADS=1 \
        python3 setup.py build_ext --inplace)
}

mamba=$(ls -d "$src"/mamba_ssm-*/ 2>/dev/null | head -1 || true)
conv=$(ls -d "$src"/causal_conv1d-*/ 2>/dev/null | head -1 || true)
if [ -z "$mamba" ] || [ -z "$conv" ]; then
    echo "build_cuda_kernels.sh: $src must hold the unpacked sdists mamba_ssm-<version>/ and causal_conv1d-<version>/" >&2
    exit 2
fi
if [ "${LEAN:-0}" = 1 ]; then
    python3 "$(dirname "$0")/lean_selective_scan.py" "$mamba" || exit 1
    python3 "$(dirname "$0")/lean_causal_conv1d.py" "$conv" || exit 1
fi
echo "building for sm_$arch with $jobs jobs (LEAN=${LEAN:-0}): $mamba $conv"
start=$SECONDS
build "$conv" CAUSAL_CONV1D 4 > "$src/causal_conv1d.build.log" 2>&1 &
conv_pid=$!
build "$mamba" MAMBA "$jobs" > "$src/mamba_ssm.build.log" 2>&1 || { tail -40 "$src/mamba_ssm.build.log"; exit 1; }
wait "$conv_pid" || { tail -40 "$src/causal_conv1d.build.log"; exit 1; }
echo "built in $((SECONDS - start)) s"
