"""Metrics for generation-based evaluation: the protocol, a registry and built-ins.

A *metric* is any callable ``(predictions, references) -> dict[str, float]``.
``predictions`` holds one generated string per sample and ``references`` one *list*
of acceptable reference strings per sample, as the record gives them (`EvalCollator`
keeps duplicates: VQA's ten annotator answers are votes). Only ``vqa_accuracy`` counts
duplicates; the other built-ins score against the best reference, so duplicates change
nothing there. Subclass `Metric` to also report
per-sample scores (written next to each prediction in prediction files) or to hold a
model that `offload` can move off the GPU between evaluations.

Built-ins (`get_metric` names):

=================  ==========================================================  ========
name               keys                                                        range
=================  ==========================================================  ========
``exact_match``    ``exact_match``                                             0..1
``vqa_accuracy``   ``vqa_accuracy``                                            0..1
``bleu``           ``bleu`` (sacreBLEU corpus BLEU)                            0..100
``rouge``          ``rouge1``, ``rouge2``, ``rougeL``, ``rougeLsum`` (F1)      0..1
``bertscore``      ``bertscore_precision``, ``bertscore_recall``,              ~0..1
                   ``bertscore_f1``
``nli``            ``nli_entailment``                                          0..1
=================  ==========================================================  ========

Example:
    >>> metrics = resolve_metrics(["exact_match", "vqa_accuracy"])
    >>> summary, per_sample = compute_metrics(metrics, ["Two"], [["2"]])
    >>> summary
    {'exact_match': 0.0, 'vqa_accuracy': 1.0}
    >>> per_sample
    [{'exact_match': 0.0, 'vqa_accuracy': 1.0}]
"""

from __future__ import annotations

import difflib
import inspect
import json
import logging
import math
import numbers
import os
import re
import string
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "BLEU",
    "NLI",
    "ROUGE",
    "BERTScore",
    "EvaluateMetric",
    "ExactMatch",
    "Metric",
    "VQAAccuracy",
    "check_metrics",
    "compute_metrics",
    "get_metric",
    "greater_is_better",
    "metric_names",
    "resolve_metrics",
]

Predictions = Sequence[str]
References = Sequence[Sequence[str]]
MetricFn = Callable[[Predictions, References], dict[str, float]]


# --------------------------------------------------------------------------- protocol


class Metric:
    """Base class for metrics: callable, with optional per-sample scores and offload.

    Subclasses set `name` (and `keys`, the summary keys they report, where known in advance)
    and implement `__call__`; they override `per_sample` when a per-sample score is meaningful
    and `offload` when they hold a model.

    Example:
        >>> class Length(Metric):
        ...     name = "length"
        ...
        ...     def __call__(self, predictions, references):
        ...         return {"length": sum(map(len, predictions)) / len(predictions)}
        >>> Length()(["ab", "abcd"], [["x"], ["y"]])
        {'length': 3.0}
    """

    name: str = "metric"
    keys: tuple[str, ...] | None = None

    def __call__(self, predictions: Predictions, references: References) -> dict[str, float]:
        """Scores the whole evaluation set.

        Args:
            predictions: One generated string per sample.
            references: One list of acceptable references per sample.

        Returns:
            Summary scores, e.g. ``{"exact_match": 0.5}``.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement __call__")

    def per_sample(self, predictions: Predictions, references: References) -> dict[str, list[float]]:
        """Per-sample scores, one list per key; ``{}`` when not meaningful (default).

        Example:
            >>> ExactMatch().per_sample(["a cat", "dog"], [["cat"], ["cow"]])
            {'exact_match': [1.0, 0.0]}
        """
        return {}

    def offload(self) -> None:
        """Moves any model off the GPU until the next call (no-op by default)."""

    def check(self) -> None:
        """Raises now, cheaply and before any training, if this metric cannot run later.

        No-op by default; metrics that load a model check that it is on disk or reachable
        (nothing is loaded). `Loop` and the CLI call it before training starts.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class _SampleMeanMetric(Metric):
    """A metric whose summary is the mean of per-sample scores, computed once per input.

    `compute_metrics` calls ``metric(...)`` and then ``metric.per_sample(...)``: the
    scores of the last inputs are cached so model-based metrics run only once.
    """

    def _score_samples(self, predictions: Predictions, references: References) -> dict[str, list[float]]:
        raise NotImplementedError

    def per_sample(self, predictions: Predictions, references: References) -> dict[str, list[float]]:
        _check_inputs(predictions, references)
        key = (tuple(predictions), tuple(tuple(refs) for refs in references))
        cached = getattr(self, "_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, self._score_samples(predictions, references))
            self._cache = cached
        return {k: list(v) for k, v in cached[1].items()}

    def __call__(self, predictions: Predictions, references: References) -> dict[str, float]:
        scores = self.per_sample(predictions, references)
        return {k: math.fsum(v) / len(v) for k, v in scores.items()}


def _check_inputs(predictions: Predictions, references: References) -> None:
    """Raises if predictions/references are not ``list[str]`` / ``list[list[str]]``."""
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


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def _resolve_device(device: str | None) -> str:
    import torch

    if device is not None:
        return str(device)
    return "cuda" if torch.cuda.is_available() else "cpu"


def _free_gpu_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _offline_error(what: str, name: str, example: str, err: BaseException) -> RuntimeError:
    return RuntimeError(
        f"Could not load the {what} model {name!r}: {err}\n"
        "It is not available offline (no network or HF_HUB_OFFLINE=1, and not in the "
        "local Hugging Face cache). Download it beforehand, e.g. "
        f"`hf download {name}`, or pass a local directory: {example}."
    )


# --------------------------------------------------------------------------- exact match

_SQUAD_PUNCT = set(string.punctuation)
_SQUAD_ARTICLES = re.compile(r"\b(a|an|the)\b")


def _squad_normalize(text: str) -> str:
    """SQuAD v1.1 answer normalisation: lower, drop punctuation and articles, squash spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _SQUAD_PUNCT)
    text = _SQUAD_ARTICLES.sub(" ", text)
    return " ".join(text.split())


class ExactMatch(_SampleMeanMetric):
    """Share of predictions equal to any reference after SQuAD-style normalisation.

    Normalisation lowercases, strips ASCII punctuation, removes the articles
    a/an/the and collapses whitespace. A sample scores 1.0 if its normalised
    prediction equals any normalised reference.

    Example:
        >>> ExactMatch()(["The cat.", "a dog"], [["cat"], ["cow", "Dog!"]])
        {'exact_match': 1.0}
    """

    name = "exact_match"
    keys = ("exact_match",)

    def _score_samples(self, predictions: Predictions, references: References) -> dict[str, list[float]]:
        scores = []
        for pred, refs in zip(predictions, references):
            pred = _squad_normalize(pred)
            scores.append(float(any(pred == _squad_normalize(r) for r in refs)))
        return {"exact_match": scores}


# --------------------------------------------------------------------------- VQA accuracy
# The rules of the official VQA evaluation script: GT-Vision-Lab/VQA,
# PythonEvaluationTools/vqaEvaluation/vqaEval.py at master (commit a013f00, 2021, the table with
# straight apostrophes). tests/data/vqa_official_golden.json holds the official scores of 600
# random inputs aimed at every rule (made by tests/data/make_vqa_golden.py with Python 2.7);
# tests/test_metrics.py checks that VQAAccuracy equals each one. The contractions table is the
# official one, entries that can never match included ("Im", "Ive": words are lowercased first).
_VQA_CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}
_VQA_NUMBERS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_VQA_ARTICLES = frozenset({"a", "an", "the"})
# Not in the list, so kept: the apostrophe (contractions keep it), ":" ("3:00"), ".", "#", "$",
# "%", "&", "*", "^", "|", "~" and any non-ASCII mark ("’").
_VQA_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
# Digits are ASCII only, as in the Python 2 original (Python 3's \d would also match "٢").
_VQA_DIGIT_COMMA_DIGIT = re.compile(r"[0-9],[0-9]")
# A period not followed by a digit ("yes." -> "yes", "2.5" kept). The official pattern
# "(?!<=\d)(\.)(?!\d)" starts with a look-ahead that can never fail, so this is the same rule.
_VQA_PERIOD = re.compile(r"\.(?![0-9])")
# The official call passes re.UNICODE (= 32) where re.sub takes `count`: it removes at most 32
# periods per answer.
_VQA_MAX_PERIODS = 32


def _vqa_clean_whitespace(answer: str) -> str:
    """Newlines and tabs to spaces, outer whitespace stripped (applied to every answer)."""
    return answer.replace("\n", " ").replace("\t", " ").strip()


def _vqa_normalize(answer: str) -> str:
    """The official answer normalisation (see `VQAAccuracy`)."""
    text = _vqa_clean_whitespace(answer)
    # Punctuation: whether a mark is deleted or becomes a space is decided on the input text.
    delete_all = _VQA_DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _VQA_PUNCT:
        beside_space = mark + " " in text or " " + mark in text
        out = out.replace(mark, "" if delete_all or beside_space else " ")
    out = _VQA_PERIOD.sub("", out, count=_VQA_MAX_PERIODS)
    words = [_VQA_NUMBERS.get(w, w) for w in out.lower().split()]
    return " ".join(_VQA_CONTRACTIONS.get(w, w) for w in words if w not in _VQA_ARTICLES)


def _vqa_sample_accuracy(prediction: str, references: Sequence[str]) -> float:
    """Leave-one-out VQA accuracy of one normalised prediction (see `VQAAccuracy`)."""
    n = len(references)
    matches = [ref == prediction for ref in references]
    if n == 1:
        return float(matches[0])
    needed = min(3, n - 1)
    total = sum(matches)
    # Leaving reference i out leaves `total - matches[i]` matching annotators.
    return _mean([min(1.0, (total - hit) / needed) for hit in matches])


class VQAAccuracy(_SampleMeanMetric):
    """VQA accuracy, equal to the official VQA evaluation script (``vqaEval.py``).

    Prediction and every reference are normalised by the official rules: newlines and tabs
    become spaces and the text is stripped; each of the marks ``; / [ ] " { } ( ) = + \\ _ - > <
    @ ` , ? !`` is deleted if it stands next to a space anywhere in the text, or if the text
    contains a digit-comma-digit such as "1,000" (then every mark is deleted), and otherwise
    becomes a space; periods not followed by a digit are removed (at most 32, as in the official
    code); then the text is lowercased and split on whitespace, the number words
    "none"/"zero".."ten" become digits, the articles a/an/the are dropped and apostrophe-less
    contractions are expanded ("dont" -> "don't", "oclock" -> "o'clock"). Apostrophes, colons
    and non-ASCII marks are kept, so "don’t" (curly) does not match "dont"; digits mean ASCII
    0-9, as in the Python 2 original.

    Accuracy of a sample with ``n`` references: for each reference ``i``, leave it out and
    count the matches ``m_i`` among the other ``n - 1``; ``acc_i = min(1, m_i / t)``; the
    sample scores ``mean_i acc_i``. References are counted as given: duplicates are votes.
    ``t = 3`` is the official rule; it applies to every ``n >= 4`` exactly as the official
    script computes it. With fewer references the official formula could never reach 1, so
    ``t = n - 1`` for ``n`` = 2 or 3 (2 references: an answer matching one of them scores 0.5)
    and a single reference is normalised exact match. The summary is the mean over samples, in
    [0, 1] (the official script reports percentages).

    One official quirk is dropped: when all references are identical strings, the official
    script normalises neither them nor the prediction, so "yes" against ten "Yes!" scores 0
    there and 1 here. On such inputs (all references identical after the newline/tab/strip
    step, prediction different from them before normalisation and equal after) we score 1 and
    the official script 0; on every other input with ``n >= 4`` the scores are equal.

    Example:
        >>> refs = [["2"] * 3 + ["3"] * 7]  # 3 of 10 annotators said "2"
        >>> VQAAccuracy()(["Two"], refs)  # (7 * 3/3 + 3 * 2/3) / 10
        {'vqa_accuracy': 0.9}
        >>> VQAAccuracy()(["yes"], [["Yes!"] * 10])  # the official script says 0.0
        {'vqa_accuracy': 1.0}
    """

    name = "vqa_accuracy"
    keys = ("vqa_accuracy",)

    def _score_samples(self, predictions: Predictions, references: References) -> dict[str, list[float]]:
        scores = [
            _vqa_sample_accuracy(_vqa_normalize(pred), [_vqa_normalize(r) for r in refs])
            for pred, refs in zip(predictions, references)
        ]
        return {"vqa_accuracy": scores}


# --------------------------------------------------------------------------- BLEU


class BLEU(Metric):
    """Corpus BLEU from sacreBLEU, on sacreBLEU's 0-100 scale (not 0-1).

    Equals ``sacrebleu.corpus_bleu(predictions, reference_streams, **kwargs)``, with the
    ``i``-th reference of every sample in stream ``i``. Samples may have different numbers of
    references: shorter reference lists are padded with ``None``, which sacreBLEU skips.
    References are passed as given, duplicates included: sacreBLEU keeps, per n-gram, its
    largest count in any one reference and the reference length closest to the prediction, so
    a duplicate changes nothing and the score equals that of the de-duplicated list (tested).
    Corpus BLEU has no meaningful per-sample score, so `per_sample` returns ``{}``.

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
        self.kwargs = kwargs

    def __call__(self, predictions: Predictions, references: References) -> dict[str, float]:
        import sacrebleu

        _check_inputs(predictions, references)
        n_streams = max(len(refs) for refs in references)
        streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(n_streams)]
        result = sacrebleu.corpus_bleu(list(predictions), streams, **self.kwargs)
        return {"bleu": float(result.score)}

    def __repr__(self) -> str:
        return f"BLEU({', '.join(f'{k}={v!r}' for k, v in self.kwargs.items())})"


# --------------------------------------------------------------------------- ROUGE


class ROUGE(_SampleMeanMetric):
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
        self._scorer = None

    def _score_samples(self, predictions: Predictions, references: References) -> dict[str, list[float]]:
        if self._scorer is None:
            from rouge_score import rouge_scorer

            self._scorer = rouge_scorer.RougeScorer(list(self.rouge_types), use_stemmer=True)
        scores: dict[str, list[float]] = {k: [] for k in self.rouge_types}
        for pred, refs in zip(predictions, references):
            best = self._scorer.score_multi(list(refs), pred)
            for k in self.rouge_types:
                scores[k].append(float(best[k].fmeasure))
        return scores


# --------------------------------------------------------------------------- model-based


def _config_num_layers(path: str) -> int | None:
    """Number of layers written in ``path/config.json``, if any."""
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        return None
    with open(config_file, encoding="utf-8") as f:
        config = json.load(f)
    for key in ("num_hidden_layers", "num_layers", "n_layers", "n_layer"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


class _EmptySentenceInputs:
    """``build_inputs_with_special_tokens`` for bert-score's empty-sentence case only.

    A class, not a closure, so that the tokenizer still pickles (bert-score's idf runs in a
    process pool).
    """

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    def __call__(self, token_ids_0: list[int], token_ids_1: list[int] | None = None) -> list[int]:
        if token_ids_0 or token_ids_1:
            raise NotImplementedError("only bert-score's empty sentence (no token ids) is supported")
        return list(self.ids)


def _encode_empty_sentences(tokenizer: Any) -> None:
    """Lets bert-score encode an empty sentence with a tokenizer that lacks
    ``build_inputs_with_special_tokens`` (transformers 5): on this instance only, it returns the
    special tokens the tokenizer adds to an empty text ([CLS] [SEP], <s> </s>)."""
    if not hasattr(tokenizer, "build_inputs_with_special_tokens"):
        ids = tokenizer("", add_special_tokens=True)["input_ids"]
        tokenizer.build_inputs_with_special_tokens = _EmptySentenceInputs(list(ids))


class BERTScore(_SampleMeanMetric):
    """BERTScore precision/recall/F1 via ``bert_score.BERTScorer``, best reference each.

    The scorer (model + tokenizer) is built lazily on the first call and reused, so
    the model loads once per run. `offload` moves it to the CPU; the next call moves
    it back. With several references a sample gets, for each of P/R/F1 separately,
    its best score over the references (bert_score's own multi-reference rule); the
    list is used as given, so with ``idf=True`` duplicates count as documents, as in
    ``bert_score.score``. Values are cosine-similarity based, typically in [0, 1] (in
    [-1, 1] in principle; rescaled values can be negative).

    Empty predictions and references (common early in finetuning, when the model emits
    EOS first) follow bert-score's own rule: a sentence is stripped before encoding, so
    a whitespace-only one is empty too; a pair with an empty side scores raw P = R =
    F1 = 0 (bert-score warns on stderr); the best over the references is taken as
    usual; with ``rescale_with_baseline`` the 0 becomes ``(0 - b) / (1 - b)``, i.e.
    negative, for each of P/R/F1 with its own baseline ``b``. bert-score 0.3.13
    encodes an empty sentence with ``tokenizer.build_inputs_with_special_tokens([])``,
    which transformers 5 tokenizers lack; the scorer's own tokenizer instance gets one
    returning the special tokens of an empty text (what transformers 4 returned),
    nothing global is patched.

    Args:
        model_type: Hub name (e.g. ``"roberta-large"``) or a local directory.
        num_layers: Layer whose embeddings are used. ``None``: bert_score's tuned
            layer for known hub names; for other models (local directories) the last
            layer as read from ``config.json`` (a warning suggests setting it);
            an error if the config does not say.
        batch_size: Sentences per forward pass.
        device: ``None`` → ``"cuda"`` if available, else ``"cpu"``.
        idf: Weight tokens by inverse document frequency over each call's references.
        lang: Language code, required with ``rescale_with_baseline``.
        rescale_with_baseline: Rescale with bert_score's baseline for ``lang``.
        baseline_path: A baseline file of your own (bert-score's TSV/CSV format:
            a ``LAYER,P,R,F`` header, one row per layer) instead of bert_score's.

    Raises:
        RuntimeError: On the first call, if the model cannot be loaded (e.g. offline);
            the message says how to pass a local directory.

    Example:
        >>> metric = BERTScore("roberta-large")  # nothing is loaded yet
        >>> scores = metric(["a cat"], [["a cat", "a dog"]])  # doctest: +SKIP
        >>> sorted(scores)  # doctest: +SKIP
        ['bertscore_f1', 'bertscore_precision', 'bertscore_recall']
    """

    name = "bertscore"
    keys = ("bertscore_precision", "bertscore_recall", "bertscore_f1")

    def __init__(
        self,
        model_type: str = "roberta-large",
        num_layers: int | None = None,
        batch_size: int = 64,
        device: str | None = None,
        idf: bool = False,
        lang: str | None = None,
        rescale_with_baseline: bool = False,
        baseline_path: str | None = None,
    ) -> None:
        if rescale_with_baseline and lang is None:
            raise ValueError("BERTScore(rescale_with_baseline=True) needs lang, e.g. lang='en'")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model_type = model_type
        self.num_layers = num_layers
        self.batch_size = batch_size
        self.device = device
        self.idf = idf
        self.lang = lang
        self.rescale_with_baseline = rescale_with_baseline
        self.baseline_path = baseline_path
        self._scorer = None

    def __repr__(self) -> str:
        return f"BERTScore(model_type={self.model_type!r}, num_layers={self.num_layers!r})"

    def _resolve_num_layers(self) -> int:
        from bert_score.utils import model2layers

        if self.num_layers is not None:
            return self.num_layers
        if self.model_type in model2layers:
            return model2layers[self.model_type]
        n = _config_num_layers(self.model_type) if os.path.isdir(self.model_type) else None
        if n is None:
            raise ValueError(
                f"BERTScore: bert_score has no tuned layer for {self.model_type!r} and its "
                "config.json does not give the number of layers; pass num_layers, e.g. "
                f"BERTScore(model_type={self.model_type!r}, num_layers=...)"
            )
        logger.warning(
            "BERTScore: no tuned layer for %r; using its last layer (%d). Pass num_layers to choose.",
            self.model_type,
            n,
        )
        return n

    def check(self) -> None:
        """Raises if the model cannot be found or its layer is unknown (nothing is loaded)."""
        from .modeling import check_model_source

        check_model_source(self.model_type, what="BERTScore model (bertscore model_type)")
        self._resolve_num_layers()
        if self.baseline_path is not None and not os.path.isfile(self.baseline_path):
            raise FileNotFoundError(f"BERTScore baseline_path {self.baseline_path!r}: no such file")

    def _get_scorer(self) -> Any:
        if self._scorer is None:
            num_layers = self._resolve_num_layers()
            from bert_score import BERTScorer

            logger.info("Loading BERTScore model %r (layer %d)", self.model_type, num_layers)
            try:
                self._scorer = BERTScorer(
                    model_type=self.model_type,
                    num_layers=num_layers,
                    batch_size=self.batch_size,
                    device=_resolve_device(self.device),
                    idf=self.idf,
                    lang=self.lang,
                    rescale_with_baseline=self.rescale_with_baseline,
                    baseline_path=self.baseline_path,
                )
                _encode_empty_sentences(self._scorer._tokenizer)
            except (OSError, ValueError) as err:
                raise _offline_error(
                    "BERTScore",
                    self.model_type,
                    "BERTScore(model_type='/path/to/roberta-large', num_layers=17)",
                    err,
                ) from err
        scorer = self._scorer
        target = _resolve_device(self.device)
        if scorer.device != target:  # moved to the CPU by offload()
            scorer._model.to(target)
            scorer.device = target
        return scorer

    def _score_samples(self, predictions: Predictions, references: References) -> dict[str, list[float]]:
        scorer = self._get_scorer()
        refs = [list(r) for r in references]
        if self.idf:
            with warnings.catch_warnings():
                # Re-computing the weights for each evaluation set is intended.
                warnings.filterwarnings("ignore", message="Overwriting the previous importance weights")
                scorer.compute_idf([r for group in refs for r in group])
        precision, recall, f1 = scorer.score(list(predictions), refs, batch_size=self.batch_size)
        return {
            "bertscore_precision": precision.tolist(),
            "bertscore_recall": recall.tolist(),
            "bertscore_f1": f1.tolist(),
        }

    def offload(self) -> None:
        """Moves the BERTScore model to the CPU; the next call moves it back."""
        if self._scorer is not None and self._scorer.device != "cpu":
            self._scorer._model.to("cpu")
            self._scorer.device = "cpu"
            _free_gpu_cache()


def _entailment_index(id2label: Mapping[Any, str], model: str) -> int:
    """Index of the single label containing "entail" (case-insensitive), excluding
    negated ones such as "not_entailment"."""
    found = [
        int(i)
        for i, label in id2label.items()
        if "entail" in str(label).lower() and not re.search("not|non", str(label).lower())
    ]
    if len(found) != 1:
        raise ValueError(
            f"NLI model {model!r}: expected exactly one entailment label in "
            f"config.id2label, got {dict(id2label)!r}. Set config.id2label so that one "
            "label contains 'entail', e.g. {0: 'ENTAILMENT', 1: 'NEUTRAL', 2: 'CONTRADICTION'}."
        )
    return found[0]


class NLI(_SampleMeanMetric):
    """Entailment probability from an NLI classifier, best reference, mean over samples.

    Any ``AutoModelForSequenceClassification`` works; the entailment class is the one
    label of ``config.id2label`` containing "entail" (case-insensitive; "not_entailment"
    does not count). Each (premise, hypothesis) pair is scored with a softmax over the
    logits; a sample keeps its highest entailment probability over the references.
    The model is loaded lazily on the first call, once; `offload` moves it to the CPU.

    Args:
        model: Hub name or local directory of the classifier.
        batch_size: Pairs per forward pass.
        device: ``None`` → ``"cuda"`` if available, else ``"cpu"``.
        premise: ``"reference"`` (default: does the reference entail the prediction?)
            or ``"prediction"`` (does the prediction entail the reference?).

    Raises:
        RuntimeError: On the first call, if the model cannot be loaded (e.g. offline).
        ValueError: If the model has no (or several) entailment labels.

    Example:
        >>> metric = NLI("/models/deberta-large-mnli")  # nothing is loaded yet
        >>> metric(["a cat"], [["a small cat"]])  # doctest: +SKIP
        {'nli_entailment': 0.97}
    """

    name = "nli"
    keys = ("nli_entailment",)

    def __init__(
        self,
        model: str = "microsoft/deberta-large-mnli",
        batch_size: int = 32,
        device: str | None = None,
        premise: str = "reference",
    ) -> None:
        if premise not in ("reference", "prediction"):
            raise ValueError(f"premise must be 'reference' or 'prediction', got {premise!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.batch_size = batch_size
        self.device = device
        self.premise = premise
        self._model = None
        self._tokenizer = None
        self._entail = -1

    def __repr__(self) -> str:
        return f"NLI(model={self.model!r}, premise={self.premise!r})"

    def check(self) -> None:
        """Raises if the classifier cannot be found (nothing is loaded)."""
        from .modeling import check_model_source

        check_model_source(self.model, what="NLI model (nli model)")

    def _load(self) -> Any:
        if self._model is None:
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            logger.info("Loading NLI model %r", self.model)
            try:
                tokenizer = AutoTokenizer.from_pretrained(self.model)
                model = AutoModelForSequenceClassification.from_pretrained(self.model)
            except (OSError, ValueError) as err:
                raise _offline_error("NLI", self.model, "NLI(model='/path/to/deberta-large-mnli')", err) from err
            self._entail = _entailment_index(model.config.id2label, self.model)
            self._tokenizer, self._model = tokenizer, model.eval()
        return self._model.to(_resolve_device(self.device))

    def _score_samples(self, predictions: Predictions, references: References) -> dict[str, list[float]]:
        import torch

        model = self._load()
        pairs = [(ref, pred) for pred, refs in zip(predictions, references) for ref in refs]
        if self.premise == "prediction":
            pairs = [(pred, ref) for ref, pred in pairs]
        probs: list[float] = []
        for start in range(0, len(pairs), self.batch_size):
            batch = pairs[start : start + self.batch_size]
            inputs = self._tokenizer(
                [p for p, _ in batch],
                [h for _, h in batch],
                padding=True,
                truncation=True,
                return_tensors="pt",
            ).to(model.device)
            with torch.inference_mode():
                logits = model(**inputs).logits.float()
            probs.extend(logits.softmax(dim=-1)[:, self._entail].tolist())
        scores, start = [], 0
        for refs in references:
            scores.append(max(probs[start : start + len(refs)]))
            start += len(refs)
        return {"nli_entailment": scores}

    def offload(self) -> None:
        """Moves the NLI model to the CPU; the next call moves it back."""
        if self._model is not None and self._model.device.type != "cpu":
            self._model.to("cpu")
            _free_gpu_cache()


# --------------------------------------------------------------------------- evaluate


def _takes_reference_lists(module: Any) -> bool:
    """Whether an `evaluate` module accepts a list of references per prediction."""
    import datasets

    features = module.features
    feature_sets = features if isinstance(features, list) else [features]
    return any(
        "references" in fs and not isinstance(fs["references"], datasets.Value) for fs in feature_sets if fs is not None
    )


def _as_float(value: Any) -> float | None:
    """``value`` as a float if it is a real number (Python, NumPy or 0-d array/tensor)."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


class EvaluateMetric(Metric):
    """Adapter for a loaded Hugging Face `evaluate` module.

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
        self.module = module
        self.compute_kwargs = compute_kwargs
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


# --------------------------------------------------------------------------- registry

_BUILTINS: dict[str, type[Metric]] = {
    "exact_match": ExactMatch,
    "vqa_accuracy": VQAAccuracy,
    "bleu": BLEU,
    "rouge": ROUGE,
    "bertscore": BERTScore,
    "nli": NLI,
}


def metric_names() -> list[str]:
    """The names of the built-in metrics, sorted.

    Example:
        >>> metric_names()
        ['bertscore', 'bleu', 'exact_match', 'nli', 'rouge', 'vqa_accuracy']
    """
    return sorted(_BUILTINS)


def get_metric(name: str, **kwargs: Any) -> Metric:
    """Builds a built-in metric by name.

    Args:
        name: One of "exact_match", "vqa_accuracy", "bleu", "rouge", "bertscore", "nli".
        **kwargs: Constructor arguments of the metric class.

    Raises:
        ValueError: If the name is unknown (the message lists the available names, and the
            closest one), or an option is not one of the metric's (the message lists them).

    Example:
        >>> get_metric("bertscore", model_type="/models/roberta-large", num_layers=17)
        BERTScore(model_type='/models/roberta-large', num_layers=17)
    """
    if name not in _BUILTINS:
        close = difflib.get_close_matches(str(name), _BUILTINS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"Unknown metric {name!r}{hint}. Available: {', '.join(sorted(_BUILTINS))}")
    cls = _BUILTINS[name]
    options = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = [key for key in kwargs if key not in options]
    if unknown:
        allowed = ", ".join(options) if options else "none"
        raise ValueError(f"metric {name!r} has no option(s) {', '.join(map(repr, unknown))}; its options: {allowed}")
    return cls(**kwargs)


def _is_evaluate_module(obj: Any) -> bool:
    # An evaluate module can only exist if `evaluate` was imported; don't import it.
    evaluate = sys.modules.get("evaluate")
    return evaluate is not None and isinstance(obj, evaluate.EvaluationModule)


def _resolve_one(thing: Any, key: str | None = None) -> tuple[str, MetricFn]:
    """(key, callable) for a name, a ``{"name": ..., **options}`` mapping, evaluate module, Metric or
    callable."""
    if isinstance(thing, str):
        return key or thing, get_metric(thing)
    if isinstance(thing, Mapping):
        options = dict(thing)
        name = options.pop("name", None)
        if not isinstance(name, str):
            raise ValueError(
                f"metric entry {thing!r} has no 'name': write {{name: bertscore, model_type: ...}}, with one of "
                f"{', '.join(sorted(_BUILTINS))}"
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
        f"Cannot use {thing!r} as a metric: pass a built-in name ({', '.join(sorted(_BUILTINS))}), "
        "a callable (predictions, references) -> dict[str, float], or an evaluate module"
    )


def resolve_metrics(spec: Any = None) -> dict[str, MetricFn]:
    """Turns a metric specification into ``{name: callable}``.

    Args:
        spec: ``None`` (exact match only), a built-in name, a built-in with options as a
            mapping (``{"name": "bertscore", "model_type": "/models/roberta-large"}``, what
            a YAML config file holds), a callable, a loaded `evaluate` module (wrapped in
            `EvaluateMetric`), or a list of those, or a dict mapping names to those (a dict
            with a ``"name"`` key is one metric with options). Keys are the built-in name, ``module.name``,
            `Metric.name`, or a callable's ``__name__`` (else its class name); dict
            keys are used as given.

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
        return {"exact_match": ExactMatch()}
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


# --------------------------------------------------------------------------- running


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


def _checked_float(metric_name: str, key: Any, value: Any) -> float:
    number = _as_float(value)
    if number is None:
        raise TypeError(f"metric {metric_name!r} returned {value!r} for {key!r}; expected a float")
    if math.isinf(number):
        raise ValueError(f"metric {metric_name!r} returned an infinite value for {key!r}")
    return number


def _validated_scores(scores: Any, metric_name: str) -> dict[str, float]:
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
            f"metric {metric_name!r}: per_sample returned {type(scores).__name__}, expected a dict of lists"
        )
    out = {}
    for key, values in scores.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) != n:
            raise ValueError(
                f"metric {metric_name!r}: per_sample[{key!r}] must be a list of {n} floats, one per sample"
            )
        out[str(key)] = [_checked_float(metric_name, f"{key}[{i}]", v) for i, v in enumerate(values)]
    return out


def compute_metrics(
    metrics: Mapping[str, MetricFn],
    predictions: Predictions,
    references: References,
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Runs each metric; returns the merged summary and per-sample scores.

    Output keys are the keys each metric returns, unchanged. Per-sample scores come
    from metrics with a ``per_sample`` method (duck-typed), one dict per prediction.

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
        >>> compute_metrics({"exact_match": ExactMatch()}, ["A cat"], [["cat", "dog"]])
        ({'exact_match': 1.0}, [{'exact_match': 1.0}])
    """
    _check_inputs(predictions, references)
    summary: dict[str, float] = {}
    per_sample: list[dict[str, float]] = [{} for _ in predictions]
    owner: dict[str, str] = {}
    sample_owner: dict[str, str] = {}
    for name, metric in metrics.items():
        scores = _validated_scores(metric(predictions, references), name)
        for key, value in scores.items():
            if key in owner:
                raise ValueError(
                    f"metrics {owner[key]!r} and {name!r} both return {key!r}; wrap one to "
                    "rename its keys, e.g. lambda p, r: {'my_' + k: v for k, v in m(p, r).items()}"
                )
            owner[key] = name
            summary[key] = value
        per_sample_fn = getattr(metric, "per_sample", None)
        if callable(per_sample_fn):
            columns = _validated_per_sample(per_sample_fn(predictions, references), name, len(predictions))
            for key, values in columns.items():
                if key in sample_owner:
                    raise ValueError(f"metrics {sample_owner[key]!r} and {name!r} both return per-sample {key!r}")
                sample_owner[key] = name
                for row, value in zip(per_sample, values):
                    row[key] = value
    return summary, per_sample
