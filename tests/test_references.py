"""Tests of nfpi.experiments.references: the papers' published numbers."""

from __future__ import annotations

import pytest

from nfpi.experiments import paper_table


def test_paper_tables():
    t1 = paper_table("nfpi_table1").set_index("setting")
    assert (
        t1.loc["FPI", "cifar100_nf_top1"] == 71.65
        and t1.loc["data init (Baseline 1)", "cifar10_nf_top1"] == 77.31
    )
    assert paper_table("nfpi_table2").set_index("lam").loc[100, "cnn_top1"] == 46.38
    assert paper_table("glem_table5")["temperature"].isna().sum() == 1
    with pytest.raises(ValueError, match="unknown paper table"):
        paper_table("table9")
