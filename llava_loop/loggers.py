"""Loggers: ``metrics.jsonl``, the tqdm progress bar, the start banner and end summary
(``summary.json``) as callbacks, and what the loop measures for them (throughput, MFU, learning rates).

`Loop` adds `JSONLLogger`, `ProgressBar` and `RunSummary` itself (main process only; a `RunSummary`
passed in ``callbacks`` replaces the default one), and `llava_loop.trackers.TrackerLogger` when
``report_to`` names experiment trackers. docs/logging.md lists every key.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

from .callbacks import Callback
from .checkpointing import atomic_write_text, best_checkpoint, checkpoints_dir, list_checkpoints

logger = logging.getLogger(__name__)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    return value


class JSONLLogger(Callback):
    """Appends one JSON object per log event to ``{output_dir}/metrics.jsonl`` (with ``step``).

    A fresh run starts the file anew. A resumed run appends, and marks its first record with
    ``"resumed": true, "resumed_from_step": S``: the records of the interrupted run after step S
    describe steps that are redone, and `read_metrics` drops them.
    """

    def __init__(self, path: str):
        self.path = path
        self._resumed_from_step: int | None = None  # set until the first record after a resume

    def on_fit_start(self, loop: Any) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        if loop.resumed_from is not None:
            self._resumed_from_step = loop.state.step
        elif os.path.isfile(self.path) and os.path.getsize(self.path):
            # The log of an earlier attempt that saved no checkpoint (a run with checkpoints is refused).
            logger.warning("starting %s anew: it held the log of an earlier run that saved no checkpoint", self.path)
            open(self.path, "w").close()

    def on_log(self, loop: Any, logs: dict) -> None:
        record = {k: _jsonable(v) for k, v in logs.items()}
        if self._resumed_from_step is not None:
            record.update(resumed=True, resumed_from_step=self._resumed_from_step)
            self._resumed_from_step = None
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def write_predictions(path: str | Path, rows: list[dict]) -> None:
    """One JSON object per line (e.g. ``id, prompt, prediction, references, scores``), written atomically."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


class Throughput:
    """Training speed over one logging window: the time of the optimizer steps (loading and collating
    their data included; evaluation and saving not), their tokens, samples and losses, and the model FLOPs
    utilisation when the GPU's peak is known (`setup_mfu`)."""

    def __init__(self) -> None:
        self.seconds, self.tokens, self.samples = 0.0, 0.0, 0.0  # sums over the window's steps
        self.losses: list[float] = []  # each step's mean training loss
        self._clock = time.perf_counter()  # when the current step's time started
        self.flops_per_token = 0.0  # model FLOPs of one trained token (`model_flops_per_token`)
        self.peak_flops: float | None = None  # dense peak FLOP/s of all processes together; None: no train/mfu

    def setup_mfu(self, model: Any, device: Any, num_processes: int, peak_tflops: float | None = None) -> None:
        """Enable ``train/mfu`` on a GPU whose peak is known: ``peak_tflops`` (one GPU's dense bf16/fp16
        TFLOP/s) or the `gpu_peak_tflops` of ``torch.cuda.get_device_name(device)``. Nothing on the CPU;
        an unknown GPU is reported once, at info level."""
        import torch

        self.peak_flops = None
        if torch.device(device).type != "cuda":
            return
        name = torch.cuda.get_device_name(device)
        tflops = peak_tflops or gpu_peak_tflops(name)
        if tflops is None:
            logger.info(
                "train/mfu is not logged: no dense bf16/fp16 peak is known for GPU %r; set peak_tflops (TFLOP/s of one GPU)",
                name,
            )
            return
        self.flops_per_token = model_flops_per_token(model)
        self.peak_flops = tflops * 1e12 * num_processes

    def restart_clock(self) -> None:
        """The next step's time starts now (after an evaluation or save, at an epoch's start)."""
        self._clock = time.perf_counter()

    def add_step(self, tokens: float, samples: float) -> None:
        """Count a finished optimizer step: its time since the clock started, tokens and samples."""
        self.seconds += time.perf_counter() - self._clock
        self.tokens += tokens
        self.samples += samples

    def window(self, steps_left: int) -> dict[str, float]:
        """``train/loss`` (mean over the window), ``train/tokens_per_s``, ``train/samples_per_s``,
        ``train/eta_s`` (at this window's speed) and ``train/mfu`` (see `setup_mfu`); the window then
        starts again."""
        steps = max(len(self.losses), 1)
        tokens_per_s = self.tokens / max(self.seconds, 1e-9)
        record = {
            "train/loss": sum(self.losses) / steps,
            "train/tokens_per_s": tokens_per_s,
            "train/samples_per_s": self.samples / max(self.seconds, 1e-9),
            "train/eta_s": steps_left * self.seconds / steps,
        }
        if self.peak_flops:
            record["train/mfu"] = self.flops_per_token * tokens_per_s / self.peak_flops
        self.seconds, self.tokens, self.samples, self.losses = 0.0, 0.0, 0.0, []
        return record


# Dense (no sparsity) bf16/fp16 tensor-core peak of one GPU in TFLOP/s, with fp32 accumulation (what
# PyTorch's bf16/fp16 matmuls use), from NVIDIA's datasheets and architecture whitepapers. The first
# pattern found in the lower-cased ``torch.cuda.get_device_name`` wins.
GPU_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"\bgb200\b", 2500.0),
    (r"\bb200\b", 2250.0),
    (r"\bb100\b", 1750.0),
    (r"\bh100\b.*\bnvl\b", 835.0),
    (r"\bh100\b.*\bpcie\b", 756.0),
    (r"\bh100\b", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    (r"\bh800\b.*\bpcie\b", 756.0),
    (r"\bh800\b", 989.0),
    (r"\bh200\b.*\bnvl\b", 835.0),
    (r"\bgh200\b", 989.0),
    (r"\bh200\b", 989.0),
    (r"\ba100\b", 312.0),
    (r"\ba800\b", 312.0),
    (r"\ba30\b", 165.0),
    (r"\ba40\b", 149.7),
    (r"\ba10g\b", 125.0),  # AWS's A10 variant; NVIDIA publishes the A10's figure
    (r"\ba10\b", 125.0),
    (r"\bl40s\b", 362.0),
    (r"\bl40\b", 181.0),
    (r"\bl4\b", 121.0),
    (r"\brtx a6000\b", 154.8),
    (r"\b4090\b", 165.2),
    (r"\b3090 ti\b", 80.0),
    (r"\b3090\b", 71.0),
    (r"\bv100s\b", 130.0),
    (r"\bv100\b.*\bpcie\b", 112.0),
    (r"\bv100\b", 125.0),  # SXM2
    (r"\bt4\b", 65.0),
)


def gpu_peak_tflops(device_name: str) -> float | None:
    """Dense bf16/fp16 peak TFLOP/s of one GPU from its ``torch.cuda.get_device_name`` (`GPU_PEAK_TFLOPS`),
    or None for a GPU not in the table.

    Example:
        >>> gpu_peak_tflops("NVIDIA H100 80GB HBM3"), gpu_peak_tflops("NVIDIA A100-SXM4-80GB")
        (989.0, 312.0)
        >>> gpu_peak_tflops("Some New GPU") is None
        True
    """
    name = device_name.lower()
    return next((tflops for pattern, tflops in GPU_PEAK_TFLOPS if re.search(pattern, name)), None)


def model_flops_per_token(model: Any) -> float:
    """Model FLOPs of training on one token: 6 x `language_model_parameters` (2 for the forward pass, 4
    for the backward), the convention of PaLM's MFU, kept fixed so that runs compare (the same N as
    benchmarks/RESULTS.md). Not counted: attention's sequence-length term, and the vision tower and
    projector, which run per image, not per token. With LoRA the hardware does less (frozen weights
    get no weight gradient), with gradient checkpointing more (the forward is redone).

    Example:
        >>> import torch
        >>> model_flops_per_token(torch.nn.Linear(10, 10))  # no decoder: all 110 parameters
        660.0
    """
    return 6.0 * language_model_parameters(model)


def language_model_parameters(model: Any) -> int:
    """The parameters a text token goes through as matrix products: the decoder (``get_decoder()``)
    without its input embedding (a lookup), plus the output head (also when tied to the embedding: the
    product is computed). A model without a decoder: all its parameters. 4-bit packed weights count
    as the weights they hold.

    Example:
        >>> from llava_loop.testing import tiny_llava
        >>> model, _ = tiny_llava()
        >>> language_model_parameters(model) < sum(p.numel() for p in model.parameters())
        True
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    if decoder is None:
        return sum(_numel(p) for p in model.parameters())
    n = sum(_numel(p) for p in decoder.parameters()) - _numel(decoder.get_input_embeddings().weight)
    head = base.get_output_embeddings()
    return n + (_numel(head.weight) if head is not None else 0)


def _numel(param: Any) -> int:
    """Weights a parameter holds; bitsandbytes' 4-bit ``Params4bit`` packs two per byte of its storage."""
    if type(param).__name__ == "Params4bit":
        return param.numel() * 2 * param.element_size()
    return param.numel()


def new_token_count(new_tokens: Any, eos_token_id: int | list[int] | None) -> int:
    """Tokens a ``generate`` call produced: each row of ``new_tokens`` counted up to and including its
    first EOS (what follows is padding); every token when there is no EOS id."""
    import torch

    if eos_token_id is None:
        return new_tokens.numel()
    eos = torch.isin(new_tokens, torch.as_tensor(eos_token_id, device=new_tokens.device))
    after_eos = (eos.cumsum(-1) - eos.int()) > 0  # positions after a row's first EOS
    return int((~after_eos).sum())


def read_metrics(path: str) -> list[dict]:
    """The records of ``metrics.jsonl`` as one run: where a resumed run's first record says
    ``resumed_from_step: S``, the earlier records with step > S (redone after the resume) are dropped.

    Example:
        >>> read_metrics("runs/a/metrics.jsonl")[-1]["step"]  # doctest: +SKIP
        400
    """
    records: list[dict] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if "resumed_from_step" in record:
                records = [r for r in records if r.get("step", 0) <= record["resumed_from_step"]]
            records.append(record)
    return records


class ProgressBar(Callback):
    """A tqdm bar over optimizer steps showing loss, lr and throughput; eval results printed below."""

    def __init__(self) -> None:
        self.bar = None

    def on_fit_start(self, loop: Any) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=loop.state.max_steps, initial=loop.state.step, desc="train", dynamic_ncols=True)

    def on_step_end(self, loop: Any, logs: dict) -> None:
        self.bar.update(loop.state.step - self.bar.n)

    def on_log(self, loop: Any, logs: dict) -> None:
        shown = {k.split("/", 1)[1]: v for k, v in logs.items() if k.startswith("train/")}
        if shown:
            keys = ("loss", "lr", "grad_norm", "tokens_per_s")
            self.bar.set_postfix({k: f"{shown[k]:.4g}" for k in keys if k in shown}, refresh=False)
        evals = {k: v for k, v in logs.items() if k.startswith("eval/")}
        if evals:
            text = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in evals.items())
            self.bar.write(f"step {logs.get('step')}: {text}")

    def on_fit_end(self, loop: Any) -> None:
        if self.bar is not None:
            self.bar.close()


class RunSummary(Callback):
    """The start banner and the end summary of `Loop.fit`, and ``{output_dir}/summary.json``.

    At fit start (after set-up and any resume, so the numbers are final) it shows what will happen: examples,
    steps, the effective batch, trainable parameters, precision, LoRA settings, learning rate and schedule,
    eval/save cadence and where outputs go. At fit end it shows what happened: steps and stop reason, wall
    time, samples and tokens seen, the best and the final evaluation and the checkpoints, and writes the same
    facts to ``summary.json`` (atomically). A resumed run's summary covers the whole run: token counts and
    time are kept in `LoopState` across the resume.

    The text goes through ``tqdm.write`` (visible in a plain script with default logging and in Jupyter,
    and above a running progress bar). Only the main process shows or writes anything.

    Args:
        show: Print the banner and summary; False writes only ``summary.json``. Pass
            ``RunSummary(show=False)`` in ``callbacks`` to silence them (it replaces the default one).

    Example:
        >>> loop = Loop(model, processor, config, callbacks=[RunSummary(show=False)])  # doctest: +SKIP
    """

    def __init__(self, show: bool = True) -> None:
        self.show = show
        self.start: dict | None = None  # facts of the banner (see `start_facts`), set at fit start
        self.end: dict | None = None  # facts of the summary (see `end_facts`), set at fit end

    def on_fit_start(self, loop: Any) -> None:
        if not loop.accelerator.is_main_process:
            return
        self.start = start_facts(loop)
        if self.show:
            _write(format_banner(self.start))

    def on_fit_end(self, loop: Any) -> None:
        if not loop.accelerator.is_main_process:
            return
        self.end = end_facts(loop, self.start or start_facts(loop))
        atomic_write_text(self.end["summary_file"], json.dumps(_plain_json(self.end), indent=1) + "\n")
        if self.show:
            _write(format_summary(self.end))


def _write(text: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(text)


def start_facts(loop: Any) -> dict:
    """What a `Loop` set up for `fit` is about to do, read from its real state (call after set-up).

    Keys: examples (``train_examples``, ``train_skipped`` at loading, ``eval_examples``), steps
    (``steps_per_epoch``, ``epochs``, ``max_steps``), batch (``batch_size`` per device,
    ``grad_accum_steps``, ``num_processes``, ``effective_batch_size``: their product), parameters
    (``trainable_params``, ``all_params``, ``trainable_percent``), ``precision`` (the mixed precision
    Accelerate applies: fp32/bf16/fp16) and ``weight_dtype``, ``finetune`` (LoRA/QLoRA/full) with
    ``lora_r``, ``lora_alpha``, ``modules_to_save``, ``learning_rates`` (base rate per optimizer group
    kind), ``lr_scheduler``, ``warmup_steps``, the eval/save settings, the output paths, and
    ``resumed_from`` / ``resumed_at_step``.
    """
    cfg, state, acc = loop.config, loop.state, loop.accelerator
    model = acc.unwrap_model(loop.model)
    trainable, total = _parameter_counts(model)
    n_eval = len(loop.eval_data) if loop.eval_data is not None else None
    if n_eval is not None and cfg.eval_max_samples:
        n_eval = min(n_eval, cfg.eval_max_samples)
    output_dir = cfg.output_dir
    return {
        "train_examples": len(loop.train_data),
        "train_skipped": len(getattr(loop.train_data, "skipped", ())),
        "eval_examples": n_eval,
        "steps_per_epoch": loop.steps_per_epoch,
        "epochs": state.max_steps / loop.steps_per_epoch,
        "max_steps": state.max_steps,
        "batch_size": loop.batch_size,
        "grad_accum_steps": loop.grad_accum_steps,
        "num_processes": acc.num_processes,
        "effective_batch_size": loop.batch_size * loop.grad_accum_steps * acc.num_processes,
        "trainable_params": trainable,
        "all_params": total,
        "trainable_percent": 100.0 * trainable / max(total, 1),
        "precision": {"no": "fp32"}.get(str(acc.mixed_precision), str(acc.mixed_precision)),
        "weight_dtype": _main_dtype(model),
        **_finetune_facts(model),
        "learning_rates": learning_rates(loop.optimizer, base=True),
        "lr_scheduler": cfg.lr_scheduler if loop.scheduler is not None else None,
        "warmup_steps": _warmup_steps(loop.scheduler),
        "eval_steps": cfg.eval_steps if loop.eval_data is not None else None,
        "eval_each_epoch": cfg.eval_each_epoch and loop.eval_data is not None,
        "eval_before_training": cfg.eval_before_training and loop.eval_data is not None,
        "metric_for_best": cfg.metric_for_best,
        "save_steps": cfg.save_steps,
        "save_total_limit": cfg.save_total_limit,
        "output_dir": output_dir,
        "metrics_file": os.path.join(output_dir, "metrics.jsonl"),
        "checkpoints_dir": str(checkpoints_dir(output_dir)),
        "summary_file": os.path.join(output_dir, "summary.json"),
        "resumed_from": loop.resumed_from,
        "resumed_at_step": state.step if loop.resumed_from is not None else None,
        "wall_seconds_before": state.wall_seconds,
    }


def end_facts(loop: Any, start: dict) -> dict:
    """What `fit` did, read from the loop's state at fit end; ``start`` are the `start_facts` of the run.

    Keys: ``step``, ``max_steps``, ``stop_reason`` ("completed" when it ran all steps), ``wall_seconds``
    (the whole run, all sessions), ``session_seconds`` (this `fit` call), ``resumed_from`` /
    ``resumed_at_step``, ``samples_seen``, ``tokens_seen``, ``label_tokens_seen``, ``skipped_samples``,
    ``truncated_samples``, ``best`` (``step, metric, value, checkpoint`` and the ``metrics`` of that
    evaluation; None without ``metric_for_best``), ``final_eval`` (the last evaluation, with its step),
    ``last_checkpoint``, the output paths, and ``setup`` (the start facts).
    """
    cfg, state = loop.config, loop.state
    stop_reason = state.stop_reason
    if stop_reason is None:
        stop_reason = "completed" if state.step >= state.max_steps else "stopped by a callback"
    best = None
    record = best_checkpoint(cfg.output_dir) if state.best_checkpoint else None
    if record is not None:
        evaluation = next((h for h in reversed(state.history) if h["step"] == record["step"]), {})
        best = {
            "step": record["step"],
            "metric": record["metric"],
            "value": record["value"],
            "checkpoint": record["path"],
            "metrics": {k: v for k, v in evaluation.items() if k != "step"},
        }
    checkpoints = list_checkpoints(cfg.output_dir)
    setup = {k: v for k, v in start.items() if k != "wall_seconds_before"}
    return {
        "step": state.step,
        "max_steps": state.max_steps,
        "stop_reason": stop_reason,
        "wall_seconds": state.wall_seconds,
        "session_seconds": state.wall_seconds - start["wall_seconds_before"],
        "resumed_from": start["resumed_from"],
        "resumed_at_step": start["resumed_at_step"],
        "samples_seen": state.samples_seen,
        "tokens_seen": state.tokens_seen,
        "label_tokens_seen": state.label_tokens_seen,
        "skipped_samples": state.skipped_samples,
        "truncated_samples": state.truncated_samples,
        "best": best,
        "final_eval": dict(state.history[-1]) if state.history else None,
        "last_checkpoint": str(checkpoints[-1]) if checkpoints else None,
        "output_dir": cfg.output_dir,
        "metrics_file": start["metrics_file"],
        "summary_file": start["summary_file"],
        "setup": setup,
    }


def format_banner(facts: dict) -> str:
    """The start banner (about ten aligned lines) for `start_facts`."""
    f = facts
    examples = f"{f['train_examples']:,} train"
    if f["train_skipped"]:
        examples += f" ({f['train_skipped']:,} bad, skipped)"
    if f["eval_examples"] is not None:
        examples += f", {f['eval_examples']:,} eval"
    if f["finetune"] == "full":
        method = "full finetune"
    else:
        method = f"{f['finetune']} r={f['lora_r']} alpha={f['lora_alpha']}"
        if f["modules_to_save"]:
            method += f" (+ {', '.join(f['modules_to_save'])} in full)"
    rates = sorted(set(f["learning_rates"].values()))
    lr = f"{rates[0]:g}" if len(rates) == 1 else ", ".join(f"{k} {v:g}" for k, v in f["learning_rates"].items())
    lr += f", {f['lr_scheduler']}" if f["lr_scheduler"] else ", no scheduler"
    if f["warmup_steps"]:
        lr += f", warmup {_steps(f['warmup_steps'])}"
    process = "process" if f["num_processes"] == 1 else "processes"
    rows = [
        ("examples", examples),
        (
            "steps",
            f"{_steps(f['max_steps'])} ({f['epochs']:.3g} epoch{'' if f['epochs'] == 1 else 's'} of "
            f"{_steps(f['steps_per_epoch'])})",
        ),
        (
            "batch",
            f"{f['batch_size']} per device x {f['grad_accum_steps']} accumulation x {f['num_processes']} "
            f"{process} = {f['effective_batch_size']:,}",
        ),
        (
            "parameters",
            f"{human_count(f['trainable_params'])} trainable of {human_count(f['all_params'])} "
            f"({f['trainable_percent']:.3g}%)",
        ),
        ("model", f"{method}; precision {f['precision']}, weights {f['weight_dtype']}"),
        ("learning rate", lr),
        ("eval / save", f"{_eval_cadence(f)}; {_save_cadence(f)}"),
        ("output", f"{f['output_dir']} (metrics.jsonl, checkpoints/, summary.json)"),
    ]
    if f["resumed_from"] is not None:
        rows.append(("resuming", f"from step {f['resumed_at_step']:,} of checkpoint {f['resumed_from']}"))
    return _block("Running training", rows)


def format_summary(facts: dict) -> str:
    """The end summary for `end_facts`."""
    f = facts
    steps = f"{f['step']:,} of {f['max_steps']:,} ({f['stop_reason']})"
    time = human_seconds(f["wall_seconds"])
    if f["resumed_from"] is not None:
        time = (
            f"{time} in all sessions; this one {human_seconds(f['session_seconds'])} "
            f"(resumed at step {f['resumed_at_step']:,})"
        )
    seen = (
        f"{human_count(f['samples_seen'])} samples, {human_count(f['tokens_seen'])} tokens "
        f"({human_count(f['label_tokens_seen'])} label tokens)"
    )
    if f["skipped_samples"] or f["truncated_samples"]:
        seen += f"; {f['skipped_samples']:,} bad samples skipped, {f['truncated_samples']:,} answers truncated"
    rows = [("steps", steps), ("wall time", time), ("seen", seen)]
    best = f["best"]
    if best is not None:
        rows.append(
            ("best", f"{best['metric']}={_number(best['value'])} at step {best['step']:,}: {best['checkpoint']}")
        )
        rows.append(("", _metrics_text(best["metrics"])))
    final = f["final_eval"]
    if final is not None:
        rows.append(
            ("last eval", f"step {final['step']:,}: {_metrics_text({k: v for k, v in final.items() if k != 'step'})}")
        )
    rows.append(("last checkpoint", f["last_checkpoint"] or "none"))
    rows.append(("written", f"{f['metrics_file']}, {f['summary_file']}"))
    return _block("Training finished", rows)


def human_count(n: float) -> str:
    """``7063427072`` -> ``"7.06B"``, ``1200000`` -> ``"1.2M"``; three significant digits, below 1000 as is."""
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale * 0.9995:  # 999,500 rounds to 1M, not 1e+03k
            return f"{n / scale:.3g}{unit}"
    return f"{n:g}" if isinstance(n, float) else str(n)


def human_seconds(seconds: float) -> str:
    """``3725`` -> ``"1h 02m 05s"``, ``65.2`` -> ``"1m 05s"``, ``4.25`` -> ``"4.2s"``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def _block(title: str, rows: list[tuple[str, str]]) -> str:
    width = max(len(label) for label, _ in rows)
    return "\n".join([f"***** {title} *****", *(f"  {label:<{width}}  {text}" for label, text in rows)])


def _steps(n: int) -> str:
    return "1 step" if n == 1 else f"{n:,} steps"


def _every(n: int) -> str:
    return "every step" if n == 1 else f"every {n:,} steps"


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _metrics_text(metrics: dict) -> str:
    return "  ".join(f"{k}={_number(v)}" for k, v in metrics.items())


def _eval_cadence(f: dict) -> str:
    if f["eval_examples"] is None:
        return "no eval"
    when = [_every(f["eval_steps"])] if f["eval_steps"] else []
    when += ["each epoch"] if f["eval_each_epoch"] else []
    when = (["before training"] if f["eval_before_training"] else []) + when + ["at the end"]
    text = "eval " + ", ".join(when)
    return text + (f", best by {f['metric_for_best']}" if f["metric_for_best"] else "")


def _save_cadence(f: dict) -> str:
    text = f"save {_every(f['save_steps'])} and at the end" if f["save_steps"] else "save at the end"
    if f["save_total_limit"]:
        text += f" (keep {f['save_total_limit']})"
    return text


def _parameter_counts(model: Any) -> tuple[int, int]:
    """(trainable, all) parameters, by peft's or transformers' own count where the model has one
    (they count 4-bit packed weights right)."""
    if hasattr(model, "get_nb_trainable_parameters"):  # peft
        trainable, total = model.get_nb_trainable_parameters()
    elif hasattr(model, "num_parameters"):  # transformers
        trainable, total = model.num_parameters(only_trainable=True), model.num_parameters()
    else:
        params = list(model.parameters())
        trainable, total = sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
    return int(trainable), int(total)


def _main_dtype(model: Any) -> str:
    """The dtype holding most of the model's weights, e.g. ``"bfloat16"``; bitsandbytes' quantized weights
    count as ``"nf4"`` (or ``"fp4"``) and ``"int8"``, not as the integer storage they are packed in."""
    counts: Counter = Counter()
    for param in model.parameters():
        kind = type(param).__name__
        if kind == "Params4bit":
            name = getattr(param, "quant_type", None) or "4-bit"
        elif kind == "Int8Params":
            name = "int8"
        else:
            name = str(param.dtype).removeprefix("torch.")
        counts[name] += _numel(param)
    return counts.most_common(1)[0][0] if counts else "unknown"


def _finetune_facts(model: Any) -> dict:
    """``finetune`` ("LoRA"; "QLoRA" on a quantized base; another peft method's name; or "full") with the
    adapter's own settings (a model passed in as a `peft.PeftModel` keeps its own r and alpha)."""
    peft_config = getattr(model, "peft_config", None)
    if not isinstance(peft_config, dict) or not peft_config:
        return {"finetune": "full", "lora_r": None, "lora_alpha": None, "modules_to_save": []}
    adapter = peft_config.get(getattr(model, "active_adapter", "default")) or next(iter(peft_config.values()))
    from .modeling import model_quantization

    quantized = model_quantization(model) is not None
    kind = getattr(getattr(adapter, "peft_type", None), "value", "LORA")
    kind = {"LORA": "LoRA"}.get(kind, kind)
    return {
        "finetune": ("Q" if quantized else "") + kind,
        "lora_r": getattr(adapter, "r", None),
        "lora_alpha": getattr(adapter, "lora_alpha", None),
        "modules_to_save": sorted(getattr(adapter, "modules_to_save", None) or []),
    }


def learning_rates(optimizer: Any, base: bool = False) -> dict[str, float]:
    """Learning rate per kind of optimizer group, now (or with ``base``, the peak rate the schedule
    started from): ``{"main": 2e-4, "projector": 1e-4}``.

    Groups named ``main_no_decay`` count as ``main``; unnamed groups as ``group0``, ``group1``, ....
    """
    rates: dict[str, float] = {}
    for i, group in enumerate(getattr(optimizer, "param_groups", [])):
        kind = str(group.get("name", f"group{i}")).removesuffix("_no_decay")
        # initial_lr: set by the scheduler
        rates.setdefault(kind, float(group.get("initial_lr", group["lr"]) if base else group["lr"]))
    return rates


def learning_rate_logs(optimizer: Any) -> dict[str, float]:
    """``train/lr``: the rate of the first kind of group (the language model's, "main"), and
    ``train/lr/<kind>`` for each other kind when the optimizer has several (e.g. ``train/lr/projector``)."""
    rates = learning_rates(optimizer)
    kinds = list(rates)
    logs = {"train/lr": rates[kinds[0]] if kinds else 0.0}
    logs.update({f"train/lr/{kind}": rates[kind] for kind in kinds[1:]})
    return logs


def _warmup_steps(scheduler: Any) -> int | None:
    """Warmup steps of a `transformers.get_scheduler` schedule (read from its lr lambda), else None."""
    for lr_lambda in getattr(scheduler, "lr_lambdas", ()):
        warmup = getattr(lr_lambda, "keywords", {}).get("num_warmup_steps")
        if warmup is not None:
            return int(warmup)
    return None


def _plain_json(value: Any) -> Any:
    """``value`` with non-finite floats as strings (JSON has no NaN) and tensors as numbers."""
    if isinstance(value, dict):
        return {str(k): _plain_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_json(v) for v in value]
    return _jsonable(value)
