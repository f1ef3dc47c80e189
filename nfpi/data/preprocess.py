"""From stored uint8 images to flow inputs (docs/method.md §4.7, §4.4, §6):
quantisation and dequantisation, bits/dim, the seeded training :class:`FlowDataset` /
:func:`make_loader`, and the t-SNE embedding of the toy demo (subsets and splits:
:mod:`nfpi.data.splits`).

Preprocessing (docs/method.md §4.7): ``b``-bit data ``x_q in {0 .. 2^b - 1}`` maps to ``[-1, 1]`` by
``2 (x_q + u) / 2^b - 1``; ``u ~ U[0, 1)`` while training (uniform dequantisation) and
``u = 0.5`` for evaluation, so that likelihoods and NF accuracy are deterministic.
:func:`bits_per_dim` uses the exact constant of this map.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .arrays import ImageArrays
from .datasets import DATASETS
from .splits import class_balanced_indices

__all__ = [
    "FlowDataset",
    "bin_centres",
    "bits_per_dim",
    "dequantize",
    "make_loader",
    "quantize",
    "to_uint8",
    "tsne_embedding",
]


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 1..8 (e.g. 5 or 8); got {bits!r}")
    return int(bits)


def quantize(x: Tensor, bits: int) -> Tensor:
    """Reduce 8-bit pixels x uint8 (any shape) to ``bits`` bits: uint8 in [0, 2^bits), same shape.

    Keeps the top ``bits`` bits (floor(x / 2^(8 - bits))), as Glow does.
    """
    bits = _check_bits(bits)
    if x.dtype != torch.uint8:
        raise TypeError(
            f"quantize expects uint8 pixels in 0..255; got {x.dtype} "
            "(convert floats in [-1, 1] with to_uint8 first)"
        )
    return x >> (8 - bits)


def dequantize(xq: Tensor, bits: int, noise: bool, generator: torch.Generator | None = None) -> Tensor:
    """Map b-bit integers xq (B, C, H, W) (any shape) to float32 in [-1, 1], same shape.

    ``2 (xq + u) / 2^bits - 1`` with ``u ~ U[0, 1)`` drawn from ``generator`` when ``noise``
    (training), else ``u = 0.5`` (evaluation: the bin centre, deterministic).
    """
    bits = _check_bits(bits)
    if xq.is_floating_point() or xq.is_complex() or xq.dtype == torch.bool:
        raise TypeError(f"dequantize expects integer levels from quantize(); got {xq.dtype}")
    levels = 1 << bits
    if xq.numel():
        lo, hi = (int(v) for v in torch.aminmax(xq))
        if lo < 0 or hi >= levels:
            raise ValueError(
                f"{bits}-bit levels must lie in [0, {levels}); found [{lo}, {hi}] — pass "
                f"quantize(x, {bits}) rather than raw pixels"
            )
    return _dequantize_unchecked(xq, levels, noise, generator)


def bin_centres(x: Tensor, bits: int) -> Tensor:
    """uint8 pixels (N, C, H, W) -> floats in [-1, 1] at the centres of their ``bits``-bit bins."""
    return dequantize(quantize(x, bits), bits, noise=False)


def _dequantize_unchecked(xq: Tensor, levels: int, noise: bool, generator: torch.Generator | None) -> Tensor:
    # Per-item hot path of FlowDataset: no validation, in-place arithmetic on one buffer.
    if noise:
        u = torch.rand(xq.shape, generator=generator, device=xq.device).add_(xq)
    else:
        u = xq.float().add_(0.5)
    return u.mul_(2.0 / levels).sub_(1.0)


def to_uint8(x: Tensor, bits: int) -> Tensor:
    """Map floats x (B, C, H, W) (any shape) in [-1, 1] back to 8-bit pixels: uint8, same shape.

    Returns the lower edge of x's ``bits``-bit bin in 8-bit units, ``q * 2^(8 - bits)`` with
    ``q = floor((x + 1) 2^bits / 2)`` clamped to [0, 2^bits); hence
    ``quantize(to_uint8(dequantize(q, b, ...), b), b) == q``, and for 8 bits ``to_uint8`` inverts
    :func:`dequantize`. Out-of-range values (e.g. generated images) are clamped.
    """
    bits = _check_bits(bits)
    if torch.isnan(x).any():
        raise ValueError("to_uint8 got NaN values; the images to convert must be finite numbers")
    levels = 1 << bits
    q = torch.floor((x.float() + 1.0) * (levels / 2.0)).clamp_(0, levels - 1)
    return q.to(torch.uint8) << (8 - bits)


def bits_per_dim(nll_nats: Tensor, dim: int, bits: int) -> Tensor:
    """Bits per dimension of b-bit data from flow NLLs in nats, nll_nats (B,) -> (B,).

    The flow density p is over x in [-1, 1]^D, where each b-bit bin has width 2 / 2^b; a bin's
    probability is therefore ``p(x) (2 / 2^b)^D``, giving ``-log P = NLL + D log(2^b) - D log 2``
    nats, i.e. ``bpd = (NLL + D b ln 2 - D ln 2) / (D ln 2) = NLL / (D ln 2) + b - 1``.
    With noise dequantisation this is the usual upper bound on the discrete codelength.
    """
    bits = _check_bits(bits)
    if dim < 1:
        raise ValueError(f"dim is the number of dimensions D per example (C*H*W); got {dim}")
    return (nll_nats + dim * (bits - 1) * math.log(2.0)) / (dim * math.log(2.0))


def tsne_embedding(
    arrays: ImageArrays, per_class: int | None = None, seed: int = 0, pca_dims: int = 50
) -> tuple[Tensor, Tensor]:
    """A standardised 2-D t-SNE embedding of images, for the toy FPI demo (paper Fig. 1a).

    Pixels (optionally ``per_class`` images of each class) are reduced to ``pca_dims`` by PCA,
    then embedded by scikit-learn's t-SNE. Returns z float64 (N, 2) with zero mean and unit
    variance overall, and the labels y (N,).
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    if per_class is not None:
        arrays = arrays.subset(class_balanced_indices(arrays.y, per_class, seed))
    x = arrays.x.flatten(1).double().numpy() / 255.0
    x = PCA(n_components=min(pca_dims, *x.shape), random_state=seed).fit_transform(x)
    z = torch.from_numpy(TSNE(n_components=2, init="pca", random_state=seed).fit_transform(x)).double()
    return (z - z.mean(0)) / z.std(), arrays.y.clone()


class FlowDataset(Dataset):
    """Dequantised images for flow training/evaluation: item i -> (x float32 (C, H, W), y int).

    Images are quantised to ``bits`` once at construction; each item is dequantised with noise
    when ``train`` and with the fixed +0.5 offset otherwise. ``augment`` (random horizontal
    flip, p = 1/2) defaults to ``train and DATASETS[name].flip``: on for CIFAR training, never
    for digits/mnist (requesting it there is an error) and off for unregistered names.
    Randomness comes from ``generator`` (None: torch's global RNG); inside DataLoader workers
    the generator is reseeded from the worker's seed so workers do not repeat each other.
    """

    def __init__(
        self,
        arrays: ImageArrays,
        bits: int = 8,
        train: bool = True,
        augment: bool | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        info = DATASETS.get(arrays.name)
        if augment is None:
            augment = train and info is not None and info.flip
        elif augment and info is not None and not info.flip:
            raise ValueError(
                f"horizontal flips change the class of {arrays.name} images (mirrored digits); "
                "use augment=False or None for this dataset"
            )
        self.xq = quantize(arrays.x, bits)
        self.y = arrays.y
        self.bits = int(bits)
        self._levels = 1 << self.bits
        self.train = train
        self.augment = augment
        self.generator = generator
        self._worker_id: int | None = None

    def __len__(self) -> int:
        return self.y.shape[0]

    def _rng(self) -> torch.Generator | None:
        worker = torch.utils.data.get_worker_info()
        if worker is not None and self.generator is not None and self._worker_id != worker.id:
            # Every worker starts from a copy of the same generator state.
            self.generator.manual_seed(worker.seed)
            self._worker_id = worker.id
        return self.generator

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        rng = self._rng()
        x = _dequantize_unchecked(self.xq[i], self._levels, self.train, rng)
        if self.augment and torch.rand((), generator=rng) < 0.5:
            x = x.flip(-1)
        return x, int(self.y[i])


def make_loader(
    arrays: ImageArrays,
    bits: int,
    train: bool,
    batch_size: int,
    augment: bool | None = None,
    seed: int = 0,
    num_workers: int = 0,
) -> DataLoader:
    """DataLoader over :class:`FlowDataset` yielding x float32 (B, C, H, W), y int64 (B,).

    Shuffles when ``train``; one generator seeded with ``seed`` drives the order, the
    dequantisation noise and the flips, so a loader is reproducible for a given seed.
    """
    gen = torch.Generator().manual_seed(seed)
    dataset = FlowDataset(arrays, bits, train=train, augment=augment, generator=gen)
    return DataLoader(dataset, batch_size=batch_size, shuffle=train, generator=gen, num_workers=num_workers)
