"""Notebooks follow the repository's rules: jupytext sources paired with executed copies in
sync, exactly one `parameters` cell, result cells checked by nbval, no algorithm code."""

import ast
from pathlib import Path

import jupytext
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.py"))


def code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks/NN_*.py found"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_rules(path):
    source = jupytext.read(path)
    cells = code_cells(source)
    tagged = [c for c in cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: needs exactly one cell tagged 'parameters'"
    assert any(c.source.lstrip().startswith("# NBVAL_CHECK_OUTPUT") for c in cells), (
        f"{path.name}: no result cell marked '# NBVAL_CHECK_OUTPUT' for nbval to compare"
    )
    for cell in cells:
        tree = ast.parse(cell.source)
        defs = [n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        assert not defs, f"{path.name}: defines {defs}; algorithm and plotting code belongs in nfpi/"
    executed = path.with_suffix(".ipynb")
    assert executed.exists(), f"{executed.name} missing: run `make reproduce`"
    run = jupytext.read(executed)
    assert [c.source for c in code_cells(run)] == [c.source for c in cells], (
        f"{executed.name} is out of date with {path.name}: run `make reproduce`"
    )
    assert all(c.get("execution_count") for c in code_cells(run)), f"{executed.name} is not fully executed"
