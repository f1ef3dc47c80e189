"""Progress that suits the place (nfpi._progress): tqdm.auto in Jupyter and terminals, one plain
line per epoch in logs and papermill output, chosen by NFPI_PROGRESS or detected."""

from __future__ import annotations

import io
import sys

import pytest

from nfpi import _progress
from nfpi.config import TrainConfig
from nfpi.train import train


def test_mode_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NFPI_PROGRESS", "log")
    assert _progress.mode() == "log" and isinstance(_progress.tqdm(range(2)), _progress.LogLines)
    monkeypatch.setenv("NFPI_PROGRESS", "bar")
    assert _progress.mode() == "bar" and not isinstance(_progress.tqdm(range(2)), _progress.LogLines)
    monkeypatch.setenv("NFPI_PROGRESS", "widget")
    with pytest.raises(ValueError, match="NFPI_PROGRESS='widget' is not a progress mode; use one of"):
        _progress.mode()
    monkeypatch.delenv("NFPI_PROGRESS")
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # redirected: a log
    assert _progress.mode() == "log"


def test_log_lines_one_per_item_without_timings(capsys) -> None:
    bar = _progress.tqdm(range(2, 5), desc="training", initial=2, total=5)
    for epoch in bar:
        for _ in _progress.LogLines(range(50), desc=f"epoch {epoch}", leave=False):
            pass  # per-batch bars print nothing in a log
        bar.set_postfix(acc=f"{epoch * 10:.1f}")
    assert capsys.readouterr().err.splitlines() == [
        "training 3/5 acc=20.0",
        "training 4/5 acc=30.0",
        "training 5/5 acc=40.0",
    ]
    long = _progress.LogLines(total=1000, desc="NFA")
    for _ in range(1000):
        long.update(1)
    assert len(capsys.readouterr().err.splitlines()) == 10  # a long bar: every tenth


@pytest.mark.slow
def test_training_logs_one_line_per_epoch(tmp_path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("NFPI_PROGRESS", "log")
    cfg = TrainConfig.from_dict(
        {
            "dataset": "digits",
            "bits": 5,
            "per_class": 20,
            "test_per_class": 10,
            "epochs": 2,
            "batch_size": 50,
            "init_images": 64,
            "threads": 1,
            "optim": {"warmup": 2},
            "model": {"levels": 1, "steps": 1, "hidden": 8},
        }
    )
    train(cfg, tmp_path, progress=True)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" bpd=")[0] for line in lines] == ["training 1/2", "training 2/2"]
    assert all(" acc=" in line for line in lines)
