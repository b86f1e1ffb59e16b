"""Metrics for generation-based evaluation: the protocol, a registry and built-ins.

A *metric* is a `Metric`, whose one `Metric.score` call returns `Scores` (the summary and the
per-sample scores), or any callable ``(predictions, references) -> dict[str, float]`` (a summary
only). ``predictions`` holds one string per sample, ``references`` one *list* of references per
sample, as the record gives them (duplicates kept: VQA's annotator answers are votes).

Modules: `core` (protocol, registry, `resolve_metrics`, `check_metrics`, `compute_metrics`),
`text` (``exact_match``, ``bleu``, ``rouge``), `vqa` (``vqa_accuracy``), `ocr` (``anls``),
`caption` (``cider``, with `ptb`, the COCO caption tokenization in pure Python), `model_based`
(``bertscore``, ``nli``). docs/evaluation.md lists every built-in's keys and reference.

Example:
    >>> metrics = resolve_metrics(["exact_match", "vqa_accuracy"])
    >>> summary, per_sample = compute_metrics(metrics, ["Two"], [["2"]])
    >>> summary
    {'exact_match': 0.0, 'vqa_accuracy': 1.0}
    >>> per_sample
    [{'exact_match': 0.0, 'vqa_accuracy': 1.0}]
"""

from .caption import CIDEr
from .core import (
    EvaluateMetric,
    Metric,
    Scores,
    check_metrics,
    compute_metrics,
    get_metric,
    greater_is_better,
    metric_names,
    resolve_metrics,
)
from .model_based import NLI, BERTScore
from .ocr import ANLS
from .text import BLEU, ROUGE, ExactMatch
from .vqa import VQAAccuracy

__all__ = [
    "ANLS",
    "BLEU",
    "NLI",
    "ROUGE",
    "BERTScore",
    "CIDEr",
    "EvaluateMetric",
    "ExactMatch",
    "Metric",
    "Scores",
    "VQAAccuracy",
    "check_metrics",
    "compute_metrics",
    "get_metric",
    "greater_is_better",
    "metric_names",
    "resolve_metrics",
]
