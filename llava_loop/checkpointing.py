"""Checkpoints: atomic save, rotation, best tracking, exact resume, export to a plain HF model.

Layout of ``{output_dir}/checkpoints/step_000120/``::

    model/                 LoRA: adapter_model.safetensors + adapter_config.json (projector
                           included via modules_to_save); full finetune: trainable.safetensors.
                           Plus the processor files, so the folder loads on its own.
    training_state.pt      optimizer, scheduler, grad scaler, LoopState, callback states
    rng_state_{rank}.pt    python / numpy / torch / CUDA RNG of each process
    config.yaml            the LoopConfig
    meta.json              step, base model name, kind ("lora" | "full")

A checkpoint is written into a hidden sibling folder, flushed to disk, then renamed into place, so a
crash or ``kill -9`` mid-save leaves the previous checkpoints intact. ``checkpoints/best.json``
names the best checkpoint; rotation (``save_total_limit``) never deletes it.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step_(\d{6,})$")


# ---------------------------------------------------------------------- atomic files
def _fsync_tree(path: Path) -> None:
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
        raise OSError(f"output_dir {output_dir!r} is not writable ({err}); choose another output_dir") from err


# ---------------------------------------------------------------------- RNG
def get_rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------- model weights
def _is_peft(model: Any) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _trainable_state_dict(model: Any) -> dict[str, torch.Tensor]:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k in names}


def save_model_weights(model: Any, processor: Any, folder: Path) -> str:
    """Save what training changed (adapter + modules_to_save, or trainable weights) and the processor."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    if _is_peft(model):
        model.save_pretrained(folder)
        kind = "lora"
    else:
        save_file(_trainable_state_dict(model), str(folder / "trainable.safetensors"))
        model.config.save_pretrained(folder)
        kind = "full"
    if processor is not None:
        processor.save_pretrained(folder)
    return kind


def load_model_weights(model: Any, folder: Path) -> None:
    """Load weights saved by `save_model_weights` into ``model`` (same architecture, same LoRA)."""
    from safetensors.torch import load_file

    if _is_peft(model):
        from peft import set_peft_model_state_dict

        weights = load_file(str(folder / "adapter_model.safetensors"))
        result = set_peft_model_state_dict(model, weights)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"checkpoint {folder} has weights the model lacks: {unexpected[:5]}")
    else:
        weights = load_file(str(folder / "trainable.safetensors"))
        missing = set(_trainable_state_dict(model)) - set(weights)
        if missing:
            raise ValueError(f"checkpoint {folder} lacks trainable weights {sorted(missing)[:5]}")
        model.load_state_dict(weights, strict=False)


# ---------------------------------------------------------------------- save / rotate
def checkpoints_dir(output_dir: str) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of interrupted saves are ignored)."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def save_checkpoint(loop: Any, best: bool = False) -> str:
    """Write a checkpoint of ``loop`` for its current step atomically; return its path."""
    acc, state, cfg = loop.accelerator, loop.state, loop.config
    root = checkpoints_dir(cfg.output_dir)
    final = root / f"step_{state.step:06d}"
    tmp = root / f".tmp-step_{state.step:06d}"
    acc.wait_for_everyone()
    if acc.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    torch.save(get_rng_state(), tmp / f"rng_state_{acc.process_index}.pt")
    if acc.is_main_process:
        model = acc.unwrap_model(loop.model)
        try:
            kind = save_model_weights(model, loop.processor, tmp / "model")
            callbacks = {
                f"{i}:{type(cb).__name__}": cb.state_dict()
                for i, cb in enumerate(loop.callbacks)
                if hasattr(cb, "state_dict")
            }
            torch.save(
                {
                    "optimizer": loop.optimizer.state_dict(),
                    "scheduler": loop.scheduler.state_dict() if loop.scheduler is not None else None,
                    "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
                    "loop_state": state.state_dict(),
                    "callbacks": callbacks,
                    "num_processes": acc.num_processes,
                },
                tmp / "training_state.pt",
            )
            cfg.save(tmp / "config.yaml")
            base = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
            if _is_peft(model):
                base = model.peft_config[model.active_adapter].base_model_name_or_path or base
            (tmp / "meta.json").write_text(json.dumps({"step": state.step, "kind": kind, "base_model": base}))
            _fsync_tree(tmp)
            if final.exists():
                old = root / f".old-step_{state.step:06d}"
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old)
            else:
                os.replace(tmp, final)
            _fsync_dir(root)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise OSError(
                f"could not write checkpoint {final} ({err}); earlier checkpoints are intact. "
                "Free disk space or change output_dir, then resume with resume_from='latest'."
            ) from err
        if best:
            state.best_checkpoint = str(final)
            atomic_write_text(
                root / "best.json",
                json.dumps({"path": str(final), "step": state.step, "metric": cfg.metric_for_best,
                            "value": state.best_metric}),
            )
        rotate_checkpoints(cfg.output_dir, cfg.save_total_limit, keep=state.best_checkpoint)
    acc.wait_for_everyone()
    return str(final)


def rotate_checkpoints(output_dir: str, limit: int | None, keep: str | None = None) -> list[Path]:
    """Delete the oldest checkpoints beyond ``limit``, never ``keep`` (the best); return deleted."""
    if not limit:
        return []
    found = list_checkpoints(output_dir)
    keep_path = Path(keep).resolve() if keep else None
    deletable = [p for p in found if p.resolve() != keep_path]
    excess = len(found) - limit
    deleted = deletable[: max(excess, 0)]
    for path in deleted:
        shutil.rmtree(path)
    return deleted


def best_checkpoint(output_dir: str) -> dict | None:
    """The best checkpoint's record (``path, step, metric, value``) or None."""
    path = checkpoints_dir(output_dir) / "best.json"
    return json.loads(path.read_text()) if path.is_file() else None


# ---------------------------------------------------------------------- resume
def resolve_checkpoint(output_dir: str, resume_from: str) -> Path:
    """``"latest"`` → newest complete checkpoint in ``output_dir``; otherwise a checkpoint folder."""
    if resume_from == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"resume_from='latest' but {checkpoints_dir(output_dir)} has no checkpoint")
        return found[-1]
    path = Path(resume_from)
    if not (path / "meta.json").is_file():
        raise FileNotFoundError(f"{path} is not a llava_loop checkpoint folder (no meta.json)")
    return path


def load_checkpoint(loop: Any, path: str | Path) -> dict:
    """Restore weights, optimizer, scheduler, scaler, LoopState and callback states into ``loop``.

    Returns this process's RNG state; the loop applies it once its data iterator exists.
    """
    path = Path(path)
    acc = loop.accelerator
    load_model_weights(acc.unwrap_model(loop.model), path / "model")
    training = torch.load(path / "training_state.pt", map_location="cpu", weights_only=False)
    if training["num_processes"] != acc.num_processes:
        logger.warning("checkpoint was written with %d processes, resuming with %d: the data order "
                       "after resume differs from an uninterrupted run", training["num_processes"],
                       acc.num_processes)
    loop.optimizer.load_state_dict(training["optimizer"])
    if loop.scheduler is not None and training["scheduler"] is not None:
        loop.scheduler.load_state_dict(training["scheduler"])
    if acc.scaler is not None and training["scaler"] is not None:
        acc.scaler.load_state_dict(training["scaler"])
    loop.state.load_state_dict(training["loop_state"])
    loop.state.should_stop, loop.state.stop_reason = False, None
    for i, cb in enumerate(loop.callbacks):
        saved = training["callbacks"].get(f"{i}:{type(cb).__name__}")
        if saved is not None and hasattr(cb, "load_state_dict"):
            cb.load_state_dict(saved)
    rng_file = path / f"rng_state_{acc.process_index}.pt"
    if not rng_file.is_file():
        rng_file = path / "rng_state_0.pt"
    return torch.load(rng_file, map_location="cpu", weights_only=False)


# ---------------------------------------------------------------------- export
def export(checkpoint: str | Path, out_dir: str | Path, base_model: Any = None, dtype: Any = None) -> Path:
    """Merge a checkpoint into its base model and save a standard Hugging Face model + processor.

    The result loads with ``LlavaForConditionalGeneration.from_pretrained(out_dir)`` (and is what
    AWQ/GGUF/bitsandbytes quantisers expect).

    Args:
        checkpoint: A checkpoint folder (``.../checkpoints/step_000120``).
        out_dir: Where to write the merged model.
        base_model: The base model object, or a name/path; default: the one recorded in the checkpoint.
        dtype: Optional dtype for loading the base model by name.

    Example:
        >>> export("out/checkpoints/step_000120", "merged")  # doctest: +SKIP
    """
    checkpoint = Path(checkpoint)
    meta = json.loads((checkpoint / "meta.json").read_text())
    if base_model is None or isinstance(base_model, str):
        from transformers import AutoModelForImageTextToText

        name = base_model or meta["base_model"]
        if not name:
            raise ValueError(f"{checkpoint} records no base model name; pass base_model=")
        base_model = AutoModelForImageTextToText.from_pretrained(name, dtype=dtype or "auto")
    folder = checkpoint / "model"
    if meta["kind"] == "lora":
        from peft import PeftModel

        model = PeftModel.from_pretrained(base_model, folder).merge_and_unload()
    else:
        load_model_weights(base_model, folder)
        model = base_model
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    from transformers import AutoProcessor

    try:
        AutoProcessor.from_pretrained(folder).save_pretrained(out_dir)
    except (OSError, ValueError) as err:
        raise ValueError(f"could not copy the processor saved in {folder}: {err}") from err
    return out_dir
