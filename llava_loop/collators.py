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

import logging
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


@dataclass
class RenderedSample:
    """One record rendered to text, with the character spans that carry a loss."""

    id: str
    text: str
    images: list
    spans: list[tuple[int, int]]
    add_special_tokens: bool


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
        if getattr(processor, "chat_template", None) is None and self.tokenizer.chat_template is None:
            raise ValueError(
                "the processor has no chat template; set processor.chat_template (the llava-hf "
                "template is llava_loop.testing.LLAVA_TEMPLATE)"
            )
        eos = self.tokenizer.eos_token
        if eos is None:
            raise ValueError("the tokenizer has no eos_token; set one so the model can learn to stop")
        self.eos_token = eos
        specials = {t.content for t in self.tokenizer.added_tokens_decoder.values() if t.special}
        specials.update(self.tokenizer.all_special_tokens)
        specials.discard(self.image_token)
        specials.discard(self.tokenizer.pad_token)
        # Longest first so "<|im_end|>" wins over a shorter token it starts with.
        self.end_of_turn_tokens = sorted(specials, key=len, reverse=True)
        # Strings the tokenizer turns into control tokens wherever they appear in the text; only
        # the `<image>` marker (human turns, counted against the images) is data.
        forbidden = specials | {self.tokenizer.pad_token, self.image_token} - {None}
        self.special_token_strings = sorted(forbidden - {IMAGE_TOKEN}, key=len, reverse=True)
        # Leftmost match first; at one position the longest (the list is sorted longest first).
        self._special_pattern = re.compile("|".join(map(re.escape, self.special_token_strings)) or "(?!)")

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
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

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
            for k, prompt in enumerate(
                (self._apply(messages[:i], add_generation_prompt=True), self._apply(messages[:i]))
            ):
                if original.startswith(prompt):
                    start = max(cursor, len(prompt) + inserted)
                    after_generation_prompt = k == 0
                    break
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
        self.renderer = ChatRenderer(processor)
        self.tokenizer = self.renderer.tokenizer
        if pad_token_id is None:
            pad_token_id = self.tokenizer.pad_token_id
        if pad_token_id is None:
            raise ValueError("the tokenizer has no pad_token; set tokenizer.pad_token or pass pad_token_id")
        self.pad_token_id = pad_token_id
        self.on_bad_sample = on_bad_sample
        self.image_token_id = getattr(processor, "image_token_id", None)

    def _encode(self, sample: RenderedSample) -> dict[str, torch.Tensor]:
        """Run the processor on one sample (it expands image markers and processes images)."""
        kwargs = {"text": [sample.text], "return_tensors": "pt", "add_special_tokens": sample.add_special_tokens}
        if sample.images:
            kwargs["images"] = sample.images
        return dict(self.processor(**kwargs))

    def _token_mask(self, sample: RenderedSample, input_ids: torch.Tensor) -> torch.Tensor:
        """True for tokens of ``input_ids`` (processor output) overlapping a loss span."""
        enc = self.tokenizer(sample.text, add_special_tokens=sample.add_special_tokens, return_offsets_mapping=True)
        flags = [any(s < b and e > a for s, e in sample.spans) and b > a for a, b in enc["offset_mapping"]]
        # The processor repeats each image token N times; walk both sequences with runs collapsed.
        out = torch.zeros(len(input_ids), dtype=torch.bool)
        j = 0
        ids = enc["input_ids"]
        full = input_ids.tolist()
        i = 0
        while i < len(ids):
            if j >= len(full) or ids[i] != full[j]:
                raise ValueError(
                    f"sample {sample.id!r}: the processor's tokens differ from the tokenizer's at "
                    f"token {i}; cannot place the labels safely"
                )
            if ids[i] == self.image_token_id:
                while i < len(ids) and ids[i] == self.image_token_id:
                    i += 1
                while j < len(full) and full[j] == self.image_token_id:
                    j += 1
                continue
            out[j] = flags[i]
            i += 1
            j += 1
        if j != len(full):
            raise ValueError(f"sample {sample.id!r}: processor output is longer than the tokenized text")
        return out

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
        """Pad per-token tensors (same shape as ``input_ids``), concatenate image tensors along dim 0."""
        batch: dict[str, Any] = {}
        longest = max((e["input_ids"].shape[-1] for e in encoded), default=0)
        for key in dict.fromkeys(k for e in encoded for k in e):
            values = [e[key] for e in encoded if key in e]
            if all(key in e and e[key].shape == e["input_ids"].shape for e in encoded):
                fill = {"input_ids": self.pad_token_id, "labels": self.ignore_index}.get(key, 0)
                batch[key] = torch.cat([_pad(v, longest, fill, left) for v in values])
            else:
                batch[key] = _cat_images(values, key)
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
            mask = self._token_mask(sample, input_ids)
            labels = torch.where(mask, input_ids, torch.full_like(input_ids, self.ignore_index))
            if self.max_length is not None and len(input_ids) > self.max_length:
                cut, source = self.max_length, record.get("source", MEMORY_SOURCE)
                reason = None
                if self.image_token_id is not None and (input_ids[cut:] == self.image_token_id).any():
                    reason = f"{len(input_ids)} tokens with image tokens beyond max_length={cut}"
                elif not mask[:cut].any():
                    reason = f"answer entirely truncated: {len(input_ids)} tokens > max_length={cut}"
                if reason is not None:
                    skipped.append(skip_or_raise(BadSampleError(sample.id, source, reason), self.on_bad_sample))
                    continue
                enc = {k: (v[:, :cut] if v.dim() == 2 and v.shape[-1] == len(input_ids) else v) for k, v in enc.items()}
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
    pad = t.new_full((t.shape[0], length - t.shape[-1]), fill)
    return torch.cat([pad, t] if left else [t, pad], dim=-1)


def _cat_images(values: list[torch.Tensor], key: str) -> torch.Tensor:
    """Concatenate per-sample image tensors, zero-padding dim 1 where sizes differ (tiled images)."""
    if values[0].dim() >= 2 and len({v.shape[1:] for v in values}) > 1:
        if len({v.shape[2:] for v in values}) > 1:
            raise ValueError(f"cannot batch {key!r}: per-sample shapes {[tuple(v.shape) for v in values]}")
        most = max(v.shape[1] for v in values)
        values = [torch.cat([v, v.new_zeros(v.shape[0], most - v.shape[1], *v.shape[2:])], 1) for v in values]
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
