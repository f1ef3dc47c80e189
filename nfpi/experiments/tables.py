"""The results tables of :mod:`nfpi.experiments`: one tidy row per (``run``, ``eval``) key in a CSV.

The storage of the result rows behind NFPI Tables 1-3 and GLEM Tables 1-7 (docs/method.md §6-§8):
:func:`read_rows` reads a table (empty when the file is missing), :func:`append_row` adds a
row, replacing one with the same key, and rewrites the file atomically, :func:`find_row`
looks a row up. :mod:`nfpi.experiments` re-exports these names.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from .._util import atomic_write

__all__ = ["KEY", "append_row", "find_row", "read_rows"]

#: The key columns of a results table: the run's name and its evaluation tag.
KEY = ("run", "eval")


def read_rows(csv_path: str | os.PathLike[str]) -> pd.DataFrame:
    """The results table at ``csv_path`` (empty when the file does not exist)."""
    path = Path(csv_path)
    if not path.exists():
        return pd.DataFrame(columns=list(KEY))
    table = pd.read_csv(path)
    missing = [k for k in KEY if k not in table.columns]
    if missing:
        raise ValueError(
            f"{path} is not a results table of nfpi.experiments (no column {missing}); use another path"
        )
    return table.astype({k: str for k in KEY})


def append_row(csv_path: str | os.PathLike[str], row: Mapping[str, Any]) -> pd.DataFrame:
    """Add ``row`` to the CSV, replacing a row with the same (``run``, ``eval``) key; the file is
    rewritten atomically (a crash never leaves half a table). Returns the new table."""
    missing = [k for k in KEY if k not in row]
    if missing:
        raise ValueError(f"a result row needs the key columns {list(KEY)}; missing {missing}")
    path = Path(csv_path)
    table = read_rows(path)
    same = (table["run"] == str(row["run"])) & (table["eval"] == str(row["eval"]))
    fresh = pd.DataFrame([{k: v for k, v in row.items()}]).astype({k: str for k in KEY})
    parts = [t for t in (table[~same], fresh) if not t.empty]
    table = pd.concat(parts, ignore_index=True) if len(parts) > 1 else fresh
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    table.to_csv(buffer, index=False)
    atomic_write(path, buffer.getvalue().encode())
    return table


def find_row(table: pd.DataFrame, name: str, tag: str) -> pd.Series | None:
    """The last row of ``table`` with key (``run``, ``eval``) = (``name``, ``tag``); None if there is none."""
    hit = table[(table["run"] == name) & (table["eval"] == tag)]
    return None if hit.empty else hit.iloc[-1]
