#!/usr/bin/env bash
# Command 3, Trainer(torch_compile=True) after a warm-up and a llava_loop run of the same process,
# with the whole call's budget: Trainer compiles the whole model (forward and backward graphs of
# the 7B shape), which took more than 72 s before its first step. Its figure, error or timeout
# is recorded in $OUT/results.json.
BENCH_BUDGET=${BENCH_BUDGET:-540} BENCH_TIMEOUT=${BENCH_TIMEOUT:-560} exec bash "$(dirname "$0")/run_device.sh" \
    --phases warmup,loop_default,trainer_compile "$@"
