"""Top-k accuracy in percent of class scores (docs/method.md §6-§7): NF accuracy (the flow's class
log-densities), CNN-Acc and Label Reliability (a classifier's logits).

Example:
    >>> import torch
    >>> topk_accuracy(torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]]), torch.tensor([0, 1]), ks=(1, 2))
    {'top1': 50.0, 'top2': 100.0}
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .._util import check_labels

__all__ = ["topk_accuracy"]


def topk_accuracy(scores: Tensor, y: Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy in percent of class scores (N, K) against labels (N,).

    Returns ``{"top{k}": value}``; k larger than K is clipped to K (so "top5" with 3
    classes is 100). A sample counts as a top-k hit when fewer than k classes score at
    least as high as its true class: ties count against the true class, so a collapsed
    model with constant scores gets no credit.
    """
    if not isinstance(scores, Tensor) or scores.ndim != 2 or scores.shape[1] == 0:
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(f"scores must be a tensor (N, K) with K >= 1, got {shape}")
    n, num_classes = scores.shape
    if n == 0:
        raise ValueError("scores is empty: at least one sample is needed for an accuracy")
    check_labels(y, n, num_classes)
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN; check the model outputs before computing accuracy")
    for k in ks:
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"every k must be a positive int, got {k!r}")
    y = y.to(scores.device)
    true_score = scores.gather(1, y[:, None])
    rank = (scores >= true_score).sum(dim=1) - 1
    return {f"top{k}": 100.0 * (rank < min(k, num_classes)).double().mean().item() for k in ks}
