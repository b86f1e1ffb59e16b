#!/usr/bin/env bash
# Command 1, training: a short warm-up run, then llava_loop's default alternating with Trainer's default,
# then the memory-budgeted variants (40 GiB; 22 GiB at batch 4). ~6-8 minutes on an H200.
exec bash "$(dirname "$0")/run_device.sh" \
    --phases warmup,loop_default,trainer,loop_default,trainer,loop_budget40,loop_budget22_b4 "$@"
