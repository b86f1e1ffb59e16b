"""Thin Accelerate helpers for multi-process evaluation.

Evaluation shards *batches* round-robin over the processes without padding (so no sample is
generated twice), every process generates its shard, and `gather_in_order` puts the results back in
dataset order on every process. Metrics are computed once, on the main process, and shared with
`broadcast_from_main`. Every helper is a no-op with one process.

Example:
    >>> shard_batches(list(range(7)), batch_size=2, process_index=1, num_processes=2)
    [[2, 3]]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def shard_batches(order: list[int], batch_size: int, process_index: int, num_processes: int) -> list[list[int]]:
    """Cut ``order`` into batches and give this process every ``num_processes``-th one.

    Unlike accelerate's even sharding, nothing is padded or repeated: with 7 samples, batch size 2
    and 2 processes, process 0 gets ``[0, 1], [4, 5]`` and process 1 gets ``[2, 3], [6]``. That
    keeps the eval loss exact; it also means processes run different numbers of batches, so nothing
    between batches may be a collective operation.

    Example:
        >>> shard_batches(list(range(7)), batch_size=2, process_index=0, num_processes=2)
        [[0, 1], [4, 5], [6]]
    """
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return batches[process_index::num_processes]


def gather_in_order(accelerator: Any, rows: list[dict]) -> list[dict]:
    """Gather per-process result rows (each with a dataset ``"index"``) on every process.

    Returns them sorted by index with any duplicate index removed (the first copy wins), so the
    result is the dataset order whatever the number of processes or how the work was split.

    Example:
        >>> class One:
        ...     num_processes = 1
        >>> gather_in_order(One(), [{"index": 2}, {"index": 0}, {"index": 2}])
        [{'index': 0}, {'index': 2}]
    """
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        rows = gather_object(rows)
    unique: dict[int, dict] = {}
    for row in rows:
        unique.setdefault(row["index"], row)
    return [unique[i] for i in sorted(unique)]


def run_on_main(accelerator: Any, fn: Callable[[], T]) -> T:
    """Run ``fn`` on the main process only and return its result on every process.

    If ``fn`` raises on the main process, it re-raises there and the other processes raise a
    `RuntimeError` naming the error, instead of waiting forever for a result.
    """
    if accelerator.num_processes == 1:
        return fn()
    from accelerate.utils import broadcast_object_list

    box: list[Any] = [None]
    error: BaseException | None = None
    if accelerator.is_main_process:
        try:
            box[0] = ("ok", fn())
        except Exception as err:  # noqa: BLE001 - re-raised below, after telling the other processes
            error = err
            box[0] = ("error", f"{type(err).__name__}: {err}")
    broadcast_object_list(box, from_process=0)
    if error is not None:
        raise error
    status, value = box[0]
    if status == "error":
        raise RuntimeError(f"failed on the main process: {value}")
    return value
