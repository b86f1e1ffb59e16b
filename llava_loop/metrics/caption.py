"""Caption metrics: CIDEr-D as the COCO caption evaluation (pycocoevalcap) computes it, in pure Python."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

from .core import Metric, Predictions, References, Scores, _check_inputs
from .ptb import coco_tokenize

_MAX_N = 4  # n-grams of 1 to 4 words
_SIGMA = 6.0  # standard deviation of the Gaussian length penalty, in words


def _ngram_counts(tokens: Sequence[str]) -> Counter[tuple[str, ...]]:
    """How often each n-gram (n = 1..4) occurs in ``tokens``."""
    return Counter(tuple(tokens[i : i + n]) for n in range(1, _MAX_N + 1) for i in range(len(tokens) - n + 1))


def _tfidf(
    counts: Counter[tuple[str, ...]], log_df: dict[tuple[str, ...], float], log_num_images: float
) -> tuple[list[dict[tuple[str, ...], float]], list[float], int]:
    """Per n: the TF-IDF vector ``count * (log(#images) - log(max(1, df)))`` and its norm; and the
    length CIDEr-D compares, which pycocoevalcap counts as the number of *bigrams* (words - 1)."""
    vectors: list[dict[tuple[str, ...], float]] = [{} for _ in range(_MAX_N)]
    for ngram, count in counts.items():
        vectors[len(ngram) - 1][ngram] = count * (log_num_images - log_df.get(ngram, 0.0))
    norms = [math.sqrt(sum(w * w for w in v.values())) for v in vectors]
    return vectors, norms, sum(counts[g] for g in vectors[1])


def cider_d(candidates: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]]) -> list[float]:
    """CIDEr-D of each tokenized candidate against its tokenized references, as pycocoevalcap scores them.

    The rules of ``pycocoevalcap/cider/cider_scorer.py`` (1.2; CIDEr-D of Vedantam et al. 2015, with
    n = 4, sigma = 6). The *document frequency* of an n-gram is the number of samples among whose
    references it occurs; its weight is ``log(#samples) - log(max(1, df))`` (so with one sample every
    weight is 0, and an n-gram no reference has gets the largest weight). Per n, a candidate and a
    reference are vectors of ``count * weight``; their similarity is
    ``sum(min(c, r) * r) / (|c| |r|)`` (the candidate's weights clipped by the reference's) times
    ``exp(-delta^2 / (2 sigma^2))``, ``delta`` the difference of their lengths. Lengths are counted
    as pycocoevalcap does, in bigrams: one word and no word both have length 0. A sample scores
    ``10 * mean over n of (mean over its references of the similarity)``.

    Args:
        candidates: One token list per sample.
        references: One list of token lists per sample (at least one each).

    Returns:
        The CIDEr-D of each sample; pycocoevalcap's corpus CIDEr-D is their mean.

    Raises:
        ValueError: If the two lists differ in length, or a sample has no references.

    Example:
        >>> refs = [[["a", "dog", "runs"], ["a", "dog", "is", "running"]], [["two", "red", "cars"]]]
        >>> [round(s, 4) for s in cider_d([["a", "dog", "runs"], ["red", "cars"]], refs)]
        [4.965, 3.7565]
    """
    if len(candidates) != len(references):
        raise ValueError(f"got {len(candidates)} candidates but {len(references)} reference lists; pass one per sample")
    for i, refs in enumerate(references):
        if not refs:
            raise ValueError(f"sample {i} has no references; CIDEr-D needs at least one per sample")
    cooked_refs = [[_ngram_counts(ref) for ref in refs] for refs in references]
    document_frequency: Counter[tuple[str, ...]] = Counter()
    for refs in cooked_refs:
        document_frequency.update({ngram for ref in refs for ngram in ref})
    log_df = {ngram: math.log(df) for ngram, df in document_frequency.items()}
    log_num_images = math.log(len(cooked_refs))
    penalty_scale = 2 * _SIGMA**2
    scores = []
    for candidate, refs in zip(candidates, cooked_refs):
        vec, norm, length = _tfidf(_ngram_counts(candidate), log_df, log_num_images)
        totals = [0.0] * _MAX_N
        for ref in refs:
            vec_ref, norm_ref, length_ref = _tfidf(ref, log_df, log_num_images)
            penalty = math.exp(-((length - length_ref) ** 2) / penalty_scale)
            for n in range(_MAX_N):
                dot = sum(min(w, vec_ref[n].get(g, 0.0)) * vec_ref[n].get(g, 0.0) for g, w in vec[n].items())
                if norm[n] != 0 and norm_ref[n] != 0:
                    dot /= norm[n] * norm_ref[n]
                totals[n] += dot * penalty
        scores.append(sum(totals) / _MAX_N / len(refs) * 10.0)
    return scores


class CIDEr(Metric):
    """CIDEr-D, the COCO caption metric, equal to pycocoevalcap's ``Cider`` after its ``PTBTokenizer``.

    Predictions and references are tokenized by `llava_loop.metrics.ptb.coco_tokenize` (Stanford
    PTBTokenizer's rules in pure Python, lowercased, punctuation dropped: the COCO pipeline without
    Java), each side as one text as pycocoevalcap does, and scored by `cider_d`. The summary is the
    corpus CIDEr-D (the mean), on pycocoevalcap's scale, 0 to 10 (papers report it times 100: "CIDEr
    120" is 1.2 here). The IDF weights come from the references of the
    whole evaluation set, so a sample's score depends on the other samples, and one sample alone
    scores 0 (all weights are ``log 1 = 0``). Give each image one sample with all its captions as
    references: document frequencies count samples.

    Example:
        >>> preds = ["A dog runs on the grass.", "Two red cars."]
        >>> refs = [["A dog is running on grass.", "A brown dog runs."], ["Two red cars parked.", "Red cars."]]
        >>> scores = CIDEr().score(preds, refs)
        >>> round(scores.summary["cider"], 4), [round(s, 4) for s in scores.per_sample["cider"]]
        (3.4684, [2.1127, 4.8241])
    """

    name = "cider"
    keys = ("cider",)

    def __init__(self) -> None:
        self._tokenized_references: tuple[tuple[tuple[str, ...], ...], list[list[list[str]]]] | None = None
        # (references, their tokens) of the last call: every evaluation of a run has the same references

    def _reference_tokens(self, references: References) -> list[list[list[str]]]:
        """The tokens of every reference, tokenized as one text (reused while the references stay the same)."""
        key = tuple(tuple(refs) for refs in references)
        if self._tokenized_references is None or self._tokenized_references[0] != key:
            flat = coco_tokenize([ref for refs in key for ref in refs])
            tokens, start = [], 0
            for refs in key:
                tokens.append(flat[start : start + len(refs)])
                start += len(refs)
            self._tokenized_references = (key, tokens)
        return self._tokenized_references[1]

    def score(self, predictions: Predictions, references: References) -> Scores:
        _check_inputs(predictions, references)
        per_sample = cider_d(coco_tokenize(list(predictions)), self._reference_tokens(references))
        return Scores.mean_of({"cider": per_sample})
