"""Every notebook runs top to bottom as shipped (code cells executed in order in one namespace)."""

import json
import warnings
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ has no .ipynb file"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_notebook_cell_has_an_id(path):
    # nbformat >= 4.5 requires cell ids; without them nbformat/Jupyter warn (MissingIDFieldWarning) on
    # every read. Normalise with nbformat.validator.normalize, or nbformat.read + nbformat.write.
    notebook = json.loads(path.read_text(encoding="utf-8"))
    assert (notebook["nbformat"], notebook["nbformat_minor"]) >= (4, 5), f"{path.name} predates cell ids"
    missing = [i for i, cell in enumerate(notebook["cells"]) if not cell.get("id")]
    assert not missing, f"{path.name}: cells {missing} have no id"
    ids = [cell["id"] for cell in notebook["cells"]]
    assert len(set(ids)) == len(ids), f"{path.name}: cell ids repeat: {ids}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_top_to_bottom_without_warnings(path, monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    namespace: dict = {"__name__": "__main__"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, cell in enumerate(cells):
            if cell["cell_type"] != "code":
                continue
            source = "".join(cell["source"])
            try:
                exec(compile(source, f"{path.name}[cell {i}]", "exec"), namespace)
            except Exception as err:  # re-raised with the cell named
                raise AssertionError(f"{path.name} cell {i} failed: {err!r}\n{source}") from err
    emitted = [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught]
    assert not emitted, f"{path.name} emitted warnings a user would see: {emitted}"
