"""A tiny, fully offline LLaVA kit for tests, the demo and notebooks.

Everything here is built from configs on the spot: a byte-level BPE tokenizer trained on a fixed
corpus, a PIL CLIP image processor, the llava-hf chat template and a randomly initialised
`LlavaForConditionalGeneration` (CLIP vision tower + Llama language model). Nothing touches the
Hub, so it works with ``HF_HUB_OFFLINE=1``.

Example:
    >>> from llava_loop.testing import tiny_llava, synthetic_vqa
    >>> model, processor = tiny_llava(seed=0)
    >>> records = synthetic_vqa(8, seed=0)
"""

from __future__ import annotations

import random
from functools import lru_cache

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


@lru_cache(maxsize=4)
def _tokenizer_json(vocab_size: int) -> str:
    """Train the byte-level BPE once per process; training is deterministic for a fixed corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Frequent enough that the demo's answer words and the template words become single tokens.
    answers = " ".join(["USER: ASSISTANT:", *COLORS, *SHAPES, *POSITIONS])
    tok.train_from_iterator(_CORPUS * 4 + [answers] * 50, trainer=trainer)
    bos = tok.token_to_id("<s>")
    # Like Llama: BOS in front of every sequence, no EOS at the end.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return tok.to_str()


def tiny_tokenizer(vocab_size: int = 400):
    """A `PreTrainedTokenizerFast` with Llama-like specials: BOS added, ``</s>`` EOS, ``<pad>``."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size)),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="right",
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


def tiny_llava(
    seed: int = 0,
    *,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 64,
    num_layers: int = 2,
    generation_markers: bool = True,
):
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
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.eval()
    return model, processor


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


def synthetic_vqa(n: int, seed: int = 0, *, image_size: int = 32, kinds=tuple(QUESTIONS)) -> list[dict]:
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


def llava15_processor(tokenizer_dir, generation_markers: bool = True):
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
