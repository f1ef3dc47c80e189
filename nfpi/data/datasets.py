"""Datasets: the registry :data:`DATASETS`, storage and loading (docs/method.md §9). A new dataset goes here.

Storage (docs/method.md §9): one compressed ``{name}_{split}.npz`` per dataset split with ``x`` uint8
(N, H, W, C), ``y`` int64 (N,) and ``classes`` (K,) strings, in the directory given by
:func:`data_dir` (env var ``NFPI_DATA``; a relative value, and the default ``data/``, are
taken relative to the repository root, so notebooks running in ``notebooks/`` find the same
files). In memory images are channel-first uint8 tensors (:class:`ImageArrays`).

Datasets (:data:`DATASETS`, or a folder):

- ``digits``: scikit-learn ``load_digits`` (1,797 8x8 images, values 0..16, shipped with
  scikit-learn, never downloaded). Values become uint8 by ``round(v * 255 / 16)`` (half up).
  Train/test is a deterministic stratified 80/20 split (:func:`nfpi.data.splits.split_arrays` with
  ``seed=DIGITS_SPLIT_SEED``): 1,438 train / 359 test images.
- torchvision image-classification datasets (``mnist``, ``fashionmnist``, ``kmnist``,
  ``qmnist``, ``usps``, ``svhn``, ``cifar10``, ``cifar100``, ``stl10``; torchvision's spelling
  such as ``FashionMNIST`` or ``CIFAR-100`` works too): read from the npz files. With
  ``download=True`` a missing file is fetched through ``torchvision.datasets`` (raw archives
  kept in ``<data_dir>/raw``) and converted to the npz format (written atomically).
- any other name is a folder (as given, else under :func:`data_dir`) holding ``train.npz`` and
  ``test.npz`` in the format of docs/method.md §9, or ``train/`` and ``test/`` each with one subfolder of
  images per class (torchvision's ImageFolder layout; class names are the sorted subfolder
  names). Shape, channels and classes are read from the data.

The container :class:`~nfpi.data.arrays.ImageArrays` is in :mod:`nfpi.data.arrays`, subsets and
splits in :mod:`nfpi.data.splits`, preprocessing (docs/method.md §4.7: quantisation, dequantisation,
bits/dim, the training loader) in :mod:`nfpi.data.preprocess`.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._util import atomic_write
from .arrays import DatasetFormatError, ImageArrays
from .checksums import verify_arrays
from .splits import split_arrays

__all__ = [
    "DATASETS",
    "DIGITS_SPLIT_SEED",
    "REPO_ROOT",
    "DatasetInfo",
    "check_dataset",
    "data_dir",
    "info",
    "load",
    "registered",
]

ENV_VAR = "NFPI_DATA"
# The repository root when nfpi is used from a checkout (editable install), else the working
# directory: a relative NFPI_DATA must not depend on where a kernel or a shell happens to stand.
_PACKAGE_PARENT = Path(__file__).resolve().parents[2]  # nfpi/data/datasets.py -> the checkout
REPO_ROOT = _PACKAGE_PARENT if (_PACKAGE_PARENT / "pyproject.toml").is_file() else Path.cwd()
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
DIGITS_SPLIT_SEED = 0
DIGITS_TRAIN_FRACTION = 0.8
SPLITS = ("train", "test")


@dataclass(frozen=True)
class DatasetInfo:
    """Static description of a supported dataset: image ``shape`` (C, H, W), ``num_classes`` K.

    ``flip`` is the default of horizontal-flip augmentation while training (Glow / the
    paper use it for natural images). It is off for digits, whose identity a mirror changes.
    ``torchvision_name`` is the ``torchvision.datasets`` class used by ``download=True``
    (``None``: the data ships with a package, or a folder of the user's); ``split_arg``: that
    class selects the split by ``split="train"/"test"`` rather than ``train=True/False``;
    ``channels_first``: its ``data`` array is (N, C, H, W) rather than (N, H, W[, C]).
    """

    shape: tuple[int, int, int]
    num_classes: int
    flip: bool
    torchvision_name: str | None
    split_arg: bool = False
    channels_first: bool = False


DATASETS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo((1, 8, 8), 10, flip=False, torchvision_name=None),
    "mnist": DatasetInfo((1, 28, 28), 10, flip=False, torchvision_name="MNIST"),
    "fashionmnist": DatasetInfo((1, 28, 28), 10, flip=False, torchvision_name="FashionMNIST"),
    "kmnist": DatasetInfo((1, 28, 28), 10, flip=False, torchvision_name="KMNIST"),
    "qmnist": DatasetInfo((1, 28, 28), 10, flip=False, torchvision_name="QMNIST"),
    "usps": DatasetInfo((1, 16, 16), 10, flip=False, torchvision_name="USPS"),
    "svhn": DatasetInfo(
        (3, 32, 32), 10, flip=False, torchvision_name="SVHN", split_arg=True, channels_first=True
    ),
    "cifar10": DatasetInfo((3, 32, 32), 10, flip=True, torchvision_name="CIFAR10"),
    "cifar100": DatasetInfo((3, 32, 32), 100, flip=True, torchvision_name="CIFAR100"),
    "stl10": DatasetInfo(
        (3, 96, 96), 10, flip=True, torchvision_name="STL10", split_arg=True, channels_first=True
    ),
}


def data_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """The dataset directory: ``path`` if given (relative to the working directory), else
    ``$NFPI_DATA``, else ``data``; the latter two relative to :data:`REPO_ROOT`."""
    if path is not None:
        return Path(path)
    return REPO_ROOT / Path(os.environ.get(ENV_VAR) or "data").expanduser()


_data_dir = data_dir  # load() has a parameter named data_dir that shadows the function


def registered(name: str) -> str | None:
    """The :data:`DATASETS` key of ``name`` ("CIFAR-100" -> "cifar100"), or None for a folder."""
    key = name.lower().replace("-", "").replace("_", "")
    return key if key in DATASETS else None


def check_dataset(name: str, data_dir: str | os.PathLike[str] | None = None) -> None:
    """Raise ValueError unless ``name`` is a registered dataset, a path (holds a ``/``) or an
    existing folder; a typo of a name is caught here, a missing folder only when loading."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"dataset must be a dataset name or a folder, got {name!r}")
    if registered(name) is None and "/" not in name and os.sep not in name:
        _folder(name, data_dir)


def _folder(name: str, root: str | os.PathLike[str] | None) -> Path:
    for candidate in (Path(name).expanduser(), _data_dir(root) / name):
        if candidate.is_dir():
            return candidate
    raise ValueError(
        f"unknown dataset {name!r}: neither a known dataset ({', '.join(sorted(DATASETS))}) nor a folder "
        f"(looked for {Path(name).expanduser().resolve()} and {(_data_dir(root) / name).resolve()}); a "
        "dataset folder holds train.npz and test.npz (docs/data.md) or train/ and test/ with a subfolder "
        "per class"
    )


def load(
    name: str, split: str = "train", data_dir: str | os.PathLike[str] | None = None, download: bool = False
) -> ImageArrays:
    """Load split ``"train"`` or ``"test"`` of dataset ``name`` as x uint8 (N, C, H, W), y (N,).

    ``digits`` needs no file. Other registered datasets are read from
    ``<data_dir>/{name}_{split}.npz`` (``data_dir`` defaults to :func:`data_dir`); a missing
    file is fetched with torchvision when ``download=True``, otherwise FileNotFoundError says
    where it is expected. Any other ``name`` is a dataset folder (see the module docstring).
    Raises DatasetFormatError when a file is unreadable or has the wrong layout.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
    key = registered(name)
    if key is None:
        return _load_folder(_folder(name, data_dir), split, name)
    info = DATASETS[key]
    if info.torchvision_name is None:
        return _load_digits(split)
    root = _data_dir(data_dir)
    path = root / f"{key}_{split}.npz"
    if not path.is_file():
        if not download:
            raise FileNotFoundError(
                f"dataset file {path.name} not found: expected it at {path.resolve()}. Run "
                f"`nfpi data fetch {key}` (or call load({key!r}, {split!r}, download=True)) on a "
                f"machine with internet access to fetch it via torchvision.datasets."
                f"{info.torchvision_name}, or put the npz files (docs/data.md) in one directory and "
                f"point the environment variable {ENV_VAR} (or data_dir=...) at it."
            )
        _download(key, split, root)
    return _read_npz(path, key, info)


def info(name: str, data_dir: str | os.PathLike[str] | None = None) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name``: the registry entry, or for a folder the shape
    and class count read from its training split (no flips, no torchvision source)."""
    key = registered(name)
    if key is not None:
        return DATASETS[key]
    arrays = load(name, "train", data_dir)
    return DatasetInfo(arrays.shape, arrays.num_classes, flip=False, torchvision_name=None)


def _load_digits(split: str) -> ImageArrays:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = np.floor(bunch.images * (255.0 / 16.0) + 0.5).astype(np.uint8)
    x = torch.from_numpy(pixels).unsqueeze(1)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    full = ImageArrays(x, y, tuple(str(c) for c in bunch.target_names), "digits")
    train, test = split_arrays(full, DIGITS_TRAIN_FRACTION, DIGITS_SPLIT_SEED)
    return train if split == "train" else test


def _read_npz(path: Path, name: str, info: DatasetInfo | None) -> ImageArrays:
    """A dataset file (docs/method.md §9); ``info`` None (a user's folder): any shape and class count."""
    remedy = (
        f"load({name!r}, ..., download=True) on an online machine"
        if info is not None
        else "x uint8 (N, H, W, C), y int64 (N,), classes (K,) strings: see data/README.md"
    )
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in ("x", "y", "classes") if key in npz.files}
    # Corrupt or truncated archives surface as any of these, depending on where they break.
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise DatasetFormatError(
            f"{path} is not a readable npz archive ({type(err).__name__}: {err}); delete it and "
            f"re-create it ({remedy})"
        ) from err
    missing = {"x", "y", "classes"} - arrays.keys()
    if missing:
        raise DatasetFormatError(
            f"{path} lacks array(s) {sorted(missing)}; a dataset file (docs/data.md) holds x, y and classes"
        )
    x, y, classes = arrays["x"], arrays["y"], arrays["classes"]
    if info is not None:
        c, h, w = info.shape
        if x.dtype != np.uint8 or x.shape[1:] != (h, w, c):
            raise DatasetFormatError(
                f"{path}: x must be uint8 of shape (N, {h}, {w}, {c}) for {name}; got {x.dtype} {x.shape}"
            )
    elif x.dtype != np.uint8 or x.ndim != 4 or x.shape[3] not in (1, 3):
        raise DatasetFormatError(
            f"{path}: x must be uint8 of shape (N, H, W, C) with C = 1 or 3 (channel last); got "
            f"{x.dtype} {x.shape}"
        )
    if not np.issubdtype(y.dtype, np.integer):
        raise DatasetFormatError(f"{path}: y must hold integer labels; got {y.dtype}")
    k = info.num_classes if info is not None else None
    if classes.dtype.kind not in "US" or classes.ndim != 1 or (k is not None and classes.shape != (k,)):
        raise DatasetFormatError(
            f"{path}: classes must be {k or 'K'} strings"
            + (f" for {name}" if k else "")
            + f"; got {classes.dtype} {classes.shape}"
        )
    try:
        return ImageArrays(
            torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))),
            torch.from_numpy(y.astype(np.int64)),
            tuple(str(s) for s in classes),
            name,
        )
    except ValueError as err:
        raise DatasetFormatError(f"{path}: {err}") from err


def _load_folder(folder: Path, split: str, name: str) -> ImageArrays:
    """``folder/{split}.npz`` (docs/method.md §9) or ``folder/{split}/<class>/<image>`` (ImageFolder)."""
    if (folder / f"{split}.npz").is_file():
        return _read_npz(folder / f"{split}.npz", name, None)
    if (folder / split).is_dir():
        return _read_image_folder(folder / split, name)
    raise FileNotFoundError(
        f"dataset folder {folder.resolve()} has neither {split}.npz nor {split}/: provide "
        f"{folder / f'{split}.npz'} (docs/data.md) or {folder / split}/<class>/<images>"
    )


def _read_image_folder(root: Path, name: str) -> ImageArrays:
    """Images of ``root/<class>/*`` (sorted classes and files), grayscale if all are, else RGB."""
    from PIL import Image

    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files = [
        (f, k)
        for k, c in enumerate(classes)
        for f in sorted((root / c).iterdir())
        if f.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not files:
        raise DatasetFormatError(
            f"{root} holds no images in class subfolders ({root}/<class>/<image>.png; "
            f"suffixes {', '.join(IMAGE_SUFFIXES)})"
        )
    images = []
    for f, _ in files:
        with Image.open(f) as img:
            img.load()
            images.append(img)
    gray = all(img.mode in ("1", "L", "I;16", "I") for img in images)
    pixels = [np.asarray(img.convert("L" if gray else "RGB"), dtype=np.uint8) for img in images]
    size = pixels[0].shape[:2]
    for (f, _), p in zip(files, pixels):
        if p.shape[:2] != size:
            raise DatasetFormatError(
                f"{f} is {p.shape[0]}x{p.shape[1]} pixels but {files[0][0]} is {size[0]}x{size[1]}: all "
                "images of a dataset must have one size; resize them"
            )
    x = np.stack(pixels)
    x = x[..., None] if gray else x
    y = np.array([k for _, k in files], dtype=np.int64)
    return ImageArrays(
        torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))),
        torch.from_numpy(y),
        tuple(classes),
        name,
    )


def _download(
    name: str, split: str, root: Path, checksums: dict[str, dict[str, Any]] | None = None
) -> str | None:
    """Fetch split ``split`` of registered dataset ``name`` with torchvision (archives in
    ``root/raw``), check its arrays against ``checksums`` (None: the committed
    :data:`nfpi.data.checksums.CHECKSUMS`) and write ``root/{name}_{split}.npz`` atomically.

    Returns the verified SHA-256, or None when the file has no committed sum. Offline: a
    one-line ConnectionError; a checksum mismatch: :class:`ChecksumError`, nothing written."""
    import torchvision.datasets

    info = DATASETS[name]
    target = root / f"{name}_{split}.npz"
    root.mkdir(parents=True, exist_ok=True)
    split_kw = {"split": split} if info.split_arg else {"train": split == "train"}
    try:
        source = getattr(torchvision.datasets, info.torchvision_name)(
            root=str(root / "raw"), download=True, **split_kw
        )
    # offline: URLError (an OSError) or torchvision's RuntimeError after trying every mirror
    except (OSError, RuntimeError) as err:
        first = (str(err).strip().splitlines() or [""])[0]
        raise ConnectionError(
            f"could not download {name} ({split}) with torchvision.datasets.{info.torchvision_name} "
            f"({type(err).__name__}: {first}); the network looks offline: provide {target.resolve()} "
            f"(copy {name}_{split}.npz into {root.resolve()}, or point {ENV_VAR} at its directory) and set "
            "download=False."
        ) from None
    x = np.asarray(source.data, dtype=np.uint8)
    if info.channels_first:
        x = x.transpose(0, 2, 3, 1)
    if x.ndim == 3:
        x = x[..., None]
    y = np.asarray(source.targets if hasattr(source, "targets") else source.labels)
    y = y.astype(np.int64).reshape(len(x), -1)[:, 0]  # QMNIST targets carry extra columns
    # torchvision names MNIST classes "0 - zero"; the dataset files (docs/method.md §9) use "0". SVHN and USPS
    # have no class names: their labels are the digits.
    names = getattr(source, "classes", None) or [str(k) for k in range(info.num_classes)]
    classes = np.array([c.split(" - ")[0] for c in names])
    remedy = (
        f"the download is corrupt or its source changed, so {target.name} was not written; delete "
        f"{(root / 'raw').resolve()} and run `nfpi data fetch {name}` again"
    )
    digest = verify_arrays(target.name, x, y, classes, checksums, target, remedy)
    atomic_write(target, lambda f: np.savez_compressed(f, x=x, y=y, classes=classes))
    return digest
