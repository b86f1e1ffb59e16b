"""`LoopConfig`: every setting of a training run in one typed dataclass.

The docstring under each field is its documentation and its CLI help (``llava-loop train
--help``), so keep it complete (units, sentinels). `__post_init__` validates and normalizes every field.

Example:
    >>> cfg = LoopConfig(learning_rate=1e-4, metric_for_best="rougeL")
    >>> cfg.metric_for_best
    'eval/rougeL'
"""

import dataclasses
import difflib
import functools
import inspect
import json
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docstring_parser
import torch
import yaml

from .data import check_on_bad_sample

_POSITIVE = ("grad_accum_steps", "lora_alpha", "effective_batch_size")
_POSITIVE += ("max_new_tokens", "num_beams", "max_length", "save_total_limit")
_POSITIVE += ("eval_max_samples",)
_NON_NEGATIVE = ("max_steps", "weight_decay", "warmup_steps", "max_grad_norm")
_NON_NEGATIVE += ("lora_r", "eval_steps", "save_steps", "early_stopping_patience")
_NON_NEGATIVE += ("log_steps", "num_workers", "max_bad_steps", "seed")
QUANTIZATIONS = ("4bit", "8bit")
"""Values of `LoopConfig.quantization` (besides None)."""
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit")
"""Values of `LoopConfig.optimizer`."""


@dataclass
class LoopConfig:
    """Settings of one finetuning run: schedule, optimizer, LoRA, eval, checkpoints.

    Build it in code, from a YAML/JSON file (`from_file`) or from the ``llava-loop train``
    flags (the CLI generates one flag per field from these docstrings). Invalid values raise `ValueError` naming the field, the value and
    what is allowed. A *step* is an optimizer step (`grad_accum_steps` batches).

    Example:
        >>> cfg = LoopConfig.from_dict({"num_epochs": 3, "lora_r": 8})
        >>> cfg.save("run.yaml")  # doctest: +SKIP
        >>> LoopConfig.from_file("run.yaml") == cfg  # doctest: +SKIP
        True
    """

    output_dir: str = "llava_loop_output"
    """Directory for checkpoints, logs and the saved config."""
    num_epochs: float = 1.0
    """Passes over the training data (> 0, fractions allowed); unused if max_steps>0."""
    max_steps: int = 0
    """Total optimizer steps; 0 = derived from num_epochs; > 0 overrides num_epochs."""
    batch_size: int | str = 4
    """Training samples per device per micro-step (one forward/backward); "auto" = the largest that fits
    on the GPU, found before training on the longest training samples, within 88% of the memory this
    process may use (docs/training.md, "Automatic batch size"); 4 on the CPU."""
    eval_batch_size: int | str = 16
    """Evaluation samples per device per batch (generation is faster in larger batches; lower it
    if evaluation runs out of memory); "auto" = the largest that fits, found like batch_size; 16 on the CPU."""
    grad_accum_steps: int = 1
    """Micro-steps (batches) accumulated into one optimizer step."""
    effective_batch_size: int | None = None
    """Samples per optimizer step, all processes together; sets grad_accum_steps to effective_batch_size /
    (batch_size x processes), which must divide (with batch_size="auto" the micro-batch is the largest that
    fits and divides it); None = batch_size x grad_accum_steps x processes."""
    learning_rate: float = 2e-4
    """Peak learning rate (> 0) of the trained language-model / LoRA parameters."""
    projector_lr: float | None = None
    """Peak learning rate of the multimodal projector; None = learning_rate."""
    weight_decay: float = 0.0
    """AdamW weight decay (>= 0)."""
    lr_scheduler: str = "cosine"
    """Learning-rate schedule: any transformers.SchedulerType value ("cosine", ...)."""
    warmup_ratio: float = 0.03
    """Fraction of the total optimizer steps spent warming up, in [0, 1)."""
    warmup_steps: int = 0
    """Warmup length in optimizer steps; > 0 overrides warmup_ratio."""
    max_grad_norm: float = 1.0
    """Gradient-norm clipping threshold; 0 = no clipping."""
    precision: str = "auto"
    """Training precision: "auto", "fp32", "bf16" or "fp16"; auto = bf16 on a GPU that
    supports it, else fp32."""
    gradient_checkpointing: bool | int | str = False
    """Recompute activations during backward to save memory (slower steps): True = every decoder
    layer; an int n = the first n decoder layers of the language model only (the others keep their
    activations: faster, more memory); "auto" = as few layers as a probe step measures are needed to
    stay under 88% of the GPU memory this process may use (torch.cuda.set_per_process_memory_fraction
    lowers it), every layer on the CPU; False or 0 = off."""
    compile: bool | None = None
    """torch.compile every decoder layer of the language model and of the vision encoder (the first
    steps are slower while it compiles; lengths may vary); None = on when training on a GPU, off on
    the CPU. Evaluation runs the layers uncompiled."""
    labelled_logits_only: bool = True
    """Compute the LM head and the cross-entropy only at labelled positions (same loss, less time
    and memory than batch x length x vocab logits). Only for the default compute_loss: an
    overridden one gets the full logits."""
    optimizer: str = "adamw"
    """Optimizer of the default configure_optimizers: "adamw" (torch AdamW; states in the parameters'
    dtype), "adamw_8bit" (bitsandbytes 8-bit AdamW: states 1 byte per value instead of 4, on the GPU) or
    "paged_adamw_8bit" (the same in paged memory, which spills to the CPU under memory pressure); the
    8-bit ones need bitsandbytes (pip install 'llava_loop[quantization]')."""
    fused_adamw: bool | None = None
    """Use the fused AdamW kernel for optimizer="adamw"; None = on a GPU."""
    quantization: str | None = None
    """How the base model's weights are quantized, as load_model(quantization=...) loads them: "4bit"
    (QLoRA: NF4, double quantization, bf16 compute) or "8bit" (LLM.int8), the language model's linear
    layers only (vision tower, projector, embeddings and lm_head stay 16-bit), LoRA required; None = not
    quantized (a quantized model given to the loop sets it). The loop refuses a model that does not match;
    the CLI loads the model with it; estimate_memory plans with it."""
    lora_r: int = 16
    """LoRA rank; 0 = full finetune without LoRA."""
    lora_alpha: int = 32
    """LoRA scale numerator: adapter updates are scaled by lora_alpha / lora_r."""
    lora_dropout: float = 0.05
    """Dropout probability on the LoRA input, in [0, 1)."""
    lora_target_modules: str | list[str] | None = None
    """Modules that get LoRA: a list of module-name suffixes, or one full-match regex
    string (config files only); None = every linear layer of the language model only."""
    freeze_vision_tower: bool = True
    """Keep the vision encoder frozen."""
    train_projector: bool = True
    """Fully train the multimodal projector (no LoRA on it)."""
    max_length: int | None = None
    """Tokens per training sample, image tokens included; None = no truncation."""
    eval_steps: int = 0
    """Optimizer steps between evaluations; 0 = no periodic eval (fit still evaluates
    once at the end when eval data is given)."""
    eval_each_epoch: bool = False
    """Also evaluate at the end of every epoch."""
    eval_before_training: bool = False
    """Evaluate once before the first step (a step-0 baseline in metrics.jsonl)."""
    eval_loss: bool = True
    """Also compute the teacher-forced eval loss (eval/loss) on the eval set; False saves one forward per eval batch."""
    predictions_html: bool = True
    """Also write each evaluation's predictions as a self-contained HTML page beside its JSONL file
    (predictions/step_XXXXXX.html: thumbnails, prompt, prediction, references, per-sample scores;
    sortable). Costs about 8 KB per distinct eval photo per page, and once per fit loading every
    eval image again for its thumbnail (main process)."""
    save_steps: int = 0
    """Optimizer steps between checkpoints; 0 = only the final checkpoint."""
    save_total_limit: int | None = None
    """Most checkpoints kept on disk, oldest deleted first; None = keep all. The best
    checkpoint (by metric_for_best) is never deleted."""
    metric_for_best: str | None = None
    """Reported key that picks the best checkpoint, e.g. "eval/loss", "eval/rougeL"; a
    key without "/" gets "eval/" prepended ("rougeL" -> "eval/rougeL"); None = none."""
    greater_is_better: bool | None = None
    """Whether a larger metric_for_best is better; None = inferred from its name (loss,
    perplexity, ppl, wer, cer, error: lower is better; anything else: higher)."""
    early_stopping_patience: int = 0
    """Evaluations without improvement of metric_for_best before stopping; 0 = off.
    Requires metric_for_best."""
    log_steps: int = 10
    """Optimizer steps between training-metric logs; 0 = no periodic logging."""
    seed: int = 42
    """Seed for the Python, NumPy and torch RNGs and data shuffling, in [0, 2**32)."""
    resume_from: str | None = None
    """Checkpoint to resume from: "latest" (newest complete one in output_dir), "auto"
    (latest if output_dir has a checkpoint, else start fresh: for requeued jobs) or a
    checkpoint path; None = start fresh, refused if output_dir holds checkpoints."""
    resume_with_new_data: bool = False
    """Resume although the training data differs from the checkpoint's (on purpose, e.g. a
    second training phase): weights, optimizer and schedule continue, and the new data is
    read from its start. Without it such a resume is refused."""
    overwrite_output_dir: bool = False
    """Start fresh in an output_dir that holds an earlier run, deleting its checkpoints,
    predictions, metrics.jsonl and curves.png. Only with resume_from=None."""
    max_new_tokens: int = 64
    """Maximum tokens generated per eval sample."""
    num_beams: int = 1
    """Beams for generation; 1 = no beam search. Combines with do_sample."""
    do_sample: bool = False
    """Sample during generation instead of greedy / beam decoding."""
    temperature: float = 1.0
    """Sampling temperature (> 0); used only with do_sample."""
    top_p: float = 1.0
    """Nucleus-sampling probability mass in (0, 1]; 1 = off; only with do_sample."""
    generation_cache: str | None = None
    """KV cache of eval generation: "static" (preallocated; transformers compiles the decoding step
    on a GPU) or "dynamic"; None = static on a GPU (dynamic there for weights in another dtype than
    the precision's and for cross-attention models such as Mllama), dynamic on the CPU."""
    merge_lora_for_eval: bool = True
    """Merge LoRA adapters before generating and unmerge after (faster eval)."""
    eval_max_samples: int | None = None
    """Cap on eval samples per evaluation (the first N); None = all."""
    num_workers: int = 0
    """DataLoader worker processes; 0 = load data in the main process. They stay up from one epoch
    (and evaluation) to the next and end with fit."""
    shuffle: bool = True
    """Shuffle the training data every epoch."""
    on_bad_sample: str = "raise"
    """Sample that cannot be loaded or tokenized: "raise" or "skip" (with a warning)."""
    allow_external_images: bool = False
    """Accept image paths that lead outside the image folder (../x.jpg, absolute or ~ paths,
    symlinks out); by default such a sample is a bad sample. Only for datasets you trust."""
    max_bad_steps: int = 3
    """Consecutive non-finite-loss steps tolerated (each skipped with a warning) before
    stopping with an error; 0 = stop at the first."""
    report_to: list[str] = field(default_factory=list)
    """Experiment trackers besides metrics.jsonl and the console (always on): "tensorboard", "wandb",
    "mlflow", "trackio", "aim" (pip install 'llava_loop[trackers]'), another Accelerate tracker's name, or
    "all" (every one installed); [] or "none" = none. A tracker that fails is warned about once and
    dropped; training goes on. See docs/logging.md."""
    tracker_project: str = "llava_loop"
    """Project the trackers file the run under (wandb and trackio project, MLflow and Aim experiment)."""
    run_name: str | None = None
    """The run's name in the trackers (TensorBoard: its folder); None = the name of output_dir's folder."""
    tracker_init_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Extra init arguments per tracker of report_to, e.g. {"wandb": {"tags": ["lora"], "mode": "offline"}}:
    for wandb.init, trackio.init, aim.Run, TensorBoard's SummaryWriter, Accelerate's MLflowTracker; plain
    data only (str, number, bool, None, list, dict)."""
    peak_tflops: float | None = None
    """Dense bf16/fp16 peak TFLOP/s of one GPU, for train/mfu; None = looked up by the GPU's name (see
    docs/logging.md); train/mfu is not logged on the CPU or an unknown GPU."""
    handle_signals: bool = True
    """On SIGTERM/SIGINT finish the current step, save a checkpoint and exit cleanly."""

    def __post_init__(self) -> None:
        if isinstance(self.report_to, str):
            self.report_to = [self.report_to]  # "wandb" -> ["wandb"]
        if isinstance(self.report_to, list) and [str(t).lower() for t in self.report_to] in (["none"], ["null"]):
            self.report_to = []  # `report_to: none` in YAML, `--report_to none` on the CLI
        hints = _type_hints(type(self))
        for name, annotation in hints.items():
            setattr(self, name, _coerce(name, getattr(self, name), annotation))

        for name in ("batch_size", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, str):
                _check_choice(name, value, ("auto",))
            elif value <= 0:
                _fail(name, value, 'an int > 0 or "auto"')
        if self.effective_batch_size is not None and self.grad_accum_steps != 1:
            raise ValueError(
                f"effective_batch_size={self.effective_batch_size} sets grad_accum_steps, but grad_accum_steps="
                f"{self.grad_accum_steps} is set too: set one of them"
            )
        for name in _POSITIVE:
            value = getattr(self, name)
            if value is not None and value <= 0:
                or_none = " or None" if type(None) in typing.get_args(hints[name]) else ""
                _fail(name, value, f"an int > 0{or_none}")
        for name in _NON_NEGATIVE:
            if not getattr(self, name) >= 0:  # `not >=` also catches NaN
                _fail(name, getattr(self, name), "a number >= 0")
        for name in ("num_epochs", "learning_rate", "projector_lr", "temperature"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                _fail(name, value, "a finite number > 0")
        for name in ("warmup_ratio", "lora_dropout"):
            if not 0 <= getattr(self, name) < 1:
                _fail(name, getattr(self, name), "a number in [0, 1)")
        if not 0 < self.top_p <= 1:
            _fail("top_p", self.top_p, "a number in (0, 1]")
        if self.seed >= 2**32:
            _fail("seed", self.seed, "an int in [0, 2**32)")

        _check_choice("precision", self.precision, ("auto", "fp32", "bf16", "fp16"))
        checkpointing = self.gradient_checkpointing
        if isinstance(checkpointing, str):
            _check_choice("gradient_checkpointing", checkpointing, ("auto",))
        elif not isinstance(checkpointing, bool) and checkpointing < 0:
            _fail("gradient_checkpointing", checkpointing, 'True, False, "auto" or a number of layers >= 0')
        if self.quantization is not None:
            _check_choice("quantization", self.quantization, QUANTIZATIONS)
            if self.lora_r == 0:
                _fail(
                    "lora_r", self.lora_r, f"> 0 with quantization={self.quantization!r} (QLoRA trains adapters only)"
                )
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        if self.generation_cache is not None:
            _check_choice("generation_cache", self.generation_cache, ("static", "dynamic"))
        check_on_bad_sample(self.on_bad_sample)
        _check_choice("lr_scheduler", self.lr_scheduler, _scheduler_names())
        for tracker in self.report_to:
            _check_choice("report_to", tracker, _tracker_names())
        for name in ("tracker_project", "run_name"):
            if getattr(self, name) is not None and not getattr(self, name).strip():
                _fail(name, getattr(self, name), "a non-empty name")
        _check_tracker_init_kwargs(self.tracker_init_kwargs, self.report_to)
        if self.peak_tflops is not None and not (math.isfinite(self.peak_tflops) and self.peak_tflops > 0):
            _fail("peak_tflops", self.peak_tflops, "a finite number > 0 or None")
        targets = self.lora_target_modules
        if targets is not None and not (targets and all(targets)):
            _fail("lora_target_modules", targets, "None, a regex or module names")
        if targets is not None and self.lora_r == 0:
            _fail("lora_target_modules", targets, "None when lora_r=0 (no LoRA)")

        if self.overwrite_output_dir and self.resume_from is not None:
            raise ValueError(
                f"overwrite_output_dir=True deletes the checkpoints that resume_from={self.resume_from!r} "
                "would resume; set one of them"
            )
        if self.metric_for_best is not None:
            if not self.metric_for_best.strip("/ "):
                _fail("metric_for_best", self.metric_for_best, 'a key like "eval/loss"')
            if "/" not in self.metric_for_best:
                self.metric_for_best = f"eval/{self.metric_for_best}"
        if self.early_stopping_patience > 0 and self.metric_for_best is None:
            raise ValueError(
                f"early_stopping_patience={self.early_stopping_patience} requires "
                'metric_for_best (e.g. "eval/loss"); set it, or set '
                "early_stopping_patience=0 to disable early stopping."
            )

    def resolved_precision(self, device: torch.device | str) -> str:
        """Return the precision to train in on `device`: "fp32", "bf16" or "fp16".

        "auto" is bf16 on a CUDA GPU that supports it, else fp32.

        Raises:
            ValueError: for fp16 on a CPU, or bf16 on a GPU without bf16 support.

        Example:
            >>> LoopConfig().resolved_precision(torch.device("cpu"))
            'fp32'
        """
        device = torch.device(device)
        cuda = device.type == "cuda"
        if self.precision == "auto":
            return "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
        if self.precision == "fp16" and device.type == "cpu":
            raise ValueError(
                'precision="fp16" is not supported on the CPU: accelerate applies no '
                "fp16 autocast or loss scaling there (the run would silently be fp32) "
                'and CPUs lack fast fp16 kernels. Use "bf16" (CPU autocast supports '
                'it, no loss scaling needed) or "fp32".'
            )
        if self.precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
            raise ValueError(f'precision="bf16" but {device} has no bfloat16 support; use "fp16" or "fp32".')
        return self.precision

    def check_eval_data(self, given: bool) -> None:
        """Raise if a setting needs eval data and none is given (`Loop.fit` and the CLI call this first).

        Raises:
            ValueError: an eval cadence or ``metric_for_best`` is set but there is no eval data.
        """
        if given:
            return
        if self.eval_steps or self.eval_each_epoch or self.eval_before_training:
            raise ValueError(
                "eval_steps/eval_each_epoch/eval_before_training are set but there is no eval data; pass "
                "eval_data to fit() (CLI: --data.eval), or set eval_steps=0, eval_each_epoch=False, "
                "eval_before_training=False"
            )
        if self.metric_for_best is not None:
            raise ValueError(
                f"metric_for_best={self.metric_for_best!r} needs eval data: pass eval_data to fit() "
                "(CLI: --data.eval), or set metric_for_best=None"
            )

    def resolved_greater_is_better(self) -> bool:
        """Return greater_is_better, or infer it from metric_for_best when None.

        Raises:
            ValueError: if metric_for_best is None (no metric to compare).
        """
        if self.metric_for_best is None:
            raise ValueError("metric_for_best is None: there is no best metric.")
        if self.greater_is_better is not None:
            return self.greater_is_better
        from .metrics import greater_is_better

        return greater_is_better(self.metric_for_best)

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a plain, JSON/YAML-serializable dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LoopConfig":
        """Build a config from a mapping; missing keys keep their defaults.

        Raises:
            TypeError: if `d` is not a mapping.
            ValueError: on unknown keys (with close-match suggestions) or bad values.
        """
        if not isinstance(d, Mapping):
            raise TypeError(f"Expected a mapping of field names, got {type(d).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [key for key in d if key not in names]
        if unknown:
            close = {k: difflib.get_close_matches(str(k), names, n=3) for k in unknown}
            hints = [f"{k!r} (did you mean {c}?)" if c else repr(k) for k, c in close.items()]
            raise ValueError(f"Unknown {cls.__name__} keys: {', '.join(hints)}.")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        """Write the config as YAML (.yaml/.yml) or JSON (.json), creating parents."""
        path = Path(path)
        if path.suffix.lower() in (".yaml", ".yml"):
            text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        elif path.suffix.lower() == ".json":
            text = json.dumps(self.to_dict(), indent=2) + "\n"
        else:
            raise ValueError(f"Cannot save config to {path}: use .yaml, .yml or .json.")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")

    @classmethod
    def from_file(cls, path: str | Path) -> "LoopConfig":
        """Load a YAML or JSON (by .json extension) config; an empty file = defaults.

        Raises:
            FileNotFoundError: if `path` does not exist.
            ValueError: naming the file, on parse errors, unknown keys or bad values.
        """
        path = Path(path)
        text = path.read_text(encoding="utf-8")
        try:
            is_json = path.suffix.lower() == ".json"
            data = json.loads(text) if is_json else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as err:
            raise ValueError(f"Could not parse config file {path}: {err}") from err
        try:
            return cls.from_dict({} if data is None else data)
        except (TypeError, ValueError) as err:
            raise ValueError(f"Invalid config file {path}: {err}") from err

    @classmethod
    def field_docs(cls) -> dict[str, str]:
        """Return {field name: docstring}; "" where the source is unavailable."""
        return dict(_field_docs(cls))

    @classmethod
    def markdown_reference(cls) -> str:
        """Return a Markdown table of every field (name, type, default, docstring) for docs/config.md."""
        docs, hints = _field_docs(cls), _type_hints(cls)
        defaults = cls().to_dict()
        rows = ["| field | type | default | meaning |", "|---|---|---|---|"]
        for name, annotation in hints.items():
            doc = " ".join(docs.get(name, "").split()).replace("|", "\\|")
            rows.append(f"| `{name}` | `{_type_name(annotation)}` | `{defaults[name]!r}` | {doc} |")
        return "\n".join(rows) + "\n"


def _fail(name: str, value: Any, allowed: str) -> typing.NoReturn:
    raise ValueError(f"{name}={value!r} is invalid: expected {allowed}.")


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        close = difflib.get_close_matches(value, choices, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        _fail(name, value, f"one of {', '.join(map(repr, choices))}{hint}")


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    """Return `value` as `annotation` (int or number string -> float, tuple -> list), or raise.

    Strict on purpose, not jsonargparse's `parse_object`: that accepts None for every field and reads
    strings as YAML ("yes" -> True, "[a, b]" -> a list); docs/config.md says why.
    """
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    members = typing.get_args(annotation) if union else (annotation,)
    for member in members:
        if member is type(None) and value is None:
            return None
        if isinstance(value, bool) and member is not bool:
            continue  # bool is an int subclass; True is no learning rate
        if member in (bool, int, str) and isinstance(value, member):
            return value
        if member is float and isinstance(value, int | float):
            return float(value)
        if member is float and isinstance(value, str):  # YAML 1.1 reads 2e-4 as str
            try:
                return float(value)
            except ValueError:
                continue
        if typing.get_origin(member) is dict and isinstance(value, Mapping):
            return dict(value)  # its contents are checked by the field's own validation
        is_list = typing.get_origin(member) is list and isinstance(value, list | tuple)
        if is_list and all(isinstance(item, str) for item in value):
            return list(value)
    expected = " or ".join(map(_type_name, members))
    _fail(name, value, f"{expected} (got {type(value).__name__})")


def _type_name(annotation: Any) -> str:
    if annotation is type(None):
        return "None"
    return str(annotation) if typing.get_origin(annotation) else annotation.__name__


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    """Resolved field annotations, in field order."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


@functools.cache
def _field_docs(cls: type) -> dict[str, str]:
    """Field docstrings of `cls` and its bases ("" where the source is unavailable), read by docstring_parser."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # docstring_parser reads one class, not its bases
        try:
            params = docstring_parser.parse_from_object(klass).params if dataclasses.is_dataclass(klass) else []
        except (OSError, TypeError, SyntaxError):
            continue  # no source: a class made by exec(), in a REPL, or shipped without .py files
        for param in params:
            if param.args[0] == "attribute" and param.description:
                docs[param.arg_name] = inspect.cleandoc(param.description)
    return {f.name: docs.get(f.name, "") for f in dataclasses.fields(cls)}


@functools.cache
def _scheduler_names() -> tuple[str, ...]:
    from transformers import SchedulerType  # lazy: importing transformers takes seconds

    return tuple(s.value for s in SchedulerType)


def _tracker_names() -> tuple[str, ...]:
    """Accelerate's tracker names, "all" and those registered with accelerate's `register_tracker_class`."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS
    from accelerate.utils import LoggerType

    return tuple(dict.fromkeys([*(t.value for t in LoggerType), *LOGGER_TYPE_TO_CLASS]))


def _check_tracker_init_kwargs(kwargs: dict, report_to: list[str]) -> None:
    """tracker_init_kwargs: {tracker of report_to: {argument name: plain data}}."""
    for name, arguments in kwargs.items():
        if name not in report_to and "all" not in report_to:
            _fail("tracker_init_kwargs", kwargs, f"keys among the trackers of report_to {report_to} (got {name!r})")
        if not isinstance(arguments, Mapping) or not all(isinstance(k, str) for k in arguments):
            _fail("tracker_init_kwargs", kwargs, f"a dict of argument names for {name!r}")
        for key, value in arguments.items():
            if not _plain_data(value):
                raise ValueError(
                    f"tracker_init_kwargs[{name!r}][{key!r}]={value!r} is invalid: expected plain data (str, number, "
                    "bool, None, list, dict), which the saved config.yaml can hold; e.g. wandb settings as a dict"
                )


def _plain_data(value: Any) -> bool:
    if value is None or isinstance(value, bool | int | float | str):
        return True
    if isinstance(value, list | tuple):
        return all(_plain_data(v) for v in value)
    return isinstance(value, Mapping) and all(isinstance(k, str) and _plain_data(v) for k, v in value.items())
