"""Generation-based evaluation: batching, ordering, eval loss, merged LoRA, DDP, outputs, best model.

Most tests evaluate a tiny LLaVA that was LoRA-trained for a few dozen steps (module fixture), so
its greedy answers depend on the image and the question rather than being identical noise. The eval
records mix single-turn image questions, multi-turn conversations, text-only records and a system
prompt, so prompts differ in length and left padding is exercised.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from helpers import launch_two_processes
from llava_loop import Callback, Loop, LoopConfig
from llava_loop.checkpointing import best_checkpoint
from llava_loop.collators import EvalBatchCollator, EvalCollator, TrainCollator, answer_continuations
from llava_loop.data import as_dataset
from llava_loop.metrics import Metric
from llava_loop.modeling import (
    generation_cache,
    language_model_lora_targets,
    lora_layers,
    merged_adapters,
    rewind_cache,
)
from llava_loop.testing import COLORS, synthetic_vqa, tiny_llava
from llava_loop.trackers import TrackerLogger

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_KEYS = {"id", "image", "prompt", "prediction", "references", "scores"}


def tensors(batch: dict) -> dict:
    """The model inputs of a collated batch (drops ids, references, prompts, ...)."""
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}


# --------------------------------------------------------------------------- data and fixtures
def mixed_records(n: int, seed: int) -> list[dict]:
    """Image questions, multi-turn, text-only and system-prompt records, prompts of many lengths."""
    records = []
    colors = list(COLORS)
    for i, record in enumerate(synthetic_vqa(n, seed=seed)):
        question = record["conversations"][0]["value"].replace("<image>\n", "")
        answer = record["conversations"][1]["value"]
        kind = i % 4
        if kind == 1:
            # Multi-turn: the image is in the first turn, the scored answer in the last.
            record["conversations"] = [
                {"from": "human", "value": "<image>\nHow many shapes are there?"},
                {"from": "gpt", "value": "one"},
                {"from": "human", "value": question},
                {"from": "gpt", "value": answer},
            ]
        elif kind == 2:
            # Text-only, of different lengths.
            word = colors[i % len(colors)]
            prompt = "Answer with one word. " * (1 + i % 3) + f"Say {word}."
            turns = [{"from": "human", "value": prompt}, {"from": "gpt", "value": word}]
            record = {"id": record["id"], "image": None, "conversations": turns}
            record["answers"] = [word]
        elif kind == 3:
            system = {"from": "system", "value": "Answer with one word."}
            record["conversations"].insert(0, system)
        records.append(record)
    return records


def config(tmp_path, **overrides) -> LoopConfig:
    base = {
        "output_dir": str(tmp_path),
        "batch_size": 16,
        "learning_rate": 5e-3,
        "lora_dropout": 0.0,
        "precision": "fp32",
        "log_steps": 0,
        "max_new_tokens": 4,
        "eval_batch_size": 8,
        "handle_signals": False,
        "warmup_ratio": 0.0,
    }
    return LoopConfig(**{**base, **overrides})


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: the toy model gains nothing from more, and on a busy 2-core runner
    OpenMP threads spinning against each other make every step 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny LLaVA LoRA-trained for 40 steps on mixed records: ``(peft_model, processor)``."""
    model, processor = tiny_llava(seed=0)
    loop = Loop(model, processor, config(tmp_path_factory.mktemp("train"), max_steps=40))
    loop.fit(mixed_records(256, seed=0))
    return loop.accelerator.unwrap_model(loop.model), processor


@pytest.fixture(scope="module")
def eval_records():
    return mixed_records(24, seed=1)


def predictions_file(output_dir, step: int = 0) -> list[dict]:
    path = Path(output_dir) / "predictions" / f"step_{step:06d}.jsonl"
    assert path.is_file(), f"evaluate wrote no predictions file {path}"
    return [json.loads(line) for line in path.read_text().splitlines()]


def sample_rows(result) -> list[dict]:
    """The rows of an `EvalResult` as the predictions file holds them (without the dataset index)."""
    return [{k: v for k, v in row.items() if k != "index"} for row in result.samples]


def evaluate(model, processor, records, output_dir, metrics=None, loop_class=Loop, **overrides):
    loop = loop_class(model, processor, config(output_dir, **overrides), metrics=metrics)
    summary = loop.evaluate(records)
    return loop, summary, sample_rows(summary)


# --------------------------------------------------------------------------- batching and order
def test_batched_greedy_predictions_equal_unbatched(trained, eval_records, tmp_path):
    model, processor = trained
    _, one, single = evaluate(model, processor, eval_records, tmp_path / "bs1", eval_batch_size=1)
    _, eight, batched = evaluate(model, processor, eval_records, tmp_path / "bs8", eval_batch_size=8)

    singles = [r["prediction"] for r in single]
    assert len(set(singles)) >= 4 and one["eval/exact_match"] >= 0.3, (
        f"the trained model's predictions look like noise ({singles}); the comparison would prove nothing"
    )
    mismatched = [(r["id"], a, b) for r, a, b in zip(single, singles, [r["prediction"] for r in batched]) if a != b]
    assert not mismatched, f"left-padded batches of 8 change greedy predictions (id, bs1, bs8): {mismatched}"
    assert one["eval/loss"] == pytest.approx(eight["eval/loss"], rel=1e-5), (
        f"eval/loss depends on the batch size: {one['eval/loss']} (bs1) vs {eight['eval/loss']} (bs8)"
    )


def test_left_padded_generation_scores_match_unpadded(trained, eval_records):
    """Stronger than equal text: every step's logits of a left-padded batch row equal the row alone
    (position ids and attention mask must both ignore the padding)."""
    model, processor = trained
    model.eval()
    collator = EvalCollator(processor)
    kwargs = {
        "max_new_tokens": 4,
        "do_sample": False,
        "output_scores": True,
        "return_dict_in_generate": True,
        "pad_token_id": processor.tokenizer.pad_token_id,
    }
    records = eval_records[:8]
    with torch.no_grad():
        batch = collator(records)
        assert (batch["attention_mask"] == 0).any(), "the batch has no left padding; pick records of different lengths"
        together = model.generate(**tensors(batch), **kwargs)
        for row, record in enumerate(records):
            alone = model.generate(**tensors(collator([record])), **kwargs)
            for step, scores in enumerate(alone.scores):
                diff = (together.scores[step][row] - scores[0]).abs().max().item()
                assert diff < 1e-4, f"{record['id']}: logits of step {step} differ by {diff:.2e} when left padded"


def test_predictions_come_back_in_dataset_order_though_longest_prompts_go_first(trained, eval_records, tmp_path):
    class Recording(Loop):
        def generate(self, batch):
            self.seen.append((batch["input_ids"].shape[1], list(batch["ids"])))
            return super().generate(batch)

    model, processor = trained
    loop = Recording(model, processor, config(tmp_path, eval_batch_size=5))
    loop.seen = []
    result = loop.evaluate(eval_records)

    dataset_ids = [r["id"] for r in eval_records]
    processed = [i for _, ids in loop.seen for i in ids]
    widths = [w for w, _ in loop.seen]
    assert sorted(processed) == sorted(dataset_ids) and len(processed) == len(set(processed)), (
        f"every sample must be generated exactly once, got {processed}"
    )
    assert processed != dataset_ids, "batches were not reordered by prompt length"
    assert widths == sorted(widths, reverse=True), f"batches are not longest-prompt first: widths {widths}"
    assert [r["index"] for r in result.samples] == list(range(len(eval_records))), "samples lack their index"
    rows = sample_rows(result)
    assert [r["id"] for r in rows] == dataset_ids, "the evaluated samples are not in dataset order"
    assert all(set(r) == {"id", "prompt", "prediction", "references", "scores"} for r in rows), (
        f"unexpected sample fields: {sorted(rows[0])}"
    )
    first = rows[0]
    assert first["references"] == eval_records[0]["answers"] and "ASSISTANT:" in first["prompt"], (
        f"row 0 does not describe record 0: {first}"
    )


def test_eval_loss_is_token_weighted_over_the_whole_set(trained, tmp_path):
    model, processor = trained
    records = mixed_records(7, seed=2)
    loop, summary, _ = evaluate(model, processor, records, tmp_path, eval_batch_size=3)

    collator = TrainCollator(processor)
    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for record in records:  # one record at a time: no padding, no batching
            batch = collator([record])
            outputs = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                **({"pixel_values": batch["pixel_values"]} if "pixel_values" in batch else {}),
            )
            loss, count = loop.compute_loss(outputs, batch)
            total += float(loss)
            tokens += int(count)
    assert summary["eval/loss"] == pytest.approx(total / tokens, rel=1e-5), (
        f"eval/loss {summary['eval/loss']} is not the token-weighted mean over all samples {total / tokens}"
    )


# --------------------------------------------------------------------------- eval loss from the generation cache
def single_turn(records: list[dict]) -> list[dict]:
    """The records of `mixed_records` without a second turn: image and text-only, with and without a
    system prompt, answers of different token lengths."""
    return [r for r in records if sum(t["from"] == "gpt" for t in r["conversations"]) == 1]


def count_full_forwards(monkeypatch) -> list:
    """Record every teacher-forced full forward `Loop._forward` runs (its batch size)."""
    calls = []
    forward = Loop._forward

    def spy(self, model, batch):
        calls.append(batch["input_ids"].shape[0])
        return forward(self, model, batch)

    monkeypatch.setattr(Loop, "_forward", spy)
    return calls


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_eval_loss_read_off_the_generation_cache_equals_the_full_forward(trained, cache, tmp_path, monkeypatch):
    model, processor = trained
    records = single_turn(mixed_records(16, seed=3))
    answers = {len(processor.tokenizer(r["conversations"][-1]["value"]).input_ids) for r in records}
    assert len(records) >= 10 and len(answers) >= 2, "the check needs answers of several token lengths"
    calls = count_full_forwards(monkeypatch)
    loop = Loop(model, processor, config(tmp_path, eval_batch_size=4, generation_cache=cache))
    checked = loop.evaluate(records)
    assert calls == [4] and loop._loss_from_cache is True, (
        f"the first cached batch is checked against one full forward, then trusted: {calls}, {loop._loss_from_cache}"
    )
    cached = loop.evaluate(records)
    assert calls == [4], f"an evaluation with the cached loss still ran full forwards: {calls[1:]}"

    loop._loss_from_cache = False  # the full forward for every batch
    full = loop.evaluate(records)
    assert len(calls) == 1 + -(-len(records) // 4), f"the full forward did not run for every batch: {calls}"
    assert cached["eval/loss"] == pytest.approx(full["eval/loss"], rel=1e-5), (
        f"eval loss from the cache {cached['eval/loss']} != full forward {full['eval/loss']}"
    )
    assert checked["eval/loss"] == pytest.approx(full["eval/loss"], rel=1e-5), "the checked evaluation's loss"
    assert sample_rows(cached) == sample_rows(full), "reading the loss off the cache changed the predictions"


def test_multi_turn_batches_and_an_overridden_generate_take_the_full_forward(trained, tmp_path, monkeypatch):
    model, processor = trained
    records = mixed_records(16, seed=4)
    multi = [r for r in records if r not in single_turn(records)]
    calls = count_full_forwards(monkeypatch)
    loop = Loop(model, processor, config(tmp_path / "a", eval_batch_size=2))
    loop.evaluate(multi + single_turn(records)[:2])  # one batch mixes both kinds
    assert calls == [2, 2, 2] and loop._loss_from_cache is None, (
        f"batches with a multi-turn conversation (earlier answers are trained too) need the full forward: {calls}"
    )

    class Shouting(Loop):
        def generate(self, batch):
            answers, count = super().generate(batch)
            return [a.upper() for a in answers], count

    calls.clear()
    Shouting(model, processor, config(tmp_path / "b", eval_batch_size=4)).evaluate(single_turn(records)[:8])
    assert calls == [4, 4], f"an overridden generate keeps no cache to read: {calls}"


def test_a_cached_loss_that_disagrees_with_the_full_forward_is_dropped_with_a_warning(
    trained, tmp_path, monkeypatch, caplog
):
    model, processor = trained
    records = single_turn(mixed_records(12, seed=5))
    reference = Loop(model, processor, config(tmp_path / "a", eval_batch_size=4))
    reference._loss_from_cache = False
    expected = reference.evaluate(records)["eval/loss"]

    read = Loop._loss_from_generation

    def off_by_one(self, out, gen, answers):
        loss, tokens = read(self, out, gen, answers)
        return loss + tokens, tokens  # one nat per token more

    monkeypatch.setattr(Loop, "_loss_from_generation", off_by_one)
    loop = Loop(model, processor, config(tmp_path / "b", eval_batch_size=4))
    with caplog.at_level("WARNING", logger="llava_loop.loop"):
        summary = loop.evaluate(records)
    assert loop._loss_from_cache is False and "differs from the full forward" in caplog.text, caplog.text
    assert summary["eval/loss"] == pytest.approx(expected, rel=1e-6), "the full forward's loss is reported"


def test_answer_continuations_are_what_each_conversation_adds_after_its_prompt(trained):
    _, processor = trained
    records = single_turn(mixed_records(8, seed=6))
    gen, loss = EvalCollator(processor)(records), TrainCollator(processor)(records)
    answers = answer_continuations(gen, loss)
    for i in range(len(records)):
        prompt = gen["input_ids"][i][gen["attention_mask"][i].bool()]
        rest = answers["input_ids"][i][answers["attention_mask"][i].bool()]
        kept = loss["attention_mask"][i].bool()
        assert torch.equal(torch.cat([prompt, rest]), loss["input_ids"][i][kept]), f"row {i}: prompt + answer"
        labels = answers["labels"][i][answers["attention_mask"][i].bool()]
        assert torch.equal(labels, loss["labels"][i][kept][len(prompt) :]), f"row {i}: the answer's labels"
        assert (labels != -100).any(), f"row {i}: the answer is trained"
    assert (answers["labels"][answers["attention_mask"] == 0] == -100).all(), "padding is not trained"

    multi = mixed_records(4, seed=6)  # record 1 has two turns
    assert answer_continuations(EvalCollator(processor)(multi), TrainCollator(processor)(multi)) is None
    other = TrainCollator(processor)(records[::-1])
    assert answer_continuations(gen, other) is None, "batches of different records"


def test_rewind_cache_cuts_back_only_what_it_can_hold(trained):
    model, processor = trained
    batch = tensors(EvalCollator(processor)(single_turn(mixed_records(4, seed=7))))
    model.eval()
    with torch.no_grad():
        for cache in ("dynamic", "static"):
            out = model.generate(
                **batch, max_new_tokens=3, min_new_tokens=3, return_dict_in_generate=True, cache_implementation=cache
            )
            kv, length = generation_cache(out), batch["input_ids"].shape[1]
            assert int(kv.get_seq_length()) == length + 2, f"{cache}: the last new token is never cached"
            if cache == "static":
                assert not rewind_cache(kv, length, room=10_000), "a static cache has no room for 10,000 more"
                assert int(kv.get_seq_length()) == length + 2, "a refused rewind leaves the cache as it was"
            assert rewind_cache(kv, length, room=3), f"{cache}: rewinding to the prompt"
            assert int(kv.get_seq_length()) == length, f"{cache}: the cache holds the prompt only"
            assert not rewind_cache(kv, length + 1, room=0), "a cache cannot grow by rewinding"


def test_generation_config_follows_loop_config(trained, tmp_path):
    model, processor = trained
    loop = Loop(model, processor, config(tmp_path, max_new_tokens=2))
    greedy = loop.generation_config()
    got = (greedy.do_sample, greedy.num_beams, greedy.max_new_tokens, greedy.use_cache)
    assert got == (False, 1, 2, True), f"default generation must be greedy, cached, 2 tokens: {got}"
    assert greedy.temperature is None and greedy.top_p is None, "greedy keeps sampling settings"

    cfg = config(tmp_path, do_sample=True, temperature=0.7, top_p=0.9, num_beams=3)
    sampled = Loop(model, processor, cfg)
    gen = sampled.generation_config()
    got = (gen.do_sample, gen.temperature, gen.top_p, gen.num_beams)
    assert got == (True, 0.7, 0.9, 3), f"sampling settings were not passed on: {got}"


def test_generation_respects_max_new_tokens(trained, eval_records, tmp_path):
    class Counting(Loop):
        def generate(self, batch):
            predictions, new_tokens = super().generate(batch)
            self.counts.append(new_tokens)
            return predictions, new_tokens

    model, processor = trained
    loop = Counting(model, processor, config(tmp_path, max_new_tokens=2, eval_batch_size=1))
    loop.counts = []
    summary = loop.evaluate(eval_records[:6])
    per_sample = loop.counts  # eval_batch_size=1: one sample per generate call
    assert all(1 <= n <= 2 for n in per_sample), f"max_new_tokens=2 but samples got {per_sample} tokens"
    assert summary["eval/gen_tokens_per_s"] > 0, "eval/gen_tokens_per_s is missing or zero"


@pytest.mark.parametrize("settings", [{"num_beams": 3}, {"do_sample": True, "temperature": 2.0}])
def test_beam_search_and_sampling_run_and_leave_the_rng_alone(trained, eval_records, settings, tmp_path):
    model, processor = trained
    loop = Loop(model, processor, config(tmp_path, max_new_tokens=3, **settings))
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        summary = loop.evaluate(eval_records[:8])
        runs.append([r["prediction"] for r in summary.samples])
        after = torch.rand(3)
        torch.manual_seed(123)
        assert torch.equal(after, torch.rand(3)), f"evaluate with {settings} moved the global torch RNG"
    assert summary["eval/samples"] == 8, f"{settings}: evaluated {summary['eval/samples']} of 8 samples"
    assert runs[0] == runs[1], f"two evaluations with {settings} gave different predictions: {runs}"


# --------------------------------------------------------------------------- merged LoRA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_adapters_restore_base_weights_bit_exactly(dtype):
    model, processor = tiny_llava(seed=0)
    targets = language_model_lora_targets(model)
    # Random A and B (not the no-op init), so merging really changes the weights.
    model = get_peft_model(
        model,
        LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False),
    )
    model.to(dtype).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = EvalCollator(processor)(synthetic_vqa(2))
    inputs = tensors(batch)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    with torch.no_grad():
        unmerged = model(**inputs).logits.float()
        with merged_adapters(model):
            assert all(layer.merged for layer in lora_layers(model)), "adapters are not merged inside the context"
            merged = model(**inputs).logits.float()
    # bf16 rounds W + BA to 8 bits of mantissa.
    tolerance = 1e-4 if dtype == torch.float32 else 0.15
    assert torch.allclose(merged, unmerged, atol=tolerance), (
        f"merged logits differ from unmerged by {(merged - unmerged).abs().max():.2e}"
    )
    assert not any(layer.merged for layer in lora_layers(model)), "adapters are still merged after the context"
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert not changed, f"merge + restore changed {len(changed)} tensors in {dtype}, e.g. {changed[:3]}"

    model.merge_adapter()  # what the backup is for: unmerge alone is not exact
    model.unmerge_adapter()
    drift = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert drift, f"plain merge/unmerge was exact in {dtype}; this test no longer shows the backup matters"


def test_merging_for_eval_gives_the_same_predictions(trained, eval_records, tmp_path):
    model, processor = trained
    _, on, merged = evaluate(model, processor, eval_records, tmp_path / "on", merge_lora_for_eval=True)
    _, off, unmerged = evaluate(model, processor, eval_records, tmp_path / "off", merge_lora_for_eval=False)
    assert [r["prediction"] for r in merged] == [r["prediction"] for r in unmerged], (
        "greedy predictions differ between merged and unmerged adapters"
    )
    assert on["eval/loss"] == pytest.approx(off["eval/loss"], rel=1e-5), (
        f"eval/loss differs with merged adapters: {on['eval/loss']} vs {off['eval/loss']}"
    )


class StepLosses(Callback):
    def __init__(self):
        self.losses = []

    def on_step_end(self, loop, logs):
        self.losses.append(logs["train/loss"])


def _train_with_evals(tmp_path, eval_steps: int, merge: bool):
    model, processor = tiny_llava(seed=0)
    losses = StepLosses()
    # LoRA dropout, so that training draws from the RNG that evaluation must not disturb.
    cfg = config(
        tmp_path,
        max_steps=6,
        batch_size=8,
        eval_steps=eval_steps,
        merge_lora_for_eval=merge,
        lora_dropout=0.1,
        max_new_tokens=3,
    )
    loop = Loop(model, processor, cfg, callbacks=[losses])
    loop.fit(mixed_records(48, seed=0), mixed_records(6, seed=1) if eval_steps else None)
    weights = {n: p.detach().clone() for n, p in loop.accelerator.unwrap_model(loop.model).named_parameters()}
    return loop, weights, losses.losses


def test_training_continues_bit_identically_after_merged_evaluations(tmp_path):
    merged_loop, merged, merged_losses = _train_with_evals(tmp_path / "merged", eval_steps=2, merge=True)
    _, unmerged, unmerged_losses = _train_with_evals(tmp_path / "unmerged", eval_steps=2, merge=False)
    _, no_eval, no_eval_losses = _train_with_evals(tmp_path / "none", eval_steps=0, merge=True)

    assert [h["step"] for h in merged_loop.state.history] == [2, 4, 6], "expected evaluations at steps 2, 4, 6"
    for name, other, other_losses in (
        ("merge off", unmerged, unmerged_losses),
        ("no evals", no_eval, no_eval_losses),
    ):
        assert merged_losses == other_losses, (
            f"losses after merged evals differ from {name}: {merged_losses} vs {other_losses}"
        )
        differ = [n for n, w in merged.items() if not torch.equal(w, other[n])]
        assert not differ, f"weights after merged evals differ from {name} (not bit-identical): {differ[:3]}"


# --------------------------------------------------------------------------- several processes
def _evaluate_in_two_processes(adapter_dir: str, records, output_dir: str) -> None:
    from peft import PeftModel

    base, processor = tiny_llava(seed=0)  # the trained model's base; its forward hooks do not pickle
    model = PeftModel.from_pretrained(base, adapter_dir)
    loop = Loop(model, processor, config(output_dir, eval_batch_size=3))
    summary = loop.evaluate(records)
    rank = loop.accelerator.process_index
    assert loop.accelerator.num_processes == 2, "launch_two_processes did not start 2 processes"
    Path(output_dir, f"summary_{rank}.json").write_text(json.dumps(summary))
    Path(output_dir, f"samples_{rank}.json").write_text(json.dumps(sample_rows(summary)))


def test_two_processes_gather_predictions_in_order_without_duplicates(trained, tmp_path):
    model, processor = trained
    # 7 records in batches of 3: process 0 gets 2 batches (3 + 1 samples), process 1 one (3).
    records = mixed_records(7, seed=3)
    ddp_dir = tmp_path / "ddp"
    ddp_dir.mkdir()
    model.save_pretrained(tmp_path / "adapter")
    launch_two_processes(_evaluate_in_two_processes, args=(str(tmp_path / "adapter"), records, str(ddp_dir)))
    _, single, single_rows = evaluate(model, processor, records, tmp_path / "single", eval_batch_size=3)

    summaries = [json.loads((ddp_dir / f"summary_{rank}.json").read_text()) for rank in (0, 1)]
    assert summaries[0] == summaries[1], f"processes disagree on the summary: {summaries}"
    rows = json.loads((ddp_dir / "samples_0.json").read_text())
    assert rows == json.loads((ddp_dir / "samples_1.json").read_text()), "processes disagree on the samples"
    assert [r["id"] for r in rows] == [r["id"] for r in records], (
        f"DDP predictions are not each id once in dataset order: {[r['id'] for r in rows]}"
    )
    assert [r["prediction"] for r in rows] == [r["prediction"] for r in single_rows], (
        "2-process predictions differ from single-process ones"
    )
    ddp = summaries[0]
    assert ddp["eval/samples"] == 7 and ddp["eval/exact_match"] == single["eval/exact_match"], (
        f"DDP summary {ddp} does not match the single-process one {single}"
    )
    assert ddp["eval/loss"] == pytest.approx(single["eval/loss"], rel=1e-5), "DDP eval/loss differs"


def _fit_in_two_processes(train, evals, output_dir: str) -> None:
    model, processor = tiny_llava(seed=0)
    cfg = config(output_dir, max_steps=3, batch_size=4, eval_steps=1, eval_batch_size=3)
    cfg.metric_for_best = "eval/loss"
    cfg.report_to, cfg.run_name = ["tensorboard"], "ddp"  # trackers: the main process's only
    loop = Loop(model, processor, cfg)
    loop.fit(train, evals)
    rank = loop.accelerator.process_index
    Path(output_dir, f"history_{rank}.json").write_text(json.dumps(loop.state.history))
    trackers = sum(isinstance(c, TrackerLogger) for c in loop.callbacks)
    Path(output_dir, f"tracker_loggers_{rank}.json").write_text(json.dumps(trackers))


def test_evaluations_during_two_process_training_agree_and_keep_the_best(tmp_path):
    """Inside a DDP fit: uneven eval shards must not hang, and the best checkpoint (a collective
    save) must be chosen identically on both processes."""
    train, evals = mixed_records(16, seed=0), mixed_records(7, seed=3)
    launch_two_processes(_fit_in_two_processes, args=(train, evals, str(tmp_path)))

    histories = [json.loads((tmp_path / f"history_{rank}.json").read_text()) for rank in (0, 1)]
    assert histories[0] == histories[1], f"processes disagree on the eval history: {histories}"
    assert [h["step"] for h in histories[0]] == [1, 2, 3], f"expected evals at steps 1-3: {histories[0]}"
    for step in (1, 2, 3):
        ids = [r["id"] for r in predictions_file(tmp_path, step)]
        assert ids == [r["id"] for r in evals], f"step {step}: predictions not once each in order: {ids}"
    best_step = min(histories[0], key=lambda h: h["eval/loss"])["step"]
    best = best_checkpoint(str(tmp_path))
    assert best and Path(best["path"]).name == f"step_{best_step:06d}", f"best.json {best} should name step {best_step}"

    loggers = [json.loads((tmp_path / f"tracker_loggers_{rank}.json").read_text()) for rank in (0, 1)]
    assert loggers == [1, 0], f"TrackerLoggers on processes 0 and 1: {loggers}; trackers belong to the main process"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    event_files = sorted(p.name for p in (tmp_path / "tensorboard" / "ddp").glob("events.out.tfevents.*"))
    assert len(event_files) == 1, f"one TensorBoard writer expected, found event files {event_files}"
    events = EventAccumulator(str(tmp_path / "tensorboard" / "ddp"))
    events.Reload()
    assert [e.step for e in events.Scalars("eval/loss")] == [1, 2, 3], "TensorBoard: eval/loss once per step"


# --------------------------------------------------------------------------- outputs
class Recorder(Callback):
    def __init__(self):
        self.evaluations = []

    def on_evaluate(self, loop, metrics, samples):
        self.evaluations.append((loop.state.step, metrics, samples))


def test_each_evaluation_writes_predictions_metrics_and_hands_samples_to_callbacks(
    tmp_path,
):
    model, processor = tiny_llava(seed=0)
    recorder = Recorder()
    records = mixed_records(6, seed=1)
    loop = Loop(
        model,
        processor,
        config(tmp_path, max_steps=4, batch_size=4, eval_steps=2),
        callbacks=[recorder],
    )
    loop.fit(mixed_records(16, seed=0), records)

    assert [step for step, _, _ in recorder.evaluations] == [2, 4], "on_evaluate should fire at steps 2 and 4"
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in logged if "eval/exact_match" in r]
    assert [r["step"] for r in evals] == [2, 4], f"metrics.jsonl eval records at the wrong steps: {evals}"
    for record in evals:
        expected = {
            "eval/exact_match",
            "eval/loss",
            "eval/samples",
            "eval/samples_per_s",
            "eval/gen_tokens_per_s",
        }
        assert expected <= set(record), f"eval record lacks keys {expected - set(record)}"
    for step, metrics, samples in recorder.evaluations:
        assert [r["id"] for r in predictions_file(tmp_path, step)] == [r["id"] for r in records], (
            f"predictions/step_{step:06d}.jsonl is missing or out of order"
        )
        assert metrics == {k: v for k, v in evals[[2, 4].index(step)].items() if k != "step"}, (
            "on_evaluate got a different summary from the one logged"
        )
        assert [s["id"] for s in samples] == [r["id"] for r in records[: Loop.callback_samples]], (
            f"samples should be the first {Loop.callback_samples} in dataset order, got {[s['id'] for s in samples]}"
        )
        for sample, record in zip(samples, records):
            assert set(sample) == SAMPLE_KEYS, f"sample keys {sorted(sample)} != {sorted(SAMPLE_KEYS)}"
            image, expected = sample["image"], record["image"]
            same = image is None if expected is None else image.tobytes() == expected.tobytes()
            assert same, f"sample {sample['id']} carries the wrong image"
            assert isinstance(sample["prediction"], str) and sample["references"] == record["answers"], (
                f"bad sample {sample}"
            )
            assert set(sample["scores"]) == {"exact_match"}, f"sample scores {sample['scores']}"

    loop.evaluate(mixed_records(2, seed=5))
    assert len(loop.eval_data) == len(records), "evaluate(other_data) replaced fit's eval set"


# --------------------------------------------------------------------------- best model and early stopping
class Scripted:
    """A metric whose value at optimizer step ``k`` is ``values[k - 1]`` (set ``.loop`` first)."""

    def __init__(self, values):
        self.values = list(values)
        self.loop = None

    def __call__(self, predictions, references):
        step = self.loop.state.step if self.loop is not None else 1
        return {"score": self.values[min(step, len(self.values)) - 1]}


def scripted_loop(model, processor, cfg, values) -> Loop:
    metric = Scripted(values)
    loop = Loop(model, processor, cfg, metrics=metric)
    metric.loop = loop
    return loop


@pytest.mark.parametrize(
    ("metric_for_best", "greater_is_better", "best_step"),
    [("eval/score", None, 2), ("score", False, 4), ("eval/loss", None, None)],
)
def test_best_checkpoint_follows_metric_for_best(tmp_path, metric_for_best, greater_is_better, best_step):
    model, processor = tiny_llava(seed=0)
    cfg = config(
        tmp_path,
        max_steps=4,
        batch_size=4,
        eval_steps=1,
        metric_for_best=metric_for_best,
        greater_is_better=greater_is_better,
        max_new_tokens=1,
    )
    loop = scripted_loop(model, processor, cfg, [0.2, 0.5, 0.4, 0.1])
    loop.fit(mixed_records(16, seed=0), mixed_records(3, seed=1))

    history = loop.state.history
    if best_step is None:  # eval/loss: lower is better
        best_step = min(history, key=lambda h: h["eval/loss"])["step"]
    key = cfg.metric_for_best
    expected = next(h[key] for h in history if h["step"] == best_step)
    best = best_checkpoint(str(tmp_path))
    assert best is not None, "no checkpoints/best.json was written"
    assert Path(best["path"]).name == f"step_{best_step:06d}" and best["value"] == expected, (
        f"best.json names {best} but {key} was best at step {best_step} ({[h[key] for h in history]})"
    )
    assert Path(best["path"], "meta.json").is_file(), f"best checkpoint {best['path']} is incomplete"
    assert loop.state.best_metric == expected, f"state.best_metric={loop.state.best_metric}, expected {expected}"


@pytest.mark.parametrize(
    ("values", "greater_is_better", "stop_step"),
    [
        ([0.5, 0.6, 0.6, 0.4, 0.9], None, 4),
        ([0.5, 0.4, 0.45, 0.41, 0.1], None, 3),
        ([0.5, 0.4, 0.45, 0.41, 0.1], False, 4),
    ],
)
def test_early_stopping_stops_after_patience_evaluations_without_improvement(
    tmp_path, values, greater_is_better, stop_step
):
    model, processor = tiny_llava(seed=0)
    cfg = config(
        tmp_path,
        max_steps=8,
        batch_size=4,
        eval_steps=1,
        metric_for_best="eval/score",
        greater_is_better=greater_is_better,
        early_stopping_patience=2,
        max_new_tokens=1,
    )
    loop = scripted_loop(model, processor, cfg, values)
    state = loop.fit(mixed_records(16, seed=0), mixed_records(2, seed=1))
    assert state.step == stop_step, (
        f"expected a stop at step {stop_step} (patience 2, values {values}), got {state.step}"
    )
    assert [h["step"] for h in state.history] == list(range(1, stop_step + 1)), (
        f"evaluations after the stop: {[h['step'] for h in state.history]}"
    )
    assert state.should_stop and state.stop_reason.startswith("early stopping"), (
        f"should_stop={state.should_stop}, stop_reason={state.stop_reason!r} after early stopping"
    )


# --------------------------------------------------------------------------- pluggable metrics
class WordCount:
    """A plain callable metric (no Metric base class) with per-sample scores."""

    __name__ = "word_count"

    def __call__(self, predictions, references):
        words = self.per_sample(predictions, references)["words"]
        return {"words": sum(words) / len(words)}

    def per_sample(self, predictions, references):
        return {"words": [float(len(p.split())) for p in predictions]}


EVALUATE_SCRIPT = """
import datasets
import evaluate


class HitRate(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="toy", citation="", inputs_description="",
            features=datasets.Features({
                "predictions": datasets.Value("string"),
                "references": datasets.Sequence(datasets.Value("string")),
            }),
        )

    def _compute(self, predictions, references):
        hits = [float(p in r) for p, r in zip(predictions, references)]
        return {"hit_rate": sum(hits) / len(hits)}
"""


def test_metrics_given_as_names_callables_and_evaluate_modules_all_reach_the_summary(trained, eval_records, tmp_path):
    import evaluate as hf_evaluate

    script = tmp_path / "hit_rate.py"
    script.write_text(EVALUATE_SCRIPT)
    module = hf_evaluate.load(str(script), cache_dir=str(tmp_path / "cache"))

    def mean_chars(predictions, references):
        return {"chars": sum(map(len, predictions)) / len(predictions)}

    model, processor = trained
    metrics = ["exact_match", WordCount(), mean_chars, module]
    _, summary, rows = evaluate(model, processor, eval_records, tmp_path / "out", metrics=metrics)

    predictions = [r["prediction"] for r in rows]
    hits = [float(r["prediction"] in r["references"]) for r in rows]
    expected = {
        "eval/words": sum(len(p.split()) for p in predictions) / len(predictions),
        "eval/chars": sum(map(len, predictions)) / len(predictions),
        "eval/hit_rate": sum(hits) / len(hits),
    }
    for key, value in expected.items():
        assert summary.get(key) == pytest.approx(value), f"{key}: got {summary.get(key)}, expected {value}"
    assert "eval/exact_match" in summary, f"the built-in metric is missing from {sorted(summary)}"
    for row in rows:
        assert row["scores"]["words"] == len(row["prediction"].split()) and "exact_match" in row["scores"], (
            f"per-sample scores missing or wrong in {row}"
        )


def test_metric_models_are_offloaded_after_each_evaluation(trained, eval_records, tmp_path):
    events = []

    class HeavyMetric(Metric):
        name = "heavy"

        def __call__(self, predictions, references):
            events.append("score")
            return {"heavy": 1.0}

        def offload(self):
            events.append("offload")

    model, processor = trained
    loop = Loop(model, processor, config(tmp_path), metrics=HeavyMetric())
    loop.evaluate(eval_records[:4])
    loop.evaluate(eval_records[:4])
    assert events == ["score", "offload", "score", "offload"], f"offload must follow each evaluation, got {events}"


# --------------------------------------------------------------------------- docs
def test_evaluation_docs_examples_run(tmp_path, monkeypatch):
    """Run every ```python block of docs/evaluation.md, in order, in one namespace."""
    page = (ROOT / "docs" / "evaluation.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.DOTALL)
    assert len(blocks) >= 2, "docs/evaluation.md lost its examples"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/evaluation.md", "exec"), namespace)  # noqa: S102
    summary = namespace["summary"]
    assert {"eval/exact_match", "eval/vqa_accuracy", "eval/answer_words"} <= set(summary), (
        f"the custom-metric example reports {sorted(summary)}"
    )
    page = (tmp_path / "page_run" / "eval.html").read_text(encoding="utf-8")
    assert page.count("<tr data-i=") == 16, "the predictions-page example did not write a row per sample"
    choices = namespace["choice_summary"]
    assert choices["eval/exact_match"] >= 0.5, f"the constrained-answer example scores {choices}"
    rows = choices.samples
    assert {r["prediction"] for r in rows} <= set(namespace["ChoiceLoop"].candidates), (
        "the constrained-answer example answered outside its candidate set"
    )


def test_eval_loss_off_skips_the_loss_forward_and_its_key(tmp_path):
    model, processor = tiny_llava(seed=0)
    config = LoopConfig(output_dir=str(tmp_path), eval_loss=False, max_new_tokens=2, handle_signals=False)
    summary = Loop(model, processor, config).evaluate(synthetic_vqa(5, seed=9))
    assert "eval/loss" not in summary, f"eval_loss=False still reported a loss: {summary}"
    assert "eval/exact_match" in summary, f"generation metrics missing without eval loss: {summary}"
    with pytest.raises(ValueError, match="eval/loss"):
        Loop(model, processor, LoopConfig(output_dir=str(tmp_path), eval_loss=False, metric_for_best="eval/loss"))


def test_vqa_references_reach_the_metrics_and_the_predictions_file_with_their_counts(tmp_path):
    class AlwaysThree(Loop):
        def generate(self, batch):
            return ["3"] * len(batch["ids"]), None

    votes = ["2"] * 9 + ["3"]
    records = synthetic_vqa(2, seed=4)
    records[0]["answers"] = list(votes)
    records[1].pop("answers")
    records[1]["conversations"][-1]["value"] = " 3 \n"
    model, processor = tiny_llava(seed=0)
    loop = AlwaysThree(model, processor, config(tmp_path, eval_loss=False), metrics=["vqa_accuracy"])
    summary = loop.evaluate(records)
    rows = summary.samples
    assert [r["references"] for r in rows] == [votes, ["3"]], (
        f"the evaluated samples must record the references as passed: {[r['references'] for r in rows]}"
    )
    scores = [r["scores"]["vqa_accuracy"] for r in rows]
    assert scores == pytest.approx([0.3, 1.0]), f"official VQA score of '3' against 9x'2' + '3' is 0.3: {scores}"
    assert summary["eval/vqa_accuracy"] == pytest.approx(0.65), f"summary {summary}"


def test_evaluate_only_evaluates_and_fit_records_what_it_returns(tmp_path):
    events = []

    class Watch:
        def on_evaluate(self, loop, metrics, samples):
            events.append(metrics)

    model, processor = tiny_llava(seed=0)
    cfg = LoopConfig(output_dir=str(tmp_path), max_steps=1, max_new_tokens=2, handle_signals=False, log_steps=0)
    loop = Loop(model, processor, cfg, callbacks=[Watch()])
    result = loop.evaluate(synthetic_vqa(3, seed=9))
    assert len(result.samples) == 3 and result["eval/samples"] == 3.0, f"evaluate returned {dict(result)}"
    assert not (tmp_path / "predictions").exists(), "a standalone evaluate wrote a predictions file"
    assert loop.state.history == [] and events == [], "a standalone evaluate recorded history or fired on_evaluate"
    loop.fit(synthetic_vqa(4), synthetic_vqa(3, seed=9))
    assert [h["step"] for h in loop.state.history] == [1] and len(events) == 1, "fit did not record its evaluation"
    rows = predictions_file(tmp_path, step=1)
    assert [r["id"] for r in rows] == [r["id"] for r in synthetic_vqa(3, seed=9)], "fit's predictions file"


def test_batches_loaded_in_chunks_by_several_workers_evaluate_like_one_process(
    trained, eval_records, tmp_path, monkeypatch
):
    sizes, joined = [], []
    merge = EvalBatchCollator.merge

    def spy(self, batches):
        joined.append([len(b["indices"]) for b in batches])
        return merge(self, batches)

    monkeypatch.setattr(EvalBatchCollator, "merge", spy)

    class Sizes(Loop):
        def evaluation_step(self, batch):
            sizes.append((len(batch["gen"]["ids"]), len(batch["loss"]["ids"])))
            return super().evaluation_step(batch)

    model, processor = trained
    records = eval_records[:11]
    _, alone, alone_rows = evaluate(model, processor, records, tmp_path / "w0", eval_batch_size=5)
    _, chunked, chunked_rows = evaluate(
        model, processor, records, tmp_path / "w2", loop_class=Sizes, eval_batch_size=5, num_workers=2
    )
    assert joined == [[3, 2], [3, 2]], f"each batch of 5 loaded as one chunk per worker: {joined}"
    assert sizes == [(5, 5), (5, 5), (1, 1)], f"eval batches of eval_batch_size, joined from chunks: {sizes}"
    assert chunked_rows == alone_rows, "the same predictions, in the same order"
    assert chunked["eval/loss"] == pytest.approx(alone["eval/loss"], rel=1e-6), "the same eval loss"


def test_eval_workers_stay_up_between_evaluations_and_end_with_fit(trained, eval_records, tmp_path):
    model, processor = trained
    records = as_dataset(eval_records[:6])  # one dataset object, as fit holds its eval set
    loop = Loop(model, processor, config(tmp_path, eval_batch_size=3, num_workers=2, max_steps=1))
    first = loop.evaluate(records)
    loader = loop._eval_plan[2]
    workers = [w.pid for w in loader._iterator._workers]
    assert len(workers) == 2 and all(w.is_alive() for w in loader._iterator._workers), "two live workers"
    second = loop.evaluate(records)
    assert loop._eval_plan[2] is loader and [w.pid for w in loader._iterator._workers] == workers, (
        "the second evaluation of the same data reuses the loader and its worker processes"
    )
    assert sample_rows(first) == sample_rows(second) and first["eval/loss"] == second["eval/loss"], "same result"
    loop.evaluate(eval_records[:4])
    assert loop._eval_plan[2] is not loader, "other data: another loader"
    loop.fit(synthetic_vqa(4), records)
    assert loop._eval_plan is None, "fit ends its eval workers"
