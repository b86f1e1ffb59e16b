"""Tests for llava_loop.collators: label masking, padding, truncation and bad samples.

Padding uses sentinels (``pad_token_id=-8``, ``ignore_index=-9``) so that a bug can't hide behind 0
or -100. Labels are checked against an independent reference: the hand-written rendering of each
conversation, tokenized as a whole, in which exactly the tokens that each answer (plus its EOS or
end-of-turn token) gets *in context* are labelled, i.e. what the model must generate after the
prompt that `EvalCollator` builds.
"""

from __future__ import annotations

from functools import cache

import pytest
import torch

from helpers import (
    collapse_images,
    expected_labels,
    labelled_runs,
    llama2_tokenizer_dir,
    record,
    solid_image,
    unpadded,
)
from llava_loop.collators import META_KEYS, EvalCollator, TrainCollator
from llava_loop.data import BadSampleError, SkippedSample
from llava_loop.testing import llava15_processor, synthetic_vqa, tiny_processor

PAD, IGNORE = -8, -9
RED, GREEN, BLUE = (200, 10, 10), (10, 200, 10), (10, 10, 200)
TINY_IMAGE_TOKENS = 16  # (32 px / 8 px patches) ** 2
LLAVA15_IMAGE_TOKENS = 576  # (336 px / 14 px patches) ** 2


@cache
def tiny(markers: bool = True):
    return tiny_processor(generation_markers=markers)


@cache
def llava15(markers: bool = True):
    return llava15_processor(llama2_tokenizer_dir(), generation_markers=markers)


def train(processor, records, **kwargs) -> dict:
    return TrainCollator(processor, pad_token_id=PAD, ignore_index=IGNORE, **kwargs)(records)


def evaluate(processor, records, **kwargs) -> dict:
    return EvalCollator(processor, pad_token_id=PAD, **kwargs)(records)


# Each case: a record, its rendering by the llava-1.5 template with EOS after every answer, and
# the continuations (separator + answer + EOS) that must carry the labels.
def tiny_cases() -> list[tuple[dict, str, list[str]]]:
    return [
        (
            record(
                "single",
                ("human", "<image>\nWhat color is the shape?"),
                ("gpt", "red"),
                image=solid_image(RED),
                answers=["Red", "red"],
            ),
            "USER: <image>\nWhat color is the shape? ASSISTANT: red</s>",
            [" red</s>"],
        ),
        (
            record(
                "multi-turn",
                ("system", "Be brief."),
                ("human", "<image>\nWhat color is the shape?"),
                ("gpt", "It is red."),
                ("human", "What shape is it?"),
                ("gpt", "circle"),
                image=solid_image(GREEN),
            ),
            (
                "Be brief. USER: <image>\nWhat color is the shape? ASSISTANT: It is red.</s> "
                "USER: What shape is it? ASSISTANT: circle</s>"
            ),
            [" It is red.</s>", " circle</s>"],
        ),
        (
            record("text-only", ("human", "Is it red or blue?"), ("gpt", "red")),
            "USER: Is it red or blue? ASSISTANT: red</s>",
            [" red</s>"],
        ),
        (
            record(
                "multi-image",
                ("human", "<image>\n<image>\nCompare the two shapes."),
                ("gpt", "The left one is red."),
                ("human", "<image>\nAnd this one?"),
                ("gpt", "3 squares, 1 circle!"),
                image=[
                    solid_image(RED),
                    solid_image(GREEN, (20, 50)),
                    solid_image(BLUE),
                ],
            ),
            (
                "USER: <image>\n<image>\nCompare the two shapes. ASSISTANT: The left one is red.</s> "
                "USER: <image>\nAnd this one? ASSISTANT: 3 squares, 1 circle!</s>"
            ),
            [" The left one is red.</s>", " 3 squares, 1 circle!</s>"],
        ),
    ]


def check_train_row(processor, batch, row, text, continuations, n_images, image_tokens):
    """Assert one row of a train batch equals the reference labels of ``text``."""
    tok, image_id = processor.tokenizer, processor.image_token_id
    ids = unpadded(batch["input_ids"][row], batch["attention_mask"][row])
    labels = unpadded(batch["labels"][row], batch["attention_mask"][row])
    ids, runs, labels = collapse_images(ids, image_id, labels)
    want_ids, want_labels = expected_labels(tok, text, continuations, IGNORE)
    name = batch["ids"][row]
    assert runs == [image_tokens] * n_images, f"{name}: image token runs {runs}"
    assert ids == want_ids, f"{name}: input_ids render as {tok.decode(ids)!r}, expected {text!r}"
    assert labels == want_labels, (
        f"{name}: labelled {[tok.decode(r) for r in labelled_runs(labels, IGNORE)]}, expected {continuations}"
    )
    return [tok.decode(r) for r in labelled_runs(labels, IGNORE)]


@pytest.mark.parametrize("markers", [True, False], ids=["generation-markers", "no-markers"])
def test_train_labels_exactly_every_answer_plus_eos(markers):
    processor = tiny(markers)
    cases = tiny_cases()
    batch = train(processor, [r for r, _, _ in cases])
    assert batch["ids"] == [r["id"] for r, _, _ in cases], f"ids {batch['ids']}"
    for row, (rec, text, continuations) in enumerate(cases):
        n_images = text.count("<image>")
        decoded = check_train_row(processor, batch, row, text, continuations, n_images, TINY_IMAGE_TOKENS)
        assert decoded == continuations, f"{rec['id']}: labelled tokens decode to {decoded}"
    image_labels = batch["labels"][batch["input_ids"] == processor.image_token_id]
    assert (image_labels == IGNORE).all(), "image tokens carry labels"


def test_answers_are_trained_without_outer_whitespace_and_with_inner_whitespace():
    padded = record(
        "ws",
        ("human", "<image>\nWhat color is the shape?"),
        ("gpt", "\n It is red.\n\n"),
        ("human", "And now?"),
        ("gpt", "  red\nor blue \t"),
        image=solid_image(RED),
    )
    stripped = record(
        "ws",
        ("human", "<image>\nWhat color is the shape?"),
        ("gpt", "It is red."),
        ("human", "And now?"),
        ("gpt", "red\nor blue"),
        image=solid_image(RED),
    )
    processor = tiny()
    got, want = train(processor, [padded]), train(processor, [stripped])
    for key in ("input_ids", "labels"):
        assert torch.equal(got[key], want[key]), f"{key}: outer whitespace of answers must not be trained"
    text = (
        "USER: <image>\nWhat color is the shape? ASSISTANT: It is red.</s> USER: And now? ASSISTANT: red\nor blue</s>"
    )
    decoded = check_train_row(processor, got, 0, text, [" It is red.</s>", " red\nor blue</s>"], 1, TINY_IMAGE_TOKENS)
    assert decoded == [" It is red.</s>", " red\nor blue</s>"], (
        f"labels should be the template's separator + the stripped answer + EOS: {decoded}"
    )
    assert evaluate(processor, [padded])["references"] == [["red\nor blue"]], "the reference is stripped the same way"


def test_train_labels_identical_with_and_without_generation_markers():
    records = [r for r, _, _ in tiny_cases()]
    with_markers, without = train(tiny(True), records), train(tiny(False), records)
    for key in ("input_ids", "attention_mask", "labels", "pixel_values"):
        assert torch.equal(with_markers[key], without[key]), f"{key} differs between template variants"


def test_train_masks_system_prompt_and_image_tokens():
    processor = tiny()
    rec, _, _ = tiny_cases()[1]
    batch = train(processor, [rec])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    first_label = int((labels != IGNORE).nonzero()[0])
    prompt = processor.tokenizer.decode(ids[:first_label])
    assert prompt.startswith("<s>Be brief. USER:") and prompt.endswith("ASSISTANT:"), (
        f"the first labelled token does not follow the first prompt: {prompt!r}"
    )
    assert (labels[ids == processor.image_token_id] == IGNORE).all(), "image tokens carry labels"
    assert int((ids == processor.image_token_id).sum()) == TINY_IMAGE_TOKENS, "image tokens not expanded"


def test_train_collator_right_pads_with_sentinels():
    processor = tiny()
    assert processor.tokenizer.padding_side == "right"
    llava = llava15()  # left-padding by default: the collator must right-pad anyway
    for proc in (processor, llava):
        short = record("short", ("human", "Hi"), ("gpt", "yes"))
        long = record(
            "long",
            ("human", "Is it red or blue? Answer with one word."),
            ("gpt", "blue"),
        )
        batch = train(proc, [short, long])
        mask = batch["attention_mask"]
        n = int(mask[0].sum())
        assert n < mask.shape[1], "test setup: the short sample should be padded"
        assert mask[0, :n].all() and not mask[0, n:].any(), f"not right-padded: {mask[0].tolist()}"
        assert mask[:, 0].all(), "first column has padding: left-padded"
        assert (batch["input_ids"][0, n:] == PAD).all(), "input_ids padding is not pad_token_id"
        assert (batch["labels"][0, n:] == IGNORE).all(), "labels padding is not ignore_index"
        assert not (batch["labels"] == -100).any(), "-100 in labels although ignore_index=-9"
        assert mask[1].all(), "the longest sample is padded"
        assert "labels" in batch and set(batch) - set(META_KEYS) >= {
            "input_ids",
            "attention_mask",
        }


def test_eval_collator_left_pads_prompts_only():
    processor = tiny()  # its tokenizer pads right by default
    cases = tiny_cases()
    batch = evaluate(processor, [r for r, _, _ in cases])
    mask = batch["attention_mask"]
    assert mask[:, -1].all(), f"last column has padding: not left-padded\n{mask}"
    for row in range(len(cases)):
        pads = int((mask[row] == 0).sum())
        assert not mask[row, :pads].any() and mask[row, pads:].all(), f"row {row} mask {mask[row].tolist()}"
        assert (batch["input_ids"][row, :pads] == PAD).all(), f"row {row}: padding is not pad_token_id"
    assert (mask == 0).any(), "test setup: some prompt should be padded"
    assert "labels" not in batch, "the eval batch has labels; it must not be trainable"


@pytest.mark.parametrize("markers", [True, False], ids=["generation-markers", "no-markers"])
def test_eval_prompt_is_the_training_history_plus_generation_prompt(markers):
    processor = tiny(markers)
    tok, image_id = processor.tokenizer, processor.image_token_id
    cases = tiny_cases()
    records = [r for r, _, _ in cases]
    gen, tr = evaluate(processor, records), train(processor, records)
    for row, (rec, text, continuations) in enumerate(cases):
        prompt_text = text[: text.rindex(continuations[-1])]
        assert prompt_text.endswith("ASSISTANT:"), "test setup"
        assert gen["prompts"][row] == prompt_text, f"{rec['id']}: prompt {gen['prompts'][row]!r}"
        ids, _ = collapse_images(unpadded(gen["input_ids"][row], gen["attention_mask"][row]), image_id)
        assert ids == tok(prompt_text)["input_ids"], f"{rec['id']}: eval prompt is {tok.decode(ids)!r}"
        # Exactly the training tokens in front of the final answer (earlier EOS included).
        train_ids = unpadded(tr["input_ids"][row], tr["attention_mask"][row])
        train_labels = unpadded(tr["labels"][row], tr["attention_mask"][row])
        final_start = len(train_labels) - len(labelled_runs(train_labels, IGNORE)[-1])
        gen_ids = unpadded(gen["input_ids"][row], gen["attention_mask"][row])
        assert gen_ids == train_ids[:final_start], (
            f"{rec['id']}: eval prompt {tok.decode(gen_ids)!r} differs from the training prefix "
            f"{tok.decode(train_ids[:final_start])!r}"
        )


def test_eval_references_are_the_answers_as_given_else_the_final_answer():
    votes = ["2"] * 9 + ["3"]  # VQA v2: ten annotator answers, duplicates are votes
    vqa = record("vqa", ("human", "<image>\nHow many?"), ("gpt", "2"), image=solid_image(GREEN), answers=list(votes))
    multi_turn = record(
        "r",
        ("human", "<image>\nWhat color?"),
        ("gpt", "green"),
        ("human", "Shape?"),
        ("gpt", " circle "),
        image=solid_image(GREEN),
        answers=["round", "a circle", "round"],
    )
    plain = record("plain", ("human", "Hi"), ("gpt", " hello \n"))
    batch = evaluate(tiny(), [vqa, multi_turn, plain])
    assert batch["references"] == [votes, ["round", "a circle", "round"], ["hello"]], (
        "answers must be the references unchanged (duplicates and order kept, the training answer not "
        f"added); without answers the stripped final answer: {batch['references']}"
    )
    assert batch["ids"] == ["vqa", "r", "plain"], f"ids {batch['ids']}"


def test_empty_answers_list_is_a_bad_record_naming_the_id():
    from llava_loop.data import as_dataset

    raw = {"id": "q7", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "yo"}]}
    with pytest.raises(BadSampleError, match="'answers' is empty") as err:
        as_dataset([{**raw, "answers": []}])
    assert "q7" in str(err.value), f"the error should name the sample: {err.value}"


@pytest.mark.parametrize("collate", [train, evaluate], ids=["train", "eval"])
def test_pixel_values_have_one_row_per_image_in_text_only_and_mixed_batches(collate):
    processor = tiny()
    text_only = [r for r, _, _ in tiny_cases() if r["image"] is None]
    batch = collate(processor, text_only)
    assert "pixel_values" not in batch, "a text-only batch has pixel_values"
    assert not (batch["input_ids"] == processor.image_token_id).any(), "image tokens in a text-only batch"

    records = [r for r, _, _ in tiny_cases()]
    images = [img for r in records for img in (r["image"] if isinstance(r["image"], list) else [r["image"]]) if img]
    batch = collate(processor, records)
    want = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    assert batch["pixel_values"].shape[0] == len(images) == 5, f"pixel_values {tuple(batch['pixel_values'].shape)}"
    assert torch.allclose(batch["pixel_values"], want), "pixel_values not in record / marker order"
    per_row = (batch["input_ids"] == processor.image_token_id).sum(1).tolist()
    assert per_row == [TINY_IMAGE_TOKENS * n for n in (1, 1, 0, 3)], f"image tokens per row {per_row}"


def test_end_of_turn_token_from_template_is_labelled_and_no_eos_added():
    chatml = (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n"
        "{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    processor = tiny_processor()  # a fresh copy: we add tokens to its tokenizer
    processor.tokenizer.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    processor.chat_template = chatml
    rec, _, _ = tiny_cases()[1]
    text = (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat color is the shape?<|im_end|>\n"
        "<|im_start|>assistant\nIt is red.<|im_end|>\n"
        "<|im_start|>user\nWhat shape is it?<|im_end|>\n"
        "<|im_start|>assistant\ncircle<|im_end|>"
    )
    continuations = ["It is red.<|im_end|>", "circle<|im_end|>"]
    batch = train(processor, [rec])
    decoded = check_train_row(processor, batch, 0, text, continuations, 1, TINY_IMAGE_TOKENS)
    assert decoded == continuations, f"labelled tokens decode to {decoded}"
    eos = processor.tokenizer.eos_token_id
    assert not (batch["input_ids"] == eos).any(), "EOS inserted although the template ends turns"

    gen = evaluate(processor, [rec])
    assert gen["prompts"][0] == text[: text.rindex("circle")], f"eval prompt {gen['prompts'][0]!r}"


# ---------------------------------------------------------------------------- truncation


def long_record(rid: str = "long") -> dict:
    return record(
        rid,
        (
            "human",
            "<image>\nDescribe the image in a sentence. Where is the shape, and what color is it?",
        ),
        ("gpt", "The image shows a red circle on the left side."),
        image=solid_image(RED),
    )


def first_label(batch, row: int = 0) -> int:
    return int((batch["labels"][row] != IGNORE).nonzero()[0])


def test_truncation_keeps_the_remaining_answer_labels():
    processor = tiny()
    full = train(processor, [long_record()])
    start = first_label(full)
    short = record("short", ("human", "Hi"), ("gpt", "yes"))
    batch = train(processor, [long_record(), short], max_length=start + 3)
    assert batch["input_ids"].shape[1] == start + 3, f"length {batch['input_ids'].shape[1]} != max_length"
    assert torch.equal(batch["input_ids"][0], full["input_ids"][0, : start + 3]), "kept tokens changed"
    assert torch.equal(batch["labels"][0], full["labels"][0, : start + 3]), "kept labels changed"
    assert int((batch["labels"][0] != IGNORE).sum()) == 3, "the answer's first 3 tokens lost labels"
    assert batch["num_truncated"] == 1, f"num_truncated {batch['num_truncated']}"
    assert batch["ids"] == ["long", "short"] and batch["skipped"] == [], "a sample was dropped"

    exact = train(processor, [long_record()], max_length=full["input_ids"].shape[1])
    assert exact["num_truncated"] == 0, "a sample of exactly max_length counted as truncated"


def test_truncation_of_a_later_turn_keeps_the_earlier_answers():
    processor = tiny()
    rec, _, _ = tiny_cases()[1]
    full = train(processor, [rec])
    runs = labelled_runs(full["labels"][0].tolist(), IGNORE)
    cut = full["input_ids"].shape[1] - len(runs[-1])  # drop the whole final answer
    batch = train(processor, [rec], max_length=cut)
    kept = labelled_runs(batch["labels"][0].tolist(), IGNORE)
    assert kept == runs[:1], f"labels after truncation {kept}, expected the first answer {runs[:1]}"
    assert batch["num_truncated"] == 1, f"num_truncated {batch['num_truncated']}"


def test_answer_truncated_away_entirely_is_a_bad_sample_naming_the_id():
    processor = tiny()
    start = first_label(train(processor, [long_record()]))
    with pytest.raises(BadSampleError, match="'long'") as err:
        train(processor, [long_record()], max_length=start)
    assert err.value.sample_id == "long" and "truncated" in err.value.reason, str(err.value)

    short = record("short", ("human", "Hi"), ("gpt", "yes"))
    batch = train(processor, [short, long_record()], max_length=start, on_bad_sample="skip")
    assert [s.id for s in batch["skipped"]] == ["long"], f"skipped {batch['skipped']}"
    assert batch["ids"] == ["short"] and batch["input_ids"].shape[0] == 1, "the bad sample was trained"
    assert (batch["labels"] != IGNORE).any(), "the good sample lost its labels"


def test_truncation_never_cuts_image_tokens():
    processor = tiny()
    full = train(processor, [long_record()])
    image_positions = (full["input_ids"][0] == processor.image_token_id).nonzero().flatten()
    for cut in (
        int(image_positions[0]),
        int(image_positions[-1]),
    ):  # before / inside the image run
        with pytest.raises(BadSampleError, match="'long'") as err:
            train(processor, [long_record()], max_length=cut)
        assert "image" in err.value.reason, f"reason does not mention the image: {err.value.reason}"
        batch = train(processor, [long_record()], max_length=cut, on_bad_sample="skip")
        assert [s.id for s in batch["skipped"]] == ["long"] and batch["ids"] == [], f"max_length={cut}: {batch}"


# ---------------------------------------------------------------------------- bad samples


@pytest.mark.parametrize("collate", [train, evaluate], ids=["train", "eval"])
def test_skipped_samples_passed_in_are_reported(collate):
    gone = SkippedSample("gone", "train.json", "corrupt image")
    batch = collate(tiny(), [gone, record("kept", ("human", "Hi"), ("gpt", "yes"))])
    assert batch["skipped"] == [gone], f"skipped {batch['skipped']}"
    assert batch["ids"] == ["kept"] and batch["input_ids"].shape[0] == 1, f"ids {batch['ids']}"


BAD_RECORDS = {
    "no-answer": record("no-answer", ("human", "Hi")),
    "image-in-answer": record(
        "image-in-answer",
        ("human", "<image>\nHi"),
        ("gpt", "See <image> here"),
        image=solid_image(RED),
    ),
    "marker-without-image": record("marker-without-image", ("human", "<image>\nHi"), ("gpt", "yes")),
    "image-without-marker": record("image-without-marker", ("human", "Hi"), ("gpt", "yes"), image=solid_image(RED)),
    "empty-answer": record("empty-answer", ("human", "Hi"), ("gpt", "  ")),
    # Turn order: [system], human, gpt, ..., ending with gpt (llava_loop.data.check_conversation).
    "starts-with-gpt": record("starts-with-gpt", ("gpt", "Hello."), ("human", "Hi"), ("gpt", "yes")),
    "two-humans": record("two-humans", ("human", "Hi"), ("human", "Hi?"), ("gpt", "yes")),
    "ends-with-human": record("ends-with-human", ("human", "Hi"), ("gpt", "yes"), ("human", "And?")),
    "system-not-first": record("system-not-first", ("human", "Hi"), ("system", "Be brief."), ("gpt", "yes")),
    "unknown-role": record("unknown-role", ("user", "Hi"), ("gpt", "yes")),
    # Special-token strings the tokenizer would read as control tokens.
    "eos-in-answer": record("eos-in-answer", ("human", "Hi"), ("gpt", "yes</s> no")),
    "bos-in-prompt": record("bos-in-prompt", ("human", "<s>strike</s> Hi"), ("gpt", "yes")),
    "pad-in-system": record("pad-in-system", ("system", "x<pad>"), ("human", "Hi"), ("gpt", "yes")),
    "unk-in-answer": record("unk-in-answer", ("human", "Hi"), ("gpt", "<unk>")),
    # The dataset's record rules also hold for records handed to a collator directly.
    "answers-a-string": {**record("answers-a-string", ("human", "Hi"), ("gpt", "yes")), "answers": "yes"},
    "answers-empty": {**record("answers-empty", ("human", "Hi"), ("gpt", "yes")), "answers": []},
    "no-conversations": {"id": "no-conversations", "image": None},
}


@pytest.mark.parametrize("collate", [train, evaluate], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(BAD_RECORDS))
def test_bad_record_raises_naming_the_id_or_is_skipped(collate, name):
    bad, good = BAD_RECORDS[name], record("good", ("human", "Hi"), ("gpt", "yes"))
    with pytest.raises(BadSampleError, match=f"'{name}'") as err:
        collate(tiny(), [good, bad])
    assert err.value.sample_id == name, f"error names {err.value.sample_id!r}"
    batch = collate(tiny(), [good, bad], on_bad_sample="skip")
    assert [s.id for s in batch["skipped"]] == [name], f"skipped {batch['skipped']}"
    assert batch["ids"] == ["good"], f"ids {batch['ids']}"


@pytest.mark.parametrize("collate", [train, evaluate], ids=["train", "eval"])
@pytest.mark.parametrize("name", ["marker-without-image", "image-in-answer", "answers-empty", "fewer-markers"])
def test_collator_and_dataset_reject_a_bad_record_for_the_same_reason(collate, name):
    from llava_loop.data import as_dataset

    fewer_markers = record("fewer-markers", ("human", "<image>\nHi"), ("gpt", "yes"), image=[solid_image(RED)] * 2)
    bad = fewer_markers if name == "fewer-markers" else BAD_RECORDS[name]
    with pytest.raises(BadSampleError) as in_collator:
        collate(tiny(), [bad])
    with pytest.raises(BadSampleError) as in_dataset:
        as_dataset([bad])
    assert in_collator.value.reason == in_dataset.value.reason, (
        f"one record rule, two answers: collator {in_collator.value.reason!r}, dataset {in_dataset.value.reason!r}"
    )


def test_collator_skip_warning_is_the_datasets(caplog):
    bad = BAD_RECORDS["marker-without-image"]
    with caplog.at_level("WARNING", logger="llava_loop"):
        batch = train(tiny(), [bad, record("good", ("human", "Hi"), ("gpt", "yes"))], on_bad_sample="skip")
    warnings = [r.getMessage() for r in caplog.records if "marker-without-image" in r.getMessage()]
    want = f"skipping bad sample 'marker-without-image' (<memory>): {batch['skipped'][0].reason}"
    assert warnings == [want], f"one warning per skipped sample, worded as the dataset's: {warnings}"


# ---------------------------------------------------------------------------- real llava-1.5


def llava15_cases() -> list[tuple[dict, str, list[str]]]:
    system = "A chat between a curious user and an artificial intelligence assistant."
    answers = [
        "Café — 3.5 kg.",
        "3",
        "- red\n- green\n- blue",
        "...and a smiley 🙂 (maybe)!",
    ]
    return [
        (
            record(
                "real-multi-turn",
                ("system", system),
                (
                    "human",
                    '<image>\nWhat does the label say? It might be "Café — 3.5 kg."',
                ),
                ("gpt", answers[0]),
                ("human", "How many bags?"),
                ("gpt", answers[1]),
                ("human", "List their colours, one per line."),
                ("gpt", answers[2]),
                ("human", "Anything else?"),
                ("gpt", answers[3]),
                image=solid_image(RED, (400, 300)),
            ),
            (
                f'{system} USER: <image>\nWhat does the label say? It might be "Café — 3.5 kg." '
                f"ASSISTANT: {answers[0]}</s> USER: How many bags? ASSISTANT: {answers[1]}</s> "
                f"USER: List their colours, one per line. ASSISTANT: {answers[2]}</s> "
                f"USER: Anything else? ASSISTANT: {answers[3]}</s>"
            ),
            [f" {a}</s>" for a in answers],
        ),
        (
            record(
                "real-text-only",
                ("human", "Say yes or no: is 2 + 2 = 4?"),
                ("gpt", "yes"),
            ),
            "USER: Say yes or no: is 2 + 2 = 4? ASSISTANT: yes</s>",
            [" yes</s>"],
        ),
        (
            record(
                "real-sign",
                ("human", "<image>\nWhat's written on the sign?"),
                ("gpt", '"OPEN" — 24/7\nNo entry after 22:00.'),
                image=solid_image(BLUE, (336, 500)),
            ),
            'USER: <image>\nWhat\'s written on the sign? ASSISTANT: "OPEN" — 24/7\nNo entry after 22:00.</s>',
            [' "OPEN" — 24/7\nNo entry after 22:00.</s>'],
        ),
    ]


@pytest.mark.parametrize("markers", [True, False], ids=["generation-markers", "no-markers"])
def test_llava15_sentencepiece_labels_are_the_answers_in_context(markers):
    processor = llava15(markers)
    cases = llava15_cases()
    batch = train(processor, [r for r, _, _ in cases])
    for row, (rec, text, continuations) in enumerate(cases):
        n_images = text.count("<image>")
        decoded = check_train_row(processor, batch, row, text, continuations, n_images, LLAVA15_IMAGE_TOKENS)
        # SentencePiece drops the leading "▁" when decoding; the token check above includes it.
        assert decoded == [c.lstrip(" ") for c in continuations], f"{rec['id']}: labels decode to {decoded}"
    assert batch["pixel_values"].shape == (2, 3, 336, 336), f"pixel_values {tuple(batch['pixel_values'].shape)}"


def test_llava15_labels_identical_with_and_without_generation_markers():
    records = [r for r, _, _ in llava15_cases()]
    with_markers, without = (
        train(llava15(True), records),
        train(llava15(False), records),
    )
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(with_markers[key], without[key]), f"{key} differs between template variants"


def test_llava15_eval_prompt_ends_with_assistant_tokens():
    processor = llava15()
    tok = processor.tokenizer
    cases = llava15_cases()
    batch = evaluate(processor, [r for r, _, _ in cases])
    assistant = tok.encode("ASSISTANT:", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(assistant) == ["▁A", "SS", "IST", "ANT", ":"], "tokenizer changed"
    assert batch["attention_mask"][:, -1].all(), "eval batch is not left-padded"
    for row, (rec, text, continuations) in enumerate(cases):
        assert batch["input_ids"][row, -len(assistant) :].tolist() == assistant, (
            f"{rec['id']}: prompt ends with {tok.decode(batch['input_ids'][row, -8:])!r}"
        )
        ids, runs = collapse_images(
            unpadded(batch["input_ids"][row], batch["attention_mask"][row]),
            processor.image_token_id,
        )
        prompt_text = text[: text.rindex(continuations[-1])]
        assert ids == tok(prompt_text)["input_ids"], f"{rec['id']}: eval prompt {tok.decode(ids)!r}"
        assert runs == [LLAVA15_IMAGE_TOKENS] * text.count("<image>"), f"{rec['id']}: image runs {runs}"


@pytest.mark.parametrize("collate", [train, evaluate], ids=["train", "eval"])
def test_llava15_rejects_image_marker_in_answer_and_missing_answer(collate):
    processor = llava15()
    for name in ("image-in-answer", "no-answer"):
        with pytest.raises(BadSampleError, match=f"'{name}'"):
            collate(processor, [BAD_RECORDS[name]])


SPECIAL_TOKEN_CASES = {  # record id -> (turn, token) named in the error
    "eos-in-answer": (1, "</s>"),
    "bos-in-prompt": (0, "<s>"),
    "pad-in-system": (0, "<pad>"),
    "unk-in-answer": (1, "<unk>"),
}


@pytest.mark.parametrize("processor", ["tiny", "llava15"])
@pytest.mark.parametrize("collate", [train, evaluate], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(SPECIAL_TOKEN_CASES))
def test_special_token_string_in_text_is_refused_naming_turn_and_token(processor, collate, name):
    processor = tiny() if processor == "tiny" else llava15()
    turn, token = SPECIAL_TOKEN_CASES[name]
    with pytest.raises(BadSampleError) as err:
        collate(processor, [BAD_RECORDS[name]])
    reason = err.value.reason
    assert err.value.sample_id == name, f"error names {err.value.sample_id!r}"
    assert f"turn {turn} " in reason and repr(token) in reason, f"turn {turn} / {token!r} not named: {reason}"
    assert "Remove it" in reason and "escape" in reason, f"no fix given: {reason}"


def test_llava15_special_tokens_include_the_added_pad_and_not_the_image_marker():
    renderer = TrainCollator(llava15()).renderer
    assert {"<s>", "</s>", "<unk>", "<pad>"} <= set(renderer.special_token_strings), (
        f"Llama-2 specials missing: {renderer.special_token_strings}"
    )
    assert "<image>" not in renderer.special_token_strings, "the image marker must stay allowed"
    batch = train(llava15(), [llava15_cases()[0][0]])
    assert batch["ids"] == ["real-multi-turn"], "a record with <image> markers was refused"


def test_text_that_only_looks_like_special_tokens_is_fine():
    rec = record("lookalike", ("human", "Is < /s> or <s > or <im> a tag?"), ("gpt", "no: </ s>"))
    batch = train(tiny(), [rec])
    assert batch["ids"] == ["lookalike"], "text near special tokens was refused"


def test_first_partly_truncated_sample_is_named_in_one_warning(caplog):
    processor = tiny()
    start = first_label(train(processor, [long_record()]))
    collator = TrainCollator(processor, start + 3, pad_token_id=PAD, ignore_index=IGNORE)
    with caplog.at_level("WARNING", logger="llava_loop.collators"):
        first = collator([long_record("first-long"), long_record("second-long")])
        again = collator([long_record("third-long")])
    assert (first["num_truncated"], again["num_truncated"]) == (2, 1), (
        f"truncations counted {first['num_truncated']}, {again['num_truncated']}"
    )
    warnings = [r.getMessage() for r in caplog.records if "max_length" in r.getMessage()]
    assert len(warnings) == 1, f"expected one truncation warning, got {warnings}"
    assert "'first-long'" in warnings[0] and f"max_length={start + 3}" in warnings[0], (
        f"warning does not name the first sample and max_length: {warnings[0]}"
    )


@pytest.mark.parametrize("collator_class", [TrainCollator, EvalCollator])
def test_merged_batches_equal_one_batch_of_all_their_records(collator_class):
    processor = tiny_processor()
    records = synthetic_vqa(7, seed=4)
    records[1]["conversations"][1]["value"] = "a much longer answer than the others, to pad the rest"
    records[4]["image"] = None  # text-only among image records
    records[4]["conversations"][0]["value"] = records[4]["conversations"][0]["value"].replace("<image>", "").strip()
    records[5]["conversations"] = []  # a bad sample: skipped, in the middle of a chunk
    records[6]["conversations"] = []  # a chunk of bad samples only
    collator = collator_class(processor, on_bad_sample="skip")
    whole = collator(records)
    merged = collator.merge([collator(records[:2]), collator(records[2:6]), collator(records[6:])])
    assert merged.keys() == whole.keys(), f"keys {sorted(merged)} vs {sorted(whole)}"
    for key, value in whole.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(merged[key], value), f"{collator_class.__name__}: {key} differs"
        elif key != "skipped":
            assert merged[key] == value, f"{collator_class.__name__}: {key} {merged[key]} vs {value}"
    assert len(merged["skipped"]) == len(whole["skipped"]) == 2, "both bad samples reported"
