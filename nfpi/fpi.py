"""Class Gaussians by fixed-point iteration (NFPI paper Eqs. 3-10; SPEC §2-§3).

Given per-class latent statistics (count N_y, mean m_y, variance v_y) the class Gaussians
N(mu_y, s_y) minimise

    J(mu, s) = sum_y NLL_y(mu_y, s_y) + c * sum_{y != y'} exp(-KL_yy' / (pi_yy' * alpha)),
    c = lambda / (K (K - 1)),

with pi held fixed during an update (Eq. 9 ``pi="pairwise"``: pi_yy' = KL_yy'; Eq. 10
``pi="mean"``: the mean off-diagonal KL). The stationarity conditions give the closed-form
updates of Eq. 5 (means) and Eqs. 6-7 (covariances, a matrix geometric mean
Sigma = A^-1 # B; elementwise sqrt(B / A) for diagonal covariances). :func:`solve` iterates
them to a fixed point with Anderson mixing (:func:`fixed_point`), keeps variances inside
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
from typing import Any, Callable, Literal

import torch
from torch import Tensor

Pi = Literal["pairwise", "mean"]
Learn = Literal["both", "means", "variances"]
Rule = Literal["paper", "released"]
Stop = Literal["relative", "released"]

RELEASED_TOL = 0.1  # the released stopping rule: per-class L2 change of mu and of s <= 0.1

__all__ = [
    "ClassStats", "FPIResult", "FPIWarning", "FPIDivergenceError",
    "update", "fixed_point", "RELEASED_TOL",
    "pairwise_kl", "kernel", "objective", "gradient_residual", "solve",
    "unbounded_threshold", "check_solver_args",
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
        count = torch.zeros(k, dtype=torch.float64, device=z.device).index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
        total = torch.zeros(k, d, dtype=torch.float64, device=z.device).index_add_(0, y, z)
        total_sq = torch.zeros(k, d, dtype=torch.float64, device=z.device).index_add_(0, y, z * z)
        outer = None
        if full:
            outer = torch.zeros(k, d, d, dtype=torch.float64, device=z.device).index_add_(
                0, y, z[:, :, None] * z[:, None, :])
        return cls(count, total, total_sq, outer)

    def __add__(self, other: "ClassStats") -> "ClassStats":
        if self.total.shape != other.total.shape:
            raise ValueError(f"cannot merge statistics of shapes {tuple(self.total.shape)} and {tuple(other.total.shape)}")
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
        self._check_counts(1)
        return self.total / self.count[:, None]

    def var(self) -> Tensor:
        """Population (biased) per-dimension class variances v_y, (K, D)."""
        self._check_counts(2)
        m = self.mean()
        return (self.total_sq / self.count[:, None] - m * m).clamp_min(0.0)

    def cov(self) -> Tensor:
        """Population class covariances, (K, D, D); needs ``full=True`` statistics."""
        if self.total_outer is None:
            raise ValueError("full covariances need ClassStats.from_latents(..., full=True)")
        self._check_counts(2)
        m = self.mean()
        return self.total_outer / self.count[:, None, None] - m[:, :, None] * m[:, None, :]

    def _check_counts(self, minimum: int) -> None:
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
               c: float, alpha: float, pi: Pi) -> Tensor:
    """:func:`objective` from precomputed data moments and KL matrix (None when c = 0)."""
    nll = _nll(m, v, means, variances)
    if kl is None:
        return nll
    off = ~torch.eye(kl.shape[0], dtype=torch.bool, device=kl.device)
    if pi == "pairwise":
        return nll - c * math.exp(-1.0 / alpha) / alpha * kl[off].log().sum()
    return nll + c * torch.exp(-kl / (_scale(kl, pi) * alpha))[off].sum()


# ------------------------------------------------------------------------------ the update
def _diag_update(m: Tensor, v: Tensor, mu: Tensor, s: Tensor, kl: Tensor, c: float, alpha: float,
                 pi: Pi, learn: Learn, rule: Rule, isotropic: bool) -> tuple[Tensor, Tensor]:
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
        mu_new = m + c * s_m * push
    if learn in ("both", "variances"):
        tau = c * (row - col)
        if rule == "paper":
            d2 = mu * (mu * col - 2.0 * kt_mu) + kt @ (mu * mu)          # sum_y' K_y'y d_yy'^2
            a = (1.0 + tau) * prec + c * prec * prec * (d2 + kt @ s)
            b = v + (m - mu) ** 2 + c * s * s * prec_sum
        elif rule == "released":
            # released code (SPEC §3): A multiplied by s^2, data variance instead of the
            # scatter, and q_y' = sum_l (mu_y' - mu_l)^2 in place of d_yy'^2.
            q = _spread(mu)
            a = (1.0 + tau) * s + c * (kt @ (q + s))
            b = v + c * s * s * prec_sum
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


def _full_update(m: Tensor, v: Tensor, mu: Tensor, s: Tensor, kl: Tensor, c: float, alpha: float,
                 pi: Pi, learn: Learn) -> tuple[Tensor, Tensor]:
    """Eqs. 5-7 with full covariances s (K, D, D): Sigma <- A^-1 # B."""
    kmat = kernel(kl, alpha, pi)
    prec = torch.linalg.inv(s)
    d = mu[:, None, :] - mu[None, :, :]                                # (K, K, D), D small
    mu_new, s_new = mu, s
    if learn in ("both", "means"):
        # Sigma_y sum_y' (K_yy' P_y' + K_y'y P_y) d_yy'
        w = torch.einsum("ab,bij,abj->ai", kmat, prec, d) + torch.einsum("ba,aij,abj->ai", kmat, prec, d)
        mu_new = m + c * torch.einsum("aij,aj->ai", s, w)
    if learn in ("both", "variances"):
        tau = c * (kmat.sum(1) - kmat.sum(0))
        outer = d[:, :, :, None] * d[:, :, None, :]
        cterm = c * torch.einsum("ba,abij->aij", kmat, s[None, :, :, :].expand(len(mu), -1, -1, -1) + outer)
        a = (1.0 + tau)[:, None, None] * prec + prec @ cterm @ prec
        diff = m - mu
        b = v + diff[:, :, None] * diff[:, None, :] + c * s @ torch.einsum("ab,bij->aij", kmat, prec) @ s
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


def _anderson_step(xs: list[Tensor], fs: list[Tensor], beta: float) -> Tensor:
    """Type-II Anderson mixing on the last iterates ``xs`` and residuals ``fs`` (flat)."""
    x, f = xs[-1], fs[-1]
    if len(xs) == 1:
        return x + beta * f
    dx = torch.stack([xs[i + 1] - xs[i] for i in range(len(xs) - 1)], 1)
    df = torch.stack([fs[i + 1] - fs[i] for i in range(len(fs) - 1)], 1)
    # Least squares via the small normal equations with a relative ridge: m <= ~10 columns.
    gram = df.T @ df
    ridge = 1e-10 * gram.diagonal().max().clamp_min(1e-300)
    gamma = torch.linalg.solve(gram + ridge * torch.eye(len(gram), dtype=gram.dtype, device=gram.device), df.T @ f)
    return x + beta * f - (dx + beta * df) @ gamma


def fixed_point(g: Callable[[Tensor], tuple[Tensor, Any]], x0: Tensor,
                done: Callable[[Tensor, Tensor, Any], bool],
                project: Callable[[Tensor], Tensor] | None = None,
                accel: Literal["anderson", "none"] = "anderson", memory: int = 5, damping: float = 1.0,
                max_iter: int = 1000) -> tuple[Tensor, Tensor, Any, bool]:
    """Safeguarded Anderson mixing (or damped Picard iteration) for x = g(x) on flat vectors.

    ``g(x)`` returns (g(x), aux); ``done(x, g(x), aux)`` is called once per iterate, in order,
    and stops the iteration when True; ``project`` maps a proposal into the feasible set.
    A mixing step whose residual |g(x) - x| exceeds the current one is replaced by the damped
    plain step x + damping (g(x) - x) and the memory restarts: Anderson is not monotone on
    nonlinear maps. Returns (x, g(x), aux) of the last iterate and whether ``done`` said so.
    """
    project = project if project is not None else (lambda z: z)
    x = project(x0)
    gx, aux = g(x)
    xs: list[Tensor] = []
    fs: list[Tensor] = []
    for _ in range(max_iter):
        if done(x, gx, aux):
            return x, gx, aux, True
        f = gx - x
        if accel == "anderson":
            xs, fs = (xs + [x])[-(memory + 1):], (fs + [f])[-(memory + 1):]
            x_new = project(_anderson_step(xs, fs, damping))
            if torch.isfinite(x_new).all():
                g_new, aux_new = g(x_new)
                if (g_new - x_new).norm() <= f.norm():
                    x, gx, aux = x_new, g_new, aux_new
                    continue
            xs, fs = [], []
        x = project(x + damping * f)
        gx, aux = g(x)
    return x, gx, aux, False


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
        var_floor: data variances below var_floor * mean variance are raised to it (constant
            latent dimensions would otherwise give zero-width Gaussians).
        on_fail: "warn" (return with ``converged=False``) or "raise" when not converged.
    Returns:
        FPIResult with means (K, D), variances, iteration count, convergence flag, history.
    """
    start = time.perf_counter()
    k, d = stats.num_classes, stats.dim
    if k < 2:
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
    full = covariance == "full"
    if full and d > 64:
        raise ValueError(f"full covariances are for small D (<= 64), got D={d}; use covariance='diag'")
    c = lam / (k * (k - 1))
    m = stats.mean()
    if full:
        v = stats.cov()
        ref = torch.linalg.eigvalsh(v)                   # eigenvalues bound the geometry
        floor = var_floor * ref.mean()
        v = v + torch.eye(d, dtype=v.dtype, device=v.device) * (floor - ref.min(1).values).clamp_min(0)[:, None, None]
        vdiag = torch.diagonal(v, dim1=1, dim2=2)
    else:
        v = stats.var()
        floor = var_floor * v.mean()
        v = v.clamp_min(floor)
        vdiag = v
    if init is None:
        mu0, s0 = m.clone(), v.clone()
    else:
        mu0 = init[0].to(m).clone()
        s0 = init[1].to(m).clone()
        if mu0.shape != m.shape or s0.shape != v.shape:
            raise ValueError(f"init must have shapes {tuple(m.shape)} and {tuple(v.shape)}, "
                             f"got {tuple(mu0.shape)} and {tuple(s0.shape)}")
    if stop not in ("relative", "released"):
        raise ValueError(f"stop must be 'relative' or 'released', got {stop!r}")
    if learn != "means" and rule == "paper" and pi in ("pairwise", "mean") \
            and lam > unbounded_threshold(k, alpha, pi):
        why = ("J is unbounded below" if pi == "pairwise" else
               "each update multiplies a large variance by sqrt(2 lambda e^{-K/alpha} / alpha) > 1, "
               "so the variances are unbounded")
        warnings.warn(
            f"lambda={lam:g} exceeds {unbounded_threshold(k, alpha, pi):.4g}, above which {why} for "
            f"pi={pi!r} with learned variances (K={k}, alpha={alpha}); variances will be held in "
            f"[v/{rho:g}, v*{rho:g}]. Lower lambda, use learn='means' or rule='released' for a "
            "bounded problem.", FPIWarning, stacklevel=2)

    std = vdiag.sqrt()
    log_lo, log_hi = vdiag.log() - math.log(rho), vdiag.log() + math.log(rho)
    upd_mu, upd_s = learn in ("both", "means"), learn in ("both", "variances")

    # Iterate in normalised coordinates u = (mu - m)/sqrt(v), w = log variance (diag) or the
    # matrix log-free parametrisation (full: the covariance itself, projected by eigenvalues),
    # so that Anderson's least squares weighs means and variances comparably.
    def pack(mu: Tensor, s: Tensor) -> Tensor:
        parts = []
        if upd_mu:
            parts.append(((mu - m) / std).flatten())
        if upd_s:
            parts.append((s.log() if not full else s).flatten())
        return torch.cat(parts)

    def unpack(x: Tensor) -> tuple[Tensor, Tensor]:
        mu, s, i = mu0, s0, 0
        if upd_mu:
            mu = m + x[: k * d].view(k, d) * std
            i = k * d
        if upd_s:
            s = x[i:].view(s0.shape)
            s = s.clamp(log_lo, log_hi).exp() if not full else _clamp_spd(s, vdiag, rho)
        return mu, s

    def active(x: Tensor) -> int:
        if not upd_s:
            return 0
        s = x[(k * d if upd_mu else 0):].view(s0.shape)
        if full:
            w = torch.linalg.eigvalsh(0.5 * (s + s.mT))
            ref = vdiag.mean(1, keepdim=True)
            return int(((w <= ref / rho * (1 + 1e-9)) | (w >= ref * rho * (1 - 1e-9))).sum())
        return int(((s <= log_lo + 1e-12) | (s >= log_hi - 1e-12)).sum())

    def project(x: Tensor) -> Tensor:
        return pack(*unpack(x))

    def g(x: Tensor) -> tuple[Tensor, float, tuple[Tensor, Tensor]]:
        """The FPI map in packed coordinates, the potential at x (from the same KL), and the
        mapped (means, variances) themselves (exact: no log/exp round trip)."""
        mu, s = unpack(x)
        kl = pairwise_kl(mu, s)
        if c == 0 and rule == "paper":  # lambda = 0: the data statistics, in one step
            mu_n, s_n = (m if upd_mu else mu), (v if upd_s else s)
        elif full:
            mu_n, s_n = _full_update(m, v, mu, s, kl, c, alpha, pi, learn)
        else:
            mu_n, s_n = _diag_update(m, v, mu, s, kl, c, alpha, pi, learn, rule, isotropic_mean_step)
        value = float(_potential(m, v, mu, s, kl if c else None, c, alpha, pi))
        if upd_s:  # only learned variances are bounded: fixed ones (e.g. identity) stay as given
            s_n = torch.minimum(torch.maximum(s_n, log_lo.exp()), log_hi.exp()) if not full \
                else _clamp_spd(s_n, vdiag, rho)
        return pack(mu_n, s_n), value, (mu_n, s_n)

    result = FPIResult(means=m, variances=v, iterations=0, converged=False, lam=lam, lam_normalised=c)
    threshold = RELEASED_TOL if stop == "released" else tol

    def mapped(x: Tensor) -> tuple[Tensor, tuple[float, float, tuple[Tensor, Tensor]]]:
        """g(x) and (potential at x, the change the stopping rule uses, the mapped mu and s)."""
        gx, value, new = g(x)
        if not torch.isfinite(gx).all():
            raise FPIDivergenceError(
                f"FPI produced non-finite values at iteration {result.iterations} (lambda={lam:g}, pi={pi}, "
                f"learn={learn}). Lower lambda, tighten rho, or use accel='none' with damping < 1.")
        if stop == "released":
            change = _class_l2(unpack(x), new, upd_mu, upd_s)
        else:
            change = _class_rms(gx - x, k, d, upd_mu, upd_s)
        return gx, (value, change, new)

    def done(x: Tensor, gx: Tensor, aux: tuple[float, float, tuple[Tensor, Tensor]]) -> bool:
        value, change, _ = aux
        result.iterations += 1
        h = result.history
        h["objective"].append(value)
        h["change"].append(change)
        h["active_bounds"].append(active(x))
        h["time"].append(time.perf_counter() - start)
        return change <= threshold

    x, gx, (_, _, new), result.converged = fixed_point(
        mapped, pack(mu0, s0), done, project, accel, memory, damping, max_iter)
    if result.converged:   # the mapped point itself (exact: no log/exp round trip)
        (mu, s), x = new, gx
    else:
        mu, s = unpack(x)
    result.means, result.variances = mu, s
    result.bounds_active = active(x)
    if result.bounds_active:
        warnings.warn(
            f"{result.bounds_active} variance entries sit on the bound [v/{rho:g}, v*{rho:g}]: the "
            "objective keeps pushing them outward (lambda is large for this problem). The result "
            "is the bounded optimum; lower lambda or change rho if that is not intended.",
            FPIWarning, stacklevel=2)
    if not result.converged:
        msg = (f"FPI did not converge in {max_iter} iterations (last change "
               f"{result.history['change'][-1]:.3g} > tol {threshold:g}, stop={stop!r}; lambda={lam:g}, "
               f"pi={pi}, learn={learn}). "
               "Raise max_iter, use damping < 1, or lower lambda.")
        if on_fail == "raise":
            raise FPIDivergenceError(msg)
        warnings.warn(msg, FPIWarning, stacklevel=2)
    return result


def _class_l2(before: tuple[Tensor, Tensor], after: tuple[Tensor, Tensor], upd_mu: bool,
              upd_s: bool) -> float:
    """The released rule's change: max over classes of the L2 norms of the learned blocks' changes."""
    k = before[0].shape[0]
    blocks = [i for i, on in ((0, upd_mu), (1, upd_s)) if on]
    return max(float((after[i] - before[i]).reshape(k, -1).norm(dim=1).max()) for i in blocks)


def _class_rms(f: Tensor, k: int, d: int, upd_mu: bool, upd_s: bool) -> float:
    """Max over classes of the RMS change of each block of normalised parameters."""
    out, i = 0.0, 0
    if upd_mu:
        out = max(out, float(f[: k * d].view(k, d).pow(2).mean(1).sqrt().max()))
        i = k * d
    if upd_s:
        out = max(out, float(f[i:].view(k, -1).pow(2).mean(1).sqrt().max()))
    return out


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
    scales = [sd if p is mu else (variances if variances.ndim == 2 else torch.ones_like(variances)) for p in params]

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
