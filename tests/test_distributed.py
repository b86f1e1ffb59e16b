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


# ---------------------------------------------------------------- launcher checks
_LAUNCHED = """
import json, sys
from llava_loop.distributed import make_accelerator

accelerator = make_accelerator("fp32", sys.argv[1])
print(json.dumps({"num_processes": accelerator.num_processes}))
"""


def _accelerate_launch(tmp_path, config: str, *flags: str):
    """Run a script that makes the loop's Accelerator under the real ``accelerate launch`` command."""
    import subprocess
    import sys
    from pathlib import Path

    from helpers import child_env

    (tmp_path / "launched.py").write_text(_LAUNCHED)
    (tmp_path / "accelerate.yaml").write_text(config)
    accelerate = Path(sys.executable).with_name("accelerate")  # the console script pip installed beside python
    command = [str(accelerate), "launch", "--config_file", str(tmp_path / "accelerate.yaml"), *flags]
    command += [str(tmp_path / "launched.py"), str(tmp_path)]
    env = child_env(HF_HOME=str(tmp_path / "hf"))  # no default accelerate config of the machine's
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)


_CPU_CONFIG = 'compute_environment: LOCAL_MACHINE\ndistributed_type: "NO"\nuse_cpu: true\nmixed_precision: "no"\n'


def test_accelerate_launch_configured_for_two_cpu_processes_that_starts_one_is_refused(tmp_path):
    # accelerate launch runs ONE process for `use_cpu: true, num_processes: 2` and says nothing.
    result = _accelerate_launch(tmp_path, _CPU_CONFIG + "num_processes: 2\n")
    assert result.returncode != 0, f"a 2-process config that started 1 process ran:\n{result.stdout}"
    message = result.stderr
    assert "asked for 2 processes" in message and "but 1 started" in message, f"unclear error:\n{message}"
    assert "accelerate.yaml" in message and "torchrun --nproc_per_node 2" in message, (
        f"the error names neither the config file nor the launch that works:\n{message}"
    )


def test_accelerate_launch_flag_wins_over_config_file_like_accelerate(tmp_path):
    asked = _accelerate_launch(tmp_path, _CPU_CONFIG + "num_processes: 1\n", "--num_processes", "2")
    assert asked.returncode != 0 and "asked for 2 processes (--num_processes)" in asked.stderr, asked.stderr
    single = _accelerate_launch(tmp_path, _CPU_CONFIG + "num_processes: 2\n", "--num_processes", "1")
    assert single.returncode == 0, f"--num_processes 1 (one process, as asked) was refused:\n{single.stderr}"
    assert json.loads(single.stdout.strip().splitlines()[-1]) == {"num_processes": 1}, single.stdout


def test_launch_command_lines_are_recognised():
    from llava_loop.distributed import _accelerate_launch_args

    script = ["train.py", "--lr", "1"]
    assert _accelerate_launch_args(["/v/bin/python", "/v/bin/accelerate", "launch", "-m", *script]) == ["-m", *script]
    assert _accelerate_launch_args(["python", "-m", "accelerate.commands.launch", *script]) == script
    assert _accelerate_launch_args(["/v/bin/accelerate-launch", *script]) == script
    assert _accelerate_launch_args(["/v/bin/accelerate", "config"]) is None, "`accelerate config` is no launch"
    assert _accelerate_launch_args(["torchrun", "--nproc_per_node", "2", *script]) is None
