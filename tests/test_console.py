"""What a run tells its user: the start banner, the end summary and ``summary.json`` (facts taken from the
loop's real state), and no warning noise on a normal run. Tiny offline LLaVA, CPU, fp32."""

from __future__ import annotations

import json
import logging
import math
import warnings

import pytest

from helpers import small_config
from llava_loop import Loop, TrainCollator
from llava_loop.collators import IGNORE_INDEX
from llava_loop.loggers import RunSummary, human_count
from llava_loop.testing import synthetic_vqa, tiny_llava


def test_a_normal_lora_fit_with_eval_and_save_emits_no_warnings(tmp_path, caplog):
    model, processor = tiny_llava()
    config = small_config(
        tmp_path / "out", max_steps=2, eval_steps=1, save_steps=1, max_new_tokens=2, metric_for_best="eval/exact_match"
    )
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING, logger="llava_loop"):
        warnings.simplefilter("always")
        Loop(model, processor, config).fit(synthetic_vqa(8), eval_data=synthetic_vqa(4, seed=1))
    emitted = [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught]
    assert not emitted, f"a normal fit emitted warnings: {emitted}"
    logged = [
        f"{r.name}: {r.getMessage()}"
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.name.startswith("llava_loop")
    ]
    assert not logged, f"a normal fit logged warnings: {logged}"


# ---------------------------------------------------------------------- banner and summary facts
def run(out, data, *, callbacks=None, metrics=None, eval_data=None, **settings) -> Loop:
    model, processor = tiny_llava(seed=0)
    loop = Loop(model, processor, small_config(out, **settings), metrics=metrics, callbacks=callbacks)
    loop.fit(data, eval_data=eval_data)
    return loop


def summary_of(loop: Loop) -> RunSummary:
    found = [c for c in loop.callbacks if isinstance(c, RunSummary)]
    assert len(found) == 1, f"expected exactly one RunSummary among the callbacks, found {found}"
    return found[0]


def read_summary(out) -> dict:
    def refuse(constant):
        raise ValueError(f"summary.json holds {constant}, which is not JSON")

    return json.loads((out / "summary.json").read_text(encoding="utf-8"), parse_constant=refuse)


def test_banner_facts_are_the_loops_real_numbers(tmp_path, capsys):
    # 12 samples, batch 2 x accumulation 2 on 1 process: 3 steps per epoch, 2 epochs = 6 steps.
    out = tmp_path / "out"
    loop = run(
        out,
        synthetic_vqa(12),
        num_epochs=2,
        grad_accum_steps=2,
        warmup_steps=2,
        lr_scheduler="linear",
        projector_lr=5e-3,
    )
    facts = summary_of(loop).start
    model = loop.accelerator.unwrap_model(loop.model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    expected = {
        "train_examples": 12,
        "steps_per_epoch": 3,
        "epochs": 2.0,
        "max_steps": 6,
        "batch_size": 2,
        "grad_accum_steps": 2,
        "num_processes": 1,
        "effective_batch_size": 4,
        "trainable_params": trainable,
        "all_params": total,
        "precision": "fp32",
        "weight_dtype": "float32",
        "finetune": "LoRA",
        "lora_r": 4,
        "lora_alpha": 8,
        "learning_rates": {"main": 1e-2, "projector": 5e-3},
        "lr_scheduler": "linear",
        "warmup_steps": 2,
        "eval_examples": None,
        "resumed_from": None,
        "summary_file": str(out / "summary.json"),
    }
    got = {k: facts[k] for k in expected}
    assert got == expected, f"banner facts differ from the loop's set-up: {got} != {expected}"
    assert 0 < trainable < total and math.isclose(facts["trainable_percent"], 100 * trainable / total), (
        f"trainable share {facts['trainable_percent']}% is not {trainable}/{total}"
    )
    printed = capsys.readouterr().out
    assert printed.count("***** Running training *****") == 1 and printed.count("***** Training finished") == 1, (
        f"banner and summary should each be printed once on stdout (tqdm.write), got:\n{printed}"
    )


def test_tokens_seen_equal_the_tokens_of_the_collated_samples(tmp_path):
    # Two whole epochs of 8 samples: every sample is seen twice, whatever the order and batching
    # (padding is not in the attention mask, and column 0 of a row, never a label, is what the loss shift drops).
    records = synthetic_vqa(8, seed=2)
    out = tmp_path / "out"
    loop = run(out, records, batch_size=4, num_epochs=2)
    collate = TrainCollator(loop.processor)
    tokens = labels = 0
    for r in records:
        batch = collate([r])
        tokens += int(batch["attention_mask"].sum())
        labels += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    summary = read_summary(out)
    got = (summary["samples_seen"], summary["tokens_seen"], summary["label_tokens_seen"])
    assert got == (16, 2 * tokens, 2 * labels), (
        f"(samples, tokens, label tokens) seen {got}, counted {(16, 2 * tokens, 2 * labels)}"
    )
    assert summary["step"] == summary["max_steps"] == 4 and summary["stop_reason"] == "completed", (
        f"a run that did all its steps: {summary['step']}/{summary['max_steps']}, {summary['stop_reason']}"
    )


def test_a_resumed_runs_summary_covers_the_whole_run(tmp_path):
    records = synthetic_vqa(8, seed=2)
    run(tmp_path / "a", records, max_steps=4)
    straight = read_summary(tmp_path / "a")
    run(tmp_path / "b", records, max_steps=2)
    first = read_summary(tmp_path / "b")
    loop = run(tmp_path / "b", records, max_steps=4, resume_from="latest")
    start, resumed = summary_of(loop).start, read_summary(tmp_path / "b")
    assert start["resumed_at_step"] == 2 and start["resumed_from"].endswith("step_000002"), (
        f"the banner of a resumed run should name step 2 of step_000002: {start}"
    )
    for key in ("samples_seen", "tokens_seen", "label_tokens_seen"):
        assert resumed[key] == straight[key], f"{key}: resumed run {resumed[key]}, uninterrupted {straight[key]}"
    assert resumed["resumed_at_step"] == 2 and resumed["wall_seconds"] > resumed["session_seconds"] > 0, (
        f"time should cover both sessions: total {resumed['wall_seconds']}, this one {resumed['session_seconds']}"
    )
    # The first session's time up to the checkpoint it resumed from is carried over (what it spent after
    # it, writing that checkpoint, is redone time and not counted: comparing with its total would depend
    # on how fast the disk is).
    trainer_state = json.loads((tmp_path / "b" / "checkpoints" / "step_000002" / "trainer_state.json").read_text())
    carried = trainer_state["loop_state"]["wall_seconds"]
    assert 0 < carried <= first["wall_seconds"], (carried, first["wall_seconds"])
    assert resumed["wall_seconds"] >= carried + resumed["session_seconds"] - 1e-6, (
        "the first session's time was lost on resume"
    )


def test_summary_names_the_best_and_last_checkpoints_and_the_best_evaluation(tmp_path):
    score_at_step = {1: 0.2, 2: 0.9, 3: 0.4}  # best at step 2

    def fake(predictions, references):
        return {"fake": score_at_step[loop_steps[-1]]}

    class Steps:
        def on_step_end(self, loop, logs):
            loop_steps.append(loop.state.step)

    loop_steps: list[int] = []
    out = tmp_path / "out"
    loop = run(
        out,
        synthetic_vqa(8),
        eval_data=synthetic_vqa(4, seed=1),
        metrics={"fake": fake},
        callbacks=[Steps()],
        max_steps=3,
        eval_steps=1,
        max_new_tokens=2,
        metric_for_best="eval/fake",
        greater_is_better=True,
    )
    summary = read_summary(out)
    best = summary["best"]
    at_two = next(h for h in loop.state.history if h["step"] == 2)
    assert (best["step"], best["metric"], best["value"]) == (2, "eval/fake", 0.9), f"best: {best}"
    assert best["metrics"] == {k: v for k, v in at_two.items() if k != "step"}, (
        f"best metrics {best['metrics']} are not those of the step-2 evaluation {at_two}"
    )
    assert best["checkpoint"].endswith("step_000002") and summary["last_checkpoint"].endswith("step_000003"), (
        f"best {best['checkpoint']}, last {summary['last_checkpoint']}"
    )
    assert summary["final_eval"] == loop.state.history[-1] and summary["final_eval"]["step"] == 3, (
        f"final eval {summary['final_eval']} is not the last evaluation {loop.state.history[-1]}"
    )


def test_summary_gives_the_stop_reason_of_a_run_stopped_early(tmp_path):
    class StopAtTwo:
        def on_step_end(self, loop, logs):
            if loop.state.step == 2:
                loop.state.should_stop = True

    out = tmp_path / "out"
    run(out, synthetic_vqa(16), callbacks=[StopAtTwo()], max_steps=6)
    summary = read_summary(out)
    assert (summary["step"], summary["max_steps"], summary["stop_reason"]) == (2, 6, "stopped by a callback"), (
        f"early stop not reported: {summary['step']}/{summary['max_steps']} {summary['stop_reason']}"
    )


def test_a_run_summary_passed_in_replaces_the_default_and_can_be_silenced(tmp_path, capsys):
    out = tmp_path / "out"
    loop = run(out, synthetic_vqa(4), callbacks=[RunSummary(show=False)], max_steps=1)
    assert summary_of(loop).show is False, "the default RunSummary was added next to the one passed in"
    printed = capsys.readouterr().out
    assert "Running training" not in printed and "Training finished" not in printed, f"show=False printed:\n{printed}"
    assert read_summary(out)["step"] == 1, "show=False must still write summary.json"
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".summary.json")]
    assert not leftovers, f"the atomic write left temporary files {leftovers}"


@pytest.mark.parametrize(
    "n, text", [(7_063_427_072, "7.06B"), (1_200_000, "1.2M"), (999_999, "1M"), (14_532, "14.5k"), (999, "999")]
)
def test_counts_are_shown_in_human_units(n, text):
    assert human_count(n) == text, f"human_count({n}) = {human_count(n)!r}, want {text!r}"
