"""Merge consecutive stream outputs (same name: stdout or stderr) of every code cell of an
executed notebook, in place.

How a kernel cuts its stdout and stderr into output chunks depends on timing, so two runs with
identical results give notebooks that differ only in where the chunks break. Merged, they are
byte-identical, and `make reproduce` leaves `git status` clean when nothing changed.

Usage: python scripts/merge_streams.py EXECUTED.ipynb
"""

import sys

import nbformat


def main(path: str) -> None:
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        merged: list = []
        for out in cell.outputs:
            last = merged[-1] if merged else None
            if last is not None and out.output_type == last.output_type == "stream" and out.name == last.name:
                last.text += out.text
            else:
                merged.append(out)
        cell.outputs = merged
    nbformat.write(nb, path)


if __name__ == "__main__":
    main(sys.argv[1])
