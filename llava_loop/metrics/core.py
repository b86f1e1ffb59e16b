"""The metric protocol, the registry of built-ins, and `compute_metrics`, the one call the loop makes.

A metric is a `Metric`, whose one `score` call returns the summary and the per-sample scores, or
any callable ``(predictions, references) -> dict[str, float]`` (a summary only). The loop calls
`resolve_metrics` and `check_metrics` when it is built and `compute_metrics` at every evaluation.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import math
import numbers
import re
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

logger = logging.getLogger(__name__)

Predictions = Sequence[str]
References = Sequence[Sequence[str]]
MetricFn = Callable[[Predictions, References], dict[str, float]]


# --------------------------------------------------------------------------- protocol


class Scores(NamedTuple):
    """What `Metric.score` returns: the scores of one evaluation set.

    Attributes:
        summary: One float per key for the whole set, e.g. ``{"exact_match": 0.5}``.
        per_sample: One list per key with one float per sample, written next to each prediction;
            ``{}`` when a per-sample score is not meaningful (corpus BLEU).

    Example:
        >>> Scores.mean_of({"hit": [1.0, 0.0, 1.0, 1.0]})
        Scores(summary={'hit': 0.75}, per_sample={'hit': [1.0, 0.0, 1.0, 1.0]})
    """

    summary: dict[str, float]
    per_sample: dict[str, list[float]]

    @classmethod
    def mean_of(cls, per_sample: Mapping[str, Sequence[float]]) -> Scores:
        """Per-sample scores, with their means (`math.fsum` / count) as the summary."""
        columns = {key: list(values) for key, values in per_sample.items()}
        return cls({key: math.fsum(values) / len(values) for key, values in columns.items()}, columns)


class Metric:
    """Base class of metrics: one `score` call returns summary and per-sample scores.

    Subclasses set `name` (and `keys`, the summary keys they report, where known in advance:
    `check_metrics` reads them) and implement `score`. A metric without per-sample scores may
    implement `__call__` (the summary) instead. Metrics that hold a model override `check`
    (is it there?) and `offload` (give the GPU memory back between evaluations).

    Example:
        >>> class AnswerWords(Metric):
        ...     name = "answer_words"
        ...
        ...     def score(self, predictions, references):
        ...         return Scores.mean_of({"answer_words": [float(len(p.split())) for p in predictions]})
        >>> AnswerWords()(["a b", "c d e f"], [["x"], ["y"]])
        {'answer_words': 3.0}
        >>> AnswerWords().score(["a b", "c d e f"], [["x"], ["y"]]).per_sample
        {'answer_words': [2.0, 4.0]}
    """

    name: str = "metric"
    keys: tuple[str, ...] | None = None

    def score(self, predictions: Predictions, references: References) -> Scores:
        """Scores the whole evaluation set once.

        Args:
            predictions: One generated string per sample.
            references: One list of acceptable references per sample.

        Returns:
            `Scores`: the summary and the per-sample scores. By default the summary of
            `__call__` and no per-sample scores.
        """
        if type(self).__call__ is Metric.__call__:
            raise NotImplementedError(f"{type(self).__name__} must implement score (or __call__)")
        return Scores(self(predictions, references), {})

    def __call__(self, predictions: Predictions, references: References) -> dict[str, float]:
        """The summary scores of the whole set, e.g. ``{"exact_match": 0.5}`` (``score(...).summary``)."""
        if type(self).score is Metric.score:
            raise NotImplementedError(f"{type(self).__name__} must implement score (or __call__)")
        return self.score(predictions, references).summary

    def offload(self) -> None:
        """Moves any model off the GPU until the next call (no-op by default)."""

    def check(self) -> None:
        """Raises now, cheaply and before any training, if this metric cannot run later.

        No-op by default; metrics that load a model check that it is on disk or reachable
        (nothing is loaded). `Loop` and the CLI call it before training starts.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _check_inputs(predictions: Predictions, references: References) -> None:
    """Raises if predictions/references are not ``list[str]`` / ``list[list[str]]`` of one length."""
    if isinstance(predictions, str) or not isinstance(predictions, Sequence):
        raise TypeError(f"predictions must be a list of strings, got {type(predictions).__name__}")
    if isinstance(references, str) or not isinstance(references, Sequence):
        raise TypeError(f"references must be a list of lists of strings, got {type(references).__name__}")
    if len(predictions) != len(references):
        raise ValueError(
            f"got {len(predictions)} predictions but {len(references)} reference lists; "
            "pass one list of references per prediction"
        )
    if not predictions:
        raise ValueError("no predictions to score: the evaluation set is empty")
    for i, (pred, refs) in enumerate(zip(predictions, references)):
        if not isinstance(pred, str):
            raise TypeError(f"prediction {i} must be a string, got {type(pred).__name__}")
        if isinstance(refs, str) or not isinstance(refs, Sequence):
            raise TypeError(
                f"references[{i}] must be a list of strings, got {type(refs).__name__} "
                f"({refs!r}); wrap a single reference as [reference]"
            )
        if not refs:
            raise ValueError(f"sample {i} has no references; every prediction needs at least one")
        if not all(isinstance(r, str) for r in refs):
            raise TypeError(f"references[{i}] must contain only strings, got {refs!r}")


# --------------------------------------------------------------------------- evaluate modules


def _as_float(value: Any) -> float | None:
    """``value`` as a float if it is a real number (Python, NumPy or 0-d array/tensor)."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def _takes_reference_lists(module: Any) -> bool:
    """Whether an `evaluate` module accepts a list of references per prediction."""
    import datasets

    features = module.features
    feature_sets = features if isinstance(features, list) else [features]
    return any(
        "references" in fs and not isinstance(fs["references"], datasets.Value) for fs in feature_sets if fs is not None
    )


class EvaluateMetric(Metric):
    """Adapter for a loaded Hugging Face `evaluate` module (a summary, no per-sample scores).

    Calls ``module.compute(predictions=..., references=..., **compute_kwargs)`` and keeps
    the numeric scalars as floats. Nested dicts are flattened one level
    (``{"a": {"b": 1}}`` → ``{"a_b": 1.0}``); lists, strings and deeper values are
    dropped. References are passed as lists per prediction when the module's
    features accept that, else as one string per prediction (an error if a sample
    has several references). The name is ``module.name``.

    Args:
        module: The result of ``evaluate.load(...)``.
        **compute_kwargs: Extra keyword arguments for ``module.compute``.

    Example:
        >>> module = evaluate.load("/path/to/my_metric.py")  # doctest: +SKIP
        >>> EvaluateMetric(module)(["a"], [["a"]])  # doctest: +SKIP
        {'accuracy': 1.0}
    """

    def __init__(self, module: Any, **compute_kwargs: Any) -> None:
        if not callable(getattr(module, "compute", None)):
            raise TypeError(f"EvaluateMetric needs an evaluate module (from evaluate.load), got {module!r}")
        self.module = module  # the loaded evaluate module
        self.compute_kwargs = compute_kwargs  # extra arguments of module.compute
        self.name = module.name

    def __repr__(self) -> str:
        return f"EvaluateMetric({self.name!r})"

    def __call__(self, predictions: Predictions, references: References) -> dict[str, float]:
        _check_inputs(predictions, references)
        refs: list[Any] = [list(r) for r in references]
        if not _takes_reference_lists(self.module):
            for i, r in enumerate(refs):
                if len(r) != 1:
                    raise ValueError(
                        f"evaluate module {self.name!r} takes one reference per prediction, "
                        f"but sample {i} has {len(r)}: {r!r}"
                    )
            refs = [r[0] for r in refs]
        result = self.module.compute(predictions=list(predictions), references=refs, **self.compute_kwargs)
        if not isinstance(result, Mapping):
            raise TypeError(
                f"evaluate module {self.name!r} returned {type(result).__name__}, not a dict "
                "(evaluate returns None on non-main processes when loaded with num_process > 1)"
            )
        out: dict[str, float] = {}
        for key, value in result.items():
            if isinstance(value, Mapping):
                for sub_key, sub_value in value.items():
                    if (number := _as_float(sub_value)) is not None:
                        out[f"{key}_{sub_key}"] = number
            elif (number := _as_float(value)) is not None:
                out[key] = number
        return out


def _is_evaluate_module(obj: Any) -> bool:
    # An evaluate module can only exist if `evaluate` was imported; don't import it.
    evaluate = sys.modules.get("evaluate")
    return evaluate is not None and isinstance(obj, evaluate.EvaluationModule)


# --------------------------------------------------------------------------- registry


def _builtins() -> dict[str, type[Metric]]:
    """The built-in metrics by name (imported here: their modules import this one)."""
    from .caption import CIDEr
    from .model_based import NLI, BERTScore
    from .ocr import ANLS
    from .text import BLEU, ROUGE, ExactMatch
    from .vqa import VQAAccuracy

    return {
        "exact_match": ExactMatch,
        "vqa_accuracy": VQAAccuracy,
        "anls": ANLS,
        "bleu": BLEU,
        "rouge": ROUGE,
        "cider": CIDEr,
        "bertscore": BERTScore,
        "nli": NLI,
    }


def metric_names() -> list[str]:
    """The names of the built-in metrics, sorted.

    Example:
        >>> metric_names()
        ['anls', 'bertscore', 'bleu', 'cider', 'exact_match', 'nli', 'rouge', 'vqa_accuracy']
    """
    return sorted(_builtins())


def get_metric(name: str, **kwargs: Any) -> Metric:
    """Builds a built-in metric by name.

    Args:
        name: One of "exact_match", "vqa_accuracy", "anls", "bleu", "rouge", "cider", "bertscore", "nli".
        **kwargs: Constructor arguments of the metric class.

    Raises:
        ValueError: If the name is unknown (the message lists the available names, and the
            closest one), or an option is not one of the metric's (the message lists them).

    Example:
        >>> get_metric("bertscore", model_type="/models/roberta-large", num_layers=17)
        BERTScore(model_type='/models/roberta-large', num_layers=17)
    """
    builtins = _builtins()
    if name not in builtins:
        close = difflib.get_close_matches(str(name), builtins, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"Unknown metric {name!r}{hint}. Available: {', '.join(sorted(builtins))}")
    cls = builtins[name]
    options = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = [key for key in kwargs if key not in options]
    if unknown:
        allowed = ", ".join(options) if options else "none"
        raise ValueError(f"metric {name!r} has no option(s) {', '.join(map(repr, unknown))}; its options: {allowed}")
    return cls(**kwargs)


def _resolve_one(thing: Any, key: str | None = None) -> tuple[str, MetricFn]:
    """(key, metric) for a name, a ``{"name": ..., **options}`` mapping, evaluate module, Metric or callable."""
    if isinstance(thing, str):
        return key or thing, get_metric(thing)
    if isinstance(thing, Mapping):
        options = dict(thing)
        name = options.pop("name", None)
        if not isinstance(name, str):
            raise ValueError(
                f"metric entry {thing!r} has no 'name': write {{name: bertscore, model_type: ...}}, with one of "
                f"{', '.join(metric_names())}"
            )
        return key or name, get_metric(name, **options)
    if _is_evaluate_module(thing):
        metric = EvaluateMetric(thing)
        return key or metric.name, metric
    if isinstance(thing, Metric):
        return key or thing.name, thing
    if callable(thing):
        return key or getattr(thing, "__name__", type(thing).__name__), thing
    raise TypeError(
        f"Cannot use {thing!r} as a metric: pass a built-in name ({', '.join(metric_names())}), "
        "a callable (predictions, references) -> dict[str, float], or an evaluate module"
    )


def resolve_metrics(spec: Any = None) -> dict[str, MetricFn]:
    """Turns a metric specification into ``{name: metric}``.

    Args:
        spec: ``None`` (exact match only), a built-in name, a built-in with options as a
            mapping (``{"name": "bertscore", "model_type": "/models/roberta-large"}``, what
            a YAML config file holds), a callable, a loaded `evaluate` module (wrapped in
            `EvaluateMetric`), or a list of those, or a dict mapping names to those (a dict
            with a ``"name"`` key is one metric with options). Keys are the built-in name,
            ``module.name``, `Metric.name`, or a callable's ``__name__`` (else its class name);
            dict keys are used as given.

    Raises:
        ValueError: If two metrics get the same key.
        TypeError: If an entry is none of the above.

    Example:
        >>> def length(predictions, references):
        ...     return {"length": sum(map(len, predictions)) / len(predictions)}
        >>> sorted(resolve_metrics(["rouge", length]))
        ['length', 'rouge']
        >>> resolve_metrics(None)
        {'exact_match': ExactMatch()}
    """
    if spec is None:
        spec = "exact_match"
    if isinstance(spec, Mapping) and not isinstance(spec.get("name"), str):
        items = [_resolve_one(thing, key=str(key)) for key, thing in spec.items()]
    elif isinstance(spec, (list, tuple)):
        items = [_resolve_one(thing) for thing in spec]
    else:
        items = [_resolve_one(spec)]
    resolved: dict[str, MetricFn] = {}
    for key, metric in items:
        if key in resolved:
            raise ValueError(
                f"Two metrics are named {key!r}; pass a dict to name them, e.g. {{'{key}_a': ..., '{key}_b': ...}}"
            )
        resolved[key] = metric
    return resolved


# --------------------------------------------------------------------------- checking before training


def check_metrics(metrics: Mapping[str, MetricFn], metric_for_best: str | None = None, eval_loss: bool = True) -> None:
    """Raises now, before any training, if a metric cannot run or ``metric_for_best`` is reported by none.

    Every metric's `Metric.check` runs (model-based metrics look for their model, loading
    nothing). Built-in metrics declare their keys (`Metric.keys`); other metrics are dry-run on two
    dummy predictions to learn their keys. Metrics whose keys stay unknown (see `_dry_run_keys`)
    are checked at the first evaluation instead.

    Args:
        metrics: As returned by `resolve_metrics`.
        metric_for_best: A reported key such as ``"eval/rougeL"``, or None.
        eval_loss: Whether ``eval/loss`` is reported.

    Raises:
        ValueError: ``metric_for_best`` is reported by none of the metrics (the message lists
            the keys that are).
        FileNotFoundError: A metric's model is neither on disk nor reachable.

    Example:
        >>> check_metrics(resolve_metrics(["rouge"]), "eval/rougeL")
        >>> check_metrics(resolve_metrics(["rouge"]), "eval/bleu")
        Traceback (most recent call last):
        ...
        ValueError: metric_for_best='eval/bleu' is reported by none of the metrics ['rouge']; choose one of [...]
    """
    for metric in metrics.values():
        if isinstance(metric, Metric):
            metric.check()
    key = metric_for_best
    if key is None:
        return
    reported = {f"eval/{k}" for k in ("samples", "samples_per_s", "gen_tokens_per_s")}
    if eval_loss:
        reported.add("eval/loss")
    unknown = False
    for name, metric in metrics.items():
        keys = getattr(metric, "keys", None)  # built-ins declare theirs
        keys = keys if isinstance(keys, (tuple, list)) else None
        if keys is None and key not in reported:
            keys = _dry_run_keys(name, metric)
        unknown = unknown or keys is None
        reported.update(f"eval/{k}" for k in keys or ())
    if key not in reported and not unknown:
        raise ValueError(
            f"metric_for_best={key!r} is reported by none of the metrics {list(metrics)}; "
            f"choose one of {sorted(reported)}"
        )


def _dry_run_keys(name: str, metric: MetricFn) -> list[str] | None:
    """The keys ``metric`` reports, learned by scoring two dummy predictions; None for a metric
    that holds a model (it overrides `Metric.offload`: loading the model only to learn key names
    would be slow) or that fails on the dummies (the first evaluation then shows its error)."""
    if isinstance(metric, Metric) and type(metric).offload is not Metric.offload:
        return None
    try:
        scores = metric(["a", "b"], [["a"], ["c"]])
    except Exception as err:  # any user metric; its first evaluation raises the error again
        logger.warning(
            "metric %r failed on a dry run (%s: %s); metric_for_best is checked at the first evaluation instead",
            name,
            type(err).__name__,
            err,
        )
        return None
    return [str(k) for k in scores] if isinstance(scores, dict) else None


_LOWER_IS_BETTER_TOKENS = {"wer", "cer", "ppl", "error"}


def greater_is_better(key: str) -> bool:
    """Whether a larger value of the metric ``key`` is better (for best-model tracking).

    Only the last ``/``-separated component counts. It is lower-is-better if it
    contains "loss" or "perplexity", or has "wer", "cer", "ppl" or "error" as a word
    (separated by ``_``, ``-``, ``.`` or digits; so "answer_f1" stays
    higher-is-better).

    Example:
        >>> greater_is_better("eval/rougeL"), greater_is_better("eval/loss")
        (True, False)
        >>> greater_is_better("eval/wer"), greater_is_better("eval/answer_acc")
        (False, True)
    """
    last = key.rsplit("/", 1)[-1].lower()
    if "loss" in last or "perplexity" in last:
        return False
    return not (_LOWER_IS_BETTER_TOKENS & set(re.split(r"[^a-z]+", last)))


# --------------------------------------------------------------------------- scoring


def _score_once(name: str, metric: MetricFn, predictions: Predictions, references: References) -> tuple[Any, Any]:
    """``(summary, per-sample columns)`` of one metric: one `Metric.score` call, a plain callable's
    summary with no per-sample scores, or, for a metric written for 0.1 (a ``per_sample`` method and
    no `Metric.score` of its own), its two calls."""
    per_sample = getattr(metric, "per_sample", None)
    own_score = isinstance(metric, Metric) and type(metric).score is not Metric.score
    if callable(per_sample) and not own_score:
        warnings.warn(
            f"metric {name!r} has a per_sample method: since llava_loop 0.2 a metric subclasses Metric and "
            "returns summary and per-sample scores from one score(predictions, references) call "
            "(see docs/evaluation.md); per_sample still works, and scores the set twice",
            FutureWarning,
            stacklevel=3,
        )
        return metric(predictions, references), per_sample(predictions, references)
    if isinstance(metric, Metric):
        scores = metric.score(predictions, references)
        if not isinstance(scores, tuple) or len(scores) != 2:
            raise TypeError(
                f"metric {name!r}: score returned {type(scores).__name__}, expected Scores(summary, per_sample)"
            )
        return scores
    return metric(predictions, references), {}


def _checked_float(metric_name: str, key: Any, value: Any) -> float:
    number = _as_float(value)
    if number is None:
        raise TypeError(f"metric {metric_name!r} returned {value!r} for {key!r}; expected a float")
    if math.isinf(number):
        raise ValueError(f"metric {metric_name!r} returned an infinite value for {key!r}")
    return number


def _validated_summary(scores: Any, metric_name: str) -> dict[str, float]:
    if not isinstance(scores, Mapping):
        raise TypeError(
            f"metric {metric_name!r} returned {type(scores).__name__}, expected a dict "
            "of floats such as {'accuracy': 0.5}"
        )
    for key in scores:
        if not isinstance(key, str):
            raise TypeError(f"metric {metric_name!r} returned key {key!r}; keys must be strings")
    return {key: _checked_float(metric_name, key, value) for key, value in scores.items()}


def _validated_per_sample(scores: Any, metric_name: str, n: int) -> dict[str, list[float]]:
    if not isinstance(scores, Mapping):
        raise TypeError(
            f"metric {metric_name!r}: per-sample scores are {type(scores).__name__}, expected a dict of lists"
        )
    out = {}
    for key, values in scores.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) != n:
            raise ValueError(
                f"metric {metric_name!r}: per-sample scores {key!r} must be a list of {n} floats, one per sample"
            )
        out[str(key)] = [_checked_float(metric_name, f"{key}[{i}]", v) for i, v in enumerate(values)]
    return out


def compute_metrics(
    metrics: Mapping[str, MetricFn],
    predictions: Predictions,
    references: References,
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Scores the set once with each metric; returns the merged summary and per-sample rows.

    Output keys are the keys each metric returns, unchanged. Per-sample scores come from
    `Metric.score`; a plain callable adds a summary only.

    Args:
        metrics: ``{name: metric}``, as from `resolve_metrics`.
        predictions: One generated string per sample.
        references: One list of acceptable references per sample.

    Returns:
        ``(summary, per_sample)``; ``per_sample[i]`` holds sample ``i``'s scores.

    Raises:
        TypeError: If a metric returns something other than a dict of floats (the
            message names the metric), or inputs have the wrong types.
        ValueError: If two metrics return the same key, a value is infinite, or
            predictions and references differ in length.

    Example:
        >>> from llava_loop.metrics import ExactMatch
        >>> compute_metrics({"exact_match": ExactMatch()}, ["A cat"], [["cat", "dog"]])
        ({'exact_match': 1.0}, [{'exact_match': 1.0}])
    """
    _check_inputs(predictions, references)
    summary: dict[str, float] = {}
    per_sample: list[dict[str, float]] = [{} for _ in predictions]
    owner: dict[str, str] = {}
    sample_owner: dict[str, str] = {}
    for name, metric in metrics.items():
        metric_summary, columns = _score_once(name, metric, predictions, references)
        for key, value in _validated_summary(metric_summary, name).items():
            if key in owner:
                raise ValueError(
                    f"metrics {owner[key]!r} and {name!r} both return {key!r}; wrap one to "
                    "rename its keys, e.g. lambda p, r: {'my_' + k: v for k, v in m(p, r).items()}"
                )
            owner[key] = name
            summary[key] = value
        for key, values in _validated_per_sample(columns, name, len(predictions)).items():
            if key in sample_owner:
                raise ValueError(f"metrics {sample_owner[key]!r} and {name!r} both return per-sample {key!r}")
            sample_owner[key] = name
            for row, value in zip(per_sample, values):
                row[key] = value
    return summary, per_sample
