"""Loggers: ``metrics.jsonl``, the tqdm progress bar and Accelerate trackers, as callbacks.

`Loop` adds `JSONLLogger` and `ProgressBar` itself (main process only) and `TrackerLogger` when
``report_to`` names trackers.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from .callbacks import Callback


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    return value


class JSONLLogger(Callback):
    """Appends one JSON object per log event to ``{output_dir}/metrics.jsonl`` (with ``step``)."""

    def __init__(self, path: str):
        self.path = path

    def on_fit_start(self, loop: Any) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)

    def on_log(self, loop: Any, logs: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({k: _jsonable(v) for k, v in logs.items()}) + "\n")


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
