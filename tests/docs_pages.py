"""The parts of docs pages that are generated from the code: run the real code, write its output.

A generated part sits in its page between ``<!-- generated:NAME -->`` and ``<!-- /generated:NAME -->``.
``python tests/docs_pages.py`` rewrites every part; `tests/test_docs_site.py` checks that each page
holds what the code gives now. Parts:

- ``docs/masking.md``: two LLaVA records run through the real `TrainCollator` / `EvalCollator` with the
  real llava-1.5 processor (Llama-2 SentencePiece tokenizer, `helpers.llama2_tokenizer_dir`), every
  token shown with its label;
- ``docs/training.md``: the callback events table, from `llava_loop.callbacks.EVENTS`.
"""

from __future__ import annotations

import html
import json
import logging
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the clone's llava_loop, not an installed one

from llava_loop.callbacks import EVENTS  # noqa: E402
from llava_loop.collators import IGNORE_INDEX, EvalCollator, TrainCollator  # noqa: E402

# The records of docs/masking.md, in LLaVA JSON; the images are drawn by `_image`.
RECORDS = [
    {
        "id": "shapes-17",
        "image": "shapes-17.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the shape?"},
            {"from": "gpt", "value": "Red."},
            {"from": "human", "value": "Which side is it on?"},
            {"from": "gpt", "value": "The left side."},
        ],
    },
    {
        "id": "shapes-18",
        "image": "shapes-18.png",
        "conversations": [
            {"from": "human", "value": "<image>\nHow many shapes are there?"},
            {"from": "gpt", "value": "One."},
        ],
    },
]
TRUNCATE_AT = 613  # max_length that cuts the last answer of the first record (615 tokens) partly

# Token kinds, in legend order: (css class, legend text). Labelled kinds first.
KINDS = {
    "answer": "answer token: labelled (its label is its own id)",
    "eot": "end-of-turn token after an answer: labelled",
    "text": "prompt, role tags, BOS: masked (-100)",
    "image": "image tokens (one run shown as one box): masked",
    "pad": "padding (attention mask 0): masked",
}


# --------------------------------------------------------------------------- the generated parts
def masking_records() -> str:
    """The records, one JSON object per line (as a ```json block of the docs holds them)."""
    return "```json\n" + "".join(json.dumps(r) + "\n" for r in RECORDS) + "```\n"


def masking_rendered() -> str:
    """What the chat template renders for the first record (the text `TrainCollator` tokenizes)."""
    collator = TrainCollator(_processor())
    return "```text\n" + collator.renderer.render(_dataset()[0]).text + "\n```\n"


def masking_batch() -> str:
    """Both records collated into one training batch: every token, with its kind, id and label."""
    batch = TrainCollator(_processor())(_records())
    blocks = [_token_block(batch, row) for row in range(len(batch["ids"]))]
    return _legend() + "\n" + "\n".join(blocks) + "\n"


def masking_table() -> str:
    """Every token of the first record (image tokens as one row) as a table: position, token, id, label."""
    batch = TrainCollator(_processor())(_records()[:1])
    rows = ["<table>", "<tr><th>position</th><th>token</th><th>id</th><th>label</th></tr>"]
    for start, end, kind in _runs(batch, 0):
        token_id, label = int(batch["input_ids"][0, start]), int(batch["labels"][0, start])
        where = str(start) if end - start == 1 else f"{start}–{end - 1}"
        token = _piece(token_id) + (f" ×{end - start}" if end - start > 1 else "")
        cells = (where, f"<code>{html.escape(token)}</code>", str(token_id), str(label))
        row = "".join(f"<td>{c}</td>" for c in cells)
        rows.append(f'<tr class="tok-row-{kind}">{row}</tr>')
    rows.append("</table>")
    return "<details><summary>The same tokens as a table</summary>\n" + "\n".join(rows) + "\n</details>\n"


def masking_truncated() -> str:
    """The first record with ``max_length=TRUNCATE_AT``: the tokens kept, the count and the warning."""
    with _captured_warnings("llava_loop.collators") as warnings:
        batch = TrainCollator(_processor(), max_length=TRUNCATE_AT)(_records()[:1])
    lines = [
        _token_block(batch, 0),
        "",
        f'`batch["num_truncated"]` is {batch["num_truncated"]}; the warning, logged once:',
        "",
        "```text",
        *warnings,
        "```",
    ]
    return "\n".join(lines) + "\n"


def masking_eval_prompt() -> str:
    """What `EvalCollator` gives the model for the first record: everything up to its last answer."""
    batch = EvalCollator(_processor())(_records()[:1])
    return "```text\n" + batch["prompts"][0] + "\n```\n" + f"references: `{batch['references'][0]}`\n"


def masking_prompt_warning() -> str:
    """The warning for a chat template whose generation prompt training never renders before an answer."""
    processor = _processor()
    template = processor.chat_template
    processor.chat_template = template.replace("{{ 'ASSISTANT:' }}", "{{ 'ASSISTANT:\\n' }}")
    assert processor.chat_template != template, "the llava-1.5 template's generation prompt changed"
    try:
        with _captured_warnings("llava_loop.collators") as warnings:
            TrainCollator(processor)(_records()[:1])
    finally:
        processor.chat_template = template
    return "```text\n" + "\n".join(warnings) + "\n```\n"


def events_table() -> str:
    """The callback events, in the order a run meets them, with when each fires and its payload."""
    rows = ["| event | fires | payload |", "|---|---|---|"]
    for event, doc in EVENTS.items():
        match = re.fullmatch(r"(.*?)\s*(?:\[(.*)\])?", doc, flags=re.DOTALL)
        when, payload = match.group(1), match.group(2) or "none"
        rows.append(f"| `{event}` | {_table_cell(when)} | {_table_cell(payload)} |")
    return "\n".join(rows) + "\n"


PARTS: dict[tuple[str, str], Callable[[], str]] = {
    ("docs/masking.md", "records"): masking_records,
    ("docs/masking.md", "rendered"): masking_rendered,
    ("docs/masking.md", "batch"): masking_batch,
    ("docs/masking.md", "table"): masking_table,
    ("docs/masking.md", "truncated"): masking_truncated,
    ("docs/masking.md", "eval-prompt"): masking_eval_prompt,
    ("docs/masking.md", "prompt-warning"): masking_prompt_warning,
    ("docs/training.md", "events"): events_table,
}


# --------------------------------------------------------------------------- reading and writing pages
def _markers(name: str) -> tuple[str, str]:
    return f"<!-- generated:{name} -->\n", f"<!-- /generated:{name} -->"


def current_part(page: str, name: str) -> str:
    """The text between the markers of part ``name`` in ``page``, less the blank lines that set it apart
    (Markdown needs them); a ValueError if the markers are missing."""
    start, end = _markers(name)
    if page.count(start) != 1 or page.count(end) != 1 or page.index(start) > page.index(end):
        raise ValueError(f"the page must hold {start.strip()} and {end} once each, in that order")
    return page[page.index(start) + len(start) : page.index(end)].removeprefix("\n").removesuffix("\n")


def with_part(page: str, name: str, text: str) -> str:
    """``page`` with part ``name`` replaced by ``text``."""
    start, end = _markers(name)
    current_part(page, name)  # checks the markers
    return page[: page.index(start) + len(start)] + "\n" + text + "\n" + page[page.index(end) :]


def main() -> None:
    """Rewrite every generated part of every page."""
    for path in sorted({path for path, _ in PARTS}):
        file = ROOT / path
        page = file.read_text(encoding="utf-8")
        for (part_path, name), make in PARTS.items():
            if part_path == path:
                page = with_part(page, name, make())
        file.write_text(page, encoding="utf-8")
        print(f"wrote {path}")


# --------------------------------------------------------------------------- helpers
@cache
def _processor():
    """The real llava-1.5 processor (Llama-2 SentencePiece tokenizer, 576 image tokens)."""
    from helpers import llama2_tokenizer_dir
    from llava_loop.testing import llava15_processor

    return llava15_processor(llama2_tokenizer_dir())


@cache
def _dataset():
    """`RECORDS` as `load_llava_json` loads them from ``data/train.json``, with each record's source."""
    from PIL import Image

    from llava_loop.data import WithSource, load_llava_json

    colours = {"shapes-17.png": (220, 30, 30), "shapes-18.png": (30, 60, 220)}
    with tempfile.TemporaryDirectory() as folder:
        cwd = os.getcwd()
        os.chdir(folder)
        try:
            os.mkdir("data")
            for name, colour in colours.items():
                Image.new("RGB", (336, 336), colour).save(f"data/{name}")
            Path("data/train.json").write_text(json.dumps(RECORDS), encoding="utf-8")
            dataset = WithSource(load_llava_json("data/train.json"))
            return [dataset[i] for i in range(len(dataset))]  # images decoded now, while the files exist
        finally:
            os.chdir(cwd)


def _records() -> list[dict]:
    """Fresh copies of the loaded records (collators may change what they get)."""
    return [{**r, "conversations": [dict(t) for t in r["conversations"]]} for r in _dataset()]


def _piece(token_id: int) -> str:
    return _processor().tokenizer.convert_ids_to_tokens(token_id)


def _kind(batch: dict, row: int, i: int) -> str:
    processor = _processor()
    if not batch["attention_mask"][row, i]:
        return "pad"
    token_id = int(batch["input_ids"][row, i])
    if token_id == processor.image_token_id:
        return "image"
    if int(batch["labels"][row, i]) == IGNORE_INDEX:
        return "text"
    return "eot" if token_id == processor.tokenizer.eos_token_id else "answer"


def _runs(batch: dict, row: int) -> Iterator[tuple[int, int, str]]:
    """``(start, end, kind)``: one per token, and one per run of image or padding tokens."""
    length, i = batch["input_ids"].shape[1], 0
    while i < length:
        kind, end = _kind(batch, row, i), i + 1
        if kind in ("image", "pad"):
            while end < length and _kind(batch, row, end) == kind:
                end += 1
        yield i, end, kind
        i = end


def _token_block(batch: dict, row: int) -> str:
    """One sample's tokens as boxes; a line break after each newline token and each end of turn."""
    boxes = [f'<p class="tok-sample"><strong>{html.escape(batch["ids"][row])}</strong><br>']
    for start, end, kind in _runs(batch, row):
        token_id, label = int(batch["input_ids"][row, start]), int(batch["labels"][row, start])
        piece = _piece(token_id)
        if end - start > 1:
            text, title = f"{piece} ×{end - start}", f"positions {start}–{end - 1}, id {token_id}, label {label}"
        else:
            text, title = piece, f"position {start}, id {token_id}, label {label}"
        box = f'<code class="tok tok-{kind}" title="{title}">{html.escape(text)}</code>'
        boxes.append(f"<mark>{box}</mark>" if kind in ("answer", "eot") else box)
        if kind == "eot" or piece == "<0x0A>":
            boxes.append("<br>")
    return " ".join(boxes) + "</p>"


def _legend() -> str:
    items = []
    for kind, text in KINDS.items():
        box = f'<code class="tok tok-{kind}">{kind}</code>'
        items.append(f"<li>{f'<mark>{box}</mark>' if kind in ('answer', 'eot') else box} {html.escape(text)}</li>")
    return '<ul class="tok-legend">' + "".join(items) + "</ul>"


def _table_cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


@contextmanager
def _captured_warnings(name: str) -> Iterator[list[str]]:
    """The messages of the warnings that logger ``name`` logs inside the block."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                messages.append(record.getMessage())

    logger, handler = logging.getLogger(name), Collect()
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


if __name__ == "__main__":
    main()
