"""Every notebook in notebooks/ runs top to bottom in a fresh Jupyter kernel, as a user runs it.

`run_notebook` reads a notebook with nbformat and executes it with nbclient in a new ipykernel kernel
of this very interpreter (`kernel_manager`), in an empty temporary working directory (a notebook
cannot write into the repository), offline, with tqdm bars off, one torch thread (`helpers.child_env`)
and every Python warning shown (``PYTHONWARNINGS=always``, stricter than a user's default filters).
A notebook fails when a cell raises (the message names the cell) or writes to stderr: in Jupyter
that is a warning, a logged warning or an error shown to the user (`shown_on_stderr`). A cell tagged
``expected-stderr`` may show a logged message (it must show one, and still no Python warning).

Parameters, papermill's convention without papermill (`inject_parameters`): a notebook may have one
code cell tagged ``parameters`` that holds the defaults a user sees, and must then give a default to
each name of `PARAMETERS` (``SMOKE = False``). The tests insert a cell tagged
``injected-parameters`` right after it that sets `PARAMETERS` (``SMOKE = True``: the quickest run
that still checks what the notebook shows, e.g. the tiny model where the default is a 7B one that a
CPU cannot train). A notebook without a ``parameters`` cell runs as it is.

Notebooks are kept without outputs and execution counts (clean diffs) and with a unique id per cell.
Adding a notebook: save it in notebooks/ (the glob picks it up), clear its outputs, run this file.
"""

from __future__ import annotations

import ast
import copy
import json
import re
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client import KernelManager
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from helpers import child_env

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
PARAMETERS = {"SMOKE": True}
"""Set after the ``parameters`` cell of every notebook that has one."""
CELL_TIMEOUT_S = 300
"""A cell running longer fails the notebook (a hang must not eat CI's time)."""
EXPECTED_STDERR = "expected-stderr"
# What `warnings.showwarning` writes: "path:line: SomeWarning: message".
PYTHON_WARNING = re.compile(r"^.*:\d+: \w*Warning: ", re.MULTILINE)
ANSI_CODES = re.compile(r"\x1b\[[0-9;]*m")


def kernel_manager() -> KernelManager:
    """A manager of jupyter_client's native ``python3`` kernel: ipykernel run by ``sys.executable``.

    No kernel folder is searched, so the name resolves to ipykernel's own spec built for this
    interpreter, never to a ``python3`` kernel installed elsewhere (a user-level one, a system
    Jupyter's) that would import another Python's packages.
    """
    return KernelManager(kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[]))


def inject_parameters(notebook: nbformat.NotebookNode, parameters: dict) -> nbformat.NotebookNode:
    """A copy of ``notebook`` with a cell setting ``parameters`` right after its ``parameters`` cell, as
    papermill injects them; ``notebook`` itself when it has no such cell."""
    tagged = [i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", [])]
    if not tagged:
        return notebook
    assert len(tagged) == 1, f"cells {[i + 1 for i in tagged]} are tagged 'parameters'; tag exactly one"
    index = tagged[0]
    cell = notebook.cells[index]
    assert cell.cell_type == "code", f"cell {index + 1} is tagged 'parameters' but is not a code cell"
    defaults = {
        target.id
        for node in ast.parse(cell.source).body
        if isinstance(node, (ast.Assign, ast.AnnAssign))
        for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(target, ast.Name)
    }
    missing = sorted(set(parameters) - defaults)
    assert not missing, (
        f"the parameters cell (cell {index + 1}) gives no default to {missing}, which the tests set to "
        f"{ {k: parameters[k] for k in missing} }: add e.g. `SMOKE = False` and use it"
    )
    source = "# Parameters injected by tests/test_notebooks.py\n"
    source += "".join(f"{name} = {value!r}\n" for name, value in parameters.items())
    injected = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    injected.id = "injected-parameters"
    notebook = copy.deepcopy(notebook)
    notebook.cells.insert(index + 1, injected)
    return notebook


def _where(cell: nbformat.NotebookNode, saved: nbformat.NotebookNode) -> str:
    """``cell 3 of 12 (id ab12cd34)``, numbered as in the saved file (without the injected cell)."""
    if cell.id == "injected-parameters":
        return "the injected parameters cell"
    ids = [c.id for c in saved.cells]
    return f"cell {ids.index(cell.id) + 1} of {len(ids)} (id {cell.id})"


def run_notebook(path: Path, workdir: Path, parameters: dict = PARAMETERS) -> nbformat.NotebookNode:
    """Execute the notebook at ``path`` in a fresh kernel with ``workdir`` as its working directory;
    return the executed notebook (with outputs). Raises AssertionError naming the cell that failed."""
    saved = nbformat.read(path, as_version=4)
    notebook = inject_parameters(saved, parameters)
    (workdir / "work").mkdir(parents=True, exist_ok=True)
    client = NotebookClient(
        notebook,
        km=kernel_manager(),
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(workdir / "work")}},
    )
    # IPYTHONDIR: no profile or startup file of the machine's user runs, no history written to ~.
    env = child_env(PYTHONWARNINGS="always", IPYTHONDIR=str(workdir / "ipython"))
    try:
        client.execute(env=env)
    except CellExecutionError as err:
        failed = [c for c in notebook.cells if any(o.output_type == "error" for o in c.get("outputs", []))]
        where = _where(failed[0], saved) if failed else "a cell"
        raise AssertionError(f"{path.name}: {where} failed:\n{ANSI_CODES.sub('', str(err))}") from None
    return notebook


def shown_on_stderr(executed: nbformat.NotebookNode, saved: nbformat.NotebookNode) -> list[str]:
    """What the cells of an executed notebook wrote to stderr that a user should not see: anything,
    except in a cell tagged ``expected-stderr``, which must write there and show no Python warning."""
    problems = []
    for cell in executed.cells:
        text = "".join(o.text for o in cell.get("outputs", []) if o.output_type == "stream" and o.name == "stderr")
        if EXPECTED_STDERR not in cell.metadata.get("tags", []):
            if text:
                problems.append(f"{_where(cell, saved)} wrote to stderr:\n{text}")
        elif not text:
            problems.append(f"{_where(cell, saved)} is tagged {EXPECTED_STDERR!r} but wrote nothing: untag it")
        elif PYTHON_WARNING.search(text):
            problems.append(f"{_where(cell, saved)} showed a Python warning:\n{text}")
    return problems


# ---------------------------------------------------------------------------------- the notebooks


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ has no .ipynb file"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_saved_without_outputs_and_with_cell_ids(path):
    # nbformat >= 4.5 requires cell ids; without them nbformat/Jupyter warn (MissingIDFieldWarning) on
    # every read. Normalise with nbformat.validator.normalize, or nbformat.read + nbformat.write.
    notebook = json.loads(path.read_text(encoding="utf-8"))
    assert (notebook["nbformat"], notebook["nbformat_minor"]) >= (4, 5), f"{path.name} predates cell ids"
    nbformat.validate(notebook)  # raises with the schema violation
    missing = [i + 1 for i, cell in enumerate(notebook["cells"]) if not cell.get("id")]
    assert not missing, f"{path.name}: cells {missing} have no id"
    ids = [cell["id"] for cell in notebook["cells"]]
    assert len(set(ids)) == len(ids), f"{path.name}: cell ids repeat: {ids}"
    # Outputs in the repository would make every re-run a diff (and could hold paths, timings, images).
    dirty = [
        i + 1
        for i, cell in enumerate(notebook["cells"])
        if cell["cell_type"] == "code" and (cell["outputs"] or cell["execution_count"] is not None)
    ]
    assert not dirty, (
        f"{path.name}: cells {dirty} are saved with outputs or an execution count; clear them (Jupyter: "
        f"Edit > Clear Outputs of All Cells, then save; or `jupyter nbconvert --clear-output --inplace {path.name}`)"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_top_to_bottom_in_a_fresh_kernel_without_warnings(path, tmp_path):
    executed = run_notebook(path, tmp_path)
    problems = shown_on_stderr(executed, nbformat.read(path, as_version=4))
    assert not problems, f"{path.name} shows warnings to its user:\n" + "\n".join(problems)


# ---------------------------------------------------------------------------------- the runner itself


def _notebook(tmp_path: Path, *cells: nbformat.NotebookNode) -> Path:
    notebook = nbformat.v4.new_notebook(cells=list(cells))
    for k, cell in enumerate(notebook.cells):
        cell.id = f"cell-{k + 1}"
    path = tmp_path / "example.ipynb"
    nbformat.write(notebook, path)
    return path


def test_runner_uses_this_python_injects_parameters_and_shows_every_warning(tmp_path):
    code = nbformat.v4.new_code_cell
    path = _notebook(
        tmp_path,
        nbformat.v4.new_markdown_cell("# example"),
        code("SMOKE = False\nSTEPS = 5", metadata={"tags": ["parameters"]}),
        code("import os, sys\nprint(sys.executable, SMOKE, STEPS, os.getcwd(), sep='|')"),
        # A library's DeprecationWarning, which Python's default filters hide outside __main__.
        code("import warnings\nwarnings.warn_explicit('old api', DeprecationWarning, 'lib.py', 7, module='lib')"),
        code("import logging\nlogging.getLogger('lib').warning('resuming with changed settings')"),
        code("logging.getLogger('lib').warning('resuming')", metadata={"tags": [EXPECTED_STDERR]}),
    )
    executed = run_notebook(path, tmp_path / "run")

    assert [c.id for c in executed.cells][:4] == ["cell-1", "cell-2", "injected-parameters", "cell-3"], (
        "the parameters were not injected right after the parameters cell"
    )
    printed = executed.cells[3].outputs[0].text.strip().split("|")
    assert printed == [sys.executable, "True", "5", str(tmp_path / "run" / "work")], (
        f"kernel python, injected SMOKE, default STEPS or working directory wrong: {printed}"
    )
    problems = shown_on_stderr(executed, nbformat.read(path, as_version=4))
    assert len(problems) == 2, f"expected the warning and the logged message of cells 4 and 5 only: {problems}"
    assert "cell 4 of 6" in problems[0] and "DeprecationWarning: old api" in problems[0], problems[0]
    assert "cell 5 of 6" in problems[1] and "resuming with changed settings" in problems[1], problems[1]


def test_runner_names_the_failing_cell(tmp_path):
    code = nbformat.v4.new_code_cell
    path = _notebook(tmp_path, code("x = 1"), code("def f():\n    raise ValueError('boom')\nf()"), code("y = 2"))
    with pytest.raises(AssertionError) as caught:
        run_notebook(path, tmp_path / "run")
    message = str(caught.value)
    assert "example.ipynb: cell 2 of 3 (id cell-2) failed" in message, message
    assert "ValueError: boom" in message and "raise ValueError('boom')" in message, message


def test_parameters_need_a_default_in_the_parameters_cell():
    code = nbformat.v4.new_code_cell
    notebook = nbformat.v4.new_notebook(cells=[code("STEPS = 5", metadata={"tags": ["parameters"]}), code("STEPS")])
    with pytest.raises(AssertionError, match=r"cell 1\) gives no default to \['SMOKE'\]"):
        inject_parameters(notebook, {"SMOKE": True})
    twice = nbformat.v4.new_notebook(cells=[code("SMOKE = 1", metadata={"tags": ["parameters"]})] * 2)
    with pytest.raises(AssertionError, match=r"cells \[1, 2\] are tagged 'parameters'"):
        inject_parameters(twice, {"SMOKE": True})
    plain = nbformat.v4.new_notebook(cells=[code("SMOKE = 1")])
    assert inject_parameters(plain, {"SMOKE": True}) is plain, "a notebook without a parameters cell changed"
