"""Checkpoints: atomic save, rotation, best tracking, exact resume, export to a plain HF model.

Layout of ``{output_dir}/checkpoints/step_000120/``::

    model/                 LoRA: adapter_model.safetensors + adapter_config.json (the projector
                           included via modules_to_save), so ``PeftModel.from_pretrained(base,
                           ckpt / "model")`` restores every trained weight. Full finetune:
                           trainable.safetensors + config.json. Plus the processor files, so the
                           folder loads on its own.
    training_state.pt      optimizer, scheduler, grad scaler, LoopState (step, epoch, data position,
                           metric history, best), callback states, number of processes
    rng_state_{rank}.pt    python / numpy / torch / CUDA RNG of each process
    config.yaml            the LoopConfig
    meta.json              step, epoch, kind ("lora" | "full"), base model, latest eval metrics;
                           written last

``checkpoints/best.json`` names the best checkpoint (by ``metric_for_best``); rotation
(``save_total_limit``) never deletes it, nor the newest checkpoint.

Atomicity: a checkpoint is written into a hidden sibling (``.tmp-step_000120``), every file and
folder is fsynced, then the folder is renamed into place; rotation renames a folder away
(``.deleting-...``) before deleting it. A crash or ``kill -9`` at any moment therefore leaves every
listed checkpoint complete; leftovers of interrupted saves are ignored and cleaned up by the next
save or resume.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step_(\d{6,})$")
REQUIRED = ("meta.json", "training_state.pt", "config.yaml", "model")
"""What a complete checkpoint folder holds (``rng_state_*.pt`` too)."""
_TMP, _OLD, _DELETING = ".tmp-", ".old-", ".deleting-"
EXTRA_TRAINABLE = "extra_trainable.safetensors"
"""Trainable weights that are neither LoRA nor ``modules_to_save`` (LoRA runs only)."""


# ---------------------------------------------------------------------- atomic files
def _fsync_tree(path: Path) -> None:
    """fsync every file and folder under ``path`` so a rename publishes complete data."""
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(root))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_predictions(path: str | Path, rows: list[dict]) -> None:
    """One JSON object per line: ``id, prompt, prediction, references, scores``."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def check_output_dir(output_dir: str) -> None:
    """Fail before training if ``output_dir`` cannot be created or written."""
    try:
        os.makedirs(output_dir, exist_ok=True)
        probe = os.path.join(output_dir, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as err:
        raise OSError(
            err.errno, f"output_dir {output_dir!r} is not writable ({err}); choose another output_dir"
        ) from err


def estimate_checkpoint_bytes(model: Any) -> int:
    """A lower bound of one checkpoint's size: trainable weights plus two AdamW moments each."""
    return sum(3 * p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def check_disk_space(output_dir: str, needed_bytes: int) -> None:
    """Fail before training when ``output_dir``'s disk cannot hold even one checkpoint."""
    free = shutil.disk_usage(output_dir).free
    if free < needed_bytes:
        raise OSError(
            errno.ENOSPC,
            f"output_dir {output_dir!r} has {free / 2**20:.1f} MiB free but one checkpoint needs at "
            f"least {needed_bytes / 2**20:.1f} MiB; free disk space or choose another output_dir",
        )


# ---------------------------------------------------------------------- RNG
def get_rng_state() -> dict:
    """Python, NumPy, torch CPU and (if present) all CUDA RNG states of this process."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `get_rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            logger.warning(
                "checkpoint holds CUDA RNG states of %d devices, this process sees %d: CUDA RNG not restored",
                len(state["cuda"]),
                torch.cuda.device_count(),
            )


# ---------------------------------------------------------------------- model weights
def _is_peft(model: Any) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _trainable_state_dict(model: Any, names: set[str] | None = None) -> dict[str, torch.Tensor]:
    if names is None:
        names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k in names}


def _extra_trainable_names(model: Any) -> set[str]:
    """Trainable parameters of a PeftModel that its adapter files do not hold."""
    return {
        n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n and ".modules_to_save." not in n
    }


def save_model_weights(model: Any, processor: Any, folder: Path) -> str:
    """Save what training changed (adapter + modules_to_save, or trainable weights) and the processor.

    Returns:
        ``"lora"`` or ``"full"``.
    """
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    if _is_peft(model):
        model.save_pretrained(folder)
        extra = _extra_trainable_names(model)
        if extra:
            logger.warning(
                "%d trainable weights are neither LoRA nor modules_to_save (e.g. %s); they are saved "
                "in %s, which PeftModel.from_pretrained does not read (export does)",
                len(extra),
                min(extra),
                EXTRA_TRAINABLE,
            )
            save_file(_trainable_state_dict(model, extra), str(folder / EXTRA_TRAINABLE))
        kind = "lora"
    else:
        save_file(_trainable_state_dict(model), str(folder / "trainable.safetensors"))
        model.config.save_pretrained(folder)
        kind = "full"
    if processor is not None:
        processor.save_pretrained(folder)
    return kind


def load_model_weights(model: Any, folder: Path, *, require_all_trainable: bool = True) -> None:
    """Load weights saved by `save_model_weights` into ``model`` (same architecture, same LoRA).

    Args:
        model: The model to load into (a `peft.PeftModel` for LoRA checkpoints).
        folder: The checkpoint's ``model/`` folder.
        require_all_trainable: Fail if a trainable parameter of ``model`` is not in the files
            (resuming); off for export, where a freshly loaded base model is all trainable.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    if _is_peft(model):
        from peft import set_peft_model_state_dict

        if not (folder / "adapter_model.safetensors").is_file():
            raise FileNotFoundError(
                f"{folder} has no adapter_model.safetensors: not a LoRA checkpoint "
                "(for a full-finetune checkpoint use lora_r=0)"
            )
        weights = load_file(str(folder / "adapter_model.safetensors"))
        result = set_peft_model_state_dict(model, weights)
        unexpected = list(getattr(result, "unexpected_keys", []))
        if unexpected:
            raise ValueError(
                f"checkpoint {folder} has weights the model lacks (different LoRA settings?): {unexpected[:5]}"
            )
        missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k or ".modules_to_save." in k]
        if missing:
            raise ValueError(f"checkpoint {folder} lacks adapter weights (different LoRA settings?): {missing[:5]}")
        if (folder / EXTRA_TRAINABLE).is_file():
            model.load_state_dict(load_file(str(folder / EXTRA_TRAINABLE)), strict=False)
    else:
        if not (folder / "trainable.safetensors").is_file():
            raise FileNotFoundError(
                f"{folder} has no trainable.safetensors: not a full-finetune "
                "checkpoint (for a LoRA checkpoint set lora_r > 0)"
            )
        weights = load_file(str(folder / "trainable.safetensors"))
        unexpected = sorted(set(weights) - set(model.state_dict()))
        if unexpected:
            raise ValueError(f"checkpoint {folder} has weights the model lacks: {unexpected[:5]}")
        if require_all_trainable:
            missing = set(_trainable_state_dict(model)) - set(weights)
            if missing:
                raise ValueError(
                    f"checkpoint {folder} lacks trainable weights {sorted(missing)[:5]} (different freeze settings?)"
                )
        model.load_state_dict(weights, strict=False)


# ---------------------------------------------------------------------- listing
def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def is_complete(path: str | Path) -> bool:
    """Whether ``path`` is a complete checkpoint folder (every file of `REQUIRED` present)."""
    path = Path(path)
    return all((path / name).exists() for name in REQUIRED) and any(path.glob("rng_state_*.pt"))


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (leftovers of interrupted saves are ignored)."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and is_complete(p)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def repair_checkpoints(output_dir: str | Path) -> None:
    """Finish what an interrupted save or rotation left in ``output_dir``: restore a checkpoint
    killed between the two renames of a re-save, delete temporary folders. Main process only."""
    _clean_leftovers(checkpoints_dir(output_dir))


def _clean_leftovers(root: Path) -> None:
    if not root.is_dir():
        return
    for path in root.iterdir():
        if path.name.startswith(_OLD):
            final = root / path.name[len(_OLD) :]
            if not final.exists() and is_complete(path):
                # Killed between the two renames of a re-save: the old copy is the checkpoint.
                os.replace(path, final)
                logger.warning("restored %s, left by an interrupted save", final)
            else:
                shutil.rmtree(path, ignore_errors=True)
        elif path.name.startswith((_TMP, _DELETING)):
            shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------- save / rotate
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


def _callback_states(callbacks: list) -> dict[str, Any]:
    return {key: cb.state_dict() for key, cb in _keyed_callbacks(callbacks) if hasattr(cb, "state_dict")}


def _load_callback_states(callbacks: list, saved: dict) -> None:
    for key, cb in _keyed_callbacks(callbacks):
        if key in saved and hasattr(cb, "load_state_dict"):
            cb.load_state_dict(saved[key])


def save_checkpoint(loop: Any, best: bool = False) -> str:
    """Write a checkpoint of ``loop`` at its current step atomically; return its path.

    Raises:
        OSError: The disk is full or the folder unwritable; earlier checkpoints are intact and the
            temporary folder is removed.
    """
    acc, state, cfg = loop.accelerator, loop.state, loop.config
    root = checkpoints_dir(cfg.output_dir)
    final = root / f"step_{state.step:06d}"
    tmp = root / f"{_TMP}{final.name}"
    acc.wait_for_everyone()
    if acc.is_main_process:
        _clean_leftovers(root)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    previous_best = state.best_checkpoint
    if best:  # before writing, so that the LoopState saved in the best checkpoint names itself
        state.best_checkpoint = str(final)
    try:
        torch.save(get_rng_state(), tmp / f"rng_state_{acc.process_index}.pt")
        acc.wait_for_everyone()
        if acc.is_main_process:
            _write_main(loop, tmp)
            if final.exists():  # the same step saved again (e.g. after the final evaluation)
                old = root / f"{_OLD}{final.name}"
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old)
            else:
                os.replace(tmp, final)
            _fsync_dir(root)
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as RuntimeError
        if acc.is_main_process:  # the folder is shared: only its owner removes it
            shutil.rmtree(tmp, ignore_errors=True)
        state.best_checkpoint = previous_best
        raise OSError(
            getattr(err, "errno", None) or errno.EIO,
            f"could not write checkpoint {final}: {err}. Earlier checkpoints are intact; if the "
            "disk is full or output_dir unwritable, free space or change output_dir, then resume "
            "with resume_from='latest'.",
        ) from err
    except BaseException:
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        state.best_checkpoint = previous_best
        raise
    if acc.is_main_process:
        recorded = best_checkpoint(cfg.output_dir)
        if state.best_checkpoint and (
            best
            or recorded is None  # or stale: killed before writing it
            or recorded["checkpoint"] != Path(state.best_checkpoint).name
        ):
            name = Path(state.best_checkpoint).name
            record = {
                "checkpoint": name,
                "path": str((root / name).resolve()),
                "step": int(STEP_DIR.match(name).group(1)),
                "metric": cfg.metric_for_best,
                "value": state.best_metric,
            }
            atomic_write_text(root / "best.json", json.dumps(record, indent=1))
        rotate_checkpoints(cfg.output_dir, cfg.save_total_limit, keep=state.best_checkpoint)
    acc.wait_for_everyone()
    return str(final)


def _write_main(loop: Any, tmp: Path) -> None:
    """Everything but the RNG states, written by the main process into ``tmp``."""
    acc, state, cfg = loop.accelerator, loop.state, loop.config
    model = acc.unwrap_model(loop.model)
    kind = save_model_weights(model, loop.processor, tmp / "model")
    torch.save(
        {
            "optimizer": loop.optimizer.state_dict(),
            "scheduler": loop.scheduler.state_dict() if loop.scheduler is not None else None,
            "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
            "loop_state": state.state_dict(),
            "callbacks": _callback_states(loop.callbacks),
            "num_processes": acc.num_processes,
        },
        tmp / "training_state.pt",
    )
    cfg.save(tmp / "config.yaml")
    base = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    if _is_peft(model):
        base = model.peft_config[model.active_adapter].base_model_name_or_path or base
    meta = {
        "step": state.step,
        "epoch": state.epoch,
        "kind": kind,
        "base_model": base,
        "time": time.time(),
        "metrics": state.history[-1] if state.history else None,
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))  # last: marks the folder complete
    _fsync_tree(tmp)


def rotate_checkpoints(output_dir: str | Path, limit: int | None, keep: str | None = None) -> list[Path]:
    """Delete the oldest checkpoints beyond ``limit``; never ``keep`` (the best) nor the newest.

    With the best checkpoint older than the newest, ``limit=1`` keeps both.

    Returns:
        The deleted folders.
    """
    if not limit:
        return []
    found = list_checkpoints(output_dir)
    protected = {found[-1].name} if found else set()
    if keep:
        protected.add(Path(keep).name)
    deletable = [p for p in found if p.name not in protected]
    deleted = deletable[: max(len(found) - limit, 0)]
    for path in deleted:
        doomed = path.with_name(f"{_DELETING}{path.name}")
        os.replace(path, doomed)  # atomic: a crash never leaves a half-deleted checkpoint listed
        shutil.rmtree(doomed)
    return deleted


def best_checkpoint(output_dir: str | Path) -> dict | None:
    """The best checkpoint's record (``checkpoint, path, step, metric, value``) or None.

    ``path`` is resolved against ``output_dir``, so it stays right when the folder is moved.
    """
    path = checkpoints_dir(output_dir) / "best.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    record["path"] = str(checkpoints_dir(output_dir) / record.get("checkpoint", Path(record["path"]).name))
    return record


# ---------------------------------------------------------------------- resume
def resolve_checkpoint(output_dir: str | Path, resume_from: str | Path) -> Path:
    """``"latest"`` → newest complete checkpoint in ``output_dir``; otherwise a checkpoint folder."""
    if str(resume_from) == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(
                f"resume_from='latest' but {checkpoints_dir(output_dir)} has no complete checkpoint; "
                "check output_dir, or drop resume_from to start fresh"
            )
        return found[-1]
    path = Path(resume_from)
    if not is_complete(path):
        raise FileNotFoundError(
            f"resume_from={str(resume_from)!r} is not a complete llava_loop checkpoint folder "
            f"(needs {', '.join(REQUIRED)}, rng_state_*.pt)"
        )
    return path


def _config_differences(saved: Any, current: Any) -> list[str]:
    ignore = {"output_dir", "resume_from", "report_to", "handle_signals"}
    a, b = saved.to_dict(), current.to_dict()
    return [f"{k}: {a[k]!r} -> {b[k]!r}" for k in a if k in b and k not in ignore and a[k] != b[k]]


def read_resume_info(path: str | Path) -> tuple[dict, dict]:
    """The checkpoint's `LoopConfig` and `LoopState`, as dicts, without loading anything else."""
    from .config import LoopConfig

    path = Path(path)
    training = torch.load(path / "training_state.pt", map_location="cpu", weights_only=False)
    return LoopConfig.from_file(path / "config.yaml").to_dict(), training["loop_state"]


def load_checkpoint(loop: Any, path: str | Path) -> dict:
    """Restore weights, optimizer, scheduler, scaler, LoopState and callback states into ``loop``.

    Returns:
        This process's RNG state; the loop applies it right before its first step.
    """
    from .config import LoopConfig

    path = Path(path)
    acc = loop.accelerator
    differences = _config_differences(LoopConfig.from_file(path / "config.yaml"), loop.config)
    try:
        load_model_weights(acc.unwrap_model(loop.model), path / "model")
    except (ValueError, RuntimeError) as err:  # RuntimeError: load_state_dict's size mismatches
        changed = f"; settings changed since the checkpoint: {'; '.join(differences)}" if differences else ""
        first = " ".join(str(err).split()[:40])  # load_state_dict lists every mismatching tensor
        raise ValueError(
            f"the weights of {path} do not fit the model: {first} "
            f"(resume with the checkpoint's model settings{changed})"
        ) from err
    training = torch.load(path / "training_state.pt", map_location="cpu", weights_only=False)
    try:
        loop.optimizer.load_state_dict(training["optimizer"])
    except ValueError as err:
        raise ValueError(
            f"cannot restore the optimizer state of {path}: {err}. The trainable "
            "parameters differ from the checkpoint's (lora_r, lora_target_modules, "
            "train_projector, freeze_vision_tower or configure_optimizers changed?)"
        ) from err
    if loop.scheduler is not None and training["scheduler"] is not None:
        loop.scheduler.load_state_dict(training["scheduler"])
    if acc.scaler is not None and training["scaler"] is not None:
        acc.scaler.load_state_dict(training["scaler"])
    max_steps = loop.state.max_steps  # from this run's config: a resumed run may train longer
    loop.state.load_state_dict(training["loop_state"])
    loop.state.max_steps = max_steps
    loop.state.should_stop, loop.state.stop_reason = False, None
    _load_callback_states(loop.callbacks, training["callbacks"])
    rng_file = path / f"rng_state_{acc.process_index}.pt"
    if not rng_file.is_file():
        rng_file = path / "rng_state_0.pt"
    return torch.load(rng_file, map_location="cpu", weights_only=False)


# ---------------------------------------------------------------------- export
def export(
    checkpoint: str | Path,
    out_dir: str | Path,
    base_model: Any = None,
    dtype: Any = None,
    overwrite: bool = False,
) -> Path:
    """Merge a checkpoint into its base model and save a standard Hugging Face model + processor.

    The result loads with ``LlavaForConditionalGeneration.from_pretrained(out_dir)`` (and
    ``AutoProcessor.from_pretrained(out_dir)``); it is what AWQ/GGUF/bitsandbytes quantisers
    expect. Written to a temporary sibling and renamed, so ``out_dir`` is never half-written.

    Args:
        checkpoint: A checkpoint folder (``.../checkpoints/step_000120``).
        out_dir: Where to write the merged model.
        base_model: The base model object (it is modified), or a name/path; default: the one
            recorded in the checkpoint.
        dtype: Optional dtype for loading the base model by name.
        overwrite: Replace an existing non-empty ``out_dir``.

    Example:
        >>> export("out/checkpoints/step_000120", "merged")  # doctest: +SKIP
    """
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if not is_complete(checkpoint):
        raise FileNotFoundError(f"{checkpoint} is not a complete llava_loop checkpoint folder")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True (CLI: --overwrite)")
    meta = json.loads((checkpoint / "meta.json").read_text())
    if base_model is None or isinstance(base_model, (str, Path)):
        from transformers import AutoModelForImageTextToText

        name = base_model or meta["base_model"]
        if not name:
            raise ValueError(f"{checkpoint} records no base model name; pass base_model=")
        base_model = AutoModelForImageTextToText.from_pretrained(str(name), dtype=dtype or "auto")
    folder = checkpoint / "model"
    if meta["kind"] == "lora":
        from peft import PeftModel

        model = PeftModel.from_pretrained(base_model, folder)
        if (folder / EXTRA_TRAINABLE).is_file():
            load_model_weights(model, folder)
        model = model.merge_and_unload()
    else:
        load_model_weights(base_model, folder, require_all_trainable=False)
        model = base_model
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise ValueError(f"could not load the processor saved in {folder}: {err}") from err
    tmp = out_dir.with_name(f"{_TMP}{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    _fsync_tree(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
