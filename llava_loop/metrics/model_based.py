"""Metrics that run a model: BERTScore and NLI entailment.

Each loads its model lazily on the first call, once; `offload` moves it to the CPU after every
evaluation and the next call moves it back.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from .core import Metric, Predictions, References, Scores, _check_inputs

logger = logging.getLogger(__name__)


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


# --------------------------------------------------------------------------- BERTScore


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


def _read_baseline(path: str, num_layers: int) -> Any:
    """bert-score's baseline ``(P, R, F)`` for a layer, as float32: row ``num_layers`` of its table
    (a ``LAYER,P,R,F`` header, then one row per layer)."""
    import numpy as np
    import torch

    table = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)
    return torch.from_numpy(table[num_layers, 1:]).float()


class BERTScore(Metric):
    """BERTScore precision/recall/F1, equal to `bert_score.score`, each the best over the references.

    Built from bert-score's public functions on a model and tokenizer this object owns
    (``bert_score.utils.get_model``/``get_tokenizer``, loaded on the first call, once per run), so
    `offload` can move the model to the CPU; the next call moves it back. ``idf=True`` weights
    tokens by ``get_idf_dict`` over the references as given (duplicates count as documents);
    ``rescale_with_baseline`` maps each score ``x`` to ``(x - b) / (1 - b)``. An empty or
    whitespace-only side scores raw 0 (bert-score's rule, rescaled: negative); transformers 5
    tokenizers lack the ``build_inputs_with_special_tokens`` bert-score encodes it with, so our
    tokenizer instance gets one (nothing global is patched). See docs/evaluation.md.

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
        self._model = None  # the embedding model (our own object), loaded on the first call
        self._tokenizer = None  # its tokenizer, able to encode an empty sentence
        self._layer = -1  # the layer in use (num_layers, resolved on the first call)

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

    def _baseline_file(self) -> str:
        """``baseline_path``, else bert-score's file for ``lang`` and ``model_type``; raises if missing."""
        import bert_score

        path = self.baseline_path or os.path.join(
            os.path.dirname(bert_score.__file__), f"rescale_baseline/{self.lang}/{self.model_type}.tsv"
        )
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"BERTScore baseline {path!r}: no such file (model_type={self.model_type!r}, lang={self.lang!r}); "
                "pass baseline_path=, a file of your own with a LAYER,P,R,F header and one row per layer"
            )
        return path

    def check(self) -> None:
        """Raises if the model or the baseline file cannot be found or the layer is unknown (nothing is loaded)."""
        from ..modeling import check_model_source

        check_model_source(self.model_type, what="BERTScore model (bertscore model_type)")
        self._resolve_num_layers()
        if self.baseline_path is not None or self.rescale_with_baseline:
            self._baseline_file()

    def _load(self) -> Any:
        """The model on its device, loaded on the first call."""
        if self._model is None:
            num_layers = self._resolve_num_layers()
            from bert_score.utils import get_model, get_tokenizer

            logger.info("Loading BERTScore model %r (layer %d)", self.model_type, num_layers)
            try:
                tokenizer = get_tokenizer(self.model_type, use_fast=False)
                model = get_model(self.model_type, num_layers)
            except (OSError, ValueError) as err:
                raise _offline_error(
                    "BERTScore",
                    self.model_type,
                    "BERTScore(model_type='/path/to/roberta-large', num_layers=17)",
                    err,
                ) from err
            _encode_empty_sentences(tokenizer)
            self._tokenizer, self._model, self._layer = tokenizer, model, num_layers
        return self._model.to(_resolve_device(self.device))

    def score(self, predictions: Predictions, references: References) -> Scores:
        import torch
        from bert_score.utils import bert_cos_score_idf, get_idf_dict

        _check_inputs(predictions, references)
        model, tokenizer = self._load(), self._tokenizer
        # One (candidate, reference) pair per reference; bert-score scores the pairs.
        refs = [ref for group in references for ref in group]
        cands = [pred for pred, group in zip(predictions, references) for _ in group]
        if self.idf:
            weights = get_idf_dict(refs, tokenizer, nthreads=4)  # bert-score's default nthreads
        else:
            weights = defaultdict(lambda: 1.0, {tokenizer.sep_token_id: 0, tokenizer.cls_token_id: 0})
        pairs = bert_cos_score_idf(
            model, refs, cands, tokenizer, weights, batch_size=self.batch_size, device=_resolve_device(self.device)
        ).cpu()  # (pairs, 3): P, R, F1
        best, start = [], 0
        for group in references:
            best.append(pairs[start : start + len(group)].max(dim=0).values)
            start += len(group)
        scores = torch.stack(best)
        if self.rescale_with_baseline:
            baseline = _read_baseline(self._baseline_file(), self._layer)
            scores = (scores - baseline) / (1 - baseline)
        return Scores.mean_of(
            {
                "bertscore_precision": scores[:, 0].tolist(),
                "bertscore_recall": scores[:, 1].tolist(),
                "bertscore_f1": scores[:, 2].tolist(),
            }
        )

    def offload(self) -> None:
        """Moves the BERTScore model to the CPU; the next call moves it back."""
        if self._model is not None:
            self._model.to("cpu")
            _free_gpu_cache()


# --------------------------------------------------------------------------- NLI


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


class NLI(Metric):
    """Entailment probability from an NLI classifier, best reference, mean over samples.

    Any ``AutoModelForSequenceClassification`` works; the entailment class is the one
    label of ``config.id2label`` containing "entail" (case-insensitive; "not_entailment"
    does not count). Each (premise, hypothesis) pair is scored by
    ``transformers.pipeline("text-classification")`` with a softmax over the logits (pairs
    truncated to the model's length); a sample keeps its highest entailment probability over
    the references. The model is loaded lazily on the first call, once; `offload` moves it to
    the CPU.

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
        self._classifier = None  # the text-classification pipeline, built on the first call
        self._entailment = ""  # the entailment label of its config.id2label

    def __repr__(self) -> str:
        return f"NLI(model={self.model!r}, premise={self.premise!r})"

    def check(self) -> None:
        """Raises if the classifier cannot be found (nothing is loaded)."""
        from ..modeling import check_model_source

        check_model_source(self.model, what="NLI model (nli model)")

    def _load(self) -> Any:
        """The pipeline, its model on its device, built on the first call."""
        if self._classifier is None:
            from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

            logger.info("Loading NLI model %r", self.model)
            try:
                tokenizer = AutoTokenizer.from_pretrained(self.model)
                model = AutoModelForSequenceClassification.from_pretrained(self.model)
            except (OSError, ValueError) as err:
                raise _offline_error("NLI", self.model, "NLI(model='/path/to/deberta-large-mnli')", err) from err
            id2label = model.config.id2label
            self._entailment = id2label[_entailment_index(id2label, self.model)]
            device = _resolve_device(self.device)
            self._classifier = pipeline("text-classification", model=model, tokenizer=tokenizer, device=device)
        self._classifier.model.to(self._classifier.device)  # back from the CPU after offload()
        return self._classifier

    def score(self, predictions: Predictions, references: References) -> Scores:
        _check_inputs(predictions, references)
        classifier = self._load()
        pairs = [(ref, pred) for pred, refs in zip(predictions, references) for ref in refs]
        if self.premise == "prediction":
            pairs = [(pred, ref) for ref, pred in pairs]
        results = classifier(
            [{"text": premise, "text_pair": hypothesis} for premise, hypothesis in pairs],
            top_k=None,
            function_to_apply="softmax",
            batch_size=self.batch_size,
            truncation=True,
        )
        probs = [next(r["score"] for r in labels if r["label"] == self._entailment) for labels in results]
        best, start = [], 0
        for refs in references:
            best.append(max(probs[start : start + len(refs)]))
            start += len(refs)
        return Scores.mean_of({"nli_entailment": best})

    def offload(self) -> None:
        """Moves the NLI model to the CPU; the next call moves it back."""
        if self._classifier is not None:
            self._classifier.model.to("cpu")
            _free_gpu_cache()
