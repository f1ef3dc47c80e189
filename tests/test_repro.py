"""Tests of nfpi.repro: the code fingerprint, run keys and the tolerance check."""
from __future__ import annotations

import shutil

import pytest

from nfpi import repro
from nfpi.repro import ResultMismatch, expect


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
    for name in ("fpi.py", "flows.py", "repro.py"):
        path = package_copy / name
        text = path.read_text()
        path.write_text(text + "\n# a change\n")
        repro.code_fingerprint.cache_clear()
        assert repro.code_fingerprint() != before, f"a change to {name} must change the fingerprint"
        path.write_text(text)
        repro.code_fingerprint.cache_clear()
        assert repro.code_fingerprint() == before
    (package_copy / "new_module.py").write_text("x = 1\n")
    repro.code_fingerprint.cache_clear()
    assert repro.code_fingerprint() != before


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
