"""scripts/full_data.py and its committed results: every full-data run the script
names is a valid config, and the committed CSVs are what its code writes: the commands, the
finished candidates and each table group's choice on seed-0 validation NF accuracy. The runs
themselves take hours on a CPU and are not retrained here; the shipped flows they produced are
re-evaluated by tests/test_pretrained.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import script

from nfpi.config import TrainConfig
from nfpi.train import check_config

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "results" / "full"
full_data = script("full_data")
DATASETS = list(full_data.STUDIES)


@pytest.mark.parametrize("dataset", DATASETS)
def test_every_run_is_a_valid_config(dataset: str) -> None:
    study = full_data.STUDIES[dataset]
    assert [] in study.candidates.values(), "the config must be one of its own candidates"
    for items in study.candidates.values():
        check_config(TrainConfig.from_yaml(REPO / study.config, **full_data._overrides(items)))
    base = TrainConfig.from_yaml(REPO / study.config, **full_data._overrides(study.table_budget))
    for group in study.groups.values():
        for overrides in group.values():
            check_config(base.replace(**overrides))


@pytest.mark.parametrize("dataset", DATASETS)
def test_committed_candidates_are_the_scripts_finished_runs(dataset: str) -> None:
    study = full_data.STUDIES[dataset]
    table = pd.read_csv(RESULTS / f"{dataset}_candidates.csv")
    commands = dict(zip(table["candidate"], table["command"]))
    assert commands == {label: full_data._command(study, items) for label, items in study.candidates.items()}
    for label, runs in table.groupby("candidate"):  # a candidate may be stopped early, the config not
        items = study.candidates[label]
        epochs = TrainConfig.from_yaml(REPO / study.config, **full_data._overrides(items)).epochs
        assert list(runs["epoch"]) == list(range(len(runs))) and len(runs) <= epochs
        assert len(runs) == epochs or items, f"{label}: the config's own run is not finished"
        assert (runs["acc_top1"].iloc[-1] > 0) == (len(runs) == epochs), (
            f"{label}: test metrics only when finished"
        )


@pytest.mark.parametrize("dataset", DATASETS)
def test_committed_tables_are_the_scripts_choices(dataset: str) -> None:
    study = full_data.STUDIES[dataset]
    settings = {name: o for g in study.groups.values() for name, o in g.items()}
    table = pd.read_csv(RESULTS / f"{dataset}_tables.csv")
    assert list(dict.fromkeys(table["group"])) == list(study.groups)
    for _, row in table.iterrows():
        items = [*study.table_budget, *(f"{k}={v}" for k, v in settings[row["setting"]].items())]
        assert row["command"] == full_data._command(study, [*items, f"seed={row['seed']}"])
    for group, rows in table.groupby("group"):
        assert set(rows["setting"]) == set(study.groups[group]), f"{group}: a candidate is missing"
        first = rows[rows["seed"] == study.seeds[0]]
        best = first.loc[first["val_acc_top1"].idxmax(), "setting"]
        assert (rows["chosen"] == (rows["setting"] == best)).all(), f"{group}: not the validation choice"
        assert sorted(rows.loc[rows["chosen"], "seed"]) == list(study.seeds)
    # the per-epoch metrics of every table run end in its final row
    final = pd.read_csv(RESULTS / f"{dataset}_tables_epochs.csv").groupby(["setting", "seed"]).last()
    assert len(final) == len(table)
    for _, row in table.iterrows():
        for metric in ("val_acc_top1", "acc_top1", "test_bpd"):
            assert final.loc[(row["setting"], row["seed"]), metric] == pytest.approx(row[metric])


def test_unknown_group_is_refused_before_training(monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "argv", ["full_data.py", "tables", "--dataset", "cifar10", "--groups", "gd"])
    with pytest.raises(SystemExit):
        full_data.main()
    assert "unknown group ['gd'] for cifar10" in capsys.readouterr().err
