"""Speed benchmark: llava_loop vs Hugging Face `Trainer` / plain `generate`, same process, same set-up.

What it measures (see benchmarks/README.md for the protocol, benchmarks/RESULTS.md for numbers):

1. Training throughput of `Loop.fit` and `transformers.Trainer` on the same model construction
   (`build_model`, llava-1.5-7b shape, random bf16 weights made directly on the GPU), the same LoRA
   set-up (`llava_loop.modeling.prepare_model`: r=128, alpha=256, dropout 0.05 on every
   language-model linear layer, projector trained in full), the same dataset object (JPEG files
   decoded in DataLoader workers) and the same `TrainCollator` (assistant-only labels).
   Steps are timestamped by a callback in each framework after `torch.cuda.synchronize()`; tokens
   are counted from the attention mask (image tokens included) by a forward pre-hook on the model,
   identical for both.
2. Generation: `Loop.evaluate` (merged adapters, batches sorted by length, data loading, eval loss,
   decoding and metrics included) vs plain `model.generate` on the unmerged peft model with
   pre-collated GPU batches; and the merged/unmerged split for each.

Usage (with llava_loop installed, or PYTHONPATH=. from the repository root):
    python benchmarks/bench_llava.py --tiny            # CPU smoke test, a minute
    python benchmarks/bench_llava.py --out $OUT        # GPU, ~3.5 minutes on an H100
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from llava_loop import Loop, LoopConfig
from llava_loop.collators import META_KEYS, EvalCollator, TrainCollator
from llava_loop.data import as_dataset
from llava_loop.modeling import merged_adapters, prepare_model
from llava_loop.testing import llava15_processor

CUDA = torch.cuda.is_available()
ROOT = Path(__file__).resolve().parent.parent
_TEXT = (
    "the a of and to in is that it for on with as was at by be this from or have an are not but "
    "what all were when we there can which their said if do will each about how up out them then "
    "she many some so these would other into has more her two like him see time could no make than "
    "first been its who now people my made over did down only way find use may water long little "
    "very after words called just where most know get through back much before go good new write "
    "our used me man too any day same right look think also around another came come work three "
    "must because does part even place well such here take why help put different away again off "
    "picture image photo color red blue green small large left right top bottom near behind table "
    "street car dog cat person window building tree sky light shadow wall floor chair door sign"
)
WORDS = tuple(_TEXT.split())


# ---------------------------------------------------------------------------------------- set-up
def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def build_model(tiny: bool):
    """The one model construction both frameworks use: llava-1.5-7b shape, random weights.

    Weights are created directly on the GPU in bf16 (a 7B fp32 init on the CPU takes minutes);
    in ``tiny`` mode a 2-layer model in fp32 on the CPU, with the real 336 px / patch 14 geometry
    so that the real processor's 576 image tokens fit.
    """
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    if tiny:
        v = {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        }
        t = {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        }
    else:
        v = {
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
        }
        t = {
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
        }
    vision = CLIPVisionConfig(
        **v,
        image_size=336,
        patch_size=14,
        projection_dim=768,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )
    text = LlamaConfig(
        **t,
        num_key_value_heads=t["num_attention_heads"],
        vocab_size=32064,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=32001,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=32000,
        image_seq_length=576,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    dtype = torch.float32 if tiny else torch.bfloat16
    torch.manual_seed(0)
    with torch.device("cuda" if CUDA else "cpu"):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    gc_ = model.generation_config
    gc_.bos_token_id, gc_.eos_token_id, gc_.pad_token_id = 1, 2, 32001
    return model


def lora_config(args, gradient_checkpointing: bool) -> LoopConfig:
    """The LoopConfig both frameworks' LoRA set-up comes from (the Trainer run uses prepare_model too)."""
    return LoopConfig(
        output_dir=str(Path(args.workdir) / "loop_out"),
        max_steps=args.warmup_steps + args.measured_steps,
        batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size,
        learning_rate=2e-5,
        lr_scheduler="cosine",
        warmup_steps=1,
        max_grad_norm=1.0,
        precision="fp32" if args.tiny else "bf16",
        gradient_checkpointing=gradient_checkpointing,
        lora_r=128,
        lora_alpha=256,
        lora_dropout=0.05,
        num_workers=args.num_workers,
        max_new_tokens=args.new_tokens,
        seed=0,
        handle_signals=False,
    )


def make_data(folder: Path, n: int, seed: int, q_words: tuple[int, int], a_words: tuple[int, int]) -> str:
    """Synthetic LLaVA-style records in a JSON file, with JPEG files of varied sizes next to it."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    sizes = [
        (640, 480),
        (480, 640),
        (800, 600),
        (1024, 768),
        (500, 375),
        (336, 336),
        (1280, 720),
        (427, 640),
    ]
    records = []
    for i in range(n):
        w, h = rng.choice(sizes)
        img = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(img)
        for _ in range(12):
            x0, y0 = rng.randrange(w), rng.randrange(h)
            box = (
                x0,
                y0,
                x0 + rng.randrange(20, w // 2),
                y0 + rng.randrange(20, h // 2),
            )
            fill = tuple(rng.randrange(256) for _ in range(3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
        name = f"img_{seed}_{i:05d}.jpg"
        img.save(folder / name, quality=90)
        question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(*q_words)))
        answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(*a_words)))
        records.append(
            {
                "id": f"r{seed}-{i}",
                "image": name,
                "conversations": [
                    {"from": "human", "value": f"<image>\n{question.capitalize()}?"},
                    {"from": "gpt", "value": f"{answer.capitalize()}."},
                ],
            }
        )
    path = folder / f"records_{seed}.json"
    path.write_text(json.dumps(records))
    return str(path)


class TokenCounter:
    """Counts attention-mask tokens of every training forward on the GPU (no host sync per step)."""

    def __init__(self, model):
        self.total = torch.zeros((), dtype=torch.int64, device=next(model.parameters()).device)
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if module.training and mask is not None:
            self.total += mask.sum()

    def remove(self) -> None:
        self.handle.remove()


class StepClock:
    """Timestamps optimizer steps (after a device sync); resets the peak-memory counter after warm-up."""

    def __init__(self, counter: TokenCounter, warmup: int):
        self.counter, self.warmup = counter, warmup
        self.times: list[float] = []
        self.tokens: list[int] = []

    def tick(self) -> None:
        sync()
        self.times.append(time.perf_counter())
        self.tokens.append(int(self.counter.total))
        if len(self.times) == self.warmup and CUDA:
            torch.cuda.reset_peak_memory_stats()

    def summary(self) -> dict:
        w = self.warmup
        steps = [b - a for a, b in zip(self.times[w - 1 :], self.times[w:])]
        tokens = self.tokens[-1] - self.tokens[w - 1]
        wall = self.times[-1] - self.times[w - 1]
        return {
            "measured_steps": len(steps),
            "median_step_s": statistics.median(steps),
            "min_step_s": min(steps),
            "max_step_s": max(steps),
            "tokens": tokens,
            "tokens_per_step": tokens / len(steps),
            "tokens_per_s": tokens / wall,
            "warmup_s": self.times[w - 1] - self.t_start,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if CUDA else 0.0,
            "all_step_s": [round(b - a, 4) for a, b in zip([self.t_start, *self.times], self.times)],
        }


def free_memory() -> float:
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
        return torch.cuda.memory_allocated() / 2**30
    return 0.0


# -------------------------------------------------------------------------------- training runs
class _BenchLoop(Loop):
    """Loop whose final checkpoint is skipped (4 GiB of adapter + optimizer state, not benchmarked)."""

    def _save(self, best: bool = False) -> None:
        return None


def train_llava_loop(args, processor, train_path: str) -> tuple[dict, Loop]:
    from llava_loop.callbacks import Callback

    mem_before = free_memory()
    t0 = time.perf_counter()
    model = build_model(args.tiny)
    sync()
    init_s = time.perf_counter() - t0
    counter = TokenCounter(model)
    clock = StepClock(counter, args.warmup_steps)

    class Clock(Callback):
        def on_fit_start(self, loop):
            clock.t_start = time.perf_counter()

        def on_step_end(self, loop, logs):
            clock.tick()

    loop = _BenchLoop(
        model,
        processor,
        lora_config(args, gradient_checkpointing=True),
        callbacks=[Clock()],
    )
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    loop.fit(as_dataset(train_path))
    counter.remove()
    result = {
        "init_s": init_s,
        "mem_before_gib": mem_before,
        **clock.summary(),
        "loop_reported_tokens_seen": loop.state.tokens_seen,
        "trainable_params": sum(p.numel() for p in loop.model.parameters() if p.requires_grad),
    }
    return result, loop


class _TrainerCollator:
    """The same TrainCollator, minus llava_loop's bookkeeping keys that Trainer would pass to forward."""

    def __init__(self, collator: TrainCollator):
        self.collator = collator

    def __call__(self, records: list) -> dict:
        return {k: v for k, v in self.collator(records).items() if k not in META_KEYS}


def train_hf_trainer(args, processor, train_path: str) -> dict:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    mem_before = free_memory()
    t0 = time.perf_counter()
    model = build_model(args.tiny)
    sync()
    init_s = time.perf_counter() - t0
    counter = TokenCounter(model)
    clock = StepClock(counter, args.warmup_steps)
    cfg = lora_config(args, gradient_checkpointing=False)  # Trainer turns checkpointing on itself
    model = prepare_model(model, cfg)

    class Clock(TrainerCallback):
        def on_train_begin(self, targs, state, control, **kwargs):
            clock.t_start = time.perf_counter()

        def on_step_end(self, targs, state, control, **kwargs):
            clock.tick()

    targs = TrainingArguments(
        output_dir=str(Path(args.workdir) / "trainer_out"),
        per_device_train_batch_size=cfg.batch_size,
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_steps,
        max_grad_norm=cfg.max_grad_norm,
        weight_decay=cfg.weight_decay,
        optim="adamw_torch",  # llava_loop's AdamW is the non-fused (foreach) one; Trainer's default is fused
        bf16=not args.tiny,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        dataloader_num_workers=cfg.num_workers,
        remove_unused_columns=False,
        label_names=["labels"],
        logging_steps=cfg.log_steps,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=cfg.seed,
        use_cpu=not CUDA,
    )
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=as_dataset(train_path),
        data_collator=_TrainerCollator(TrainCollator(processor)),
        callbacks=[Clock()],
    )
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    counter.remove()
    result = {
        "init_s": init_s,
        "mem_before_gib": mem_before,
        **clock.summary(),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    del trainer, model
    return result


# ------------------------------------------------------------------------------------ generation
class _TimedLoop(_BenchLoop):
    """Adds timers around the two halves of `evaluation_step` (generation, teacher-forced loss)."""

    timers: dict

    def generate(self, batch):
        sync()
        t0 = time.perf_counter()
        out = super().generate(batch)  # decodes, so it ends with a sync
        self.timers["generate_s"] += time.perf_counter() - t0
        return out

    def evaluation_step(self, batch):
        t0 = time.perf_counter()
        out = super().evaluation_step(batch)
        sync()
        self.timers["evaluation_step_s"] += time.perf_counter() - t0
        return out


def loop_evaluate(loop: Loop, eval_path: str, merge: bool, reps: int, n_new: int, warmup: int = 0) -> dict:
    loop.config.merge_lora_for_eval = merge
    runs = []
    for _ in range(reps):
        loop.timers = {"generate_s": 0.0, "evaluation_step_s": 0.0}
        sync()
        t0 = time.perf_counter()
        summary = loop.evaluate(eval_path)
        sync()
        wall = time.perf_counter() - t0
        n = int(summary["eval/samples"])
        runs.append(
            {
                "wall_s": wall,
                "samples": n,
                "gen_tokens_per_s": n * n_new / wall,
                "loop_reported_gen_tokens_per_s": summary["eval/gen_tokens_per_s"],
                **loop.timers,
                "eval_loss_forward_s": loop.timers["evaluation_step_s"] - loop.timers["generate_s"],
                "outside_steps_s": wall - loop.timers["evaluation_step_s"],
            }
        )
    return {
        "runs": runs,
        "warmup_runs": warmup,
        "best": max(runs[warmup:], key=lambda r: r["gen_tokens_per_s"]),
    }


def hf_generate(model, batches: list[dict], n_new: int, tokenizer, merge: bool, reps: int) -> dict:
    """Plain ``model.generate`` over pre-collated batches already on the device (no data loading)."""
    runs = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        with merged_adapters(model, enabled=merge):
            sync()
            t1 = time.perf_counter()
            n = 0
            for b in batches:
                out = model.generate(
                    **b,
                    max_new_tokens=n_new,
                    min_new_tokens=n_new,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )
                new = out[:, b["input_ids"].shape[1] :]
                tokenizer.batch_decode(new, skip_special_tokens=True)
                n += new.numel()
            sync()
            t2 = time.perf_counter()
        sync()
        t3 = time.perf_counter()
        runs.append(
            {
                "generate_s": t2 - t1,
                "gen_tokens": n,
                "gen_tokens_per_s": n / (t2 - t1),
                "merge_s": t1 - t0,
                "unmerge_restore_s": t3 - t2,
            }
        )
    return {"runs": runs, "best": max(runs, key=lambda r: r["gen_tokens_per_s"])}


def merge_variants(model) -> dict:
    """Cost of entering/leaving `merged_adapters` (CPU backup) vs the same with the backup kept on the device."""
    from llava_loop.modeling import lora_layers

    layers = lora_layers(model)
    probe = layers[0].get_base_layer().weight
    before = probe.detach().float().sum().item()
    out = {
        "lora_layers": len(layers),
        "base_weight_gib": sum(layer.get_base_layer().weight.numel() * 2 for layer in layers) / 2**30,
    }
    sync()
    t0 = time.perf_counter()
    with merged_adapters(model):
        sync()
        t1 = time.perf_counter()
    sync()
    t2 = time.perf_counter()
    out.update(library_enter_s=t1 - t0, library_exit_s=t2 - t1)
    t0 = time.perf_counter()
    backup = [layer.get_base_layer().weight.detach().clone() for layer in layers]
    sync()
    t1 = time.perf_counter()
    model.merge_adapter()
    sync()
    t2 = time.perf_counter()
    model.unmerge_adapter()
    with torch.no_grad():
        for layer, saved in zip(layers, backup):
            layer.get_base_layer().weight.copy_(saved)
    del backup
    sync()
    t3 = time.perf_counter()
    out.update(
        device_backup_s=t1 - t0,
        merge_only_s=t2 - t1,
        unmerge_and_device_restore_s=t3 - t2,
        restored_exactly=probe.detach().float().sum().item() == before,
    )
    return out


# ------------------------------------------------------------------------------------------ main
def environment() -> dict:
    import accelerate
    import peft
    import transformers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
        "cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
    }
    if CUDA:
        env["device"] = torch.cuda.get_device_name()
        env["device_mem_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    return env


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU smoke test with a 2-layer model")
    p.add_argument("--tokenizer", default=str(ROOT / ".bench_assets" / "llama2-tokenizer"))
    p.add_argument("--workdir", default="/tmp/llava_bench")
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/llava_bench_out"))
    p.add_argument(
        "--phases",
        default="loop,generate,trainer,loop",
        help="in this order; the first training run of a process only warms it up (README)",
    )
    p.add_argument("--warmup-steps", type=int, default=None, help="default 5 (tiny: 2)")
    p.add_argument("--measured-steps", type=int, default=None, help="default 20 (tiny: 3)")
    args = p.parse_args()
    big = not args.tiny
    args.batch_size = 8 if big else 2
    args.eval_batch_size = 16 if big else 4
    args.warmup_steps = args.warmup_steps or (5 if big else 2)
    args.measured_steps = args.measured_steps or (20 if big else 3)
    args.num_workers = 8 if big else 2
    args.new_tokens = 32 if big else 4
    n_train = 256 if big else max(16, 2 * (args.warmup_steps + args.measured_steps))
    n_eval = 64 if big else 8
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "argv": sys.argv,
        "env": environment(),
        "settings": {
            k: getattr(args, k)
            for k in (
                "tiny",
                "batch_size",
                "eval_batch_size",
                "warmup_steps",
                "measured_steps",
                "num_workers",
                "new_tokens",
            )
        }
        | {"n_train": n_train, "n_eval": n_eval},
    }

    def save() -> None:
        (out / "results.json").write_text(json.dumps(results, indent=2))

    print(json.dumps(results["env"]), flush=True)
    t0 = time.perf_counter()
    processor = llava15_processor(args.tokenizer)
    data = Path(args.workdir) / "data"
    train_path = make_data(data, n_train, seed=1, q_words=(20, 35), a_words=(35, 60))
    eval_path = make_data(data, n_eval, seed=2, q_words=(12, 24), a_words=(5, 12))
    lengths = [
        int(TrainCollator(processor)([r])["attention_mask"].sum())
        for r in (as_dataset(train_path)[i] for i in range(8))
    ]
    prompt_lengths = [
        int(EvalCollator(processor)([r])["attention_mask"].sum()) for r in (as_dataset(eval_path)[i] for i in range(8))
    ]
    results["data"] = {
        "setup_s": time.perf_counter() - t0,
        "train_tokens_per_sample_first8": lengths,
        "eval_prompt_tokens_first8": prompt_lengths,
    }
    print("data", results["data"], flush=True)
    save()
    loop = None
    for name in args.phases.split(","):  # in the given order: the order is part of the measurement
        if name in ("trainer", "loop"):
            loop = None  # free the previous llava_loop model before building the next one
            free_memory()
            key = {"trainer": "train_hf_trainer", "loop": "train_llava_loop"}[name]
            key = key if key not in results else f"{key}_2"
            with phase(results, key):
                if name == "trainer":
                    results[key] = train_hf_trainer(args, processor, train_path)
                else:
                    results[key], loop = train_llava_loop(args, processor, train_path)
                print(key, results[key], flush=True)
        elif name == "generate" and loop is not None:
            with phase(results, "generate"):
                generation(args, results, save, loop, processor, eval_path, n_eval)
        save()

    print_summary(results)
    save()


class phase:
    """Runs one phase; a failure is recorded (with its traceback) and the next phase still runs."""

    def __init__(self, results: dict, name: str):
        self.results, self.name = results, name

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, kind, err, tb):
        import traceback

        self.results.setdefault("phase_s", {})[self.name] = time.perf_counter() - self.t0
        if err is not None and isinstance(err, Exception):
            text = "".join(traceback.format_exception(kind, err, tb))
            print(f"PHASE {self.name} FAILED\n{text}", flush=True)
            self.results.setdefault("errors", {})[self.name] = text
            return True
        return False


def generation(args, results, save, loop, processor, eval_path: str, n_eval: int) -> None:
    loop.__class__ = _TimedLoop
    model = loop.accelerator.unwrap_model(loop.model)
    model.eval()
    model.get_base_model().generation_config.min_new_tokens = args.new_tokens  # random weights: no early EOS
    tok = processor.tokenizer
    records = [as_dataset(eval_path)[i] for i in range(n_eval)]
    device = loop.accelerator.device
    batches = []
    for i in range(0, n_eval, args.eval_batch_size):
        b = EvalCollator(processor)(records[i : i + args.eval_batch_size])
        batches.append({k: v.to(device) for k, v in b.items() if k not in META_KEYS})
    gen: dict = {}
    results["generate"] = gen
    t0 = time.perf_counter()
    hf_generate(model, batches[:1], args.new_tokens, tok, merge=False, reps=1)  # warm-up
    gen["warmup_s"] = time.perf_counter() - t0
    gen["hf_unmerged"] = hf_generate(model, batches, args.new_tokens, tok, merge=False, reps=2)
    print("hf unmerged", gen["hf_unmerged"]["best"], flush=True)
    save()
    gen["loop_merged"] = loop_evaluate(loop, eval_path, merge=True, reps=3, n_new=args.new_tokens, warmup=1)
    print("loop merged", gen["loop_merged"]["best"], flush=True)
    save()
    gen["hf_merged"] = hf_generate(model, batches, args.new_tokens, tok, merge=True, reps=2)
    print("hf merged", gen["hf_merged"]["best"], flush=True)
    save()
    gen["loop_unmerged"] = loop_evaluate(loop, eval_path, merge=False, reps=2, n_new=args.new_tokens)
    print("loop unmerged", gen["loop_unmerged"]["best"], flush=True)
    save()
    gen["merge_variants"] = merge_variants(model)
    print("merge variants", gen["merge_variants"], flush=True)
    save()


def print_summary(results: dict) -> None:
    print("\n==== summary", results["env"].get("device", "cpu"), "====")
    keys = [k for k in results if k.startswith("train_")]
    for key in keys:
        r = results[key]
        print(
            f"{key:20s} median step {r['median_step_s']:.3f} s  {r['tokens_per_s']:8.1f} tok/s  "
            f"peak {r['peak_mem_gib']:.1f} GiB  ({r['tokens_per_step']:.0f} tok/step, init {r['init_s']:.1f} s)"
        )
    # The first training run of a process only warms it up (README): compare the later ones.
    compared = keys[1:] if len(keys) > 2 else keys
    loops = [results[k]["tokens_per_s"] for k in compared if "llava_loop" in k]
    trainers = [results[k]["tokens_per_s"] for k in compared if "hf_trainer" in k]
    if loops and trainers:
        ratio = statistics.mean(loops) / statistics.mean(trainers)
        print(f"train ratio llava_loop/Trainer tokens/s ({', '.join(compared)}): {ratio:.3f}")
    gen = results.get("generate")
    if gen:
        for key in ("hf_unmerged", "hf_merged", "loop_merged", "loop_unmerged"):
            if key in gen:
                best = gen[key]["best"]
                print(
                    f"gen {key:14s} {best['gen_tokens_per_s']:8.1f} tok/s  "
                    + " ".join(f"{k}={v:.2f}" for k, v in best.items() if k.endswith("_s") and k != "gen_tokens_per_s")
                )
        if "hf_unmerged" in gen and "loop_merged" in gen:
            ratio = gen["loop_merged"]["best"]["gen_tokens_per_s"] / gen["hf_unmerged"]["best"]["gen_tokens_per_s"]
            print(f"gen ratio Loop.evaluate(merged) / HF generate(unmerged): {ratio:.2f}")
        if "merge_variants" in gen:
            print(
                "merge",
                " ".join(
                    f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in gen["merge_variants"].items()
                ),
            )
    for name, text in results.get("errors", {}).items():
        print(f"ERROR in {name}: {text.strip().splitlines()[-1]}")


if __name__ == "__main__":
    main()
