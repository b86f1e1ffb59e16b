#!/usr/bin/env bash
# The one command run on the GPU machine (from the repository root):
#   bash benchmarks/run_device.sh            # results and log under $OUT (default /tmp/llava_bench_out)
# Needs .bench_assets/llama2-tokenizer (a copy of shared/data/llama2-tokenizer, carried with the call).
set -u
export PYTHONPATH=. TQDM_DISABLE=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/llava_bench_out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv >"$OUT/nvidia_smi.txt" 2>&1
cat "$OUT/nvidia_smi.txt"
set -o pipefail
timeout "${BENCH_TIMEOUT:-560}" python3 benchmarks/bench_llava.py --out "$OUT" "$@" 2>&1 | tee "$OUT/log.txt"
