"""Saving a figure: every plotting function returns its Figure and, given ``path``, saves it."""

from __future__ import annotations

import os
from pathlib import Path

from matplotlib.figure import Figure

__all__ = ["PathLike", "finish"]

PathLike = str | os.PathLike[str] | None


def finish(fig: Figure, path: PathLike) -> Figure:
    """``fig``, saved first to ``path`` (PNG at 150 dpi, parent directories created) when given."""
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=150, bbox_inches="tight")
    return fig
