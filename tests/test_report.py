"""The predictions page (`llava_loop.report`) read without a browser, and what `fit` writes at each
evaluation: one page per evaluation before ``on_evaluate``, thumbnails made once per eval image.

The page in a real browser (scripts, sorting, decoded images, injected markup): test_report_browser.py.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import re
from html.parser import HTMLParser
from pathlib import Path

import torch
from PIL import Image

from helpers import small_config, solid_image
from llava_loop import Callback, Loop, report
from llava_loop.data import SkippedSample, as_dataset
from llava_loop.report import CONTENT_SECURITY_POLICY, Thumbnails, predictions_page, thumbnail
from llava_loop.testing import synthetic_vqa, tiny_llava

HOSTILE = "<script>document.title='pwned'</script><img src=x onerror=\"document.title='pwned'\"> & 'q'"
"""A prediction an attacker (or a confused model) might produce: markup, both quote kinds, an ampersand."""


class Page(HTMLParser):
    """What a page holds, as an HTML parser sees it: every start tag, the scripts' and style's text, the
    CSP meta tag, and the predictions table's header texts and rows (per cell: text, attributes, images)."""

    def __init__(self, text: str) -> None:
        super().__init__()  # character references converted: cell texts are what the browser shows
        self.tags: list[tuple[str, dict]] = []
        self.scripts: list[tuple[dict, str]] = []
        self.styles: list[str] = []
        self.headers: list[str] = []
        self.rows: list[list[dict]] = []
        self._in: list[str] = []  # open elements of interest
        self._text: list[str] = []
        self._table = False  # inside #predictions
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attributes = dict(attrs)
        self.tags.append((tag, attributes))
        if tag == "table" and attributes.get("id") == "predictions":
            self._table = True
        elif tag == "script":
            self._in.append("script")
            self._script = (attributes, [])
        elif tag == "style":
            self._style: list[str] = []
            self._in.append("style")
        elif self._table and tag == "tr":
            self._row: list[dict] = []
        elif self._table and tag in ("td", "th"):
            self._cell = {"attrs": attributes, "text": [], "images": []}
            self._in.append(tag)
        elif self._table and tag == "img":
            self._cell["images"].append(attributes)

    def handle_endtag(self, tag: str) -> None:
        if tag == "table" and self._table:
            self._table = False
        elif tag == "script" and self._in and self._in[-1] == "script":
            self._in.pop()
            self.scripts.append((self._script[0], "".join(self._script[1])))
        elif tag == "style" and self._in and self._in[-1] == "style":
            self._in.pop()
            self.styles.append("".join(self._style))
        elif self._table and tag in ("td", "th") and self._in and self._in[-1] == tag:
            self._in.pop()
            self._cell["text"] = "".join(self._cell["text"])
            if tag == "th":
                self.headers.append(self._cell["text"])
            else:
                self._row.append(self._cell)
        elif self._table and tag == "tr" and self._row:
            self.rows.append(self._row)

    def handle_data(self, data: str) -> None:
        if not self._in:
            return
        if self._in[-1] == "script":
            self._script[1].append(data)
        elif self._in[-1] == "style":
            self._style.append(data)
        else:
            self._cell["text"].append(data)

    def column(self, name: str) -> list[dict]:
        """The cells of the column headed ``name``, in row order."""
        at = self.headers.index(name)
        return [row[at] for row in self.rows]

    def thumbnails(self) -> list[str]:
        """The page's table of distinct thumbnails (the JSON data block)."""
        (table,) = [text for attrs, text in self.scripts if attrs.get("type") == "application/json"]
        return json.loads(table)


def decode(uri: str) -> Image.Image:
    """The image of a ``data:image/...;base64,`` URI."""
    header, payload = uri.split(",", 1)
    assert re.fullmatch(r"data:image/(png|jpeg);base64", header), f"not a base64 image URI: {header[:40]}"
    return Image.open(io.BytesIO(base64.b64decode(payload)))


def sha256(text: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()


def sample(i: int, **fields) -> dict:
    return {"index": i, "id": f"s{i}", "prompt": f"USER: <image>\nQ{i}? ASSISTANT:", "prediction": f"p{i}",
            "references": [f"r{i}"], "scores": {"exact_match": float(i % 2)}, **fields}  # fmt: skip


# --------------------------------------------------------------------------- the page, without a browser
def test_every_text_is_escaped_and_shown_exactly_as_given():
    hostile = {
        "index": 0,
        "id": "id<&>\"'",
        "prompt": "USER: </td></tr></table><script>alert(1)</script>\nline two ASSISTANT:",
        "prediction": HOSTILE,
        "references": ["<b>bold</b>", "a & b", "</ul><script>x()</script>"],
        "scores": {"<i>score</i>": 1.0},
    }
    text = predictions_page([hostile], {"eval/<m>": 0.5}, step=3, title="run <x>")
    page = Page(text)

    assert [tag for tag, _ in page.tags if tag == "script"] == ["script", "script"], (
        f"the page should hold exactly its data block and its own script: {[t for t, _ in page.tags]}"
    )
    assert [a.get("data-t") for t, a in page.tags if t == "img"] == [], "an <img> was injected from the data"
    assert not any(name.startswith("on") for _, attrs in page.tags for name in attrs), "an event handler attribute"
    (row,) = page.rows
    texts = {name: cell["text"] for name, cell in zip(page.headers, row)}
    assert texts["id"] == hostile["id"], f"id shown as {texts['id']!r}"
    assert texts["prompt"] == hostile["prompt"], f"prompt shown as {texts['prompt']!r}"
    assert texts["prediction"] == HOSTILE, f"prediction shown as {texts['prediction']!r}"
    assert texts["references"] == "".join(hostile["references"]), f"references shown as {texts['references']!r}"
    assert "<i>score</i>" in page.headers, f"the score key should be a header, escaped: {page.headers}"
    assert "<th>eval/&lt;m&gt;</th>" in text and "<title>run &lt;x&gt;</title>" in text, "header not escaped"


def test_a_row_per_sample_with_its_thumbnails_and_a_column_per_score_key():
    red, blue, green = (solid_image(c, (320, 200)) for c in ((220, 30, 30), (30, 60, 220), (30, 180, 40)))
    records = [
        {"id": "one", "image": red, "conversations": []},
        {"id": "two", "image": [blue, green], "conversations": []},
        {"id": "text", "image": None, "conversations": []},
        {"id": "same", "image": red.copy(), "conversations": []},  # the same picture: stored once
    ]
    samples = [
        sample(0, scores={"exact_match": 1.0, "f1": 0.5}),
        sample(1, scores={"exact_match": 0.0, "f1": 0.25}),
        sample(2, scores={"exact_match": 0.0}),  # no f1 for this one
        sample(3, scores={"exact_match": 1.0, "bleu": float("nan")}),
    ]
    page = Page(predictions_page(samples, {"eval/exact_match": 0.5}, step=7, thumbnails=Thumbnails(records)))

    assert len(page.rows) == 4, f"expected a row per sample, got {len(page.rows)}"
    assert page.headers == ["#", "image", "id", "prompt", "prediction", "references", "exact_match", "f1", "bleu"], (
        f"columns: {page.headers}"
    )
    table = page.thumbnails()
    images = [[int(img["data-t"]) for img in cell["images"]] for cell in page.column("image")]
    assert [len(keys) for keys in images] == [1, 2, 0, 1], f"thumbnails per row: {images}"
    assert len(table) == 3 and images[3] == images[0], f"the repeated picture is not stored once: {images}"
    colors = [decode(table[k]).convert("RGB").getpixel((5, 5)) for k in images[1]]
    assert colors == [(30, 60, 220), (30, 180, 40)], f"a record's images are not in order: {colors}"
    assert all(max(decode(uri).size) == 160 for uri in table), "thumbnails are not 160 px on their longest side"
    assert page.column("image")[2]["text"] == "no image", "a text-only record should say it has no image"
    assert [c["attrs"]["data-v"] for c in page.column("f1")] == ["0.5", "0.25", "", ""], (
        "a missing or NaN score must sort as missing (empty data-v), the rest as exact numbers"
    )
    assert [c["text"] for c in page.column("bleu")] == ["", "", "", "nan"], "a NaN score should still be shown"
    assert [c["text"] for c in page.column("#")] == ["0", "1", "2", "3"], "the # column is the eval-set position"
    assert [r[0]["attrs"]["data-v"] for r in page.rows] == ["0", "1", "2", "3"]


def test_the_security_policy_allows_exactly_the_pages_own_script_and_style():
    page = Page(predictions_page([sample(0)], {}, step=0))
    (meta,) = [a for t, a in page.tags if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"]
    policy = dict(part.strip().split(" ", 1) for part in meta["content"].split(";"))
    (code,) = [text for attrs, text in page.scripts if "type" not in attrs]
    assert policy["script-src"] == f"'{sha256(code)}'", "script-src does not name the page's own script by its hash"
    assert policy["style-src"] == f"'{sha256(page.styles[0])}'", "style-src does not name the page's own style"
    assert policy["default-src"] == "'none'" and policy["img-src"] == "data:", f"policy too open: {policy}"
    assert meta["content"] == CONTENT_SECURITY_POLICY
    for word in ("innerHTML", "outerHTML", "insertAdjacentHTML", "eval(", "Function(", "document.write"):
        assert word not in code, f"the page's script uses {word}"


def test_thumbnails_are_png_for_few_colours_and_jpeg_for_photos_and_never_upscaled():
    shapes = synthetic_vqa(1, image_size=400)[0]["image"]
    noise = Image.frombytes("RGB", (300, 240), torch.randint(0, 256, (300 * 240 * 3,), dtype=torch.uint8).numpy())
    assert thumbnail(shapes).startswith("data:image/png;"), "a few-colour image should be a lossless PNG"
    assert thumbnail(noise).startswith("data:image/jpeg;"), "a photo-like image should be a JPEG"
    assert decode(thumbnail(noise)).size == (160, 128), "the longest side should be 160 px, aspect kept"
    assert decode(thumbnail(solid_image((1, 2, 3), (40, 30)))).size == (40, 30), "a small image was resized"
    assert decode(thumbnail(Image.new("RGBA", (50, 50)))).mode in ("RGB", "P"), "RGBA must become a viewable image"


class CountingDataset(torch.utils.data.Dataset):
    """Records with images; counts reads per index; index 1 fails, index 2 is a skipped bad sample."""

    def __init__(self) -> None:
        self.reads: dict[int, int] = {}

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int):
        self.reads[index] = self.reads.get(index, 0) + 1
        if index == 1:
            raise OSError("image file vanished")
        if index == 2:
            return SkippedSample("bad", "val.json", "corrupt image")
        if index == 3:
            return {"id": "path", "image": "not/decoded.jpg", "conversations": []}
        return {"id": "ok", "image": solid_image((9, 9, 9)), "conversations": []}


def test_thumbnails_are_made_once_per_index_and_unreadable_records_get_a_reason_and_one_warning(caplog):
    dataset = CountingDataset()
    thumbnails = Thumbnails(dataset)
    samples = [sample(i) for i in range(4)]
    with caplog.at_level(logging.WARNING, logger="llava_loop.report"):
        pages = [Page(predictions_page(samples, {}, step=s, thumbnails=thumbnails)) for s in (1, 2)]
    assert dataset.reads == {0: 1, 1: 1, 2: 1, 3: 1}, f"records read again for the second page: {dataset.reads}"
    for page in pages:
        cells = page.column("image")
        assert [len(c["images"]) for c in cells] == [1, 0, 0, 0], "only the readable record should have a thumbnail"
        assert "image file vanished" in cells[1]["text"], f"row without its reason: {cells[1]['text']!r}"
        assert "corrupt image" in cells[2]["text"], f"skipped sample without its reason: {cells[2]['text']!r}"
        assert "undecoded" in cells[3]["text"], f"undecoded image without its reason: {cells[3]['text']!r}"
    warnings = [r for r in caplog.records if "no thumbnail" in r.getMessage()]
    assert len(warnings) == 1, (
        f"expected one warning for three unreadable records: {[w.getMessage() for w in warnings]}"
    )


def test_records_of_the_same_image_file_share_one_thumbnail_made_once(tmp_path, monkeypatch):
    made = []
    monkeypatch.setattr(report, "thumbnail", lambda image, *a: made.append(image.size) or thumbnail(image, *a))
    for name, color in (("a.png", (200, 0, 0)), ("b.png", (0, 0, 200))):
        solid_image(color, (300, 200)).save(tmp_path / name)
    files = ["a.png", "b.png", "a.png", None, "a.png", "b.png"]  # six questions about two images
    records = [
        {"id": f"q{i}", "image": name, "conversations": [
            {"from": "human", "value": "<image>\nColor?" if name else "Color?"}, {"from": "gpt", "value": "x"}]}
        for i, name in enumerate(files)
    ]  # fmt: skip
    page = Page(predictions_page([sample(i) for i in range(6)], {}, step=1,
                                 thumbnails=Thumbnails(as_dataset(records, image_folder=tmp_path))))  # fmt: skip
    assert made == [(300, 200), (300, 200)], f"each image file should be shrunk once, got {len(made)} thumbnails"
    keys = [[int(img["data-t"]) for img in cell["images"]] for cell in page.column("image")]
    assert keys == [[0], [1], [0], [], [0], [1]], f"rows do not share their image's thumbnail: {keys}"
    assert [decode(uri).convert("RGB").getpixel((0, 0)) for uri in page.thumbnails()] == [(200, 0, 0), (0, 0, 200)]


# --------------------------------------------------------------------------- what fit writes
class Watcher(Callback):
    """At every ``on_evaluate``: which predictions pages exist."""

    def __init__(self) -> None:
        self.pages_at_evaluate: list[tuple[int, list[str]]] = []

    def on_evaluate(self, loop, metrics, samples):
        folder = Path(loop.config.output_dir, "predictions")
        self.pages_at_evaluate.append((loop.state.step, sorted(p.name for p in folder.glob("*.html"))))


def fit_with_evaluations(out, callbacks=(), eval_data=None, loop_class=Loop, **settings):
    model, processor = tiny_llava(seed=0)
    settings = {"max_steps": 4, "eval_steps": 2, "max_new_tokens": 2, "log_steps": 1, **settings}
    config = small_config(out, **settings)
    loop = loop_class(model, processor, config, callbacks=list(callbacks))
    loop.fit(synthetic_vqa(8, seed=0), eval_data if eval_data is not None else synthetic_vqa(5, seed=1))
    return loop


def test_fit_writes_one_page_per_evaluation_before_on_evaluate_making_each_thumbnail_once(tmp_path, monkeypatch):
    made = []
    monkeypatch.setattr(report, "thumbnail", lambda image, *a: made.append(1) or thumbnail(image, *a))
    watcher = Watcher()
    records = [*synthetic_vqa(4, seed=1), {"id": "words", "image": None, "conversations": [
        {"from": "human", "value": "Say <b>hi</b>"}, {"from": "gpt", "value": "hi"}]}]  # fmt: skip
    loop = fit_with_evaluations(tmp_path, [watcher], records, eval_before_training=True)

    assert watcher.pages_at_evaluate == [
        (0, ["step_000000.html"]),
        (2, ["step_000000.html", "step_000002.html"]),
        (4, ["step_000000.html", "step_000002.html", "step_000004.html"]),
    ], f"each evaluation's page should exist when on_evaluate fires: {watcher.pages_at_evaluate}"
    assert len(made) == 4, f"{len(made)} thumbnails made for 4 eval images over 3 evaluations (expected 4)"
    for evaluation in loop.state.history:
        step = evaluation["step"]
        text = (tmp_path / "predictions" / f"step_{step:06d}.html").read_text(encoding="utf-8")
        page = Page(text)
        rows = [json.loads(line) for line in (tmp_path / "predictions" / f"step_{step:06d}.jsonl").open()]
        assert [c["text"] for c in page.column("id")] == [r["id"] for r in rows], f"step {step}: rows differ"
        assert [c["text"] for c in page.column("prediction")] == [r["prediction"] for r in rows]
        assert [c["text"] for c in page.column("prompt")] == [r["prompt"] for r in rows]
        assert [float(c["attrs"]["data-v"]) for c in page.column("exact_match")] == [
            r["scores"]["exact_match"] for r in rows
        ], f"step {step}: scores differ from the predictions file"
        assert [len(c["images"]) for c in page.column("image")] == [1, 1, 1, 1, 0], f"step {step}: thumbnails"
        assert f"<tr><th>step</th><td>{step}</td></tr>" in text, f"step {step}: the header does not show the step"
        loss = f"<tr><th>eval/loss</th><td>{evaluation['eval/loss']:.4g}</td></tr>"
        assert loss in text, f"step {step}: the header does not show the summary metrics"
    assert not list((tmp_path / "predictions").glob(".*")), "temporary files left in predictions/"


def test_an_image_that_vanishes_after_the_evaluation_gives_a_row_without_thumbnail(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for i, record in enumerate(synthetic_vqa(3, seed=1)):
        record["image"].save(folder / f"{i}.png")
    records = [{**r, "image": f"{i}.png"} for i, r in enumerate(synthetic_vqa(3, seed=1))]
    eval_data = as_dataset(records, image_folder=folder)

    class VanishingLoop(Loop):
        def evaluate(self, eval_data=None):
            result = super().evaluate(eval_data)
            (folder / "1.png").unlink(missing_ok=True)  # gone between the evaluation and its page
            return result

    fit_with_evaluations(tmp_path / "run", eval_data=eval_data, loop_class=VanishingLoop, max_steps=1, eval_steps=0)
    page = Page((tmp_path / "run" / "predictions" / "step_000001.html").read_text(encoding="utf-8"))
    cells = page.column("image")
    assert [len(c["images"]) for c in cells] == [1, 0, 1], "the vanished image's row should have no thumbnail"
    assert "1.png" in cells[1]["text"], f"the row should say which image could not be read: {cells[1]['text']!r}"


def test_predictions_html_false_writes_no_page(tmp_path):
    fit_with_evaluations(tmp_path, max_steps=1, eval_steps=0, predictions_html=False)
    assert (tmp_path / "predictions" / "step_000001.jsonl").is_file(), "the predictions file is missing"
    assert not list((tmp_path / "predictions").glob("*.html")), "predictions_html=False wrote a page"
