"""GPU check of every family: each family's tiny model (`llava_loop.testing.tiny_vlm`) trained and
evaluated on CUDA with the GPU defaults (bf16, compiled decoder and vision layers, loss at labelled
positions only, fused AdamW, a static compiled KV cache for generation), then evaluated again one
sample at a time to compare with the batched, left-padded evaluation.

Not a speed claim: it checks that the code paths that only run on a GPU work for every family.

    python benchmarks/families_gpu.py --out /tmp/families
"""

import argparse
import json
import time
import traceback

import torch

from llava_loop import Loop, LoopConfig
from llava_loop.testing import FAMILIES, synthetic_vqa, tiny_vlm


def run(family: str, out: str, steps: int) -> dict:
    model, processor = tiny_vlm(family, seed=0)
    model.to(torch.bfloat16)  # as load_model(..., dtype="bfloat16") gives it: the static cache needs it
    settings = dict(
        max_steps=steps,
        batch_size=8,
        eval_batch_size=8,
        learning_rate=5e-3,
        precision="bf16",
        eval_steps=steps,
        eval_before_training=True,
        max_new_tokens=4,
        log_steps=0,
        save_steps=steps,
    )
    t0 = time.perf_counter()
    loop = Loop(model, processor, LoopConfig(output_dir=f"{out}/{family}", **settings))
    eval_data = synthetic_vqa(32, seed=1000)
    state = loop.fit(synthetic_vqa(256, seed=0), eval_data)
    seconds = time.perf_counter() - t0
    # Without accelerate's autocast wrapper around forward: the next Loops run in their own precision.
    trained = loop.accelerator.unwrap_model(loop.model, keep_fp32_wrapper=False)
    compiled = sum(getattr(m, "_compiled_call_impl", None) is not None for m in trained.modules())
    # Batched (left padded) against one sample at a time, in fp32 so that bf16 rounding cannot tell them apart.
    trained.float()
    results = {}
    for size in (8, 1):
        fp32 = {**settings, "eval_batch_size": size, "precision": "fp32"}
        results[size] = Loop(trained, processor, LoopConfig(output_dir=f"{out}/{family}-{size}", **fp32)).evaluate(
            eval_data
        )
    same = [a["prediction"] == b["prediction"] for a, b in zip(results[8].samples, results[1].samples)]
    return {
        "family": family,
        "model": type(trained.get_base_model()).__name__,
        "seconds": round(seconds, 1),
        "compiled_layers": compiled,
        "eval_loss_before": state.history[0]["eval/loss"],
        "eval_loss_after": state.history[-1]["eval/loss"],
        "exact_match_before": state.history[0]["eval/exact_match"],
        "exact_match_after": state.history[-1]["eval/exact_match"],
        "batched_equals_one_by_one": f"{sum(same)}/{len(same)}",
        "gen_tokens_per_s_fp32_batch8": results[8]["eval/gen_tokens_per_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--families", nargs="*", default=list(FAMILIES))
    args = parser.parse_args()
    results = []
    for family in args.families:
        try:
            results.append(run(family, args.out, args.steps))
        except Exception:  # report every family, then fail below
            results.append({"family": family, "error": traceback.format_exc()[-3000:]})
        print(json.dumps(results[-1]), flush=True)
    environment = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0)}
    with open(f"{args.out}/families_gpu.json", "w") as f:
        json.dump({"environment": environment, "results": results}, f, indent=1)
    if any("error" in r for r in results):
        raise SystemExit("some families failed")


if __name__ == "__main__":
    main()
