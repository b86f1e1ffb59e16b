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
from llava_loop.callbacks import Callback
from llava_loop.collators import META_KEYS, EvalCollator, TrainCollator
from llava_loop.data import as_dataset
from llava_loop.loggers import language_model_parameters as language_model_params  # N of the MFU formula
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


SHAPES = {
    # vision tower, language model (hidden, MLP, layers, heads)
    "tiny": (
        {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4},
        {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4},
    ),
    "7b": (
        {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16},
        {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32},
    ),
    # bench_overhead.py: ~0.5B language model where the host's share of a step shows
    "0.5b": (
        {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12},
        {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 24, "num_attention_heads": 16},
    ),
}


def build_model(tiny: bool, shape: str = "7b"):
    """The one model construction every framework uses: llava-1.5 geometry, random weights.

    Weights are created directly on the GPU in bf16 (a 7B fp32 init on the CPU takes minutes);
    in ``tiny`` mode a 2-layer model in fp32 on the CPU, with the real 336 px / patch 14 geometry
    so that the real processor's 576 image tokens fit. ``shape``: a key of `SHAPES`.
    """
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    v, t = SHAPES["tiny" if tiny else shape]
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


# Named llava_loop variants (`--phases`): LoopConfig options, plus "_budget_gib" (the run is made under
# `torch.cuda.set_per_process_memory_fraction(budget / total)`, a smaller card emulated) and
# "_batch_size". Options a LoopConfig does not have are dropped and recorded ("unsupported_options").
LOOP_VARIANTS: dict[str, dict] = {
    "loop": {"gradient_checkpointing": True},  # the name before issue 10: = loop_default
    "loop_default": {"gradient_checkpointing": True},  # what a user gets (compile on CUDA, ...) + checkpointing
    "loop_eager": {  # the behaviour before issue 10
        "gradient_checkpointing": True,
        "compile": False,
        "labelled_logits_only": False,
        "fused_adamw": False,
    },
    "loop_gc16": {"gradient_checkpointing": 16},  # checkpoint 16 of the 32 decoder layers
    "loop_nogc": {"gradient_checkpointing": False},
    "loop_budget40": {"gradient_checkpointing": "auto", "_budget_gib": 40},  # a 48 GB card
    "loop_budget22_b4": {"gradient_checkpointing": "auto", "_budget_gib": 22, "_batch_size": 4},  # a 24 GB card
}
# The process's first training run is slower (README, "Run order matters"): a short run of this kind first.
WARMUP_VARIANT = "loop_default"
# TrainingArguments on top of "Trainer default" (its own fused AdamW, bf16, non-reentrant checkpointing).
TRAINER_VARIANTS: dict[str, dict] = {
    "trainer": {},
    "trainer_liger": {"use_liger_kernel": True},  # patches modeling_llama globally: run it last in its process
    "trainer_compile": {"torch_compile": True},
}
PEAK_FLOPS = 989e12  # H100/H200 dense bf16, the MFU denominator
MFU_FORMULA = (
    "MFU = 6 * N * tokens_per_s / 989e12; N = language-model parameters without the input embedding "
    "(base weights; forward + recomputation + backward to the activations, frozen weights need no weight "
    "gradients; LoRA, vision tower and attention FLOPs not counted); tokens from the attention mask"
)


def loop_config(args, options: dict | None = None) -> tuple[LoopConfig, dict]:
    """The LoopConfig of a run, and the options this version of LoopConfig does not have (dropped).

    ``options``: LoopConfig fields over the benchmark's set-up (LoRA r=128, ...); keys starting with
    ``_`` are the benchmark's own and ignored here. Dropping unknown fields lets the benchmark run
    against a library without the issue-10 options; results.json records what was dropped.
    """
    import dataclasses

    base = {
        "output_dir": str(Path(args.workdir) / "loop_out"),
        "max_steps": args.warmup_steps + args.measured_steps,
        "batch_size": args.batch_size,
        "eval_batch_size": args.eval_batch_size,
        "learning_rate": 2e-5,
        "lr_scheduler": "cosine",
        "warmup_steps": 1,
        "max_grad_norm": 1.0,
        "precision": "fp32" if args.tiny else "bf16",
        "lora_r": 128,
        "lora_alpha": 256,
        "lora_dropout": 0.05,
        "num_workers": args.num_workers,
        "max_new_tokens": args.new_tokens,
        "seed": 0,
        "handle_signals": False,
    }
    wanted = {**base, **{k: v for k, v in (options or {}).items() if not k.startswith("_")}}
    known = {f.name for f in dataclasses.fields(LoopConfig)}
    unsupported = {k: v for k, v in wanted.items() if k not in known}
    return LoopConfig(**{k: v for k, v in wanted.items() if k in known}), unsupported


def vision_params(model) -> int:
    tower = getattr(model.model, "vision_tower", None) if hasattr(model, "model") else None
    return sum(p.numel() for p in tower.parameters()) if tower is not None else 0


def random_jpeg(rng: random.Random, path: Path, sizes: list[tuple[int, int]], shapes: int, ellipses: bool) -> None:
    """A JPEG of one of ``sizes`` with ``shapes`` random rectangles (or, with ``ellipses``, rectangles and
    ellipses) on a random background, drawn from ``rng``."""
    from PIL import Image, ImageDraw

    w, h = rng.choice(sizes)
    img = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    for _ in range(shapes):
        x0, y0 = rng.randrange(w), rng.randrange(h)
        box = (x0, y0, x0 + rng.randrange(20, w // 2), y0 + rng.randrange(20, h // 2))
        fill = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if ellipses and rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    img.save(path, quality=90)


def make_data(
    folder: Path,
    n: int,
    seed: int,
    q_words: tuple[int, int],
    a_words: tuple[int, int],
    sizes: list[tuple[int, int]] | None = None,
) -> str:
    """Synthetic LLaVA-style records in a JSON file, with JPEG files of varied sizes next to it."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    sizes = sizes or [
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
        name = f"img_{seed}_{i:05d}.jpg"
        random_jpeg(rng, folder / name, sizes, shapes=12, ellipses=True)
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
    """Counts attention-mask tokens of every training forward on the device (no host sync per step).

    Hooked on the inner ``LlavaModel`` (``model.model``), which every path calls with keyword
    arguments: the full forward (Trainer, TRL), a liger-patched forward, and a loss computed from
    hidden states at labelled positions only (llava_loop's ``labelled_logits_only``).
    """

    def __init__(self, model):
        self.total = torch.zeros((), dtype=torch.int64, device=next(model.parameters()).device)
        inner = getattr(model, "model", model)
        self.handle = inner.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if module.training and mask is not None:
            self.total += mask.sum()

    def remove(self) -> None:
        self.handle.remove()


class StepClock:
    """Timestamps optimizer steps; resets the peak-memory counter after warm-up.

    ``sync_each_step``: synchronize the device at every step (true step times, one host sync per
    step for every framework alike). Without it (bench_overhead.py) the device is synchronized only
    at the end of the warm-up and of the last step, so a framework's own host syncs are not hidden
    behind the clock's; the per-step times then are host-side times.
    """

    def __init__(self, counter, warmup: int, total: int | None = None, sync_each_step: bool = True):
        self.counter, self.warmup, self.total = counter, warmup, total
        self.sync_each_step = sync_each_step
        self.times: list[float] = []
        self.tokens: list[int | None] = []
        self.t_start = time.perf_counter()

    def tick(self) -> None:
        n = len(self.times) + 1
        boundary = n == self.warmup or (self.total is not None and n >= self.total)
        if self.sync_each_step or boundary:
            sync()
        self.times.append(time.perf_counter())
        self.tokens.append(int(self.counter.total) if (self.sync_each_step or boundary) else None)
        if n == self.warmup and CUDA:
            torch.cuda.reset_peak_memory_stats()

    def summary(self) -> dict:
        w = self.warmup
        if len(self.times) <= w:
            raise RuntimeError(f"only {len(self.times)} steps were timed, {w} of them warm-up: nothing measured")
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


class memory_budget:
    """Emulates a card of ``gib`` GiB: `torch.cuda.set_per_process_memory_fraction`, reset to 1.0 after."""

    def __init__(self, gib: float | None):
        self.gib = gib

    def __enter__(self):
        if self.gib and CUDA:
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, self.gib * 2**30 / total))
        return self

    def __exit__(self, *exc):
        if self.gib and CUDA:
            torch.cuda.set_per_process_memory_fraction(1.0)
        return False


def optimizer_name(optimizer) -> str:
    """``AdamW(fused=True)``: the optimizer class under accelerate's wrapper, and whether it is fused."""
    inner = getattr(optimizer, "optimizer", optimizer)
    defaults = getattr(inner, "defaults", {})
    return f"{type(inner).__name__}(fused={defaults.get('fused')}, foreach={defaults.get('foreach')})"


def add_mfu(result: dict, n_params: int) -> dict:
    result["lm_params_N"] = n_params
    result["mfu"] = 6 * n_params * result["tokens_per_s"] / PEAK_FLOPS
    return result


# -------------------------------------------------------------------------------- training runs
class ClockCallback(Callback):
    """Starts ``clock`` when fit starts and ticks it after every optimizer step."""

    def __init__(self, clock: StepClock):
        self.clock = clock

    def on_fit_start(self, loop):
        self.clock.t_start = time.perf_counter()

    def on_step_end(self, loop, logs):
        self.clock.tick()


class _BenchLoop(Loop):
    """Loop whose final checkpoint is skipped (4 GiB of adapter + optimizer state, not benchmarked)."""

    def _save(self, best: bool = False) -> None:
        return None


def run_args(args, steps: tuple[int, int] | None = None, batch_size: int | None = None):
    """A copy of ``args`` with other warm-up/measured step counts or batch size (one run's)."""
    a = argparse.Namespace(**vars(args))
    if steps:
        a.warmup_steps, a.measured_steps = steps
    if batch_size:
        a.batch_size = batch_size
    return a


def timed_model(args) -> tuple:
    """A fresh 7B-shape (tiny: 2-layer) model after freeing the last one: ``(memory left before it (GiB),
    model, seconds to build it, language-model parameters, its TokenCounter, a StepClock on it)``."""
    mem_before = free_memory()
    t0 = time.perf_counter()
    model = build_model(args.tiny)
    sync()
    init_s = time.perf_counter() - t0
    counter = TokenCounter(model)
    return mem_before, model, init_s, language_model_params(model), counter, StepClock(counter, args.warmup_steps)


def new_results(args, keys: tuple[str, ...], **settings) -> tuple[Path, dict]:
    """The output folder (created) and the results record a benchmark fills: command line,
    environment, the settings ``keys`` of ``args`` plus ``settings``, the MFU formula, no runs yet."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return out, {
        "argv": sys.argv,
        "env": environment(),
        "settings": {k: getattr(args, k) for k in keys} | settings,
        "mfu_formula": MFU_FORMULA,
        "runs": [],
    }


def common_arguments(parser: argparse.ArgumentParser, workdir: str) -> None:
    """The flags every benchmark script takes: --tiny, --tokenizer, --workdir, --out."""
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test with a 2-layer model")
    parser.add_argument("--tokenizer", default=str(ROOT / ".bench_assets" / "llama2-tokenizer"))
    parser.add_argument("--workdir", default=workdir)
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/llava_bench_out"))


def train_llava_loop(args, processor, train_path: str, variant: str = "loop_default") -> tuple[dict, Loop]:
    options = LOOP_VARIANTS[variant]
    args = run_args(args, batch_size=None if args.tiny else options.get("_batch_size"))
    cfg, unsupported = loop_config(args, options)
    mem_before, model, init_s, n_params, counter, clock = timed_model(args)
    loop = _BenchLoop(model, processor, cfg, callbacks=[ClockCallback(clock)])
    budget = options.get("_budget_gib")
    with memory_budget(budget):
        if CUDA:
            torch.cuda.reset_peak_memory_stats()
        loop.fit(as_dataset(train_path))
    counter.remove()
    result = {
        "variant": variant,
        "options": {k: v for k, v in options.items()},
        "unsupported_options": unsupported,
        "batch_size": cfg.batch_size,
        "budget_gib": budget,
        "init_s": init_s,
        "mem_before_gib": mem_before,
        **clock.summary(),
        "loop_reported_tokens_seen": loop.state.tokens_seen,
        "optimizer": optimizer_name(loop.optimizer),
        "trainable_params": sum(p.numel() for p in loop.model.parameters() if p.requires_grad),
    }
    if budget:
        result["within_budget"] = result["peak_mem_gib"] <= budget
    # what the "auto" probe chose, where the library exposes it
    for name in ("checkpointed_layers", "gradient_checkpointing_layers"):
        if hasattr(loop.state, name) or hasattr(loop, name):
            result[name] = getattr(loop.state, name, getattr(loop, name, None))
    return add_mfu(result, n_params), loop


class _TrainerCollator:
    """The same TrainCollator, minus llava_loop's bookkeeping keys that Trainer would pass to forward."""

    def __init__(self, collator: TrainCollator):
        self.collator = collator

    def __call__(self, records: list) -> dict:
        return {k: v for k, v in self.collator(records).items() if k not in META_KEYS}


def _trainer_arguments(args, cfg: LoopConfig, out: str, cls=None, **extra):
    """Trainer default (its own optimizer: fused AdamW on CUDA) + bf16 + non-reentrant checkpointing."""
    from transformers import TrainingArguments

    return (cls or TrainingArguments)(
        output_dir=out,
        per_device_train_batch_size=cfg.batch_size,
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_steps,
        max_grad_norm=cfg.max_grad_norm,
        weight_decay=cfg.weight_decay,
        bf16=not args.tiny,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        dataloader_num_workers=cfg.num_workers,
        logging_steps=cfg.log_steps,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=cfg.seed,
        use_cpu=not CUDA,
        **extra,
    )


def _trainer_run(args, processor, make_trainer, variant: str, extra: dict) -> dict:
    """Builds the model + LoRA (prepare_model), times ``make_trainer(model, Clock()).train()``."""
    from transformers import TrainerCallback

    mem_before, model, init_s, n_params, counter, clock = timed_model(args)
    cfg, _ = loop_config(args, {"gradient_checkpointing": False})  # Trainer turns checkpointing on itself
    model = prepare_model(model, cfg)

    class Clock(TrainerCallback):
        def on_train_begin(self, targs, state, control, **kwargs):
            clock.t_start = time.perf_counter()

        def on_step_end(self, targs, state, control, **kwargs):
            clock.tick()

    trainer = make_trainer(model, cfg, Clock())
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    counter.remove()
    result = {
        "variant": variant,
        "training_arguments": extra,
        "optimizer": optimizer_name(trainer.optimizer),
        "optim": str(trainer.args.optim),
        "init_s": init_s,
        "mem_before_gib": mem_before,
        **clock.summary(),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    del trainer, model
    return add_mfu(result, n_params)


def train_hf_trainer(args, processor, train_path: str, variant: str = "trainer") -> dict:
    from transformers import Trainer

    extra = TRAINER_VARIANTS[variant]

    def make(model, cfg, clock):
        targs = _trainer_arguments(
            args,
            cfg,
            str(Path(args.workdir) / "trainer_out"),
            remove_unused_columns=False,
            label_names=["labels"],
            **extra,
        )
        return Trainer(
            model=model,
            args=targs,
            train_dataset=as_dataset(train_path),
            data_collator=_TrainerCollator(TrainCollator(processor)),
            callbacks=[clock],
        )

    return _trainer_run(args, processor, make, variant, extra)


def sft_dataset(train_path: str):
    """The benchmark's records as a `datasets.Dataset` in TRL's conversational vision format.

    One row per record: ``images`` (the JPEG path, decoded to PIL on access, i.e. in the DataLoader
    workers) and ``messages`` (user question without the ``<image>`` marker, TRL inserts the image
    block itself; assistant answer).
    """
    import datasets

    records = json.loads(Path(train_path).read_text())
    folder = Path(train_path).parent
    rows = {"images": [], "messages": []}
    for r in records:
        question, answer = (turn["value"] for turn in r["conversations"])
        rows["images"].append([str(folder / r["image"])])
        rows["messages"].append(
            [
                {"role": "user", "content": question.replace("<image>", "").strip()},
                {"role": "assistant", "content": answer},
            ]
        )
    return datasets.Dataset.from_dict(rows).cast_column("images", datasets.List(datasets.Image()))


def train_trl_sft(args, processor, train_path: str, variant: str = "sft") -> dict:
    """TRL `SFTTrainer` with our model + LoRA (a PeftModel), the llava-1.5 processor and its own collator.

    Its `DataCollatorForVisionLanguageModeling` applies the chat template and labels every
    non-padding token: it trains on the prompt (image tokens included) too, unlike our
    assistant-only labels. Assistant-only loss for vision datasets needs transformers >= 5.18.
    """
    import trl
    from trl import SFTConfig, SFTTrainer

    dataset = sft_dataset(train_path)

    def make(model, cfg, clock):
        targs = _trainer_arguments(
            args,
            cfg,
            str(Path(args.workdir) / "sft_out"),
            cls=SFTConfig,
            max_length=None,  # no truncation: cutting into the 576 image tokens breaks LLaVA
        )
        return SFTTrainer(
            model=model,
            args=targs,
            train_dataset=dataset,
            processing_class=processor,
            callbacks=[clock],
        )

    result = _trainer_run(args, processor, make, variant, {"max_length": None})
    result["trl"] = trl.__version__
    result["note"] = "TRL's collator trains on the prompt too (labels = every non-padding token)"
    return result


# ------------------------------------------------------------------------------------ generation
class _TimedLoop(_BenchLoop):
    """Adds timers inside `Loop.evaluate`: generation (`_generate`, which the default `generate` and the
    eval loss read off its cache both call), whole evaluation steps, waits for the next batch, and
    merging/unmerging the adapters."""

    timers: dict

    def _generate(self, batch, gen_config, keep=False):
        sync()
        t0 = time.perf_counter()
        out = super()._generate(batch, gen_config, keep)  # decodes, so it ends with a sync
        self.timers["generate_s"] += time.perf_counter() - t0
        return out

    def evaluation_step(self, batch):
        t0 = time.perf_counter()
        out = super().evaluation_step(batch)
        sync()
        self.timers["evaluation_step_s"] += time.perf_counter() - t0
        return out

    def _eval_loader(self, dataset):
        return self._timed_batches(super()._eval_loader(dataset))  # the workers start now, as in Loop

    def _timed_batches(self, batches):
        while True:
            t0 = time.perf_counter()
            batch = next(batches, None)
            self.timers["batch_wait_s"] += time.perf_counter() - t0
            self.timers.setdefault("batch_waits_s", []).append(round(time.perf_counter() - t0, 4))
            if batch is None:
                return
            yield batch


def _timed_merge(loop: _TimedLoop):
    """`llava_loop.loop.merged_adapters`, timing its entry and exit into ``loop.timers["merge_s"]``."""
    import contextlib

    import llava_loop.loop as loop_module

    inner = loop_module.merged_adapters

    @contextlib.contextmanager
    def timed(model, enabled=True):
        sync()
        t0 = time.perf_counter()
        with inner(model, enabled=enabled):
            sync()
            loop.timers["merge_s"] += time.perf_counter() - t0
            yield model
            sync()
            t0 = time.perf_counter()
        sync()
        loop.timers["merge_s"] += time.perf_counter() - t0

    loop_module.merged_adapters = timed


def loop_evaluate(loop: Loop, eval_path: str, merge: bool, reps: int, n_new: int, warmup: int = 0) -> dict:
    """``loop.evaluate`` of the records of ``eval_path``, loaded once (as `fit` holds its eval set), so
    the prompt-length order and the eval workers are reused from the second evaluation on, as during
    `fit`; the ``warmup`` first evaluations are not counted."""
    dataset = as_dataset(eval_path)
    loop.config.merge_lora_for_eval = merge
    runs = []
    for _ in range(reps):
        loop.timers = {"generate_s": 0.0, "evaluation_step_s": 0.0, "batch_wait_s": 0.0, "merge_s": 0.0}
        sync()
        t0 = time.perf_counter()
        summary = loop.evaluate(dataset)
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
                "eval_loss_s": loop.timers["evaluation_step_s"] - loop.timers["generate_s"],
                "loss_from_cache": loop._loss_from_cache,
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
            seconds, n = hf_pass(model, batches, n_new, tokenizer, static=False)
            t2 = t1 + seconds
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


def pad_left(batch: dict, length: int, pad_id: int) -> dict:
    """Left-pads ``input_ids``/``attention_mask`` to ``length`` (one shape for every batch: one static-cache compile)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    extra = length - ids.shape[1]
    if extra <= 0:
        return batch
    ids = torch.nn.functional.pad(ids, (extra, 0), value=pad_id)
    mask = torch.nn.functional.pad(mask, (extra, 0), value=0)
    return {**batch, "input_ids": ids, "attention_mask": mask}


def hf_pass(model, batches: list[dict], n_new: int, tokenizer, static: bool) -> tuple[float, int]:
    """One plain ``generate`` pass (adapters as they are), decoding included; seconds and new tokens."""
    extra = {"cache_implementation": "static"} if static else {}
    sync()
    t0 = time.perf_counter()
    n = 0
    for b in batches:
        out = model.generate(
            **b,
            max_new_tokens=n_new,
            min_new_tokens=n_new,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            **extra,
        )
        new = out[:, b["input_ids"].shape[1] :]
        tokenizer.batch_decode(new, skip_special_tokens=True)
        n += new.numel()
    sync()
    return time.perf_counter() - t0, n


# The generation command's variants, in the order run (most wanted first: the time guard skips the tail).
GEN_VARIANTS = (
    "hf_static_bs64,loop_bs64,loop_bs16,hf_static_bs16,loop_bs32,loop_noloss_best,hf_dynamic_bs64,hf_dynamic_bs16"
)


def generation_sweep(args, results: dict, save, processor, eval_path: str, deadline: float) -> None:
    """Plain-HF generate peers (merged adapters; dynamic / static cache; bs 16 / 64) and `Loop.evaluate`.

    Every variant: one warm-up call (compilation), then the best of ``args.gen_reps`` passes over
    all eval prompts; each variant is a phase of its own (a failure is recorded, the next runs), and
    one that would start with less than ``args.min_phase_s`` left of the budget is skipped.
    """
    import torch._dynamo

    gen: dict = results.setdefault("gen_sweep", {})
    # transformers compiles the static-cache decode per batch shape and llava_loop its own: room for all
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))
    cfg, unsupported = loop_config(args, {"gradient_checkpointing": False})
    gen["unsupported_options"] = unsupported
    model = build_model(args.tiny)
    n_lm, n_vision = language_model_params(model), vision_params(model)
    model = prepare_model(model, cfg)  # LoRA adapters, as after training
    loop = _TimedLoop(model, processor, cfg)
    _timed_merge(loop)
    model.get_base_model().generation_config.min_new_tokens = args.new_tokens  # random weights: no early EOS
    model.eval()
    tok = processor.tokenizer
    dataset = as_dataset(eval_path)
    records = [dataset[i] for i in range(len(dataset))]
    device = next(model.parameters()).device
    natural = {}

    def batches(bs: int, padded: bool) -> list[dict]:
        if bs not in natural:
            natural[bs] = []
            for i in range(0, len(records), bs):
                b = EvalCollator(processor)(records[i : i + bs])
                natural[bs].append({k: v.to(device) for k, v in b.items() if k not in META_KEYS})
        if not padded:
            return natural[bs]
        length = max(b["input_ids"].shape[1] for b in natural[bs])
        length = -(-length // 64) * 64
        return [pad_left(b, length, tok.pad_token_id) for b in natural[bs]]

    prompt_tokens = sum(int(b["attention_mask"].sum()) for b in batches(16, False))
    n = len(records)
    mean_prompt = prompt_tokens / n
    flops = 2 * n_lm * (mean_prompt + args.new_tokens) + 2 * n_vision * 577
    gen["compute_bound"] = {
        "formula": "FLOPs/sample = 2*N_lm*(prompt tokens + new tokens) + 2*N_vision*577 (forward only, "
        "attention FLOPs not counted); bound = 989e12 / FLOPs per sample; gen tokens/s = samples/s * new tokens",
        "N_lm": n_lm,
        "N_vision": n_vision,
        "samples": n,
        "mean_prompt_tokens": mean_prompt,
        "new_tokens": args.new_tokens,
        "samples_per_s": PEAK_FLOPS / flops,
        "gen_tokens_per_s": PEAK_FLOPS / flops * args.new_tokens,
    }
    print("compute bound", gen["compute_bound"], flush=True)
    save()

    def hf_variant(bs: int, static: bool) -> dict:
        padded = batches(bs, static)  # static cache: one prompt length for every batch
        runs = []
        with merged_adapters(model):
            warm_s, _ = hf_pass(model, padded[:1], args.new_tokens, tok, static)  # compiles the shape
            for _ in range(args.gen_reps):
                secs, new = hf_pass(model, padded, args.new_tokens, tok, static)
                runs.append({"wall_s": secs, "gen_tokens": new, "gen_tokens_per_s": new / secs})
        return {
            "batch_size": bs,
            "cache": "static" if static else "dynamic",
            "prompt_length": padded[0]["input_ids"].shape[1] if static else "per batch",
            "warmup_s": warm_s,
            "runs": runs,
            "best": max(runs, key=lambda r: r["gen_tokens_per_s"]),
        }

    def loop_variant(bs: int, eval_loss: bool) -> dict:
        loop.config.eval_batch_size = bs
        loop.config.eval_loss = eval_loss
        out = loop_evaluate(loop, eval_path, merge=True, reps=args.gen_reps + 1, n_new=args.new_tokens, warmup=1)
        return {"batch_size": bs, "eval_loss": eval_loss, **out}

    def best_loop_bs() -> int:
        done = {v["batch_size"]: v["best"]["gen_tokens_per_s"] for k, v in gen.items() if k.startswith("loop_bs")}
        return max(done, key=done.get) if done else args.eval_batch_size

    for name in args.gen_variants.split(","):
        if not name:
            continue
        left = deadline - time.perf_counter()
        if left < args.min_phase_s:
            results.setdefault("skipped", {})[f"gen/{name}"] = f"{left:.0f} s of the budget left"
            print(f"gen/{name} skipped: {left:.0f} s of the budget left", flush=True)
            continue
        with phase(results, f"gen/{name}", limit_s=left - args.reserve_s):
            if name.startswith("hf_"):
                cache, bs = name[3:].split("_bs")
                gen[name] = hf_variant(int(bs) if not args.tiny else max(2, int(bs) // 16), cache == "static")
            elif name == "loop_noloss_best":
                gen[name] = loop_variant(best_loop_bs(), eval_loss=False)
            elif name.startswith("loop_bs"):
                bs = int(name[len("loop_bs") :])
                gen[name] = loop_variant(bs if not args.tiny else max(2, bs // 16), eval_loss=True)
            else:
                raise ValueError(f"unknown generation variant {name!r}; known: {GEN_VARIANTS}")
            print(f"gen/{name}", gen[name]["best"], flush=True)
        save()


# ------------------------------------------------------------------------------------------ main
def environment() -> dict:
    import importlib.metadata

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
    }
    for name in (
        "transformers",
        "peft",
        "accelerate",
        "trl",
        "liger-kernel",
        "datasets",
        "triton",
        "bitsandbytes",
        "torchao",
    ):
        try:
            env[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            env[name] = "not installed"
    if CUDA:
        env["device"] = torch.cuda.get_device_name()
        env["device_mem_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    return env


TRAIN_PHASES = {"warmup", "sft", *LOOP_VARIANTS, *TRAINER_VARIANTS}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common_arguments(p, "/tmp/llava_bench")
    p.add_argument(
        "--phases",
        default="loop,generate,trainer,loop",
        help="in this order; the first training run of a process only warms it up (README). Training: warmup, "
        f"{', '.join(LOOP_VARIANTS)}, {', '.join(TRAINER_VARIANTS)}, sft; generation: generate (after a "
        "llava_loop run), gen_sweep",
    )
    p.add_argument("--warmup-steps", type=int, default=None, help="default 5 (tiny: 2)")
    p.add_argument("--measured-steps", type=int, default=None, help="default 20 (tiny: 3)")
    p.add_argument(
        "--warmup-run-steps", default=None, help="WARMUP,MEASURED of the 'warmup' run; default 5,10 (tiny: 1,1)"
    )
    p.add_argument("--n-eval", type=int, default=None, help="gen_sweep prompts; default 256 (tiny: 8)")
    p.add_argument("--gen-reps", type=int, default=2, help="gen_sweep: timed passes per variant (best is kept)")
    p.add_argument("--gen-variants", default=GEN_VARIANTS, help="gen_sweep variants, in this order")
    p.add_argument(
        "--budget-s",
        type=float,
        default=float(os.environ.get("BENCH_BUDGET", 520)),
        help="no phase starts later than this many seconds after the start minus --min-phase-s, and a running "
        "one is stopped (recorded as an error) --reserve-s before it, so the summary is always printed",
    )
    p.add_argument("--min-phase-s", type=float, default=None, help="default 45 (tiny: 0)")
    p.add_argument("--reserve-s", type=float, default=10.0)
    args = p.parse_args()
    t_start = time.perf_counter()
    big = not args.tiny
    args.batch_size = 8 if big else 2
    args.eval_batch_size = int(os.environ.get("BENCH_EVAL_BS", 16)) if big else 4
    args.warmup_steps = args.warmup_steps or (5 if big else 2)
    args.measured_steps = args.measured_steps or (20 if big else 3)
    warmup_run = tuple(int(x) for x in (args.warmup_run_steps or ("5,10" if big else "1,1")).split(","))
    args.num_workers = 8 if big else 2
    args.new_tokens = 32 if big else 4
    args.n_eval = args.n_eval or (256 if big else 8)
    args.min_phase_s = args.min_phase_s if args.min_phase_s is not None else (45.0 if big else 0.0)
    deadline = t_start + args.budget_s
    phases = [x for x in args.phases.split(",") if x]
    unknown = [x for x in phases if x not in TRAIN_PHASES | {"generate", "gen_sweep"}]
    if unknown:
        p.error(f"unknown phases {unknown}; known: {sorted(TRAIN_PHASES | {'generate', 'gen_sweep'})}")
    n_train = 256 if big else max(16, 2 * (args.warmup_steps + args.measured_steps))
    n_eval = 64 if big else 8
    keys = ("tiny", "batch_size", "eval_batch_size", "warmup_steps", "measured_steps", "num_workers", "new_tokens")
    keys += ("n_eval", "gen_reps", "budget_s")
    out, results = new_results(args, keys, n_train=n_train, n_eval_generate=n_eval, warmup_run_steps=warmup_run)

    def save() -> None:
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str))

    print(json.dumps(results["env"]), flush=True)
    t0 = time.perf_counter()
    processor = llava15_processor(args.tokenizer)
    data = Path(args.workdir) / "data"
    train_path = eval_path = sweep_path = None
    results["data"] = {}
    if any(x in TRAIN_PHASES for x in phases):
        train_path = make_data(data, n_train, seed=1, q_words=(20, 35), a_words=(35, 60))
        results["data"]["train_tokens_per_sample_first8"] = [
            int(TrainCollator(processor)([r])["attention_mask"].sum())
            for r in (as_dataset(train_path)[i] for i in range(8))
        ]
    if "generate" in phases:
        eval_path = make_data(data, n_eval, seed=2, q_words=(12, 24), a_words=(5, 12))
    if "gen_sweep" in phases:
        sweep_path = make_data(data, args.n_eval, seed=3, q_words=(12, 24), a_words=(5, 12))
    for path in (eval_path, sweep_path):
        if path:
            results["data"]["eval_prompt_tokens_first8"] = [
                int(EvalCollator(processor)([r])["attention_mask"].sum())
                for r in (as_dataset(path)[i] for i in range(8))
            ]
    results["data"]["setup_s"] = time.perf_counter() - t0
    print("data", results["data"], flush=True)
    save()
    loop = None
    for name in phases:  # in the given order: the order is part of the measurement
        left = deadline - time.perf_counter()
        key = f"{len(results['runs']) + 1}:{name}" if name in TRAIN_PHASES else name
        if left < args.min_phase_s:
            results.setdefault("skipped", {})[key] = f"{left:.0f} s of the budget left"
            print(f"{key} skipped: {left:.0f} s of the budget left", flush=True)
            continue
        if name in TRAIN_PHASES:
            loop = None  # free the previous llava_loop model before building the next one
            free_memory()
            with phase(results, key, limit_s=left - args.reserve_s):
                first = not results["runs"]  # the process's first training run (README: run order)
                row = {"name": name, "position": len(results["runs"]) + 1, "first_in_process": first}
                results["runs"].append(row)
                if name == "warmup":
                    r, loop = train_llava_loop(run_args(args, steps=warmup_run), processor, train_path, WARMUP_VARIANT)
                elif name in LOOP_VARIANTS:
                    r, loop = train_llava_loop(args, processor, train_path, name)
                elif name == "sft":
                    r = train_trl_sft(args, processor, train_path)
                else:
                    r = train_hf_trainer(args, processor, train_path, name)
                row.update(r, status="ok")
                print(key, {k: v for k, v in row.items() if k != "all_step_s"}, flush=True)
            if results["runs"] and results["runs"][-1].get("status") != "ok":
                results["runs"][-1]["status"] = "failed"
        elif name == "generate":
            if loop is None:
                results.setdefault("skipped", {})[name] = "needs a llava_loop training run right before it"
                continue
            with phase(results, "generate", limit_s=left - args.reserve_s):
                generation(args, results, save, loop, processor, eval_path, n_eval)
        elif name == "gen_sweep":
            loop = None
            free_memory()
            with phase(results, "gen_sweep", limit_s=left - args.reserve_s):
                generation_sweep(args, results, save, processor, sweep_path, deadline)
        save()
    results["total_s"] = time.perf_counter() - t_start
    save()
    print_summary(results)


class PhaseTimeout(BaseException):
    """Raised in the main thread when a phase outlives the command's time budget.

    A BaseException so that a library's ``except Exception`` (a compiler's fallback, say) does not swallow it.
    """


class phase:
    """Runs one phase; a failure is recorded (with its traceback) and the next phase still runs.

    ``limit_s``: the phase is interrupted (SIGALRM, recorded as an error) after this many seconds.
    """

    def __init__(self, results: dict, name: str, limit_s: float | None = None):
        self.results, self.name, self.limit_s = results, name, limit_s
        self.old_handler = None

    def __enter__(self):
        import signal

        self.t0 = time.perf_counter()
        if self.limit_s is not None and hasattr(signal, "setitimer"):

            def on_alarm(signum, frame):
                raise PhaseTimeout(f"phase {self.name} stopped after {self.limit_s:.0f} s: the time budget ran out")

            self.old_handler = signal.signal(signal.SIGALRM, on_alarm)
            signal.setitimer(signal.ITIMER_REAL, max(1.0, self.limit_s))
        return self

    def __exit__(self, kind, err, tb):
        import signal
        import traceback

        if self.old_handler is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.old_handler)
        self.results.setdefault("phase_s", {})[self.name] = time.perf_counter() - self.t0
        if err is not None and isinstance(err, (Exception, PhaseTimeout)):
            text = "".join(traceback.format_exception(kind, err, tb))
            print(f"PHASE {self.name} FAILED\n{text}", flush=True)
            self.results.setdefault("errors", {})[self.name] = text
            if CUDA:
                torch.cuda.set_per_process_memory_fraction(1.0)  # a budgeted run that failed inside
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


def _mean(xs: list[float]) -> float | None:
    return statistics.mean(xs) if xs else None


def training_ratios(results: dict) -> dict:
    """Per variant: mean tokens/s and peak memory over its runs that are not the process's first
    training run (nor the warm-up run), and each llava_loop variant's ratio to each peer present."""
    by_name: dict[str, list[dict]] = {}
    for r in results.get("runs", []):
        if r.get("status") == "ok" and not r["first_in_process"] and r["name"] != "warmup":
            by_name.setdefault(r["name"], []).append(r)
    means = {
        name: {
            "runs": len(rs),
            "tokens_per_s": _mean([r["tokens_per_s"] for r in rs]),
            "peak_mem_gib": max(r["peak_mem_gib"] for r in rs),
            "mfu": _mean([r["mfu"] for r in rs]),
        }
        for name, rs in by_name.items()
    }
    peers = [n for n in means if n in TRAINER_VARIANTS or n == "sft"]
    ratios = {
        f"{n}/{peer}": means[n]["tokens_per_s"] / means[peer]["tokens_per_s"]
        for n in means
        if n in LOOP_VARIANTS
        for peer in peers
    }
    return {"means": means, "ratios": ratios}


def print_summary(results: dict) -> None:
    env = results["env"]
    print(
        f"\n==== summary: {env.get('device', 'cpu')}, torch {env['torch']}, transformers {env['transformers']}, "
        f"peft {env['peft']}, trl {env['trl']}, liger {env['liger-kernel']} ===="
    )
    runs = results.get("runs", [])
    if runs:
        print(f"{'#':>2} {'run':18s} {'status':7s} {'tok/s':>8s} {'med step':>8s} {'peak GiB':>8s} {'MFU':>6s}  notes")
        for r in runs:
            if r.get("status") != "ok":
                print(f"{r['position']:>2} {r['name']:18s} {r.get('status', '?'):7s}")
                continue
            notes = []
            if r["first_in_process"] or r["name"] == "warmup":
                notes.append("excluded (first run)")
            if r.get("unsupported_options"):
                notes.append(f"unsupported {sorted(r['unsupported_options'])}")
            if r.get("budget_gib"):
                notes.append(f"budget {r['budget_gib']} GiB, bs {r['batch_size']}, within {r.get('within_budget')}")
            if r.get("optimizer"):
                notes.append(r["optimizer"])
            print(
                f"{r['position']:>2} {r['name']:18s} ok      {r['tokens_per_s']:8.1f} {r['median_step_s']:8.3f} "
                f"{r['peak_mem_gib']:8.1f} {r['mfu']:6.3f}  {'; '.join(notes)}"
            )
        agg = training_ratios(results)
        results["training_summary"] = agg
        for key, value in agg["ratios"].items():
            print(f"ratio tokens/s {key:34s} {value:.3f}")
        print(results["mfu_formula"])
    gen = results.get("gen_sweep")
    if gen:
        bound = gen.get("compute_bound", {})
        hf = {k: v for k, v in gen.items() if k.startswith("hf_") and "best" in v}
        lp = {k: v for k, v in gen.items() if k.startswith("loop_") and "best" in v}
        print(f"{'generation':18s} {'bs':>3s} {'tok/s':>8s} {'wall s':>7s}  passes (tok/s)")
        for k, v in {**hf, **lp}.items():
            passes = ", ".join(f"{r['gen_tokens_per_s']:.0f}" for r in v["runs"])
            print(
                f"{k:18s} {v['batch_size']:>3} {v['best']['gen_tokens_per_s']:8.1f} {v['best']['wall_s']:7.2f}  {passes}"
            )
        if hf:
            best_hf = max(hf, key=lambda k: hf[k]["best"]["gen_tokens_per_s"])
            top = hf[best_hf]["best"]["gen_tokens_per_s"]
            print(f"best plain HF: {best_hf} {top:.1f} tok/s")
            for k, v in lp.items():
                print(f"ratio {k}/{best_hf}: {v['best']['gen_tokens_per_s'] / top:.3f}")
        if bound:
            print(
                f"compute bound {bound['gen_tokens_per_s']:.0f} gen tok/s ({bound['samples_per_s']:.1f} samples/s); "
                + ", ".join(
                    f"{k} {v['best']['gen_tokens_per_s'] / bound['gen_tokens_per_s']:.1%}" for k, v in lp.items()
                )
            )
            print(bound["formula"])
    old = results.get("generate")
    if old:
        for key in ("hf_unmerged", "hf_merged", "loop_merged", "loop_unmerged"):
            if key in old:
                print(f"generate {key:14s} {old[key]['best']['gen_tokens_per_s']:8.1f} tok/s")
    for name, why in results.get("skipped", {}).items():
        print(f"SKIPPED {name}: {why}")
    for name, text in results.get("errors", {}).items():
        print(f"ERROR in {name}: {text.strip().splitlines()[-1][:300]}")
    print(f"total {results.get('total_s', 0):.0f} s")


if __name__ == "__main__":
    main()
