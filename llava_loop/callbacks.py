"""Observe-only callbacks: the fixed event list, the base class and built-ins.

A callback is any object with methods named after events (duck-typed); subclassing `Callback` is
optional. Each event is called as ``callback.event(loop, **payload)``. Callbacks observe the loop and
may ask it to stop by setting ``loop.state.should_stop = True``; changing *how* training works means
subclassing `Loop` instead.

Example:
    >>> class PrintLoss(Callback):
    ...     def on_log(self, loop, logs):
    ...         if "train/loss" in logs:
    ...             print(loop.state.step, logs["train/loss"])
"""

from __future__ import annotations

import logging
import math
from typing import Any

logger = logging.getLogger(__name__)

# The whole event vocabulary, in the order a run meets them. Payload keys in brackets. Within one
# optimizer step: on_step_end, on_log (train, every log_steps), on_evaluate and on_log (eval, every
# eval_steps), on_save (every save_steps), then on_epoch_end if the step used the epoch's last batch.
EVENTS: dict[str, str] = {
    "on_fit_start": "Once, after set-up (model wrapped, optimizer built, checkpoint restored), before the first step.",
    "on_epoch_start": "At the start of each epoch, including the epoch a resumed run re-enters.",
    "on_step_end": "After each optimizer step, not per micro-batch. [logs: this step's train/loss, train/lr "
    "(the rate the step used), train/grad_norm]",
    "on_log": "Whenever a record is written to metrics.jsonl: train every log_steps, eval after each evaluation. [logs]",
    "on_evaluate": "After each evaluation, on every process. [metrics: summary dict; samples: a few predictions]",
    "on_save": "After a checkpoint is completely written and renamed into place, main process. [path]",
    "on_epoch_end": "After the step that used an epoch's last batch (and that step's evaluation and checkpoint); "
    "not when the run stops mid-epoch.",
    "on_fit_end": "Once, after the final evaluation and checkpoint, also when stopped early or by a signal.",
}


class Callback:
    """Base class with a no-op method for every event in `EVENTS`."""

    def on_fit_start(self, loop: Any) -> None: ...
    def on_epoch_start(self, loop: Any) -> None: ...
    def on_step_end(self, loop: Any, logs: dict) -> None: ...
    def on_log(self, loop: Any, logs: dict) -> None: ...
    def on_evaluate(self, loop: Any, metrics: dict, samples: list[dict]) -> None: ...
    def on_save(self, loop: Any, path: str) -> None: ...
    def on_epoch_end(self, loop: Any) -> None: ...
    def on_fit_end(self, loop: Any) -> None: ...


def dispatch(callbacks: list, event: str, loop: Any, **payload: Any) -> None:
    """Call ``event`` on every callback that defines it; unknown events are errors."""
    if event not in EVENTS:
        raise ValueError(f"unknown callback event {event!r}; events are {list(EVENTS)}")
    for callback in callbacks:
        method = getattr(callback, event, None)
        if method is not None:
            method(loop, **payload)


class EarlyStopping(Callback):
    """Stop when ``metric`` has not improved for ``patience`` evaluations.

    Args:
        metric: A reported key, e.g. ``"eval/loss"`` (default: the loop's ``metric_for_best``).
        patience: Evaluations without improvement before stopping.
        min_delta: Smallest change that counts as an improvement.
        greater_is_better: Direction; None = the loop's (``config.resolved_greater_is_better()``)
            when ``metric`` is None, else inferred from the key (loss lower, scores higher).
    """

    def __init__(
        self,
        patience: int,
        metric: str | None = None,
        min_delta: float = 0.0,
        greater_is_better: bool | None = None,
    ):
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.patience, self.metric, self.min_delta = patience, metric, min_delta
        self.greater_is_better = greater_is_better
        self.best: float | None = None
        self.bad_evals = 0

    def on_evaluate(self, loop: Any, metrics: dict, samples: list[dict]) -> None:
        from .metrics import greater_is_better

        key = self.metric or loop.config.metric_for_best
        if key is None:
            raise ValueError("EarlyStopping needs a metric: pass metric= or set metric_for_best")
        if key not in metrics:
            raise KeyError(f"EarlyStopping metric {key!r} not among reported metrics {sorted(metrics)}")
        value = metrics[key]
        higher = self.greater_is_better
        if higher is None:  # the loop's metric follows the loop's direction (config.greater_is_better)
            higher = loop.config.resolved_greater_is_better() if self.metric is None else greater_is_better(key)
        improved = self.best is None or (
            value > self.best + self.min_delta if higher else value < self.best - self.min_delta
        )
        if improved and not math.isnan(value):
            self.best, self.bad_evals = value, 0
            return
        self.bad_evals += 1
        if self.bad_evals >= self.patience:
            logger.info(
                "early stopping: %s has not improved for %d evaluations (best %s)", key, self.patience, self.best
            )
            loop.state.should_stop = True
            loop.state.stop_reason = f"early stopping: {key} did not improve for {self.patience} evaluations"

    def state_dict(self) -> dict:
        return {"best": self.best, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.bad_evals = state["best"], state["bad_evals"]
