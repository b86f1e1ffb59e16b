"""Declared = imported: every third-party module the code imports comes from a distribution that
setup.py declares, and every ``install_requires`` entry is imported by the library.

Imports are read with ``ast`` (top level and inside functions), stdlib and our own modules dropped,
and mapped to distributions with ``importlib.metadata.packages_distributions()`` (a module that is
not installed here, e.g. ``wandb``, stands for the distribution of the same name). The requirements
are read from setup.py itself, not from the installed ``llava_loop`` metadata: an editable install of
another checkout, or one made before setup.py changed, would describe a different list.

- ``llava_loop/``: a distribution must be in ``install_requires``, or in an extra when every import of
  it sits inside a function (it loads only when a user opts in: ``wandb`` for ``report_to``).
- ``tests/``: ``install_requires`` + the ``test`` extra (with the extras it names: ``llava_loop[notebooks]``).
- ``benchmarks/`` is not checked: those scripts run on GPU machines set up by hand
  (see benchmarks/README.md) and may import what only such machines have.
"""

from __future__ import annotations

import ast
import importlib.metadata
import sys
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Import:
    module: str  # the top-level module name, e.g. "PIL"
    where: str  # "path:line"
    lazy: bool  # inside a function: runs only when that function is called


def imports_in(source: str, where: str) -> list[Import]:
    """The absolute imports of third-party or local top-level modules in ``source`` (stdlib dropped).

    Imports under ``if TYPE_CHECKING:`` never run and are left out.
    """
    found: list[Import] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for part in child.orelse:
                    visit_statement(part, lazy)
                continue
            visit_statement(child, lazy)

    def visit_statement(node: ast.AST, lazy: bool) -> None:
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            visit(node, lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))
            return
        for name in names:
            top = name.split(".")[0]
            if top not in sys.stdlib_module_names:
                found.append(Import(top, f"{where}:{node.lineno}", lazy))

    visit(ast.parse(source), lazy=False)
    return found


def scan(folder: str) -> dict[str, list[Import]]:
    """``{distribution: [imports of it]}`` for every ``*.py`` under ``ROOT/folder`` (our modules dropped)."""
    files = sorted((ROOT / folder).rglob("*.py"))
    local = {"llava_loop"} | {path.stem for path in files}  # tests import helpers, conftest, ...
    module_to_dists = importlib.metadata.packages_distributions()
    by_dist: dict[str, list[Import]] = {}
    for path in files:
        for found in imports_in(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT))):
            if found.module in local:
                continue
            for dist in module_to_dists.get(found.module, [found.module]):
                by_dist.setdefault(canonicalize_name(dist), []).append(found)
    return by_dist


def declared() -> tuple[set[str], dict[str, set[str]]]:
    """``(install_requires, {extra: requirements})`` of setup.py, as canonical distribution names."""
    tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    (call,) = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "setup"]
    keywords = {
        k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in ("install_requires", "extras_require")
    }

    raw = keywords.get("extras_require", {})

    def names(requirements: list[str]) -> set[str]:
        out = set()
        for requirement in map(Requirement, requirements):
            if canonicalize_name(requirement.name) == "llava-loop":  # "llava_loop[notebooks]": that extra's list
                out |= set().union(*(names(raw[extra]) for extra in requirement.extras))
            else:
                out.add(canonicalize_name(requirement.name))
        return out

    extras = {extra: names(reqs) for extra, reqs in raw.items()}
    return names(keywords["install_requires"]), extras


def describe(by_dist: dict[str, list[Import]], dists) -> str:
    return "; ".join(f"{d} ({', '.join(i.where for i in by_dist[d][:3])})" for d in sorted(dists))


def test_import_scan_sees_imports_inside_functions_and_drops_stdlib_relative_and_type_checking():
    source = (
        "import os, numpy.linalg\nfrom PIL import Image\nfrom . import sibling\nfrom typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    import pandas\nelse:\n    import yaml\n"
        "def f():\n    import wandb\n    from torch.nn import functional\n"
        "class C:\n    def m(self):\n        import tqdm.auto\n"
    )
    found = {(i.module, i.lazy) for i in imports_in(source, "x.py")}
    expected = {("numpy", False), ("PIL", False), ("yaml", False), ("wandb", True), ("torch", True), ("tqdm", True)}
    assert found == expected, f"scanned {sorted(found)}, expected {sorted(expected)}"


def test_every_distribution_the_library_imports_is_declared():
    install, extras = declared()
    in_extras = set().union(*extras.values())
    by_dist = scan("llava_loop")
    assert {"torch", "transformers", "pillow"} <= set(by_dist), f"the scan missed core imports: {sorted(by_dist)}"
    undeclared = {d for d in by_dist if d not in install and d not in in_extras}
    eager_extras = {d for d in by_dist if d not in install and d in in_extras and not all(i.lazy for i in by_dist[d])}
    assert not undeclared, (
        f"llava_loop imports distributions setup.py does not declare: {describe(by_dist, undeclared)}. "
        "Add them to install_requires (or to an extra, if only imported inside a function the user opts into)."
    )
    assert not eager_extras, (
        f"only in an extra, but imported at module level (every user needs them): {describe(by_dist, eager_extras)}. "
        "Move them to install_requires, or import them inside the function that needs them."
    )


def test_every_install_requirement_is_imported_by_the_library():
    install, _ = declared()
    unused = install - set(scan("llava_loop"))
    assert not unused, (
        f"install_requires lists {sorted(unused)} but llava_loop never imports them: every user installs them "
        "for nothing. Remove them from setup.py, or move them to the extra of the feature that needs them."
    )


def test_every_distribution_the_tests_import_is_declared_for_tests():
    install, extras = declared()
    by_dist = scan("tests")
    assert {"torch", "pytest"} <= set(by_dist), f"the scan missed core test imports: {sorted(by_dist)}"
    undeclared = set(by_dist) - install - extras.get("test", set())
    assert not undeclared, (
        f"tests import distributions neither install_requires nor the 'test' extra declare: "
        f"{describe(by_dist, undeclared)}. Add them to extras_require['test'] in setup.py."
    )
