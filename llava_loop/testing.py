"""A tiny, fully offline kit of VLMs for tests, the demo and notebooks.

Everything here is built from configs on the spot: a byte-level BPE tokenizer trained on a fixed
corpus, a PIL CLIP image processor, the llava-hf chat template and a randomly initialised
`LlavaForConditionalGeneration` (CLIP vision tower + Llama language model): `tiny_llava`; and the
same for every family of `FAMILIES` (LLaVA-NeXT, Qwen2-VL, Idefics3, Gemma 3, PaliGemma, Mllama, ...),
each with its own classes and published chat template: `tiny_vlm`. Data whose answers need the image:
`synthetic_vqa` (records) and `synthetic_okvqa` (a `datasets.Dataset` with OK-VQA's columns). A tiny
BERT for BERTScore and NLI: `tiny_bert`. Nothing touches the Hub, so it works with ``HF_HUB_OFFLINE=1``.

Example:
    >>> from llava_loop.testing import tiny_llava, synthetic_vqa
    >>> model, processor = tiny_llava(seed=0)
    >>> records = synthetic_vqa(8, seed=0)
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import torch
from PIL import Image, ImageDraw

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]

# The llava-hf (llava-1.5) chat template. Real checkpoints exist with and without the
# {% generation %} markers; neither emits EOS after an answer.
LLAVA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' ' }}{% endgeneration %}{% endfor %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
LLAVA_TEMPLATE_NO_MARKERS = LLAVA_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 20),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "right")

_CORPUS = [
    "USER: ASSISTANT: SYSTEM: A chat between a curious user and an artificial intelligence assistant.",
    "What color is the shape? What shape is it? How many shapes are there? Where is the shape?",
    "Answer with one word. Is it on the left or on the right? Describe the image in a sentence.",
    "The image shows a red green blue yellow circle square triangle on the left right side.",
    "one two three four five 0 1 2 3 4 5 6 7 8 9 yes no the a an of in is are there",
    "Hello world, this is a short caption. It has punctuation: commas, periods! questions?",
]


# Words of the families' chat templates, so that their tiny tokenizers keep the rendered prompts short.
_TEMPLATE_CORPUS = [
    "system user assistant model User: Assistant: You are a helpful assistant. [INST] [/INST]",
    "user\n assistant\n model\n User:Assistant: Answer briefly.",
]


@lru_cache(maxsize=16)
def _tokenizer_json(vocab_size: int, specials: tuple[str, ...], bos: str | None, template_words: bool) -> str:
    """Train the byte-level BPE once per process; training is deterministic for a fixed corpus.

    ``specials`` get the first ids (the first is the unknown token); ``bos`` (one of them, or None)
    is put in front of every sequence, as Llama and Gemma tokenizers do. A text pair gets token type
    ids 0 and 1 (PaliGemma's prefix and suffix). ``template_words`` adds the families' template words
    to the corpus.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=specials[0]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Frequent enough that the demo's answer words and the template words become single tokens.
    answers = " ".join(["USER: ASSISTANT:", *COLORS, *SHAPES, *POSITIONS])
    corpus = _CORPUS * 4 + [answers] * 50
    if template_words:
        corpus += _TEMPLATE_CORPUS * 20
    tok.train_from_iterator(corpus, trainer=trainer)
    if bos is None:
        tok.post_processor = processors.TemplateProcessing(single="$A", pair="$A:0 $B:1")
    else:
        # Like Llama: BOS in front of every sequence, no EOS at the end.
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A:0 $B:1", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    return tok.to_str()


def tiny_tokenizer(vocab_size: int = 400):
    """A `PreTrainedTokenizerFast` with Llama-like specials: BOS added, ``</s>`` EOS, ``<pad>``."""
    return _tokenizer(
        SPECIAL_TOKENS,
        vocab_size=vocab_size,
        bos="<s>",
        eos="</s>",
        pad="<pad>",
        extra={"image_token": IMAGE_TOKEN},
        template_words=False,
    )


def tiny_processor(*, image_size: int = 32, patch_size: int = 8, generation_markers: bool = True):
    """A `LlavaProcessor` mirroring llava-1.5's, at toy size (``(image_size/patch_size)**2`` image tokens).

    Args:
        image_size: Square size the images are resized to.
        patch_size: Vision patch size.
        generation_markers: Use the template variant with ``{% generation %}`` markers.
    """
    from transformers import LlavaProcessor
    from transformers.models.clip import CLIPImageProcessorPil

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tiny_tokenizer(),
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE if generation_markers else LLAVA_TEMPLATE_NO_MARKERS,
    )


def _ready(model, tokenizer):
    """``model`` with the tokenizer's pad, EOS and BOS ids in its generation config, in eval mode."""
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model.eval()


def tiny_llava(
    seed: int = 0,
    *,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 64,
    num_layers: int = 2,
    generation_markers: bool = True,
) -> tuple[Any, Any]:
    """Build a random tiny `LlavaForConditionalGeneration` and its processor, offline.

    Args:
        seed: Seed for the weight initialisation (same seed, same weights).
        image_size: Image side in pixels.
        patch_size: Vision patch size.
        hidden_size: Hidden size of the language model (the vision tower uses half).
        num_layers: Layers in each of the vision tower and language model.
        generation_markers: Chat template with or without ``{% generation %}`` markers.

    Returns:
        ``(model, processor)``; the model is in fp32 on the CPU, in train mode off.

    Example:
        >>> model, processor = tiny_llava()
        >>> model.config.text_config.hidden_size
        64
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    processor = tiny_processor(image_size=image_size, patch_size=patch_size, generation_markers=generation_markers)
    tok = processor.tokenizer
    vision = CLIPVisionConfig(
        hidden_size=hidden_size // 2,
        intermediate_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=hidden_size // 2,
    )
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        # Larger than Llama's 0.02 so that a LoRA-tuned toy model can reach confident logits
        # through its frozen random lm_head.
        initializer_range=0.1,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=processor.image_token_id,
        image_seq_length=(image_size // patch_size) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    torch.manual_seed(seed)
    return _ready(LlavaForConditionalGeneration(config), tok), processor


def draw_scene(color: str, shape: str, position: str, count: int = 1, size: int = 32) -> Image.Image:
    """Draw ``count`` shapes of one colour on a grey canvas, on the ``position`` half."""
    img = Image.new("RGB", (size, size), (128, 128, 128))
    draw = ImageDraw.Draw(img)
    half = size // 2
    x0 = 0 if position == "left" else half
    cell = size // max(count, 2)
    for k in range(count):
        top = k * cell + 1
        box = (x0 + 2, top, x0 + half - 2, top + cell - 2)
        if shape == "circle":
            draw.ellipse(box, fill=COLORS[color])
        elif shape == "square":
            draw.rectangle(box, fill=COLORS[color])
        else:
            draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=COLORS[color])
    return img


QUESTIONS = {
    "color": "What color is the shape?",
    "shape": "What shape is it?",
    "position": "Is it on the left or on the right?",
}


def synthetic_vqa(
    n: int, seed: int = 0, *, image_size: int = 32, kinds: Sequence[str] = tuple(QUESTIONS)
) -> list[dict]:
    """A synthetic visual QA set whose answers need the image (a text-only model is at chance).

    Each record asks about the colour, shape or side of a shape drawn with Pillow and has a
    one-word answer; ``answers`` repeats it (extra references for eval).

    Args:
        n: Number of records.
        seed: Seed; the same seed gives the same records.
        image_size: Image side in pixels.
        kinds: Which question kinds to draw from (``"color"``, ``"shape"``, ``"position"``).
    """
    rng = random.Random(seed)
    records = []
    for i in range(n):
        color, shape, position = rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(POSITIONS)
        kind = kinds[i % len(kinds)]
        answer = {"color": color, "shape": shape, "position": position}[kind]
        records.append(
            {
                "id": f"synthetic-{seed}-{i}",
                "image": draw_scene(color, shape, position, size=image_size),
                "conversations": [
                    {"from": "human", "value": f"<image>\n{QUESTIONS[kind]}"},
                    {"from": "gpt", "value": answer},
                ],
                "answers": [answer],
            }
        )
    return records


def synthetic_okvqa(n: int, seed: int = 0, *, image_size: int = 32) -> Any:
    """A `datasets.Dataset` shaped like OK-VQA on the Hub, whose answers need the image (`synthetic_vqa`'s task).

    Columns as in OK-VQA: ``question_id`` (int), ``question``, ``answers`` (ten annotator answers) and
    ``image`` (a `datasets.Image`: PNG bytes in the Arrow table). Each question asks for the colour,
    shape or side of a shape drawn with `draw_scene`. Its ten answers are votes: the true answer
    6 to 10 times, written as annotators write it (``"red"``, ``"Red"``, ``"red."``, ``"the red"``,
    all one answer after VQA's answer normalisation), and the others wrong answers of the same kind,
    so the true answer is always the most frequent one and a wrong answer some annotators gave
    earns partial credit in ``vqa_accuracy``. Needs ``datasets`` (``llava_loop[datasets]``).

    Args:
        n: Number of questions.
        seed: Seed; the same seed gives the same rows. Question ids are ``seed * 1_000_000 + row``.
        image_size: Image side in pixels.

    Example:
        >>> ds = synthetic_okvqa(4, seed=0)
        >>> ds.column_names, len(ds[0]["answers"])
        (['question_id', 'question', 'answers', 'image'], 10)
    """
    import datasets

    rng = random.Random(seed)
    choices = {"color": list(COLORS), "shape": list(SHAPES), "position": list(POSITIONS)}
    kinds = list(QUESTIONS)
    rows: dict[str, list] = {"question_id": [], "question": [], "answers": [], "image": []}
    for i in range(n):
        scene = {kind: rng.choice(values) for kind, values in choices.items()}
        kind = kinds[i % len(kinds)]
        truth = scene[kind]
        votes = rng.randint(6, 10)
        written = [rng.choice((truth, truth.capitalize(), f"{truth}.", f"the {truth}")) for _ in range(votes)]
        wrong = [rng.choice([v for v in choices[kind] if v != truth]) for _ in range(10 - votes)]
        answers = written + wrong
        rng.shuffle(answers)
        rows["question_id"].append(seed * 1_000_000 + i)
        rows["question"].append(QUESTIONS[kind])
        rows["answers"].append(answers)
        rows["image"].append(draw_scene(scene["color"], scene["shape"], scene["position"], size=image_size))
    features = datasets.Features(
        {
            "question_id": datasets.Value("int64"),
            "question": datasets.Value("string"),
            "answers": [datasets.Value("string")],
            "image": datasets.Image(),
        }
    )
    return datasets.Dataset.from_dict(rows, features=features)


# The tiny BERT's vocabulary besides its special tokens: the words of the metric tests' sentences and of
# the synthetic tasks' answers; anything else is [UNK].
BERT_WORDS = (
    *("the", "a", "an", "cat", "cats", "dog", "dogs", "sat", "sits", "on", "mat", "rug", "red", "blue", "small"),
    *("big", "is", "was", "there", "here", "and", "running", "ran", "hello", "world", "park", "in"),
    *("green", "yellow", "circle", "square", "triangle", "left", "right", ".", ","),
)
_BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def tiny_bert(
    path: str | os.PathLike,
    *,
    words: tuple[str, ...] = BERT_WORDS,
    seed: int = 0,
    id2label: dict[int, str] | None = None,
    problem_type: str | None = None,
) -> str:
    """Save a random 2-layer, 32-wide BERT and its WordPiece tokenizer (lower-casing, ``[CLS] ... [SEP]``) to
    ``path``, offline: a stand-in for ``roberta-large`` in BERTScore, or for an NLI model.

    Args:
        path: Folder to write (created if missing).
        words: The vocabulary besides ``[PAD] [UNK] [CLS] [SEP] [MASK]``; other words become ``[UNK]``.
        seed: Seed for the weight initialisation (same seed and vocabulary, same weights).
        id2label: Save a `BertForSequenceClassification` with these labels (an NLI model); None: a `BertModel`.
        problem_type: The classifier's ``config.problem_type`` (e.g. ``"multi_label_classification"``).

    Returns:
        ``path`` as a string, for ``BERTScore(model_type=..., num_layers=2)`` or ``NLI(model=...)``.

    Example:
        >>> from llava_loop.metrics import BERTScore
        >>> path = tiny_bert(tempfile.mkdtemp())  # doctest: +SKIP
        >>> scores = BERTScore(model_type=path, num_layers=2, device="cpu")(["red"], [["red", "blue"]])  # doctest: +SKIP
        >>> round(scores["bertscore_f1"], 4)  # the prediction is one of the references  # doctest: +SKIP
        1.0
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizerFast

    vocab = {token: i for i, token in enumerate(dict.fromkeys([*_BERT_SPECIALS, *words]))}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tokenizer = BertTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=64,
    )
    labels = {} if id2label is None else {"id2label": dict(id2label), "label2id": {v: k for k, v in id2label.items()}}
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        problem_type=problem_type,
        **labels,
    )
    torch.manual_seed(seed)
    model = BertModel(config) if id2label is None else BertForSequenceClassification(config)
    model.eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def llava15_processor(tokenizer_dir: str | os.PathLike, generation_markers: bool = True) -> Any:
    """The real llava-1.5 `LlavaProcessor`, built offline from a Llama-2 SentencePiece tokenizer.

    Mirrors ``llava-hf/llava-1.5-7b-hf``: ``<image>`` is id 32000 and ``<pad>`` id 32001, images go
    through a 336 px `CLIPImageProcessorPil` (patch 14, one CLS token dropped: 576 image tokens),
    and the chat template is `LLAVA_TEMPLATE`. Use it to test tokenisation-sensitive code (label
    masking) on real SentencePiece behaviour, and for benchmarks.

    Args:
        tokenizer_dir: Folder with the Llama-2 ``tokenizer.model`` and ``tokenizer_config.json``
            (e.g. ``shared/data/llama2-tokenizer``).
        generation_markers: Use the template variant with ``{% generation %}`` markers.

    Example:
        >>> processor = llava15_processor("../shared/data/llama2-tokenizer")  # doctest: +SKIP
        >>> processor.image_token_id, processor.tokenizer.pad_token_id  # doctest: +SKIP
        (32000, 32001)
    """
    from transformers import LlamaTokenizer, LlavaProcessor
    from transformers.models.clip import CLIPImageProcessorPil

    tokenizer = LlamaTokenizer.from_pretrained(str(tokenizer_dir))
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE if generation_markers else LLAVA_TEMPLATE_NO_MARKERS,
    )


# --- One tiny model per VLM family --------------------------------------------------------------
# Each is the family's real classes (processor, image processor, model) at toy size, with the
# family's published chat template (llava_loop/testing_templates/, sources in `TEMPLATE_SOURCES`)
# and a tokenizer with the family's special tokens. Images are 32 px; the PIL image processors are
# used and no video processor (transformers 5 builds those with torchvision only).

FAMILIES = (
    "llava",
    "llava_next",
    "llava_onevision",
    "qwen2_vl",
    "qwen2_5_vl",
    "idefics3",
    "smolvlm",
    "gemma3",
    "paligemma",
    "mllama",
)


# Where each template in llava_loop/testing_templates/ was read, verbatim (the Hub model it ships with).
# TRL keeps its copies byte-exact (it compares them with the models' tokenizer.chat_template).
TEMPLATE_SOURCES = {
    "llava_next": "llava-hf/llava-v1.6-mistral-7b-hf; huggingface/trl trl/chat_templates/llava_next.jinja @ f2cd577",
    "llava_onevision": "llava-hf/llava-onevision-qwen2-0.5b-ov-hf; huggingface/transformers "
    "tests/models/llava_onevision/test_processor_llava_onevision.py @ 20b13d8 (renders what the Hub processor does)",
    "llava_onevision_variant": "the llava-onevision conversion script's template; huggingface/transformers "
    "src/transformers/models/llava_onevision/convert_llava_onevision_weights_to_hf.py @ 01080c6",
    "qwen2_vl": "Qwen/Qwen2-VL-2B-Instruct; huggingface/transformers tests/models/qwen2_vl/test_processor_qwen2_vl.py "
    "@ 00368c1 (byte-identical to Qwen2.5-VL's)",
    "qwen2_5_vl": "Qwen/Qwen2.5-VL-3B-Instruct; huggingface/trl trl/chat_templates/qwen2_5_vl.jinja @ f2cd577",
    "idefics3": "HuggingFaceM4/Idefics3-8B-Llama3; huggingface/trl trl/chat_templates/idefics3.jinja @ f2cd577",
    "smolvlm": "HuggingFaceTB/SmolVLM-Instruct (and -256M-Instruct); huggingface/huggingface.js "
    "packages/jinja/test/e2e.test.js @ fe42e68",
    "gemma3": "google/gemma-3-4b-it; huggingface/trl trl/chat_templates/gemma3.jinja @ f2cd577 (= transformers' "
    "convert_gemma3_weights.py _CHAT_TEMPLATE)",
    "mllama": "meta-llama/Llama-3.2-11B-Vision-Instruct (with tool calling); huggingface/huggingface.js "
    "packages/jinja/test/e2e.test.js @ fe42e68",
}


def chat_template(family: str) -> str:
    """The published chat template of ``family`` (see `TEMPLATE_SOURCES`), as shipped in llava_loop."""
    from importlib.resources import files

    return files("llava_loop").joinpath("testing_templates", f"{family}.jinja").read_text(encoding="utf-8")


def _tokenizer(specials, *, vocab_size=None, bos=None, eos, pad, extra=None, added=(), template_words=True):
    """A tiny BPE tokenizer whose first ids are ``specials`` (the first is the unknown token), trained with
    the families' template words unless ``template_words`` is False (`tiny_llava`'s); ``added`` special
    tokens come after the vocabulary."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    vocab_size = vocab_size or 400 + len(specials)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size, tuple(specials), bos, template_words)),
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=specials[0],
        extra_special_tokens=extra or {},
        padding_side="right",
    )
    if added:
        tok.add_tokens(list(added), special_tokens=True)
    return tok


def _text_config(tok, **kwargs) -> dict:
    """A two-layer decoder's config for ``tok`` (64 wide, like `tiny_llava`)."""
    return {
        "vocab_size": len(tok),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        # Larger than the usual 0.02 so that a LoRA-tuned toy model can reach confident logits.
        "initializer_range": 0.1,
        **kwargs,
    }


_SIGLIP = {
    "model_type": "siglip_vision_model",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 32,
    "patch_size": 8,
}
_CLIP = {**_SIGLIP, "model_type": "clip_vision_model", "projection_dim": 32}
_QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_LLAMA3_SPECIALS = [
    "<|reserved_special_token_0|>",
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|python_tag|>",
    "<|finetune_right_pad_id|>",
]
_GEMMA_SPECIALS = ["<unk>", "<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]


def _llava_next():
    from transformers import LlavaNextConfig, LlavaNextProcessor
    from transformers.models.llava_next import LlavaNextImageProcessorPil

    tok = _tokenizer(SPECIAL_TOKENS, bos="<s>", eos="</s>", pad="<pad>", extra={"image_token": IMAGE_TOKEN})
    pinpoints = [[32, 64], [64, 32], [64, 64]]
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=chat_template("llava_next"),
    )
    config = LlavaNextConfig(
        vision_config=_CLIP,
        text_config={"model_type": "mistral", **_text_config(tok)},
        image_token_index=processor.image_token_id,
        image_grid_pinpoints=pinpoints,
        image_seq_length=16,
        vision_feature_layer=-1,
    )
    return config, processor


def _llava_onevision():
    from transformers import LlavaOnevisionConfig, LlavaOnevisionProcessor
    from transformers.models.llava_onevision import LlavaOnevisionImageProcessorPil

    from .modeling import image_only_processor

    tok = _tokenizer(
        [*_QWEN_SPECIALS, IMAGE_TOKEN, "<video>"],
        eos="<|im_end|>",
        pad="<|endoftext|>",
        extra={"image_token": IMAGE_TOKEN, "video_token": "<video>"},
    )
    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints)
    processor = image_only_processor(LlavaOnevisionProcessor)(
        image_processor=image_processor,
        tokenizer=tok,
        num_image_tokens=16,
        vision_feature_select_strategy="full",
        chat_template=chat_template("llava_onevision"),
    )
    config = LlavaOnevisionConfig(
        vision_config=_SIGLIP,
        text_config={"model_type": "qwen2", **_text_config(tok)},
        image_token_index=processor.image_token_id,
        video_token_index=processor.video_token_id,
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1,
    )
    return config, processor


def _qwen2_vl(family: str = "qwen2_vl"):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLProcessor, Qwen2VLConfig, Qwen2VLProcessor
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

    from .modeling import image_only_processor

    vision_tokens = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok = _tokenizer([*_QWEN_SPECIALS, *vision_tokens], eos="<|im_end|>", pad="<|endoftext|>")
    # 8 px patches merged 2 x 2: a 32 px image is 16 patches, 4 image tokens.
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=8, merge_size=2, temporal_patch_size=2, min_pixels=16 * 16, max_pixels=64 * 64
    )
    processor_class, config_class = (
        (Qwen2VLProcessor, Qwen2VLConfig) if family == "qwen2_vl" else (Qwen2_5_VLProcessor, Qwen2_5_VLConfig)
    )
    processor = image_only_processor(processor_class)(
        image_processor=image_processor,
        tokenizer=tok,
        chat_template=chat_template(family),
    )
    vision = {"depth": 2, "num_heads": 4, "patch_size": 8, "spatial_merge_size": 2, "temporal_patch_size": 2}
    if family == "qwen2_vl":
        vision.update(embed_dim=32, hidden_size=64, mlp_ratio=2)
    else:
        vision.update(
            hidden_size=32, intermediate_size=64, out_hidden_size=64, window_size=32, fullatt_block_indexes=[1]
        )
    ids = {t: tok.convert_tokens_to_ids(t) for t in vision_tokens}
    rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
    config = config_class(
        text_config=_text_config(tok, rope_parameters=rope),
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    return config, processor


def _idefics3(family: str = "idefics3"):
    from transformers import Idefics3Config, Idefics3Processor, SmolVLMConfig, SmolVLMProcessor
    from transformers.models.idefics3 import Idefics3ImageProcessorPil
    from transformers.models.smolvlm import SmolVLMImageProcessorPil

    from .modeling import image_only_processor

    grid = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
    image_tokens = ["<fake_token_around_image>", IMAGE_TOKEN, "<end_of_utterance>", "<global-img>"]
    # The vision encoder sees 32 px tiles (4 x 4 patches, pixel-shuffled by 2: 4 tokens per tile); an
    # image is resized to at most 64 px and split into up to 2 x 2 tiles plus a global view.
    sizes = {"size": {"longest_edge": 64}, "max_image_size": {"longest_edge": 32}}
    if family == "idefics3":  # Llama 3 tokenizer
        tok = _tokenizer(
            _LLAMA3_SPECIALS,
            bos="<|begin_of_text|>",
            eos="<end_of_utterance>",
            pad="<|finetune_right_pad_id|>",
            added=[*image_tokens, *grid],
        )
        processor = Idefics3Processor(
            image_processor=Idefics3ImageProcessorPil(**sizes),
            tokenizer=tok,
            image_seq_len=4,
            chat_template=chat_template("idefics3"),
        )
        config_class = Idefics3Config
    else:  # SmolLM2 tokenizer
        tok = _tokenizer(
            [*_QWEN_SPECIALS, *image_tokens, *grid],
            eos="<end_of_utterance>",
            pad="<|im_end|>",
            extra={
                "fake_image_token": "<fake_token_around_image>",
                "image_token": IMAGE_TOKEN,
                "end_of_utterance_token": "<end_of_utterance>",
                "global_image_token": "<global-img>",
            },
        )
        processor = image_only_processor(SmolVLMProcessor)(
            image_processor=SmolVLMImageProcessorPil(**sizes),
            tokenizer=tok,
            video_processor=None,
            image_seq_len=4,
            chat_template=chat_template("smolvlm"),
        )
        config_class = SmolVLMConfig
    config = config_class(
        vision_config={k: v for k, v in _SIGLIP.items() if k != "model_type"},
        text_config={"model_type": "llama", **_text_config(tok)},
        image_token_id=processor.image_token_id,
        scale_factor=2,
    )
    return config, processor


def _gemma3():
    from transformers import Gemma3Config, Gemma3Processor
    from transformers.models.gemma3 import Gemma3ImageProcessorPil

    image_tokens = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tok = _tokenizer(
        [*_GEMMA_SPECIALS, *image_tokens.values()], bos="<bos>", eos="<eos>", pad="<pad>", extra=image_tokens
    )
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessorPil(size={"height": 32, "width": 32}),
        tokenizer=tok,
        image_seq_length=4,
        chat_template=chat_template("gemma3"),
    )
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in image_tokens.items()}
    config = Gemma3Config(
        text_config={
            "model_type": "gemma3_text",
            **_text_config(tok, head_dim=16, query_pre_attn_scalar=16, sliding_window=64),
        },
        vision_config=_SIGLIP,
        mm_tokens_per_image=4,
        boi_token_index=ids["boi_token"],
        eoi_token_index=ids["eoi_token"],
        image_token_index=ids["image_token"],
    )
    return config, processor


def _paligemma():
    from transformers import PaliGemmaConfig, PaliGemmaProcessor
    from transformers.models.siglip import SiglipImageProcessorPil

    tok = _tokenizer(
        ["<unk>", "<pad>", "<eos>", "<bos>", IMAGE_TOKEN],
        bos="<bos>",
        eos="<eos>",
        pad="<pad>",
        extra={"image_token": IMAGE_TOKEN},
    )
    image_processor = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    image_processor.image_seq_length = 16  # (32 / 8) ** 2 patches, one token each
    # No chat template: PaliGemma is trained on prefix -> suffix (`processor(text=prefix, suffix=...)`).
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tok)
    config = PaliGemmaConfig(
        vision_config={**_SIGLIP, "projection_dim": 64},
        text_config={"model_type": "gemma", **_text_config(tok, head_dim=16)},
        image_token_index=processor.image_token_id,
        projection_dim=64,
        hidden_size=64,
        vocab_size=len(tok),
    )
    return config, processor


def _mllama():
    from transformers import MllamaConfig, MllamaProcessor
    from transformers.models.mllama import MllamaImageProcessorPil

    tok = _tokenizer(
        [*_LLAMA3_SPECIALS, "<|image|>"], bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<|finetune_right_pad_id|>"
    )
    processor = MllamaProcessor(
        image_processor=MllamaImageProcessorPil(size={"height": 32, "width": 32}, max_image_tiles=2),
        tokenizer=tok,
        chat_template=chat_template("mllama"),
    )
    config = MllamaConfig(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_global_layers": 1,
            "attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
            "max_num_tiles": 2,
            "intermediate_layers_indices": [0],
            "vision_output_dim": 64,
            "supported_aspect_ratios": [[1, 1], [1, 2], [2, 1]],
        },
        text_config=_text_config(tok, num_hidden_layers=3, cross_attention_layers=[1]),
        image_token_index=processor.image_token_id,
    )
    return config, processor


_BUILDERS = {
    "llava_next": _llava_next,
    "llava_onevision": _llava_onevision,
    "qwen2_vl": _qwen2_vl,
    "qwen2_5_vl": lambda: _qwen2_vl("qwen2_5_vl"),
    "idefics3": _idefics3,
    "smolvlm": lambda: _idefics3("smolvlm"),
    "gemma3": _gemma3,
    "paligemma": _paligemma,
    "mllama": _mllama,
}


def tiny_vlm(family: str = "llava", seed: int = 0) -> tuple[Any, Any]:
    """A random tiny model of one VLM family and its processor, offline (see `FAMILIES`).

    Args:
        family: One of `FAMILIES`; ``"llava"`` is `tiny_llava`.
        seed: Seed for the weight initialisation (same seed, same weights).

    Returns:
        ``(model, processor)``, the model in fp32 on the CPU, in eval mode.

    Example:
        >>> model, processor = tiny_vlm("qwen2_vl")
        >>> type(model).__name__
        'Qwen2VLForConditionalGeneration'
    """
    if family == "llava":
        return tiny_llava(seed)
    if family not in _BUILDERS:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    from transformers import AutoModelForImageTextToText

    config, processor = _BUILDERS[family]()
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                # Mllama's gates start closed (0), which would hide the images; a trained model's are open.
                param.fill_(1.0)
    return _ready(model, processor.tokenizer), processor
