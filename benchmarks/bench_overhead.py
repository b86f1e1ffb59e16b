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
import cProfile
import io
import itertools
import json
import os
import pstats
import statistics
import time
import traceback
import warnings
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


class Probe:
    """What a run's measured steps spend host time on, by phase-name suffix (not in the ratio):
    ``+syncs`` counts the device syncs by call site (the innermost frames outside torch, e.g. in
    transformers; CUDA sync debug mode), ``+profile`` runs cProfile (the functions with most own and most cumulative time)."""

    def __init__(self, kind: str):
        self.kind, self.sites = kind, {}
        self._profile = cProfile.Profile() if kind == "profile" else None
        self._warnings = warnings.catch_warnings()  # restores the filters and showwarning at stop

    @staticmethod
    def of(name: str) -> Probe | None:
        kind = name.partition("+")[2]
        if kind not in ("", "syncs", "profile"):
            raise ValueError(f"unknown phase suffix +{kind}: use +syncs or +profile")
        return Probe(kind) if kind and (CUDA or kind == "profile") else None

    def start(self) -> None:
        if self._profile is not None:
            self._profile.enable()
            return
        self._warnings.__enter__()
        warnings.simplefilter("always")
        warnings.showwarning = self._record
        torch.cuda.set_sync_debug_mode("warn")

    def _record(self, message, category, filename, lineno, file=None, line=None) -> None:
        torch_dir = str(Path(torch.__file__).parent)  # torch's own frames and the warning's are left out
        frames = [
            f
            for f in traceback.extract_stack()[:-1]
            if not f.filename.startswith(torch_dir) and not f.filename.endswith("warnings.py")
        ]
        site = " < ".join(f"{Path(f.filename).name}:{f.lineno}:{f.name}" for f in frames[-4:][::-1])
        self.sites[site] = self.sites.get(site, 0) + 1

    def stop(self) -> dict:
        if self._profile is not None:
            self._profile.disable()
            text = {}
            for key, n in (("tottime", 35), ("cumulative", 60)):
                stream = io.StringIO()
                pstats.Stats(self._profile, stream=stream).sort_stats(key).print_stats(n)
                text[f"profile_by_{key}"] = stream.getvalue()
            return text
        torch.cuda.set_sync_debug_mode(0)
        self._warnings.__exit__(None, None, None)
        return {"syncs_after_warmup": dict(sorted(self.sites.items(), key=lambda kv: -kv[1]))}


class ProbeClock(ClockCallback):
    """`ClockCallback` that also starts ``probe`` (a `Probe`, or None) when the warm-up steps end."""

    def __init__(self, clock: StepClock, probe: Probe | None):
        super().__init__(clock)
        self.probe = probe

    def on_step_end(self, loop, logs):
        super().on_step_end(loop, logs)
        if self.probe is not None and len(self.clock.times) == self.clock.warmup:
            self.probe.start()


def run_fit(args, processor, train_path: str, probe: Probe | None = None) -> dict:
    from bench_llava import TokenCounter

    cfg, unsupported = loop_config(args, OPTIONS)
    free_memory()
    model = build_model(args.tiny, "0.5b")
    n_params = language_model_params(model)
    counter = TokenCounter(model)
    total = args.warmup_steps + args.measured_steps
    clock = StepClock(counter, args.warmup_steps, total, sync_each_step=False)
    loop = _BenchLoop(model, processor, cfg, callbacks=[ProbeClock(clock, probe)])
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    try:
        loop.fit(as_dataset(train_path))
    finally:
        found = probe.stop() if probe is not None else {}
    counter.remove()
    result = {"unsupported_options": unsupported, "optimizer": optimizer_name(loop.optimizer), **clock.summary()}
    result.update(found)
    return add_mfu(result, n_params)


def run_minimal(args, processor, train_path: str, probe: Probe | None = None) -> dict:
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
    for n, batch in enumerate(itertools.islice(batches, total)):
        if probe is not None and n == args.warmup_steps:
            probe.start()
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
    if probe is not None:
        result.update(probe.stop())
    return add_mfu(result, n_params)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common_arguments(p, "/tmp/llava_bench_overhead")
    p.add_argument(
        "--phases",
        default="fit,minimal,fit,minimal,fit,minimal,fit",
        help="after a warm-up fit run; a name ending in +syncs or +profile (fit+syncs, minimal+profile) also counts "
        "the device syncs after the warm-up steps by call site, or profiles them (cProfile); slower, not in the ratio",
    )
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
            run = run_fit if name.split("+")[0] == "fit" else run_minimal
            row.update(run(args, processor, train_path, Probe.of(name)))
            row["status"] = "ok"
            print(key, {k: v for k, v in row.items() if k != "all_step_s" and not k.startswith("profile")}, flush=True)
        save()

    ok = [r for r in results["runs"] if r.get("status") == "ok" and not r["warmup_run"] and "+" not in r["name"]]
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
    for r in results["runs"]:
        if "syncs_after_warmup" in r:
            print(
                f"device syncs after the warm-up, run {r['position']} {r['name']}:", r["syncs_after_warmup"] or "none"
            )
        for key in ("profile_by_tottime", "profile_by_cumulative"):
            if key in r:
                print(f"---- run {r['position']} {r['name']}: {key}\n" + r[key][:7000])
    for name, text in results.get("errors", {}).items():
        print(f"ERROR in {name}: {text.strip().splitlines()[-1][:300]}")
    results["total_s"] = time.perf_counter() - t_start
    save()
    print(f"total {results['total_s']:.0f} s")


if __name__ == "__main__":
    main()
