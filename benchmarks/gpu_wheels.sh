#!/usr/bin/env bash
# Downloads, on a machine with PyPI, the wheels of the packages benchmarks/gpu_session.sh needs and the GPU machine's
# image lacks (benchmarks/gpu_preflight.py: CARRY, at the versions installed here), built for that machine's Python:
#
#     benchmarks/gpu_wheels.sh [DIR] [PYTHON_VERSION]        # default .whl (git-ignored) and 3.12
#
# then send DIR with the working tree and pass it as gpu_session.sh's WHEEL_DIR. About 6 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.whl}
pyver=${2:-3.12}
python=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
mapfile -t wheels < <("$python" benchmarks/gpu_preflight.py --wheels)
rm -rf "$dir" && mkdir -p "$dir"
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dir" "${wheels[@]}"
found=$(ls "$dir"/*.whl | wc -l)
if [ "$found" -ne "${#wheels[@]}" ]; then
    echo "gpu_wheels: asked for ${#wheels[@]} wheels (${wheels[*]}), $dir holds $found" >&2
    exit 1
fi
du -sh "$dir"
ls "$dir"
