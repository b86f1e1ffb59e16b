#!/usr/bin/env bash
# Command 3, generation: 256 prompts of ~605 tokens, 32 new tokens; plain-HF generate (merged adapters,
# dynamic / static cache, bs 16 / 64) against Loop.evaluate (bs 16 / 32 / 64, eval loss on; off at the best).
exec bash "$(dirname "$0")/run_device.sh" --phases gen_sweep "$@"
