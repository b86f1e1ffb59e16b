"""Thin Accelerate helpers for multi-process evaluation."""

from __future__ import annotations

from typing import Any


def gather_in_order(accelerator: Any, rows: list[dict]) -> list[dict]:
    """Gather per-process result rows (each with a dataset ``"index"``) on every process.

    Returns them sorted by index with the duplicates that uneven sharding adds removed, so the
    result is the dataset order whatever the number of processes.
    """
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        rows = gather_object(rows)
    unique = {row["index"]: row for row in rows}
    return [unique[i] for i in sorted(unique)]
