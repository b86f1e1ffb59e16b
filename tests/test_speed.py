"""The speed levers keep results: loss only at labelled positions, checkpointing some layers,
compiled layers, fused AdamW, the static KV cache, the memory-budget arithmetic of
``gradient_checkpointing="auto"``, and what each defaults to on the CPU. Tiny offline LLaVA, CPU, fp32.
"""

from __future__ import annotations

import pytest
import torch
from test_loop import StepLosses, config, trainable, uneven_records

from llava_loop import Loop, LoopConfig, TrainCollator
from llava_loop.memory import layers_to_checkpoint
from llava_loop.modeling import decoder_layers, label_positions, logits_at, prepare_model
from llava_loop.testing import synthetic_vqa, tiny_llava


def run(tmp_path, name: str, records=None, callbacks=(), **overrides) -> tuple[Loop, StepLosses]:
    model, processor = tiny_llava()
    seen = StepLosses()
    cfg = config(tmp_path / name, **{"max_steps": 3, **overrides})
    loop = Loop(model, processor, cfg, callbacks=[seen, *callbacks])
    loop.fit(records or uneven_records(12), synthetic_vqa(5, seed=9) if overrides.get("eval_steps") else None)
    return loop, seen


def gradients(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def test_loss_at_labelled_positions_equals_the_models_own_loss_and_gradients(tmp_path):
    model, processor = tiny_llava()
    cfg = config(tmp_path)
    model = prepare_model(model, cfg)
    model.train()
    batch = TrainCollator(processor)(uneven_records(4))  # answers of different lengths: padded rows
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    reference = model(**inputs, labels=batch["labels"])
    tokens = int((batch["labels"][:, 1:] != -100).sum())
    (reference.loss * tokens).backward()
    expected = gradients(model)
    model.zero_grad(set_to_none=True)

    batch["label_positions"] = label_positions(batch["labels"])
    with logits_at(model, batch["label_positions"]):
        outputs = model(**inputs)
    loss, num_tokens = Loop(model, processor, cfg).compute_loss(outputs, batch)
    loss.backward()

    assert outputs.logits.shape[:-1] == (tokens,), f"logits only at the {tokens} labelled positions"
    assert int(num_tokens) == tokens, "normalised by the label tokens"
    assert torch.allclose(loss, reference.loss * tokens, rtol=1e-5), f"{loss} vs {reference.loss * tokens}"
    got = gradients(model)
    assert got.keys() == expected.keys() and expected, "the same parameters get gradients"
    for name in expected:
        assert torch.allclose(got[name], expected[name], rtol=1e-4, atol=1e-6), f"gradient of {name}"
    with logits_at(model, None):
        assert model(**inputs).logits.dim() == 3, "no positions: the full logits"


def test_fit_with_labelled_logits_only_trains_like_full_logits(tmp_path):
    records = uneven_records(12)
    fast, fast_seen = run(tmp_path, "labelled", records, labelled_logits_only=True, eval_steps=3)
    full, full_seen = run(tmp_path, "full", records, labelled_logits_only=False, eval_steps=3)
    assert fast_seen.losses == pytest.approx(full_seen.losses, rel=1e-5), "same per-step losses"
    assert fast_seen.grad_norms == pytest.approx(full_seen.grad_norms, rel=1e-4), "same gradient norms"
    assert fast.state.history[-1]["eval/loss"] == pytest.approx(full.state.history[-1]["eval/loss"], rel=1e-5)
    a, b = trainable(fast.model), trainable(full.model)
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), f"{name} trained the same"


def test_an_overridden_compute_loss_gets_the_full_logits(tmp_path):
    shapes = []

    class Mine(Loop):
        def compute_loss(self, outputs, batch):
            shapes.append(tuple(outputs.logits.shape[:2]))
            return super().compute_loss(outputs, batch)

    model, processor = tiny_llava()
    Mine(model, processor, config(tmp_path, max_steps=1, labelled_logits_only=True)).fit(uneven_records(4))
    assert shapes and all(len(s) == 2 and s[0] == 4 for s in shapes), f"batch x length logits, got {shapes}"


def layer_gradients(tmp_path, checkpointing) -> tuple[dict, list[bool]]:
    model, processor = tiny_llava()
    torch.manual_seed(0)
    model = prepare_model(model, config(tmp_path, gradient_checkpointing=checkpointing))
    model.train()
    batch = TrainCollator(processor)(uneven_records(4))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "labels")}
    model(**inputs).loss.backward()
    return gradients(model), [layer.gradient_checkpointing for layer in decoder_layers(model)]


def test_checkpointing_some_layers_gives_the_same_gradients_as_none_or_all(tmp_path):
    none, flags_none = layer_gradients(tmp_path, False)
    one, flags_one = layer_gradients(tmp_path, 1)
    every, flags_all = layer_gradients(tmp_path, True)
    assert flags_none == [False, False] and flags_one == [True, False] and flags_all == [True, True], (
        f"checkpointed layers: {flags_none}, {flags_one}, {flags_all}"
    )
    for name in none:
        assert torch.allclose(one[name], none[name], atol=1e-6), f"{name}: 1 of 2 layers checkpointed"
        assert torch.allclose(every[name], none[name], atol=1e-6), f"{name}: every layer checkpointed"


def test_checkpointing_more_layers_than_the_model_has_is_refused(tmp_path):
    model, processor = tiny_llava()
    with pytest.raises(ValueError, match=r"gradient_checkpointing=5.*2 decoder layers"):
        prepare_model(model, config(tmp_path, gradient_checkpointing=5))


@pytest.mark.parametrize("value", ["sometimes", -1])
def test_gradient_checkpointing_values_are_validated(value):
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        LoopConfig(gradient_checkpointing=value)


def test_generation_cache_values_are_validated():
    with pytest.raises(ValueError, match="did you mean 'static'"):
        LoopConfig(generation_cache="statics")


GIB = 2**30


def test_layers_to_checkpoint_keeps_as_many_activations_as_the_budget_holds():
    # 20 GiB with every layer checkpointed, 1 GiB more per layer kept, 4 GiB of optimizer state.
    def peak(checkpointed: int) -> float:
        return 20 * GIB + (32 - checkpointed) * GIB + 4 * GIB

    for budget in (30, 36.5, 40, 55):
        n = layers_to_checkpoint(32, 20 * GIB, 28 * GIB, 8, int(budget * GIB), extra=4 * GIB)
        assert peak(n) <= budget * GIB, f"budget {budget} GiB: {n} checkpointed layers do not fit"
        assert n == 0 or peak(n - 1) > budget * GIB, f"budget {budget} GiB: {n - 1} layers would fit too"
    assert layers_to_checkpoint(32, 20 * GIB, 28 * GIB, 8, 23 * GIB, extra=4 * GIB) == 32, "nothing fits: all"
    assert layers_to_checkpoint(32, 20 * GIB, 20 * GIB, 8, 21 * GIB) == 0, "activations free: none"


def test_auto_checkpointing_without_a_gpu_checkpoints_every_layer(tmp_path):
    loop, seen = run(tmp_path, "auto", gradient_checkpointing="auto", max_steps=1)
    flags = [layer.gradient_checkpointing for layer in decoder_layers(loop.model)]
    assert flags == [True, True] and len(seen.losses) == 1, f"checkpointed layers {flags}"


def test_cpu_defaults_compile_nothing_use_foreach_adamw_and_the_dynamic_cache(tmp_path):
    loop, _ = run(tmp_path, "defaults", max_steps=1)
    compiled = [m for m in loop.model.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert not compiled, f"compile=None compiles nothing on the CPU, got {len(compiled)} layers"
    assert not loop.optimizer.defaults["fused"], "fused_adamw=None: not fused on the CPU"
    assert loop.generation_config().cache_implementation is None, "dynamic cache on the CPU"
    cfg = LoopConfig(generation_cache="static")
    assert Loop(*tiny_llava(), cfg).generation_config().cache_implementation == "static"


def test_a_static_cache_is_refused_for_weights_in_another_dtype_than_the_compute_dtype():
    # fp32 weights under bf16 autocast: the static cache is made in fp32 and bf16 keys cannot go in it.
    cfg = LoopConfig(generation_cache="static", precision="bf16")
    with pytest.raises(ValueError, match=r'load the model in torch.bfloat16 or use generation_cache="dynamic"'):
        Loop(*tiny_llava(), cfg).generation_config()
    model, processor = tiny_llava()
    assert Loop(model.to(torch.bfloat16), processor, cfg).generation_config().cache_implementation == "static"


def test_fused_adamw_trains_like_foreach_adamw(tmp_path):
    fused, fused_seen = run(tmp_path, "fused", fused_adamw=True)
    plain, plain_seen = run(tmp_path, "foreach", fused_adamw=False)
    assert fused.optimizer.defaults["fused"] and not plain.optimizer.defaults["fused"], "the kernel asked for"
    assert fused_seen.losses == pytest.approx(plain_seen.losses, rel=1e-5)
    a, b = trainable(fused.model), trainable(plain.model)
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), f"{name} updated the same"


class Order:
    """The order of training forwards (``("forward", attempt)``) and ``on_step_end`` calls
    (``("end", step)``), and whether the run stops at a step."""

    def __init__(self, stop_at: int | None = None):
        self.events, self.stop_at = [], stop_at

    def on_step_end(self, loop, logs):
        self.events.append(("end", loop.state.step))
        if loop.state.step == self.stop_at:
            loop.state.should_stop = True


class CountedAtOnce(Loop):
    """Counts every step before the next one is queued (a wait for the GPU per step)."""

    def _can_wait(self, number):
        return False


def ordered_run(tmp_path, name, loop_class=Loop, stop_at=None, **overrides):
    model, processor = tiny_llava()
    seen, order = StepLosses(), Order(stop_at)
    settings = {"max_steps": 5, "log_steps": 0, "fused_adamw": True, "lora_dropout": 0.1, **overrides}

    class Recorded(loop_class):
        def training_step(self, batch):
            order.events.append(("forward", len(order.events)))
            return super().training_step(batch)

    loop = Recorded(model, processor, config(tmp_path / name, **settings), callbacks=[seen, order])
    loop.fit(uneven_records(24))
    return loop, seen, [kind for kind, _ in order.events]


def test_steps_counted_after_the_next_is_queued_train_exactly_like_steps_counted_at_once(tmp_path):
    late, late_seen, late_order = ordered_run(tmp_path, "late", save_steps=3)
    once, once_seen, once_order = ordered_run(tmp_path, "once", CountedAtOnce, save_steps=3)
    assert once_order == ["forward", "end"] * 5, f"counted at once: {once_order}"
    # Steps 1, 2 and 4 wait for the next forward; 3 (saves) and 5 (the last) are counted at once.
    expected = ["forward", "forward", "end", "forward", "end", "end", "forward", "forward", "end", "end"]
    assert late_order == expected, f"fused AdamW: steps counted after the next forward is queued: {late_order}"
    assert late_seen.__dict__ == once_seen.__dict__, "the same steps, losses, rates and gradient norms"
    a, b = trainable(late.model), trainable(once.model)
    assert all(torch.equal(a[n], b[n]) for n in a), "the same weights, bit for bit"
    assert late.state.state_dict() == once.state.state_dict() | {"wall_seconds": late.state.wall_seconds}


def test_a_callback_stopping_at_a_step_counted_late_drops_the_queued_next_step(tmp_path):
    late, late_seen, late_order = ordered_run(tmp_path, "late", stop_at=2)
    once, once_seen, _ = ordered_run(tmp_path, "once", CountedAtOnce, stop_at=2)
    assert late_order == ["forward", "forward", "end", "forward", "end"], f"step 3 was queued: {late_order}"
    assert late.state.step == once.state.step == 2, "the run stopped after step 2"
    assert late.state.samples_in_epoch == once.state.samples_in_epoch == 8, "the data of step 3 is not consumed"
    a, b = trainable(late.model), trainable(once.model)
    assert all(torch.equal(a[n], b[n]) for n in a), "step 3's gradients were not applied"
    assert late.optimizer.state_dict()["state"][0]["step"] == 2, "the optimizer made two steps"


class Workers:
    """The train loader's worker processes at every ``on_step_end``, with the epoch."""

    def __init__(self):
        self.seen = []

    def on_step_end(self, loop, logs):
        self.seen.append((loop.state.epoch, list(loop.train_loader._iterator._workers)))


def test_train_workers_stay_up_between_epochs_and_end_with_fit(tmp_path):
    workers = Workers()
    loop, seen = run(tmp_path, "w2", max_steps=0, num_epochs=3, num_workers=2, callbacks=[workers])
    _, alone = run(tmp_path, "w0", max_steps=0, num_epochs=3)
    assert seen.__dict__ == alone.__dict__ and len(seen.steps) == 9, "the same steps and losses as without workers"
    assert {epoch for epoch, _ in workers.seen} == {0, 1, 2}, "three epochs"
    processes = workers.seen[0][1]
    assert len(processes) == 2, "two worker processes"
    assert all([w.pid for w in ws] == [w.pid for w in processes] for _, ws in workers.seen), (
        "every epoch is loaded by the same worker processes"
    )
    assert loop.train_loader._iterator is None and not any(w.is_alive() for w in processes), "fit ends the workers"


def test_compiled_layers_train_like_eager_ones_and_evaluate_uncompiled(tmp_path):
    records = uneven_records(12)
    kwargs = {"gradient_checkpointing": 1, "eval_steps": 3}  # a checkpointed and a plain decoder layer
    compiled, compiled_seen = run(tmp_path, "compiled", records, compile=True, **kwargs)
    eager, eager_seen = run(tmp_path, "eager", records, compile=False, **kwargs)
    layers = [m for m in compiled.model.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert len(layers) == 4, f"2 decoder + 2 vision layers compiled, got {len(layers)}"
    assert compiled_seen.losses == pytest.approx(eager_seen.losses, rel=1e-4), "same losses"
    a, b = trainable(compiled.model), trainable(eager.model)
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-3, atol=1e-5), f"{name} trained the same"
    for key in ("eval/loss", "eval/exact_match"):
        assert compiled.state.history[-1][key] == pytest.approx(eager.state.history[-1][key], rel=1e-4), key


def test_static_cache_batched_greedy_equals_unbatched_and_dynamic(tmp_path):
    model, processor = tiny_llava()
    records = synthetic_vqa(7, seed=3)
    predictions = {}
    for cache in ("static", "dynamic"):
        for batch_size in (1, 4):
            cfg = config(tmp_path / f"{cache}{batch_size}", eval_batch_size=batch_size, max_new_tokens=6)
            cfg.generation_cache = cache
            result = Loop(model, processor, cfg).evaluate(records)
            predictions[cache, batch_size] = [s["prediction"] for s in result.samples]
    reference = predictions["dynamic", 1]
    assert len(set(reference)) > 1, "the tiny model's greedy answers differ between samples"
    for key, got in predictions.items():
        assert got == reference, f"{key}: {got} vs unbatched dynamic {reference}"
