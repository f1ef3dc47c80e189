"""Tests of nfpi.experiments: one tidy row per run (docs/method.md §6-§8 metrics), the idempotent CSV,
the reuse of finished runs and rows, and clear errors. Tiny flows and ResNets on digits."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st

from nfpi import repro
from nfpi.config import TrainConfig
from nfpi.evaluation import ClassifierConfig
from nfpi.experiments import (
    EvalConfig,
    Oracle,
    append_row,
    best_setting,
    choose_lambda,
    evaluate_run,
    generate,
    load_oracle,
    read_rows,
    run_grid,
)
from nfpi.experiments import grid as experiments
from nfpi.train import keyed_run_dir, load_checkpoint, train

CNN = ClassifierConfig(epochs=1, width=4, batch_size=20, flip=False, device="cpu")
EVAL = EvalConfig(samples_per_class=4, k=3, classifier=CNN)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def base() -> TrainConfig:
    return tiny_config(seed=2)


@pytest.fixture(scope="module")
def oracle(base, tmp_path_factory) -> Oracle:
    return load_oracle(base, CNN, tmp_path_factory.mktemp("oracle") / "oracle.pt")


@pytest.fixture(scope="module")
def run(base, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "fpi"
    train(base, run_dir, progress=False)
    return run_dir


# ---------------------------------------------------------------------------------- one row
def test_row_holds_config_settings_and_metrics(run, oracle, base):
    row = evaluate_run(run, EVAL, oracle, name="fpi")
    assert (row["run"], row["eval"]) == ("fpi", "n=4,T=1,ms=1,diag,cnn,gen")
    assert row["gaussians.lam"] == 40.0 and row["model.hidden"] == 8 and row["eval.temperature"] == 1.0
    assert row["eval.classifier.epochs"] == 1
    assert row["lam"] == 40.0 and math.isclose(row["lam_normalised"], 40.0 / 90)
    # NF accuracy and bits/dim are those training reported (same EMA model, same test set).
    final = pd.read_csv(run / "metrics.csv").iloc[-1]
    assert math.isclose(row["nf_top1"], final["acc_top1"]) and math.isclose(
        row["bpd"], final["test_bpd"], rel_tol=1e-6
    )
    assert row["n_generated"] + row["nonfinite"] == 40
    for metric in ("cnn_top1", "cnn_top5", "coverage", "precision", "recall", "label_reliability"):
        assert 0.0 <= row[metric] <= 100.0, metric
    assert row["fid"] >= 0 and math.isnan(row["code_agreement"])


def test_rows_are_reproducible(run, oracle):
    a = evaluate_run(run, EVAL, oracle)
    b = evaluate_run(run, EVAL, oracle)
    for key in ("nf_top1", "cnn_top1", "fid", "coverage", "label_reliability"):
        assert a[key] == b[key], key


def test_temperature_and_rfcm_change_the_samples(run, oracle):
    cold = evaluate_run(run, EVAL.replace(temperature=0.3, cnn=False), oracle)
    warm = evaluate_run(run, EVAL.replace(cnn=False), oracle)
    assert cold["eval"] == "n=4,T=0.3,ms=1,diag,gen" and cold["fid"] != warm["fid"]
    full = evaluate_run(run, EVAL.replace(covariance="rfcm", cnn=False), oracle)
    assert full["eval"] == "n=4,T=1,ms=1,rfcm,gen" and full["bpd"] != warm["bpd"]


def test_generate_returns_images_on_the_bit_grid(run):
    model, prior, cfg = load_checkpoint(run)
    y = torch.arange(10).repeat_interleave(3)
    x, labels, dropped = generate(model, prior, y, cfg.bits, temperature=0.7, seed=1, batch_size=7)
    assert x.shape == (30 - dropped, 1, 8, 8) and dropped == 0 and torch.equal(labels, y)
    levels = (x + 1) * 2**cfg.bits / 2 - 0.5  # bin centres sit on integer levels
    assert torch.allclose(levels, levels.round(), atol=1e-4)
    again, _, _ = generate(model, prior, y, cfg.bits, temperature=0.7, seed=1, batch_size=30)
    assert torch.equal(x, again)  # the batch size does not change the samples


# ---------------------------------------------------------------------------------- errors
def test_checkpoint_of_another_dataset_or_class_count(run, oracle):
    with pytest.raises(ValueError, match=r"dataset: flow 'digits', oracle/test set 'mnist'"):
        evaluate_run(
            run, EVAL, Oracle(oracle.model, "mnist", 5, 0, oracle.classes, oracle.test_x, oracle.test_y)
        )
    with pytest.raises(ValueError, match=r"number of classes: flow 10, oracle/test set 5"):
        evaluate_run(
            run,
            EVAL,
            Oracle(oracle.model, "digits", 5, 0, oracle.classes[:5], oracle.test_x, oracle.test_y % 5),
        )
    with pytest.raises(ValueError, match=r"bits: flow 5, oracle/test set 8"):
        evaluate_run(
            run, EVAL, Oracle(oracle.model, "digits", 8, 0, oracle.classes, oracle.test_x, oracle.test_y)
        )


def test_too_few_samples_for_fid_and_coverage(run, oracle):
    with pytest.raises(ValueError, match=r"too few samples for FID / Coverage with k=10: 10 generated"):
        evaluate_run(run, EVAL.replace(samples_per_class=1, k=10), oracle)
    tiny_test = Oracle(oracle.model, "digits", 5, 0, oracle.classes, oracle.test_x[:3], oracle.test_y[:3])
    with pytest.raises(ValueError, match="3 real test images"):
        evaluate_run(run, EVAL, tiny_test)


def test_generated_metrics_need_an_oracle(run):
    with pytest.raises(ValueError, match="need an oracle"):
        evaluate_run(run, EVAL)
    row = evaluate_run(run, EVAL.replace(cnn=False, generated=False))
    assert row["eval"] == "nf" and "fid" not in row


def test_eval_tags_tell_evaluations_apart():
    tags = {
        EVAL.tag(),
        EVAL.replace(temperature=0.7).tag(),
        EVAL.replace(mean_scale=1.3).tag(),
        EVAL.replace(samples_per_class=5).tag(),
        EVAL.replace(covariance="rfcm").tag(),
        EVAL.replace(covariance="rfcm", rfcm_rank=8).tag(),
        EVAL.replace(cnn=False).tag(),
        EVAL.replace(generated=False).tag(),
        EVAL.replace(seed=1).tag(),
        EVAL.replace(classifier=ClassifierConfig(seed=1)).tag(),
        EVAL.replace(cnn=False, generated=False).tag(),
    }
    assert len(tags) == 11


def test_eval_config_validation():
    with pytest.raises(ValueError, match="covariance"):
        EvalConfig(covariance="full")
    with pytest.raises(ValueError, match="samples_per_class"):
        EvalConfig(samples_per_class=0)


def test_oracle_cache_of_other_data_is_refused(base, oracle, tmp_path):
    path = tmp_path / "oracle.pt"
    load_oracle(base, CNN, path)
    with pytest.raises(ValueError, match="bits: cached 5 vs requested 4"):
        load_oracle(base.replace(bits=4), CNN, path)


# ---------------------------------------------------------------------------------- CSV
def test_append_row_replaces_rows_with_the_same_key(tmp_path):
    path = tmp_path / "sub" / "results.csv"
    append_row(path, {"run": "a", "eval": "nf", "x": 1.0})
    append_row(path, {"run": "b", "eval": "nf", "x": 2.0})
    append_row(path, {"run": "a", "eval": "T=1", "x": 3.0, "y": "new column"})
    table = append_row(path, {"run": "a", "eval": "nf", "x": 4.0})
    assert len(table) == 3
    again = read_rows(path)
    assert again.set_index(["run", "eval"])["x"].to_dict() == {
        ("b", "nf"): 2.0,
        ("a", "T=1"): 3.0,
        ("a", "nf"): 4.0,
    }
    assert [p.name for p in path.parent.iterdir()] == ["results.csv"]  # no temporary file left behind
    with pytest.raises(ValueError, match="key columns"):
        append_row(path, {"run": "c"})


def test_read_rows_refuses_a_foreign_csv(tmp_path):
    assert read_rows(tmp_path / "missing.csv").empty
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a results table"):
        read_rows(tmp_path / "other.csv")


def test_run_grid_trains_and_evaluates_only_what_is_missing(base, oracle, tmp_path, monkeypatch):
    grid = {"data": {"gaussians.prior": "data"}, "fpi": {}}
    csv = tmp_path / "results.csv"
    evals = [EVAL.replace(cnn=False), EVAL.replace(cnn=False, generated=False)]
    first = run_grid(grid, base, tmp_path / "runs", csv, oracle, evals)
    assert list(zip(first["run"], first["eval"])) == [
        ("data", "n=4,T=1,ms=1,diag,gen"),
        ("data", "nf"),
        ("fpi", "n=4,T=1,ms=1,diag,gen"),
        ("fpi", "nf"),
    ]
    assert first.loc[0, "lam"] == 0.0 and first.loc[2, "lam"] == 40.0

    def forbidden(*args, **kwargs):
        raise AssertionError("a finished row was recomputed")

    # Everything is in the CSV: neither training nor evaluation runs again.
    monkeypatch.setattr(experiments, "train", forbidden)
    monkeypatch.setattr(experiments, "evaluate_run", forbidden)
    again = run_grid(grid, base, tmp_path / "runs", csv, oracle, evals)
    pd.testing.assert_frame_equal(again, first)

    # A new evaluation of a finished run: the checkpoint is reused, not retrained.
    monkeypatch.undo()
    checkpoint = keyed_run_dir(tmp_path / "runs", "flow", base) / "checkpoint.pt"
    stamp = checkpoint.stat().st_mtime_ns
    cooler = run_grid(
        {"fpi": {}}, base, tmp_path / "runs", csv, oracle, EVAL.replace(cnn=False, temperature=0.5)
    )
    assert cooler.loc[0, "eval"] == "n=4,T=0.5,ms=1,diag,gen"
    assert checkpoint.stat().st_mtime_ns == stamp
    assert len(read_rows(csv)) == 5

    # Another config under the same name (one more epoch): its own run folder, re-evaluated in place.
    longer = run_grid({"fpi": {}}, base.replace(epochs=2), tmp_path / "runs", csv, oracle, evals[1])
    assert longer.loc[0, "epochs"] == 2 and longer.loc[0, "config_hash"] != first.loc[3, "config_hash"]
    assert (keyed_run_dir(tmp_path / "runs", "flow", base.replace(epochs=2)) / "checkpoint.pt").exists()
    assert len(read_rows(csv)) == 5


def test_rows_made_by_other_code_are_recomputed(base, oracle, tmp_path, monkeypatch):
    """The cache key covers the code: a row and a run of another fingerprint are not reused."""
    csv = tmp_path / "results.csv"
    ev = EVAL.replace(cnn=False, generated=False)
    first = run_grid({"fpi": {}}, base, tmp_path / "runs", csv, oracle, ev)
    assert first.loc[0, "code"] == repro.code_fingerprint()
    monkeypatch.setattr(repro, "code_fingerprint", lambda: "0123456789abcdef")
    again = run_grid({"fpi": {}}, base, tmp_path / "runs", csv, oracle, ev)
    assert (
        again.loc[0, "code"] == "0123456789abcdef"
        and again.loc[0, "config_hash"] != first.loc[0, "config_hash"]
    )
    assert len(list((tmp_path / "runs").iterdir())) == 2  # trained again in its own folder
    assert again.loc[0, "nf_top1"] == pytest.approx(first.loc[0, "nf_top1"])  # same computation, same numbers


def test_ce_and_ceglem_rows(base, oracle, tmp_path):
    ev = EVAL.replace(cnn=False)
    ce = {"codes.rows": 4, "gaussians.prior": "standard"}
    rows = run_grid({"ce": ce, "ceglem": {"codes.rows": 4}}, base, tmp_path, tmp_path / "r.csv", oracle, ev)
    ce_row, ceglem_row = rows.iloc[0], rows.iloc[1]
    assert math.isnan(ce_row["nf_top1"]) and math.isnan(ce_row["code_agreement"])
    assert 0 <= ceglem_row["code_agreement"] <= 100 and 0 <= ceglem_row["nf_top1"] <= 100
    assert ce_row["n_generated"] == 40 and ce_row["codes.rows"] == 4


def test_metric_grid_draws_one_panel_per_metric(tmp_path):
    from nfpi import plots

    table = pd.DataFrame(
        {
            "lam": [0.0, 10.0, 100.0, 10.0],
            "source": ["ours", "ours", "ours", "paper"],
            "nf_top1": [90.0, 92.0, 93.0, 50.0],
            "fid": [5.0, 4.0, 6.0, math.nan],
        }
    )
    fig = plots.metric_grid(
        table, "lam", ["nf_top1", "fid", "absent"], row="source", logx=True, path=tmp_path / "lines.png"
    )
    assert len(fig.axes) == 4 and (tmp_path / "lines.png").stat().st_size > 0
    # lambda = 0 cannot sit on a log axis: it is drawn as a horizontal line.
    assert any(len(ax.lines) > 1 for ax in fig.axes)
    bars = plots.metric_grid(table.assign(setting=list("abcd")), "setting", ["nf_top1", "fid"], kind="bar")
    assert len(bars.axes) == 2
    with pytest.raises(ValueError, match="kind"):
        plots.metric_grid(table, "lam", ["fid"], kind="pie")


def test_training_curves_draw_a_family_in_one_colour(tmp_path):
    """``families``: the seeds of one setting share a colour and one legend entry; bits/dim
    spanning more than a factor 3 are drawn on a log scale."""
    from nfpi import plots

    def run(bpd: float) -> pd.DataFrame:
        return pd.DataFrame(
            {"epoch": [0, 1], "train_bpd": [bpd, bpd], "test_bpd": [bpd, bpd], "acc_top1": [40.0, 50.0]}
        ).assign(solved=[1.0, math.nan])

    tables = {"a, seed 0": run(2.0), "a, seed 1": run(2.1), "b, seed 0": run(12.0)}
    fig = plots.training_curves(
        tables, families={"a, seed 0": "a", "a, seed 1": "a"}, path=tmp_path / "c.png"
    )
    colours = [line.get_color() for line in fig.axes[0].lines]
    assert colours[0] == colours[1] != colours[2]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["a", "b, seed 0"]
    assert fig.axes[0].get_yscale() == "log" and fig.axes[2].get_yscale() == "linear"
    alone = plots.training_curves({k: v for k, v in tables.items() if k.startswith("a")})
    assert alone.axes[0].get_yscale() == "linear"
    assert len({line.get_color() for line in alone.axes[0].lines}) == 2  # default: one colour a run

    def minor_labels(fig) -> list[str]:
        fig.canvas.draw()
        return [t.get_text() for t in fig.axes[0].yaxis.get_minorticklabels() if t.get_text()]

    assert minor_labels(fig)  # 2 to 12: within a decade, 3, 4, ... labelled
    spike = plots.training_curves({**tables, "c, seed 0": run(2e6)})  # a loss spike: 6 decades
    assert spike.axes[0].get_yscale() == "log" and not minor_labels(spike)


@given(
    st.lists(st.tuples(st.floats(0, 100), st.floats(1, 60), st.floats(1, 60)), min_size=2, max_size=6),
    st.floats(1, 60),
)
@settings(max_examples=60, deadline=None)
def test_best_setting_is_the_best_within_the_bpd_bound(candidates, bound):
    """Without a bound the best mean validation accuracy over the seeds; with one, the best among
    the settings whose mean validation bits/dim are within it (none: an error that says what
    to do); never a setting over the bound."""
    table = pd.DataFrame(
        [
            {"setting": f"s{i}", "seed": seed, "val_acc_top1": acc + seed, "val_bpd": bpd}
            for i, (acc, bpd0, bpd1) in enumerate(candidates)
            for seed, bpd in enumerate((bpd0, bpd1))
        ]
    )
    means = table.groupby("setting", sort=False)[["val_acc_top1", "val_bpd"]].mean()
    assert best_setting(table) == means["val_acc_top1"].idxmax()
    within = means[means["val_bpd"] <= bound]
    if within.empty:
        with pytest.raises(ValueError, match="raise the bound or add candidates with a smaller lambda"):
            best_setting(table, max_val_bpd=bound)
        return
    chosen = best_setting(table, max_val_bpd=bound)
    assert means.loc[chosen, "val_bpd"] <= bound
    assert means.loc[chosen, "val_acc_top1"] == within["val_acc_top1"].max()


def test_choose_lambda_picks_each_solvers_best_validation_candidate(tmp_path, monkeypatch):
    """Each solver is chosen among its own candidates by mean validation NF accuracy over the
    seeds; test metrics play no part (here they would choose the other way)."""
    val = {
        ("fpi", 10.0): [70.0, 72.0],
        ("fpi", 50.0): [75.0, 71.0],
        ("gd", 10.0): [60.0, 64.0],
        ("gd", 50.0): [61.0, 62.0],
    }

    def fake(base_cfg, grid, seeds, runs_dir, name, progress):
        rows = []
        for label, overrides in grid.items():
            key = (overrides["gaussians.prior"], overrides["gaussians.lam"])
            for seed, v in zip(seeds, val[key]):
                bpd = overrides["gaussians.lam"] / 10  # bits/dim grow with lambda, as measured
                rows.append(
                    {"setting": label, "seed": seed, "val_acc_top1": v, "val_bpd": bpd, "acc_top1": 100 - v}
                )
        return pd.DataFrame(rows)

    monkeypatch.setattr(experiments, "train_settings", fake)
    solvers = {"fpi": {"gaussians.prior": "fpi"}, "gd": {"gaussians.prior": "gd"}}
    table, chosen = choose_lambda(
        tiny_config(), solvers, {"fpi": [10, 50], "gd": [10, 50]}, [0, 1], tmp_path, "x"
    )
    assert chosen == {"fpi": 50.0, "gd": 10.0}
    assert list(dict.fromkeys(table["setting"])) == [
        "fpi lambda=10",
        "fpi lambda=50",
        "gd lambda=10",
        "gd lambda=50",
    ]
    assert set(table["solver"]) == {"fpi", "gd"}
    # A bound on validation bits/dim takes fpi's 50 (5 bits/dim) out: 10 is its best within 2.
    _, chosen = choose_lambda(
        tiny_config(), solvers, {"fpi": [10, 50], "gd": [10, 50]}, [0, 1], tmp_path, "x", max_val_bpd=2.0
    )
    assert chosen == {"fpi": 10.0, "gd": 10.0}
    # Refused before any run trains: a solver without candidates, a candidate that is no number.
    monkeypatch.setattr(experiments, "train_settings", lambda *a: pytest.fail("trained before the check"))
    with pytest.raises(ValueError, match="no candidate lambdas"):
        choose_lambda(tiny_config(), solvers, {"fpi": [10]}, [0], tmp_path, "x")
    with pytest.raises(ValueError, match=r"lambdas\['gd'\].*not a number"):
        choose_lambda(tiny_config(), solvers, {"fpi": [10], "gd": ["1e4x"]}, [0], tmp_path, "x")
    # Text that is a number (PyYAML reads 1.0e4 as a string) is read as that number.
    monkeypatch.setattr(experiments, "train_settings", fake)
    _, chosen = choose_lambda(
        tiny_config(), solvers, {"fpi": ["10", "5.0e1"], "gd": [10, 50]}, [0, 1], tmp_path, "x"
    )
    assert chosen == {"fpi": 50.0, "gd": 10.0}
