"""Model set-up: loading, LoRA/QLoRA, freezing, gradient checkpointing, merged-adapter generation."""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import inspect
import json
import logging
import os
import re
import warnings
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

PROJECTOR_NAMES = ("multi_modal_projector", "mm_projector", "visual.merger", "connector")
VISION_NAMES = ("vision_tower", "vision_model", "visual")
# The language model's submodule: `language_model` in most families, `text_model` in Idefics3 and SmolVLM.
LANGUAGE_MODEL_NAMES = ("language_model", "text_model")
# transformers 5 deprecation warning that peft triggers on every LoRA model it wraps (see peft_wrap_warning_ignored).
_GC_DEPRECATION = r"`is_gradient_checkpointing` is deprecated"


_DTYPES = ("auto", "bfloat16", "float16", "float32")


class _KernelHubHint(logging.Filter):
    """Drops bitsandbytes' import-time hint on the CPU that its faster 4-bit kernels come from the Hub's
    `kernels` package (which needs network access); every other record of its logger passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


# Importing peft imports bitsandbytes when it is installed (the quantization extra). On the CPU that import
# prints the hint above and, through torch.utils.mkldnn, torch's own deprecation of torch.jit.script_method:
# noise in every notebook and script that never quantizes. Only those two messages are silenced.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_KernelHubHint())
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script_method` is deprecated", category=DeprecationWarning)


def check_model_source(name_or_path: str, what: str = "model") -> None:
    """Raise now, loading nothing, if `name_or_path` is neither a saved model folder nor fetchable.

    A local folder must hold a ``config.json``. A Hub name is accepted online (loading reports
    Hub errors); offline (``HF_HUB_OFFLINE=1``) it must be in the Hugging Face cache.

    Raises:
        FileNotFoundError: naming the folder or Hub name, why it cannot be used, and what to do.

    Example:
        >>> check_model_source("/no/such/folder")
        Traceback (most recent call last):
        ...
        FileNotFoundError: model '/no/such/folder': no such folder, and not a Hub model name ...
    """
    from huggingface_hub import is_offline_mode, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    path = os.path.expanduser(name_or_path)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(
                f"{what} {name_or_path!r} is a folder without config.json, so not a saved Hugging Face model; "
                "pass the folder that holds config.json (written by save_pretrained)"
            )
        return
    if os.path.exists(path):
        raise FileNotFoundError(f"{what} {name_or_path!r} is a file; pass a model folder or a Hub name")
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        raise FileNotFoundError(
            f"{what} {name_or_path!r}: no such folder, and not a Hub model name (like 'llava-hf/llava-1.5-7b-hf'); "
            "check the path"
        ) from None
    if is_offline_mode() and not isinstance(try_to_load_from_cache(name_or_path, "config.json"), str):
        raise FileNotFoundError(
            f"{what} {name_or_path!r}: no such folder, and no Hub access: HF_HUB_OFFLINE is set and it is not "
            f"in the Hugging Face cache. Download it where the Hub is reachable (`hf download {name_or_path}`) "
            "or pass a local folder"
        )


def check_model_args(
    name_or_path: str,
    *,
    dtype: str | torch.dtype = "auto",
    quantization: str | None = None,
) -> None:
    """Raise now, loading nothing, on arguments `load_model` would fail on after a long load.

    Checks the model source (`check_model_source`), the dtype name, and that a quantized load has a
    working bitsandbytes (`check_bitsandbytes`).

    Raises:
        FileNotFoundError: the model cannot be found (see `check_model_source`).
        ValueError: an unknown dtype or quantization.
        ImportError: ``quantization`` without a working bitsandbytes.
    """
    from .config import QUANTIZATIONS

    if not isinstance(dtype, torch.dtype) and dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is invalid: expected one of {', '.join(map(repr, _DTYPES))}")
    if quantization is not None:
        if quantization not in QUANTIZATIONS:
            raise ValueError(
                f"quantization={quantization!r} is invalid: expected None or one of {', '.join(map(repr, QUANTIZATIONS))}"
            )
        if dtype in ("float32", torch.float32):
            raise ValueError(
                f"quantization={quantization!r} computes in 16 bit: use dtype='bfloat16' (or 'float16' on a GPU "
                "without bfloat16), not float32"
            )
        check_bitsandbytes(f"quantization={quantization!r}")
    check_model_source(name_or_path)


def check_bitsandbytes(what: str) -> None:
    """Raise `ImportError` naming ``what`` and the fix if bitsandbytes is not installed or does not import
    (e.g. a build without kernels for this machine).

    Example:
        >>> check_bitsandbytes("quantization='4bit'")  # installed: nothing happens
    """
    fix = "pip install 'llava_loop[quantization]' (bitsandbytes >= 0.45 runs on CUDA GPUs and, slowly, on the CPU)"
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(f"{what} needs bitsandbytes, which is not installed: {fix}")
    try:
        import bitsandbytes  # noqa: F401
    except Exception as err:  # a broken build raises anything from OSError to RuntimeError
        raise ImportError(f"{what} needs bitsandbytes, which is installed but does not load ({err}): {fix}") from err


def sixteen_bit_modules(model: nn.Module) -> list[str]:
    """Full names of the modules quantization leaves in 16 bit: every module outside the language model
    that holds linear layers (vision tower, projector) and the LM head, so that only the language model's
    decoder linear layers are quantized.

    Full names, because transformers matches ``llm_int8_skip_modules`` from the start of a module's name
    (or as its whole last component): a bare ``"multi_modal_projector"`` leaves
    ``model.multi_modal_projector.linear_1`` quantized.

    Example:
        >>> from llava_loop.testing import tiny_llava
        >>> sixteen_bit_modules(tiny_llava()[0])
        ['lm_head', 'model.multi_modal_projector', 'model.vision_tower']
    """
    language = _module_prefix(model, LANGUAGE_MODEL_NAMES)
    vision = _module_prefix(model, VISION_NAMES)
    projector = _module_prefix(model, PROJECTOR_NAMES)
    keep = set()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        for prefix in (vision, projector):
            if prefix and name.startswith(prefix + "."):
                keep.add(prefix)
                break
        else:
            if not (language and name.startswith(language + ".")):
                keep.add(name)  # the LM head, and any other linear layer outside the language model
    return sorted(keep)


def quantization_config(quantization: str, model_config: Any, compute_dtype: torch.dtype = torch.bfloat16) -> Any:
    """The `transformers.BitsAndBytesConfig` of ``quantization`` ("4bit": NF4 with double quantization and
    ``compute_dtype`` compute, as QLoRA; "8bit": LLM.int8) for a model of ``model_config``, quantizing the
    language model's decoder linear layers only (`sixteen_bit_modules`, found on a weightless copy of the
    model built on the meta device).

    Example:
        >>> from llava_loop.testing import tiny_llava
        >>> quantization_config("4bit", tiny_llava()[0].config).bnb_4bit_quant_type
        'nf4'
    """
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    with torch.device("meta"):
        skeleton = AutoModelForImageTextToText.from_config(copy.deepcopy(model_config))
    keep = sixteen_bit_modules(skeleton)
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=torch.uint8,
        llm_int8_skip_modules=keep,
    )


def model_quantization(model: nn.Module) -> str | None:
    """How ``model``'s (or a peft model's base model's) weights are quantized by bitsandbytes: "4bit",
    "8bit" or None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base, "is_loaded_in_4bit", False):
        return "4bit"
    if getattr(base, "is_loaded_in_8bit", False):
        return "8bit"
    return None


def check_sixteen_bit(model: nn.Module) -> None:
    """Raise if a module quantization must leave in 16 bit (`sixteen_bit_modules`: vision tower, projector,
    LM head) holds quantized weights: training the projector would fail deep in peft with "only Tensors of
    floating point dtype can require gradients"."""
    names = [n for n in sixteen_bit_modules(model)]
    bad = [
        f"{prefix}.{name}"
        for prefix in names
        for name, param in model.get_submodule(prefix).named_parameters()
        if not param.is_floating_point()
    ]
    if bad:
        raise ValueError(
            f"quantization left {len(bad)} weights of modules that must stay 16-bit quantized (e.g. {bad[0]}): "
            "load the model with llava_loop.load_model(..., quantization=...) or pass "
            "quantization_config=llava_loop.modeling.quantization_config(...) to from_pretrained"
        )


def load_model(
    name_or_path: str,
    *,
    dtype: str | torch.dtype = "auto",
    quantization: str | None = None,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    offload_folder: str | os.PathLike | None = None,
    attn_implementation: str | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> tuple[nn.Module, Any]:
    """Load an image-text-to-text model and its processor (Hub name or local folder), any family
    `AutoModelForImageTextToText` knows (LLaVA, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL,
    Idefics3, SmolVLM, Gemma 3, PaliGemma, Mllama, ...); the processor as `load_processor` loads it.

    The arguments are checked first (`check_model_args`), so a wrong path or dtype fails before
    any weights are read.

    Args:
        name_or_path: e.g. ``"llava-hf/llava-1.5-7b-hf"`` or a local checkpoint folder.
        dtype: Weight dtype: ``"auto"`` (the checkpoint's), ``"bfloat16"``, ``"float16"``,
            ``"float32"`` or a ``torch.dtype``.
        quantization: ``"4bit"`` (QLoRA: NF4, double quantization, 16-bit compute) or ``"8bit"``
            (LLM.int8) base weights via bitsandbytes, for the language model's decoder linear layers only
            (`quantization_config`); vision tower, projector, embeddings and LM head load in ``dtype``
            (``"auto"`` = bfloat16 here). None = not quantized.
        device_map: ``"auto"`` spreads one model over the visible GPUs, then the CPU, then the disk (one
            process only; layers on the CPU or disk are offloaded: they run on the GPU, loaded for each
            forward), or an explicit ``{module name: device}`` map (docs/multi_gpu.md).
        max_memory: With ``device_map="auto"``: the most each device may hold, e.g. ``{0: "20GiB",
            "cpu": "60GiB"}``; what does not fit goes to the next device.
        offload_folder: Where layers offloaded to ``"disk"`` are kept.
        attn_implementation: e.g. ``"sdpa"`` or ``"flash_attention_2"``.
        min_pixels: Qwen2-VL / Qwen2.5-VL: lower bound on each image's pixels, which set its number
            of image tokens (pixels / 28²); None keeps the processor's (see `set_image_pixels`).
        max_pixels: Qwen2-VL / Qwen2.5-VL: upper bound on each image's pixels (so it bounds the image
            tokens, and memory); None keeps the processor's.

    Raises:
        FileNotFoundError, ValueError, ImportError: see `check_model_args`.
        OSError: the Hub or the files could not be read (the message names the model).

    Example:
        >>> model, processor = load_model("llava-hf/llava-1.5-7b-hf", dtype="bfloat16")  # doctest: +SKIP
    """
    from transformers import AutoModelForImageTextToText

    check_model_args(name_or_path, dtype=dtype, quantization=quantization)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if max_memory is not None:
        kwargs["max_memory"] = max_memory
    if offload_folder is not None:
        kwargs["offload_folder"] = str(offload_folder)
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        processor = load_processor(name_or_path)
        set_image_pixels(processor, min_pixels, max_pixels)  # before the long load: a wrong family fails now
        if quantization is not None:
            from transformers import AutoConfig

            compute = torch.float16 if dtype in ("float16", torch.float16) else torch.bfloat16
            kwargs["dtype"] = compute  # the 16-bit modules' dtype
            model_config = AutoConfig.from_pretrained(name_or_path)
            kwargs["quantization_config"] = quantization_config(quantization, model_config, compute)
        model = AutoModelForImageTextToText.from_pretrained(name_or_path, **kwargs)
    except OSError as err:
        raise OSError(f"could not load model {name_or_path!r}: {err}") from err
    if quantization is not None:
        check_sixteen_bit(model)
    return model, processor


def load_processor(name_or_path: str | os.PathLike) -> Any:
    """``AutoProcessor.from_pretrained(name_or_path)``, or, where its video processor cannot be loaded
    (transformers builds them with torchvision only; a processor saved without one has no
    video_preprocessor_config.json), the processor without it (`image_only_processor`: images and text
    are processed the same) for families that have one (Qwen2-VL, LLaVA-OneVision, SmolVLM, ...).

    Example:
        >>> processor = load_processor("Qwen/Qwen2-VL-2B-Instruct")  # doctest: +SKIP
    """
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(name_or_path)
    except (ImportError, OSError) as err:
        if "video" not in str(err).lower():
            raise
        processor_class = _processor_class(name_or_path)
        if processor_class is None or "video_processor" not in processor_class.get_attributes():
            raise
        logger.info("%s is loaded without its video processor: %s", processor_class.__name__, str(err).strip()[:200])
        return image_only_processor(processor_class).from_pretrained(name_or_path)


def _processor_class(name_or_path: str | os.PathLike) -> type | None:
    """The processor class saved with ``name_or_path`` (its processor_config.json), else its model type's;
    None if neither names one."""
    import transformers
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
    from transformers.utils import cached_file

    path = cached_file(name_or_path, "processor_config.json", _raise_exceptions_for_missing_entries=False)
    if path is not None:
        with open(path, encoding="utf-8") as f:
            name = json.load(f).get("processor_class")
    else:
        name = PROCESSOR_MAPPING_NAMES.get(transformers.AutoConfig.from_pretrained(name_or_path).model_type)
    return getattr(transformers, name, None) if name else None


def set_image_pixels(processor: Any, min_pixels: int | None = None, max_pixels: int | None = None) -> None:
    """Bound the pixels of each image of a dynamic-resolution processor (Qwen2-VL, Qwen2.5-VL) in place.

    Images are resized to keep their aspect ratio with ``min_pixels <= height x width <= max_pixels``
    (rounded to multiples of 28); each 28 x 28 block is one image token, so ``max_pixels`` bounds the
    tokens, and the memory, an image takes (Qwen's defaults: 3,136 to 1,003,520 pixels, 4 to 1,280 tokens).
    None leaves a bound as it is.

    Raises:
        ValueError: the processor has no such bounds (a fixed-resolution family), or min > max.

    Example:
        >>> from llava_loop.testing import tiny_vlm
        >>> _, processor = tiny_vlm("qwen2_vl")
        >>> set_image_pixels(processor, max_pixels=32 * 32)
        >>> processor.image_processor.size["longest_edge"]
        1024
    """
    if min_pixels is None and max_pixels is None:
        return
    image_processor = getattr(processor, "image_processor", None)
    size = dict(getattr(image_processor, "size", None) or {})
    if not hasattr(image_processor, "merge_size") or "longest_edge" not in size:
        raise ValueError(
            f"min_pixels/max_pixels bound the images of dynamic-resolution processors (Qwen2-VL, Qwen2.5-VL); "
            f"{type(processor).__name__} resizes images to a fixed size: leave them unset"
        )
    size["shortest_edge"] = min_pixels if min_pixels is not None else size["shortest_edge"]
    size["longest_edge"] = max_pixels if max_pixels is not None else size["longest_edge"]
    if not 0 < size["shortest_edge"] <= size["longest_edge"]:
        raise ValueError(f"need 0 < min_pixels <= max_pixels, got {size['shortest_edge']} and {size['longest_edge']}")
    image_processor.size = size


@functools.cache
def image_only_processor(processor_class: type) -> type:
    """``processor_class`` without its video processor: a subclass of the same name whose processors
    are built, saved, loaded and pickled (DataLoader workers) without one; one class per processor class.

    transformers 5 builds video processors (Qwen2-VL, LLaVA-OneVision, SmolVLM, ...) with torchvision
    only; without torchvision the processor cannot be made at all, although images need none of it.
    The subclass keeps the class name, so what it saves loads as ``processor_class`` where torchvision
    is installed.

    Example:
        >>> from transformers import Qwen2VLProcessor
        >>> image_only_processor(Qwen2VLProcessor).get_attributes()
        ['image_processor', 'tokenizer']
    """
    attributes = [a for a in processor_class.get_attributes() if a != "video_processor"]
    # Where the video processor goes among the positional arguments (after self).
    position = list(inspect.signature(processor_class.__init__).parameters).index("video_processor") - 1

    class ImageOnly(processor_class):
        @classmethod
        def get_attributes(cls) -> list[str]:
            return list(attributes)

        @classmethod
        def from_args_and_dict(cls, args, processor_dict, **kwargs):
            return super().from_args_and_dict([*args[:position], None, *args[position:]], processor_dict, **kwargs)

        def __reduce_ex__(self, protocol):
            # By the processor class it is made from: pickle cannot find this class by its name.
            return _image_only_instance, (processor_class, self.__dict__)

    ImageOnly.__name__ = ImageOnly.__qualname__ = processor_class.__name__
    ImageOnly.__doc__ = processor_class.__doc__
    return ImageOnly


def _image_only_instance(processor_class: type, state: dict) -> Any:
    """An unpickled `image_only_processor` instance."""
    processor = object.__new__(image_only_processor(processor_class))
    processor.__dict__.update(state)
    return processor


def _module_prefix(model: nn.Module, names: tuple[str, ...]) -> str | None:
    """Dotted name of the first submodule whose last name component is one of ``names``."""
    for name, _ in model.named_modules():
        if name.split(".")[-1] in names or any(name.endswith("." + n) or name == n for n in names):
            return name
    return None


def language_model_lora_targets(model: nn.Module) -> str:
    """A peft ``target_modules`` regex matching every linear layer of the language model only.

    The vision tower, the projector and ``lm_head`` are left out (a bare ``"all-linear"`` or
    ``["q_proj", ...]`` would also wrap the vision tower's layers).
    """
    prefix = _module_prefix(model, LANGUAGE_MODEL_NAMES)
    vision = _module_prefix(model, VISION_NAMES)
    if prefix is None or (vision and prefix.startswith(vision + ".")):
        raise ValueError(
            f"could not find the language model (a submodule named {' or '.join(LANGUAGE_MODEL_NAMES)} outside the "
            "vision tower); pass lora_target_modules explicitly"
        )
    leaves = sorted(
        {
            name.split(".")[-1]
            for name, module in model.named_modules()
            if name.startswith(prefix + ".") and isinstance(module, nn.Linear)
        }
    )
    return rf"^{re.escape(prefix)}\..*\.({'|'.join(map(re.escape, leaves))})$"


@contextlib.contextmanager
def peft_wrap_warning_ignored():
    """Ignore, inside, the one warning peft causes whenever it wraps a model (`get_peft_model`,
    ``PeftModel.from_pretrained``): ``PeftModel.__init__`` reads ``model.is_gradient_checkpointing``, which
    transformers 5 deprecated (a FutureWarning on every wrap, checkpointing on or off), and no peft
    argument avoids the read. Every other warning still shows.

    Example:
        >>> with peft_wrap_warning_ignored():
        ...     pass
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_GC_DEPRECATION, category=FutureWarning)
        yield


def prepare_model(model: nn.Module, config: Any) -> nn.Module:
    """Apply LoRA (or full finetuning), freezing and gradient checkpointing from a `LoopConfig`.

    A model that already is a `peft.PeftModel` is used as is (its adapters and which parameters
    are trainable are kept); only gradient checkpointing is applied.

    A quantized base (`model_quantization`) must match ``config.quantization`` (None there takes the
    model's). It is not passed through peft's ``prepare_model_for_kbit_training``: that upcasts every
    16-bit module (vision tower, embeddings, LM head: 1.7 GiB more at the 7B shape) to fp32 and enables
    reentrant-checkpointing input gradients; frozen modules stay in 16 bit here, the adapters are fp32
    (peft's default), and checkpointing is non-reentrant.
    """
    from peft import LoraConfig, PeftModel, get_peft_model

    projector = _module_prefix(model, PROJECTOR_NAMES)
    quantized = model_quantization(model)
    if config.quantization is None and quantized is not None:
        logger.info("the model's weights are quantized (%s): quantization=%r", quantized, quantized)
        config.quantization = quantized
    elif config.quantization != quantized:
        raise ValueError(
            f"quantization={config.quantization!r}, but the model's weights are "
            f"{'quantized ' + repr(quantized) if quantized else 'not quantized'}: load it with "
            f"llava_loop.load_model(name, quantization={config.quantization!r}), or set quantization={quantized!r}"
        )
    if quantized:
        check_sixteen_bit(model)
    if isinstance(model, PeftModel):
        pass
    elif config.lora_r > 0:
        targets = config.lora_target_modules or language_model_lora_targets(model)
        # Trained in full next to the adapters, and saved with them.
        modules_to_save = [projector.split(".")[-1]] if (projector and config.train_projector) else []
        vision = _module_prefix(model, VISION_NAMES)
        if vision and not config.freeze_vision_tower:
            modules_to_save.append(vision.split(".")[-1])
        lora = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=targets,
            modules_to_save=modules_to_save or None,
            bias="none",
        )
        with peft_wrap_warning_ignored():
            model = get_peft_model(model, lora)
    elif quantized:
        raise ValueError("a quantized (4/8-bit) model can only be finetuned with LoRA: set lora_r > 0")
    else:
        vision = _module_prefix(model, VISION_NAMES)
        for name, param in model.named_parameters():
            frozen = (config.freeze_vision_tower and vision and name.startswith(vision + ".")) or (
                not config.train_projector and projector and name.startswith(projector + ".")
            )
            param.requires_grad_(not frozen)
    if config.gradient_checkpointing:  # True, "auto" or a number of layers > 0
        # Non-reentrant: works with frozen inputs (no enable_input_require_grads) and under DDP.
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        _set_use_cache(model, False)
        if not isinstance(config.gradient_checkpointing, bool | str):  # a number of layers ("auto": the loop's probe)
            checkpoint_layers(model, config.gradient_checkpointing)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("no trainable parameters: check lora_r, freeze_vision_tower and train_projector")
    materialize_offloaded_adapters(model)
    return model


def execution_device(module: nn.Module) -> torch.device | None:
    """The device ``module`` runs on when a ``device_map`` dispatched the model (its accelerate hook's
    execution device: a GPU for layers offloaded to the CPU or disk), else None."""
    device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    if isinstance(device, dict):  # a hook for several submodules: they share one device here
        device = next(iter(device.values()), None)
    return torch.device(device) if device is not None else None


def input_device(model: nn.Module, default: torch.device) -> torch.device:
    """Where the inputs of ``model`` go: for a model spread with ``device_map``, the device its input
    embeddings run on (the first device of the map; accelerate's hooks move activations between the
    others); otherwise ``default``."""
    if not getattr(model, "hf_device_map", None):
        return default
    embeddings = model.get_input_embeddings()
    device = execution_device(embeddings)
    if device is None:
        device = next(embeddings.parameters()).device
    return default if device.type == "meta" else device


def materialize_offloaded_adapters(model: nn.Module) -> int:
    """Give LoRA adapters of offloaded layers real weights; return how many layers had to.

    With a ``device_map`` that offloads layers to the CPU or disk, the base weights of those layers sit
    on the ``meta`` device between forwards (accelerate loads them for each forward), and peft creates
    the adapters where the base weight is: on ``meta``, without values. Here each such adapter is
    allocated on the device its layer runs on and initialised as peft initialises adapters (the seeded
    global RNG), so it trains like any other. Other trainable weights on ``meta`` (a projector or vision
    tower trained in full but offloaded) cannot be trained: they raise.

    Raises:
        ValueError: A trainable parameter other than a LoRA adapter is offloaded; names it and the fix.
    """
    from peft.tuners.lora import LoraLayer

    count = 0
    for layer in model.modules():
        if not isinstance(layer, LoraLayer):
            continue
        for adapter in list(layer.lora_A.keys()):
            if layer.lora_A[adapter].weight.device.type != "meta":
                continue
            device = execution_device(layer.get_base_layer())
            if device is None:
                raise ValueError("a LoRA adapter is on the meta device, but its layer has no device_map hook")
            layer.lora_A[adapter].to_empty(device=device)
            layer.lora_B[adapter].to_empty(device=device)
            init = getattr(getattr(model, "peft_config", {}).get(adapter), "init_lora_weights", True)
            layer.reset_lora_parameters(adapter, init)
            count += 1
    offloaded = [n for n, p in model.named_parameters() if p.requires_grad and p.device.type == "meta"]
    if offloaded:
        raise ValueError(
            f"{len(offloaded)} trainable weights are offloaded by the device_map (on the meta device between "
            f"forwards), e.g. {offloaded[0]}: only LoRA adapters can train on offloaded layers. Keep the modules "
            "trained in full (projector, vision tower) on a GPU in device_map / max_memory, or freeze them "
            "(train_projector=False, freeze_vision_tower=True)"
        )
    if count:
        logger.info("%d LoRA layers wrap offloaded base layers: their adapters live on the execution device", count)
    return count


def sharded_layer_classes(model: nn.Module) -> list[str]:
    """Class names of the repeated blocks FSDP shards and gathers as units of their own, whatever the
    family: the language model's decoder layers and the vision encoder's layers, i.e. every transformers
    checkpointable layer (``GradientCheckpointingLayer``) and every transformers module kept in a
    ``ModuleList`` of several (Mllama's vision layers are not checkpointable)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    names = {type(m).__name__ for m in model.modules() if isinstance(m, GradientCheckpointingLayer)}
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            names |= {type(m).__name__ for m in module if type(m).__module__.startswith("transformers.")}
    return sorted(names)


@contextlib.contextmanager
def unsharded_root(model: nn.Module):
    """Inside, an FSDP2 model's root unit (the weights outside its per-layer units: the vision tower's
    embeddings, the projector, norms) is gathered whole. ``generate`` encodes the images by calling the
    vision tower and projector directly, outside the model's forward, where FSDP would not gather them.
    A collective: every process enters together. Other models pass through."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        yield model
        return
    model.unshard()
    try:
        yield model
    finally:
        model.reshard()


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The language model's decoder layers, in order: transformers' checkpointable layers
    (``GradientCheckpointingLayer``) outside the vision tower."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    vision = _module_prefix(model, VISION_NAMES)
    return [
        module
        for name, module in model.named_modules()
        if isinstance(module, GradientCheckpointingLayer) and not (vision and name.startswith(vision + "."))
    ]


def checkpoint_layers(model: nn.Module, n: int) -> None:
    """Checkpoint (recompute in backward) only the first ``n`` decoder layers; the others keep their
    activations. Needs gradient checkpointing enabled on the model (`prepare_model` does it).

    Checkpointing is exact (the recomputation replays the same RNG), so ``n`` changes memory and
    speed, never the gradients.
    """
    layers = decoder_layers(model)
    if not 0 <= n <= len(layers):
        raise ValueError(
            f"gradient_checkpointing={n}, but the language model has {len(layers)} decoder layers: "
            f'use a number from 0 to {len(layers)}, True (all) or "auto"'
        )
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i < n


def compile_layers(model: nn.Module) -> int:
    """``torch.compile`` every checkpointable layer (language-model decoder and vision-encoder layers)
    in place: regional compilation, which compiles the repeated layer once and keeps the model's own
    Python around it. Decoder layers are compiled for any batch size and length (one graph per
    checkpointed / not checkpointed variant, not one per length); vision layers for their fixed image
    shape. Returns how many layers were compiled."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    decoder = {id(layer) for layer in decoder_layers(model)}
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        layer.compile(dynamic=True if id(layer) in decoder else None)
    return len(layers)


@contextlib.contextmanager
def uncompiled_layers(model: nn.Module):
    """Run the layers compiled by `compile_layers` uncompiled inside the block (generation compiles
    its own decoding step; compiling eval-mode variants of training layers costs minutes for nothing).

    Uses ``nn.Module._compiled_call_impl``, where ``nn.Module.compile`` keeps the compiled call.
    """
    compiled = [(m, m._compiled_call_impl) for m in model.modules() if getattr(m, "_compiled_call_impl", None)]
    for module, _ in compiled:
        module._compiled_call_impl = None
    try:
        yield model
    finally:
        for module, call in compiled:
            module._compiled_call_impl = call


def label_positions(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Flat indices (into batch x length) of the positions whose next token is labelled: the only
    positions the next-token loss reads logits at."""
    shifted = torch.nn.functional.pad(labels[:, 1:] != ignore_index, (0, 1), value=False)
    return shifted.flatten().nonzero().squeeze(1)


@contextlib.contextmanager
def logits_at(model: nn.Module, positions: torch.Tensor | None):
    """Inside the block, the model's output embedding (LM head) runs only on the hidden states at
    ``positions`` (flat indices into batch x length, from `label_positions`): ``outputs.logits`` is
    ``(len(positions), vocab)``, in that order. ``None`` leaves the model unchanged.

    Works for any model whose forward applies ``get_output_embeddings()`` to batch x length hidden
    states (every transformers causal LM and VLM); anything else fails loudly, never silently.
    """
    head = model.get_output_embeddings() if positions is not None else None
    if head is None:
        yield model
        return

    def select(module, args):
        hidden = args[0]
        if hidden.dim() != 3:
            raise RuntimeError(
                f"labelled_logits_only: the LM head got hidden states of shape {tuple(hidden.shape)}, not "
                "batch x length x hidden; set labelled_logits_only=False for this model"
            )
        return (hidden.flatten(0, 1).index_select(0, positions), *args[1:])

    handle = head.register_forward_pre_hook(select)
    try:
        yield model
    finally:
        handle.remove()


def cache_argument(model: nn.Module) -> str:
    """The keyword ``model``'s forward takes its KV cache under: ``cache`` (recent transformers 5) or
    ``past_key_values``. A peft model passes it on to its base model's forward."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def generation_cache(output: Any) -> Any:
    """The KV cache of a ``generate(..., return_dict_in_generate=True)`` output (``cache`` or, in
    earlier transformers 5 releases, ``past_key_values``); None if it has none."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def plain_positions(model: nn.Module) -> bool:
    """Whether ``model``'s position ids are one counter per row, as `generate` derives them from the
    attention mask (False for multimodal rotary positions, e.g. Qwen2-VL's ``get_rope_index``)."""
    return not any(hasattr(m, "get_rope_index") for m in model.modules())


def rewind_cache(cache: Any, length: int, room: int) -> bool:
    """Cut a KV cache back to its first ``length`` positions, in place, if it then has room for
    ``room`` more; return whether it did (untouched otherwise).

    Only caches of plain full-attention layers of one length can be cut (`DynamicLayer`,
    `StaticLayer`): not sliding windows, linear attention, cross-attention, quantized caches.
    A static layer keeps its later entries in place; the causal mask hides them and the next
    forward overwrites them.
    """
    from transformers.cache_utils import DynamicLayer, StaticLayer

    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) not in (DynamicLayer, StaticLayer) for layer in layers):
        return False
    lengths = {int(layer.get_seq_length()) for layer in layers}
    capacity = layers[0].get_max_length()
    if len(lengths) != 1 or min(lengths) < length or (0 <= capacity < length + room):
        return False
    if any(isinstance(layer, StaticLayer) and not hasattr(layer, "cumulative_length") for layer in layers):
        return False
    remove = lengths.pop() - length
    for layer in layers if remove else ():
        if isinstance(layer, StaticLayer):
            layer.cumulative_length.sub_(remove)  # what StaticLayer.crop does where it exists
        else:
            layer.crop(-remove)
    return True


def _set_use_cache(model: nn.Module, value: bool) -> None:
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and hasattr(cfg, "use_cache"):
            cfg.use_cache = value


def output_vocab_size(model: nn.Module) -> int | None:
    """Rows of the output embedding (the LM head), else the text config's ``vocab_size``; None if unknown."""
    embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    vocab = getattr(getattr(embeddings, "weight", None), "shape", (None,))[0]
    if vocab is None:
        config = getattr(model, "config", None)
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        vocab = getattr(text_config, "vocab_size", None)
    return vocab


def generation_config(model: nn.Module, tokenizer: Any, config: Any) -> Any:
    """The `transformers.GenerationConfig` of evaluation: ``model``'s own, overridden by the `LoopConfig`'s
    ``max_new_tokens``, ``num_beams``, ``do_sample`` (and, when sampling, ``temperature`` and ``top_p``);
    greedy by default, with the cache on and the tokenizer's pad (and, if the model has none, EOS) ids."""
    gen = copy.deepcopy(model.generation_config)
    # Greedy/beam decoding: clear sampling settings the model's config may carry (they would only
    # produce warnings).
    sampling = (
        {"temperature": config.temperature, "top_p": config.top_p}
        if config.do_sample
        else {"temperature": None, "top_p": None, "top_k": None}
    )
    # use_cache: gradient checkpointing turns the model config's cache off; generation needs it.
    gen.update(
        max_new_tokens=config.max_new_tokens,
        num_beams=config.num_beams,
        do_sample=config.do_sample,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
        **sampling,
    )
    if gen.eos_token_id is None:
        gen.eos_token_id = tokenizer.eos_token_id
    # "static": a preallocated cache, whose decoding step transformers compiles on a GPU. It is made in the
    # weights' dtype, so it takes no keys of another one (fp32 weights under bf16 autocast), and one length
    # for every layer, which cross-attention layers (Mllama: one entry per image patch) can exceed.
    device = next(model.parameters()).device
    weights = (model.get_base_model() if hasattr(model, "get_base_model") else model).dtype
    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.resolved_precision(device), weights)
    cross_attention = getattr(model.config.get_text_config(), "cross_attention_layers", None)
    cache = config.generation_cache
    if cache is None:
        cache = "static" if device.type == "cuda" and compute == weights and not cross_attention else "dynamic"
    elif cache == "static" and compute != weights:
        raise ValueError(
            f'generation_cache="static" keeps keys in the weights\' dtype ({weights}), but the model computes in '
            f'{compute} (precision={config.precision!r}): load the model in {compute} or use generation_cache="dynamic"'
        )
    gen.cache_implementation = "static" if cache == "static" else None
    return gen


def is_projector_param(name: str) -> bool:
    return any(p in name for p in PROJECTOR_NAMES)


def param_groups(model: nn.Module, lr: float, projector_lr: float | None, weight_decay: float) -> list[dict]:
    """AdamW groups: projector at ``projector_lr``; no weight decay on biases and norms."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim < 2 or "norm" in name.lower() or name.endswith(".bias")
        groups.setdefault((is_projector_param(name), no_decay), []).append(param)
    out = []
    for (proj, no_decay), params in sorted(groups.items()):
        out.append(
            {
                "params": params,
                "lr": projector_lr if (proj and projector_lr is not None) else lr,
                "weight_decay": 0.0 if no_decay else weight_decay,
                "name": f"{'projector' if proj else 'main'}{'_no_decay' if no_decay else ''}",
            }
        )
    return out


def bitsandbytes_adamw(name: str, groups: list[dict], lr: float) -> torch.optim.Optimizer:
    """bitsandbytes' 8-bit AdamW for `LoopConfig.optimizer` ``"adamw_8bit"`` (``bnb.optim.AdamW8bit``) or
    ``"paged_adamw_8bit"`` (``PagedAdamW8bit``) over ``groups`` (`param_groups`): both moments in 8 bit,
    blockwise quantized, for tensors of 4,096 values or more (smaller ones keep 32-bit moments).

    Raises:
        ImportError: bitsandbytes is missing or does not load (`check_bitsandbytes`).
    """
    check_bitsandbytes(f"optimizer={name!r}")
    import bitsandbytes as bnb

    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[name]
    return cls(groups, lr=lr)


def lora_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def _backup_device(params: list[torch.Tensor]) -> str | None:
    """None (copy on the parameters' own GPUs) if a copy fits there with as much again to spare, else "cpu".

    A GPU copy of a 7B model's 12 GiB of wrapped weights takes milliseconds; a CPU copy took 13 s (enter
    plus exit) on an H100 host (benchmarks/RESULTS.md).
    """
    need: dict[torch.device, int] = {}
    for p in params:
        if p.device.type != "cuda":
            return "cpu"
        need[p.device] = need.get(p.device, 0) + p.numel() * p.element_size()
    for device, size in need.items():
        if 2 * size > _free_memory(device):
            return "cpu"
    return None


@contextlib.contextmanager
def merged_adapters(model: nn.Module, enabled: bool = True):
    """Merge LoRA adapters into the base weights for fast generation, then restore them bit-exactly.

    ``unmerge`` alone leaves rounding error in the base weights (``(W + BA) - BA != W``, in fp32 too),
    so the base weights (and biases, which ``lora_bias`` merges into) of the wrapped layers are copied
    first (on their GPU when twice the copy fits there, else on the CPU) and written back, in place,
    afterwards.

    Quantized base layers (QLoRA) are not merged in place (re-quantizing the sum is lossy): each
    wrapped layer is swapped, inside the block, for a dense 16-bit linear layer holding the dequantized
    base weight plus the adapters (`dense_merged_layers`), when those copies take at most 75% of the
    free memory of their device; otherwise (and for DoRA or LoRA biases) generation runs with the
    adapters unmerged, which is slower. The quantized model is untouched either way. Adapters of layers
    offloaded by a ``device_map`` or sharded by FSDP or ZeRO-3 are not merged either (`_mergeable`).

    A model without LoRA layers, or ``enabled=False``, passes through unchanged.

    Example:
        >>> with merged_adapters(peft_model):  # doctest: +SKIP
        ...     peft_model.generate(**batch)
    """
    from peft import PeftModel

    layers = lora_layers(model) if enabled and isinstance(model, PeftModel) else []
    bases = [layer.get_base_layer() for layer in layers]
    if layers and any(_is_quantized_linear(b) for b in bases):
        with _swapped(model, dense_merged_layers(model)):
            yield model
        return
    if not layers or not all(_mergeable(b) for b in bases):
        yield model
        return
    params = [p for b in bases for p in (b.weight, getattr(b, "bias", None)) if isinstance(p, torch.Tensor)]
    where = _backup_device(params)
    backup = [(p, p.detach().to(where or p.device, copy=True)) for p in params]
    try:
        model.merge_adapter()
        yield model
    finally:
        model.unmerge_adapter()
        with torch.no_grad():
            for param, saved in backup:
                param.copy_(saved)


def _mergeable(layer: nn.Module) -> bool:
    """Whether adapters can merge into ``layer``'s weight in place: a 16/32-bit weight that this process
    holds whole (not offloaded by a device_map: ``meta`` between forwards; not an FSDP or ZeRO-3 shard)."""
    from torch.distributed.tensor import DTensor

    weight = getattr(layer, "weight", None)
    if weight is None or weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    return weight.device.type != "meta" and not isinstance(weight, DTensor) and not hasattr(weight, "ds_id")


def _is_quantized_linear(layer: nn.Module) -> bool:
    """Whether ``layer`` is a bitsandbytes 4-bit or 8-bit linear layer."""
    return type(getattr(layer, "weight", None)).__name__ in ("Params4bit", "Int8Params")


DENSE_COPY_SHARE = 0.75
"""Most of a device's free memory that `dense_merged_layers` may take (the rest is for generation)."""


@torch.no_grad()
def dense_merged_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """For each LoRA layer of ``model`` on a bitsandbytes-quantized base: its name and a dense linear
    layer computing the same (up to rounding): the dequantized base weight plus every active adapter's
    ``scale * B @ A``, in the model's 16-bit dtype (its LM head's), on the base weight's device.

    Empty (generation then runs unmerged) when a layer has a DoRA or LoRA-bias adapter or is merged
    already, or when the copies would take more than `DENSE_COPY_SHARE` of their device's free memory
    (logged).
    """
    from peft.tuners.lora import LoraLayer

    named = [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]
    for _, layer in named:
        adapters = [a for a in layer.active_adapters if a in layer.lora_A]
        if layer.merged or any(layer.use_dora.get(a) or getattr(layer, "lora_bias", {}).get(a) for a in adapters):
            logger.info("LoRA layers with DoRA or LoRA biases on a quantized base: evaluation generates unmerged")
            return {}
    head = model.get_output_embeddings()
    dtype = head.weight.dtype if head is not None and head.weight.is_floating_point() else torch.bfloat16
    need: dict[torch.device, int] = {}
    for _, layer in named:
        base = layer.get_base_layer()
        size = base.in_features * base.out_features + (base.out_features if base.bias is not None else 0)
        need[base.weight.device] = need.get(base.weight.device, 0) + size * dtype.itemsize
    for device, size in need.items():
        free = _free_memory(device)
        if size > DENSE_COPY_SHARE * free:
            logger.info(
                "evaluation generates with the adapters unmerged (slower): a dense merged copy of the quantized "
                "layers takes %.1f GiB, more than %d%% of the %.1f GiB free on %s",
                *(size / 2**30, DENSE_COPY_SHARE * 100, free / 2**30, device),
            )
            return {}
    dense = {}
    for name, layer in named:
        base = layer.get_base_layer()
        merged = _dequantized(base).float()
        if layer.disable_adapters is False:
            for adapter in layer.active_adapters:
                if adapter in layer.lora_A:
                    merged += layer.get_delta_weight(adapter).float()
        linear = nn.Linear(
            base.in_features, base.out_features, bias=base.bias is not None, device=base.weight.device, dtype=dtype
        )
        linear.weight.copy_(merged)
        if base.bias is not None:
            linear.bias.copy_(base.bias)
        dense[name] = linear.requires_grad_(False)
    return dense


def _dequantized(layer: nn.Module) -> torch.Tensor:
    """The weight of a bitsandbytes 4-bit or 8-bit linear layer, dequantized (out x in).

    On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight for its CPU kernel at the first
    forward in eval mode; it is unpacked first, in place, as bitsandbytes does before saving it (the next
    such forward packs it again).
    """
    from peft.utils.integrations import dequantize_bnb_weight

    weight = layer.weight
    if getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
    return dequantize_bnb_weight(weight, state=getattr(layer, "state", None))  # 8 bit: the row scales


def _free_memory(device: torch.device) -> int:
    """Bytes free for new tensors on ``device``: the GPU's free memory plus what PyTorch's allocator holds
    unused; the system's available memory for the CPU."""
    if device.type == "cuda":
        return (
            torch.cuda.mem_get_info(device)[0]
            + torch.cuda.memory_reserved(device)
            - torch.cuda.memory_allocated(device)
        )
    import psutil

    return psutil.virtual_memory().available


@contextlib.contextmanager
def _swapped(model: nn.Module, replacements: dict[str, nn.Module]):
    """Inside the block, the submodules of ``model`` named in ``replacements`` are those modules; the
    originals are put back after."""
    originals = {name: model.get_submodule(name) for name in replacements}

    def put(modules: dict[str, nn.Module]) -> None:
        for name, module in modules.items():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module)

    put(replacements)
    try:
        yield model
    finally:
        put(originals)
