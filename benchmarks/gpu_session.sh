#!/usr/bin/env bash
# Every GPU check of the project in one command, ordered so that the kernel build (minutes) runs beside the work
# that does not need it. Run from the repository root on a machine with one GPU:
#
#     benchmarks/gpu_session.sh OUT_DIR [KERNEL_SRC_DIR] [WHEEL_DIR] [SHARDS_DIR] [BUILD_DEADLINE_S]
#
# KERNEL_SRC_DIR: unpacked mamba-ssm and causal-conv1d sdists (benchmarks/gpu_kernel_sources.sh downloads and trims
#     them), built by build_cuda_kernels.sh for this GPU only, beside the first step's tests, so that the tables
#     compare mamba_ssm's kernels (`cuda`) with `triton` in the same run; without it there is no `cuda` row;
# WHEEL_DIR: wheels of the packages the machine lacks (benchmarks/gpu_wheels.sh downloads them; installed into a
#     private folder); without them the first step (gpu_preflight.py) stops the session, naming what is missing;
# SHARDS_DIR: a small sharded vector dataset (e.g. collected Hopper) for real `accelerate launch` runs;
# BUILD_DEADLINE_S: seconds after start at which an unfinished kernel build is abandoned (default 180; the
#     lean build took 40 s on 16 cores).
# Environment: LEAN=0 builds the untrimmed kernels (default 1, see build_cuda_kernels.sh); SKIP_PURE=1 skips step 1.
# Issue 18 (GPU scale) runs first and fits ~9-10 minutes on one H100 (an estimate; step 0 below: scale_*.txt,
# scan_launch.env, bench_gpu_pairs.json, bench_gpu_fused.json, train_100m.log, build.log with KERNEL_SRC_DIR) and
# prints the targets' verdicts (gpu_targets.py); the earlier sweeps (steps 1-5) run after it only with FULL=1. Step 0
# writes twelve files; where fewer can be fetched back, write them to a scratch folder and pack it, inside the call's
# limit:
#     benchmarks/gpu_wheels.sh .whl; benchmarks/gpu_kernel_sources.sh .kernels   # beforehand, on a machine with
#                                          # PyPI; send .whl, .kernels and the shards along
#     timeout 570 benchmarks/gpu_session.sh /tmp/s .kernels .whl runs/hopper/shards; tar czf RETURNED/s.tgz -C /tmp s
# DRY_RUN=1: the same steps on this machine's CPU at tiny shapes (no GPU, the Triton interpreter, pytest only
# collects, the `fast` backend where a GPU run has a fused one), so that the script cannot rot
# (tests/test_gpu_session.py).
# With FULL=1 also writes parity_pure.txt, dt.txt, train_fast.log, tests.txt, mambadm_profile.txt, mambadm.txt,
# mambadm_torch_conv.txt, triton_launch.txt, mixer.txt, bench_gpu_*.json, train_cuda.log, and kernels.tar (the
# built extensions: unpacked into KERNEL_SRC_DIR on a machine with the same image, they are reused, not rebuilt).
set -uo pipefail
out=${1:?usage: gpu_session.sh OUT_DIR [KERNEL_SRC_DIR] [WHEEL_DIR] [SHARDS_DIR] [BUILD_DEADLINE_S]}
src=${2:-}
whl=${3:-}
shards=${4:-}
deadline=${5:-180}
mkdir -p "$out" && out=$(cd "$out" && pwd)  # absolute: later steps write into it from other folders
export PYTHONUNBUFFERED=1
if [ -n "$whl" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu-session-site "$whl"/*.whl || exit 1
    export PYTHONPATH=/tmp/gpu-session-site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
dry=${DRY_RUN:-0}
# (a dry run never builds the C++ CPU kernels: a step killed by its time limit mid-build would leave torch's build
# lock behind, and every later load of them would wait for it)
if [ "$dry" = 1 ]; then export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES= MAMBADM_NO_CPP_KERNELS=1; fi
python3 benchmarks/gpu_preflight.py 2>&1 | tee "$out/env.txt"  # stops here when an import is missing (WHEEL_DIR)
[ "${PIPESTATUS[0]}" = 0 ] || exit 1
{ if [ "$dry" = 1 ]; then echo "DRY_RUN: cpu"; else nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; fi; nproc;
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'; nvcc --version | tail -2; } \
    2>&1 | tee -a "$out/env.txt"

# The kernels of the `cuda` backend: built in the background (its own process group) beside step 0's tests, waited
# for before the first timing until BUILD_DEADLINE_S, then made importable by whatever got built.
build_pid=
start_build() {
    if [ -z "$src" ]; then return; fi
    if [ "$dry" = 1 ]; then echo "DRY_RUN: no kernel build (needs nvcc and a CUDA torch)" > "$out/build.log"; return; fi
    if ls "$src"/*/*.so > /dev/null 2>&1; then
        echo "reusing the extensions already built in $src" > "$out/build.log"  # e.g. kernels.tar from an earlier call
        return
    fi
    LEAN=${LEAN:-1} setsid bash benchmarks/build_cuda_kernels.sh "$src" > "$out/build.log" 2>&1 &
    build_pid=$!
}
use_build() {
    if [ -n "$build_pid" ]; then
        while kill -0 "$build_pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 3; done
        if kill -0 "$build_pid" 2>/dev/null; then
            echo "kernel build abandoned at ${SECONDS} s" >> "$out/build.log"
            kill -TERM -- "-$build_pid"
        else
            wait "$build_pid"; echo "build exit $? at ${SECONDS} s" >> "$out/build.log"
        fi
    fi
    if [ -z "$src" ] || [ "$dry" = 1 ]; then return; fi
    without_conv=$PYTHONPATH
    for d in "$src"/mamba_ssm-*/ "$src"/causal_conv1d-*/; do  # whichever extension got built
        if ls "$d"/*.so > /dev/null 2>&1; then export PYTHONPATH=${d%/}:$PYTHONPATH; echo "built: $d" >> "$out/build.log"; fi
        case $d in *mamba_ssm*) without_conv=$PYTHONPATH;; esac
    done
    for f in "$src"/*.build.log; do echo "== $f"; grep -E "^\[[0-9]+/[0-9]+\]|rror" "$f" | tail -8; done >> "$out/build.log" 2>&1
    python3 -c 'from mambadm.ssm import available_backends; print("backends:", available_backends("cuda"))' \
        >> "$out/build.log" 2>&1
}
start_build

# 0. Issue 18, GPU scale (~9-10 minutes on one H100, estimated; every step has its own time limit):
#    a. the GPU tests of what it added: the triton scan against ref (both kernel pairs, compiled), the fused triton
#       conv + SiLU against the PyTorch conv and the mixer against ref (forward and gradients); one pytest per file.
#    (the kernel build, when KERNEL_SRC_DIR is given, runs beside a. and is waited for before b.)
#    b. the triton scan's backward / forward time per kernel pair at L = 90 and 3072 (target <= 2); then the
#       fastest launch of a short list on MambaDM's scan shapes (bench_triton_scan.py --pick: scale_launch.txt,
#       scan_launch.env), which the later steps run.
#    c. the fused conv ($MAMBADM_TRITON_FUSED): its parity against ref through the mixer (with and without the local
#       windows), then MambaDM's largest-preset training step on triton with it off and on, on cuda where mamba_ssm
#       imports (built from KERNEL_SRC_DIR), and DT's at the same batch (scale_fused.txt, bench_gpu_fused.json).
#    d. one table per preset pair (xxl, 100m, 300m, 1b): tokens/s, step ms, MFU against the card's data-sheet bf16
#       peak (bench_gpu.py looks it up from the device name), peak memory and batch, DT and MambaDM side by side.
#    e. a profile of the largest MambaDM step (top kernels by GPU time), with the fused conv on when its compiled
#       tests passed (scale_tests.txt says which).
#    f. a real `accelerate launch` of 300 steps of the 100m preset on SHARDS_DIR (one GPU, bf16).
#    If the chunked triton kernels fail their compiled test, the tables use the serial ones (scale_tests.txt says so).
if [ "$dry" = 1 ]; then
    pyt="--collect-only -q"; dev="--device cpu"; pairs="--pair-sizes xs --pair-batches 1 --checkpoint-batch 1"
    prof="--sizes xs --batch 1"; steps=2; size=xs; fused="--sizes xs"
else
    pyt="-q -rs"; dev=""; steps=${SCALE_TRAIN_STEPS:-300}; size=100m; fused="--sizes xxl --fused-batches 256"
    # the tables and the profile time `triton` (what `auto` runs on a GPU), also where `cuda` was built
    pairs="--backends triton --pair-sizes xxl 100m 300m 1b --pair-batches 64 128 256 --checkpoint-batch 256"
    prof="--backends triton --sizes 1b --batch 64"
fi
for f in tests/test_ssm_triton.py tests/test_triton_conv.py; do  # (the presets' and configs' tests are CPU-only: CI)
    timeout 150 python3 -m pytest $pyt -p no:cacheprovider "$f" >> "$out/scale_tests.txt" 2>&1
    echo "== $f exit $?" >> "$out/scale_tests.txt"
done
export MAMBADM_TRITON_SCAN=chunked  # the tables time the new pair (the library default stays serial until it passes here)
if grep -q "FAILED tests/test_ssm_triton.py.*chunked" "$out/scale_tests.txt"; then
    export MAMBADM_TRITON_SCAN=serial
    echo "chunked triton kernels failed on this card: MAMBADM_TRITON_SCAN=serial for the tables" | tee -a "$out/scale_tests.txt"
fi
use_build
timeout 90 python3 benchmarks/bench_triton_scan.py --no-sweep $dev > "$out/scale_triton_ratio.txt" 2>&1
echo "exit $?" >> "$out/scale_triton_ratio.txt"
pick=(chunked serial); [ "$MAMBADM_TRITON_SCAN" = serial ] && pick=(serial)
timeout 90 python3 benchmarks/bench_triton_scan.py --pick "$out/scan_launch.env" --pick-budget-s 45 \
    --kernels "${pick[@]}" $dev > "$out/scale_launch.txt" 2>&1
echo "exit $?" >> "$out/scale_launch.txt"
if [ -s "$out/scan_launch.env" ]; then
    . "$out/scan_launch.env"  # the launch every later step runs
    echo "tables with MAMBADM_TRITON_SCAN=$MAMBADM_TRITON_SCAN MAMBADM_TRITON_LAUNCH=$MAMBADM_TRITON_LAUNCH" \
        | tee -a "$out/scale_tests.txt"
fi
timeout 120 python3 benchmarks/bench_gpu.py --parts fused $dev $fused --json "$out/bench_gpu_fused.json" \
    > "$out/scale_fused.txt" 2>&1
echo "exit $?" >> "$out/scale_fused.txt"
fused_on=0  # the library default stays off until the fused conv passes here
if grep -q "== tests/test_triton_conv.py exit 0" "$out/scale_tests.txt"; then fused_on=1; fi
echo "profile with MAMBADM_TRITON_FUSED=$fused_on" >> "$out/scale_tests.txt"
timeout 270 python3 benchmarks/bench_gpu.py --parts pairs $dev $pairs --json "$out/bench_gpu_pairs.json" \
    > "$out/scale_pairs.txt" 2>&1
echo "exit $?" >> "$out/scale_pairs.txt"
MAMBADM_TRITON_FUSED=$fused_on timeout 60 python3 benchmarks/bench_gpu.py --parts profile --families mambadm \
    $dev $prof > "$out/scale_profile.txt" 2>&1
echo "exit $?" >> "$out/scale_profile.txt"
if [ -n "$shards" ]; then
    run=/tmp/gpu-session-scale
    rm -rf "$run"
    timeout 150 accelerate launch --config_file configs/accelerate/gpu-1.yaml -m mambadm.train \
        configs/train/hopper-demo.yaml "data.shards=$shards" "train.run_dir=$run" "train.steps=$steps" \
        "model.size=$size" model.grad_checkpoint=false data.batch_size=64 data.num_workers=2 train.val_every=100 \
        train.ckpt_every=100 train.progress=false > "$out/train_$size.log" 2>&1
    echo "exit $?" >> "$out/train_$size.log"
    python3 -c 'import json, sys, pathlib
run = pathlib.Path(sys.argv[1])
rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
for r in rows[:: max(1, len(rows) // 6)] + rows[-1:]:
    print({k: r.get(k) for k in ("step", "loss", "val_loss", "samples_per_s", "tokens_per_s")})
print("export:", sorted(p.name for p in (run / "export").iterdir()))' "$run" >> "$out/train_$size.log" 2>&1
fi
echo "scale steps done at ${SECONDS} s" | tee -a "$out/env.txt"
python3 benchmarks/gpu_targets.py "$out"  # the targets' table and the defaults this run decides (stdout only)
if [ "${FULL:-0}" != 1 ]; then exit 0; fi

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

# 1. pure-PyTorch parity on the GPU, the DT throughput sweep and profile (no kernels needed),
#    and a real bf16 training run on the fast backend.
if [ "${SKIP_PURE:-0}" != 1 ]; then
    timeout 60 python3 benchmarks/bench_gpu.py --parts parity --backends ref fast > "$out/parity_pure.txt" 2>&1
    timeout 220 python3 benchmarks/bench_gpu.py --parts profile mfu --families dt --mfu-batches 128 512 1024 \
        --compile-batches 512 --batch 512 --json "$out/bench_gpu_dt.json" > "$out/dt.txt" 2>&1
    [ -n "$shards" ] && train fast fast 300
fi

# 2. the built extensions, packed for a later call on a machine with the same image
if [ -n "$src" ]; then (cd "$src" && tar cf "$out/kernels.tar" ./*/*.so) 2>> "$out/build.log"; fi

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
