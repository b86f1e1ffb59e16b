"""The training path of `Loop`: model set-up (LoRA / full finetune), which weights move, optimizer
groups and schedule, token-weighted gradient accumulation, precision, checkpointing of activations,
seeding, logging, callback events and config validation. Tiny offline LLaVA, CPU, fp32 unless said.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from llava_loop import EVENTS, EvalCollator, Loop, LoopConfig
from llava_loop.callbacks import dispatch
from llava_loop.modeling import prepare_model
from llava_loop.testing import synthetic_vqa, tiny_llava

# Answers of very different token lengths: a per-micro-batch mean would weight them wrongly.
UNEVEN_ANSWERS = [
    "red",
    "a blue square on the left",
    "green triangle",
    "it is a yellow circle on the right side of the image",
]


def config(tmp_path, **overrides) -> LoopConfig:
    """A small, fast fp32 run in ``tmp_path/out``; ``overrides`` replace any field."""
    base = {
        "output_dir": str(tmp_path / "out"),
        "max_steps": 2,
        "batch_size": 4,
        "eval_batch_size": 8,
        "learning_rate": 1e-3,
        "warmup_ratio": 0.0,
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "log_steps": 1,
        "max_new_tokens": 2,
        "precision": "fp32",
        "seed": 0,
    }
    return LoopConfig(**{**base, **overrides})


def uneven_records(n: int = 8) -> list[dict]:
    records = synthetic_vqa(n, seed=3)
    for i, r in enumerate(records):
        answer = UNEVEN_ANSWERS[i % len(UNEVEN_ANSWERS)]
        r["conversations"][1]["value"] = answer
        r["answers"] = [answer]
    return records


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


class StepLosses:
    """Records ``train/loss``, ``train/lr``, ``train/grad_norm`` and the step of every ``on_step_end``."""

    def __init__(self):
        self.steps, self.losses, self.lrs, self.grad_norms = [], [], [], []

    def on_step_end(self, loop, logs):
        self.steps.append(loop.state.step)
        self.losses.append(logs["train/loss"])
        self.lrs.append(logs["train/lr"])
        self.grad_norms.append(logs["train/grad_norm"])


class Snapshots:
    """Trainable weights after every optimizer step, keyed by step."""

    def __init__(self):
        self.weights = {}

    def on_step_end(self, loop, logs):
        self.weights[loop.state.step] = trainable(loop.model)


# ---------------------------------------------------------------------- model set-up
def test_default_lora_wraps_every_language_model_linear_and_nothing_else():
    from peft.tuners.lora import LoraLayer

    model, _ = tiny_llava(seed=0)
    lm_linears = {
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.startswith("model.language_model.")
    }
    peft_model = prepare_model(model, LoopConfig(lora_r=4))
    lora = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}
    assert lora == lm_linears, (
        f"LoRA should wrap exactly the language model's linear layers; missing {sorted(lm_linears - lora)}, "
        f"extra {sorted(lora - lm_linears)}"
    )
    names = [n for n, _ in peft_model.named_parameters()]
    for part in ("vision_tower", "multi_modal_projector", "lm_head"):
        wrapped = [n for n in names if part in n and "lora_" in n]
        assert not wrapped, f"{part} must get no LoRA, found {wrapped[:3]}"
    params = dict(peft_model.named_parameters())
    projector = [n for n in params if "multi_modal_projector.modules_to_save" in n]
    assert projector and all(params[n].requires_grad for n in projector), (
        f"the projector must be trained in full via modules_to_save, got {projector}"
    )
    frozen_parts = [n for n, p in params.items() if p.requires_grad and ("vision_tower" in n or "lm_head" in n)]
    assert not frozen_parts, f"vision tower and lm_head must stay frozen, trainable: {frozen_parts[:3]}"
    others = [
        n
        for n, p in params.items()
        if p.requires_grad and "lora_" not in n and "multi_modal_projector.modules_to_save" not in n
    ]
    assert not others, f"only LoRA weights and the projector copy may train, also trainable: {others[:3]}"


def test_a_peft_model_is_used_as_is(tmp_path):
    from peft import LoraConfig, get_peft_model

    model, processor = tiny_llava(seed=0)
    mine = get_peft_model(model, LoraConfig(r=2, target_modules=r".*language_model.*\.q_proj"))
    before = {n for n, p in mine.named_parameters() if p.requires_grad}
    loop = Loop(mine, processor, config(tmp_path, lora_r=16, max_steps=1))
    loop.fit(synthetic_vqa(4))
    model_after = loop.accelerator.unwrap_model(loop.model)
    assert model_after is mine, "a PeftModel given to Loop must be trained as is, not wrapped again"
    after = {n for n, p in model_after.named_parameters() if p.requires_grad}
    assert after == before, f"trainable parameters of a given PeftModel changed: {sorted(after ^ before)[:4]}"
    assert mine.peft_config["default"].r == 2, "the PeftModel's own LoRA rank must be kept"


@pytest.mark.parametrize("train_projector", [True, False])
def test_full_finetune_freezes_vision_tower_and_optionally_projector(train_projector):
    from peft import PeftModel

    model, _ = tiny_llava(seed=0)
    out = prepare_model(
        model,
        LoopConfig(lora_r=0, freeze_vision_tower=True, train_projector=train_projector),
    )
    assert not isinstance(out, PeftModel), "lora_r=0 must not add LoRA"
    params = dict(out.named_parameters())
    vision = [n for n in params if n.startswith("model.vision_tower.")]
    assert vision and not any(params[n].requires_grad for n in vision), "the vision tower must be frozen"
    projector = [n for n in params if n.startswith("model.multi_modal_projector.")]
    assert all(params[n].requires_grad == train_projector for n in projector), (
        f"projector requires_grad should be {train_projector}"
    )
    language = [n for n in params if n.startswith(("model.language_model.", "lm_head"))]
    assert all(params[n].requires_grad for n in language), "the language model must be trained in full"

    model, _ = tiny_llava(seed=0)
    out = prepare_model(model, LoopConfig(lora_r=0, freeze_vision_tower=False))
    assert all(p.requires_grad for p in out.parameters()), "freeze_vision_tower=False must train every weight"


@pytest.mark.parametrize("lora_r", [4, 0], ids=["lora", "full"])
def test_only_trainable_parameters_change(tmp_path, lora_r):
    model, processor = tiny_llava(seed=0)
    cfg = config(tmp_path, lora_r=lora_r, max_steps=3, weight_decay=0.1)
    model = prepare_model(model, cfg)  # then Loop uses it as is, with the same parameter names
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loop = Loop(model, processor, cfg)
    loop.fit(synthetic_vqa(8))
    after = dict(loop.accelerator.unwrap_model(loop.model).named_parameters())
    assert after.keys() == before.keys(), "parameter names changed during training"
    frozen = [n for n, p in after.items() if not p.requires_grad]
    moved = [n for n in frozen if not torch.equal(before[n], after[n])]
    assert frozen and not moved, f"frozen parameters changed: {moved[:5]}"
    train = [n for n, p in after.items() if p.requires_grad]
    still = [n for n in train if torch.equal(before[n], after[n])]
    assert train and not still, f"trainable parameters did not change after 3 steps: {still[:5]}"


# ---------------------------------------------------------------------- optimizer and schedule
def test_adamw_groups_projector_lr_and_no_decay_on_biases_and_norms(tmp_path):
    model, processor = tiny_llava(seed=0)
    cfg = config(
        tmp_path,
        lora_r=0,
        learning_rate=1e-3,
        projector_lr=2e-2,
        weight_decay=0.1,
        max_steps=1,
    )
    loop = Loop(model, processor, cfg)
    loop.fit(synthetic_vqa(4))
    assert isinstance(loop.optimizer.optimizer, torch.optim.AdamW), "the default optimizer must be AdamW"
    names = {id(p): n for n, p in loop.model.named_parameters()}
    seen = []
    for group in loop.optimizer.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            seen.append(name)
            want_lr = 2e-2 if "multi_modal_projector" in name else 1e-3
            assert group["initial_lr"] == pytest.approx(want_lr), (
                f"{name}: peak lr {group['initial_lr']}, want {want_lr}"
            )
            no_decay = p.ndim < 2 or "norm" in name or name.endswith(".bias")
            want_wd = 0.0 if no_decay else 0.1
            assert group["weight_decay"] == want_wd, f"{name}: weight_decay {group['weight_decay']}, want {want_wd}"
    trainable_names = [n for n, p in loop.model.named_parameters() if p.requires_grad]
    assert sorted(seen) == sorted(trainable_names), "every trainable parameter must be in exactly one group"
    biases = [n for n in seen if n.endswith(".bias")]
    norms = [n for n in seen if "norm" in n]
    assert biases and norms, "the test needs trainable biases and norms to mean anything"


def test_linear_schedule_with_warmup_gives_the_expected_lr_at_each_step(tmp_path):
    model, processor = tiny_llava(seed=0)
    cfg = config(tmp_path, lr_scheduler="linear", warmup_steps=2, max_steps=6, projector_lr=1e-2)
    record = StepLosses()
    loop = Loop(model, processor, cfg, callbacks=[record])
    loop.fit(synthetic_vqa(8))
    # The rate each step uses: warmup 0 -> 1e-3 over 2 steps, then linear decay to 0 at step 6.
    expected = [0.0, 5e-4, 1e-3, 7.5e-4, 5e-4, 2.5e-4]
    assert record.lrs == pytest.approx(expected), f"train/lr per step {record.lrs}, expected {expected}"
    lrs = {g["name"]: g["lr"] for g in loop.optimizer.param_groups}
    assert all(lr == pytest.approx(0.0, abs=1e-12) for lr in lrs.values()), f"lr after the last step: {lrs}"
    log = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    logged = [r["train/lr"] for r in log if "train/lr" in r]
    assert logged == pytest.approx(expected), f"metrics.jsonl train/lr {logged}, expected {expected}"


def test_projector_lr_follows_the_same_schedule(tmp_path):
    model, processor = tiny_llava(seed=0)
    cfg = config(tmp_path, lr_scheduler="linear", warmup_steps=2, max_steps=6, projector_lr=1e-2)
    seen = []

    class Groups:
        def on_step_end(self, loop, logs):
            seen.append({g["name"]: g["lr"] for g in loop.optimizer.param_groups})

    Loop(model, processor, cfg, callbacks=[Groups()]).fit(synthetic_vqa(8))
    for step, lrs in enumerate(seen[:-1], start=1):
        ratio = lrs["projector"] / lrs["main"]
        assert ratio == pytest.approx(10.0), f"step {step}: projector/main lr ratio {ratio}, want 10 ({lrs})"


# ---------------------------------------------------------------------- gradient accumulation
def _accumulation_run(tmp_path, name, batch_size, accum, loop_class=Loop, steps=3):
    model, processor = tiny_llava(seed=0)
    cfg = config(
        tmp_path / name,
        batch_size=batch_size,
        grad_accum_steps=accum,
        max_steps=steps,
        shuffle=False,
        lr_scheduler="constant",
    )
    snaps = Snapshots()
    loop_class(model, processor, cfg, callbacks=[snaps]).fit(uneven_records(8))
    return snaps.weights


def _max_diff(a: dict, b: dict) -> tuple[float, str]:
    return max((float((a[k] - b[k]).abs().max()), k) for k in a)


class NaiveMeanLoop(Loop):
    """Accumulation as often written: the mean loss of each micro-batch, averaged over micro-batches."""

    def training_step(self, batch):
        loss, tokens = super().training_step(batch)
        return loss / tokens, 1  # one "token" per micro-batch: the loop then divides by their number


class DoubleCountLoop(Loop):
    """A compute_loss that counts every label token twice (and doubles the sum): the same mean loss."""

    def compute_loss(self, outputs, batch):
        loss, tokens = super().compute_loss(outputs, batch)
        return 2 * loss, 2 * tokens


def test_a_compute_loss_with_its_own_token_count_is_normalised_by_that_count(tmp_path):
    default = _accumulation_run(tmp_path, "default", batch_size=1, accum=4)
    doubled = _accumulation_run(tmp_path, "doubled", batch_size=1, accum=4, loop_class=DoubleCountLoop)
    for step in (1, 3):
        diff, name = _max_diff(default[step], doubled[step])
        assert diff < 1e-6, (
            f"(2 x loss, 2 x tokens) must give the default update; step {step} differs by {diff:.2e} at {name}"
        )


class NoTokensLoop(Loop):
    def compute_loss(self, outputs, batch):
        loss, _ = super().compute_loss(outputs, batch)
        return loss, 0


def test_a_compute_loss_that_counts_no_tokens_is_refused_naming_the_contract(tmp_path):
    model, processor = tiny_llava(seed=0)
    loop = NoTokensLoop(model, processor, config(tmp_path, max_steps=1))
    with pytest.raises(ValueError, match=r"compute_loss returned num_tokens=0 .*return \(loss summed"):
        loop.fit(synthetic_vqa(4))


def test_uneven_answers_make_per_micro_batch_means_differ():
    from llava_loop.collators import TrainCollator

    _, processor = tiny_llava(seed=0)
    batch = TrainCollator(processor)(uneven_records(4))
    counts = (batch["labels"][:, 1:] != -100).sum(1).tolist()
    assert len(set(counts)) == 4, f"the test data needs answers of different token lengths, got {counts}"


def test_batch_4_and_accumulation_1x4_give_the_same_update(tmp_path):
    big = _accumulation_run(tmp_path, "4x1", batch_size=4, accum=1)
    small = _accumulation_run(tmp_path, "1x4", batch_size=1, accum=4)
    assert sorted(big) == [1, 2, 3] and sorted(small) == [1, 2, 3], "each run must make exactly 3 optimizer steps"
    for step in (1, 3):
        diff, name = _max_diff(big[step], small[step])
        assert diff < 1e-6, f"after {step} step(s) 4x1 and 1x4 differ by {diff:.2e} at {name}"
    # And the naive per-micro-batch mean is measurably different on this data, so the test can fail.
    naive = _accumulation_run(tmp_path, "naive", batch_size=1, accum=4, loop_class=NaiveMeanLoop)
    for step in (1, 3):
        diff, name = _max_diff(big[step], naive[step])
        assert diff > 1e-4, f"a per-micro-batch mean should differ from 4x1 after {step} step(s); max diff {diff:.2e}"


# ---------------------------------------------------------------------- precision, checkpointing, seeds
def test_bf16_autocast_runs_on_cpu_with_finite_loss(tmp_path):
    model, processor = tiny_llava(seed=0)
    dtypes = []
    model.lm_head.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    record = StepLosses()
    loop = Loop(model, processor, config(tmp_path, precision="bf16"), callbacks=[record])
    loop.fit(synthetic_vqa(8))
    assert dtypes and all(d == torch.bfloat16 for d in dtypes), f"forward did not run in bf16 autocast: {dtypes}"
    assert len(record.losses) == 2 and all(math.isfinite(x) for x in record.losses), f"losses {record.losses}"
    kinds = {p.dtype for p in loop.model.parameters() if p.requires_grad}
    assert kinds == {torch.float32}, f"trainable weights must stay fp32 under autocast, got {kinds}"


def test_gradient_checkpointing_gives_the_same_loss_and_grads(tmp_path, monkeypatch):
    from transformers import modeling_utils

    calls = []
    real = modeling_utils.checkpoint

    def spy(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return real(*args, **kwargs)

    monkeypatch.setattr(modeling_utils, "checkpoint", spy)
    records = uneven_records(4)

    def loss_and_grads(checkpointing: bool):
        model, processor = tiny_llava(seed=0)
        cfg = config(tmp_path, gradient_checkpointing=checkpointing)
        torch.manual_seed(0)  # the same LoRA initialisation both times
        model = prepare_model(model, cfg)
        model.train()
        loop = Loop(model, processor, cfg)
        loss, _ = loop.training_step(loop.train_collator(records))
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain_loss, plain = loss_and_grads(False)
    assert not calls, "checkpointing ran although gradient_checkpointing=False"
    ckpt_loss, ckpt = loss_and_grads(True)
    assert calls and all(c is False for c in calls), f"expected non-reentrant checkpoint calls, got {calls}"
    torch.testing.assert_close(ckpt_loss, plain_loss, msg="loss differs with gradient checkpointing")
    for name, grad in plain.items():
        torch.testing.assert_close(ckpt[name], grad, msg=lambda m, n=name: f"grad of {n} differs: {m}")


def test_the_same_seed_gives_identical_losses(tmp_path):
    def losses(seed: int, name: str) -> list[float]:
        model, processor = tiny_llava(seed=0)
        cfg = config(
            tmp_path / name,
            seed=seed,
            max_steps=3,
            lora_dropout=0.1,
            shuffle=True,
            batch_size=2,
        )
        record = StepLosses()
        Loop(model, processor, cfg, callbacks=[record]).fit(synthetic_vqa(8))
        return record.losses

    first, again, other = losses(7, "a"), losses(7, "b"), losses(8, "c")
    assert first == again, f"same seed, different losses: {first} vs {again}"
    assert first != other, "a different seed should shuffle and initialise differently"


# ---------------------------------------------------------------------- logging
def test_metrics_jsonl_has_train_and_eval_records_and_config_is_saved(tmp_path):
    model, processor = tiny_llava(seed=0)
    cfg = config(tmp_path, max_steps=4, log_steps=2, eval_steps=4)
    Loop(model, processor, cfg).fit(synthetic_vqa(8), synthetic_vqa(4, seed=1))
    out = tmp_path / "out"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if any(k.startswith("train/") for k in r)]
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    assert [r["step"] for r in train] == [2, 4], f"train records every log_steps=2: {[r['step'] for r in train]}"
    assert [r["step"] for r in evals] == [4], f"one eval record at step 4: {[r['step'] for r in evals]}"
    assert len(train) + len(evals) == len(records), "every record is either a train or an eval record"
    keys = (
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "train/tokens_per_s",
        "train/samples_per_s",
        "train/eta_s",
    )
    for r in train:
        missing = [k for k in keys if k not in r]
        assert not missing, f"train record at step {r['step']} lacks {missing}"
        bad = [k for k in keys if not (isinstance(r[k], float | int) and math.isfinite(r[k]) and r[k] >= 0)]
        assert not bad, f"train record at step {r['step']} has bad values for {bad}: {r}"
        assert r["train/tokens_per_s"] > 0 and r["train/samples_per_s"] > 0, f"zero throughput: {r}"
    assert train[-1]["train/eta_s"] == 0, "no time is left after the last step"
    for key in ("eval/exact_match", "eval/loss", "eval/samples"):
        assert key in evals[0], f"eval record lacks {key}: {evals[0]}"
    saved = LoopConfig.from_file(out / "config.yaml")
    assert saved == cfg, "config.yaml must round-trip to the run's config"


# ---------------------------------------------------------------------- callbacks
class Recorder:
    """Duck-typed (no `Callback` base): records every documented event with the step."""

    def __init__(self):
        self.events = []

    def on_fit_start(self, loop):
        self.events.append(("on_fit_start", loop.state.step))

    def on_epoch_start(self, loop):
        self.events.append(("on_epoch_start", loop.state.step))

    def on_step_end(self, loop, logs):
        self.events.append(("on_step_end", loop.state.step))

    def on_log(self, loop, logs):
        kind = "train" if "train/loss" in logs else "eval"
        self.events.append((f"on_log:{kind}", logs["step"]))

    def on_evaluate(self, loop, metrics, samples):
        self.events.append(("on_evaluate", loop.state.step))

    def on_save(self, loop, path):
        self.events.append(("on_save", loop.state.step))

    def on_epoch_end(self, loop):
        self.events.append(("on_epoch_end", loop.state.step))

    def on_fit_end(self, loop):
        self.events.append(("on_fit_end", loop.state.step))


def test_callback_events_come_in_the_documented_order(tmp_path):
    model, processor = tiny_llava(seed=0)
    recorder = Recorder()
    # 8 samples, batch 4: two steps per epoch; log, eval and save every 2 steps.
    cfg = config(tmp_path, max_steps=4, log_steps=2, eval_steps=2, save_steps=2)
    Loop(model, processor, cfg, callbacks=[recorder]).fit(synthetic_vqa(8), synthetic_vqa(4, seed=1))

    def epoch(last: int) -> list:
        return [
            ("on_epoch_start", last - 2),
            ("on_step_end", last - 1),
            ("on_step_end", last),
            ("on_log:train", last),
            ("on_evaluate", last),
            ("on_log:eval", last),
            ("on_save", last),
            ("on_epoch_end", last),
        ]

    expected = [("on_fit_start", 0), *epoch(2), *epoch(4), ("on_fit_end", 4)]
    assert recorder.events == expected, (
        "event order:\n"
        + "\n".join(f"{'  ' if a == b else '!!'} got {a}  expected {b}" for a, b in zip(recorder.events, expected))
        + f"\n(got {len(recorder.events)} events, expected {len(expected)})"
    )
    assert {e.split(":")[0] for e, _ in expected} == set(EVENTS), "the expected order must cover every event"


def test_on_step_end_fires_once_per_optimizer_step_not_per_micro_batch(tmp_path):
    model, processor = tiny_llava(seed=0)
    record = StepLosses()
    cfg = config(tmp_path, batch_size=2, grad_accum_steps=2, max_steps=3)
    loop = Loop(model, processor, cfg, callbacks=[record])
    loop.fit(synthetic_vqa(8))
    assert record.steps == [1, 2, 3], f"on_step_end per optimizer step expected at 1, 2, 3, got {record.steps}"
    assert loop.state.samples_seen == 12, f"3 steps x 2 micro-batches x 2 samples = 12, got {loop.state.samples_seen}"


def test_dispatch_rejects_unknown_events():
    with pytest.raises(ValueError, match="on_step_begin"):
        dispatch([Recorder()], "on_step_begin", loop=None)


def test_a_callback_can_stop_training_after_the_current_step(tmp_path):
    model, processor = tiny_llava(seed=0)

    class StopAtTwo:
        def on_step_end(self, loop, logs):
            if loop.state.step == 2:
                loop.state.should_stop = True

    recorder = Recorder()
    loop = Loop(
        model,
        processor,
        config(tmp_path, max_steps=10),
        callbacks=[StopAtTwo(), recorder],
    )
    state = loop.fit(synthetic_vqa(16))
    assert state.step == 2, f"training should stop right after step 2, stopped at {state.step}"
    names = [e for e, _ in recorder.events]
    assert names.count("on_step_end") == 2 and names[-1] == "on_fit_end", f"events after stopping: {names}"
    assert (tmp_path / "out" / "checkpoints" / "step_000002").is_dir(), "a stopped run still saves its last step"


@pytest.mark.parametrize(("eval_steps", "expected"), [(0, [3]), (2, [2, 3]), (3, [3])])
def test_fit_evaluates_once_at_the_end_whatever_eval_steps_says(tmp_path, eval_steps, expected):
    model, processor = tiny_llava(seed=0)
    recorder = Recorder()
    cfg = config(tmp_path, max_steps=3, eval_steps=eval_steps, batch_size=2)
    state = Loop(model, processor, cfg, callbacks=[recorder]).fit(synthetic_vqa(8), synthetic_vqa(2, seed=1))
    steps = [h["step"] for h in state.history]
    assert steps == expected, f"eval_steps={eval_steps}: evaluations at {steps}, expected {expected}"
    evaluated = [s for e, s in recorder.events if e == "on_evaluate"]
    assert evaluated == expected, f"on_evaluate at {evaluated}, expected {expected}"


# ---------------------------------------------------------------------- validation
def test_eval_steps_without_eval_data_fails_before_training(tmp_path):
    model, processor = tiny_llava(seed=0)
    loop = Loop(model, processor, config(tmp_path, eval_steps=2))
    with pytest.raises(ValueError, match="eval_data"):
        loop.fit(synthetic_vqa(4))
    assert loop.state.step == 0, "no step may run before the configuration error"
    assert not (tmp_path / "out" / "checkpoints").exists(), "nothing may be written for a bad configuration"


def test_metric_for_best_without_eval_data_fails(tmp_path):
    model, processor = tiny_llava(seed=0)
    loop = Loop(model, processor, config(tmp_path, metric_for_best="eval/loss"))
    with pytest.raises(ValueError, match="eval_data"):
        loop.fit(synthetic_vqa(4))


def test_metric_for_best_that_no_builtin_metric_reports_fails_at_construction(tmp_path):
    model, processor = tiny_llava(seed=0)
    with pytest.raises(ValueError, match="rougeL") as err:
        Loop(
            model,
            processor,
            config(tmp_path, metric_for_best="rougeL"),
            metrics="exact_match",
        )
    assert "eval/exact_match" in str(err.value), f"the error should list the reported keys: {err.value}"
    Loop(
        model,
        processor,
        config(tmp_path, metric_for_best="rougeL"),
        metrics=["exact_match", "rouge"],
    )


def test_metric_for_best_is_checked_against_a_custom_metrics_keys_by_a_dry_run(
    tmp_path,
):
    model, processor = tiny_llava(seed=0)

    def answer_length(predictions, references):
        return {"answer_len": sum(map(len, predictions)) / len(predictions)}

    with pytest.raises(ValueError, match="answer_length"):
        Loop(
            model,
            processor,
            config(tmp_path, metric_for_best="answer_length"),
            metrics=answer_length,
        )
    loop = Loop(
        model,
        processor,
        config(tmp_path, metric_for_best="answer_len"),
        metrics=answer_length,
    )
    assert loop.config.metric_for_best == "eval/answer_len", "a reported custom key must be accepted"


def test_training_step_refuses_eval_collator_batches(tmp_path):
    model, processor = tiny_llava(seed=0)
    loop = Loop(model, processor, config(tmp_path))
    batch = EvalCollator(processor)(synthetic_vqa(2))
    with pytest.raises(TypeError, match="EvalCollator"):
        loop.training_step(batch)
