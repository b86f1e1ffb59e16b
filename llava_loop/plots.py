"""Training curves of a finished (or running) run: ``plot_run(run_dir)`` draws ``metrics.jsonl`` as one PNG.

Panels, x = optimizer step:

- ``loss``: ``train/loss`` and, on the same axes, ``eval/loss`` when the run evaluated;
- ``learning rate``: ``train/lr`` and every per-group ``train/lr/<kind>`` key;
- one panel per other ``eval/*`` metric, in the order they first appear (``eval/exact_match``,
  ``eval/rougeL``, a custom metric's keys...), except the bookkeeping in `EVAL_BOOKKEEPING`.

Other ``train/*`` keys (grad norm, throughput, ETA, memory, sample counts) are diagnostics, not
curves: they stay in ``metrics.jsonl``. A NaN or infinite value (written as ``"nan"``/``"inf"``) is
drawn as a gap in its line, and the panel says how many steps had one.

During `fit`, `RunPlot` (added by the loop on the main process) redraws ``{output_dir}/curves.png`` after
every evaluation record and at the end, so the picture of a running job is never older than its last
evaluation.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
from typing import Any

from .callbacks import Callback
from .checkpointing import atomic_write_bytes
from .loggers import read_metrics

logger = logging.getLogger(__name__)

EVAL_BOOKKEEPING = frozenset({"eval/samples", "eval/samples_per_s", "eval/gen_tokens_per_s"})
"""``eval/*`` keys that describe the evaluation itself (how many samples, how fast), not the
model: they get no panel."""

_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "infinity": math.inf, "-infinity": -math.inf}


def plot_run(run_dir: str, out: str | None = None) -> str:
    """Draw the curves of ``{run_dir}/metrics.jsonl`` into one PNG and return its path.

    A resumed run is read as one run (`llava_loop.loggers.read_metrics` drops the steps the resume
    redid). Matplotlib draws off-screen (no display needed). The PNG is replaced atomically: a reader
    (an image viewer, a tracker upload) sees the previous picture or the new one, never part of one.

    Args:
        run_dir: A run's ``output_dir`` (it holds ``metrics.jsonl``).
        out: Where to write the PNG; default ``{run_dir}/curves.png``. Missing folders are created.

    Returns:
        The path of the PNG written.

    Raises:
        FileNotFoundError: ``run_dir`` or its ``metrics.jsonl`` does not exist.
        ValueError: ``metrics.jsonl`` is not JSON lines, or holds no numeric ``train/``/``eval/`` value.

    Example:
        >>> plot_run("runs/a")  # doctest: +SKIP
        'runs/a/curves.png'
    """
    path = _metrics_path(run_dir)
    figure = _figure(_series(path), source=path)
    out = out or os.path.join(run_dir, "curves.png")
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=100)
    atomic_write_bytes(out, png.getvalue())
    return out


class RunPlot(Callback):
    """Keeps ``{output_dir}/curves.png`` current during `fit`: redrawn by `plot_run` after each evaluation
    record reaches ``metrics.jsonl``, and at fit end if records came after the last drawing (training
    records of a run without eval data; with eval data the final evaluation's drawing is already current).

    `Loop` adds one on the main process, after its `llava_loop.loggers.JSONLLogger` (so the record is in the
    file when this draws). A drawing that fails (a full disk, a broken matplotlib) never stops training: the
    first failure is logged as a warning, later ones are not, and the next evaluation tries again.

    Example:
        >>> RunPlot().draw("runs/a")  # what fit does after each evaluation  # doctest: +SKIP
    """

    def __init__(self) -> None:
        self.undrawn = False  # records reached metrics.jsonl since the last drawing of this fit
        self.failures = 0  # drawings that failed during this fit (the first was logged)

    def on_fit_start(self, loop: Any) -> None:
        self.undrawn, self.failures = False, 0

    def on_log(self, loop: Any, logs: dict) -> None:
        self.undrawn = True
        if any(key.startswith("eval/") for key in logs):
            self.draw(loop.config.output_dir)

    def on_fit_end(self, loop: Any) -> None:
        if self.undrawn:  # else nothing new (or nothing at all: log_steps=0 without eval data) to draw
            self.draw(loop.config.output_dir)

    def draw(self, run_dir: str) -> None:
        """`plot_run` (``run_dir``/curves.png), warning instead of raising on the first failure."""
        try:
            plot_run(run_dir)
            self.undrawn = False
        except Exception as err:  # the plot is a view of the run, never a reason to stop it
            self.failures += 1
            if self.failures == 1:
                logger.warning(
                    "could not draw %s/curves.png (%s: %s); training goes on, later failures are not logged. "
                    "Draw it yourself with `llava-loop plot %s`",
                    *(run_dir, type(err).__name__, err, run_dir),
                )


def _metrics_path(run_dir: str) -> str:
    """``{run_dir}/metrics.jsonl``, or an error that says what is missing."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run directory {run_dir} does not exist (or is not a folder); pass a run's output_dir")
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: is {run_dir} a llava_loop output_dir? fit writes metrics.jsonl there "
            "(on the main process) from the first logged step on"
        )
    return path


def _series(path: str) -> dict[str, list[tuple[int, float]]]:
    """``{key: [(step, value), ...]}`` for every numeric ``train/``/``eval/`` key of ``metrics.jsonl``."""
    try:
        records = read_metrics(path)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path} is not JSON lines ({err}); a run killed mid-write can leave a cut-off last line: delete it"
        ) from err
    series: dict[str, list[tuple[int, float]]] = {}
    skipped: dict[str, int] = {}
    for number, record in enumerate(records, 1):
        for key, value in record.items():
            if not key.startswith(("train/", "eval/")):
                continue
            number_value = _number(value)
            if number_value is None:
                skipped[key] = skipped.get(key, 0) + 1
                continue
            step = record.get("step")
            if not isinstance(step, int) or isinstance(step, bool):
                raise ValueError(f"{path}: record {number} has {key} but no integer 'step' ({record}); fix or drop it")
            series.setdefault(key, []).append((step, number_value))
    for key, count in skipped.items():
        logger.warning("%s: %s is not a number in %d record(s); those points are not plotted", path, key, count)
    if not series:
        raise ValueError(
            f"{path} holds no numeric train/ or eval/ value to plot ({len(records)} records): did the run reach "
            "its first log_steps or eval_steps?"
        )
    return series


def _number(value: Any) -> float | None:
    """A logged value as a float (``"nan"``/``"inf"`` strings included); None if it is not a number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        return _NON_FINITE.get(value.strip().lower())
    return None


def _panels(series: dict[str, list]) -> list[tuple[str, list[str]]]:
    """``[(panel title, [keys drawn on it]), ...]`` in display order."""
    panels = []
    losses = [k for k in ("train/loss", "eval/loss") if k in series]
    if losses:
        panels.append(("loss", losses))
    rates = [k for k in series if k == "train/lr" or k.startswith("train/lr/")]
    if rates:
        panels.append(("learning rate", rates))
    for key in series:
        if key.startswith("eval/") and key != "eval/loss" and key not in EVAL_BOOKKEEPING:
            panels.append((key, [key]))
    return panels


def _figure(series: dict[str, list[tuple[int, float]]], source: str = "metrics.jsonl"):
    """A matplotlib ``Figure`` with one axes per panel (titled as in `_panels`, one line per key)."""
    from matplotlib.figure import Figure  # a Figure without pyplot: no global state, no display

    panels = _panels(series)
    if not panels:
        raise ValueError(
            f"{source}: nothing to plot, the numeric keys {sorted(series)} are all diagnostics or bookkeeping"
        )
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    figure = Figure(figsize=(4.5 * cols, 3.3 * rows), layout="constrained")
    grid = figure.subplots(rows, cols, squeeze=False).ravel()
    for axes in grid[len(panels) :]:
        figure.delaxes(axes)
    for axes, (name, keys) in zip(grid, panels):
        non_finite = 0
        for key in keys:
            steps, values = zip(*sorted(series[key]))
            style = "o-" if key.startswith("eval/") else "-"  # evaluations are sparse: show each point
            axes.plot(steps, values, style, markersize=3, label=key)
            non_finite += sum(not math.isfinite(v) for v in values)
        axes.set_title(name)
        axes.set_xlabel("step")
        if len(keys) > 1:
            axes.legend()
        if non_finite:
            axes.text(0.02, 0.02, f"{non_finite} NaN/inf point(s) not drawn", transform=axes.transAxes,
                      fontsize=8, color="tab:red")  # fmt: skip
    figure.suptitle(source, fontsize=9)
    return figure
