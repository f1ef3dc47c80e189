"""SHA-256 sums of the dataset files, committed with the code, and the checks that use them.

A dataset file ``{name}_{split}.npz`` (docs/data.md) is a zip archive, and numpy writes zip
timestamps into it: the same images converted on two machines, or twice on one, give files
whose *bytes* differ. So the sum is taken over what the file holds, not over its bytes
(:func:`content_sha256`): each array's name, dtype and shape, then its data (``x`` as uint8,
``y`` as little-endian int64, ``classes`` as a JSON list of strings). A correct download
converted on any machine matches :data:`CHECKSUMS`; a file with other images, labels, class
names or shapes does not.

:data:`CHECKSUMS` maps a file name to its sum and image count (the count is the cheap check of
:func:`nfpi.data.fetch.fetch`, read from the archive's headers without decoding the images).
Every function takes the table as an argument (``None``: :data:`CHECKSUMS`), so tests and other
data sources can pass their own.

Example:
    >>> import numpy as np
    >>> x, y = np.zeros((2, 4, 4, 1), np.uint8), np.array([0, 1])
    >>> content_sha256(x, y, np.array(["a", "b"]))[:16]
    'c2cda7cf2cefe9b3'
    >>> verify_arrays("toy_train.npz", x, y, np.array(["a", "b"]), table={}) is None  # not listed
    True
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .arrays import DatasetFormatError

__all__ = [
    "CHECKSUMS",
    "ChecksumError",
    "content_sha256",
    "expected",
    "file_sha256",
    "mismatch_message",
    "verify_arrays",
]

# file -> SHA-256 of its arrays (content_sha256) and number of images. Computed from the npz files
# that torchvision's MNIST and CIFAR-10 convert to (nfpi.data.load(..., download=True)).
CHECKSUMS: dict[str, dict[str, Any]] = {
    "mnist_train.npz": {
        "sha256": "9abb883cd2085d5021d799cdfbdf859884259beda2442d6bfef2a4367d19f27b",
        "images": 60000,
    },
    "mnist_test.npz": {
        "sha256": "1a3927ded1f21ebc425ec476b6c4622f554afc83ef561f21df92cd8a30cb3f40",
        "images": 10000,
    },
    "cifar10_train.npz": {
        "sha256": "8e965050fdf28bf0e47194b2425dd70c15fff5daedd53c47a734ae7de9ff7770",
        "images": 50000,
    },
    "cifar10_test.npz": {
        "sha256": "e8771598285024ee45b89ca5a395fcbbf908d2c8e19059e9523e8f5d19bdd956",
        "images": 10000,
    },
}


class ChecksumError(DatasetFormatError):
    """A dataset's arrays do not match the SHA-256 sum committed in :data:`CHECKSUMS`."""


def _feed(h: Any, name: str, array: np.ndarray) -> None:
    h.update(f"{name} {array.dtype.str} {array.shape}\0".encode())
    h.update(np.ascontiguousarray(array).tobytes())


def content_sha256(x: np.ndarray, y: np.ndarray, classes: np.ndarray) -> str:
    """SHA-256 (hex) of a dataset's arrays: x uint8 (N, H, W, C), y (N,) labels, classes (K,)."""
    h = hashlib.sha256()
    _feed(h, "x", np.asarray(x))
    _feed(h, "y", np.asarray(y).astype("<i8"))
    h.update(b"classes\0" + json.dumps([str(c) for c in np.asarray(classes).tolist()]).encode())
    return h.hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """:func:`content_sha256` of the npz file ``path`` (arrays ``x``, ``y``, ``classes``)."""
    with np.load(path, allow_pickle=False) as npz:
        return content_sha256(npz["x"], npz["y"], npz["classes"])


def expected(filename: str, table: dict[str, dict[str, Any]] | None = None) -> dict[str, Any] | None:
    """The committed entry (``sha256``, ``images``) of ``filename``, or None when it has none."""
    return (CHECKSUMS if table is None else table).get(filename)


def mismatch_message(filename: str, path: Path, got: str, want: str, remedy: str) -> str:
    """The one line of a :class:`ChecksumError`."""
    return (
        f"{path}: checksum mismatch: the SHA-256 of its arrays is {got[:16]}..., the sum committed for "
        f"{filename} (nfpi/data/checksums.py) is {want[:16]}...; {remedy}"
    )


def verify_arrays(
    filename: str,
    x: np.ndarray,
    y: np.ndarray,
    classes: np.ndarray,
    table: dict[str, dict[str, Any]] | None = None,
    path: Path | None = None,
    remedy: str = "the download is corrupt or its source changed; nothing was written",
) -> str | None:
    """The sum of the arrays when it matches the committed one; None when ``filename`` has no
    committed sum; else :class:`ChecksumError` naming the file and ``remedy``."""
    entry = expected(filename, table)
    if entry is None:
        return None
    got = content_sha256(x, y, classes)
    if got != entry["sha256"]:
        raise ChecksumError(mismatch_message(filename, path or Path(filename), got, entry["sha256"], remedy))
    return got
