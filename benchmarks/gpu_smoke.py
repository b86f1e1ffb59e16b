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
        **_logged(config.output_dir, loop.accelerator.unwrap_model(loop.model)),
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


def _logged(output_dir: str, model: torch.nn.Module) -> dict:
    """What only a GPU run logs (train/mfu, peak memory) and the files an evaluation writes, checked:
    train/mfu equals 6 * N * tokens/s / the GPU's peak from the table, on every train record."""
    from pathlib import Path

    from llava_loop.loggers import gpu_peak_tflops, model_flops_per_token, read_metrics

    records = [r for r in read_metrics(f"{output_dir}/metrics.jsonl") if "train/loss" in r]
    peak = gpu_peak_tflops(torch.cuda.get_device_name()) * 1e12
    flops = model_flops_per_token(model)
    mfu = [r.get("train/mfu") for r in records]
    expected = [flops * r["train/tokens_per_s"] / peak for r in records]
    return {
        "gpu": torch.cuda.get_device_name(),
        "peak_tflops": peak / 1e12,
        "mfu_logged_on_every_train_record": all(m is not None for m in mfu),
        "mfu_last": mfu[-1],
        "mfu_matches_formula": all(m is not None and abs(m / e - 1) < 1e-6 for m, e in zip(mfu, expected)),
        "peak_mem_gib_logged": all("train/peak_mem_gib" in r for r in records),
        "html_pages": len(list(Path(output_dir, "predictions").glob("step_*.html"))),
        "curves_png": Path(output_dir, "curves.png").is_file(),
    }


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
