"""The code blocks of README.md and docs/*.md: every Python block runs in CI, config blocks parse.

The Python blocks themselves are test items of pytest-markdown-docs (``--markdown-docs`` in
setup.cfg; fixtures in the root conftest.py). These tests keep that wiring in place and check the
blocks the plugin does not run: ```json blocks parse, ```yaml blocks parse, and a ```yaml block
marked ``loopconfig`` in its info string loads as a `LoopConfig` file.
"""

import configparser
import json
from pathlib import Path

import pytest
import torch
import yaml
from markdown_it import MarkdownIt

from llava_loop import LoopConfig
from llava_loop.data import load_llava_json

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PYTHON = ("py", "python", "python3")  # the languages pytest-markdown-docs runs


def fences(page: Path) -> list[tuple[str, list[str], str]]:
    """``(where, info words, content)`` of every fenced block of ``page``, parsed as the plugin does."""
    tokens = MarkdownIt("commonmark").parse(page.read_text(encoding="utf-8"))
    return [
        (f"{page.relative_to(ROOT)}:{t.map[0] + 1}", t.info.split(), t.content) for t in tokens if t.type == "fence"
    ]


BLOCKS = [block for page in PAGES for block in fences(page)]


def test_pytest_runs_every_python_block_of_readme_and_docs():
    ini = configparser.ConfigParser()
    ini.read(ROOT / "setup.cfg", encoding="utf-8")
    pytest_ini = ini["tool:pytest"]
    assert "--markdown-docs" in pytest_ini["addopts"].split(), (
        "setup.cfg addopts lost --markdown-docs: `python -m pytest` no longer runs the docs' code blocks"
    )
    testpaths = pytest_ini["testpaths"].split()
    assert {"README.md", "docs"} <= set(testpaths), (
        f"setup.cfg testpaths {testpaths} must include README.md and docs for their code blocks to run"
    )


def test_no_docs_code_block_is_excluded_from_running():
    python = [(where, info) for where, info, _ in BLOCKS if info and info[0].lower() in PYTHON]
    assert len(python) >= 10, f"expected the docs' Python examples, found {len(python)} blocks"
    not_run = [where for where, info in python if "notest" in info or info[0] not in PYTHON]
    assert not not_run, f"Python blocks that pytest-markdown-docs would not run (notest / odd case): {not_run}"


def test_json_blocks_parse():
    blocks = [(where, content) for where, info, content in BLOCKS if info[:1] == ["json"]]
    assert blocks, "the docs lost their json example (a predictions-file line in docs/evaluation.md)"
    for where, content in blocks:
        for number, line in enumerate(content.splitlines(), 1):  # one JSON value per line (JSON Lines)
            try:
                json.loads(line)
            except json.JSONDecodeError as err:
                pytest.fail(f"{where}: line {number} of the json block is not JSON: {err}")


def test_yaml_blocks_parse_and_loopconfig_blocks_load(tmp_path):
    blocks = [(where, info, content) for where, info, content in BLOCKS if info[:1] in (["yaml"], ["yml"])]
    marked = [where for where, info, _ in blocks if "loopconfig" in info]
    assert marked, "no ```yaml loopconfig block left in the docs: the config-file example is gone"
    for where, info, content in blocks:
        try:
            yaml.safe_load(content)
        except yaml.YAMLError as err:
            pytest.fail(f"{where}: the yaml block does not parse: {err}")
        if "loopconfig" in info:
            path = tmp_path / "run.yaml"
            path.write_text(content, encoding="utf-8")
            config = LoopConfig.from_file(path)  # raises naming the key on unknown fields or bad values
            assert config != LoopConfig(), f"{where}: the LoopConfig file block sets nothing"


def test_fake_hub_loads_the_tiny_model_under_the_hub_name(fake_hub, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from llava_loop.modeling import load_model

    model, processor = load_model("llava-hf/llava-1.5-7b-hf", dtype="bfloat16")
    assert model.config.text_config.hidden_size == 64, "the fake Hub did not load the tiny model"
    assert model.dtype == torch.bfloat16, f"dtype= must reach the real from_pretrained, got {model.dtype}"
    assert model.name_or_path == "llava-hf/llava-1.5-7b-hf", (
        f"a loaded model must keep its Hub name (checkpoints record it), got {model.name_or_path!r}"
    )
    model.save_pretrained(tmp_path / "local")
    processor.save_pretrained(tmp_path / "local")
    local = AutoModelForImageTextToText.from_pretrained(tmp_path / "local")
    assert local.name_or_path == str(tmp_path / "local"), "a local folder must load unchanged"
    assert AutoProcessor.from_pretrained(tmp_path / "local").tokenizer is not None, "local processor"


def test_llava_data_fixture_is_llava_json_with_images(llava_data):
    train = load_llava_json(llava_data / "train.json", image_folder=llava_data / "images")
    val = load_llava_json(llava_data / "val.json", image_folder=llava_data / "images")
    assert (len(train), len(val)) == (8, 4), f"expected 8 train / 4 val records, got {len(train)}/{len(val)}"
    assert train[0]["image"].mode == "RGB", "the fixture's images must load as RGB images"
