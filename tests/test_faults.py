"""Faults at the loop level: bad samples in a LLaVA JSON file, NaN/inf steps, contradictory
settings, unwritable or full disks. Nothing may fail silently or train a loss-0 sample."""

from __future__ import annotations

import errno
import json
import logging
import math
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers import small_config
from llava_loop import Loop, LoopConfig, checkpointing
from llava_loop.callbacks import DivergenceWarning
from llava_loop.collators import IGNORE_INDEX, TrainCollator
from llava_loop.data import BadSampleError
from llava_loop.testing import draw_scene, synthetic_vqa, tiny_llava

QUESTION = "<image>\nWhat color is the shape?"
LONG_QUESTION = "<image>\n" + "Look closely at every part of the picture before you answer. " * 12


def make_config(out: Path, **overrides) -> LoopConfig:
    settings = dict(max_steps=2, lora_dropout=0.0, shuffle=False, log_steps=1, warmup_ratio=0.0, max_length=64)
    return small_config(out, **{**settings, **overrides})


def trainable(loop: Loop) -> dict[str, torch.Tensor]:
    model = loop.accelerator.unwrap_model(loop.model)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def same_weights(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------- a dataset with bad samples
def vqa(sample_id: str, image="good.png", question=QUESTION, answer="red") -> dict:
    return {
        "id": sample_id,
        "image": image,
        "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
    }


def bad_records() -> dict[str, tuple[dict, str]]:
    """id -> (record, what the error says). Images refer to files `write_images` creates."""
    return {
        "missing-image": (vqa("missing-image", image="nowhere.png"), "image file not found"),
        "corrupt-image": (vqa("corrupt-image", image="corrupt.png"), "cannot read"),
        "truncated-image": (vqa("truncated-image", image="truncated.png"), "cannot read"),
        "huge-image": (vqa("huge-image", image="huge.png"), "too large"),
        "no-conversations": ({"id": "no-conversations", "image": "good.png"}, "no 'conversations'"),
        "no-human": ({"id": "no-human", "conversations": [{"from": "gpt", "value": "red"}]}, "no human"),
        "no-assistant": (
            {"id": "no-assistant", "conversations": [{"from": "human", "value": "Hi"}]},
            "no gpt/assistant turn",
        ),
        "empty-answer": (vqa("empty-answer", answer="  "), "empty answer"),
        "extra-marker": (vqa("extra-marker", question="<image>\n<image>\nSame?"), "more <image> markers"),
        "answer-truncated": (vqa("answer-truncated", question=LONG_QUESTION), "answer entirely truncated"),
        "starts-with-gpt": (
            {
                "id": "starts-with-gpt",
                "conversations": [
                    {"from": "gpt", "value": "Hello."},
                    {"from": "human", "value": "Hi"},
                    {"from": "gpt", "value": "red"},
                ],
            },
            "turn order",
        ),
        "eos-in-answer": (vqa("eos-in-answer", answer="red</s>blue"), "special token '</s>'"),
    }


RUNTIME_BAD = ("corrupt-image", "truncated-image", "huge-image", "answer-truncated", "eos-in-answer")
"""Found only when the sample is loaded or collated, mid-training; the rest when the file is read."""


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    draw_scene("red", "circle", "left").save(folder / "good.png")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 20)
    big = tmp_path / "big.png"
    Image.effect_noise((60, 60), 64).convert("RGB").save(big)  # noise: the PNG stays large
    data = big.read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    Image.new("RGB", (120, 120), "blue").save(folder / "huge.png")
    # "Huge" relative to a lowered limit; Pillow refuses images over twice the limit.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)
    return folder


def write_json(folder: Path, records: list) -> Path:
    path = folder / "train.json"
    path.write_text(json.dumps(records, indent=1))
    return path


class CheckedLoop(Loop):
    """Fails the test if any sample reaching the model has no label token (a silent loss-0 sample)."""

    def training_step(self, batch):
        per_sample = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1)
        assert (per_sample > 0).all(), f"samples {batch['ids']} reached the model without labels: {per_sample}"
        return super().training_step(batch)


@pytest.mark.parametrize("bad_id", list(bad_records()))
def test_bad_sample_raises_naming_sample_and_file_by_default(tmp_path, data_dir, bad_id):
    record, reason = bad_records()[bad_id]
    path = write_json(data_dir, [vqa("good-0"), vqa("good-1"), record, vqa("good-2")])
    model, processor = tiny_llava(seed=0)
    loop = CheckedLoop(model, processor, make_config(tmp_path / "out"))
    with pytest.raises(BadSampleError) as err:
        loop.fit(path)
    message = str(err.value)
    assert bad_id in message and str(path) in message, f"error does not name sample and file: {message}"
    assert reason in message, f"error does not say what is wrong ({reason!r}): {message}"
    assert "on_bad_sample='skip'" in message, f"error does not say how to go on: {message}"
    if bad_id not in RUNTIME_BAD:
        assert loop.state.step == 0, f"{bad_id} is found when the file is read, yet {loop.state.step} steps ran"
    # The bad sample sits in the 2nd batch (found early: the loader reads one batch ahead).
    assert loop.state.step < 2, f"{bad_id}: the step of the bad sample's batch ran"


def test_skip_mode_completes_counts_and_logs_every_bad_sample(tmp_path, data_dir, caplog):
    bad = bad_records()
    records = [bad[b][0] for b in bad if b not in RUNTIME_BAD]
    for k, runtime_bad in enumerate(RUNTIME_BAD):  # every batch of 2 keeps one good sample
        records += [vqa(f"good-{k}"), bad[runtime_bad][0]]
    records += [vqa("good-8"), vqa("good-9")]
    path = write_json(data_dir, records)
    model, processor = tiny_llava(seed=0)
    out = tmp_path / "out"
    loop = CheckedLoop(model, processor, make_config(out, max_steps=0, num_epochs=1, on_bad_sample="skip"))
    with caplog.at_level(logging.WARNING):
        loop.fit(path)
    loadable = 2 * len(RUNTIME_BAD) + 2
    assert loop.state.step == loadable // 2, (
        f"one epoch of {loadable} loadable records in batches of 2 is {loadable // 2} steps, ran {loop.state.step}"
    )
    assert loop.state.skipped_samples == len(bad), f"skipped_samples={loop.state.skipped_samples}, want {len(bad)}"
    for bad_id in bad:
        assert any(bad_id in r.getMessage() for r in caplog.records), f"no warning names skipped sample {bad_id}"
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in logged if "train/loss" in r]
    assert train[-1]["train/skipped_samples"] == len(bad), f"last train record: {train[-1]}"
    assert all(math.isfinite(r["train/loss"]) and r["train/loss"] > 0 for r in train), (
        f"a step logged a zero or non-finite loss: {[r['train/loss'] for r in train]}"
    )


def test_a_step_whose_samples_are_all_skipped_makes_no_update(tmp_path, data_dir, caplog):
    bad = bad_records()
    records = [
        vqa("good-0"),
        vqa("good-1"),
        bad["corrupt-image"][0],
        bad["answer-truncated"][0],
        vqa("good-2"),
        vqa("good-3"),
    ]
    path = write_json(data_dir, records)
    model, processor = tiny_llava(seed=0)
    positions = []

    class Positions:
        def on_step_end(self, loop, logs):
            positions.append(loop.state.samples_in_epoch)

    # weight_decay: an AdamW step on zero gradients would still move the weights
    loop = CheckedLoop(
        model,
        processor,
        make_config(tmp_path / "out", max_steps=2, on_bad_sample="skip", weight_decay=0.1),
        callbacks=[Positions()],
    )
    with caplog.at_level(logging.WARNING):
        loop.fit(path)
    assert positions == [2, 6], f"the all-skipped 2nd batch must not be a step: steps ended at samples {positions}"
    optimizer_steps = {int(s["step"]) for s in loop.optimizer.state.values()}
    assert optimizer_steps == {2}, f"AdamW stepped {optimizer_steps} times for 2 real steps"
    assert any("were skipped: no update" in r.getMessage() for r in caplog.records), "no warning for the empty step"
    assert loop.state.skipped_samples == 2, f"skipped_samples={loop.state.skipped_samples}"


def test_a_dataset_where_every_sample_is_bad_fails_instead_of_looping(tmp_path, data_dir):
    bad = bad_records()
    path = write_json(data_dir, [bad["corrupt-image"][0], bad["truncated-image"][0]])
    model, processor = tiny_llava(seed=0)
    loop = Loop(model, processor, make_config(tmp_path / "out", on_bad_sample="skip"))
    with pytest.raises(ValueError, match="every sample was skipped"):
        loop.fit(path)


@pytest.mark.parametrize(
    ("mode", "size"),
    [
        ("L", (40, 30)),
        ("LA", (40, 30)),
        ("RGBA", (40, 30)),
        ("P", (40, 30)),
        ("CMYK", (40, 30)),
        ("I;16", (40, 30)),
        ("1", (40, 30)),
        ("RGB", (1, 1)),
        ("RGB", (1, 300)),
    ],
)
def test_non_rgb_tiny_and_extreme_aspect_images_train_with_a_finite_loss(tmp_path, data_dir, mode, size):
    name = "odd.jpg" if mode == "CMYK" else "odd.png"
    Image.new(mode, size).save(data_dir / name)
    path = write_json(data_dir, [vqa("odd", image=name), vqa("good-0")])
    model, processor = tiny_llava(seed=0)
    losses = []

    class Losses:
        def on_step_end(self, loop, logs):
            losses.append(logs["train/loss"])

    loop = CheckedLoop(model, processor, make_config(tmp_path / "out", max_steps=1), callbacks=[Losses()])
    loop.fit(path)
    assert len(losses) == 1 and math.isfinite(losses[0]), f"{mode} {size}: losses {losses}"
    assert loop.state.skipped_samples == 0, f"{mode} {size} image was skipped"


@pytest.mark.parametrize("on_bad_sample", ["raise", "skip"])
@pytest.mark.parametrize(
    ("name", "text", "where"),
    [
        ("train.json", '[\n  {"id": "a",\n   "conversations": [}\n]', "line 3, column 22"),
        ("train.jsonl", '{"id": "a", "conversations": []}\n\n{"id": "b", "conversations": [}\n', "line 3"),
    ],
)
def test_unreadable_json_fails_naming_line_and_column_even_in_skip_mode(tmp_path, name, text, where, on_bad_sample):
    path = tmp_path / name
    path.write_text(text)
    model, processor = tiny_llava(seed=0)
    loop = Loop(model, processor, make_config(tmp_path / "out", on_bad_sample=on_bad_sample))
    with pytest.raises(ValueError, match="invalid JSON") as err:
        loop.fit(path)
    assert where in str(err.value) and str(path) in str(err.value), f"error lacks file/{where}: {err.value}"


# ---------------------------------------------------------------------- NaN / inf
class _InfGrad(torch.autograd.Function):
    """Identity forward; infinite gradient backward (a finite loss with an exploding gradient)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.inf


class PoisonedLoop(Loop):
    """Poisons the loss of chosen optimizer-step attempts (1-based, grad_accum_steps=1) and records
    the trainable weights at every attempt, before its update."""

    def __init__(self, *args, poison: dict[int, str], **kwargs):
        super().__init__(*args, **kwargs)
        self.poison, self.attempts, self.before = poison, 0, []

    def compute_loss(self, outputs, batch):
        loss, tokens = super().compute_loss(outputs, batch)
        if not self.model.training:
            return loss, tokens
        self.attempts += 1
        self.before.append(trainable(self))
        kind = self.poison.get(self.attempts)
        if kind == "nan":
            return loss + math.nan, tokens
        if kind == "inf":
            return loss + math.inf, tokens
        if kind == "inf-grad":
            return _InfGrad.apply(loss), tokens
        return loss, tokens


# Fused AdamW skips a bad update on the device, and a step that does not log is counted only after
# the next one is queued; the foreach AdamW is checked on the host at once.
CHECKED = {"at once": {}, "on the device, counted late": {"fused_adamw": True, "log_steps": 0}}


@pytest.mark.parametrize("checked", CHECKED)
@pytest.mark.parametrize("kind", ["nan", "inf", "inf-grad"])
def test_non_finite_step_is_skipped_with_a_warning_and_leaves_weights_unchanged(tmp_path, kind, checked, caplog):
    model, processor = tiny_llava(seed=0)
    cfg = make_config(tmp_path, max_steps=3, weight_decay=0.1, **CHECKED[checked])
    loop = PoisonedLoop(model, processor, cfg, poison={2: kind})
    with caplog.at_level(logging.WARNING):
        loop.fit(synthetic_vqa(8))
    assert (loop.state.step, loop.attempts) == (3, 4), f"steps/attempts: {loop.state.step}/{loop.attempts}"
    assert not same_weights(loop.before[0], loop.before[1]), "a normal step changed nothing (vacuous test)"
    assert same_weights(loop.before[1], loop.before[2]), f"the skipped {kind} step changed the weights"
    warning = next((r.getMessage() for r in caplog.records if "step skipped" in r.getMessage()), None)
    assert warning is not None and "non-finite" in warning, f"no warning for the {kind} step: {caplog.text}"
    assert "synthetic-0-2" in warning, f"the warning does not name the step's samples: {warning}"
    assert loop.state.bad_steps_in_a_row == 0, "a good step did not reset the bad-step count"
    assert loop.scheduler.last_epoch == 3, f"the scheduler stepped on a skipped step: {loop.scheduler.last_epoch}"


@pytest.mark.parametrize("checked", CHECKED)
def test_too_many_non_finite_steps_in_a_row_stop_with_a_clear_error(tmp_path, checked):
    model, processor = tiny_llava(seed=0)
    loop = PoisonedLoop(
        model,
        processor,
        make_config(tmp_path, max_steps=6, max_bad_steps=2, save_steps=1, **CHECKED[checked]),
        poison={2: "nan", 3: "nan", 4: "nan"},
    )
    with pytest.raises(FloatingPointError, match=r"3 consecutive steps.*max_bad_steps=2"):
        loop.fit(synthetic_vqa(12))
    assert loop.state.step == 1, f"{loop.state.step} steps were made"
    assert [p.name for p in checkpointing.list_checkpoints(tmp_path)] == ["step_000001"], "checkpoints changed"


@pytest.mark.parametrize("checked", CHECKED)
def test_bad_steps_that_are_not_consecutive_are_tolerated(tmp_path, checked):
    model, processor = tiny_llava(seed=0)
    cfg = make_config(tmp_path, max_steps=3, max_bad_steps=1, **CHECKED[checked])
    loop = PoisonedLoop(model, processor, cfg, poison={2: "nan", 4: "inf"})
    loop.fit(synthetic_vqa(12))
    assert loop.state.step == 3, f"run stopped at step {loop.state.step}"


# ---------------------------------------------------------------------- contradictions
@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is valid on a GPU")
def test_fp16_on_cpu_is_rejected_when_the_loop_is_built(tmp_path):
    model, processor = tiny_llava(seed=0)
    with pytest.raises(ValueError, match="fp16.*CPU"):
        Loop(model, processor, make_config(tmp_path, precision="fp16"))


def test_resume_latest_without_a_checkpoint_fails_before_training(tmp_path):
    model, processor = tiny_llava(seed=0)
    loop = Loop(model, processor, make_config(tmp_path, resume_from="latest"))
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        loop.fit(synthetic_vqa(4))
    assert loop.state.step == 0, "a step ran although there was nothing to resume"


@pytest.mark.parametrize("change", [{"lora_r": 8}, {"lora_alpha": 16}, {"shuffle": False}])
def test_resume_with_a_different_model_or_data_order_setting_fails_clearly(tmp_path, change):
    # lora_alpha has no tensor of its own: its weights load fine, into a differently scaled model.
    model, processor = tiny_llava(seed=0)
    Loop(model, processor, make_config(tmp_path, max_steps=1, shuffle=True)).fit(synthetic_vqa(4))
    ((key, new),) = change.items()
    old = make_config(tmp_path, shuffle=True).to_dict()[key]
    model, processor = tiny_llava(seed=0)
    loop = Loop(
        model, processor, make_config(tmp_path, max_steps=2, resume_from="latest", **{"shuffle": True, **change})
    )
    with pytest.raises(ValueError, match="cannot resume step_000001 exactly") as err:
        loop.fit(synthetic_vqa(4))
    assert f"{key}: {old!r} -> {new!r}" in str(err.value), f"the error does not say what changed: {err.value}"


# ---------------------------------------------------------------------- disk
def test_output_dir_that_cannot_be_created_fails_before_training(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a folder")  # root ignores chmod; a file in the path stops it
    model, processor = tiny_llava(seed=0)
    loop = Loop(model, processor, make_config(blocker / "out"))
    with pytest.raises(OSError, match="not writable") as err:
        loop.fit(synthetic_vqa(4))
    assert str(blocker / "out") in str(err.value), f"the error does not name output_dir: {err.value}"
    assert loop.state.step == 0, "training started despite an unwritable output_dir"


def test_a_disk_too_small_for_one_checkpoint_fails_before_training(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpointing.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1024, 1024))
    model, processor = tiny_llava(seed=0)
    loop = Loop(model, processor, make_config(tmp_path))
    with pytest.raises(OSError, match="MiB free") as err:
        loop.fit(synthetic_vqa(4))
    assert err.value.errno == errno.ENOSPC, f"errno {err.value.errno}"
    assert loop.state.step == 0, "training started on a disk that cannot hold a checkpoint"


@pytest.mark.parametrize("failure", ["ENOSPC in a file write", "torch.save RuntimeError"])
def test_a_save_that_hits_a_full_disk_fails_clearly_and_keeps_earlier_checkpoints(tmp_path, monkeypatch, failure):
    if failure.startswith("ENOSPC"):
        real = LoopConfig.save

        def full_disk(self, path):
            if ".tmp-step_000003" in str(path):
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            return real(self, path)

        monkeypatch.setattr(LoopConfig, "save", full_disk)
    else:
        real_save = torch.save

        def failing(obj, f, *args, **kwargs):
            if ".tmp-step_000003" in str(f) and "optimizer.pt" in str(f):
                raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 832 vs 0")
            return real_save(obj, f, *args, **kwargs)

        monkeypatch.setattr(torch, "save", failing)
    model, processor = tiny_llava(seed=0)
    loop = Loop(model, processor, make_config(tmp_path, max_steps=4, save_steps=1))
    with pytest.raises(OSError, match="could not write checkpoint") as err:
        loop.fit(synthetic_vqa(8))
    message = str(err.value)
    assert "intact" in message and "resume_from='latest'" in message, f"unclear error: {message}"
    kept = checkpointing.list_checkpoints(tmp_path)
    assert [p.name for p in kept] == ["step_000001", "step_000002"], f"checkpoints after the failure: {kept}"
    root = checkpointing.checkpoints_dir(tmp_path)
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")], "the failed save left files behind"
    monkeypatch.undo()
    model, processor = tiny_llava(seed=0)
    resumed = Loop(model, processor, make_config(tmp_path, max_steps=3, resume_from="latest"))
    resumed.fit(synthetic_vqa(8))
    assert resumed.state.step == 3, f"resume after the failed save ended at step {resumed.state.step}"


# ---------------------------------------------------------------------- silent degradations
def test_partly_truncated_samples_are_counted_in_the_logs_and_the_first_is_named(tmp_path, caplog):
    model, processor = tiny_llava(seed=0)
    records = synthetic_vqa(4)
    for k in (2, 5):  # long answers: cut at max_length, but not entirely
        records.insert(
            k,
            {
                **records[0],
                "id": f"long-{k}",
                "conversations": [records[0]["conversations"][0], {"from": "gpt", "value": "red " * 12 + "circle"}],
            },
        )
    lengths = [int(b["attention_mask"].sum()) for b in (TrainCollator(processor)([r]) for r in records)]
    max_length = max(n for r, n in zip(records, lengths) if not r["id"].startswith("long")) + 2
    assert all(n > max_length for r, n in zip(records, lengths) if r["id"].startswith("long")), (
        f"test setup: long samples are not longer than max_length={max_length}: {lengths}"
    )
    out = tmp_path / "out"
    loop = CheckedLoop(model, processor, make_config(out, max_steps=0, num_epochs=1, max_length=max_length))
    with caplog.at_level(logging.WARNING):
        loop.fit(records)
    assert loop.state.truncated_samples == 2, f"truncated_samples={loop.state.truncated_samples}, want 2"
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    counts = [r.get("train/truncated_samples", 0) for r in logged if "train/loss" in r]
    assert counts == [0, 1, 2], f"train/truncated_samples per logged step: {counts}"
    warnings = [r.getMessage() for r in caplog.records if "max_length" in r.getMessage()]
    assert len(warnings) == 1 and "'long-2'" in warnings[0] and f"max_length={max_length}" in warnings[0], (
        f"expected one warning naming 'long-2' and max_length={max_length}: {warnings}"
    )


def uniform_loss_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "uniform-distribution" in r.getMessage()]


class StepLosses:
    """Records the loss of every optimizer step."""

    def __init__(self):
        self.losses: list[float] = []

    def on_step_end(self, loop, logs):
        self.losses.append(logs["train/loss"])


def test_loss_stuck_at_ln_vocab_warns_that_the_model_may_have_diverged(tmp_path, caplog):
    model, processor = tiny_llava(seed=0)
    recorder = StepLosses()
    losses = recorder.losses
    config = make_config(tmp_path, max_steps=26, learning_rate=1000.0, max_length=None, log_steps=0)
    loop = Loop(model, processor, config, callbacks=[recorder])
    with caplog.at_level(logging.WARNING):
        loop.fit(synthetic_vqa(16))
    ln_v = math.log(model.get_output_embeddings().weight.shape[0])
    assert sum(abs(x - ln_v) < 0.01 for x in losses) >= DivergenceWarning().steps, (
        f"test setup: the huge learning rate did not pin the loss at ln(V)={ln_v:.3f}: {losses}"
    )
    warnings = uniform_loss_warnings(caplog)
    assert len(warnings) == 1, f"expected one divergence warning for one stretch, got {warnings}"
    assert f"ln(V)={ln_v:.3f}" in warnings[0] and "learning rate too high" in warnings[0], (
        f"warning does not give ln(V) and the likely cause: {warnings[0]}"
    )


def test_a_run_that_learns_from_random_init_does_not_warn_about_uniform_loss(tmp_path, caplog):
    model, processor = tiny_llava(seed=0)
    recorder = StepLosses()
    losses = recorder.losses
    loop = Loop(
        model, processor, make_config(tmp_path, max_steps=30, max_length=None, log_steps=0), callbacks=[recorder]
    )
    with caplog.at_level(logging.WARNING):
        loop.fit(synthetic_vqa(16))
    ln_v = math.log(model.get_output_embeddings().weight.shape[0])
    assert abs(losses[0] - ln_v) < 0.5 and losses[-1] < ln_v - 1, (
        f"test setup: expected a random-init start near ln(V)={ln_v:.3f} that then learns: {losses}"
    )
    assert uniform_loss_warnings(caplog) == [], f"a learning run warned: {uniform_loss_warnings(caplog)}"


def test_fit_refuses_images_outside_the_data_folder_unless_the_config_allows_them(tmp_path, data_dir):
    draw_scene("blue", "square", "right").save(tmp_path / "outside.png")
    path = write_json(data_dir, [vqa("good-0"), vqa("escape", image="../outside.png")])
    model, processor = tiny_llava(seed=0)
    with pytest.raises(BadSampleError, match="'escape'.*outside the image folder"):
        Loop(model, processor, make_config(tmp_path / "refused", max_steps=1)).fit(path)
    loop = Loop(model, processor, make_config(tmp_path / "allowed", max_steps=1, allow_external_images=True))
    loop.fit(path)
    assert loop.state.step == 1 and loop.state.skipped_samples == 0, (
        f"allow_external_images=True did not train on the external image: {loop.state}"
    )
