"""The ``llava-loop`` command (also ``python -m llava_loop``): demo, train, plot, export, convert.

``train`` reads one YAML file that can hold the whole run, and flags override it:

.. code-block:: yaml

    model: {name: llava-hf/llava-1.5-7b-hf, dtype: bfloat16}
    data: {train: data/train.json, eval: data/val.json, image_folder: data/images}
    metrics: [exact_match, {name: bertscore, model_type: /models/roberta-large, num_layers: 17}]
    output_dir: runs/llava-lora          # every LoopConfig field, at the top level
    learning_rate: 2.0e-4

Every setting (data files and records, metrics and their models, metric_for_best, output_dir, the
model's folder) is checked before the model is loaded, so a typo costs seconds, not a 7B load. A
mistake prints one message and exits with status 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("llava_loop")

USER_ERRORS = (ValueError, OSError, ImportError)
"""Exceptions that are the user's to fix (bad settings, files, data, a missing package; and
`llava_loop.rundir.RunDirError`, an output_dir in use): one message, exit status 2. Anything else is a
bug and keeps its traceback."""


@dataclass
class ModelArgs:
    """The model to finetune (loaded only after every other setting is checked)."""

    name: str
    """Hub name (e.g. llava-hf/llava-1.5-7b-hf) or a local folder written by save_pretrained."""
    dtype: str = "auto"
    """Weight dtype: auto (the checkpoint's), bfloat16, float16 or float32."""
    device_map: str | None = None
    """"auto" spreads one model over the visible GPUs, then CPU offload (one process); null = one device."""
    max_memory: dict[str, str] | None = None
    """With device_map auto: the most each device holds, e.g. {"0": "20GiB", "cpu": "60GiB"}; null = all."""
    offload_folder: str | None = None
    """With device_map auto: the folder for layers offloaded to disk; null = no disk offload."""
    attn_implementation: str | None = None
    """Attention kernel, e.g. sdpa or flash_attention_2; null = the transformers default."""
    min_pixels: int | None = None
    """Qwen2-VL / Qwen2.5-VL: fewest pixels per image (tokens = pixels / 784); null = the processor's."""
    max_pixels: int | None = None
    """Qwen2-VL / Qwen2.5-VL: most pixels per image, which bounds its tokens and memory; null = the processor's."""


def _device_keys(max_memory: dict[str, str] | None) -> dict | None:
    """``max_memory`` from a config file or command line: GPU indices as ints ("0" -> 0), as transformers wants."""
    if max_memory is None:
        return None
    return {int(k) if str(k).isdigit() else k: v for k, v in max_memory.items()}


@dataclass
class DataArgs:
    """Training and evaluation data (LLaVA JSON/JSONL or HF messages records)."""

    train: str
    """Training records: a .json (list) or .jsonl file."""
    eval: str | None = None
    """Evaluation records (same formats); null = no evaluation."""
    image_folder: str | None = None
    """Folder that relative image paths are relative to; null = the data file's folder."""
    eval_image_folder: str | None = None
    """Image folder of the eval records; null = image_folder."""


def _metrics_help() -> str:
    from .metrics import metric_names

    return (
        f"Metrics scored on generated answers. Each is a built-in name ({', '.join(metric_names())}) or a "
        "mapping with options, e.g. {name: bertscore, model_type: /models/roberta-large, num_layers: 17}. "
        "On the command line: --metrics '[exact_match, rouge]' or --metrics+ rouge to add one."
    )


# ---------------------------------------------------------------------- parser


def build_parser() -> Any:
    """The ``llava-loop`` parser (jsonargparse): one subcommand per task."""
    from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

    from .config import LoopConfig

    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # field docstrings are the help

    def parser(description: str) -> ArgumentParser:
        p = ArgumentParser(prog="llava-loop", description=description, exit_on_error=False, allow_abbrev=False)
        p.add_argument("--debug", action="store_true", help="Show the full traceback of an error.")
        return p

    root = parser(
        "Finetune Hugging Face vision-language models with a plain PyTorch loop. See: llava-loop COMMAND --help"
    )
    commands = root.add_subcommands(required=True, dest="command")

    demo_p = parser("Train a tiny offline LLaVA on synthetic visual QA and show that it learned (CPU, ~40 s).")
    demo_p.add_argument("--output_dir", default="demo_output", help="Where checkpoints, logs and plots go.")
    demo_p.add_argument("--steps", type=int, default=600, help="Optimizer steps (batch 16).")
    demo_p.add_argument("--train_samples", type=int, default=4096, help="Synthetic training samples.")
    demo_p.add_argument("--eval_samples", type=int, default=128, help="Held-out samples (never trained on).")
    demo_p.add_argument("--seed", type=int, default=0, help="Seed of the model, the data and the run.")
    commands.add_subcommand("demo", demo_p, help="train a tiny offline LLaVA on synthetic visual QA (CPU)")

    train_p = parser(
        "Finetune a vision-language model. A YAML --config file can hold the whole run (sections model, data, "
        "metrics, and every LoopConfig field at the top level); flags override it. Everything is checked "
        "before the model is loaded. --print_config shows the resulting configuration."
    )
    train_p.add_argument("--config", action=ActionConfigFile, help="YAML file with the whole run; flags override it.")
    train_p.add_class_arguments(ModelArgs, "model")
    train_p.add_class_arguments(DataArgs, "data")
    train_p.add_argument("--metrics", type=list[str | dict[str, Any]], default=["exact_match"], help=_metrics_help())
    train_p.add_class_arguments(LoopConfig, None)
    commands.add_subcommand("train", train_p, help="finetune a model on your data (LoRA by default)")

    plot_p = parser("Draw loss, learning rate and every eval metric of a run from its metrics.jsonl to a PNG.")
    plot_p.add_argument("run_dir", help="The run's output_dir (holding metrics.jsonl).")
    plot_p.add_argument("--out", default=None, help="PNG to write; default RUN_DIR/curves.png.")
    commands.add_subcommand("plot", plot_p, help="plot a run's curves to PNG")

    export_p = parser("Merge a checkpoint's LoRA adapter into its base model and save a plain HF model.")
    export_p.add_argument("checkpoint", help="A checkpoint folder, e.g. runs/x/checkpoints/step_000500.")
    export_p.add_argument("out_dir", help="Folder for the merged model (must be empty unless --overwrite).")
    export_p.add_argument("--base_model", default=None, help="Base model; default: the one the checkpoint names.")
    export_p.add_argument("--overwrite", action="store_true", help="Replace a non-empty OUT_DIR.")
    export_p.add_argument("--quantize", choices=["none", "nf4", "int8", "int4-weight-only"], default="none",
                          help="Quantize the merged model's language-model layers: nf4 / int8 (bitsandbytes, GPU or "
                          "CPU), int4-weight-only (torchao, CUDA GPU); none = 16-bit.")  # fmt: skip
    commands.add_subcommand("export", export_p, help="merge a LoRA checkpoint into a plain HF model")

    estimate_p = parser(
        "Estimate the GPU memory of a run per GPU (weights, gradients, optimizer states, activations, logits, "
        "eval KV cache) from the model's config alone (--model.name: only its config.json is read, no weights). "
        "Every LoopConfig field is a flag (or in --config, a train YAML); the formula is in docs/memory.md."
    )
    estimate_p.add_argument("--config", action=ActionConfigFile, help="A train run's YAML (model and LoopConfig "
                            "fields are used; data and metrics are ignored).")  # fmt: skip
    estimate_p.add_class_arguments(ModelArgs, "model")
    estimate_p.add_argument("--data", type=dict[str, Any] | None, default=None, help="Ignored (a train YAML's data).")
    estimate_p.add_argument("--metrics", type=list[Any] | None, default=None, help="Ignored (a train YAML's metrics).")
    estimate_p.add_argument("--seq_len", type=int, default=None,
                            help="Tokens per training sample, image tokens included; default: max_length.")  # fmt: skip
    estimate_p.add_argument("--label_tokens", type=int, default=None,
                            help="Answer tokens per sample; default: every token after the image's.")  # fmt: skip
    estimate_p.add_argument("--eval_prompt_len", type=int, default=None, help="Longest eval prompt; default: seq_len.")
    estimate_p.add_argument("--num_processes", type=int, default=1, help="GPUs training together.")
    estimate_p.add_argument("--sharding", choices=["ddp", "fsdp"], default="ddp", help="With several processes.")
    estimate_p.add_argument("--json", action="store_true", help="Print the estimate as JSON (bytes).")
    estimate_p.add_class_arguments(LoopConfig, None)
    commands.add_subcommand("estimate", estimate_p, help="estimate the GPU memory of a run from the model's config")

    convert_p = parser(
        "Convert a VQA dataset (question, answers, image) or a caption dataset (image, captions) to LLaVA JSON "
        "(SPLIT.json per split) plus an images/ folder, which train reads. The output folder, the columns of every "
        "split and, for a Hub dataset, its metadata are checked before anything is downloaded or written."
    )
    convert_p.add_argument(
        "source",
        help="A folder written by save_to_disk, a .json/.jsonl/.parquet/.csv/.arrow file, a folder of such files "
        "(or of images with metadata.jsonl), or a Hugging Face Hub dataset name.",
    )
    convert_p.add_argument("out_dir", help="Output folder for SPLIT.json and images/ (empty, unless --overwrite).")
    convert_p.add_argument("--split", default=None, help="Convert only this split; for a single file: its split name "
                           "(default: all splits; train for a single file).")  # fmt: skip
    convert_p.add_argument("--config_name", default=None, help="Configuration (subset) of a Hub dataset.")
    convert_p.add_argument("--task", choices=["auto", "vqa", "caption"], default="auto",
                           help="vqa, caption, or auto: vqa when there is a question column.")  # fmt: skip
    convert_p.add_argument("--image_column", default=None, help="Image column; default: the one datasets.Image "
                           "column, else image/images/image_path/file_name (paths).")  # fmt: skip
    convert_p.add_argument("--question_column", default=None, help="VQA question column; default: question/query.")
    convert_p.add_argument("--answers_column", default=None, help="VQA answers column (strings, or dicts with "
                           "'answer'); default: answers/answer.")  # fmt: skip
    convert_p.add_argument("--caption_column", default=None, help="Caption(s) column; default: captions/caption/"
                           "caption_str/sentences/text.")  # fmt: skip
    convert_p.add_argument("--id_column", default=None, help="Column of unique ids; default: question_id/id (VQA), "
                           "id/image_id (captions), else SPLIT-ROW; '' for SPLIT-ROW.")  # fmt: skip
    convert_p.add_argument("--prompt", default=None, help="Human turn with {question} and one <image> (a \\n in it "
                           "is a newline); default: LLaVA-1.5's short-answer VQA prompt, or its one-sentence caption "
                           "prompt.")  # fmt: skip
    convert_p.add_argument("--one_record_per", choices=["image", "caption"], default="image",
                           help="Captions: one record per image (trained on the first caption) or one per caption; "
                           "all captions are the references either way.")  # fmt: skip
    convert_p.add_argument("--image_folder", default=None, help="Folder that relative image paths resolve against; "
                           "default: the folder of a local source.")  # fmt: skip
    convert_p.add_argument("--allow_external_images", type=bool, default=False,
                           help="Accept image paths outside the image folder (trusted data only).")  # fmt: skip
    convert_p.add_argument("--on_bad_sample", choices=["raise", "skip"], default="raise",
                           help="raise: stop at a bad row; skip: log, count and skip it.")  # fmt: skip
    convert_p.add_argument("--overwrite", action="store_true", help="Write into a non-empty OUT_DIR.")
    commands.add_subcommand("convert", convert_p, help="convert a VQA or caption dataset to LLaVA JSON + images")
    launch_p = parser(
        "Write an accelerate launch configuration for several GPUs or machines (docs/multi_gpu.md): ddp (each GPU "
        "holds the whole model), fsdp (FSDP2: weights sharded), zero2 / zero3 (DeepSpeed). Then run, on every "
        "machine: accelerate launch --config_file FILE train.py (or -m llava_loop train ...)."
    )
    launch_p.add_argument("engine", choices=["ddp", "fsdp", "zero2", "zero3"], help="How the GPUs share the model.")
    launch_p.add_argument("--num_processes", type=int, default=1, help="GPUs of all machines together.")
    launch_p.add_argument("--num_machines", type=int, default=1, help="Machines; each runs accelerate launch.")
    launch_p.add_argument("--machine_rank", type=int, default=0, help="This machine's rank (0: the main one).")
    launch_p.add_argument("--main_process_ip", default=None, help="Address of machine 0 (several machines).")
    launch_p.add_argument("--main_process_port", type=int, default=29500, help="A free port on machine 0.")
    launch_p.add_argument("--out", default=None, help="YAML file to write; default: print it.")
    commands.add_subcommand("launch-config", launch_p, help="write an accelerate config: DDP, FSDP, DeepSpeed ZeRO")
    root.command_parsers = {"demo": demo_p, "train": train_p, "plot": plot_p, "export": export_p, "convert": convert_p,
                            "estimate": estimate_p, "launch-config": launch_p}  # fmt: skip
    return root


# ---------------------------------------------------------------------- commands


def _demo_config(args: Any):
    from .config import LoopConfig

    return LoopConfig(
        output_dir=args.output_dir,
        max_steps=args.steps,
        batch_size=16,
        eval_batch_size=64,
        learning_rate=5e-3,
        warmup_ratio=0.05,
        lora_r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        eval_steps=max(args.steps // 4, 1),
        eval_before_training=True,
        save_steps=0,
        save_total_limit=2,
        metric_for_best="eval/exact_match",
        log_steps=max(args.steps // 40, 1),
        max_new_tokens=4,
        seed=args.seed,
        precision="fp32",
        overwrite_output_dir=True,  # the demo is reproducible: running it again replaces its output
    )


def _per_kind(path: str) -> dict[str, float]:
    """Exact match per question kind from a predictions file."""
    from .testing import QUESTIONS

    kinds = {q: k for k, q in QUESTIONS.items()}
    hits: dict[str, list[float]] = defaultdict(list)
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            kind = next((k for q, k in kinds.items() if q in row["prompt"]), "other")
            hits[kind].append(row["scores"]["exact_match"])
    return {k: sum(v) / len(v) for k, v in sorted(hits.items())}


def demo(args: Any) -> dict:
    """Train the tiny offline LLaVA on a synthetic visual QA task and show it learned."""
    import torch

    from .loop import Loop
    from .testing import synthetic_vqa, tiny_llava

    # The toy model's matrices are too small for intra-op threads to pay off: extra threads only
    # add synchronisation, and on a busy machine they make each step several times slower.
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    model, processor = tiny_llava(seed=args.seed)
    train = synthetic_vqa(args.train_samples, seed=args.seed)
    held_out = synthetic_vqa(args.eval_samples, seed=args.seed + 1000)
    loop = Loop(model, processor, _demo_config(args), metrics="exact_match")
    loop.fit(train, held_out)
    before = loop.state.history[0]
    before_kinds = _per_kind(os.path.join(args.output_dir, "predictions", "step_000000.jsonl"))
    after = loop.state.history[-1]
    after_kinds = _per_kind(os.path.join(args.output_dir, "predictions", f"step_{loop.state.step:06d}.jsonl"))
    elapsed = time.perf_counter() - t0
    lines = [
        "",
        f"held-out exact match ({int(after['eval/samples'])} images never seen in training)",
        f"{'question':<10} {'before':>7} {'after':>7}",
        *(f"{k:<10} {before_kinds.get(k, 0):>7.2f} {after_kinds.get(k, 0):>7.2f}" for k in after_kinds),
        f"{'all':<10} {before['eval/exact_match']:>7.2f} {after['eval/exact_match']:>7.2f}",
        f"eval loss  {before['eval/loss']:>7.3f} {after['eval/loss']:>7.3f}",
        "",
        (f"{loop.state.step} steps in {elapsed:.0f} s; outputs in {args.output_dir}/ (checkpoints/, "
         "metrics.jsonl, summary.json, predictions/ (JSONL and HTML pages), curves.png)"),
    ]  # fmt: skip
    print("\n".join(lines))
    return {"before": before, "after": after, "seconds": elapsed, "steps": loop.state.step}


class _SaveRunConfig:
    """Writes the whole run's configuration (the CLI's YAML) to ``{output_dir}/run.yaml`` once the run owns
    its output_dir (a refused run must not overwrite another run's file)."""

    def __init__(self, text: str):
        self.text = text

    def on_fit_start(self, loop: Any) -> None:
        from .checkpointing import atomic_write_text

        if loop.accelerator.is_main_process:
            atomic_write_text(os.path.join(loop.config.output_dir, "run.yaml"), self.text)


def loop_config(args: Any) -> Any:
    """The `LoopConfig` of a parsed ``train`` namespace (its top-level keys; validated)."""
    from .config import LoopConfig

    return LoopConfig.from_dict({name: args[name] for name in LoopConfig.field_docs()})


def train(args: Any, parser: Any = None) -> None:
    """Check every setting, then load the model and fit. ``args`` is the parsed ``train`` namespace."""
    from . import checkpointing, rundir
    from .data import as_dataset
    from .loop import Loop
    from .metrics import check_metrics, resolve_metrics
    from .modeling import check_model_args, load_model
    from .trackers import check_trackers

    config = loop_config(args)
    model, data = args.model, args.data
    # Cheapest first; nothing here reads weights.
    check_model_args(model.name, dtype=model.dtype, quantization=config.quantization)
    config.check_eval_data(data.eval is not None)
    metrics = resolve_metrics(args.metrics)
    check_metrics(metrics, config.metric_for_best, config.eval_loss)
    check_trackers(config.report_to, config.tracker_init_kwargs)
    checkpointing.check_output_dir(config.output_dir)
    rundir.RunLock.acquire(config.output_dir).release()  # another live run in it is an error now
    rundir.resolve_resume(config.output_dir, config.resume_from, config.overwrite_output_dir)
    options = {"on_bad_sample": config.on_bad_sample, "allow_external_images": config.allow_external_images}
    train_data = as_dataset(data.train, data.image_folder, **options)
    eval_data = None
    if data.eval is not None:
        eval_data = as_dataset(data.eval, data.eval_image_folder or data.image_folder, **options)
    logger.info("settings, data and metrics checked; loading %s", model.name)

    net, processor = load_model(
        model.name,
        dtype=model.dtype,
        quantization=config.quantization,
        device_map=model.device_map,
        max_memory=_device_keys(model.max_memory),
        offload_folder=model.offload_folder,
        attn_implementation=model.attn_implementation,
        min_pixels=model.min_pixels,
        max_pixels=model.max_pixels,
    )
    callbacks = [_SaveRunConfig(parser.dump(args, skip_none=False))] if parser is not None else []
    Loop(net, processor, config, metrics=metrics, callbacks=callbacks).fit(train_data, eval_data)


def plot(args: Any) -> None:
    from .plots import plot_run

    print(f"wrote {plot_run(args.run_dir, args.out)}")


def export_cmd(args: Any) -> None:
    from .checkpointing import export

    out = export(
        args.checkpoint, args.out_dir, base_model=args.base_model, overwrite=args.overwrite, quantize=args.quantize
    )
    print(f"merged model{'' if args.quantize == 'none' else ' (' + args.quantize + ')'} written to {out}")


def estimate(args: Any) -> None:
    """Print the memory estimate of a run; ``args`` is the parsed ``estimate`` namespace."""
    import dataclasses

    from .planner import estimate_memory

    result = estimate_memory(
        args.model.name,
        loop_config(args),
        seq_len=args.seq_len,
        label_tokens=args.label_tokens,
        eval_prompt_len=args.eval_prompt_len,
        num_processes=args.num_processes,
        sharding=args.sharding,
    )
    print(json.dumps(dataclasses.asdict(result), indent=1) if args.json else result.table())


def launch_config_cmd(args: Any) -> None:
    """Write (or print) an accelerate launch config; ``args`` is the parsed ``launch-config`` namespace."""
    from .distributed import launch_config

    text = launch_config(
        args.engine,
        num_processes=args.num_processes,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        main_process_ip=args.main_process_ip,
        main_process_port=args.main_process_port,
    )
    if args.out is None:
        print(text, end="")
        return
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {args.out}; on every machine run: accelerate launch --config_file {args.out} train.py")


def convert(args: Any) -> None:
    """Convert a VQA/caption dataset to LLaVA JSON; ``args`` is the parsed ``convert`` namespace."""
    from .hf_datasets import convert_source

    options = ("task", "image_column", "question_column", "answers_column", "caption_column", "id_column", "prompt",
               "one_record_per", "allow_external_images", "on_bad_sample")  # fmt: skip
    if args.prompt is not None:
        args.prompt = args.prompt.replace("\\n", "\n")  # typed in a shell, \n is two characters
    paths = convert_source(
        args.source,
        args.out_dir,
        split=args.split,
        config_name=args.config_name,
        image_folder=args.image_folder,
        overwrite=args.overwrite,
        **{name: args[name] for name in options},
    )
    for split, path in paths.items():
        print(f"{split}: {path}")
    train = paths.get("train", path)
    print(f"images in {os.path.join(args.out_dir, 'images')}; train with: llava-loop train --data.train {train} ...")


# ---------------------------------------------------------------------- entry point


def _parse_error(parser: Any, argv: list[str], err: Exception) -> str:
    """jsonargparse's message, plus the flag meant when an unknown one is close to a real one."""
    message = str(err).strip()
    command = next((a for a in argv if a in parser.command_parsers), None)
    sub = parser.command_parsers.get(command)
    if "unrecognized arguments" in message and sub is not None:
        known = [s for action in sub._actions for s in action.option_strings]
        hints = []
        for arg in argv:
            flag = arg.split("=", 1)[0]
            if flag.startswith("--") and flag not in known:
                close = difflib.get_close_matches("--" + flag[2:].replace("-", "_"), known, n=1)
                if close:
                    hints.append(f"{flag} -> {close[0]}")
        if hints:
            message += f" (did you mean: {', '.join(hints)}? Flags are the field names, with underscores)"
    return message


def main(argv: list[str] | None = None) -> int:
    """Run ``llava-loop``; returns the exit status (2 for a user error, with one message)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "accelerate", "transformers", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    parser = build_parser()
    debug = "--debug" in argv
    try:
        args = parser.parse_args(argv)
    except Exception as err:  # jsonargparse reports every parse/type error as an exception here
        if debug:
            raise
        command = next((a for a in argv if a in parser.command_parsers), "")
        where = f"llava-loop {command}".strip()
        print(f"{where}: error: {_parse_error(parser, argv, err)}\n(see {where} --help)", file=sys.stderr)
        return 2
    from .rundir import RunDirError

    sub = args[args.command]
    commands = {"demo": demo, "train": lambda a: train(a, parser.command_parsers["train"]),
                "plot": plot, "export": export_cmd, "convert": convert, "estimate": estimate,
                "launch-config": launch_config_cmd}  # fmt: skip
    try:
        commands[args.command](sub)
    except (*USER_ERRORS, RunDirError) as err:
        if debug:
            raise
        print(f"llava-loop {args.command}: error: {err}\n(run again with --debug for the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
