"""The memory planner: every term against a count made independently (by hand from the model's
dimensions, by peft, by bitsandbytes, by real optimizers, by autograd's saved tensors), config-only equal
to a built model, sharding, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import small_config
from llava_loop import LoopConfig, estimate_memory
from llava_loop.cli import main
from llava_loop.planner import ADAM8_BLOCK, LAYER_COEFFICIENTS, NF4_BYTES_PER_WEIGHT, layer_bytes
from llava_loop.testing import tiny_llava


def lora_shapes(model, r: int) -> list[tuple[int, int]]:
    """(in, out) of every linear layer of the language model: LoRA's default targets."""
    return [
        (m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and ".language_model." in f".{name}"
    ]


def test_weights_gradients_and_optimizer_of_lora_equal_a_count_by_hand(tmp_path):
    model, _ = tiny_llava()
    r = 8
    base = sum(p.numel() for p in model.parameters())
    adapters = sum(r * (i + o) for i, o in lora_shapes(model, r))
    projector = sum(p.numel() for p in model.model.multi_modal_projector.parameters())
    e = estimate_memory(model.config, small_config(tmp_path, lora_r=r), seq_len=64)
    assert e.weights == 2 * base + 4 * adapters + 2 * projector  # bf16 base, fp32 adapters, bf16 copy
    assert e.trainable_params == adapters + projector
    assert e.gradients == 4 * adapters + 2 * projector
    assert e.optimizer_states == 2 * e.gradients  # AdamW: two moments in the parameter's dtype

    from peft import LoraConfig, get_peft_model

    from llava_loop.modeling import language_model_lora_targets

    peft_model = get_peft_model(
        tiny_llava()[0],
        LoraConfig(r=r, target_modules=language_model_lora_targets(model), modules_to_save=["multi_modal_projector"]),
    )
    assert e.trainable_params == sum(p.numel() for p in peft_model.parameters() if p.requires_grad), (
        "the planner's trainable parameters differ from peft's"
    )
    assert all(p.dtype == torch.float32 for n, p in peft_model.named_parameters() if "lora_" in n)


def test_full_finetuning_trains_everything_but_the_frozen_vision_tower(tmp_path):
    model, _ = tiny_llava()
    vision = sum(p.numel() for p in model.model.vision_tower.parameters())
    total = sum(p.numel() for p in model.parameters())
    e = estimate_memory(model.config, small_config(tmp_path, lora_r=0), seq_len=64)
    assert e.trainable_params == total - vision
    assert e.weights == 2 * total and e.gradients == 2 * (total - vision)


def test_config_alone_equals_the_built_model(tmp_path):
    model, _ = tiny_llava()
    cfg = small_config(tmp_path, lora_r=8, batch_size=3, gradient_checkpointing=True)
    from_config = estimate_memory(model.config, cfg, seq_len=100)
    from_model = estimate_memory(model.to(torch.bfloat16), cfg, seq_len=100)
    assert from_config == from_model


def test_a_saved_folder_is_read_from_its_config_json_only(tmp_path):
    model, processor = tiny_llava()
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()  # no weights at all
    e = estimate_memory(str(tmp_path / "m"), small_config(tmp_path), seq_len=64)
    assert e == estimate_memory(model.config, small_config(tmp_path), seq_len=64)


def test_nf4_bytes_per_weight_equal_bitsandbytes_storage():
    import bitsandbytes.functional as F

    weight = torch.randn(1024, 4096, dtype=torch.bfloat16)
    packed, state = F.quantize_4bit(weight, quant_type="nf4", compress_statistics=True, blocksize=64)
    nested = state.state2
    stored = packed.numel() * packed.element_size() + state.absmax.numel() * state.absmax.element_size()
    stored += nested.absmax.numel() * nested.absmax.element_size()
    assert stored / weight.numel() == pytest.approx(NF4_BYTES_PER_WEIGHT, rel=1e-3), (
        f"bitsandbytes stores {stored / weight.numel():.5f} bytes per NF4 weight"
    )


def test_a_quantized_model_is_counted_as_stored(tmp_path):
    from llava_loop.modeling import load_model

    model, processor = tiny_llava()
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    quantized, _ = load_model(str(tmp_path / "m"), quantization="4bit")
    planned = estimate_memory(model.config, small_config(tmp_path, quantization="4bit"), seq_len=64)
    loaded = estimate_memory(quantized, small_config(tmp_path, quantization="4bit"), seq_len=64)
    assert loaded.weights == pytest.approx(planned.weights, rel=1e-6), "the built 4-bit model counts differently"
    decoder = sum(
        m.weight.numel()
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and ".language_model.layers." in f".{n}"
    )
    bf16 = estimate_memory(model.config, small_config(tmp_path), seq_len=64)
    assert bf16.weights - planned.weights == pytest.approx((2 - NF4_BYTES_PER_WEIGHT) * decoder, abs=1)


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_8bit"])
def test_optimizer_states_equal_a_real_optimizer_after_one_step(tmp_path, optimizer):
    from llava_loop import Loop
    from llava_loop.testing import synthetic_vqa

    model, processor = tiny_llava()
    cfg = small_config(tmp_path, lora_r=64, optimizer=optimizer, max_steps=1, log_steps=0)
    loop = Loop(model, processor, cfg)
    loop.fit(synthetic_vqa(2))
    inner = getattr(loop.optimizer, "optimizer", loop.optimizer)
    real = 0
    for state in inner.state.values():
        for key, value in state.items():
            if torch.is_tensor(value) and value.numel() > 1 and not key.startswith("qmap"):
                real += value.numel() * value.element_size()
    planned = estimate_memory(tiny_llava()[0].config, cfg, seq_len=64, dtype=torch.float32).optimizer_states
    assert planned == real, f"{optimizer}: planned {planned} bytes of optimizer state, the optimizer holds {real}"
    if optimizer == "adamw_8bit":
        assert ADAM8_BLOCK == 256


def saved_bytes_per_token(dropout: float, r: int, b: int = 2, s: int = 48) -> tuple[float, dict]:
    """Bytes per token one LoRA-wrapped LLaMA decoder layer keeps for backward under bf16 autocast,
    counted with saved_tensors_hooks (each storage once; parameters and per-call constants excluded)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    h, f = 256, 704
    config = LlamaConfig(hidden_size=h, intermediate_size=f, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, attn_implementation="sdpa")  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=r, lora_dropout=dropout, target_modules=targets))
    layer = model.base_model.model.model.layers[0]
    x = torch.randn(b, s, h, dtype=torch.bfloat16, requires_grad=True)
    rotary = model.base_model.model.model.rotary_emb(x, torch.arange(s)[None])
    saved: dict[int, int] = {}

    def pack(t):
        n = 1
        for d in t.shape:
            n *= d
        if n % (b * s) == 0:  # per-token tensors only (weights cast to bf16 by autocast are per call)
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x, position_embeddings=rotary, attention_mask=None)
    (out[0] if isinstance(out, tuple) else out).float().sum().backward()
    total = sum(v for k, v in saved.items() if k not in params)
    dims = {"hidden": h, "intermediate": f, "kv_width": 2 * (h // 4), "heads": 4, "head_dim": h // 4}
    return total / (b * s), dims


@pytest.mark.parametrize("dropout", [0.05, 0.0])
def test_eager_layer_activations_equal_what_autograd_saves(dropout):
    measured, dims = saved_bytes_per_token(dropout, r=16)
    planned = layer_bytes(dims, lora_r=16, compiled=False, dropout=dropout > 0)
    assert planned == pytest.approx(measured, abs=1), (
        f"dropout={dropout}: the planner's layer keeps {planned} bytes per token, autograd saved {measured}; "
        f"LAYER_COEFFICIENTS {LAYER_COEFFICIENTS[(False, dropout > 0)]} are out of date"
    )


def test_checkpointing_keeps_one_input_per_layer_plus_one_recomputed_layer(tmp_path):
    config = tiny_llava()[0].config
    layers = config.text_config.num_hidden_layers
    plain = estimate_memory(config, small_config(tmp_path, gradient_checkpointing=False), seq_len=64)
    every = estimate_memory(config, small_config(tmp_path, gradient_checkpointing=True), seq_len=64)
    one = estimate_memory(config, small_config(tmp_path, gradient_checkpointing=1), seq_len=64)
    kept, ckpt = plain.activations_per_kept_layer, plain.activations_per_checkpointed_layer
    assert plain.activations - every.activations == layers * kept - layers * ckpt - kept
    assert one.activations - every.activations == (layers - 1) * (kept - ckpt) - (layers - 1) * 0
    assert ckpt == 2 * config.text_config.hidden_size * 2 * 64  # bf16 input, batch 2 x 64 tokens


def test_labelled_logits_only_scales_the_logits_with_the_answer_tokens(tmp_path):
    config = tiny_llava()[0].config
    vocab = config.text_config.vocab_size
    labelled = estimate_memory(config, small_config(tmp_path), seq_len=64, label_tokens=5)
    full = estimate_memory(config, small_config(tmp_path, labelled_logits_only=False), seq_len=64, label_tokens=5)
    assert labelled.logits == 10 * 2 * 5 * vocab and full.logits == 10 * 2 * 64 * vocab


def test_ddp_doubles_the_gradients_and_fsdp_shards_the_states(tmp_path):
    config = tiny_llava()[0].config
    cfg = small_config(tmp_path, lora_r=0)
    one = estimate_memory(config, cfg, seq_len=64)
    ddp = estimate_memory(config, cfg, seq_len=64, num_processes=4)
    fsdp = estimate_memory(config, cfg, seq_len=64, num_processes=4, sharding="fsdp")
    assert ddp.gradients == 2 * one.gradients and ddp.weights == one.weights
    assert fsdp.gradients == -(-one.gradients // 4) and fsdp.optimizer_states == -(-one.optimizer_states // 4)
    assert one.weights / 4 < fsdp.weights < one.weights
    with pytest.raises(ValueError, match="sharding='zero'"):
        estimate_memory(config, cfg, seq_len=64, sharding="zero")


def test_paged_optimizer_states_are_outside_the_allocator_and_8bit_ones_are_a_quarter(tmp_path):
    config = tiny_llava()[0].config
    plain = estimate_memory(config, small_config(tmp_path, lora_r=64), seq_len=64)
    paged = estimate_memory(config, small_config(tmp_path, lora_r=64, optimizer="paged_adamw_8bit"), seq_len=64)
    eight = estimate_memory(config, small_config(tmp_path, lora_r=64, optimizer="adamw_8bit"), seq_len=64)
    assert paged.optimizer_states == 0 and paged.assumptions["paged_optimizer_states_off_allocator"]
    assert eight.optimizer_states < plain.optimizer_states


def test_no_sequence_length_is_an_error_naming_the_argument(tmp_path):
    with pytest.raises(ValueError, match="pass seq_len="):
        estimate_memory(tiny_llava()[0].config, LoopConfig(output_dir=str(tmp_path)))


def test_cli_prints_the_table_or_json_and_names_a_bad_path(tmp_path, capsys):
    model, processor = tiny_llava()
    model.save_pretrained(tmp_path / "m")
    assert (
        main(["estimate", "--model.name", str(tmp_path / "m"), "--seq_len", "64", "--quantization", "4bit", "--json"])
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    expected = estimate_memory(model.config, LoopConfig(quantization="4bit"), seq_len=64)
    assert out["train_peak"] == expected.train_peak
    assert main(["estimate", "--model.name", str(tmp_path / "m"), "--seq_len", "64", "--batch_size", "8"]) == 0
    table = capsys.readouterr().out
    assert "training peak" in table and "batch 8 x 64 tokens" in table
    assert main(["estimate", "--model.name", str(tmp_path / "nothing"), "--seq_len", "64"]) == 2
    assert "no such folder" in capsys.readouterr().err
