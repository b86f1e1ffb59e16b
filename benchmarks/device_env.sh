# Sourced by run_device.sh on the GPU machine: the wheels the device image lacks (.whl/, carried with the
# call: trl, datasets, dill, multiprocess for TRL; liger-kernel; docstring-parser for llava_loop.config)
# go to $BENCH_SITE (default /tmp/site), once per machine, and onto PYTHONPATH after the repository root.
SITE=${BENCH_SITE:-/tmp/site}
if ls .whl/*.whl >/dev/null 2>&1 && [ ! -e "$SITE/.installed" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        && touch "$SITE/.installed" || { echo "wheel install failed" >&2; exit 1; }
fi
export PYTHONPATH=.:$SITE TQDM_DISABLE=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
