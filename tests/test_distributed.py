"""Two real gloo processes on the CPU (tests/helpers.launch_two_processes): DDP training matches one process."""

import json

import torch

from helpers import launch_two_processes
from llava_loop import Loop, LoopConfig
from llava_loop.testing import synthetic_vqa, tiny_llava

ANSWERS = [
    "red",
    "a big blue circle",
    "left",
    "it is a small green square on the right side",
    "no",
    "yellow triangle",
    "three shapes",
    "square",
]


def _records():
    records = synthetic_vqa(len(ANSWERS), seed=3)
    for record, answer in zip(records, ANSWERS):
        record["conversations"][1]["value"] = answer
        record["answers"] = [answer]
    return records


class SGDLoop(Loop):
    """Plain SGD: unlike Adam, its update scales with the gradient, so a wrong loss scale shows."""

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.model.parameters() if p.requires_grad], lr=0.5)


def _fit(batch_size: int, output_dir: str) -> Loop:
    model, processor = tiny_llava(seed=0)
    loop = SGDLoop(model, processor, _config(output_dir, batch_size))
    loop.fit(_records())
    return loop


def _config(output_dir: str, batch_size: int) -> LoopConfig:
    return LoopConfig(
        output_dir=output_dir,
        max_steps=2,
        batch_size=batch_size,
        shuffle=False,
        lora_dropout=0.0,
        precision="fp32",
        log_steps=1,
        learning_rate=1e-2,
        warmup_ratio=0.0,
        lr_scheduler="constant",
        handle_signals=False,
        max_grad_norm=0.0,
    )  # clipping would hide a wrong loss scale


def _trainable(loop) -> dict:
    model = loop.accelerator.unwrap_model(loop.model)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _train_two_processes(output_dir: str) -> None:
    loop = _fit(2, output_dir)
    if loop.accelerator.is_main_process:
        torch.save(_trainable(loop), f"{output_dir}/weights.pt")


def _losses(output_dir) -> list[float]:
    with open(f"{output_dir}/metrics.jsonl") as f:
        return [r["train/loss"] for r in map(json.loads, f) if "train/loss" in r]


def test_ddp_two_processes_match_one_process_with_double_batch(tmp_path):
    ddp_dir, single_dir = tmp_path / "ddp", tmp_path / "single"
    ddp_dir.mkdir()
    launch_two_processes(_train_two_processes, args=(str(ddp_dir),))

    single = _fit(4, str(single_dir))

    ddp_weights = torch.load(ddp_dir / "weights.pt")
    single_weights = _trainable(single)
    assert ddp_weights.keys() == single_weights.keys(), "DDP and single runs train different parameters"
    for name, value in single_weights.items():
        assert torch.allclose(ddp_weights[name], value, atol=1e-5), (
            f"{name}: 2 processes x batch 2 differ from 1 process x batch 4 "
            f"(max diff {(ddp_weights[name] - value).abs().max():.2e}); token normalisation across ranks is wrong"
        )
    ddp_losses, single_losses = _losses(ddp_dir), _losses(single_dir)
    assert len(ddp_losses) == 2, f"expected one log record per step on the main process, got {ddp_losses}"
    assert torch.allclose(torch.tensor(ddp_losses), torch.tensor(single_losses), atol=1e-5), (
        f"logged losses differ: DDP {ddp_losses} vs single {single_losses}"
    )
    assert (ddp_dir / "checkpoints" / "step_000002" / "meta.json").is_file(), "DDP run wrote no final checkpoint"
