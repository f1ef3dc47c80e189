"""The class-conditional prior of NFPI: one Gaussian per class, learned by fixed-point iteration
(paper Eqs. 2-10; docs/method.md §1-§3, §5-§6).

The modules descend by role:

- :mod:`nfpi.prior.stats`: per-class latent statistics :class:`ClassStats` (docs/method.md §4.3);
- :mod:`nfpi.prior.criterion`: the objective J, pairwise KL and kernel (paper Eqs. 2-4, docs/method.md §2);
- :mod:`nfpi.prior.updates`: one closed-form update (paper Eqs. 5-7, docs/method.md §3). A new prior
  rule goes here (and gets a name in :mod:`nfpi.prior.fpi`'s ``rule`` argument);
- :mod:`nfpi.prior.anderson`: the generic safeguarded Anderson iteration :func:`fixed_point`;
- :mod:`nfpi.prior.fpi`: the solver ``fpi.solve`` (arguments, step map, report);
- :mod:`nfpi.prior.gd`: Baseline 2, ``gd.solve``, gradient descent on the same objective (docs/method.md §5);
- :mod:`nfpi.prior.gaussians`: :class:`ClassGaussians`, the prior a flow is trained under
  (classification, sampling; docs/method.md §6), and GLEM's RFCM :class:`FullGaussians`.

The two solvers are reached through their modules (``fpi.solve``, ``gd.solve``).

Example:
    >>> import torch
    >>> y = torch.arange(3).repeat_interleave(50)
    >>> z = torch.randn(150, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    >>> stats = ClassStats.from_latents(z + 2.0 * torch.eye(3, 2, dtype=torch.float64)[y], y, num_classes=3)
    >>> res = fpi.solve(stats, lam=1.0)
    >>> res.converged, tuple(res.means.shape)
    (True, (3, 2))
    >>> ClassGaussians.from_result(res).predict(res.means.float()).tolist()
    [0, 1, 2]
"""

from . import fpi, gd
from .anderson import anderson_step, fixed_point
from .criterion import (
    Learn,
    Pi,
    gradient_residual,
    kernel,
    objective,
    pairwise_kl,
    potential,
    unbounded_threshold,
)
from .fpi import RELEASED_TOL, FPIDivergenceError, FPIResult, FPIWarning, check_solver_args
from .gaussians import ClassGaussians, FullGaussians, check_latents, interpolate
from .stats import ClassStats
from .updates import Rule, diag_update, full_update, geometric_mean_solve, update

__all__ = [
    "RELEASED_TOL",
    "ClassGaussians",
    "ClassStats",
    "FPIDivergenceError",
    "FPIResult",
    "FPIWarning",
    "FullGaussians",
    "Learn",
    "Pi",
    "Rule",
    "anderson_step",
    "check_latents",
    "check_solver_args",
    "diag_update",
    "fixed_point",
    "fpi",
    "full_update",
    "gd",
    "geometric_mean_solve",
    "gradient_residual",
    "interpolate",
    "kernel",
    "objective",
    "pairwise_kl",
    "potential",
    "unbounded_threshold",
    "update",
]
