"""The run directory: a new run never takes over an old one silently, one run per output_dir, resume
continues exactly or refuses, and signals during the final evaluation/save are handled."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import small_config
from llava_loop import Loop, LoopConfig
from llava_loop.checkpointing import list_checkpoints
from llava_loop.loggers import read_metrics
from llava_loop.rundir import LOCK_FILE, data_fingerprint
from llava_loop.testing import synthetic_vqa, tiny_llava


def make_config(out: Path, **overrides) -> LoopConfig:
    settings = dict(max_steps=2, shuffle=True, log_steps=1, warmup_steps=1, seed=3, max_new_tokens=2, lora_dropout=0.0)
    return small_config(out, **{**settings, **overrides})


class IdsLoop(Loop):
    """Records the sample ids of every micro-batch and the learning rate of every step."""

    def __init__(self, *args, crash_at: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.ids: list[str] = []
        self.lrs: list[float] = []
        self.crash_at = crash_at
        self.callbacks.append(self)

    def training_step(self, batch):
        self.ids.extend(batch["ids"])
        return super().training_step(batch)

    def on_step_end(self, loop, logs):
        self.lrs.append(logs["train/lr"])

    def on_log(self, loop, logs):  # after metrics.jsonl got the record (the JSONL logger comes first)
        if "train/loss" in logs and logs["step"] == self.crash_at:
            raise RuntimeError("simulated crash")


def run(out: Path, data=None, crash_at: int | None = None, **overrides) -> IdsLoop:
    model, processor = tiny_llava(seed=0)
    loop = IdsLoop(model, processor, make_config(out, **overrides), crash_at=crash_at)
    loop.fit(data if data is not None else synthetic_vqa(12, seed=0))
    return loop


# ---------------------------------------------------------------------- fresh run or resume
def test_a_new_run_into_an_output_dir_with_checkpoints_is_refused(tmp_path):
    run(tmp_path)
    before = sorted(p.name for p in list_checkpoints(tmp_path))
    with pytest.raises(FileExistsError, match="already holds 1 checkpoint") as err:
        run(tmp_path)
    for hint in ("resume_from='latest'", "another", "overwrite_output_dir=True"):
        assert hint in str(err.value), f"the error does not offer {hint!r}: {err.value}"
    assert sorted(p.name for p in list_checkpoints(tmp_path)) == before, "the refused run touched the checkpoints"
    assert not (tmp_path / LOCK_FILE).exists(), "the refused run left its lock behind"


def test_overwrite_output_dir_replaces_the_earlier_run(tmp_path):
    run(tmp_path, max_steps=3, save_steps=1)
    assert len(list_checkpoints(tmp_path)) == 3
    (tmp_path / "notes.txt").write_text("mine")
    run(tmp_path, max_steps=1, overwrite_output_dir=True)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000001"], "the earlier run's checkpoints survived"
    steps = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")]
    assert steps == [1], f"metrics.jsonl still holds the earlier run's records: {steps}"
    assert (tmp_path / "notes.txt").read_text() == "mine", "overwrite deleted a file that is not the run's"


def test_overwrite_output_dir_with_resume_from_is_a_config_error():
    with pytest.raises(ValueError, match="overwrite_output_dir"):
        LoopConfig(overwrite_output_dir=True, resume_from="latest")


def test_resume_from_auto_starts_fresh_then_resumes(tmp_path):
    first = run(tmp_path, max_steps=2, resume_from="auto")
    assert first.resumed_from is None and first.state.step == 2, "auto did not start fresh in an empty dir"
    second = run(tmp_path, max_steps=4, resume_from="auto")
    assert second.resumed_from is not None and Path(second.resumed_from).name == "step_000002", (
        f"auto did not resume the checkpoint: {second.resumed_from}"
    )
    assert len(second.lrs) == 2 and second.state.step == 4, f"resumed run made {len(second.lrs)} steps"


def test_resume_from_auto_never_starts_fresh_over_a_damaged_checkpoint(tmp_path):
    run(tmp_path, max_steps=2, save_steps=1)
    adapter = tmp_path / "checkpoints" / "step_000002" / "model" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:-1])  # truncated
    loop = run(tmp_path, max_steps=3, resume_from="auto")
    assert Path(loop.resumed_from).name == "step_000001", f"auto resumed {loop.resumed_from}, not the intact one"
    assert len(loop.lrs) == 2, f"resumed run made {len(loop.lrs)} steps from step 1 to 3"


# ---------------------------------------------------------------------- lock
def _lock(out: Path, **owner) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "time": time.time(), **owner}))


def test_a_second_run_on_a_locked_output_dir_fails_naming_the_owner(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _lock(tmp_path, pid=other.pid, start=None)
        with pytest.raises(RuntimeError, match=f"in use by another run \\(pid {other.pid}"):
            run(tmp_path)
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == other.pid, "the live owner's lock was taken"
        assert not list_checkpoints(tmp_path), "the second run trained"
    finally:
        other.kill()
        other.wait()


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _lock(tmp_path, pid=dead.pid, start=None)
    with caplog.at_level(logging.WARNING):
        loop = run(tmp_path)
    assert loop.state.step == 2, "the run did not train"
    assert any("taking over the lock" in r.getMessage() for r in caplog.records), "no warning for the takeover"
    assert not (tmp_path / LOCK_FILE).exists(), "the lock was not released at the end of fit"


def test_a_lock_from_another_host_is_never_taken_over(tmp_path):
    _lock(tmp_path, pid=1, host="some-other-node", start=None)
    with pytest.raises(RuntimeError, match="some-other-node") as err:
        run(tmp_path)
    assert "delete" in str(err.value), f"the error does not say how to clear a dead run's lock: {err.value}"


def test_the_lock_is_released_when_fit_fails(tmp_path):
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path, max_steps=3, crash_at=2)
    assert not (tmp_path / LOCK_FILE).exists(), "a failed run kept its lock"


# ---------------------------------------------------------------------- resume never silently changes the run
def test_resume_refuses_changed_training_data_naming_the_difference(tmp_path):
    data = synthetic_vqa(12, seed=0)
    run(tmp_path, data=data, max_steps=2)
    changes = {"fewer records": data[:-1], "another order": data[1:] + data[:1]}
    for what, changed in changes.items():
        with pytest.raises(ValueError, match="training data: 12 records .* -> 1[12] records") as err:
            run(tmp_path, data=changed, max_steps=4, resume_from="latest")
        assert "resume_with_new_data" in str(err.value), f"{what}: no way out offered: {err.value}"
    loop = run(tmp_path, data=data[1:] + data[:1], max_steps=4, resume_from="latest", resume_with_new_data=True)
    assert loop.state.step == 4, "resume_with_new_data did not resume"


def test_data_fingerprint_reads_ids_and_image_names_only(tmp_path):
    from llava_loop.data import as_dataset

    records = [{"id": f"r{i}", "image": f"img/{i}.jpg", "conversations": []} for i in range(3)]

    class Parsed:  # what a VLDataset holds, without the image files
        parsed_records = records

        def __len__(self):
            return len(self.parsed_records)

    moved = [{**r, "image": "/elsewhere/" + os.path.basename(r["image"])} for r in records]
    renamed = [dict(r) for r in records]
    renamed[1]["image"] = "img/other.jpg"
    fingerprint = data_fingerprint(Parsed())
    Parsed.parsed_records = moved
    assert data_fingerprint(Parsed()) == fingerprint, "a moved image folder changed the fingerprint"
    Parsed.parsed_records = renamed
    assert data_fingerprint(Parsed()) != fingerprint, "another image did not change the fingerprint"
    memory = as_dataset(synthetic_vqa(3, seed=0))
    assert data_fingerprint(memory)["records"] == 3


@pytest.mark.parametrize("new", [{"batch_size": 3}, {"batch_size": 1, "grad_accum_steps": 2}])
def test_resume_with_another_batch_size_continues_the_epoch_exactly(tmp_path, new):
    data = synthetic_vqa(12, seed=0)
    reference = run(tmp_path / "ref", data=data, max_steps=6, batch_size=2)  # one epoch: 6 steps of 2
    epoch_order = reference.ids
    first = run(tmp_path / "run", data=data, max_steps=2, batch_size=2)
    resumed = run(tmp_path / "run", data=data, max_steps=100, num_epochs=1, resume_from="latest", **new)
    assert first.ids + resumed.ids[: 12 - len(first.ids)] == epoch_order, (
        f"samples skipped or repeated across the resume with {new}: {first.ids} + {resumed.ids} vs {epoch_order}"
    )


def test_resume_applies_a_changed_learning_rate_weight_decay_and_schedule(tmp_path):
    from transformers import get_scheduler

    run(tmp_path, max_steps=2, learning_rate=1e-2, lr_scheduler="cosine")
    new = dict(max_steps=5, learning_rate=4e-3, weight_decay=0.1, lr_scheduler="linear", warmup_steps=2)
    loop = run(tmp_path, resume_from="latest", **new)
    # What an uninterrupted run with the new settings uses at steps 3..5.
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=new["learning_rate"])
    schedule = get_scheduler("linear", optimizer, num_warmup_steps=2, num_training_steps=5)
    expected = []
    for _ in range(5):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert loop.lrs == pytest.approx(expected[2:], rel=1e-12), f"lr after resume {loop.lrs}, expected {expected[2:]}"
    decays = {g["weight_decay"] for g in loop.optimizer.param_groups}
    assert decays == {0.0, 0.1}, f"weight decay not rebuilt from the new config: {decays}"


# ---------------------------------------------------------------------- output_dir removed, metrics.jsonl
@pytest.mark.parametrize("recreate", [False, True])
def test_output_dir_removed_mid_run_is_a_clear_error(tmp_path, recreate):
    out = tmp_path / "out"

    class Remove:
        def on_step_end(self, loop, logs):
            if loop.state.step == 2:
                shutil.rmtree(out)
                if recreate:
                    out.mkdir()

    model, processor = tiny_llava(seed=0)
    loop = Loop(model, processor, make_config(out, max_steps=4), callbacks=[Remove()])
    with pytest.raises(RuntimeError, match="was removed or replaced .* step 2"):
        loop.fit(synthetic_vqa(12, seed=0))


def test_metrics_after_a_resume_are_marked_and_read_once(tmp_path):
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path, max_steps=4, save_steps=2, crash_at=3)
    raw = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in raw] == [1, 2, 3], f"before the resume: {raw}"
    run(tmp_path, max_steps=4, save_steps=2, resume_from="latest")
    raw = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in raw] == [1, 2, 3, 3, 4], f"records: {[r['step'] for r in raw]}"
    assert raw[3].get("resumed") is True and raw[3].get("resumed_from_step") == 2, f"no resume mark: {raw[3]}"
    assert "resumed" not in raw[4], "more than the first record after the resume is marked"
    steps = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4], f"read_metrics double-counts the redone step: {steps}"


# ---------------------------------------------------------------------- signals at the end of fit
class SignalDuring(Loop):
    """Sends itself SIGTERM during the final evaluation's first batch, or during the final save."""

    def __init__(self, *args, moment: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.moment = moment

    def generate(self, batch):
        if self.moment == "final eval" and self.state.step == self.state.max_steps:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().generate(batch)

    def _save(self, best: bool = False):
        if self.moment == "final save" and self.state.step == self.state.max_steps:
            os.kill(os.getpid(), signal.SIGTERM)
        super()._save(best)


@pytest.mark.parametrize("moment", ["final eval", "final save"])
def test_sigterm_during_the_final_evaluation_or_save_saves_and_resume_finishes(tmp_path, moment, caplog):
    evals = synthetic_vqa(3, seed=7)
    model, processor = tiny_llava(seed=0)
    loop = SignalDuring(model, processor, make_config(tmp_path, max_steps=2, eval_batch_size=1), moment=moment)
    with caplog.at_level(logging.WARNING):
        loop.fit(synthetic_vqa(12, seed=0), evals)
    assert loop.state.stop_reason == "signal SIGTERM", f"the signal was not handled: {loop.state.stop_reason}"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000002"], "no checkpoint of the last step"
    assert any("resume_from='latest'" in r.getMessage() for r in caplog.records), "no resume hint in the log"
    steps = [h["step"] for h in loop.state.history]
    if moment == "final eval":
        assert steps == [], f"the abandoned final evaluation was recorded: {steps}"
        model, processor = tiny_llava(seed=0)
        resumed = Loop(model, processor, make_config(tmp_path, max_steps=2, eval_batch_size=1, resume_from="latest"))
        resumed.fit(synthetic_vqa(12, seed=0), evals)
        assert [h["step"] for h in resumed.state.history] == [2], "the resumed run did not do the final evaluation"
        assert math.isfinite(resumed.state.history[-1]["eval/loss"])
    else:
        assert steps == [2], f"the final evaluation before the save is missing: {steps}"
