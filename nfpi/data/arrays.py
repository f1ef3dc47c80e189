"""The in-memory image set of every dataset (docs/method.md §9): :class:`ImageArrays`, x uint8
(N, C, H, W) with labels y int64 (N,) and class names, and the :class:`DatasetFormatError` of
an invalid stored set."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["DatasetFormatError", "ImageArrays"]


class DatasetFormatError(ValueError):
    """A dataset file exists but is not a valid npz file (docs/method.md §9) for the requested dataset."""


@dataclass(frozen=True)
class ImageArrays:
    """A labelled image set held in memory.

    x: uint8 (N, C, H, W); y: int64 (N,) with values in [0, K); classes: K names;
    name: dataset name (selects augmentation defaults, see :class:`DatasetInfo`).
    The constructor validates dtypes, shapes and label range.
    """

    x: Tensor
    y: Tensor
    classes: tuple[str, ...]
    name: str = ""

    def __post_init__(self) -> None:
        if self.x.dtype != torch.uint8 or self.x.dim() != 4:
            raise ValueError(
                f"x must be a uint8 tensor of shape (N, C, H, W); got {self.x.dtype} {tuple(self.x.shape)}"
            )
        if self.y.dtype != torch.int64 or self.y.shape != self.x.shape[:1]:
            raise ValueError(
                f"y must be an int64 tensor of shape ({self.x.shape[0]},); got {self.y.dtype} "
                f"{tuple(self.y.shape)}"
            )
        if not self.classes:
            raise ValueError("classes must name at least one class")
        if self.y.numel():
            lo, hi = (int(v) for v in torch.aminmax(self.y))
            if lo < 0 or hi >= len(self.classes):
                raise ValueError(
                    f"labels must lie in [0, {len(self.classes)}) (one per class name); "
                    f"found values in [{lo}, {hi}]"
                )

    @property
    def num_classes(self) -> int:
        """Number of classes K."""
        return len(self.classes)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Image shape (C, H, W)."""
        c, h, w = self.x.shape[1:]
        return (c, h, w)

    def __len__(self) -> int:
        return self.x.shape[0]

    def subset(self, indices: Tensor | Sequence[int] | np.ndarray) -> ImageArrays:
        """The images at integer ``indices`` (M,), in that order; classes and name are kept."""
        idx = torch.as_tensor(indices)
        if idx.dtype == torch.bool or idx.is_floating_point() or idx.is_complex():
            raise TypeError(
                f"subset needs integer indices, got dtype {idx.dtype}; for a boolean mask "
                "pass mask.nonzero().squeeze(1)"
            )
        idx = idx.long()
        return ImageArrays(self.x[idx], self.y[idx], self.classes, self.name)
