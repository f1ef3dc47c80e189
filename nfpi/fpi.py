"""Class Gaussians by fixed-point iteration (NFPI paper Eqs. 3-10; SPEC §2-§3).

Given per-class latent statistics (count N_y, mean m_y, variance v_y) the class Gaussians
N(mu_y, s_y) minimise

    J(mu, s) = sum_y NLL_y(mu_y, s_y) + c * sum_{y != y'} exp(-KL_yy' / (pi_yy' * alpha)),
    c = lambda / (K (K - 1)),

with pi held fixed during an update (Eq. 9 ``pi="pairwise"``: pi_yy' = KL_yy'; Eq. 10
``pi="mean"``: the mean off-diagonal KL). The stationarity conditions give the closed-form
updates of Eq. 5 (means) and Eqs. 6-7 (covariances, a matrix geometric mean
Sigma = A^-1 # B; elementwise sqrt(B / A) for diagonal covariances). :func:`solve` iterates
them to a fixed point with safeguarded Anderson mixing (:func:`nfpi.anderson.fixed_point`,
re-exported here as :func:`fixed_point`), keeps variances inside
``[v/rho, v*rho]`` and reports when that bound is active, and never returns non-finite values.
The released code's options (SPEC §3) are available for parity: its variance rule
(``rule="released"``), its isotropic mean step and its stopping rule (``stop="released"``).

All K x K quantities are built from (K, D) matrix products: O(K^2 D) time, O(K^2 + K D) memory.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from .anderson import fixed_point

Pi = Literal["pairwise", "mean"]
Learn = Literal["both", "means", "variances"]
Rule = Literal["paper", "released"]
Stop = Literal["relative", "released"]

RELEASED_TOL = 0.1  # the released stopping rule: per-class L2 change of mu and of s <= 0.1

__all__ = [
    "ClassStats", "FPIResult", "FPIWarning", "FPIDivergenceError",
    "update", "fixed_point", "RELEASED_TOL",
    "pairwise_kl", "kernel", "objective", "gradient_residual", "solve",
    "unbounded_threshold", "check_solver_args", "geometric_mean_solve",
]


class FPIWarning(RuntimeWarning):
    """The solver hit a variance bound, did not converge, or runs where J is unbounded."""


class FPIDivergenceError(RuntimeError):
    """The iteration produced non-finite values; raised instead of returning NaN."""


# ----------------------------------------------------------------------------- statistics
@dataclass
class ClassStats:
    """Sum-based per-class statistics of latents, float64.

    ``count`` (K,), ``total`` (K, D) = sum z, ``total_sq`` (K, D) = sum z**2 and, when built
    with ``full=True``, ``total_outer`` (K, D, D) = sum z z^T. Because they are plain sums,
    ``a + b`` merges batches and :meth:`all_reduce` merges processes exactly.
    """

    count: Tensor
    total: Tensor
    total_sq: Tensor
    total_outer: Tensor | None = None

    @classmethod
    def from_latents(cls, z: Tensor, y: Tensor, num_classes: int, full: bool = False) -> "ClassStats":
        """Statistics of latents ``z`` (N, D) with labels ``y`` (N,) in [0, num_classes)."""
        if z.ndim != 2:
            raise ValueError(f"latents must have shape (N, D), got {tuple(z.shape)}; flatten images first")
        if y.ndim != 1 or y.shape[0] != z.shape[0]:
            raise ValueError(f"labels must have shape ({z.shape[0]},), got {tuple(y.shape)}")
        if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
            # .long() would truncate 2.7 to class 2 without a word
            raise ValueError(f"labels must be an integer tensor (torch.long), got {y.dtype}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ValueError(
                f"labels must lie in [0, {num_classes}); found range [{int(y.min())}, {int(y.max())}]. "
                "Check num_classes or remap the labels.")
        if not torch.isfinite(z).all():
            raise ValueError("latents contain NaN or inf; the flow diverged or the input is corrupt")
        z = z.detach().to(torch.float64)
        y = y.to(z.device, torch.long)
        k, d = num_classes, z.shape[1]
        ones = torch.ones_like(y, dtype=torch.float64)
        count = torch.zeros(k, dtype=torch.float64, device=z.device).index_add_(0, y, ones)
        total = torch.zeros(k, d, dtype=torch.float64, device=z.device).index_add_(0, y, z)
        total_sq = torch.zeros(k, d, dtype=torch.float64, device=z.device).index_add_(0, y, z * z)
        outer = None
        if full:
            outer = torch.zeros(k, d, d, dtype=torch.float64, device=z.device).index_add_(
                0, y, z[:, :, None] * z[:, None, :])
        return cls(count, total, total_sq, outer)

    def __add__(self, other: "ClassStats") -> "ClassStats":
        if self.total.shape != other.total.shape:
            raise ValueError(f"cannot merge statistics of shapes {tuple(self.total.shape)} and "
                             f"{tuple(other.total.shape)}")
        outer = None
        if self.total_outer is not None and other.total_outer is not None:
            outer = self.total_outer + other.total_outer
        return ClassStats(self.count + other.count, self.total + other.total,
                          self.total_sq + other.total_sq, outer)

    def all_reduce(self) -> "ClassStats":
        """Sum the statistics over all torch.distributed processes (exact: they are sums)."""
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            for t in (self.count, self.total, self.total_sq, self.total_outer):
                if t is not None:
                    dist.all_reduce(t)
        return self

    @property
    def num_classes(self) -> int:
        return self.total.shape[0]

    @property
    def dim(self) -> int:
        return self.total.shape[1]

    def mean(self) -> Tensor:
        """Class means m_y, (K, D)."""
        self._require_class_counts(1)
        return self.total / self.count[:, None]

    def var(self) -> Tensor:
        """Population (biased) per-dimension class variances v_y, (K, D)."""
        self._require_class_counts(2)
        m = self.mean()
        return (self.total_sq / self.count[:, None] - m * m).clamp_min(0.0)

    def cov(self) -> Tensor:
        """Population class covariances, (K, D, D); needs ``full=True`` statistics."""
        if self.total_outer is None:
            raise ValueError("full covariances need ClassStats.from_latents(..., full=True)")
        self._require_class_counts(2)
        m = self.mean()
        return self.total_outer / self.count[:, None, None] - m[:, :, None] * m[:, None, :]

    def _require_class_counts(self, minimum: int) -> None:
        small = (self.count < minimum).nonzero().flatten().tolist()
        if small:
            raise ValueError(
                f"classes {small} have fewer than {minimum} samples "
                f"(counts {[int(self.count[i]) for i in small]}); a class Gaussian needs at least 2. "
                "Use more data per class or drop those classes.")


# ------------------------------------------------------------------------------ KL, kernel
def pairwise_kl(means: Tensor, variances: Tensor) -> Tensor:
    """KL(N_y || N_y') for all pairs, (K, K), diagonal zero.

    ``means``/``variances``: (K, D) for diagonal Gaussians, or variances (K, D, D) for full
    covariances (small D only). Diagonal case uses matrix products only (no K x K x D tensor).
    """
    k, d = means.shape
    if variances.ndim == 3:
        prec = torch.linalg.inv(variances)                              # (K, D, D)
        logdet = torch.linalg.slogdet(variances)[1]                     # (K,)
        tr = torch.einsum("aij,bji->ab", variances, prec)               # tr(S_b^-1 S_a)
        diff = means[:, None, :] - means[None, :, :]                    # (K, K, D): D is small here
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
            "undefined. Check for duplicated classes or labels, or use pi='mean'.")
    pa = p * alpha
    return torch.where(off, torch.exp(-kl / pa) / pa, torch.zeros_like(kl))


def unbounded_threshold(num_classes: int, alpha: float = 10.0, pi: Pi = "pairwise") -> float:
    """Un-normalised lambda above which one learned variance of the paper rule runs to its bound.

    Let one variance s = s_y,d grow, c = lambda / (K (K-1)), and write 2 s dJ/ds = 1 - R(s).
    - ``pi="pairwise"`` (SPEC §3): the potential has -c e^{-1/alpha}/alpha log KL_yy' with
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
    """sum_y NLL_y (SPEC §2, without constants); diagonal (K, D) or full (K, D, D)."""
    if variances.ndim == 3:
        diff = m - means
        scatter = v + diff[:, :, None] * diff[:, None, :]
        prec = torch.linalg.inv(variances)
        return 0.5 * (torch.einsum("kij,kji->", prec, scatter) + torch.linalg.slogdet(variances)[1].sum())
    return 0.5 * ((v + (m - means) ** 2) / variances + variances.log()).sum()


def objective(stats: ClassStats, means: Tensor, variances: Tensor, lam: float,
              alpha: float = 10.0, pi: Pi = "pairwise") -> Tensor:
    """The potential whose gradient is that of J with pi held fixed (scalar tensor).

    pi="mean": J itself with pi detached. pi="pairwise": J with pi = KL has a constant
    repulsion value, so the potential sum_y NLL_y - c e^{-1/alpha}/alpha sum log KL_yy'
    (same gradient, SPEC §2) is returned instead: it is what FPI and gradient descent both
    minimise and what the history reports. Differentiable in ``means`` and ``variances``.
    """
    k = stats.num_classes
    full = variances.ndim == 3
    m, v = stats.mean(), (stats.cov() if full else stats.var())
    kl = pairwise_kl(means, variances) if lam else None
    return _potential(m, v, means, variances, kl, lam / (k * (k - 1)), alpha, pi)


def _potential(m: Tensor, v: Tensor, means: Tensor, variances: Tensor, kl: Tensor | None,
               lam_normalised: float, alpha: float, pi: Pi) -> Tensor:
    """:func:`objective` from precomputed data moments and KL matrix (None when lambda = 0)."""
    nll = _nll(m, v, means, variances)
    if kl is None:
        return nll
    off = ~torch.eye(kl.shape[0], dtype=torch.bool, device=kl.device)
    if pi == "pairwise":
        return nll - lam_normalised * math.exp(-1.0 / alpha) / alpha * kl[off].log().sum()
    return nll + lam_normalised * torch.exp(-kl / (_scale(kl, pi) * alpha))[off].sum()


# ------------------------------------------------------------------------------ the update
def _diag_update(m: Tensor, v: Tensor, mu: Tensor, s: Tensor, kl: Tensor, lam_normalised: float,
                 alpha: float, pi: Pi, learn: Learn, rule: Rule, isotropic: bool) -> tuple[Tensor, Tensor]:
    """One Jacobi sweep of Eqs. 5-7 from iterate (mu, s), all (K, D), with kl = KL(mu, s)."""
    kmat = kernel(kl, alpha, pi)
    kt = kmat.T
    col = kt.sum(1, keepdim=True)                   # sum_y' K_y'y, (K, 1)
    row = kmat.sum(1, keepdim=True)                 # sum_y' K_yy'
    prec = s.reciprocal()
    prec_sum = kmat @ prec                          # sum_y' K_yy'/s_y', shared by both updates
    kt_mu = kt @ mu                                 # sum_y' K_y'y mu_y'
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
            d2 = mu * (mu * col - 2.0 * kt_mu) + kt @ (mu * mu)          # sum_y' K_y'y d_yy'^2
            a = (1.0 + tau) * prec + lam_normalised * prec * prec * (d2 + kt @ s)
            b = v + (m - mu) ** 2 + lam_normalised * s * s * prec_sum
        elif rule == "released":
            # released code (SPEC §3): A multiplied by s^2, data variance instead of the
            # scatter, and q_y' = sum_l (mu_y' - mu_l)^2 in place of d_yy'^2.
            q = _spread(mu)
            a = (1.0 + tau) * s + lam_normalised * (kt @ (q + s))
            b = v + lam_normalised * s * s * prec_sum
        else:
            raise ValueError(f"rule must be 'paper' or 'released', got {rule!r}")
        # 2 dJ/ds = A - B/s^2: where A <= 0 J decreases as s grows, so send s to the upper
        # bound (it is clamped by the caller) instead of taking the root of a negative number.
        s_new = torch.where(a > 0, (b / a.clamp_min(torch.finfo(a.dtype).tiny)).sqrt(),
                            torch.full_like(s, math.inf))
    return mu_new, s_new


def update(stats: ClassStats, means: Tensor, variances: Tensor, lam: float, alpha: float = 10.0,
           pi: Pi = "pairwise", learn: Learn = "both", rule: Rule = "paper",
           isotropic_mean_step: bool = False) -> tuple[Tensor, Tensor]:
    """One undamped, unbounded update of :func:`solve` from (means (K, D), variances (K, D)):
    Eqs. 5-7, or the released rules. A returned fixed point of :func:`solve` maps to itself."""
    k = stats.num_classes
    kl = pairwise_kl(means, variances)
    return _diag_update(stats.mean(), stats.var(), means, variances, kl, lam / (k * (k - 1)), alpha, pi,
                        learn, rule, isotropic_mean_step)


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


def _full_update(m: Tensor, v: Tensor, mu: Tensor, s: Tensor, kl: Tensor, lam_normalised: float,
                 alpha: float, pi: Pi, learn: Learn) -> tuple[Tensor, Tensor]:
    """Eqs. 5-7 with full covariances s (K, D, D): Sigma <- A^-1 # B."""
    kmat = kernel(kl, alpha, pi)
    prec = torch.linalg.inv(s)
    d = mu[:, None, :] - mu[None, :, :]                                # (K, K, D), D small
    mu_new, s_new = mu, s
    if learn in ("both", "means"):
        # Sigma_y sum_y' (K_yy' P_y' + K_y'y P_y) d_yy'
        w = torch.einsum("ab,bij,abj->ai", kmat, prec, d) + torch.einsum("ba,aij,abj->ai", kmat, prec, d)
        mu_new = m + lam_normalised * torch.einsum("aij,aj->ai", s, w)
    if learn in ("both", "variances"):
        tau = lam_normalised * (kmat.sum(1) - kmat.sum(0))
        outer = d[:, :, :, None] * d[:, :, None, :]
        spread = s[None, :, :, :].expand(len(mu), -1, -1, -1) + outer          # S_y' + d d^T
        cterm = lam_normalised * torch.einsum("ba,abij->aij", kmat, spread)
        a = (1.0 + tau)[:, None, None] * prec + prec @ cterm @ prec
        diff = m - mu
        kprec = torch.einsum("ab,bij->aij", kmat, prec)                   # sum_y' K_yy' P_y'
        b = v + diff[:, :, None] * diff[:, None, :] + lam_normalised * s @ kprec @ s
        s_new = geometric_mean_solve(0.5 * (a + a.mT), 0.5 * (b + b.mT))
    return mu_new, s_new



# ------------------------------------------------------------------------------ the solver
def _check_choice(name: str, value: object, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def check_solver_args(*, lam: float, alpha: float, pi: str, learn: str, rho: float, tol: float,
                      max_iter: int | None = None, tol_zero: bool = False) -> None:
    """Argument checks shared by :func:`solve` and :func:`nfpi.gd.solve`: one-line ValueErrors
    naming the argument and its valid range, before any work (``tol_zero``: tol = 0 allowed)."""
    if not (lam >= 0 and math.isfinite(lam)):
        raise ValueError(f"lambda must be finite and >= 0, got {lam}")
    # alpha divides KL in the kernel; rho <= 1 makes the box [v/rho, v*rho] empty or a point.
    if not (alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f"alpha (kernel temperature) must be finite and > 0, e.g. 10; got {alpha}")
    if not (rho > 1 and math.isfinite(rho)):
        raise ValueError(f"rho must be finite and > 1 (variances are kept in [v/rho, v*rho]), e.g. 1e3; "
                         f"got {rho}")
    if not ((tol >= 0 if tol_zero else tol > 0) and math.isfinite(tol)):
        raise ValueError(f"tol must be finite and {'>=' if tol_zero else '>'} 0, e.g. 1e-10; got {tol}")
    if max_iter is not None and not (isinstance(max_iter, int) and max_iter >= 1):
        raise ValueError(f"max_iter must be an integer >= 1, e.g. 1000; got {max_iter!r}")
    _check_choice("pi", pi, ("pairwise", "mean"))
    _check_choice("learn", learn, ("both", "means", "variances"))


@dataclass
class FPIResult:
    """Solution of :func:`solve` (or of :func:`nfpi.gd.solve`).

    ``means`` (K, D), ``variances`` (K, D) or (K, D, D); ``history`` holds one entry per
    iteration: ``objective`` (the potential of :func:`objective`), ``change`` (what the stopping
    rule compares: max per-class RMS change of the normalised parameters, or with
    ``stop="released"`` the max per-class L2 change of mu and s), ``active_bounds`` (variance
    entries on a bound), ``time`` (s); :func:`nfpi.gd.solve` adds ``lr``.
    """

    means: Tensor
    variances: Tensor
    iterations: int
    converged: bool
    lam: float
    lam_normalised: float
    bounds_active: int = 0
    history: dict[str, list[float]] = field(default_factory=lambda: {
        "objective": [], "change": [], "active_bounds": [], "time": []})

    @property
    def objective(self) -> float:
        return self.history["objective"][-1]


def solve(stats: ClassStats, lam: float, alpha: float = 10.0, pi: Pi = "pairwise",
          learn: Learn = "both", init: tuple[Tensor, Tensor] | None = None, rule: Rule = "paper",
          covariance: Literal["diag", "full"] = "diag", isotropic_mean_step: bool = False,
          rho: float = 1e3, tol: float = 1e-10, max_iter: int = 1000, stop: Stop = "relative",
          accel: Literal["anderson", "none"] = "anderson",
          damping: float = 1.0, memory: int = 5, var_floor: float = 1e-8,
          on_fail: Literal["warn", "raise"] = "warn") -> FPIResult:
    """Fixed point of Eqs. 5-7 for the class Gaussians.

    Args:
        stats: class statistics of the latents (K classes, D dims).
        lam: un-normalised lambda; c = lam / (K (K-1)) is used inside.
        alpha, pi: kernel temperature and scale (Eq. 9 "pairwise" / Eq. 10 "mean").
        learn: update "both", only "means" (variances kept at init) or only "variances".
        init: (means (K, D), variances (K, D) or (K, D, D)); default the data statistics.
        rule: "paper" (stationary Eqs. 6-7) or "released" (the authors' code, SPEC §3;
            diagonal only; its lambda=0 fixed point is v^(1/3), not v).
        covariance: "diag" or "full" (matrix geometric mean; for small D, e.g. the 2-D demo).
        isotropic_mean_step: the released mean step: in Eq. 5 the precisions become their
            means over dimensions and the outer s_y its mean (diagonal only).
        rho: variances are kept in [v/rho, v*rho] around the data variance v.
        tol: with ``stop="relative"``, stop when the RMS change of (means / data std, log
            variances) of every class is below tol (scale free).
        stop: "relative" (default, ``tol``) or "released": the authors' rule, max over classes
            of the L2 change of the means and of the variances both <= RELEASED_TOL = 0.1 in the
            latents' own units (``tol`` unused). The change is that of one undamped update.
        accel: "anderson" mixing (default) or "none" (damped Picard iteration).
        damping: eta of mu <- (1-eta) mu + eta mu_new, s <- s^(1-eta) s_new^eta.
        memory: Anderson's history m (iterates kept for the mixing).
        var_floor: data variances below var_floor * mean variance are raised to it (constant
            latent dimensions would otherwise give zero-width Gaussians).
        on_fail: "warn" (return with ``converged=False``) or "raise" when not converged.
    Returns:
        FPIResult with means (K, D), variances (K, D) or (K, D, D), iteration count,
        convergence flag and history.
    Raises:
        ValueError: a bad argument (before any work); FPIDivergenceError: non-finite values,
        or no convergence with ``on_fail="raise"``.

    Example:
        >>> z, y = torch.randn(300, 4, dtype=torch.float64), torch.arange(300) % 3
        >>> res = solve(ClassStats.from_latents(z, y, 3), lam=1.0)
        >>> res.converged, res.means.shape, res.variances.shape
        (True, torch.Size([3, 4]), torch.Size([3, 4]))
    """
    start = time.perf_counter()
    _check_solve_args(stats, lam, alpha, pi, learn, rule, covariance, rho, tol, max_iter, stop,
                      accel, damping, memory, var_floor, on_fail)
    m, v = _data_moments(stats, covariance == "full", var_floor)
    init = _initial_point(init, m, v)
    _warn_if_unbounded(lam, stats.num_classes, alpha, pi, learn, rule, rho)
    step = _FPIMap(m, v, init, lam, alpha, pi, learn, rule, isotropic_mean_step, rho, stop, tol, start)
    x, gx, (_, _, mapped), converged = fixed_point(step, step.pack(*init), step.done, step.project,
                                                   accel, memory, damping, max_iter)
    return _report(step, x, gx, mapped, converged, max_iter, on_fail)


def _check_solve_args(stats: ClassStats, lam: float, alpha: float, pi: str, learn: str, rule: str,
                      covariance: str, rho: float, tol: float, max_iter: int,
                      stop: str, accel: str, damping: float, memory: int, var_floor: float,
                      on_fail: str) -> None:
    """:func:`solve`'s argument checks, before any work: one-line ValueErrors naming the fix."""
    if stats.num_classes < 2:
        raise ValueError("FPI needs at least 2 classes")
    check_solver_args(lam=lam, alpha=alpha, pi=pi, learn=learn, rho=rho, tol=tol, max_iter=max_iter)
    _check_choice("rule", rule, ("paper", "released"))
    _check_choice("covariance", covariance, ("diag", "full"))
    _check_choice("accel", accel, ("anderson", "none"))
    _check_choice("on_fail", on_fail, ("warn", "raise"))
    if accel == "anderson" and not (isinstance(memory, int) and memory >= 1):
        raise ValueError(f"memory (Anderson history) must be an integer >= 1, got {memory!r}")
    if not var_floor >= 0:
        raise ValueError(f"var_floor must be >= 0 (a fraction of the mean data variance), got {var_floor}")
    if rule == "released" and covariance == "full":
        raise ValueError("rule='released' exists for diagonal covariances only")
    if not 0 < damping <= 1:
        raise ValueError(f"damping must be in (0, 1], got {damping}")
    if covariance == "full" and stats.dim > 64:
        raise ValueError(f"full covariances are for small D (<= 64), got D={stats.dim}; "
                         "use covariance='diag'")
    if stop not in ("relative", "released"):
        raise ValueError(f"stop must be 'relative' or 'released', got {stop!r}")


def _data_moments(stats: ClassStats, full: bool, var_floor: float) -> tuple[Tensor, Tensor]:
    """Class means m (K, D) and variances v (K, D), or covariances (K, D, D), whose variances
    (eigenvalues) are raised to var_floor x their mean."""
    m = stats.mean()
    if not full:
        v = stats.var()
        return m, v.clamp_min(var_floor * v.mean())
    v = stats.cov()
    ref = torch.linalg.eigvalsh(v)                   # eigenvalues bound the geometry
    floor = var_floor * ref.mean()
    eye = torch.eye(stats.dim, dtype=v.dtype, device=v.device)
    return m, v + eye * (floor - ref.min(1).values).clamp_min(0)[:, None, None]


def _initial_point(init: tuple[Tensor, Tensor] | None, m: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Copies of ``init`` (means, variances) as float64 on m's device; default the data moments."""
    if init is None:
        return m.clone(), v.clone()
    mu0, s0 = init[0].to(m).clone(), init[1].to(m).clone()
    if mu0.shape != m.shape or s0.shape != v.shape:
        raise ValueError(f"init must have shapes {tuple(m.shape)} and {tuple(v.shape)}, "
                         f"got {tuple(mu0.shape)} and {tuple(s0.shape)}")
    return mu0, s0


def _warn_if_unbounded(lam: float, k: int, alpha: float, pi: Pi, learn: Learn, rule: Rule,
                       rho: float) -> None:
    """FPIWarning (at solve's caller) when lambda puts the paper rule's variances in the unbounded regime."""
    threshold = unbounded_threshold(k, alpha, pi)
    if learn == "means" or rule != "paper" or not lam > threshold:
        return
    why = ("J is unbounded below" if pi == "pairwise" else
           "each update multiplies a large variance by sqrt(2 lambda e^{-K/alpha} / alpha) > 1, "
           "so the variances are unbounded")
    warnings.warn(
        f"lambda={lam:g} exceeds {threshold:.4g}, above which {why} for "
        f"pi={pi!r} with learned variances (K={k}, alpha={alpha}); variances will be held in "
        f"[v/{rho:g}, v*{rho:g}]. Lower lambda, use learn='means' or rule='released' for a "
        "bounded problem.", FPIWarning, stacklevel=3)


class _FPIMap:
    """The FPI map x -> G(x) of Eqs. 5-7 for :func:`fixed_point`, and the record of its iterates.

    x packs the learned blocks only, in normalised coordinates: u = (mu - m) / sqrt(v), then
    w = log s (diagonal) or s itself (full, projected by its eigenvalues), so that Anderson's
    least squares weighs means and variances comparably. Fixed blocks stay at ``init``.
    Learned variances are kept in [v/rho, v*rho]; fixed ones (e.g. identity) stay as given.
    """

    def __init__(self, m: Tensor, v: Tensor, init: tuple[Tensor, Tensor], lam: float, alpha: float,
                 pi: Pi, learn: Learn, rule: Rule, isotropic_mean_step: bool, rho: float, stop: Stop,
                 tol: float, start: float):
        k = m.shape[0]
        self.m, self.v, (self.mu0, self.s0) = m, v, init
        self.lam, self.lam_normalised = lam, lam / (k * (k - 1))
        self.alpha, self.pi, self.learn, self.rule = alpha, pi, learn, rule
        self.isotropic = isotropic_mean_step
        self.upd_mu, self.upd_s = learn in ("both", "means"), learn in ("both", "variances")
        self.full = v.ndim == 3
        self.vdiag = torch.diagonal(v, dim1=1, dim2=2) if self.full else v
        self.std = self.vdiag.sqrt()
        self.rho = rho
        self.log_lo, self.log_hi = self.vdiag.log() - math.log(rho), self.vdiag.log() + math.log(rho)
        self.stop, self.threshold = stop, RELEASED_TOL if stop == "released" else tol
        self.start = start
        self.history: dict[str, list[float]] = {
            "objective": [], "change": [], "active_bounds": [], "time": []}

    def pack(self, mu: Tensor, s: Tensor) -> Tensor:
        parts = [((mu - self.m) / self.std).flatten()] if self.upd_mu else []
        if self.upd_s:
            parts.append((s if self.full else s.log()).flatten())
        return torch.cat(parts)

    def blocks(self, x: Tensor) -> list[Tensor]:
        """The learned blocks of packed ``x`` as (K, -1) views: normalised means, then variances."""
        k = self.m.shape[0]
        split = self.m.numel() if self.upd_mu else 0
        parts = ([x[:split]] if self.upd_mu else []) + ([x[split:]] if self.upd_s else [])
        return [part.view(k, -1) for part in parts]

    def unpack(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, s = self.mu0, self.s0
        blocks = iter(self.blocks(x))
        if self.upd_mu:
            mu = self.m + next(blocks) * self.std
        if self.upd_s:
            w = next(blocks).view(self.s0.shape)
            s = _clamp_spd(w, self.vdiag, self.rho) if self.full else w.clamp(self.log_lo, self.log_hi).exp()
        return mu, s

    def project(self, x: Tensor) -> Tensor:
        return self.pack(*self.unpack(x))

    def active(self, x: Tensor) -> int:
        """Learned variance entries (eigenvalues for full covariances) on a bound of [v/rho, v*rho]."""
        if not self.upd_s:
            return 0
        w = self.blocks(x)[-1].view(self.s0.shape)
        if self.full:
            eig = torch.linalg.eigvalsh(0.5 * (w + w.mT))
            ref = self.vdiag.mean(1, keepdim=True)
            return int(((eig <= ref / self.rho * (1 + 1e-9)) | (eig >= ref * self.rho * (1 - 1e-9))).sum())
        return int(((w <= self.log_lo + 1e-12) | (w >= self.log_hi - 1e-12)).sum())

    def __call__(self, x: Tensor) -> tuple[Tensor, tuple[float, float, tuple[Tensor, Tensor]]]:
        """G(x), and (the potential at x, the change the stopping rule compares, the mapped means
        and variances themselves: exact, no log/exp round trip)."""
        mu, s = self.unpack(x)
        kl = pairwise_kl(mu, s)
        lam_n, m, v = self.lam_normalised, self.m, self.v
        if lam_n == 0 and self.rule == "paper":  # lambda = 0: the data statistics, in one step
            mu_new, s_new = (m if self.upd_mu else mu), (v if self.upd_s else s)
        elif self.full:
            mu_new, s_new = _full_update(m, v, mu, s, kl, lam_n, self.alpha, self.pi, self.learn)
        else:
            mu_new, s_new = _diag_update(m, v, mu, s, kl, lam_n, self.alpha, self.pi, self.learn, self.rule,
                                         self.isotropic)
        value = float(_potential(m, v, mu, s, kl if lam_n else None, lam_n, self.alpha, self.pi))
        if self.upd_s:
            s_new = _clamp_spd(s_new, self.vdiag, self.rho) if self.full else \
                torch.minimum(torch.maximum(s_new, self.log_lo.exp()), self.log_hi.exp())
        gx = self.pack(mu_new, s_new)
        if not torch.isfinite(gx).all():
            raise FPIDivergenceError(
                f"FPI produced non-finite values at iteration {len(self.history['change'])} (lambda="
                f"{self.lam:g}, pi={self.pi}, learn={self.learn}). Lower lambda, tighten rho, or use "
                "accel='none' with damping < 1.")
        if self.stop == "released":  # max over classes of the L2 change of mu and of s, latent units
            k = self.m.shape[0]
            pairs = [(b, a) for b, a, on in zip((mu, s), (mu_new, s_new), (self.upd_mu, self.upd_s)) if on]
            change = max(float((a - b).reshape(k, -1).norm(dim=1).max()) for b, a in pairs)
        else:  # max over classes of the RMS change of each block of normalised parameters
            change = max(float(f.pow(2).mean(1).sqrt().max()) for f in self.blocks(gx - x))
        return gx, (value, change, (mu_new, s_new))

    def done(self, x: Tensor, gx: Tensor, aux: tuple[float, float, Any]) -> bool:
        """Record iterate x in the history (``done`` of :func:`fixed_point`); the stopping rule."""
        value, change, _ = aux
        self.history["objective"].append(value)
        self.history["change"].append(change)
        self.history["active_bounds"].append(self.active(x))
        self.history["time"].append(time.perf_counter() - self.start)
        return change <= self.threshold


def _report(step: _FPIMap, x: Tensor, gx: Tensor, mapped: tuple[Tensor, Tensor], converged: bool,
            max_iter: int, on_fail: str) -> FPIResult:
    """The FPIResult of the last iterate; warns at solve's caller about active variance bounds,
    and about non-convergence (or raises FPIDivergenceError with ``on_fail="raise"``)."""
    if converged:   # the mapped point itself (exact: no log/exp round trip)
        (mu, s), x = mapped, gx
    else:
        mu, s = step.unpack(x)
    history = step.history
    result = FPIResult(means=mu, variances=s, iterations=len(history["change"]), converged=converged,
                       lam=step.lam, lam_normalised=step.lam_normalised, bounds_active=step.active(x),
                       history=history)
    rho = step.rho
    if result.bounds_active:
        warnings.warn(
            f"{result.bounds_active} variance entries sit on the bound [v/{rho:g}, v*{rho:g}]: the "
            "objective keeps pushing them outward (lambda is large for this problem). The result "
            "is the bounded optimum; lower lambda or change rho if that is not intended.",
            FPIWarning, stacklevel=3)
    if not converged:
        msg = (f"FPI did not converge in {max_iter} iterations (last change "
               f"{history['change'][-1]:.3g} > tol {step.threshold:g}, stop={step.stop!r}; "
               f"lambda={step.lam:g}, pi={step.pi}, learn={step.learn}). "
               "Raise max_iter, use damping < 1, or lower lambda.")
        if on_fail == "raise":
            raise FPIDivergenceError(msg)
        warnings.warn(msg, FPIWarning, stacklevel=3)
    return result


def _clamp_spd(s: Tensor, vdiag: Tensor, rho: float) -> Tensor:
    """Symmetrise and clamp eigenvalues of (K, D, D) into [v/rho, v*rho] (mean data variance)."""
    s = 0.5 * (s + s.mT)
    w, q = torch.linalg.eigh(s)
    ref = vdiag.mean(1, keepdim=True)
    w = torch.minimum(torch.maximum(w, ref / rho), ref * rho)
    return (q * w[..., None, :]) @ q.mT


def gradient_residual(stats: ClassStats, means: Tensor, variances: Tensor, lam: float,
                      alpha: float = 10.0, pi: Pi = "pairwise", learn: Learn = "both") -> float:
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
