#!/usr/bin/env bash
# Command 2, Trainer peers, each after a llava_loop run of its own process:
#   process 1 ($OUT/sft):   warm-up, loop_default, TRL SFTTrainer
#   process 2 ($OUT/liger): warm-up, loop_default, Trainer(use_liger_kernel=True) (liger patches
#                           modeling_llama globally, so it runs last in a process of its own)
# Trainer(torch_compile=True) compiles the whole 7B model: it has a command of its own
# (run_trainer_compile.sh), since 72 s after the others were not enough for its first step.
D=$(dirname "$0")
OUT=${OUT:-/tmp/llava_bench_out}
BENCH_BUDGET=265 BENCH_TIMEOUT=280 OUT=$OUT/sft bash "$D/run_device.sh" --phases warmup,loop_default,sft "$@"
BENCH_BUDGET=200 BENCH_TIMEOUT=215 OUT=$OUT/liger bash "$D/run_device.sh" --phases warmup,loop_default,trainer_liger "$@"
