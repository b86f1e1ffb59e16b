"""Small helpers shared by the tests: records, the Llama-2 tokenizer folder, label inspection."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from PIL import Image

LLAMA2_TOKENIZER_ENV = "LLAVA_LOOP_LLAMA2_TOKENIZER"


def llama2_tokenizer_dir() -> Path:
    """The Llama-2 SentencePiece tokenizer folder; fails the test (never skips) when it is missing.

    ``$LLAVA_LOOP_LLAMA2_TOKENIZER`` wins; otherwise ``shared/data/llama2-tokenizer`` beside the
    clone (where CI puts it).
    """
    default = Path(__file__).resolve().parents[2] / "shared/data/llama2-tokenizer"
    folder = Path(os.environ.get(LLAMA2_TOKENIZER_ENV) or default)
    if not (folder / "tokenizer.model").is_file():
        pytest.fail(
            f"Llama-2 tokenizer not found: {folder / 'tokenizer.model'} is missing. Put the "
            f"llama2-tokenizer folder at {default} or set ${LLAMA2_TOKENIZER_ENV} to it; "
            "the real-SentencePiece label tests need it."
        )
    return folder


def record(rid: str, *turns: tuple[str, str], image=None, **extra) -> dict:
    """A record from ``("human" | "gpt" | "system", text)`` turns."""
    conversations = [{"from": role, "value": text} for role, text in turns]
    return {"id": rid, "image": image, "conversations": conversations, **extra}


def solid_image(color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> Image.Image:
    """A one-colour RGB image (distinct colours make image order checkable)."""
    return Image.new("RGB", size, color)


def unpadded(values, attention_mask) -> list[int]:
    """The values of one row where ``attention_mask`` is 1."""
    return [int(v) for v, m in zip(values.tolist(), attention_mask.tolist()) if m]


def collapse_images(ids: list[int], image_token_id: int, *others: list[int]):
    """Collapse every run of image tokens in ``ids`` to one token (as in the unexpanded text).

    Returns ``(ids, [run lengths], *others)`` with the same positions dropped from each of ``others``.
    """
    keep, runs = [], []
    for i, tok in enumerate(ids):
        if tok == image_token_id and i > 0 and ids[i - 1] == image_token_id:
            runs[-1] += 1
            continue
        if tok == image_token_id:
            runs.append(1)
        keep.append(i)
    return ([ids[i] for i in keep], runs, *([o[i] for i in keep] for o in others))


def labelled_runs(labels: list[int], ignore_index: int) -> list[list[int]]:
    """Contiguous runs of labels that are not ``ignore_index``."""
    runs: list[list[int]] = []
    previous = ignore_index
    for label in labels:
        if label != ignore_index:
            if previous == ignore_index:
                runs.append([])
            runs[-1].append(label)
        previous = label
    return runs


def expected_labels(tokenizer, text: str, continuations: list[str], ignore_index: int):
    """Token ids of ``text`` and the labels a correct collator gives them.

    Each continuation (e.g. ``" red</s>"``: the separator, the answer and its end-of-turn token)
    is found in ``text`` in order; its labels are the tokens it gets *in context*, i.e. the tokens
    a model must generate after the prompt that precedes it. Everything else is ``ignore_index``.
    """
    ids = tokenizer(text)["input_ids"]
    labels = [ignore_index] * len(ids)
    cursor = 0
    for continuation in continuations:
        pos = text.index(continuation, cursor)
        cursor = pos + len(continuation)
        head = tokenizer(text[:pos])["input_ids"]
        upto = tokenizer(text[:cursor])["input_ids"]
        assert ids[: len(upto)] == upto and upto[: len(head)] == head, (
            f"test setup: {text[:cursor]!r} does not tokenize as a prefix of the whole text"
        )
        labels[len(head) : len(upto)] = ids[len(head) : len(upto)]
    return ids, labels


def child_env(**extra: str) -> dict[str, str]:
    """``os.environ`` for a child process (subprocess, torchrun) that must compute like this one.

    Losses compared between a parent and a child are only equal at the same thread count (another
    count sums in another order: differences in the 7th digit), and a child otherwise starts with one
    thread per core. This gives the child this process's ``torch.get_num_threads()`` as
    OMP_NUM_THREADS / MKL_NUM_THREADS (torch starts with that many; some builds cap it at the core
    count, so a child script we write also calls ``torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))``),
    keeps it offline and turns tqdm bars off. ``extra`` adds or overrides variables.
    """
    import torch

    threads = str(torch.get_num_threads())
    return {
        **os.environ,
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TQDM_DISABLE": "1",
        **extra,
    }


def launch_two_processes(function, args=(), timeout: float = 240.0) -> None:
    """Run ``function(*args)`` in 2 gloo processes on the CPU (what ``accelerate.debug_launcher`` does),
    with this process's thread count, on a free port, with a timeout.

    Each worker starts with this process's ``torch.get_num_threads()`` and no Accelerate state (see
    `_two_process_worker`). Workers are spawned, not forked: a child forked after this process ran a
    multi-threaded OpenMP op hangs in its first parallel op, even if the count is back at 1 by then
    (seen with the suite pinned at 2 threads and a module fixture setting 1). So ``function`` must be
    module-level and ``args`` picklable.

    debug_launcher always uses port 29500, so two test runs at once (CI and a developer, or
    parallel sessions) rendezvous with each other and hang; a free port keeps runs apart.
    Gloo workers have also been seen to stall at 0% CPU on a loaded machine (never in a sequential
    run): a launch that does not finish within ``timeout`` is killed and tried once more on a new
    port, and a second stall fails the test instead of hanging CI.
    """
    import functools
    import socket
    import tempfile

    import torch
    from accelerate.utils import PrepareForLaunch, patch_environment
    from torch.multiprocessing import start_processes

    threads = torch.get_num_threads()
    worker = functools.partial(_two_process_worker, function, threads)
    for attempt in (1, 2):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        with (
            tempfile.TemporaryDirectory() as rdv_dir,  # gloo's FileStore deletes its file when done
            patch_environment(
                world_size=2,
                master_addr="127.0.0.1",
                master_port=str(port),
                accelerate_mixed_precision="no",
                accelerate_debug_rdv_file=os.path.join(rdv_dir, "rdv"),
                accelerate_use_cpu="yes",
                gloo_socket_ifname="lo",
            ),
        ):
            context = start_processes(
                PrepareForLaunch(worker, debug=True),
                args=args,
                nprocs=2,
                start_method="spawn",
                join=False,
            )
            deadline = time.monotonic() + timeout
            while not context.join(timeout=1.0):  # raises if a worker failed
                if time.monotonic() > deadline:
                    for process in context.processes:
                        process.kill()
                    break
            else:
                return
        if attempt == 2:
            pytest.fail(f"two-process launch stalled twice (> {timeout:.0f} s each)")


def _two_process_worker(function, threads: int, *args) -> None:
    """In a worker of `launch_two_processes`: the parent's thread count, no Accelerate state
    inherited from the single-process parent (it would make every rank think it is alone), then
    ``function(*args)``."""
    import torch
    from accelerate.state import AcceleratorState, GradientState

    torch.set_num_threads(threads)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    function(*args)


def small_config(out, **settings):
    """A `LoopConfig` for the tiny model on the CPU: fp32, small LoRA, a high learning rate."""
    from llava_loop import LoopConfig

    base = dict(output_dir=str(out), learning_rate=1e-2, lora_r=4, lora_alpha=8, precision="fp32", batch_size=2)
    return LoopConfig(**{**base, **settings})


def fsdp_on_cpu() -> None:
    """Make the loop's Accelerators run FSDP2 in gloo processes on the CPU (call it in each worker).

    Accelerate enables FSDP only for GPU process groups; this makes the Accelerator as the loop does, then
    sets its distributed type to FSDP with a version-2 plugin, so that accelerate's own FSDP2 preparation
    (`fully_shard` per unit, its gradient-sync switch and clipping) and the loop's FSDP code run on gloo.
    """
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    def switch(accelerator) -> None:
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
        _set_distributed_type(accelerator, DistributedType.FSDP)

    _switch_loop_accelerators(switch)


def deepspeed_on_cpu(stage: int) -> None:
    """Make the loop's Accelerators run DeepSpeed ZeRO ``stage`` in gloo processes on the CPU (call it in
    each worker): as `fsdp_on_cpu`, for accelerate's DeepSpeed path (DeepSpeed's CPU accelerator, gloo)."""
    from accelerate.utils import DeepSpeedPlugin, DistributedType

    def switch(accelerator) -> None:
        plugin = DeepSpeedPlugin(hf_ds_config={"zero_optimization": {"stage": stage}, "bf16": {"enabled": False}})
        _set_distributed_type(accelerator, DistributedType.DEEPSPEED)
        accelerator.state.deepspeed_plugins = plugin
        plugin.select(_from_accelerator_state=True)
        accelerator.deepspeed_engine_wrapped = None  # what Accelerator.__init__ sets under DeepSpeed

    _switch_loop_accelerators(switch)


def _switch_loop_accelerators(switch) -> None:
    """Make the loop create its Accelerators as it does (`make_accelerator`), then pass each to ``switch``."""
    import llava_loop.loop as loop_module
    from llava_loop.distributed import make_accelerator

    def make(precision: str, project_dir: str):
        accelerator = make_accelerator(precision, project_dir)
        switch(accelerator)
        return accelerator

    loop_module.make_accelerator = make


def _set_distributed_type(accelerator, kind) -> None:
    """Set the distributed type in accelerate's process-wide state (`AcceleratorState`, and `PartialState`,
    which AcceleratorState copies it from again whenever one is made, e.g. by accelerate's optimizer wrapper)."""
    from accelerate.state import PartialState

    accelerator.state.distributed_type = kind
    PartialState._shared_state["distributed_type"] = kind
