"""batch_size="auto" / eval_batch_size="auto" / effective_batch_size: the OOM-safe search, the loop
choosing and training with it (an injected memory model on the CPU: a forward that runs out of memory
above some batch size, and a peak that grows with it), the cache that a resume reuses, and the errors."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import small_config
from llava_loop import Loop, LoopConfig
from llava_loop import loop as loop_module
from llava_loop.memory import AUTO_BATCH_FILE, find_batch_size
from llava_loop.testing import synthetic_vqa, tiny_llava

GIB = 2**30


# ---------------------------------------------------------------------- the search
@pytest.mark.parametrize(
    ("limit", "fits", "expected"), [(64, 6, 6), (64, 1, 1), (5, 9, 5), (64, 64, 64), (100, 37, 37)]
)
def test_search_finds_the_largest_size_that_fits_and_frees_after_every_try(limit, fits, expected):
    tried, freed = [], []

    def try_batch(n):
        tried.append(n)
        if n > fits + 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return n * 10  # within the budget up to `fits`

    assert find_batch_size(try_batch, limit, budget=fits * 10, free=lambda: freed.append(1)) == expected
    assert len(freed) == len(tried), "memory was not freed after every try"
    assert max(tried) <= limit and len(tried) <= 2 * limit.bit_length() + 1, f"tries: {tried}"


def test_not_even_one_sample_fitting_says_what_to_change():
    def oom(n):
        raise torch.OutOfMemoryError("injected")

    with pytest.raises(RuntimeError, match=r"not even one sample fits.*max_length.*gradient_checkpointing"):
        find_batch_size(oom, 64, budget=GIB, free=lambda: None)
    with pytest.raises(RuntimeError, match=r"peak 2.0 GiB, budget 1.0 GiB"):
        find_batch_size(lambda n: 2 * GIB, 64, budget=GIB, free=lambda: None)


# ---------------------------------------------------------------------- the loop, with an injected memory model
class MemoryModel:
    """A GPU of ``budget`` bytes on which a training forward of more than ``oom_above`` samples runs out
    of memory and a batch of n samples peaks at ``n * per_sample`` bytes; counts the probes."""

    def __init__(self, monkeypatch, oom_above: int, per_sample: int, budget: int, eval_per_sample: int | None = None):
        self.oom_above, self.per_sample, self.eval_per_sample = oom_above, per_sample, eval_per_sample
        self.last = 0
        self.probes: list[tuple[str, int]] = []
        monkeypatch.setattr(loop_module, "can_measure", lambda device: True)
        monkeypatch.setattr(loop_module, "memory_budget", lambda device: budget)
        monkeypatch.setattr(loop_module, "measure_peak", self.measure)
        monkeypatch.setattr(loop_module, "device_identity", lambda device: {"device": "injected", "budget": budget})

    def measure(self, step, device) -> int:
        self.last, self.kind = 0, None
        step()
        self.probes.append((self.kind, self.last))
        per = self.eval_per_sample if self.kind == "eval" else self.per_sample
        return self.last * per


def probing_loop(memory: MemoryModel):
    class Probed(Loop):
        def training_step(self, batch):
            memory.last, memory.kind = len(batch["ids"]), "train"
            if memory.last > memory.oom_above:
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")
            return super().training_step(batch)

        def evaluation_step(self, batch):
            memory.last, memory.kind = len(batch["gen"]["ids"]), "eval"
            return super().evaluation_step(batch)

    return Probed


def test_auto_picks_the_largest_divisor_of_the_effective_batch_that_fits_and_trains_with_it(tmp_path, monkeypatch):
    memory = MemoryModel(monkeypatch, oom_above=9, per_sample=GIB, budget=7 * GIB)  # 7 fit, 8 over budget
    steps: list[int] = []

    class Recording(probing_loop(memory)):
        def training_step(self, batch):
            out = super().training_step(batch)
            steps.append(len(batch["ids"]))
            return out

    model, processor = tiny_llava()
    cfg = small_config(tmp_path, batch_size="auto", effective_batch_size=12, max_steps=2, log_steps=0)
    loop = Recording(model, processor, cfg)
    loop.fit(synthetic_vqa(40))
    assert (loop.batch_size, loop.grad_accum_steps) == (6, 2), "7 fit; 6 is the largest size dividing 12"
    assert [n for kind, n in memory.probes if kind == "train"] == [1, 2, 4, 8, 6, 7]
    assert steps[-4:] == [6, 6, 6, 6], f"micro-batches trained: {steps}"  # 2 steps x 2 accumulated
    assert loop.state.samples_seen == 24
    saved = json.loads((tmp_path / AUTO_BATCH_FILE).read_text())
    assert saved["train"]["batch_size"] == 7, "the cache holds what fits, not the divisor chosen from it"
    assert LoopConfig.from_file(tmp_path / "config.yaml").batch_size == "auto", "the saved config lost 'auto'"


def test_a_resume_reuses_the_found_size_without_searching_and_continues_exactly(tmp_path, monkeypatch):
    def run(out, memory, **settings):
        model, processor = tiny_llava(seed=0)
        cfg = small_config(out, batch_size="auto", effective_batch_size=8, log_steps=0, seed=1, **settings)
        loop = probing_loop(memory)(model, processor, cfg)
        loop.fit(synthetic_vqa(24, seed=0))
        return loop

    def weights(loop):
        model = loop.accelerator.unwrap_model(loop.model)
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    full_memory = MemoryModel(monkeypatch, oom_above=100, per_sample=GIB, budget=5 * GIB)
    full = run(tmp_path / "full", full_memory, max_steps=4)
    assert (full.batch_size, full.grad_accum_steps) == (4, 2)
    first = run(
        tmp_path / "resumed", MemoryModel(monkeypatch, oom_above=100, per_sample=GIB, budget=5 * GIB), max_steps=2
    )
    assert first.state.step == 2
    again = MemoryModel(monkeypatch, oom_above=100, per_sample=GIB, budget=5 * GIB)
    resumed = run(tmp_path / "resumed", again, max_steps=4, resume_from="latest")
    assert [kind for kind, _ in again.probes] == [], "the resumed run searched again"
    assert (resumed.batch_size, resumed.grad_accum_steps) == (4, 2) and resumed.state.step == 4
    for name, value in weights(full).items():
        assert torch.equal(weights(resumed)[name], value), f"{name} differs from the uninterrupted run"
    # Another GPU (here: another budget) searches again.
    other = MemoryModel(monkeypatch, oom_above=100, per_sample=GIB, budget=2 * GIB)
    changed = run(tmp_path / "resumed", other, max_steps=5, resume_from="latest")
    assert other.probes and changed.batch_size == 2 and changed.grad_accum_steps == 4


def test_eval_batch_size_auto_is_searched_at_the_first_evaluation_and_kept(tmp_path, monkeypatch):
    memory = MemoryModel(monkeypatch, oom_above=100, per_sample=GIB, budget=5 * GIB, eval_per_sample=GIB // 2)
    model, processor = tiny_llava()
    cfg = small_config(tmp_path, eval_batch_size="auto", max_steps=2, eval_steps=1, log_steps=0, max_new_tokens=2)
    loop = probing_loop(memory)(model, processor, cfg)
    loop.fit(synthetic_vqa(8), eval_data=synthetic_vqa(12, seed=1))
    eval_probes = [n for kind, n in memory.probes if kind == "eval"]
    assert loop.eval_batch_size == 10, f"probes {eval_probes}"  # 10 x 0.5 GiB = 5 GiB budget; at most 12 samples
    assert len(loop.state.history) == 2 and all(h["eval/samples"] == 12 for h in loop.state.history)
    assert eval_probes == [1, 2, 4, 8, 12, 10, 11], "searched once (at the first evaluation), doubling then bisecting"
    assert json.loads((tmp_path / AUTO_BATCH_FILE).read_text())["eval"]["batch_size"] == 10


def test_without_a_gpu_auto_falls_back_to_the_defaults(tmp_path):
    model, processor = tiny_llava()
    loop = Loop(model, processor, small_config(tmp_path, batch_size="auto", eval_batch_size="auto", max_steps=1))
    loop.fit(synthetic_vqa(8), eval_data=synthetic_vqa(4, seed=1))
    assert (loop.batch_size, loop.eval_batch_size) == (4, 4)


def test_effective_batch_size_sets_the_accumulation_or_says_why_not(tmp_path):
    model, processor = tiny_llava()
    loop = Loop(model, processor, small_config(tmp_path, batch_size=2, effective_batch_size=8, max_steps=1))
    loop.fit(synthetic_vqa(8))
    assert loop.grad_accum_steps == 4
    model, processor = tiny_llava()
    bad = Loop(model, processor, small_config(tmp_path / "bad", batch_size=3, effective_batch_size=8, max_steps=1))
    with pytest.raises(ValueError, match=r"effective_batch_size=8 is not a multiple of batch_size=3"):
        bad.fit(synthetic_vqa(8))
    with pytest.raises(ValueError, match="set one of them"):
        LoopConfig(effective_batch_size=8, grad_accum_steps=2)
    with pytest.raises(ValueError, match=r"batch_size='max' is invalid"):
        LoopConfig(batch_size="max")
