"""The run directory: one run owns an ``output_dir``, and a new run never silently takes over an old one.

- **Lock.** The main process of a run holds ``{output_dir}/.llava_loop.lock`` (JSON: pid, host, process
  start time) from set-up to the end of `Loop.fit`. A second run on the same ``output_dir`` fails with
  the owner's pid and host. A lock whose process is gone (same host: the pid is dead, or reused by a
  process that started later) is taken over with a warning; a lock from another host is never taken
  over: only a person can know that run is dead.
- **Fresh run or resume.** `resolve_resume` turns ``resume_from`` into a checkpoint or None. A fresh
  run into an ``output_dir`` that holds checkpoints is refused (resume, choose another directory, or
  ``overwrite_output_dir=True``); ``resume_from="auto"`` resumes when there is a checkpoint and
  starts fresh otherwise, the one command a preemptible job's requeue script needs.
- **Still there.** `RunLock.check` runs before every log record and checkpoint: a removed or replaced
  ``output_dir`` is an error at once, not a run that logs into the void.
- **What resume may change.** `resume_plan` compares the checkpoint's settings and training data
  with this run's and sorts every difference: refused (model shape, data order, different data),
  remapped exactly (batch size, accumulation, processes: the data position is kept in samples),
  applied (learning rate, weight decay, schedule: the optimizer's groups and the schedule are rebuilt
  from this run's settings) or applied as is (everything else), each named in the log.

Example:
    >>> lock = RunLock.acquire("runs/a")  # doctest: +SKIP
    >>> lock.check(step=10)  # doctest: +SKIP
    >>> lock.release()  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from . import checkpointing

logger = logging.getLogger(__name__)

LOCK_FILE = ".llava_loop.lock"


class RunDirError(RuntimeError):
    """``output_dir`` is in use by another run, or was removed or replaced under this one."""


# Settings whose change makes the checkpoint a different model: its weights would load (lora_alpha)
# or fail with a shape error, but the run would not be the one that was saved.
MODEL_FIELDS = ("lora_r", "lora_alpha", "lora_target_modules", "train_projector", "freeze_vision_tower")
# Settings that decide which sample comes next; continuing with another value would skip or repeat data.
ORDER_FIELDS = ("shuffle",)
# The data position is stored in samples, so these are remapped exactly.
POSITION_FIELDS = ("batch_size", "grad_accum_steps")
# Applied by rebuilding the optimizer's parameter-group settings from this run's config.
OPTIMIZER_FIELDS = ("learning_rate", "projector_lr", "weight_decay")
# Applied by rebuilding the learning-rate schedule from this run's config at the checkpoint's step.
SCHEDULE_FIELDS = ("learning_rate", "projector_lr", "lr_scheduler", "warmup_ratio", "warmup_steps")
# Where the run is or how it reports: never a difference worth a line.
IGNORED_FIELDS = ("output_dir", "resume_from", "overwrite_output_dir", "resume_with_new_data", "report_to")
IGNORED_FIELDS += ("handle_signals", "tracker_project", "run_name", "tracker_init_kwargs", "peak_tflops")


# ---------------------------------------------------------------------- lock
def _process_start(pid: int) -> float | None:
    """When ``pid`` started (seconds since the epoch), to tell a reused pid apart; None if unknown."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _alive(owner: dict) -> bool:
    """Whether the process that wrote ``owner`` (on this host) still runs (and is not a younger
    process that reuses its pid)."""
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0 or not psutil.pid_exists(pid):
        return False
    started, recorded = _process_start(pid), owner.get("start")
    return recorded is None or started is None or abs(started - recorded) < 0.01


@dataclass
class RunLock:
    """This run's ownership of ``output_dir`` (held by the main process only)."""

    path: Path
    owner: dict = field(default_factory=dict)

    @classmethod
    def acquire(cls, output_dir: str | os.PathLike) -> RunLock:
        """Take ``output_dir``'s lock, or raise `RunDirError` naming the run that holds it."""
        path = Path(output_dir) / LOCK_FILE
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "start": _process_start(os.getpid()),
            "time": time.time(),
        }
        for _ in range(3):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                cls._take_over_if_stale(path, me)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
                f.flush()
                os.fsync(f.fileno())
            return cls(path, me)
        raise RunDirError(f"could not take the lock {path}: other runs keep taking it; is another run starting?")

    @staticmethod
    def _take_over_if_stale(path: Path, me: dict) -> None:
        try:
            owner = json.loads(path.read_text())
        except FileNotFoundError:
            return  # released meanwhile: try again
        except (OSError, ValueError):
            owner = {}  # killed while writing it
        where = f"pid {owner.get('pid')} on host {owner.get('host')!r}"
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner["time"])) if "time" in owner else "?"
        if owner and owner.get("host") != me["host"]:
            raise RunDirError(
                f"output_dir {str(path.parent)!r} is in use by another run ({where}, since {since}); two runs "
                "would overwrite each other's checkpoints. Choose another output_dir, or, if that run is "
                f"certainly dead, delete {path}"
            )
        if owner and owner.get("pid") != me["pid"] and _alive(owner):
            raise RunDirError(
                f"output_dir {str(path.parent)!r} is in use by another run ({where}, since {since}); two runs "
                "would overwrite each other's checkpoints. Wait for it to finish, stop it, or choose another "
                "output_dir"
            )
        logger.warning("taking over the lock of a run that is gone (%s, since %s): %s", where, since, path)
        # Rename before deleting: of two runs taking over at once, only one rename succeeds.
        stale = path.with_name(f"{path.name}.stale-{me['pid']}")
        try:
            os.replace(path, stale)
            os.remove(stale)
        except FileNotFoundError:
            pass

    def check(self, step: int) -> None:
        """Raise if ``output_dir`` was removed or replaced (the lock file is gone or not ours)."""
        try:
            owner = json.loads(self.path.read_text())
        except (OSError, ValueError):
            owner = None
        if owner != self.owner:
            raise RunDirError(
                f"output_dir {str(self.path.parent)!r} was removed or replaced while this run was writing to it "
                f"(noticed at step {step}); the checkpoints and metrics.jsonl it held are gone from there. "
                "Stopping rather than writing into a directory another run or a cleanup owns; restore it "
                "and resume, or start again"
            )

    def release(self) -> None:
        """Drop the lock if it is still ours."""
        try:
            if json.loads(self.path.read_text()) == self.owner:
                self.path.unlink()
        except (OSError, ValueError):
            pass


# ---------------------------------------------------------------------- fresh run or resume
def resolve_resume(output_dir: str | os.PathLike, resume_from: str | None, overwrite: bool) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run.

    Raises:
        FileExistsError: A fresh run (``resume_from=None``) into an ``output_dir`` that holds
            checkpoints, without ``overwrite``.
        FileNotFoundError: ``"latest"`` with no checkpoint, or a path that is not a checkpoint.
    """
    if resume_from is None:
        found = checkpointing.list_checkpoints(output_dir)
        if found and not overwrite:
            raise FileExistsError(
                f"output_dir {str(output_dir)!r} already holds {len(found)} checkpoint(s) of an earlier run "
                f"(newest: {found[-1].name}); a new run would rotate them away and mix its logs with theirs. "
                "Resume it with resume_from='latest' (or 'auto'; CLI: --resume_from latest), choose another "
                "output_dir, or pass overwrite_output_dir=True (CLI: --overwrite_output_dir true) to delete them"
            )
        return None
    if resume_from == "auto":
        if not checkpointing.list_checkpoints(output_dir):
            logger.info("resume_from='auto': no checkpoint in %s, starting fresh", output_dir)
            return None
        resume_from = "latest"  # verified, falling back past damaged ones; never a silent fresh start
    return checkpointing.resolve_checkpoint(output_dir, resume_from)


def clear_previous_run(output_dir: str | os.PathLike) -> None:
    """Delete what an earlier run left (``overwrite_output_dir=True``): checkpoints, predictions,
    metrics.jsonl and its plot curves.png. Other files in ``output_dir`` are the user's and stay."""
    root = Path(output_dir)
    removed = []
    for name in ("checkpoints", "predictions"):
        if (root / name).is_dir():
            shutil.rmtree(root / name)
            removed.append(f"{name}/")
    for name in ("metrics.jsonl", "curves.png"):
        if (root / name).is_file():
            (root / name).unlink()
            removed.append(name)
    if removed:
        logger.warning("overwrite_output_dir=True: deleted the earlier run's %s in %s", ", ".join(removed), root)


# ---------------------------------------------------------------------- what resume may change
@dataclass
class ResumePlan:
    """How a resumed run treats the differences between the checkpoint and this run."""

    rebuild_optimizer_settings: bool = False
    """Put this run's learning rate / weight decay into the restored optimizer's groups."""
    rebuild_schedule: bool = False
    """Rebuild the learning-rate schedule from this run's settings at the checkpoint's step."""
    restart_data: bool = False
    """The training data changed (``resume_with_new_data``): read it from its start."""
    changes: list[str] = field(default_factory=list)
    """Every difference, as ``"field: old -> new (what happens)"``."""


def resume_plan(
    saved_config: dict, config: dict, saved_state: dict, state: dict, checkpoint: str | os.PathLike
) -> ResumePlan:
    """Sort the differences between a checkpoint and this run; raise on those that cannot continue.

    Args:
        saved_config: The checkpoint's `LoopConfig` as a dict.
        config: This run's `LoopConfig` as a dict.
        saved_state: The checkpoint's `LoopState` as a dict.
        state: This run's `LoopState` as set up (``max_steps``, ``data_fingerprint``, ``num_processes``).
        checkpoint: The checkpoint folder (for messages).

    Raises:
        ValueError: A model setting, the data order or the training data changed; the message lists
            every such difference and what to do.
    """
    name = Path(checkpoint).name
    refused, plan = [], ResumePlan()
    for key, old in saved_config.items():
        new = config.get(key, old)
        if key in IGNORED_FIELDS or old == new:
            continue
        change = f"{key}: {old!r} -> {new!r}"
        if key in MODEL_FIELDS:
            refused.append(f"{change} (the checkpoint holds a different model)")
        elif key in ORDER_FIELDS:
            refused.append(f"{change} (the rest of the epoch would come in another order)")
        elif key == "seed":
            plan.changes.append(f"{change} (ignored: the data order and RNG streams continue the checkpoint's)")
        elif key in POSITION_FIELDS:
            plan.changes.append(f"{change} (applied; the data position is kept in samples)")
        else:
            plan.rebuild_optimizer_settings |= key in OPTIMIZER_FIELDS
            plan.rebuild_schedule |= key in SCHEDULE_FIELDS
            plan.changes.append(f"{change} (applied from step {saved_state['step']})")
    if saved_state.get("max_steps") != state["max_steps"]:
        plan.rebuild_schedule = True
        plan.changes.append(
            f"total steps: {saved_state.get('max_steps')} -> {state['max_steps']} (schedule rebuilt for the new length)"
        )
    if saved_state.get("num_processes") not in (None, state["num_processes"]):
        plan.changes.append(
            f"processes: {saved_state['num_processes']} -> {state['num_processes']} (applied; the data position is "
            "kept in samples; no process continues a saved RNG stream: each one's (dropout) is seeded anew from "
            "(seed, step, process index), so dropout masks differ from an uninterrupted run's)"
        )
    old_data, new_data = saved_state.get("data_fingerprint"), state["data_fingerprint"]
    if old_data != new_data:
        change = f"training data: {describe_fingerprint(old_data)} -> {describe_fingerprint(new_data)}"
        if config.get("resume_with_new_data"):
            plan.restart_data = True
            plan.changes.append(f"{change} (resume_with_new_data: the new data is read from its start)")
        else:
            refused.append(f"{change} (set resume_with_new_data=True if that is intended)")
    if refused:
        raise ValueError(
            f"cannot resume {name} exactly: " + "; ".join(refused) + ". Resume with the checkpoint's settings and "
            "data, or start a new run (another output_dir, or overwrite_output_dir=True)"
        )
    if plan.changes:
        logger.warning("resuming %s with changed settings: %s", name, "; ".join(plan.changes))
    return plan


def describe_fingerprint(fingerprint: dict | None) -> str:
    """``"1000 records (ids+images a1b2c3d4)"`` for messages."""
    if fingerprint is None:
        return "unknown"
    return f"{fingerprint['records']} records ({fingerprint['what']} {fingerprint['hash'][:8]})"


def data_fingerprint(dataset: Any) -> dict:
    """A cheap identity of a training set: its size and a hash of its ids and image file names.

    Records in a `llava_loop.data.VLDataset` are read as parsed (no image is decoded), and only
    file names count, so a data folder moved to another mount still matches. Another Dataset may
    define ``fingerprint() -> str``; without one only its size is compared.
    """
    import hashlib

    own = getattr(dataset, "fingerprint", None)
    if callable(own):
        return {"records": len(dataset), "what": "fingerprint()", "hash": str(own())}
    records = getattr(dataset, "parsed_records", None)
    if records is None:
        return {"records": len(dataset), "what": "size only", "hash": "-"}

    def name(image: Any) -> str:
        return image.rpartition(os.sep)[2] if isinstance(image, str) else "" if image is None else "<in memory>"

    parts = []
    for record in records:
        image = record.get("image")
        parts.append(str(record.get("id")))
        parts.append("\x01".join(map(name, image)) if isinstance(image, list) else name(image))
    digest = hashlib.sha256("\x00".join(parts).encode("utf-8", "surrogatepass"))
    return {"records": len(records), "what": "ids+image names", "hash": digest.hexdigest()}
