"""The predictions page: one self-contained HTML file per evaluation, predictions next to their images.

`fit` writes ``{output_dir}/predictions/step_XXXXXX.html`` beside every ``step_XXXXXX.jsonl`` (on the main
process, atomically, before ``on_evaluate``; ``LoopConfig.predictions_html`` turns it off). The page holds a
header (step, summary metrics, sample count) and one row per evaluated sample, in dataset order: the eval
set position (``#``), the thumbnails of the sample's images, ``id``, ``prompt``, ``prediction``,
``references`` and one column per per-sample score. Clicking a column header sorts the rows (numbers
numerically, text naturally; a second click reverses; rows without a value go last); a search box filters
rows by their text. Nothing is fetched: the thumbnails are ``data:`` URIs, CSS and script are inline.

Safety: predictions are untrusted model output. Every text goes through `html.escape`; the script never
writes HTML (it sorts by moving the existing rows and reads data with ``textContent`` and ``JSON.parse``);
and a Content-Security-Policy allows only the page's own script and stylesheet, by their sha256 hashes,
and images from ``data:`` URIs, so even text that escaped the escaping could not run script or load
anything.

Cost (measured with ``benchmarks/predictions_page.py`` on one CPU core, 640x480 JPEG photos): each distinct
image is stored once per page (a VQA set asks several questions about one image; the rows refer to a
table of distinct thumbnails that the script puts in place), about 8 KB as base64 for a photo at 160 px
(JPEG); images of at most 256 colours (charts, diagrams, synthetic shapes) are PNG, lossless and usually
smaller. 1,000 samples of 1,000 photos make a 7.6 MB page, 5,000 questions about 1,000 photos a 9 MB one
(headless Chromium shows it, every image decoded, in 1 s and 5 s). Thumbnails are made once per image file
and kept for the whole `fit` (`Thumbnails`): the first evaluation loads and shrinks every eval image once
more, on the main process (about 4.5 ms a photo: 10,000 distinct images add about 45 s to it); later
pages are built from the kept thumbnails (0.2 s for 5,000 rows). The kept thumbnails take about as much
memory as one page. Every evaluation writes its own page: turn them off with ``predictions_html=False``.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import logging
import math
from pathlib import Path
from typing import Any

from .checkpointing import atomic_write_text
from .data import SkippedSample, image_list, record_images
from .loggers import _number

logger = logging.getLogger(__name__)

THUMBNAIL_SIDE = 160
"""Longest side of a thumbnail, in pixels (smaller images are kept at their size)."""

_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1em; color: #222; }
h1 { font-size: 1.3em; margin: 0 0 .4em; }
table.summary { border-collapse: collapse; margin-bottom: .6em; }
table.summary th, table.summary td { padding: 1px 10px 1px 0; text-align: left; font-weight: normal; }
table.summary td { font-variant-numeric: tabular-nums; font-weight: 600; }
#predictions { border-collapse: collapse; width: 100%; }
#predictions th { position: sticky; top: 0; background: #eee; cursor: pointer; user-select: none;
  text-align: left; padding: 4px 6px; border-bottom: 2px solid #999; white-space: nowrap; }
#predictions th.plain { cursor: default; }
#predictions th[data-dir="asc"]::after { content: " \\25B2"; }
#predictions th[data-dir="desc"]::after { content: " \\25BC"; }
#predictions td { vertical-align: top; padding: 4px 6px; border-bottom: 1px solid #ddd; }
#predictions td.num { text-align: right; font-variant-numeric: tabular-nums; }
#predictions img { max-width: 160px; max-height: 160px; display: block; margin-bottom: 2px; }
.text { white-space: pre-wrap; overflow-wrap: anywhere; max-height: 14em; overflow: auto; min-width: 12ch; }
.prediction { font-weight: 600; }
ul.references { margin: 0; padding-left: 1.1em; }
.note { color: #888; }
.problem { color: #b00; }
""".strip()

_SCRIPT = """
"use strict";
(() => {
  const table = document.getElementById("predictions");
  const body = table.tBodies[0];
  // The distinct thumbnails, stored once each; every <img data-t="k"> shows the k-th.
  const thumbnails = JSON.parse(document.getElementById("thumbnails").textContent);
  for (const img of body.querySelectorAll("img[data-t]")) img.src = thumbnails[Number(img.dataset.t)];
  const headers = Array.from(table.tHead.rows[0].cells);
  const collator = new Intl.Collator(undefined, {numeric: true});
  headers.forEach((th, column) => {
    if (th.dataset.type === "none") return;
    const numeric = th.dataset.type === "num";
    const sort = () => {
      const ascending = th.dataset.dir !== "asc";
      for (const h of headers) delete h.dataset.dir;
      th.dataset.dir = ascending ? "asc" : "desc";
      const sign = ascending ? 1 : -1;
      const rows = Array.from(body.rows, (row) => {
        const cell = row.cells[column];
        const key = numeric ? parseFloat(cell.dataset.v) : cell.textContent;
        return {row, key, missing: numeric ? Number.isNaN(key) : key === "", order: Number(row.dataset.i)};
      });
      rows.sort((a, b) => {
        if (a.missing !== b.missing) return a.missing ? 1 : -1;  // no value: last either way
        const c = a.missing ? 0 : numeric ? a.key - b.key : collator.compare(a.key, b.key);
        return c !== 0 ? sign * c : a.order - b.order;  // ties keep dataset order
      });
      for (const r of rows) body.appendChild(r.row);  // moves the existing rows
    };
    th.tabIndex = 0;
    th.addEventListener("click", sort);
    th.addEventListener("keydown", (event) => { if (event.key === "Enter") sort(); });
  });
  const filter = document.getElementById("filter");
  const shown = document.getElementById("shown");
  filter.addEventListener("input", () => {
    const query = filter.value.toLowerCase();
    let count = 0;
    for (const row of body.rows) {
      row.hidden = query !== "" && !row.textContent.toLowerCase().includes(query);
      count += row.hidden ? 0 : 1;
    }
    shown.textContent = query === "" ? "" : `${count} shown`;
  });
})();
""".strip()


def _sha256(text: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")


CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; img-src data:; style-src '{_sha256(_CSS)}'; script-src '{_sha256(_SCRIPT)}'; "
    "base-uri 'none'; form-action 'none'"
)
"""The page's policy: nothing loads or runs but its own stylesheet and script (by hash) and ``data:`` images."""


def thumbnail(image: Any, max_side: int = THUMBNAIL_SIDE) -> str:
    """A ``data:`` URI of ``image`` shrunk to at most ``max_side`` pixels on its longest side.

    PNG (lossless) when the thumbnail has at most 256 colours (charts, diagrams, synthetic images: small and
    sharp), else JPEG at quality 80 (photos: about 6 KB at 160 px).

    Args:
        image: A PIL image (any mode).
        max_side: Longest side of the thumbnail; smaller images keep their size.

    Returns:
        ``"data:image/png;base64,..."`` or ``"data:image/jpeg;base64,..."``.

    Example:
        >>> from PIL import Image
        >>> thumbnail(Image.new("RGB", (640, 480), "red"))[:22]
        'data:image/png;base64,'
    """
    small = image.copy()
    small.thumbnail((max_side, max_side))
    if small.mode not in ("RGB", "L"):
        small = small.convert("RGB")
    buffer = io.BytesIO()
    if small.getcolors(256) is not None:
        small.save(buffer, "PNG", optimize=True)
        kind = "png"
    else:
        small.save(buffer, "JPEG", quality=80)
        kind = "jpeg"
    return f"data:image/{kind};base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class Thumbnails:
    """The thumbnails of a dataset's images, made the first time an index is asked for and then kept.

    `fit` keeps one for its eval set, so that only the first evaluation loads the images. Records of the
    same image files (a VQA set asks several questions per image) share their thumbnails: with a dataset of
    this library (`llava_loop.data.VLDataset`, whose ``parsed_records`` name each record's images without
    decoding them) each file is loaded once. An index whose record cannot be read (a `SkippedSample`, an
    image file gone or corrupt, an undecoded image) gets no thumbnail and the reason instead; the first such
    reason is logged, every one is shown on the page. Identical thumbnails are kept once.

    Args:
        dataset: A map-style dataset of records (``dataset[i]`` decodes record ``i``'s images).
        max_side: Longest side of each thumbnail, in pixels.

    Example:
        >>> from llava_loop.testing import synthetic_vqa
        >>> from llava_loop.data import as_dataset
        >>> uris, problem = Thumbnails(as_dataset(synthetic_vqa(2))).get(1)
        >>> len(uris), problem
        (1, None)
    """

    def __init__(self, dataset: Any, max_side: int = THUMBNAIL_SIDE) -> None:
        self.dataset = dataset
        self.max_side = max_side
        self._made: dict[int, tuple[list[str], str | None]] = {}  # dataset index -> (URIs, why none)
        self._by_images: dict[tuple, list[str]] = {}  # a record's image paths/objects -> their URIs
        self._distinct: dict[str, str] = {}  # each distinct URI once (equal thumbnails share it)
        self._warned = False  # the first record without thumbnails was logged

    def get(self, index: int) -> tuple[list[str], str | None]:
        """``(data URIs of record index's images, in order; the reason there are none, or None)``."""
        if index not in self._made:
            images = self._images(index)
            if images is not None and images in self._by_images:
                self._made[index] = self._by_images[images], None
            else:
                self._made[index] = self._make(index)
                if images is not None and self._made[index][1] is None:
                    self._by_images[images] = self._made[index][0]
        return self._made[index]

    def _images(self, index: int) -> tuple | None:
        """What record ``index``'s images are, without decoding them (resolved paths, or the ids of images
        held in memory); None when the dataset does not say."""
        parsed = getattr(self.dataset, "parsed_records", None)
        if parsed is None:
            return None
        images = image_list(parsed[index].get("image"))
        return tuple(x if isinstance(x, str) else id(x) for x in images)  # the records keep them alive

    def _make(self, index: int) -> tuple[list[str], str | None]:
        try:
            record = self.dataset[index]
            if isinstance(record, SkippedSample):
                return self._problem(record.id, f"bad sample, skipped: {record.reason}")
            uris = [thumbnail(image, self.max_side) for image in record_images(record)]
        except Exception as err:  # the page shows why; a thumbnail never stops training
            return self._problem(f"#{index}", f"image not loaded: {type(err).__name__}: {err}")
        return [self._distinct.setdefault(uri, uri) for uri in uris], None

    def _problem(self, sample: str, reason: str) -> tuple[list[str], str]:
        if not self._warned:
            self._warned = True
            logger.warning(
                "no thumbnail for eval sample %s (%s); its row on the predictions page says why (further "
                "samples without thumbnails are shown there, not logged)",
                sample,
                reason,
            )
        return [], reason


def predictions_page(
    samples: list[dict],
    metrics: dict,
    *,
    step: int,
    thumbnails: Thumbnails | None = None,
    title: str | None = None,
) -> str:
    """The HTML page of one evaluation: header with the summary metrics, one sortable row per sample.

    Args:
        samples: One dict per sample, as `llava_loop.loop.EvalResult.samples` holds them: ``index`` (the
            position in the eval set; optional without ``thumbnails``), ``id``, ``prompt``, ``prediction``,
            ``references`` (list of str) and ``scores`` (``{key: float}``; every key gets a column).
        metrics: The summary (e.g. ``{"eval/exact_match": 0.5}``), shown in the header.
        step: The optimizer step of the evaluation.
        thumbnails: The images of ``samples`` by ``index``; None: an image column without images.
        title: The page title; default ``"Predictions at step {step}"``.

    Returns:
        The page: self-contained (no network), every text escaped, script and style allowed by hash only.

    Example:
        >>> row = {"id": "a", "prompt": "USER: Color? ASSISTANT:", "prediction": "<script>x()</script>",
        ...        "references": ["red"], "scores": {"exact_match": 0.0}}
        >>> page = predictions_page([row], {"eval/exact_match": 0.0}, step=4)
        >>> "&lt;script&gt;x()&lt;/script&gt;" in page, "<script>x()" in page
        (True, False)
    """
    score_keys = list(dict.fromkeys(key for sample in samples for key in sample.get("scores") or {}))
    distinct: dict[str, int] = {}  # URI -> its position in the page's thumbnail table
    rows, missing = [], 0
    for position, sample in enumerate(samples):
        index = sample.get("index", position)
        uris, problem = thumbnails.get(index) if thumbnails is not None else ([], None)
        missing += problem is not None
        keys = [distinct.setdefault(uri, len(distinct)) for uri in uris]
        rows.append(_row(position, index, sample, keys, problem, score_keys))
    columns = [("#", "num"), ("image", "none"), ("id", "text"), ("prompt", "text"), ("prediction", "text")]
    columns += [("references", "text"), *((key, "num") for key in score_keys)]
    head = "".join(
        f'<th data-type="{kind}"{" class=plain" if kind == "none" else ""}>{_escape(name)}</th>'
        for name, kind in columns
    )
    title = title if title is not None else f"Predictions at step {step}"
    summary = "".join(f"<tr><th>{_escape(k)}</th><td>{_escape(_number(v))}</td></tr>" for k, v in metrics.items())
    counts = f"{len(samples):,} sample{'' if len(samples) == 1 else 's'}, {len(distinct):,} distinct images"
    if missing:
        counts += f", {missing:,} without thumbnails (the row says why)"
    # The table of thumbnails is JSON in a data block (never run); "<" is escaped in case of a stray "</script".
    table = json.dumps(list(distinct)).replace("<", "\\u003c")
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            f'<meta http-equiv="Content-Security-Policy" content="{_escape(CONTENT_SECURITY_POLICY)}">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{_escape(title)}</title>",
            f"<style>{_CSS}</style>",
            "</head>",
            "<body>",
            f"<h1>{_escape(title)}</h1>",
            f'<table class="summary"><tr><th>step</th><td>{step}</td></tr>{summary}</table>',
            f'<p>{_escape(counts)}. Click a column header to sort (again to reverse). <input type="search" '
            'id="filter" placeholder="filter rows" aria-label="filter rows"> <span id="shown"></span></p>',
            f'<table id="predictions"><thead><tr>{head}</tr></thead>',
            "<tbody>",
            *rows,
            "</tbody></table>",
            f'<script type="application/json" id="thumbnails">{table}</script>',
            f"<script>{_SCRIPT}</script>",
            "</body>",
            "</html>",
            "",
        ]
    )


def write_predictions_page(
    path: str | Path,
    samples: list[dict],
    metrics: dict,
    *,
    step: int,
    thumbnails: Thumbnails | None = None,
) -> None:
    """Write `predictions_page` to ``path`` atomically (a reader never sees half a page).

    Example:
        >>> write_predictions_page("run/predictions/step_000004.html", samples, metrics, step=4)  # doctest: +SKIP
    """
    atomic_write_text(path, predictions_page(samples, metrics, step=step, thumbnails=thumbnails))


def _row(
    position: int, index: int, sample: dict, thumbnail_keys: list[int], problem: str | None, score_keys: list
) -> str:
    """One ``<tr>``: dataset position, images, id, prompt, prediction, references, scores."""
    sample_id = _escape(sample.get("id", ""))
    if thumbnail_keys:
        images = "".join(f'<img data-t="{k}" alt="image {n} of {sample_id}">' for n, k in enumerate(thumbnail_keys, 1))
    elif problem is not None:
        images = f'<span class="problem">{_escape(problem)}</span>'
    else:
        images = '<span class="note">no image</span>'
    references = "".join(f"<li>{_escape(r)}</li>" for r in sample.get("references") or [])
    scores = (sample.get("scores") or {}).get
    cells = [
        f'<td class="num" data-v="{int(index)}">{int(index)}</td>',
        f"<td>{images}</td>",
        f"<td>{sample_id}</td>",
        f'<td><div class="text">{_escape(sample.get("prompt", ""))}</div></td>',
        f'<td><div class="text prediction">{_escape(sample.get("prediction", ""))}</div></td>',
        f'<td><ul class="references text">{references}</ul></td>',
        *(_score_cell(scores(key)) for key in score_keys),
    ]
    return f'<tr data-i="{position}">{"".join(cells)}</tr>'


def _score_cell(value: Any) -> str:
    """A score's cell: its value to 4 significant digits, the exact number in ``data-v`` for sorting
    (empty, sorted last, when the sample has none or it is NaN)."""
    number = _as_float(value)
    if number is None:
        return f'<td class="num" data-v="">{_escape("" if value is None else value)}</td>'
    sort_key = "" if math.isnan(number) else repr(number).replace("inf", "Infinity")  # as JS parseFloat reads
    return f'<td class="num" data-v="{sort_key}">{_escape(_number(number))}</td>'


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _escape(value: Any) -> str:
    """``value`` as HTML text: ``& < > " '`` escaped, and any lone surrogate (invalid in UTF-8) replaced."""
    text = str(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "replace").decode("utf-8")
    return html.escape(text, quote=True)
