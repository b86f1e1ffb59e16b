#!/usr/bin/env bash
# The engines of issue 14 on one GPU, each in its own process (benchmarks/bench_engines.py):
#   bash benchmarks/run_engines.sh single fsdp zero2 zero3     # results under $OUT (default /tmp/engines_out)
# fsdp / zero2 / zero3 go through `accelerate launch` with llava_loop's own launch configs (llava_loop/launch_configs),
# one process; the others are plain python. Each run is killed after ENGINE_TIMEOUT seconds (default 150).
set -u
source "$(dirname "$0")/device_env.sh"
OUT=${OUT:-/tmp/engines_out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/nvidia_smi.txt" 2>&1
for engine in "$@"; do
    case "$engine" in
        fsdp | zero2 | zero3)
            launch=(python3 -m accelerate.commands.launch --config_file "llava_loop/launch_configs/$engine.yaml"
                    --num_processes 1) ;;
        *) launch=(python3) ;;
    esac
    echo "=== $engine: ${launch[*]}"
    timeout "${ENGINE_TIMEOUT:-150}" "${launch[@]}" benchmarks/bench_engines.py --engine "$engine" --out "$OUT" \
        >"$OUT/log_$engine.txt" 2>&1
    echo "exit $? after ${SECONDS}s"; grep "RESULT\|Error" "$OUT/log_$engine.txt" | tail -3
done
