"""Two real gloo processes on the CPU (tests/helpers.launch_two_processes): DDP training matches one process."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from helpers import deepspeed_on_cpu, fsdp_on_cpu, launch_two_processes
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


def _config(output_dir: str, batch_size: int, max_steps: int = 2, **settings) -> LoopConfig:
    """Unshuffled, fp32, no dropout, no warm-up, and no clipping (it would hide a wrong loss scale)."""
    base = dict(
        output_dir=output_dir, max_steps=max_steps, batch_size=batch_size, shuffle=False, lora_dropout=0.0,
        precision="fp32", log_steps=1, warmup_ratio=0.0, lr_scheduler="constant", handle_signals=False,
        max_grad_norm=0.0,
    )  # fmt: skip
    return LoopConfig(**{**base, **settings})


def _trainable(loop) -> dict:
    model = loop.accelerator.unwrap_model(loop.model)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


class UnwrappedForwardLoop(SGDLoop):
    """A training_step that forwards with the unwrapped model: DDP would not synchronise its gradients."""

    def training_step(self, batch):
        return self.compute_loss(self._forward(self.model, batch), batch)


def _train_two_processes(output_dir: str) -> None:
    loop = _fit(2, output_dir)
    if loop.accelerator.is_main_process:
        torch.save(_trainable(loop), f"{output_dir}/weights.pt")
        types = {"model": type(loop.model).__name__, "model_wrapped": type(loop.model_wrapped).__name__}
        (Path(output_dir) / "types.json").write_text(json.dumps(types))
    model, processor = tiny_llava(seed=0)
    try:
        UnwrappedForwardLoop(model, processor, _config(f"{output_dir}/unwrapped", 2)).fit(_records())
    except RuntimeError as err:
        (Path(output_dir) / f"unwrapped_{loop.accelerator.process_index}.txt").write_text(str(err))


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
    types = json.loads((ddp_dir / "types.json").read_text())
    assert types == {"model": "PeftModel", "model_wrapped": "DistributedDataParallel"}, (
        f"after a DDP fit, loop.model must be the unwrapped (peft) model and loop.model_wrapped the DDP wrapper: {types}"
    )
    for rank in (0, 1):
        refused = ddp_dir / f"unwrapped_{rank}.txt"
        assert refused.is_file(), f"a training_step forwarding without the DDP wrapper trained on process {rank}"
        assert "self.model_wrapped" in refused.read_text(), f"unclear refusal: {refused.read_text()}"


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


# ---------------------------------------------------------------- FSDP2 and DeepSpeed ZeRO-2/3
# Two gloo processes on the CPU through accelerate's own FSDP2 and DeepSpeed paths (tests/helpers.fsdp_on_cpu,
# deepspeed_on_cpu: accelerate enables them only for GPUs).
ENGINES = {"fsdp": fsdp_on_cpu, "zero2": lambda: deepspeed_on_cpu(2), "zero3": lambda: deepspeed_on_cpu(3)}


class MomentumLoop(Loop):
    """SGD with momentum: its update scales with the gradient (a wrong loss scale shows, which Adam's
    would hide), and its state (the momentum buffers) must survive the gathering and re-sharding of
    checkpoints."""

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.model.parameters() if p.requires_grad], lr=0.2, momentum=0.9)


def _engine_config(output_dir: str, batch_size: int, max_steps: int, **settings) -> LoopConfig:
    """`_config` with (non-reentrant) gradient checkpointing, an evaluation (eval batch 2) and a checkpoint at
    step 2."""
    every = dict(gradient_checkpointing=True, eval_steps=2, save_steps=2, eval_batch_size=2)
    return _config(output_dir, batch_size, max_steps, **every, **settings)


def _eval_records():
    return synthetic_vqa(5, seed=1)  # 5 samples, eval batch 2: 3 batches, so the processes run 2 and 1(+1 repeat)


def _engine_fit(output_dir: str, batch_size: int, max_steps: int, **settings) -> Loop:
    model, processor = tiny_llava(seed=0)
    loop = MomentumLoop(model, processor, _engine_config(output_dir, batch_size, max_steps, **settings))
    loop.fit(_records(), eval_data=_eval_records())
    return loop


def _engine_two_processes(name: str, fresh_dir: str, resumed_dir: str) -> None:
    from torch.distributed.tensor import DTensor

    ENGINES[name]()
    loop = _engine_fit(fresh_dir, 1, 2, grad_accum_steps=2)  # 2 micro-batches a step: no sync / DeepSpeed's boundary
    params = list(loop.model.named_parameters())
    sharded = [n for n, p in params if isinstance(p, DTensor) or hasattr(p, "ds_tensor")]  # ZeRO-3: its partition
    if loop.accelerator.is_main_process:
        facts = {"engine": loop.engine, "model": type(loop.model).__name__, "sharded": len(sharded)}
        facts["distributed_type"] = loop.accelerator.distributed_type.value
        facts["deepspeed_steps"] = getattr(loop.model_wrapped, "global_steps", None)
        if name == "fsdp":
            from transformers.distributed.fsdp import is_fsdp_managed_module

            facts["layers"] = loop.accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap
            facts["generate_syncs"] = is_fsdp_managed_module(loop.model.get_base_model())
        (Path(fresh_dir) / "facts.json").write_text(json.dumps(facts))
    if name == "zero3":  # accelerate told transformers to create every later model partitioned (zero.Init)
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    _engine_fit(resumed_dir, 2, 4, resume_from="latest")  # a 1-process checkpoint, continued by 2 processes


def _adapter(checkpoint: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(checkpoint / "model" / "adapter_model.safetensors"))


def _assert_close(got: dict, expected: dict, what: str, atol: float = 1e-5) -> None:
    assert got.keys() == expected.keys(), f"{what}: other tensors ({sorted(set(got) ^ set(expected))[:3]})"
    for name, value in expected.items():
        assert got[name].shape == value.shape, f"{what}: {name} has shape {got[name].shape}, not {value.shape}"
        diff = (got[name].float() - value.float()).abs().max().item()
        assert diff <= atol, f"{what}: {name} differs by {diff:.2e}"


def _predictions(output_dir: Path, step: int) -> list:
    with open(output_dir / "predictions" / f"step_{step:06d}.jsonl") as f:
        return [(r["id"], r["prediction"]) for r in map(json.loads, f)]


def _eval_loss(output_dir: Path, step: int) -> float:
    with open(output_dir / "metrics.jsonl") as f:
        return next(r["eval/loss"] for r in map(json.loads, f) if r["step"] == step and "eval/loss" in r)


def _optimizer_state(checkpoint: Path) -> dict:
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    return {f"{i}.{k}": v for i, entry in state["state"].items() for k, v in entry.items() if torch.is_tensor(v)}


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """The reference: one process x batch 4 for 4 steps, evaluated and saved at steps 2 and 4."""
    out = tmp_path_factory.mktemp("single") / "run"
    _engine_fit(str(out), 4, 4)
    return out


@pytest.fixture(scope="module", params=list(ENGINES))
def engine_runs(request, single_run, tmp_path_factory):
    """2 processes x batch 1 x 2 accumulated micro-batches for 2 steps under the engine, and the reference's
    step-2 checkpoint continued to step 4 by 2 processes (batch 2) under it."""
    root = tmp_path_factory.mktemp(request.param)
    resumed = root / "resumed"
    shutil.copytree(single_run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_000004")
    (resumed / "metrics.jsonl").unlink()
    launch_two_processes(_engine_two_processes, args=(request.param, str(root / "fresh"), str(resumed)))
    return request.param, root


def test_two_processes_accumulating_two_micro_batches_train_like_one_process_with_batch_4(engine_runs, single_run):
    name, root = engine_runs
    fresh = root / "fresh"
    facts = json.loads((fresh / "facts.json").read_text())
    assert facts["engine"] == ("fsdp" if name == "fsdp" else "deepspeed"), f"{name} did not run: {facts}"
    assert facts["model"] in ("FSDPPeftModel", "PeftModel"), f"loop.model should be the (sharded) peft model: {facts}"
    assert facts["distributed_type"] == ("FSDP" if name == "fsdp" else "DEEPSPEED"), f"accelerate ran {facts}"
    if name != "fsdp":
        assert facts["deepspeed_steps"] == 2, f"DeepSpeed's engine did not take the 2 steps: {facts}"
    if name == "fsdp":
        assert facts["generate_syncs"], "transformers' generate does not know the model is FSDP (synced_gpus)"
        assert facts["layers"] == ["CLIPEncoderLayer", "LlamaDecoderLayer"], (
            f"FSDP units should be the decoder and vision encoder layers, found without a hand-written list: {facts}"
        )
    if name != "zero2":
        assert facts["sharded"] > 0, f"{name}: no parameter is sharded"
    step2 = "checkpoints/step_000002"
    _assert_close(_adapter(fresh / step2), _adapter(single_run / step2), f"{name} 2 x 1 x 2 vs 1 x 4 trained adapters")
    _assert_close(
        _optimizer_state(fresh / step2), _optimizer_state(single_run / step2), f"{name}: momentum buffers saved"
    )
    assert _losses(fresh) == pytest.approx(_losses(single_run)[:2], abs=1e-5), f"{name}: logged step losses differ"
    # Generation eval: 3 batches over 2 processes (with sharded weights one repeats a batch so both run 2),
    # every sample scored once, the same answers and eval loss as one process.
    assert _predictions(fresh, 2) == _predictions(single_run, 2), f"{name}: evaluation predicted other answers"
    assert _eval_loss(fresh, 2) == pytest.approx(_eval_loss(single_run, 2), abs=1e-5), f"{name}: eval loss differs"


def test_two_processes_continue_a_one_process_checkpoint_exactly(engine_runs, single_run):
    name, root = engine_runs
    step4 = "checkpoints/step_000004"
    _assert_close(
        _adapter(root / "resumed" / step4), _adapter(single_run / step4), f"1-process checkpoint continued by {name}"
    )


def test_one_process_continues_a_two_process_checkpoint_exactly_with_fresh_rng_streams(
    engine_runs, single_run, tmp_path, caplog
):
    name, root = engine_runs
    out = tmp_path / "run"
    shutil.copytree(root / "fresh", out)
    with caplog.at_level("WARNING"):
        _engine_fit(str(out), 4, 4, resume_from="latest")
    step4 = "checkpoints/step_000004"
    _assert_close(_adapter(out / step4), _adapter(single_run / step4), f"{name} checkpoint continued by 1 process")
    assert "processes: 2 -> 1" in caplog.text and "seeded anew" in caplog.text, (
        f"a resume with another number of processes must say that the RNG streams are new:\n{caplog.text}"
    )


def test_a_sharded_checkpoint_is_data_planted_code_is_refused_not_run(engine_runs, tmp_path):
    from test_checkpointing import Payload, rehash

    name, root = engine_runs
    out = tmp_path / "run"
    shutil.copytree(root / "fresh", out)
    checkpoint = out / "checkpoints" / "step_000002"
    files = sorted(p.name for p in checkpoint.iterdir() if p.is_file())
    assert files == [
        "config.yaml", "meta.json", "optimizer.pt", "rng_state_0.safetensors", "rng_state_1.safetensors",
        "trainer_state.json",
    ], f"a {name} checkpoint holds other files than a one-process one (plus an RNG state per process): {files}"  # fmt: skip
    marker = tmp_path / "ran"
    torch.save({"state": {0: Payload(marker)}, "param_groups": []}, checkpoint / "optimizer.pt")
    rehash(checkpoint)
    with pytest.raises(Exception, match="run code") as err:
        _engine_fit(str(out), 4, 4, resume_from="latest")
    assert not marker.exists(), f"resuming a {name} checkpoint ran planted code"
    assert str(checkpoint) in str(err.value), f"the refusal does not name the checkpoint: {err.value}"


# ---------------------------------------------------------------- shipped launch configs
_PLUGINS = """
import json, os
from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin

out = {"fsdp": os.environ.get("ACCELERATE_USE_FSDP"), "deepspeed": os.environ.get("ACCELERATE_USE_DEEPSPEED")}
if out["fsdp"] == "true":
    plugin = FullyShardedDataParallelPlugin()
    out.update(version=plugin.fsdp_version, wrap=getattr(plugin.auto_wrap_policy, "__name__", None),
               classes=plugin.transformer_cls_names_to_wrap)
if out["deepspeed"] == "true":
    plugin = DeepSpeedPlugin()
    config = plugin.deepspeed_config
    out.update(stage=plugin.zero_stage, accumulation=config["gradient_accumulation_steps"],
               clipping=config.get("gradient_clipping", "auto"))
print(json.dumps(out))
"""


@pytest.mark.parametrize("name", ["ddp", "fsdp", "zero2", "zero3"])
def test_shipped_launch_configs_give_accelerate_the_engine_the_loop_expects(tmp_path, name, capsys):
    import subprocess
    import sys

    from helpers import child_env
    from llava_loop.cli import main

    config = tmp_path / f"{name}.yaml"
    assert main(["launch-config", name, "--num_processes", "1", "--out", str(config)]) == 0
    (tmp_path / "plugins.py").write_text(_PLUGINS)
    accelerate = Path(sys.executable).with_name("accelerate")
    result = subprocess.run(
        [str(accelerate), "launch", "--config_file", str(config), str(tmp_path / "plugins.py")],
        capture_output=True, text=True, timeout=120, env=child_env(HF_HOME=str(tmp_path / "hf")),
    )  # fmt: skip
    assert result.returncode == 0, f"accelerate launch refused the shipped {name} config:\n{result.stderr[-2000:]}"
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    expected = {
        "ddp": {"fsdp": None, "deepspeed": None},
        "fsdp": {
            "fsdp": "true",
            "deepspeed": None,
            "version": 2,
            "wrap": "transformer_auto_wrap_policy",
            "classes": None,
        },
        "zero2": {"fsdp": None, "deepspeed": "true", "stage": 2, "accumulation": 1, "clipping": "auto"},
        "zero3": {"fsdp": None, "deepspeed": "true", "stage": 3, "accumulation": 1, "clipping": "auto"},
    }[name]
    assert seen == expected, (
        f"the {name} config gives accelerate {seen}; the loop expects {expected} (FSDP2 with the loop choosing the "
        "layer classes; DeepSpeed with accumulation and clipping left to the loop)"
    )


def test_launch_config_for_several_machines_is_what_accelerate_reads_and_bad_numbers_are_refused(tmp_path):
    from accelerate.commands.config import load_config_from_file

    from llava_loop.distributed import launch_config

    path = tmp_path / "node1.yaml"
    path.write_text(launch_config("fsdp", num_processes=16, num_machines=2, machine_rank=1, main_process_ip="10.1.2.3"))
    read = load_config_from_file(str(path))
    got = (read.num_processes, read.num_machines, read.machine_rank, read.main_process_ip, read.main_process_port)
    assert got == (16, 2, 1, "10.1.2.3", 29500), f"accelerate reads other values than asked for: {got}"
    assert read.fsdp_config["fsdp_version"] == 2, read.fsdp_config
    for bad, message in [
        (dict(num_processes=3, num_machines=2), "give every machine as many processes"),
        (dict(num_processes=4, num_machines=2, machine_rank=2, main_process_ip="h"), "use 0 to 1"),
        (dict(num_processes=4, num_machines=2), "main_process_ip"),
    ]:
        with pytest.raises(ValueError, match=message):
            launch_config("ddp", **bad)
    with pytest.raises(ValueError, match="choose one of ddp, fsdp, zero2, zero3"):
        launch_config("zero1")


def test_another_number_of_processes_gets_fresh_rng_streams_one_per_process(single_run):
    import types

    from llava_loop.checkpointing import load_checkpoint, load_rng_state

    checkpoint = single_run / "checkpoints" / "step_000002"
    saved = load_rng_state(checkpoint / "rng_state_0.safetensors")
    assert torch.equal(load_checkpoint(checkpoint, 0, 1)["rng"]["torch"], saved["torch"]), "same count: not restored"
    for rank in (0, 1):
        assert load_checkpoint(checkpoint, rank, 2)["rng"] is None, (
            f"process {rank} of 2 was handed a saved stream of a 1-process run"
        )
    model, processor = tiny_llava(seed=0)
    loop = Loop(model, processor, _engine_config(str(single_run), 4, 4))
    streams = []
    for rank in (0, 1):
        loop.accelerator = types.SimpleNamespace(process_index=rank)
        streams.append(loop._fresh_rng(2)["torch"])
    assert not torch.equal(streams[0], streams[1]), "two processes got the same fresh RNG stream"
    assert not any(torch.equal(s, saved["torch"]) for s in streams), "a fresh stream is the saved one of process 0"


def test_a_sharded_run_exports_the_model_a_one_process_run_exports(engine_runs, single_run, tmp_path):
    from safetensors.torch import load_file

    from llava_loop.checkpointing import export

    name, root = engine_runs
    merged = {}
    for label, run in (("engine", root / "fresh"), ("single", single_run)):
        out = export(run / "checkpoints" / "step_000002", tmp_path / label, base_model=tiny_llava(seed=0)[0])
        merged[label] = {k: v for f in sorted(Path(out).glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    _assert_close(merged["engine"], merged["single"], f"model exported from the {name} checkpoint")
