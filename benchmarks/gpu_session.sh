#!/usr/bin/env bash
# Every GPU check of the project in one command, ordered so that the kernel build (minutes) runs beside the work
# that does not need it. Run from the repository root on a machine with one GPU:
#
#     benchmarks/gpu_session.sh OUT_DIR [KERNEL_SRC_DIR] [WHEEL_DIR] [SHARDS_DIR] [BUILD_DEADLINE_S]
#
# KERNEL_SRC_DIR: unpacked mamba-ssm and causal-conv1d sdists (built by build_cuda_kernels.sh for this GPU only);
# WHEEL_DIR: wheels of pure-Python packages the machine lacks (installed into a private folder);
# SHARDS_DIR: a small sharded vector dataset (e.g. collected Hopper) for real `accelerate launch` runs;
# BUILD_DEADLINE_S: seconds after start at which an unfinished kernel build is abandoned (default 300).
# Environment: LEAN=1 builds the trimmed kernels (see build_cuda_kernels.sh); SKIP_PURE=1 skips step 1.
# Writes env.txt, parity_pure.txt, dt.txt, train_fast.log, build.log, tests.txt, mambadm_profile.txt, mambadm.txt,
# mambadm_torch_conv.txt, triton_launch.txt, mixer.txt, bench_gpu_*.json, train_cuda.log, and kernels.tar (the
# built extensions: unpacked into KERNEL_SRC_DIR on a machine with the same image, they are reused, not rebuilt).
set -uo pipefail
out=${1:?usage: gpu_session.sh OUT_DIR [KERNEL_SRC_DIR] [WHEEL_DIR] [SHARDS_DIR] [BUILD_DEADLINE_S]}
src=${2:-}
whl=${3:-}
shards=${4:-}
deadline=${5:-300}
mkdir -p "$out" && out=$(cd "$out" && pwd)  # absolute: later steps write into it from other folders
export PYTHONUNBUFFERED=1
if [ -n "$whl" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu-session-site "$whl"/*.whl || exit 1
    export PYTHONPATH=/tmp/gpu-session-site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc;
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'; nvcc --version | tail -2; } \
    2>&1 | tee "$out/env.txt"

build_pid=
if [ -n "$src" ] && ls "$src"/*/*.so > /dev/null 2>&1; then
    echo "reusing the extensions already built in $src" > "$out/build.log"  # e.g. kernels.tar from an earlier call
elif [ -n "$src" ]; then
    setsid bash benchmarks/build_cuda_kernels.sh "$src" > "$out/build.log" 2>&1 &  # own process group
    build_pid=$!
fi

train() {  # train NAME BACKEND STEPS: a real accelerate launch on the GPU with bf16 autocast
    local name=$1 backend=$2 steps=$3 run=/tmp/gpu-session-$1
    rm -rf "$run"
    accelerate launch --config_file configs/accelerate/gpu-ddp.yaml --num_processes 1 -m mambadm.train \
        configs/train/hopper-demo.yaml "data.shards=$shards" "train.run_dir=$run" "train.steps=$steps" \
        "model.backend=$backend" model.n_layer=4 model.d_model=256 data.batch_size=64 data.num_workers=2 \
        train.val_every=100 train.ckpt_every=100 > "$out/train_$name.log" 2>&1
    echo "exit $?" >> "$out/train_$name.log"
    python3 - "$run" >> "$out/train_$name.log" 2>&1 <<'EOF'
import json, sys, pathlib
run = pathlib.Path(sys.argv[1])
rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
for r in rows[:: max(1, len(rows) // 6)] + rows[-1:]:
    print({k: r.get(k) for k in ("step", "loss", "val_loss", "samples_per_s", "tokens_per_s")})
print("export:", sorted(p.name for p in (run / "export").iterdir()))
EOF
}

# 1. beside the build: pure-PyTorch parity on the GPU, the DT throughput sweep and profile (no kernels needed),
#    and a real bf16 training run on the fast backend.
if [ "${SKIP_PURE:-0}" != 1 ]; then
    timeout 60 python3 benchmarks/bench_gpu.py --parts parity --backends ref fast > "$out/parity_pure.txt" 2>&1
    timeout 220 python3 benchmarks/bench_gpu.py --parts profile mfu --families dt --mfu-batches 128 512 1024 \
        --compile-batches 512 --batch 512 --json "$out/bench_gpu_dt.json" > "$out/dt.txt" 2>&1
    [ -n "$shards" ] && train fast fast 300
fi

# 2. the kernels: wait for the build (if one was started) until the deadline, then use what got built.
if [ -n "$build_pid" ]; then
    while kill -0 "$build_pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 3; done
    if kill -0 "$build_pid" 2>/dev/null; then
        echo "kernel build abandoned at ${SECONDS} s" >> "$out/build.log"
        kill -TERM -- "-$build_pid"
    else
        wait "$build_pid"; echo "build exit $? at ${SECONDS} s" >> "$out/build.log"
    fi
fi
if [ -n "$src" ]; then
    without_conv=$PYTHONPATH
    for d in "$src"/mamba_ssm-*/ "$src"/causal_conv1d-*/; do  # whichever extension got built
        if ls "$d"/*.so > /dev/null 2>&1; then export PYTHONPATH=${d%/}:$PYTHONPATH; echo "built: $d" >> "$out/build.log"; fi
        case $d in *mamba_ssm*) without_conv=$PYTHONPATH;; esac
    done
    (cd "$src" && tar cf "$out/kernels.tar" ./*/*.so) 2>> "$out/build.log"
    for f in "$src"/*.build.log; do echo "== $f"; grep -E "^\[[0-9]+/[0-9]+\]|rror" "$f" | tail -8; done >> "$out/build.log" 2>&1
fi

# 3. the mixer tests on this machine (the mamba_ssm state-dict round trip runs only where mamba_ssm imports).
#    One pytest per file, so that a crash in one cannot hide the others' results.
for f in tests/test_ssm_mixer.py tests/test_ssm_scan.py tests/test_ssm_triton.py; do
    timeout 120 python3 -m pytest -q -p no:cacheprovider "$f" -rs >> "$out/tests.txt" 2>&1
    echo "== $f exit $?" >> "$out/tests.txt"
done

# 4. the fused kernels: parity, the MambaDM throughput sweep and profile, then the mixer block side by side.
# (Each step has a time limit, so that one slow step cannot cost the ones after it.)
timeout 60 python3 benchmarks/bench_gpu.py --parts parity profile --families mambadm --batch 256 \
    > "$out/mambadm_profile.txt" 2>&1
timeout 240 python3 benchmarks/bench_gpu.py --parts mfu --families mambadm --mfu-batches 128 256 512 \
    --compile-batches 256 --json "$out/bench_gpu_mambadm.json" > "$out/mambadm.txt" 2>&1
if [ "${without_conv:-$PYTHONPATH}" != "$PYTHONPATH" ]; then  # causal-conv1d built: the same step with nn.Conv1d
    PYTHONPATH=$without_conv timeout 60 python3 benchmarks/bench_gpu.py --parts mfu --families mambadm \
        --mfu-batches 128 256 --compile-batches > "$out/mambadm_torch_conv.txt" 2>&1
fi
timeout 150 python3 benchmarks/bench_triton_scan.py > "$out/triton_launch.txt" 2>&1  # the triton scan's launch shape
timeout 60 python3 benchmarks/bench_gpu.py --parts mixer --json "$out/bench_gpu_mixer.json" > "$out/mixer.txt" 2>&1

# 5. the same real training run on the cuda backend, when it exists.
if [ -n "$shards" ] && python3 -c 'import mamba_ssm' 2>/dev/null; then train cuda cuda "${CUDA_TRAIN_STEPS:-300}"; fi
echo "session done at ${SECONDS} s" | tee -a "$out/env.txt"
