"""Published numbers of the two papers, for side-by-side tables: NFPI Tables 1-3 (docs/method.md §8) and
GLEM Tables 1-3 and 5-7 (CIFAR-10 / CIFAR-100 at GPU scale; FID on the oracle's features,
Coverage and Label Reliability in %).

Example:
    >>> paper_table("nfpi_table2").columns.tolist()
    ['lam', 'nf_top1', 'cnn_top1']
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

__all__ = ["paper_table"]

_PAPER: dict[str, tuple[list[str], list[list[Any]]]] = {
    # NFPI Table 1: NF-Acc (%), gradient-descent baselines with lr policies vs FPI.
    "nfpi_table1": (
        ["setting", "cifar10_nf_top1", "cifar100_nf_top1"],
        [
            ["data init (Baseline 1)", 77.31, 39.16],
            ["GD sublinear_v1", 92.34, 68.28],
            ["GD sublinear_v2", 91.94, 60.68],
            ["GD linear", 93.1, 60.58],
            ["GD superlinear_v1", 92.41, 57.21],
            ["GD superlinear_v2", 93.25, 58.56],
            ["FPI", 93.63, 71.65],
        ],
    ),
    # NFPI Table 2: lambda sweep on CIFAR-100.
    "nfpi_table2": (
        ["lam", "nf_top1", "cnn_top1"],
        [
            [10, 39.48, 31.37],
            [50, 63.58, 44.57],
            [100, 66.87, 46.38],
            [200, 69.29, 43.72],
            [300, 70.42, 42.65],
            [500, 70.08, 37.27],
        ],
    ),
    # NFPI Table 3: what the KLD term learns (NF-A / CNN-A, %).
    "nfpi_table3": (
        ["setting", "cifar10_nf_top1", "cifar10_cnn_top1", "cifar100_nf_top1", "cifar100_cnn_top1"],
        [
            ["data init (lambda=0)", 77.31, 62.1, 39.16, 23.03],
            ["means only", 93.2, 74.76, 71.65, 37.02],
            ["variances only", 88.75, 61.94, 57.76, 30.58],
            ["both", 93.63, 73.03, 70.42, 42.65],
        ],
    ),
    # GLEM Table 1: CE / GLEM baselines (NF-A, CNN-A; NaN: not applicable).
    "glem_table1": (
        ["setting", "cifar10_nf_top1", "cifar10_cnn_top1", "cifar100_nf_top1", "cifar100_cnn_top1"],
        [
            ["CE (Baseline 1)", math.nan, 75.54, math.nan, 37.40],
            ["GLEM lambda=0 (Baseline 2)", 57.83, 60.17, 19.12, 26.7],
            ["CEGLEM (Baseline 3)", 12.82, 76.03, 2.04, 38.85],
            ["GLEM", 92.02, 77.39, 67.67, 45.22],
        ],
    ),
    # GLEM Table 2: CIFAR-100 with the proxy metrics.
    "glem_table2": (
        ["setting", "nf_top1", "cnn_top1", "fid", "coverage", "label_reliability"],
        [
            ["CE", math.nan, 37.40, 37.62, 17.70, 12.58],
            ["GLEM lambda=0", 19.12, 26.7, 25.68, 19.77, 9.65],
            ["CEGLEM lambda0=3", 2.23, 39.40, 27.34, 17.83, 16.38],
            ["CEGLEM lambda0=10", 2.04, 38.85, 26.38, 17.97, 16.25],
            ["GLEM lambda0=3", 63.40, 45.95, 19.96, 25.93, 38.36],
            ["GLEM lambda0=10", 67.67, 45.22, 26.33, 19.15, 32.51],
        ],
    ),
    # GLEM Table 3: lambda_0 sweep on CIFAR-100 (coverage and label reliability in %, bpd at 5 bits).
    "glem_table3": (
        ["lam", "nf_top1", "cnn_top1", "fid", "coverage", "label_reliability", "bpd"],
        [
            [1, 26.45, 30.95, 21.54, 23.86, 21.04, 1.64],
            [3, 63.40, 45.95, 19.96, 25.93, 38.36, 1.74],
            [5, 66.53, 47.21, 23.71, 22.0, 35.39, 1.87],
            [10, 67.67, 45.22, 26.33, 19.14, 32.52, 2.07],
            [15, 68.23, 43.51, 31.36, 16.17, 30.10, 2.19],
            [20, 67.39, 42.85, 35.83, 14.35, 24.66, 2.25],
        ],
    ),
    # GLEM Table 5: sampling temperature and RFCM on CIFAR-100 (temperature NaN: RFCM).
    "glem_table5": (
        ["temperature", "cnn_top1", "fid", "coverage", "label_reliability"],
        [
            [1.2, 42.99, 30.15, 16.13, 26.82],
            [1.1, 43.63, 28.17, 17.21, 28.92],
            [1.0, 44.64, 26.90, 18.47, 30.86],
            [0.9, 45.22, 26.33, 19.15, 32.51],
            [0.8, 44.99, 26.45, 19.33, 33.67],
            [0.7, 44.17, 27.21, 19.19, 34.69],
            [math.nan, 49.74, 25.55, 22.47, 33.56],
        ],
    ),
    # GLEM Table 6: ablation on CIFAR-100 (KLD, sigmoid reparametrisation, RFCM).
    "glem_table6": (
        ["setting", "nf_top1", "cnn_top1", "fid", "coverage", "label_reliability"],
        [
            ["no KLD / Rep / RFCM", 19.12, 26.7, 25.68, 19.78, 9.66],
            ["KLD lambda0=10", 38.21, 27.87, 22.96, 21.96, 24.59],
            ["KLD lambda0=10 + Rep", 67.67, 45.22, 26.33, 19.15, 32.51],
            ["KLD lambda0=3 + Rep", 63.40, 45.95, 19.96, 25.93, 38.36],
            ["KLD lambda0=10 + Rep + RFCM", 67.50, 49.74, 25.55, 22.47, 33.56],
        ],
    ),
    # GLEM Table 7: which Gaussian parameters are learned (CIFAR-100, lambda0=10). The random
    # init row is unreadable in the available text and left out.
    "glem_table7": (
        ["setting", "nf_top1", "cnn_top1", "fid", "coverage", "label_reliability"],
        [
            ["means only", 64.31, 45.29, 20.29, 25.74, 35.70],
            ["variances only", 66.91, 41.16, 36.02, 15.76, 30.18],
            ["both", 66.49, 46.12, 21.43, 24.39, 36.38],
        ],
    ),
}


def paper_table(name: str) -> pd.DataFrame:
    """A table of published numbers (CIFAR, GPU scale): one of ``nfpi_table1..3`` (NFPI Tables
    1-3, docs/method.md §8) and ``glem_table1``, ``glem_table2``, ``glem_table3``, ``glem_table5``,
    ``glem_table6``, ``glem_table7`` (GLEM; FID on oracle features, Coverage and Label
    Reliability in %)."""
    if name not in _PAPER:
        raise ValueError(f"unknown paper table {name!r}; choose one of {sorted(_PAPER)}")
    columns, rows = _PAPER[name]
    return pd.DataFrame(rows, columns=columns)
