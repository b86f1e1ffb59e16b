"""Every supported VLM family through the same collators, loop, eval and export: one tiny offline model
per family (`llava_loop.testing.tiny_vlm`), built from its real classes with its published chat template."""

from __future__ import annotations

import logging
import pickle
from functools import cache

import pytest
import torch
import torch.nn.functional as F

from helpers import labelled_runs, small_config
from llava_loop import Loop, LoopConfig
from llava_loop.checkpointing import export, list_checkpoints
from llava_loop.collators import IGNORE_INDEX, META_KEYS, PER_TOKEN_KEYS, EvalCollator, TrainCollator
from llava_loop.data import BadSampleError
from llava_loop.modeling import LANGUAGE_MODEL_NAMES, VISION_NAMES, load_model, lora_layers, set_image_pixels
from llava_loop.testing import FAMILIES, chat_template, draw_scene, synthetic_vqa, tiny_vlm

# What each family's template puts after an answer (or, where it puts nothing, the EOS we add).
END_OF_TURN = {
    "llava": "</s>",
    "llava_next": "</s>",
    "llava_onevision": "<|im_end|>",
    "qwen2_vl": "<|im_end|>",
    "qwen2_5_vl": "<|im_end|>",
    "idefics3": "<end_of_utterance>",
    "smolvlm": "<end_of_utterance>",
    "gemma3": "<end_of_turn>",
    "paligemma": "<eos>",
    "mllama": "<|eot_id|>",
}
SINGLE_TURN_ONLY = {"paligemma"}  # prefix -> suffix, no chat template
NEEDS_AN_IMAGE = {"paligemma"}

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@cache
def _model(family: str):
    return tiny_vlm(family)


def model_of(family: str):
    """The family's tiny model (a fresh copy of the cached one) and processor."""
    import copy

    model, processor = _model(family)
    return copy.deepcopy(model), processor


def record(rid: str, *turns: tuple[str, str], images: int = 1) -> dict:
    colors = ["red", "blue", "green"]
    pictures = [draw_scene(colors[k % 3], "circle", "left") for k in range(images)]
    conversations = [{"from": who, "value": text} for who, text in turns]
    conversations[0]["value"] = "<image>\n" * images + conversations[0]["value"]
    return {
        "id": rid,
        "image": pictures if images > 1 else (pictures[0] if images else None),
        "conversations": conversations,
    }


def conversations(family: str) -> list[dict]:
    """Two samples of different lengths; the second multi-turn where the family has turns."""
    first = record("a", ("human", "What color is the shape?"), ("gpt", "red"))
    if family in SINGLE_TURN_ONLY:
        return [
            first,
            record("b", ("human", "Describe the image in a sentence."), ("gpt", "a blue square on the left")),
        ]
    second = record(
        "b",
        ("human", "What shape is it?"),
        ("gpt", "a blue square"),
        ("human", "Is it on the left or on the right?"),
        ("gpt", "right"),
    )
    return [first, second]


def inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k not in META_KEYS}


def row_losses(model, batch: dict) -> torch.Tensor:
    """Summed next-token loss of each row."""
    with torch.no_grad():
        logits = model(**{k: v for k, v in inputs(batch).items() if k != "labels"}).logits
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), labels, reduction="none", ignore_index=IGNORE_INDEX).sum(1)


# ---------------------------------------------------------------------- collators
@pytest.mark.parametrize("family", FAMILIES)
def test_labels_are_exactly_each_answer_and_its_end_of_turn(family):
    model, processor = model_of(family)
    records = conversations(family)
    batch = TrainCollator(processor)(records)
    tok = processor.tokenizer
    for row, rec in enumerate(records):
        answers = [t["value"] for t in rec["conversations"] if t["from"] == "gpt"]
        runs = labelled_runs(batch["labels"][row].tolist(), IGNORE_INDEX)
        decoded = [tok.decode(run).strip() for run in runs]
        assert decoded == [a + END_OF_TURN[family] for a in answers], (
            f"{family} sample {rec['id']}: labelled {decoded}, expected each answer + {END_OF_TURN[family]!r}"
        )
        labelled = batch["labels"][row] != IGNORE_INDEX
        assert torch.equal(batch["labels"][row][labelled], batch["input_ids"][row][labelled]), (
            f"{family}: labels differ from the input ids they sit on"
        )
        assert not labelled[batch["attention_mask"][row] == 0].any(), f"{family}: a padding token is labelled"
    image_ids = {processor.image_token_id, model.config.image_token_id}  # Gemma 3: <start_of_image>, soft token
    assert not any(int(t) in image_ids for t in batch["labels"][batch["labels"] != IGNORE_INDEX]), (
        f"{family}: an image token is labelled"
    )


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("collator", [TrainCollator, EvalCollator])
def test_every_per_token_tensor_is_padded_on_the_side_of_input_ids(family, collator):
    _, processor = model_of(family)
    records = conversations(family)
    make = collator(processor)
    batch = make(records)
    keys = [k for k, v in batch.items() if isinstance(v, torch.Tensor) and v.shape[:2] == batch["input_ids"].shape]
    assert set(keys) >= {"input_ids", "attention_mask"}, f"{family}: per-token keys {keys}"
    for row, rec in enumerate(records):
        alone = make([rec])
        n = alone["input_ids"].shape[1]
        kept = batch["attention_mask"][row].bool()
        expected_side = slice(-n, None) if collator is EvalCollator else slice(0, n)
        assert kept[expected_side].all(), f"{family}: row {row} of {collator.__name__} is padded on the wrong side"
        for key in keys:
            assert torch.equal(batch[key][row][expected_side], alone[key][0]), (
                f"{family} {collator.__name__}: {key} of sample {rec['id']} differs batched and alone "
                f"(a per-token tensor padded on the other side than input_ids?)"
            )
    assert set(keys) <= set(PER_TOKEN_KEYS), f"{family}: per-token keys outside PER_TOKEN_KEYS: {keys}"


@pytest.mark.parametrize("family", FAMILIES)
def test_collators_survive_pickling_for_dataloader_workers(family):
    # Workers started by spawn or forkserver (macOS; Linux from Python 3.14) get the collator pickled;
    # the processors built without a video processor are classes of their own.
    _, processor = model_of(family)
    records = conversations(family)
    for collator in (TrainCollator(processor), EvalCollator(processor)):
        copy = pickle.loads(pickle.dumps(collator))
        assert type(copy.processor).__name__ == type(processor).__name__, f"{family}: {type(copy.processor)}"
        expected, got = collator(records), copy(records)
        for key, value in expected.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(got[key], value), f"{family} {type(collator).__name__}: {key} differs unpickled"


@pytest.mark.parametrize("family", FAMILIES)
def test_multi_image_and_text_only_samples_batch_like_each_alone(family):
    model, processor = model_of(family)
    collate = TrainCollator(processor)
    mixes = {"two images": [record("two", ("human", "What colors?"), ("gpt", "red"), images=2)]}
    if family not in NEEDS_AN_IMAGE:
        mixes["text only"] = [record("text", ("human", "Say something long please now"), ("gpt", "ok"), images=0)]
    for name, extra in mixes.items():
        records = [conversations(family)[0], *extra, record("c", ("human", "What shape is it?"), ("gpt", "a circle"))]
        batch = collate(records)
        if family == "mllama":
            # transformers' Mllama lets text without an image cross-attend to every image slot of the batch,
            # so those rows depend on the batch (a model property, MllamaProcessor's own batches do the same):
            # what we check is that our batch is exactly the processor's own.
            samples = [collate.renderer.render(r) for r in records]
            native = processor(
                text=[s.text for s in samples],
                images=[s.images for s in samples],
                padding=True,
                add_special_tokens=False,
                return_tensors="pt",
            )
            real = native["attention_mask"].bool()
            for key in native:
                ours, theirs = batch[key], native[key]
                if key == "cross_attention_mask":  # only the padding positions may differ
                    ours, theirs = ours[real], theirs[real]
                assert torch.equal(ours, theirs), f"mllama {name}: {key} differs from MllamaProcessor's batch"
            continue
        torch.testing.assert_close(
            row_losses(model, batch),
            torch.cat([row_losses(model, collate([r])) for r in records]),
            rtol=1e-4,
            atol=1e-4,
            msg=f"{family} {name}: a sample's loss changes when batched with the others",
        )


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_greedy_generation_equals_one_sample_at_a_time(family):
    model, processor = model_of(family)
    collate = EvalCollator(processor)
    records = [{**r, "conversations": r["conversations"][:2]} for r in conversations(family)]
    records.append(record("long", ("human", "Is it on the left or on the right? Answer with one word."), ("gpt", "x")))
    batch = collate(records)
    assert batch["input_ids"].shape[1] > min(collate([r])["input_ids"].shape[1] for r in records), "no padding"
    with torch.no_grad():
        last = model(**inputs(batch)).logits[:, -1]
        out = model.generate(**inputs(batch), max_new_tokens=4, do_sample=False)[:, batch["input_ids"].shape[1] :]
        for row, rec in enumerate(records):
            alone = collate([rec])
            torch.testing.assert_close(
                last[row],
                model(**inputs(alone)).logits[0, -1],
                rtol=1e-4,
                atol=1e-4,
                msg=f"{family}: next-token logits of {rec['id']} differ batched (left padded) and alone",
            )
            single = model.generate(**inputs(alone), max_new_tokens=4, do_sample=False)[
                0, alone["input_ids"].shape[1] :
            ]
            assert out[row].tolist() == single.tolist(), f"{family}: greedy tokens of {rec['id']} differ batched"


# ---------------------------------------------------------------------- training, resume, export
def config(out, **overrides) -> LoopConfig:
    settings = dict(batch_size=4, max_steps=4, save_steps=2, log_steps=0, max_new_tokens=2, eval_batch_size=4, seed=1)
    return small_config(out, **{**settings, **overrides})


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_training_lowers_the_loss_then_resume_and_export_round_trip(family, tmp_path):
    data, eval_data = synthetic_vqa(16, seed=0), synthetic_vqa(4, seed=5)
    model, processor = model_of(family)
    probe = TrainCollator(processor)(data[:8])
    before = float(row_losses(model, probe).sum())
    loop = Loop(model, processor, config(tmp_path / "run"))
    loop.fit(data, eval_data)
    trained = loop.accelerator.unwrap_model(loop.model)
    trained.eval()
    after = float(row_losses(trained, probe).sum())
    assert after < 0.9 * before, f"{family}: 4 LoRA steps did not lower the loss ({before:.2f} -> {after:.2f})"
    assert "eval/exact_match" in loop.state.history[-1], f"{family}: no generation eval: {loop.state.history}"

    lm = next(n for n in LANGUAGE_MODEL_NAMES if any(f".{n}." in f".{m}." for m, _ in trained.named_modules()))
    names = [n for n, m in trained.named_modules() if m in set(lora_layers(trained))]
    assert names and all(f".{lm}." in n and not any(f".{v}." in n for v in VISION_NAMES) for n in names), (
        f"{family}: LoRA outside the language model: {[n for n in names if f'.{lm}.' not in n][:3]}"
    )

    checkpoints = list_checkpoints(tmp_path / "run")
    assert [c.name for c in checkpoints] == ["step_000002", "step_000004"], f"{family}: {checkpoints}"
    resumed = Loop(model_of(family)[0], processor, config(tmp_path / "run", resume_from=str(checkpoints[0])))
    resumed.fit(data, eval_data)
    weights = dict(resumed.accelerator.unwrap_model(resumed.model).named_parameters())
    for name, param in trained.named_parameters():
        if param.requires_grad:
            assert torch.equal(param, weights[name]), f"{family}: {name} differs after resuming from step 2"

    out = export(checkpoints[-1], tmp_path / "merged", base_model=model_of(family)[0])
    merged, merged_processor = load_model(str(out), dtype="float32")
    assert type(merged) is type(_model(family)[0]), f"{family}: load_model gave {type(merged).__name__}"
    assert merged_processor.chat_template == processor.chat_template, f"{family}: the export lost its template"
    merged.eval()
    torch.testing.assert_close(
        row_losses(merged, TrainCollator(merged_processor)(data[:8])),
        row_losses(trained, probe),
        rtol=1e-4,
        atol=1e-4,
        msg=f"{family}: the exported model's losses differ from the trained adapter's",
    )


# ---------------------------------------------------------------------- family specifics
def test_an_answer_whose_tokens_the_processor_changes_is_refused():
    _, processor = model_of("gemma3")
    records = [record("a", ("human", "What color is the shape?"), ("gpt", "red"))]
    labels = TrainCollator(processor)(records)["labels"][0]
    labelled = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
    assert len(labelled) >= 2, f"set-up: 'red<end_of_turn>' labelled as {labelled}"

    class Rewriting:
        """Gemma 3's processor, but it turns the answer's first token into another."""

        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __call__(self, **kwargs):
            enc = self.inner(**kwargs)
            enc["input_ids"][0, labelled[0]] = processor.tokenizer.convert_tokens_to_ids("<pad>")
            return enc

    with pytest.raises(ValueError, match=rf"sample 'a'.*changed 1 of the {len(labelled)} tokens of its answers"):
        TrainCollator(Rewriting(processor))(records)


@pytest.mark.parametrize("family", ["gemma3", "idefics3", "qwen2_vl"])
def test_max_length_inside_an_image_expansion_is_a_bad_sample_not_a_cut_image(family):
    model, processor = model_of(family)
    rec = record("a", ("human", "What color is the shape?"), ("gpt", "red"))
    ids = TrainCollator(processor)([rec])["input_ids"][0].tolist()
    image_ids = {processor.image_token_id, model.config.image_token_id}
    last_image = max(i for i, t in enumerate(ids) if t in image_ids)
    with pytest.raises(BadSampleError, match="image tokens beyond max_length"):
        TrainCollator(processor, max_length=last_image)([rec])
    skipped = TrainCollator(processor, max_length=last_image, on_bad_sample="skip")([rec])
    assert [s.id for s in skipped["skipped"]] == ["a"], f"{family}: the cut sample was not reported as skipped"


def test_paligemma_answers_are_a_causal_suffix_and_eval_batches_have_no_labels():
    model, processor = model_of("paligemma")
    rec = record("a", ("human", "Describe the image in a sentence."), ("gpt", "a blue square on the left"))
    batch = TrainCollator(processor)([rec])
    suffix = batch["token_type_ids"][0] == 1
    assert torch.equal(suffix, batch["labels"][0] != IGNORE_INDEX), "labels are not exactly the suffix"
    first = int(suffix.nonzero()[0])
    changed = {k: v.clone() for k, v in inputs(batch).items()}
    changed["input_ids"][0, -2] = (changed["input_ids"][0, -2] + 1) % model.config.text_config.vocab_size
    with torch.no_grad():
        a, b = model(**inputs(batch)).logits[0, first], model(**changed).logits[0, first]
    torch.testing.assert_close(a, b, msg="the first answer position sees a later answer token: suffix not causal")
    full = {**changed, "token_type_ids": torch.zeros_like(changed["token_type_ids"])}
    with torch.no_grad():
        leaked = (
            model(**full).logits[0, first]
            - model(**{**inputs(batch), "token_type_ids": full["token_type_ids"]}).logits[0, first]
        )
    assert leaked.abs().max() > 1e-3, "set-up: with token_type_ids all 0 the answer should see its future"
    gen = EvalCollator(processor)([rec])
    assert "labels" not in gen and not gen["token_type_ids"].any(), f"eval batch: {sorted(gen)}"
    for bad, reason in [
        (record("m", ("human", "Q?"), ("gpt", "A"), ("human", "Q2?"), ("gpt", "B")), "split multi-turn"),
        (record("t", ("human", "Q?"), ("gpt", "A"), images=0), "needs at least one image"),
    ]:
        with pytest.raises(BadSampleError, match=reason):
            TrainCollator(processor)([bad])


def test_a_generation_prompt_that_training_does_not_render_is_warned_about_with_both_strings(caplog):
    _, processor = model_of("llava_onevision")  # its published template: "assistant \n" vs "assistant\n"
    rec = record("a", ("human", "What color is the shape?"), ("gpt", "red"))
    with caplog.at_level(logging.WARNING, logger="llava_loop.collators"):
        TrainCollator(processor)([rec, rec])
    warnings = [r.getMessage() for r in caplog.records if "generation prompt" in r.getMessage()]
    assert len(warnings) == 1, f"expected one warning, got {warnings}"
    assert "<|im_start|>assistant\\n'; training" in warnings[0] and "assistant \\nred'" in warnings[0], warnings[0]
    caplog.clear()
    processor.chat_template, original = chat_template("llava_onevision_variant"), processor.chat_template
    try:
        with caplog.at_level(logging.WARNING, logger="llava_loop.collators"):
            TrainCollator(processor)([rec])
    finally:
        processor.chat_template = original
    assert not [r for r in caplog.records if "generation prompt" in r.getMessage()], "the agreeing template warned"


def test_qwen_min_and_max_pixels_bound_the_image_tokens(tmp_path):
    model, processor = tiny_vlm("qwen2_vl")
    big = record("a", ("human", "What color is the shape?"), ("gpt", "red"))
    big["image"] = big["image"].resize((64, 64))
    pad = processor.image_token_id

    def image_tokens() -> int:
        return int((TrainCollator(processor)([big])["input_ids"] == pad).sum())

    assert image_tokens() == 16, "set-up: a 64 px image is 16 tokens at max_pixels=64*64"
    set_image_pixels(processor, max_pixels=32 * 32)
    assert image_tokens() == 4, "max_pixels=32*32 did not bound the image to 4 tokens"
    with pytest.raises(ValueError, match="min_pixels <= max_pixels"):
        set_image_pixels(processor, min_pixels=64 * 64)
    with pytest.raises(ValueError, match="fixed size"):
        set_image_pixels(model_of("llava")[1], max_pixels=32 * 32)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    _, loaded = load_model(str(tmp_path), max_pixels=16 * 16 * 2)
    assert loaded.image_processor.size["longest_edge"] == 512, "load_model(max_pixels=...) was not applied"


@pytest.mark.parametrize("family", FAMILIES)
def test_fsdp_units_are_every_decoder_layer_and_every_vision_encoder_layer(family):
    from llava_loop.modeling import _module_prefix, decoder_layers, sharded_layer_classes

    model, _ = tiny_vlm(family)
    classes = set(sharded_layer_classes(model))
    units = [name for name, m in model.named_modules() if type(m).__name__ in classes]
    vision, language = _module_prefix(model, VISION_NAMES), _module_prefix(model, LANGUAGE_MODEL_NAMES)
    assert all(type(layer).__name__ in classes for layer in decoder_layers(model)), (
        f"{family}: a decoder layer is not an FSDP unit ({classes})"
    )
    in_vision = [n for n in units if n.startswith(vision + ".")]
    in_language = [n for n in units if n.startswith(language + ".")]
    assert in_vision and in_language, f"{family}: units {classes} miss the vision tower or the language model"
    assert set(units) == set(in_vision) | set(in_language), (
        f"{family}: units outside the vision tower and language model: {sorted(set(units) - set(in_vision) - set(in_language))}"
    )
