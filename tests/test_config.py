"""Tests for `llava_loop.config.LoopConfig`: validation, files, CLI, docs, precision."""

import dataclasses
import json

import pytest
import torch

from llava_loop.config import LoopConfig


def test_defaults_are_valid_and_round_trip_through_dict():
    cfg = LoopConfig()
    assert LoopConfig.from_dict(cfg.to_dict()) == cfg, "defaults changed via dict"
    assert cfg.report_to == [], f"report_to default should be [], got {cfg.report_to}"
    assert LoopConfig().report_to is not cfg.report_to, "report_to list is shared"


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("num_epochs", 0, "> 0"),
        ("max_steps", -1, ">= 0"),
        ("batch_size", 0, "> 0"),
        ("grad_accum_steps", -2, "> 0"),
        ("learning_rate", 0.0, "> 0"),
        ("learning_rate", float("nan"), "> 0"),
        ("projector_lr", -1e-4, "> 0"),
        ("warmup_ratio", 1.0, "[0, 1)"),
        ("lora_dropout", -0.1, "[0, 1)"),
        ("top_p", 0.0, "(0, 1]"),
        ("temperature", 0.0, "> 0"),
        ("max_length", 0, "or None"),
        ("save_total_limit", 0, "or None"),
        ("seed", -1, ">= 0"),
        ("precision", "fp8", "bf16"),
        ("on_bad_sample", "ignore", "skip"),
        ("lr_scheduler", "cosin", "did you mean 'cosine'"),
        ("report_to", "tensorbord", "did you mean 'tensorboard'"),
        ("learning_rate", "fast", "float"),
        ("batch_size", 2.5, "int"),
        ("batch_size", True, "int"),
        ("shuffle", "yes", "bool"),
        ("lora_target_modules", [], "module names"),
        ("lora_target_modules", ["q_proj", 3], "list[str]"),
    ],
)
def test_invalid_value_error_names_field_value_and_allowed(field, value, allowed):
    with pytest.raises(ValueError) as info:
        LoopConfig(**{field: value})
    message = str(info.value)
    assert message.startswith(f"{field}="), f"error should name {field}: {message}"
    assert repr(value) in message or str(value) in message, f"no value: {message}"
    assert allowed in message, f"error should say {allowed!r} is allowed: {message}"


def test_early_stopping_without_metric_for_best_is_rejected():
    with pytest.raises(ValueError, match="early_stopping_patience=2 requires"):
        LoopConfig(early_stopping_patience=2)
    cfg = LoopConfig(early_stopping_patience=2, metric_for_best="eval/loss")
    assert cfg.early_stopping_patience == 2, "valid early stopping config was changed"


def test_lora_target_modules_with_full_finetune_is_rejected():
    with pytest.raises(ValueError, match="lora_target_modules=.*lora_r=0"):
        LoopConfig(lora_r=0, lora_target_modules=["q_proj"])


def test_beam_sampling_is_allowed():
    cfg = LoopConfig(num_beams=4, do_sample=True)
    assert (cfg.num_beams, cfg.do_sample) == (4, True), "beam sampling was altered"


def test_values_are_coerced_to_field_types():
    cfg = LoopConfig(
        learning_rate=1,  # int for a float field
        num_epochs="2.5",  # YAML 1.1 reads 2.5e0-style numbers as strings
        lora_target_modules=("q_proj", "v_proj"),
        report_to="tensorboard",
    )
    assert isinstance(cfg.learning_rate, float), "int learning_rate not made float"
    assert cfg.num_epochs == 2.5, f"numeric string not parsed: {cfg.num_epochs!r}"
    assert cfg.lora_target_modules == ["q_proj", "v_proj"], "tuple not made list"
    assert cfg.report_to == ["tensorboard"], f"str not wrapped: {cfg.report_to}"
    assert LoopConfig(report_to="none").report_to == [], '"none" should mean []'
    regex = LoopConfig(lora_target_modules=r".*\.(q|v)_proj").lora_target_modules
    assert regex == r".*\.(q|v)_proj", f"regex string was altered: {regex!r}"


def test_metric_for_best_without_slash_gets_eval_prefix():
    assert LoopConfig(metric_for_best="rougeL").metric_for_best == "eval/rougeL", (
        "bare metric key should be prefixed with eval/"
    )
    assert LoopConfig(metric_for_best="train/loss").metric_for_best == "train/loss", (
        "a key with a slash should be kept as is"
    )
    cfg = LoopConfig(metric_for_best="rougeL")
    again = dataclasses.replace(cfg)
    assert again.metric_for_best == "eval/rougeL", "prefixing is not idempotent"


@pytest.mark.parametrize(
    ("metric", "explicit", "expected"),
    [
        ("eval/loss", None, False),
        ("eval/val_loss", None, False),
        ("eval/wer", None, False),
        ("eval/rougeL", None, True),
        ("eval/answer_f1", None, True),  # "answer" contains "wer" but is no WER
        ("eval/loss", True, True),
    ],
)
def test_greater_is_better_is_inferred_from_metric_name(metric, explicit, expected):
    cfg = LoopConfig(metric_for_best=metric, greater_is_better=explicit)
    got = cfg.resolved_greater_is_better()
    assert got is expected, f"{metric} with {explicit=}: expected {expected}, got {got}"


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
def test_file_round_trip_preserves_every_field(tmp_path, suffix):
    cfg = LoopConfig(
        learning_rate=1e-5,
        projector_lr=3e-5,
        lora_target_modules=["q_proj", "v_proj"],
        metric_for_best="rougeL",
        report_to=["tensorboard"],
        max_length=None,
        greater_is_better=True,
    )
    path = tmp_path / "sub" / f"cfg{suffix}"
    cfg.save(path)
    assert LoopConfig.from_file(path) == cfg, f"{suffix} round trip changed values"
    if suffix == ".json":
        assert json.loads(path.read_text())["learning_rate"] == 1e-5, "bad JSON"


def test_yaml_scientific_notation_without_dot_is_read_as_float(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("learning_rate: 2e-5\n")  # PyYAML parses this as the str "2e-5"
    lr = LoopConfig.from_file(path).learning_rate
    assert lr == 2e-5, f"expected 2e-5, got {lr!r}"


def test_empty_file_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert LoopConfig.from_file(path) == LoopConfig(), "empty file should be defaults"


def test_save_rejects_unknown_extension(tmp_path):
    with pytest.raises(ValueError, match=r"\.yaml, \.yml or \.json"):
        LoopConfig().save(tmp_path / "cfg.toml")


def test_unknown_key_error_suggests_close_match():
    with pytest.raises(ValueError) as info:
        LoopConfig.from_dict({"learing_rate": 1e-4, "zzz": 1})
    message = str(info.value)
    assert "'learing_rate'" in message and "learning_rate" in message.split("did you mean")[1], (
        f"no suggestion for learing_rate: {message}"
    )
    assert "'zzz'" in message, f"every unknown key should be listed: {message}"


def test_file_errors_name_the_file(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("learning_rate: [1, 2\n")
    with pytest.raises(ValueError, match="broken.yaml"):
        LoopConfig.from_file(broken)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json}")
    with pytest.raises(ValueError, match="bad.json"):
        LoopConfig.from_file(bad_json)
    typo = tmp_path / "typo.yaml"
    typo.write_text("batch_sise: 2\n")
    with pytest.raises(ValueError, match="typo.yaml.*batch_size"):
        LoopConfig.from_file(typo)
    a_list = tmp_path / "list.yaml"
    a_list.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="list.yaml.*mapping"):
        LoopConfig.from_file(a_list)


def test_every_field_has_a_docstring_used_as_cli_help():
    docs = LoopConfig.field_docs()
    names = [f.name for f in dataclasses.fields(LoopConfig)]
    assert list(docs) == names, "field_docs should list every field in order"
    missing = [name for name, doc in docs.items() if not doc.strip()]
    assert not missing, f"fields without a docstring: {missing}"
    assert "0 disables" in docs["eval_steps"] or "0 = no" in docs["eval_steps"], (
        "eval_steps doc should state its 0 sentinel"
    )
    from llava_loop.cli import build_parser

    help_text = " ".join(build_parser().command_parsers["train"].format_help().split())
    assert "Optimizer steps between evaluations" in help_text, "the field docstring is not the flag's help"


def test_field_docs_include_subclass_fields():
    @dataclasses.dataclass
    class MyConfig(LoopConfig):
        lambda_aux: float = 0.1
        """Weight of the auxiliary loss."""

    docs = MyConfig.field_docs()
    assert docs["lambda_aux"] == "Weight of the auxiliary loss.", "subclass doc lost"
    assert docs["seed"], "inherited field docs lost in the subclass"


def test_field_docs_of_a_subclass_without_source_are_empty_not_an_error():
    namespace = {"dataclasses": dataclasses, "LoopConfig": LoopConfig}
    exec(  # a class without source code, as in a REPL or a notebook run by exec
        "@dataclasses.dataclass\nclass NoSource(LoopConfig):\n    extra: int = 1\n", namespace
    )
    docs = namespace["NoSource"].field_docs()
    assert docs["extra"] == "", f"a field without source should have an empty doc: {docs['extra']!r}"
    assert docs["seed"], "the docs of LoopConfig's own fields should still be read"


def test_resolved_precision_on_cpu():
    cpu = torch.device("cpu")
    assert LoopConfig().resolved_precision(cpu) == "fp32", "auto on CPU should be fp32"
    assert LoopConfig(precision="bf16").resolved_precision("cpu") == "bf16", (
        "bf16 is supported by CPU autocast and should be kept"
    )
    assert LoopConfig(precision="fp32").resolved_precision(cpu) == "fp32", "fp32 lost"
    with pytest.raises(ValueError, match='precision="fp16".*CPU'):
        LoopConfig(precision="fp16").resolved_precision(cpu)
