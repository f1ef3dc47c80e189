"""Tests of nfpi.repro: the code fingerprint, run keys and the tolerance check."""

from __future__ import annotations

import math
import shutil

import pandas as pd
import pytest
from scipy import stats

from nfpi import repro
from nfpi.repro import (
    ResultMismatch,
    draw_tolerance,
    expect,
    expect_recorded,
    pooled_spread,
    seed_summary,
)


@pytest.fixture
def package_copy(tmp_path, monkeypatch):
    """A copy of the nfpi sources that the fingerprint reads instead of the installed ones."""
    copy = tmp_path / "nfpi"
    shutil.copytree(repro.PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(repro, "PACKAGE", copy)
    repro.code_fingerprint.cache_clear()
    yield copy
    repro.code_fingerprint.cache_clear()


def test_fingerprint_follows_every_source_file(package_copy):
    before = repro.code_fingerprint()
    assert len(before) == 16 and int(before, 16) >= 0
    for name in ("prior/fpi.py", "flows/glow.py", "data/splits.py", "repro.py", "__init__.py"):
        path = package_copy / name
        text = path.read_text()
        path.write_text(text + "\n_A_CHANGE = 1\n")
        repro.code_fingerprint.cache_clear()
        assert repro.code_fingerprint() != before, f"a change to {name} must change the fingerprint"
        path.write_text(text)
        repro.code_fingerprint.cache_clear()
        assert repro.code_fingerprint() == before
    (package_copy / "new_module.py").write_text("x = 1\n")
    repro.code_fingerprint.cache_clear()
    assert repro.code_fingerprint() != before
    (package_copy / "new_module.py").unlink()
    (package_copy / "prior" / "new_rule.py").write_text("x = 1\n")
    repro.code_fingerprint.cache_clear()
    assert repro.code_fingerprint() != before, "a new module in a subpackage must change the fingerprint"


def test_fingerprint_keeps_docstring_and_comment_edits(package_copy):
    before = repro.code_fingerprint()
    path = package_copy / "prior" / "fpi.py"
    text = path.read_text()
    edited = text.replace('"""Class Gaussians by fixed-point', '"""Edited: class Gaussians by fixed-point', 1)
    edited = edited.replace("def solve(", "# a new comment\ndef solve(", 1)
    edited = edited.replace("    rho: float = 1e3,", "    rho: float = 1e3,  # comment", 1)
    assert edited.count("Edited") == 1 and "# a new comment" in edited and "# comment" in edited
    path.write_text(edited)
    (package_copy / "flows" / "glow.py").write_text(
        (package_copy / "flows" / "glow.py")
        .read_text()
        .replace('class Glow(nn.Module):\n    """', 'class Glow(nn.Module):\n    """More. ', 1)
    )
    repro.code_fingerprint.cache_clear()
    assert repro.code_fingerprint() == before, "docstring and comment edits must keep the fingerprint"


@pytest.mark.parametrize(
    "old, new",
    [
        ("RELEASED_TOL = 0.1  #", "RELEASED_TOL = 0.2  #"),  # a constant
        ("    rho: float = 1e3,", "    rho: float = 1e4,"),  # a default
        ('Stop = Literal["relative", "released"]', 'Stop = Literal["released", "relative"]'),  # an order
    ],
)
def test_fingerprint_follows_constants_and_statements(package_copy, old, new):
    before = repro.code_fingerprint()
    path = package_copy / "prior" / "fpi.py"
    text = path.read_text()
    assert text.count(old) == 1
    path.write_text(text.replace(old, new))
    repro.code_fingerprint.cache_clear()
    assert repro.code_fingerprint() != before


def test_fingerprint_of_another_root_is_cached_per_root(tmp_path):
    copy = tmp_path / "nfpi"
    shutil.copytree(repro.PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert repro.code_fingerprint(copy) == repro.code_fingerprint()
    (copy / "train" / "loop.py").write_text((copy / "train" / "loop.py").read_text() + "\nX = 1\n")
    assert repro.code_fingerprint(copy) == repro.code_fingerprint(copy)  # cached for that root
    assert repro.code_fingerprint(str(copy)) != repro.code_fingerprint()  # another key: read again


def test_run_key_covers_config_and_code_but_not_ignored_keys(monkeypatch):
    cfg = {"seed": 0, "threads": 1, "gaussians": {"lam": 10.0}}
    key = repro.run_key(cfg, ignore=("threads",))
    assert repro.run_key({**cfg, "threads": 2}, ignore=("threads",)) == key
    assert repro.run_key({**cfg, "seed": 1}, ignore=("threads",)) != key
    assert repro.run_key({**cfg, "gaussians": {"lam": 11.0}}, ignore=("threads",)) != key
    assert repro.run_dir("runs", "fpi", cfg, ("threads",)).name == f"fpi-{key}"
    monkeypatch.setattr(repro, "code_fingerprint", lambda: "0" * 16)
    assert repro.run_key(cfg, ignore=("threads",)) != key


def test_expect_prints_within_tolerance_and_fails_outside(capsys):
    expect("NF-Acc", 96.4, recorded=96.8, tol=0.5, spread="3 x seed std")
    assert capsys.readouterr().out == "NF-Acc: 96.40, recorded 96.80 +- 0.50 (3 x seed std): ok\n"
    with pytest.raises(ResultMismatch, match=r"NF-Acc: 95\.00, recorded 96\.80 \+- 0\.50 .*OUTSIDE"):
        expect("NF-Acc", 95.0, recorded=96.8, tol=0.5, spread="3 x seed std")
    with pytest.raises(ResultMismatch, match="OUTSIDE"):
        expect("bits/dim", float("nan"), recorded=3.0, tol=0.5, spread="s")
    with pytest.raises(ValueError, match="tol must be > 0"):
        expect("x", 1.0, recorded=1.0, tol=0.0, spread="s")
    assert issubclass(ResultMismatch, AssertionError)  # pytest and nbval report it as a failure


def test_seed_summary_pairs_differences_by_seed():
    results = pd.DataFrame(
        {
            "setting": ["baseline", "nfa"] * 3,
            "seed": [0, 0, 1, 1, 2, 2],
            "top1": [50.0, 52.0, 60.0, 61.0, 70.0, 73.0],
            "top5": [90.0] * 6,
        }
    )
    s = seed_summary(results, ["top1", "top5"], baseline="baseline")
    assert list(s.index) == ["baseline", "nfa"] and (s["seeds"] == 3).all()
    assert s.loc["nfa", "top1_mean"] == pytest.approx(62.0) and s.loc[
        "baseline", "top1_std"
    ] == pytest.approx(10.0)
    assert s.loc["nfa", "top1_diff_mean"] == pytest.approx(2.0)
    assert s.loc["nfa", "top1_diff_std"] == pytest.approx(1.0)  # differences 2, 1, 3
    # Student-t 95 % half-width with 2 degrees of freedom: 4.303 * 1 / sqrt(3).
    assert s.loc["nfa", "top1_diff_ci95"] == pytest.approx(4.3027 / 3**0.5, rel=1e-4)
    assert s.loc["baseline", "top1_diff_mean"] == 0
    with pytest.raises(ValueError, match="baseline 'none' is not a value"):
        seed_summary(results, ["top1"], baseline="none")


def test_pooled_spread_and_draw_tolerance():
    table = pd.DataFrame(
        {
            "setting": ["a"] * 3 + ["b"] * 3 + ["c"],
            "acc": [90.0, 92.0, 94.0, 50.0, 51.0, 52.0, 70.0],
        }
    )
    # within-setting variances 4 and 1 (2 degrees of freedom each); c has one seed: left out
    s, df = pooled_spread(table, "acc")
    assert df == 4 and s == pytest.approx(math.sqrt((2 * 4 + 2 * 1) / 4))
    assert pooled_spread(table[table["setting"] == "c"], "acc") == (0.0, 0)
    # one new draw against a mean of 3: t(1 - FALSE_ALARM / 2, 4) * s * sqrt(1 + 1/3)
    expected = stats.t.ppf(1 - repro.FALSE_ALARM / 2, 4) * s * math.sqrt(4 / 3)
    assert draw_tolerance(s, df, 1, 3, floor=0.5) == pytest.approx(expected)
    assert draw_tolerance(s, df, 1, 3, floor=100.0) == 100.0  # never below the resolution
    assert draw_tolerance(s, df, 1, 3, 0.5, false_alarm=0.05) < expected  # a looser check is narrower
    with pytest.raises(ValueError, match="degree of freedom"):
        draw_tolerance(1.0, 0, 1, 3, 0.5)


def test_expect_recorded_treats_a_new_machine_as_another_draw(capsys):
    # 5 settings of 3 seeds with std 1 each (pooled std 1, 10 degrees of freedom) and one, "e",
    # whose own spread is larger (std 2): each setting uses the larger of its own and the pooled std.
    offsets = [-1.0, 0.0, 1.0]
    recorded = pd.DataFrame(
        {
            "setting": [s for s in "abcde" for _ in offsets],
            "seed": [0, 1, 2] * 5,
            "acc": [90 + 10 * i + (2 if s == "e" else 1) * o for i, s in enumerate("abcde") for o in offsets],
        }
    )
    pooled, df = pooled_spread(recorded, "acc")
    assert df == 10 and pooled == pytest.approx(math.sqrt((4 * 2 + 2 * 4) / 10))
    k = stats.t.ppf(1 - repro.FALSE_ALARM / 2, 10)
    tol_a = k * pooled * math.sqrt(2 / 3)
    tol_e = k * 2.0 * math.sqrt(2 / 3)
    shifted = recorded.assign(acc=recorded["acc"] + 0.99 * tol_a)
    expect_recorded(shifted[shifted["setting"] == "a"], recorded, {"acc": 0.5})
    assert f"recorded 90.00 +- {tol_a:.2f}" in capsys.readouterr().out
    with pytest.raises(ResultMismatch, match="a acc"):
        expect_recorded(recorded.assign(acc=recorded["acc"] + 1.01 * tol_a), recorded, {"acc": 0.5})
    far = recorded.assign(acc=recorded["acc"] + 0.99 * tol_e)
    expect_recorded(far[far["setting"] == "e"], recorded, {"acc": 0.5})
    assert f"recorded 130.00 +- {tol_e:.2f}" in capsys.readouterr().out
    # A metric a setting does not produce (NaN on both sides) is skipped; NaN on one side fails.
    both_nan = recorded.assign(acc=float("nan"))
    expect_recorded(both_nan, both_nan, {"acc": 0.5})
    with pytest.raises(ResultMismatch, match="OUTSIDE"):
        expect_recorded(both_nan, recorded, {"acc": 0.5})
    expect_recorded(recorded, None, {"acc": 0.5})  # nothing recorded yet: reported, not failed
    assert "nothing recorded yet" in capsys.readouterr().out
    with pytest.raises(ValueError, match="needs the spread of >= 2"):
        expect_recorded(recorded, recorded[recorded["seed"] == 0], {"acc": 0.5})


def test_markdown_summary_and_readme_blocks(tmp_path):
    results = pd.DataFrame(
        {
            "setting": ["data", "fpi"] * 3,
            "seed": [0, 0, 1, 1, 2, 2],
            "acc": [90.0, 92.0, 91.0, 94.0, 92.0, 93.0],
            "bpd": [3.0] * 6,
        }
    )
    table = repro.markdown_summary(results, ["acc", "bpd"], baseline="data", settings=["fpi", "data"])
    assert table.splitlines()[0] == "| setting | seeds | acc | bpd | acc - data (95 % CI) |"
    assert table.splitlines()[2] == "| fpi | 3 | 93.00 ± 1.00 | 3.00 ± 0.00 | +2.00 ± 2.48 |"
    assert table.splitlines()[3].endswith("| – |")
    results.to_csv(tmp_path / "r.csv", index=False)
    stale = "text\n<!-- results: r.csv metrics=acc,bpd baseline=data -->\n| old |\n<!-- /results -->\nmore\n"
    fresh = repro.render_readme(stale, tmp_path)
    assert (
        "| old |" not in fresh
        and "| fpi | 3 | 93.00 ± 1.00" in fresh
        and fresh.endswith("<!-- /results -->\nmore\n")
    )
    assert repro.render_readme(fresh, tmp_path) == fresh
    # Further column=value options keep only the matching rows (here one seed: no spread, and
    # no interval for its paired difference).
    one = repro.render_readme(
        "<!-- results: r.csv metrics=acc seed=2 baseline=data -->\n<!-- /results -->", tmp_path
    )
    assert (
        "| fpi | 1 | 93.00 (one seed) | +1.00 (one seed) |" in one
        and "| data | 1 | 92.00 (one seed) | – |" in one
    )
    assert "nan" not in one


def test_orderings_are_paired_t_tests_holm_corrected(tmp_path):
    """Each claim is a paired t-test over shared seeds; the family is Holm-corrected, so a claim
    significant alone (p < 0.05) is 'not shown' when read with others; missing settings say so."""
    seeds = range(4)
    base = [50.0, 52.0, 51.0, 53.0]
    rows = {"base": base, "big": [b + 10 + e for b, e in zip(base, [0.1, -0.2, 0.3, 0.0])]}
    rows["small"] = [b + 1 + e for b, e in zip(base, [0.8, -0.5, 0.7, -0.2])]  # p = 0.034 alone
    rows["worse"] = [b - 5 + e for b, e in zip(base, [0.2, 0.1, -0.3, 0.0])]
    rows["noise"] = [b + e for b, e in zip(base, [0.5, -0.6, 0.4, -0.1])]
    table = pd.DataFrame(
        [{"setting": s, "seed": i, "acc": v} for s, vals in rows.items() for i, v in zip(seeds, vals)]
    )
    alone = repro.orderings(table, "acc", [("small", "base")])
    assert alone["p"].iloc[0] < 0.05 and alone["p_holm"].iloc[0] == alone["p"].iloc[0]
    assert alone["verdict"].iloc[0] == "holds"
    family = repro.orderings(
        table,
        "acc",
        [("big", "base"), ("small", "base"), ("base", "worse"), ("noise", "base"), ("x", "base")],
    )
    p, holm = family["p"], family["p_holm"]
    assert (holm.dropna() >= p.dropna()).all()
    order = p.dropna().sort_values().index
    assert holm[order].is_monotonic_increasing
    assert family["verdict"].tolist() == ["holds", "not shown", "holds", "not shown", "not run yet"]
    diff = table.pivot(index="seed", columns="setting", values="acc")
    assert family["diff_mean"].iloc[0] == pytest.approx((diff["big"] - diff["base"]).mean())
    table.to_csv(tmp_path / "r.csv", index=False)
    block = repro.render_readme(
        "<!-- results: r.csv metrics=acc claims=big>base,x>base -->\n<!-- /results -->", tmp_path
    )
    assert "| big > base | 4 | 61.55 vs 51.50 | +10.05 ± 0.33 | 2.4e-06 | **holds** |" in block
    assert "| x > base | – | – | – | – | **not run yet** |" in block
