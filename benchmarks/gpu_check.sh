#!/usr/bin/env bash
# Every GPU check of the kernels in one command, for a lent GPU machine (no package registry there: it uses
# the machine's own python3 with torch, Triton, PEFT and pytest, and stages adaptermix.kernels by a link).
#
#   OUT=/some/folder bash benchmarks/gpu_check.sh [quick | tune | memory]
#
# quick = steps 1 and 2 (about 9 minutes at most: one device call of 600 s), tune = step 3 alone (a second
# call), memory = step 4 alone (a few minutes), none = all four. Correctness comes first: a device lease is
# short, and a speed figure of a kernel that answers wrongly is worth nothing.
#
# 1. the CUDA tests of tests/test_kernels.py (compiled Triton: fused / cluster / bgmv / plan, fp32 / fp16 / bf16,
#    backward, inductor, CUDA-graph replay with new routing);
# 2. benchmarks/kernel_mixture.py device=cuda (the issue's shapes, every method side by side; each method's
#    output is checked against the float64 definition first, and its JSON is rewritten after every case);
# 3. benchmarks/kernel_tune.py strategy=fused and strategy=cluster (the one-launch kernels' tables);
# 4. benchmarks/kernel_memory.py device=cuda (each strategy's scratch memory against the issue's target).
# Each step has its own time limit (seconds: BENCH_S, TESTS_S, TUNE_S each, MEM_S), so one slow step cannot
# starve the others inside a device lease. Logs and JSON land in $OUT; copy the JSON into benchmarks/results/
# and the best settings into kernels/configs.py.
set -uo pipefail
mode=${1:-all}
case "$mode" in
    all | quick | tune | memory) ;;
    *) echo "gpu_check.sh: unknown mode '$mode' (quick, tune, memory, or none for all)" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export TRITON_INTERPRET=0 HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}

# The kernel checks need adaptermix.kernels alone: stage it as a package of its own by a link, so that
# neither this checkout's other dependencies (faiss, hydra, ... absent there) nor a pip build are needed.
stage=$(mktemp -d)
mkdir "$stage/adaptermix"
touch "$stage/adaptermix/__init__.py"
ln -s "$PWD/kernels" "$stage/adaptermix/kernels"
export PYTHONPATH="$stage${PYTHONPATH:+:$PYTHONPATH}"
$PY -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" \
    | tee "$OUT/versions.txt"

status=0
if [ "$mode" = "all" ] || [ "$mode" = "quick" ]; then
    # the whole log lands in $OUT (every failure's short traceback); the summary's tail goes to the console
    timeout "${TESTS_S:-240}" $PY -P -m pytest -q -p no:cacheprovider --noconftest --tb=short -rf -k cuda \
        tests/test_kernels.py > "$OUT/tests.log" 2>&1
    [ $? -eq 0 ] || status=1
    tail -40 "$OUT/tests.log"
    timeout "${BENCH_S:-300}" $PY benchmarks/kernel_mixture.py device=cuda out="$OUT/kernel_mixture_cuda.json" 2>&1 \
        | tee "$OUT/kernel_mixture.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
if [ "$mode" = "all" ] || [ "$mode" = "tune" ]; then
    for strategy in fused cluster; do
        timeout "${TUNE_S:-240}" $PY benchmarks/kernel_tune.py strategy=$strategy \
            out="$OUT/kernel_tune_${strategy}_cuda.json" 2>&1 | tee "$OUT/kernel_tune_$strategy.log"
        [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    done
fi
if [ "$mode" = "all" ] || [ "$mode" = "memory" ]; then
    timeout "${MEM_S:-300}" $PY benchmarks/kernel_memory.py device=cuda out="$OUT/kernel_memory_cuda.json" 2>&1 \
        | tee "$OUT/kernel_memory.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
exit $status
