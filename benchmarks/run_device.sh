#!/usr/bin/env bash
# The one command run on the GPU machine (from the repository root):
#   bash benchmarks/run_device.sh [bench args]   # results and log under $OUT (default /tmp/llava_bench_out)
# Needs .bench_assets/llama2-tokenizer (a copy of shared/data/llama2-tokenizer) and .whl/ (README), carried
# with the call. BENCH_SCRIPT picks the script (default bench_llava.py); BENCH_TIMEOUT kills it (default
# 560 s), BENCH_BUDGET (default 520 s) makes it stop starting phases and print its summary before that.
set -u
source "$(dirname "$0")/device_env.sh"
OUT=${OUT:-/tmp/llava_bench_out}
export OUT
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv >"$OUT/nvidia_smi.txt" 2>&1
cat "$OUT/nvidia_smi.txt"
set -o pipefail
timeout "${BENCH_TIMEOUT:-560}" python3 "benchmarks/${BENCH_SCRIPT:-bench_llava.py}" --out "$OUT" "$@" 2>&1 | tee "$OUT/log.txt"
