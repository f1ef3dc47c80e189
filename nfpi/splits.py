"""The images a training config trains and is judged on (SPEC §4, §9): class-balanced subsets,
the seeded validation split, zero padding and GLEM's class codes (:mod:`nfpi.codes`).

Example:
    >>> train_set, test_set = load_data(TrainConfig.from_yaml("configs/digits_cpu.yaml"))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import data
from .codes import ClassCodes
from .config import TrainConfig
from .preprocess import class_balanced_indices, stratified_split

__all__ = ["class_subset", "load_data", "load_validation", "splits"]


def load_data(cfg: TrainConfig) -> tuple[data.ImageArrays, data.ImageArrays]:
    """Train and test images of ``cfg`` (class-balanced subsets, padding, class codes applied).

    With ``cfg.val_fraction`` > 0 the training images exclude the validation split
    (:func:`load_validation`)."""
    train_set, _, test_set = splits(cfg)
    return train_set, test_set


def load_validation(cfg: TrainConfig) -> data.ImageArrays | None:
    """The validation split of ``cfg`` (``val_fraction`` of each class of the training set,
    stratified and seeded by ``cfg.seed``), or None without one."""
    return splits(cfg)[1]


def class_subset(
    images: data.ImageArrays, per_class: int, seed: int
) -> tuple[data.ImageArrays, data.ImageArrays]:
    """(``per_class`` images of each class drawn with ``seed``, the rest): the training subset
    of a config with ``per_class`` set, and the images it leaves out."""
    chosen = class_balanced_indices(images.y, per_class, seed)
    rest = torch.ones(len(images), dtype=torch.bool)
    rest[chosen] = False
    return images.subset(chosen), images.subset(rest.nonzero().flatten())


def splits(cfg: TrainConfig) -> tuple[data.ImageArrays, data.ImageArrays | None, data.ImageArrays]:
    """(train, validation or None, test) images of ``cfg``."""
    train_set = data.load(cfg.dataset, "train", cfg.data_dir, download=cfg.download)
    test_set = data.load(cfg.dataset, "test", cfg.data_dir, download=cfg.download)
    if (train_set.shape, train_set.classes) != (test_set.shape, test_set.classes):
        raise data.DatasetFormatError(
            f"dataset {cfg.dataset!r}: the train and test splits differ (images {train_set.shape} vs "
            f"{test_set.shape}, classes {train_set.classes} vs {test_set.classes}); both need the same"
        )
    if cfg.per_class is not None:
        train_set, _ = class_subset(train_set, cfg.per_class, cfg.seed)
    if cfg.test_per_class is not None:
        test_set = test_set.subset(class_balanced_indices(test_set.y, cfg.test_per_class, cfg.seed))
    val_set = None
    if cfg.val_fraction:
        keep, held = stratified_split(train_set.y, 1.0 - cfg.val_fraction, cfg.seed)
        train_set, val_set = train_set.subset(keep), train_set.subset(held)
    held_out = [test_set] if val_set is None else [test_set, val_set]
    if cfg.pad:
        p = cfg.pad
        train_set, *held_out = (
            data.ImageArrays(F.pad(a.x, (p, p, p, p)), a.y, a.classes, a.name) for a in (train_set, *held_out)
        )
    if cfg.codes.rows:
        c, _, w = train_set.shape
        codes = ClassCodes.for_config(cfg.codes, train_set.num_classes, c, w)
        train_set = codes.append_arrays(train_set, cfg.codes.noise, seed=cfg.seed)
        # Held-out images are judged like test images: random code rows, never their class's.
        held_out = [codes.append_random(a, seed=cfg.seed) for a in held_out]
    test_set, val_set = held_out[0], (held_out[1] if len(held_out) > 1 else None)
    return train_set, val_set, test_set
