"""The documentation site (mkdocs.yml) builds with ``--strict``, holds every page, and what its pages
generate from or promise about the code is current."""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from docs_pages import PARTS, current_part

import llava_loop
from llava_loop import Loop, LoopConfig

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
FIELDS = {f.name for f in dataclasses.fields(LoopConfig)}


def _nav_paths(nav) -> list[str]:
    """The page paths of a ``nav`` setting, read by the site's own hook (docs/_mkdocs/mkdocs_hooks.py,
    loaded by path: it is a file of the site's build, not a module of a package)."""
    spec = importlib.util.spec_from_file_location("mkdocs_hooks", DOCS / "_mkdocs" / "mkdocs_hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    return hooks.nav_paths(nav)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site as ``python -m mkdocs build --strict`` writes it (any warning fails the build)."""
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # material's banner about MkDocs 2.0
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    problems = [line for line in proc.stderr.splitlines() if not line.startswith("INFO")]
    assert proc.returncode == 0, "mkdocs build --strict failed:\n" + "\n".join(problems[-40:])
    return out


def test_site_builds_strict_and_renders_every_code_block(site):
    pages = sorted(site.rglob("*.html"))
    assert len(pages) > 20, f"the site has only {len(pages)} pages"
    broken = [str(p.relative_to(site)) for p in pages if "<p>```" in p.read_text(encoding="utf-8")]
    assert not broken, f"code fences rendered as text (an info string Markdown does not accept?) in {broken}"
    index = (site / "index.html").read_text(encoding="utf-8")
    assert "https://download.pytorch.org/whl/cpu" in index, (
        "the home page lost the README's CPU-torch install step (snippet include)"
    )
    assert "load_llava_json" in index, "the home page lost the README's finetune example (snippet include)"


def test_api_pages_render_the_docstrings_of_the_public_api(site):
    loop_page = (site / "api" / "loop" / "index.html").read_text(encoding="utf-8")
    summary = Loop.__doc__.split(";")[0]  # "Finetunes a Hugging Face vision-language model"
    assert summary in loop_page, f"the API page of llava_loop.loop lacks Loop's docstring {summary!r}"
    api = "".join(p.read_text(encoding="utf-8") for p in (site / "api").rglob("*.html"))
    missing = []
    for name in llava_loop.__all__:
        obj = getattr(llava_loop, name)
        module = getattr(obj, "__module__", None) if inspect.isclass(obj) or inspect.isfunction(obj) else None
        anchor = f"{module}.{name}" if module else f"llava_loop.callbacks.{name}"  # EVENTS, a dict
        if f'id="{anchor}"' not in api:
            missing.append(anchor)
    assert not missing, f"exported names without an entry in the API reference: {missing}"


def test_every_module_has_an_api_page_or_is_internal():
    internal = {"__init__", "__main__", "cli", "memory", "rundir"}  # the CLI has docs/cli.md; the others are helpers
    package = Path(llava_loop.__file__).parent
    modules = {p.stem for p in package.glob("*.py")} | {p.parent.name for p in package.glob("*/__init__.py")}
    missing = sorted(m for m in modules - internal if not (DOCS / "api" / f"{m}.md").is_file())
    assert not missing, f"modules without a page in docs/api/ (add one, and a nav entry): {missing}"


def test_every_docs_page_is_in_the_nav_and_every_nav_page_exists():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    nav = _nav_paths(config["nav"])
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md") if p.relative_to(DOCS).parts[0][0] not in "_."}
    orphans = sorted(pages - set(nav))
    assert not orphans, f"docs pages missing from the nav of mkdocs.yml: {orphans}"
    absent = [path for path in nav if not (DOCS / path).resolve().is_file()]
    assert not absent, f"nav entries of mkdocs.yml without a file: {absent}"


@pytest.mark.parametrize(("page", "name"), list(PARTS), ids=[f"{p}:{n}" for p, n in PARTS])
def test_generated_part_of_the_docs_is_current(page, name):
    text = (ROOT / page).read_text(encoding="utf-8")
    assert current_part(text, name) == PARTS[page, name](), (
        f"{page}: the generated part {name!r} is out of date; run `python tests/docs_pages.py`"
    )


def test_training_docs_list_every_override_point_of_loop():
    page = (DOCS / "training.md").read_text(encoding="utf-8")
    hooks = [n for n, f in vars(Loop).items() if inspect.isfunction(f) and not n.startswith("_") and n != "fit"]
    assert len(hooks) >= 8, f"expected Loop's override points, found {hooks}"
    missing = [name for name in hooks if f"| `{name}(" not in page]
    assert not missing, f"docs/training.md's table of methods to override lacks {missing}"


def _table_cells(page: str) -> list[list[str]]:
    """The cells of every table row of ``page`` (header and separator rows included)."""
    rows = []
    for line in page.splitlines():
        if line.startswith("|"):
            rows.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
    return rows


def test_coming_from_page_names_only_existing_settings_and_api():
    page = (DOCS / "coming_from.md").read_text(encoding="utf-8")
    public = set(llava_loop.__all__) | {n for n in vars(Loop) if not n.startswith("_")}
    for module in ("data", "modeling", "collators", "callbacks", "loggers", "checkpointing"):
        public |= {n for n in vars(getattr(__import__(f"llava_loop.{module}"), module)) if not n.startswith("_")}
    fields, unknown = set(), []
    for row in _table_cells(page):
        if len(row) < 2:
            continue
        for span in re.findall(r"`([^`]+)`", row[1]):  # the llava_loop column
            setting = re.match(r"(\w+)=", span)
            call = re.match(r"(\w+)\(", span)
            if setting:
                fields.add(setting[1])
                if setting[1] not in FIELDS:
                    unknown.append(f"{span} (not a LoopConfig field)")
            elif call and call[1] not in public:
                unknown.append(f"{span} (no such llava_loop function)")
            elif re.fullmatch(r"\w+", span) and span not in FIELDS | public:
                unknown.append(f"{span} (neither a LoopConfig field nor llava_loop API)")
    assert not unknown, f"docs/coming_from.md names what the code does not have: {unknown}"
    assert len(fields) >= 30, f"expected the LoopConfig fields of the mapping tables, found {sorted(fields)}"


def test_coming_from_page_names_real_trainingarguments():
    """The Trainer table's first column: fields of the installed transformers' (Seq2Seq)TrainingArguments,
    except the ones the page marks as renamed or removed in transformers 5."""
    from transformers import Seq2SeqTrainingArguments

    page = (DOCS / "coming_from.md").read_text(encoding="utf-8")
    trainer = page[page.index("## transformers") : page.index("## TRL")]
    theirs = {f.name for f in dataclasses.fields(Seq2SeqTrainingArguments)}  # TrainingArguments' and its own
    gone_in_5 = {"overwrite_output_dir", "warmup_ratio", "group_by_length"}  # the rows say so
    named, unknown = set(), []
    for row in _table_cells(trainer)[2:]:
        for span in re.findall(r"`([^`]+)`", row[0]):
            name = re.match(r"(\w+)(=|$)", span)
            if name:
                named.add(name[1])
                if name[1] not in theirs | gone_in_5:
                    unknown.append(span)
    assert not unknown, f"docs/coming_from.md names TrainingArguments fields that do not exist: {unknown}"
    assert len(named) >= 30, f"expected the Trainer table's arguments, found {sorted(named)}"
