#!/usr/bin/env bash
# Downloads, on a machine with PyPI, the wheels of the packages benchmarks/gpu_session.sh needs and the GPU machine's
# image lacks (benchmarks/gpu_preflight.py: CARRY, at the versions installed here), built for that machine's Python:
#
#     benchmarks/gpu_wheels.sh [DIR] [PYTHON_VERSION]        # default .whl (git-ignored) and 3.12
#
# then send DIR with the working tree and pass it as gpu_session.sh's WHEEL_DIR. About 6 MB. The wheels are
# downloaded into a scratch folder first: DIR's old wheels are replaced only once every new one is there.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.whl}
pyver=${2:-3.12}
python=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
pins=$("$python" benchmarks/gpu_preflight.py --wheels) || exit 1  # it names a package not installed here
read -r -a wheels <<< "$(echo $pins)"
if [ -e "$dir" ] && [ ! -d "$dir" ]; then
    echo "gpu_wheels: $dir is not a folder" >&2
    exit 2
fi
if [ -e "$dir" ] && [ -n "$(find "$dir" -mindepth 1 -maxdepth 1 ! -name '*.whl' -print -quit)" ]; then
    echo "gpu_wheels: $dir holds files other than wheels; name an empty or a wheels-only folder" >&2
    exit 2
fi
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$scratch" "${wheels[@]}"
found=$(find "$scratch" -name '*.whl' | wc -l)
if [ "$found" -ne "${#wheels[@]}" ]; then
    echo "gpu_wheels: asked for ${#wheels[@]} wheels (${wheels[*]}), got $found; $dir left as it was" >&2
    exit 1
fi
mkdir -p "$dir"
rm -f "$dir"/*.whl
mv "$scratch"/*.whl "$dir"/
du -sh "$dir"
ls "$dir"
