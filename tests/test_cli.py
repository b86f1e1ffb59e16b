"""End-to-end runs of the ``llava-loop`` command line: the demo learns, ``train`` finetunes a saved
model folder from LLaVA JSON + PNG files, ``export`` merges the resulting checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from helpers import child_env
from llava_loop.cli import build_parser, loop_config, main
from llava_loop.testing import synthetic_vqa, tiny_llava

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # the demo sets one thread for itself


@pytest.mark.slow
def test_demo_learns_the_synthetic_task(tmp_path, restore_threads):
    out = tmp_path / "demo"
    # 300 of the default 600 steps: the smallest run that reached >= 0.97 on every seed tried.
    argv = [
        "demo",
        "--output_dir",
        str(out),
        "--steps",
        "300",
        "--train_samples",
        "2048",
    ]
    assert main(argv) == 0, "the demo should exit with status 0"

    evals = [r for r in read_jsonl(out / "metrics.jsonl") if "eval/exact_match" in r]
    steps = [r["step"] for r in evals]
    assert steps[0] == 0 and steps[-1] == 300, f"evaluations at {steps}: expected a step-0 baseline and step 300"
    before, after = evals[0]["eval/exact_match"], evals[-1]["eval/exact_match"]
    assert before <= 0.3, f"the untrained model should be near chance, exact match {before}"
    assert after >= 0.9, f"the demo should learn: held-out exact match {before} -> {after}"

    for step, expected in ((0, before), (300, after)):
        rows = read_jsonl(out / "predictions" / f"step_{step:06d}.jsonl")
        assert len(rows) == 128, f"predictions/step_{step:06d}.jsonl has {len(rows)} rows, expected 128"
        em = sum(r["scores"]["exact_match"] for r in rows) / len(rows)
        assert em == pytest.approx(expected), f"step {step}: predictions file EM {em}, metrics.jsonl {expected}"
        # Recount from the raw text too (the answers are single lower-case words).
        hits = sum(r["prediction"].strip().lower() in r["references"] for r in rows) / len(rows)
        assert hits == pytest.approx(em), f"step {step}: {hits} of the raw predictions match, scores say {em}"

    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert "step_000300" in checkpoints, f"final checkpoint missing: {checkpoints}"
    png = out / "curves.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE, "curves.png is not a PNG file"
    with Image.open(png) as image:
        image.verify()
        assert image.size[0] > 100 and image.size[1] > 100, f"curves.png is suspiciously small: {image.size}"


def _write_llava_folder(folder, n: int, seed: int) -> str:
    """A LLaVA JSON file next to an images/ folder of PNGs; returns the JSON path."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, record in enumerate(synthetic_vqa(n, seed=seed)):
        name = f"{seed}_{i}.png"
        record["image"].save(images / name)
        entries.append(
            {
                "id": record["id"],
                "image": name,
                "conversations": record["conversations"],
            }
        )
    path = folder / f"data_{seed}.json"
    path.write_text(json.dumps(entries))
    return str(path)


def test_train_and_export_run_end_to_end_on_a_saved_model_folder(tmp_path):
    model, processor = tiny_llava(seed=0)
    model_dir = tmp_path / "tiny-llava"
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    train_json = _write_llava_folder(tmp_path, 8, seed=0)
    eval_json = _write_llava_folder(tmp_path, 4, seed=1)
    out = tmp_path / "run"
    # The whole run in one YAML file; two flags override it.
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(
        f"model: {{name: {model_dir}}}\n"
        f"data: {{train: {train_json}, eval: {eval_json}, image_folder: {tmp_path / 'images'}}}\n"
        "metrics: [exact_match, {name: rouge}]\n"
        f"output_dir: {out}\n"
        "max_steps: 5\nlora_r: 4\nbatch_size: 2\neval_batch_size: 4\nmax_new_tokens: 2\nprecision: fp32\n"
        "log_steps: 1\nmetric_for_best: eval/rougeL\n"
    )
    cmd = [sys.executable, "-m", "llava_loop", "train", "--config", str(run_yaml), "--max_steps", "2",
           "--metric_for_best", "eval/loss"]  # fmt: skip
    result = subprocess.run(cmd, check=False, env=child_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"`python -m llava_loop train` failed:\n{result.stderr[-3000:]}"

    checkpoint = out / "checkpoints" / "step_000002"
    assert (checkpoint / "meta.json").is_file(), f"no final checkpoint in {out / 'checkpoints'}"
    meta = json.loads((checkpoint / "meta.json").read_text())
    assert meta["kind"] == "lora" and meta["base_model"] == str(model_dir), f"checkpoint meta: {meta}"
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2], f"train log steps: {records}"
    assert any("eval/exact_match" in r and "eval/rougeL" in r for r in records), (
        f"the final evaluation (exact match and the YAML's rouge) is missing from metrics.jsonl: {records}"
    )
    assert (out / "config.yaml").is_file(), "config.yaml was not written"
    saved = build_parser().command_parsers["train"].parse_path(str(out / "run.yaml"))
    assert (saved.model.name, saved.max_steps, saved.metric_for_best) == (str(model_dir), 2, "eval/loss"), (
        f"run.yaml should hold the whole run with the flags applied: {saved}"
    )
    assert (out / "predictions" / "step_000002.jsonl").is_file(), "no predictions for the final evaluation"

    merged = tmp_path / "merged"
    assert main(["export", str(checkpoint), str(merged)]) == 0, "llava-loop export should exit with status 0"
    from transformers import AutoModelForImageTextToText, AutoProcessor

    exported = AutoModelForImageTextToText.from_pretrained(merged)
    AutoProcessor.from_pretrained(merged)
    weights, base = exported.state_dict(), model.state_dict()
    assert not any("lora_" in n for n in weights), "the exported model still has LoRA weights"
    assert sorted(weights) == sorted(base), "the exported model should have exactly the base model's weights"
    changed = [n for n in base if not torch.equal(weights[n], base[n])]
    assert any(".q_proj." in n for n in changed), f"the LoRA update was not merged; changed weights: {changed[:5]}"
    assert not any("vision_tower" in n for n in changed), "the frozen vision tower changed in the export"


# ---------------------------------------------------------------------- mistakes cost seconds, not a model load


@pytest.fixture
def run_files(tmp_path, monkeypatch):
    """A valid `train` command line (model folder with a config.json, data, output_dir) whose model load is
    replaced by a tripwire: every mistake must be reported before it."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    model, _ = tiny_llava(seed=0)
    model.config.save_pretrained(model_dir)
    train_json = _write_llava_folder(tmp_path, 4, seed=0)
    eval_json = _write_llava_folder(tmp_path, 2, seed=1)
    loads = []

    def tripwire(*args, **kwargs):
        loads.append(args)
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("llava_loop.modeling.load_model", tripwire)
    argv = ["train", "--model.name", str(model_dir), "--data.train", train_json, "--data.eval", eval_json,
            "--data.image_folder", str(tmp_path / "images"), "--output_dir", str(tmp_path / "out")]  # fmt: skip
    return {"argv": argv, "tmp": tmp_path, "loads": loads, "train": train_json}


def _set(argv: list[str], flag: str, value: str) -> list[str]:
    i = argv.index(flag)
    return [*argv[: i + 1], value, *argv[i + 2 :]]


def _bad_record(files) -> list[str]:
    path = files["tmp"] / "bad.json"
    record = json.loads(open(files["train"]).read())[0]
    record["id"] = "sample-7"
    record["conversations"] = list(reversed(record["conversations"]))  # the answer comes first
    path.write_text(json.dumps([record]))
    return _set(files["argv"], "--data.train", str(path))


def _earlier_run(files) -> list[str]:
    checkpoint = files["tmp"] / "out" / "checkpoints" / "step_000010"
    checkpoint.mkdir(parents=True)
    (checkpoint / "meta.json").write_text("{}")
    return files["argv"]


def _run_in_progress(files) -> list[str]:
    """An output_dir locked by a live run (this test's parent process stands in for it)."""
    import os
    import socket
    import time

    from llava_loop.rundir import LOCK_FILE, _process_start

    out = files["tmp"] / "out"
    out.mkdir()
    owner = {"pid": os.getppid(), "host": socket.gethostname(), "start": _process_start(os.getppid()),
             "time": time.time()}  # fmt: skip
    (out / LOCK_FILE).write_text(json.dumps(owner))
    return files["argv"]


MISTAKES = {
    "missing data file": (lambda f: _set(f["argv"], "--data.train", str(f["tmp"] / "trian.json")),
                          "dataset file not found"),
    "bad record": (_bad_record, "sample-7"),
    "missing image folder": (lambda f: _set(f["argv"], "--data.image_folder", str(f["tmp"] / "imgs")),
                             "is not a directory"),
    "metric name typo": (lambda f: [*f["argv"], "--metrics", "[exact_match, rogue]"], "did you mean 'rouge'"),
    "metric option typo": (lambda f: [*f["argv"], "--metrics", "[{name: bertscore, model: roberta-large}]"],
                           "has no option(s) 'model'"),
    "metric model missing": (lambda f: [*f["argv"], "--metrics", "[{name: bertscore, model_type: /models/roberta}]"],
                             "BERTScore model (bertscore model_type) '/models/roberta': no such folder"),
    "metric model not cached offline": (lambda f: [*f["argv"], "--metrics", "[{name: nli, model: org/not-cached}]"],
                                        "HF_HUB_OFFLINE is set"),
    "metric_for_best nobody reports": (lambda f: [*f["argv"], "--metric_for_best", "bleu"],
                                       "metric_for_best='eval/bleu' is reported by none"),
    "metric_for_best without eval data": (
        lambda f: [a for a in f["argv"] if a not in ("--data.eval", f["argv"][f["argv"].index("--data.eval") + 1])]
        + ["--metric_for_best", "loss"], "needs eval data"),
    "output_dir of an earlier run": (_earlier_run, "already holds 1 checkpoint"),
    "output_dir of a live run": (_run_in_progress, "is in use by another run"),
    "model folder missing": (lambda f: _set(f["argv"], "--model.name", str(f["tmp"] / "modle")), "no such folder"),
    "model not cached offline": (lambda f: _set(f["argv"], "--model.name", "llava-hf/llava-1.5-7b-hf"),
                                 "no such folder, and no Hub access: HF_HUB_OFFLINE is set"),
    "dtype typo": (lambda f: [*f["argv"], "--model.dtype", "bf16"], "dtype='bf16' is invalid"),
    "invalid LoopConfig value": (lambda f: [*f["argv"], "--batch_size", "0"], "batch_size=0 is invalid"),
    "wrong type": (lambda f: [*f["argv"], "--batch_size", "four"], "four"),
    "dashed flag": (lambda f: [*f["argv"], "--learning-rate", "1e-4"], "--learning-rate -> --learning_rate"),
    "unknown flag": (lambda f: [*f["argv"], "--learning_rat", "1e-4"], "--learning_rat -> --learning_rate"),
    "missing required": (lambda f: ["train", *f["argv"][3:]], "model.name"),
}  # fmt: skip


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_a_mistake_prints_one_message_and_exits_2_before_the_model_loads(mistake, run_files, capsys):
    make_argv, expected = MISTAKES[mistake]
    status = main(make_argv(run_files))
    err = capsys.readouterr().err
    assert status == 2, f"{mistake}: exit status {status}, expected 2; stderr:\n{err}"
    assert expected in err, f"{mistake}: the message should say {expected!r}; stderr:\n{err}"
    assert "Traceback" not in err, f"{mistake}: a user error should not print a traceback:\n{err}"
    assert err.startswith("llava-loop train: error:"), f"{mistake}: one message, starting with the command:\n{err}"
    assert not run_files["loads"], f"{mistake}: the model was loaded before the mistake was reported"


def test_debug_shows_the_traceback_of_a_user_error(run_files):
    argv = [*_set(run_files["argv"], "--data.train", str(run_files["tmp"] / "nope.json")), "--debug"]
    with pytest.raises(FileNotFoundError, match="dataset file not found"):
        main(argv)


def test_the_checked_settings_reach_the_model_load(run_files, capsys):
    """The tripwire itself: a correct command gets past every check to the load."""
    with pytest.raises(AssertionError, match="the model was loaded"):
        main(run_files["argv"])
    assert len(run_files["loads"]) == 1, "a correct command should load the model once"


# ---------------------------------------------------------------------- parsing, help


def test_one_yaml_file_holds_the_whole_run_and_flags_override_it(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "model: {name: llava-hf/llava-1.5-7b-hf, dtype: bfloat16}\n"
        "data: {train: data/train.json, eval: data/val.json, image_folder: data/images}\n"
        "metrics:\n  - exact_match\n  - {name: bertscore, model_type: /models/roberta-large, num_layers: 17}\n"
        "output_dir: runs/a\nlearning_rate: 2.0e-4\nlora_r: 8\ngradient_checkpointing: true\n"
    )
    args = build_parser().parse_args(["train", "--config", str(path), "--lora_r", "16", "--data.eval", "null"])
    got = args.train
    assert (got.model.name, got.model.dtype) == ("llava-hf/llava-1.5-7b-hf", "bfloat16"), f"model: {got.model}"
    assert (got.data.train, got.data.eval, got.data.image_folder) == ("data/train.json", None, "data/images"), (
        f"data section, with --data.eval null overriding the file: {got.data}"
    )
    assert got.metrics[1] == {"name": "bertscore", "model_type": "/models/roberta-large", "num_layers": 17}, (
        f"a metric's options should come through as a mapping: {got.metrics}"
    )
    assert (got.learning_rate, got.lora_r, got.gradient_checkpointing) == (2e-4, 16, True), (
        f"LoopConfig fields from the file, --lora_r overriding it: {got}"
    )
    from llava_loop.metrics import BERTScore, resolve_metrics

    bertscore = resolve_metrics(got.metrics)["bertscore"]
    assert isinstance(bertscore, BERTScore) and bertscore.num_layers == 17, f"options not applied: {bertscore!r}"


def test_a_saved_config_yaml_is_a_valid_config_file(tmp_path):
    from llava_loop import LoopConfig

    LoopConfig(output_dir="runs/b", learning_rate=1e-5, report_to=["tensorboard"]).save(tmp_path / "config.yaml")
    args = build_parser().parse_args(["train", "--config", str(tmp_path / "config.yaml"), "--model.name", "m",
                                      "--data.train", "t.json"])  # fmt: skip
    assert (args.train.output_dir, args.train.learning_rate, args.train.report_to) == ("runs/b", 1e-5, ["tensorboard"])


def test_help_documents_every_flag_with_its_default_and_lists_the_metrics():
    from llava_loop.metrics import metric_names

    parser = build_parser()
    texts = {"": parser.format_help()}
    for name, sub in parser.command_parsers.items():
        texts[name] = sub.format_help()
        for action in sub._actions:
            if action.option_strings and action.dest not in ("help", "print_config"):
                assert action.help and action.help.strip(), f"llava-loop {name}: {action.option_strings} has no help"
    for name, text in texts.items():
        assert "`" not in text, f"llava-loop {name} --help prints raw backticks:\n{text}"
    train = texts["train"]
    for metric in metric_names():
        assert metric in train, f"train --help should list the metric {metric!r}"
    for flag, default in (("--learning_rate", "default: 0.0002"), ("--model.dtype", "default: auto")):
        block = train.split(f"\n  {flag} ", 1)[1].split("\n  --", 1)[0]
        assert default in block, f"train --help should show {flag}'s {default!r}; got {block!r}"


def test_flags_of_every_kind_reach_the_loop_config():
    argv = ["train", "--model.name", "m", "--data.train", "t.json", "--gradient_checkpointing", "true",
            "--shuffle", "false", "--max_length", "null", "--projector_lr", "1e-3", "--lora_target_modules",
            "[q_proj, v_proj]", "--report_to", "[tensorboard]", "--metric_for_best", "rougeL"]  # fmt: skip
    args = build_parser().parse_args(argv).train
    config = loop_config(args)
    got = (config.gradient_checkpointing, config.shuffle, config.max_length, config.projector_lr,
           config.lora_target_modules, config.report_to, config.metric_for_best)  # fmt: skip
    assert got == (True, False, None, 1e-3, ["q_proj", "v_proj"], ["tensorboard"], "eval/rougeL"), (
        f"bool, null, float, list and normalised values should come through the flags: {got}"
    )


def test_the_run_files_in_the_docs_are_valid_configs(tmp_path):
    """The YAML run files shown in README.md and docs/cli.md parse, and their metrics resolve."""
    import re
    from pathlib import Path

    from llava_loop.metrics import resolve_metrics

    root = Path(__file__).resolve().parents[1]
    checked = 0
    for page in (root / "README.md", root / "docs" / "cli.md"):
        for block in re.findall(r"```yaml\n(.*?)```", page.read_text(encoding="utf-8"), flags=re.S):
            if "# run.yaml" not in block:
                continue
            path = tmp_path / "run.yaml"
            path.write_text(block)
            args = build_parser().parse_args(["train", "--config", str(path)]).train
            config = loop_config(args)
            resolve_metrics(args.metrics)
            assert args.model.name and args.data.train and config.output_dir, f"{page.name}: incomplete run file"
            checked += 1
    assert checked >= 2, f"expected the run.yaml examples of README.md and docs/cli.md, found {checked}"


def test_every_llava_loop_command_in_the_docs_parses(tmp_path, monkeypatch, capsys):
    """Each ``llava-loop ...`` line of a bash block in README.md and docs/ uses flags that exist, with valid values
    (runs of the commands themselves are tested above, on the tiny model)."""
    import re
    import shlex
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text(encoding="utf-8")
    run_yaml = re.search(r"```yaml\n(# run\.yaml\n.*?)```", readme, flags=re.S).group(1)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.yaml").write_text(run_yaml)
    commands = []
    for page in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(encoding="utf-8"), flags=re.S):
            commands += [(page.name, line) for line in block.splitlines() if line.startswith("llava-loop ")]
    assert len(commands) >= 5, f"expected the docs' llava-loop commands, found {commands}"
    for page, line in commands:
        argv = shlex.split(line, comments=True)[1:]
        try:
            build_parser().parse_args(argv)
        except SystemExit as exit:  # --print_config prints and exits 0
            assert exit.code == 0, f"{page}: `{line}` exited with {exit.code}"
        except Exception as err:
            raise AssertionError(f"{page}: `{line}` does not parse: {err}") from err
    capsys.readouterr()
