"""Golden VQA accuracy cases from the official VQA evaluation script, for tests/test_metrics.py.

Usage::

    python tests/data/make_vqa_golden.py /path/to/vqaEval.py [--cases 600] [--seed 0]
        [--out tests/data/vqa_official_golden.json] [--rescore existing_golden.json]

The official script (GT-Vision-Lab/VQA, ``PythonEvaluationTools/vqaEvaluation/vqaEval.py``) is
*not* part of this repository: download it yourself and pass its path. This file contains none of
its code; it builds random inputs aimed at every normalisation rule, runs the official
``VQAEval.evaluate`` on them through small stand-ins for its ``VQA`` objects, and records the
official per-question accuracy (unrounded, 0..1).

The script is Python 2; run this generator with Python 2.7 for the true reference (the committed
file was made that way). Under Python 3 the official file's ``print`` statements are rewritten as
function calls at import time; Python 3's ``\\d`` then also matches non-ASCII digits, so the few
cases with such digits can score differently from Python 2.

Runs on Python 2.7 and 3, hence the ``__future__`` import.
"""

# ruff: noqa: UP010, UP018, UP032 (runs on Python 2.7: __future__ imports, native-str module name, no f-strings)
from __future__ import division, unicode_literals

import argparse
import json
import os
import random
import re
import sys
import types

# Surface forms grouped by the answer they should normalise to (or deliberately not).
CONCEPTS = [
    ["yes", "Yes", "YES", "yes.", "Yes!", "yes!!", "  yes ", "yes\n", "\tyes", "yes ?", "yes,"],
    ["no", "No", "no.", "No!", "nO", "no -", "(no)"],
    ["2", "two", "Two", "2.", "two.", "TWO", " 2 "],
    ["10", "ten", "Ten", "10.", "10!"],
    ["0", "none", "zero", "None", "Zero."],
    ["1,000", "1000", "1.000", "1 000", "1,000.", "one thousand"],
    ["2.5", "25", "2 5", "2,5", ".5", "2.5."],
    ["dont", "don't", "don\u2019t", "Dont", "DON'T", "don t"],
    ["youre", "you're", "Youre", "you\u2019re"],
    ["whats", "what's", "Whats", "what is"],
    ["isnt", "isn't", "Isnt", "is not"],
    ["oclock", "o'clock", "3 oclock", "3 o'clock", "3:00", "3 00"],
    ["wheres", "where's", "Wheres"],
    ["cant", "can't", "Cant", "can not"],
    ["im", "Im", "I'm", "i'm"],
    ["yall'll", "y'allll", "yall"],
    ["twas", "'twas", "Twas"],
    ["couldn'tve", "couldnt've", "couldn't've"],
    ["the dog", "dog", "a dog", "The Dog", "an dog", "dog the", "dogs"],
    ["red and white", "red & white", "red/white", "red-white", "red, white", "red white", "Red; white"],
    ["t-shirt", "t shirt", "tshirt", "T-Shirt", "t_shirt"],
    ["left", "left side", "on left", "to the left", "LEFT."],
    ["stop sign", "stop-sign", "stop sign!", "STOP", "stop\tsign"],
    ["3.5 ft", "3.5ft", "3,5 ft", "3.5 feet"],
    ["12:30", "12 30", "1230", "12:30."],
    ["cat's", "cats", "cat s", "cat\u2019s"],
    ["caf\u00e9", "cafe", "CAF\u00c9"],
    ["\u0662.\u0665", "\u0662\u0665", "\u0661,\u0660\u0660\u0660", "\u0661\u0660\u0660\u0660"],
    ["a", "an", "the", ""],
    ["yes\u00a0", "yes\u3000no", "yes  no", "yes no"],
]
PUNCTUATION = list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~") + ["\u2019", "\u2026"]
FILLER = ["green", "blue", "man", "woman", "tennis", "pizza", "1", "3", "4", "many", "nothing"]


def load_official(path):
    """The official module, Python-2 ``print`` statements rewritten as calls where needed."""
    with open(path, "rb") as f:
        source = f.read()
    try:
        code = compile(source, path, "exec")
    except SyntaxError:  # Python 3
        text = re.sub(r"(?m)^(\s*)print (.+)$", r"\1print(\2)", source.decode("utf-8"))
        code = compile(text, path, "exec")
    module = types.ModuleType(str("vqaEval_official"))
    module.__file__ = path
    exec(code, module.__dict__)
    return module


class Questions:
    """Stand-in for the official ``VQA`` object: ``qa`` and ``getQuesIds``."""

    def __init__(self, qa):
        self.qa = qa

    def getQuesIds(self):  # noqa: N802 (the official API's name)
        return sorted(self.qa)


def official_scores(module, cases):
    """Unrounded official accuracy of every ``(prediction, answers)`` case."""

    class Recording(module.VQAEval):
        def setAccuracy(self, accQA, accQuesType, accAnsType):  # noqa: N802, N803
            self.per_question = list(accQA)
            module.VQAEval.setAccuracy(self, accQA, accQuesType, accAnsType)

        def updateProgress(self, progress):  # noqa: N802 (silence the progress bar)
            pass

    gts, res = {}, {}
    for qid, (prediction, answers) in enumerate(cases):
        gts[qid] = {
            "question_id": qid,
            "question_type": "what",
            "answer_type": "other",
            # Distinct answer_ids as in the real annotations: leave-one-out compares whole dicts.
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(answers)],
        }
        res[qid] = {"question_id": qid, "answer": prediction}
    evaluator = Recording(Questions(gts), Questions(res))
    stdout, sys.stdout = sys.stdout, open(os.devnull, "w")
    try:
        evaluator.evaluate(list(range(len(cases))))
    finally:
        sys.stdout.close()
        sys.stdout = stdout
    return [float(s) for s in evaluator.per_question]


def noisy(rng, text):
    """``text`` with random case, punctuation, whitespace or periods added."""
    kind = rng.randrange(9)
    if kind == 0:
        return text.upper() if rng.random() < 0.5 else text.title()
    if kind == 1:
        mark = rng.choice(PUNCTUATION)
        return text + mark if rng.random() < 0.5 else mark + text
    if kind == 2:
        mark = rng.choice(PUNCTUATION)
        return text + " " + mark if rng.random() < 0.5 else mark + " " + text
    if kind == 3:
        return rng.choice(["\n", "\t", " ", "  ", "\n\t"]) + text + rng.choice(["\n", "\t", " ", ""])
    if kind == 4:
        return text.replace(" ", rng.choice(["\n", "\t", "  ", " , ", "-", "/"]))
    if kind == 5:
        return text + "." * rng.randrange(28, 40)  # the official period strip stops after 32
    if kind == 6:
        return rng.choice(["a ", "the ", "an ", "The "]) + text
    if kind == 7:
        return text + rng.choice([" 1,000", " 2,5", " 3.", " 4.5"])
    return text


def answer_set(rng, concept, n):
    """``n`` annotator answers: mostly forms of ``concept``, some noise, sometimes all identical."""
    style = rng.randrange(6)
    if style == 0:
        return [rng.choice(concept)] * n
    if style == 1:
        majority = rng.choice(concept)
        return [majority] * (n - 1) + [rng.choice(FILLER)]
    answers = []
    for _ in range(n):
        r = rng.random()
        if r < 0.6:
            answers.append(rng.choice(concept))
        elif r < 0.8:
            answers.append(noisy(rng, rng.choice(concept)))
        else:
            answers.append(rng.choice(FILLER + rng.choice(CONCEPTS)))
    rng.shuffle(answers)
    return answers


def make_cases(rng, count):
    cases = []
    for i in range(count):
        concept = rng.choice(CONCEPTS)
        n = 10 if i % 5 else rng.choice([4, 5, 6, 7, 8, 9, 11, 12])
        answers = answer_set(rng, concept, n)
        r = rng.random()
        if r < 0.5:
            prediction = rng.choice(concept)
        elif r < 0.85:
            prediction = noisy(rng, rng.choice(concept))
        else:
            prediction = rng.choice(FILLER + rng.choice(CONCEPTS))
        cases.append((prediction, answers))
    return cases


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("official", help="path of the official vqaEval.py")
    parser.add_argument("--cases", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rescore", help="score the cases of this golden file instead of new random ones")
    parser.add_argument(
        "--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "vqa_official_golden.json")
    )
    args = parser.parse_args(argv)
    module = load_official(args.official)
    if args.rescore:
        with open(args.rescore) as f:
            cases = [(c["prediction"], c["answers"]) for c in json.load(f)["cases"]]
    else:
        cases = make_cases(random.Random(args.seed), args.cases)
    scores = official_scores(module, cases)
    out = {
        "source": "GT-Vision-Lab/VQA PythonEvaluationTools/vqaEvaluation/vqaEval.py",
        "generator": "tests/data/make_vqa_golden.py --cases {} --seed {}".format(len(cases), args.seed),
        "python": sys.version.split()[0],
        "cases": [{"prediction": p, "answers": a, "official": s} for (p, a), s in zip(cases, scores)],
    }
    with open(args.out, "w") as f:
        json.dump(out, f, ensure_ascii=True, indent=1, sort_keys=True)
        f.write("\n")
    sys.stderr.write("wrote {} cases to {}\n".format(len(cases), args.out))


if __name__ == "__main__":
    main()
