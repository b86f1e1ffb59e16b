"""``llava-loop`` / ``python -m llava_loop``: ``demo``, ``train`` and ``export``.

Examples::

    llava-loop demo                                   # tiny offline model, learns on the CPU
    llava-loop train --model llava-hf/llava-1.5-7b-hf --train data.json --image-folder imgs \\
        --eval val.json --config run.yaml --learning-rate 1e-4
    llava-loop export out/checkpoints/step_000500 merged/
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections import defaultdict

logger = logging.getLogger("llava_loop")


def _demo_config(args: argparse.Namespace):
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


def plot_metrics(metrics_path: str, out_path: str) -> str:
    """Plot train loss and eval curves from ``metrics.jsonl`` into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .loggers import read_metrics

    train, evals = [], defaultdict(list)
    for rec in read_metrics(metrics_path):
        if "train/loss" in rec:
            train.append((rec["step"], rec["train/loss"]))
        for key in ("eval/loss", "eval/exact_match"):
            if key in rec:
                evals[key].append((rec["step"], rec[key]))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    if train:
        ax1.plot(*zip(*train), label="train/loss")
    if evals["eval/loss"]:
        ax1.plot(*zip(*evals["eval/loss"]), "o-", label="eval/loss")
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss")
    ax1.legend()
    if evals["eval/exact_match"]:
        ax2.plot(*zip(*evals["eval/exact_match"]), "o-", color="tab:green")
    ax2.set_xlabel("step")
    ax2.set_ylabel("held-out exact match")
    ax2.set_ylim(0, 1.05)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def demo(args: argparse.Namespace) -> dict:
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
    plot = plot_metrics(os.path.join(args.output_dir, "metrics.jsonl"), os.path.join(args.output_dir, "curves.png"))
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
         f"metrics.jsonl, predictions/, {os.path.basename(plot)})"),
    ]
    print("\n".join(lines))
    return {"before": before, "after": after, "seconds": elapsed, "steps": loop.state.step}


def train(args: argparse.Namespace) -> None:
    from .config import LoopConfig
    from .data import as_dataset
    from .loop import Loop
    from .modeling import load_model

    config = LoopConfig.from_args(args, base=LoopConfig.from_file(args.config) if args.config else None)
    model, processor = load_model(args.model, dtype=args.dtype, load_in_4bit=args.load_in_4bit,
                                  device_map=args.device_map)
    external = config.allow_external_images
    train_data = as_dataset(args.train, args.image_folder, on_bad_sample=config.on_bad_sample,
                            allow_external_images=external)
    eval_data = as_dataset(args.eval, args.eval_image_folder or args.image_folder,
                           on_bad_sample=config.on_bad_sample, allow_external_images=external) if args.eval else None
    Loop(model, processor, config, metrics=args.metrics).fit(train_data, eval_data)


def export_cmd(args: argparse.Namespace) -> None:
    from .checkpointing import export

    out = export(args.checkpoint, args.out_dir, base_model=args.base_model, overwrite=args.overwrite)
    print(f"merged model written to {out}")


def build_parser() -> argparse.ArgumentParser:
    from .config import LoopConfig

    parser = argparse.ArgumentParser(prog="llava-loop", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="train a tiny offline LLaVA on synthetic visual QA (CPU, < 3 min)")
    p.add_argument("--output-dir", default="demo_output")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps (batch 16)")
    p.add_argument("--train-samples", type=int, default=4096)
    p.add_argument("--eval-samples", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=demo)

    p = sub.add_parser("train", help="finetune a model on LLaVA-format data")
    p.add_argument("--model", required=True, help="Hub name or local folder, e.g. llava-hf/llava-1.5-7b-hf")
    p.add_argument("--train", required=True, help="LLaVA JSON/JSONL (or HF messages-style) file")
    p.add_argument("--image-folder", default=None)
    p.add_argument("--eval", default=None, help="eval JSON/JSONL file")
    p.add_argument("--eval-image-folder", default=None)
    p.add_argument("--config", default=None, help="YAML/JSON LoopConfig; flags below override it")
    p.add_argument("--metrics", nargs="+", default=["exact_match"], help="built-in metric names")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--load-in-4bit", action="store_true", help="QLoRA (needs bitsandbytes and a GPU)")
    p.add_argument("--device-map", default=None, help='"auto" to spread one model over GPUs')
    LoopConfig.add_arguments(p)
    p.set_defaults(func=train)

    p = sub.add_parser("export", help="merge a checkpoint's LoRA into its base model")
    p.add_argument("checkpoint")
    p.add_argument("out_dir")
    p.add_argument("--base-model", default=None, help="default: the base model recorded in the checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    p.set_defaults(func=export_cmd)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "accelerate", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
