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

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler

from .._util import derive_seed
from ..config import TrainConfig
from ..data import (
    ClassCodes,
    DatasetFormatError,
    FlowDataset,
    ImageArrays,
    class_balanced_indices,
    class_subset,
    dequantize,
    load,
    quantize,
    split_arrays,
)

__all__ = ["epoch_loader", "init_images", "load_data", "load_validation", "splits"]


def init_images(cfg: TrainConfig, arrays: ImageArrays) -> Tensor:
    """The ``cfg.init_images`` training images (N, C, H, W), dequantised with seeded noise, that a
    data-dependent init (ActNorm) sees before training."""
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, 1))
    idx = torch.randperm(len(arrays), generator=gen)[: min(cfg.init_images, len(arrays))]
    return dequantize(quantize(arrays.x[idx], cfg.bits), cfg.bits, noise=True, generator=gen)


def epoch_loader(
    cfg: TrainConfig, arrays: ImageArrays, epoch: int, rank: int = 0, world: int = 1, pin: bool = False
) -> DataLoader:
    """The training batches of ``epoch``: (x (B, C, H, W) dequantised with uniform noise, y (B,)),
    B = ``cfg.batch_size / world`` per process, shuffled and noised from seeds of ``cfg.seed``,
    ``epoch`` and ``rank``, so that a resumed run and every trainer of the same config see the
    same images in the same order."""
    noise = torch.Generator().manual_seed(derive_seed(cfg.seed, 2, epoch, rank))
    dataset = FlowDataset(arrays, cfg.bits, train=True, generator=noise)
    sampler = DistributedSampler(
        dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True
    )
    sampler.set_epoch(epoch)
    workers = torch.Generator().manual_seed(derive_seed(cfg.seed, 3, epoch, rank))
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size // world,
        sampler=sampler,
        drop_last=True,
        num_workers=cfg.num_workers,
        generator=workers,
        pin_memory=pin,
    )


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
