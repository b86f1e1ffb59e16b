"""Size on disk and decode speed of the merged llava-1.5-7b-shaped model exported in bf16, nf4, int8 and
int4-weight-only (issue 13), in one process on one GPU.

The bf16 folder is the model as `llava-loop export` writes it (random weights of the real shape, saved
with `save_pretrained`); each quantized folder is made from a copy of it by the export's own quantizer
(`checkpointing._quantize_saved`, what `export(..., quantize=...)` runs after merging). Each folder is then
loaded with plain ``AutoModelForImageTextToText.from_pretrained`` onto the GPU and decodes batch 1: one
image + prompt, greedy, exactly 256 new tokens (``min_new_tokens=256``), KV cache on (the default dynamic
cache, the same for every format), after a 16-token warm-up generation; CUDA-synchronized wall time.

    PYTHONPATH=. python benchmarks/bench_quant.py --tiny          # CPU smoke test (nf4, int8; bf16)
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
import traceback
from pathlib import Path

import torch
from bench_llava import CUDA, build_model, common_arguments, free_memory, new_results, sync

from llava_loop.checkpointing import _quantize_saved
from llava_loop.testing import llava15_processor

FORMATS = ("bf16", "nf4", "int8", "int4-weight-only")


def folder_gb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e9


def decode(folder: Path, processor, new_tokens: int) -> dict:
    from PIL import Image
    from transformers import AutoModelForImageTextToText

    t0 = time.perf_counter()
    model = AutoModelForImageTextToText.from_pretrained(folder, device_map={"": 0} if CUDA else {"": "cpu"})
    sync()
    load_s = time.perf_counter() - t0
    image = Image.new("RGB", (640, 480), (120, 30, 200))
    messages = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Describe it."}]}
    ]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt").to(model.device)  # fmt: skip
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype if model.dtype.is_floating_point else torch.bfloat16)
    settings = {"do_sample": False, "use_cache": True, "pad_token_id": processor.tokenizer.pad_token_id}
    model.generate(**inputs, max_new_tokens=16, min_new_tokens=16, **settings)  # warm-up
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    sync()
    t0 = time.perf_counter()
    out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **settings)
    sync()
    seconds = time.perf_counter() - t0
    made = out.shape[1] - inputs["input_ids"].shape[1]
    result = {
        "load_s": load_s,
        "new_tokens": int(made),
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "decode_s": seconds,
        "tokens_per_s": made / seconds,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if CUDA else 0.0,
        "weight_types": sorted({type(p).__name__ for p in model.parameters()}),
    }
    del model
    free_memory()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_arguments(parser, "/tmp/quant_bench")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--budget", type=float, default=330.0, help="seconds: no format starts after this")
    args = parser.parse_args()
    start = time.perf_counter()
    out, results = new_results(args, ("tiny", "formats", "new_tokens"))
    results["formats"], results["errors"] = {}, {}
    processor = llava15_processor(args.tokenizer)
    work = Path(args.workdir)
    bf16 = work / "bf16"
    if not (bf16 / "config.json").is_file():
        t0 = time.perf_counter()
        model = build_model(args.tiny).to(torch.bfloat16)
        model.save_pretrained(bf16)
        processor.save_pretrained(bf16)
        del model
        free_memory()
        results["save_bf16_s"] = time.perf_counter() - t0
    for fmt in args.formats.split(","):
        if time.perf_counter() - start > args.budget:
            results["errors"][fmt] = "skipped: budget"
            continue
        print(f"=== {fmt} ({time.perf_counter() - start:.0f} s)", flush=True)
        try:
            folder = bf16 if fmt == "bf16" else work / fmt
            record: dict = {}
            if fmt != "bf16" and not (work / fmt / "config.json").is_file():
                folder = work / fmt
                shutil.rmtree(folder, ignore_errors=True)
                shutil.copytree(bf16, folder)
                t0 = time.perf_counter()
                _quantize_saved(folder, fmt)
                record["quantize_s"] = time.perf_counter() - t0
                free_memory()
            record["size_gb"] = folder_gb(folder)
            record["files"] = sorted(p.name for p in folder.iterdir())
            record.update(decode(folder, processor, 8 if args.tiny else args.new_tokens))
            results["formats"][fmt if fmt not in results["formats"] else f"{fmt} (again)"] = record
            print(json.dumps(record), flush=True)

        except Exception:  # noqa: BLE001 - the other formats still run
            results["errors"][fmt] = traceback.format_exc()
            print(results["errors"][fmt], flush=True)
        (out / "results_quant.json").write_text(json.dumps(results, indent=1))
    results["total_s"] = time.perf_counter() - start
    (out / "results_quant.json").write_text(json.dumps(results, indent=1))
    bf = results["formats"].get("bf16", {})
    print("| format | size GB | decode tokens/s (batch 1, 256 new) | vs bf16 | peak GiB |")
    print("|---|---|---|---|---|")
    for fmt, r in results["formats"].items():
        ratio = r["tokens_per_s"] / bf["tokens_per_s"] if bf else float("nan")
        print(f"| {fmt} | {r['size_gb']:.2f} | {r['tokens_per_s']:.1f} | {ratio:.2f}x | {r['peak_mem_gib']:.2f} |")


if __name__ == "__main__":
    main()
