"""The dataset files in one command: fetch the missing splits, list what is there, check the sums.

The library side of ``nfpi data fetch | list | check`` (:mod:`nfpi.cli`, docs/data.md):

- :func:`fetch`: for each named dataset, both splits; a file already present gets a cheap check
  (the archive's headers: dtype, image shape and count, no decoding) and is never downloaded
  again; a missing one is downloaded through ``torchvision.datasets`` with its progress bar,
  checked against the committed SHA-256 (:mod:`nfpi.data.checksums`) and only then written,
  atomically. Offline, one :class:`FetchError` line names every missing file, where it goes and
  the command to run on a machine with internet access.
- :func:`files`: each registered dataset split: present or missing, path, size.
- :func:`check`: the full SHA-256 of every present file against the committed sums.

Every function takes the data directory (None: :func:`nfpi.data.data_dir`) and the checksum
table (None: :data:`nfpi.data.checksums.CHECKSUMS`) as arguments.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .arrays import DatasetFormatError
from .checksums import ChecksumError, expected, file_sha256, mismatch_message
from .datasets import DATASETS, ENV_VAR, SPLITS, _download, data_dir, registered

__all__ = ["FetchError", "FileStatus", "check", "check_or_raise", "fetch", "files", "quick_check", "where"]

Echo = Callable[[str], object]


class FetchError(ConnectionError):
    """A download failed (offline, or every mirror refused): one line naming the missing files."""


@dataclass(frozen=True)
class FileStatus:
    """One dataset split's file: ``size`` in bytes (None: missing); ``listed``: it has a
    committed SHA-256."""

    name: str
    split: str
    path: Path
    size: int | None
    listed: bool

    @property
    def present(self) -> bool:
        """Whether the file exists."""
        return self.size is not None


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def _keys(names: Iterable[str] | None) -> list[str]:
    """Registry keys of ``names`` (None: every registered dataset), in order, without repeats."""
    if names is None:
        return list(DATASETS)
    keys: list[str] = []
    for name in names:
        key = registered(name)
        if key is None:
            raise ValueError(f"unknown dataset {name!r}; the registered datasets are {', '.join(DATASETS)}")
        keys += [] if key in keys else [key]
    return keys


def where(root: Path) -> str:
    """``root`` and how it was chosen, for messages."""
    how = f"${ENV_VAR}" if os.environ.get(ENV_VAR) else f"data/ in the repository; set {ENV_VAR} for another"
    return f"{root.resolve()} ({how})"


def files(
    names: Iterable[str] | None = None,
    root: str | os.PathLike[str] | None = None,
    checksums: dict[str, dict[str, Any]] | None = None,
) -> list[FileStatus]:
    """The :class:`FileStatus` of each split of ``names`` (None: every registered dataset that is
    stored in a file; ``digits`` ships with scikit-learn and has none)."""
    folder = data_dir(root)
    out = []
    for key in _keys(names):
        if DATASETS[key].torchvision_name is None:
            continue
        for split in SPLITS:
            path = folder / f"{key}_{split}.npz"
            size = path.stat().st_size if path.is_file() else None
            out.append(FileStatus(key, split, path, size, expected(path.name, checksums) is not None))
    return out


def _header(archive: zipfile.ZipFile, member: str) -> tuple[tuple[int, ...], np.dtype]:
    with archive.open(member) as f:
        major, _ = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)  # the header only; the data stay compressed
    return shape, dtype


def quick_check(path: Path, name: str, checksums: dict[str, dict[str, Any]] | None = None) -> int:
    """The image count of dataset file ``path`` from its headers alone (milliseconds): x uint8 of
    the registered image shape, y of the same length, the committed count; else
    DatasetFormatError naming the file and the fix."""
    remedy = f"delete it and run `nfpi data fetch {name}`"
    try:
        with zipfile.ZipFile(path) as archive:
            (xs, xt), (ys, _) = _header(archive, "x.npy"), _header(archive, "y.npy")
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise DatasetFormatError(
            f"{path} is not a readable dataset file ({type(err).__name__}: {err}); {remedy}"
        ) from None
    c, h, w = DATASETS[name].shape
    entry = expected(path.name, checksums)
    count = entry["images"] if entry is not None else xs[0] if xs else None
    if xt != np.uint8 or xs != (count, h, w, c) or ys != (count,):
        raise DatasetFormatError(
            f"{path}: x {xt} {xs}, y {ys}, expected x uint8 ({count}, {h}, {w}, {c}) and y ({count},); "
            f"{remedy}"
        )
    return int(xs[0])


def _offline(err: Exception, missing: list[Path], keys: list[str], root: Path) -> FetchError:
    source = err.__context__ or err  # _download raises its one line `from None`
    cause = f"{type(source).__name__}: {(str(source).strip().splitlines() or [''])[0]}"
    return FetchError(
        f"could not download (offline? {cause}); missing in {where(root)}: "
        f"{', '.join(p.name for p in missing)}. "
        f"Run `nfpi data fetch {' '.join(keys)}` on a machine with internet access and copy the .npz "
        f"files into that directory (or point {ENV_VAR} at a directory that holds them)."
    )


def fetch(
    names: Iterable[str],
    root: str | os.PathLike[str] | None = None,
    checksums: dict[str, dict[str, Any]] | None = None,
    echo: Echo = print,
) -> list[Path]:
    """Make both splits of each of ``names`` present in ``root``; one ``echo`` line per file.

    Present files get :func:`quick_check` only (the full sum: :func:`check`); missing ones are
    downloaded, verified and written atomically. Returns the paths. Offline: :class:`FetchError`
    naming every file still missing; a sum mismatch: :class:`ChecksumError`, nothing written."""
    keys = _keys(names)
    folder = data_dir(root)
    for key in keys:
        if DATASETS[key].torchvision_name is None:
            echo(f"{key}: ships with scikit-learn; nothing to fetch")
    todo = files([k for k in keys if DATASETS[k].torchvision_name is not None], folder, checksums)
    for i, f in enumerate(todo):
        if f.present:
            n = quick_check(f.path, f.name, checksums)
            echo(f"{f.path.name}: present, {n} images, {_mb(f.size or 0)}: {f.path}")
            continue
        try:
            digest = _download(f.name, f.split, folder, checksums)
        except ConnectionError as err:
            missing = [g.path for g in todo[i:] if not g.path.is_file()]
            raise _offline(err, missing, [k for k in keys if k in {g.name for g in todo}], folder) from None
        n = quick_check(f.path, f.name, checksums)
        check_note = f"sha256 {digest[:16]}... verified" if digest else "no committed sum, not verified"
        echo(f"{f.path.name}: fetched, {n} images, {_mb(f.path.stat().st_size)}, {check_note}: {f.path}")
    return [f.path for f in todo]


def check(
    root: str | os.PathLike[str] | None = None,
    checksums: dict[str, dict[str, Any]] | None = None,
    echo: Echo = print,
) -> list[str]:
    """Verify every present dataset file in ``root``: the SHA-256 of its arrays against the
    committed sum (files without one: :func:`quick_check`); one ``echo`` line per file. Returns
    the problems, one line each (empty: all good)."""
    problems = []
    for f in files(root=root, checksums=checksums):
        if not f.present:
            continue
        entry = expected(f.path.name, checksums)
        remedy = f"delete it and run `nfpi data fetch {f.name}`"
        try:
            if entry is None:
                quick_check(f.path, f.name, checksums)
                echo(f"{f.path.name}: format ok (no committed sum): {f.path}")
                continue
            got = file_sha256(f.path)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as err:
            problems.append(str(err) if isinstance(err, DatasetFormatError) else f"{f.path}: {err}; {remedy}")
            echo(f"{f.path.name}: UNREADABLE: {f.path}")
            continue
        if got == entry["sha256"]:
            echo(f"{f.path.name}: sha256 ok: {f.path}")
        else:
            problems.append(mismatch_message(f.path.name, f.path, got, entry["sha256"], remedy))
            echo(f"{f.path.name}: CHECKSUM MISMATCH: {f.path}")
    return problems


def check_or_raise(
    root: str | os.PathLike[str] | None = None,
    checksums: dict[str, dict[str, Any]] | None = None,
    echo: Echo = print,
) -> int:
    """:func:`check`, raising one :class:`ChecksumError` that lists the problems; else the
    number of files checked."""
    problems = check(root, checksums, echo)
    if problems:
        raise ChecksumError(f"{len(problems)} dataset file(s) failed the check: " + " | ".join(problems))
    return sum(f.present for f in files(root=root, checksums=checksums))
