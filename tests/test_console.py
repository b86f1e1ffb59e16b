"""What a run tells its user: the start banner, the end summary and ``summary.json`` (facts taken from the
loop's real state), and no warning noise on a normal run. Tiny offline LLaVA, CPU, fp32."""

from __future__ import annotations

import logging
import warnings

from helpers import small_config
from llava_loop import Loop
from llava_loop.testing import synthetic_vqa, tiny_llava


def test_a_normal_lora_fit_with_eval_and_save_emits_no_warnings(tmp_path, caplog):
    model, processor = tiny_llava()
    config = small_config(tmp_path / "out", max_steps=2, eval_steps=1, save_steps=1, max_new_tokens=2,
                          metric_for_best="eval/exact_match")
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING, logger="llava_loop"):
        warnings.simplefilter("always")
        Loop(model, processor, config).fit(synthetic_vqa(8), eval_data=synthetic_vqa(4, seed=1))
    emitted = [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught]
    assert not emitted, f"a normal fit emitted warnings: {emitted}"
    logged = [f"{r.name}: {r.getMessage()}" for r in caplog.records
              if r.levelno >= logging.WARNING and r.name.startswith("llava_loop")]
    assert not logged, f"a normal fit logged warnings: {logged}"
