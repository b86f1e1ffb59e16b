"""QLoRA (4-bit NF4) and 8-bit training on the CPU with bitsandbytes: loading, what stays 16-bit, fit ->
checkpoint -> exact resume, 8-bit optimizers, evaluation through dense merged copies, and the errors."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import pytest
import torch

from helpers import small_config
from llava_loop import Loop, TrainCollator
from llava_loop.checkpointing import export, list_checkpoints
from llava_loop.modeling import (
    check_model_args,
    dense_merged_layers,
    load_model,
    merged_adapters,
    model_quantization,
    prepare_model,
    quantization_config,
    sixteen_bit_modules,
)
from llava_loop.testing import synthetic_vqa, tiny_llava, tiny_vlm

QUANTIZED = {"4bit": "Params4bit", "8bit": "Int8Params"}


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory) -> str:
    """The tiny LLaVA saved as a model folder (bitsandbytes quantizes while loading one)."""
    folder = tmp_path_factory.mktemp("tiny_llava")
    model, processor = tiny_llava(seed=0)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


def weight_kinds(model) -> dict[str, str]:
    return {name: type(param).__name__ for name, param in model.named_parameters()}


# ---------------------------------------------------------------------- what is quantized
@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "idefics3"])
def test_sixteen_bit_modules_are_the_vision_tower_projector_and_lm_head_by_full_name(family):
    model, _ = tiny_vlm(family)
    keep = sixteen_bit_modules(model)
    modules = dict(model.named_modules())
    assert all(name in modules for name in keep), f"{family}: not full module names: {keep}"
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    outside = [n for n in linears if not any(n == k or n.startswith(k + ".") for k in keep)]
    language = [n for n in linears if ".language_model." in f".{n}" or ".text_model." in f".{n}"]
    assert outside and set(outside) <= set(language), (
        f"{family}: quantized linear layers outside the language model: {sorted(set(outside) - set(language))}"
    )
    head = [n for n, m in model.named_modules() if m is model.get_output_embeddings()]
    assert head[0] in keep, f"{family}: the LM head {head} is quantized: {keep}"


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_load_model_quantizes_only_the_language_model_and_keeps_the_rest_16_bit(saved_tiny, kind):
    model, _ = load_model(saved_tiny, quantization=kind)
    assert model_quantization(model) == kind
    kinds = weight_kinds(model)
    dtypes = {name: param.dtype for name, param in model.named_parameters()}
    for name, cls in kinds.items():
        decoder_linear = ".language_model.layers." in name and name.endswith("proj.weight")
        if decoder_linear:
            assert cls == QUANTIZED[kind], f"{name} is {cls}, not quantized"
        else:
            assert cls == "Parameter" and dtypes[name] == torch.bfloat16, f"{name}: {cls} {dtypes[name]}"
    projector = [n for n in kinds if "multi_modal_projector" in n]
    vision = [n for n in kinds if "vision_tower" in n]
    assert projector and vision and all(dtypes[n] == torch.bfloat16 for n in projector + vision)
    from llava_loop.loggers import _main_dtype

    # The run banner's "weights" names the quantization, not the integer storage.
    assert _main_dtype(model.model.language_model.layers) == {"4bit": "nf4", "8bit": "int8"}[kind]


def test_bare_skip_names_would_quantize_the_projector_and_full_names_do_not(saved_tiny):
    """The pitfall the full names avoid: transformers matches llm_int8_skip_modules from the start of the
    module name, so a bare "multi_modal_projector" leaves its linear layers quantized."""
    from transformers import AutoModelForImageTextToText

    config = quantization_config("4bit", tiny_llava()[0].config)
    config.llm_int8_skip_modules = ["vision_tower", "multi_modal_projector", "lm_head"]
    bare = AutoModelForImageTextToText.from_pretrained(saved_tiny, quantization_config=config, dtype=torch.bfloat16)
    assert weight_kinds(bare)["model.multi_modal_projector.linear_1.weight"] == "Params4bit", (
        "bare names now keep the projector 16-bit: sixteen_bit_modules' full names may be unnecessary"
    )
    model, _ = load_model(saved_tiny, quantization="4bit")
    assert weight_kinds(model)["model.multi_modal_projector.linear_1.weight"] == "Parameter"


# ---------------------------------------------------------------------- training, checkpoints, resume
def qlora_run(folder: str, out: Path, kind: str, **settings) -> Loop:
    model, processor = load_model(folder, quantization=kind)
    base = dict(max_steps=4, save_steps=2, grad_accum_steps=2, lora_dropout=0.1, seed=3, log_steps=0)
    loop = Loop(model, processor, small_config(out, **{**base, **settings}))
    loop.fit(synthetic_vqa(10, seed=0))
    return loop


def trainable(loop: Loop) -> dict[str, torch.Tensor]:
    model = loop.accelerator.unwrap_model(loop.model)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_quantized_fit_trains_adapters_and_projector_and_resumes_exactly(saved_tiny, tmp_path, kind):
    full = qlora_run(saved_tiny, tmp_path / "full", kind)
    weights = trainable(full)
    assert full.config.quantization == kind, "the loop did not record the model's quantization in its config"
    assert weights and all(p.dtype in (torch.float32, torch.bfloat16) for p in weights.values())
    projector = [n for n in weights if "multi_modal_projector.modules_to_save" in n]
    assert projector and all(weights[n].dtype == torch.bfloat16 for n in projector), (
        "the projector is not trained in full in 16 bit"
    )
    assert all(weights[n].dtype == torch.float32 for n in weights if "lora_" in n), "adapters are not fp32"
    first = list_checkpoints(tmp_path / "full")[0]
    saved = json.loads((first / "model" / "adapter_config.json").read_text())
    assert saved["modules_to_save"] == ["multi_modal_projector"], saved
    from safetensors import safe_open

    with safe_open(str(first / "model" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all("lora_" in k or "modules_to_save" in k or "multi_modal_projector" in k for k in keys), (
        f"the checkpoint holds base weights: {[k for k in keys if 'lora_' not in k][:3]}"
    )
    # Interrupted after step 2, resumed from its checkpoint: the same final weights, bit for bit.
    half = qlora_run(saved_tiny, tmp_path / "resumed", kind, max_steps=2)
    assert half.state.step == 2
    resumed = qlora_run(saved_tiny, tmp_path / "resumed", kind, resume_from="latest")
    assert resumed.state.step == 4 and resumed.resumed_from is not None
    got = trainable(resumed)
    for name, ref in weights.items():
        assert torch.equal(got[name], ref), f"{kind}: {name} differs after resume"


@pytest.mark.parametrize("optimizer", ["adamw_8bit", "paged_adamw_8bit"])
def test_8bit_optimizers_train_and_their_state_resumes(saved_tiny, tmp_path, optimizer):
    full = qlora_run(saved_tiny, tmp_path / "full", "4bit", optimizer=optimizer)
    inner = getattr(full.optimizer, "optimizer", full.optimizer)
    assert type(inner).__name__ == {"adamw_8bit": "AdamW8bit", "paged_adamw_8bit": "PagedAdamW8bit"}[optimizer]
    states = [s for s in inner.state.values() if "state1" in s]
    assert any(s["state1"].dtype == torch.uint8 for s in states), "no 8-bit optimizer state"
    qlora_run(saved_tiny, tmp_path / "resumed", "4bit", optimizer=optimizer, max_steps=2)
    resumed = qlora_run(saved_tiny, tmp_path / "resumed", "4bit", optimizer=optimizer, resume_from="latest")
    ref, got = trainable(full), trainable(resumed)
    for name in ref:
        assert torch.equal(got[name], ref[name]), f"{optimizer}: {name} differs after resume"


def test_fit_trains_in_train_mode_a_model_loaded_in_eval_mode(tmp_path):
    """from_pretrained returns eval mode, where gradient checkpointing and dropout are off."""

    class Probe(Loop):
        modes: list[bool] = []

        def training_step(self, batch):
            self.modes.append(self.model.training)
            return super().training_step(batch)

    model, processor = tiny_llava(seed=0)
    model.eval()
    loop = Probe(model, processor, small_config(tmp_path, max_steps=2, log_steps=0, gradient_checkpointing=True))
    loop.fit(synthetic_vqa(4))
    assert loop.modes == [True, True], f"training steps ran with model.training = {loop.modes}"


# ---------------------------------------------------------------------- mismatches and missing pieces
def test_a_config_that_disagrees_with_the_model_is_refused(saved_tiny, tmp_path):
    model, _ = tiny_llava()
    with pytest.raises(ValueError, match=r"quantization='4bit', but the model's weights are not quantized.*load_model"):
        prepare_model(model, small_config(tmp_path, quantization="4bit"))
    eight, _ = load_model(saved_tiny, quantization="8bit")
    with pytest.raises(ValueError, match=r"quantized '8bit'.*set quantization='8bit'"):
        prepare_model(eight, small_config(tmp_path, quantization="4bit"))
    with pytest.raises(ValueError, match="only be finetuned with LoRA"):
        prepare_model(eight, small_config(tmp_path, lora_r=0))


def test_missing_bitsandbytes_is_named_with_the_extra_before_any_loading(saved_tiny, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    with pytest.raises(ImportError, match=r"quantization='4bit' needs bitsandbytes.*llava_loop\[quantization\]"):
        check_model_args(saved_tiny, quantization="4bit")
    model, processor = tiny_llava()
    loop = Loop(model, processor, small_config(tmp_path, optimizer="adamw_8bit", max_steps=1))
    with pytest.raises(ImportError, match=r"optimizer='adamw_8bit' needs bitsandbytes"):
        loop.fit(synthetic_vqa(2))


def test_quantized_load_refuses_float32_compute(saved_tiny):
    with pytest.raises(ValueError, match="computes in 16 bit"):
        check_model_args(saved_tiny, dtype="float32", quantization="8bit")


# ---------------------------------------------------------------------- evaluation of a quantized base
def adapted(folder: str, kind: str):
    """A LoRA model on a quantized base, its adapters set to values a trained one might have."""
    model, processor = load_model(folder, quantization=kind)
    model = prepare_model(model, small_config("unused", quantization=kind, lora_dropout=0.0))
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.05)
    return model.eval(), processor


def inputs_of(processor, n: int = 3) -> dict:
    batch = TrainCollator(processor)(synthetic_vqa(n, seed=5))
    return {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_dense_merged_copies_compute_what_the_quantized_adapted_model_computes(saved_tiny, kind):
    from peft.tuners.lora import LoraLayer

    model, processor = adapted(saved_tiny, kind)
    inputs = inputs_of(processor)
    originals = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    with torch.no_grad():
        model.train()  # the dequantize-then-matmul path: the reference the dense copies must match
        reference = model(**inputs).logits
        model.eval()
        with merged_adapters(model):
            swapped = {n: model.get_submodule(n) for n in originals}
            merged = model(**inputs).logits
        after = model(**inputs).logits
    assert all(type(m) is torch.nn.Linear and m.weight.dtype == torch.bfloat16 for m in swapped.values()), (
        "inside merged_adapters the LoRA layers are not dense 16-bit linear layers"
    )
    assert all(model.get_submodule(n) is m for n, m in originals.items()), "the LoRA layers were not put back"
    scale = reference.abs().max()
    assert (merged - reference).abs().max() < 0.05 * scale, "dense merged logits differ beyond 16-bit rounding"
    assert (after - reference).abs().max() < 0.05 * scale
    # One layer by hand: dequantized base + scale * B @ A, rounded to bf16.
    name, layer = next(iter(originals.items()))
    dense = dense_merged_layers(model)[name]
    from peft.utils.integrations import dequantize_bnb_weight

    base = layer.get_base_layer()
    expected = dequantize_bnb_weight(base.weight, state=getattr(base, "state", None)).float()
    expected += layer.get_delta_weight("default").float()
    assert torch.equal(dense.weight, expected.to(torch.bfloat16)), f"{name}: dense weight is not base + delta"


def test_without_room_for_dense_copies_evaluation_generates_unmerged_and_says_so(saved_tiny, monkeypatch, caplog):
    from llava_loop import modeling

    model, processor = adapted(saved_tiny, "4bit")
    layers = {n: m for n, m in model.named_modules() if type(m).__name__ == "Linear4bit" and hasattr(m, "lora_A")}
    monkeypatch.setattr(modeling, "_free_memory", lambda device: 1000)  # bytes
    with caplog.at_level(logging.INFO, logger="llava_loop.modeling"), merged_adapters(model):
        assert all(model.get_submodule(n) is m for n, m in layers.items()), "swapped although nothing fits"
    assert "unmerged (slower)" in caplog.text, caplog.text


# ---------------------------------------------------------------------- export
@pytest.fixture(scope="module")
def qlora_checkpoint(saved_tiny, tmp_path_factory):
    """A 4-bit QLoRA run's last checkpoint and the trained model's logits on a fixed batch."""
    out = tmp_path_factory.mktemp("qlora_run")
    loop = qlora_run(saved_tiny, out, "4bit", lora_dropout=0.0, max_steps=3, save_steps=0)
    trained = loop.accelerator.unwrap_model(loop.model).train()  # the dequantize-then-matmul forward
    inputs = inputs_of(loop.processor)
    with torch.no_grad():
        logits = trained(**inputs).logits.float()
    return list_checkpoints(out)[-1], inputs, logits


def exported_logits(folder: Path, inputs: dict) -> torch.Tensor:
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(folder)
    inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()}
    with torch.no_grad():
        out = model(**inputs).logits.float()
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 3
    return out


def test_a_qlora_checkpoint_exports_merged_into_its_dequantized_base_in_bf16(qlora_checkpoint, tmp_path):
    checkpoint, inputs, trained = qlora_checkpoint
    out = export(checkpoint, tmp_path / "merged")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    logits = exported_logits(out, inputs)
    assert (logits - trained).abs().max() < 0.05 * trained.abs().max(), (
        "the export does not compute what the trained QLoRA model computes (merged into the original weights?)"
    )
    assert sorted(p.suffix for p in out.iterdir() if p.suffix in (".bin", ".pt", ".pkl")) == []


@pytest.mark.parametrize(("quantize", "method"), [("nf4", "bitsandbytes"), ("int8", "bitsandbytes")])
def test_quantized_export_loads_with_from_pretrained_and_keeps_vision_and_projector_16_bit(
    qlora_checkpoint, tmp_path, quantize, method
):
    from transformers import AutoModelForImageTextToText

    checkpoint, inputs, trained = qlora_checkpoint
    out = export(checkpoint, tmp_path / quantize, quantize=quantize)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == method
    assert config.get("load_in_4bit", False) == (quantize == "nf4")
    model = AutoModelForImageTextToText.from_pretrained(out)
    kinds = weight_kinds(model)
    assert (
        kinds["model.language_model.layers.0.self_attn.q_proj.weight"]
        == QUANTIZED[{"nf4": "4bit", "int8": "8bit"}[quantize]]
    )
    assert kinds["model.multi_modal_projector.linear_1.weight"] == "Parameter"
    assert kinds["lm_head.weight"] == "Parameter"
    assert all(p.suffix not in (".bin", ".pt") for p in out.iterdir()), "pickle files in the export"
    logits = exported_logits(out, inputs)  # generates too
    assert torch.isfinite(logits).all()


def test_export_quantize_errors_come_before_any_loading(qlora_checkpoint, tmp_path, monkeypatch):
    checkpoint, _, _ = qlora_checkpoint
    with pytest.raises(ValueError, match=r"quantize='int3' is invalid"):
        export(checkpoint, tmp_path / "x", quantize="int3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"int4-weight-only needs a CUDA GPU.*nf4 or int8"):
        export(checkpoint, tmp_path / "x", quantize="int4-weight-only")
    assert not (tmp_path / "x").exists()
    from llava_loop.cli import main

    assert main(["export", str(checkpoint), str(tmp_path / "y"), "--quantize", "int3"]) == 2
