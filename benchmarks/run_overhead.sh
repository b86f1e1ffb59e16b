#!/usr/bin/env bash
# Command 4, host overhead: Loop.fit against a minimal hand loop with the same levers, 0.5B shape.
BENCH_SCRIPT=bench_overhead.py exec bash "$(dirname "$0")/run_device.sh" "$@"
