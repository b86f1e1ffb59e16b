"""``plot_run``: one panel per curve found in ``metrics.jsonl`` (resumed runs read as one run), a valid
PNG written atomically, and errors that say what is wrong with the run folder; during `fit`, ``curves.png``
redrawn after every evaluation record (a failed drawing only warns)."""

from __future__ import annotations

import io
import json
import logging
import math
import os
from pathlib import Path

import pytest
from PIL import Image

from helpers import small_config
from llava_loop import Callback, Loop, plot_run, plots
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


# --------------------------------------------------------------------------- curves.png during fit
class PlotWatcher(Callback):
    """At every eval record of ``on_log`` (after the default RunPlot): the inode and bytes of curves.png."""

    def __init__(self) -> None:
        self.plots_at_eval_log: list[tuple[int, int, bytes]] = []

    def on_log(self, loop, logs):
        if "eval/loss" in logs:
            png = Path(loop.config.output_dir, "curves.png")
            self.plots_at_eval_log.append((logs["step"], png.stat().st_ino, png.read_bytes()))


def fit_with_evaluations(out, callbacks=()):
    """Four steps, train records every step, evaluations at steps 2 and 4."""
    model, processor = tiny_llava(seed=0)
    config = small_config(out, max_steps=4, eval_steps=2, max_new_tokens=2, log_steps=1)
    loop = Loop(model, processor, config, callbacks=list(callbacks))
    loop.fit(synthetic_vqa(8, seed=0), synthetic_vqa(5, seed=1))
    return loop


def test_curves_png_is_redrawn_after_each_evaluation_record_and_at_fit_end(tmp_path, monkeypatch):
    drawn = []  # (the steps of the train and the eval records in metrics.jsonl) each time the plot is drawn

    def spy(run_dir, out=None):
        records = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
        drawn.append([[r["step"] for r in records if key in r] for key in ("train/loss", "eval/loss")])
        return plot_run(run_dir, out)

    monkeypatch.setattr(plots, "plot_run", spy)
    watcher = PlotWatcher()
    fit_with_evaluations(tmp_path / "eval", [watcher])
    assert drawn == [[[1, 2], [2]], [[1, 2, 3, 4], [2, 4]]], (
        f"the plot should be drawn right after each eval record (the final one: also the end of fit): {drawn}"
    )
    (step_a, inode_a, png_a), (step_b, inode_b, png_b) = watcher.plots_at_eval_log
    assert (step_a, step_b) == (2, 4), f"eval records at steps {step_a}, {step_b}"
    assert png_a.startswith(b"\x89PNG") and Image.open(io.BytesIO(png_b)).size[0] > 0, "curves.png is not a PNG"
    assert png_a != png_b and inode_a != inode_b, "curves.png was not redrawn (replaced) after the second evaluation"
    assert (tmp_path / "eval" / "curves.png").read_bytes() == png_b, "curves.png changed after the last evaluation"
    assert not list((tmp_path / "eval").glob(".curves.png.tmp-*")), "a temporary PNG was left behind"

    drawn.clear()  # without eval data: drawn once, at the end, with every training record
    model, processor = tiny_llava(seed=0)
    Loop(model, processor, small_config(tmp_path / "train", max_steps=3, log_steps=1)).fit(synthetic_vqa(6))
    assert drawn == [[[1, 2, 3], []]], f"a run without eval data should be drawn once at fit end: {drawn}"
    assert (tmp_path / "train" / "curves.png").read_bytes().startswith(b"\x89PNG"), "no curves.png at fit end"


def test_a_failing_plot_warns_once_and_training_goes_on(tmp_path, monkeypatch, caplog):
    calls = []

    def broken(run_dir, out=None):
        calls.append(run_dir)
        raise RuntimeError("no backend")

    monkeypatch.setattr(plots, "plot_run", broken)
    with caplog.at_level(logging.WARNING, logger="llava_loop.plots"):
        loop = fit_with_evaluations(tmp_path)
    assert loop.state.step == 4 and [h["step"] for h in loop.state.history] == [2, 4], "training did not finish"
    assert len(calls) == 3, f"the plot should be tried at each evaluation and at the end, was tried {len(calls)}x"
    warnings = [r.getMessage() for r in caplog.records if "curves.png" in r.getMessage()]
    assert len(warnings) == 1 and "no backend" in warnings[0], f"expected one warning with the reason: {warnings}"


def test_plot_run_replaces_the_png_atomically_and_a_failed_drawing_keeps_the_old_one(tmp_path, monkeypatch):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "train/loss": 1.0}) + "\n")
    (tmp_path / "curves.png").write_bytes(b"old picture")
    from matplotlib.figure import Figure

    def savefig_breaks_halfway(self, target, **kwargs):
        target.write(b"\x89PNG half")
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(Figure, "savefig", savefig_breaks_halfway)
        with pytest.raises(OSError, match="disk full"):
            plot_run(str(tmp_path))
    assert (tmp_path / "curves.png").read_bytes() == b"old picture", "a failed drawing damaged the old PNG"
    plot_run(str(tmp_path))
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG"), "the redrawn PNG is not a PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "metrics.jsonl"], "temporary files left"


def test_overwrite_output_dir_deletes_the_earlier_runs_plot(tmp_path):
    (tmp_path / "curves.png").write_bytes(b"the earlier run's curves")
    model, processor = tiny_llava(seed=0)
    config = small_config(tmp_path, max_steps=1, log_steps=0, overwrite_output_dir=True)
    Loop(model, processor, config).fit(synthetic_vqa(2))  # logs nothing: draws nothing
    assert not (tmp_path / "curves.png").exists(), "a fresh run kept the earlier run's curves.png"
