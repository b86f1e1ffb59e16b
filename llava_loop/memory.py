"""GPU memory: what a process may use, and how many decoder layers to checkpoint to stay under it."""

from __future__ import annotations

import math

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
