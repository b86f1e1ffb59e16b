"""Test-wide settings (offline, CPU, one thread) and the fixtures behind the docs' code blocks.

This file sits at the repository root, not in ``tests/``, because pytest-markdown-docs collects
every ```python block of README.md and docs/*.md as a test item of that file, and a conftest's
fixtures reach only the items below its folder.

Every docs block runs as pasted, each in a fresh empty working directory, with the Hub names it
uses (``llava-hf/llava-1.5-7b-hf``, ``Qwen/Qwen2-VL-2B-Instruct``) found in an offline Hugging Face
cache that holds the tiny models of their families from `llava_loop.testing` (`fake_hub`). Blocks that read files name a fixture in their fence's info string
(```` ```python fixture:llava_data ````): `llava_data` writes ``data/train.json``,
``data/val.json`` and ``data/images/``; `finished_run` provides ``out/``, a finished run with
checkpoints up to ``step_000120``.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402 (after the offline switches)

# One intra-op thread for the whole run: the tiny test models are several times faster on one
# thread (more only add synchronisation). Child processes run at this count too (helpers.child_env,
# helpers.launch_two_processes), so results never depend on the machine's core count.
torch.set_num_threads(1)

# The Hub names the docs use; each loads the tiny model and processor of its family instead.
FAKE_HUB = {"llava-hf/llava-1.5-7b-hf": "llava", "Qwen/Qwen2-VL-2B-Instruct": "qwen2_vl"}
FAKE_HUB_NAMES = tuple(FAKE_HUB)


def _is_docs_block(request: pytest.FixtureRequest) -> bool:
    """Whether the test is a code block collected by pytest-markdown-docs."""
    return request.node.get_closest_marker("markdown-docs") is not None


def _as_if_from_hub(model, name: str) -> None:
    """Give a model the Hub name it would have after ``from_pretrained(name)`` (peft and meta.json read it)."""
    model.config._name_or_path = name
    model.name_or_path = name


@pytest.fixture(scope="session")
def _fake_hub_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face cache folder in which every `FAKE_HUB` repo holds its family's tiny model files."""
    from llava_loop.testing import tiny_vlm

    cache = tmp_path_factory.mktemp("hf_cache")
    commit = "0" * 40
    for name, family in FAKE_HUB.items():
        repo = cache / f"models--{name.replace('/', '--')}"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(commit)
        model, processor = tiny_vlm(family, seed=0)
        model.save_pretrained(repo / "snapshots" / commit)
        processor.save_pretrained(repo / "snapshots" / commit)
    return cache


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch, _fake_hub_cache: Path) -> Path:
    """An offline Hugging Face cache that holds a tiny model under each `FAKE_HUB` name.

    Nothing is patched but the cache location: ``from_pretrained("llava-hf/llava-1.5-7b-hf")``,
    `llava_loop.modeling.check_model_source` and peft find the tiny model there as they would a real
    download (with ``HF_HUB_OFFLINE=1``), and the model's ``name_or_path`` is the Hub name.
    """
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(_fake_hub_cache))
    return _fake_hub_cache


@pytest.fixture(autouse=True)
def _docs_block_environment(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Run every docs code block in a fresh empty working directory with the fake Hub."""
    if not _is_docs_block(request):
        return
    monkeypatch.chdir(tmp_path)
    request.getfixturevalue("fake_hub")


@pytest.fixture
def llava_data(tmp_path: Path) -> Path:
    """``data/train.json`` (8 samples), ``data/val.json`` (4) in LLaVA format, PNGs in ``data/images/``.

    Written into ``tmp_path``, a docs block's working directory.
    """
    from llava_loop.testing import synthetic_vqa

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True, exist_ok=True)
    for split, records in (("train", synthetic_vqa(8, seed=0)), ("val", synthetic_vqa(4, seed=1))):
        rows = []
        for i, record in enumerate(records):
            image = f"{split}-{i}.png"
            record["image"].save(data / "images" / image)
            rows.append({"id": record["id"], "image": image, "conversations": record["conversations"]})
        (data / f"{split}.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return data


@pytest.fixture(scope="session")
def _finished_run_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished LoRA run of the tiny model: checkpoints every 40 steps up to ``step_000120``.

    Its model is loaded as ``llava-hf/llava-1.5-7b-hf`` through the fake Hub (so meta.json records
    that base model), with a best checkpoint by ``eval/loss``.
    """
    from llava_loop import LoopConfig, fit
    from llava_loop.testing import synthetic_vqa, tiny_llava

    out = tmp_path_factory.mktemp("finished_run") / "out"
    model, processor = tiny_llava(seed=0)
    _as_if_from_hub(model, FAKE_HUB_NAMES[0])
    config = LoopConfig(
        output_dir=str(out),
        max_steps=120,
        batch_size=1,
        learning_rate=1e-3,
        eval_steps=40,
        save_steps=40,
        metric_for_best="eval/loss",
        max_new_tokens=2,
        log_steps=0,
        handle_signals=False,
    )
    fit(model, processor, synthetic_vqa(8, seed=0), synthetic_vqa(2, seed=1), config=config)
    return out


@pytest.fixture
def finished_run(tmp_path: Path, _finished_run_folder: Path) -> Path:
    """Copy the finished run to ``out/`` in ``tmp_path``, a docs block's working directory."""
    return Path(shutil.copytree(_finished_run_folder, tmp_path / "out"))
