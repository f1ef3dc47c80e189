"""The optimisation of a flow (docs/method.md §4.6): the learning rate with linear warm-up and the
EMA of the weights, shared by :mod:`nfpi.train.loop` and the peer baselines of
:mod:`nfpi.experiments.peers`, so that both are trained alike.

Example:
    >>> from nfpi.config import OptimConfig
    >>> get_lr(0, OptimConfig(lr=1e-2, warmup=10)), get_lr(50, OptimConfig(lr=1e-2, warmup=10))
    (0.001, 0.01)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from ..config import OptimConfig

__all__ = ["ema_avg_fn", "get_lr", "make_ema"]


def get_lr(it: int, optim: OptimConfig) -> float:
    """Learning rate of optimizer step ``it`` (0-based, global): linear warm-up over
    ``optim.warmup`` steps to ``optim.lr``, then constant; with ``optim.decay_steps`` a cosine
    decay from ``lr`` at the end of the warm-up to ``optim.min_lr`` (null: 0) at step
    ``decay_steps``, and ``min_lr`` after it (nanoGPT's schedule; set ``decay_steps`` to epochs x
    steps per epoch).

    Example:
        >>> from nfpi.config import OptimConfig
        >>> optim = OptimConfig(lr=1.0, warmup=10, decay_steps=110, min_lr=0.1)
        >>> [round(get_lr(it, optim), 3) for it in (0, 9, 60, 110, 500)]
        [0.1, 1.0, 0.55, 0.1, 0.1]
    """
    if it < optim.warmup:
        return optim.lr * (it + 1) / optim.warmup
    if optim.decay_steps is None:
        return optim.lr
    low, progress = optim.min_lr or 0.0, min(1.0, (it - optim.warmup) / (optim.decay_steps - optim.warmup))
    return low + 0.5 * (1.0 + math.cos(math.pi * progress)) * (optim.lr - low)


def ema_avg_fn(beta: float) -> Callable[[list[Tensor], list[Tensor], Tensor], None]:
    """EMA update for AveragedModel(multi_avg_fn=...): decay min(beta, (1+n)/(10+n)) after n
    updates, so that short runs are not dominated by the initial weights."""

    @torch.no_grad()
    def update(ema_params: list[Tensor], params: list[Tensor], n_averaged: Tensor) -> None:
        n = float(n_averaged)
        decay = min(beta, (1.0 + n) / (10.0 + n))
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)

    return update


def make_ema(model: nn.Module, beta: float) -> AveragedModel:
    """The EMA of ``model``'s parameters (buffers are copied, not averaged)."""
    return AveragedModel(model, multi_avg_fn=ema_avg_fn(beta), use_buffers=False)
