"""The ``nfpi`` command line (nfpi.cli): every command's --help, training on a folder of the
user's own data through ``nfpi train``, and eval / sample / augment on the trained run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nfpi import cli, train

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "epochs=1",
    "model.levels=1",
    "model.steps=1",
    "model.hidden=8",
    "batch_size=20",
    "init_images=64",
    "per_class=null",
    "test_per_class=null",
    "val_fraction=0",
    "optim.warmup=2",
    "--no-progress",
]
CLASSES = ("ring", "bar", "dot")


def own_folder(root: Path) -> Path:
    """train.npz / test.npz of 3 classes of 12x12 grey images (docs/method.md §9), as a user would write."""
    rng = np.random.default_rng(0)
    folder = root / "own"
    folder.mkdir()
    for split, n in (("train", 60), ("test", 30)):
        y = np.arange(n) % 3
        x = rng.integers(0, 60, (n, 12, 12, 1)).astype(np.uint8)
        for k in range(3):  # a class-specific bright block makes the classes learnable
            x[y == k, 4 * k : 4 * k + 4, :, 0] += 150
        np.savez_compressed(folder / f"{split}.npz", x=x, y=y.astype(np.int64), classes=np.array(CLASSES))
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    run_dir = root / "run"
    metrics = cli.main(
        [
            "train",
            "--config",
            str(REPO / "configs/mnist_cpu.yaml"),
            "--run-dir",
            str(run_dir),
            f"dataset={own_folder(root)}",
            *TINY,
        ]
    )
    assert metrics["epoch"] == 0 and np.isfinite(metrics["test_bpd"])
    return run_dir


def test_help_lists_the_commands(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("train", "eval", "sample", "augment"):
        assert f"    {command} " in out
    for command in ("eval", "sample", "augment", "train"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        assert "usage:" in capsys.readouterr().out


def test_train_on_own_folder_reads_shape_and_classes(run: Path) -> None:
    model, prior, cfg = train.load_checkpoint(run)
    assert tuple(model.in_shape) == (1, 12, 12) and prior.num_classes == 3
    assert torch.load(run / "checkpoint.pt", weights_only=True)["shape"] == [1, 12, 12]


def test_eval_reports_accuracy_bpd_and_confusion(run: Path, tmp_path: Path, capsys) -> None:
    result = cli.main(["eval", str(run), "--json", str(tmp_path / "eval.json")])
    confusion = np.array(result["confusion"])
    assert confusion.shape == (3, 3) and confusion.sum() == 30 and (confusion.sum(1) == 10).all()
    # top-1 accuracy is the confusion matrix's diagonal share, as computed by nfpi.evaluation.evaluate_flow
    assert result["metrics"]["acc_top1"] == pytest.approx(100 * np.trace(confusion) / 30)
    assert result["metrics"]["acc_top5"] == 100.0  # 3 classes
    assert json.loads((tmp_path / "eval.json").read_text())["classes"] == list(CLASSES)
    out = capsys.readouterr().out
    assert "NF-Acc top-1" in out and "bits/dim" in out and "ring" in out


def test_sample_writes_a_grid(run: Path, tmp_path: Path) -> None:
    from PIL import Image

    out = cli.main(
        [
            "sample",
            str(run),
            "--class",
            "bar",
            "--class",
            "0",
            "-n",
            "4",
            "--temperature",
            "0.5",
            "--out",
            str(tmp_path / "grid.png"),
        ]
    )
    with Image.open(out) as img:
        assert img.width > img.height > 0
    with pytest.raises(
        ValueError, match=r"--class 'cat' is neither a class name .* \['ring', 'bar', 'dot'\]"
    ):
        cli.main(["sample", str(run), "--class", "cat", "--out", str(tmp_path / "x.png")])


def test_augment_writes_spec_npz(run: Path, tmp_path: Path) -> None:
    out = cli.main(
        [
            "augment",
            str(run),
            "--out",
            str(tmp_path / "nfa.npz"),
            "--copies",
            "2",
            "--k",
            "2",
            "--no-progress",
        ]
    )
    with np.load(out, allow_pickle=False) as npz:
        assert npz["x"].shape == (120, 12, 12, 1) and npz["x"].dtype == np.uint8
        assert list(npz["classes"]) == list(CLASSES)
        assert np.array_equal(npz["y"], np.tile(np.arange(60) % 3, 2))


def test_module_entry_point_errors_are_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "nfpi.cli", "eval", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("error: no checkpoint at") and "\n" not in proc.stderr.strip()
