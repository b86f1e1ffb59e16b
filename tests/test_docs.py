"""Docs that are generated from, or promise things about, the code stay in step with it."""

from pathlib import Path

from llava_loop.callbacks import EVENTS
from llava_loop.config import LoopConfig

ROOT = Path(__file__).resolve().parents[1]


def test_config_reference_page_is_generated_from_current_fields():
    page = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    assert page.endswith(LoopConfig.markdown_reference()), (
        "docs/config.md is out of date: regenerate its table with LoopConfig.markdown_reference()"
    )


def test_training_docs_list_every_callback_event():
    page = (ROOT / "docs" / "training.md").read_text(encoding="utf-8")
    missing = [event for event in EVENTS if f"`{event}`" not in page]
    assert not missing, f"docs/training.md does not document events {missing}"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    command = 'pip install -e ".[test]" && python -m pytest -q'
    assert command in readme, f"README quick start lost the test command {command!r}"
    assert command in ci, f".ci/run does not run the README test command {command!r}"
