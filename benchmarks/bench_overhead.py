"""Host overhead: `Loop.fit` against a minimal hand-written loop with the same levers, same process.

A ~0.5B-shaped LLaVA (Llama hidden 1024, 24 layers, 16 heads, MLP 2816, vocab 32064; CLIP hidden
768, 12 layers; `bench_llava.SHAPES["0.5b"]`), where a step is short enough for host work (syncs,
logging, bookkeeping) to show. Small images (336x336 JPEGs, decoded in DataLoader workers). Both
sides: the same model construction, LoRA set-up (`prepare_model`), collator (`TrainCollator`),
batch, compile setting (every decoder layer of the language model and of the vision encoder;
on when on CUDA, as `LoopConfig.compile=None` does), fused AdamW (on CUDA), loss only at labelled
positions, no gradient checkpointing, bf16 autocast. The minimal loop is written plainly: forward,
loss, backward, clip, step, zero_grad, with no per-step `.item()`. The device is synchronized only
at the end of the warm-up and of the last step (`StepClock(sync_each_step=False)`), so host syncs a
framework makes are not hidden behind the clock's. Runs alternate after a warm-up run; the ratio is
fit / minimal tokens/s (means over the runs after the warm-up). Target: >= 0.95.

Usage (from the repository root, PYTHONPATH=.):
    python benchmarks/bench_overhead.py --tiny        # CPU smoke test
    python benchmarks/bench_overhead.py --out $OUT    # GPU
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import time
from pathlib import Path

import torch
from bench_llava import (
    CUDA,
    ClockCallback,
    StepClock,
    _BenchLoop,
    _TrainerCollator,
    add_mfu,
    build_model,
    common_arguments,
    free_memory,
    language_model_params,
    loop_config,
    make_data,
    new_results,
    optimizer_name,
    phase,
)

from llava_loop.collators import TrainCollator
from llava_loop.data import as_dataset
from llava_loop.modeling import prepare_model
from llava_loop.testing import llava15_processor

OPTIONS = {"gradient_checkpointing": False}  # LoopConfig defaults otherwise: compile, fused AdamW, labelled logits


class DeviceTokens:
    """Attention-mask tokens summed on the device (no host sync)."""

    def __init__(self, device):
        self.total = torch.zeros((), dtype=torch.int64, device=device)


def run_fit(args, processor, train_path: str) -> dict:
    from bench_llava import TokenCounter

    cfg, unsupported = loop_config(args, OPTIONS)
    free_memory()
    model = build_model(args.tiny, "0.5b")
    n_params = language_model_params(model)
    counter = TokenCounter(model)
    total = args.warmup_steps + args.measured_steps
    clock = StepClock(counter, args.warmup_steps, total, sync_each_step=False)
    loop = _BenchLoop(model, processor, cfg, callbacks=[ClockCallback(clock)])
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    loop.fit(as_dataset(train_path))
    counter.remove()
    result = {"unsupported_options": unsupported, "optimizer": optimizer_name(loop.optimizer), **clock.summary()}
    return add_mfu(result, n_params)


def run_minimal(args, processor, train_path: str) -> dict:
    """The minimal loop: what a careful user writes by hand with the same levers."""
    from torch.utils.data import DataLoader
    from transformers import get_scheduler

    cfg, _ = loop_config(args, OPTIONS)
    free_memory()
    torch.manual_seed(cfg.seed)
    model = build_model(args.tiny, "0.5b")
    n_params = language_model_params(model)
    model = prepare_model(model, cfg)
    model.train()
    llava = model.get_base_model()  # LlavaForConditionalGeneration, LoRA layers inside
    if CUDA:  # LoopConfig.compile=None: on when training on CUDA
        for layer in llava.model.language_model.layers:
            layer.compile(dynamic=True)  # any length and batch size, as LoopConfig.compile does
        from transformers.modeling_layers import GradientCheckpointingLayer

        for layer in llava.model.vision_tower.modules():
            if isinstance(layer, GradientCheckpointingLayer):
                layer.compile()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=CUDA)
    total = args.warmup_steps + args.measured_steps
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=total)
    loader = DataLoader(
        as_dataset(train_path),
        batch_size=cfg.batch_size,
        shuffle=True,
        num_workers=cfg.num_workers,
        collate_fn=_TrainerCollator(TrainCollator(processor)),
        pin_memory=CUDA,
        drop_last=True,
        persistent_workers=cfg.num_workers > 0,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    device = torch.device("cuda" if CUDA else "cpu")
    tokens = DeviceTokens(device)
    clock = StepClock(tokens, args.warmup_steps, total, sync_each_step=False)
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    clock.t_start = time.perf_counter()
    batches = itertools.chain.from_iterable(itertools.repeat(loader))
    for _, batch in zip(range(total), batches):
        # The labelled positions and targets on the CPU: indexing with a device mask would wait for the GPU.
        keep = batch["labels"][:, 1:] != -100
        positions = keep.flatten().nonzero().squeeze(1).to(device, non_blocking=True)
        targets = batch["labels"][:, 1:][keep].to(device, non_blocking=True)
        count = int(keep.sum())
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=CUDA):
            hidden = llava.model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                pixel_values=batch["pixel_values"],
                use_cache=False,  # as fit: no KV cache in training (a cache would also recompile the layers)
            ).last_hidden_state
            logits = llava.lm_head(hidden[:, :-1].flatten(0, 1).index_select(0, positions))
            loss = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum") / count
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        tokens.total += batch["attention_mask"].sum()
        clock.tick()
    result = {"optimizer": optimizer_name(optimizer), **clock.summary()}
    return add_mfu(result, n_params)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common_arguments(p, "/tmp/llava_bench_overhead")
    p.add_argument("--phases", default="fit,minimal,fit,minimal,fit,minimal,fit", help="after a warm-up fit run")
    p.add_argument("--warmup-steps", type=int, default=None, help="default 10 (tiny: 2)")
    p.add_argument("--measured-steps", type=int, default=None, help="default 60 (tiny: 3)")
    p.add_argument("--budget-s", type=float, default=float(os.environ.get("BENCH_BUDGET", 520)))
    args = p.parse_args()
    t_start = time.perf_counter()
    big = not args.tiny
    args.batch_size, args.eval_batch_size = (8, 16) if big else (2, 4)
    args.warmup_steps = args.warmup_steps or (10 if big else 2)
    args.measured_steps = args.measured_steps or (60 if big else 3)
    args.num_workers, args.new_tokens = (8, 32) if big else (2, 4)
    out, results = new_results(args, ("tiny", "batch_size", "warmup_steps", "measured_steps", "num_workers"))

    def save() -> None:
        (out / "results_overhead.json").write_text(json.dumps(results, indent=2, default=str))

    processor = llava15_processor(args.tokenizer)
    n_train = 256 if big else 16
    train_path = make_data(
        Path(args.workdir) / "data", n_train, seed=4, q_words=(20, 35), a_words=(35, 60), sizes=[(336, 336)]
    )
    deadline = t_start + args.budget_s
    for i, name in enumerate(["fit", *args.phases.split(",")]):
        left = deadline - time.perf_counter()
        key = f"{i + 1}:{name}" + (" (warm-up)" if i == 0 else "")
        if left < (60 if big else 0):
            results.setdefault("skipped", {})[key] = f"{left:.0f} s of the budget left"
            continue
        with phase(results, key, limit_s=left - 10):
            row = {"name": name, "position": i + 1, "warmup_run": i == 0}
            results["runs"].append(row)
            row.update(
                run_fit(args, processor, train_path) if name == "fit" else run_minimal(args, processor, train_path)
            )
            row["status"] = "ok"
            print(key, {k: v for k, v in row.items() if k != "all_step_s"}, flush=True)
        save()

    ok = [r for r in results["runs"] if r.get("status") == "ok" and not r["warmup_run"]]
    print(f"\n==== overhead summary: {results['env'].get('device', 'cpu')}, torch {results['env']['torch']} ====")
    print(f"{'#':>2} {'run':8s} {'tok/s':>9s} {'host step med':>13s} {'peak GiB':>8s} {'MFU':>6s}  optimizer")
    for r in results["runs"]:
        if r.get("status") == "ok":
            print(
                f"{r['position']:>2} {r['name']:8s} {r['tokens_per_s']:9.1f} {r['median_step_s']:13.4f} "
                f"{r['peak_mem_gib']:8.2f} {r['mfu']:6.3f}  {r['optimizer']}{'  (warm-up run)' if r['warmup_run'] else ''}"
            )
    fit = [r["tokens_per_s"] for r in ok if r["name"] == "fit"]
    minimal = [r["tokens_per_s"] for r in ok if r["name"] == "minimal"]
    if fit and minimal:
        results["ratio_fit_over_minimal"] = statistics.mean(fit) / statistics.mean(minimal)
        print(f"ratio tokens/s fit/minimal: {results['ratio_fit_over_minimal']:.3f} (target >= 0.95)")
    for name, text in results.get("errors", {}).items():
        print(f"ERROR in {name}: {text.strip().splitlines()[-1][:300]}")
    results["total_s"] = time.perf_counter() - t_start
    save()
    print(f"total {results['total_s']:.0f} s")


if __name__ == "__main__":
    main()
