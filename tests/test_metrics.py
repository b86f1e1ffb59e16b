"""Tests for llava_loop.metrics: built-ins equal their reference libraries, offline."""

import json
import math
import string
from pathlib import Path

import pytest
import torch

from llava_loop import metrics as M
from llava_loop.testing import tiny_bert

VQA_GOLDEN = Path(__file__).parent / "data" / "vqa_official_golden.json"

PREDS = ["the cat sat on the mat", "a dog is running", "hello world", "blue rug"]
REFS = [
    ["the cat sat on a mat", "a cat is on the mat"],
    ["the dog was running in the park"],
    ["hello there world", "hello world", "world"],
    ["a red rug"],
]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    """A 2-layer, 32-wide BERT + WordPiece tokenizer saved locally (it knows every word of PREDS and REFS)."""
    return tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


NLI_LABELS = {0: "ENTAILMENT", 1: "NEUTRAL", 2: "CONTRADICTION"}
NLI_LABELS_ENTAIL_LAST = {0: "contradiction", 1: "neutral", 2: "entailment"}


@pytest.fixture(scope="session")
def nli_dirs(tmp_path_factory):
    """The same tiny BERT classifier (one seed) saved under three id2label mappings, and as a multi-label classifier."""
    dirs = {}
    for name, id2label in [
        ("entail_first", NLI_LABELS),
        ("entail_last", NLI_LABELS_ENTAIL_LAST),
        ("no_entail", {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}),
        ("multi_label", NLI_LABELS),  # the text-classification pipeline would default to a sigmoid
    ]:
        problem = "multi_label_classification" if name == "multi_label" else None
        path = tmp_path_factory.mktemp(f"nli_{name}")
        dirs[name] = tiny_bert(path, seed=1, id2label=id2label, problem_type=problem)
    return dirs


EVALUATE_SCRIPT = """
import datasets
import evaluate


class {cls}(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="toy", citation="", inputs_description="",
            features=datasets.Features({{
                "predictions": datasets.Value("string"),
                "references": {references},
            }}),
        )

    def _compute(self, predictions, references):
        refs = [r if isinstance(r, list) else [r] for r in references]
        hits = [float(p in r) for p, r in zip(predictions, refs)]
        return {{
            "hit_rate": sum(hits) / len(hits),
            "detail": {{"n": len(hits), "label": "text is dropped"}},
            "per_sample": hits,
        }}
"""


def _load_evaluate_script(tmp_path, name, references_feature):
    import evaluate

    script = tmp_path / f"{name}.py"
    cls = "".join(part.title() for part in name.split("_"))
    script.write_text(EVALUATE_SCRIPT.format(cls=cls, references=references_feature))
    return evaluate.load(str(script), cache_dir=str(tmp_path / "cache"))


@pytest.fixture
def multi_ref_module(tmp_path):
    return _load_evaluate_script(tmp_path, "toy_hits", 'datasets.Sequence(datasets.Value("string"))')


@pytest.fixture
def single_ref_module(tmp_path):
    return _load_evaluate_script(tmp_path, "toy_single", 'datasets.Value("string")')


# --------------------------------------------------------------------------- protocol


class Words(M.Metric):
    """A metric written to the protocol: one score call, summary and per-sample scores."""

    name = "words"
    keys = ("words",)

    def __init__(self):
        self.calls = 0

    def score(self, predictions, references):
        self.calls += 1
        return M.Scores.mean_of({"words": [float(len(p.split())) for p in predictions]})


def test_compute_metrics_calls_score_once_for_summary_and_per_sample_scores():
    metric = Words()
    summary, rows = M.compute_metrics({"words": metric}, ["a b", "c d e f"], [["x"], ["y"]])
    assert metric.calls == 1, f"score should run once per evaluation, ran {metric.calls} times"
    assert summary == {"words": 3.0}, f"summary should be the mean of the per-sample scores: {summary}"
    assert rows == [{"words": 2.0}, {"words": 4.0}], f"per-sample rows: {rows}"
    assert metric(["a b c"], [["x"]]) == {"words": 3.0}, "calling a metric should return score's summary"


def test_a_metric_with_only_call_reports_its_summary_and_no_per_sample_scores():
    class Length(M.Metric):  # the pre-0.2 documented example: __call__ only
        name = "length"

        def __call__(self, predictions, references):
            return {"length": sum(map(len, predictions)) / len(predictions)}

    assert Length().score(["ab", "abcd"], [["x"], ["y"]]) == ({"length": 3.0}, {}), "score from __call__"
    summary, rows = M.compute_metrics({"length": Length()}, ["ab", "abcd"], [["x"], ["y"]])
    assert (summary, rows) == ({"length": 3.0}, [{}, {}]), f"summary only: {summary}, {rows}"


def test_a_metric_with_neither_score_nor_call_says_what_to_implement():
    class Empty(M.Metric):
        pass

    for call in (Empty(), Empty().score):
        with pytest.raises(NotImplementedError, match="Empty must implement score"):
            call(["a"], [["a"]])


def test_a_metric_with_a_0_1_per_sample_method_keeps_its_per_sample_scores_and_is_told_to_use_score():
    class OldWords:  # 0.1 protocol: __call__ for the summary, per_sample for the rows
        def __call__(self, predictions, references):
            return {"words": 1.5}

        def per_sample(self, predictions, references):
            return {"words": [1.0, 2.0]}

    with pytest.warns(FutureWarning, match=r"'old' has a per_sample method.*score\(predictions, references\)"):
        summary, rows = M.compute_metrics({"old": OldWords()}, ["a", "b c"], [["x"], ["y"]])
    assert (summary, rows) == ({"words": 1.5}, [{"words": 1.0}, {"words": 2.0}]), f"{summary}, {rows}"


def test_compute_metrics_names_the_metric_whose_score_returns_no_scores():
    class Returns(M.Metric):
        def __init__(self, result):
            self.result = result

        def score(self, predictions, references):
            return self.result

    with pytest.raises(TypeError, match=r"'bad': score returned dict, expected Scores\(summary, per_sample\)"):
        M.compute_metrics({"bad": Returns({"x": 1.0})}, ["a"], [["a"]])
    with pytest.raises(ValueError, match="'short': per-sample scores 'x' must be a list of 1 floats"):
        M.compute_metrics({"short": Returns(M.Scores({"x": 1.0}, {"x": []}))}, ["a"], [["a"]])


# --------------------------------------------------------------------------- exact match


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("The Cat", "cat", 1.0),
        ("cat.", "cat", 1.0),
        ("an  apple!", "Apple", 1.0),
        ("a  big\tdog", "big dog", 1.0),
        ("there", "the", 0.0),  # only whole-word articles are removed
        ("cats", "cat", 0.0),
    ],
)
def test_exact_match_applies_squad_normalisation(prediction, reference, expected):
    got = M.ExactMatch()([prediction], [[reference]])
    assert got == {"exact_match": expected}, f"{prediction!r} vs {reference!r}: got {got}"


def test_exact_match_takes_any_reference_and_averages_samples():
    metric = M.ExactMatch()
    preds, refs = ["cat", "dog", "cow"], [["dog", "Cat"], ["cat"], ["a cow", "bull"]]
    assert metric(preds, refs) == pytest.approx({"exact_match": 2 / 3}), "mean of [1, 0, 1] should be 2/3"
    assert metric.score(preds, refs).per_sample == {"exact_match": [1.0, 0.0, 1.0]}, "per-sample hits are wrong"


# --------------------------------------------------------------------------- VQA accuracy


@pytest.mark.parametrize(
    ("matches", "expected"),
    [
        # acc = mean over the 10 leave-one-out subsets of min(1, matches_in_other_9 / 3)
        (0, 0.0),  # every subset has 0 matches
        (1, 0.3),  # 9 subsets see 1 -> 1/3, 1 sees 0:          (9 * 1/3) / 10 = 0.3
        (2, 0.6),  # 8 see 2 -> 2/3, 2 see 1 -> 1/3: (8 * 2/3 + 2 * 1/3) / 10 = 0.6
        (3, 0.9),  # 7 see 3 -> 1, 3 see 2 -> 2/3:   (7 * 1 + 3 * 2/3) / 10 = 0.9
        (4, 1.0),  # 6 see 4 -> 1, 4 see 3 -> 1:     (6 + 4) / 10 = 1.0
        (10, 1.0),
    ],
)
def test_vqa_accuracy_with_ten_references_follows_official_formula(matches, expected):
    refs = ["2"] * matches + ["3"] * (10 - matches)
    got = M.VQAAccuracy()(["2"], [refs])["vqa_accuracy"]
    assert got == pytest.approx(expected), f"{matches}/10 matching answers should score {expected}, got {got}"


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("Two", "2", 1.0),  # number words -> digits, lowercased
        ("none", "0", 1.0),
        ("yes.", "yes", 1.0),  # period not followed by a digit is stripped
        ("2.5", "25", 0.0),  # ... but a decimal point is kept
        ("the dog", "dog", 1.0),  # articles removed
        ("a red car", "red car", 1.0),
        ("1,000", "1000", 1.0),  # digit-comma-digit: punctuation deleted, not spaced
        ("black/white", "black white", 1.0),  # otherwise punctuation becomes a space
        ("dont", "don't", 1.0),  # official contractions table (straight apostrophes)
        ("dont", "dont", 1.0),
        ("youre", "you're", 1.0),
        ("whats", "what's", 1.0),
        ("isnt", "isn't", 1.0),
        ("oclock", "o'clock", 1.0),
        ("wheres", "where's", 1.0),
        ("dont", "don’t", 0.0),  # a curly apostrophe is not punctuation there: no match
        ("Yes!", "yes", 1.0),  # "!" is in the official punctuation list
        ("{yes}", "yes", 1.0),
        ("t-shirt", "t shirt", 1.0),  # "-" becomes a space
        ("3:00", "3 00", 0.0),  # ":" is not in the list (it was in the 2015 draft)
        ("yes" + "." * 40, "yes", 0.0),  # the official code removes at most 32 periods
        ("  yes\n", "Yes", 1.0),
        ("cat", "cats", 0.0),
    ],
)
def test_vqa_accuracy_normalises_answers_like_the_official_script(prediction, reference, expected):
    got = M.VQAAccuracy()([prediction], [[reference]])["vqa_accuracy"]
    assert got == expected, f"{prediction!r} vs {reference!r}: expected {expected}, got {got}"


def _official_skips_normalisation(case):
    """Whether the official script compares ``case`` raw: all answers identical after its
    newline/tab/strip step, so it normalises neither them nor the prediction (a quirk we drop)."""

    def clean(text):
        return text.replace("\n", " ").replace("\t", " ").strip()

    answers = {clean(a) for a in case["answers"]}
    return len(answers) == 1 and clean(case["prediction"]) not in answers


def _golden_vqa_cases():
    return json.loads(VQA_GOLDEN.read_text(encoding="utf-8"))["cases"]


def test_vqa_golden_cases_cover_every_official_rule():
    cases = _golden_vqa_cases()
    texts = [t for c in cases for t in [c["prediction"], *c["answers"]]]
    everything = "\n".join(texts)
    for mark in string.punctuation + "’":
        assert mark in everything, f"no golden case contains {mark!r}; regenerate with more punctuation"
    for needle in ["dont", "youre", "whats", "isnt", "oclock", "wheres", "1,000", "2.5", "yes.", "\t", "The "]:
        assert needle in everything, f"no golden case contains {needle!r}"
    assert any(t.count(".") > 32 for t in texts), "no golden case has more than 32 periods"
    assert any(w in t.lower().split() for t in texts for w in ["two", "ten", "none", "zero"]), "no number words"
    sizes = {len(c["answers"]) for c in cases}
    assert 10 in sizes and len(sizes) > 3, f"golden answer-set sizes {sizes}: need 10 and others >= 4"
    assert len({c["official"] for c in cases}) > 10, "golden scores should cover many partial values"


def test_vqa_accuracy_equals_the_official_script_on_golden_cases():
    """tests/data/vqa_official_golden.json: scores of the official vqaEval.py (Python 2.7), made by
    tests/data/make_vqa_golden.py. Equal on every case except where the official script skips
    normalisation because all answers are identical; there it says 0 and we say 1 for
    predictions that match only after normalisation ("yes" vs ten "Yes!")."""
    cases = _golden_vqa_cases()
    assert len(cases) >= 500, f"only {len(cases)} golden cases"
    got = M.VQAAccuracy().score([c["prediction"] for c in cases], [c["answers"] for c in cases]).per_sample
    differ = []
    for case, ours in zip(cases, got["vqa_accuracy"]):
        if abs(ours - case["official"]) <= 1e-12:
            continue
        assert _official_skips_normalisation(case) and case["official"] == 0.0 and ours == 1.0, (
            f"VQAAccuracy {ours} != official {case['official']} for {case['prediction']!r} vs {case['answers']!r}"
        )
        differ.append(case)
    assert differ, "the golden set should include the documented quirk (identical answers, e.g. ten 'Yes!')"
    assert len(differ) < len(cases) // 10, f"{len(differ)} quirk cases: too many for the quirk alone"


@pytest.mark.parametrize(
    ("refs", "expected"),
    [
        (["cat"], 1.0),  # n = 1: plain normalised exact match
        (["dog"], 0.0),
        (["cat", "dog"], 0.5),  # n = 2, t = 1: leave out dog -> 1, leave out cat -> 0
        (["cat", "cat"], 1.0),
        (["cat", "dog", "cow"], 1 / 3),  # n = 3, t = 2: (1/2 + 1/2 + 0) / 3
        (["cat", "cat", "dog"], 2 / 3),  # (1/2 + 1/2 + 2/2) / 3
        (["cat", "cat", "cat", "dog"], 0.75),  # n = 4, t = 3: (3 * 2/3 + 3/3) / 4
    ],
)
def test_vqa_accuracy_with_fewer_references_uses_t_min_3_n_minus_1(refs, expected):
    got = M.VQAAccuracy()(["Cat"], [refs])["vqa_accuracy"]
    assert got == pytest.approx(expected), f"refs {refs}: expected {expected}, got {got}"


def test_vqa_accuracy_reports_per_sample_scores_and_their_mean():
    metric = M.VQAAccuracy()
    preds, refs = ["two", "no"], [["2"] * 10, ["yes"] * 9 + ["no"]]
    assert metric.score(preds, refs).per_sample["vqa_accuracy"] == pytest.approx([1.0, 0.3]), "per-sample VQA accuracy"
    assert metric(preds, refs)["vqa_accuracy"] == pytest.approx(0.65), "summary should be the per-sample mean"


# --------------------------------------------------------------------------- BLEU / ROUGE


def test_bleu_equals_sacrebleu_with_one_reference():
    import sacrebleu

    refs = [r[:1] for r in REFS]
    expected = sacrebleu.corpus_bleu(PREDS, [[r[0] for r in refs]]).score
    got = M.BLEU()(PREDS, refs)
    assert got == {"bleu": pytest.approx(expected, abs=1e-12)}, f"BLEU {got} != sacrebleu {expected}"
    assert M.BLEU().score(PREDS, refs).per_sample == {}, "corpus BLEU has no per-sample score"


def test_bleu_equals_sacrebleu_with_several_references():
    import sacrebleu

    refs = [["the cat sat on a mat", "a cat sat"], ["a dog runs", "the dog is running"]]
    preds = ["the cat sat on the mat", "a dog is running"]
    expected = sacrebleu.corpus_bleu(preds, [[r[0] for r in refs], [r[1] for r in refs]]).score
    assert M.BLEU()(preds, refs)["bleu"] == pytest.approx(expected, abs=1e-12), "multi-reference BLEU"


def test_bleu_skips_missing_references_when_counts_vary():
    import sacrebleu

    # Repeating an existing reference changes neither n-gram max counts nor the
    # closest reference length, so it is an independent check that padding is ignored.
    # The last sample (1 word vs a 5-word reference) would lose its brevity penalty
    # if padding counted as an empty reference.
    preds, refs = [*PREDS, "world"], [*REFS, ["hello world in the park"]]
    n = max(len(r) for r in refs)
    padded = [r + [r[0]] * (n - len(r)) for r in refs]
    expected = sacrebleu.corpus_bleu(preds, [list(s) for s in zip(*padded)]).score
    got = M.BLEU()(preds, refs)["bleu"]
    assert got == pytest.approx(expected, abs=1e-12), f"varying reference counts: {got} != {expected}"
    assert 0.0 < got < 100.0, f"BLEU is on sacreBLEU's 0-100 scale, got {got}"


# VQA votes: the same reference several times. Only vqa_accuracy counts them; the others take
# the best reference (or sacreBLEU's max n-gram counts and closest length), so duplicates change
# nothing and the user's list is passed as given.
DUPLICATED_REFS = [[r, *refs] for refs in REFS for r in refs[:1]]


@pytest.mark.parametrize("name", ["exact_match", "bleu", "rouge"])
def test_duplicate_references_score_like_the_deduplicated_list(name):
    with_duplicates = M.get_metric(name)(PREDS, DUPLICATED_REFS)
    unique = M.get_metric(name)(PREDS, REFS)
    assert with_duplicates == pytest.approx(unique, abs=1e-12), (
        f"{name}: duplicates changed the score: {with_duplicates} vs {unique}"
    )


def test_bleu_with_duplicate_references_equals_sacrebleu_on_the_reference_list_as_given():
    import sacrebleu

    streams = [[refs[i] if i < len(refs) else None for refs in DUPLICATED_REFS] for i in range(4)]
    assert max(len(r) for r in DUPLICATED_REFS) == 4, "test setup: 4 reference streams"
    expected = sacrebleu.corpus_bleu(PREDS, streams).score
    unique = sacrebleu.corpus_bleu(PREDS, [[refs[i] if i < len(refs) else None for refs in REFS] for i in range(3)])
    assert M.BLEU()(PREDS, DUPLICATED_REFS)["bleu"] == pytest.approx(expected, abs=1e-12), "BLEU != sacreBLEU"
    assert expected == pytest.approx(unique.score, abs=1e-12), "sacreBLEU itself ignores duplicate references"


def test_vqa_accuracy_counts_duplicate_references_as_votes():
    votes = ["2"] * 9 + ["3"]
    got = M.VQAAccuracy().score(["3", "2"], [votes, votes]).per_sample["vqa_accuracy"]
    assert got == pytest.approx([0.3, 1.0]), f"one vote of ten should give 0.3, nine 1.0: {got}"
    assert M.VQAAccuracy()(["3"], [["2", "3"]])["vqa_accuracy"] == 0.5, "de-duplicated list gives 0.5"


def test_rouge_equals_rouge_score_best_reference_mean():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    expected = {}
    for key in ["rouge1", "rouge2", "rougeL", "rougeLsum"]:
        best = [max(scorer.score(r, p)[key].fmeasure for r in refs) for p, refs in zip(PREDS, REFS)]
        expected[key] = best
    metric = M.ROUGE()
    per_sample = metric.score(PREDS, REFS).per_sample
    for key, values in expected.items():
        assert per_sample[key] == pytest.approx(values, abs=1e-12), f"per-sample {key}"
        assert metric(PREDS, REFS)[key] == pytest.approx(sum(values) / len(values), abs=1e-12), f"mean {key}"


# --------------------------------------------------------------------------- BERTScore


@pytest.mark.parametrize("idf", [False, True])
def test_bertscore_equals_bert_score_with_best_reference(tiny_bert_dir, idf):
    import bert_score

    P, R, F = bert_score.score(PREDS, REFS, model_type=tiny_bert_dir, num_layers=2, idf=idf, device="cpu")
    metric = M.BERTScore(model_type=tiny_bert_dir, num_layers=2, idf=idf, device="cpu", batch_size=3)
    got = metric.score(PREDS, REFS).per_sample
    for key, expected in [("precision", P), ("recall", R), ("f1", F)]:
        assert got[f"bertscore_{key}"] == pytest.approx(expected.tolist(), abs=1e-6), f"{key} per sample"
        assert metric(PREDS, REFS)[f"bertscore_{key}"] == pytest.approx(expected.mean().item(), abs=1e-6), key


EMPTY_PREDS = ["", "   \n\t", "a cat", "blue rug", "hello world"]
EMPTY_REFS = [["the cat sat"], ["a dog", "hello world"], ["", "  "], ["a red rug", " "], ["hello world"]]
BASELINE = {"P": 0.3, "R": 0.4, "F": 0.5}  # for layer 2 of the tiny BERT


def _baseline_file(tmp_path):
    """A bert-score baseline file: header, then one row per layer (row 2 is used with num_layers=2)."""
    path = tmp_path / "baseline.tsv"
    rows = ["LAYER,P,R,F", "0,0.9,0.9,0.9", "1,0.8,0.8,0.8", "2,{P},{R},{F}".format(**BASELINE)]
    path.write_text("\n".join(rows) + "\n")
    return str(path)


@pytest.mark.parametrize("rescale", [False, True], ids=["raw", "rescaled"])
def test_bertscore_scores_empty_and_whitespace_strings_by_bert_scores_rule(tiny_bert_dir, tmp_path, rescale):
    """bert-score's rule (bert_score/utils.py): sentences are stripped; a pair with an empty side
    scores raw P = R = F = 0; the best reference wins; rescaling maps 0 to (0 - b) / (1 - b)."""
    import bert_score

    kwargs = {"model_type": tiny_bert_dir, "num_layers": 2, "device": "cpu"}
    if rescale:
        kwargs.update(lang="en", rescale_with_baseline=True, baseline_path=_baseline_file(tmp_path))
    got = M.BERTScore(batch_size=64, **kwargs).score(EMPTY_PREDS, EMPTY_REFS).per_sample
    # The non-empty pairs through bert_score.score itself (it cannot run on the empty ones).
    P, R, F = bert_score.score(["blue rug", "hello world"], [["a red rug"], ["hello world"]], batch_size=64, **kwargs)
    for key, letter, expected in [("precision", "P", P), ("recall", "R", R), ("f1", "F", F)]:
        b = torch.tensor(BASELINE[letter])  # float32, as bert-score computes
        zero = ((0.0 - b) / (1.0 - b)).item() if rescale else 0.0
        values = got[f"bertscore_{key}"]
        assert values[:3] == [zero, zero, zero], (
            f"{key}: empty or whitespace-only prediction, or only empty references, should score {zero}: {values[:3]}"
        )
        assert expected[0].item() > zero, "test setup: 'blue rug' vs 'a red rug' should beat an empty reference"
        assert values[3:] == expected.tolist(), (
            f"{key}: non-empty pairs must equal bert_score.score {expected.tolist()}, got {values[3:]}"
        )


def test_bertscore_with_idf_scores_empty_strings_zero_in_bert_scores_process_pool(tiny_bert_dir):
    """With idf, bert-score counts tokens in a process pool: the tokenizer is pickled to the workers,
    which encode the empty references with its build_inputs_with_special_tokens (a lambda there, or
    none, would raise here)."""
    metric = M.BERTScore(model_type=tiny_bert_dir, num_layers=2, device="cpu", idf=True)
    got = metric.score(EMPTY_PREDS, EMPTY_REFS).per_sample
    assert got["bertscore_f1"][:3] == [0.0, 0.0, 0.0], f"empty sides should score 0 with idf too: {got}"
    assert all(v > 0 for v in got["bertscore_f1"][3:]), f"non-empty pairs should score: {got}"


def test_bertscore_reads_num_layers_from_a_local_config(tiny_bert_dir):
    explicit = M.BERTScore(model_type=tiny_bert_dir, num_layers=2, device="cpu")(PREDS, REFS)
    implicit = M.BERTScore(model_type=tiny_bert_dir, device="cpu")(PREDS, REFS)
    assert implicit == pytest.approx(explicit), "num_layers=None should use the config's 2 layers"


def test_bertscore_without_layer_count_asks_for_num_layers(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="num_layers") as err:
        M.BERTScore(model_type=str(tmp_path))(["a"], [["a"]])
    assert str(tmp_path) in str(err.value), "the message should name the model"


def test_bertscore_loads_model_once_scores_once_and_survives_offload(tiny_bert_dir, monkeypatch):
    import bert_score.utils

    built, scored = [], []
    get_model, bert_cos_score_idf = bert_score.utils.get_model, bert_score.utils.bert_cos_score_idf

    def counting_get_model(*args, **kwargs):
        built.append(args)
        return get_model(*args, **kwargs)

    def counting_scores(*args, **kwargs):
        scored.append(1)
        return bert_cos_score_idf(*args, **kwargs)

    monkeypatch.setattr(bert_score.utils, "get_model", counting_get_model)
    monkeypatch.setattr(bert_score.utils, "bert_cos_score_idf", counting_scores)
    metric = M.BERTScore(model_type=tiny_bert_dir, num_layers=2, device="cpu")
    assert not built, "the model must not load before the first call"
    summary, per_sample = M.compute_metrics({"bertscore": metric}, PREDS, REFS)
    assert len(scored) == 1, f"summary + per-sample should share one scoring pass, got {len(scored)}"
    assert per_sample[0].keys() == {
        "bertscore_precision",
        "bertscore_recall",
        "bertscore_f1",
    }, "per-sample keys"
    metric.offload()
    again, _ = M.compute_metrics({"bertscore": metric}, PREDS[::-1], REFS[::-1])
    assert len(built) == 1, f"model should load once per run, loaded {len(built)} times"
    assert again == pytest.approx(summary), "scores after offload() should not change"


def test_bertscore_reads_every_baseline_bert_score_ships_as_bert_score_does():
    """The one bert-score rule we read ourselves: row ``num_layers`` of the baseline table, P/R/F as
    float32 (bert-score: ``pandas.read_csv(path).iloc[layer]``), for every file it ships."""
    import bert_score
    import pandas as pd

    from llava_loop.metrics.model_based import _read_baseline

    files = sorted(Path(bert_score.__file__).parent.glob("rescale_baseline/**/*.tsv"))
    assert len(files) > 20, f"test setup: bert-score should ship its baselines, found {len(files)}"
    for path in files:
        table = pd.read_csv(path)
        for layer in range(len(table)):
            expected = torch.from_numpy(table.iloc[layer].to_numpy())[1:].float()
            got = _read_baseline(str(path), layer)
            assert torch.equal(got, expected), f"{path} layer {layer}: {got} != bert-score's {expected}"


def test_bertscore_rescaling_without_a_baseline_file_fails_before_training(tiny_bert_dir):
    metric = M.BERTScore(model_type=tiny_bert_dir, num_layers=2, lang="en", rescale_with_baseline=True)
    with pytest.raises(FileNotFoundError, match="baseline .*no such file.*pass baseline_path="):
        metric.check()


def test_bertscore_missing_model_offline_raises_clear_error():
    metric = M.BERTScore(model_type="roberta-large")  # not cached, HF_HUB_OFFLINE=1
    with pytest.raises(RuntimeError, match="not available offline") as err:
        metric(["a cat"], [["a cat"]])
    assert "local directory" in str(err.value), f"message should say how to pass a local path: {err.value}"


# --------------------------------------------------------------------------- NLI


def _manual_entailment(model_dir, premises_hypotheses, index):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    probs = []
    with torch.no_grad():
        for premise, hypothesis in premises_hypotheses:
            logits = model(**tokenizer(premise, hypothesis, return_tensors="pt")).logits[0]
            exp = [math.exp(x) for x in logits.tolist()]
            probs.append(exp[index] / sum(exp))
    return probs


def _best_per_sample(probs):
    out, start = [], 0
    for refs in REFS:
        out.append(max(probs[start : start + len(refs)]))
        start += len(refs)
    return out


@pytest.mark.parametrize(("model", "index"), [("entail_first", 0), ("entail_last", 2), ("multi_label", 0)])
def test_nli_equals_manual_softmax_with_label_index_from_config(nli_dirs, model, index):
    pairs = [(ref, pred) for pred, refs in zip(PREDS, REFS) for ref in refs]
    expected = _best_per_sample(_manual_entailment(nli_dirs[model], pairs, index))
    other = _best_per_sample(_manual_entailment(nli_dirs[model], pairs, 2 - index))
    assert max(abs(a - b) for a, b in zip(expected, other)) > 1e-3, "test model can't tell labels apart"
    metric = M.NLI(model=nli_dirs[model], batch_size=2, device="cpu")
    got = metric.score(PREDS, REFS).per_sample["nli_entailment"]
    assert got == pytest.approx(expected, abs=1e-5), f"entailment must be label {index} from config.id2label"
    summary = metric(PREDS, REFS)
    assert summary == {"nli_entailment": pytest.approx(sum(expected) / len(expected), abs=1e-5)}, "mean"


def test_nli_premise_prediction_swaps_the_pair(nli_dirs):
    pairs = [(pred, ref) for pred, refs in zip(PREDS, REFS) for ref in refs]
    expected = _best_per_sample(_manual_entailment(nli_dirs["entail_first"], pairs, 0))
    got = M.NLI(model=nli_dirs["entail_first"], premise="prediction", device="cpu").score(PREDS, REFS).per_sample
    assert got["nli_entailment"] == pytest.approx(expected, abs=1e-5), "prediction should be the premise"


def test_nli_without_entailment_label_raises(nli_dirs):
    with pytest.raises(ValueError, match="entailment label"):
        M.NLI(model=nli_dirs["no_entail"], device="cpu")(["a"], [["a"]])


def test_nli_missing_model_offline_raises_clear_error():
    with pytest.raises(RuntimeError, match="not available offline"):
        M.NLI()(["a cat"], [["a cat"]])


def test_nli_rejects_unknown_premise():
    with pytest.raises(ValueError, match="premise"):
        M.NLI(premise="hypothesis")


# --------------------------------------------------------------------------- evaluate adapter


def test_evaluate_module_is_wrapped_and_flattened(multi_ref_module):
    metrics = M.resolve_metrics(multi_ref_module)
    assert list(metrics) == ["toy_hits"], f"key should be module.name, got {list(metrics)}"
    metric = metrics["toy_hits"]
    assert isinstance(metric, M.EvaluateMetric), "an evaluate module should be wrapped in EvaluateMetric"
    got = metric(["a", "b"], [["a", "c"], ["d"]])
    assert got == {"hit_rate": 0.5, "detail_n": 2.0}, f"scalars kept, nested dict flattened, rest dropped: {got}"


def test_evaluate_module_with_single_reference_features_gets_strings(single_ref_module):
    metric = M.EvaluateMetric(single_ref_module)
    assert metric(["a", "b"], [["a"], ["d"]])["hit_rate"] == 0.5, "single references should be passed as strings"
    with pytest.raises(ValueError, match="one reference per prediction"):
        metric(["a"], [["a", "b"]])


# --------------------------------------------------------------------------- registry


def test_get_metric_unknown_name_lists_available_names():
    with pytest.raises(ValueError, match="Unknown metric 'blue'") as err:
        M.get_metric("blue")
    for name in ["exact_match", "vqa_accuracy", "bleu", "rouge", "bertscore", "nli"]:
        assert name in str(err.value), f"available name {name!r} missing from: {err.value}"


def test_get_metric_passes_kwargs():
    metric = M.get_metric("nli", model="/models/nli", premise="prediction")
    assert isinstance(metric, M.NLI) and metric.premise == "prediction", f"kwargs not applied: {metric!r}"


def length(predictions, references):
    return {"length": sum(map(len, predictions)) / len(predictions)}


class Shout:
    def __call__(self, predictions, references):
        return {"shout": 1.0}


def test_resolve_metrics_accepts_none_names_callables_lists_and_dicts():
    assert list(M.resolve_metrics(None)) == ["exact_match"], "None should mean exact match"
    assert isinstance(M.resolve_metrics("rouge")["rouge"], M.ROUGE), "a name should build the built-in"
    assert M.resolve_metrics(length) == {"length": length}, "a function is keyed by __name__"
    assert list(M.resolve_metrics(Shout())) == ["Shout"], "a callable object is keyed by class name"
    assert list(M.resolve_metrics(["bleu", length, M.VQAAccuracy()])) == [
        "bleu",
        "length",
        "vqa_accuracy",
    ], "list"
    named = M.resolve_metrics({"acc": "vqa_accuracy", "len": length})
    assert isinstance(named["acc"], M.VQAAccuracy) and named["len"] is length, "dict keys should be used as names"


def test_resolve_metrics_rejects_duplicates_and_non_metrics():
    with pytest.raises(ValueError, match="'bleu'"):
        M.resolve_metrics(["bleu", M.BLEU()])
    with pytest.raises(TypeError, match="as a metric"):
        M.resolve_metrics([42])


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("eval/rougeL", True),
        ("eval/loss", False),
        ("train/loss", False),
        ("eval/val_loss", False),
        ("eval/perplexity", False),
        ("ppl", False),
        ("eval/wer", False),
        ("cer", False),
        ("test_wer", False),
        ("eval/answer_f1", True),  # "wer" inside "answer" is not WER
        ("loss/bleu", True),  # only the last component counts
        ("eval/bleu", True),
    ],
)
def test_greater_is_better_by_last_key_component(key, expected):
    assert M.greater_is_better(key) is expected, f"greater_is_better({key!r}) should be {expected}"


# --------------------------------------------------------------------------- compute_metrics


def test_compute_metrics_merges_summaries_and_per_sample_rows():
    metrics = M.resolve_metrics(["exact_match", "vqa_accuracy", "bleu", length])
    summary, per_sample = M.compute_metrics(metrics, ["Two", "cat"], [["2"], ["cat", "dog"]])
    assert summary.keys() == {"exact_match", "vqa_accuracy", "bleu", "length"}, f"summary keys: {summary}"
    assert summary["exact_match"] == 0.5 and summary["vqa_accuracy"] == 0.75, f"summary values: {summary}"
    assert per_sample == [
        {"exact_match": 0.0, "vqa_accuracy": 1.0},
        {"exact_match": 1.0, "vqa_accuracy": 0.5},
    ], f"per-sample rows: {per_sample}"


def test_compute_metrics_names_the_metric_that_returns_a_non_dict():
    with pytest.raises(TypeError, match="'bad'.*returned float"):
        M.compute_metrics({"bad": lambda p, r: 0.5}, ["a"], [["a"]])


def test_compute_metrics_rejects_colliding_keys_and_infinite_values_but_allows_nan():
    with pytest.raises(ValueError, match="'one' and 'two' both return 'score'"):
        M.compute_metrics(
            {"one": lambda p, r: {"score": 1.0}, "two": lambda p, r: {"score": 0.0}},
            ["a"],
            [["a"]],
        )
    with pytest.raises(ValueError, match="infinite"):
        M.compute_metrics({"inf": lambda p, r: {"x": float("inf")}}, ["a"], [["a"]])
    with pytest.raises(TypeError, match="expected a float"):
        M.compute_metrics({"text": lambda p, r: {"x": "high"}}, ["a"], [["a"]])
    summary, _ = M.compute_metrics({"nan": lambda p, r: {"x": float("nan")}}, ["a"], [["a"]])
    assert math.isnan(summary["x"]), f"nan should pass through, got {summary}"


def test_compute_metrics_rejects_flat_references_and_length_mismatch():
    with pytest.raises(TypeError, match=r"wrap a single reference as \[reference\]"):
        M.compute_metrics(M.resolve_metrics(None), ["cat"], ["cat"])
    with pytest.raises(ValueError, match="2 predictions but 1 reference lists"):
        M.compute_metrics(M.resolve_metrics(None), ["cat", "dog"], [["cat"]])
    with pytest.raises(ValueError, match="no references"):
        M.compute_metrics(M.resolve_metrics(None), ["cat"], [[]])


@pytest.mark.parametrize("name", ["exact_match", "vqa_accuracy", "bleu", "rouge"])
def test_builtin_metric_reports_exactly_its_declared_keys(name):
    metric = M.get_metric(name)
    scores = metric(["a red car", "two"], [["a red car"], ["2", "two"]])
    assert tuple(sorted(scores)) == tuple(sorted(metric.keys)), (
        f"{name} reports {sorted(scores)} but declares {metric.keys} (metric_for_best checks use the declaration)"
    )


def test_a_metric_with_options_is_a_mapping_with_its_name():
    metrics = M.resolve_metrics(["exact_match", {"name": "bertscore", "model_type": "/m/roberta", "num_layers": 9}])
    assert list(metrics) == ["exact_match", "bertscore"], f"keys: {list(metrics)}"
    assert (metrics["bertscore"].model_type, metrics["bertscore"].num_layers) == ("/m/roberta", 9), (
        f"options not applied: {metrics['bertscore']!r}"
    )
    with pytest.raises(ValueError, match=r"has no option\(s\) 'layers'; its options: model_type, num_layers"):
        M.resolve_metrics([{"name": "bertscore", "layers": 9}])
    with pytest.raises(ValueError, match="did you mean 'rouge'"):
        M.resolve_metrics(["rogue"])
    with pytest.raises(ValueError, match="has no 'name'"):
        M.resolve_metrics([{"model_type": "x"}])


def test_a_missing_metric_model_fails_when_the_loop_is_built_not_after_training(tmp_path):
    from llava_loop import Loop, LoopConfig
    from llava_loop.testing import tiny_llava

    model, processor = tiny_llava()
    config = LoopConfig(output_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="BERTScore model .*'/models/none': no such folder"):
        Loop(model, processor, config, metrics=[{"name": "bertscore", "model_type": "/models/none"}])
    with pytest.raises(FileNotFoundError, match="NLI model .*HF_HUB_OFFLINE is set"):
        Loop(model, processor, config, metrics=[{"name": "nli", "model": "someone/nli-not-cached"}])
    folder = tmp_path / "no-config"
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match="folder without config.json"):
        Loop(model, processor, config, metrics=[{"name": "nli", "model": str(folder)}])
