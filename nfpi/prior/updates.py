"""One FPI update: the closed-form class Gaussian updates of the NFPI paper (Eqs. 5-7; docs/method.md §3).

From the stationarity conditions of J (:mod:`nfpi.prior.criterion`): Eq. 5 for the means, Eqs. 6-7
for the variances (a matrix geometric mean Sigma = A^-1 # B for full covariances,
:func:`geometric_mean_solve`; elementwise sqrt(B / A) for diagonal ones), and the released
code's variance rule and isotropic mean step (docs/method.md §3.3). :func:`nfpi.prior.fpi.solve`
iterates them.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from .criterion import Learn, Pi, kernel, pairwise_kl
from .stats import ClassStats

Rule = Literal["paper", "released"]

__all__ = ["Rule", "diag_update", "full_update", "geometric_mean_solve", "update"]


def diag_update(
    m: Tensor,
    v: Tensor,
    mu: Tensor,
    s: Tensor,
    kl: Tensor,
    lam_normalised: float,
    alpha: float,
    pi: Pi,
    learn: Learn,
    rule: Rule,
    isotropic: bool,
) -> tuple[Tensor, Tensor]:
    """One Jacobi sweep of Eqs. 5-7 from iterate (mu, s), all (K, D), with kl = KL(mu, s)."""
    kmat = kernel(kl, alpha, pi)
    kt = kmat.T
    col = kt.sum(1, keepdim=True)  # sum_y' K_y'y, (K, 1)
    row = kmat.sum(1, keepdim=True)  # sum_y' K_yy'
    prec = s.reciprocal()
    prec_sum = kmat @ prec  # sum_y' K_yy'/s_y', shared by both updates
    kt_mu = kt @ mu  # sum_y' K_y'y mu_y'
    mu_new, s_new = mu, s
    if learn in ("both", "means"):
        s_m, p_m, kp = s, prec, prec_sum
        if isotropic:
            # Released option, exactly as in the authors' code: each precision 1/s_y, 1/s_y'
            # becomes its mean over dimensions (mean of reciprocals) and the outer s_y its mean:
            #   mu_y <- m_y + c mean_d(s_y) sum_y' (K_yy' mean_d(1/s_y') + K_y'y mean_d(1/s_y)) d_yy'
            s_m = s.mean(1, keepdim=True)
            p_m = prec.mean(1, keepdim=True)
            kp = kmat @ p_m
        # sum_y' K_yy' d_yy'/s_y' + (1/s_y) sum_y' K_y'y d_yy', with d_yy' = mu_y - mu_y'
        push = mu * kp - kmat @ (mu * p_m) + (mu * col - kt_mu) * p_m
        mu_new = m + lam_normalised * s_m * push
    if learn in ("both", "variances"):
        tau = lam_normalised * (row - col)
        if rule == "paper":
            d2 = mu * (mu * col - 2.0 * kt_mu) + kt @ (mu * mu)  # sum_y' K_y'y d_yy'^2
            a = (1.0 + tau) * prec + lam_normalised * prec * prec * (d2 + kt @ s)
            b = v + (m - mu) ** 2 + lam_normalised * s * s * prec_sum
        elif rule == "released":
            # released code (docs/method.md §3.3): A multiplied by s^2, data variance instead of the
            # scatter, and q_y' = sum_l (mu_y' - mu_l)^2 in place of d_yy'^2.
            q = _spread(mu)
            a = (1.0 + tau) * s + lam_normalised * (kt @ (q + s))
            b = v + lam_normalised * s * s * prec_sum
        else:
            raise ValueError(f"rule must be 'paper' or 'released', got {rule!r}")
        # 2 dJ/ds = A - B/s^2: where A <= 0 J decreases as s grows, so send s to the upper
        # bound (it is clamped by the caller) instead of taking the root of a negative number.
        s_new = torch.where(
            a > 0, (b / a.clamp_min(torch.finfo(a.dtype).tiny)).sqrt(), torch.full_like(s, math.inf)
        )
    return mu_new, s_new


def update(
    stats: ClassStats,
    means: Tensor,
    variances: Tensor,
    lam: float,
    alpha: float = 10.0,
    pi: Pi = "pairwise",
    learn: Learn = "both",
    rule: Rule = "paper",
    isotropic_mean_step: bool = False,
) -> tuple[Tensor, Tensor]:
    """One undamped, unbounded update of :func:`nfpi.prior.fpi.solve` from (means (K, D), variances (K, D)):
    Eqs. 5-7, or the released rules. A returned fixed point of :func:`nfpi.prior.fpi.solve` maps to itself."""
    k = stats.num_classes
    kl = pairwise_kl(means, variances)
    return diag_update(
        stats.mean(),
        stats.var(),
        means,
        variances,
        kl,
        lam / (k * (k - 1)),
        alpha,
        pi,
        learn,
        rule,
        isotropic_mean_step,
    )


def _spread(mu: Tensor) -> Tensor:
    """q_y = sum_l (mu_y - mu_l)^2 per dimension, (K, D), without a K x K x D tensor."""
    k = mu.shape[0]
    return k * mu * mu - 2.0 * mu * mu.sum(0, keepdim=True) + (mu * mu).sum(0, keepdim=True)


def _sym_sqrt(a: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric square root and inverse square root of SPD matrices (..., D, D)."""
    w, q = torch.linalg.eigh(a)
    w = w.clamp_min(torch.finfo(a.dtype).tiny)
    return (q * w.sqrt()[..., None, :]) @ q.mT, (q * w.rsqrt()[..., None, :]) @ q.mT


def geometric_mean_solve(a: Tensor, b: Tensor) -> Tensor:
    """The SPD solution X of X A X = B: X = A^-1 # B = A^-1/2 (A^1/2 B A^1/2)^1/2 A^-1/2."""
    ah, aih = _sym_sqrt(a)
    mid, _ = _sym_sqrt(ah @ b @ ah)
    x = aih @ mid @ aih
    return 0.5 * (x + x.mT)


def full_update(
    m: Tensor,
    v: Tensor,
    mu: Tensor,
    s: Tensor,
    kl: Tensor,
    lam_normalised: float,
    alpha: float,
    pi: Pi,
    learn: Learn,
) -> tuple[Tensor, Tensor]:
    """Eqs. 5-7 with full covariances s (K, D, D): Sigma <- A^-1 # B."""
    kmat = kernel(kl, alpha, pi)
    prec = torch.linalg.inv(s)
    d = mu[:, None, :] - mu[None, :, :]  # (K, K, D), D small
    mu_new, s_new = mu, s
    if learn in ("both", "means"):
        # Sigma_y sum_y' (K_yy' P_y' + K_y'y P_y) d_yy'
        w = torch.einsum("ab,bij,abj->ai", kmat, prec, d) + torch.einsum("ba,aij,abj->ai", kmat, prec, d)
        mu_new = m + lam_normalised * torch.einsum("aij,aj->ai", s, w)
    if learn in ("both", "variances"):
        tau = lam_normalised * (kmat.sum(1) - kmat.sum(0))
        outer = d[:, :, :, None] * d[:, :, None, :]
        spread = s[None, :, :, :].expand(len(mu), -1, -1, -1) + outer  # S_y' + d d^T
        cterm = lam_normalised * torch.einsum("ba,abij->aij", kmat, spread)
        a = (1.0 + tau)[:, None, None] * prec + prec @ cterm @ prec
        diff = m - mu
        kprec = torch.einsum("ab,bij->aij", kmat, prec)  # sum_y' K_yy' P_y'
        b = v + diff[:, :, None] * diff[:, None, :] + lam_normalised * s @ kprec @ s
        s_new = geometric_mean_solve(0.5 * (a + a.mT), 0.5 * (b + b.mT))
    return mu_new, s_new
