"""Every lambda chosen on validation in a committed table is a choice its grid supports: inside
the grid, or at an end that a bound caps (the paper's J is unbounded above 55.3 with learned
variances, K = 10), or tied there with its neighbour (no trend past the end). A choice at an
open end says to extend the grid and run again."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from nfpi.prior import unbounded_threshold

RESULTS = Path(__file__).resolve().parents[1] / "results"


def grid_supports(means: pd.Series, capped_above: float) -> bool:
    """``means``: mean validation metric per lambda (sorted); whether its argmax needs no
    candidate beyond the grid."""
    best = means.idxmax()
    lams = list(means.index)
    i = lams.index(best)
    if 0 < i < len(lams) - 1:
        return True
    neighbour = lams[1] if i == 0 else lams[-2]
    if means[neighbour] == means[best]:
        return True
    return i == len(lams) - 1 and lams[-1] * 1.5 > capped_above  # the next step would pass the bound


def test_the_rule_flags_an_open_end():
    assert grid_supports(pd.Series([90.0, 95.0, 93.0], index=[1e3, 1e4, 1e5]), float("inf"))
    assert not grid_supports(pd.Series([90.0, 93.0, 95.0], index=[1e3, 1e4, 1e5]), float("inf"))
    assert grid_supports(pd.Series([95.0, 95.0, 93.0], index=[10.0, 20.0, 50.0]), 55.3)
    assert not grid_supports(pd.Series([96.0, 95.0, 93.0], index=[10.0, 20.0, 50.0]), 55.3)
    assert grid_supports(pd.Series([90.0, 93.0, 95.0], index=[10.0, 20.0, 50.0]), 55.3)


@pytest.mark.parametrize(
    ("table", "variances_learned"),
    [
        ("02_train_flow_digits_cpu.csv", True),
        # NF accuracy still rises at 1e7 while bits/dim collapse (docs/results.md §1): an open
        # end that a larger lambda would not close; strict, so closing it shows here
        pytest.param(
            "02_train_flow_mnist_cpu.csv",
            False,
            marks=pytest.mark.xfail(strict=True, reason="validation accuracy rises with lambda to 1e7"),
        ),
    ],
)
def test_committed_lambda_choices_are_inside_their_grids(table, variances_learned):
    rows = pd.read_csv(RESULTS / table)
    selection = rows[rows["setting"].str.contains(" lambda=")]
    assert len(selection), f"{table} holds no lambda candidates"
    for solver, runs in selection.groupby("solver"):
        lam = runs["setting"].str.split(" lambda=").str[1].astype(float)
        means = runs.groupby(lam)["val_acc_top1"].mean().sort_index()
        paper_j = variances_learned and solver in ("gd", "fpi_paper")  # the paper's J, unbounded above 55.3
        cap = unbounded_threshold(10) if paper_j else float("inf")
        assert grid_supports(means, cap), (
            f"{table}: {solver} chose lambda at an open end of {list(means.index)}"
        )


@pytest.mark.parametrize("ratio", [2.0, 3.0, 5.0])
def test_bounded_bits_per_dim_choices_are_inside_their_grids(ratio):
    """Within ``ratio`` times data init's validation bits/dim (the CIFAR-10 campaign's rule at
    2, ``Study.max_bpd_ratio``), MNIST-3k's open end closes: every solver's choice lies inside
    {1e4, ..., 1e7}, and the same for any ratio from 2 to 5 (docs/results.md §1)."""
    rows = pd.read_csv(RESULTS / "02_train_flow_mnist_cpu.csv")
    bound = ratio * rows.loc[rows["setting"] == "data", "val_bpd"].mean()
    selection = rows[rows["setting"].str.contains(" lambda=")]
    for solver, runs in selection.groupby("solver"):
        lam = runs["setting"].str.split(" lambda=").str[1].astype(float)
        means = runs.groupby(lam)[["val_acc_top1", "val_bpd"]].mean().sort_index()
        allowed = means[means["val_bpd"] <= bound]
        best = allowed["val_acc_top1"].idxmax()
        assert means.index[0] < best < means.index[-1], f"{solver}: {best} at an end of {list(means.index)}"
