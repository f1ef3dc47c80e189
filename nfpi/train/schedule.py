"""When and how the class Gaussians are fitted during training (docs/method.md §4.2, §4.4, §5; paper
Sec. 4.2 "a single fixed point iteration at early training stages"; GLEM §4.3, Algorithm 1).

1. :func:`initial_gaussians`: data init, the class means and variances of the latents of the
   untrained flow (Baseline 1; identity variances for the released means-only runs), or the
   random (GLEM supplementary) / standard (GLEM's CE) Gaussians;
2. :func:`solves_after`: after epoch ``schedule.solve_epoch`` (-1: before training) the
   Gaussians are set by :func:`fit`, then stay frozen unless ``schedule.resolve_every`` asks
   for repeated solves, and never after ``schedule.merge_epoch``;
3. :func:`fit`: the solution of ``gaussians.prior`` for the latent statistics:
   ``"fpi"``: :func:`nfpi.prior.fpi.solve` (paper Eqs. 5-7) with the ``solver`` options;
   ``"gd"``: :func:`nfpi.prior.gd.solve` (Baseline 2) with the ``gd`` options; ``"data"``: the
   lambda = 0 fixed point, i.e. the class statistics;
4. :func:`solve_lam`: the n-th solve uses lambda = max(lam_min, lam * lam_decay^n).

:func:`em_overrides` is GLEM's EM schedule (GLEM §4.3, supplementary §3.1): the Gaussians are
learned by gradient descent on the statistics of D_G (10 % of each class) after every epoch,
alternating with flow training on D_NF, each M-step starting from the current Gaussians, with
lambda annealed geometrically; D_G joins the training set after ``merge_epoch`` and the
Gaussians are then frozen. Deviations, stated: the repulsion is NFPI's exp(-KL/(pi alpha)) term
of docs/method.md §2, minimised by :func:`nfpi.prior.gd.solve`, not GLEM's plain -KL (GLEM Eq. 4), which is
unbounded below and needs the sigmoid bounds to stay finite; the Gaussians start from data init
(docs/method.md §4.2), not from GLEM's overlapping standard Gaussians.

Example:
    >>> cfg = TrainConfig.from_yaml("configs/digits_cpu.yaml")
    >>> cfg = cfg.replace(**em_overrides(lam=10.0, merge_epoch=3))
    >>> [solves_after(cfg, epoch) for epoch in range(5)]
    [True, True, True, True, False]
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..config import TrainConfig
from ..prior import ClassGaussians, ClassStats, fpi, gd

__all__ = ["em_overrides", "fit", "initial_gaussians", "solve_lam", "solves_after"]


def fit(
    cfg: TrainConfig, stats: ClassStats, lam: float, start: ClassGaussians | None = None
) -> tuple[ClassGaussians, dict[str, Any]]:
    """The Gaussians (K, D) of ``cfg.gaussians.prior`` for latent statistics ``stats`` at lambda
    ``lam``, iterating from ``start`` when given (else the data statistics), and the solver's
    report (iterations, converged, bounds_active, lam_normalised, change)."""
    objective = cfg.gaussians
    if objective.prior == "data":
        return ClassGaussians.from_stats(stats), {
            "iterations": 0,
            "converged": True,
            "bounds_active": 0,
            "lam_normalised": 0.0,
            "change": 0.0,
        }
    init = None
    if start is not None:
        init = (start.means.double().cpu(), start.variances.double().cpu())
    elif objective.learn == "means" and objective.means_only_identity:
        init = (stats.mean(), torch.ones_like(stats.total))
    shared = {"alpha": objective.alpha, "pi": objective.pi, "learn": objective.learn, "init": init}
    if objective.prior == "fpi":
        res = fpi.solve(stats, lam, **shared, **dataclasses.asdict(cfg.solver), on_fail="warn")
    elif objective.prior == "gd":
        # the variance box of both solvers is solver.rho, so that they search the same set
        res = gd.solve(stats, lam, **shared, rho=cfg.solver.rho, **dataclasses.asdict(cfg.gd))
    else:
        raise ValueError(f"prior {objective.prior!r} is not fitted to statistics")
    variances = res.variances
    if init is not None and objective.learn == "means":
        # Means-only runs keep identity variances; both solvers clip unlearned variances into
        # their box [v/rho, v*rho] too, which would move them where a data variance v < 1/rho.
        variances = init[1]
    return ClassGaussians(res.means, variances), {
        "iterations": res.iterations,
        "converged": res.converged,
        "bounds_active": res.bounds_active,
        "lam_normalised": res.lam_normalised,
        "change": res.history["change"][-1],
    }


def initial_gaussians(cfg: TrainConfig, stats: ClassStats) -> ClassGaussians:
    """Step 2 (docs/method.md §4.2): data init (identity variances for released means-only runs), or
    the random Gaussians of the GLEM supplementary, or N(0, I) for every class; (K, D)."""
    objective = cfg.gaussians
    if objective.prior == "random":
        gen = torch.Generator().manual_seed(cfg.seed)
        return ClassGaussians.random(stats.num_classes, stats.dim, generator=gen)
    if objective.prior == "standard":
        shape = (stats.num_classes, stats.dim)
        return ClassGaussians(torch.zeros(shape), torch.ones(shape))
    means_only = objective.learn == "means" and objective.means_only_identity
    identity = objective.prior in ("fpi", "gd") and means_only
    return ClassGaussians.from_stats(stats, identity_variances=identity)


def solves_after(cfg: TrainConfig, epoch: int) -> bool:
    """Whether the Gaussians are fitted after epoch ``epoch`` (-1: before training)."""
    sched = cfg.schedule
    if cfg.gaussians.prior in ("random", "standard") or epoch < sched.solve_epoch:
        return False
    if sched.merge_epoch is not None and epoch > sched.merge_epoch:
        return False
    if epoch == sched.solve_epoch:
        return True
    return sched.resolve_every is not None and (epoch - sched.solve_epoch) % sched.resolve_every == 0


def solve_lam(cfg: TrainConfig, solves_done: int) -> float:
    """Lambda of the next solve after ``solves_done`` solves: max(lam_min, lam * lam_decay^n)."""
    return max(cfg.schedule.lam_min, cfg.gaussians.lam * cfg.schedule.lam_decay**solves_done)


def em_overrides(
    lam: float,
    merge_epoch: int,
    lam_decay: float = 0.5,
    lam_min: float = 0.0,
    dg_fraction: float = 0.1,
    gd_steps: int = 100,
    gd_lr: float = 0.05,
    gd_policy: str = "linear",
) -> dict[str, Any]:
    """TrainConfig overrides (``cfg.replace(**em_overrides(...))``) for GLEM's EM schedule.

    After every epoch up to ``merge_epoch``: ``gd_steps`` Adam steps on J for the statistics of
    D_G (``dg_fraction`` of each class), starting from the current Gaussians, at lambda
    max(lam_min, lam * lam_decay^t) for the t-th M-step (t = 0, 1, ...). Afterwards D_G joins
    the training set and the Gaussians stay as they are.
    """
    return {
        "gaussians.prior": "gd",
        "gaussians.lam": lam,
        "schedule.lam_decay": lam_decay,
        "schedule.lam_min": lam_min,
        "schedule.solve_epoch": 0,
        "schedule.resolve_every": 1,
        "schedule.warm_start": True,
        "schedule.dg_fraction": dg_fraction,
        "schedule.merge_epoch": merge_epoch,
        "gd.steps": gd_steps,
        "gd.lr": gd_lr,
        "gd.policy": gd_policy,
    }
