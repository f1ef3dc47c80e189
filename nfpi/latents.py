"""The flow's latents of a dataset: encoding, class statistics and held-out metrics
(SPEC §4 step 3, §6; paper Eq. 2 and NF accuracy argmax_y log N(f(x); mu_y, s_y)).

Images are dequantised either at their bin centres (+0.5) or with uniform noise that depends
only on (seed, image index) (:func:`image_noise`), never on the batch size or the number of
processes, so that every evaluation of the same model gives the same numbers. Under
torch.distributed, :func:`class_stats` and :func:`evaluate_flow` split the chunks of a set over
the processes and combine the results, so every process returns the whole set's.

Example:
    >>> metrics = evaluate_flow(flow, gaussians, test_set, bits=5)
    >>> metrics["test_bpd"], metrics["acc_top1"]
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import data
from ._util import derive_seed, eval_mode
from .classifiers import topk_accuracy
from .preprocess import bin_centres, bits_per_dim
from .priors import ClassGaussians, FullGaussians
from .stats import ClassStats

__all__ = [
    "EVAL_NOISE_SEED",
    "NOISE_BLOCK",
    "NonFiniteLossError",
    "batches",
    "class_stats",
    "encode",
    "evaluate_flow",
    "image_noise",
]

# Seed of the dequantisation noise of the test bits/dim bound: fixed, so that every evaluation of
# the same model gives the same number.
EVAL_NOISE_SEED = 0
NOISE_BLOCK = 100  # images per generator of the seeded evaluation / statistics noise
Prior = ClassGaussians | FullGaussians


class NonFiniteLossError(FloatingPointError):
    """The training loss or gradient became NaN/inf; training stops instead of continuing."""


def batches(
    arrays: data.ImageArrays,
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


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def encode(
    model: nn.Module, arrays: data.ImageArrays, bits: int, batch_size: int = 500, noise: int | None = None
) -> tuple[Tensor, Tensor]:
    """Latents z (N, D) and log-determinants (N,) of all images, float32 on the CPU, in eval
    mode (``noise``: see :func:`class_stats`). Holds every latent: for small sets (figures)."""
    zs, lds = [], []
    with eval_mode(model):
        for x, _ in batches(arrays, bits, batch_size, _model_device(model), noise, sharded=False):
            z, logdet = model(x)
            zs.append(z.float().cpu())
            lds.append(logdet.float().cpu())
    return torch.cat(zs), torch.cat(lds)


@torch.no_grad()
def class_stats(
    model: nn.Module, arrays: data.ImageArrays, bits: int, batch_size: int = 500, noise: int | None = None
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
        for x, y in batches(arrays, bits, batch_size, _model_device(model), noise):
            part = ClassStats.from_latents(model(x)[0], y, arrays.num_classes)
            stats = part if stats is None else stats + part
    if stats is None:  # a process without data still takes part in the all-reduce
        d = math.prod(arrays.shape)
        stats = ClassStats.from_latents(
            torch.empty(0, d, device=_model_device(model)),
            torch.empty(0, dtype=torch.long),
            arrays.num_classes,
        )
    return stats.all_reduce()


@torch.no_grad()
def _test_pass(
    model: nn.Module,
    gaussians: Prior,
    arrays: data.ImageArrays,
    bits: int,
    batch_size: int,
    noise: int | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-image NLL (N,), class log-densities (N, K) and labels (N,) of the whole set, float32
    on the CPU (gathered from every process under torch.distributed)."""
    nlls, scores, labels = [], [], []
    for x, y in batches(arrays, bits, batch_size, _model_device(model), noise):
        z, logdet = model(x)
        z, logdet = z.float(), logdet.float()
        nlls.append((gaussians.nll(z, y) - logdet).cpu())
        # Non-finite latents make the NLL non-finite, which raises below after all processes
        # gathered; scoring them as 0 here keeps log_prob's NaN check from failing one rank alone.
        scores.append(gaussians.log_prob(torch.where(torch.isfinite(z), z, 0.0)).cpu())
        labels.append(y.cpu())
    parts = [(torch.cat(nlls), torch.cat(scores), torch.cat(labels))] if nlls else []
    if dist.is_available() and dist.is_initialized():
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, parts)
        parts = [part for shard in gathered for part in shard]
    nll, score, y = (torch.cat(t) for t in zip(*parts))
    if not torch.isfinite(nll).all():
        raise NonFiniteLossError(
            "the test NLL is not finite: the model or the Gaussians diverged "
            "(lower optim.lr or gaussians.lam)"
        )
    return nll, score, y


@torch.no_grad()
def evaluate_flow(
    model: nn.Module,
    gaussians: Prior,
    arrays: data.ImageArrays,
    bits: int,
    batch_size: int = 500,
    noise: int = EVAL_NOISE_SEED,
) -> dict[str, float]:
    """Held-out metrics of a flow under the true class Gaussian, eval mode, deterministic (two passes):

    - ``test_nll`` (nats/image) and ``test_bpd``: the uniform-dequantisation bound that
      published bits/dim use (Glow: 3.35 on CIFAR-10), -log p(x + u) with one u ~ U[0, 1)^D
      per image drawn from generators seeded by ``noise`` (the same noise every call);
    - ``test_bpd_centres``: the density at the bin centres (u = 0.5), not a bound;
    - ``acc_top1`` / ``acc_top5``: NF accuracy (%) at the bin centres (SPEC §6).

    Under torch.distributed the per-image results of all shards are gathered so every
    process returns the full-set metrics (the noise of an image does not depend on the
    number of processes).
    """
    with eval_mode(model):
        nll, _, _ = _test_pass(model, gaussians, arrays, bits, batch_size, noise)
        centres, score, y = _test_pass(model, gaussians, arrays, bits, batch_size, None)
    dim = math.prod(arrays.shape)
    acc = topk_accuracy(score, y, ks=(1, 5))
    return {
        "test_nll": float(nll.mean()),
        "test_bpd": float(bits_per_dim(nll.mean(), dim, bits)),
        "test_bpd_centres": float(bits_per_dim(centres.mean(), dim, bits)),
        "acc_top1": acc["top1"],
        "acc_top5": acc["top5"],
    }
