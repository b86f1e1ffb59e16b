"""Checkpoints: atomic save, rotation, best tracking, exact resume, integrity, export to a plain HF model.

Layout of ``{output_dir}/checkpoints/step_000120/``::

    model/                 LoRA: adapter_model.safetensors + adapter_config.json (the projector
                           included via modules_to_save), so ``PeftModel.from_pretrained(base,
                           ckpt / "model")`` restores every trained weight. Full finetune:
                           trainable.safetensors + config.json. Plus the processor files, so the
                           folder loads on its own.
    optimizer.pt           the optimizer's state dict (tensors and plain values only: loaded with
                           ``torch.load(..., weights_only=True)``)
    trainer_state.json     LoopState (step, epoch, data position, metric history, best), callback
                           states, scheduler and grad-scaler state, number of processes
    rng_state_{rank}.safetensors  python / numpy / torch / CUDA RNG of each process: the state
                           arrays as tensors, the few scalars as JSON in the file's metadata
    config.yaml            the LoopConfig
    meta.json              format, step, epoch, kind ("lora" | "full"), base model (a local
                           directory as an absolute path), latest eval metrics, and the size and
                           sha256 of every other file; written last

Security: loading a checkpoint never unpickles anything but tensors and plain values; a
checkpoint of the previous format (pickled ``training_state.pt``) is refused, not loaded.

Integrity: `verify_checkpoint` checks that the files are exactly those of meta.json (none missing,
none extra), their sizes (cheap) and then their hashes; resume and export call it.
``resume_from="latest"`` falls back to the newest intact checkpoint with a warning.

``checkpoints/best.json`` names the best checkpoint (by ``metric_for_best``); rotation
(``save_total_limit``) never deletes it, nor the newest checkpoint.

Atomicity: a checkpoint is written into a hidden sibling (``.tmp-step_000120``), every file and
folder is fsynced, then the folder is renamed into place; rotation renames a folder away
(``.deleting-...``) before deleting it. A crash or ``kill -9`` at any moment therefore leaves every
listed checkpoint complete; leftovers of interrupted saves, and temporary files of killed writers,
are ignored and cleaned up by the next save or run (`repair_checkpoints`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step_(\d{6,})$")
FORMAT = 2
"""meta.json ``format`` this version writes and reads (1: the pickled ``training_state.pt``)."""
REQUIRED = ("trainer_state.json", "optimizer.pt", "config.yaml", "rng_state_0.safetensors")
"""Files every checkpoint's meta.json lists (and the ``model/`` folder's files)."""
_TMP, _OLD, _DELETING = ".tmp-", ".old-", ".deleting-"
_TEMP_FILE = re.compile(r"^\.(?:.+\.tmp|write-test)-(\d+)$")
"""Temporary files of `atomic_write_text` / `check_output_dir`, named after their writer's pid."""
EXTRA_TRAINABLE = "extra_trainable.safetensors"
"""Trainable weights that are neither LoRA nor ``modules_to_save`` (LoRA runs only)."""


class CheckpointError(ValueError):
    """A checkpoint that must not be loaded: damaged, not what its meta.json lists, or unsafe."""


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
    """Write ``text`` to ``path`` via a temporary file and a rename; a failed write leaves no file."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and a rename; a failed write leaves no file (a
    reader sees the old file or the new one, never part of one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_output_dir(output_dir: str) -> None:
    """Fail before training if ``output_dir`` cannot be created or written."""
    probe = os.path.join(output_dir, f".write-test-{os.getpid()}")
    try:
        os.makedirs(output_dir, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
    except OSError as err:
        raise OSError(
            err.errno, f"output_dir {output_dir!r} is not writable ({err}); choose another output_dir"
        ) from err
    finally:
        if os.path.lexists(probe):  # also after a failed write (e.g. a full disk)
            os.remove(probe)


def clean_temp_files(output_dir: str | Path) -> list[Path]:
    """Delete the temporary files (``.best.json.tmp-PID``, ``.write-test-PID``,
    ``predictions/.step_000010.jsonl.tmp-PID``) of writers that no longer run. Main process only.

    Returns:
        The deleted files.
    """
    import psutil

    out = Path(output_dir)
    deleted = []
    for folder in (out, out / "predictions", checkpoints_dir(out)):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            match = _TEMP_FILE.match(path.name)
            if match and path.is_file() and not psutil.pid_exists(int(match.group(1))):
                path.unlink()
                deleted.append(path)
    if deleted:
        logger.info("deleted %d temporary files of interrupted writes, e.g. %s", len(deleted), deleted[0])
    return deleted


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
def save_rng_state(state: dict, file: Path) -> None:
    """Write what `get_rng_state` returned as safetensors: the state arrays as tensors, the few
    scalars as JSON metadata, so that reading it back needs no pickle."""
    from safetensors.torch import save_file

    version, words, gauss_next = state["python"]
    algorithm, key, pos, has_gauss, cached_gaussian = state["numpy"]
    tensors = {
        "python": torch.tensor(words, dtype=torch.int64),
        "numpy": torch.from_numpy(np.asarray(key, dtype=np.int64)),
        "torch": state["torch"],
    }
    cuda = state.get("cuda", [])
    tensors.update({f"cuda_{i}": t.cpu() for i, t in enumerate(cuda)})
    scalars = {
        "python": [version, gauss_next],
        "numpy": [algorithm, int(pos), int(has_gauss), float(cached_gaussian)],
        "cuda_devices": len(cuda),
    }
    save_file(tensors, str(file), metadata={"scalars": json.dumps(scalars)})


def load_rng_state(file: Path) -> dict:
    """Read what `save_rng_state` wrote, in `get_rng_state`'s form."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        scalars = json.loads(f.metadata()["scalars"])
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    version, gauss_next = scalars["python"]
    algorithm, pos, has_gauss, cached_gaussian = scalars["numpy"]
    state = {
        "python": (version, tuple(tensors["python"].tolist()), gauss_next),
        "numpy": (algorithm, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached_gaussian),
        "torch": tensors["torch"],
    }
    if scalars["cuda_devices"]:
        state["cuda"] = [tensors[f"cuda_{i}"] for i in range(scalars["cuda_devices"])]
    return state


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


def save_model_weights(model: Any, processor: Any, folder: Path, weights: dict | None = None) -> str:
    """Save what training changed (adapter + modules_to_save, or trainable weights) and the processor.

    Args:
        weights: The trainable weights as whole tensors, when the model's own are sharded (gathered by
            the caller: FSDP, ZeRO-3); None reads them from ``model``.

    Returns:
        ``"lora"`` or ``"full"``.
    """
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)

    def trainable(names: set[str] | None = None) -> dict[str, torch.Tensor]:
        if weights is None:
            return _trainable_state_dict(model, names)
        return {k: v for k, v in weights.items() if names is None or k in names}

    if _is_peft(model):
        model.save_pretrained(folder, state_dict=weights)
        extra = _extra_trainable_names(model)
        if extra:
            logger.warning(
                "%d trainable weights are neither LoRA nor modules_to_save (e.g. %s); they are saved "
                "in %s, which PeftModel.from_pretrained does not read (export does)",
                len(extra),
                min(extra),
                EXTRA_TRAINABLE,
            )
            save_file(trainable(extra), str(folder / EXTRA_TRAINABLE))
        kind = "lora"
    else:
        save_file(trainable(), str(folder / "trainable.safetensors"))
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


# ---------------------------------------------------------------------- listing, integrity
def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Published checkpoints (``step_*`` folders with their meta.json), oldest first.

    Leftovers of interrupted saves are not listed. A listed checkpoint was complete when it was
    renamed into place; whether its files are still intact is `verify_checkpoint`'s question.
    """
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def is_complete(path: str | Path) -> bool:
    """Whether ``path`` holds every file its meta.json lists, at the recorded size (no hashing)."""
    return Path(path).is_dir() and _find_problem(Path(path), hashes=False) is None


def verify_checkpoint(path: str | Path, hashes: bool = True) -> dict:
    """Check that a checkpoint folder is exactly what was saved; return its meta.json.

    Every file meta.json lists must be present with its recorded size, no other file may be in
    the folder, and (with ``hashes``) every file's sha256 must match. Sizes are checked first:
    they are cheap and catch truncated and empty files.

    Args:
        path: A checkpoint folder (``.../checkpoints/step_000120``).
        hashes: Also compare the sha256 of every file (reads all of them).

    Raises:
        FileNotFoundError: ``path`` is not a folder.
        CheckpointError: The checkpoint is damaged, incomplete or of the old, unsafe format; the
            message names the file and what to do, e.g. ``checkpoint out/checkpoints/step_000030:
            model/adapter_model.safetensors is corrupt (sha256 mismatch); resume from step_000027
            (the newest intact older checkpoint) or delete step_000030``.

    Example:
        >>> verify_checkpoint("out/checkpoints/step_000120")["step"]  # doctest: +SKIP
        120
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a llava_loop checkpoint folder (it does not exist)")
    problem = _find_problem(path, hashes)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path}: {problem}; {_advice(path)}")
    return _read_meta(path)


def _read_meta(path: Path) -> dict:
    return json.loads((path / "meta.json").read_text(encoding="utf-8"))


def _find_problem(path: Path, hashes: bool = True) -> str | None:
    """What is wrong with the checkpoint folder ``path`` (None: nothing). One home for the rules."""
    if not (path / "meta.json").is_file():
        return "has no meta.json (not a llava_loop checkpoint, or its save never finished)"
    try:
        meta = _read_meta(path)
    except (ValueError, UnicodeDecodeError) as err:
        return f"meta.json is corrupt ({err})"
    if not isinstance(meta, dict):
        return "meta.json is corrupt (not a JSON object)"
    if "format" not in meta:
        return (
            "was written by an earlier llava_loop whose training_state.pt and rng_state_*.pt are pickles, "
            "which can run arbitrary code when loaded, so it is not loaded. Its model/ folder (safetensors) "
            "still loads with PeftModel.from_pretrained(base, path/'model'); to continue training, start a "
            "new run from those weights"
        )
    if meta["format"] != FORMAT:
        return f"has format {meta['format']}, this llava_loop reads format {FORMAT} (upgrade llava_loop?)"
    files = meta.get("files", {})
    for name in REQUIRED:
        if name not in files:
            return f"meta.json lists no {name}"
    if not any(name.startswith("model/") for name in files):
        return "meta.json lists no model/ files"
    on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if not p.is_dir()} - {"meta.json"}
    for name, record in files.items():
        if name not in on_disk:
            return f"{name} is missing"
        size = (path / name).stat().st_size
        if size != record["size"]:
            if size == 0:
                return f"{name} is empty (0 of {record['size']} bytes)"
            if size < record["size"]:
                return f"{name} is truncated ({size} of {record['size']} bytes)"
            return f"{name} is corrupt ({size} bytes, {record['size']} expected)"
    extra = sorted(on_disk - set(files))
    if extra:
        return f"{extra[0]} is not part of the checkpoint (meta.json does not list it; delete the file)"
    if hashes:
        # The same files (names, sizes, modification times) verified earlier in this process are not
        # hashed again: the CLI's pre-flight check and the run it starts both verify the checkpoint.
        stamp = (str(path.resolve()), tuple(sorted((n, (path / n).stat().st_mtime_ns) for n in files)), str(meta))
        if stamp in _VERIFIED:
            return None
        for name, record in files.items():
            if _sha256(path / name) != record["sha256"]:
                return f"{name} is corrupt (sha256 mismatch)"
        _VERIFIED.add(stamp)
    return None


_VERIFIED: set[tuple] = set()
"""Checkpoints whose hashes matched in this process, with their files' modification times."""


def _advice(path: Path) -> str:
    """What to do about the broken checkpoint ``path``: its newest intact older sibling, if any."""
    match = STEP_DIR.match(path.name)
    if match:
        older = [
            p
            for p in list_checkpoints(path.parent.parent)
            if int(STEP_DIR.match(p.name).group(1)) < int(match.group(1))
        ]
        for candidate in reversed(older):
            if _find_problem(candidate) is None:
                return f"resume from {candidate.name} (the newest intact older checkpoint) or delete {path.name}"
    return f"delete {path.name} (there is no intact older checkpoint next to it)"


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _file_records(folder: Path) -> dict[str, dict]:
    """Size and sha256 of every file under ``folder`` (meta.json's ``files``)."""
    return {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(folder.rglob("*"))
        if not p.is_dir()
    }


def repair_checkpoints(output_dir: str | Path) -> None:
    """Finish what interrupted saves and writes left in ``output_dir``: restore a checkpoint killed
    between the two renames of a re-save, delete temporary folders, and delete temporary files of
    writers that no longer run (`clean_temp_files`). Main process only, before training."""
    _clean_leftovers(checkpoints_dir(output_dir))
    clean_temp_files(output_dir)


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
def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    """Where the checkpoint of optimizer step ``step`` goes: ``{output_dir}/checkpoints/step_000120``."""
    return checkpoints_dir(output_dir) / f"step_{step:06d}"


def save_checkpoint(accelerator: Any, config: Any, state: dict, model: Any, processor: Any) -> str:
    """Write the checkpoint of ``state`` atomically, record the best one, rotate; return its path.

    Every process calls it (each writes its own RNG state; the main process writes the rest).

    Args:
        accelerator: The run's `accelerate.Accelerator`.
        config: The run's `LoopConfig` (``output_dir``, ``save_total_limit``, ``metric_for_best``;
            saved as ``config.yaml``).
        state: Plain state dicts: ``loop_state`` (`LoopState.state_dict()`; its ``step`` names the
            folder, its ``best_checkpoint`` and ``best_metric`` go to ``best.json``), ``callbacks``,
            ``optimizer``, ``scheduler`` and ``scaler`` (None when absent), ``rng`` (this process's), and
            ``model``: the trainable weights as whole tensors, gathered by the caller under FSDP and
            DeepSpeed, else None (read from ``model``).
        model: The unwrapped model (weights saved with ``save_pretrained``: adapters only for peft).
        processor: Saved next to the weights.

    Raises:
        OSError: The disk is full or the folder unwritable; earlier checkpoints are intact and the
            temporary folder is removed.
    """
    acc, loop_state = accelerator, state["loop_state"]
    final = checkpoint_path(config.output_dir, loop_state["step"])
    root, tmp = final.parent, final.parent / f"{_TMP}{final.name}"
    acc.wait_for_everyone()
    if acc.is_main_process:
        _clean_leftovers(root)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    try:
        save_rng_state(state["rng"], tmp / f"rng_state_{acc.process_index}.safetensors")
        acc.wait_for_everyone()
        if acc.is_main_process:
            _write_main(tmp, config, state, model, processor, acc.num_processes)
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
        raise OSError(
            getattr(err, "errno", None) or errno.EIO,
            f"could not write checkpoint {final}: {err}. Earlier checkpoints are intact; if the "
            "disk is full or output_dir unwritable, free space or change output_dir, then resume "
            "with resume_from='latest'.",
        ) from err
    except BaseException:
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if acc.is_main_process:
        _record_best(config, loop_state)
        rotate_checkpoints(config.output_dir, config.save_total_limit, keep=loop_state["best_checkpoint"])
    acc.wait_for_everyone()
    return str(final)


def _record_best(config: Any, loop_state: dict) -> None:
    """Write ``best.json`` when the best checkpoint changed (or its record is missing or stale)."""
    best = loop_state["best_checkpoint"]
    if not best:
        return
    name = Path(best).name
    record = {
        "checkpoint": name,
        "path": str((checkpoints_dir(config.output_dir) / name).resolve()),
        "step": int(STEP_DIR.match(name).group(1)),
        "metric": config.metric_for_best,
        "value": loop_state["best_metric"],
    }
    recorded = best_checkpoint(config.output_dir)  # its path is re-resolved on reading: not compared
    if recorded is None or any(recorded.get(k) != v for k, v in record.items() if k != "path"):
        atomic_write_text(checkpoints_dir(config.output_dir) / "best.json", json.dumps(record, indent=1))


def _write_main(tmp: Path, config: Any, state: dict, model: Any, processor: Any, num_processes: int) -> None:
    """Everything but the RNG states, written by the main process into ``tmp``."""
    loop_state = state["loop_state"]
    kind = save_model_weights(model, processor, tmp / "model", state.get("model"))
    torch.save(state["optimizer"], tmp / "optimizer.pt")
    trainer_state = {
        "loop_state": _plain("LoopState.state_dict()", loop_state),
        "callbacks": {
            key: _plain(f"the state_dict() of callback {key}", value) for key, value in state["callbacks"].items()
        },
        "scheduler": _plain("the scheduler's state", state["scheduler"]),
        "scaler": _plain("the grad scaler's state", state["scaler"]),
        "num_processes": num_processes,
    }
    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1), encoding="utf-8")
    config.save(tmp / "config.yaml")
    base = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    if _is_peft(model):
        base = model.peft_config[model.active_adapter].base_model_name_or_path or base
    history = loop_state["history"]
    meta = {
        "format": FORMAT,
        "step": loop_state["step"],
        "epoch": loop_state["epoch"],
        "kind": kind,
        # A local folder as an absolute path, so that export works from any working directory.
        "base_model": os.path.abspath(base) if base and os.path.isdir(base) else base,
        "time": time.time(),
        "metrics": history[-1] if history else None,
        "files": _file_records(tmp),  # every RNG state included: the other processes wrote theirs
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")  # last: marks it complete
    _fsync_tree(tmp)


def _plain(what: str, value: Any) -> Any:
    """``value`` unchanged if JSON holds it faithfully (tuples become lists); else a TypeError."""

    def check(item: Any, where: str) -> None:
        if isinstance(item, dict):
            for key, sub in item.items():
                if not isinstance(key, str):
                    raise TypeError(f"{where} has the non-string key {key!r}")
                check(sub, f"{where}[{key!r}]")
        elif isinstance(item, (list, tuple)):
            for i, sub in enumerate(item):
                check(sub, f"{where}[{i}]")
        elif item is not None and not isinstance(item, (str, int, float, bool)):
            raise TypeError(f"{where} is a {type(item).__name__}")

    try:
        check(value, "")
    except TypeError as err:
        raise TypeError(
            f"cannot save {what} in a checkpoint: its value{err}. Checkpoints store this state as JSON "
            "(so that loading it cannot run code): return str, int, float, bool, None, lists and dicts "
            "with string keys"
        ) from None
    return value


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
    """``"latest"`` → newest intact checkpoint in ``output_dir``; otherwise a checkpoint folder.

    Both are verified (`verify_checkpoint`). With ``"latest"``, a damaged newest checkpoint is
    skipped with a warning naming it and what is wrong, and the newest intact one is used.
    """
    if str(resume_from) == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(
                f"resume_from='latest' but {checkpoints_dir(output_dir)} has no complete checkpoint; "
                "check output_dir, or drop resume_from to start fresh"
            )
        refused = []
        for path in reversed(found):
            problem = _find_problem(path)
            if problem is None:
                return path
            logger.warning("not resuming from checkpoint %s: %s; trying the next older one", path, problem)
            refused.append(f"{path.name}: {problem}")
        raise CheckpointError(
            f"resume_from='latest' but no checkpoint in {checkpoints_dir(output_dir)} is intact "
            f"({'; '.join(refused)}); delete them, or drop resume_from to start fresh"
        )
    path = Path(resume_from)
    verify_checkpoint(path)
    return path


def read_resume_info(path: str | Path) -> dict:
    """What a run needs to decide how to resume from ``path``, without loading any tensor.

    Returns:
        ``config`` (the checkpoint's `LoopConfig` as a dict), and from its ``trainer_state.json``:
        ``loop_state``, ``callbacks``, ``scheduler``, ``scaler`` (plain state dicts, None when
        absent) and ``num_processes``.
    """
    from .config import LoopConfig

    path = Path(path)
    training = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    return {"config": LoopConfig.from_file(path / "config.yaml").to_dict(), **training}


def load_checkpoint_weights(path: str | Path, model: Any) -> None:
    """Load the trained weights of checkpoint ``path`` into ``model`` (before any engine wraps or
    shards it: the files hold whole tensors, whatever the engine that wrote them).

    ``path`` should come from `resolve_checkpoint`, which verifies the hashes; here only the format and
    the file sizes are checked again.
    """
    path = Path(path)
    verify_checkpoint(path, hashes=False)
    try:
        load_model_weights(model, path / "model")
    except (ValueError, RuntimeError) as err:  # RuntimeError: load_state_dict's size mismatches
        # Changed model settings were refused before (`rundir.resume_plan`); this is another base
        # model or a configure_optimizers/prepare_model that freezes differently.
        first = " ".join(str(err).split()[:40])  # load_state_dict lists every mismatching tensor
        raise ValueError(
            f"the weights of {path} do not fit the model: {first} (resume with the checkpoint's base "
            "model and model settings)"
        ) from err


def load_checkpoint(path: str | Path, process_index: int = 0, num_processes: int = 1) -> dict:
    """The tensor states of checkpoint ``path`` (its weights: `load_checkpoint_weights`). Nothing is
    unpickled but tensors and plain values.

    Returns:
        ``optimizer`` (the optimizer's state dict, whole tensors) and ``rng``: the RNG state process
        ``process_index`` saved, or None when the checkpoint was written by another number of processes
        (no process of this run continues the stream of one of that run; the caller seeds them anew).
    """
    path = Path(path)
    saved = len(list(path.glob("rng_state_*.safetensors")))
    rng = load_rng_state(path / f"rng_state_{process_index}.safetensors") if saved == num_processes else None
    return {"optimizer": _load_tensors(path, "optimizer.pt"), "rng": rng}


def _load_tensors(checkpoint: Path, name: str) -> Any:
    """``torch.load`` of tensors and plain values only: a file that holds anything else (which
    could run code when unpickled) is refused, naming the checkpoint and the file."""
    try:
        return torch.load(checkpoint / name, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = next((line for line in str(err).splitlines() if "GLOBAL" in line), str(err).splitlines()[0])
        raise CheckpointError(
            f"checkpoint {checkpoint}: {name} holds objects other than tensors and plain values, which "
            f"could run code when loaded; refused ({reason.strip()}). Do not load it with "
            f"weights_only=False unless you made it yourself; resume from another checkpoint"
        ) from err


# ---------------------------------------------------------------------- export
EXPORT_QUANTIZATIONS = ("none", "nf4", "int8", "int4-weight-only")
"""Values of `export`'s ``quantize``."""


def export(
    checkpoint: str | Path,
    out_dir: str | Path,
    base_model: Any = None,
    dtype: Any = None,
    overwrite: bool = False,
    quantize: str = "none",
) -> Path:
    """Merge a checkpoint into its base model and save a standard Hugging Face model + processor.

    The result loads with ``AutoModelForImageTextToText.from_pretrained(out_dir)`` (and
    ``AutoProcessor.from_pretrained(out_dir)``, or `load_model(out_dir)`); it is what AWQ/GGUF/bitsandbytes quantisers
    expect. The checkpoint is verified first (`verify_checkpoint`). Written to a temporary
    sibling and renamed, so ``out_dir`` is never half-written.

    Args:
        checkpoint: A checkpoint folder (``.../checkpoints/step_000120``).
        out_dir: Where to write the merged model.
        base_model: The base model object (it is modified), or a name/path; default: the one
            recorded in the checkpoint. A relative path is looked for in the working directory,
            then in the run's directory; a name that is no folder is loaded from the Hub.
        dtype: Optional dtype for loading the base model by name.
        overwrite: Replace an existing non-empty ``out_dir``.
        quantize: ``"none"`` (16-bit), or quantize the merged model for inference: ``"nf4"``
            (bitsandbytes NF4 + double quantization), ``"int8"`` (bitsandbytes LLM.int8) or
            ``"int4-weight-only"`` (torchao int4 weight-only, group size 128; needs a CUDA GPU). As in
            training, only the language model's decoder linear layers are quantized. The folder is
            safetensors + JSON, and ``from_pretrained`` loads it (with bitsandbytes / torchao installed).

    A QLoRA checkpoint (its ``config.yaml`` says ``quantization``) is merged into its base model
    quantized as in training and then dequantized to 16 bit: the adapters were trained against those
    weights, not the original ones.

    Example:
        >>> export("out/checkpoints/step_000120", "merged")  # doctest: +SKIP
    """
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if quantize not in EXPORT_QUANTIZATIONS:
        raise ValueError(
            f"quantize={quantize!r} is invalid: expected one of {', '.join(map(repr, EXPORT_QUANTIZATIONS))}"
        )
    _check_export_quantization(quantize)
    meta = verify_checkpoint(checkpoint)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True (CLI: --overwrite)")
    trained_on = _checkpoint_quantization(checkpoint)
    if base_model is None or isinstance(base_model, (str, Path)):
        name = str(base_model or meta["base_model"])
        if not name:
            raise ValueError(f"{checkpoint} records no base model name; pass base_model=")
        base_model = _load_base_model(name, checkpoint, dtype, trained_on)
    from .modeling import model_quantization

    if model_quantization(base_model) is not None:
        # Merge into the weights the adapters were trained against: the quantized ones, dequantized.
        base_model = base_model.dequantize()
    folder = checkpoint / "model"
    if meta["kind"] == "lora":
        from peft import PeftModel

        from .modeling import peft_wrap_warning_ignored

        with peft_wrap_warning_ignored():
            model = PeftModel.from_pretrained(base_model, folder)
        if (folder / EXTRA_TRAINABLE).is_file():
            load_model_weights(model, folder)
        model = model.merge_and_unload()
    else:
        load_model_weights(base_model, folder, require_all_trainable=False)
        model = base_model
    from .modeling import load_processor

    try:
        processor = load_processor(folder)
    except (OSError, ValueError) as err:
        raise ValueError(f"could not load the processor saved in {folder}: {err}") from err
    tmp = out_dir.with_name(f"{_TMP}{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        if quantize != "none":
            del model
            _quantize_saved(tmp, quantize)
        processor.save_pretrained(tmp)
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def _checkpoint_quantization(checkpoint: Path) -> str | None:
    """The ``quantization`` the checkpoint's run trained with (its config.yaml), or None."""
    import yaml

    try:
        saved = yaml.safe_load((checkpoint / "config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return None
    return saved.get("quantization") if isinstance(saved, dict) else None


def _check_export_quantization(quantize: str) -> None:
    """Raise before any loading if ``quantize`` cannot run here (library missing, no GPU)."""
    import importlib.util

    if quantize in ("nf4", "int8"):
        from .modeling import check_bitsandbytes

        check_bitsandbytes(f"export --quantize {quantize}")
    elif quantize == "int4-weight-only":
        if not torch.cuda.is_available():
            raise ValueError(
                "export --quantize int4-weight-only needs a CUDA GPU (torchao's int4 weight-only kernel, tinygemm, "
                "is CUDA-only); run the export on a GPU machine, or use --quantize nf4 or int8, which run on the CPU"
            )
        if importlib.util.find_spec("torchao") is None:
            raise ImportError(
                "export --quantize int4-weight-only needs torchao, which is not installed: pip install 'llava_loop[int4]'"
            )


def _quantize_saved(folder: Path, quantize: str) -> None:
    """Replace the 16-bit model saved in ``folder`` by its ``quantize`` version (language-model decoder
    linear layers only, as `modeling.sixteen_bit_modules` says), saved as safetensors."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from .modeling import quantization_config

    config = AutoConfig.from_pretrained(folder)
    if quantize in ("nf4", "int8"):
        quantization = quantization_config("4bit" if quantize == "nf4" else "8bit", config)
        device_map = {"": 0} if torch.cuda.is_available() else {"": "cpu"}
    else:
        from torchao.quantization import Int4WeightOnlyConfig
        from transformers import TorchAoConfig

        keep = quantization_config("8bit", config).llm_int8_skip_modules
        quantization = TorchAoConfig(
            Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"), modules_to_not_convert=keep
        )
        device_map = {"": 0}
    model = AutoModelForImageTextToText.from_pretrained(
        folder, quantization_config=quantization, dtype=torch.bfloat16, device_map=device_map
    )
    for file in folder.glob("*.safetensors*"):
        file.unlink()
    try:
        model.save_pretrained(folder, safe_serialization=True)
    except Exception as err:  # noqa: BLE001 - a format transformers cannot write as safetensors
        raise ValueError(
            f"export --quantize {quantize}: transformers could not save the quantized model as safetensors ({err}); "
            "refused rather than written as a pickle (which could run code when loaded)"
        ) from err
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise ValueError(f"export --quantize {quantize} wrote pickle files; refused")


def _load_base_model(name: str, checkpoint: Path, dtype: Any, quantization: str | None = None) -> Any:
    """Load the base model ``name`` (quantized as the run trained it, when ``quantization`` is set): a local
    folder (a relative one is looked for in the working directory, then in the run's directory), else a
    Hub model; failures say which paths were tried."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id
    from transformers import AutoModelForImageTextToText

    path = Path(name).expanduser()
    run_dir = checkpoint.resolve().parent.parent  # {output_dir}/checkpoints/step_000120
    tried = [path] if path.is_absolute() else [path.resolve(), (run_dir / path).resolve()]
    for folder in tried:
        if folder.is_dir():
            if quantization is not None:
                from .modeling import load_model

                return load_model(str(folder), quantization=quantization, dtype=dtype or "bfloat16")[0]
            return AutoModelForImageTextToText.from_pretrained(str(folder), dtype=dtype or "auto")
    where = " nor ".join(str(p) for p in dict.fromkeys(tried))
    advice = "pass the base model's folder or Hub name as base_model= (CLI: --base_model)"
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise FileNotFoundError(
            f"the base model of {checkpoint}, {name!r}, does not exist: there is no folder {where}; {advice}"
        ) from None
    try:
        if quantization is not None:
            from .modeling import load_model

            return load_model(name, quantization=quantization, dtype=dtype or "bfloat16")[0]
        return AutoModelForImageTextToText.from_pretrained(name, dtype=dtype or "auto")
    except OSError as err:  # offline, not on the Hub, or no access
        raise OSError(
            f"could not load the base model of {checkpoint}, {name!r}: there is no folder {where}, and as a "
            f"Hub model name it failed ({str(err).splitlines()[0]}); {advice}"
        ) from err
