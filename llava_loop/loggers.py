"""Loggers: ``metrics.jsonl``, the tqdm progress bar and Accelerate trackers, as callbacks.

`Loop` adds `JSONLLogger` and `ProgressBar` itself (main process only) and `TrackerLogger` when
``report_to`` names trackers.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

from .callbacks import Callback

logger = logging.getLogger(__name__)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    return value


class JSONLLogger(Callback):
    """Appends one JSON object per log event to ``{output_dir}/metrics.jsonl`` (with ``step``).

    A fresh run starts the file anew. A resumed run appends, and marks its first record with
    ``"resumed": true, "resumed_from_step": S``: the records of the interrupted run after step S
    describe steps that are redone, and `read_metrics` drops them.
    """

    def __init__(self, path: str):
        self.path = path
        self._resumed_from_step: int | None = None  # set until the first record after a resume

    def on_fit_start(self, loop: Any) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        if loop.resumed_from is not None:
            self._resumed_from_step = loop.state.step
        elif os.path.isfile(self.path) and os.path.getsize(self.path):
            # The log of an earlier attempt that saved no checkpoint (a run with checkpoints is refused).
            logger.warning("starting %s anew: it held the log of an earlier run that saved no checkpoint", self.path)
            open(self.path, "w").close()

    def on_log(self, loop: Any, logs: dict) -> None:
        record = {k: _jsonable(v) for k, v in logs.items()}
        if self._resumed_from_step is not None:
            record.update(resumed=True, resumed_from_step=self._resumed_from_step)
            self._resumed_from_step = None
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: str) -> list[dict]:
    """The records of ``metrics.jsonl`` as one run: where a resumed run's first record says
    ``resumed_from_step: S``, the earlier records with step > S (redone after the resume) are dropped.

    Example:
        >>> read_metrics("runs/a/metrics.jsonl")[-1]["step"]  # doctest: +SKIP
        400
    """
    records: list[dict] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if "resumed_from_step" in record:
                records = [r for r in records if r.get("step", 0) <= record["resumed_from_step"]]
            records.append(record)
    return records


class ProgressBar(Callback):
    """A tqdm bar over optimizer steps showing loss, lr and throughput; eval results printed below."""

    def __init__(self) -> None:
        self.bar = None

    def on_fit_start(self, loop: Any) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=loop.state.max_steps, initial=loop.state.step, desc="train", dynamic_ncols=True)

    def on_step_end(self, loop: Any, logs: dict) -> None:
        self.bar.update(loop.state.step - self.bar.n)

    def on_log(self, loop: Any, logs: dict) -> None:
        shown = {k.split("/", 1)[1]: v for k, v in logs.items() if k.startswith("train/")}
        if shown:
            keys = ("loss", "lr", "grad_norm", "tokens_per_s")
            self.bar.set_postfix({k: f"{shown[k]:.4g}" for k in keys if k in shown}, refresh=False)
        evals = {k: v for k, v in logs.items() if k.startswith("eval/")}
        if evals:
            text = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in evals.items())
            self.bar.write(f"step {logs.get('step')}: {text}")

    def on_fit_end(self, loop: Any) -> None:
        if self.bar is not None:
            self.bar.close()


class TrackerLogger(Callback):
    """Forwards log events to the trackers Accelerate was set up with (``report_to``)."""

    def on_fit_start(self, loop: Any) -> None:
        loop.accelerator.init_trackers("llava_loop", config=loop.config.to_dict())

    def on_log(self, loop: Any, logs: dict) -> None:
        values = {k: v for k, v in logs.items() if isinstance(v, (int, float)) and k != "step"}
        loop.accelerator.log(values, step=logs.get("step"))

    def on_evaluate(self, loop: Any, metrics: dict, samples: list[dict]) -> None:
        for tracker in loop.accelerator.trackers:
            if tracker.name == "wandb" and samples:
                import wandb

                columns = ["id", "image", "prompt", "prediction", "references"]
                rows = [
                    [s["id"], wandb.Image(s["image"]) if s.get("image") is not None else None, s["prompt"],
                     s["prediction"], " | ".join(s["references"])]
                    for s in samples
                ]
                tracker.log({"eval/samples": wandb.Table(columns=columns, data=rows)}, step=loop.state.step)

    def on_fit_end(self, loop: Any) -> None:
        loop.accelerator.end_training()
