"""String-matching metrics: exact match (SQuAD rules), corpus BLEU (sacreBLEU), ROUGE (rouge-score)."""

from __future__ import annotations

import re
import string
from typing import Any

from .core import Metric, Predictions, References, Scores, _check_inputs

_SQUAD_PUNCT = set(string.punctuation)
_SQUAD_ARTICLES = re.compile(r"\b(a|an|the)\b")


def _squad_normalize(text: str) -> str:
    """SQuAD v1.1 answer normalisation: lower, drop punctuation and articles, squash spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _SQUAD_PUNCT)
    text = _SQUAD_ARTICLES.sub(" ", text)
    return " ".join(text.split())


class ExactMatch(Metric):
    """Share of predictions equal to any reference after SQuAD-style normalisation.

    Normalisation lowercases, strips ASCII punctuation, removes the articles
    a/an/the and collapses whitespace. A sample scores 1.0 if its normalised
    prediction equals any normalised reference.

    Example:
        >>> ExactMatch()(["The cat.", "a dog"], [["cat"], ["cow", "Dog!"]])
        {'exact_match': 1.0}
        >>> ExactMatch().score(["a cat", "dog"], [["cat"], ["cow"]]).per_sample
        {'exact_match': [1.0, 0.0]}
    """

    name = "exact_match"
    keys = ("exact_match",)

    def score(self, predictions: Predictions, references: References) -> Scores:
        _check_inputs(predictions, references)
        hits = [
            float(any(_squad_normalize(pred) == _squad_normalize(r) for r in refs))
            for pred, refs in zip(predictions, references)
        ]
        return Scores.mean_of({"exact_match": hits})


class BLEU(Metric):
    """Corpus BLEU from sacreBLEU, on sacreBLEU's 0-100 scale (not 0-1).

    Equals ``sacrebleu.corpus_bleu(predictions, reference_streams, **kwargs)``, with the
    ``i``-th reference of every sample in stream ``i``. Samples may have different numbers of
    references: shorter reference lists are padded with ``None``, which sacreBLEU skips.
    References are passed as given, duplicates included: sacreBLEU keeps, per n-gram, its
    largest count in any one reference and the reference length closest to the prediction, so
    a duplicate changes nothing and the score equals that of the de-duplicated list (tested).
    Corpus BLEU has no meaningful per-sample score, so `score` returns none.

    Args:
        **kwargs: Forwarded to `sacrebleu.corpus_bleu` (e.g. ``tokenize="zh"``,
            ``lowercase=True``); defaults are sacreBLEU's.

    Example:
        >>> round(BLEU()(["the cat sat on the mat"], [["the cat sat on the mat"]])["bleu"], 1)
        100.0
    """

    name = "bleu"
    keys = ("bleu",)

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs  # sacrebleu.corpus_bleu options

    def score(self, predictions: Predictions, references: References) -> Scores:
        import sacrebleu

        _check_inputs(predictions, references)
        n_streams = max(len(refs) for refs in references)
        streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(n_streams)]
        result = sacrebleu.corpus_bleu(list(predictions), streams, **self.kwargs)
        return Scores({"bleu": float(result.score)}, {})

    def __repr__(self) -> str:
        return f"BLEU({', '.join(f'{k}={v!r}' for k, v in self.kwargs.items())})"


class ROUGE(Metric):
    """ROUGE-1/2/L/Lsum F1 from ``rouge_score``, best reference per key, mean over samples.

    Uses ``RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)``
    and ``score_multi`` (per key, the reference with the highest F1). rouge_score's
    tokenizer keeps only ``[a-z0-9]`` tokens, so non-Latin text scores 0; rougeLsum
    splits summaries on newlines only (no nltk downloads needed).

    Example:
        >>> scores = ROUGE()(["the cat sat"], [["a dog ran", "the cat sat"]])
        >>> scores["rouge1"], scores["rougeL"]
        (1.0, 1.0)
    """

    name = "rouge"
    rouge_types = ("rouge1", "rouge2", "rougeL", "rougeLsum")
    keys = rouge_types

    def __init__(self) -> None:
        self._scorer = None  # rouge_score.RougeScorer, built on the first call

    def score(self, predictions: Predictions, references: References) -> Scores:
        _check_inputs(predictions, references)
        if self._scorer is None:
            from rouge_score import rouge_scorer

            self._scorer = rouge_scorer.RougeScorer(list(self.rouge_types), use_stemmer=True)
        columns: dict[str, list[float]] = {k: [] for k in self.rouge_types}
        for pred, refs in zip(predictions, references):
            best = self._scorer.score_multi(list(refs), pred)
            for k in self.rouge_types:
                columns[k].append(float(best[k].fmeasure))
        return Scores.mean_of(columns)
