"""One model spread by ``device_map`` in one process (CPU and disk here; GPUs in benchmarks/device_map_gpu.py):
layers offloaded to the disk are ``meta`` between forwards, as CPU-offloaded ones are on a GPU machine."""

import types

import pytest
import torch

from llava_loop import Loop, LoopConfig
from llava_loop.callbacks import Callback
from llava_loop.modeling import load_model
from llava_loop.testing import synthetic_vqa, tiny_llava

OFFLOADED = "model.language_model.layers.1"
MAP = {
    "model.vision_tower": "cpu",
    "model.multi_modal_projector": "cpu",
    "model.language_model.embed_tokens": "cpu",
    "model.language_model.layers.0": "cpu",
    OFFLOADED: "disk",
    "model.language_model.norm": "cpu",
    "model.language_model.rotary_emb": "cpu",
    "lm_head": "cpu",
}


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    model, processor = tiny_llava(seed=0)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


class InitialWeights(Callback):
    """Records the trainable weights at the start of fit, or (``weights`` given) starts from those."""

    def __init__(self, weights=None):
        self.weights = weights

    def on_fit_start(self, loop):
        params = {n: p for n, p in loop.model.named_parameters() if p.requires_grad}
        if self.weights is None:
            self.weights = {n: p.detach().clone() for n, p in params.items()}
        else:
            with torch.no_grad():
                for name, param in params.items():
                    param.copy_(self.weights[name])


def _config(out, **settings) -> LoopConfig:
    base = dict(
        output_dir=str(out), max_steps=3, batch_size=2, shuffle=False, lora_dropout=0.0, precision="fp32",
        learning_rate=1e-2, warmup_ratio=0.0, eval_steps=0, log_steps=1, handle_signals=False,
    )  # fmt: skip
    return LoopConfig(**{**base, **settings})


def _trained(loop) -> dict:
    return {n: p.detach().clone() for n, p in loop.model.named_parameters() if p.requires_grad}


def test_a_model_with_offloaded_layers_trains_and_evaluates_like_the_same_model_in_memory(saved_model, tmp_path):
    offloaded, processor = load_model(str(saved_model), device_map=MAP, offload_folder=str(tmp_path / "offload"))
    start = InitialWeights()
    spread = Loop(offloaded, processor, _config(tmp_path / "spread"), callbacks=[start])
    spread.fit(synthetic_vqa(8, seed=3), eval_data=synthetic_vqa(4, seed=1))

    in_memory, processor = load_model(str(saved_model))
    same = Loop(in_memory, processor, _config(tmp_path / "memory"), callbacks=[InitialWeights(start.weights)])
    same.fit(synthetic_vqa(8, seed=3), eval_data=synthetic_vqa(4, seed=1))

    base = spread.model.get_base_model().model.language_model.layers[1].self_attn.q_proj.base_layer.weight
    assert base.device.type == "meta", "the offloaded layer's weight was moved: the loop must leave a dispatched model"
    assert spread.model.hf_device_map == MAP, "the device_map changed during fit"
    lora = [n for n in start.weights if ".layers.1." in n and "lora_A" in n]
    assert lora and all(start.weights[n].abs().sum() > 0 for n in lora), (
        "the adapters of the offloaded layer were not given initial values"
    )
    spread_weights, memory_weights = _trained(spread), _trained(same)
    for name, value in memory_weights.items():
        assert torch.allclose(spread_weights[name], value, atol=1e-5), (
            f"{name}: training with an offloaded layer differs from training in memory "
            f"(max diff {(spread_weights[name] - value).abs().max():.2e})"
        )
    moved = [n for n in lora if not torch.equal(spread_weights[n], start.weights[n])]
    assert moved, "the offloaded layer's adapters did not train"
    (a,), (b,) = spread.state.history, same.state.history
    assert a["eval/loss"] == pytest.approx(b["eval/loss"], abs=1e-5), f"eval differs: {a} vs {b}"


def test_max_memory_sends_what_does_not_fit_to_the_next_device(saved_model, tmp_path):
    model, _ = load_model(
        str(saved_model), device_map="auto", max_memory={"cpu": "400KB"}, offload_folder=str(tmp_path / "offload")
    )
    devices = set(model.hf_device_map.values())
    assert devices == {"cpu", "disk"}, (
        f"max_memory cpu=400KB (of 620 KB) should push layers to the disk: {model.hf_device_map}"
    )


def test_batch_size_auto_is_refused_for_a_spread_model(saved_model, tmp_path):
    model, processor = load_model(str(saved_model), device_map=MAP, offload_folder=str(tmp_path / "offload"))
    loop = Loop(model, processor, _config(tmp_path / "run", batch_size="auto"))
    with pytest.raises(ValueError, match='batch_size="auto" measures one process') as err:
        loop.fit(synthetic_vqa(4))
    assert "device_map" in str(err.value), f"the refusal does not say why: {err.value}"


def test_a_spread_model_under_several_processes_is_refused_with_the_fix(saved_model, tmp_path):
    model, processor = load_model(str(saved_model), device_map=MAP, offload_folder=str(tmp_path / "offload"))
    loop = Loop(model, processor, _config(tmp_path / "run"))
    loop.accelerator = types.SimpleNamespace(num_processes=2)
    loop.engine, loop._spread = "ddp", True
    with pytest.raises(ValueError, match="2 processes were launched") as err:
        loop._check_engine()
    assert "without device_map" in str(err.value) and "python train.py" in str(err.value), str(err.value)
