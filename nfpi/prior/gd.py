"""Baseline 2 of the NFPI paper: the class Gaussians by gradient descent on the same objective
(docs/method.md §5; paper Sec. 4 "NFGD", GLEM supplementary).

Adam on the means and on a latent theta with variances s = c + a * sigmoid(b * theta), which
keeps them in (c, a + c) and positive. The paper names learning-rate policies (sublinear,
linear, superlinear) without formulas; here they are lr_t = lr0 * (1 - t/T)^p:

    constant p=0, sublinear_v1 p=0.5, sublinear_v2 p=0.75, linear p=1,
    superlinear_v1 p=1.5, superlinear_v2 p=2

("sub"/"super" refer to the exponent of the decay). It minimises the potential of
:func:`nfpi.prior.objective`, so its history compares directly with the FPI's.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from .criterion import Learn, Pi, pairwise_kl, potential
from .fpi import FPIResult, check_solver_args
from .stats import ClassStats

__all__ = ["BOUND_TOL", "POLICIES", "solve"]

#: A learned variance closer than this (relative) to an end of its sigmoid range sits on it.
BOUND_TOL = 1e-3

POLICIES: dict[str, float] = {
    "constant": 0.0,
    "sublinear_v1": 0.5,
    "sublinear_v2": 0.75,
    "linear": 1.0,
    "superlinear_v1": 1.5,
    "superlinear_v2": 2.0,
}


def solve(
    stats: ClassStats,
    lam: float,
    alpha: float = 10.0,
    pi: Pi = "pairwise",
    learn: Learn = "both",
    init: tuple[Tensor, Tensor] | None = None,
    policy: str = "linear",
    steps: int = 1000,
    lr: float = 0.05,
    a: float | None = None,
    b: float = 1.0,
    c: float | None = None,
    rho: float = 1e3,
    tol: float = 0.0,
    seconds: float = math.inf,
) -> FPIResult:
    """Minimise J by Adam with a learning-rate policy; diagonal Gaussians.

    Args:
        stats, lam, alpha, pi, learn, init: as in :func:`nfpi.prior.fpi.solve`.
        policy: a key of :data:`POLICIES`; steps: T; lr: lr0 (means are optimised in units of
            the class data std, so lr is scale free).
        a, b, c: sigmoid reparametrisation s = c + a sigmoid(b theta). The released defaults
            are a=1, b=1, c=0.25 (absolute units); with a=c=None the range is set per entry to
            [v/rho, v*rho] around the data variance v, which fits latents of any scale: the
            box of :func:`nfpi.prior.fpi.solve` with the same ``rho`` (its default too), so
            that the two solvers search the same set. A learned variance within a relative
            :data:`BOUND_TOL` of an end of its range counts as an active bound (the sigmoid
            reaches its ends only asymptotically).
        tol: stop early when the RMS parameter change of a step is below tol (0: never).
        seconds: stop after this wall time (for equal-time comparisons).
    Returns:
        FPIResult; ``history`` has the potential, change, time and learning rate of every step.
    """
    _check_args(stats, lam, alpha, pi, learn, policy, steps, lr, a, c, rho, tol)
    start = time.perf_counter()
    k = stats.num_classes
    lam_normalised = lam / (k * (k - 1))
    par = _Parametrisation.start(stats, learn, init, a, b, c, rho)
    m, v, current = par.m, par.v, par.current
    params = [p for p in (par.u, par.theta) if p.requires_grad]
    opt, sched = _adam(params, lr, policy, steps)
    result = FPIResult(
        means=m, variances=v, iterations=0, converged=False, lam=lam, lam_normalised=lam_normalised
    )
    result.history["lr"] = []
    for step in range(1, steps + 1):
        before = [p.detach().clone() for p in params]
        mu, s = current()
        kl = pairwise_kl(mu, s) if lam_normalised else None
        loss = potential(m, v, mu, s, kl, lam_normalised, alpha, pi)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"gradient descent hit a non-finite objective at step {step}; lower lr")
        opt.zero_grad()
        loss.backward()
        h = result.history
        h["lr"].append(opt.param_groups[0]["lr"])  # the rate this step uses: lr0 (1 - t/T)^p, t = step - 1
        opt.step()
        sched.step()
        change = math.sqrt(sum(float((p.detach() - q).pow(2).mean()) for p, q in zip(params, before)))
        h["objective"].append(float(loss.detach()))
        h["change"].append(change)
        h["active_bounds"].append(par.active())
        h["time"].append(time.perf_counter() - start)
        result.iterations = step
        if change < tol:
            result.converged = True
            break
        if h["time"][-1] > seconds:
            break
    with torch.no_grad():
        result.means, result.variances = (t.detach() for t in current())
    result.bounds_active = par.active()
    return result


@dataclass
class _Parametrisation:
    """The Adam variables of :func:`solve` and the Gaussians they give, all (K, D).

    Means mu = m + u * std (u in units of the class data std) and variances
    s = lo + width * sigmoid(b * theta); m, v: the class data means and variances.
    """

    m: Tensor
    v: Tensor
    std: Tensor
    lo: Tensor
    width: Tensor
    s0: Tensor
    b: float
    u: Tensor
    theta: Tensor

    @classmethod
    def start(
        cls,
        stats: ClassStats,
        learn: str,
        init: tuple[Tensor, Tensor] | None,
        a: float | None,
        b: float,
        c: float | None,
        rho: float,
    ) -> _Parametrisation:
        """The sigmoid range of :func:`solve`'s a, b, c, rho and the variables at ``init`` (default: data)."""
        m, v = stats.mean(), stats.var().clamp_min(1e-8 * stats.var().mean())
        std = v.sqrt()
        lo = v / rho if c is None else torch.full_like(v, c)
        width = v * rho - lo if a is None else torch.full_like(v, a)
        mu0, s0 = (m, v) if init is None else (init[0].to(m), init[1].to(m))
        # Start where the sigmoid reproduces s0 (clipped strictly inside the open range).
        frac = ((s0 - lo) / width).clamp(1e-6, 1 - 1e-6)
        u = ((mu0 - m) / std).clone().requires_grad_(learn != "variances")
        theta = (torch.logit(frac) / b).clone().requires_grad_(learn != "means")
        return cls(m, v, std, lo, width, s0, b, u, theta)

    def current(self) -> tuple[Tensor, Tensor]:
        """The means and variances (K, D) of the current variables."""
        # fixed variances (means-only runs) stay exactly at init, even outside the sigmoid range
        theta = self.theta
        s = self.lo + self.width * torch.sigmoid(self.b * theta) if theta.requires_grad else self.s0
        return self.m + self.u * self.std, s

    def active(self) -> int:
        """Learned variance entries within a relative :data:`BOUND_TOL` of an end of their range."""
        if not self.theta.requires_grad:
            return 0
        with torch.no_grad():
            s = self.current()[1]
            hi = self.lo + self.width
            return int(((s <= self.lo * (1 + BOUND_TOL)) | (s >= hi * (1 - BOUND_TOL))).sum())


def _adam(
    params: list[Tensor], lr: float, policy: str, steps: int
) -> tuple[torch.optim.Adam, torch.optim.lr_scheduler.LambdaLR]:
    """Adam at lr0 = ``lr`` with the policy's rate lr_t = lr0 (1 - t/T)^p, T = ``steps``."""
    opt = torch.optim.Adam(params, lr=lr)
    power = POLICIES[policy]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: max(0.0, 1 - t / steps) ** power)
    return opt, sched


def _check_args(
    stats: ClassStats,
    lam: float,
    alpha: float,
    pi: str,
    learn: str,
    policy: str,
    steps: int,
    lr: float,
    a: float | None,
    c: float | None,
    rho: float,
    tol: float,
) -> None:
    """:func:`solve`'s argument checks, before any work: one-line ValueErrors naming the fix."""
    if policy not in POLICIES:
        raise ValueError(f"unknown lr policy {policy!r}; choose one of {sorted(POLICIES)}")
    check_solver_args(lam=lam, alpha=alpha, pi=pi, learn=learn, rho=rho, tol=tol, tol_zero=True)
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"steps must be an integer >= 1, e.g. 1000; got {steps!r}")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be finite and > 0, e.g. 0.05; got {lr}")
    if stats.num_classes < 2:
        raise ValueError("gradient descent on J needs at least 2 classes")
    if (a is None) != (c is None):
        raise ValueError("give both a and c (absolute sigmoid range) or neither (data-relative range)")
