"""The images a training config trains and is judged on (docs/method.md §4, §9): its class-balanced
subsets and seeded validation split (the rules are in :mod:`nfpi.data.splits`), zero padding and
GLEM's class codes (:mod:`nfpi.data.codes`).

Example:
    >>> from nfpi.config import TrainConfig
    >>> train_set, test_set = load_data(TrainConfig(dataset="digits", per_class=20, test_per_class=5))
    >>> len(train_set), len(test_set), train_set.shape
    (200, 50, (1, 8, 8))
"""

from __future__ import annotations

import torch.nn.functional as F

from ..config import TrainConfig
from ..data import (
    ClassCodes,
    DatasetFormatError,
    ImageArrays,
    class_balanced_indices,
    class_subset,
    load,
    split_arrays,
)

__all__ = ["load_data", "load_validation", "splits"]


def load_data(cfg: TrainConfig) -> tuple[ImageArrays, ImageArrays]:
    """Train and test images of ``cfg`` (class-balanced subsets, padding, class codes applied).

    With ``cfg.val_fraction`` > 0 the training images exclude the validation split
    (:func:`load_validation`)."""
    train_set, _, test_set = splits(cfg)
    return train_set, test_set


def load_validation(cfg: TrainConfig) -> ImageArrays | None:
    """The validation split of ``cfg`` (``val_fraction`` of each class of the training set,
    stratified and seeded by ``cfg.seed``), or None without one."""
    return splits(cfg)[1]


def splits(cfg: TrainConfig) -> tuple[ImageArrays, ImageArrays | None, ImageArrays]:
    """(train, validation or None, test) images of ``cfg``."""
    train_set = load(cfg.dataset, "train", cfg.data_dir, download=cfg.download)
    test_set = load(cfg.dataset, "test", cfg.data_dir, download=cfg.download)
    if (train_set.shape, train_set.classes) != (test_set.shape, test_set.classes):
        raise DatasetFormatError(
            f"dataset {cfg.dataset!r}: the train and test splits differ (images {train_set.shape} vs "
            f"{test_set.shape}, classes {train_set.classes} vs {test_set.classes}); both need the same"
        )
    if cfg.per_class is not None:
        train_set, _ = class_subset(train_set, cfg.per_class, cfg.seed)
    if cfg.test_per_class is not None:
        test_set = test_set.subset(class_balanced_indices(test_set.y, cfg.test_per_class, cfg.seed))
    val_set = None
    if cfg.val_fraction:
        train_set, val_set = split_arrays(train_set, 1.0 - cfg.val_fraction, cfg.seed)
    held_out = [test_set] if val_set is None else [test_set, val_set]
    if cfg.pad:
        p = cfg.pad
        train_set, *held_out = (
            ImageArrays(F.pad(a.x, (p, p, p, p)), a.y, a.classes, a.name) for a in (train_set, *held_out)
        )
    if cfg.codes.rows:
        c, _, w = train_set.shape
        codes = ClassCodes.for_config(cfg.codes, train_set.num_classes, c, w)
        train_set = codes.append_arrays(train_set, cfg.codes.noise, seed=cfg.seed)
        # Held-out images are judged like test images: random code rows, never their class's.
        held_out = [codes.append_random(a, seed=cfg.seed) for a in held_out]
    test_set, val_set = held_out[0], (held_out[1] if len(held_out) > 1 else None)
    return train_set, val_set, test_set
