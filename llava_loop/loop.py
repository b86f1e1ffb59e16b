"""The training loop: `Loop`, `LoopState` and the one-call `fit()`.

Read `Loop.fit` top to bottom: set-up, then one straight loop over optimizer steps, each made of
``grad_accum_steps`` micro-batches, with evaluation, logging and checkpoints at their cadences.
Override one public method to change one thing (see `Loop`); callbacks only observe.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from . import checkpointing
from .callbacks import EarlyStopping, dispatch
from .collators import IGNORE_INDEX, META_KEYS, EvalCollator, TrainCollator
from .config import LoopConfig
from .data import as_dataset
from .distributed import gather_in_order
from .loggers import JSONLLogger, ProgressBar, TrackerLogger
from .metrics import compute_metrics, greater_is_better, resolve_metrics
from .modeling import merged_adapters, param_groups, prepare_model

logger = logging.getLogger(__name__)


@dataclass
class LoopState:
    """Where a run is; saved in every checkpoint so that a resumed run continues exactly.

    A *step* is an optimizer step; a *micro-step* one batch.
    """

    step: int = 0
    """Optimizer steps done."""
    max_steps: int = 0
    """Optimizer steps the run will make."""
    epoch: int = 0
    """Current epoch (0-based)."""
    batches_in_epoch: int = 0
    """Micro-batches of the current epoch already consumed (the data position for resuming)."""
    samples_seen: int = 0
    tokens_seen: int = 0
    """Tokens (attention mask, image tokens included) seen, all processes."""
    skipped_samples: int = 0
    """Bad samples skipped (``on_bad_sample="skip"``)."""
    bad_steps_in_a_row: int = 0
    """Consecutive steps skipped for a non-finite loss."""
    best_metric: float | None = None
    best_checkpoint: str | None = None
    history: list[dict] = field(default_factory=list)
    """Every evaluation's summary metrics, with its step."""
    should_stop: bool = False
    """Set by callbacks (e.g. early stopping) or signals; the loop stops after the current step."""
    stop_reason: str | None = None

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class EpochSampler(Sampler[int]):
    """Deterministic order per (seed, epoch); can start mid-epoch for exact resume."""

    def __init__(self, n: int, seed: int, shuffle: bool):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        return iter(order[self.start :])

    def __len__(self) -> int:
        return self.n - self.start


class _Indexed(Dataset):
    """Wraps a dataset so each item carries its index (to restore dataset order after sharding)."""

    def __init__(self, dataset: Dataset, indices: list[int]):
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[int, Any]:
        return self.indices[i], self.dataset[self.indices[i]]


class _EvalBatches:
    """Collate function for eval: a generation batch and a teacher-forced loss batch of the same records."""

    def __init__(self, eval_collator: EvalCollator, train_collator: TrainCollator):
        self.eval_collator, self.train_collator = eval_collator, train_collator

    def __call__(self, items: list[tuple[int, Any]]) -> dict:
        indices = [i for i, _ in items]
        records = [r for _, r in items]
        gen = self.eval_collator(records)
        kept = [i for i, r in zip(indices, records) if not hasattr(r, "reason")]
        return {"gen": gen, "loss": self.train_collator(records), "indices": kept,
                "images": [r.get("image") for r in records if not hasattr(r, "reason")]}


class Loop:
    """Finetunes a Hugging Face vision-language model; every step readable in `fit`.

    Features: LoRA/QLoRA via peft (or full finetuning), separate projector learning rate,
    token-weighted gradient accumulation (same update for 4x1 and 1x4), bf16/fp16 mixed
    precision, gradient clipping and checkpointing, DDP through Accelerate, generation-based
    evaluation with pluggable metrics and eval loss, best-model tracking, atomic checkpoints with
    exact resume, clean stop on SIGTERM/SIGINT, JSONL/tqdm/tracker logging.

    Override points (each does one thing): `configure_optimizers`, `training_step`,
    `compute_loss`, `generate`, `evaluation_step`, `compute_metrics`, `evaluate`.

    Args:
        model: A ``transformers`` image-text-to-text model (or a `peft.PeftModel`).
        processor: Its processor, with a chat template.
        config: A `LoopConfig`.
        metrics: Metric names, callables, ``evaluate`` modules, or a list/dict of them
            (default ``"exact_match"``).
        callbacks: Observers (see `llava_loop.callbacks.EVENTS`).

    Example:
        >>> from llava_loop.testing import tiny_llava, synthetic_vqa
        >>> model, processor = tiny_llava()
        >>> loop = Loop(model, processor, LoopConfig(output_dir="out", max_steps=2))  # doctest: +SKIP
        >>> loop.fit(synthetic_vqa(16), eval_data=synthetic_vqa(4, seed=1))  # doctest: +SKIP
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        config: LoopConfig | None = None,
        metrics: Any = None,
        callbacks: list | None = None,
    ):
        self.model = model
        self.processor = processor
        self.config = config or LoopConfig()
        self.metrics = resolve_metrics(metrics)
        self.callbacks = list(callbacks or [])
        self.state = LoopState()
        self.accelerator = None
        self.optimizer = None
        self.scheduler = None
        self.train_collator = TrainCollator(
            processor, self.config.max_length, on_bad_sample=self.config.on_bad_sample
        )
        self.eval_collator = EvalCollator(processor, on_bad_sample=self.config.on_bad_sample)
        if self.config.early_stopping_patience:
            self.callbacks.append(EarlyStopping(self.config.early_stopping_patience))

    # ------------------------------------------------------------------ entry point
    def fit(self, train_data: Any, eval_data: Any = None) -> LoopState:
        """Train on ``train_data``; evaluate on ``eval_data`` at the cadences and once at the end.

        Args:
            train_data: Records, a LLaVA JSON/JSONL path, or a torch Dataset of records.
            eval_data: Same kinds, or None.

        Returns:
            The final `LoopState` (``history`` holds every evaluation).
        """
        self._setup(train_data, eval_data)
        dispatch(self.callbacks, "on_fit_start", self)
        if self.config.eval_before_training and self.eval_data is not None and self.state.step == 0:
            self.evaluate()
        with self._signals_handled():
            self._train()
        if self.eval_data is not None and not self._evaluated_at(self.state.step):
            self.evaluate()
        self._save()
        dispatch(self.callbacks, "on_fit_end", self)
        if self.state.stop_reason and self.state.stop_reason.startswith("signal"):
            logger.warning(
                "stopped by %s at step %d; checkpoint saved. Resume with resume_from='latest' "
                "(CLI: --resume-from latest) and the same output_dir.",
                self.state.stop_reason, self.state.step,
            )
        return self.state

    def _train(self) -> None:
        cfg, acc, state = self.config, self.accelerator, self.state
        while state.step < state.max_steps and not state.should_stop:
            self.sampler.set_epoch(state.epoch, start=state.batches_in_epoch * cfg.batch_size * acc.num_processes)
            batches = iter(self.train_loader)
            if self._pending_rng is not None:
                # Creating the iterator draws from the RNG; restore afterwards so a resumed run
                # continues from exactly the state the interrupted one had.
                checkpointing.set_rng_state(self._pending_rng)
                self._pending_rng = None
            dispatch(self.callbacks, "on_epoch_start", self)
            epoch_done = False
            while state.step < state.max_steps and not state.should_stop:
                micro_batches = []
                for _ in range(cfg.grad_accum_steps):
                    batch = next(batches, None)
                    if batch is None:
                        epoch_done = True
                        break
                    micro_batches.append(batch)
                if not micro_batches:
                    break
                state.batches_in_epoch += len(micro_batches)
                self._optimizer_step(micro_batches)
                if epoch_done:
                    break
            else:
                continue
            if epoch_done or state.batches_in_epoch >= len(self.train_loader):
                dispatch(self.callbacks, "on_epoch_end", self)
                state.epoch += 1
                state.batches_in_epoch = 0
                if cfg.eval_each_epoch and self.eval_data is not None and not self._evaluated_at(state.step):
                    self.evaluate()

    def _optimizer_step(self, micro_batches: list[dict]) -> None:
        """One optimizer step over ``micro_batches``; the loss is normalised by the label tokens of
        all micro-batches on all processes, so accumulation and batch size give the same update."""
        cfg, acc, state = self.config, self.accelerator, self.state
        t0 = time.perf_counter()
        self.model.train()
        for batch in micro_batches:
            self._note_skipped(batch)
        counts = torch.tensor(
            [sum(self.count_loss_tokens(b) for b in micro_batches),
             sum(int(b["attention_mask"].sum()) if "attention_mask" in b else 0 for b in micro_batches),
             sum(len(b["ids"]) for b in micro_batches)],
            device=acc.device, dtype=torch.float64,
        )
        total_loss_tokens, total_tokens, total_samples = acc.reduce(counts, reduction="sum").tolist()
        loss_sum = torch.zeros((), device=acc.device)
        for k, batch in enumerate(micro_batches):
            if not batch["ids"]:
                continue  # every sample of this micro-batch was skipped (and reported)
            last = k == len(micro_batches) - 1
            # Skip DDP's gradient all-reduce on all but the last micro-batch of the step.
            context = acc.no_sync(self.model) if not last and acc.num_processes > 1 else _nullcontext()
            with context, acc.autocast():
                loss = self.training_step(batch)
                # DDP averages gradients over processes; undo that so the result is the global sum
                # divided by the global token count.
                acc.backward(loss * acc.num_processes / max(total_loss_tokens, 1.0))
            loss_sum += loss.detach().float()
        loss_sum = acc.reduce(loss_sum, reduction="sum")
        mean_loss = (loss_sum / max(total_loss_tokens, 1.0)).item()
        if not math.isfinite(mean_loss):
            self.optimizer.zero_grad(set_to_none=True)
            state.bad_steps_in_a_row += 1
            logger.warning("non-finite loss (%s) at step %d: step skipped (%d in a row)",
                           mean_loss, state.step + 1, state.bad_steps_in_a_row)
            if state.bad_steps_in_a_row >= cfg.max_bad_steps:
                raise FloatingPointError(
                    f"{state.bad_steps_in_a_row} consecutive steps with a non-finite loss; lower the "
                    "learning rate, check the data, or use bf16 instead of fp16"
                )
            return
        state.bad_steps_in_a_row = 0
        grad_norm = None
        if cfg.max_grad_norm > 0:
            grad_norm = acc.clip_grad_norm_(self._trainable, cfg.max_grad_norm)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.samples_seen += int(total_samples)
        state.tokens_seen += int(total_tokens)
        elapsed = time.perf_counter() - t0
        self._window["time"] += elapsed
        self._window["tokens"] += total_tokens
        self._window["samples"] += total_samples
        logs = {"train/loss": mean_loss, "train/lr": self.optimizer.param_groups[0]["lr"]}
        if grad_norm is not None:
            logs["train/grad_norm"] = float(grad_norm)
        dispatch(self.callbacks, "on_step_end", self, logs=logs)
        self._window["loss"].append(mean_loss)
        if cfg.log_steps and state.step % cfg.log_steps == 0:
            self._log_train(logs)
        if cfg.eval_steps and self.eval_data is not None and state.step % cfg.eval_steps == 0:
            self.evaluate()
        if cfg.save_steps and state.step % cfg.save_steps == 0:
            self._save()
        if self._signal_received is not None and not state.should_stop:
            state.should_stop, state.stop_reason = True, f"signal {self._signal_received}"

    # ------------------------------------------------------------------ override points
    def configure_optimizers(self) -> Any:
        """Return an optimizer, or ``(optimizer, scheduler)``.

        Default: AdamW with the projector at ``projector_lr`` and no weight decay on biases and
        norms, and ``transformers.get_scheduler(lr_scheduler)`` with warmup.
        """
        from transformers import get_scheduler

        cfg = self.config
        groups = param_groups(self.model, cfg.learning_rate, cfg.projector_lr, cfg.weight_decay)
        optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, fused=False)
        warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * self.state.max_steps)
        scheduler = get_scheduler(
            cfg.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=self.state.max_steps
        )
        return optimizer, scheduler

    def training_step(self, batch: dict) -> torch.Tensor:
        """Forward one micro-batch and return its loss **summed** over label tokens (no backward).

        The loop divides by the number of label tokens of the whole optimizer step (all
        micro-batches, all processes), see `count_loss_tokens`.
        """
        if "labels" not in batch:
            raise TypeError(
                "training batch has no 'labels': batches from EvalCollator (prompt only, left "
                "padded) cannot be used for training; use TrainCollator"
            )
        outputs = self.model(**self._model_inputs(batch, drop=("labels",)), use_cache=False)
        return self.compute_loss(outputs, batch)

    def compute_loss(self, outputs: Any, batch: dict) -> torch.Tensor:
        """Next-token cross-entropy summed over label tokens (``labels != -100``), in fp32."""
        logits = outputs.logits[:, :-1].float()
        labels = batch["labels"][:, 1:].to(logits.device)
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )

    def count_loss_tokens(self, batch: dict) -> int:
        """How many tokens `compute_loss` sums over in ``batch`` (the normaliser)."""
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) if "labels" in batch else 0

    @torch.no_grad()
    def generate(self, batch: dict) -> list[str]:
        """Generate answers for a left-padded `EvalCollator` batch; returns decoded new text only."""
        cfg = self.config
        model = self.accelerator.unwrap_model(self.model)
        inputs = self._model_inputs(batch)
        kwargs: dict[str, Any] = {"max_new_tokens": cfg.max_new_tokens, "num_beams": cfg.num_beams,
                                  "do_sample": cfg.do_sample}
        if cfg.do_sample:
            kwargs.update(temperature=cfg.temperature, top_p=cfg.top_p)
        tok = self.train_collator.tokenizer
        out = model.generate(**inputs, **kwargs, pad_token_id=tok.pad_token_id)
        new_tokens = out[:, inputs["input_ids"].shape[1] :]
        return [t.strip() for t in tok.batch_decode(new_tokens, skip_special_tokens=True)]

    @torch.no_grad()
    def evaluation_step(self, batch: dict) -> dict:
        """Predictions and teacher-forced loss (summed, with its token count) for one eval batch."""
        predictions = self.generate(batch["gen"]) if batch["gen"]["ids"] else []
        loss_batch = batch["loss"]
        loss, tokens = torch.zeros((), device=self.accelerator.device), 0
        if loss_batch["ids"]:
            outputs = self.model(**self._model_inputs(loss_batch, drop=("labels",)), use_cache=False)
            loss, tokens = self.compute_loss(outputs, loss_batch), self.count_loss_tokens(loss_batch)
        return {"predictions": predictions, "loss_sum": loss.float(), "loss_tokens": tokens}

    def compute_metrics(self, predictions: list[str], references: list[list[str]]) -> tuple[dict, list[dict]]:
        """Summary metrics and per-sample scores for the gathered predictions."""
        return compute_metrics(self.metrics, predictions, references)

    @torch.no_grad()
    def evaluate(self, eval_data: Any = None) -> dict[str, float]:
        """Generate on the eval set, compute metrics and eval loss, write predictions, track the best.

        Every process generates its shard; predictions are gathered in dataset order without the
        duplicates that uneven shards add, and metrics are computed once, on the main process, then
        shared.
        """
        if eval_data is not None:
            self.eval_data = as_dataset(eval_data, on_bad_sample=self.config.on_bad_sample)
        if self.accelerator is None:
            self._setup_accelerator()
        acc, cfg = self.accelerator, self.config
        loader = self._eval_loader()
        was_training = self.model.training
        self.model.eval()
        t0 = time.perf_counter()
        rows, loss_sum, loss_tokens, gen_tokens = [], 0.0, 0, 0
        with merged_adapters(acc.unwrap_model(self.model), enabled=cfg.merge_lora_for_eval):
            for batch in loader:
                with acc.autocast():
                    out = self.evaluation_step(batch)
                loss_sum += float(out["loss_sum"])
                loss_tokens += out["loss_tokens"]
                tok = self.train_collator.tokenizer
                gen = batch["gen"]
                for idx, sample_id, prompt, refs, pred, image in zip(
                    batch["indices"], gen["ids"], gen["prompts"], gen["references"], out["predictions"],
                    batch["images"],
                ):
                    gen_tokens += len(tok(pred, add_special_tokens=False)["input_ids"])
                    rows.append({"index": idx, "id": sample_id, "prompt": prompt, "prediction": pred,
                                 "references": refs, "_image": image})
        if was_training:
            self.model.train()
        elapsed = time.perf_counter() - t0
        totals = acc.reduce(torch.tensor([loss_sum, loss_tokens, gen_tokens], device=acc.device,
                                         dtype=torch.float64), reduction="sum").tolist()
        # Images stay on their process; only text crosses processes.
        local_samples = [dict(r) for r in sorted(rows, key=lambda r: r["index"])[:4]]
        for row in rows:
            row.pop("_image")
        rows = gather_in_order(acc, rows)
        predictions = [r["prediction"] for r in rows]
        references = [r["references"] for r in rows]
        summary: dict[str, float] = {}
        per_sample: list[dict] = [{} for _ in rows]
        if acc.is_main_process and rows:
            scores, per_sample = self.compute_metrics(predictions, references)
            summary = {f"eval/{k}": float(v) for k, v in scores.items()}
        summary = _broadcast(acc, summary)
        if totals[1] > 0:
            summary["eval/loss"] = totals[0] / totals[1]
        summary["eval/samples"] = float(len(rows))
        summary["eval/samples_per_s"] = len(rows) / max(elapsed, 1e-9)
        summary["eval/gen_tokens_per_s"] = totals[2] / max(elapsed, 1e-9)
        for metric in self.metrics.values():
            offload = getattr(metric, "offload", None)
            if offload is not None:
                offload()
        samples = [{k: r[k] for k in ("id", "prompt", "prediction", "references", "_image")} for r in local_samples]
        for sample in samples:
            sample["image"] = sample.pop("_image")
        if acc.is_main_process:
            checkpointing.write_predictions(
                os.path.join(cfg.output_dir, "predictions", f"step_{self.state.step:06d}.jsonl"),
                [{k: v for k, v in r.items() if k != "index"} | {"scores": s}
                 for r, s in zip(rows, per_sample)],
            )
        self.state.history.append({"step": self.state.step, **summary})
        self._update_best(summary)
        dispatch(self.callbacks, "on_evaluate", self, metrics=summary, samples=samples)
        self._log({"step": self.state.step, **summary})
        return summary

    # ------------------------------------------------------------------ set-up
    def _setup(self, train_data: Any, eval_data: Any) -> None:
        cfg = self.config
        self._setup_accelerator()
        acc = self.accelerator
        self.train_data = as_dataset(train_data, on_bad_sample=cfg.on_bad_sample)
        self.eval_data = as_dataset(eval_data, on_bad_sample=cfg.on_bad_sample) if eval_data is not None else None
        if (cfg.eval_steps or cfg.eval_each_epoch or cfg.eval_before_training) and self.eval_data is None:
            raise ValueError(
                "eval_steps/eval_each_epoch/eval_before_training are set but no eval_data was given to fit()"
            )
        checkpointing.check_output_dir(cfg.output_dir)
        self.model = prepare_model(self.model, cfg)
        self.sampler = EpochSampler(len(self.train_data), cfg.seed, cfg.shuffle)
        loader = DataLoader(self.train_data, batch_size=cfg.batch_size, sampler=self.sampler,
                            collate_fn=self.train_collator, num_workers=cfg.num_workers)
        steps_per_epoch = math.ceil(math.ceil(len(self.train_data) / (cfg.batch_size * acc.num_processes))
                                    / cfg.grad_accum_steps)
        self.state.max_steps = cfg.max_steps or max(1, math.ceil(cfg.num_epochs * steps_per_epoch))
        self._trainable = [p for p in self.model.parameters() if p.requires_grad]
        result = self.configure_optimizers()
        self.optimizer, self.scheduler = result if isinstance(result, tuple) else (result, None)
        self.model, self.optimizer, self.train_loader = acc.prepare(self.model, self.optimizer, loader)
        # The scheduler stays outside accelerate.prepare: the loop steps it once per optimizer step
        # (a prepared scheduler steps num_processes times per step).
        self._check_metric_for_best()
        self._pending_rng = None
        self._signal_received = None
        self._window = {"time": 0.0, "tokens": 0.0, "samples": 0.0, "loss": []}
        if acc.is_main_process:
            self.callbacks = [JSONLLogger(os.path.join(cfg.output_dir, "metrics.jsonl")), ProgressBar(),
                              *self.callbacks]
        if cfg.report_to:
            self.callbacks.append(TrackerLogger())
        if cfg.resume_from:
            path = checkpointing.resolve_checkpoint(cfg.output_dir, cfg.resume_from)
            self._pending_rng = checkpointing.load_checkpoint(self, path)
            logger.info("resumed from %s at step %d", path, self.state.step)
        if acc.is_main_process:
            os.makedirs(cfg.output_dir, exist_ok=True)
            cfg.save(os.path.join(cfg.output_dir, "config.yaml"))

    def _setup_accelerator(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        if self.accelerator is not None:
            return
        cfg = self.config
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        precision = cfg.resolved_precision(device)
        self.accelerator = Accelerator(
            mixed_precision={"fp32": "no"}.get(precision, precision),
            log_with=cfg.report_to or None,
            project_dir=cfg.output_dir,
        )
        set_seed(cfg.seed)

    def _eval_loader(self) -> DataLoader:
        """Eval batches sorted by prompt length (less padding); results are restored to dataset order."""
        cfg = self.config
        n = len(self.eval_data)
        if cfg.eval_max_samples:
            n = min(n, cfg.eval_max_samples)
        if getattr(self, "_eval_n", None) != n:
            lengths = [(_prompt_length(self.eval_data, i), i) for i in range(n)]
            self._eval_order = [i for _, i in sorted(lengths, reverse=True)]
            self._eval_n = n
        loader = DataLoader(_Indexed(self.eval_data, self._eval_order), batch_size=cfg.eval_batch_size,
                            collate_fn=_EvalBatches(self.eval_collator, self.train_collator),
                            num_workers=cfg.num_workers)
        return self.accelerator.prepare_data_loader(loader, device_placement=False)

    # ------------------------------------------------------------------ helpers
    def _model_inputs(self, batch: dict, drop: tuple = ()) -> dict:
        device = self.accelerator.device if self.accelerator else None
        out = {}
        for key, value in batch.items():
            if key in META_KEYS or key in drop:
                continue
            if isinstance(value, torch.Tensor) and device is not None:
                value = value.to(device, non_blocking=True)
            out[key] = value
        return out

    def _note_skipped(self, batch: dict) -> None:
        skipped = batch.get("skipped") or []
        if skipped:
            self.state.skipped_samples += len(skipped)

    def _evaluated_at(self, step: int) -> bool:
        return bool(self.state.history) and self.state.history[-1]["step"] == step

    def _check_metric_for_best(self) -> None:
        key = self.config.metric_for_best
        if key is None or key in ("eval/loss",):
            return
        if self.eval_data is None:
            raise ValueError(f"metric_for_best={key!r} but no eval_data was given to fit()")

    def _update_best(self, summary: dict) -> None:
        key = self.config.metric_for_best
        if key is None or self.optimizer is None:  # standalone evaluate(): nothing to checkpoint
            return
        if key not in summary:
            raise KeyError(f"metric_for_best={key!r} is not among the reported metrics {sorted(summary)}")
        value = summary[key]
        higher = self.config.greater_is_better
        higher = greater_is_better(key) if higher is None else higher
        best = self.state.best_metric
        if math.isfinite(value) and (best is None or (value > best if higher else value < best)):
            self.state.best_metric = value
            self._save(best=True)

    def _log_train(self, logs: dict) -> None:
        w, state = self._window, self.state
        record = {"step": state.step, "epoch": state.epoch + state.batches_in_epoch / max(len(self.train_loader), 1),
                  **logs}
        record["train/loss"] = sum(w["loss"]) / max(len(w["loss"]), 1)  # mean over the logging window
        record["train/tokens_per_s"] = w["tokens"] / max(w["time"], 1e-9)
        record["train/samples_per_s"] = w["samples"] / max(w["time"], 1e-9)
        record["train/eta_s"] = (state.max_steps - state.step) * w["time"] / max(len(w["loss"]), 1)
        if torch.cuda.is_available():
            record["train/peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if state.skipped_samples:
            record["train/skipped_samples"] = state.skipped_samples
        self._window = {"time": 0.0, "tokens": 0.0, "samples": 0.0, "loss": []}
        self._log(record)

    def _log(self, record: dict) -> None:
        dispatch(self.callbacks, "on_log", self, logs=record)

    def _save(self, best: bool = False) -> None:
        path = checkpointing.save_checkpoint(self, best=best)
        if self.accelerator.is_main_process:
            dispatch(self.callbacks, "on_save", self, path=path)

    # ------------------------------------------------------------------ signals
    def _signals_handled(self):
        loop = self

        class _Handler:
            def __enter__(self):
                self.previous = {}
                if not loop.config.handle_signals or threading.current_thread() is not threading.main_thread():
                    return self
                for sig in (signal.SIGTERM, signal.SIGINT):
                    self.previous[sig] = signal.getsignal(sig)
                    signal.signal(sig, self._handle)
                return self

            def _handle(self, signum, frame):
                if loop._signal_received is not None:  # second Ctrl-C: stop now
                    signal.signal(signum, self.previous.get(signum, signal.SIG_DFL))
                    raise KeyboardInterrupt
                loop._signal_received = signal.Signals(signum).name
                logger.warning("%s received: finishing the current step, then saving a checkpoint",
                               loop._signal_received)

            def __exit__(self, *exc):
                for sig, handler in self.previous.items():
                    signal.signal(sig, handler)
                return False

        return _Handler()


def fit(
    model: Any,
    processor: Any,
    train_data: Any,
    eval_data: Any = None,
    *,
    config: LoopConfig | None = None,
    metrics: Any = None,
    callbacks: list | None = None,
) -> Loop:
    """One-call form of ``Loop(model, processor, config, metrics, callbacks).fit(train_data, eval_data)``.

    Returns:
        The `Loop` (its ``model`` is the trained, possibly peft-wrapped model; ``state`` the history).

    Example:
        >>> from llava_loop import fit, LoopConfig
        >>> from llava_loop.testing import tiny_llava, synthetic_vqa
        >>> model, processor = tiny_llava()
        >>> loop = fit(model, processor, synthetic_vqa(8), config=LoopConfig(max_steps=1, output_dir="o"))  # doctest: +SKIP
    """
    loop = Loop(model, processor, config, metrics=metrics, callbacks=callbacks)
    loop.fit(train_data, eval_data)
    return loop


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _prompt_length(dataset: Dataset, i: int) -> int:
    """Cheap proxy for prompt length without decoding images: characters before the final answer."""
    raw = getattr(dataset, "_records", None)
    record = raw[i] if raw is not None else dataset[i]
    turns = record.get("conversations", [])
    last = max((k for k, t in enumerate(turns) if t.get("from") == "gpt"), default=len(turns))
    return sum(len(t.get("value", "")) for t in turns[:last])


def _broadcast(acc: Any, obj: dict) -> dict:
    if acc.num_processes == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    box = [obj]
    broadcast_object_list(box, from_process=0)
    return box[0]
