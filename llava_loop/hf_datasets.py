"""Hugging Face ``datasets`` in and out: train on a `datasets.Dataset` as it is, or convert a VQA or
caption dataset into LLaVA JSON and an image folder.

**In.** `fit`, `Loop.evaluate` and `llava_loop.data.as_dataset` take a `datasets.Dataset` (any
format: ``with_format("torch")`` and the like are read as Python rows), and `fit` a `DatasetDict`
(`fit_splits`). `HFDataset` reads the *text* columns (``id``, ``conversations`` or ``messages``,
``answers``) once, validates every row with `llava_loop.data.normalize_record` exactly like a JSON
record, and leaves the images in the dataset's Arrow table: an ``image`` column (a `datasets.Image`,
or paths) or an ``images`` column (a list of them) is read for row ``i`` only in ``dataset[i]``.
Counting the images of each row and their file names reads Arrow lengths and the ``path`` field,
never the image bytes, so building it over 100k rows costs seconds and decodes no image.

**Out.** `to_llava_json` (CLI: ``llava-loop convert``) turns a VQA dataset (question, answers) or a
caption dataset (image, captions) into ``{split}.json`` files and an ``images/`` folder that
`llava_loop.data.load_llava_json` reads.

``datasets`` is imported only when a user hands us a ``datasets`` object (then it is installed) or
converts; otherwise nothing here needs it (``pip install 'llava_loop[datasets]'``).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from .checkpointing import atomic_write_bytes, atomic_write_text
from .data import (
    IMAGE_TOKEN,
    BadSampleError,
    OnBadSample,
    StoredImage,
    VLDataset,
    _resolve_image,
    check_on_bad_sample,
    check_record,
    image_list,
    skip_or_raise,
)

logger = logging.getLogger(__name__)

TRAIN_SPLIT = "train"
"""The split `fit` trains on when given a `DatasetDict`."""
EVAL_SPLIT = "validation"
"""The split `fit` evaluates on when given a `DatasetDict` and no ``eval_data``."""

INSTALL_HINT = "pip install 'llava_loop[datasets]'"

VQA_PROMPT = f"{IMAGE_TOKEN}\n{{question}}\nAnswer the question using a single word or phrase."
"""LLaVA-1.5's short-answer prompt (its VQAv2/GQA/OK-VQA training data and eval prompts)."""
CAPTION_PROMPT = f"{IMAGE_TOKEN}\nProvide a one-sentence caption for the provided image."
"""LLaVA-1.5's captioning prompt (its TextCaps training data; the usual COCO/TextCaps eval prompt)."""

# Column names tried, in order, when a column is not named (`to_llava_json`).
QUESTION_COLUMNS = ("question", "query")
ANSWERS_COLUMNS = ("answers", "answer")
CAPTION_COLUMNS = ("captions", "caption", "caption_str", "sentences", "text")
ID_COLUMNS = {"vqa": ("question_id", "id"), "caption": ("id", "image_id")}
_IMAGE_PATH_COLUMNS = ("image", "images", "image_path", "file_name", "filename")
# The text keys of an item in a list of answers/captions given as dicts (VQAv2: {"answer": ...}).
_TEXT_KEYS = ("answer", "raw", "caption", "text")

# What `HFDataset` reads from a dataset row: the keys of a JSON record.
_TEXT_COLUMNS = ("id", "conversations", "messages", "answers")
_IMAGE_COLUMNS = ("image", "images")
_FORMAT_EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}

_STREAMING = (
    "a streaming datasets.IterableDataset (load_dataset(..., streaming=True)) cannot be trained on: the loop needs "
    "its length and random access (a new order each epoch, exact resume at a sample, longest-first evaluation). "
    "Load it without streaming=True (datasets keeps it memory-mapped on disk and llava_loop decodes images only "
    "when a sample is used), or write a part of the stream to disk first: "
    "datasets.Dataset.from_generator(lambda: (yield from stream.take(n)), features=stream.features)"
)


def datasets_kind(data: Any) -> Literal["dataset", "dict", "iterable"] | None:
    """What kind of ``datasets`` object ``data`` is, without importing ``datasets``.

    Returns:
        ``"dataset"`` (`datasets.Dataset`), ``"dict"`` (`DatasetDict`), ``"iterable"``
        (`IterableDataset` / `IterableDatasetDict`), or None for anything else; an object can only
        be a ``datasets`` object if the user imported ``datasets``.

    Example:
        >>> datasets_kind([{"messages": []}]) is None
        True
    """
    module = sys.modules.get("datasets")
    if module is None:
        return None
    if isinstance(data, module.Dataset):
        return "dataset"
    if isinstance(data, module.DatasetDict):
        return "dict"
    if isinstance(data, (module.IterableDataset, module.IterableDatasetDict)):
        return "iterable"
    return None


# ---------------------------------------------------------------------- DatasetDict: which split is what
def fit_splits(train_data: Any, eval_data: Any) -> tuple[Any, Any]:
    """`fit`'s rule for a `datasets.DatasetDict`: train on its ``"train"`` split and, when
    ``eval_data`` is None, evaluate on its ``"validation"`` split (logged; no other split is used
    on its own). Anything else passes through (a `DatasetDict` as ``eval_data``: `eval_split`).

    Raises:
        ValueError: A `DatasetDict` without a ``"train"`` split; the message lists its splits.

    Example:
        >>> fit_splits(["a"], None)
        (['a'], None)
    """
    if datasets_kind(train_data) == "dict":
        splits = list(train_data)
        if TRAIN_SPLIT not in train_data:
            raise ValueError(
                f"fit got a DatasetDict without a {TRAIN_SPLIT!r} split (splits: {', '.join(splits)}); pass the split "
                f"to train on, e.g. fit(model, processor, data[{splits[0]!r}])"
            )
        if eval_data is None and EVAL_SPLIT in train_data:
            eval_data = train_data[EVAL_SPLIT]
            logger.info("DatasetDict: training on split %r, evaluating on split %r", TRAIN_SPLIT, EVAL_SPLIT)
        elif eval_data is None:
            others = [s for s in splits if s != TRAIN_SPLIT]
            hint = f"; pass eval_data=data[{others[0]!r}] to evaluate on another split" if others else ""
            logger.info(
                "DatasetDict: training on split %r; no %r split among %s, so no eval data%s",
                *(TRAIN_SPLIT, EVAL_SPLIT, splits, hint),
            )
        train_data = train_data[TRAIN_SPLIT]
    return train_data, eval_split(eval_data)


def eval_split(data: Any) -> Any:
    """The ``"validation"`` split of a `datasets.DatasetDict` given as eval data; anything else as it is.

    Raises:
        ValueError: A `DatasetDict` without a ``"validation"`` split; the message lists its splits.

    Example:
        >>> eval_split(None) is None
        True
    """
    if datasets_kind(data) != "dict":
        return data
    if EVAL_SPLIT not in data:
        splits = list(data)
        raise ValueError(
            f"eval data is a DatasetDict without a {EVAL_SPLIT!r} split (splits: {', '.join(splits)}); pass the split "
            f"to evaluate on, e.g. data[{splits[-1]!r}]"
        )
    return data[EVAL_SPLIT]


def from_hf(
    data: Any,
    image_folder: str | os.PathLike[str] | None = None,
    *,
    on_bad_sample: OnBadSample = "raise",
    allow_external_images: bool = False,
) -> HFDataset:
    """`llava_loop.data.as_dataset` for ``datasets`` objects: an `HFDataset` of a `datasets.Dataset`.

    Raises:
        ValueError: A `DatasetDict` (pass one split; `fit` chooses its splits itself, `fit_splits`).
        TypeError: A streaming `IterableDataset`: the loop needs a length and random access.
    """
    kind = datasets_kind(data)
    if kind == "dict":
        raise ValueError(
            f"got a DatasetDict (splits: {', '.join(data)}); pass one split, e.g. data[{next(iter(data), 'train')!r}] "
            f"(fit(model, processor, data) itself trains on {TRAIN_SPLIT!r} and evaluates on {EVAL_SPLIT!r})"
        )
    if kind == "iterable":
        raise TypeError(_STREAMING)
    return HFDataset(
        data, image_folder=image_folder, on_bad_sample=on_bad_sample, allow_external_images=allow_external_images
    )


# ---------------------------------------------------------------------- a datasets.Dataset as records
class HFDataset(VLDataset):
    """A `datasets.Dataset` read as records: every row validated at construction, images read lazily.

    Rows are JSON records as columns: ``conversations`` (LLaVA) or ``messages`` (HF, string content
    or content lists such as ``[{"type": "image"}, {"type": "text", "text": ...}]``), optionally
    ``id`` and ``answers`` (eval references), and the images in an ``image`` column (one
    `datasets.Image` or path per row, or null) or an ``images`` column (a list of them; TRL's layout).
    Other columns are ignored. Each row goes through `llava_loop.data.normalize_record`, so it is
    validated exactly like a JSON record; a row without an ``id`` is ``"<split>[<row>]"``
    (``"train[17]"``, or ``"row[17]"`` for a dataset with no split name).

    Construction reads the text columns and, for `datasets.Image` columns, only how many images a
    row holds and their file names (Arrow lengths and ``path`` fields): no image bytes are read and
    nothing is decoded. ``dataset[i]`` reads row ``i``'s images (their stored bytes, or their file)
    and decodes them with `llava_loop.data.load_image`. Image paths in string columns resolve
    against ``image_folder`` (default: the current directory) and must stay inside it unless
    ``allow_external_images``, as in JSON files.

    Args:
        dataset: The `datasets.Dataset`; any format, ``select``/``shuffle``/``filter`` applied or not.
        image_folder: Folder that relative image paths (string columns) resolve against.
        on_bad_sample: ``"raise"`` (default) or ``"skip"``.
        allow_external_images: Accept string image paths outside the image folder.

    Raises:
        ValueError: No ``conversations``/``messages`` column, an image column of another type,
            images nested inside the messages, or no usable rows.
        BadSampleError: A row is structurally invalid (raise mode).

    Example:
        >>> import datasets  # doctest: +SKIP
        >>> ds = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "Hi"},
        ...     {"role": "assistant", "content": "Hey"}]}])  # doctest: +SKIP
        >>> HFDataset(ds)[0]["id"]  # doctest: +SKIP
        'row[0]'
    """

    def __init__(
        self,
        dataset: Any,
        *,
        image_folder: str | os.PathLike[str] | None = None,
        on_bad_sample: OnBadSample = "raise",
        allow_external_images: bool = False,
    ) -> None:
        check_on_bad_sample(on_bad_sample)
        split = str(dataset.split) if dataset.split is not None else None
        source = f"HF dataset {split!r}" if split else "HF dataset"
        stored, paths = _image_columns(dataset, source)
        text = dataset.select_columns([c for c in (*_TEXT_COLUMNS, *paths) if c in dataset.column_names])
        columns = text.with_format(None)[:]  # python lists, column by column: only text is read
        images = {column: _stored_images(dataset, column, many) for column, many in stored.items()}
        label = split or "row"

        def rows():
            for i in range(len(dataset)):
                raw = {column: values[i] for column, values in columns.items()}
                if raw.get("id") is None or raw.get("id") == "":
                    raw["id"] = f"{label}[{i}]"
                raw.update((column, per_row[i]) for column, per_row in images.items())
                yield raw

        # The images of one row, undecoded: Arrow rows hold a datasets.Image as {"bytes", "path"}.
        self._images = dataset.select_columns(list(stored)).with_format("arrow") if stored else None
        super().__init__(
            rows(),
            image_folder=image_folder if image_folder is not None else os.getcwd(),
            source=source,
            on_bad_sample=on_bad_sample,
            allow_external_images=allow_external_images,
        )

    def _decoded_image(self, record: dict[str, Any]) -> Any:
        """Fetch the row's stored images (bytes or file path), then decode them as any record's."""
        stored = record["image"]
        refs = stored if isinstance(stored, list) else [stored]
        row = next((r.row for r in refs if isinstance(r, StoredImage)), None)
        if row is None:
            return super()._decoded_image(record)
        values = self._images[row].to_pylist()[0]
        fetched = []
        for ref in refs:
            if isinstance(ref, StoredImage):
                value = values[ref.column] if ref.position is None else values[ref.column][ref.position]
                ref = value["bytes"] if value["bytes"] is not None else value["path"]
                if ref is None:
                    raise BadSampleError(record["id"], self.source, "its image has neither bytes nor a path")
            fetched.append(ref)
        return super()._decoded_image({**record, "image": fetched if isinstance(stored, list) else fetched[0]})

    def fingerprint(self) -> str:
        """A hash of every record's id, image file names (where stored) and text, in order.

        The resume check (`llava_loop.rundir.data_fingerprint`) compares it. Unlike a JSON file, an HF
        dataset's images often have no file names and its rows no ids, so the text counts too: an
        edited row is changed training data. Reads the parsed records only (no image).
        """
        digest = hashlib.sha256()
        for record in self.parsed_records:
            images = image_list(record["image"])
            names = [x.name if isinstance(x, StoredImage) else os.path.basename(os.fspath(x)) for x in images]
            item = [record["id"], names, [[t["from"], t["value"]] for t in record["conversations"]]]
            digest.update(json.dumps([*item, record.get("answers")]).encode("utf-8", "surrogatepass"))
        return digest.hexdigest()


def _image_columns(dataset: Any, source: str) -> tuple[dict[str, bool], list[str]]:
    """The ``image``/``images`` columns: ``{column: holds a list}`` for `datasets.Image` columns, and
    the string (path) columns. Raises for layouts llava_loop cannot read lazily or at all."""
    columns, features = dataset.column_names, dataset.features
    if dataset.format["type"] == "custom":
        raise ValueError(
            f"{source} has a transform (with_transform/set_transform), which would have to run on every row, images "
            "included, to read its text; apply it with dataset.map(...) instead (its result is cached on disk), or "
            "pass a torch Dataset that yields records"
        )
    if "conversations" not in columns and "messages" not in columns:
        raise ValueError(
            f"{source} has no 'conversations' (LLaVA) or 'messages' (HF) column; its columns: {columns}. A VQA or "
            "caption dataset (question/answers or caption columns) converts with llava_loop.hf_datasets.to_llava_json "
            "or `llava-loop convert`"
        )
    for column in _TEXT_COLUMNS:
        if column in columns and _holds_media(features[column]):
            raise ValueError(
                f"{source}: column {column!r} holds images (or other media) inside it, which would be decoded to "
                "read its text; put the images in an 'images' column (a list, one per {'type': 'image'} item, in "
                "order: TRL's layout) or an 'image' column"
            )
    stored, paths = {}, []
    for column in (c for c in _IMAGE_COLUMNS if c in columns):
        kind = _image_kind(features[column])
        if kind is None:
            raise ValueError(
                f"{source}: column {column!r} is {features[column]}; expected a datasets.Image, a list of them, or "
                "image paths (strings)"
            )
        if kind == "path":
            paths.append(column)
        else:
            stored[column] = kind == "many"
    if not stored and not paths:
        elsewhere = [c for c in columns if _image_kind(features[c]) in ("one", "many")]
        if elsewhere:
            raise ValueError(
                f"{source}: the images are in column {elsewhere[0]!r}, but llava_loop reads them from 'image' (one per "
                f"row) or 'images' (a list per row); rename it: dataset.rename_column({elsewhere[0]!r}, 'image')"
            )
    return stored, paths


def _stored_images(dataset: Any, column: str, many: bool) -> list[Any]:
    """Per dataset row: None, a `StoredImage` (one-image column) or a list of them, from the Arrow
    lengths and ``path`` fields only (the image bytes are never read)."""
    per_table_row: list[list[str] | None] = []
    for chunk in dataset.data.column(column).chunks:
        if many:
            names = iter(_names(chunk.flatten()))  # the images of every row, in order (offsets respected)
            lengths = chunk.value_lengths().to_pylist()  # None for a null list
            per_table_row += [None if n is None else [next(names) for _ in range(n)] for n in lengths]
        else:
            valid = chunk.is_valid().to_pylist()
            per_table_row += [[name] if ok else None for ok, name in zip(valid, _names(chunk))]
    # select/shuffle/filter keep the table and map rows through an indices table (datasets internals).
    indices = dataset._indices
    order = indices.column(0).to_pylist() if indices is not None else range(len(per_table_row))
    out: list[Any] = []
    for row, table_row in enumerate(order):
        names = per_table_row[table_row]
        if names is None:
            out.append(None)
        elif many:
            out.append([StoredImage(row, column, k, name) for k, name in enumerate(names)])
        else:
            out.append(StoredImage(row, column, None, names[0]))
    return out


def _names(images: Any) -> list[str]:
    """The file names of an Arrow array of datasets.Image structs ("" where none is stored)."""
    paths = images.field("path").to_pylist()
    return [os.path.basename(p) if p else "" for p in paths]


def _list_item(feature: Any) -> Any:
    """The item feature of a list feature (List/Sequence/LargeList, or ``[feature]``); None otherwise."""
    import datasets

    if isinstance(feature, list) and len(feature) == 1:
        return feature[0]
    kinds = tuple(getattr(datasets, name) for name in ("List", "Sequence", "LargeList") if hasattr(datasets, name))
    return feature.feature if isinstance(feature, kinds) else None


def _image_kind(feature: Any) -> Literal["one", "many", "path"] | None:
    """``"one"``: a datasets.Image; ``"many"``: a list of them; ``"path"``: strings or lists of strings."""
    import datasets

    item = _list_item(feature)
    if isinstance(feature, datasets.Image):
        return "one"
    if isinstance(item, datasets.Image):
        return "many"
    if any(isinstance(f, datasets.Value) and f.dtype in ("string", "large_string") for f in (feature, item)):
        return "path"
    return None


def _holds_media(feature: Any) -> bool:
    """Whether a (nested) feature holds images, audio, video, ...: decodable features other than Json
    (JSON text, as datasets stores columns of mixed types)."""
    import datasets

    if isinstance(feature, dict):
        return any(_holds_media(f) for f in feature.values())
    item = _list_item(feature)
    if item is not None:
        return _holds_media(item)
    json_feature = getattr(datasets, "Json", ())  # datasets >= 4
    return hasattr(feature, "decode_example") and not isinstance(feature, json_feature)


# ---------------------------------------------------------------------- VQA / caption datasets -> LLaVA JSON
@dataclass(frozen=True)
class _Plan:
    """The columns and prompt of one split's conversion."""

    task: Literal["vqa", "caption"]
    image: str
    image_kind: Literal["one", "path"]
    text: str  # the question column (vqa) or the caption column
    answers: str | None  # vqa only
    id: str | None  # None: ids from the split name and the row
    prompt: str


def to_llava_json(
    dataset: Any,
    out_dir: str | os.PathLike[str],
    *,
    task: Literal["auto", "vqa", "caption"] = "auto",
    image_column: str | None = None,
    question_column: str | None = None,
    answers_column: str | None = None,
    caption_column: str | None = None,
    id_column: str | None = None,
    prompt: str | None = None,
    one_record_per: Literal["image", "caption"] = "image",
    image_folder: str | os.PathLike[str] | None = None,
    allow_external_images: bool = False,
    on_bad_sample: OnBadSample = "raise",
    overwrite: bool = False,
) -> dict[str, str]:
    """Convert a VQA or caption dataset to LLaVA JSON (``{split}.json``) plus an image folder (``images/``).

    * **VQA** (VQAv2, OK-VQA, TextVQA, GQA, ...): one record per question. The prompt is
      ``prompt`` with ``{question}`` filled in; the training answer is the most frequent answer
      (counted after the VQA answer normalisation of ``vqa_accuracy``, so it is the answer that
      scores best against the references; ties go to the first), and ``answers`` keeps all
      answers as given, the references ``vqa_accuracy`` counts.
    * **Captions** (COCO, TextCaps, OCR captions, ...): ``one_record_per="image"`` gives one
      record per image, trained on its first caption, with every caption in ``answers`` (the
      references of BLEU/ROUGE); ``"caption"`` gives one record per caption (ids ``<id>-<k>``),
      each trained on its caption, all captions as references.

    Images are written as stored, byte for byte (no re-encoding), to ``images/<sha256 prefix><ext>``:
    the name comes from the content, so a file is the same whatever the row order, and an image
    that several questions share is written once. Records refer to them as ``images/...``,
    relative to the JSON file, so ``load_llava_json(paths["train"])`` needs no image folder. Every
    record passes `llava_loop.data.check_record`; every split's columns are checked before
    anything is written, and the JSON files are written last (atomically); a conversion that fails
    on a row removes what it wrote into an ``out_dir`` that was empty.

    Columns left as None are found by name: question ``question``/``query``; answers
    ``answers``/``answer`` (a string, a list of strings, or a list of dicts with ``"answer"``, as
    VQAv2); captions ``captions``/``caption``/``caption_str``/``sentences``/``text`` (a string or a
    list of strings, or of dicts with ``"raw"``/``"caption"``/``"text"``); image: the one
    `datasets.Image` column, else a path column ``image``/``images``/``image_path``/``file_name``;
    id ``question_id``/``id`` (VQA), ``id``/``image_id`` (captions). A missing or ambiguous column
    is an error listing the dataset's columns.

    Args:
        dataset: A `datasets.Dataset` (written as ``<its split>.json``, ``data.json`` without one)
            or a `DatasetDict` (one JSON file per split).
        out_dir: Output folder; must be empty or absent unless ``overwrite``.
        task: ``"vqa"``, ``"caption"``, or ``"auto"``: VQA when there is a question column, else
            captions.
        image_column: Column holding the image (a `datasets.Image`, or a path).
        question_column: VQA: the question column.
        answers_column: VQA: the answers column.
        caption_column: Captions: the caption(s) column.
        id_column: Column of unique record ids; ``""`` for ids from the split and row
            (``"train-17"``), which is also the default when no id column is found.
        prompt: The human turn; ``{question}`` is replaced by the question. Default:
            `VQA_PROMPT` / `CAPTION_PROMPT` (LLaVA-1.5's).
        one_record_per: Captions: ``"image"`` or ``"caption"`` (see above).
        image_folder: Folder relative image paths (path columns) resolve against; default: the
            current directory. Paths must stay inside it unless ``allow_external_images``.
        allow_external_images: Accept image paths outside ``image_folder``.
        on_bad_sample: ``"raise"`` (default) or ``"skip"`` (a row without a question or answer,
            an unreadable image, ...: logged and counted).
        overwrite: Write into a non-empty ``out_dir`` (the split JSON files are replaced; images
            are content-named, so existing ones are kept).

    Returns:
        ``{split: path of its JSON file}``.

    Raises:
        ValueError: Missing or ambiguous columns, duplicate ids, a non-empty ``out_dir``.
        BadSampleError: A bad row (raise mode).
        TypeError: ``dataset`` is not a `datasets.Dataset`/`DatasetDict` (a streaming one cannot
            be converted either: load it without ``streaming=True``).

    Example:
        >>> okvqa = load_dataset("Multimodal-Fatima/OK-VQA_train")  # a DatasetDict: split "train"  # doctest: +SKIP
        >>> paths = to_llava_json(okvqa, "okvqa", id_column="question_id")  # it also has an "id"  # doctest: +SKIP
        >>> paths  # doctest: +SKIP
        {'train': 'okvqa/train.json'}
        >>> train = load_llava_json(paths["train"])  # doctest: +SKIP
    """
    check_on_bad_sample(on_bad_sample)
    kind = datasets_kind(dataset)
    if kind == "iterable":
        raise TypeError("cannot convert a streaming IterableDataset: load it without streaming=True")
    if kind is None:
        raise TypeError(
            f"to_llava_json takes a datasets.Dataset or DatasetDict, got {type(dataset).__name__}; build one with "
            "datasets.Dataset.from_list(rows) or load_dataset(...)"
        )
    if one_record_per not in ("image", "caption"):
        raise ValueError(f"one_record_per={one_record_per!r} is invalid: expected 'image' or 'caption'")
    splits = dict(dataset) if kind == "dict" else {str(dataset.split) if dataset.split is not None else "data": dataset}
    options = dict(task=task, image_column=image_column, question_column=question_column,
                   answers_column=answers_column, caption_column=caption_column, id_column=id_column, prompt=prompt)  # fmt: skip
    plans = {name: plan_conversion(split.features, name, options) for name, split in splits.items()}
    for name, split in splits.items():
        _check_unique_ids(split, plans[name], name)
    out = Path(out_dir)
    check_out_dir(out, overwrite)
    fresh = not out.exists() or not any(out.iterdir())
    folder = os.path.expanduser(os.fspath(image_folder)) if image_folder is not None else os.getcwd()
    confine = None if allow_external_images else folder
    try:
        converted = {
            name: _convert_split(split, plans[name], name, out, folder, confine, one_record_per, on_bad_sample)
            for name, split in splits.items()
        }
    except BaseException:
        if fresh:  # a failed conversion leaves nothing behind in a folder it started empty
            shutil.rmtree(out, ignore_errors=True)
        raise
    written = {}
    for name, records in converted.items():
        path = out / f"{name}.json"
        # One record per line: compact, and still greppable.
        atomic_write_text(path, "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n]\n")
        logger.info("wrote %d records of split %r to %s (images in %s)", len(records), name, path, out / "images")
        written[name] = str(path)
    return written


_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


def convert_source(
    source: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    split: str | None = None,
    config_name: str | None = None,
    image_folder: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    **options: Any,
) -> dict[str, str]:
    """`to_llava_json` of a dataset named by a path or a Hub name: what ``llava-loop convert`` runs.

    ``source`` is, in this order: a folder written by ``save_to_disk`` (read with
    ``datasets.load_from_disk``); a ``.json``/``.jsonl``/``.parquet``/``.csv``/``.arrow`` file (read as
    split ``split``, default ``"train"``); another folder (``datasets.load_dataset(folder)``: data
    files found by name, e.g. ``train-*.parquet``, or an image folder with ``metadata.jsonl``); or a
    Hub dataset name (``config_name`` = its subset), whose columns are checked from its metadata
    before anything is downloaded. Relative image paths resolve against ``image_folder``, by
    default the folder of a local source. Checks ``out_dir`` first; nothing is written before every
    split's columns are checked.

    Args:
        source: As above.
        out_dir: Output folder (see `to_llava_json`).
        split: Convert only this split (default: all); the split name of a single data file.
        config_name: A Hub dataset's configuration (subset).
        image_folder: Folder relative image paths resolve against.
        overwrite: Write into a non-empty ``out_dir``.
        **options: The other arguments of `to_llava_json` (``task``, ``question_column``, ...).

    Returns:
        ``{split: path of its JSON file}``.

    Raises:
        ImportError: ``datasets`` is not installed (names the extra to install).
        ValueError: A source that is neither a local dataset nor (online) a Hub name, a missing split,
            and every error of `to_llava_json`.

    Example:
        >>> convert_source("okvqa_val.parquet", "okvqa", split="validation")  # doctest: +SKIP
        {'validation': 'okvqa/validation.json'}
    """
    check_out_dir(Path(out_dir), overwrite)
    datasets = import_datasets()
    path = Path(source).expanduser()
    folder = path if path.is_dir() else path.parent if path.is_file() else None
    if path.is_dir() and any((path / f).is_file() for f in ("dataset_dict.json", "state.json")):
        data = datasets.load_from_disk(os.fspath(path))
        if split is not None:
            if datasets_kind(data) != "dict" or split not in data:
                splits = list(data) if datasets_kind(data) == "dict" else [str(data.split)]
                raise ValueError(f"{os.fspath(path)} has no split {split!r} (splits: {', '.join(splits)})")
            data = data[split]
    elif path.is_file():
        builder = _FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"{os.fspath(path)}: unsupported file type; use one of {', '.join(_FILE_BUILDERS)}")
        name = split or TRAIN_SPLIT
        data = datasets.load_dataset(builder, data_files={name: os.fspath(path)}, split=name)
    elif path.is_dir():
        data = datasets.load_dataset(os.fspath(path), split=split)
    elif datasets.config.HF_HUB_OFFLINE:
        raise ValueError(
            f"{os.fspath(source)!r} is no file or folder, and the Hugging Face Hub is off (HF_HUB_OFFLINE or "
            "HF_DATASETS_OFFLINE is set): give a local dataset, or unset those to download a Hub dataset"
        )
    else:
        features = datasets.load_dataset_builder(os.fspath(source), config_name).info.features
        if features is not None:  # the Hub metadata knows the columns: check them before the download
            plan_conversion(features, split or "any", options)
        data = datasets.load_dataset(os.fspath(source), config_name, split=split)
    if image_folder is None and folder is not None:
        image_folder = folder
    return to_llava_json(data, out_dir, image_folder=image_folder, overwrite=overwrite, **options)


def import_datasets() -> Any:
    """``import datasets``, or an `ImportError` saying how to install it."""
    try:
        import datasets
    except ImportError as err:
        raise ImportError(f"this needs the Hugging Face datasets package ({err}); {INSTALL_HINT}") from err
    return datasets


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty output folder unless ``overwrite`` (before any work is done)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {os.fspath(out)!r} is a file; choose a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(
            f"out_dir {os.fspath(out)!r} is not empty; choose another folder, or overwrite=True (llava-loop convert "
            "--overwrite) to write into it"
        )


def plan_conversion(features: Any, split: str, options: dict[str, Any]) -> _Plan:
    """Decide the columns and prompt of `to_llava_json` from a split's features (no data read), so a
    wrong column name fails before a download or any writing. ``options`` are `to_llava_json`'s
    keyword arguments (``task``, ``*_column``, ``prompt``; others are ignored). Raises `ValueError`
    naming the split's columns."""
    import datasets

    task, prompt = options.get("task", "auto"), options.get("prompt")
    question_column, caption_column = options.get("question_column"), options.get("caption_column")
    columns = list(features)
    where = f"split {split!r} (columns: {', '.join(columns)})"

    def pick(given: str | None, candidates: tuple[str, ...], what: str, flag: str) -> str | None:
        if given is not None:
            if given not in columns:
                raise ValueError(f"{flag}={given!r} is not a column of {where}")
            return given
        found = [c for c in candidates if c in columns]
        if len(found) > 1:
            raise ValueError(f"{where}: several columns could be the {what} ({', '.join(found)}); pass {flag}")
        return found[0] if found else None

    if task not in ("auto", "vqa", "caption"):
        raise ValueError(f"task={task!r} is invalid: expected 'auto', 'vqa' or 'caption'")
    if task == "auto" and question_column is None and caption_column is not None:
        task = "caption"  # a caption column named explicitly decides
    question_col = pick(question_column, QUESTION_COLUMNS, "question", "question_column") if task != "caption" else None
    if task == "auto":
        task = "vqa" if question_col is not None else "caption"
    if task == "vqa":
        answers_col = pick(options.get("answers_column"), ANSWERS_COLUMNS, "answers", "answers_column")
        if question_col is None or answers_col is None:
            missing = "question" if question_col is None else "answers"
            raise ValueError(
                f"{where}: no {missing} column for a VQA conversion; pass {missing}_column (a caption dataset: "
                "task='caption' and caption_column)"
            )
        text_col = question_col
    else:
        answers_col = None
        text_col = pick(caption_column, CAPTION_COLUMNS, "captions", "caption_column")
        if text_col is None:
            raise ValueError(
                f"{where}: found neither a question column (VQA: {', '.join(QUESTION_COLUMNS)}) nor a caption column "
                f"({', '.join(CAPTION_COLUMNS)}); pass question_column and answers_column, or caption_column"
            )
    image_col = options.get("image_column")
    if image_col is None:
        stored = [c for c in columns if isinstance(features[c], datasets.Image)]
        if len(stored) > 1:
            raise ValueError(f"{where}: several image columns ({', '.join(stored)}); pass image_column")
        image_col = stored[0] if stored else pick(None, _IMAGE_PATH_COLUMNS, "image path", "image_column")
    if image_col is None or image_col not in columns:
        raise ValueError(f"{where}: no image column; pass image_column (a datasets.Image or an image path column)")
    image_kind = _image_kind(features[image_col])
    if image_kind not in ("one", "path") or _list_item(features[image_col]) is not None:
        raise ValueError(
            f"{where}: image column {image_col!r} is {features[image_col]}; expected one datasets.Image or one image "
            "path per row"
        )
    id_column = options.get("id_column")
    id_col = None if id_column == "" else pick(id_column, ID_COLUMNS[task], "id", "id_column")
    prompt = prompt if prompt is not None else VQA_PROMPT if task == "vqa" else CAPTION_PROMPT
    if task == "vqa" and "{question}" not in prompt:
        raise ValueError(f"prompt {prompt!r} has no {{question}} placeholder for the question")
    if prompt.count(IMAGE_TOKEN) != 1:
        raise ValueError(
            f"prompt {prompt!r} must hold one {IMAGE_TOKEN} marker where the image goes, e.g. "
            f"{IMAGE_TOKEN + chr(10) + '{question}'!r}"
        )
    return _Plan(task, image_col, image_kind, text_col, answers_col, id_col, prompt)  # type: ignore[arg-type]


def _check_unique_ids(split: Any, plan: _Plan, name: str) -> None:
    """Ids name records, predictions and image files: they must not repeat within a split."""
    if plan.id is None:
        return
    ids = [str(i) for i in split.select_columns([plan.id]).with_format(None)[plan.id]]
    repeated = [i for i, n in Counter(ids).items() if n > 1]
    if repeated:
        raise ValueError(
            f"split {name!r}: ids in column {plan.id!r} repeat ({len(repeated)}, e.g. {repeated[:3]}); pass "
            "id_column=<a column of unique ids>, or id_column='' for ids from the split and row"
        )


def _convert_split(
    split: Any,
    plan: _Plan,
    name: str,
    out: Path,
    folder: str,
    confine: str | None,
    one_record_per: str,
    on_bad_sample: OnBadSample,
) -> list[dict[str, Any]]:
    """The records of one split; its images written on the way."""
    from tqdm.auto import tqdm

    source = f"HF dataset {name!r}"
    needed = [c for c in dict.fromkeys((plan.image, plan.text, plan.answers, plan.id)) if c is not None]
    # Arrow rows: a datasets.Image is {"bytes", "path"} here, never decoded.
    table = split.select_columns(needed).with_format("arrow")
    records, skipped = [], 0
    (out / "images").mkdir(parents=True, exist_ok=True)
    with tqdm(total=len(split), desc=f"convert {name}", disable=None) as bar:
        for start in range(0, len(split), 256):
            for offset, row in enumerate(table[start : start + 256].to_pylist()):
                i = start + offset
                sample_id = str(row[plan.id]) if plan.id is not None and row[plan.id] is not None else f"{name}-{i}"
                try:
                    records += _records(row, plan, sample_id, source, out, folder, confine, one_record_per)
                except BadSampleError as err:
                    skip_or_raise(err, on_bad_sample)
                    skipped += 1
            bar.update(min(256, len(split) - start))
    if skipped:
        logger.warning("skipped %d of %d rows of split %r", skipped, len(split), name)
    if not records:
        raise ValueError(f"split {name!r}: no usable rows ({len(split)} rows, {skipped} skipped)")
    return records


def _records(
    row: dict[str, Any],
    plan: _Plan,
    sample_id: str,
    source: str,
    out: Path,
    folder: str,
    confine: str | None,
    one_record_per: str,
) -> list[dict[str, Any]]:
    """One row's LLaVA records (several for ``one_record_per="caption"``); writes its image."""

    def bad(reason: str) -> BadSampleError:
        return BadSampleError(sample_id, source, reason)

    if plan.task == "vqa":
        question = row[plan.text]
        if not isinstance(question, str) or not question.strip():
            raise bad(f"column {plan.text!r} holds no question ({question!r})")
        answers = _texts(row[plan.answers], plan.answers, bad)
        human = plan.prompt.replace("{question}", question.strip())
        targets = [_most_frequent(answers)]
    else:
        human = plan.prompt
        answers = _texts(row[plan.text], plan.text, bad)
        targets = answers if one_record_per == "caption" else answers[:1]
    image = _write_image(row[plan.image], plan, out, folder, confine, bad)
    per_caption = plan.task == "caption" and one_record_per == "caption"
    records = []
    for k, target in enumerate(targets):
        record = {
            "id": f"{sample_id}-{k}" if per_caption else sample_id,
            "image": image,
            "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": target.strip()}],
            "answers": answers,
        }
        check_record(record, source=source)
        records.append(record)
    return records


def _texts(value: Any, column: str, bad: Any) -> list[str]:
    """A string, a list of strings, or a list of dicts holding one (VQAv2's {"answer": ...}) as a list of strings."""
    items = [value] if isinstance(value, str) else value if isinstance(value, list) else None
    if not items:
        raise bad(f"column {column!r} holds no text ({value!r})")
    texts = []
    for item in items:
        if isinstance(item, dict):
            item = next((item[k] for k in _TEXT_KEYS if isinstance(item.get(k), str)), None)
        if not isinstance(item, str):
            raise bad(f"column {column!r} holds {value!r}; expected a string, a list of strings or of dicts with one")
        texts.append(item)
    return texts


def _most_frequent(answers: list[str]) -> str:
    """The answer that scores best under VQA accuracy: the most frequent after the official answer
    normalisation (ties: the first), given in its most frequent written form."""
    from .metrics.vqa import _vqa_normalize

    normalized = [_vqa_normalize(a) for a in answers]
    best = Counter(normalized).most_common(1)[0][0]
    forms = Counter(a.strip() for a, n in zip(answers, normalized) if n == best)
    return forms.most_common(1)[0][0]


def _write_image(value: Any, plan: _Plan, out: Path, folder: str, confine: str | None, bad: Any) -> str:
    """Write one image's stored bytes to ``images/<sha256 prefix><ext>`` (once) and return that relative path."""
    if value is None:
        raise bad(f"column {plan.image!r} holds no image")
    if plan.image_kind == "path":
        path = _resolve_image(value, folder, confine, bad)
    elif value["bytes"] is not None:
        path, data = None, value["bytes"]
    elif value["path"] is not None and os.path.isfile(value["path"]):
        path = value["path"]
    else:
        raise bad(f"column {plan.image!r} holds an image with no bytes and no local file ({value['path']!r})")
    if path is not None:
        with open(path, "rb") as f:
            data = f.read()
    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header only: the format, for the extension
            fmt = img.format
    except (OSError, SyntaxError, ValueError) as err:
        raise bad(f"column {plan.image!r} holds something that is not an image ({type(err).__name__}: {err})") from err
    extensions = [ext for ext, f in Image.registered_extensions().items() if f == fmt]
    name = hashlib.sha256(data).hexdigest()[:20] + _FORMAT_EXTENSIONS.get(fmt, extensions[0] if extensions else "")
    target = out / "images" / name
    if not target.exists():  # the same name is the same content
        atomic_write_bytes(target, data)
    return f"images/{name}"
