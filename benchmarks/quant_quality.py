"""Quality proxy of quantized export (issue 13), on the CPU: the tiny LLaVA trained on the demo's synthetic
visual QA task (`llava-loop demo`), exported with each ``--quantize`` mode that runs on the CPU, each export
loaded with plain ``from_pretrained`` and evaluated on the same held-out samples (exact match).

    PYTHONPATH=. python benchmarks/quant_quality.py --out benchmarks/results/i13_quant_quality.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from llava_loop import Loop, LoopConfig
from llava_loop.checkpointing import export, list_checkpoints
from llava_loop.cli import main as cli
from llava_loop.testing import synthetic_vqa, tiny_llava

MODES = ("none", "nf4", "int8")  # int4-weight-only needs a CUDA GPU (torchao's tinygemm kernel)


def evaluate(folder: Path, processor, records, work: Path) -> dict:
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(folder)
    cfg = LoopConfig(output_dir=str(work / "eval"), eval_batch_size=64, max_new_tokens=4, precision="fp32")
    result = Loop(model, processor, cfg, metrics="exact_match").evaluate(records)
    return {"exact_match": result["eval/exact_match"], "eval_loss": result.get("eval/loss")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="quant_quality.json")
    parser.add_argument("--steps", type=int, default=600)
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="quant_quality_"))
    t0 = time.perf_counter()
    # The demo's run: tiny LLaVA (seed 0), 4,096 synthetic samples, LoRA r16, 600 steps.
    assert cli(["demo", "--output_dir", str(work / "demo"), "--steps", str(args.steps)]) == 0
    base = work / "base"
    model, processor = tiny_llava(seed=0)
    model.save_pretrained(base)
    processor.save_pretrained(base)
    checkpoint = list_checkpoints(work / "demo")[-1]
    held_out = synthetic_vqa(128, seed=1000)  # the demo's held-out set
    results = {
        "command": "PYTHONPATH=. python benchmarks/quant_quality.py --out " + args.out,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "checkpoint": checkpoint.name,
        "train_s": time.perf_counter() - t0,
        "modes": {},
    }
    for mode in MODES:
        folder = export(checkpoint, work / mode, base_model=str(base), quantize=mode)
        size = sum(f.stat().st_size for f in folder.rglob("*.safetensors"))
        results["modes"][mode] = {"weights_bytes": size, **evaluate(folder, processor, held_out, work)}
        print(mode, results["modes"][mode], flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print("| export | weights (bytes) | held-out exact match | eval loss |")
    print("|---|---|---|---|")
    for mode, r in results["modes"].items():
        print(f"| {mode} | {r['weights_bytes']:,} | {r['exact_match']:.3f} | {r['eval_loss']:.4f} |")


if __name__ == "__main__":
    main()
