"""``plot_run``: one panel per curve found in ``metrics.jsonl`` (resumed runs read as one run), a valid
PNG, and errors that say what is wrong with the run folder."""

from __future__ import annotations

import json
import logging
import math

import pytest
from PIL import Image

from helpers import small_config
from llava_loop import Loop, plot_run
from llava_loop.plots import EVAL_BOOKKEEPING, _figure, _series
from llava_loop.testing import synthetic_vqa, tiny_llava

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BOOKKEEPING = {"eval/samples": 4.0, "eval/samples_per_s": 3.0, "eval/gen_tokens_per_s": 9.0}

# Written as JSONLLogger writes them: NaN as "nan", a resumed attempt marked on its first record.
# The first attempt's steps 3-4 (loss 99) were redone after resuming from step 2 and must not be drawn.
RECORDS = [
    {"step": 1, "train/loss": 2.0, "train/lr": 1e-3, "train/lr/projector": 1e-4, "train/grad_norm": 1.0},
    {"step": 2, "train/loss": 1.8, "train/lr": 9e-4, "train/lr/projector": 9e-5, "train/tokens_per_s": 50.0},
    {"step": 2, "eval/loss": 1.9, "eval/exact_match": 0.1, "eval/bleu": "nan", **BOOKKEEPING},
    {"step": 3, "train/loss": 99.0, "train/lr": 8e-4, "train/lr/projector": 8e-5},
    {"step": 4, "train/loss": 99.0, "train/lr": 7e-4, "train/lr/projector": 7e-5},
    {"step": 4, "eval/loss": 99.0, "eval/exact_match": 0.0, "eval/bleu": 0.0, **BOOKKEEPING},
    {"step": 3, "train/loss": 1.5, "train/lr": 8e-4, "train/lr/projector": 8e-5, "resumed": True,
     "resumed_from_step": 2},
    {"step": 4, "train/loss": 1.2, "train/lr": 7e-4, "train/lr/projector": 7e-5, "train/eta_s": 0.0},
    {"step": 4, "eval/loss": 1.3, "eval/exact_match": 0.5, "eval/bleu": 12.0, "eval/answer_f1": 0.4, **BOOKKEEPING},
]  # fmt: skip


def write_run(folder, records=RECORDS) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(folder)


def panels(run_dir) -> dict[str, dict[str, tuple[list, list]]]:
    """``{axes title: {line label: (steps, values)}}`` of the figure `plot_run` draws for ``run_dir``."""
    figure = _figure(_series(f"{run_dir}/metrics.jsonl"))
    return {
        axes.get_title(): {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in axes.lines}
        for axes in figure.axes
    }


def test_plot_has_a_panel_for_loss_lr_and_every_eval_metric_and_none_for_bookkeeping(tmp_path):
    drawn = panels(write_run(tmp_path / "run"))
    evals = {k for r in RECORDS for k in r if k.startswith("eval/")} - set(BOOKKEEPING) - {"eval/loss"}
    assert set(drawn) == {"loss", "learning rate"} | evals, f"panels drawn {sorted(drawn)}; metrics present {evals}"
    assert list(drawn)[:2] == ["loss", "learning rate"], f"loss and lr should come first: {list(drawn)}"
    assert set(drawn["loss"]) == {"train/loss", "eval/loss"}, f"loss panel lines: {list(drawn['loss'])}"
    assert set(drawn["learning rate"]) == {"train/lr", "train/lr/projector"}, (
        f"learning-rate panel lines: {list(drawn['learning rate'])}"
    )
    assert all(set(lines) == {title} for title, lines in drawn.items() if title.startswith("eval/")), (
        f"each eval panel should draw exactly its own metric: {drawn}"
    )
    assert set(BOOKKEEPING) <= EVAL_BOOKKEEPING, "the test's bookkeeping keys are not the ones plots leaves out"


def test_a_resumed_run_is_drawn_without_the_redone_steps(tmp_path):
    drawn = panels(write_run(tmp_path / "run"))
    assert drawn["loss"]["train/loss"] == ([1, 2, 3, 4], [2.0, 1.8, 1.5, 1.2]), (
        f"train/loss should be the resumed run's, without the redone steps: {drawn['loss']['train/loss']}"
    )
    assert drawn["loss"]["eval/loss"] == ([2, 4], [1.9, 1.3]), f"eval/loss drawn {drawn['loss']['eval/loss']}"
    assert drawn["eval/exact_match"]["eval/exact_match"] == ([2, 4], [0.1, 0.5]), (
        f"eval/exact_match drawn {drawn['eval/exact_match']}"
    )


def test_a_nan_metric_keeps_its_panel_with_a_gap_and_a_note(tmp_path):
    figure = _figure(_series(write_run(tmp_path / "run") + "/metrics.jsonl"))
    (axes,) = [a for a in figure.axes if a.get_title() == "eval/bleu"]
    (line,) = axes.lines
    steps, values = list(line.get_xdata()), list(line.get_ydata())
    assert steps == [2, 4] and math.isnan(values[0]) and values[1] == 12.0, (
        f"eval/bleu should be drawn as NaN at step 2 and 12.0 at step 4: {steps} {values}"
    )
    notes = [t.get_text() for t in axes.texts]
    assert any("1 NaN" in t for t in notes), f"the panel does not say a point is NaN: {notes}"


def test_plot_run_writes_a_valid_png_at_the_default_and_a_given_path(tmp_path):
    run_dir = write_run(tmp_path / "run")
    path = plot_run(run_dir)
    assert path == f"{run_dir}/curves.png", f"default output should be run_dir/curves.png, got {path}"
    expected = tuple(round(v * 100) for v in _figure(_series(f"{run_dir}/metrics.jsonl")).get_size_inches())
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE, f"{path} is not a PNG"
    with Image.open(path) as image:
        image.verify()
        assert image.size == expected, f"PNG is {image.size}, the figure is {expected} pixels at 100 dpi"

    other = tmp_path / "plots" / "deeper" / "run.png"
    assert plot_run(run_dir, out=str(other)) == str(other), "plot_run should return the out path it was given"
    with Image.open(other) as image:
        image.verify()


def test_plot_run_draws_the_keys_a_real_run_logs(tmp_path):
    model, processor = tiny_llava(seed=0)
    config = small_config(tmp_path, max_steps=2, log_steps=1, eval_steps=2, max_new_tokens=2, handle_signals=False)
    Loop(model, processor, config, metrics="exact_match").fit(synthetic_vqa(4, seed=0), synthetic_vqa(2, seed=1))
    drawn = panels(tmp_path)
    assert set(drawn) == {"loss", "learning rate", "eval/exact_match"}, f"panels for a real run: {sorted(drawn)}"
    assert drawn["loss"]["train/loss"][0] == [1, 2], f"train/loss steps: {drawn['loss']['train/loss'][0]}"
    with Image.open(plot_run(str(tmp_path))) as image:
        image.verify()


def test_a_value_that_is_not_a_number_is_left_out_with_a_warning(tmp_path, caplog):
    records = [*RECORDS, {"step": 4, "eval/note": "looks fine"}]
    with caplog.at_level(logging.WARNING, logger="llava_loop.plots"):
        drawn = panels(write_run(tmp_path / "run", records))
    assert "eval/note" not in drawn, f"a text value got a panel: {sorted(drawn)}"
    assert any("eval/note is not a number in 1 record" in r.getMessage() for r in caplog.records), (
        f"no warning names the non-numeric key: {[r.getMessage() for r in caplog.records]}"
    )


def test_plot_run_errors_name_the_folder_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        plot_run(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"metrics.jsonl not found: is .*empty a llava_loop output_dir\?"):
        plot_run(str(tmp_path / "empty"))
    no_numbers = write_run(tmp_path / "no_numbers", [{"step": 0, "resumed": True, "eval/note": "n/a"}])
    with pytest.raises(ValueError, match=r"no_numbers/metrics.jsonl holds no numeric train/ or eval/ value"):
        plot_run(no_numbers)
    diagnostics = write_run(tmp_path / "diagnostics", [{"step": 1, "train/grad_norm": 1.0, "eval/samples": 8.0}])
    with pytest.raises(ValueError, match=r"diagnostics/metrics.jsonl: nothing to plot"):
        plot_run(diagnostics)
    cut = tmp_path / "cut"
    write_run(cut)
    with open(cut / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "train/lo')
    with pytest.raises(ValueError, match=r"cut/metrics.jsonl is not JSON lines .*cut-off last line"):
        plot_run(str(cut))
    assert not (cut / "curves.png").exists(), "a PNG was written for a broken metrics.jsonl"
