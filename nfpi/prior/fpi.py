"""Class Gaussians by fixed-point iteration (NFPI paper Eqs. 3-10; docs/method.md §2-§3).

Given per-class latent statistics (count N_y, mean m_y, variance v_y) the class Gaussians
N(mu_y, s_y) minimise

    J(mu, s) = sum_y NLL_y(mu_y, s_y) + c * sum_{y != y'} exp(-KL_yy' / (pi_yy' * alpha)),
    c = lambda / (K (K - 1)),

with pi held fixed during an update (Eq. 9 ``pi="pairwise"``: pi_yy' = KL_yy'; Eq. 10
``pi="mean"``: the mean off-diagonal KL). The stationarity conditions give the closed-form
updates of Eq. 5 (means) and Eqs. 6-7 (covariances, a matrix geometric mean
Sigma = A^-1 # B; elementwise sqrt(B / A) for diagonal covariances). :func:`solve` iterates
them to a fixed point with safeguarded Anderson mixing
(:func:`nfpi.prior.anderson.fixed_point`), keeps variances inside
``[v/rho, v*rho]`` and reports when that bound is active, and never returns non-finite values.
The released code's options (docs/method.md §3.3) are available for parity: its variance rule
(``rule="released"``), its isotropic mean step and its stopping rule (``stop="released"``).

The pieces live by role in :mod:`nfpi.prior`: the class statistics :class:`ClassStats` in
:mod:`nfpi.prior.stats`, the objective J, pairwise KL and kernel in :mod:`nfpi.prior.criterion`,
one update of Eqs. 5-7 in :mod:`nfpi.prior.updates`; this module is the solver.

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

from .._util import check_choice
from .anderson import fixed_point
from .criterion import (
    Learn,
    Pi,
    pairwise_kl,
    potential,
    unbounded_threshold,
)
from .stats import ClassStats
from .updates import Rule, diag_update, full_update

Stop = Literal["relative", "released"]

RELEASED_TOL = 0.1  # the released stopping rule: per-class L2 change of mu and of s <= 0.1

__all__ = ["RELEASED_TOL", "FPIDivergenceError", "FPIResult", "FPIWarning", "check_solver_args", "solve"]


class FPIWarning(RuntimeWarning):
    """The solver hit a variance bound, did not converge, or runs where J is unbounded."""


class FPIDivergenceError(RuntimeError):
    """The iteration produced non-finite values; raised instead of returning NaN."""


def check_solver_args(
    *,
    lam: float,
    alpha: float,
    pi: str,
    learn: str,
    rho: float,
    tol: float,
    max_iter: int | None = None,
    tol_zero: bool = False,
) -> None:
    """Argument checks shared by :func:`solve` and :func:`nfpi.prior.gd.solve`: one-line ValueErrors
    naming the argument and its valid range, before any work (``tol_zero``: tol = 0 allowed)."""
    if not (lam >= 0 and math.isfinite(lam)):
        raise ValueError(f"lambda must be finite and >= 0, got {lam}")
    # alpha divides KL in the kernel; rho <= 1 makes the box [v/rho, v*rho] empty or a point.
    if not (alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f"alpha (kernel temperature) must be finite and > 0, e.g. 10; got {alpha}")
    if not (rho > 1 and math.isfinite(rho)):
        raise ValueError(
            f"rho must be finite and > 1 (variances are kept in [v/rho, v*rho]), e.g. 1e3; got {rho}"
        )
    if not ((tol >= 0 if tol_zero else tol > 0) and math.isfinite(tol)):
        raise ValueError(f"tol must be finite and {'>=' if tol_zero else '>'} 0, e.g. 1e-10; got {tol}")
    if max_iter is not None and not (isinstance(max_iter, int) and max_iter >= 1):
        raise ValueError(f"max_iter must be an integer >= 1, e.g. 1000; got {max_iter!r}")
    check_choice("pi", pi, ("pairwise", "mean"))
    check_choice("learn", learn, ("both", "means", "variances"))


@dataclass
class FPIResult:
    """Solution of :func:`solve` (or of :func:`nfpi.prior.gd.solve`).

    ``means`` (K, D), ``variances`` (K, D) or (K, D, D); ``history`` holds one entry per
    iteration: ``objective`` (the potential of :func:`objective`), ``change`` (what the stopping
    rule compares: max per-class RMS change of the normalised parameters, or with
    ``stop="released"`` the max per-class L2 change of mu and s), ``active_bounds`` (variance
    entries on a bound), ``time`` (s); :func:`nfpi.prior.gd.solve` adds ``lr``.
    """

    means: Tensor
    variances: Tensor
    iterations: int
    converged: bool
    lam: float
    lam_normalised: float
    bounds_active: int = 0
    history: dict[str, list[float]] = field(
        default_factory=lambda: {"objective": [], "change": [], "active_bounds": [], "time": []}
    )

    @property
    def objective(self) -> float:
        return self.history["objective"][-1]


def solve(
    stats: ClassStats,
    lam: float,
    alpha: float = 10.0,
    pi: Pi = "pairwise",
    learn: Learn = "both",
    init: tuple[Tensor, Tensor] | None = None,
    rule: Rule = "paper",
    covariance: Literal["diag", "full"] = "diag",
    isotropic_mean_step: bool = False,
    rho: float = 1e3,
    tol: float = 1e-10,
    max_iter: int = 1000,
    stop: Stop = "relative",
    accel: Literal["anderson", "none"] = "anderson",
    damping: float = 1.0,
    memory: int = 5,
    var_floor: float = 1e-8,
    on_fail: Literal["warn", "raise"] = "warn",
) -> FPIResult:
    """Fixed point of Eqs. 5-7 for the class Gaussians.

    Args:
        stats: class statistics of the latents (K classes, D dims).
        lam: un-normalised lambda; c = lam / (K (K-1)) is used inside.
        alpha, pi: kernel temperature and scale (Eq. 9 "pairwise" / Eq. 10 "mean").
        learn: update "both", only "means" (variances kept at init) or only "variances".
        init: (means (K, D), variances (K, D) or (K, D, D)); default the data statistics.
        rule: "paper" (stationary Eqs. 6-7) or "released" (the authors' code, docs/method.md §3.3;
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
    _check_solve_args(
        stats,
        lam,
        alpha,
        pi,
        learn,
        rule,
        covariance,
        rho,
        tol,
        max_iter,
        stop,
        accel,
        damping,
        memory,
        var_floor,
        on_fail,
    )
    m, v = _data_moments(stats, covariance == "full", var_floor)
    init = _initial_point(init, m, v)
    _warn_if_unbounded(lam, stats.num_classes, alpha, pi, learn, rule, rho)
    step = _FPIMap(m, v, init, lam, alpha, pi, learn, rule, isotropic_mean_step, rho, stop, tol, start)
    x, gx, (_, _, mapped), converged = fixed_point(
        step, step.pack(*init), step.done, step.project, accel, memory, damping, max_iter
    )
    return _report(step, x, gx, mapped, converged, max_iter, on_fail)


def _check_solve_args(
    stats: ClassStats,
    lam: float,
    alpha: float,
    pi: str,
    learn: str,
    rule: str,
    covariance: str,
    rho: float,
    tol: float,
    max_iter: int,
    stop: str,
    accel: str,
    damping: float,
    memory: int,
    var_floor: float,
    on_fail: str,
) -> None:
    """:func:`solve`'s argument checks, before any work: one-line ValueErrors naming the fix."""
    if stats.num_classes < 2:
        raise ValueError("FPI needs at least 2 classes")
    check_solver_args(lam=lam, alpha=alpha, pi=pi, learn=learn, rho=rho, tol=tol, max_iter=max_iter)
    check_choice("rule", rule, ("paper", "released"))
    check_choice("covariance", covariance, ("diag", "full"))
    check_choice("accel", accel, ("anderson", "none"))
    check_choice("on_fail", on_fail, ("warn", "raise"))
    if accel == "anderson" and not (isinstance(memory, int) and memory >= 1):
        raise ValueError(f"memory (Anderson history) must be an integer >= 1, got {memory!r}")
    if not var_floor >= 0:
        raise ValueError(f"var_floor must be >= 0 (a fraction of the mean data variance), got {var_floor}")
    if rule == "released" and covariance == "full":
        raise ValueError("rule='released' exists for diagonal covariances only")
    if not 0 < damping <= 1:
        raise ValueError(f"damping must be in (0, 1], got {damping}")
    if covariance == "full" and stats.dim > 64:
        raise ValueError(
            f"full covariances are for small D (<= 64), got D={stats.dim}; use covariance='diag'"
        )
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
    ref = torch.linalg.eigvalsh(v)  # eigenvalues bound the geometry
    floor = var_floor * ref.mean()
    eye = torch.eye(stats.dim, dtype=v.dtype, device=v.device)
    return m, v + eye * (floor - ref.min(1).values).clamp_min(0)[:, None, None]


def _initial_point(init: tuple[Tensor, Tensor] | None, m: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Copies of ``init`` (means, variances) as float64 on m's device; default the data moments."""
    if init is None:
        return m.clone(), v.clone()
    mu0, s0 = init[0].to(m).clone(), init[1].to(m).clone()
    if mu0.shape != m.shape or s0.shape != v.shape:
        raise ValueError(
            f"init must have shapes {tuple(m.shape)} and {tuple(v.shape)}, "
            f"got {tuple(mu0.shape)} and {tuple(s0.shape)}"
        )
    return mu0, s0


def _warn_if_unbounded(
    lam: float, k: int, alpha: float, pi: Pi, learn: Learn, rule: Rule, rho: float
) -> None:
    """FPIWarning (at solve's caller) when lambda puts the paper rule's variances in the unbounded regime."""
    threshold = unbounded_threshold(k, alpha, pi)
    if learn == "means" or rule != "paper" or not lam > threshold:
        return
    why = (
        "J is unbounded below"
        if pi == "pairwise"
        else "each update multiplies a large variance by sqrt(2 lambda e^{-K/alpha} / alpha) > 1, "
        "so the variances are unbounded"
    )
    warnings.warn(
        f"lambda={lam:g} exceeds {threshold:.4g}, above which {why} for "
        f"pi={pi!r} with learned variances (K={k}, alpha={alpha}); variances will be held in "
        f"[v/{rho:g}, v*{rho:g}]. Lower lambda, use learn='means' or rule='released' for a "
        "bounded problem.",
        FPIWarning,
        stacklevel=3,
    )


class _FPIMap:
    """The FPI map x -> G(x) of Eqs. 5-7 for :func:`fixed_point`, and the record of its iterates.

    x packs the learned blocks only, in normalised coordinates: u = (mu - m) / sqrt(v), then
    w = log s (diagonal) or s itself (full, projected by its eigenvalues), so that Anderson's
    least squares weighs means and variances comparably. Fixed blocks stay at ``init``.
    Learned variances are kept in [v/rho, v*rho]; fixed ones (e.g. identity) stay as given.
    """

    def __init__(
        self,
        m: Tensor,
        v: Tensor,
        init: tuple[Tensor, Tensor],
        lam: float,
        alpha: float,
        pi: Pi,
        learn: Learn,
        rule: Rule,
        isotropic_mean_step: bool,
        rho: float,
        stop: Stop,
        tol: float,
        start: float,
    ):
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
            "objective": [],
            "change": [],
            "active_bounds": [],
            "time": [],
        }

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
            mu_new, s_new = full_update(m, v, mu, s, kl, lam_n, self.alpha, self.pi, self.learn)
        else:
            mu_new, s_new = diag_update(
                m, v, mu, s, kl, lam_n, self.alpha, self.pi, self.learn, self.rule, self.isotropic
            )
        value = float(potential(m, v, mu, s, kl if lam_n else None, lam_n, self.alpha, self.pi))
        if self.upd_s:
            s_new = (
                _clamp_spd(s_new, self.vdiag, self.rho)
                if self.full
                else torch.minimum(torch.maximum(s_new, self.log_lo.exp()), self.log_hi.exp())
            )
        gx = self.pack(mu_new, s_new)
        if not torch.isfinite(gx).all():
            raise FPIDivergenceError(
                f"FPI produced non-finite values at iteration {len(self.history['change'])} (lambda="
                f"{self.lam:g}, pi={self.pi}, learn={self.learn}). Lower lambda, tighten rho, or use "
                "accel='none' with damping < 1."
            )
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


def _report(
    step: _FPIMap,
    x: Tensor,
    gx: Tensor,
    mapped: tuple[Tensor, Tensor],
    converged: bool,
    max_iter: int,
    on_fail: str,
) -> FPIResult:
    """The FPIResult of the last iterate; warns at solve's caller about active variance bounds,
    and about non-convergence (or raises FPIDivergenceError with ``on_fail="raise"``)."""
    if converged:  # the mapped point itself (exact: no log/exp round trip)
        (mu, s), x = mapped, gx
    else:
        mu, s = step.unpack(x)
    history = step.history
    result = FPIResult(
        means=mu,
        variances=s,
        iterations=len(history["change"]),
        converged=converged,
        lam=step.lam,
        lam_normalised=step.lam_normalised,
        bounds_active=step.active(x),
        history=history,
    )
    rho = step.rho
    if result.bounds_active:
        warnings.warn(
            f"{result.bounds_active} variance entries sit on the bound [v/{rho:g}, v*{rho:g}]: the "
            "objective keeps pushing them outward (lambda is large for this problem). The result "
            "is the bounded optimum; lower lambda or change rho if that is not intended.",
            FPIWarning,
            stacklevel=3,
        )
    if not converged:
        msg = (
            f"FPI did not converge in {max_iter} iterations (last change "
            f"{history['change'][-1]:.3g} > tol {step.threshold:g}, stop={step.stop!r}; "
            f"lambda={step.lam:g}, pi={step.pi}, learn={step.learn}). "
            "Raise max_iter, use damping < 1, or lower lambda."
        )
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
