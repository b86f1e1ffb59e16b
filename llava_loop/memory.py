"""GPU memory: what a process may use, how many decoder layers to checkpoint to stay under it, and the
largest batch size that does (batch_size="auto")."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

AUTO_FRACTION = 0.88
"""Share of the usable GPU memory that gradient_checkpointing="auto" plans for; the rest is the
allocator's fragmentation and the growth of later, longer batches."""


def memory_budget(device: torch.device | str) -> int:
    """Bytes of ``device`` this process may use (its memory times the fraction set with
    ``torch.cuda.set_per_process_memory_fraction``) times `AUTO_FRACTION`."""
    device = torch.device(device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    total = torch.cuda.get_device_properties(device).total_memory
    return int(total * torch.cuda.get_per_process_memory_fraction(device) * AUTO_FRACTION)


def layers_to_checkpoint(
    num_layers: int, peak_all: int, peak_freed: int, freed: int, budget: int, extra: int = 0
) -> int:
    """How many of ``num_layers`` decoder layers to checkpoint so that a step stays under ``budget`` bytes.

    Args:
        num_layers: Decoder layers of the language model.
        peak_all: Peak bytes of a probe step with every layer checkpointed.
        peak_freed: Peak bytes of the same step with ``freed`` layers not checkpointed.
        freed: Layers not checkpointed in the second probe (> 0).
        budget: Bytes available (`memory_budget`).
        extra: Bytes the real steps add that the probe had not (e.g. the optimizer state).

    Returns:
        Layers to checkpoint, from 0 to ``num_layers``: all of them when even that does not fit (the
        steps will then run out of memory as they would have anyway), none when everything fits.

    Example:
        >>> layers_to_checkpoint(32, peak_all=20 * 2**30, peak_freed=28 * 2**30, freed=8, budget=36 * 2**30)
        16
    """
    per_layer = (peak_freed - peak_all) / freed
    room = budget - peak_all - extra
    if room <= 0:
        return num_layers
    if per_layer <= 0:
        return 0  # keeping activations costs nothing measurable
    return num_layers - min(num_layers, math.floor(room / per_layer))


def find_batch_size(try_batch: Callable[[int], int], limit: int, budget: int, free: Callable[[], None]) -> int:
    """The largest batch size from 1 to ``limit`` whose try fits: ``try_batch(n)`` returns its peak bytes,
    which must stay within ``budget``; a try that raises ``torch.OutOfMemoryError`` does not fit. Sizes
    double from 1 until one does not fit (or ``limit``), then the gap is bisected; ``free()`` runs after
    every try (the next one starts from the same memory).

    Raises:
        RuntimeError: not even a batch of 1 fits, saying what to change.

    Example:
        >>> find_batch_size(lambda n: 3 * n, limit=64, budget=20, free=lambda: None)
        6
    """
    peaks: dict[int, int | None] = {}

    def fits(n: int) -> bool:
        try:
            peaks[n] = try_batch(n)
        except torch.OutOfMemoryError:
            peaks[n] = None
        finally:
            free()
        return peaks[n] is not None and peaks[n] <= budget

    good, bad, n = 0, limit + 1, 1
    while good < limit:
        if not fits(n):
            bad = n
            break
        good, n = n, min(2 * n, limit)
    while bad - good > 1:
        middle = (good + bad) // 2
        if fits(middle):
            good = middle
        else:
            bad = middle
    if good == 0:
        seen = peaks.get(1)
        raise RuntimeError(
            "batch_size='auto': not even one sample fits "
            + (f"(peak {seen / 2**30:.1f} GiB, budget {budget / 2**30:.1f} GiB)" if seen else "(out of memory)")
            + ": set max_length lower, gradient_checkpointing=True, quantization='4bit', optimizer='adamw_8bit', "
            "or use a larger GPU"
        )
    return good


AUTO_BATCH_FILE = "auto_batch_size.json"
"""Where batch_size="auto" / eval_batch_size="auto" keep what they found, in output_dir."""


def cached_batch_size(output_dir: str, kind: str, key: dict) -> int | None:
    """The batch size found before for ``kind`` ("train" or "eval") in ``output_dir`` if it was found with
    the same ``key`` (what decides it), else None (the reason is logged)."""
    import json
    import logging
    import os

    path = os.path.join(output_dir, AUTO_BATCH_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            entry = json.load(f).get(kind)
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(entry, dict):
        return None
    if entry.get("key") != key:
        changed = sorted(
            k for k in set(key) | set(entry.get("key") or {}) if (entry.get("key") or {}).get(k) != key.get(k)
        )
        logging.getLogger(__name__).info("%s batch size searched again: %s changed since %s", kind, changed, path)
        return None
    size = entry.get("batch_size")
    return size if isinstance(size, int) and size > 0 else None


def save_batch_size(output_dir: str, kind: str, key: dict, size: int) -> None:
    """Record, atomically, the batch size found for ``kind`` with ``key`` in ``output_dir``."""
    import json
    import os

    from .checkpointing import atomic_write_text

    path = os.path.join(output_dir, AUTO_BATCH_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        data = {}
    data = data if isinstance(data, dict) else {}
    data[kind] = {"key": key, "batch_size": size}
    os.makedirs(output_dir, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=1))


def can_measure(device: torch.device | str) -> bool:
    """Whether peak memory can be measured on ``device`` (a CUDA GPU)."""
    return torch.device(device).type == "cuda"


def measure_peak(step: Callable[[], object], device: torch.device | str) -> int:
    """Run ``step`` and return the peak bytes PyTorch's allocator held on ``device`` meanwhile."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def device_identity(device: torch.device | str) -> dict:
    """What decides how much fits on ``device``: its name, memory and this process's share of it."""
    device = torch.device(device)
    if device.type != "cuda":
        return {"device": device.type}
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    properties = torch.cuda.get_device_properties(device)
    return {
        "device": properties.name,
        "total_memory": properties.total_memory,
        "memory_fraction": torch.cuda.get_per_process_memory_fraction(device),
    }
