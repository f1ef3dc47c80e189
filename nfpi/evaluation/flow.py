"""Held-out metrics of a flow, from its per-image results (docs/method.md §4, §6; paper Eq. 2 and NF
accuracy argmax_y log N(f(x); mu_y, s_y)): the test NLL and bits/dim (the uniform-dequantisation
bound and the density at the bin centres) and NF accuracy top-1 / top-5. A new per-image metric
of a flow goes here.

Every number is deterministic: dequantisation noise is seeded per image
(:func:`nfpi.latents.image_noise`, seed :data:`EVAL_NOISE_SEED`), and under torch.distributed
the per-image results of all processes are gathered first.

Example:
    >>> import torch
    >>> from nfpi.data import load
    >>> from nfpi.flows import Glow
    >>> from nfpi.prior import ClassGaussians
    >>> test_set = load("digits", "test")
    >>> flow = Glow((1, 8, 8), levels=2, steps=1, hidden=8)
    >>> gaussians = ClassGaussians(torch.zeros(10, 64), torch.ones(10, 64))
    >>> sorted(evaluate_flow(flow, gaussians, test_set, bits=5))
    ['acc_top1', 'acc_top5', 'test_bpd', 'test_bpd_centres', 'test_nll']
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .._util import eval_mode
from ..data import ImageArrays, bits_per_dim
from ..latents import NonFiniteLossError, batches, model_device
from ..prior import ClassGaussians, FullGaussians
from .accuracy import topk_accuracy

__all__ = ["EVAL_NOISE_SEED", "evaluate_flow"]

# Seed of the dequantisation noise of the test bits/dim bound: fixed, so that every evaluation of
# the same model gives the same number.
EVAL_NOISE_SEED = 0

Prior = ClassGaussians | FullGaussians


@torch.no_grad()
def _test_pass(
    model: nn.Module,
    gaussians: Prior,
    arrays: ImageArrays,
    bits: int,
    batch_size: int,
    noise: int | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-image NLL (N,), class log-densities (N, K) and labels (N,) of the whole set, float32
    on the CPU (gathered from every process under torch.distributed)."""
    nlls, scores, labels = [], [], []
    for x, y in batches(arrays, bits, batch_size, model_device(model), noise):
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
    arrays: ImageArrays,
    bits: int,
    batch_size: int = 500,
    noise: int = EVAL_NOISE_SEED,
) -> dict[str, float]:
    """Held-out metrics of a flow under the true class Gaussian, eval mode, deterministic (two passes):

    - ``test_nll`` (nats/image) and ``test_bpd``: the uniform-dequantisation bound that
      published bits/dim use (Glow: 3.35 on CIFAR-10), -log p(x + u) with one u ~ U[0, 1)^D
      per image drawn from generators seeded by ``noise`` (the same noise every call);
    - ``test_bpd_centres``: the density at the bin centres (u = 0.5), not a bound;
    - ``acc_top1`` / ``acc_top5``: NF accuracy (%) at the bin centres (docs/method.md §6.1).

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
