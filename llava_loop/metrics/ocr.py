"""Metrics for reading text in images: ANLS, the DocVQA / InfographicVQA / ST-VQA metric."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

from .core import Metric, Predictions, References, Scores, _check_inputs


def _anls_normalize(answer: str) -> str:
    """The official answer normalisation: outer whitespace stripped, lowercased, whitespace runs to one space."""
    return " ".join(answer.strip().lower().split())


def _anls_sample(prediction: str, references: Sequence[str], threshold: float) -> float:
    """One question's ANLS (see `ANLS`)."""
    from rapidfuzz.distance import Levenshtein

    pred = _anls_normalize(prediction)
    distances = []
    for ref in references:
        # The official script measures the distance between the normalised answers but divides by the
        # length of the answers as given (uppercased, as it writes it).
        length = max(len(ref.upper()), len(prediction.upper()))
        distances.append(Levenshtein.distance(_anls_normalize(ref), pred) / length if length else 0.0)
    similarity = 1.0 - min(distances)
    return 0.0 if similarity < threshold else similarity


class ANLS(Metric):
    """Average Normalized Levenshtein Similarity, equal to the official DocVQA evaluation script.

    The rules of the evaluation script distributed by the DocVQA challenges (docvqa.org, RRC
    "Document Visual Question Answering"; ``infographicsvqa_eval.py``, ``evaluate_method``; lmms-eval's
    ``anls`` follows it too), the metric of the ST-VQA paper (Biten et al., ICCV 2019, eq. 1). Both
    answers are normalised (outer whitespace stripped, lowercased, every whitespace run one space);
    per reference, ``NL = Levenshtein(normalised reference, normalised prediction) / max(len(reference),
    len(prediction))``, the lengths of the answers *as given* (uppercased: "ß" counts 2), 0 when both are
    empty; a question scores ``1 - min NL`` over its references, or 0 when that is below ``threshold``;
    the summary is the mean over questions, 0..1. Levenshtein distances are rapidfuzz's (characters,
    unit costs).

    With the default ``threshold=0.5`` a question scores 0 when its best ``NL > 0.5``: an answer exactly
    half wrong ("10" for "11", NL = 0.5) keeps 0.5 as in the official script, where the paper's formula
    (0 unless ``NL < 0.5``) gives 0. Extra whitespace inside an answer lengthens it without changing the
    distance, as in the official script.

    Args:
        threshold: A question whose best similarity ``1 - NL`` is below this scores 0 (the official
            script's ``--anls_threshold``), from 0 (never) to 1 (only exact matches count).

    Raises:
        ValueError: If ``threshold`` is not a number from 0 to 1.

    Example:
        >>> ANLS()(["Dear dr. Lobo", "12/15/89"], [["Dear Dr. Lobo", "Dr. Lobo"], ["12/15/88"]])
        {'anls': 0.9375}
        >>> ANLS().score(["10", "Denvr"], [["11"], ["denver", "Denver Broncos"]]).per_sample
        {'anls': [0.5, 0.8333333333333334]}
    """

    name = "anls"
    keys = ("anls",)

    def __init__(self, threshold: float = 0.5) -> None:
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not 0 <= threshold <= 1:
            raise ValueError(
                f"anls threshold must be a number from 0 to 1 (a question whose best similarity 1 - NL is "
                f"below it scores 0; DocVQA uses 0.5), got {threshold!r}"
            )
        self.threshold = float(threshold)  # similarity below which a question scores 0

    def __repr__(self) -> str:
        return f"ANLS(threshold={self.threshold})"

    def score(self, predictions: Predictions, references: References) -> Scores:
        _check_inputs(predictions, references)
        return Scores.mean_of(
            {"anls": [_anls_sample(pred, refs, self.threshold) for pred, refs in zip(predictions, references)]}
        )
