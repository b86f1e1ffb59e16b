"""Experiment trackers (TensorBoard, wandb, MLflow, trackio, Aim and any other Accelerate tracker) behind
one callback, `TrackerLogger`, that never stops a run.

`Loop` adds a `TrackerLogger` on the main process when ``LoopConfig.report_to`` names trackers. It makes
each tracker from Accelerate's tracker classes (`accelerate.tracking`) and gives it, in order: the config
(`tracker_config`), every record of ``metrics.jsonl`` at its step, a table of predictions per evaluation,
and the end-of-run summary. A tracker that raises is warned about once and dropped; training, the other
trackers, ``metrics.jsonl`` and the console go on. docs/logging.md says where each tracker's files go.

Example:
    >>> tracker_config({"lr": 2e-4, "targets": ["q_proj"], "cache": None, "kwargs": {"wandb": {"mode": "offline"}}})
    {'lr': 0.0002, 'targets': '["q_proj"]', 'cache': 'None', 'kwargs.wandb.mode': 'offline'}
"""

from __future__ import annotations

import functools
import html
import importlib.util
import inspect
import json
import logging
import math
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .callbacks import Callback
from .checkpointing import atomic_write_text
from .loggers import _jsonable, _number, _plain_json, end_facts, start_facts

logger = logging.getLogger(__name__)

# The package each of Accelerate's trackers needs.
TRACKER_PACKAGES = {
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "mlflow": "mlflow",
    "trackio": "trackio",
    "aim": "aim",
    "comet_ml": "comet_ml",
    "clearml": "clearml",
    "dvclive": "dvclive",
    "swanlab": "swanlab",
}
# Init arguments the loop sets from LoopConfig fields: tracker_init_kwargs may not set them.
SET_BY_THE_LOOP = {
    "tensorboard": {"log_dir": "output_dir (the logs go to {output_dir}/tensorboard/{run_name})"},
    "wandb": {"project": "tracker_project", "name": "run_name", "config": "the LoopConfig itself"},
    "mlflow": {"experiment_name": "tracker_project", "run_name": "run_name"},
    "trackio": {"project": "tracker_project", "name": "run_name", "config": "the LoopConfig itself"},
    "aim": {"experiment": "tracker_project"},
}
# What to check when a tracker fails, by tracker.
ADVICE = {
    "tensorboard": "check that output_dir is writable",
    "wandb": "check `wandb login` and the network, or log offline with WANDB_MODE=offline (then `wandb sync`)",
    "mlflow": "check MLFLOW_TRACKING_URI and that its server is reachable (unset it to log to {output_dir}/mlflow)",
    "trackio": "check TRACKIO_DIR, or the Space / server settings in tracker_init_kwargs",
    "aim": "check the Aim repo ({output_dir}/aim by default; `aim upgrade` for an old one)",
}
RUN_IDS_FILE = "trackers.json"  # {tracker: its run id}, in output_dir: a resumed run continues those runs
PREDICTION_COLUMNS = ["id", "image", "prompt", "prediction", "references", "scores"]
_LOCAL_MLFLOW_STORES: set[str] = set()  # tracking URIs that a TrackerLogger set (not the user)
_OPEN: list[TrackerLogger] = []  # loggers whose fit started trackers and has not ended them (it raised, so far)


def tracker_config(values: Mapping[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """``values`` (e.g. ``LoopConfig.to_dict()``) as values every tracker's config accepts: nested dicts
    become dotted keys, None the string ``"None"``, lists and tuples their JSON text, an empty dict ``"{}"``,
    numbers and strings stay, anything else becomes ``str(value)``.

    Example:
        >>> tracker_config({"a": {"b": 1, "c": []}, "d": {}})
        {'a.b': 1, 'a.c': '[]', 'd': '{}'}
    """
    flat: dict[str, bool | int | float | str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        value = _jsonable(value)
        if isinstance(value, Mapping) and value:
            flat.update(tracker_config(value, prefix=f"{name}."))
        elif isinstance(value, Mapping):
            flat[name] = "{}"
        elif value is None:
            flat[name] = "None"
        elif isinstance(value, (list, tuple)):
            flat[name] = json.dumps(_plain_json(list(value)), ensure_ascii=False, default=str)
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


def tracker_names(report_to: list[str]) -> list[str]:
    """The trackers ``report_to`` asks for, in order, each once; ``"all"`` is every tracker installed
    here that Accelerate knows."""
    names: list[str] = []
    for name in report_to:
        if name == "all":
            from accelerate.tracking import get_available_trackers

            names += [str(t) for t in get_available_trackers()]
        else:
            names.append(name)
    return list(dict.fromkeys(names))


def check_trackers(report_to: list[str], init_kwargs: Mapping[str, Mapping[str, Any]]) -> None:
    """Raise now, before any training, if a tracker of ``report_to`` is not installed or ``init_kwargs``
    gives it an argument that its init does not take or that the loop sets itself.

    Raises:
        ImportError: a tracker's package is missing (naming what to install).
        ValueError: an unknown or reserved init argument (naming the accepted ones).
    """
    for name in tracker_names(report_to):
        package = TRACKER_PACKAGES.get(name)
        if package is not None and importlib.util.find_spec(package) is None:
            raise ImportError(
                f"report_to={report_to!r} needs the {package!r} package, which is not installed: "
                f"pip install 'llava_loop[trackers]' (or pip install {package}), or leave {name!r} out of report_to"
            )
        kwargs = init_kwargs.get(name, {})
        reserved = sorted(set(kwargs) & set(SET_BY_THE_LOOP.get(name, {})))
        if reserved:
            fields = "; ".join(f"{k}: set by {SET_BY_THE_LOOP[name][k]}" for k in reserved)
            raise ValueError(f"tracker_init_kwargs[{name!r}] sets {reserved}, which the loop sets itself ({fields})")
        accepted = _init_arguments(name)
        unknown = sorted(set(kwargs) - set(accepted)) if accepted is not None else []
        if unknown:
            raise ValueError(
                f"tracker_init_kwargs[{name!r}] has {unknown}, which {name}'s init does not take; it takes "
                f"{sorted(set(accepted) - set(SET_BY_THE_LOOP.get(name, {})))}"
            )


def _init_arguments(name: str) -> list[str] | None:
    """Keyword arguments the init of tracker ``name`` takes (None: any, or unknown)."""
    if name == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        target: Any = SummaryWriter.__init__
    elif name == "wandb":
        import wandb

        target = wandb.init
    elif name == "trackio":
        import trackio

        target = trackio.init
    elif name == "aim":
        from aim import Run

        target = Run.__init__
    else:
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        cls = LOGGER_TYPE_TO_CLASS.get(name)
        if cls is None:
            return None
        target = cls.__init__
    params = inspect.signature(target).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.name != "self" and p.kind is not p.VAR_POSITIONAL]


class TrackerLogger(Callback):
    """Sends the config, every logged record, a predictions table per evaluation and the end-of-run
    summary to the trackers of ``report_to`` (and ``trackers``), on the main process; never stops a run.

    A tracker that raises (starting, logging, a table, the summary or finishing) is warned about once
    (naming it, the error and what to check) and dropped for the rest of the run; training and the other
    trackers go on. A resumed run continues the wandb, MLflow and Aim runs it started (ids kept in
    ``{output_dir}/trackers.json``), the trackio run of the same name, and TensorBoard's run folder,
    where the steps after the checkpoint are replaced. After a fit that raised, the next one in the process
    first finishes the trackers it left open, as failed.

    The started trackers are also in ``loop.accelerator.trackers``, so a callback can reach one with
    ``loop.accelerator.get_tracker("wandb", unwrap=True)``.

    Args:
        trackers: Extra `accelerate.tracking.GeneralTracker` instances, e.g. your own tracker. Pass
            ``TrackerLogger(trackers=[...])`` in ``callbacks``: it replaces the default one and also serves
            ``report_to``.

    Example:
        >>> loop = Loop(model, processor, config, callbacks=[TrackerLogger([MyTracker()])])  # doctest: +SKIP
    """

    def __init__(self, trackers: list | None = None) -> None:
        self.extra = list(trackers or [])  # the user's GeneralTracker instances, started at fit start
        self.trackers: dict[str, Any] = {}  # name -> started tracker that still logs
        self._loop: Any = None  # the loop of the current fit (its accelerator holds the tracker list)
        self._start: dict | None = None  # start_facts of the run, for the end summary
        self._mlflow_store = False  # this logger pointed MLflow at output_dir's store (undone at the end)

    # ------------------------------------------------------------------ events
    def on_fit_start(self, loop: Any) -> None:
        self.trackers, self._loop = {}, loop
        if not loop.accelerator.is_main_process:
            return
        for earlier in [t for t in _OPEN if t is not self]:  # a fit that raised (a notebook runs the next)
            logger.info("finishing the trackers %s of an earlier fit that raised, as failed", list(earlier.trackers))
            earlier._close(failed=True)
        _OPEN.append(self)
        cfg = loop.config
        self._start = start_facts(loop)
        saved = _read_run_ids(cfg.output_dir) if loop.resumed_from is not None else {}
        for name in tracker_names(cfg.report_to):
            start = functools.partial(self._start_tracker, name, lambda n=name: self._make(n, loop, saved.get(n)))
            self._attempt(name, None, "to start", start)
        for tracker in self.extra:
            start = functools.partial(self._start_tracker, tracker.name, lambda t=tracker: t)
            self._attempt(tracker.name, None, "to start", start)
        self._sync()
        values = tracker_config(cfg.to_dict())
        self._each("to store the config", functools.partial(self._store_config, loop, values))
        # A tracker that did not start this session keeps its run id for the next resume.
        _write_run_ids(cfg.output_dir, {**saved, **{name: _run_id(name, t) for name, t in self.trackers.items()}})

    def on_log(self, loop: Any, logs: dict) -> None:
        step = logs.get("step")
        values = {k: v for k, v in map(_numeric, logs.items()) if v is not None and k != "step"}
        self._each(f"to log step {step}", lambda name, tracker: tracker.log(values, step=step))

    def on_evaluate(self, loop: Any, metrics: dict, samples: list[dict]) -> None:
        if not self.trackers:
            return
        step = loop.state.step
        folder = Path(loop.config.output_dir, "predictions")
        files = [p for p in (folder / f"step_{step:06d}.jsonl", folder / f"step_{step:06d}.html") if p.is_file()]
        rows = [_prediction_row(s) for s in samples]
        self._each(
            f"to log the predictions of step {step}", lambda name, t: _log_predictions(name, t, rows, files, step)
        )

    def on_fit_end(self, loop: Any) -> None:
        if self.trackers:
            facts = _plain_json(end_facts(loop, self._start or start_facts(loop)))
            self._each("to log the run summary", lambda name, t: _log_summary(name, t, facts, loop.state.step))
        self._close(failed=False)

    def _close(self, failed: bool) -> None:
        """Finish every tracker (``failed``: marked so where the tracker can, after a fit that raised) and
        give MLflow's tracking URI back."""
        self._each("to finish", _finish_failed if failed else lambda name, tracker: tracker.finish())
        self.trackers = {}
        self._sync()
        if self._mlflow_store:
            import mlflow

            mlflow.set_tracking_uri(None)  # back to the user's (unset) choice
            self._mlflow_store = False
        if self in _OPEN:
            _OPEN.remove(self)

    # ------------------------------------------------------------------ tracker set-up
    def _make(self, name: str, loop: Any, run_id: str | None) -> Any:
        """Create tracker ``name`` for this run; ``run_id``: the run to continue (on resume)."""
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        cfg, resumed_at = loop.config, loop.state.step if loop.resumed_from is not None else None
        run_name = cfg.run_name or os.path.basename(os.path.abspath(cfg.output_dir))
        out, cls = cfg.output_dir, LOGGER_TYPE_TO_CLASS[name]
        kwargs = dict(cfg.tracker_init_kwargs.get(name, {}))
        if name == "tensorboard":
            # purge_step: TensorBoard hides this folder's earlier events from that step on (those of a fresh
            # run's predecessor, or the steps a resumed run redoes).
            kwargs.setdefault("purge_step", resumed_at + 1 if resumed_at is not None else 0)
            tracker = cls(run_name, os.path.join(out, "tensorboard"), **kwargs)
        elif name == "wandb":
            kwargs = {"name": run_name, "dir": out, **kwargs}
            if run_id is not None:
                kwargs = {"id": run_id, "resume": "allow", **kwargs}
            tracker = cls(cfg.tracker_project, **kwargs)
        elif name == "mlflow":
            if self._use_local_mlflow_store(out):
                kwargs.setdefault("logging_dir", os.path.abspath(os.path.join(out, "mlflow", "artifacts")))
            kwargs = {"experiment_name": cfg.tracker_project, "run_name": run_name, "run_id": run_id, **kwargs}
            tracker = cls(**kwargs)
        elif name == "trackio":
            kwargs = {"name": run_name, "resume": "allow" if resumed_at is not None else "never", **kwargs}
            tracker = cls(cfg.tracker_project, **kwargs)
        elif name == "aim":
            repo = kwargs.pop("repo", os.path.join(out, "aim"))
            kwargs = {"experiment": cfg.tracker_project, "run_hash": run_id, **kwargs}
            tracker = cls(run_name, repo, **kwargs)
        elif cls.requires_logging_directory:
            tracker = cls(cfg.tracker_project, out, **kwargs)
        else:
            tracker = cls(cfg.tracker_project, **kwargs)
        return tracker

    def _use_local_mlflow_store(self, output_dir: str) -> bool:
        """Point MLflow at a SQLite store in ``{output_dir}/mlflow`` unless the user chose a tracking URI
        (MLFLOW_TRACKING_URI or ``mlflow.set_tracking_uri``); return whether it did."""
        import mlflow

        if mlflow.is_tracking_uri_set() and mlflow.get_tracking_uri() not in _LOCAL_MLFLOW_STORES:
            return False
        folder = Path(output_dir, "mlflow").resolve()
        folder.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{folder / 'mlflow.db'}"
        _LOCAL_MLFLOW_STORES.add(uri)  # ours, not the user's: a later run (after a crash) replaces it
        mlflow.set_tracking_uri(uri)  # sets MLFLOW_TRACKING_URI too, until on_fit_end unsets both
        self._mlflow_store = True
        return True

    def _store_config(self, loop: Any, values: dict, name: str, tracker: Any) -> None:
        if name == "trackio":
            # Accelerate's TrackioTracker passes wandb's allow_val_change to trackio's config (a dict), where
            # it would become a config entry.
            tracker.run.config.update(values)
            return
        if name != "mlflow":
            tracker.store_init_configuration(values)
            return
        # MLflow refuses to change a param, and a resumed run may change some (resume_from, max_steps):
        # those keep their first value there, and config.yaml (an artifact) has this session's.
        import mlflow

        run_id = tracker.active_run.info.run_id
        logged = mlflow.MlflowClient().get_run(run_id).data.params
        changed = sorted(k for k, v in values.items() if k in logged and logged[k] != str(v))
        if changed:
            logger.info("MLflow keeps the first value of params %s; config.yaml (an artifact) has this run's", changed)
        tracker.store_init_configuration({k: v for k, v in values.items() if k not in logged})
        config_file = os.path.join(loop.config.output_dir, "config.yaml")
        if os.path.isfile(config_file):
            tracker.log_artifact(config_file)

    # ------------------------------------------------------------------ failures
    def _each(self, what: str, fn: Callable[[str, Any], Any]) -> None:
        """``fn(name, tracker)`` for every tracker still logging; one that raises is dropped."""
        for name, tracker in list(self.trackers.items()):
            self._attempt(name, tracker, what, functools.partial(fn, name, tracker))

    def _attempt(self, name: str, tracker: Any, what: str, fn: Callable[[], Any]) -> None:
        """``fn()``; if it raises, warn once and drop the tracker."""
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - a tracker never stops training: warned, then dropped
            self._drop(name, tracker, what, err)

    def _start_tracker(self, name: str, make: Callable[[], Any]) -> None:
        """Start the tracker ``make()`` returns and keep it under ``name``."""
        if name in self.trackers:
            raise ValueError(f"two trackers are named {name!r}; the second one is not started")
        tracker = make()
        tracker.start()
        self.trackers[name] = tracker

    def _drop(self, name: str, tracker: Any, what: str, err: Exception) -> None:
        output_dir = self._loop.config.output_dir if self._loop is not None else "output_dir"
        advice = ADVICE.get(name, "check its settings (tracker_init_kwargs) and installation").format(
            output_dir=output_dir
        )
        logger.warning(
            "tracker %r failed %s (%s: %s) and is disabled for the rest of this run; training goes on, and "
            "metrics.jsonl and the other trackers keep logging. To fix: %s; or remove %r from report_to.",
            *(name, what, type(err).__name__, err, advice, name),
        )
        logger.debug("tracker %r failure", name, exc_info=err)
        self.trackers.pop(name, None)
        self._sync()
        if tracker is not None and what != "to finish":
            try:  # release what it holds (an MLflow run left active would refuse the next one)
                tracker.finish()
            except Exception as finish_err:  # noqa: BLE001 - already failed and reported above
                logger.debug("finishing the failed tracker %r: %s", name, finish_err)

    def _sync(self) -> None:
        """``accelerator.trackers``: the trackers still logging (for ``accelerator.get_tracker``)."""
        if self._loop is not None and self._loop.accelerator is not None:
            self._loop.accelerator.trackers = list(self.trackers.values())


def _finish_failed(name: str, tracker: Any) -> None:
    """Finish a tracker whose fit raised: an MLflow run as FAILED, a wandb run with exit code 1."""
    if name == "mlflow":
        import mlflow

        mlflow.end_run(status="FAILED")
    elif name == "wandb":
        tracker.run.finish(exit_code=1)
    else:
        tracker.finish()


def _numeric(item: tuple[str, Any]) -> tuple[str, float | int | None]:
    """A log value as a number (tensors and NumPy scalars read out), or None if it is not one."""
    key, value = item
    value = _jsonable(value) if not isinstance(value, str) else value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return key, None
    return key, value


def _read_run_ids(output_dir: str) -> dict[str, str]:
    path = Path(output_dir, RUN_IDS_FILE)
    try:
        ids = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except ValueError:
        logger.warning("%s is not valid JSON: the trackers start new runs", path)
        return {}
    return {k: v for k, v in ids.items() if isinstance(v, str)} if isinstance(ids, dict) else {}


def _write_run_ids(output_dir: str, ids: dict[str, str | None]) -> None:
    ids = {k: v for k, v in ids.items() if v is not None}
    if ids:
        atomic_write_text(Path(output_dir, RUN_IDS_FILE), json.dumps(ids, indent=1) + "\n")


def _run_id(name: str, tracker: Any) -> str | None:
    """The id that continues this tracker's run after a resume (None: it continues by name, or cannot)."""
    if name == "wandb":
        return tracker.run.id
    if name == "mlflow":
        return tracker.active_run.info.run_id
    if name == "aim":
        return tracker.writer.hash
    return None


# ---------------------------------------------------------------------- predictions tables
def _prediction_row(sample: dict) -> dict:
    """A row of the predictions table: id, image (the first, or None), prompt, prediction, references
    (JSON list text) and scores (``name=value`` text)."""
    image = sample.get("image")
    if isinstance(image, (list, tuple)):
        image = image[0] if image else None
    scores = sample.get("scores") or {}
    return {
        "id": str(sample.get("id")),
        "image": image if hasattr(image, "convert") else None,  # PIL images only
        "prompt": str(sample.get("prompt", "")),
        "prediction": str(sample.get("prediction", "")),
        "references": json.dumps(list(sample.get("references") or []), ensure_ascii=False),
        "scores": ", ".join(f"{k}={_number(v)}" for k, v in scores.items()),
    }


def markdown_table(columns: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table whose cells show their text literally: HTML and Markdown characters escaped,
    newlines as ``<br>``.

    Example:
        >>> print(markdown_table(["a", "b"], [["x|y", "*z*"]]))
        | a | b |
        |---|---|
        | x\\|y | \\*z\\* |
    """
    lines = ["| " + " | ".join(map(_markdown_cell, columns)) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(map(_markdown_cell, row)) + " |" for row in rows]
    return "\n".join(lines)


# The characters Python-Markdown (TensorBoard's renderer) lets a backslash escape, and | for tables.
_MARKDOWN_PUNCTUATION = re.compile(r"([\\`*_{}\[\]()#+\-.!|])")


def _markdown_cell(value: Any) -> str:
    text = html.escape(str(value), quote=False)  # & < > as entities: no HTML gets through
    text = _MARKDOWN_PUNCTUATION.sub(r"\\\1", text)
    return text.replace("\r\n", "\n").replace("\n", "<br>")


def _log_predictions(name: str, tracker: Any, rows: list[dict], files: list[Path], step: int) -> None:
    """One evaluation's predictions to tracker ``name``: a table (with images where it shows them) and
    the predictions files (JSONL, and the HTML page where it exists) where it keeps files."""
    text_columns = [c for c in PREDICTION_COLUMNS if c != "image"]
    texts = [[row[c] for c in text_columns] for row in rows]
    if name == "wandb":
        import wandb

        data = [[wandb.Image(r["image"]) if r["image"] is not None else None, *t] for r, t in zip(rows, texts)]
        if rows:
            tracker.log_table("eval/predictions", columns=["image", *text_columns], data=data, step=step)
        for path in files:
            tracker.run.save(str(path), base_path=str(path.parent.parent), policy="now")
    elif name == "tensorboard":
        if rows:
            tracker.writer.add_text("eval/predictions", markdown_table(text_columns, texts), global_step=step)
        for k, row in enumerate(rows):
            if row["image"] is not None:
                import numpy as np

                pixels = np.asarray(row["image"].convert("RGB"))
                tracker.writer.add_image(f"eval/images/{k}", pixels, global_step=step, dataformats="HWC")
        tracker.writer.flush()
    elif name == "mlflow":
        for path in files:
            tracker.log_artifact(str(path), artifact_path="predictions")
    elif name == "trackio":
        import trackio

        if rows:
            data = [[trackio.Image(r["image"]) if r["image"] is not None else None, *t] for r, t in zip(rows, texts)]
            tracker.run.log({"eval/predictions": trackio.Table(columns=["image", *text_columns], data=data)}, step=step)
    elif name == "aim":
        import aim

        if rows:
            tracker.writer.track(aim.Text(markdown_table(text_columns, texts)), name="eval/predictions", step=step)
            images = [aim.Image(r["image"], caption=r["id"]) for r in rows if r["image"] is not None]
            if images:
                tracker.writer.track(images, name="eval/images", step=step)
    elif rows and callable(getattr(tracker, "log_table", None)):  # Accelerate's table API (e.g. ClearML)
        tracker.log_table("eval/predictions", columns=text_columns, data=texts, step=step)


def _log_summary(name: str, tracker: Any, facts: dict, step: int) -> None:
    """The end-of-run summary (`end_facts`) to tracker ``name``, in the form it keeps such facts."""
    flat = {k: v for k, v in tracker_config(facts).items() if not k.startswith("setup.")}  # setup: the banner's
    if name == "wandb":
        tracker.run.summary.update({f"summary/{k}": v for k, v in flat.items()})
    elif name == "tensorboard":
        table = markdown_table(["fact", "value"], [[k, _number(v)] for k, v in flat.items()])
        tracker.writer.add_text("summary", table, global_step=step)
        tracker.writer.flush()
    elif name == "mlflow":
        import mlflow

        mlflow.MlflowClient().log_dict(tracker.active_run.info.run_id, facts, "summary.json")
    elif name == "trackio":
        import trackio

        table = markdown_table(["fact", "value"], [[k, _number(v)] for k, v in flat.items()])
        tracker.run.log({"summary": trackio.Markdown(table)}, step=step)
    elif name == "aim":
        tracker.writer["summary"] = flat
    else:
        numbers = {
            f"summary/{k}": v for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        tracker.log({k: v for k, v in numbers.items() if math.isfinite(v)}, step=step)
