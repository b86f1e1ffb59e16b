"""QLoRA against bf16 LoRA on the llava-1.5-7b shape, in one process on one GPU (issue 13).

Runs named on the command line (``--runs``), in that order, each a `fit` of llava_loop's defaults (compiled
decoder layers, labelled-positions loss, non-reentrant checkpointing where named) with LoRA r=128 on every
language-model linear layer and the projector trained in full:

    bf16_b4_gc_s200      bf16 weights, batch 4, checkpointing, 200 steps (the loss curve of the reference)
    nf4_b4_gc_s200       the same on NF4 weights (load_model(..., quantization="4bit")), 8-bit AdamW
    bf16_b{1,4,8}_{gc,nogc}, nf4_b{1,4}_gc[_adamw], ...   short runs (peak memory, speed): see RUNS
    auto_b_under22       batch_size="auto" under a 22 GiB budget, then a whole run at the chosen size
    eval_nf4             evaluation generation after the last nf4 run: dense merged copies vs unmerged

A ``bf16_*`` run builds the model on the GPU (random weights, `bench_llava.build_model`); an ``nf4_*`` run
loads the same weights, saved once to ``--workdir``/base, through `load_model`, as a user would. Peak memory
is ``torch.cuda.max_memory_allocated`` over the steps after the warm-up steps (the optimizer state exists
by then). Results: ``$OUT/results_qlora.json`` (after every run) and a summary table at the end.

    PYTHONPATH=. python benchmarks/bench_qlora.py --tiny --runs bf16_b4_gc_s200,nf4_b4_gc_s200,eval_nf4
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import time
import traceback
from pathlib import Path

import torch
from bench_llava import (
    CUDA,
    WORDS,
    ClockCallback,
    StepClock,
    TokenCounter,
    build_model,
    common_arguments,
    free_memory,
    memory_budget,
    new_results,
    random_jpeg,
    sync,
)

from llava_loop import Callback, Loop, LoopConfig
from llava_loop.data import as_dataset
from llava_loop.modeling import load_model
from llava_loop.testing import llava15_processor

# name: (quantization, batch size, gradient checkpointing, optimizer, steps (warm-up, measured), extra options)
RUNS: dict[str, tuple] = {
    "bf16_b4_gc_s200": (None, 4, True, "adamw", (10, 190), {}),
    "nf4_b4_gc_s200": ("4bit", 4, True, "adamw_8bit", (10, 190), {}),
    "bf16_b1_gc": (None, 1, True, "adamw", (4, 6), {}),
    "bf16_b4_gc": (None, 4, True, "adamw", (4, 6), {}),
    "bf16_b8_gc": (None, 8, True, "adamw", (4, 6), {}),
    "bf16_b1_nogc": (None, 1, False, "adamw", (4, 6), {}),
    "bf16_b4_nogc": (None, 4, False, "adamw", (4, 6), {}),
    "bf16_b8_nogc": (None, 8, False, "adamw", (4, 6), {}),
    "nf4_b1_gc": ("4bit", 1, True, "adamw_8bit", (4, 6), {}),
    "nf4_b4_gc": ("4bit", 4, True, "adamw_8bit", (4, 6), {}),
    "nf4_b1_gc_adamw": ("4bit", 1, True, "adamw", (4, 6), {}),
    "nf4_b4_gc_adamw": ("4bit", 4, True, "adamw", (4, 6), {}),
    "nf4_b4_gc_eager": ("4bit", 4, True, "adamw_8bit", (4, 6), {"compile": False}),
    "int8_b4_gc": ("8bit", 4, True, "adamw_8bit", (4, 6), {}),
    "auto_b_under22": (None, "auto", True, "adamw", (4, 26), {"_budget_gib": 22, "effective_batch_size": 16}),
}


class LossRecorder(Callback):
    """Every optimizer step's training loss."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_step_end(self, loop, logs):
        self.losses.append(float(logs["train/loss"]))


class Deadline(Callback):
    """Stops a run (after the current step) once ``time.perf_counter()`` passes ``at``: a call's time
    limit ends a long run early instead of losing it."""

    def __init__(self, at: float) -> None:
        self.at = at

    def on_step_end(self, loop, logs):
        if time.perf_counter() > self.at:
            loop.state.should_stop, loop.state.stop_reason = True, "benchmark deadline"


class NoSaveLoop(Loop):
    """No checkpoints (adapter + optimizer state are not what is measured)."""

    def _save(self, best: bool = False) -> None:
        pass


def copy_task(folder: Path, n: int, seed: int, words: tuple[int, int]) -> str:
    """A learnable task: the answer repeats the question's words (so its loss can fall well below the
    entropy of the vocabulary); JPEGs of varied sizes, as bench_llava's data."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        name = f"img_{seed}_{i:05d}.jpg"
        random_jpeg(rng, folder / name, [(640, 480), (480, 640), (800, 600), (336, 336), (1024, 768)], 8, False)
        question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(*words)))
        records.append(
            {
                "id": f"c{seed}-{i}",
                "image": name,
                "conversations": [
                    {"from": "human", "value": f"<image>\nRepeat: {question}"},
                    {"from": "gpt", "value": question},
                ],
            }
        )
    path = folder / f"copy_{seed}.json"
    path.write_text(json.dumps(records))
    return str(path)


def base_folder(args, processor) -> tuple[str, float]:
    """The random 7B-shape weights saved once (safetensors) with the processor, for the nf4 runs to
    load; seconds it took (0 when already there, e.g. from an earlier call on the same machine)."""
    folder = Path(args.workdir) / ("base_tiny" if args.tiny else "base")
    if (folder / "config.json").is_file():
        return str(folder), 0.0
    t0 = time.perf_counter()
    model = build_model(args.tiny)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    del model
    free_memory()
    return str(folder), time.perf_counter() - t0


def loop_config(args, run: str, batch, checkpointing, optimizer, steps, options) -> LoopConfig:
    warmup, measured = (1, 3) if args.tiny else steps
    settings = {
        "output_dir": str(Path(args.workdir) / "out" / run),
        "overwrite_output_dir": True,
        "max_steps": warmup + measured,
        "batch_size": batch,
        "eval_batch_size": args.eval_batch_size,
        "learning_rate": 2e-4,
        "warmup_steps": 5,
        "lora_r": 128,
        "lora_alpha": 256,
        "lora_dropout": 0.05,
        "gradient_checkpointing": checkpointing,
        "optimizer": optimizer,
        "precision": "fp32" if args.tiny else "bf16",
        "num_workers": args.num_workers,
        "max_new_tokens": args.new_tokens,
        "log_steps": 0,
        "seed": 0,
        "handle_signals": False,
        "predictions_html": False,
    }
    settings.update({k: v for k, v in options.items() if not k.startswith("_")})
    return LoopConfig(**settings)


def train(args, run: str, processor, base: str, train_path: str, deadline: float) -> tuple[dict, Loop]:
    quantization, batch, checkpointing, optimizer, steps, options = RUNS[run]
    cfg = loop_config(args, run, batch, checkpointing, optimizer, steps, options)
    free_memory()
    t0 = time.perf_counter()
    if quantization is None:
        model = build_model(args.tiny)
    else:
        model, _ = load_model(base, quantization=quantization, dtype="bfloat16")
    sync()
    load_s = time.perf_counter() - t0
    counter = TokenCounter(model)
    warmup = 1 if args.tiny else steps[0]
    clock, losses = StepClock(counter, warmup), LossRecorder()
    callbacks = [ClockCallback(clock), losses, Deadline(deadline)]
    loop = NoSaveLoop(model, processor, cfg, callbacks=callbacks)
    with memory_budget(options.get("_budget_gib")):
        if CUDA:
            torch.cuda.reset_peak_memory_stats()
        loop.fit(as_dataset(train_path))
    counter.remove()
    bare = loop.accelerator.unwrap_model(loop.model)
    result = {
        "run": run,
        "quantization": quantization,
        "batch_size": loop.batch_size,  # what batch_size="auto" chose, where it was asked for
        "grad_accum_steps": loop.grad_accum_steps,
        "config_batch_size": loop.config.batch_size,
        "gradient_checkpointing": checkpointing,
        "optimizer": optimizer,
        "options": options,
        "load_s": load_s,
        **clock.summary(),
        "steps_done": loop.state.step,
        "stop_reason": loop.state.stop_reason,
        "losses": losses.losses,
        "trainable_params": sum(p.numel() for p in bare.parameters() if p.requires_grad),
        "weights_gib": sum(p.numel() * p.element_size() for p in bare.parameters()) / 2**30,
    }
    for name in ("batch_size_choice", "auto_batch"):
        if hasattr(loop, name):
            result[name] = getattr(loop, name)
    if CUDA:
        result["reserved_peak_gib"] = torch.cuda.max_memory_reserved() / 2**30
    return result, loop


def evaluate_both(loop: Loop, eval_path: str) -> dict:
    """eval/gen_tokens_per_s with the adapters merged (dense copies on a quantized base) and unmerged, each
    the second of two passes (the first compiles the static-cache decoding step)."""
    out = {}
    data = as_dataset(eval_path)
    for merged in (True, False):
        loop.config.merge_lora_for_eval = merged
        passes = []
        try:
            for _ in range(2):
                sync()
                t0 = time.perf_counter()
                result = loop.evaluate(data)
                sync()
                passes.append({"seconds": time.perf_counter() - t0, **{k: v for k, v in result.items()}})
        except Exception:  # noqa: BLE001 - the other mode is still measured
            out[f"error_{'merged' if merged else 'unmerged'}"] = traceback.format_exc()
            print(traceback.format_exc(), flush=True)
        out["merged" if merged else "unmerged"] = passes
    if out["merged"] and out["unmerged"]:
        merged, unmerged = out["merged"][-1], out["unmerged"][-1]
        out["speedup_merged"] = merged["eval/gen_tokens_per_s"] / unmerged["eval/gen_tokens_per_s"]
        out["exact_match"] = [merged.get("eval/exact_match"), unmerged.get("eval/exact_match")]
    return out


def summary(results: dict) -> str:
    rows = ["| run | batch x accum | ckpt | optimizer | peak GiB | tokens/s | median step s | last-20 loss |"]
    rows.append("|---|---|---|---|---|---|---|---|")
    for r in results["runs"]:
        tail = r["losses"][-20:]
        rows.append(
            f"| {r['run']} | {r['batch_size']} x {r['grad_accum_steps']} | {r['gradient_checkpointing']} | "
            f"{r['optimizer']} | {r.get('peak_mem_gib', float('nan')):.2f} | {r['tokens_per_s']:,.0f} | "
            f"{r['median_step_s']:.3f} | {statistics.mean(tail):.3f} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_arguments(parser, "/tmp/qlora_bench")
    parser.add_argument("--runs", default="bf16_b4_gc_s200,nf4_b4_gc_s200,eval_nf4")
    parser.add_argument("--budget", type=float, default=540.0, help="seconds: no run starts after this")
    parser.add_argument("--deadline", type=float, default=575.0, help="seconds: a running fit stops after this")
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=8)
    args = parser.parse_args()
    if args.tiny:
        args.num_workers = 0
    start = time.perf_counter()
    out, results = new_results(args, ("tiny", "runs", "eval_batch_size", "new_tokens"))
    results["errors"], results["evals"] = {}, {}
    processor = llava15_processor(args.tokenizer)
    data = Path(args.workdir) / "data"
    n = 64 if args.tiny else 1024
    train_path = copy_task(data, n, seed=1, words=(45, 60))  # about 704 tokens with the 576 image tokens
    eval_path = copy_task(data, 8 if args.tiny else 64, seed=2, words=(5, 12))
    quantized = any(RUNS.get(run, (None,))[0] for run in args.runs.split(","))
    base, results["base_save_s"] = base_folder(args, processor) if quantized else ("", 0.0)
    lengths = [len(processor.tokenizer(r["conversations"][1]["value"])["input_ids"]) for r in as_dataset(train_path)]
    results["answer_tokens_mean"] = statistics.mean(lengths)
    last: Loop | None = None
    for run in args.runs.split(","):
        if time.perf_counter() - start > args.budget:
            results["errors"][run] = "skipped: budget"
            continue
        print(f"=== {run} ({time.perf_counter() - start:.0f} s)", flush=True)
        try:
            if run.startswith("eval_"):
                if last is None:
                    raise RuntimeError("no trained loop to evaluate")
                results["evals"][run] = evaluate_both(last, eval_path)
            else:
                last = None
                free_memory()
                try:
                    result, last = train(args, run, processor, base, train_path, start + args.deadline)
                except Exception:  # noqa: BLE001 - e.g. torch.compile on quantized layers: retried eagerly
                    if RUNS[run][0] is None or "compile" in RUNS[run][5]:
                        raise
                    results["errors"][run] = traceback.format_exc()
                    print(results["errors"][run], flush=True)
                    RUNS[run + "_eager"] = (*RUNS[run][:5], {**RUNS[run][5], "compile": False})
                    free_memory()
                    result, last = train(args, run + "_eager", processor, base, train_path, start + args.deadline)
                results["runs"].append(result)
                print(json.dumps({k: v for k, v in result.items() if k != "losses"}), flush=True)
        except Exception:  # noqa: BLE001 - one failed run must not lose the others
            results["errors"][run] = traceback.format_exc()
            print(results["errors"][run], flush=True)
            last = None
        gc.collect()
        (out / "results_qlora.json").write_text(json.dumps(results, indent=1))
    results["total_s"] = time.perf_counter() - start
    (out / "results_qlora.json").write_text(json.dumps(results, indent=1))
    print(summary(results))
    for name, ev in results["evals"].items():
        print(name, {k: round(ev[k][-1]["eval/gen_tokens_per_s"], 1) for k in ("merged", "unmerged") if ev.get(k)})


if __name__ == "__main__":
    main()
