"""The objective J of the NFPI paper (Eqs. 2-4; docs/method.md §2) and its pieces: pairwise KL, kernel.

    J(mu, s) = sum_y NLL_y(mu_y, s_y) + c * sum_{y != y'} exp(-KL_yy' / (pi_yy' * alpha)),
    c = lambda / (K (K - 1)),

with pi held fixed (Eq. 9 ``pi="pairwise"``: pi_yy' = KL_yy'; Eq. 10 ``pi="mean"``: the mean
off-diagonal KL). :func:`pairwise_kl` gives all KL_yy' from (K, D) matrix products,
:func:`kernel` the K_yy' of Proposition 1 that the updates of :mod:`nfpi.prior.fpi` use,
:func:`objective` / :func:`potential` the value whose gradient is that of J,
:func:`gradient_residual` the stationarity check of a solution and
:func:`unbounded_threshold` the lambda above which J has no minimum.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from .stats import ClassStats

Pi = Literal["pairwise", "mean"]
Learn = Literal["both", "means", "variances"]

__all__ = [
    "Learn",
    "Pi",
    "gradient_residual",
    "kernel",
    "objective",
    "pairwise_kl",
    "potential",
    "unbounded_threshold",
]


# ------------------------------------------------------------------------------ KL, kernel
def pairwise_kl(means: Tensor, variances: Tensor) -> Tensor:
    """KL(N_y || N_y') for all pairs, (K, K), diagonal zero.

    ``means``/``variances``: (K, D) for diagonal Gaussians, or variances (K, D, D) for full
    covariances (small D only). Diagonal case uses matrix products only (no K x K x D tensor).
    """
    k, d = means.shape
    if variances.ndim == 3:
        prec = torch.linalg.inv(variances)  # (K, D, D)
        logdet = torch.linalg.slogdet(variances)[1]  # (K,)
        tr = torch.einsum("aij,bji->ab", variances, prec)  # tr(S_b^-1 S_a)
        diff = means[:, None, :] - means[None, :, :]  # (K, K, D): D is small here
        quad = torch.einsum("abi,bij,abj->ab", diff, prec, diff)
    else:
        # KL is translation invariant: centring limits cancellation in the expanded square.
        mu = means - means.mean(0, keepdim=True)
        prec = variances.reciprocal()
        logdet = variances.log().sum(1)
        tr = variances @ prec.T
        quad = (mu * mu) @ prec.T - 2.0 * mu @ (mu * prec).T + (mu * mu * prec).sum(1)[None, :]
    kl = 0.5 * (tr + quad - d + logdet[None, :] - logdet[:, None])
    return kl * (1.0 - torch.eye(k, dtype=kl.dtype, device=kl.device))


def _scale(kl: Tensor, pi: Pi) -> Tensor:
    """pi of Eq. 9 (pairwise) or Eq. 10 (mean), detached: it is held fixed in an update."""
    kl = kl.detach()
    k = kl.shape[0]
    if pi == "pairwise":
        return kl
    if pi == "mean":
        return (kl.sum() / (k * (k - 1))).expand_as(kl)
    raise ValueError(f"pi must be 'pairwise' or 'mean', got {pi!r}")


def kernel(kl: Tensor, alpha: float, pi: Pi) -> Tensor:
    """K_yy' = exp(-KL/(pi alpha)) / (pi alpha) (Proposition 1), zero diagonal, (K, K)."""
    k = kl.shape[0]
    off = ~torch.eye(k, dtype=torch.bool, device=kl.device)
    p = _scale(kl, pi)
    tiny = torch.finfo(kl.dtype).tiny ** 0.5
    if bool((p[off] <= tiny).any()):
        raise ValueError(
            "two class Gaussians are identical (KL = 0), so pi = KL is zero and the kernel is "
            "undefined. Check for duplicated classes or labels, or use pi='mean'."
        )
    pa = p * alpha
    return torch.where(off, torch.exp(-kl / pa) / pa, torch.zeros_like(kl))


def unbounded_threshold(num_classes: int, alpha: float = 10.0, pi: Pi = "pairwise") -> float:
    """Un-normalised lambda above which one learned variance of the paper rule runs to its bound.

    Let one variance s = s_y,d grow, c = lambda / (K (K-1)), and write 2 s dJ/ds = 1 - R(s).
    - ``pi="pairwise"`` (docs/method.md §2.3): the potential has -c e^{-1/alpha}/alpha log KL_yy' with
      KL_yy' ~ s / (2 s_y'), so R -> 2 c (K-1) e^{-1/alpha}/alpha: J is unbounded below once
      lambda e^{-1/alpha} / (K alpha) > 1/2.
    - ``pi="mean"``: pi = P, the mean KL, is held fixed in an update but grows with s,
      P ~ s sum_y' 1/(2 s_y') / (K (K-1)). With equal s_y' over the other classes,
      KL_yy' / P -> K and s K_yy' -> 2 K (K-1) e^{-K/alpha} / (alpha s_y'), so the update's
      ratio s_new^2 / s^2 -> R = 2 lambda e^{-K/alpha} / alpha: above lambda = alpha e^{K/alpha} / 2
      each update multiplies s by sqrt(R) > 1 once s is large.
    """
    if pi == "pairwise":
        return 0.5 * num_classes * alpha * math.exp(1.0 / alpha)
    if pi == "mean":
        return 0.5 * alpha * math.exp(num_classes / alpha)
    raise ValueError(f"pi must be 'pairwise' or 'mean', got {pi!r}")


# ------------------------------------------------------------------------------- objective
def _nll(m: Tensor, v: Tensor, means: Tensor, variances: Tensor) -> Tensor:
    """sum_y NLL_y (docs/method.md §2, without constants); diagonal (K, D) or full (K, D, D)."""
    if variances.ndim == 3:
        diff = m - means
        scatter = v + diff[:, :, None] * diff[:, None, :]
        prec = torch.linalg.inv(variances)
        return 0.5 * (torch.einsum("kij,kji->", prec, scatter) + torch.linalg.slogdet(variances)[1].sum())
    return 0.5 * ((v + (m - means) ** 2) / variances + variances.log()).sum()


def objective(
    stats: ClassStats, means: Tensor, variances: Tensor, lam: float, alpha: float = 10.0, pi: Pi = "pairwise"
) -> Tensor:
    """The potential whose gradient is that of J with pi held fixed (scalar tensor).

    pi="mean": J itself with pi detached. pi="pairwise": J with pi = KL has a constant
    repulsion value, so the potential sum_y NLL_y - c e^{-1/alpha}/alpha sum log KL_yy'
    (same gradient, docs/method.md §2) is returned instead: it is what FPI and gradient descent both
    minimise and what the history reports. Differentiable in ``means`` and ``variances``.
    """
    k = stats.num_classes
    full = variances.ndim == 3
    m, v = stats.mean(), (stats.cov() if full else stats.var())
    kl = pairwise_kl(means, variances) if lam else None
    return potential(m, v, means, variances, kl, lam / (k * (k - 1)), alpha, pi)


def potential(
    m: Tensor,
    v: Tensor,
    means: Tensor,
    variances: Tensor,
    kl: Tensor | None,
    lam_normalised: float,
    alpha: float,
    pi: Pi,
) -> Tensor:
    """:func:`objective` from precomputed data moments and KL matrix (None when lambda = 0)."""
    nll = _nll(m, v, means, variances)
    if kl is None:
        return nll
    off = ~torch.eye(kl.shape[0], dtype=torch.bool, device=kl.device)
    if pi == "pairwise":
        return nll - lam_normalised * math.exp(-1.0 / alpha) / alpha * kl[off].log().sum()
    return nll + lam_normalised * torch.exp(-kl / (_scale(kl, pi) * alpha))[off].sum()


def gradient_residual(
    stats: ClassStats,
    means: Tensor,
    variances: Tensor,
    lam: float,
    alpha: float = 10.0,
    pi: Pi = "pairwise",
    learn: Learn = "both",
) -> float:
    """Relative stationarity residual ||grad J|| / (||grad NLL|| + ||grad repulsion||).

    Gradients of the learned parameters with pi held fixed, in natural units (mean gradient
    times the std, variance gradient times the variance) so the ratio is scale free; 0 at
    lambda = 0 is reported as the plain natural-unit norm.
    """
    mu = means.detach().clone().requires_grad_(True)
    s = variances.detach().clone().requires_grad_(True)
    nll = objective(stats, mu, s, 0.0, alpha, pi)
    total = objective(stats, mu, s, lam, alpha, pi)
    params = [p for p, on in ((mu, learn != "variances"), (s, learn != "means")) if on]
    g_nll = torch.autograd.grad(nll, params, retain_graph=True)
    g_all = torch.autograd.grad(total, params)
    sd = (variances.diagonal(dim1=-2, dim2=-1) if variances.ndim == 3 else variances).sqrt()
    var_scale = variances if variances.ndim == 2 else torch.ones_like(variances)
    scales = [sd if p is mu else var_scale for p in params]

    def norm(gs) -> float:
        return math.sqrt(sum(float(((gi * sc) ** 2).sum()) for gi, sc in zip(gs, scales)))

    n_all = norm(g_all)
    size = math.sqrt(sum(p.numel() for p in params))
    if lam == 0:  # nothing to balance: the RMS natural-unit gradient is already scale free
        return n_all / size
    n_nll = norm(g_nll)
    n_rep = norm([a - b for a, b in zip(g_all, g_nll)])
    # The floor keeps a negligible repulsion (both terms at rounding level) from reading as 1.
    return n_all / (n_nll + n_rep + 1e-12 * size)
