"""GPU smoke run: the tiny demo task trained on CUDA in bf16 and fp16 (grad scaler), with eval.

Not a speed claim: checks that the mixed-precision paths that only exist on a GPU (bf16 autocast on
CUDA, fp16 with a gradient scaler, the GPU backup in merged_adapters) learn and resume.

    python benchmarks/gpu_smoke.py --out /tmp/smoke
"""

import argparse
import json
import time

import torch

from llava_loop import Loop, LoopConfig
from llava_loop.checkpointing import load_rng_state, verify_checkpoint
from llava_loop.testing import synthetic_vqa, tiny_llava


def run(precision: str, out: str, steps: int) -> dict:
    model, processor = tiny_llava(seed=0)
    config = LoopConfig(
        output_dir=f"{out}/{precision}",
        max_steps=steps,
        batch_size=16,
        eval_batch_size=64,
        learning_rate=5e-3,
        lora_dropout=0.0,
        precision=precision,
        eval_steps=steps // 2,
        eval_before_training=True,
        max_new_tokens=4,
        log_steps=25,
        save_steps=steps // 2,
    )
    t0 = time.perf_counter()
    loop = Loop(model, processor, config)
    state = loop.fit(synthetic_vqa(2048, seed=0), synthetic_vqa(128, seed=1000))
    result = {
        "precision": precision,
        "seconds": time.perf_counter() - t0,
        "device": str(loop.accelerator.device),
        "scaler": loop.accelerator.scaler is not None,
        "before": state.history[0]["eval/exact_match"],
        "after": state.history[-1]["eval/exact_match"],
        "eval_loss_after": state.history[-1]["eval/loss"],
        "step": state.step,
    }
    # Resume from the mid-run checkpoint and finish again: same final step, finite loss.
    model2, processor2 = tiny_llava(seed=0)
    resumed = Loop(
        model2,
        processor2,
        LoopConfig(
            **{
                **config.to_dict(),
                "resume_from": f"{out}/{precision}/checkpoints/step_{steps // 2:06d}",
                "output_dir": f"{out}/{precision}-resumed",
                "eval_before_training": False,
            }
        ),
    )
    state2 = resumed.fit(synthetic_vqa(2048, seed=0), synthetic_vqa(128, seed=1000))
    result["resumed_after"] = state2.history[-1]["eval/exact_match"]
    result["resumed_eval_loss_after"] = state2.history[-1]["eval/loss"]
    # The checkpoint format on a GPU: data only (the grad scaler's state in JSON, CUDA RNG states in
    # safetensors), every file's hash verified.
    ckpt = f"{out}/{precision}/checkpoints/step_{steps:06d}"
    verify_checkpoint(ckpt)
    trainer_state = json.loads(open(f"{ckpt}/trainer_state.json").read())
    result["scaler_state_saved"] = trainer_state["scaler"] is not None
    rng = load_rng_state(f"{ckpt}/rng_state_0.safetensors")
    result["cuda_rng_states_saved"] = len(rng.get("cuda", []))
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="/tmp/gpu_smoke")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this smoke run needs a CUDA GPU"
    results = [run(p, args.out, args.steps) for p in ("bf16", "fp16", "fp32")]
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
