#!/usr/bin/env bash
# Command 2, Trainer peers that patch or compile, each after a llava_loop run of its own process:
#   process 1 ($OUT/compile_sft): warm-up, loop_default, TRL SFTTrainer, Trainer(torch_compile=True) (last:
#             its compilation may use what is left of the budget; a timeout is recorded as its error)
#   process 2 ($OUT/liger): warm-up, loop_default, Trainer(use_liger_kernel=True) (liger patches
#             modeling_llama globally, so it runs last in a process of its own)
D=$(dirname "$0")
OUT=${OUT:-/tmp/llava_bench_out}
BENCH_BUDGET=300 BENCH_TIMEOUT=320 OUT=$OUT/compile_sft bash "$D/run_device.sh" --phases warmup,loop_default,sft,trainer_compile "$@"
BENCH_BUDGET=200 BENCH_TIMEOUT=215 OUT=$OUT/liger bash "$D/run_device.sh" --phases warmup,loop_default,trainer_liger "$@"
