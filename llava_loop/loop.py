"""The training loop: `Loop`, `LoopState` and the one-call `fit()`.

The file reads in the order a run executes: `LoopState`, `Loop.__init__` (every attribute), `Loop.fit`,
its set-up helpers, the epoch loop, one optimizer step (count → micro-batches → update → cadence), the
methods to override, then evaluation. Override one public method to change one thing; callbacks only
observe.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import itertools
import logging
import math
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader

from . import checkpointing, rundir
from .callbacks import DivergenceWarning, EarlyStopping, callback_states, dispatch, is_improvement, load_callback_states
from .collators import (
    IGNORE_INDEX,
    META_KEYS,
    EvalBatchCollator,
    EvalCollator,
    TrainCollator,
    answer_continuations,
    loss_token_count,
)
from .config import LoopConfig
from .data import BadSampleError, EpochSampler, Indexed, SkippedSample, WithSource, as_dataset, longest_prompts_first
from .distributed import (
    SignalWatcher,
    configure_deepspeed,
    configure_fsdp,
    deepspeed_full_state,
    deepspeed_load_state,
    engine,
    full_optimizer_state,
    full_tensors,
    gather_in_order,
    get_rng_state,
    make_accelerator,
    run_on_main,
    seeded_rng,
    set_rng_state,
    shard_batches,
    shard_optimizer_state,
    shards_parameters,
)
from .hf_datasets import eval_split, fit_splits
from .loggers import (
    JSONLLogger,
    ProgressBar,
    RunSummary,
    Throughput,
    learning_rate_logs,
    new_token_count,
    write_predictions,
)
from .memory import (
    cached_batch_size,
    can_measure,
    device_identity,
    find_batch_size,
    layers_to_checkpoint,
    measure_peak,
    memory_budget,
    save_batch_size,
)
from .metrics import check_metrics, compute_metrics, resolve_metrics
from .modeling import (
    bitsandbytes_adamw,
    cache_argument,
    checkpoint_layers,
    compile_layers,
    decoder_layers,
    generation_cache,
    generation_config,
    input_device,
    label_positions,
    logits_at,
    merged_adapters,
    model_quantization,
    param_groups,
    plain_positions,
    prepare_model,
    rewind_cache,
    uncompiled_layers,
    unsharded_root,
)
from .planner import optimizer_state_bytes
from .plots import RunPlot
from .report import Thumbnails, write_predictions_page
from .trackers import TrackerLogger, check_trackers

logger = logging.getLogger(__name__)

AUTO_BATCH_LIMIT = 512
"""Largest batch size batch_size="auto" / eval_batch_size="auto" tries."""
CPU_BATCH_SIZE, CPU_EVAL_BATCH_SIZE = 4, 16
"""What "auto" means without a GPU to measure on (LoopConfig's defaults)."""


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
    """Tokens the loss was normalised by (the ``num_tokens`` of `Loop.compute_loss`), all processes."""
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


class EvalResult(dict):
    """What `Loop.evaluate` returns: the summary (``eval/...`` keys), a dict, plus ``samples``: one row
    per evaluated sample in dataset order (``index, id, prompt, prediction, references, scores``)."""

    def __init__(self, summary: dict | None = None, samples: list[dict] | None = None):
        super().__init__(summary or {})
        self.samples = samples or []


class _EvalInterrupted(Exception):
    """A signal arrived during a single-process evaluation: stop it and save."""


class _Step:
    """An optimizer step whose update is queued: its loss sum, token count and gradient norm on the
    device (read once, when needed), its CPU counts, sample ids, learning rates (`learning_rate_logs`)
    and the data position after it (``samples_in_epoch``)."""

    def __init__(self, stats: torch.Tensor, counts: dict, ids: list[str], lrs: dict, position: int) -> None:
        self.stats, self.counts, self.ids, self.lrs, self.position = stats, counts, ids, lrs, position
        self._values: list[float] | None = None

    @property
    def checked(self) -> bool:
        """Whether its values were read already (the GPU was waited for)."""
        return self._values is not None

    def values(self) -> list[float]:
        if self._values is None:
            self._values = self.stats.tolist()
        return self._values


class Loop:
    """Finetunes a Hugging Face vision-language model; every step readable in `fit`.

    Features: LoRA/QLoRA via peft (or full finetuning), separate projector learning rate,
    token-weighted gradient accumulation (same update for 4x1 and 1x4), bf16/fp16 mixed
    precision, gradient clipping and checkpointing, DDP through Accelerate, generation-based
    evaluation with pluggable metrics and eval loss, best-model tracking, atomic checkpoints with
    exact resume, clean stop on SIGTERM/SIGINT, JSONL/tqdm/tracker logging.

    Override points, each with one contract (see docs/training.md): `configure_optimizers`,
    `training_step`, `compute_loss`, `generation_config`, `generate`, `evaluation_step`,
    `compute_metrics`, `evaluate`.

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

    callback_samples: int = 4
    """How many predictions (the first, in dataset order) `on_evaluate` receives as ``samples``."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        config: LoopConfig | None = None,
        metrics: Any = None,
        callbacks: list | None = None,
    ):
        cfg = self.config = config or LoopConfig()  # every setting of the run
        self.model = model  # the model trained, never an engine's wrapper: after fit's set-up peft-wrapped (LoRA)
        # What accelerate.prepare made of it: the DDP wrapper or DeepSpeed engine (else the model itself,
        # FSDP2 shards it in place). Training's forward runs through it (it synchronises the gradients).
        self.model_wrapped: Any = model
        self.processor = processor
        self.metrics = resolve_metrics(metrics)  # {name: metric}, scored on the main process
        self.callbacks = list(callbacks or [])  # observers; fit adds the loggers (main process)
        self.state = LoopState()  # where the run is; checkpointed
        self.train_collator = TrainCollator(processor, cfg.max_length, on_bad_sample=cfg.on_bad_sample)
        self.eval_collator = EvalCollator(processor, on_bad_sample=cfg.on_bad_sample)
        self.accelerator: Any = None  # created by fit (or a standalone evaluate)
        self.optimizer: Any = None  # from configure_optimizers, during fit's set-up
        self.scheduler: Any = None  # idem; None when configure_optimizers returns no scheduler
        self.train_data: Any = None  # fit's training Dataset
        self.eval_data: Any = None  # fit's eval Dataset, or None
        self._thumbnails: Thumbnails | None = None  # fit's eval images, shrunk once for every predictions page
        self.sampler: EpochSampler | None = None  # the training order, resumable mid-epoch
        self.train_loader: Any = None  # the prepared DataLoader of TrainCollator batches
        self.steps_per_epoch = 0  # optimizer steps in one epoch (the last may be short)
        # The batch settings in effect: the config's, or what batch_size/eval_batch_size="auto" and
        # effective_batch_size resolved to during fit's set-up (`_plan_batch_size`).
        self.batch_size: int | None = cfg.batch_size if isinstance(cfg.batch_size, int) else None
        self.grad_accum_steps = cfg.grad_accum_steps
        self.eval_batch_size: int | None = cfg.eval_batch_size if isinstance(cfg.eval_batch_size, int) else None
        self.resumed_from: str | None = None  # the checkpoint this run resumed from, if any
        self._trainable: list[torch.nn.Parameter] = []  # parameters with gradients (clipped together)
        self.engine = "single"  # "single", "ddp", "fsdp" or "deepspeed" (`distributed.engine`), set by fit
        self._sharded = False  # whether each process holds only a shard of the weights (FSDP, ZeRO-3)
        self._input_device: torch.device | None = None  # where batches go (device_map: the first device)
        self._spread = False  # device_map spread the model over several devices (one process)
        self._wrapper_check: Any = None  # hook handle: did the first step's forward run through model_wrapped?
        # DeepSpeed: (name, parameter) of each optimizer group, recorded before DeepSpeed flattens the groups,
        # and the trained weights at set-up (fp32, a resumed run's) for DeepSpeed's master copies.
        self._named_groups: list[list[tuple[str, torch.nn.Parameter]]] = []
        self._initial_weights: dict[str, torch.Tensor] | None = None
        self._signals = SignalWatcher(cfg.handle_signals)  # SIGTERM/SIGINT during fit: stop after the step
        self._lock: rundir.RunLock | None = None  # the main process's hold on output_dir during fit
        self._clock: float | None = None  # perf_counter() when state.wall_seconds was last advanced
        self._rng_after_resume: dict | None = None  # RNG state right after the checkpointed step
        self._throughput = Throughput()  # step time, tokens, samples, losses of the logging window
        self._empty_steps = 0  # consecutive steps whose samples were all skipped
        self._pending: _Step | None = None  # the optimizer step whose update is queued, not yet counted
        self._last_save: tuple | None = None  # what the last checkpoint held (to skip an identical save)
        # (dataset, settings, DataLoader, batch of each chunk, collate) of the last evaluation: the
        # order is sorted once, and the loader's workers persist from one evaluation to the next.
        self._eval_plan: tuple | None = None
        self._eval_prepared = False  # a standalone evaluate has put the model on the device
        # Whether the eval loss may come from the generation's prompt cache: None until the first
        # such batch has been checked against the full teacher-forced forward.
        self._loss_from_cache: bool | None = None
        self.checkpointed_layers: int | None = None  # decoder layers gradient_checkpointing="auto" chose
        # Contradictions found now rather than after set-up (or hours in): fp16 on a CPU, and a
        # metric_for_best that none of the metrics reports.
        cfg.resolved_precision("cuda" if torch.cuda.is_available() else "cpu")
        check_metrics(self.metrics, cfg.metric_for_best, cfg.eval_loss)
        check_trackers(cfg.report_to, cfg.tracker_init_kwargs)  # installed, and init arguments they take
        if cfg.early_stopping_patience:
            self.callbacks.append(EarlyStopping(cfg.early_stopping_patience))
        if not any(isinstance(c, DivergenceWarning) for c in self.callbacks):
            self.callbacks.append(DivergenceWarning())

    # ------------------------------------------------------------------ entry point
    def fit(self, train_data: Any, eval_data: Any = None) -> LoopState:
        """Train on ``train_data``; evaluate on ``eval_data`` at the cadences and once at the end.

        Args:
            train_data: Records, a LLaVA JSON/JSONL path, a Hugging Face ``datasets.Dataset``, or a
                torch Dataset of records; or a ``DatasetDict``: its ``"train"`` split, and its
                ``"validation"`` split as eval data when ``eval_data`` is None (docs/data.md).
            eval_data: Same kinds (a ``DatasetDict``: its ``"validation"`` split), or None.

        Returns:
            The final `LoopState` (``history`` holds every evaluation).
        """
        self._clock = time.perf_counter()  # wall_seconds counts set-up too
        try:
            self._setup(train_data, eval_data)
            # Signals are handled until the last save: SIGTERM during the final evaluation must not
            # lose the steps since the last checkpoint.
            with self._signals:
                dispatch(self.callbacks, "on_fit_start", self)
                if self.config.eval_before_training and self.eval_data is not None and self.state.step == 0:
                    self._evaluate_and_record()
                self._train()
                # After a signal the final evaluation is skipped (a preemption grace period is short);
                # the resumed run does it.
                if not self._preempted() and self.eval_data is not None and not self._evaluated_at(self.state.step):
                    self._evaluate_and_record()
                self._save()
                self._stop_on_signal()  # a signal during the final evaluation or save
            self._advance_clock()
            dispatch(self.callbacks, "on_fit_end", self)
        finally:
            self._eval_plan = None  # the eval workers end with the run
            self._end_train_workers()
            if self._lock is not None:
                self._lock.release()
                self._lock = None
        self._warn_at_end()
        return self.state

    def _end_train_workers(self) -> None:
        """End the train loader's persistent worker processes (the loader stays usable: iterating it
        again starts new ones)."""
        iterator = getattr(self.train_loader, "_iterator", None)  # torch keeps persistent workers there
        if iterator is not None:
            iterator._shutdown_workers()  # now, not when the last reference to it is collected
            self.train_loader._iterator = None

    # ------------------------------------------------------------------ set-up (torchtune style)
    def _setup(self, train_data: Any, eval_data: Any) -> None:
        from accelerate.utils import set_seed

        self._setup_accelerator()
        set_seed(self.config.seed)  # before prepare_model: LoRA's initial weights come from it
        self._setup_data(train_data, eval_data)
        resume = self._setup_output_dir()
        self.state.data_fingerprint = rundir.data_fingerprint(self.train_data)
        self.state.num_processes = self.accelerator.num_processes
        saved_and_plan = self._setup_model_and_optimizer(resume)
        self._setup_callbacks()
        if resume is not None:
            self._resume(resume, *saved_and_plan)
        if self.accelerator.is_main_process:
            self.config.save(os.path.join(self.config.output_dir, "config.yaml"))

    def _setup_accelerator(self) -> None:
        """The Accelerator, once per Loop (fit, or a standalone evaluate, creates it)."""
        if self.accelerator is None:
            cfg = self.config
            precision = cfg.resolved_precision("cuda" if torch.cuda.is_available() else "cpu")
            self.accelerator = make_accelerator(precision, cfg.output_dir)

    def _setup_data(self, train_data: Any, eval_data: Any) -> None:
        cfg = self.config
        train_data, eval_data = fit_splits(train_data, eval_data)  # a DatasetDict: its train/validation splits
        self.train_data = self._dataset(train_data)
        # Records rejected while loading (skip mode); a resumed run restores the count instead.
        self.state.skipped_samples = len(getattr(self.train_data, "skipped", ()))
        self.eval_data = self._dataset(eval_data) if eval_data is not None else None
        self._thumbnails = Thumbnails(self.eval_data) if self.eval_data is not None else None  # made lazily
        cfg.check_eval_data(self.eval_data is not None)
        if len(self.train_data) == 0:
            raise ValueError("train_data has no records")

    def _dataset(self, data: Any) -> Any:
        cfg = self.config
        return as_dataset(data, on_bad_sample=cfg.on_bad_sample, allow_external_images=cfg.allow_external_images)

    def _setup_output_dir(self) -> Any:
        """Own ``output_dir`` (main process), finish what a killed save left, and decide: a fresh run,
        or the checkpoint to resume from (verified once, on the main process; see `llava_loop.rundir`)."""
        cfg = self.config
        checkpointing.check_output_dir(cfg.output_dir)

        def own() -> Any:
            self._lock = rundir.RunLock.acquire(cfg.output_dir)
            checkpointing.repair_checkpoints(cfg.output_dir)  # before anyone lists the checkpoints
            resume = rundir.resolve_resume(cfg.output_dir, cfg.resume_from, cfg.overwrite_output_dir)
            if resume is None and cfg.overwrite_output_dir:
                rundir.clear_previous_run(cfg.output_dir)
            return resume

        return run_on_main(self.accelerator, own)  # an error there (e.g. in use) is raised on every process

    def _setup_model_and_optimizer(self, resume: Any) -> tuple[dict, rundir.ResumePlan] | None:
        """Model (LoRA, placement), data loader, optimizer and schedule; with ``resume``, the checkpoint's
        weights go into the model before the engine wraps (and maybe shards) it. Returns what `_resume_plan`
        read and decided (None without ``resume``)."""
        cfg, acc = self.config, self.accelerator
        on_gpu = acc.device.type == "cuda"
        self.engine, self._sharded = engine(acc), shards_parameters(acc)
        self._spread = len({str(d) for d in (getattr(self.model, "hf_device_map", None) or {}).values()}) > 1
        self._check_engine()
        self.model = self.model_wrapped = prepare_model(self.model, cfg)  # wrapped by accelerate.prepare below
        # from_pretrained returns a model in eval mode, where dropout and gradient checkpointing are off.
        self.model.train()
        if cfg.compile if cfg.compile is not None else on_gpu:
            if self.engine in ("single", "ddp"):
                compiled = compile_layers(self.model)
                logger.info("compiled %d layers (torch.compile); the first steps include compilation", compiled)
            else:
                logger.info("compile: not under %s (its hooks gather the weights around each layer)", self.engine)
        self._trainable = [p for p in self.model.parameters() if p.requires_grad]
        self._plan_batch_size()
        self.sampler = EpochSampler(len(self.train_data), cfg.seed, cfg.shuffle)
        self.state.sampler_seed = cfg.seed
        loader = DataLoader(
            WithSource(self.train_data),
            batch_size=self.batch_size,
            sampler=self.sampler,
            collate_fn=self.train_collator,
            num_workers=cfg.num_workers,
            # A private generator for the workers' base seed, so iterating the loader never draws from
            # the global torch RNG (which LoRA dropout uses and a resumed run restores).
            generator=torch.Generator().manual_seed(cfg.seed),
            pin_memory=on_gpu,
            # The workers stay up from one epoch to the next (starting them costs ~0.5 s an epoch) and end
            # with fit (`_end_train_workers`); their random seeds are drawn once a fit, not once an epoch
            # (the library's collators draw no random numbers).
            persistent_workers=cfg.num_workers > 0,
        )
        # Micro-batches per process per epoch (accelerate gives every process as many).
        batches_per_epoch = math.ceil(len(self.train_data) / (self.batch_size * acc.num_processes))
        self.steps_per_epoch = math.ceil(batches_per_epoch / self.grad_accum_steps)
        self.state.max_steps = cfg.max_steps or max(1, math.ceil(cfg.num_epochs * self.steps_per_epoch))
        checkpointing.check_disk_space(cfg.output_dir, checkpointing.estimate_checkpoint_bytes(self.model))
        result = self.configure_optimizers()
        self.optimizer, self.scheduler = result if isinstance(result, tuple) else (result, None)
        saved_and_plan = None
        if resume is not None:  # settings that cannot continue are refused before any weight is read
            saved_and_plan = self._resume_plan(resume)
            checkpointing.load_checkpoint_weights(resume, self.model)
        if self.engine == "fsdp":
            configure_fsdp(acc, self.model)
        elif self.engine == "deepspeed":
            configure_deepspeed(acc, self.batch_size, cfg.max_grad_norm)
            names = {id(p): n for n, p in self.model.named_parameters()}
            self._named_groups = [[(names[id(p)], p) for p in g["params"]] for g in self.optimizer.param_groups]
            if resume is not None:
                self._initial_weights = {n: p.detach().float().clone() for g in self._named_groups for n, p in g}
        # The scheduler stays outside accelerate.prepare: the loop steps it once per optimizer step
        # (a prepared scheduler steps num_processes times per step).
        self.model_wrapped, self.optimizer = acc.prepare(self.model, self.optimizer)
        self.model = acc.unwrap_model(self.model_wrapped)
        self._trainable = [p for p in self.model.parameters() if p.requires_grad]  # FSDP2 swapped in its shards
        self._input_device = input_device(self.model, acc.device)
        if self.model_wrapped is not self.model:
            self._wrapper_check = self.model_wrapped.register_forward_pre_hook(self._wrapper_used)
        # Batches stay on the CPU until `_to_device` copies them without waiting for the GPU (accelerate's
        # copy waits), and their labels are counted there (no device sync).
        self.train_loader = acc.prepare_data_loader(loader, device_placement=False)
        if cfg.gradient_checkpointing == "auto":
            self._plan_checkpointing()
        self._throughput.setup_mfu(self.model, acc.device, acc.num_processes, cfg.peak_tflops)
        return saved_and_plan

    def _check_engine(self) -> None:
        """Refuse what the engine and the model's placement cannot do, before any work."""
        cfg, acc = self.config, self.accelerator
        if self._spread and acc.num_processes > 1:
            raise ValueError(
                f"the model was loaded with a device_map that spreads it over {sorted(set(map(str, self.model.hf_device_map.values())))} "
                f"in one process, but {acc.num_processes} processes were launched: load it without device_map under a "
                "launcher (each process takes one GPU: DDP; to shard a model too big for one GPU, use FSDP or "
                "DeepSpeed ZeRO-3), or run one process (python train.py) to keep the device_map"
            )
        hooks = self._hooked_by()
        for name in ("batch_size", "eval_batch_size"):
            if getattr(cfg, name) == "auto" and hooks is not None:
                raise ValueError(
                    f'{name}="auto" measures one process holding the whole model on one GPU; under '
                    f"{hooks} that is not what runs: set {name} to a number"
                )

    def _hooked_by(self) -> str | None:
        """What runs the model's layers through hooks of its own (gathering shards, loading offloaded
        weights): ``"device_map"``, ``"fsdp"`` or ``"deepspeed"``; None when the model runs as it is, on one
        device. Memory probes, compiled decoding steps and the update skipped on the device need the latter."""
        if self._spread:
            return "device_map"
        return self.engine if self.engine in ("fsdp", "deepspeed") else None

    def _wrapper_used(self, *args: Any) -> None:
        """Forward pre-hook of ``model_wrapped``, removed once it fired: the first step ran through it."""
        self._wrapper_check.remove()
        self._wrapper_check = None

    def _plan_batch_size(self) -> None:
        """Resolve ``batch_size`` ("auto": `_auto_batch_size`) and ``effective_batch_size`` into
        ``self.batch_size`` and ``self.grad_accum_steps``, logging what was chosen and why."""
        cfg, processes = self.config, self.accelerator.num_processes
        per_process = None
        if cfg.effective_batch_size is not None:
            if cfg.effective_batch_size % processes:
                raise ValueError(
                    f"effective_batch_size={cfg.effective_batch_size} does not divide over {processes} processes: "
                    f"use a multiple of {processes}"
                )
            per_process = cfg.effective_batch_size // processes
        if cfg.batch_size == "auto":
            fits = self._auto_batch_size(min(per_process or AUTO_BATCH_LIMIT, len(self.train_data), AUTO_BATCH_LIMIT))
            if per_process is None:
                self.batch_size = fits
                logger.info(
                    'batch_size="auto": %d per device; the effective batch (%d) depends on the GPU: set '
                    "effective_batch_size to keep it fixed",
                    *(fits, fits * self.grad_accum_steps * processes),
                )
            else:
                self.batch_size = max(d for d in range(1, fits + 1) if per_process % d == 0)
                logger.info(
                    'batch_size="auto": %d fit per device; using %d x %d accumulation steps x %d processes = '
                    "effective_batch_size %d%s",
                    *(fits, self.batch_size, per_process // self.batch_size, processes, cfg.effective_batch_size),
                    ""
                    if fits == self.batch_size
                    else f" ({self.batch_size} is the largest size up to {fits} that divides it)",
                )
        if per_process is not None:
            if per_process % self.batch_size:
                raise ValueError(
                    f"effective_batch_size={cfg.effective_batch_size} is not a multiple of batch_size={self.batch_size} x "
                    f"{processes} processes: change one of them"
                )
            self.grad_accum_steps = per_process // self.batch_size

    def _auto_batch_size(self, limit: int) -> int:
        """The largest micro-batch up to ``limit`` whose forward and backward, on copies of the longest of up
        to 64 training samples, stay within `memory.memory_budget` with the optimizer's state reserved
        (`memory.find_batch_size`); every process uses the smallest any found. Read from, and written to,
        ``{output_dir}/auto_batch_size.json`` when what decides it is unchanged (a resumed run does not
        search again). Weights, RNG and gradients are left as they were."""
        cfg, acc = self.config, self.accelerator
        if not can_measure(acc.device):
            logger.info('batch_size="auto" without a GPU to measure: batch_size=%d', min(CPU_BATCH_SIZE, limit))
            return min(CPU_BATCH_SIZE, limit)
        model = self.model
        if not getattr(model, "hf_device_map", None) and model_quantization(model) is None:
            model.to(acc.device)  # accelerate.prepare would move it next (quantized models are placed when loaded)
        sample = self._longest_samples(1)[0]
        longest = self.train_collator([sample])["input_ids"].shape[1]
        key = self._batch_key("train", limit=limit, longest_sample_tokens=int(longest))
        size = cached_batch_size(cfg.output_dir, "train", key)
        if size is None:
            reserved = torch.empty(self._optimizer_state_bytes(), dtype=torch.uint8, device=acc.device)
            rng = get_rng_state()

            def try_batch(n: int) -> int:
                batch = self._to_device(self.train_collator([sample] * n))

                def step() -> None:
                    with acc.autocast():
                        loss, _ = self.training_step(batch)
                    acc.backward(loss)

                return measure_peak(step, acc.device)

            try:
                size = find_batch_size(try_batch, limit, memory_budget(acc.device), self._free_probe)
            finally:
                del reserved
                set_rng_state(rng)
                self._free_probe()
            logger.info('batch_size="auto": %d fit within %.1f GiB (longest sample: %d tokens)',
                        size, memory_budget(acc.device) / 2**30, longest)  # fmt: skip
        else:
            logger.info('batch_size="auto": %d, as found before in %s (same settings)', size, cfg.output_dir)
        size = self._smallest_over_processes(size)
        run_on_main(acc, lambda: save_batch_size(cfg.output_dir, "train", key, size))
        return size

    def _plan_eval_batch_size(self, dataset: Any) -> None:
        """eval_batch_size="auto": the largest batch of copies of the longest eval prompt whose
        `evaluation_step` stays within `memory.memory_budget`, found at the first evaluation (inside its
        merged-adapters block) and cached like `_auto_batch_size`."""
        cfg, acc = self.config, self.accelerator
        n = min(len(dataset), cfg.eval_max_samples or len(dataset))
        limit = max(1, min(n, AUTO_BATCH_LIMIT))
        if not can_measure(acc.device):
            self.eval_batch_size = min(CPU_EVAL_BATCH_SIZE, limit)
            logger.info('eval_batch_size="auto" without a GPU to measure: eval_batch_size=%d', self.eval_batch_size)
            return
        image_tokens = getattr(getattr(self.model, "config", None), "image_seq_length", None) or 576
        first = longest_prompts_first(dataset, n, self.train_collator.tokenizer, image_tokens)[0]
        item = (first, dataset[first])
        collate = EvalBatchCollator(self.eval_collator, self.train_collator if cfg.eval_loss else None)
        prompt = collate([item])["gen"]["input_ids"].shape[1]
        key = self._batch_key("eval", limit=limit, longest_prompt_tokens=int(prompt), eval_loss=cfg.eval_loss,
                              max_new_tokens=cfg.max_new_tokens, num_beams=cfg.num_beams,
                              generation_cache=cfg.generation_cache, merge=cfg.merge_lora_for_eval)  # fmt: skip
        size = cached_batch_size(cfg.output_dir, "eval", key)
        if size is None:

            def try_batch(k: int) -> int:
                batch = _batch_on(collate([item] * k), acc.device)

                def step() -> None:
                    with acc.autocast():
                        self.evaluation_step(batch)

                return measure_peak(step, acc.device)

            with seeded_rng(cfg.seed):
                size = find_batch_size(try_batch, limit, memory_budget(acc.device), self._free_probe)
            logger.info('eval_batch_size="auto": %d fit (longest prompt: %d tokens)', size, prompt)
        size = self._smallest_over_processes(size)
        run_on_main(acc, lambda: save_batch_size(cfg.output_dir, "eval", key, size))
        self.eval_batch_size = size

    def _batch_key(self, kind: str, **extra: Any) -> dict:
        """What decides an automatic batch size: the GPU and its share, the processes, the model and its
        trainable part, and the settings that change memory (plus ``extra``)."""
        cfg, acc = self.config, self.accelerator
        model = self.model
        return {
            **device_identity(acc.device),
            "num_processes": acc.num_processes,
            "parameters": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "quantization": cfg.quantization,
            "precision": cfg.resolved_precision(acc.device),
            **(
                {
                    "max_length": cfg.max_length,
                    "gradient_checkpointing": cfg.gradient_checkpointing,
                    "compile": cfg.compile,
                    "labelled_logits_only": cfg.labelled_logits_only,
                    "optimizer": cfg.optimizer,
                }
                if kind == "train"
                else {}
            ),  # fmt: skip
            **extra,
        }

    def _smallest_over_processes(self, size: int) -> int:
        """The smallest of ``size`` over the processes (each may have measured another)."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return size
        return int(acc.gather(torch.tensor([size], device=acc.device)).min())

    def _optimizer_state_bytes(self) -> int:
        """GPU bytes the optimizer's state will take at the first step (`planner.optimizer_state_bytes`)."""
        tensors = [(p.numel(), p.element_size()) for p in self._trainable]
        return optimizer_state_bytes(tensors, self.config.optimizer)

    def _free_probe(self) -> None:
        """Drop what a probe left: gradients, garbage, the allocator's cached blocks."""
        for param in self._trainable:
            param.grad = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _plan_checkpointing(self) -> None:
        """gradient_checkpointing="auto": checkpoint as few decoder layers as fit the memory budget,
        measured with one forward/backward of the longest training samples (weights untouched, RNG
        restored), with every layer checkpointed and with a quarter of them not."""
        acc = self.accelerator
        model = self.model
        num_layers = len(decoder_layers(model))
        if acc.device.type != "cuda" or num_layers == 0:
            logger.info('gradient_checkpointing="auto" without a GPU to measure: every layer is checkpointed')
            return
        if self._hooked_by() is not None:
            logger.info(
                'gradient_checkpointing="auto" under %s (not measured): every layer is checkpointed', self._hooked_by()
            )
            return
        batch = self._to_device(self._longest_batch())
        rng = get_rng_state()

        def peak(checkpointed: int) -> int:
            checkpoint_layers(model, checkpointed)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            with acc.autocast():
                loss, _ = self.training_step(batch)
            acc.backward(loss)
            self.optimizer.zero_grad(set_to_none=True)
            return torch.cuda.max_memory_allocated()

        freed = max(1, num_layers // 4)
        peak_all, peak_freed = peak(num_layers), peak(num_layers - freed)
        set_rng_state(rng)
        # The optimizer's state appears at the first step (8-bit optimizers: a quarter of AdamW's).
        optimizer_state = self._optimizer_state_bytes()
        budget = memory_budget(acc.device)
        n = layers_to_checkpoint(num_layers, peak_all, peak_freed, freed, budget, optimizer_state)
        # Every process checkpoints the same layers: the most any of them needs.
        n = int(acc.gather(torch.tensor([n], device=acc.device)).max()) if acc.num_processes > 1 else n
        checkpoint_layers(model, n)
        torch.cuda.reset_peak_memory_stats()
        gib = 2**30
        logger.info(
            'gradient_checkpointing="auto": %d of %d decoder layers checkpointed (measured peak %.1f GiB with all, '
            "+%.2f GiB per layer kept, +%.1f GiB optimizer state; budget %.1f GiB)",
            *(n, num_layers, peak_all / gib, (peak_freed - peak_all) / freed / gib, optimizer_state / gib),
            budget / gib,
        )
        self.checkpointed_layers = n

    def _longest_batch(self) -> dict:
        """A training micro-batch of the longest of up to 64 samples drawn from the training data."""
        return self.train_collator(self._longest_samples(self.batch_size))

    def _longest_samples(self, count: int) -> list:
        """The ``count`` longest (collated token length) of up to 64 training samples drawn at random
        (seeded with ``seed``)."""
        cfg = self.config
        n = len(self.train_data)
        indices = sorted(torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))[:64].tolist())
        data = WithSource(self.train_data)
        lengths = {}
        for i in indices:
            one = self.train_collator([data[i]])
            if one["ids"]:
                lengths[i] = one["input_ids"].shape[1]
        longest = sorted(lengths, key=lengths.get, reverse=True)[:count]
        if not longest:
            raise ValueError("none of 64 training samples could be loaded to measure memory with")
        return [data[i] for i in longest]

    def _setup_callbacks(self) -> None:
        cfg = self.config
        if self.accelerator.is_main_process:
            # A RunSummary among the user's callbacks replaces the default one (RunSummary(show=False)
            # keeps summary.json but prints nothing).
            summary = [] if any(isinstance(c, RunSummary) for c in self.callbacks) else [RunSummary()]
            jsonl = JSONLLogger(os.path.join(cfg.output_dir, "metrics.jsonl"))
            # RunPlot after JSONLLogger: it redraws curves.png once an eval record is in metrics.jsonl. Trackers
            # last (they never stop the run); a TrackerLogger among the user's callbacks (one with trackers of
            # their own) serves report_to too.
            has_trackers = any(isinstance(c, TrackerLogger) for c in self.callbacks)
            trackers = [TrackerLogger()] if cfg.report_to and not has_trackers else []
            self.callbacks = [jsonl, RunPlot(), ProgressBar(), *summary, *self.callbacks, *trackers]

    def _resume_plan(self, path: Any) -> tuple[dict, rundir.ResumePlan]:
        """The resume information of checkpoint ``path`` (`checkpointing.read_resume_info`), and what continues
        from it and how; raises on what cannot (`rundir.resume_plan`)."""
        state = self.state
        saved = checkpointing.read_resume_info(path)
        here = {
            "max_steps": state.max_steps,
            "data_fingerprint": state.data_fingerprint,
            "num_processes": state.num_processes,
        }
        return saved, rundir.resume_plan(saved["config"], self.config.to_dict(), saved["loop_state"], here, path)

    def _resume(self, path: Any, saved: dict, plan: rundir.ResumePlan) -> None:
        """Continue from the checkpoint ``path`` (its weights are loaded already; ``saved``: its resume
        information): restore the optimizer, schedule, state, callbacks and RNG as ``plan`` says."""
        state, acc = self.state, self.accelerator
        here = (state.data_fingerprint, state.num_processes)
        # This run's optimizer settings and schedule, before the checkpoint's overwrite them.
        fresh_groups = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in self.optimizer.param_groups]
        fresh_schedule = self.scheduler.state_dict() if self.scheduler is not None else None
        tensors = checkpointing.load_checkpoint(path, acc.process_index, acc.num_processes)
        self._restore(path, saved, tensors["optimizer"])
        # Applied right before the first step. Another number of processes than the checkpoint's: every
        # process gets a stream of its own, seeded from (seed, step, process index) (`rundir.resume_plan`
        # reported it), never a copy of another process's.
        self._rng_after_resume = tensors["rng"] or self._fresh_rng(state.step)
        state.data_fingerprint, state.num_processes = here
        if plan.restart_data:
            state.samples_in_epoch = 0
        if plan.rebuild_optimizer_settings:
            for group, fresh in zip(self.optimizer.param_groups, fresh_groups):
                group.update(fresh)  # lr: the schedule's, below
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

    def _fresh_rng(self, step: int) -> dict:
        """RNG states of this process, seeded from (seed, step, process index)."""
        with seeded_rng(self.config.seed + 1_000_003 * step + self.accelerator.process_index):
            return get_rng_state()

    def _restore(self, path: Any, saved: dict, optimizer_state: dict) -> None:
        """Apply the checkpoint's optimizer (whole tensors: cut into this process's shards under FSDP and
        DeepSpeed), scheduler, scaler, LoopState and callback states."""
        try:
            if self.engine == "deepspeed":
                deepspeed_load_state(optimizer_state, self._named_groups, self._initial_weights, self.optimizer)
                self._initial_weights = None
            else:
                self.optimizer.load_state_dict(shard_optimizer_state(optimizer_state, self.optimizer))
        except ValueError as err:
            raise ValueError(
                f"cannot restore the optimizer state of {path}: {err}. The trainable parameters differ from "
                "the checkpoint's (lora_r, lora_target_modules, train_projector, freeze_vision_tower or "
                "configure_optimizers changed?)"
            ) from err
        if self.scheduler is not None and saved["scheduler"] is not None:
            self.scheduler.load_state_dict(saved["scheduler"])
        if self.accelerator.scaler is not None and saved["scaler"] is not None:
            self.accelerator.scaler.load_state_dict(saved["scaler"])
        max_steps = self.state.max_steps  # from this run's config: a resumed run may train longer
        self.state.load_state_dict(saved["loop_state"])
        self.state.max_steps, self.state.should_stop, self.state.stop_reason = max_steps, False, None
        load_callback_states(self.callbacks, saved["callbacks"])

    # ------------------------------------------------------------------ training
    def _train(self) -> None:
        state = self.state
        n = len(self.train_data)
        # Samples all processes consume per micro-step (the last one of an epoch may get fewer).
        per_micro_step = self.batch_size * self.accelerator.num_processes
        while state.step < state.max_steps and not state.should_stop:
            if state.samples_in_epoch >= n:
                # Resumed from the checkpoint of an epoch's last step (written before on_epoch_end).
                state.epoch, state.samples_in_epoch = state.epoch + 1, 0
            self.sampler.set_position(state.epoch, start=state.samples_in_epoch)
            batches = iter(self.train_loader)
            if self._rng_after_resume is not None:
                # LoRA dropout draws from the global RNG; iterating the loader does not (its generator).
                set_rng_state(self._rng_after_resume)
                self._rng_after_resume = None
            dispatch(self.callbacks, "on_epoch_start", self)
            self._throughput.restart_clock()  # step time includes loading and collating its data
            exhausted = False
            while state.step < state.max_steps and not state.should_stop and not exhausted:
                # The last step of an epoch may get fewer micro-batches; the loss is normalised by
                # its own label tokens, so that is still a correct step.
                micro_batches = list(itertools.islice(batches, self.grad_accum_steps))
                position = state.samples_in_epoch
                state.samples_in_epoch = min(n, position + len(micro_batches) * per_micro_step)
                exhausted = not micro_batches or state.samples_in_epoch >= n
                if micro_batches and not self._optimizer_step(micro_batches):
                    state.samples_in_epoch, exhausted = position, False  # dropped: its data comes next time
                self._stop_on_signal()
            self._finish_pending()  # every step is counted before the epoch ends or the run stops
            if not exhausted:
                break  # stopped mid-epoch: max_steps reached or should_stop
            dispatch(self.callbacks, "on_epoch_end", self)
            state.epoch += 1
            state.samples_in_epoch = 0

    def _optimizer_step(self, micro_batches: list[dict]) -> bool:
        """One optimizer step: count, forward/backward each micro-batch, update, then the cadences.
        The loss is normalised by the tokens of all micro-batches on all processes, so accumulation
        and batch size give the same update. Return False if the step was dropped unapplied (a
        callback stopped the run while its forward and backward were queued).

        The GPU is not waited for at every step. With an optimizer that can skip its own update on
        the device (fused AdamW, as the grad scaler's ``found_inf`` does), a step that neither logs,
        evaluates, saves nor ends the run is counted (`_finish_step`) only once the next step's
        forward and backward are queued behind it; its update is applied only if its loss and
        gradient norm are finite, exactly as when it is checked at once.
        """
        counts = self._count(micro_batches)
        if counts["label_tokens"] == 0:
            self._skip_empty_step(counts["skipped"])
            return True
        self._empty_steps = 0
        loss_sum, num_tokens = self._forward_backward(micro_batches, counts["label_tokens"])
        if self._pending is not None:  # the previous step, now that this one is queued behind it
            self._finish_pending()
            if self.state.should_stop:  # a callback stopped the run: this step is not applied
                self.optimizer.zero_grad(set_to_none=True)
                return False
        if self.engine == "deepspeed":
            grad_norm = self._deepspeed_update(loss_sum, num_tokens)
        else:  # max_grad_norm=0: no clipping, but the norm is still measured (logged, checked).
            grad_norm = self.accelerator.clip_grad_norm_(self._trainable, self.config.max_grad_norm or math.inf)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: the norm is a replicated DTensor
            grad_norm = grad_norm.full_tensor()
        grad_norm = torch.as_tensor(grad_norm, dtype=torch.float64).to(loss_sum.device)
        stats = torch.stack([loss_sum.double(), num_tokens.double(), grad_norm])  # read together, once
        ids = [i for b in micro_batches for i in b["ids"]]
        step = _Step(stats, counts, ids, learning_rate_logs(self.optimizer), self.state.samples_in_epoch)
        inner = getattr(self.optimizer, "optimizer", self.optimizer)  # under accelerate's wrapper
        plain = self._hooked_by() is None
        if self.accelerator.scaler is None and plain and getattr(inner, "_step_supports_amp_scaling", False):
            mean = stats[0] / stats[1]
            bad = ~torch.isfinite(mean) | ~torch.isfinite(stats[2]) | (stats[1] <= 0)  # `_good`, on the device
            inner.grad_scale, inner.found_inf = None, bad.float()  # what GradScaler hands the optimizer
            try:
                self.optimizer.step()  # skipped on the device where bad (weights, moments, step count)
            finally:
                del inner.grad_scale, inner.found_inf
        elif self._good(step):
            self.optimizer.step()  # with fp16, the grad scaler skips inf/nan gradients itself
        elif self.accelerator.scaler is not None:
            self.accelerator.scaler.update()  # clipping unscaled the gradients; no step to update after
        self.optimizer.zero_grad(set_to_none=True)
        self._pending = step
        if step.checked or not self._can_wait(self.state.step + 1):
            self._finish_pending()
        return True

    def _deepspeed_update(self, loss_sum: torch.Tensor, num_tokens: torch.Tensor) -> float:
        """DeepSpeed's update: its engine clips (``gradient_clipping``, set from ``max_grad_norm``), steps the
        optimizer and zeroes the gradients at once, so the loss is checked first (waits for the device): a
        non-finite one drops the gradients instead (`_finish_step` reports the step as skipped). Returns the
        gradient norm DeepSpeed measured (NaN when dropped)."""
        engine = self.model_wrapped
        if not math.isfinite(float(loss_sum / num_tokens)):
            engine.zero_grad()
            return math.nan
        engine.step()
        norm = engine.get_global_grad_norm()
        return float(norm) if norm is not None else math.nan

    def _good(self, step: _Step) -> bool:
        """Whether ``step`` may be applied: a positive token count and nothing `_non_finite`. Waits for
        the GPU."""
        loss_sum, num_tokens, grad_norm = step.values()
        return num_tokens > 0 and self._non_finite(loss_sum / num_tokens, grad_norm) is None

    def _non_finite(self, mean_loss: float, grad_norm: float) -> str | None:
        """Why a step must not be applied: a non-finite loss or (without fp16's grad scaler, which skips
        such steps itself and lowers its scale) a non-finite gradient norm; None if neither."""
        if not math.isfinite(mean_loss):
            return f"non-finite loss ({mean_loss})"
        if self.accelerator.scaler is None and not math.isfinite(grad_norm):
            return f"non-finite gradient norm ({grad_norm})"
        return None

    def _can_wait(self, number: int) -> bool:
        """Whether step ``number`` (its update queued) may be counted after the next step is queued: it
        does not log, evaluate, save (`_cadences`) or end the epoch or the run."""
        state = self.state
        epoch_end = state.samples_in_epoch >= len(self.train_data)
        return not (number >= state.max_steps or epoch_end or any(self._cadences(number)))

    def _finish_pending(self) -> None:
        """Count the step whose update is queued (`_finish_step`), if there is one, with the data
        position it had (the next step's data may be loaded already)."""
        step, self._pending = self._pending, None
        if step is None:
            return
        state = self.state
        position, state.samples_in_epoch = state.samples_in_epoch, step.position
        try:
            self._finish_step(step)
        finally:
            state.samples_in_epoch = position

    def _finish_step(self, step: _Step) -> None:
        """The host's part of an optimizer step whose update is already queued: read its loss, token
        count and gradient norm (waits for the GPU), then count it (or report it as skipped), advance
        the schedule, call back and run the cadences."""
        loss_sum, num_tokens, grad_norm = step.values()
        counts = step.counts
        if num_tokens <= 0:
            raise ValueError(
                f"compute_loss returned num_tokens={num_tokens:g} for step {self.state.step + 1}, which has "
                f"{counts['label_tokens']} label tokens: return (loss summed over some tokens, how many tokens)"
            )
        mean_loss = loss_sum / num_tokens
        reason = self._non_finite(mean_loss, grad_norm)
        if reason is not None:
            self._skip_bad_step(reason, step.ids)
            return
        logs = self._update(mean_loss, grad_norm, step.lrs)
        self.state.samples_seen += counts["samples"]
        self.state.tokens_seen += counts["tokens"]
        self.state.label_tokens_seen += int(num_tokens)
        self._throughput.add_step(counts["tokens"], counts["samples"])
        self._after_step(logs)

    def _count(self, micro_batches: list[dict]) -> dict[str, int]:
        """This step's label tokens, tokens, samples, skipped and truncated samples, all processes
        (counted on the CPU batches; one all-reduce with several processes)."""
        acc, state = self.accelerator, self.state
        local = [
            sum(loss_token_count(b) for b in micro_batches),
            sum(int(b["attention_mask"].sum()) if "attention_mask" in b else 0 for b in micro_batches),
            sum(len(b["ids"]) for b in micro_batches),
            sum(len(b.get("skipped") or ()) for b in micro_batches),
            sum(b.get("num_truncated", 0) for b in micro_batches),
        ]
        if acc.num_processes > 1:
            local = acc.reduce(torch.tensor(local, device=acc.device, dtype=torch.float64), reduction="sum").tolist()
        counts = dict(zip(("label_tokens", "tokens", "samples", "skipped", "truncated"), map(int, local)))
        state.skipped_samples += counts["skipped"]  # the collator/dataset warned per sample
        state.truncated_samples += counts["truncated"]  # the collator warned about the first one
        return counts

    def _forward_backward(self, micro_batches: list[dict], label_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Backward of every micro-batch's loss, scaled so that the gradients are the global loss sum
        over the global token count; return that loss sum and token count (all processes), on the device."""
        acc = self.accelerator
        loss_sum = torch.zeros((), device=acc.device)
        num_tokens = torch.zeros((), device=acc.device, dtype=torch.float64)
        for k, batch in enumerate(micro_batches):
            if not batch["ids"]:
                continue  # every sample of this micro-batch was skipped (and reported)
            batch = self._to_device(batch)
            last = k == len(micro_batches) - 1
            # Skip DDP's gradient all-reduce (FSDP's reduce-scatter) on all but the last micro-batch of the step.
            syncless = not last and acc.num_processes > 1 and self.engine != "deepspeed"
            context = acc.no_sync(self.model_wrapped) if syncless else contextlib.nullcontext()
            with context:
                with acc.autocast():  # forward only: backward runs outside autocast
                    loss, tokens = self.training_step(batch)
                # Scaled by the label tokens counted before the forward (fp16 gradients stay in range).
                # DDP, FSDP and DeepSpeed average gradients over processes; the factor num_processes undoes that.
                scaled = loss * acc.num_processes / float(label_tokens)
                if self.engine == "deepspeed":
                    # DeepSpeed reduces the gradients at the step's last micro-batch; `_deepspeed_update` steps.
                    self.model_wrapped.set_gradient_accumulation_boundary(last)
                    self.model_wrapped.backward(scaled)
                else:
                    acc.backward(scaled)
            loss_sum += loss.detach().float().to(loss_sum.device)  # device_map: the loss is on the last device
            num_tokens += torch.as_tensor(tokens, device=num_tokens.device)
        if self._wrapper_check is not None:
            raise RuntimeError(
                f"training_step ran the model without its {type(self.model_wrapped).__name__} wrapper, so the "
                "gradients were not synchronised across processes: forward with self.model_wrapped in training_step "
                "(self.model is the unwrapped model, for everything else)"
            )
        loss_sum = acc.reduce(loss_sum, reduction="sum")
        if acc.num_processes > 1:
            num_tokens = acc.reduce(num_tokens, reduction="sum")
        if type(self).training_step is not Loop.training_step or type(self).compute_loss is not Loop.compute_loss:
            # An overridden hook may count other tokens: its own count is the normaliser (rescaled on
            # the device; the default hooks count exactly the label tokens).
            if self.engine == "deepspeed" and int(num_tokens) != label_tokens:
                raise ValueError(
                    f"compute_loss/training_step counted {int(num_tokens)} tokens for a step with {label_tokens} label "
                    "tokens; the loop rescales the gradients to your count, which it cannot do under DeepSpeed (the "
                    "gradients live in DeepSpeed's partitions): count the label tokens, or train with DDP or FSDP"
                )
            grads = [p.grad for p in self._trainable if p.grad is not None]
            if grads:
                # Sharded gradients (FSDP's DTensors) take a Python number, which waits for the GPU.
                factor = (label_tokens / num_tokens).to(grads[0].dtype)
                torch._foreach_mul_(grads, float(factor) if self._sharded else factor)
        return loss_sum, num_tokens

    def _update(self, mean_loss: float, grad_norm: float, lrs: dict) -> dict:
        """Count an applied step (its optimizer update is queued) and advance the schedule; return the
        step's logs (``lrs``: the rates the update used, `learning_rate_logs`)."""
        self.state.bad_steps_in_a_row = 0
        if self.scheduler is not None:
            self.scheduler.step()
        self.state.step += 1
        return {"train/loss": mean_loss, **lrs, "train/grad_norm": grad_norm}

    def _after_step(self, logs: dict) -> None:
        """Callbacks, then logging, evaluation and checkpoint at their cadences."""
        dispatch(self.callbacks, "on_step_end", self, logs=logs)
        self._throughput.losses.append(logs["train/loss"])
        log, evaluate, save = self._cadences(self.state.step)
        if log:
            self._log_train(logs)
        if evaluate:
            self._evaluate_and_record()
        if save:
            self._save()
        self._throughput.restart_clock()  # evaluation and saving are not step time

    def _cadences(self, number: int) -> tuple[bool, bool, bool]:
        """Whether optimizer step ``number``, ending at the current data position, logs, evaluates and
        saves."""
        cfg = self.config
        epoch_end = self.state.samples_in_epoch >= len(self.train_data)
        log = bool(cfg.log_steps) and number % cfg.log_steps == 0
        evaluate = self.eval_data is not None and (
            (bool(cfg.eval_steps) and number % cfg.eval_steps == 0) or (cfg.eval_each_epoch and epoch_end)
        )
        save = bool(cfg.save_steps) and number % cfg.save_steps == 0
        return log, evaluate, save

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

    def _skip_bad_step(self, reason: str, ids: list[str]) -> None:
        """Report a step whose update was not applied (weights, optimizer and schedule untouched) and
        which does not count; stop after ``max_bad_steps`` such steps in a row."""
        state, limit = self.state, self.config.max_bad_steps
        state.bad_steps_in_a_row += 1
        logger.warning(
            "%s at step %d (samples %s): step skipped, weights unchanged (%d in a row, max_bad_steps=%d)",
            *(reason, state.step + 1, ids, state.bad_steps_in_a_row, limit),
        )
        if state.bad_steps_in_a_row > limit:
            raise FloatingPointError(
                f"{reason} in {state.bad_steps_in_a_row} consecutive steps (last at step {state.step + 1}, "
                f"samples {ids}), more than max_bad_steps={limit}; lower the learning rate, check the data, "
                "or use bf16 instead of fp16"
            )

    # ------------------------------------------------------------------ logging, saving, stopping
    def _log_train(self, logs: dict) -> None:
        state = self.state
        record = {"step": state.step, "epoch": state.epoch + state.samples_in_epoch / len(self.train_data), **logs}
        record.update(self._throughput.window(state.max_steps - state.step))
        if torch.cuda.is_available():
            record["train/peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if state.skipped_samples:
            record["train/skipped_samples"] = state.skipped_samples
        if state.truncated_samples:
            record["train/truncated_samples"] = state.truncated_samples
        self._log(record)

    def _log(self, record: dict) -> None:
        if self._lock is not None:  # main process, during fit
            self._lock.check(self.state.step)
        dispatch(self.callbacks, "on_log", self, logs=record)

    def _save(self, best: bool = False) -> None:
        state, acc = self.state, self.accelerator
        # Data position as one number: the end of epoch e and the start of epoch e+1 are the same.
        position = state.epoch * len(self.train_data) + state.samples_in_epoch
        key = (state.step, position, len(state.history), state.best_metric)
        if key == self._last_save:
            return  # nothing changed since the last checkpoint (e.g. save_steps, then fit's final save)
        # Every process raises if output_dir was removed or replaced (the main process holds the lock).
        run_on_main(acc, lambda: self._lock.check(state.step) if self._lock is not None else None)
        self._advance_clock()  # the checkpoint's LoopState holds the run's time up to it
        previous_best = state.best_checkpoint
        if best:  # before writing, so that the LoopState saved in the best checkpoint names itself
            state.best_checkpoint = str(checkpointing.checkpoint_path(self.config.output_dir, state.step))
        try:
            path = checkpointing.save_checkpoint(acc, self.config, self._checkpoint_state(), self.model, self.processor)
        except BaseException:
            state.best_checkpoint = previous_best
            raise
        self._last_save = key
        if acc.is_main_process:
            dispatch(self.callbacks, "on_save", self, path=path)

    def _checkpoint_state(self) -> dict:
        """Everything a checkpoint holds besides the model, as plain state dicts; under FSDP and DeepSpeed
        also the trained weights (``model``), gathered whole from the shards as the optimizer's state is
        (collectives), so that the files are those one process writes (and any number of processes resumes)."""
        acc, scaler = self.accelerator, self.accelerator.scaler
        if self.engine == "deepspeed":  # collectives: from DeepSpeed's partitions, in torch's format
            weights, optimizer = deepspeed_full_state(self._named_groups, self.optimizer)
            if not acc.is_main_process:  # gathered on every process; written by the main one
                weights, optimizer = None, {}
        else:
            optimizer, weights = self.optimizer.state_dict(), None
        if self._sharded and self.engine == "fsdp":  # collectives: every process gathers, the main process keeps
            names = {n for n, p in self.model.named_parameters() if p.requires_grad}
            weights = full_tensors(
                {k: v for k, v in self.model.state_dict().items() if k in names}, acc.is_main_process
            )
            optimizer = full_optimizer_state(optimizer, acc.is_main_process)
        return {
            "model": weights,
            "loop_state": self.state.state_dict(),
            "callbacks": callback_states(self.callbacks),
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": get_rng_state(),
        }

    def _stop_on_signal(self) -> None:
        """After each step: stop if a process got SIGTERM/SIGINT (all processes stop after the same step)."""
        if self._signals.agreed(self.accelerator) and not self.state.should_stop:
            self.state.should_stop = True
            self.state.stop_reason = f"signal {self._signals.received or '(on another process)'}"

    def _preempted(self) -> bool:
        return (self.state.stop_reason or "").startswith("signal")

    def _advance_clock(self) -> None:
        """Add the time since the last call (or since fit started) to ``state.wall_seconds``."""
        now = time.perf_counter()
        self.state.wall_seconds += now - self._clock
        self._clock = now

    def _warn_at_end(self) -> None:
        if self.state.skipped_samples:
            logger.warning(
                "%d bad samples were skipped (on_bad_sample='skip'); see the warnings above", self.state.skipped_samples
            )
        if self._preempted():
            logger.warning(
                "stopped by %s at step %d; checkpoint saved in %s. Resume with resume_from='latest' "
                "(CLI: --resume_from latest) and the same output_dir.",
                *(self.state.stop_reason, self.state.step, checkpointing.checkpoints_dir(self.config.output_dir)),
            )

    # ------------------------------------------------------------------ override points: training
    def configure_optimizers(self) -> Any:
        """Override this to change the optimizer or schedule. Return an optimizer, or ``(optimizer, scheduler)``.

        Default: AdamW (``optimizer``: torch's, fused on a GPU (``fused_adamw``), or bitsandbytes' 8-bit
        one) with the projector at ``projector_lr`` and no
        weight decay on biases and norms, and ``transformers.get_scheduler(lr_scheduler)`` with warmup.
        The scheduler is stepped once per optimizer step.
        """
        from transformers import get_scheduler

        cfg = self.config
        groups = param_groups(self.model, cfg.learning_rate, cfg.projector_lr, cfg.weight_decay)
        if cfg.optimizer == "adamw":
            fused = cfg.fused_adamw if cfg.fused_adamw is not None else self.accelerator.device.type == "cuda"
            optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, fused=fused, foreach=None if fused else True)
        else:
            optimizer = bitsandbytes_adamw(cfg.optimizer, groups, cfg.learning_rate)
        warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * self.state.max_steps)
        scheduler = get_scheduler(
            cfg.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=self.state.max_steps
        )
        return optimizer, scheduler

    def training_step(self, batch: dict) -> tuple[torch.Tensor, int]:
        """Override this to change the forward pass of training. Forward one `TrainCollator` micro-batch
        (no backward) and return ``(loss_sum, num_tokens)``, as `compute_loss` does.

        The loop backpropagates ``loss_sum`` divided by the ``num_tokens`` of the whole optimizer step
        (all micro-batches, all processes), so accumulation and batch size give the same update.
        """
        if "labels" not in batch:
            raise TypeError(
                "training batch has no 'labels': batches from EvalCollator (prompt only, left "
                "padded) cannot be used for training; use TrainCollator"
            )
        return self.compute_loss(self._forward(self.model_wrapped, batch), batch)

    def _forward(self, model: Any, batch: dict) -> Any:
        """The teacher-forced forward of a `TrainCollator` batch by ``model`` (`model_wrapped` in training,
        which synchronises gradients; `model` in evaluation); only at ``batch["label_positions"]`` (when
        `_to_device` added them) does the LM head run."""
        with logits_at(self.model, batch.get("label_positions")):
            return model(**self._model_inputs(batch, drop=("labels",)), use_cache=False)

    def compute_loss(self, outputs: Any, batch: dict) -> tuple[torch.Tensor, int]:
        """Override this to change the loss (training and eval loss). Return ``(loss_sum, num_tokens)``:
        the loss **summed** over the tokens it covers, and how many tokens that is (the normaliser).

        Default: next-token cross-entropy in fp32 summed over the label tokens (``labels != -100``),
        and their count (`llava_loop.collators.loss_token_count`). With ``labelled_logits_only``
        ``outputs.logits`` holds only the rows at ``batch["label_positions"]`` (``num_tokens x vocab``).
        ``num_tokens`` may be an int or a 0-d tensor (no wait for the GPU).
        """
        logits = outputs.logits.float()
        # Shift the labels, not the logits: slicing the logits makes reshape copy them (batch x
        # length x vocab in fp32, 0.7 GiB at 8 x 700 x 32k), once forward and once backward.
        labels = batch["labels"].to(logits.device, non_blocking=True)
        labels = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:].reshape(-1)
        if logits.dim() == 2:  # the labelled positions only, in the order of label_positions
            targets = labels.index_select(0, batch["label_positions"].to(labels.device))
            return torch.nn.functional.cross_entropy(logits, targets, reduction="sum"), logits.shape[0]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels, ignore_index=IGNORE_INDEX, reduction="sum"
        )
        return loss, (labels != IGNORE_INDEX).sum()

    def _to_device(self, batch: dict) -> dict:
        """``batch`` with its tensors on the loop's device, copied without waiting for the GPU, and,
        for the default loss with ``labelled_logits_only``, ``label_positions`` (`modeling.label_positions`)."""
        device = self._device()
        out = {k: _on(v, device) for k, v in batch.items()}
        if self.config.labelled_logits_only and type(self).compute_loss is Loop.compute_loss and "labels" in batch:
            out["label_positions"] = label_positions(batch["labels"], IGNORE_INDEX).to(device, non_blocking=True)
        return out

    def _device(self) -> torch.device:
        """Where batches go: the accelerator's device, or for a model spread with ``device_map`` the device
        of its first layers (`modeling.input_device`)."""
        return self._input_device or self.accelerator.device

    def _model_inputs(self, batch: dict, drop: tuple = ()) -> dict:
        """The batch's model inputs (meta keys and ``drop`` removed) on the loop's device."""
        device = self._device() if self.accelerator else None
        out = {}
        for key, value in batch.items():
            if key in META_KEYS or key in drop:
                continue
            out[key] = _on(value, device) if device is not None else value
        return out

    # ------------------------------------------------------------------ override points: evaluation
    def generation_config(self) -> Any:
        """Override this to change decoding settings. Return the `transformers.GenerationConfig` of
        evaluation (default: `llava_loop.modeling.generation_config`: the model's own, with the
        LoopConfig's decoding settings; greedy by default)."""
        gen = generation_config(self.model, self.train_collator.tokenizer, self.config)
        if self.config.generation_cache is None and self._hooked_by() is not None:
            # A dynamic cache: transformers compiles a static cache's decoding step, and the engines' hooks
            # (gathering shards, loading offloaded layers) make it recompile at every layer.
            gen.cache_implementation = None
        return gen

    @torch.no_grad()
    def generate(self, batch: dict) -> tuple[list[str], int | None]:
        """Override this to change how answers are produced (constrained answers, another model call).

        Args:
            batch: One left-padded `EvalCollator` batch. The model is already in eval mode with merged
                adapters, under ``torch.no_grad`` and autocast.

        Returns:
            ``(answers, num_new_tokens)``: one string per sample of ``batch["ids"]``, in order, and the
            tokens generated (each row up to and including its EOS), or None if not counted (then
            ``eval/gen_tokens_per_s`` is not reported).
        """
        answers, count, _ = self._generate(batch, self.generation_config())
        return answers, count

    def _generate(self, batch: dict, gen_config: Any, keep: bool = False) -> tuple[list[str], int, Any]:
        """`generate`'s answers and token count, and with ``keep`` the ``generate`` output (its cache and
        the raw logits of every step)."""
        model = self.model
        inputs = self._model_inputs(batch)
        if keep:
            gen_config = copy.copy(gen_config)
            gen_config.update(return_dict_in_generate=True, output_logits=True)
        # Sharded weights: every process runs as many decoding steps as the longest answer of all takes.
        synced = self._sharded and self.accelerator.num_processes > 1
        out = model.generate(**inputs, generation_config=gen_config, synced_gpus=synced)
        # Left padding: every row's prompt ends at the same column, so the new tokens start there.
        new_tokens = (out.sequences if keep else out)[:, inputs["input_ids"].shape[1] :]
        texts = self.train_collator.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [t.strip() for t in texts], new_token_count(new_tokens, gen_config.eos_token_id), out if keep else None

    @torch.no_grad()
    def evaluation_step(self, batch: dict) -> dict:
        """Override this to change what one eval batch produces. ``batch`` holds ``"gen"`` (an
        `EvalCollator` batch), ``"loss"`` (a `TrainCollator` batch of the same records, empty without
        ``eval_loss``) and ``"indices"``.

        With the default `generate` and `compute_loss`, a single-turn batch's eval loss is read off
        the generation's prompt cache: the prompt is not run through the model a second time (see
        `_loss_from_generation`).

        Returns:
            ``{"predictions": one str per sample of batch["gen"]["ids"], "new_tokens": int or None,
            "loss_sum": summed token loss, "loss_tokens": its token count}`` (from `generate` and
            `compute_loss`).
        """
        gen, loss_batch = batch["gen"], batch["loss"]
        loss, tokens = torch.zeros((), device=self.accelerator.device), 0
        if not gen["ids"]:
            predictions, new_tokens, cached = [], 0, None
        elif (answers := self._cacheable_answers(gen, loss_batch, gen_config := self.generation_config())) is not None:
            predictions, new_tokens, out = self._generate(gen, gen_config, keep=True)
            cached = self._loss_from_generation(out, gen, answers)
        else:
            (predictions, new_tokens), cached = self.generate(gen), None
        if loss_batch["ids"] and (cached is None or not self._loss_from_cache):
            # The unwrapped model: processes run different numbers of eval batches, and a DDP
            # forward may talk to the other processes (buffer broadcast).
            loss_batch = self._to_device(loss_batch)
            loss, tokens = self.compute_loss(self._forward(self.model, loss_batch), loss_batch)
            if cached is not None:  # the first cached loss: checked against the full forward once
                self._check_loss_from_cache(cached, (loss, tokens))
                if self._loss_from_cache:  # and then used, as in every later evaluation: a resumed run's
                    loss, tokens = cached  # first evaluation gives the losses an uninterrupted one does
        elif cached is not None:
            loss, tokens = cached
        return {"predictions": predictions, "new_tokens": new_tokens, "loss_sum": loss.float(), "loss_tokens": tokens}

    def _cacheable_answers(self, gen: dict, loss_batch: dict, gen_config: Any) -> dict | None:
        """The answers of ``loss_batch`` after the prompts of ``gen`` (`answer_continuations`) where its
        eval loss can be read off the generation's cache: the default `generate` and `compute_loss`,
        one beam, one position counter per row (`plain_positions`); None otherwise, and for good once
        the check against the full forward has failed."""
        if self._loss_from_cache is False or not loss_batch["ids"] or gen_config.num_beams != 1:
            return None
        if self._sharded or self._spread:  # a forward more or less on some processes; the logits' device
            return None
        if any(getattr(type(self), name) is not getattr(Loop, name) for name in ("generate", "compute_loss")):
            return None
        if not plain_positions(self.model):
            return None
        return answer_continuations(gen, loss_batch)

    def _loss_from_generation(self, out: Any, gen: dict, answers: dict) -> tuple[torch.Tensor, int] | None:
        """The summed next-token loss of ``answers`` (their labels) after the prompts of ``gen``, from
        the ``generate`` output ``out``: its first step's raw logits predict each answer's first token;
        a forward of the answers on its cache, cut back to the prompts, predicts the rest. The prompt
        and image are not run again. None where the cache cannot be cut back (`rewind_cache`).
        """
        model = self.model
        device = self.accelerator.device
        prompt_length, answer_length = gen["input_ids"].shape[1], answers["input_ids"].shape[1]
        cache = generation_cache(out)
        if cache is None or not out.logits or not rewind_cache(cache, prompt_length, answer_length - 1):
            return None
        answers = {k: _on(v, device) for k, v in answers.items()}
        labels = answers["labels"]
        first = labels[:, 0] != IGNORE_INDEX
        logits, targets = [out.logits[0][first].float()], [labels[:, 0][first]]
        if answer_length > 1:
            prompt_mask = _on(gen["attention_mask"], device)
            rest = labels[:, 1:]
            where = (rest != IGNORE_INDEX).flatten().nonzero().squeeze(1)
            inputs = {
                "input_ids": answers["input_ids"][:, :-1],
                "attention_mask": torch.cat([prompt_mask, answers["attention_mask"][:, :-1]], 1),
                # as generate counts them: from each row's first prompt token
                "position_ids": prompt_mask.sum(1, keepdim=True) + torch.arange(answer_length - 1, device=device),
                cache_argument(model): cache,
            }
            with logits_at(model, where):
                logits.append(model(**inputs, use_cache=True).logits.float())
            targets.append(rest.flatten()[where])
        logits, targets = torch.cat(logits), torch.cat(targets)
        return torch.nn.functional.cross_entropy(logits, targets, reduction="sum"), targets.shape[0]

    def _check_loss_from_cache(self, cached: tuple, full: tuple) -> None:
        """Compare the first batch's loss read off the generation cache with the full teacher-forced
        forward's; use the cache from then on only if they agree (per-token loss within 0.02 + 1%)."""
        (cached_sum, cached_n), (full_sum, full_n) = cached, full
        a, b = float(cached_sum) / max(int(cached_n), 1), float(full_sum) / max(int(full_n), 1)
        self._loss_from_cache = int(cached_n) == int(full_n) and abs(a - b) <= 0.02 + 0.01 * abs(b)
        if not self._loss_from_cache:
            logger.warning(
                "eval loss from the generation cache (%.4f over %d tokens) differs from the full forward "
                "(%.4f over %d tokens) for this model: the eval loss runs the full forward from now on",
                a,
                int(cached_n),
                b,
                int(full_n),
            )

    def compute_metrics(self, predictions: list[str], references: list[list[str]]) -> tuple[dict, list[dict]]:
        """Override this to score differently. Return the summary scores (without the ``eval/`` prefix)
        and per-sample scores of the whole eval set, in dataset order; runs on the main process only."""
        return compute_metrics(self.metrics, predictions, references)

    @torch.no_grad()
    def evaluate(self, eval_data: Any = None) -> EvalResult:
        """Generate on the eval set and score it; nothing else (no files, no history, no callbacks).

        Batches come longest prompt first (less padding); every process generates its own batches
        with the adapters merged; the rows are gathered back into dataset order, scored once on the
        main process and the summary is shared. The RNG is seeded with ``config.seed`` for the pass
        and restored afterwards, so evaluating never changes how training continues. During `fit`,
        the loop then records the result (history, predictions file, best checkpoint, ``on_evaluate``).

        Args:
            eval_data: Records (any form `fit` accepts; a ``DatasetDict``: its ``"validation"`` split) to
                evaluate on; default: `fit`'s ``eval_data``.

        Returns:
            An `EvalResult`: ``eval/<metric key>`` for each metric, ``eval/loss`` (teacher-forced,
            token-weighted over the whole set), ``eval/samples``, ``eval/samples_per_s`` and
            ``eval/gen_tokens_per_s``; its ``samples`` hold every prediction. Empty when a
            SIGTERM/SIGINT during `fit` stopped a single-process evaluation (the run then saves).

        Example:
            >>> loop = Loop(model, processor, LoopConfig(output_dir="out"))  # doctest: +SKIP
            >>> loop.evaluate(synthetic_vqa(8))["eval/exact_match"]  # doctest: +SKIP
            0.0
        """
        dataset = self._dataset(eval_split(eval_data)) if eval_data is not None else self.eval_data
        if dataset is None:
            raise ValueError("nothing to evaluate: pass evaluate(eval_data) or fit(train_data, eval_data)")
        try:
            with seeded_rng(self.config.seed):  # every evaluation samples (do_sample) the same way
                self._setup_accelerator()
                rows, totals, seconds = self._eval_pass(dataset)
        except _EvalInterrupted:
            logger.warning("%s received: evaluation at step %d abandoned", self._signals.received, self.state.step)
            self._stop_on_signal()
            return EvalResult()
        rows = gather_in_order(self.accelerator, rows)  # on every process, in dataset order, each sample once
        try:
            scores, per_sample = run_on_main(self.accelerator, lambda: self._score(rows))
        finally:
            for metric in self.metrics.values():  # model-based metrics give their GPU memory back
                if callable(getattr(metric, "offload", None)):
                    metric.offload()
        summary = {f"eval/{k}": float(v) for k, v in scores.items()}
        loss_sum, loss_tokens, new_tokens = totals
        if loss_tokens > 0:
            summary["eval/loss"] = loss_sum / loss_tokens
        summary["eval/samples"] = float(len(rows))
        summary["eval/samples_per_s"] = len(rows) / max(seconds, 1e-9)
        if new_tokens:  # an overridden `generate` may not count its tokens
            summary["eval/gen_tokens_per_s"] = new_tokens / max(seconds, 1e-9)
        return EvalResult(summary, [{**r, "scores": s} for r, s in zip(rows, per_sample)])

    def _eval_pass(self, dataset: Any) -> tuple[list[dict], list[float], float]:
        """This process's rows, and the loss sum, loss tokens and new tokens of all processes and the
        seconds of the slowest one; the model in eval mode with merged adapters."""
        acc = self.accelerator
        if self.optimizer is None and not self._eval_prepared:
            self.model = self.model_wrapped = acc.prepare_model(self.model, evaluation_mode=True)  # onto the device
            self.engine, self._sharded = engine(acc), shards_parameters(acc)
            self._input_device = input_device(self.model, acc.device)
            self._eval_prepared = True
        rows, loss_sum, loss_tokens, new_tokens = [], 0.0, 0, 0
        was_training, t0 = self.model.training, time.perf_counter()
        self.model.eval()
        try:
            model = self.model
            # Loading while the adapters merge; eval_batch_size="auto" is planned with them merged.
            batches = self._eval_loader(dataset) if self.eval_batch_size is not None else None
            with (
                uncompiled_layers(model),
                unsharded_root(model),
                merged_adapters(model, enabled=self.config.merge_lora_for_eval),
            ):
                if batches is None:
                    self._plan_eval_batch_size(dataset)
                    batches = self._eval_loader(dataset)
                for batch in batches:
                    if self._signals.received is not None and acc.num_processes == 1:
                        # Preempted: the checkpoint matters more than this evaluation. (Several processes
                        # finish it: they run different numbers of batches, so cannot agree in between.)
                        raise _EvalInterrupted
                    with acc.autocast():
                        out = self.evaluation_step(batch)
                    if batch.get("padding"):
                        continue  # run only so that every process gathers the weights as often (`_eval_loader`)
                    rows += _eval_rows(batch, out)
                    loss_sum += float(out["loss_sum"])
                    loss_tokens += int(out["loss_tokens"])
                    new_tokens += out["new_tokens"] or 0
        finally:
            self.model.train(was_training)
        seconds = torch.tensor([time.perf_counter() - t0], device=acc.device, dtype=torch.float64)
        totals = torch.tensor([loss_sum, loss_tokens, new_tokens], device=acc.device, dtype=torch.float64)
        return rows, acc.reduce(totals, reduction="sum").tolist(), float(acc.gather(seconds).max())

    def _eval_loader(self, dataset: Any) -> Iterator[dict]:
        """This process's eval batches, on the device: longest prompts first, dealt round-robin to the
        processes. The workers start loading when this is called, not at the first batch, and stay up
        for the next evaluation of the same data (until `fit` ends).

        With several workers each batch is cut into one chunk per worker, so that every batch (the
        first one too) is loaded and processed in parallel; the chunks are joined here, in order.
        """
        cfg, acc = self.config, self.accelerator
        n = min(len(dataset), cfg.eval_max_samples or len(dataset))
        settings = (n, self.eval_batch_size, cfg.num_workers, cfg.eval_loss, acc.process_index, acc.num_processes)
        if self._eval_plan is None or self._eval_plan[0] is not dataset or self._eval_plan[1] != settings:
            model_config = getattr(self.model, "config", None)
            image_tokens = getattr(model_config, "image_seq_length", None) or 576
            order = longest_prompts_first(dataset, n, self.train_collator.tokenizer, image_tokens)
            shard = (list(range(n)), self.eval_batch_size, acc.process_index, acc.num_processes)
            real = len(shard_batches(*shard))
            # Sharded weights: every forward is a collective, so every process runs as many batches (the
            # repeats that make up the count are dropped in `_eval_pass`).
            batches = shard_batches(*shard, equal=self._sharded)
            size = math.ceil(self.eval_batch_size / cfg.num_workers) if cfg.num_workers > 1 else self.eval_batch_size
            chunks = [(k, b[i : i + size]) for k, b in enumerate(batches) for i in range(0, len(b), size)]
            collate = EvalBatchCollator(self.eval_collator, self.train_collator if cfg.eval_loss else None)
            loader = DataLoader(
                Indexed(dataset, order),
                batch_sampler=[chunk for _, chunk in chunks],
                collate_fn=collate,
                num_workers=cfg.num_workers,
                pin_memory=acc.device.type == "cuda",
                persistent_workers=cfg.num_workers > 0,  # no start-up cost from the second evaluation on
            )
            self._eval_plan = (dataset, settings, loader, [k for k, _ in chunks], collate, real)
        _, _, loader, chunk_batches, collate, real = self._eval_plan
        parts = zip(chunk_batches, loader)  # starts the workers loading now

        def joined() -> Iterator[dict]:
            # Chunks go to the device (from pinned memory, without waiting) before they are joined.
            for k, group in itertools.groupby(parts, key=lambda part: part[0]):
                collated = [_batch_on(batch, self._device()) for _, batch in group]
                batch = collated[0] if len(collated) == 1 else collate.merge(collated)
                yield {**batch, "padding": True} if k >= real else batch

        return joined()

    def _score(self, rows: list[dict]) -> tuple[dict, list[dict]]:
        if not rows:
            logger.warning("evaluation produced no predictions (every eval sample was skipped)")
            return {}, []
        return self.compute_metrics([r["prediction"] for r in rows], [r["references"] for r in rows])

    # ------------------------------------------------------------------ what fit does with an evaluation
    def _evaluate_and_record(self) -> None:
        """Evaluate fit's eval set, then record it: history, predictions files (JSONL and HTML page),
        best checkpoint, ``on_evaluate`` and the log."""
        result = self.evaluate()
        if not result:
            return  # abandoned for a signal: nothing recorded
        state, summary = self.state, dict(result)
        rows = [{k: v for k, v in r.items() if k != "index"} for r in result.samples]  # the file's rows
        if self.accelerator.is_main_process:
            stem = os.path.join(self.config.output_dir, "predictions", f"step_{state.step:06d}")
            write_predictions(stem + ".jsonl", rows)
            if self.config.predictions_html:  # before on_evaluate: a tracker callback may upload the page
                write_predictions_page(
                    stem + ".html", result.samples, summary, step=state.step, thumbnails=self._thumbnails
                )
        first = zip(rows[: self.callback_samples], result.samples)
        samples = [{**row, "image": _image(self.eval_data, r)} for row, r in first]
        state.history.append({"step": state.step, **summary})
        improved = self._update_best(summary)
        dispatch(self.callbacks, "on_evaluate", self, metrics=summary, samples=samples)
        self._log({"step": state.step, **summary})
        if improved:
            # After on_evaluate, so the callback states saved with it (early stopping) include this eval.
            self._save(best=True)

    def _update_best(self, summary: dict) -> bool:
        """Record ``metric_for_best`` of this evaluation if it beats the best so far; return whether it did."""
        key = self.config.metric_for_best
        if key is None:
            return False
        if key not in summary:
            raise KeyError(f"metric_for_best={key!r} is not among the reported metrics {sorted(summary)}")
        if not is_improvement(summary[key], self.state.best_metric, self.config.resolved_greater_is_better()):
            return False
        self.state.best_metric = summary[key]
        return True

    def _evaluated_at(self, step: int) -> bool:
        return bool(self.state.history) and self.state.history[-1]["step"] == step


def _eval_rows(batch: dict, out: dict) -> list[dict]:
    """One row per generated sample of an eval batch: ``index, id, prompt, prediction, references``."""
    gen = batch["gen"]
    if len(out["predictions"]) != len(gen["ids"]):
        raise ValueError(
            f"evaluation_step returned {len(out['predictions'])} predictions for a batch of "
            f"{len(gen['ids'])} samples {gen['ids']}"
        )
    keys = ("index", "id", "prompt", "prediction", "references")
    columns = (batch["indices"], gen["ids"], gen["prompts"], out["predictions"], gen["references"])
    return [dict(zip(keys, values)) for values in zip(*columns)]


def _batch_on(batch: dict, device: torch.device) -> dict:
    """An eval batch (nested dicts of tensors) with its tensors on ``device`` (`_on`)."""
    return {k: _batch_on(v, device) if isinstance(v, dict) else _on(v, device) for k, v in batch.items()}


def _on(value: Any, device: torch.device) -> Any:
    """``value`` on ``device`` if it is a tensor (copied without waiting), else as it is."""
    return value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value


def _image(dataset: Any, row: dict) -> Any:
    """The image(s) of an evaluated row's record, for ``on_evaluate``; None when it has none or they
    cannot be read any more (read during the evaluation, gone since: the callback gets no image)."""
    try:
        record = dataset[row["index"]]
    except BadSampleError as err:
        logger.warning("%s; on_evaluate gets this sample without its image", err)
        return None
    return None if isinstance(record, SkippedSample) else record.get("image")


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
