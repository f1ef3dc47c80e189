"""Figures of results tables (docs/results.md; paper Tables 2-6): paired differences with their
intervals, and a grid of metrics against a setting (lambda sweeps, ablations, augmentation)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ._figure import PathLike, finish

__all__ = [
    "metric_grid",
    "paired_differences",
]


def paired_differences(
    summary: pd.DataFrame, metric: str = "top1", baseline: str = "baseline", path: PathLike = None
) -> Figure:
    """Each setting's mean paired difference to ``baseline`` in ``metric`` with its 95 %
    interval (the ``<metric>_diff_*`` columns of :func:`nfpi.repro.seed_summary`, settings as
    its index, top to bottom); a dotted line at 0. An interval that crosses 0 is grey."""
    rows = summary.drop(index=baseline)
    mean, half = rows[f"{metric}_diff_mean"].to_numpy(), rows[f"{metric}_diff_ci95"].to_numpy()
    fig, ax = plt.subplots(figsize=(5.5, 0.35 * len(rows) + 1.2))
    pos = np.arange(len(rows))[::-1]
    for m, h, y in zip(mean, half, pos):
        ax.errorbar(m, y, xerr=h, fmt="o", color="C0" if abs(m) > h else "0.55", capsize=3)
    ax.axvline(0, color="black", linestyle=":", linewidth=1)
    ax.set_yticks(pos, [f"{name} (n={int(n)})" for name, n in zip(rows.index, rows["seeds"])])
    ax.set_xlabel(f"test {metric} - {baseline} (points; mean and 95 % interval over paired seeds)")
    return finish(fig, path)


def _facet_grid(sns: Any, kind: str, common: dict[str, Any], categories: int, palette: Any) -> Any:
    """The seaborn grid of :func:`metric_grid`: lines, or horizontal bars for ``categories`` settings."""
    if kind == "line":
        return sns.relplot(
            kind="line",
            marker="o",
            aspect=1.1,
            palette=palette,
            errorbar="sd",
            facet_kws={"sharey": False, "sharex": False},
            **common,
        )
    if kind == "bar":
        # Horizontal bars: long setting names stay readable; one category axis for all panels.
        common.update(x="value", y=common["x"], height=0.25 * categories + 1.0)
        return sns.catplot(
            kind="bar",
            errorbar="sd",
            sharex=False,
            sharey=True,
            aspect=3.0 / (0.25 * categories + 1.0),
            palette=palette,
            **common,
        )
    raise ValueError(f"kind must be 'line' or 'bar', got {kind!r}")


def _mark_axes(
    grid: Any, at_zero: pd.DataFrame, row: str | None, hue: str | None, logx: bool, palette: Any, label: str
) -> None:
    """Log x axes, the dashed lines of the results at x = 0 (``label``) and a light grid."""
    for key, ax in grid.axes_dict.items():
        row_name, col_name = key if row else (None, key)
        if logx:
            ax.set_xscale("log")
        here = at_zero[(at_zero["metric"] == col_name) & ((at_zero[row] == row_name) if row else True)]
        # One dashed line per hue at the mean over repeated results (seeds), like the lines' means.
        for colour_key, values in here.groupby(hue)["value"] if hue else [(None, here["value"])]:
            ax.axhline(
                values.mean(),
                ls="--",
                lw=1,
                color=palette[colour_key] if hue else "C0",
                label=label,
            )
        ax.grid(alpha=0.3)


def metric_grid(
    table: pd.DataFrame,
    x: str,
    metrics: Sequence[str],
    row: str | None = None,
    hue: str | None = None,
    kind: str = "line",
    logx: bool = False,
    names: Mapping[str, str] | None = None,
    path: PathLike = None,
) -> Figure:
    """Result tables as seaborn panels (NFPI Tables 1-3, GLEM Tables 1-7): one column per metric
    (each with its own y axis), one row per value of ``row`` (e.g. ours / paper), the metric
    against ``x`` as lines (``kind="line"``, e.g. lambda or temperature) or per ``x`` as bars
    (``kind="bar"``, horizontal bars, e.g. per ablation setting), coloured by ``hue``.
    Repeated results at one ``x`` (seeds) are drawn as their mean with a ±1 std band or bar.

    ``table``: one row per result with columns ``x``, ``row``, ``hue`` and the metrics
    (missing metrics and NaN values are skipped); ``names``: display names of metrics and x.
    ``logx``: log x axis; results at x = 0 (e.g. lambda = 0, Baseline 1) cannot sit on it and
    are drawn as dashed horizontal lines in their hue's colour.
    """
    import seaborn as sns

    names = dict(names or {})
    keep = [m for m in metrics if m in table.columns and table[m].notna().any()]
    ids = list(dict.fromkeys(c for c in (x, row, hue) if c))
    long = table.melt(id_vars=ids, value_vars=keep, var_name="metric", value_name="value").dropna(
        subset=["value"]
    )
    long["metric"] = long["metric"].map(lambda m: names.get(m, m))
    order = [names.get(m, m) for m in keep]
    hues = list(dict.fromkeys(long[hue])) if hue else [None]
    palette = dict(zip(hues, sns.color_palette(n_colors=len(hues)))) if hue else None
    at_zero = long[long[x] == 0] if logx else long.iloc[:0]
    shown = long[long[x] > 0] if logx else long
    common = dict(
        data=shown,
        x=x,
        y="value",
        col="metric",
        col_order=order,
        row=row,
        hue=hue,
        height=2.6,
        col_wrap=None if row or kind == "bar" else min(3, len(order)),
    )
    grid = _facet_grid(sns, kind, common, long[x].nunique(), palette)
    _mark_axes(grid, at_zero, row, hue, logx, palette, f"{names.get(x, x)} = 0")
    grid.set_titles(row_template="{row_name}", col_template="{col_name}")
    grid.set_ylabels("")
    grid.set_xlabels("" if kind == "bar" else names.get(x, x))
    return finish(grid.figure, path)
