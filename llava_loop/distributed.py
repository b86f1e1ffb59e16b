"""Process-level mechanics around Accelerate: creating the `Accelerator`, signals, RNG state, and
multi-process evaluation.

Evaluation shards *batches* round-robin over the processes without padding (so no sample is
generated twice), every process generates its shard, and `gather_in_order` puts the results back in
dataset order on every process. Metrics are computed once, on the main process, and shared with
`broadcast_from_main`. Every helper is a no-op with one process.

Example:
    >>> shard_batches(list(range(7)), batch_size=2, process_index=1, num_processes=2)
    [[2, 3], [6]]
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np
import torch

logger = logging.getLogger(__name__)

T = TypeVar("T")


def make_accelerator(precision: str, project_dir: str) -> Any:
    """An `accelerate.Accelerator` for this process: CPU or the visible GPU, ``precision`` one of
    fp32/bf16/fp16. (Trackers are `llava_loop.trackers.TrackerLogger`'s, on the main process.)

    Raises:
        RuntimeError: The processes that started are not the ones the launcher was asked for (see
            `check_process_count`).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    mixed_precision = precision.replace("fp32", "no")
    # Accelerate keeps one process-wide state and refuses a second Accelerator with another precision
    # (a notebook or test running several Loops). Reset it as transformers' Trainer does; the process
    # group (PartialState) is kept.
    if AcceleratorState._shared_state.get("_mixed_precision", mixed_precision) != mixed_precision:
        AcceleratorState._reset_state()
    accelerator = Accelerator(
        # Without cpu=True, accelerate treats `torchrun` on a CPU-only machine as N unrelated
        # single-process runs, all writing the same output_dir.
        cpu=not torch.cuda.is_available(),
        mixed_precision=mixed_precision,
        project_dir=project_dir,
    )
    check_process_count(accelerator.num_processes)
    return accelerator


LAUNCH_CONFIGS = ("ddp", "fsdp", "zero2", "zero3")
"""The accelerate launch configurations llava_loop ships (`launch_config`)."""


def launch_config(
    name: str,
    num_processes: int = 1,
    num_machines: int = 1,
    machine_rank: int = 0,
    main_process_ip: str | None = None,
    main_process_port: int = 29500,
) -> str:
    """The text of one of llava_loop's ``accelerate launch`` configuration files (``llava_loop/launch_configs``:
    DDP, FSDP2, DeepSpeed ZeRO-2 or ZeRO-3) for this machine of a run, its comments kept.

    Args:
        name: One of `LAUNCH_CONFIGS`.
        num_processes: Processes (GPUs) of all machines together.
        num_machines: Machines of the run; each one runs ``accelerate launch`` with its own ``machine_rank``.
        machine_rank: This machine's rank, 0 for the one at ``main_process_ip``.
        main_process_ip: Address of machine 0, reachable from the others (several machines only).
        main_process_port: Its free port.

    Raises:
        ValueError: An unknown name, or numbers that do not make one run; says what to change.

    Example:
        >>> "distributed_type: FSDP" in launch_config("fsdp", num_processes=8)
        True
    """
    from importlib import resources

    if name not in LAUNCH_CONFIGS:
        raise ValueError(f"no launch config {name!r}: choose one of {', '.join(LAUNCH_CONFIGS)}")
    if num_machines < 1 or num_processes < num_machines or num_processes % num_machines:
        raise ValueError(
            f"num_processes={num_processes} over num_machines={num_machines}: give every machine as many processes "
            "(num_processes counts all machines' GPUs together)"
        )
    if not 0 <= machine_rank < num_machines:
        raise ValueError(f"machine_rank={machine_rank} with {num_machines} machines: use 0 to {num_machines - 1}")
    if num_machines > 1 and not main_process_ip:
        raise ValueError("several machines need main_process_ip: the address of machine 0, reachable from the others")
    values = {
        "num_processes": num_processes,
        "num_machines": num_machines,
        "machine_rank": machine_rank,
        "main_process_ip": main_process_ip or "null",
        "main_process_port": main_process_port,
    }
    lines = resources.files("llava_loop").joinpath("launch_configs", f"{name}.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        key, _, rest = line.partition(":")
        if key in values:
            comment = rest[rest.index("#") :] if "#" in rest else ""
            lines[i] = f"{key}: {values[key]}" + (f"  {comment}" if comment else "")
    return "\n".join(lines) + "\n"


def engine(accelerator: Any) -> str:
    """How the processes share the model: ``"deepspeed"``, ``"fsdp"``, ``"ddp"`` (several processes,
    each with the whole model) or ``"single"`` (one process; the model may still be spread over several
    GPUs with ``device_map``)."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        return "deepspeed"
    if kind == DistributedType.FSDP:
        return "fsdp"
    return "ddp" if accelerator.num_processes > 1 else "single"


def shards_parameters(accelerator: Any) -> bool:
    """Whether each process holds only a shard of the weights (FSDP, DeepSpeed ZeRO-3). Every forward
    then gathers weights from all processes: the processes must run the same number of forwards (and
    of decoding steps, ``synced_gpus``), and saving gathers the trained weights first."""
    kind = engine(accelerator)
    if kind == "fsdp":
        return True
    return kind == "deepspeed" and accelerator.state.deepspeed_plugin.zero_stage == 3


def configure_fsdp(accelerator: Any, model: Any) -> None:
    """Make accelerate's FSDP plugin shard ``model`` per block, before ``accelerator.prepare``.

    Unless the launch configuration names the classes to wrap (``fsdp_transformer_layer_cls_to_wrap``) or
    asks for size-based wrapping, every repeated block (`modeling.sharded_layer_classes`: the decoder
    layers and the vision encoder layers of any family) becomes one FSDP unit, gathered just before it
    runs and freed after; no class names are listed by hand.

    Raises:
        ValueError: FSDP version 1 is configured (the loop runs FSDP2: ``fsdp_version: 2``).
    """
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    from .modeling import sharded_layer_classes

    plugin = accelerator.state.fsdp_plugin
    if plugin.fsdp_version != 2:
        raise ValueError(
            f"the accelerate config asks for FSDP version {plugin.fsdp_version}; llava_loop runs FSDP2 (per-parameter "
            "sharding, which keeps parameter names and mixes frozen and LoRA weights): set `fsdp_version: 2` in the "
            "accelerate config (llava-loop launch-config fsdp writes one)"
        )
    if plugin.transformer_cls_names_to_wrap is None and plugin.auto_wrap_policy in (None, transformer_auto_wrap_policy):
        plugin.auto_wrap_policy = transformer_auto_wrap_policy
        plugin.transformer_cls_names_to_wrap = sharded_layer_classes(model)
        logger.info("FSDP shards each of these blocks on its own: %s", ", ".join(plugin.transformer_cls_names_to_wrap))
    from transformers import PreTrainedModel

    for module in model.modules():
        # transformers' own marker of an FSDP model (what its apply_fsdp2 sets): `generate` then turns
        # synced_gpus on by itself with several processes, for an overridden `Loop.generate` too.
        if isinstance(module, PreTrainedModel):
            module._is_fsdp_managed_module = True


def configure_deepspeed(accelerator: Any, micro_batch_size: int, max_grad_norm: float) -> None:
    """Fill the DeepSpeed config with the loop's settings, before ``accelerator.prepare``.

    The loop accumulates micro-batches itself (normalising by the tokens of the whole step), so DeepSpeed
    sees one micro-batch per step's boundary: ``gradient_accumulation_steps: 1``, and
    ``train_micro_batch_size_per_gpu`` the loop's batch size. DeepSpeed clips inside its step:
    ``gradient_clipping`` is ``max_grad_norm``. The loop's own AdamW (or the one `Loop.configure_optimizers`
    returns) runs inside ZeRO (``zero_allow_untested_optimizer``). Values the launch config sets ("auto"
    aside) must agree.

    Raises:
        ValueError: The DeepSpeed config sets one of these to another value; names it and the fix.
    """
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    wanted = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch_size * accelerator.num_processes,
        "gradient_clipping": float(max_grad_norm),
    }
    for key, value in wanted.items():
        given = config.get(key, "auto")
        if given != "auto" and given != value:
            raise ValueError(
                f"the DeepSpeed config sets {key}={given!r}, but the loop needs {value!r} (it accumulates "
                "micro-batches itself: use batch_size, grad_accum_steps and max_grad_norm of LoopConfig); set "
                f'"{key}": "auto" in the DeepSpeed config'
            )
        config[key] = value
    config.setdefault("zero_allow_untested_optimizer", True)


def deepspeed_full_state(groups: list[list[tuple[str, Any]]], optimizer: Any) -> tuple[dict, dict]:
    """From DeepSpeed's partitions (ZeRO-1/2/3): the trained weights (its fp32 master copies) by name, and
    the optimizer state in torch's format (whole tensors, parameters by index in the order of ``groups``, the
    hyper-parameters of the optimizer's groups), i.e. what one process without DeepSpeed would save. A
    collective: every process calls it.

    Args:
        groups: ``(name, parameter)`` of the trainable parameters of each of the optimizer's groups, as they
            were before DeepSpeed flattened them.
        optimizer: accelerate's wrapper of DeepSpeed's ZeRO optimizer.
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    named = [pair for group in groups for pair in group]
    zero = optimizer.optimizer  # DeepSpeed's ZeRO optimizer; .optimizer: the torch one, over flat partitions
    base = zero.optimizer
    _link_optimizer_state(zero)
    entry = next(iter(base.state.values()), {})
    weights, state = {}, {}
    for index, (name, param) in enumerate(named):
        weights[name] = safe_get_full_fp32_param(param).detach().cpu()
        state[index] = {
            key: value.detach().cpu().clone()
            if value.dim() == 0
            else safe_get_full_optimizer_state(param, key).detach().cpu()
            for key, value in entry.items()
        }
    saved_groups, start = [], 0
    for group, members in zip(base.param_groups, groups):
        indices = list(range(start, start + len(members)))
        saved_groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": indices})
        start += len(members)
    return weights, {"state": state, "param_groups": saved_groups}


def deepspeed_load_state(state: dict, groups: list[list[tuple[str, Any]]], weights: dict, optimizer: Any) -> None:
    """Put a torch-format optimizer state (`deepspeed_full_state`, or one process's) and the fp32 trained
    weights into DeepSpeed's partitions: its master weights from ``weights`` (by name; DeepSpeed took them
    from the module, which may be cast to 16 bits), the moments of each parameter, the step counts. A
    collective."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    named = [pair for group in groups for pair in group]
    base = optimizer.optimizer.optimizer
    first = state["state"].get(0, state["state"].get("0", {}))
    zero = optimizer.optimizer
    # torch's AdamW creates its state lazily: create it to write into, for DeepSpeed's flat fp32 partitions
    # (ZeRO-3 keeps them in sub-groups of its own).
    flats = [p for group in base.param_groups for p in group["params"]]
    flats += getattr(zero, "fp32_partitioned_groups_flat", [])
    fused = any(group.get("fused") or group.get("capturable") for group in base.param_groups)
    for flat in {id(f): f for f in flats}.values():
        # torch keeps AdamW's step count on the CPU, or on the parameter's device when fused / capturable
        scalar = flat.device if fused else "cpu"
        base.state[flat] = {
            k: v.clone().to(scalar) if v.dim() == 0 else torch.zeros_like(flat) for k, v in first.items()
        }
    _link_optimizer_state(zero)
    for index, (name, param) in enumerate(named):
        safe_set_full_fp32_param(param, weights[name])
        for key, value in state["state"][index].items():
            if value.dim() > 0:
                safe_set_full_optimizer_state(param, value, key)
    for group, saved in zip(base.param_groups, state["param_groups"]):
        group.update({k: v for k, v in saved.items() if k != "params"})


def _link_optimizer_state(zero: Any) -> None:
    """Point ZeRO-1/2's per-parameter views at the optimizer state of every group. DeepSpeed links them
    once, right after stepping the first group, when the other groups have no state yet (their views stay
    empty and `safe_get_full_optimizer_state` fails for their parameters); linking again fixes that."""
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()


def full_tensors(tensors: dict[str, Any], keep: bool = True) -> dict[str, Any]:
    """``tensors`` with every sharded tensor (FSDP2's ``DTensor``) gathered whole, on the CPU; with
    ``keep=False`` the gathered tensors are dropped (an empty dict: the processes that do not write).
    A collective under FSDP: every process calls it with the same names, in the same order."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, value in tensors.items():
        if isinstance(value, DTensor):
            value = value.full_tensor()  # one tensor at a time on the device
        if keep:
            out[name] = value.detach().cpu() if isinstance(value, torch.Tensor) else value
    return out


def full_optimizer_state(state: dict, keep: bool = True) -> dict:
    """An optimizer's ``state_dict()`` with every sharded state tensor (FSDP2: exp_avg, exp_avg_sq of
    sharded parameters) gathered whole on the CPU, so that it is the state dict one process would have
    (``keep=False``: gathered, then dropped). A collective under FSDP (every process calls it)."""
    gathered = {index: full_tensors(entry, keep) for index, entry in sorted(state["state"].items())}
    return {"state": gathered, "param_groups": state["param_groups"]}


def shard_optimizer_state(state: dict, optimizer: Any) -> dict:
    """The inverse of `full_optimizer_state` for ``optimizer``: each whole state tensor of a sharded
    parameter cut into this process's shard (a ``DTensor`` like the parameter), ready for
    ``optimizer.load_state_dict``. A state dict without sharded parameters is returned as it is."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    sharded = {}
    for index, entry in state["state"].items():
        param = params[int(index)] if int(index) < len(params) else None
        if isinstance(param, DTensor):
            entry = {
                key: distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
                if isinstance(value, torch.Tensor) and value.shape == param.shape
                else value
                for key, value in entry.items()
            }
        sharded[index] = entry
    return {"state": sharded, "param_groups": state["param_groups"]}


def check_process_count(num_processes: int) -> None:
    """Refuse a run whose processes are not the ones its launcher was asked for.

    Two launcher mistakes start the wrong number of processes without any error of their own:

    - ``WORLD_SIZE`` (set by torchrun and accelerate's multi-process launchers) differs from the
      processes accelerate set up: each process would train alone and overwrite the others' checkpoints.
    - ``accelerate launch`` was configured for N processes (``--num_processes`` or ``num_processes``
      in its config file) but started fewer: with ``use_cpu: true``, or ``distributed_type: NO``,
      accelerate's launcher runs ONE process and says nothing, so a "2-process" run is silently a
      1-process run with half the effective batch.

    The launcher's request is read from its own command line (this process's parent or grandparent)
    with accelerate's own argument parser and config loader.

    Args:
        num_processes: The processes accelerate set up (``Accelerator.num_processes``).

    Raises:
        RuntimeError: Naming both numbers, where each comes from, and the launch command to use.

    Example:
        >>> check_process_count(1)  # a plain `python train.py`: nothing to check
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != num_processes:
        raise RuntimeError(
            f"WORLD_SIZE={world} but accelerate set up {num_processes} process(es): the processes would "
            "train independently and overwrite each other's checkpoints; check the launcher"
        )
    requested = accelerate_launch_request()
    if requested is None or requested["num_processes"] == num_processes:
        return
    if requested["use_cpu"]:
        fix = (
            f"on CPUs accelerate launch has no multi-process launcher (it needs mpirun); start the "
            f"processes with `torchrun --nproc_per_node {requested['num_processes']} <script>` (gloo DDP) instead"
        )
    else:
        fix = (
            "for several GPUs set `distributed_type: MULTI_GPU` in the config (or pass --multi_gpu), "
            "or ask for the processes that run"
        )
    raise RuntimeError(
        f"accelerate launch was asked for {requested['num_processes']} processes ({requested['source']}) "
        f"but {num_processes} started, so the run would silently train with "
        f"{num_processes} of {requested['num_processes']} processes: {fix}"
    )


def accelerate_launch_request() -> dict | None:
    """What ``accelerate launch`` was asked for, when it started this process: ``{"num_processes",
    "use_cpu", "source"}`` (``source`` says where the number came from), else None.

    Read from the launcher's command line (the parent process, or the grandparent under a wrapper)
    with accelerate's ``launch_command_parser`` and ``load_config_from_file``, so flags and config file
    combine exactly as accelerate combines them (a flag wins over the file).
    """
    import psutil

    try:
        ancestors = psutil.Process().parents()[:2]
    except psutil.Error:
        return None
    for process in ancestors:
        try:
            args = _accelerate_launch_args(process.cmdline())
        except psutil.Error:
            continue
        if args is not None:
            return _launch_request(args)
    return None


def _accelerate_launch_args(cmdline: list[str]) -> list[str] | None:
    """The arguments after ``launch`` of an ``accelerate launch`` command line (``accelerate launch``,
    ``accelerate-launch`` or ``python -m accelerate.commands.launch``), else None."""
    for i, token in enumerate(cmdline):
        name = os.path.basename(token)
        if name in ("accelerate-launch", "accelerate.commands.launch"):
            return cmdline[i + 1 :]
        if name in ("accelerate", "accelerate.commands.accelerate_cli"):
            return cmdline[i + 2 :] if cmdline[i + 1 : i + 2] == ["launch"] else None
    return None


def _launch_request(args: list[str]) -> dict | None:
    from accelerate.commands.config import default_config_file, load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    try:
        parsed = launch_command_parser().parse_args(args)
    except SystemExit:  # not a command line accelerate itself would accept: nothing to compare
        return None
    config_file = parsed.config_file or (default_config_file if os.path.isfile(default_config_file) else None)
    config = load_config_from_file(config_file) if config_file else None
    use_cpu = bool(parsed.cpu or getattr(parsed, "use_cpu", False) or getattr(config, "use_cpu", False))
    if parsed.num_processes is not None:
        return {"num_processes": parsed.num_processes, "use_cpu": use_cpu, "source": "--num_processes"}
    if getattr(config, "num_processes", None) is not None:
        source = f"num_processes: {config.num_processes} in {config_file}"
        return {"num_processes": config.num_processes, "use_cpu": use_cpu, "source": source}
    return None


class SignalWatcher:
    """Turns SIGTERM/SIGINT into a request to stop after the current step (a second Ctrl-C stops now).

    Use as a context manager around training; handlers are installed only in the main thread and
    only when ``enabled``, and the previous handlers come back on exit.

    Example:
        >>> with SignalWatcher() as signals:
        ...     pass  # train; check signals.received (None until a signal arrives)
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.received: str | None = None  # name of the first signal received, e.g. "SIGTERM"
        self._previous: dict[int, Any] = {}  # the handlers to restore on exit

    def __enter__(self) -> SignalWatcher:
        self.received = None
        if self.enabled and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:  # second Ctrl-C: stop now
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        logger.warning("%s received: finishing the current step, then saving a checkpoint", self.received)

    def __exit__(self, *exc: Any) -> bool:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        return False

    def agreed(self, accelerator: Any) -> bool:
        """Whether any process received a signal. Processes may get it during different steps, so
        with several processes they agree (one tiny all-reduce, a collective: call it on all of them
        at the same point) to stop after the same step."""
        received = self.received is not None
        if accelerator.num_processes > 1 and self.enabled:
            flag = torch.tensor([float(received)], device=accelerator.device)
            received = bool(accelerator.reduce(flag, reduction="sum").item())
        return received


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


@contextlib.contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Seed every RNG with ``seed`` inside the block and restore the previous states after it, so
    that what runs inside (an evaluation that samples) neither depends on nor changes the rest."""
    from accelerate.utils import set_seed

    saved = get_rng_state()
    try:
        set_seed(seed)
        yield
    finally:
        set_rng_state(saved)


def shard_batches(
    order: list[int], batch_size: int, process_index: int, num_processes: int, equal: bool = False
) -> list[list[int]]:
    """Cut ``order`` into batches and give this process every ``num_processes``-th one.

    Unlike accelerate's even sharding, nothing is padded or repeated: with 7 samples, batch size 2
    and 2 processes, process 0 gets ``[0, 1], [4, 5]`` and process 1 gets ``[2, 3], [6]``. That
    keeps the eval loss exact; it also means processes run different numbers of batches, so nothing
    between batches may be a collective operation. With ``equal`` (sharded weights, where every forward
    is a collective) the processes with fewer batches get repeats of the first batch at the end, so
    that all run as many; the caller drops the repeats' results.

    Example:
        >>> shard_batches(list(range(7)), batch_size=2, process_index=0, num_processes=2)
        [[0, 1], [4, 5]]
        >>> shard_batches(list(range(5)), batch_size=2, process_index=1, num_processes=2, equal=True)
        [[2, 3], [0, 1]]
    """
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    mine = batches[process_index::num_processes]
    if equal:
        mine += batches[:1] * (math.ceil(len(batches) / num_processes) - len(mine))
    return mine


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
