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
    "on_step_end": "After each optimizer step, not per micro-batch; with fused AdamW, a step that does not log, "
    "evaluate, save or end the epoch gets it once the next step's forward and backward are queued (the loop "
    "state is the step's own). [logs: this step's train/loss, train/lr (the rate the step used; "
    "train/lr/<kind> for the other kinds of optimizer groups, e.g. projector), train/grad_norm]",
    "on_log": "Whenever a record is written to metrics.jsonl: train every log_steps, eval after each evaluation. [logs]",
    "on_evaluate": "After each evaluation, on every process. [metrics: summary dict; samples: a few predictions]",
    "on_save": "After a checkpoint is completely written and renamed into place, main process. [path]",
    "on_epoch_end": "After the step that used an epoch's last batch (and that step's evaluation and checkpoint); "
    "not when the run stops mid-epoch.",
    "on_fit_end": "Once, after the final evaluation and checkpoint, also when stopped early or by a signal.",
}
"""Every callback event, in the order a run meets them: name -> when it fires [its payload arguments]."""


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


def _keyed_callbacks(callbacks: list) -> list[tuple[str, Any]]:
    """``("ClassName:k", callback)``, k-th of its class: stable across processes, unlike list
    positions (only the main process has the logging callbacks)."""
    seen: dict[str, int] = {}
    out = []
    for cb in callbacks:
        name = type(cb).__name__
        out.append((f"{name}:{seen.get(name, 0)}", cb))
        seen[name] = seen.get(name, 0) + 1
    return out


def callback_states(callbacks: list) -> dict[str, Any]:
    """``{key: state_dict()}`` of the callbacks that have one (saved in checkpoints)."""
    return {key: cb.state_dict() for key, cb in _keyed_callbacks(callbacks) if hasattr(cb, "state_dict")}


def load_callback_states(callbacks: list, saved: dict) -> None:
    """Give each callback its saved state (matched by class name and rank among its class)."""
    for key, cb in _keyed_callbacks(callbacks):
        if key in saved and hasattr(cb, "load_state_dict"):
            cb.load_state_dict(saved[key])


def is_improvement(value: float, best: float | None, greater_is_better: bool, min_delta: float = 0.0) -> bool:
    """Whether ``value`` beats ``best`` (None: nothing yet) by more than ``min_delta``; a NaN or
    infinite value never does. The one rule behind best-checkpoint tracking and early stopping."""
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    return value > best + min_delta if greater_is_better else value < best - min_delta


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
        if is_improvement(value, self.best, higher, self.min_delta):
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


class DivergenceWarning(Callback):
    """Warn when the training loss stays at ln(V), the loss of a uniform prediction over the model's
    output vocabulary V: the model then predicts every token as likely as any other, which a model
    that learns never does for long (typically it diverged). Added to every `Loop` by default; pass
    your own instance to tune it.

    Args:
        steps: Consecutive steps with the loss at ln(V) before the warning (once per such stretch).
        tolerance: Relative distance to ln(V) that counts as "at" it (0.01: 0.1 nats for a 32k vocabulary).
    """

    def __init__(self, steps: int = 20, tolerance: float = 0.01) -> None:
        self.steps, self.tolerance = steps, tolerance
        self.ln_v: float | None = None  # ln(V), known at fit start; None when V is unknown
        self.in_a_row = 0  # consecutive steps with the loss at ln(V)

    def on_fit_start(self, loop: Any) -> None:
        from .modeling import output_vocab_size

        vocab = output_vocab_size(loop.accelerator.unwrap_model(loop.model))
        self.ln_v = math.log(vocab) if vocab and vocab > 1 else None
        self.in_a_row = 0

    def on_step_end(self, loop: Any, logs: dict) -> None:
        loss, ln_v = logs["train/loss"], self.ln_v
        if ln_v is None:
            return
        if abs(loss - ln_v) > self.tolerance * ln_v:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        if self.in_a_row == self.steps:
            logger.warning(
                "loss is at the uniform-distribution value ln(V)=%.3f (V=%d) for %d steps in a row (step %d, "
                "loss %.4f); the model may have diverged (learning rate too high?)",
                *(ln_v, round(math.exp(ln_v)), self.in_a_row, loop.state.step, loss),
            )
