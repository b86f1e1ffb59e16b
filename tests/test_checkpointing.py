"""Checkpoints: contents, PEFT round trip, exact resume, atomicity under kill -9, rotation and
best tracking, SIGTERM/SIGINT, export to a plain Hugging Face model."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings
from functools import cache
from pathlib import Path

import pytest
import torch

from helpers import child_env, small_config
from llava_loop import Loop, LoopConfig, TrainCollator
from llava_loop.checkpointing import (
    CheckpointError,
    best_checkpoint,
    export,
    is_complete,
    list_checkpoints,
    load_rng_state,
    repair_checkpoints,
    resolve_checkpoint,
    verify_checkpoint,
)
from llava_loop.loop import LoopState
from llava_loop.testing import synthetic_vqa, tiny_llava

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------- helpers
def make_config(out: Path, **overrides) -> LoopConfig:
    """Small, CPU-fp32 settings where the RNG matters: shuffling, accumulation, LoRA dropout."""
    settings = dict(
        max_steps=4,
        grad_accum_steps=2,
        lora_dropout=0.1,
        shuffle=True,
        log_steps=0,
        warmup_steps=1,
        seed=3,
        max_new_tokens=2,
        eval_batch_size=4,
    )
    return small_config(out, **{**settings, **overrides})


class RecordingLoop(Loop):
    """Records the sample ids of every micro-batch and the loss of every optimizer step."""

    def __init__(self, *args, stop_at: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.ids: list[list[str]] = []
        self.losses: list[float] = []
        self.stop_at = stop_at
        self.callbacks.append(self)

    def training_step(self, batch):
        self.ids.append(list(batch["ids"]))
        return super().training_step(batch)

    def on_step_end(self, loop, logs):
        self.losses.append(logs["train/loss"])
        if self.state.step == self.stop_at:
            self.state.should_stop = True  # what an early-stopping callback does


def trainable(loop: Loop) -> dict[str, torch.Tensor]:
    model = loop.accelerator.unwrap_model(loop.model)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def run(out: Path, n: int = 10, stop_at: int | None = None, eval_data=None, **overrides) -> RecordingLoop:
    model, processor = tiny_llava(seed=0)
    loop = RecordingLoop(model, processor, make_config(out, **overrides), stop_at=stop_at)
    loop.fit(synthetic_vqa(n, seed=0), eval_data)
    return loop


def eval_records():
    return synthetic_vqa(2, seed=7)


@cache
def _uninterrupted(n: int, max_steps: int, tmp: str):
    loop = run(Path(tmp), n=n, max_steps=max_steps, eval_steps=2, eval_data=eval_records())
    return loop.losses, loop.ids, trainable(loop), loop.state.history


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference run for each dataset size, computed once per module."""
    root = tmp_path_factory.mktemp("uninterrupted")
    return lambda n, max_steps: _uninterrupted(n, max_steps, str(root / f"n{n}_s{max_steps}"))


def logits_of(model, processor, records) -> torch.Tensor:
    batch = TrainCollator(processor)(records)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


def assert_same_eval_history(reference: list[dict], resumed: list[dict]) -> None:
    by_step = {h["step"]: h for h in resumed}
    for ref in reference:
        got = by_step.get(ref["step"])
        assert got is not None, f"resumed run has no evaluation at step {ref['step']}"
        for key in ("eval/loss", "eval/exact_match"):
            assert got[key] == ref[key], f"{key} at step {ref['step']}: {got[key]} != {ref[key]}"


# ---------------------------------------------------------------------- contents
def test_checkpoint_holds_weights_optimizer_rng_state_config_and_processor(tmp_path):
    loop = run(tmp_path, max_steps=2, save_steps=1, eval_steps=1, eval_data=eval_records())
    ckpts = list_checkpoints(tmp_path)
    assert [p.name for p in ckpts] == ["step_000001", "step_000002"], f"checkpoints: {ckpts}"
    ckpt = ckpts[-1]
    model_files = {p.name for p in (ckpt / "model").iterdir()}
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "processor_config.json",
        "tokenizer.json",
        "chat_template.jinja",
    ):
        assert name in model_files, f"{name} missing from {ckpt / 'model'}: {sorted(model_files)}"
    training = json.loads((ckpt / "trainer_state.json").read_text())
    optimizer = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert optimizer["state"], "optimizer state is empty"
    assert training["scheduler"]["last_epoch"] == 2, f"scheduler state: {training['scheduler']}"
    assert "scaler" in training, "grad scaler entry missing"
    state = LoopState()
    state.load_state_dict(training["loop_state"])
    position = (state.step, state.epoch, state.samples_in_epoch, state.sampler_seed)
    # 2 steps x 2 accumulated micro-batches x batch_size samples
    assert position == (2, 0, 4 * loop.config.batch_size, loop.config.seed), f"LoopState: {state}"
    assert [h["step"] for h in state.history] == [1, 2], f"metric history: {state.history}"
    rng = load_rng_state(ckpt / "rng_state_0.safetensors")
    assert {"python", "numpy", "torch"} <= set(rng), f"RNG state keys: {sorted(rng)}"
    assert LoopConfig.from_file(ckpt / "config.yaml") == loop.config, "config.yaml differs from the run's"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert (meta["step"], meta["kind"]) == (2, "lora"), f"meta.json: {meta}"
    assert meta["metrics"]["step"] == 2, f"meta.json lacks the latest eval metrics: {meta}"

    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(ckpt / "model")
    assert processor.tokenizer("red circle")["input_ids"] == loop.processor.tokenizer("red circle")["input_ids"], (
        "the processor saved in the checkpoint tokenizes differently"
    )


def test_peft_from_pretrained_restores_every_trained_weight_projector_included(tmp_path):
    from peft import PeftModel

    loop = run(tmp_path, max_steps=3, lora_dropout=0.0)
    trained = loop.accelerator.unwrap_model(loop.model)
    restored = PeftModel.from_pretrained(tiny_llava(seed=0)[0], list_checkpoints(tmp_path)[-1] / "model")
    base_projector = tiny_llava(seed=0)[0].model.multi_modal_projector.linear_1.weight
    projector = dict(restored.named_parameters())[
        "base_model.model.model.multi_modal_projector.modules_to_save.default.linear_1.weight"
    ]
    assert not torch.equal(projector, base_projector), "projector was not trained or not restored"
    trained_params = dict(trained.named_parameters())
    for name, param in restored.named_parameters():
        if "lora_" in name or "modules_to_save" in name:
            assert torch.equal(param, trained_params[name]), f"{name} not restored from the checkpoint"
    records = synthetic_vqa(3, seed=11)
    assert torch.equal(logits_of(restored, loop.processor, records), logits_of(trained, loop.processor, records)), (
        "PeftModel.from_pretrained(base, ckpt/'model') computes different logits than the trained model"
    )


# ---------------------------------------------------------------------- exact resume
@pytest.mark.parametrize(
    ("n", "stop_at", "where"),
    [
        (10, 2, "mid-epoch: 4 of 5 batches done, a last partial accumulation group follows"),
        (10, 3, "end of epoch 0 after its last, partial accumulation group"),
        (10, 5, "mid-epoch of epoch 1"),
        (8, 2, "epoch exhausted by a full group, epoch counter not yet advanced"),
    ],
)
def test_interrupted_and_resumed_run_matches_uninterrupted_exactly(tmp_path, uninterrupted, n, stop_at, where):
    ref_losses, ref_ids, ref_weights, ref_history = uninterrupted(n, 7)
    first = run(tmp_path, n=n, max_steps=7, stop_at=stop_at, eval_steps=2, eval_data=eval_records())
    assert [p.name for p in list_checkpoints(tmp_path)] == [f"step_{stop_at:06d}"], (
        f"{where}: expected one checkpoint at the stopped step"
    )
    second = run(tmp_path, n=n, max_steps=7, eval_steps=2, eval_data=eval_records(), resume_from="latest")
    assert first.ids + second.ids == ref_ids, f"{where}: resumed data order differs"
    assert first.losses + second.losses == ref_losses, (
        f"{where}: per-step losses differ: {first.losses}+{second.losses} vs {ref_losses}"
    )
    weights = trainable(second)
    for name, ref in ref_weights.items():
        assert torch.equal(weights[name], ref), f"{where}: final weight {name} differs"
    assert_same_eval_history(ref_history, second.state.history)


def test_every_epoch_visits_each_sample_once_in_a_new_order(uninterrupted):
    _, ids, _, _ = uninterrupted(10, 7)
    flat = [i for batch in ids for i in batch]
    epoch0, epoch1 = flat[:10], flat[10:20]
    everyone = sorted(r["id"] for r in synthetic_vqa(10, seed=0))
    assert sorted(epoch0) == everyone and sorted(epoch1) == everyone, f"epochs do not cover the data: {flat}"
    assert epoch0 != epoch1, "shuffle=True but both epochs have the same order"


def test_accelerate_keeps_the_epoch_sampler_and_its_mid_epoch_start(tmp_path):
    loop = run(tmp_path, n=10, max_steps=1)
    batch_sampler = loop.train_loader.batch_sampler
    sampler = getattr(batch_sampler, "batch_sampler", batch_sampler).sampler
    assert sampler is loop.sampler, f"accelerate replaced the EpochSampler with {type(sampler).__name__}"
    loop.sampler.set_position(1, start=4)
    seen = [i for batch in loop.train_loader for i in batch["ids"]]
    order = torch.randperm(10, generator=torch.Generator().manual_seed(loop.config.seed + 1)).tolist()
    assert seen == [f"synthetic-0-{i}" for i in order[4:]], (
        "iterating the prepared loader did not give epoch 1 from its 5th sample (accelerate reset it?)"
    )


def test_resume_from_an_explicit_checkpoint_path(tmp_path, uninterrupted):
    ref_losses, _, ref_weights, _ = uninterrupted(10, 7)
    run(tmp_path, n=10, max_steps=7, save_steps=1, stop_at=5, eval_steps=2, eval_data=eval_records())
    ckpt = tmp_path / "checkpoints" / "step_000003"
    second = run(tmp_path, n=10, max_steps=7, eval_steps=2, eval_data=eval_records(), resume_from=str(ckpt))
    assert second.losses == ref_losses[3:], f"resuming from {ckpt.name} gave losses {second.losses}"
    assert all(torch.equal(trainable(second)[k], v) for k, v in ref_weights.items()), "final weights differ"


def test_resume_works_when_some_parameters_never_had_gradients(tmp_path):
    text_only = [
        {
            "id": f"text-{i}",
            "image": None,
            "conversations": [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "red"}],
        }
        for i in range(4)
    ]
    model, processor = tiny_llava(seed=0)
    Loop(model, processor, make_config(tmp_path, max_steps=2)).fit(text_only)
    ckpt = list_checkpoints(tmp_path)[-1]
    optimizer = torch.load(ckpt / "optimizer.pt", weights_only=True)
    n_params = sum(len(g["params"]) for g in optimizer["param_groups"])
    assert 0 < len(optimizer["state"]) < n_params, (
        f"expected optimizer state for only some parameters (projector had no gradient): "
        f"{len(optimizer['state'])} of {n_params}"
    )
    model, processor = tiny_llava(seed=0)
    loop = Loop(model, processor, make_config(tmp_path, max_steps=4, resume_from="latest", resume_with_new_data=True))
    loop.fit(synthetic_vqa(8, seed=0))
    assert loop.state.step == 4, f"resumed run stopped at step {loop.state.step}"
    projector = {
        n: p for n, p in loop.accelerator.unwrap_model(loop.model).named_parameters() if "modules_to_save" in n
    }
    saved = saved_projector(ckpt)
    for name, param in projector.items():
        assert torch.isfinite(param).all(), f"{name} is not finite after resume"
        assert not torch.equal(param, saved[name]), f"{name} was not trained after resume"


def saved_projector(ckpt: Path) -> dict[str, torch.Tensor]:
    """The projector weights a checkpoint restores."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(tiny_llava(seed=0)[0], ckpt / "model")
    return {n: p.detach() for n, p in model.named_parameters() if "modules_to_save" in n}


# ---------------------------------------------------------------------- rotation, best, leftovers
@pytest.mark.parametrize("limit", [1, 2])
def test_rotation_never_deletes_the_best_or_newest_checkpoint(tmp_path, limit):
    score_at_step = {1: 0.9, 2: 0.1, 3: 0.2, 4: 0.3}  # best at step 1

    def fake(predictions, references):
        return {"fake": score_at_step[loop.state.step]}

    model, processor = tiny_llava(seed=0)
    cfg = make_config(
        tmp_path,
        max_steps=4,
        save_steps=1,
        eval_steps=1,
        save_total_limit=limit,
        metric_for_best="eval/fake",
        greater_is_better=True,
    )
    loop = Loop(model, processor, cfg, metrics={"fake": fake})
    loop.fit(synthetic_vqa(8), eval_records())
    kept = [p.name for p in list_checkpoints(tmp_path)]
    assert kept == ["step_000001", "step_000004"], f"limit={limit}: kept {kept}, want the best (1) and newest (4)"
    best = best_checkpoint(tmp_path)
    assert (best["checkpoint"], best["step"], best["value"]) == ("step_000001", 1, 0.9), f"best.json: {best}"
    saved = json.loads((Path(best["path"]) / "trainer_state.json").read_text())["loop_state"]
    assert Path(saved["best_checkpoint"]).name == "step_000001", (
        f"the best checkpoint's own LoopState names {saved['best_checkpoint']} as best: a run resumed from "
        "it would let rotation delete it"
    )
    moved = tmp_path.parent / f"{tmp_path.name}-moved"
    shutil.copytree(tmp_path, moved)
    assert Path(best_checkpoint(moved)["path"]) == moved / "checkpoints" / "step_000001", (
        "best_checkpoint() does not follow a moved output_dir"
    )


def test_leftovers_of_an_interrupted_save_are_ignored_then_repaired(tmp_path):
    run(tmp_path, max_steps=2, save_steps=1)
    root = tmp_path / "checkpoints"
    # Killed between the two renames of a re-save of step 2, and during a save of step 3.
    os.replace(root / "step_000002", root / ".old-step_000002")
    (root / ".tmp-step_000003" / "model").mkdir(parents=True)
    (root / ".tmp-step_000003" / "meta.json").write_text("{}")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000001"], "a leftover was listed"
    repair_checkpoints(tmp_path)
    assert resolve_checkpoint(tmp_path, "latest").name == "step_000002", "the old copy of step 2 was not restored"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step_000001", "step_000002"], (
        f"leftovers not cleaned: {sorted(p.name for p in root.iterdir())}"
    )


# ---------------------------------------------------------------------- subprocesses
CHILD = r"""
import json, logging, os, sys, time
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
import torch
from llava_loop import Loop, LoopConfig, checkpointing
from llava_loop.testing import synthetic_vqa, tiny_llava

args = json.loads(sys.argv[1])
# The parent's thread count (helpers.child_env): the losses are compared bit for bit, and a different
# number of threads sums in a different order.
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
if args.get("slow_save"):
    fsync_tree = checkpointing._fsync_tree

    def slow(path):  # the save's slowest part, before the rename that publishes it
        fsync_tree(path)
        time.sleep(args["slow_save"])

    checkpointing._fsync_tree = slow

losses = []


class Hold:
    def on_step_end(self, loop, logs):
        losses.append(logs["train/loss"])
        if loop.state.step == args.get("hold_at"):  # tell the parent, wait for its signal
            open(args["marker"], "w").close()
            deadline = time.time() + 60
            while loop._signals.received is None and time.time() < deadline:
                time.sleep(0.01)


model, processor = tiny_llava(seed=0)
loop = Loop(model, processor, LoopConfig(**args["config"]), callbacks=[Hold()])
loop.fit(synthetic_vqa(args["n"], seed=0), synthetic_vqa(2, seed=7) if args.get("eval") else None)
with open(args["result"], "w") as f:
    json.dump({"step": loop.state.step, "losses": losses}, f)
"""


def start_child(tmp_path: Path, config: LoopConfig, n: int = 10, **args) -> tuple[subprocess.Popen, dict]:
    args = {
        "config": config.to_dict(),
        "n": n,
        "marker": str(tmp_path / "marker"),
        "result": str(tmp_path / "result.json"),
        **args,
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, json.dumps(args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(PYTHONPATH=str(REPO)),
    )
    return proc, args


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"child exited ({proc.returncode}) before {what}:\n{proc.stderr.read()[-3000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def assert_loadable(ckpt: Path) -> None:
    from peft import PeftModel

    verify_checkpoint(ckpt)  # raises naming the damaged file
    PeftModel.from_pretrained(tiny_llava(seed=0)[0], ckpt / "model")
    training = json.loads((ckpt / "trainer_state.json").read_text())
    step = training["loop_state"]["step"]
    assert ckpt.name == f"step_{step:06d}", f"{ckpt.name} holds the state of step {step}"


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["mid-save", "random"])
def test_kill_9_leaves_only_complete_loadable_checkpoints_and_resume_works(tmp_path, moment):
    out = tmp_path / "out"
    config = make_config(out, max_steps=500, save_steps=1, save_total_limit=2)
    proc, _ = start_child(tmp_path, config, slow_save=0.3)
    root = out / "checkpoints"
    seed = random.randrange(2**31)
    try:
        wait_for(lambda: len(list_checkpoints(out)) >= 1, proc, "the first checkpoint")
        if moment == "mid-save":
            wait_for(lambda: any(p.name.startswith(".tmp-") for p in root.iterdir()), proc, "a save in progress")
        else:
            time.sleep(random.Random(seed).uniform(0, 1.5))
    finally:
        proc.kill()
        proc.communicate()
    leftovers = [p.name for p in root.iterdir() if p.name.startswith(".")]
    if moment == "mid-save":
        assert any(n.startswith(".tmp-") for n in leftovers), f"the kill did not hit a save: {leftovers}"
    found = list_checkpoints(out)
    assert found, f"no checkpoint survived (random seed {seed}); leftovers {leftovers}"
    for ckpt in found:
        assert_loadable(ckpt)
    last = int(found[-1].name.split("_")[1])
    model, processor = tiny_llava(seed=0)
    loop = Loop(
        model, processor, make_config(out, max_steps=last + 1, save_steps=1, save_total_limit=2, resume_from="latest")
    )
    loop.fit(synthetic_vqa(10, seed=0))
    assert loop.state.step == last + 1, f"resume from step {last} ended at step {loop.state.step} (seed {seed})"
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")], "leftover temporary folder not cleaned"


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_finishes_the_step_saves_and_exits_cleanly_then_resumes_exactly(tmp_path, uninterrupted, sig):
    out = tmp_path / "out"
    config = make_config(out, max_steps=7)
    proc, args = start_child(tmp_path, config, hold_at=2, eval=True)
    try:
        wait_for(lambda: os.path.exists(args["marker"]), proc, "step 2")
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, f"child exited with {proc.returncode}:\n{stderr[-3000:]}"
    assert "resume_from='latest'" in stderr, f"no resume instructions in the log:\n{stderr[-2000:]}"
    result = json.loads(Path(args["result"]).read_text())
    assert result["step"] == 2, f"stopped at step {result['step']}, not after the current step (2)"
    assert [p.name for p in list_checkpoints(out)] == ["step_000002"], f"checkpoints: {list_checkpoints(out)}"
    assert not (out / "predictions").exists(), "a final evaluation ran before exiting on a signal"

    ref_losses, _, ref_weights, _ = uninterrupted(10, 7)
    model, processor = tiny_llava(seed=0)
    resumed = RecordingLoop(model, processor, make_config(out, max_steps=7, resume_from="latest"))
    resumed.fit(synthetic_vqa(10, seed=0))
    assert result["losses"] + resumed.losses == ref_losses, (
        f"losses after a {sig.name} + resume differ from the uninterrupted run"
    )
    weights = trainable(resumed)
    assert all(torch.equal(weights[k], v) for k, v in ref_weights.items()), (
        f"final weights after a {sig.name} + resume differ from the uninterrupted run"
    )


DDP_CHILD = r"""
import json, os, signal, sys
from pathlib import Path
import torch
from llava_loop import Loop, LoopConfig
from llava_loop.testing import synthetic_vqa, tiny_llava

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # the parent's (helpers.child_env)
args = json.loads(sys.argv[1])


class SignalRankOne:  # only rank 1 gets SIGTERM, during step 2
    def on_step_end(self, loop, logs):
        if args["signal_at"] and loop.accelerator.process_index == 1 and loop.state.step == args["signal_at"]:
            os.kill(os.getpid(), signal.SIGTERM)


model, processor = tiny_llava(seed=0)
loop = Loop(model, processor, LoopConfig(**args["config"]), callbacks=[SignalRankOne()])
loop.fit(synthetic_vqa(16, seed=0))
result = {"step": loop.state.step, "stop_reason": loop.state.stop_reason}
Path(args["out"], f"result_{loop.accelerator.process_index}.json").write_text(json.dumps(result))
"""


def run_two_processes(tmp_path: Path, config: LoopConfig, signal_at: int | None) -> list[dict]:
    """A 2-process gloo run in fresh processes (torchrun); fails instead of hanging on a deadlock."""
    args = {"config": config.to_dict(), "signal_at": signal_at, "out": str(tmp_path)}
    script = tmp_path / "ddp_child.py"
    script.write_text(DDP_CHILD)
    env = child_env(PYTHONPATH=str(REPO))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(script),
        json.dumps(args),
    ]
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        _, stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("the 2-process run hung (processes stopped after different steps?)") from None
    assert proc.returncode == 0, f"2-process run failed ({proc.returncode}):\n{stderr[-3000:]}"
    results = [json.loads((tmp_path / f"result_{rank}.json").read_text()) for rank in (0, 1)]
    for rank in (0, 1):
        (tmp_path / f"result_{rank}.json").unlink()
    return results


@pytest.mark.slow
def test_a_signal_to_one_process_stops_every_process_after_the_same_step(tmp_path):
    out = tmp_path / "out"
    results = run_two_processes(tmp_path, make_config(out, max_steps=5), signal_at=2)
    assert [r["step"] for r in results] == [2, 2], f"processes stopped at different steps: {results}"
    assert results[0]["stop_reason"] == "signal (on another process)", f"rank 0: {results[0]}"
    ckpt = out / "checkpoints" / "step_000002"
    assert is_complete(ckpt) and (ckpt / "rng_state_1.safetensors").is_file(), f"incomplete 2-process checkpoint {ckpt}"
    resumed = run_two_processes(tmp_path, make_config(out, max_steps=5, resume_from="latest"), signal_at=None)
    assert [r["step"] for r in resumed] == [5, 5], f"the resumed 2-process run ended at {resumed}"


# ---------------------------------------------------------------------- export
def test_export_merges_lora_into_a_plain_model_with_the_same_logits(tmp_path):
    from peft import PeftModel
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from llava_loop.cli import main

    run(tmp_path / "run", max_steps=3)
    ckpt = list_checkpoints(tmp_path / "run")[-1]
    _, processor = tiny_llava(seed=0)
    records = synthetic_vqa(3, seed=11)
    adapter = PeftModel.from_pretrained(tiny_llava(seed=0)[0], ckpt / "model")
    expected = logits_of(adapter, processor, records)
    assert not torch.allclose(expected, logits_of(tiny_llava(seed=0)[0], processor, records)), (
        "training changed nothing: the export test would be vacuous"
    )

    base = tiny_llava(seed=0)[0]
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")  # pytest's filters hide FutureWarnings; a user sees them
        merged_dir = export(ckpt, tmp_path / "merged", base_model=base)
    assert not shown, f"export showed warnings: {[str(w.message) for w in shown]}"
    merged = LlavaForConditionalGeneration.from_pretrained(merged_dir)
    assert not any("lora" in n for n, _ in merged.named_parameters()), "the exported model still has LoRA layers"
    torch.testing.assert_close(
        logits_of(merged, processor, records),
        expected,
        rtol=1e-4,
        atol=1e-4,
        msg="merged logits differ from the adapter's",
    )
    exported_processor = AutoProcessor.from_pretrained(merged_dir)
    assert exported_processor.chat_template == processor.chat_template, "the exported processor lost its template"

    base_dir = tmp_path / "base"
    tiny_llava(seed=0)[0].save_pretrained(base_dir)
    assert main(["export", str(ckpt), str(tmp_path / "cli"), "--base_model", str(base_dir)]) == 0, "CLI failed"
    from_cli = LlavaForConditionalGeneration.from_pretrained(tmp_path / "cli")
    torch.testing.assert_close(
        logits_of(from_cli, processor, records),
        expected,
        rtol=1e-4,
        atol=1e-4,
        msg="`llava-loop export` gives different logits",
    )
    with pytest.raises(FileExistsError, match="overwrite"):
        export(ckpt, merged_dir, base_model=tiny_llava(seed=0)[0])


def test_export_of_a_full_finetune_checkpoint(tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    loop = run(tmp_path / "run", max_steps=2, lora_r=0, learning_rate=1e-3)
    ckpt = list_checkpoints(tmp_path / "run")[-1]
    assert json.loads((ckpt / "meta.json").read_text())["kind"] == "full", "lora_r=0 did not save a full checkpoint"
    records = synthetic_vqa(3, seed=11)
    expected = logits_of(loop.accelerator.unwrap_model(loop.model), loop.processor, records)
    out = export(ckpt, tmp_path / "merged", base_model=tiny_llava(seed=0)[0])
    merged = LlavaForConditionalGeneration.from_pretrained(out)
    assert torch.equal(logits_of(merged, loop.processor, records), expected), (
        "exported full-finetune model computes different logits than the trained one"
    )
    AutoProcessor.from_pretrained(out)


# ---------------------------------------------------------------------- trust: no code, integrity
class Payload:
    """Unpickling this object creates ``marker``: what a planted ``__reduce__`` exploit would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def rehash(ckpt: Path) -> None:
    """Record the current files in meta.json, as an attacker who edits a checkpoint would."""
    meta = json.loads((ckpt / "meta.json").read_text())
    if "files" in meta:
        from llava_loop.checkpointing import _file_records

        meta["files"] = {k: v for k, v in _file_records(ckpt).items() if k != "meta.json"}
        (ckpt / "meta.json").write_text(json.dumps(meta))


def resume_run(out: Path, resume_from: str, max_steps: int = 3) -> RecordingLoop:
    model, processor = tiny_llava(seed=0)
    loop = RecordingLoop(model, processor, make_config(out, max_steps=max_steps, resume_from=resume_from))
    loop.fit(synthetic_vqa(10, seed=0))
    return loop


@pytest.fixture(scope="module")
def three_checkpoints(tmp_path_factory):
    """A run with checkpoints at steps 1, 2 and 3; tests copy it before damaging it."""
    out = tmp_path_factory.mktemp("three") / "run"
    run(out, max_steps=3, save_steps=1)
    return out


def copy_run(source: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(source, out)
    return out


def test_resume_never_unpickles_code_planted_in_any_pt_file_of_a_checkpoint(tmp_path, three_checkpoints):
    out = copy_run(three_checkpoints, tmp_path)
    ckpt = out / "checkpoints" / "step_000003"
    pt_files = sorted(p.name for p in ckpt.glob("*.pt"))
    assert pt_files, f"no .pt file in {ckpt}: the test would check nothing"
    for name in pt_files:
        marker = tmp_path / f"ran-{name}"
        torch.save({"state": {0: Payload(marker)}, "param_groups": []}, ckpt / name)
        rehash(ckpt)  # so that the integrity check passes and the loader itself is tested
        with pytest.raises(Exception) as err:
            resume_run(out, str(ckpt), max_steps=4)
        assert not marker.exists(), f"resuming ran the code planted in {name}"
        message = str(err.value)
        assert str(ckpt) in message and name in message and "run code" in message, (
            f"the refusal of the planted {name} does not name the checkpoint, the file and why: {message}"
        )


def test_a_checkpoint_of_the_earlier_pickle_format_is_refused_not_unpickled(tmp_path, three_checkpoints):
    out = copy_run(three_checkpoints, tmp_path)
    ckpt = out / "checkpoints" / "step_000003"
    marker = tmp_path / "ran"
    for path in list(ckpt.iterdir()):  # the earlier layout: pickled training_state.pt and rng_state_0.pt
        if path.is_file() and path.name not in ("config.yaml", "meta.json"):
            path.unlink()
    torch.save({"optimizer": Payload(marker), "num_processes": 1}, ckpt / "training_state.pt")
    torch.save({"python": Payload(marker)}, ckpt / "rng_state_0.pt")
    meta = json.loads((ckpt / "meta.json").read_text())
    (ckpt / "meta.json").write_text(json.dumps({k: meta[k] for k in ("step", "epoch", "kind", "base_model")}))
    with pytest.raises(Exception) as err:
        resume_run(out, str(ckpt), max_steps=4)
    assert not marker.exists(), "resuming unpickled the earlier format's training_state.pt"
    message = str(err.value)
    assert "step_000003" in message and "pickle" in message and "not loaded" in message, (
        f"the refusal does not say the earlier format cannot be loaded safely: {message}"
    )


def test_the_latest_fallback_resumes_from_the_newest_intact_checkpoint_past_an_earlier_format_one(
    tmp_path, three_checkpoints, caplog
):
    out = copy_run(three_checkpoints, tmp_path)
    ckpt = out / "checkpoints" / "step_000003"
    (ckpt / "optimizer.pt").rename(ckpt / "training_state.pt")
    meta = json.loads((ckpt / "meta.json").read_text())
    (ckpt / "meta.json").write_text(json.dumps({k: meta[k] for k in ("step", "epoch", "kind", "base_model")}))
    with caplog.at_level("WARNING", logger="llava_loop.checkpointing"):
        loop = resume_run(out, "latest", max_steps=4)
    assert len(loop.losses) == 2, f"expected a resume from step 2 (2 steps to 4), made {len(loop.losses)} steps"
    assert any("step_000003" in r.message and "pickle" in r.message for r in caplog.records), (
        f"no warning naming the refused checkpoint: {[r.message for r in caplog.records]}"
    )


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # tensor data, not the header: safetensors loads it without complaint
    path.write_bytes(bytes(data))


DAMAGE = {
    "bit flip": (_flip_last_byte, "is corrupt (sha256 mismatch)"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:-100]), "is truncated"),
    "zero bytes": (lambda p: p.write_bytes(b""), "is empty"),
    "missing": (lambda p: p.unlink(), "is missing"),
    "extra file": (lambda p: p.with_name("adapter_model.bin").write_bytes(b"x"), "is not part of the checkpoint"),
}


@pytest.mark.parametrize(
    ("damage", "target"),
    [(damage, "model/adapter_model.safetensors") for damage in DAMAGE]
    + [("bit flip", "optimizer.pt"), ("truncated", "optimizer.pt"), ("bit flip", "rng_state_0.safetensors")],
)
def test_a_damaged_checkpoint_is_refused_by_name_and_latest_falls_back_to_an_intact_one(
    tmp_path, three_checkpoints, caplog, damage, target
):
    out = copy_run(three_checkpoints, tmp_path)
    ckpt = out / "checkpoints" / "step_000003"
    damage_file, problem = DAMAGE[damage]
    damage_file(ckpt / target)
    shown = str(Path(target).with_name("adapter_model.bin").as_posix()) if damage == "extra file" else target
    with pytest.raises(Exception) as err:
        resume_run(out, str(ckpt), max_steps=4)
    message = str(err.value)
    assert f"checkpoint {ckpt}: {shown} {problem}" in message and "resume from step_000002" in message, (
        f"{damage} of {target}: the error does not name the checkpoint, the file, the problem and the "
        f"intact older checkpoint: {message}"
    )
    with pytest.raises(Exception) as err:
        export(ckpt, tmp_path / "merged", base_model=tiny_llava(seed=0)[0])
    assert f"{shown} {problem}" in str(err.value), f"export of a damaged checkpoint: {err.value}"
    assert not (tmp_path / "merged").exists(), "export wrote a model from a damaged checkpoint"

    with caplog.at_level("WARNING", logger="llava_loop.checkpointing"):
        loop = resume_run(out, "latest", max_steps=4)
    assert len(loop.losses) == 2, f"{damage}: resume_from='latest' did not fall back to step 2 ({loop.losses})"
    assert any("step_000003" in r.message and problem in r.message for r in caplog.records), (
        f"{damage}: no warning naming the damaged checkpoint and why: {[r.message for r in caplog.records]}"
    )


def test_meta_json_records_the_size_and_sha256_of_every_other_file(three_checkpoints):
    import hashlib

    ckpt = three_checkpoints / "checkpoints" / "step_000003"
    files = json.loads((ckpt / "meta.json").read_text())["files"]
    on_disk = {p.relative_to(ckpt).as_posix(): p for p in ckpt.rglob("*") if p.is_file() and p.name != "meta.json"}
    assert set(files) == set(on_disk), f"meta.json lists {sorted(files)}, the folder holds {sorted(on_disk)}"
    for name, path in on_disk.items():
        data = path.read_bytes()
        assert files[name] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, f"record of {name}"


def test_rng_states_round_trip_through_safetensors_without_pickle(tmp_path):
    import numpy as np

    from llava_loop.checkpointing import save_rng_state
    from llava_loop.distributed import get_rng_state, set_rng_state

    random.seed(5)
    random.gauss(0, 1)  # leaves a cached gaussian in python's state
    np.random.seed(5)
    np.random.standard_normal()  # and in numpy's
    torch.manual_seed(5)
    save_rng_state(get_rng_state(), tmp_path / "rng.safetensors")

    def draw():
        return [random.random(), random.gauss(0, 1)], np.random.standard_normal(3).tolist(), torch.rand(3).tolist()

    expected = draw()
    set_rng_state(load_rng_state(tmp_path / "rng.safetensors"))
    assert draw() == expected, "the restored python / numpy / torch RNG streams differ from the saved ones"


def test_a_callback_state_that_json_cannot_hold_fails_the_save_naming_the_callback(tmp_path):
    class TensorState:
        def state_dict(self):
            return {"seen": torch.tensor(3)}

    model, processor = tiny_llava(seed=0)
    loop = Loop(model, processor, make_config(tmp_path, max_steps=1), callbacks=[TensorState()])
    with pytest.raises(TypeError) as err:
        loop.fit(synthetic_vqa(4, seed=0))
    message = str(err.value)
    assert "TensorState:0" in message and "['seen'] is a Tensor" in message, (
        f"the save error does not name the callback and the value JSON cannot hold: {message}"
    )
    assert not list_checkpoints(tmp_path), "a checkpoint without the callback's state was published"


# ---------------------------------------------------------------------- export: base model paths
def test_export_finds_a_base_model_given_by_relative_path_from_any_working_directory(tmp_path, monkeypatch):
    from transformers import AutoModelForImageTextToText, LlavaForConditionalGeneration

    tiny, processor = tiny_llava(seed=0)
    tiny.save_pretrained(tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    model = AutoModelForImageTextToText.from_pretrained("base")  # a relative path, as a user would pass it
    loop = Loop(model, processor, make_config(Path("run"), max_steps=2, lora_dropout=0.0))
    loop.fit(synthetic_vqa(4, seed=0))
    ckpt = list_checkpoints(tmp_path / "run")[-1]
    assert json.loads((ckpt / "meta.json").read_text())["base_model"] == str(tmp_path / "base"), (
        "meta.json does not record the local base model as an absolute path"
    )
    records = synthetic_vqa(3, seed=11)
    expected = logits_of(loop.accelerator.unwrap_model(loop.model), processor, records)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    from llava_loop.cli import main

    assert main(["export", "../run/checkpoints/step_000002", "merged"]) == 0, "`llava-loop export` failed"
    merged = LlavaForConditionalGeneration.from_pretrained(elsewhere / "merged")
    torch.testing.assert_close(
        logits_of(merged, processor, records), expected, rtol=1e-4, atol=1e-4, msg="exported logits differ"
    )

    # A relative base model path (a hand-edited or moved run) is looked for in the run's directory.
    meta = json.loads((ckpt / "meta.json").read_text())
    (ckpt / "meta.json").write_text(json.dumps({**meta, "base_model": "../base"}))
    export(ckpt, elsewhere / "again")
    assert (elsewhere / "again" / "config.json").is_file(), "export with a run-relative base model path failed"


@pytest.mark.parametrize("base", ["../nowhere/base", "nowhere-base"], ids=["path", "Hub-like name, offline"])
def test_export_with_a_base_model_that_does_not_exist_names_the_paths_it_tried(tmp_path, three_checkpoints, base):
    out = copy_run(three_checkpoints, tmp_path)
    ckpt = out / "checkpoints" / "step_000003"
    meta = json.loads((ckpt / "meta.json").read_text())
    (ckpt / "meta.json").write_text(json.dumps({**meta, "base_model": base}))
    with pytest.raises(OSError) as err:  # FileNotFoundError is an OSError
        export(ckpt, tmp_path / "merged")
    message = str(err.value)
    assert repr(base) in message and str((out / base).resolve()) in message and "--base_model" in message, (
        f"the error does not name the base model, the folders tried and the fix: {message}"
    )
    assert not (tmp_path / "merged").exists(), "export wrote something without a base model"


# ---------------------------------------------------------------------- temporary files
def dead_pid() -> int:
    """The pid of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_run_deletes_temporary_files_of_dead_writers_and_keeps_live_ones(tmp_path):
    dead = dead_pid()
    leftovers = [
        tmp_path / f".write-test-{dead}",
        tmp_path / "checkpoints" / f".best.json.tmp-{dead}",
        tmp_path / "predictions" / f".step_000002.jsonl.tmp-{dead}",
        tmp_path / f".config.yaml.tmp-{dead}",
    ]
    live = tmp_path / "checkpoints" / f".best.json.tmp-{os.getpid()}"  # a writer still running
    for path in [*leftovers, live]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("half written")
    run(tmp_path, max_steps=1)
    remaining = [p.name for p in leftovers if p.exists()]
    assert not remaining, f"a new run left temporary files of dead writers: {remaining}"
    assert live.exists(), "a temporary file of a running writer was deleted"


def test_a_failed_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    from llava_loop import checkpointing, loggers

    target = tmp_path / "predictions" / "step_000001.jsonl"
    target.mkdir(parents=True)  # os.replace onto a folder fails after the temporary file is written
    with pytest.raises(OSError):
        loggers.write_predictions(target, [{"id": "a"}])
    assert [p.name for p in target.parent.iterdir()] == [target.name], "the failed write left a temporary file"

    class FullDisk:
        def __init__(self, file):
            self.file = file

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, text):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpointing, "open", lambda path, mode="r", **kw: FullDisk(open(path, mode)), raising=False)
    with pytest.raises(OSError, match="not writable"):
        checkpointing.check_output_dir(str(tmp_path / "out"))
    assert not list((tmp_path / "out").iterdir()), "check_output_dir's failed probe was left behind"


def test_a_checkpoint_written_by_0_1_resumes_and_continues_as_0_1_did(tmp_path):
    fixture = Path(__file__).parent / "data" / "checkpoint_v0_1"
    shutil.copytree(fixture / "step_000003", tmp_path / "checkpoints" / "step_000003")
    expected = json.loads((fixture / "expected.json").read_text())["losses_after_resume"]
    losses = []

    class Losses:
        def on_step_end(self, loop, logs):
            losses.append(logs["train/loss"])

    model, processor = tiny_llava(seed=0)
    config = LoopConfig(
        output_dir=str(tmp_path), log_steps=1, max_steps=6, batch_size=2, grad_accum_steps=2, save_steps=3,
        max_new_tokens=4, resume_from="latest", handle_signals=False,
    )  # fmt: skip
    loop = Loop(model, processor, config, callbacks=[Losses()])
    loop.fit(synthetic_vqa(12, seed=3))
    assert loop.resumed_from is not None and loop.state.step == 6, "the 0.1 checkpoint was not resumed to step 6"
    assert losses == pytest.approx(expected, rel=1e-6), f"resumed losses {losses} differ from 0.1's {expected}"


def test_a_checkpoint_is_hashed_once_per_process_until_one_of_its_files_changes(tmp_path, monkeypatch):
    from llava_loop import checkpointing

    run(tmp_path, n=4, max_steps=1, save_steps=1)
    ckpt = list_checkpoints(tmp_path)[-1]
    hashed = []
    real = checkpointing._sha256
    monkeypatch.setattr(checkpointing, "_sha256", lambda file: hashed.append(file.name) or real(file))
    verify_checkpoint(ckpt)
    first = len(hashed)
    verify_checkpoint(ckpt)  # e.g. the run after the CLI's pre-flight check
    assert first > 0 and len(hashed) == first, f"an unchanged checkpoint was hashed again: {hashed}"
    optimizer = ckpt / "optimizer.pt"
    data = bytearray(optimizer.read_bytes())
    data[-1] ^= 0xFF  # same size, other content, a newer modification time
    optimizer.write_bytes(bytes(data))
    os.utime(optimizer, ns=(optimizer.stat().st_atime_ns, optimizer.stat().st_mtime_ns + 10**9))
    with pytest.raises(CheckpointError, match="optimizer.pt is corrupt"):
        verify_checkpoint(ckpt)
