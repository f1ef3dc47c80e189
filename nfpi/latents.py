"""The flow's latents of a dataset: dequantised batches, encoding and class statistics
(docs/method.md §4.3; the held-out metrics built on them are in :mod:`nfpi.evaluation.flow`).

Images are dequantised either at their bin centres (+0.5) or with uniform noise that depends
only on (seed, image index) (:func:`image_noise`), never on the batch size or the number of
processes, so that every evaluation of the same model gives the same numbers. Under
torch.distributed, :func:`class_stats` (and :func:`nfpi.evaluation.evaluate_flow`) split the
chunks of a set over the processes and combine the results, so every process returns the whole
set's.

Example:
    >>> import torch
    >>> from nfpi.data import load
    >>> from nfpi.flows import Glow
    >>> flow = Glow((1, 8, 8), levels=2, steps=1, hidden=8)
    >>> z, logdet = encode(flow, load("digits", "test").subset(range(10)), bits=5)
    >>> tuple(z.shape), tuple(logdet.shape)
    ((10, 64), (10,))
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._util import derive_seed, eval_mode
from .data import ImageArrays, bin_centres
from .prior import ClassStats

__all__ = [
    "NOISE_BLOCK",
    "NonFiniteLossError",
    "batches",
    "class_stats",
    "encode",
    "image_noise",
    "model_device",
]

NOISE_BLOCK = 100  # images per generator of the seeded evaluation / statistics noise


class NonFiniteLossError(FloatingPointError):
    """The training loss or gradient became NaN/inf; training stops instead of continuing."""


def batches(
    arrays: ImageArrays,
    bits: int,
    batch_size: int,
    device: torch.device,
    noise: int | None = None,
    sharded: bool = True,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Dequantised (x (B, C, H, W), y (B,)) batches of ``arrays`` in index order.

    ``noise=None``: the deterministic +0.5 offset; otherwise uniform noise that depends only on
    (noise, image index) (:func:`image_noise`), not on ``batch_size`` or the number of
    processes. Chunks of ``batch_size`` consecutive images are dealt to the processes
    round-robin when ``sharded`` under torch.distributed, so every image also gets the same
    batch companions whatever the number of processes.
    """
    rank, world = 0, 1
    if sharded and dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    for chunk, start in enumerate(range(0, len(arrays), batch_size)):
        if chunk % world != rank:
            continue
        x = bin_centres(arrays.x[start : start + batch_size], bits)
        if noise is not None:  # bin centre + (u - 1/2) bin widths = 2 (xq + u) / 2^bits - 1
            x += (image_noise(noise, start, start + len(x), x.shape[1:]) - 0.5) * (2.0 / (1 << bits))
        yield x.to(device), arrays.y[start : start + batch_size].to(device)


def image_noise(seed: int, start: int, stop: int, shape: torch.Size) -> Tensor:
    """U[0, 1) noise (stop - start, *shape) of images start..stop-1 of a set: image i's noise
    depends on (seed, i) only. Blocks of :data:`NOISE_BLOCK` images share a seeded generator."""
    first = start // NOISE_BLOCK
    blocks = [
        torch.rand((NOISE_BLOCK, *shape), generator=torch.Generator().manual_seed(derive_seed(seed, b)))
        for b in range(first, (stop - 1) // NOISE_BLOCK + 1)
    ]
    return torch.cat(blocks)[start - first * NOISE_BLOCK : stop - first * NOISE_BLOCK]


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s parameters."""
    return next(model.parameters()).device


@torch.no_grad()
def encode(
    model: nn.Module, arrays: ImageArrays, bits: int, batch_size: int = 500, noise: int | None = None
) -> tuple[Tensor, Tensor]:
    """Latents z (N, D) and log-determinants (N,) of all images, float32 on the CPU, in eval
    mode (``noise``: see :func:`class_stats`). Holds every latent: for small sets (figures)."""
    zs, lds = [], []
    with eval_mode(model):
        for x, _ in batches(arrays, bits, batch_size, model_device(model), noise, sharded=False):
            z, logdet = model(x)
            zs.append(z.float().cpu())
            lds.append(logdet.float().cpu())
    return torch.cat(zs), torch.cat(lds)


@torch.no_grad()
def class_stats(
    model: nn.Module, arrays: ImageArrays, bits: int, batch_size: int = 500, noise: int | None = None
) -> ClassStats:
    """Float64 class statistics of the latents of ``arrays`` in eval mode.

    ``noise``: seed of uniform dequantisation noise (the distribution the flow is trained
    on), or None for the +0.5 offset. Under torch.distributed every process encodes its
    share of the chunks and the sums are all-reduced, so every process gets the statistics
    of the whole set: per-image latents are identical to a single process's, the sums equal
    up to float64 summation order.
    """
    stats = None
    with eval_mode(model):
        for x, y in batches(arrays, bits, batch_size, model_device(model), noise):
            part = ClassStats.from_latents(model(x)[0], y, arrays.num_classes)
            stats = part if stats is None else stats + part
    if stats is None:  # a process without data still takes part in the all-reduce
        d = math.prod(arrays.shape)
        stats = ClassStats.from_latents(
            torch.empty(0, d, device=model_device(model)),
            torch.empty(0, dtype=torch.long),
            arrays.num_classes,
        )
    return stats.all_reduce()
