"""Collators: records in, model-ready batches out.

`TrainCollator` renders the whole conversation with the processor's chat template and trains only on
the assistant answers (plus their end-of-turn token), right-padded. `EvalCollator` renders the
conversation up to the final answer with the generation prompt, left-padded, and passes the
references through. Both find the answers in the *rendered text* and map characters to tokens with
the tokenizer's offsets, so they work the same for templates with and without ``{% generation %}``
markers and never tokenize pieces separately (which is where SentencePiece "tokenization mismatch"
bugs come from).
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from dataclasses import dataclass
from typing import Any

import torch

from .data import (
    IMAGE_TOKEN,
    MEMORY_SOURCE,
    BadSampleError,
    SkippedSample,
    check_on_bad_sample,
    check_record,
    record_images,
    skip_or_raise,
)

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
# Keys that describe the batch rather than feed the model.
META_KEYS = ("ids", "references", "prompts", "skipped", "num_truncated", "label_positions")
# Tensors with one entry per token (dim 1), whatever their rank: padded, truncated and aligned like input_ids.
PER_TOKEN_KEYS = (
    "input_ids",
    "attention_mask",
    "labels",
    "token_type_ids",
    "mm_token_type_ids",
    "cross_attention_mask",
)
# Image tensors of processors whose model takes them with one row per sample, not one per image.
BATCH_ALIGNED_IMAGE_KEYS = {"MllamaProcessor": ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")}


def per_token(key: str, encoded: list[dict[str, torch.Tensor]]) -> bool:
    """Whether ``key`` holds per-token tensors in the encodings ``encoded``: one of `PER_TOKEN_KEYS`, or
    (keys a processor adds) batch x tokens like ``input_ids`` in its first two dims in every encoding."""
    if key in PER_TOKEN_KEYS:
        return True
    if key.startswith(("pixel", "image")):
        return False
    return all(key in e and e[key].shape[:2] == e["input_ids"].shape for e in encoded)


def _control_tokens(tokenizer: Any) -> set[str]:
    """The strings the tokenizer turns into control tokens: its special and added special tokens."""
    return {t.content for t in tokenizer.added_tokens_decoder.values() if t.special} | set(tokenizer.all_special_tokens)


def _forbidden_strings(tokenizer: Any, image_token: str) -> tuple[list[str], re.Pattern[str]]:
    """The strings record text may not hold, because the tokenizer turns them into control tokens wherever
    they appear (the processor's image token too; only the `<image>` marker, counted against the images,
    is data), longest first, and a pattern that finds the leftmost, at one position the longest."""
    strings = sorted((_control_tokens(tokenizer) | {image_token}) - {IMAGE_TOKEN, None}, key=len, reverse=True)
    return strings, re.compile("|".join(map(re.escape, strings)) or "(?!)")


@dataclass
class RenderedSample:
    """One record rendered to text, with the character spans that carry a loss."""

    id: str
    text: str
    images: list
    spans: list[tuple[int, int]]
    add_special_tokens: bool
    suffix: str | None = None  # prefix/suffix families (PaliGemma): the answer, given to the processor apart


class ChatRenderer:
    """Turns records into chat-template text and finds every assistant answer in it.

    The end of each answer is extended over the end-of-turn token that the template emits right
    after it (``</s>``, ``<|im_end|>``, ``<|eot_id|>``, ...); where the template emits none, the
    tokenizer's EOS is inserted so that the model learns to stop.
    """

    def __init__(self, processor: Any):
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.image_token = getattr(processor, "image_token", "<image>")
        self.template = getattr(processor, "chat_template", None) or self.tokenizer.chat_template
        if self.template is None:
            raise ValueError(
                "the processor has no chat template; set processor.chat_template (the llava-hf "
                "template is llava_loop.testing.LLAVA_TEMPLATE)"
            )
        self.warned_prompt = False  # a generation prompt that training does not render is warned about once
        eos = self.tokenizer.eos_token
        if eos is None:
            raise ValueError("the tokenizer has no eos_token; set one so the model can learn to stop")
        self.eos_token = eos
        specials = _control_tokens(self.tokenizer) - {self.image_token, self.tokenizer.pad_token}
        # Longest first so "<|im_end|>" wins over a shorter token it starts with.
        self.end_of_turn_tokens = sorted(specials, key=len, reverse=True)
        self.special_token_strings, self._special_pattern = _forbidden_strings(self.tokenizer, self.image_token)

    def messages(self, record: dict) -> list[dict]:
        """Convert LLaVA ``conversations`` to chat-template messages, images at their markers.

        The marker in records is always ``<image>``; the template renders the model's own image
        token in its place.
        """
        roles = {"human": "user", "gpt": "assistant", "system": "system"}
        messages = []
        for turn in record["conversations"]:
            content = []
            for k, piece in enumerate(turn["value"].split(IMAGE_TOKEN)):
                if k > 0:
                    content.append({"type": "image"})
                if piece.strip():
                    content.append({"type": "text", "text": piece.strip()})
            messages.append({"role": roles[turn["from"]], "content": content})
        return messages

    def _apply(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        # The processor's template rendered as its `apply_chat_template` renders text (same variables),
        # without the processor's own preparation of videos, which some processors do even for text.
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def render(self, record: dict, *, for_generation: bool = False) -> RenderedSample:
        """Render a record; with ``for_generation``, up to the generation prompt of the final answer."""
        check_record(record, source=record.get("source", MEMORY_SOURCE), special_tokens=self._special_pattern)
        messages = self.messages(record)
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        if for_generation:
            history = self._apply(messages[:last])
            prompt = self._apply(messages[:last], add_generation_prompt=True)
            if not prompt.startswith(history):
                raise ValueError(
                    "the chat template renders a conversation differently once the generation prompt "
                    "is added; llava_loop needs the generation prompt to be a suffix"
                )
            text, _ = self._mark_answers(record["id"], messages[:last], history)
            text, spans = text + prompt[len(history) :], []
        else:
            text, spans = self._mark_answers(record["id"], messages[: last + 1], self._apply(messages[: last + 1]))
            text = text.rstrip()
        bos = self.tokenizer.bos_token
        return RenderedSample(
            id=record["id"],
            text=text,
            images=record_images(record),
            spans=spans,
            add_special_tokens=not (bos and text.startswith(bos)),
        )

    def _mark_answers(self, record_id: str, messages: list[dict], rendered: str) -> tuple[str, list[tuple[int, int]]]:
        """Find each assistant answer in ``rendered``; extend it over, or insert, its end-of-turn token.

        A span starts right after the generation prompt when only whitespace separates the two
        ("ASSISTANT:" + " 3"): SentencePiece may make that space a token of its own ("▁", "3"),
        and the model has to learn to generate it after the prompt that `EvalCollator` ends with.
        """
        original, text = rendered, rendered
        spans: list[tuple[int, int]] = []
        inserted = cursor = 0  # characters of EOS inserted so far; end of the previous answer
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            answer = "".join(c["text"] for c in message["content"] if c["type"] == "text")
            # Search from the end of this turn's prompt, so an answer word that also occurs in the
            # question is not matched there.
            start, after_generation_prompt = cursor, False
            generation_prompt = self._apply(messages[:i], add_generation_prompt=True)
            for k, prompt in enumerate((generation_prompt, self._apply(messages[:i]))):
                if original.startswith(prompt):
                    start = max(cursor, len(prompt) + inserted)
                    after_generation_prompt = k == 0
                    break
            if not after_generation_prompt:
                self._warn_prompt(record_id, generation_prompt, original)
            pos = text.find(answer, start)
            if pos < 0 or not answer:
                raise ValueError(
                    f"sample {record_id!r}: the chat template does not render assistant answer "
                    f"{answer[:60]!r} verbatim; llava_loop needs the answer text to appear in the "
                    "rendered conversation"
                )
            first = pos
            if after_generation_prompt and not text[start:pos].strip():
                first = start
            end = pos + len(answer)
            tail = text[end:].lstrip(" ")
            eot = next((t for t in self.end_of_turn_tokens if tail.startswith(t)), None)
            if eot is not None:
                end = len(text) - len(tail) + len(eot)
            else:
                text = text[:end] + self.eos_token + text[end:]
                end += len(self.eos_token)
                inserted += len(self.eos_token)
            spans.append((first, end))
            cursor = end
        return text, spans

    def _warn_prompt(self, record_id: str, generation_prompt: str, rendered: str) -> None:
        """Warn (once) that evaluation prompts with text that training never puts before an answer."""
        if self.warned_prompt:
            return
        self.warned_prompt = True
        # Both strings from a little before the point where they part.
        start = max(0, len(os.path.commonprefix([generation_prompt, rendered])) - 24)
        logger.warning(
            "sample %r: the chat template's generation prompt is not what training renders before an answer. "
            "Evaluation prompts end with %r; training renders %r there. The model is trained on one and asked "
            "with the other: fix the chat template (its add_generation_prompt part) so that they agree.",
            record_id,
            generation_prompt[start:],
            rendered[start : len(generation_prompt) + 4],
        )


class PrefixSuffixRenderer:
    """Records as a prefix (the question, images first) and a suffix (the answer), the convention of
    PaliGemma, which has no chat template: its processor joins them (``processor(text=prefix,
    suffix=answer)``) and marks the suffix with ``token_type_ids`` 1, the part the model attends to
    causally (the image and prefix attend both ways). Single-turn records only.
    """

    def __init__(self, processor: Any):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_token = processor.image_token
        self.special_token_strings, self._special_pattern = _forbidden_strings(self.tokenizer, self.image_token)

    def render(self, record: dict, *, for_generation: bool = False) -> RenderedSample:
        """The record's prefix (``text``) and, unless ``for_generation``, its answer (``suffix``)."""
        source = record.get("source", MEMORY_SOURCE)
        check_record(record, source=source, special_tokens=self._special_pattern)
        roles = [t["from"] for t in record["conversations"]]
        if roles != ["human", "gpt"]:
            raise BadSampleError(
                record["id"],
                source,
                f"turns {roles}: {type(self.processor).__name__} takes one question and one answer (prefix and "
                "suffix, no chat template); split multi-turn conversations into single-turn records",
            )
        question, answer = (t["value"] for t in record["conversations"])
        images = record_images(record)
        if not images:
            raise BadSampleError(
                record["id"], source, f"no image: {type(self.processor).__name__} needs at least one image per sample"
            )
        prefix = self.image_token * len(images) + " ".join(question.replace(IMAGE_TOKEN, " ").split())
        return RenderedSample(
            id=record["id"],
            text=prefix,
            images=images,
            spans=[],
            add_special_tokens=False,  # the processor puts BOS after the images itself
            suffix=None if for_generation else answer.strip(),
        )


def renderer_for(processor: Any) -> ChatRenderer | PrefixSuffixRenderer:
    """The renderer of ``processor``'s family: prefix/suffix for PaliGemma, the chat template otherwise."""
    from transformers import PaliGemmaProcessor

    return PrefixSuffixRenderer(processor) if isinstance(processor, PaliGemmaProcessor) else ChatRenderer(processor)


class _Collator:
    left_padded = False  # the padding side of this collator's batches

    def __init__(
        self,
        processor: Any,
        *,
        pad_token_id: int | None = None,
        on_bad_sample: str = "raise",
    ):
        check_on_bad_sample(on_bad_sample)
        self.processor = processor
        self.renderer = renderer_for(processor)
        self.tokenizer = self.renderer.tokenizer
        if pad_token_id is None:
            pad_token_id = self.tokenizer.pad_token_id
        if pad_token_id is None:
            raise ValueError("the tokenizer has no pad_token; set tokenizer.pad_token or pass pad_token_id")
        self.pad_token_id = pad_token_id
        self.on_bad_sample = on_bad_sample
        self.image_token_id = getattr(processor, "image_token_id", None)
        # Image tensors with one row per sample (zeros for a sample without images).
        self.batch_aligned = BATCH_ALIGNED_IMAGE_KEYS.get(type(processor).__name__, ())

    def _encode(self, sample: RenderedSample) -> dict[str, torch.Tensor]:
        """Run the processor on one sample (it expands image markers and processes images)."""
        kwargs = {"text": [sample.text], "return_tensors": "pt", "add_special_tokens": sample.add_special_tokens}
        if sample.images:
            kwargs["images"] = [sample.images]  # the images of the one text
        if sample.suffix is not None:
            kwargs["suffix"] = [sample.suffix]
        enc = dict(self.processor(**kwargs))
        enc.pop("labels", None)  # PaliGemma's processor makes some; TrainCollator makes its own
        return enc

    def _label_mask(self, sample: RenderedSample, enc: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Which tokens of the processor's ``input_ids`` carry a loss (overlap a span of the sample), and
        which the processor inserted (image expansions: the image token repeated, and whatever a family
        puts around it, e.g. ``<fake_token_around_image>``, ``<row_1_col_1>``, ``\\n\\n<start_of_image>``).

        The text is tokenized alone (with character offsets, to find the spans) and aligned with the
        processor's tokens; tokens only the processor has are insertions. Every labelled token of the text
        must be found unchanged in the processor's tokens, or the sample is refused: a label is never
        placed on a token the answer does not have.
        """
        input_ids = enc["input_ids"][0]
        if sample.suffix is not None:  # prefix/suffix: the processor marks the suffix itself
            return enc["token_type_ids"][0] == 1, input_ids == self.image_token_id
        text = self.tokenizer(sample.text, add_special_tokens=sample.add_special_tokens, return_offsets_mapping=True)
        flags = [b > a and any(s < b and e > a for s, e in sample.spans) for a, b in text["offset_mapping"]]
        labelled = torch.zeros(len(input_ids), dtype=torch.bool)
        inserted = torch.ones(len(input_ids), dtype=torch.bool)
        placed = 0
        matcher = difflib.SequenceMatcher(None, text["input_ids"], input_ids.tolist(), autojunk=False)
        for i, j, n in matcher.get_matching_blocks():
            inserted[j : j + n] = False
            labelled[j : j + n] = torch.tensor(flags[i : i + n], dtype=torch.bool)
            placed += sum(flags[i : i + n])
        if placed != sum(flags):
            raise ValueError(
                f"sample {sample.id!r}: the processor ({type(self.processor).__name__}) changed "
                f"{sum(flags) - placed} of the {sum(flags)} tokens of its answers, so the labels cannot be placed "
                "safely; look for text next to an image marker in the answers, or tokens the processor rewrites"
            )
        return labelled, inserted

    def merge(self, batches: list[dict]) -> dict[str, Any]:
        """The batch this collator makes of all the records of ``batches`` (its own batches of consecutive
        records, in order): tensors re-padded and concatenated, lists joined, counts added."""
        tensors = [{k: v for k, v in b.items() if isinstance(v, torch.Tensor)} for b in batches if "input_ids" in b]
        extra: dict[str, Any] = {}
        for batch in batches:
            for key, value in batch.items():
                if isinstance(value, list):
                    extra[key] = extra.get(key, []) + value
                elif isinstance(value, int):
                    extra[key] = extra.get(key, 0) + value
        return self._batch(tensors, left=self.left_padded, extra=extra)

    def _batch(self, encoded: list[dict[str, torch.Tensor]], left: bool, extra: dict) -> dict[str, Any]:
        """Pad per-token tensors (`per_token`) on the side ``left`` says, concatenate image tensors along dim 0.

        A sample without a key the others have (a text-only sample among images) gets zeros there where
        the model needs one row per sample: every per-token tensor, and the image tensors of families
        whose images are aligned with the batch (Mllama).
        """
        batch: dict[str, Any] = {}
        longest = max((e["input_ids"].shape[-1] for e in encoded), default=0)
        for key in dict.fromkeys(k for e in encoded for k in e):
            values = [e.get(key) for e in encoded]
            like = next(v for v in values if v is not None)
            if per_token(key, encoded):
                fill = {"input_ids": self.pad_token_id, "labels": self.ignore_index}.get(key, 0)
                values = [
                    v if v is not None else like.new_zeros(*e["input_ids"].shape, *like.shape[2:])
                    for v, e in zip(values, encoded)
                ]
                batch[key] = _cat_padded([_pad(v, longest, fill, left) for v in values], key)
            else:
                if key in self.batch_aligned:
                    rows = [e["input_ids"].shape[0] for e in encoded]
                    values = [v if v is not None else like.new_zeros(n, *like.shape[1:]) for v, n in zip(values, rows)]
                batch[key] = _cat_padded([v for v in values if v is not None], key)
        if "aspect_ratio_mask" in batch:
            # Mllama: the first tile of every image slot counts, padding slots too, as MllamaProcessor
            # pads them (a slot without a single tile would leave its vision attention without keys).
            batch["aspect_ratio_mask"][..., 0] = 1
        batch.update(extra)
        return batch


class TrainCollator(_Collator):
    """Prompt + answers → ``input_ids, attention_mask, labels, pixel_values`` (right padded).

    ``labels`` equal ``input_ids`` on the tokens of every assistant answer and its end-of-turn/EOS
    token (EOS is inserted where the template emits none) and ``ignore_index`` everywhere else:
    system text, prompts, image tokens and padding. Answers are trained stripped of outer whitespace
    (``" 3\\n"`` as ``"3"``, after the template's separator; LLaVA's own code trains it as written),
    inner whitespace kept. With ``max_length`` the sequence is cut at the
    end; a sample whose image tokens would be cut, or whose answers are cut away entirely, is a bad
    sample (raised, or skipped and reported under ``batch["skipped"]``), never a loss-0 sample. A
    sample whose (last) answer is cut only partly is kept, counted in ``batch["num_truncated"]``
    (`Loop` logs the total as ``train/truncated_samples``) and, the first time, named in a warning.

    Args:
        processor: A Hugging Face processor with a chat template (e.g. ``LlavaProcessor``).
        max_length: Maximum tokens per sample, image tokens included; None keeps everything.
        pad_token_id: Padding id for ``input_ids`` (default: the tokenizer's pad token).
        ignore_index: Label value for tokens without loss.
        on_bad_sample: ``"raise"`` or ``"skip"``.

    Example:
        >>> from llava_loop.testing import tiny_llava, synthetic_vqa
        >>> model, processor = tiny_llava()
        >>> batch = TrainCollator(processor)(synthetic_vqa(2))
        >>> sorted(k for k in batch if k not in META_KEYS)
        ['attention_mask', 'input_ids', 'labels', 'pixel_values']
    """

    def __init__(
        self,
        processor: Any,
        max_length: int | None = None,
        *,
        pad_token_id: int | None = None,
        ignore_index: int = IGNORE_INDEX,
        on_bad_sample: str = "raise",
    ):
        super().__init__(processor, pad_token_id=pad_token_id, on_bad_sample=on_bad_sample)
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be positive or None, got {max_length}")
        self.max_length = max_length
        self.ignore_index = ignore_index
        self.warned_truncation = False  # the first partly truncated sample is named in a warning

    def __call__(self, records: list) -> dict[str, Any]:
        encoded, ids, skipped, truncated = [], [], [], 0
        for record in records:
            if isinstance(record, SkippedSample):
                skipped.append(record)
                continue
            try:
                sample = self.renderer.render(record)
            except BadSampleError as err:
                skipped.append(skip_or_raise(err, self.on_bad_sample))
                continue
            enc = self._encode(sample)
            input_ids = enc["input_ids"][0]
            mask, inserted = self._label_mask(sample, enc)
            labels = torch.where(mask, input_ids, torch.full_like(input_ids, self.ignore_index))
            if self.max_length is not None and len(input_ids) > self.max_length:
                cut, source = self.max_length, record.get("source", MEMORY_SOURCE)
                reason = None
                if (inserted | (input_ids == self.image_token_id))[cut:].any():
                    reason = f"{len(input_ids)} tokens with image tokens beyond max_length={cut}"
                elif not mask[:cut].any():
                    reason = f"answer entirely truncated: {len(input_ids)} tokens > max_length={cut}"
                if reason is not None:
                    skipped.append(skip_or_raise(BadSampleError(sample.id, source, reason), self.on_bad_sample))
                    continue
                enc = {k: (v[:, :cut] if per_token(k, [enc]) else v) for k, v in enc.items()}
                labels = labels[:cut]
                truncated += 1
                if not self.warned_truncation:
                    self.warned_truncation = True
                    logger.warning(
                        "sample %r (%s) has %d tokens > max_length=%d: the end of its answer is cut off "
                        "and not trained on. Further partly truncated samples are not warned about, only "
                        "counted (train/truncated_samples); raise max_length to keep them whole.",
                        sample.id,
                        source,
                        len(input_ids),
                        cut,
                    )
            enc["labels"] = labels[None]
            encoded.append(enc)
            ids.append(sample.id)
        return self._batch(
            encoded, left=self.left_padded, extra={"ids": ids, "skipped": skipped, "num_truncated": truncated}
        )


class EvalCollator(_Collator):
    """Prompt only (+ generation prompt) → left-padded ``input_ids`` for ``generate``.

    The conversation is rendered up to, not including, the final assistant answer; earlier turns
    appear exactly as in training. ``references`` holds one list per sample (`references`): the
    record's ``answers`` exactly as given when it has them (duplicates and order kept: VQA's ten
    annotator answers are votes), else the final assistant answer, stripped. The batch has no
    ``labels``: `Loop` refuses it for training.

    Args:
        processor: A Hugging Face processor with a chat template.
        pad_token_id: Padding id (default: the tokenizer's pad token).
        on_bad_sample: ``"raise"`` or ``"skip"``.

    Example:
        >>> from llava_loop.testing import tiny_llava, synthetic_vqa
        >>> model, processor = tiny_llava()
        >>> batch = EvalCollator(processor)(synthetic_vqa(2))
        >>> batch["references"][0] == synthetic_vqa(2)[0]["answers"]
        True
    """

    left_padded = True

    ignore_index = IGNORE_INDEX

    def __call__(self, records: list) -> dict[str, Any]:
        encoded, ids, refs, prompts, skipped = [], [], [], [], []
        for record in records:
            if isinstance(record, SkippedSample):
                skipped.append(record)
                continue
            try:
                sample = self.renderer.render(record, for_generation=True)
            except BadSampleError as err:
                skipped.append(skip_or_raise(err, self.on_bad_sample))
                continue
            encoded.append(self._encode(sample))
            refs.append(references(record))
            ids.append(sample.id)
            prompts.append(sample.text)
        return self._batch(
            encoded,
            left=self.left_padded,
            extra={"ids": ids, "references": refs, "prompts": prompts, "skipped": skipped},
        )


def references(record: dict) -> list[str]:
    """The references a record's prediction is scored against, passed to every metric unchanged.

    With ``answers``, that list as given: duplicates are kept (in VQA they are annotator votes),
    order is kept, and the training answer is not added again. Without, the final assistant answer
    with outer whitespace stripped, as it is trained (see `ChatRenderer.messages`).

    Example:
        >>> references({"conversations": [{"from": "gpt", "value": " 2 "}], "answers": ["2", "2", "3"]})
        ['2', '2', '3']
        >>> references({"conversations": [{"from": "gpt", "value": " 2 "}]})
        ['2']
    """
    if "answers" in record:
        return list(record["answers"])
    final = next(t["value"] for t in reversed(record["conversations"]) if t["from"] == "gpt")
    return [final.strip()]


def _pad(t: torch.Tensor, length: int, fill: int, left: bool) -> torch.Tensor:
    """Pad dim 1 (tokens) of ``t`` to ``length`` with ``fill``, on the left or the right."""
    pad = t.new_full((t.shape[0], length - t.shape[1], *t.shape[2:]), fill)
    return torch.cat([pad, t] if left else [t, pad], dim=1)


def _cat_padded(values: list[torch.Tensor], key: str) -> torch.Tensor:
    """Concatenate per-sample tensors along dim 0, zero-padding the other dims (except the last three: an
    image's channels and pixels) on the right where sizes differ (tiles, images per sample)."""
    shapes = {v.shape[1:] for v in values}
    if len(shapes) > 1:
        if len({len(s) for s in shapes}) > 1 or len({s[-3:] for s in shapes if len(s) >= 4}) > 1:
            raise ValueError(f"cannot batch {key!r}: per-sample shapes {[tuple(v.shape) for v in values]}")
        most = [max(sizes) for sizes in zip(*shapes)]
        padded = []
        for v in values:
            out = v.new_zeros(v.shape[0], *most)
            out[(slice(None), *(slice(0, n) for n in v.shape[1:]))] = v
            padded.append(out)
        values = padded
    return torch.cat(values)


def loss_token_count(batch: dict) -> int:
    """Tokens the next-token loss of a `TrainCollator` batch is summed over: positions 1.. whose label
    is not ``IGNORE_INDEX`` (the first token predicts nothing); 0 for a batch without labels."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) if "labels" in batch else 0


def answer_continuations(gen: dict, loss: dict) -> dict | None:
    """What each conversation of a `TrainCollator` batch ``loss`` adds after its prompt in the
    `EvalCollator` batch ``gen`` of the same records: the final answer and its end of turn, right
    padded (``input_ids``, ``attention_mask``, ``labels``: ``rows x longest continuation``).

    The eval loss of such a batch can be read off a forward of these tokens on the prompts' cache.
    None where that would not give the loss of ``loss``: the batches hold different records, their
    images differ, or a conversation does not begin with its prompt token for token or has labels
    inside it (a multi-turn conversation, whose earlier answers are trained too).
    """
    if not gen.get("ids") or gen["ids"] != loss.get("ids"):
        return None
    for key, value in gen.items():
        if isinstance(value, torch.Tensor) and key not in ("input_ids", "attention_mask"):
            other = loss.get(key)
            if not isinstance(other, torch.Tensor) or not torch.equal(value, other):
                return None  # per-token extras (padded the other way) and differing images
    rows = []
    for i in range(len(gen["ids"])):
        prompt = gen["input_ids"][i][gen["attention_mask"][i].bool()]
        kept = loss["attention_mask"][i].bool()
        tokens, labels = loss["input_ids"][i][kept], loss["labels"][i][kept]
        n = len(prompt)
        if len(tokens) <= n or not torch.equal(tokens[:n], prompt) or bool((labels[:n] != IGNORE_INDEX).any()):
            return None
        rows.append({"input_ids": tokens[n:], "attention_mask": torch.ones_like(tokens[n:]), "labels": labels[n:]})
    longest = max(len(r["input_ids"]) for r in rows)
    fill = {"input_ids": 0, "attention_mask": 0, "labels": IGNORE_INDEX}  # padding ids are masked out
    return {key: torch.cat([_pad(r[key][None], longest, fill[key], left=False) for r in rows]) for key in fill}


class EvalBatchCollator:
    """Collate function of evaluation: from ``(dataset index, record)`` items, the generation batch
    (``"gen"``: prompts, left padded) and the teacher-forced loss batch (``"loss"``: whole
    conversations, right padded; empty without ``train_collator``) of the same records, and the
    dataset ``"indices"`` of the generation batch's rows (skipped samples have none)."""

    def __init__(self, eval_collator: EvalCollator, train_collator: TrainCollator | None):
        self.eval_collator, self.train_collator = eval_collator, train_collator

    def __call__(self, items: list[tuple[int, Any]]) -> dict:
        records = [r for _, r in items]
        kept = [i for i, r in items if not isinstance(r, SkippedSample)]
        loss = self.train_collator(records) if self.train_collator is not None else {"ids": []}
        return {"gen": self.eval_collator(records), "loss": loss, "indices": kept}

    def merge(self, batches: list[dict]) -> dict:
        """The batch of all the records of ``batches`` (batches of consecutive records, in order)."""
        loss = [b["loss"] for b in batches]
        return {
            "gen": self.eval_collator.merge([b["gen"] for b in batches]),
            "loss": self.train_collator.merge(loss) if self.train_collator is not None else {"ids": []},
            "indices": [i for b in batches for i in b["indices"]],
        }
