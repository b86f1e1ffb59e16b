"""The memory planner: GPU memory of a finetuning run, per GPU, from a model (or only its config) and a
`LoopConfig`, before anything is loaded.

`estimate_memory` adds up, in bytes: the weights (16-bit, NF4 or int8), the trainable parameters'
gradients and optimizer states, the activations autograd keeps (per decoder layer, checkpointed or
not), the logits and loss buffers, the transient dequantized weights of QLoRA, and the KV cache of
evaluation. The formula, term by term, and its validation against measured peaks are in
docs/memory.md. What is estimated is the peak of ``torch.cuda.max_memory_allocated`` during training
steps (after the first optimizer step): the CUDA context (about 0.5 GiB) and the allocator's cached
but free blocks come on top.

Example:
    >>> from llava_loop import LoopConfig
    >>> from llava_loop.testing import tiny_llava
    >>> estimate = estimate_memory(tiny_llava()[0].config, LoopConfig(batch_size=2), seq_len=64)
    >>> estimate.train_peak > estimate.weights > 0
    True
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any

import torch
from torch import nn

GIB = 2**30

NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)
"""Bytes per NF4 weight with double quantization: 4 bits, plus each block of 64 weights' absmax
quantized to 8 bits, plus one fp32 scale per 256 such blocks (bitsandbytes' blocksize 64 and 256)."""

ADAM8_MIN_SIZE = 4096
"""bitsandbytes' 8-bit optimizers keep 32-bit states for tensors smaller than this (``min_8bit_size``)."""
ADAM8_BLOCK = 256
"""Values per fp32 absmax of bitsandbytes' blockwise 8-bit optimizer states."""

# Bytes per token a LLaMA-style decoder layer (RMSNorm, q/k/v/o, SiLU-gated MLP) keeps for backward under
# bf16 autocast, with LoRA (fp32 adapters) on its seven linear layers: coefficients of the hidden size h,
# the MLP width f, the LoRA rank r (and the attention's logsumexp, 4 bytes per head). Counted from what
# autograd saves (torch.autograd.graph.saved_tensors_hooks) for one layer, eager and torch.compile'd, with
# and without LoRA dropout; tests/test_planner.py counts the eager ones again. The two h-wide tensors of
# the attention's keys and values are kv_heads x head_dim wide with grouped-query attention.
LAYER_COEFFICIENTS: dict[tuple[bool, bool], tuple[int, int, int]] = {
    # (compiled, dropout): (bytes per h, bytes per f, bytes per r)
    (False, True): (52, 12, 14),  # fp32 copies of the dropout inputs, 8 of them
    (False, False): (28, 8, 14),
    (True, True): (30, 7, 14),  # inductor keeps bf16 tensors and 1-byte dropout masks
    (True, False): (18, 6, 14),
}
BACKWARD_WORKSPACE = (6, 4)
"""Bytes per token per h and per f of the gradients alive at once inside one decoder layer's backward
(three h-wide bf16 gradients, the two f-wide ones of the MLP's gate and up projections)."""
LOGITS_BYTES = 10
"""Bytes per logit of the loss: the bf16 logits (2), their fp32 copy (4), the log-softmax kept for
backward (4)."""


@dataclasses.dataclass
class MemoryEstimate:
    """Bytes per GPU of one finetuning run, term by term (see docs/memory.md), and what was assumed.

    ``train_peak`` is weights + gradients + optimizer states + activations + logits + transient;
    ``eval_peak`` is weights + optimizer states + dense merged copies + KV cache + prefill transient.
    """

    weights: int
    """Every parameter as stored: 16-bit, NF4 or int8 base weights, fp32 adapters, modules_to_save copies."""
    trainable_params: int
    """Number of trainable parameters (not bytes)."""
    gradients: int
    """The trainable parameters' gradients, in their dtypes (plus DDP's gradient buckets)."""
    optimizer_states: int
    """AdamW's two moments (8-bit ones for adamw_8bit; 0 on the GPU for paged_adamw_8bit)."""
    activations: int
    """What the decoder layers keep for backward, with the one layer recomputed and its backward workspace."""
    activations_per_checkpointed_layer: int
    """A checkpointed layer keeps only its input."""
    activations_per_kept_layer: int
    """A layer that is not checkpointed keeps everything its backward needs."""
    logits: int
    """The LM head's output and the loss buffers."""
    transient: int
    """Dequantized copies of the largest quantized layer (forward and backward), the projector's activations."""
    train_peak: int
    """Peak of torch.cuda.max_memory_allocated during training steps."""
    eval_kv_cache: int
    """KV cache of one evaluation batch (static: preallocated for prompt + max_new_tokens)."""
    eval_dense_copies: int
    """Quantized base: the 16-bit merged copies evaluation generates with when they fit (else 0 is right)."""
    eval_peak: int
    """Peak during an evaluation inside fit (the optimizer states stay on the GPU)."""
    assumptions: dict
    """The inputs the numbers follow from: token counts, dimensions, layers, settings."""

    def gib(self) -> dict[str, float]:
        """Every byte count in GiB."""
        return {k: v / GIB for k, v in dataclasses.asdict(self).items() if k not in ("assumptions", "trainable_params")}

    def table(self) -> str:
        """A plain-text breakdown, one term per line, in GiB."""
        a = self.assumptions
        lines = [
            f"memory estimate per GPU: {a['finetune']}, batch {a['batch_size']} x {a['seq_len']} tokens, "
            f"gradient checkpointing {a['checkpointed_layers']}/{a['num_layers']} layers, optimizer {a['optimizer']}"
            + (f", {a['sharding']} over {a['num_processes']} processes" if a["num_processes"] > 1 else ""),
        ]
        rows = [
            ("weights", self.weights),
            ("gradients", self.gradients),
            ("optimizer states", self.optimizer_states),
            ("activations", self.activations),
            ("logits and loss", self.logits),
            ("transient", self.transient),
            ("training peak", self.train_peak),
            ("eval KV cache", self.eval_kv_cache),
            ("eval dense merged copies", self.eval_dense_copies),
            ("evaluation peak", self.eval_peak),
        ]
        lines += [f"  {name:<26}{_size(value):>13}" for name, value in rows]
        lines.append(f"  {'trainable parameters':<26}{self.trainable_params:>13,}")
        lines.append("  (CUDA context, about 0.5 GiB, and the allocator's cache come on top)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _size(n: int) -> str:
    """Bytes as GiB, or MiB below 1 GiB."""
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def estimate_memory(
    model_or_name_or_config: Any,
    config: Any = None,
    *,
    seq_len: int | None = None,
    label_tokens: int | None = None,
    eval_prompt_len: int | None = None,
    num_processes: int = 1,
    sharding: str = "ddp",
    dtype: torch.dtype = torch.bfloat16,
) -> MemoryEstimate:
    """Estimate the GPU memory of finetuning with ``config``, per GPU, without loading any weights.

    Args:
        model_or_name_or_config: A model (its parameters are counted as they are: a quantized or peft
            model too), a Hub name or local folder (only its config.json is read), or a
            ``PretrainedConfig``; a config is built into a weightless model on the meta device.
        config: The run's `LoopConfig` (default: the defaults). Read: batch_size, max_length, lora_r,
            lora_target_modules, lora_dropout, train_projector, freeze_vision_tower, quantization,
            optimizer, gradient_checkpointing, compile, labelled_logits_only, eval_batch_size,
            max_new_tokens.
        seq_len: Tokens per training sample, image tokens included (default: ``max_length``).
        label_tokens: Labelled (answer) tokens per sample (default: every token after the image's: an
            upper bound).
        eval_prompt_len: Tokens of the longest eval prompt (default: ``seq_len``).
        num_processes: Processes (GPUs) training together.
        sharding: With several processes: ``"ddp"`` (replicated) or ``"fsdp"`` (parameters, gradients
            and optimizer states sharded).
        dtype: The 16-bit dtype of the weights that are not quantized.

    Raises:
        ValueError: no sequence length, or a bad ``sharding`` / ``num_processes``.
        FileNotFoundError: a name that is neither a model folder nor a Hub model.

    Example:
        >>> from llava_loop import LoopConfig
        >>> from llava_loop.testing import tiny_llava
        >>> e = estimate_memory(tiny_llava()[0], LoopConfig(batch_size=4, lora_r=8), seq_len=128)
        >>> e.trainable_params > 0 and e.optimizer_states == 2 * e.gradients
        True
    """
    from .config import LoopConfig

    cfg = config or LoopConfig()
    if sharding not in ("ddp", "fsdp"):
        raise ValueError(f"sharding={sharding!r} is invalid: expected 'ddp' or 'fsdp'")
    if num_processes < 1:
        raise ValueError(f"num_processes={num_processes} is invalid: expected an int >= 1")
    seq_len = seq_len or cfg.max_length
    if not seq_len or seq_len <= 0:
        raise ValueError(
            "no sequence length: pass seq_len= (tokens per sample, image tokens included; CLI: --seq_len) or "
            "set max_length in the config"
        )
    model = _model(model_or_name_or_config, dtype)
    text = model.config.get_text_config()
    dims = _dims(text)
    image_tokens = _image_tokens(model.config)
    label_tokens = label_tokens if label_tokens is not None else max(1, seq_len - image_tokens)
    batch = cfg.batch_size if isinstance(cfg.batch_size, int) else 1
    tokens = batch * seq_len

    params = _parameters(model, cfg, dtype)
    weights, trainable, grads, optim = params["weights"], params["trainable"], params["gradients"], params["optimizer"]

    # Activations of the decoder layers.
    num_layers = dims["layers"]
    checkpointing = cfg.gradient_checkpointing
    if checkpointing is True or checkpointing == "auto":
        checkpointed = num_layers
    elif checkpointing is False:
        checkpointed = 0
    else:
        checkpointed = min(int(checkpointing), num_layers)
    compiled = cfg.compile if cfg.compile is not None else True  # the default on a GPU
    lora = cfg.lora_r > 0
    h, f = dims["hidden"], dims["intermediate"]
    layer_bytes_per_token = layer_bytes(dims, cfg.lora_r if lora else 0, compiled, lora and cfg.lora_dropout > 0)
    kept = layer_bytes_per_token * tokens
    checkpointed_layer = 2 * h * tokens  # its bf16 input
    workspace = (BACKWARD_WORKSPACE[0] * h + BACKWARD_WORKSPACE[1] * f) * tokens
    activations = checkpointed * checkpointed_layer + (num_layers - checkpointed) * kept + workspace
    if checkpointed:
        activations += kept  # the layer being recomputed during backward
    activations += 2 * h * tokens  # the embeddings' output, input of the first layer

    logit_rows = batch * label_tokens if cfg.labelled_logits_only else tokens
    logits = LOGITS_BYTES * logit_rows * dims["vocab"]

    transient = 2 * 2 * params["largest_quantized"]  # dequantized in forward and again in backward
    transient += params["projector_activations_per_image_token"] * batch * image_tokens

    # Per GPU under data parallelism.
    processes = num_processes
    if processes > 1 and sharding == "fsdp":
        unit = 2 * params["largest_layer_params"] * 2  # one all-gathered decoder layer, and the next prefetched
        weights = math.ceil(weights / processes) + unit
        grads, optim = math.ceil(grads / processes), math.ceil(optim / processes)
    elif processes > 1:
        grads *= 2  # DDP's gradient buckets: a second copy of the trainable gradients

    train_peak = weights + grads + optim + activations + logits + transient

    # Evaluation (generate with a KV cache) inside fit: the optimizer states stay, gradients are freed.
    eval_batch = cfg.eval_batch_size if isinstance(cfg.eval_batch_size, int) else 1
    prompt = eval_prompt_len or seq_len
    cache_len = prompt + cfg.max_new_tokens
    kv_cache = 2 * num_layers * dims["kv_width"] * eval_batch * cache_len * 2
    prefill = (4 * 2 * h + 3 * 2 * f) * eval_batch * prompt + 4 * eval_batch * dims["vocab"]
    dense = params["quantized_weights"] * 2 if cfg.merge_lora_for_eval and lora else 0
    eval_peak = weights + optim + dense + kv_cache + prefill

    assumptions = {
        "finetune": params["finetune"],
        "batch_size": batch,
        "seq_len": seq_len,
        "image_tokens": image_tokens,
        "label_tokens": label_tokens,
        "num_layers": num_layers,
        "checkpointed_layers": checkpointed,
        "compiled": compiled,
        "hidden_size": h,
        "intermediate_size": f,
        "kv_width": dims["kv_width"],
        "vocab_size": dims["vocab"],
        "layer_bytes_per_token": layer_bytes_per_token,
        "optimizer": cfg.optimizer,
        "quantization": cfg.quantization,
        "num_processes": processes,
        "sharding": sharding,
        "eval_batch_size": eval_batch,
        "eval_cache_len": cache_len,
        "paged_optimizer_states_off_allocator": params["paged"],
    }
    return MemoryEstimate(
        weights=int(weights),
        trainable_params=int(trainable),
        gradients=int(grads),
        optimizer_states=int(optim),
        activations=int(activations),
        activations_per_checkpointed_layer=int(checkpointed_layer),
        activations_per_kept_layer=int(kept),
        logits=int(logits),
        transient=int(transient),
        train_peak=int(train_peak),
        eval_kv_cache=int(kv_cache),
        eval_dense_copies=int(dense),
        eval_peak=int(eval_peak),
        assumptions=assumptions,
    )


def layer_bytes(dims: dict[str, int], lora_r: int, compiled: bool, dropout: bool) -> int:
    """Bytes per token one decoder layer that is not checkpointed keeps for backward (docs/memory.md):
    ``ch·h - 4·(h - kv) + cf·f + cr·r + 4·heads + 2·head_dim + 8``, with `LAYER_COEFFICIENTS`
    (``lora_r=0``: full finetuning, the same tensors without adapters). The last terms are the
    attention's fp32 logsumexp, the rotary cos/sin halves and the norms' fp32 rsqrt.

    Example:
        >>> layer_bytes({"hidden": 4096, "intermediate": 11008, "kv_width": 4096, "heads": 32, "head_dim": 128},
        ...             lora_r=128, compiled=True, dropout=True)
        202120
    """
    per_h, per_f, per_r = LAYER_COEFFICIENTS[(compiled, dropout)]
    h, kv = dims["hidden"], dims["kv_width"]
    return (
        per_h * h
        - 2 * 2 * (h - kv)
        + per_f * dims["intermediate"]
        + per_r * lora_r
        + 4 * dims["heads"]
        + (2 * dims["head_dim"] + 8)
    )


def optimizer_state_bytes(tensors: list[tuple[int, int]], optimizer: str) -> int:
    """Bytes of GPU memory (PyTorch's allocator) the `LoopConfig.optimizer` keeps for trainable tensors
    of ``(values, bytes per value)``: AdamW's two moments in the parameter's dtype; bitsandbytes' 8-bit
    moments (1 byte each, plus an fp32 absmax per `ADAM8_BLOCK`; 32-bit below `ADAM8_MIN_SIZE` values);
    0 for the paged one, whose memory is outside the allocator.

    Example:
        >>> optimizer_state_bytes([(8192, 4), (100, 4)], "adamw_8bit")
        17440
    """
    if optimizer == "adamw":
        return sum(2 * n * size for n, size in tensors)
    if optimizer == "paged_adamw_8bit":
        return 0  # cudaMallocManaged: outside torch's allocator (and spilled to the CPU when short)
    return sum(2 * n + 2 * 4 * math.ceil(n / ADAM8_BLOCK) if n >= ADAM8_MIN_SIZE else 2 * 4 * n for n, _ in tensors)


def _model(source: Any, dtype: torch.dtype) -> nn.Module:
    """``source`` as a model: itself, or built weightless on the meta device from its config."""
    from transformers import AutoConfig, AutoModelForImageTextToText, PretrainedConfig

    if isinstance(source, nn.Module):
        return source
    if isinstance(source, str | os.PathLike):
        from .modeling import check_model_source

        check_model_source(str(source))
        source = AutoConfig.from_pretrained(str(source))
    if not isinstance(source, PretrainedConfig):
        raise TypeError(f"expected a model, a model name or folder, or a PretrainedConfig; got {type(source).__name__}")
    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(source, dtype=dtype)


def _dims(text: Any) -> dict[str, int]:
    """The language model's dimensions from its config."""
    hidden = text.hidden_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    intermediate = getattr(text, "intermediate_size", None) or 4 * hidden
    return {
        "hidden": hidden,
        "intermediate": intermediate,
        "heads": heads,
        "kv_width": kv_heads * head_dim,
        "head_dim": head_dim,
        "layers": text.num_hidden_layers,
        "vocab": text.vocab_size,
    }


def _image_tokens(config: Any) -> int:
    """Image tokens per sample: ``image_seq_length`` where the config has it (LLaVA-1.5: 576), else the
    vision tower's patch grid, else 0."""
    tokens = getattr(config, "image_seq_length", None)
    if tokens:
        return int(tokens)
    vision = getattr(config, "vision_config", None)
    size, patch = getattr(vision, "image_size", None), getattr(vision, "patch_size", None)
    if isinstance(size, int) and isinstance(patch, int) and patch:
        return (size // patch) ** 2
    return 0


def _lora_target(name: str, targets: Any) -> bool:
    """peft's rule: a string is a full-match regex; a list matches a name or its last components."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _parameters(model: nn.Module, cfg: Any, dtype: torch.dtype) -> dict[str, Any]:
    """Bytes of the weights, gradients and optimizer states, trainable parameter count, and the sizes the
    transient terms need."""
    from .modeling import (
        LANGUAGE_MODEL_NAMES,
        PROJECTOR_NAMES,
        VISION_NAMES,
        _module_prefix,
        decoder_layers,
        language_model_lora_targets,
        model_quantization,
        sixteen_bit_modules,
    )

    quantization = cfg.quantization or model_quantization(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    built = hasattr(model, "peft_config")  # a peft model: count what it has
    language = _module_prefix(base, LANGUAGE_MODEL_NAMES)
    vision = _module_prefix(base, VISION_NAMES)
    projector = _module_prefix(base, PROJECTOR_NAMES)
    keep16 = sixteen_bit_modules(base)
    unit = dtype.itemsize

    def inside(name: str, prefix: str | None) -> bool:
        return bool(prefix) and (name == prefix or name.startswith(prefix + "."))

    quantized_linears = {
        name: module
        for name, module in base.named_modules()
        if isinstance(module, nn.Linear)  # bitsandbytes' Linear4bit / Linear8bitLt are nn.Linear too
        and inside(name, language)
        and not any(inside(name, k) for k in keep16)
        and ".lora_" not in name
    }
    weights = 0
    quantized_weights = 0
    for name, param in base.named_parameters():
        module_name = name.rsplit(".", 1)[0]
        cls = type(param).__name__
        if cls == "Params4bit":
            numel = param.numel() * 2 * param.element_size()
            weights += NF4_BYTES_PER_WEIGHT * numel
            quantized_weights += numel
        elif cls == "Int8Params":
            weights += param.numel() + 4 * param.shape[0]
            quantized_weights += param.numel()
        elif quantization and name.endswith(".weight") and module_name in quantized_linears:
            numel = param.numel()
            quantized_weights += numel
            weights += NF4_BYTES_PER_WEIGHT * numel if quantization == "4bit" else numel + 4 * param.shape[0]
        else:
            weights += param.numel() * (param.element_size() if param.device.type != "meta" else unit)

    trainable_tensors: list[tuple[int, int]] = []  # (numel, bytes per value)
    if built:
        trainable_tensors = [(p.numel(), p.element_size()) for p in model.parameters() if p.requires_grad]
        finetune = ("Q" if quantization else "") + "LoRA"
    elif cfg.lora_r > 0:
        targets = cfg.lora_target_modules or language_model_lora_targets(base)
        for name, module in base.named_modules():
            if isinstance(module, nn.Linear) and _lora_target(name, targets):
                trainable_tensors += [(cfg.lora_r * module.in_features, 4), (cfg.lora_r * module.out_features, 4)]
        copies = [projector] if projector and cfg.train_projector else []
        if vision and not cfg.freeze_vision_tower:
            copies.append(vision)
        for prefix in copies:
            for param in base.get_submodule(prefix).parameters():
                trainable_tensors.append((param.numel(), unit))
        finetune = ("Q" if quantization else "") + f"LoRA r={cfg.lora_r}"
    else:
        for name, param in base.named_parameters():
            frozen = (cfg.freeze_vision_tower and inside(name, vision)) or (
                not cfg.train_projector and inside(name, projector)
            )
            if not frozen:
                trainable_tensors.append((param.numel(), unit))
        finetune = "full"
    trainable_bytes = sum(n * b for n, b in trainable_tensors)
    if not built:
        weights += trainable_bytes if cfg.lora_r > 0 else 0  # adapters and the trained copies, beside the base
    paged = cfg.optimizer == "paged_adamw_8bit"
    optimizer = optimizer_state_bytes(trainable_tensors, cfg.optimizer)
    largest = max(
        (m.in_features * m.out_features for m in quantized_linears.values() if isinstance(m, nn.Linear)), default=0
    )
    layers = decoder_layers(base)
    largest_layer = max((sum(p.numel() for p in layer.parameters()) for layer in layers), default=0)
    projector_activations = 0
    if projector and (cfg.train_projector or cfg.lora_r == 0):
        linears = [m for m in base.get_submodule(projector).modules() if isinstance(m, nn.Linear)]
        projector_activations = sum(2 * m.in_features for m in linears) + sum(2 * m.out_features for m in linears[:-1])
    return {
        "weights": weights,
        "trainable": sum(n for n, _ in trainable_tensors),
        "gradients": trainable_bytes,
        "optimizer": optimizer,
        "quantized_weights": quantized_weights if quantization else 0,
        "largest_quantized": largest if quantization else 0,
        "largest_layer_params": largest_layer,
        "projector_activations_per_image_token": projector_activations,
        "finetune": finetune,
        "paged": paged,
    }
