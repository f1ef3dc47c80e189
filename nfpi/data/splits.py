"""Every subset and split rule of the images (docs/method.md §4.4, §9): class-balanced subsets,
stratified splits (train / validation, D_NF / D_G, the digits train / test split) and the
subset of a dataset a config trains on. A new subset or split rule goes here.

All rules are seeded and draw per class in label order, so a split depends only on (labels,
fraction or count, seed).

Example:
    >>> import torch
    >>> y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    >>> a, b = stratified_split(y, 0.5, seed=0)
    >>> len(a), len(b), sorted(y[a].tolist())
    (4, 4, [0, 0, 1, 1])
    >>> class_balanced_indices(y, 1, seed=0).numel()
    2
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._util import check_labels
from .arrays import ImageArrays

__all__ = ["class_balanced_indices", "class_subset", "split_arrays", "stratified_split"]


def class_balanced_indices(y: Tensor, per_class: int, seed: int) -> Tensor:
    """Indices (K * per_class,), sorted, of ``per_class`` random examples of each class in y (N,).

    The classes are 0 .. max(y); each must have at least ``per_class`` examples. The draw is
    nested in ``per_class``: for a fixed seed a smaller subset is contained in a larger one.
    """
    y = check_labels(torch.as_tensor(y), name="y", nonempty=True)
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1; got {per_class}")
    gen = torch.Generator().manual_seed(seed)
    chosen = []
    for k in range(int(y.max()) + 1):
        members = (y == k).nonzero().squeeze(1)
        if members.numel() < per_class:
            raise ValueError(
                f"class {k} has {members.numel()} examples, fewer than per_class={per_class}; lower per_class"
            )
        chosen.append(members[torch.randperm(members.numel(), generator=gen)[:per_class]])
    return torch.cat(chosen).sort().values


def stratified_split(y: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Split indices of labels y (N,) into (idx_a, idx_b), both sorted, disjoint, covering 0..N-1.

    Each class contributes round(fraction * N_k) (half up) random examples to idx_a and the
    rest to idx_b, so both parts keep the class proportions (e.g. the paper's D_NF / D_G
    split with fraction 0.9).
    """
    y = check_labels(torch.as_tensor(y), name="y", nonempty=True)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must lie strictly between 0 and 1; got {fraction}")
    gen = torch.Generator().manual_seed(seed)
    part_a, part_b = [], []
    for k in torch.unique(y).tolist():
        members = (y == k).nonzero().squeeze(1)
        members = members[torch.randperm(members.numel(), generator=gen)]
        n_a = math.floor(fraction * members.numel() + 0.5)
        part_a.append(members[:n_a])
        part_b.append(members[n_a:])
    return torch.cat(part_a).sort().values, torch.cat(part_b).sort().values


def split_arrays(images: ImageArrays, fraction: float, seed: int) -> tuple[ImageArrays, ImageArrays]:
    """(``fraction`` of each class of ``images``, the rest): :func:`stratified_split` applied to
    the image set (the validation split, D_NF / D_G, the digits train / test split)."""
    keep, held = stratified_split(images.y, fraction, seed)
    return images.subset(keep), images.subset(held)


def class_subset(images: ImageArrays, per_class: int, seed: int) -> tuple[ImageArrays, ImageArrays]:
    """(``per_class`` images of each class drawn with ``seed``, the rest): the training subset
    of a config with ``per_class`` set, and the images it leaves out."""
    chosen = class_balanced_indices(images.y, per_class, seed)
    rest = torch.ones(len(images), dtype=torch.bool)
    rest[chosen] = False
    return images.subset(chosen), images.subset(rest.nonzero().flatten())
