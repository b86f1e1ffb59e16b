"""The multi-GPU engines on the llava-1.5-7b shape (issue 14): one engine per process, as users run them.

Each run trains LoRA (r=128) on the 7B shape (random weights: the same speed as real ones), measures tokens/s
over the steps after a warm-up and the peak GPU memory, evaluates with ``generate`` on 8 samples, saves a
checkpoint, and resumes from it for one more step in a second Loop (the sharded-checkpoint round trip):

    single        one process, the whole model on the GPU (the reference)
    fsdp          FSDP2 through accelerate (launch with llava_loop's launch config ``fsdp``)
    zero2, zero3  DeepSpeed ZeRO-2 / ZeRO-3 through accelerate (launch configs ``zero2`` / ``zero3``)
    offload_auto  one process, device_map computed as ``device_map="auto"`` does, with max_memory
                  {0: --gpu_gib, "cpu": ...}: the layers that do not fit run offloaded (weights in CPU RAM,
                  moved to the GPU for each forward)
    offload_half  one process, an explicit map: the second half of the decoder layers on "cpu" (offloaded)

Commands (one device call each, `carry: [".whl", ".bench_assets"]`): benchmarks/run_engines.sh.
CPU smoke test: ``PYTHONPATH=. python benchmarks/bench_engines.py --tiny --engine single --out /tmp/e``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_llava import CUDA, build_model, make_data  # noqa: E402

from llava_loop import Loop, LoopConfig  # noqa: E402
from llava_loop.callbacks import Callback  # noqa: E402
from llava_loop.testing import llava15_processor  # noqa: E402

TOKENIZER = ".bench_assets/llama2-tokenizer"


class StepTimes(Callback):
    """Wall time of every optimizer step (the device synchronised at each step end) and its tokens."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.tokens: list[int] = []
        self._last = None

    def on_fit_start(self, loop) -> None:
        self._last, self._seen = time.perf_counter(), loop.state.tokens_seen

    def on_step_end(self, loop, logs) -> None:
        if CUDA:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.times.append(now - self._last)
        self.tokens.append(loop.state.tokens_seen - self._seen)
        self._last, self._seen = now, loop.state.tokens_seen


def dispatched(model, engine: str, gpu_gib: float):
    """``model`` spread as ``device_map`` would spread it: accelerate's own map computation and dispatch
    (what ``from_pretrained(device_map=...)`` runs after loading)."""
    from accelerate import dispatch_model, infer_auto_device_map

    if engine == "offload_auto":
        device_map = infer_auto_device_map(
            model, max_memory={0: f"{gpu_gib}GiB", "cpu": "400GiB"}, no_split_module_classes=model._no_split_modules
        )
    else:
        layers = model.config.text_config.num_hidden_layers
        device_map = {"model.vision_tower": 0, "model.multi_modal_projector": 0, "lm_head": 0}
        device_map.update({"model.language_model.embed_tokens": 0, "model.language_model.norm": 0})
        device_map.update({"model.language_model.rotary_emb": 0})
        device_map.update({f"model.language_model.layers.{i}": 0 if i < layers // 2 else "cpu" for i in range(layers)})
    return dispatch_model(model.to("cpu") if engine == "offload_half" else model, device_map=device_map, main_device=0)


def config(args, out: Path, max_steps: int, **extra) -> LoopConfig:
    return LoopConfig(
        output_dir=str(out),
        max_steps=max_steps,
        batch_size=args.batch_size,
        eval_batch_size=8,
        learning_rate=2e-5,
        warmup_steps=1,
        precision="fp32" if args.tiny else "bf16",
        lora_r=128,
        lora_alpha=256,
        lora_dropout=0.05,
        gradient_checkpointing=True,
        compile=False,  # off for every engine (FSDP and DeepSpeed do not compile), so that they compare alike
        max_new_tokens=16,
        eval_steps=0,
        save_steps=0,
        log_steps=max_steps,
        handle_signals=False,
        seed=0,
        overwrite_output_dir="resume_from" not in extra,
        **extra,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--warmup_steps", type=int, default=3)
    parser.add_argument("--measured_steps", type=int, default=10)
    parser.add_argument("--gpu_gib", type=float, default=9.0, help="offload_auto: max_memory of GPU 0")
    args = parser.parse_args()
    out = Path(args.out) / args.engine
    out.mkdir(parents=True, exist_ok=True)
    data = make_data(Path(args.out) / "data", 64, 0, (6, 14), (8, 30))
    eval_data = make_data(Path(args.out) / "eval", 8, 1, (6, 14), (2, 6))
    processor = llava15_processor(TOKENIZER)

    model = build_model(args.tiny)
    if args.engine.startswith("offload"):
        model = dispatched(model, args.engine, args.gpu_gib)
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    steps = args.warmup_steps + args.measured_steps
    clock = StepTimes()
    t0 = time.perf_counter()
    loop = Loop(model, processor, config(args, out / "run", steps), callbacks=[clock])
    loop.fit(data)
    fit_seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if CUDA else None
    measured = slice(args.warmup_steps, steps)
    tokens_per_s = sum(clock.tokens[measured]) / sum(clock.times[measured])
    t0 = time.perf_counter()
    evaluation = loop.evaluate(eval_data)
    eval_seconds = time.perf_counter() - t0
    del loop, model
    if CUDA:
        torch.cuda.empty_cache()

    # The checkpoint round trip: a new Loop resumes from it for one more step.
    model = build_model(args.tiny)
    if args.engine.startswith("offload"):
        model = dispatched(model, args.engine, args.gpu_gib)
    resumed = Loop(model, processor, config(args, out / "run", steps + 1, resume_from="latest"))
    resumed.fit(data)
    result = {
        "engine": resumed.engine,
        "variant": args.engine,
        "processes": resumed.accelerator.num_processes,
        "device_map": sorted({str(d) for d in (getattr(resumed.model, "hf_device_map", None) or {}).values()}),
        "offloaded_layers": sum(
            1 for d in (getattr(resumed.model, "hf_device_map", None) or {}).values() if d == "cpu"
        ),
        "batch_size": args.batch_size,
        "tokens_per_s": tokens_per_s,
        "step_seconds": clock.times,
        "peak_gib": peak,
        "fit_seconds": fit_seconds,
        "eval": {k: v for k, v in evaluation.items()},
        "eval_seconds": eval_seconds,
        "eval_predictions": [r["prediction"] for r in evaluation.samples][:3],
        "resumed_to_step": resumed.state.step,
        "resumed_loss": [r for r in resumed.state.history] or None,
        "device": torch.cuda.get_device_name(0) if CUDA else platform.processor(),
        "versions": {m: __import__(m).__version__ for m in ("torch", "transformers", "peft", "accelerate")},
    }
    try:
        import deepspeed

        result["versions"]["deepspeed"] = deepspeed.__version__
    except ImportError:
        pass
    if resumed.accelerator.is_main_process:
        (Path(args.out) / f"result_{args.engine}.json").write_text(json.dumps(result, indent=1, default=str))
        print("RESULT", json.dumps({k: result[k] for k in ("variant", "engine", "tokens_per_s", "peak_gib")}))
    if os.environ.get("WORLD_SIZE"):
        resumed.accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
