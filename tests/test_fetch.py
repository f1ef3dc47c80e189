"""``nfpi data fetch | list | check`` (nfpi.data.download, nfpi.data.checksums) without internet: a
stand-in for torchvision's MNIST class makes small fake splits, a checksum table made for them is
passed in (or patched over the committed one), and tmp_path is the data directory."""

from __future__ import annotations

import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from nfpi import cli
from nfpi import data as D
from nfpi.data import checksums, download

SIZES = {True: 12, False: 6}  # train, test images of the fake MNIST


class FakeMNIST:
    """torchvision.datasets.MNIST's attributes, deterministic, no network; counts its calls."""

    calls: list[bool] = []

    def __init__(self, root: str, train: bool, download: bool) -> None:
        FakeMNIST.calls.append(train)
        gen = torch.Generator().manual_seed(int(train))
        n = SIZES[train]
        self.data = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=gen)
        self.targets = torch.arange(n) % 10
        self.classes = [f"{k} - digit" for k in range(10)]


def fake_table() -> dict[str, dict]:
    """The sums of the fake splits as the conversion writes them (x channel last, classes "0".."9")."""
    table = {}
    for train, split in ((True, "train"), (False, "test")):
        fake = FakeMNIST("", train, False)
        x, y = fake.data.numpy()[..., None], fake.targets.numpy().astype(np.int64)
        digest = checksums.content_sha256(x, y, np.array([str(k) for k in range(10)]))
        table[f"mnist_{split}.npz"] = {"sha256": digest, "images": SIZES[train]}
    FakeMNIST.calls = []
    return table


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> dict[str, dict]:
    """torchvision's MNIST replaced by :class:`FakeMNIST`; the committed sums by the fake's."""
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "MNIST", FakeMNIST)
    table = fake_table()
    monkeypatch.setattr(checksums, "CHECKSUMS", table)
    monkeypatch.delenv("NFPI_DATA", raising=False)
    return table


def npz_files(root: Path) -> list[str]:
    """Every file in ``root`` but the raw archives' folder (temporary files included)."""
    return sorted(p.name for p in root.iterdir() if p.name != "raw")


def test_fetch_downloads_verifies_and_writes_both_splits(tmp_path: Path, fake: dict) -> None:
    lines: list[str] = []
    paths = download.fetch(["mnist"], tmp_path, fake, echo=lines.append)
    assert paths == [tmp_path / "mnist_train.npz", tmp_path / "mnist_test.npz"]
    assert npz_files(tmp_path) == ["mnist_test.npz", "mnist_train.npz"]  # no temporary file left
    assert FakeMNIST.calls == [True, False]
    assert len(lines) == 2 and all("fetched" in s and "verified" in s for s in lines), lines
    assert lines[0].startswith("mnist_train.npz: fetched, 12 images")
    test = D.load("mnist", "test", data_dir=tmp_path)
    assert len(test) == 6 and test.classes == tuple(str(k) for k in range(10))
    assert checksums.file_sha256(tmp_path / "mnist_test.npz") == fake["mnist_test.npz"]["sha256"]


def test_present_files_are_not_downloaded_again(tmp_path: Path, fake: dict) -> None:
    download.fetch(["mnist"], tmp_path, fake, echo=lambda s: None)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*.npz")}
    lines: list[str] = []
    download.fetch(["MNIST", "digits"], tmp_path, fake, echo=lines.append)
    assert FakeMNIST.calls == [True, False], "a present file was downloaded again"
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("*.npz")} == before
    assert lines[0] == "digits: ships with scikit-learn; nothing to fetch"
    assert [s.split(",")[0] for s in lines[1:]] == ["mnist_train.npz: present", "mnist_test.npz: present"]


def test_a_checksum_mismatch_is_refused_and_nothing_written(tmp_path: Path, fake: dict) -> None:
    wrong = {**fake, "mnist_train.npz": {"sha256": "0" * 64, "images": 12}}
    with pytest.raises(D.ChecksumError) as info:
        download.fetch(["mnist"], tmp_path, wrong, echo=lambda s: None)
    message = str(info.value)
    assert "\n" not in message and "checksum mismatch" in message and "mnist_train.npz" in message
    assert "was not written" in message and "nfpi data fetch mnist" in message
    assert npz_files(tmp_path) == []
    # load(download=True) goes through the same check, against the committed table
    checksums.CHECKSUMS["mnist_test.npz"] = {"sha256": "f" * 64, "images": 6}
    with pytest.raises(D.ChecksumError, match="mnist_test.npz"):
        D.load("mnist", "test", data_dir=tmp_path, download=True)
    assert npz_files(tmp_path) == []


def test_a_failed_write_leaves_no_partial_file(
    tmp_path: Path, fake: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    def half_written(file, **arrays) -> None:
        file.write(b"PK\x03\x04 half an archive")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez_compressed", half_written)
    with pytest.raises(OSError, match="disk full"):
        download.fetch(["mnist"], tmp_path, fake, echo=lambda s: None)
    assert npz_files(tmp_path) == []


def test_offline_names_the_missing_files_where_they_go_and_the_command(
    tmp_path: Path, fake: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision.datasets

    download.fetch(["mnist"], tmp_path, fake, echo=lambda s: None)  # MNIST present, CIFAR-10 not

    def offline(*args, **kwargs):
        raise urllib.error.URLError(OSError(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    (tmp_path / "mnist_test.npz").unlink()
    monkeypatch.setenv("NFPI_DATA", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["nfpi", "data", "fetch", "mnist", "cifar10"])
    with pytest.raises(SystemExit) as info:
        cli.run()
    message = str(info.value.code)
    assert message.startswith("error: could not download (offline? URLError") and "\n" not in message
    assert "missing in " + str(tmp_path) in message and "$NFPI_DATA" in message
    assert "mnist_test.npz, cifar10_train.npz, cifar10_test.npz." in message
    assert "mnist_train" not in message  # present, so not missing
    assert "Run `nfpi data fetch mnist cifar10` on a machine with internet access" in message
    assert npz_files(tmp_path) == ["mnist_train.npz"]


def test_list_and_check_report_present_missing_and_mismatched_files(
    tmp_path: Path, fake: dict, capsys: pytest.CaptureFixture
) -> None:
    download.fetch(["mnist"], tmp_path, echo=lambda s: None)
    status = {(f.name, f.split): f for f in download.files(root=tmp_path)}
    assert status["mnist", "train"].present and status["mnist", "train"].listed
    assert status["mnist", "test"].size == (tmp_path / "mnist_test.npz").stat().st_size
    assert not status["cifar10", "train"].present and ("digits", "train") not in status
    cli.main(["data", "list", "--data-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert f"present       0.0 MB  {tmp_path / 'mnist_train.npz'}" in out
    assert f"missing           -  {tmp_path / 'cifar10_test.npz'}" in out
    assert "digits" in out and "built in" in out

    assert cli.main(["data", "check", "--data-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().out.count("sha256 ok") == 2
    x = np.zeros((6, 28, 28, 1), np.uint8)  # right shape and count, other images
    np.savez_compressed(
        tmp_path / "mnist_test.npz", x=x, y=np.arange(6), classes=np.array(list("0123456789"))
    )
    problems = download.check(tmp_path, echo=lambda s: None)
    assert len(problems) == 1 and "mnist_test.npz: checksum mismatch" in problems[0]
    assert "delete it and run `nfpi data fetch mnist`" in problems[0]
    with pytest.raises(D.ChecksumError, match="1 dataset file"):
        cli.main(["data", "check", "--data-dir", str(tmp_path)])
    assert "mnist_test.npz: CHECKSUM MISMATCH" in capsys.readouterr().out


def test_a_present_file_of_the_wrong_size_fails_the_cheap_check(tmp_path: Path, fake: dict) -> None:
    np.savez_compressed(
        tmp_path / "mnist_train.npz",
        x=np.zeros((5, 28, 28, 1), np.uint8),
        y=np.arange(5),
        classes=np.array(list("0123456789")),
    )
    with pytest.raises(D.DatasetFormatError, match=r"expected x uint8 \(12, 28, 28, 1\).*delete it"):
        download.fetch(["mnist"], tmp_path, echo=lambda s: None)
    assert FakeMNIST.calls == []


def test_the_sum_is_of_the_arrays_not_of_the_archive_bytes(tmp_path: Path) -> None:
    x, y, classes = (
        np.arange(48, dtype=np.uint8).reshape(3, 4, 4, 1),
        np.array([0, 1, 0]),
        np.array(["a", "b"]),
    )
    np.savez_compressed(tmp_path / "a.npz", x=x, y=y, classes=classes)
    np.savez(tmp_path / "b.npz", classes=classes, x=x, y=y.astype(np.int32))
    assert (tmp_path / "a.npz").read_bytes() != (tmp_path / "b.npz").read_bytes()
    assert checksums.file_sha256(tmp_path / "a.npz") == checksums.file_sha256(tmp_path / "b.npz")
    assert checksums.content_sha256(x[::-1], y, classes) != checksums.content_sha256(x, y, classes)
    assert checksums.content_sha256(x, y, classes[::-1]) != checksums.content_sha256(x, y, classes)


@pytest.mark.parametrize("name", ["mnist_test.npz", "cifar10_test.npz"])
def test_the_committed_sums_match_the_real_files(name: str) -> None:
    """The test splits (fast); ``nfpi data check`` verifies the training splits too."""
    real = D.data_dir()
    if not (real / name).is_file():
        pytest.skip(f"{name} not present in {real}")
    assert checksums.file_sha256(real / name) == checksums.CHECKSUMS[name]["sha256"]
    assert download.quick_check(real / name, name.split("_")[0]) == checksums.CHECKSUMS[name]["images"]
