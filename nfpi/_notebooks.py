"""Executed notebooks without volatile metadata, written only when they change (no paper
equations here; used by ``make reproduce`` / ``make nb-NN``, see docs/notebooks.md "Working in JupyterLab").

papermill and nbclient record start/end times and durations per cell and per notebook, and
JupyterLab drops some of them on its next save: either way a re-run with unchanged results
would show up in ``git status``. :func:`strip` removes these keys and pins the kernelspec;
:func:`finish` writes the result with nbformat's own serialisation (the one the Jupyter server
uses on save) only when its bytes differ, then touches the paired ``.py`` so that jupytext
never finds the ``.ipynb`` newer than its source ("... is more recent than ..." in Lab).

    python -m nfpi._notebooks EXECUTED.ipynb TARGET.ipynb [SOURCE.py]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat

from ._util import atomic_write

__all__ = ["CELL_KEYS", "KERNELSPEC", "NOTEBOOK_KEYS", "finish", "strip"]

# ipykernel's own kernel: the name every Python environment with ipykernel provides and the
# display name JupyterLab writes back on save.
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
NOTEBOOK_KEYS = ("papermill", "widgets")  # run record; ipywidgets state with random model ids
CELL_KEYS = ("papermill", "execution", "ExecuteTime")  # per-cell timestamps and durations


def strip(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """``nb`` without the volatile keys of :data:`NOTEBOOK_KEYS` / :data:`CELL_KEYS`, with the
    kernelspec :data:`KERNELSPEC` (modified in place and returned)."""
    for key in NOTEBOOK_KEYS:
        nb.metadata.pop(key, None)
    nb.metadata["kernelspec"] = nbformat.from_dict(KERNELSPEC)
    for cell in nb.cells:
        for key in CELL_KEYS:
            cell.metadata.pop(key, None)
    return nb


def _keep_ids(nb: nbformat.NotebookNode, old: nbformat.NotebookNode) -> None:
    """Give cells of ``nb`` the ids of ``old``'s cells with the same type and source (in order):
    jupytext draws new random ids on every conversion of the ``.py``."""
    ids: dict[tuple[str, str], list[str]] = {}
    for cell in old.cells:
        if "id" in cell:
            ids.setdefault((cell.cell_type, cell.source), []).append(cell.id)
    for cell in nb.cells:
        match = ids.get((cell.cell_type, cell.source))
        if match:
            cell.id = match.pop(0)


def finish(
    executed: str | os.PathLike[str],
    target: str | os.PathLike[str],
    source: str | os.PathLike[str] | None = None,
) -> bool:
    """Strip ``executed`` into ``target`` if that changes its bytes; touch ``source``.

    Cells keep the ids they have in ``target``. Returns whether ``target`` was (re)written.
    """
    target = Path(target)
    nb = strip(nbformat.read(executed, as_version=4))
    if target.is_file():
        _keep_ids(nb, nbformat.read(target, as_version=4))
    text = nbformat.writes(nb) + "\n"  # as nbformat.write, which the Jupyter server saves with
    changed = not target.is_file() or target.read_text(encoding="utf-8") != text
    if changed:
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, text.encode("utf-8"))
    if source is not None:
        os.utime(source)  # the pair's text file must not be older than the notebook
    return changed


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit("usage: python -m nfpi._notebooks EXECUTED.ipynb TARGET.ipynb [SOURCE.py]")
    wrote = finish(*sys.argv[1:])
    print(f"{sys.argv[2]}: {'written' if wrote else 'unchanged'}")
