"""The training loop: `Loop`, `LoopState` and the one-call `fit()`.

Read `Loop.fit` top to bottom: set-up, then one straight loop over optimizer steps, each made of
``grad_accum_steps`` micro-batches, with evaluation, logging and checkpoints at their cadences.
Override one public method to change one thing (see `Loop`); callbacks only observe.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from copy import deepcopy
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from . import checkpointing, rundir
from .callbacks import EarlyStopping, dispatch
from .collators import IGNORE_INDEX, META_KEYS, EvalCollator, TrainCollator
from .config import LoopConfig
from .data import SkippedSample, as_dataset
from .distributed import gather_in_order, run_on_main, shard_batches
from .loggers import JSONLLogger, ProgressBar, RunSummary, TrackerLogger
from .metrics import check_metrics, compute_metrics, resolve_metrics
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
    samples_in_epoch: int = 0
    """Samples of the current epoch's order already consumed, all processes (the data position for
    resuming: kept in samples, so a resumed run may change batch size, accumulation or processes)."""
    sampler_seed: int | None = None
    """Seed of the training order (``seed + epoch`` per epoch); kept on resume, so a changed
    ``seed`` setting cannot reshuffle the rest of an interrupted epoch."""
    data_fingerprint: dict | None = None
    """Size and hash of the training set's ids and image names; a resume with other data is refused."""
    num_processes: int = 1
    """Processes that trained (informational: a resume may use another number)."""
    samples_seen: int = 0
    """Training samples of the optimizer steps done, all processes."""
    tokens_seen: int = 0
    """Tokens (attention mask, image tokens included) seen, all processes."""
    label_tokens_seen: int = 0
    """Label tokens (the tokens the loss is summed over, `Loop.count_loss_tokens`) seen, all processes."""
    wall_seconds: float = 0.0
    """Wall-clock seconds of `Loop.fit` (set-up, training, evaluation, saving) up to this state, summed over
    the sessions of a resumed run; the time a session spent after the checkpoint that the next one resumed
    from is not counted (those steps were redone)."""
    skipped_samples: int = 0
    """Bad samples skipped (``on_bad_sample="skip"``), all processes; a sample skipped in several
    epochs counts each time."""
    truncated_samples: int = 0
    """Training samples whose answer was partly cut by ``max_length``, all processes."""
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
    """Deterministic order per (seed, epoch); can start mid-epoch for exact resume.

    The method is `set_position`, deliberately not ``set_epoch``: accelerate's prepared loader
    calls ``sampler.set_epoch(n)`` with the number of passes *it* has made over the loader, which
    would reset the epoch and the mid-epoch start of a resumed run.
    """

    def __init__(self, n: int, seed: int, shuffle: bool):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch = 0
        self.start = 0

    def set_position(self, epoch: int, start: int = 0) -> None:
        """Yield the order of ``epoch`` from its ``start``-th sample on."""
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


class _WithSource(Dataset):
    """Records of ``dataset`` with its ``source`` file added, so that a bad sample found while
    collating (e.g. an answer cut away by max_length) is reported with its file."""

    def __init__(self, dataset: Dataset):
        self.dataset, self.source = dataset, getattr(dataset, "source", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        record = self.dataset[i]
        if self.source is not None and isinstance(record, dict) and "source" not in record:
            record = {**record, "source": self.source}
        return record


class _Indexed(Dataset):
    """``dataset`` in the order ``indices``; each item carries its dataset index (to restore order)."""

    def __init__(self, dataset: Dataset, indices: list[int]):
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[int, Any]:
        return self.indices[i], self.dataset[self.indices[i]]


class _EvalInterrupted(Exception):
    """A signal arrived during a single-process evaluation: stop it and save."""


class _EvalBatches:
    """Eval collate function: the generation batch (prompts, left padded) and the teacher-forced
    loss batch (whole conversations, right padded) of the same records, and their dataset indices."""

    def __init__(self, eval_collator: EvalCollator, train_collator: TrainCollator | None):
        self.eval_collator, self.train_collator = eval_collator, train_collator

    def __call__(self, items: list[tuple[int, Any]]) -> dict:
        records = [r for _, r in items]
        kept = [i for i, r in items if not isinstance(r, SkippedSample)]  # the generation batch's rows
        loss = self.train_collator(records) if self.train_collator is not None else {"ids": []}
        return {"gen": self.eval_collator(records), "loss": loss, "indices": kept}


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
        self.resumed_from: str | None = None  # the checkpoint this run resumed from, if any
        self._lock: rundir.RunLock | None = None  # the main process's hold on output_dir during fit
        self._signal_received: str | None = None  # name of a SIGTERM/SIGINT received during fit
        self._clock: float | None = None  # perf_counter() when state.wall_seconds was last advanced
        self.accelerator = None
        self.optimizer = None
        self.scheduler = None
        self.train_collator = TrainCollator(processor, self.config.max_length, on_bad_sample=self.config.on_bad_sample)
        self.eval_collator = EvalCollator(processor, on_bad_sample=self.config.on_bad_sample)
        # Contradictions found now rather than after set-up (or hours in): fp16 on a CPU, and a
        # metric_for_best that none of the metrics reports.
        self.config.resolved_precision("cuda" if torch.cuda.is_available() else "cpu")
        check_metrics(self.metrics, self.config.metric_for_best, self.config.eval_loss)
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
        self._clock = time.perf_counter()  # wall_seconds counts set-up too
        try:
            self._setup(train_data, eval_data)
            # Signals are handled until the last save: SIGTERM during the final evaluation must not
            # lose the steps since the last checkpoint.
            with self._signals_handled():
                dispatch(self.callbacks, "on_fit_start", self)
                if self.config.eval_before_training and self.eval_data is not None and self.state.step == 0:
                    self.evaluate()
                self._train()
                # After a signal the final evaluation is skipped (a preemption grace period is short);
                # the resumed run does it.
                if not self._preempted() and self.eval_data is not None and not self._evaluated_at(self.state.step):
                    self.evaluate()
                self._save()
                self._stop_on_signal()  # a signal during the final evaluation or save
            self._advance_clock()
            dispatch(self.callbacks, "on_fit_end", self)
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None
        if self.state.skipped_samples:
            logger.warning(
                "%d bad samples were skipped (on_bad_sample='skip'); see the warnings above", self.state.skipped_samples
            )
        if self._preempted():
            logger.warning(
                "stopped by %s at step %d; checkpoint saved in %s. Resume with resume_from='latest' "
                "(CLI: --resume_from latest) and the same output_dir.",
                self.state.stop_reason,
                self.state.step,
                checkpointing.checkpoints_dir(self.config.output_dir),
            )
        return self.state

    def _preempted(self) -> bool:
        return (self.state.stop_reason or "").startswith("signal")

    def _advance_clock(self) -> None:
        """Add the time since the last call (or since fit started) to ``state.wall_seconds``."""
        now = time.perf_counter()
        self.state.wall_seconds += now - self._clock
        self._clock = now

    def _train(self) -> None:
        cfg, acc, state = self.config, self.accelerator, self.state
        n = len(self.train_data)
        # Samples all processes consume per micro-step (the last one of an epoch may get fewer).
        per_micro_step = cfg.batch_size * acc.num_processes
        while state.step < state.max_steps and not state.should_stop:
            if state.samples_in_epoch >= n:
                # Resumed from the checkpoint of an epoch's last step (written before on_epoch_end).
                state.epoch, state.samples_in_epoch = state.epoch + 1, 0
            self.sampler.set_position(state.epoch, start=state.samples_in_epoch)
            batches = iter(self.train_loader)
            if self._pending_rng is not None:
                # The RNG state right after the checkpointed step (LoRA dropout draws from it);
                # iterating the loader draws nothing from it (see the loader's generator).
                checkpointing.set_rng_state(self._pending_rng)
                self._pending_rng = None
            dispatch(self.callbacks, "on_epoch_start", self)
            self._step_clock = time.perf_counter()  # step time includes loading and collating its data
            exhausted = False
            while state.step < state.max_steps and not state.should_stop and not exhausted:
                # The last step of an epoch may get fewer micro-batches; the loss is normalised by
                # its own label tokens, so that is still a correct step.
                micro_batches = list(itertools.islice(batches, cfg.grad_accum_steps))
                state.samples_in_epoch = min(n, state.samples_in_epoch + len(micro_batches) * per_micro_step)
                exhausted = not micro_batches or state.samples_in_epoch >= n
                if micro_batches:
                    self._optimizer_step(micro_batches)
                self._stop_on_signal()
            if not exhausted:
                break  # stopped mid-epoch: max_steps reached or should_stop
            dispatch(self.callbacks, "on_epoch_end", self)
            state.epoch += 1
            state.samples_in_epoch = 0

    def _optimizer_step(self, micro_batches: list[dict]) -> None:
        """One optimizer step over ``micro_batches``; the loss is normalised by the label tokens of
        all micro-batches on all processes, so accumulation and batch size give the same update."""
        cfg, acc, state = self.config, self.accelerator, self.state
        self.model.train()
        counts = torch.tensor(
            [
                sum(self.count_loss_tokens(b) for b in micro_batches),
                sum(int(b["attention_mask"].sum()) if "attention_mask" in b else 0 for b in micro_batches),
                sum(len(b["ids"]) for b in micro_batches),
                sum(len(b.get("skipped") or ()) for b in micro_batches),
                sum(b.get("num_truncated", 0) for b in micro_batches),
            ],
            device=acc.device,
            dtype=torch.float64,
        )
        total_loss_tokens, total_tokens, total_samples, skipped, truncated = acc.reduce(
            counts, reduction="sum"
        ).tolist()
        state.skipped_samples += int(skipped)  # all processes; the collator/dataset warned per sample
        state.truncated_samples += int(truncated)  # the collator warned about the first one
        if total_loss_tokens == 0:
            self._skip_empty_step(int(skipped))
            return
        self._empty_steps = 0
        loss_sum = torch.zeros((), device=acc.device)
        for k, batch in enumerate(micro_batches):
            if not batch["ids"]:
                continue  # every sample of this micro-batch was skipped (and reported)
            last = k == len(micro_batches) - 1
            # Skip DDP's gradient all-reduce on all but the last micro-batch of the step.
            context = acc.no_sync(self.model) if not last and acc.num_processes > 1 else contextlib.nullcontext()
            with context:
                with acc.autocast():  # forward only: backward runs outside autocast
                    loss = self.training_step(batch)
                # DDP averages gradients over processes; undo that so the result is the global sum
                # divided by the global token count.
                acc.backward(loss * acc.num_processes / max(total_loss_tokens, 1.0))
            loss_sum += loss.detach().float()
        loss_sum = acc.reduce(loss_sum, reduction="sum")
        mean_loss = (loss_sum / max(total_loss_tokens, 1.0)).item()
        if not math.isfinite(mean_loss):
            self._skip_bad_step(f"non-finite loss ({mean_loss})", micro_batches)
            return
        self._check_uniform_loss(mean_loss)
        # max_grad_norm=0: no clipping, but the norm is still measured (logged, checked).
        grad_norm = acc.clip_grad_norm_(self._trainable, cfg.max_grad_norm or math.inf)
        # With fp16 the grad scaler skips inf/nan steps itself (and lowers its scale).
        if acc.scaler is None and not math.isfinite(float(grad_norm)):
            self._skip_bad_step(f"non-finite gradient norm ({float(grad_norm)})", micro_batches)
            return
        state.bad_steps_in_a_row = 0
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses (the scheduler moves it next)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.samples_seen += int(total_samples)
        state.tokens_seen += int(total_tokens)
        state.label_tokens_seen += int(total_loss_tokens)
        self._window["time"] += time.perf_counter() - self._step_clock
        self._window["tokens"] += total_tokens
        self._window["samples"] += total_samples
        logs = {"train/loss": mean_loss, "train/lr": lr, "train/grad_norm": float(grad_norm)}
        dispatch(self.callbacks, "on_step_end", self, logs=logs)
        self._window["loss"].append(mean_loss)
        if cfg.log_steps and state.step % cfg.log_steps == 0:
            self._log_train(logs)
        epoch_end = state.samples_in_epoch >= len(self.train_data)
        if self.eval_data is not None and (
            (cfg.eval_steps and state.step % cfg.eval_steps == 0) or (cfg.eval_each_epoch and epoch_end)
        ):
            self.evaluate()
        if cfg.save_steps and state.step % cfg.save_steps == 0:
            self._save()
        self._step_clock = time.perf_counter()  # evaluation and saving are not step time

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
        logits = outputs.logits.float()
        # Shift the labels, not the logits: slicing the logits makes reshape copy them (batch x
        # length x vocab in fp32, 0.7 GiB at 8 x 700 x 32k), once forward and once backward.
        labels = torch.nn.functional.pad(batch["labels"].to(logits.device), (0, 1), value=IGNORE_INDEX)[:, 1:]
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )

    def count_loss_tokens(self, batch: dict) -> int:
        """How many tokens `compute_loss` sums over in ``batch`` (the normaliser)."""
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) if "labels" in batch else 0

    def generation_config(self) -> Any:
        """The `transformers.GenerationConfig` of evaluation: the model's own, overridden by the
        LoopConfig's ``max_new_tokens``, ``num_beams``, ``do_sample`` (and, when sampling,
        ``temperature`` and ``top_p``); greedy by default."""
        cfg = self.config
        tok = self.train_collator.tokenizer
        gen = deepcopy(self.accelerator.unwrap_model(self.model).generation_config)
        # Greedy/beam decoding: clear sampling settings the model's config may carry (they would
        # only produce warnings).
        sampling = (
            {"temperature": cfg.temperature, "top_p": cfg.top_p}
            if cfg.do_sample
            else {"temperature": None, "top_p": None, "top_k": None}
        )
        # use_cache: gradient checkpointing turns the model config's cache off; generation needs it.
        gen.update(
            max_new_tokens=cfg.max_new_tokens,
            num_beams=cfg.num_beams,
            do_sample=cfg.do_sample,
            pad_token_id=tok.pad_token_id,
            use_cache=True,
            **sampling,
        )
        if gen.eos_token_id is None:
            gen.eos_token_id = tok.eos_token_id
        return gen

    @torch.no_grad()
    def generate(self, batch: dict) -> list[str]:
        """Answers for one left-padded `EvalCollator` batch: the decoded new tokens of each sample.

        Override to change decoding (constrained answers, a different model call); return one
        string per sample of ``batch["ids"]``, in order. `evaluate` has already put the model in
        eval mode with merged adapters, under ``torch.no_grad`` and autocast.
        """
        model = self.accelerator.unwrap_model(self.model)
        inputs = self._model_inputs(batch)
        gen_config = self.generation_config()
        out = model.generate(**inputs, generation_config=gen_config)
        # Left padding: every row's prompt ends at the same column, so the new tokens start there.
        new_tokens = out[:, inputs["input_ids"].shape[1] :]
        count = _generated_tokens(new_tokens, gen_config.eos_token_id)
        self._generated_tokens = getattr(self, "_generated_tokens", 0) + count
        return [t.strip() for t in self.train_collator.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]

    @torch.no_grad()
    def evaluation_step(self, batch: dict) -> dict:
        """Predictions and teacher-forced loss for one eval batch.

        ``batch`` holds ``"gen"`` (an `EvalCollator` batch), ``"loss"`` (a `TrainCollator` batch of
        the same records) and ``"indices"``. Returns ``{"predictions": one str per sample of
        batch["gen"]["ids"], "loss_sum": summed token loss, "loss_tokens": its token count}``.
        """
        predictions = self.generate(batch["gen"]) if batch["gen"]["ids"] else []
        loss_batch = batch["loss"]
        loss, tokens = torch.zeros((), device=self.accelerator.device), 0
        if loss_batch["ids"]:
            # The unwrapped model: processes run different numbers of eval batches, and a DDP
            # forward may talk to the other processes (buffer broadcast).
            model = self.accelerator.unwrap_model(self.model)
            outputs = model(**self._model_inputs(loss_batch, drop=("labels",)), use_cache=False)
            loss, tokens = self.compute_loss(outputs, loss_batch), self.count_loss_tokens(loss_batch)
        return {"predictions": predictions, "loss_sum": loss.float(), "loss_tokens": tokens}

    def compute_metrics(self, predictions: list[str], references: list[list[str]]) -> tuple[dict, list[dict]]:
        """Summary scores (without the ``eval/`` prefix) and per-sample scores of the whole eval set,
        in dataset order; runs on the main process only."""
        return compute_metrics(self.metrics, predictions, references)

    callback_samples: int = 4
    """How many predictions (the first, in dataset order) `on_evaluate` receives as ``samples``."""

    uniform_loss_steps: int = 20
    """Consecutive steps with the training loss within `uniform_loss_tolerance` of ln(vocab size), the
    loss of a uniform prediction, before `fit` warns that the model may have diverged."""
    uniform_loss_tolerance: float = 0.01
    """Relative distance to ln(vocab size) that counts as "at" it (0.01: 0.1 nats for a 32k vocabulary)."""

    @torch.no_grad()
    def evaluate(self, eval_data: Any = None) -> dict[str, float]:
        """Generate on the eval set, score it, write the predictions, track the best model.

        Batches come longest prompt first (less padding); every process generates its own batches
        with the adapters merged; the rows are gathered back into dataset order, scored once on the
        main process and the summary is shared. The RNG is seeded with ``config.seed`` for the pass
        and restored afterwards, so evaluating never changes how training continues.

        Args:
            eval_data: Records (any form `fit` accepts) to evaluate on in this call; default: the
                ``eval_data`` given to `fit`.

        Returns:
            The summary: ``eval/<metric key>`` for each metric, ``eval/loss`` (teacher-forced,
            token-weighted over the whole set), ``eval/samples``, ``eval/samples_per_s`` and
            ``eval/gen_tokens_per_s`` (new tokens up to and including EOS, counted by the
            default `generate`). ``{}`` when a SIGTERM/SIGINT during `fit` stopped a
            single-process evaluation (the run then saves and exits; nothing is recorded).

        Example:
            >>> loop = Loop(model, processor, LoopConfig(output_dir="out"))  # doctest: +SKIP
            >>> loop.evaluate(synthetic_vqa(8))["eval/exact_match"]  # doctest: +SKIP
            0.0
        """
        from accelerate.utils import set_seed

        cfg = self.config
        if eval_data is not None:
            dataset = as_dataset(
                eval_data, on_bad_sample=cfg.on_bad_sample, allow_external_images=cfg.allow_external_images
            )
        else:
            dataset = getattr(self, "eval_data", None)
        if dataset is None:
            raise ValueError("nothing to evaluate: pass evaluate(eval_data) or fit(train_data, eval_data)")
        rng = checkpointing.get_rng_state()
        try:
            self._setup_accelerator()
            set_seed(cfg.seed)  # every evaluation samples (do_sample) the same way, whatever the step
            rows, loss_sum, loss_tokens, gen_tokens, seconds = self._eval_pass(dataset)
        except _EvalInterrupted:
            logger.warning(
                "%s received: evaluation at step %d abandoned (not recorded)", self._signal_received, self.state.step
            )
            self._stop_on_signal()
            return {}
        finally:
            checkpointing.set_rng_state(rng)  # evaluating must not change how training continues
        acc = self.accelerator
        rows = gather_in_order(acc, rows)  # on every process, in dataset order, each sample once
        try:
            scores, per_sample = run_on_main(acc, lambda: self._score(rows))
        finally:
            for metric in self.metrics.values():  # model-based metrics give their GPU memory back
                offload = getattr(metric, "offload", None)
                if callable(offload):
                    offload()
        summary = {f"eval/{k}": float(v) for k, v in scores.items()}
        if loss_tokens > 0:
            summary["eval/loss"] = loss_sum / loss_tokens
        summary["eval/samples"] = float(len(rows))
        summary["eval/samples_per_s"] = len(rows) / max(seconds, 1e-9)
        if gen_tokens:  # an overridden `generate` may not count its tokens
            summary["eval/gen_tokens_per_s"] = gen_tokens / max(seconds, 1e-9)
        if acc.is_main_process:
            checkpointing.write_predictions(
                os.path.join(cfg.output_dir, "predictions", f"step_{self.state.step:06d}.jsonl"),
                [{k: v for k, v in r.items() if k != "index"} | {"scores": s} for r, s in zip(rows, per_sample)],
            )
        samples = [
            {
                "id": r["id"],
                "image": _record_image(dataset, r["index"]),
                "prompt": r["prompt"],
                "prediction": r["prediction"],
                "references": r["references"],
                "scores": s,
            }
            for r, s in zip(rows[: self.callback_samples], per_sample)
        ]
        self.state.history.append({"step": self.state.step, **summary})
        improved = self._update_best(summary)
        dispatch(self.callbacks, "on_evaluate", self, metrics=summary, samples=samples)
        self._log({"step": self.state.step, **summary})
        if improved:
            # After on_evaluate, so the callback states saved with it (early stopping) include this eval.
            self._save(best=True)
        return summary

    def _eval_pass(self, dataset: Dataset) -> tuple[list[dict], float, float, float, float]:
        """Run this process's eval batches with merged adapters. Returns its rows, and the loss sum,
        loss tokens and generated tokens of all processes and the seconds of the slowest one."""
        acc, cfg = self.accelerator, self.config
        if self.optimizer is None and not getattr(self, "_eval_prepared", False):
            # Standalone evaluate(): put the model on the device (no DDP wrapper needed).
            self.model = acc.prepare_model(self.model, evaluation_mode=True)
            self._eval_prepared = True
        loader = self._eval_loader(dataset)
        rows, loss_sum, loss_tokens = [], 0.0, 0
        self._generated_tokens = 0  # counted by the default `generate`
        was_training = self.model.training
        t0 = time.perf_counter()
        self.model.eval()
        try:
            with merged_adapters(acc.unwrap_model(self.model), enabled=cfg.merge_lora_for_eval):
                for batch in loader:
                    if self._signal_received is not None and acc.num_processes == 1:
                        # Preempted: the checkpoint matters more than this evaluation. (With several
                        # processes the evaluation finishes: they run different numbers of batches, so
                        # they cannot agree to stop in between.)
                        raise _EvalInterrupted
                    with acc.autocast():
                        out = self.evaluation_step(batch)
                    gen = batch["gen"]
                    if len(out["predictions"]) != len(gen["ids"]):
                        raise ValueError(
                            f"evaluation_step returned {len(out['predictions'])} predictions "
                            f"for a batch of {len(gen['ids'])} samples {gen['ids']}"
                        )
                    loss_sum += float(out["loss_sum"])
                    loss_tokens += int(out["loss_tokens"])
                    for index, sample_id, prompt, refs, pred in zip(
                        batch["indices"], gen["ids"], gen["prompts"], gen["references"], out["predictions"]
                    ):
                        rows.append(
                            {"index": index, "id": sample_id, "prompt": prompt, "prediction": pred, "references": refs}
                        )
        finally:
            self.model.train(was_training)
        seconds = torch.tensor([time.perf_counter() - t0], device=acc.device, dtype=torch.float64)
        seconds = float(acc.gather(seconds).max())
        totals = torch.tensor([loss_sum, loss_tokens, self._generated_tokens], device=acc.device, dtype=torch.float64)
        return rows, *acc.reduce(totals, reduction="sum").tolist(), seconds

    def _score(self, rows: list[dict]) -> tuple[dict, list[dict]]:
        if not rows:
            logger.warning("evaluation produced no predictions (every eval sample was skipped)")
            return {}, []
        return self.compute_metrics([r["prediction"] for r in rows], [r["references"] for r in rows])

    # ------------------------------------------------------------------ set-up
    def _setup(self, train_data: Any, eval_data: Any) -> None:
        cfg = self.config
        self._setup_accelerator()
        acc = self.accelerator
        self.train_data = as_dataset(
            train_data, on_bad_sample=cfg.on_bad_sample, allow_external_images=cfg.allow_external_images
        )
        # Records rejected while loading (skip mode); a resumed run restores the count instead.
        self.state.skipped_samples = len(getattr(self.train_data, "skipped", ()))
        self.eval_data = (
            as_dataset(eval_data, on_bad_sample=cfg.on_bad_sample, allow_external_images=cfg.allow_external_images)
            if eval_data is not None
            else None
        )
        cfg.check_eval_data(self.eval_data is not None)
        if len(self.train_data) == 0:
            raise ValueError("train_data has no records")
        resume = self._setup_output_dir()
        self.model = prepare_model(self.model, cfg)
        self.sampler = EpochSampler(len(self.train_data), cfg.seed, cfg.shuffle)
        self.state.sampler_seed = cfg.seed
        # A private generator for the workers' base seed, so iterating the loader never draws from
        # the global torch RNG (which LoRA dropout uses and a resumed run restores).
        self._data_generator = torch.Generator().manual_seed(cfg.seed)
        loader = DataLoader(
            _WithSource(self.train_data),
            batch_size=cfg.batch_size,
            sampler=self.sampler,
            collate_fn=self.train_collator,
            num_workers=cfg.num_workers,
            generator=self._data_generator,
        )
        # Micro-batches per process per epoch (accelerate gives every process as many).
        batches_per_epoch = math.ceil(len(self.train_data) / (cfg.batch_size * acc.num_processes))
        steps_per_epoch = math.ceil(batches_per_epoch / cfg.grad_accum_steps)
        self.state.max_steps = cfg.max_steps or max(1, math.ceil(cfg.num_epochs * steps_per_epoch))
        self.steps_per_epoch = steps_per_epoch  # optimizer steps in one epoch (the last may be short)
        self._trainable = [p for p in self.model.parameters() if p.requires_grad]
        checkpointing.check_disk_space(cfg.output_dir, checkpointing.estimate_checkpoint_bytes(self.model))
        result = self.configure_optimizers()
        self.optimizer, self.scheduler = result if isinstance(result, tuple) else (result, None)
        self.model, self.optimizer, self.train_loader = acc.prepare(self.model, self.optimizer, loader)
        # The scheduler stays outside accelerate.prepare: the loop steps it once per optimizer step
        # (a prepared scheduler steps num_processes times per step).
        self._pending_rng = None
        self._signal_received = None
        self._empty_steps = 0
        self._uniform_loss = _uniform_loss(acc.unwrap_model(self.model))  # ln(V); None if V is unknown
        self._uniform_steps = 0  # consecutive steps with the loss at ln(V)
        self._last_save = None
        self._window = {"time": 0.0, "tokens": 0.0, "samples": 0.0, "loss": []}
        if acc.is_main_process:
            # A RunSummary among the user's callbacks replaces the default one (RunSummary(show=False)
            # keeps summary.json but prints nothing).
            summary = [] if any(isinstance(c, RunSummary) for c in self.callbacks) else [RunSummary()]
            self.callbacks = [
                JSONLLogger(os.path.join(cfg.output_dir, "metrics.jsonl")),
                ProgressBar(),
                *summary,
                *self.callbacks,
            ]
        if cfg.report_to:
            self.callbacks.append(TrackerLogger())
        self.state.data_fingerprint = rundir.data_fingerprint(self.train_data)
        self.state.num_processes = acc.num_processes
        if resume is not None:
            self._resume(resume)
        if acc.is_main_process:
            os.makedirs(cfg.output_dir, exist_ok=True)
            cfg.save(os.path.join(cfg.output_dir, "config.yaml"))

    def _setup_output_dir(self) -> Any:
        """Own ``output_dir`` (main process), finish what a killed save left, and decide: a fresh run,
        or the checkpoint to resume from (see `llava_loop.rundir`)."""
        cfg, acc = self.config, self.accelerator
        checkpointing.check_output_dir(cfg.output_dir)

        def own() -> None:
            self._lock = rundir.RunLock.acquire(cfg.output_dir)
            checkpointing.repair_checkpoints(cfg.output_dir)  # before anyone lists the checkpoints

        run_on_main(acc, own)  # an error there (in use by another run) is raised on every process
        resume = rundir.resolve_resume(cfg.output_dir, cfg.resume_from, cfg.overwrite_output_dir)
        acc.wait_for_everyone()  # every process has looked before anything is deleted
        if resume is None and cfg.overwrite_output_dir and acc.is_main_process:
            rundir.clear_previous_run(cfg.output_dir)
        acc.wait_for_everyone()
        return resume

    def _resume(self, path: Any) -> None:
        """Continue from the checkpoint ``path``: refuse what cannot continue exactly, apply the rest."""
        state = self.state
        saved_config, saved_state = checkpointing.read_resume_info(path)
        here = {
            "max_steps": state.max_steps,
            "data_fingerprint": state.data_fingerprint,
            "num_processes": state.num_processes,
        }
        plan = rundir.resume_plan(saved_config, self.config.to_dict(), saved_state, here, path)
        # This run's optimizer settings and schedule, before the checkpoint's overwrite them.
        fresh_groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        fresh_schedule = self.scheduler.state_dict() if self.scheduler is not None else None
        self._pending_rng = checkpointing.load_checkpoint(self, path)
        state.data_fingerprint, state.num_processes = here["data_fingerprint"], here["num_processes"]
        if plan.restart_data:
            state.samples_in_epoch = 0
        if plan.rebuild_optimizer_settings:
            for group, fresh in zip(self.optimizer.param_groups, fresh_groups):
                group.update({k: v for k, v in fresh.items() if k != "lr"})  # lr: the schedule's, below
        if plan.rebuild_schedule and self.scheduler is not None:
            # This run's schedule, advanced to the checkpoint's step: the learning rate an
            # uninterrupted run with these settings would use next.
            self.scheduler.load_state_dict(fresh_schedule)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()"
                for _ in range(state.step):
                    self.scheduler.step()
        if state.sampler_seed is not None:
            self.sampler.seed = state.sampler_seed
        self.resumed_from = str(path)
        logger.info("resumed from %s at step %d", path, state.step)

    def _setup_accelerator(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        if self.accelerator is not None:
            return
        cfg = self.config
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        precision = cfg.resolved_precision(device).replace("fp32", "no")
        # Accelerate keeps one process-wide state and refuses a second Accelerator with another
        # precision (a notebook or test running several Loops). Reset it as transformers' Trainer
        # does; the process group (PartialState) is kept.
        from accelerate.state import AcceleratorState

        if AcceleratorState._shared_state.get("_mixed_precision", precision) != precision:
            AcceleratorState._reset_state()
        self.accelerator = Accelerator(
            # Without cpu=True, accelerate treats `torchrun` on a CPU-only machine as N unrelated
            # single-process runs, all writing the same output_dir.
            cpu=device.type == "cpu",
            mixed_precision=precision,
            log_with=cfg.report_to or None,
            project_dir=cfg.output_dir,
        )
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world != self.accelerator.num_processes:
            raise RuntimeError(
                f"WORLD_SIZE={world} but accelerate set up {self.accelerator.num_processes} process(es): the "
                "processes would train independently and overwrite each other's checkpoints; check the launcher"
            )
        set_seed(cfg.seed)

    def _eval_loader(self, dataset: Dataset) -> DataLoader:
        """This process's eval batches: longest prompts first (less padding, and an out-of-memory
        error shows in the first batch), batches dealt round-robin to the processes, none repeated."""
        cfg, acc = self.config, self.accelerator
        n = min(len(dataset), cfg.eval_max_samples or len(dataset))
        cached = getattr(self, "_eval_order", None)
        if cached is None or cached[0] is not dataset or len(cached[1]) != n:
            model_config = getattr(acc.unwrap_model(self.model), "config", None)
            image_tokens = getattr(model_config, "image_seq_length", None) or 576
            lengths = _prompt_lengths(dataset, n, self.train_collator.tokenizer, image_tokens)
            self._eval_order = (dataset, sorted(range(n), key=lambda i: (-lengths[i], i)))
        order = self._eval_order[1]
        batches = shard_batches(list(range(n)), cfg.eval_batch_size, acc.process_index, acc.num_processes)
        return DataLoader(
            _Indexed(dataset, order),
            batch_sampler=batches,
            collate_fn=_EvalBatches(self.eval_collator, self.train_collator if cfg.eval_loss else None),
            num_workers=cfg.num_workers,
        )

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

    def _skip_bad_step(self, reason: str, micro_batches: list[dict]) -> None:
        """Drop this step's gradients (weights, optimizer and schedule untouched); stop after
        ``max_bad_steps`` such steps in a row."""
        state = self.state
        self.optimizer.zero_grad(set_to_none=True)
        state.bad_steps_in_a_row += 1
        ids = [i for b in micro_batches for i in b["ids"]]
        logger.warning(
            "%s at step %d (samples %s): step skipped, weights unchanged (%d in a row, max_bad_steps=%d)",
            reason,
            state.step + 1,
            ids,
            state.bad_steps_in_a_row,
            self.config.max_bad_steps,
        )
        if state.bad_steps_in_a_row > self.config.max_bad_steps:
            raise FloatingPointError(
                f"{reason} in {state.bad_steps_in_a_row} consecutive steps (last at step {state.step + 1}, "
                f"samples {ids}), more than max_bad_steps={self.config.max_bad_steps}; lower the learning "
                "rate, check the data, or use bf16 instead of fp16"
            )

    def _skip_empty_step(self, skipped: int) -> None:
        """Every sample of this step was skipped: no update (AdamW on zero gradients would still
        move the weights) and no step counted; fail if a whole epoch has nothing to train on."""
        self._empty_steps += 1
        logger.warning("all %d samples of step %d were skipped: no update", skipped, self.state.step + 1)
        if self._empty_steps >= self.steps_per_epoch:
            raise ValueError(
                f"{self._empty_steps} steps in a row (an epoch) had no trainable sample: every sample "
                "was skipped as bad; check the data (see the warnings above)"
            )

    def _check_uniform_loss(self, loss: float) -> None:
        """Warn once per stretch of `uniform_loss_steps` steps with the loss at ln(V): the model then
        predicts every token as likely as any other, which a model that learns never does for long."""
        ln_v = self._uniform_loss
        if ln_v is None:
            return
        if abs(loss - ln_v) > self.uniform_loss_tolerance * ln_v:
            self._uniform_steps = 0
            return
        self._uniform_steps += 1
        if self._uniform_steps == self.uniform_loss_steps:
            logger.warning(
                "loss is at the uniform-distribution value ln(V)=%.3f (V=%d) for %d steps in a row (step %d, "
                "loss %.4f); the model may have diverged (learning rate too high?)",
                ln_v,
                round(math.exp(ln_v)),
                self._uniform_steps,
                self.state.step + 1,
                loss,
            )

    def _evaluated_at(self, step: int) -> bool:
        return bool(self.state.history) and self.state.history[-1]["step"] == step

    def _update_best(self, summary: dict) -> bool:
        """Record ``metric_for_best`` of this evaluation if it beats the best so far; return whether
        it did (the caller then saves the best checkpoint)."""
        key = self.config.metric_for_best
        if key is None or self.optimizer is None:  # standalone evaluate(): nothing to checkpoint
            return False
        if key not in summary:
            raise KeyError(f"metric_for_best={key!r} is not among the reported metrics {sorted(summary)}")
        value, best = summary[key], self.state.best_metric
        higher = self.config.resolved_greater_is_better()
        if not math.isfinite(value) or (best is not None and not (value > best if higher else value < best)):
            return False
        self.state.best_metric = value
        return True

    def _log_train(self, logs: dict) -> None:
        w, state = self._window, self.state
        record = {"step": state.step, "epoch": state.epoch + state.samples_in_epoch / len(self.train_data), **logs}
        record["train/loss"] = sum(w["loss"]) / max(len(w["loss"]), 1)  # mean over the logging window
        record["train/tokens_per_s"] = w["tokens"] / max(w["time"], 1e-9)
        record["train/samples_per_s"] = w["samples"] / max(w["time"], 1e-9)
        record["train/eta_s"] = (state.max_steps - state.step) * w["time"] / max(len(w["loss"]), 1)
        if torch.cuda.is_available():
            record["train/peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if state.skipped_samples:
            record["train/skipped_samples"] = state.skipped_samples
        if state.truncated_samples:
            record["train/truncated_samples"] = state.truncated_samples
        self._window = {"time": 0.0, "tokens": 0.0, "samples": 0.0, "loss": []}
        self._log(record)

    def _log(self, record: dict) -> None:
        if self._lock is not None:  # main process, during fit
            self._lock.check(self.state.step)
        dispatch(self.callbacks, "on_log", self, logs=record)

    def _save(self, best: bool = False) -> None:
        state = self.state
        # Data position as one number: the end of epoch e and the start of epoch e+1 are the same.
        position = state.epoch * len(self.train_data) + state.samples_in_epoch
        key = (state.step, position, len(state.history), state.best_metric)
        if key == self._last_save:
            return  # nothing changed since the last checkpoint (e.g. save_steps, then fit's final save)
        # Every process raises if output_dir was removed or replaced (the main process holds the lock).
        run_on_main(self.accelerator, lambda: self._lock.check(state.step) if self._lock is not None else None)
        self._advance_clock()  # the checkpoint's LoopState holds the run's time up to it
        path = checkpointing.save_checkpoint(self, best=best)
        self._last_save = key
        if self.accelerator.is_main_process:
            dispatch(self.callbacks, "on_save", self, path=path)

    # ------------------------------------------------------------------ signals
    def _stop_on_signal(self) -> None:
        """After each step: stop if a process got SIGTERM/SIGINT. Processes may get the signal
        during different steps, so they agree (one tiny all-reduce) to stop after the same one."""
        received = self._signal_received is not None
        if self.accelerator.num_processes > 1 and self.config.handle_signals:
            flag = torch.tensor([float(received)], device=self.accelerator.device)
            received = bool(self.accelerator.reduce(flag, reduction="sum").item())
        if received and not self.state.should_stop:
            self.state.should_stop = True
            self.state.stop_reason = f"signal {self._signal_received or '(on another process)'}"

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
                logger.warning(
                    "%s received: finishing the current step, then saving a checkpoint", loop._signal_received
                )

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


def _uniform_loss(model: Any) -> float | None:
    """ln(V) for the model's output vocabulary V (output embedding rows, else the text config's
    vocab_size); None when neither is known."""
    embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    vocab = getattr(getattr(embeddings, "weight", None), "shape", (None,))[0]
    if vocab is None:
        config = getattr(model, "config", None)
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        vocab = getattr(text_config, "vocab_size", None)
    return math.log(vocab) if vocab and vocab > 1 else None


def _record_image(dataset: Dataset, index: int) -> Any:
    record = dataset[index]
    return None if isinstance(record, SkippedSample) else record.get("image")


def _generated_tokens(new_tokens: torch.Tensor, eos_token_id: int | list[int] | None) -> int:
    """New tokens of a ``generate`` output, each row counted up to and including its first EOS."""
    if eos_token_id is None:
        return new_tokens.numel()
    eos = torch.isin(new_tokens, torch.as_tensor(eos_token_id, device=new_tokens.device))
    after_eos = (eos.cumsum(-1) - eos.int()) > 0  # positions after a row's first EOS (padding)
    return int((~after_eos).sum())


def _prompt_lengths(dataset: Dataset, n: int, tokenizer: Any, image_tokens: int) -> list[int]:
    """Estimated prompt tokens of the first ``n`` records, without decoding images: the tokens of
    the turns before the final answer plus ``image_tokens`` per image."""
    raw = getattr(dataset, "_records", None)
    texts, images = [], []
    for i in range(n):
        record = raw[i] if raw is not None else dataset[i]
        if isinstance(record, SkippedSample):
            texts.append("")
            images.append(0)
            continue
        turns = record.get("conversations", [])
        last = max((k for k, t in enumerate(turns) if t.get("from") == "gpt"), default=len(turns))
        texts.append(" ".join(t.get("value", "") for t in turns[:last]))
        image = record.get("image")
        images.append(len(image) if isinstance(image, (list, tuple)) else int(image is not None))
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    return [len(t) + image_tokens * k for t, k in zip(ids, images)]
