"""VQA accuracy: the official VQA evaluation script's answer normalisation tables and scoring rule."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from .core import Metric, Predictions, References, Scores, _check_inputs

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
    return math.fsum(min(1.0, (total - hit) / needed) for hit in matches) / n


class VQAAccuracy(Metric):
    """VQA accuracy, equal to the official VQA evaluation script (``vqaEval.py``).

    Prediction and references are normalised by the official rules (the tables and patterns
    above: punctuation, periods, number words, articles, contractions). A sample with ``n``
    references scores the mean over ``i`` of ``min(1, m_i / t)``, ``m_i`` the matches among the
    references other than ``i`` (duplicates are votes): ``t = 3`` for ``n >= 4`` (official),
    ``t = n - 1`` for 2 or 3 references (the official formula could never reach 1 there), and one
    reference is normalised exact match. The summary is the mean over samples, in [0, 1].

    One official quirk is dropped: when all references are the same string, the official script
    normalises nothing, so "yes" against ten "Yes!" scores 0 there and 1 here. Every other input
    with ``n >= 4`` scores as officially (tests/data/vqa_official_golden.json, docs/evaluation.md).

    Example:
        >>> refs = [["2"] * 3 + ["3"] * 7]  # 3 of 10 annotators said "2"
        >>> VQAAccuracy()(["Two"], refs)  # (7 * 3/3 + 3 * 2/3) / 10
        {'vqa_accuracy': 0.9}
        >>> VQAAccuracy()(["yes"], [["Yes!"] * 10])  # the official script says 0.0
        {'vqa_accuracy': 1.0}
    """

    name = "vqa_accuracy"
    keys = ("vqa_accuracy",)

    def score(self, predictions: Predictions, references: References) -> Scores:
        _check_inputs(predictions, references)
        accuracies = [
            _vqa_sample_accuracy(_vqa_normalize(pred), [_vqa_normalize(r) for r in refs])
            for pred, refs in zip(predictions, references)
        ]
        return Scores.mean_of({"vqa_accuracy": accuracies})
