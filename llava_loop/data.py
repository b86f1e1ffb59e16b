"""Datasets: LLaVA JSON / HF messages / in-memory records -> uniform records.

(Hugging Face ``datasets`` objects are read by `llava_loop.hf_datasets`, through the same
`normalize_record` rules.) Every dataset here yields *records*, the one format the collators consume::

    {
        "id": "abc",                                  # always a str
        "image": PIL.Image | list[PIL.Image] | None,  # RGB, decoded; None = text-only
        "conversations": [{"from": "human" | "gpt" | "system", "value": str}, ...],
        "answers": ["...", ...],                      # optional: the eval references, used as given
    }

`<image>` (`IMAGE_TOKEN`) in a human turn marks where an image goes, one marker per image.

Two phases, on purpose:

* **Construction** normalises and validates the *structure* of every record (roles, empty
  answers, marker/image counts, image files exist), so a broken dataset fails before training
  starts rather than hours in.
* **Indexing** (`dataset[i]`) decodes the images, lazily and without caching, so huge datasets
  fit in memory. Corrupt images can only be found here.

`on_bad_sample="raise"` (default) raises `BadSampleError` naming the sample, the file and what
to do. `on_bad_sample="skip"` drops structurally bad records at construction (one warning each,
kept in `VLDataset.skipped`) and returns a `SkippedSample` marker instead of a record when an
image fails to decode; collators drop and report those. Nothing is ever dropped silently.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import struct
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
"""Marks where an image goes in a human turn (LLaVA convention)."""

OnBadSample = Literal["raise", "skip"]

MEMORY_SOURCE = "<memory>"
"""`source` of records that did not come from a file."""

_ROLES = {
    "human": "human",
    "user": "human",
    "gpt": "gpt",
    "assistant": "gpt",
    "system": "system",
}
# Errors Pillow raises for unreadable / corrupt / truncated files.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_warned_truncated_flag = False
_warned_multi_frame = False


class BadSampleError(ValueError):
    """A sample that cannot be used: names the sample, the file and what to do.

    Attributes:
        sample_id: The record's id (or ``"<file name>:<index>"`` when it has none).
        source: The JSON/JSONL file the record came from, or ``"<memory>"``.
        reason: What is wrong, without the advice.

    Example:
        >>> err = BadSampleError("abc", "data/train.json", "no gpt/assistant turn")
        >>> str(err)  # doctest: +ELLIPSIS
        "bad sample 'abc' (data/train.json): no gpt/assistant turn. Fix or remove ..."
    """

    def __init__(self, sample_id: str, source: str, reason: str) -> None:
        self.sample_id = sample_id
        self.source = source
        self.reason = reason
        super().__init__(
            f"bad sample {sample_id!r} ({source}): {reason}. Fix or remove the sample, or pass on_bad_sample='skip'."
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuild from the three fields, not the formatted message, so pickling works.
        return (type(self), (self.sample_id, self.source, self.reason))


@dataclass
class SkippedSample:
    """Returned instead of a record in ``on_bad_sample="skip"`` mode.

    Collators drop these from the batch and report them; the dataset logged a warning already.

    Example:
        >>> SkippedSample(id="abc", source="train.json", reason="corrupt image").id
        'abc'
    """

    id: str
    source: str
    reason: str


@dataclass(frozen=True)
class StoredImage:
    """An image that a dataset reads from its own storage when the record is indexed.

    Parsed records (`VLDataset.parsed_records`) hold it where a JSON record holds a path: e.g. the
    images of a Hugging Face dataset row (`llava_loop.hf_datasets.HFDataset`) stay in the dataset's
    Arrow table until ``dataset[i]``.

    Attributes:
        row: The dataset's row, as ``dataset[row]`` indexes it (after any select/shuffle).
        column: The column holding the image.
        position: Its position in a list-of-images column; None for a one-image column.
        name: The stored file name, if any ("" otherwise), for fingerprints and messages.

    Example:
        >>> StoredImage(row=3, column="images", position=0, name="cat.jpg").name
        'cat.jpg'
    """

    row: int
    column: str
    position: int | None = None
    name: str = ""


def check_on_bad_sample(on_bad_sample: str) -> None:
    """Raise `ValueError` unless ``on_bad_sample`` is ``"raise"`` or ``"skip"``; the one home of this check.

    `LoopConfig`, the datasets here and the collators all call it.

    Example:
        >>> check_on_bad_sample("ignore")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ValueError: on_bad_sample='ignore' is invalid: expected 'raise' or 'skip' ...
    """
    if on_bad_sample not in ("raise", "skip"):
        raise ValueError(
            f"on_bad_sample={on_bad_sample!r} is invalid: expected 'raise' or 'skip' (on_bad_sample must be 'raise' "
            "to stop at a bad sample, or 'skip' to warn, count and skip it)."
        )


def skip_or_raise(err: BadSampleError, on_bad_sample: OnBadSample) -> SkippedSample:
    """Apply the ``on_bad_sample`` policy to a bad sample; the one home of that policy.

    ``"raise"`` re-raises ``err``; ``"skip"`` logs one warning naming the sample, the file and the
    reason, and returns the `SkippedSample` for the caller to keep (`VLDataset.skipped`,
    ``batch["skipped"]``), so every skip is counted. The datasets here and the collators all call it.

    Raises:
        BadSampleError: ``err``, in ``"raise"`` mode.

    Example:
        >>> skip_or_raise(BadSampleError("a", "t.json", "no gpt turn"), "skip").reason
        'no gpt turn'
    """
    if on_bad_sample == "raise":
        raise err
    logger.warning("skipping bad sample %r (%s): %s", err.sample_id, err.source, err.reason)
    return SkippedSample(err.sample_id, err.source, err.reason)


class VLDataset(torch.utils.data.Dataset):
    """Map-style dataset of vision-language records, validated eagerly, decoded lazily.

    Accepts raw records in any supported format (LLaVA ``conversations``, HF ``messages``,
    or already-normalised records with PIL images) and normalises them with
    `normalize_record` at construction. ``dataset[i]`` decodes the images of record ``i``
    (RGB, nothing cached) and returns a fresh dict, or a `SkippedSample` in skip mode when an
    image is unreadable.

    Args:
        records: Raw records, in order.
        image_folder: Folder that relative image paths are relative to. Defaults to the
            folder of ``source`` when it is a file, else the current directory.
        source: Where the records came from (a file path, or ``"<memory>"``); used in
            default ids and error messages.
        on_bad_sample: ``"raise"`` (default) or ``"skip"``; see the module docstring.
        allow_external_images: Accept image paths outside the image folder (``../x.jpg``,
            absolute paths, ``~``, symlinks leading out); see `normalize_record`.

    Attributes:
        source: As passed.
        skipped: Records rejected at construction (skip mode only), in order.

    Raises:
        BadSampleError: A record is structurally invalid (raise mode).
        ValueError: Bad ``on_bad_sample``, missing ``image_folder``, or no usable records.

    Example:
        >>> ds = VLDataset([{"conversations": [
        ...     {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}])
        >>> ds[0]["id"], ds[0]["image"]
        ('<memory>:0', None)
    """

    def __init__(
        self,
        records: Iterable[Any],
        *,
        image_folder: str | os.PathLike[str] | None = None,
        source: str = MEMORY_SOURCE,
        on_bad_sample: OnBadSample = "raise",
        allow_external_images: bool = False,
    ) -> None:
        check_on_bad_sample(on_bad_sample)
        if image_folder is not None and not os.path.isdir(image_folder):
            raise ValueError(
                f"image_folder {os.fspath(image_folder)!r} is not a directory "
                f"(records from {source}). Pass the folder the image paths are relative to."
            )
        self.source = source
        self.on_bad_sample = on_bad_sample
        self.skipped: list[SkippedSample] = []
        self._records: list[dict[str, Any]] = []
        for index, raw in enumerate(records):
            try:
                record = normalize_record(
                    raw,
                    image_folder=image_folder,
                    source=source,
                    index=index,
                    allow_external_images=allow_external_images,
                )
            except BadSampleError as err:
                self.skipped.append(skip_or_raise(err, on_bad_sample))
                continue
            self._records.append(record)
        total = len(self._records) + len(self.skipped)
        if self.skipped:
            logger.warning(
                "skipped %d of %d records from %s (see dataset.skipped)",
                len(self.skipped),
                total,
                source,
            )
        if not self._records:
            detail = f"all {total} were rejected" if total else "it is empty"
            raise ValueError(f"no usable records in {source}: {detail}.")
        _warn_duplicate_ids(self._records, source)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict[str, Any] | SkippedSample:
        record = self._records[index]
        sample_id = record["id"]
        try:
            image = self._decoded_image(record)
        except BadSampleError as err:
            return skip_or_raise(err, self.on_bad_sample)
        # A fresh dict (and fresh turn dicts) every time: collators may mutate what they get.
        out: dict[str, Any] = {
            "id": sample_id,
            "image": image,
            "conversations": [dict(turn) for turn in record["conversations"]],
        }
        if "answers" in record:
            out["answers"] = list(record["answers"])
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(source={self.source!r}, records={len(self)}, skipped={len(self.skipped)})"

    def _decoded_image(self, record: dict[str, Any]) -> Image.Image | list[Image.Image] | None:
        """The record's image(s), decoded (`load_image`); a dataset with its own image storage
        (`StoredImage`) overrides this to fetch them first."""
        stored = record["image"]
        if isinstance(stored, list):
            return [load_image(x, sample_id=record["id"], source=self.source) for x in stored]
        return None if stored is None else load_image(stored, sample_id=record["id"], source=self.source)

    @property
    def parsed_records(self) -> Sequence[dict[str, Any]]:
        """The validated records as parsed, in order: images are paths or PIL images, not decoded
        (cheap to read, e.g. for lengths or fingerprints; do not modify them)."""
        return self._records


def load_llava_json(
    path: str | os.PathLike[str],
    image_folder: str | os.PathLike[str] | None = None,
    *,
    on_bad_sample: OnBadSample = "raise",
    allow_external_images: bool = False,
) -> VLDataset:
    """Load a ``.json`` (a list of records) or ``.jsonl`` (one record per line) file.

    Records may be in LLaVA or HF messages format, even mixed. Every record is validated
    now; images are decoded later, in ``dataset[i]``.

    Args:
        path: The ``.json`` or ``.jsonl`` file.
        image_folder: Folder that relative image paths are relative to; defaults to the
            folder holding ``path``.
        on_bad_sample: ``"raise"`` (default) or ``"skip"``.
        allow_external_images: Accept image paths that lead outside the image folder (by
            default they are bad samples); only for datasets you trust.

    Returns:
        The validated `VLDataset`.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: Unreadable JSON (names the line and column), a top level that is not a
            list, or an unsupported extension.
        BadSampleError: A record is structurally invalid (raise mode).

    Example:
        >>> ds = load_llava_json("data/train.json", image_folder="data/images")  # doctest: +SKIP
        >>> ds[0]["conversations"][0]["value"]  # doctest: +SKIP
        '<image>\\nWhat is in the picture?'
    """
    check_on_bad_sample(on_bad_sample)
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"dataset file not found: {path}")
    suffix = Path(path).suffix.lower()
    if suffix not in (".json", ".jsonl"):
        raise ValueError(f"{path}: unsupported dataset file type {suffix!r}; use .json or .jsonl.")
    try:
        with open(path, encoding="utf-8-sig") as f:
            records = _read_jsonl(f, path) if suffix == ".jsonl" else _read_json(f, path)
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err}); save the file as UTF-8.") from err
    return VLDataset(
        records,
        image_folder=image_folder,
        source=path,
        on_bad_sample=on_bad_sample,
        allow_external_images=allow_external_images,
    )


def as_dataset(
    data: str | os.PathLike[str] | Sequence[dict[str, Any]] | torch.utils.data.Dataset,
    image_folder: str | os.PathLike[str] | None = None,
    *,
    on_bad_sample: OnBadSample = "raise",
    allow_external_images: bool = False,
) -> torch.utils.data.Dataset:
    """Turn whatever the user passed as data into a dataset of records.

    Args:
        data: A ``.json``/``.jsonl`` path, a list of raw records (any supported format;
            images as paths or PIL images), a Hugging Face ``datasets.Dataset``
            (`llava_loop.hf_datasets.HFDataset`: validated row by row, images read lazily), or a
            torch ``Dataset`` (returned unchanged). A ``DatasetDict`` is refused: pass one split
            (`fit` picks ``"train"`` and ``"validation"`` itself); so is a streaming
            ``IterableDataset`` (no length, no random access).
        image_folder: Folder that relative image paths are relative to.
        on_bad_sample: ``"raise"`` (default) or ``"skip"``.
        allow_external_images: Accept image paths that lead outside the image folder; only for
            datasets you trust (see `normalize_record`).

    Returns:
        A map-style dataset yielding records (or `SkippedSample` in skip mode).

    Raises:
        TypeError: ``data`` is none of the above, or a streaming ``IterableDataset``.
        ValueError: A ``DatasetDict``.

    Example:
        >>> ds = as_dataset([{"messages": [
        ...     {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}]}])
        >>> ds[0]["conversations"][1]
        {'from': 'gpt', 'value': 'Hey'}
    """
    check_on_bad_sample(on_bad_sample)
    from .hf_datasets import datasets_kind, from_hf

    if datasets_kind(data) is not None:
        return from_hf(data, image_folder, on_bad_sample=on_bad_sample, allow_external_images=allow_external_images)
    if isinstance(data, torch.utils.data.Dataset):
        return data
    if isinstance(data, (str, os.PathLike)):
        return load_llava_json(
            data,
            image_folder,
            on_bad_sample=on_bad_sample,
            allow_external_images=allow_external_images,
        )
    if isinstance(data, (list, tuple)):
        return VLDataset(
            data,
            image_folder=image_folder,
            on_bad_sample=on_bad_sample,
            allow_external_images=allow_external_images,
        )
    raise TypeError(
        f"cannot make a dataset from {type(data).__name__}; pass a .json/.jsonl path, "
        "a list of records, a datasets.Dataset, or a torch.utils.data.Dataset."
    )


def normalize_record(
    raw: Any,
    *,
    image_folder: str | os.PathLike[str] | None = None,
    source: str = MEMORY_SOURCE,
    index: int = 0,
    allow_external_images: bool = False,
) -> dict[str, Any]:
    """Normalise and validate one raw record's structure; images are not decoded.

    Converts HF ``messages`` to LLaVA ``conversations``, maps roles to human/gpt/system,
    checks the turns (`check_conversation`), resolves relative image paths and checks they
    exist, and inserts one ``"<image>\\n"`` per image at the start of the first human turn when
    the text has no markers. One image is stored as a single item, several as a list, none as
    ``None``.

    Image paths must stay inside the *image folder*: ``image_folder``, or by default the folder
    of ``source``. A path that leads out of it (``../x.jpg``, an absolute path or ``~`` elsewhere,
    a symlink whose target is elsewhere) is a bad sample unless ``allow_external_images``: a
    dataset file must not make training read arbitrary files. Records with no image folder
    (in memory, no ``image_folder``) have nothing to stay inside: any path is accepted.

    Args:
        raw: The record as read from JSON or given in memory.
        image_folder: Folder that relative image paths are relative to; defaults to the
            folder of ``source`` (when it is a file), else the current directory.
        source: File the record came from, or ``"<memory>"``.
        index: Position of the record in ``source``, for the default id.
        allow_external_images: Accept image paths outside the image folder.

    Returns:
        ``{"id", "image", "conversations"}`` plus ``"answers"`` when given; images are
        resolved path strings or the PIL images given.

    Raises:
        BadSampleError: Anything structurally wrong, see the module docstring.

    Example:
        >>> normalize_record({"id": 7, "conversations": [
        ...     {"from": "user", "value": "Hi"}, {"from": "assistant", "value": "Yo"}]})
        {'id': '7', 'image': None, 'conversations': [{'from': 'human', 'value': 'Hi'}, \
{'from': 'gpt', 'value': 'Yo'}]}
    """
    raw_id = raw.get("id") if isinstance(raw, dict) else None
    if raw_id is None or raw_id == "":
        sample_id = f"{os.path.basename(source)}:{index}"
    else:
        sample_id = str(raw_id)

    def bad(reason: str) -> BadSampleError:
        return BadSampleError(sample_id, source, reason)

    if not isinstance(raw, dict):
        raise bad(f"a record must be a JSON object (dict), got {type(raw).__name__}")
    if "conversations" in raw and "messages" in raw:
        raise bad("has both 'conversations' and 'messages'; keep one")
    turns = raw.get("conversations", raw.get("messages"))
    if turns is None:
        raise bad("no 'conversations' (LLaVA) or 'messages' (HF) list")
    if not isinstance(turns, list):
        raise bad(f"'conversations'/'messages' must be a list, got {type(turns).__name__}")
    if raw.get("image") is not None and raw.get("images") is not None:
        raise bad("has both 'image' and 'images'; keep one")
    images = raw.get("image", raw.get("images"))
    if images is None:
        images = []
    elif not isinstance(images, list):
        images = [images]

    conversations = []
    inline_images: list[Any] = []
    for t, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise bad(f"turn {t} must be a dict, got {type(turn).__name__}")
        role = turn.get("from", turn.get("role"))
        if role is None:
            raise bad(f"turn {t} has no 'from' (or 'role')")
        if "value" not in turn and "content" not in turn:
            raise bad(f"turn {t} has no 'value' (or 'content')")
        text = turn.get("value", turn.get("content"))
        norm_role = _ROLES.get(role.strip().lower()) if isinstance(role, str) else None
        if norm_role is None:
            raise bad(f"turn {t} has unknown role {role!r}; expected one of {sorted(_ROLES)}")
        if isinstance(text, list):
            text = _content_to_text(text, inline_images, bad, t)
        elif not isinstance(text, str):
            raise bad(f"turn {t} ({role}) value must be a string, got {type(text).__name__}")
        conversations.append({"from": norm_role, "value": text})
    if inline_images:
        if images:
            raise bad("images are given both in 'images' and inside the message content; use one")
        images = inline_images

    n_markers = sum(turn["value"].count(IMAGE_TOKEN) for turn in conversations)
    first_human = next((t for t, turn in enumerate(conversations) if turn["from"] == "human"), None)
    if images and not n_markers and first_human is not None:
        conversations[first_human]["value"] = f"{IMAGE_TOKEN}\n" * len(images) + conversations[first_human]["value"]
    record: dict[str, Any] = {
        "id": sample_id,
        "image": None if not images else images[0] if len(images) == 1 else images,
        "conversations": conversations,
    }
    answers = raw.get("answers")
    if answers is not None:
        record["answers"] = [answers] if isinstance(answers, str) else answers
    check_record(record, source=source)

    if image_folder is not None:
        folder: str | None = os.path.expanduser(os.fspath(image_folder))
    elif source != MEMORY_SOURCE:
        folder = os.path.dirname(source)
    else:
        folder = None
    confine = None if allow_external_images else folder
    resolved = [_resolve_image(x, folder, confine, bad) for x in images]
    record["image"] = None if not resolved else resolved[0] if len(resolved) == 1 else resolved
    if answers is not None:
        record["answers"] = list(record["answers"])
    return record


def check_record(
    record: dict[str, Any], *, source: str = MEMORY_SOURCE, special_tokens: re.Pattern[str] | None = None
) -> None:
    """Check a normalised record; the one home of the record rules.

    `normalize_record` calls it for every record a dataset reads, and the collators for every record
    they get (also records built in memory that never passed through a dataset). The rules: the
    turns (`check_conversation`); one ``<image>`` marker per image; ``answers``, when present, a
    non-empty list of strings; and, given ``special_tokens`` (the collators know the tokenizer), no
    special-token strings in the text, which the tokenizer would read as control tokens.

    Args:
        record: ``{"id", "image", "conversations"}`` and optionally ``"answers"``; images may be
            paths or decoded images.
        source: File the record came from, for the error.
        special_tokens: Pattern of strings that must not appear in any turn; None skips that rule.

    Raises:
        BadSampleError: The first rule the record breaks, naming its id and ``source``.

    Example:
        >>> check_record({"id": "a", "image": None, "conversations": [
        ...     {"from": "human", "value": "<image> Hi"}, {"from": "gpt", "value": "Yo"}]})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        llava_loop.data.BadSampleError: bad sample 'a' (<memory>): text has 1 <image> marker(s) but the record has no image. ...
    """
    sample_id = record.get("id", "<no id>")

    def bad(reason: str) -> BadSampleError:
        return BadSampleError(sample_id, source, reason)

    turns = record.get("conversations")
    if not isinstance(turns, list):
        raise bad("no 'conversations' list; records need [{'from': ..., 'value': ...}, ...] turns")
    check_conversation(turns, sample_id=sample_id, source=source)
    for t, turn in enumerate(turns if special_tokens is not None else []):
        found = special_tokens.search(turn["value"])
        if found is not None:
            token = found.group()
            raise bad(
                f"turn {t} ({turn['from']}) contains the special token {token!r} as text; the tokenizer "
                "would read it as a control token (e.g. an end of sequence in mid-answer) and train on "
                f"it. Remove it from the data, or escape it (e.g. {token.replace('<', '< ', 1)!r})"
            )
    image = record.get("image")
    n_images = 0 if image is None else len(image) if isinstance(image, list) else 1
    n_markers = sum(turn["value"].count(IMAGE_TOKEN) for turn in turns)
    if n_markers and not n_images:
        raise bad(f"text has {n_markers} {IMAGE_TOKEN} marker(s) but the record has no image")
    if n_markers > n_images:
        raise bad(f"more {IMAGE_TOKEN} markers ({n_markers}) than images ({n_images})")
    if n_markers < n_images:
        raise bad(
            f"fewer {IMAGE_TOKEN} markers ({n_markers}) than images ({n_images}); put one marker per image in "
            "the human turns, or (in a dataset record) none to place them all at the start"
        )
    if "answers" in record:
        answers = record["answers"]
        if not isinstance(answers, list | tuple) or not all(isinstance(a, str) for a in answers):
            raise bad("'answers' must be a list of strings")
        if not answers:
            raise bad("'answers' is empty; give at least one reference, or drop the key to score the final answer")


def check_conversation(conversations: list[dict[str, str]], *, sample_id: str, source: str = MEMORY_SOURCE) -> None:
    """Check the turns of a normalised conversation: the turn rules of `check_record`.

    The accepted order is an optional system turn, then human and gpt turns alternating,
    starting with human and ending with gpt: the collators train on every gpt turn and
    `EvalCollator` asks for the final one, so any other order cannot be rendered faithfully.
    Answers must not be empty, and ``<image>`` markers may only appear in human turns.

    Args:
        conversations: ``[{"from": "human" | "gpt" | "system", "value": str}, ...]``.
        sample_id: The record's id, for the error.
        source: File the record came from, for the error.

    Raises:
        BadSampleError: The first rule the conversation breaks.

    Example:
        >>> check_conversation([{"from": "gpt", "value": "Hi"}, {"from": "human", "value": "Yo"}],
        ...                    sample_id="a")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        llava_loop.data.BadSampleError: bad sample 'a' (<memory>): turn order: turn 0 is 'gpt' where a 'human' ...
    """

    def bad(reason: str) -> BadSampleError:
        return BadSampleError(sample_id, source, reason)

    roles = [turn.get("from") for turn in conversations]
    for t, role in enumerate(roles):
        if role not in ("human", "gpt", "system"):
            raise bad(f"turn {t} has unknown role {role!r}; expected 'human', 'gpt' or 'system'")
    if "human" not in roles:
        raise bad("no human/user turn")
    if "gpt" not in roles:
        raise bad("no gpt/assistant turn (nothing to learn or score)")
    order = "the accepted order is [system], human, gpt, human, gpt, ..., ending with gpt"
    start = 1 if roles[0] == "system" else 0
    for t in range(start, len(roles)):
        expected = "human" if (t - start) % 2 == 0 else "gpt"
        if roles[t] == "system":
            raise bad(f"turn order: turn {t} is a system turn; only the first turn may be ({order})")
        if roles[t] != expected:
            raise bad(f"turn order: turn {t} is {roles[t]!r} where a {expected!r} turn is expected ({order})")
    if roles[-1] != "gpt":
        raise bad(f"turn order: the last turn ({len(roles) - 1}) is 'human' with no answer ({order})")
    for t, turn in enumerate(conversations):
        if turn["from"] == "gpt" and not turn["value"].strip():
            raise bad(f"turn {t} (gpt) is an empty answer")
        if turn["from"] != "human" and IMAGE_TOKEN in turn["value"]:
            raise bad(f"turn {t} ({turn['from']}) has an {IMAGE_TOKEN} marker; only human turns may")


def load_image(
    path_or_image: str | os.PathLike[str] | Image.Image | bytes, *, sample_id: str, source: str
) -> Image.Image:
    """Decode an image fully and return it as a new RGB image, upright as a viewer shows it.

    * The EXIF orientation is applied (``PIL.ImageOps.exif_transpose``, as
      ``transformers.image_utils.load_image`` does), so phone photos are not trained sideways.
    * Transparent images (RGBA, LA, P with transparency) are composited onto white.
    * High-bit-depth greyscale is scaled to 8 bits by the range of its mode, not clipped:
      16-bit (``I;16``, ``I;16B``, ...) and 32-bit integer (``I``) by 0..65535 (``I`` is
      Pillow's working mode for 16-bit data; ``I`` values outside 0..65535 are refused), float
      (``F``) by 0..1 (values outside 0..1, NaN or inf are refused). 0 is black, the top of the
      range white.
    * Multi-frame files (animated GIF/PNG, multi-page TIFF) give their first frame, with a
      warning the first time.
    * Other modes (L, CMYK, 1, ...) are converted to RGB.

    Truncated files are errors (``ImageFile.LOAD_TRUNCATED_IMAGES`` is never enabled here).

    Args:
        path_or_image: An image file path, a PIL image (copied, never modified), or the bytes of
            an image file (as a Hugging Face ``datasets.Image`` column stores them).
        sample_id: Id of the record, for error messages.
        source: File the record came from, for error messages.

    Returns:
        A fully loaded RGB image.

    Raises:
        BadSampleError: Missing, corrupt, truncated, zero-size or too-large image, or pixel
            values outside the range of a high-bit-depth mode.

    Example:
        >>> img = load_image(Image.new("LA", (2, 2)), sample_id="a", source="<memory>")
        >>> img.mode, img.getpixel((0, 0))
        ('RGB', (255, 255, 255))
    """
    _warn_if_truncated_images_allowed()
    if isinstance(path_or_image, Image.Image):
        path, what = None, "in-memory image"
    elif isinstance(path_or_image, bytes):
        path, what = io.BytesIO(path_or_image), f"image ({len(path_or_image):,} bytes in the dataset)"
    else:
        path = os.fspath(path_or_image)
        what = f"image {path}"
    try:
        if path is None:
            return _decode(path_or_image, what)
        with Image.open(path) as img:
            # Convert inside the `with`: closing the file discards the decoded pixels.
            return _decode(img, what)
    except FileNotFoundError as err:
        raise BadSampleError(sample_id, source, f"image file not found: {path}") from err
    except Image.DecompressionBombError as err:
        raise BadSampleError(
            sample_id,
            source,
            f"{what} is too large to decode safely ({err}); if it is trusted, raise the "
            "limit with `PIL.Image.MAX_IMAGE_PIXELS = <pixels>` (None disables it) "
            "before loading, or downscale the image",
        ) from err
    except _ZeroSizeImage as err:
        raise BadSampleError(sample_id, source, f"{what} has zero size {err.args[0]}") from err
    except _UnknownRange as err:
        raise BadSampleError(sample_id, source, f"{what}: {err.args[0]}") from err
    except _DECODE_ERRORS as err:
        raise BadSampleError(
            sample_id,
            source,
            f"cannot read {what}: corrupt, truncated or not an image ({type(err).__name__}: {err})",
        ) from err


def image_list(image: Any) -> list[Any]:
    """A record's ``"image"`` field as a list, decoded or not: ``[]`` for None, a copy of a list, else ``[image]``.

    Example:
        >>> image_list(None), image_list("a.png"), image_list(["a.png", "b.png"])
        ([], ['a.png'], ['a.png', 'b.png'])
    """
    return [] if image is None else list(image) if isinstance(image, list) else [image]


def record_images(record: dict[str, Any]) -> list[Image.Image]:
    """Return a decoded record's images as a list: ``[]``, ``[img]`` or all of them.

    Args:
        record: A record from a dataset in this module (images already decoded).

    Returns:
        The images, in marker order.

    Raises:
        TypeError: ``record`` is a `SkippedSample`, or its images are not decoded yet.

    Example:
        >>> record_images({"image": None}), len(record_images({"image": Image.new("RGB", (1, 1))}))
        ([], 1)
    """
    if isinstance(record, SkippedSample):
        raise TypeError(f"got a SkippedSample ({record.id!r}); drop those before this call.")
    images = image_list(record.get("image"))
    for img in images:
        if not isinstance(img, Image.Image):
            raise TypeError(
                f"record {record.get('id')!r} holds an undecoded image ({type(img).__name__}); "
                "index the dataset (dataset[i]) or call load_image first."
            )
    return images


def _read_json(f: Any, path: str) -> list[Any]:
    """Read a JSON file whose top level is a list of records."""
    try:
        data = json.load(f)
    except json.JSONDecodeError as err:
        hint = ""
        if err.msg == "Extra data":
            hint = " If it holds one record per line, rename it to .jsonl."
        raise ValueError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}.{hint}") from err
    if not isinstance(data, list):
        # Bad file content, not a programming error: ValueError like the decode errors.
        raise ValueError(  # noqa: TRY004
            f"{path}: the top level must be a JSON list of records, got a JSON "
            f"{type(data).__name__}. Wrap the records in [...]."
        )
    return data


def _read_jsonl(f: Any, path: str) -> list[Any]:
    """Read a JSONL file: one record per line, blank lines ignored."""
    records = []
    for lineno, line in enumerate(f, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: invalid JSON at line {lineno}, column {err.colno}: {err.msg}.") from err
    return records


def _content_to_text(items: list[Any], inline_images: list[Any], bad: Any, t: int) -> str:
    """Flatten HF content items to text; each image item becomes "<image>\\n" in place."""
    parts = []
    for item in items:
        if isinstance(item, str):
            parts.append(item)
            continue
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "text":
            text = item.get("text")
            if not isinstance(text, str):
                raise bad(f"turn {t} has a text item whose 'text' is not a string")
            parts.append(text)
        elif kind == "image":
            parts.append(f"{IMAGE_TOKEN}\n")
            # transformers chat-template style: the image may sit in the item itself.
            inline = next((item[k] for k in ("image", "path", "url") if item.get(k)), None)
            if isinstance(inline, str) and inline.startswith(("http://", "https://")):
                raise bad(f"turn {t} has a remote image URL {inline}; download it first")
            if inline is not None:
                inline_images.append(inline)
        else:
            raise bad(f"turn {t} has a content item of type {kind!r}; expected 'text' or 'image'")
    return "".join(parts)


def _resolve_image(image: Any, folder: str | None, confine: str | None, bad: Any) -> Any:
    """Keep PIL images and `StoredImage` references; resolve a path against `folder`, check it stays
    inside `confine` (symlinks followed) and that the file exists."""
    if isinstance(image, (Image.Image, StoredImage)):
        return image
    if not isinstance(image, (str, os.PathLike)):
        raise bad(f"an image must be a path or a PIL image, got {type(image).__name__}")
    path = os.path.expanduser(os.fspath(image))
    if not path:
        raise bad("empty image path")
    if folder is not None and not os.path.isabs(path):
        path = os.path.join(folder, path)
    if confine is not None:
        root, real = os.path.realpath(confine), os.path.realpath(path)
        if os.path.commonpath([root, real]) != root:
            raise bad(
                f"image path {os.fspath(image)!r} leads outside the image folder {confine!r} "
                f"(to {real}); move the image into the folder, or, if you trust this dataset, "
                "pass allow_external_images=True (CLI: --allow_external_images true)"
            )
    if not os.path.isfile(path):
        where = f" (relative paths are resolved against {folder!r})" if folder else ""
        raise bad(f"image file not found: {path}{where}")
    return path


class _ZeroSizeImage(Exception):
    """Raised by `_decode` for a 0-pixel-wide or -high image."""


class _UnknownRange(Exception):
    """Raised by `_decode` for high-bit-depth pixels outside the range of their mode."""


def _decode(img: Image.Image, what: str) -> Image.Image:
    """Load the (first frame's) pixels, reject empty images, and return a new, upright RGB image."""
    frames = getattr(img, "n_frames", 1)
    if frames > 1:
        img.seek(0)
        _warn_multi_frame(what, frames)
    img.load()
    if img.width == 0 or img.height == 0:
        raise _ZeroSizeImage(img.size)
    img = ImageOps.exif_transpose(img)  # a new image; the orientation tag is removed from it
    if img.mode in _SIXTEEN_BIT_MODES or img.mode in ("I", "F"):
        # Plain convert("RGB") clips at 255: 16-bit images become white, 0..1 floats black.
        return _high_depth_to_rgb(img)
    if img.has_transparency_data:
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        background.alpha_composite(img.convert("RGBA"))
        return background.convert("RGB")
    return img.convert("RGB")


def _high_depth_to_rgb(img: Image.Image) -> Image.Image:
    """Scale 16/32-bit integer or float greyscale to 8 bits by the value range of its mode."""
    values = np.asarray(img).astype(np.float64)
    if img.mode == "F":
        top, range_text = 1.0, "0..1"
    else:
        top, range_text = 65535.0, "0..65535"
    if not np.isfinite(values).all() or values.min() < 0 or values.max() > top:
        low, high = np.nanmin(values), np.nanmax(values)
        raise _UnknownRange(
            f"mode {img.mode} pixels span {low:g}..{high:g} (non-finite values: "
            f"{int((~np.isfinite(values)).sum())}), outside {range_text}, so their brightness is "
            "unknown; convert the image to 8-bit (or scale it into that range) yourself"
        )
    scaled = np.rint(values * (255.0 / top)).astype(np.uint8)
    return Image.fromarray(scaled).convert("RGB")  # 2-D uint8: mode L


def _warn_multi_frame(what: str, frames: int) -> None:
    """Warn once that multi-frame images give their first frame only."""
    global _warned_multi_frame
    if not _warned_multi_frame:
        _warned_multi_frame = True
        logger.warning(
            "%s has %d frames (animated or multi-page); only the first frame is used. "
            "This warning is shown once; later multi-frame images are not reported.",
            what,
            frames,
        )


def _warn_if_truncated_images_allowed() -> None:
    """Warn once if some other code made Pillow accept truncated files."""
    global _warned_truncated_flag
    if ImageFile.LOAD_TRUNCATED_IMAGES and not _warned_truncated_flag:
        _warned_truncated_flag = True
        logger.warning(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set by other code): truncated "
            "images will load with grey/garbage pixels instead of being reported."
        )


def _warn_duplicate_ids(records: list[dict[str, Any]], source: str) -> None:
    """One warning if ids repeat: eval outputs and skip reports are keyed by id."""
    counts = Counter(record["id"] for record in records)
    duplicates = [sample_id for sample_id, n in counts.items() if n > 1]
    if duplicates:
        logger.warning(
            "%d ids appear more than once in %s (e.g. %s); eval outputs keyed by id will be ambiguous",
            len(duplicates),
            source,
            ", ".join(repr(d) for d in duplicates[:5]),
        )


# ---------------------------------------------------------------------- order and batching for the loop
class EpochSampler(torch.utils.data.Sampler[int]):
    """Deterministic order per (seed, epoch); can start mid-epoch for exact resume.

    The method is `set_position`, deliberately not ``set_epoch``: accelerate's prepared loader
    calls ``sampler.set_epoch(n)`` with the number of passes *it* has made over the loader, which
    would reset the epoch and the mid-epoch start of a resumed run.

    Example:
        >>> sampler = EpochSampler(5, seed=0, shuffle=False)
        >>> sampler.set_position(epoch=0, start=3)
        >>> list(sampler)
        [3, 4]
    """

    def __init__(self, n: int, seed: int, shuffle: bool):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch = 0
        self.start = 0

    def set_position(self, epoch: int, start: int = 0) -> None:
        """Yield the order of ``epoch`` from its ``start``-th sample on."""
        self.epoch, self.start = epoch, start

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        return iter(order[self.start :])

    def __len__(self) -> int:
        return self.n - self.start


class WithSource(torch.utils.data.Dataset):
    """Records of ``dataset`` with its ``source`` file added, so that a bad sample found while
    collating (e.g. an answer cut away by max_length) is reported with its file."""

    def __init__(self, dataset: torch.utils.data.Dataset):
        self.dataset, self.source = dataset, getattr(dataset, "source", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        record = self.dataset[i]
        if self.source is not None and isinstance(record, dict) and "source" not in record:
            record = {**record, "source": self.source}
        return record


class Indexed(torch.utils.data.Dataset):
    """``dataset`` in the order ``indices``; each item is ``(dataset index, record)`` (to restore order)."""

    def __init__(self, dataset: torch.utils.data.Dataset, indices: list[int]):
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[int, Any]:
        return self.indices[i], self.dataset[self.indices[i]]


def longest_prompts_first(dataset: torch.utils.data.Dataset, n: int, tokenizer: Any, image_tokens: int) -> list[int]:
    """Indices of the first ``n`` records, longest estimated prompt first (ties in dataset order).

    The estimate needs no image decoding: the tokens of the turns before the final answer plus
    ``image_tokens`` per image. Evaluating longest first pads less, and an out-of-memory error shows
    in the first batch rather than hours in.
    """
    parsed = getattr(dataset, "parsed_records", None)
    texts, images = [], []
    for i in range(n):
        record = parsed[i] if parsed is not None else dataset[i]
        if isinstance(record, SkippedSample):
            texts.append("")
            images.append(0)
            continue
        turns = record.get("conversations", [])
        last = max((k for k, t in enumerate(turns) if t.get("from") == "gpt"), default=len(turns))
        texts.append(" ".join(t.get("value", "") for t in turns[:last]))
        image = record.get("image")
        images.append(len(image) if isinstance(image, (list, tuple)) else int(image is not None))
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    lengths = [len(t) + image_tokens * k for t, k in zip(ids, images)]
    return sorted(range(n), key=lambda i: (-lengths[i], i))
