"""Safeguarded Anderson acceleration of a fixed-point iteration x = g(x) on flat vectors.

Type-II Anderson mixing with memory m (Walker & Ni 2011): from the last m + 1 iterates x_i and
residuals f_i = g(x_i) - x_i, with differences dX, dF (n, m),

    gamma = argmin |f - dF gamma|,    x_new = x + beta f - (dX + beta dF) gamma,

where beta is the damping. Nothing here knows what x holds; :func:`nfpi.prior.fpi.solve` uses it for
the class Gaussians.

References:
    | Anderson Acceleration for Fixed-Point Iterations (Walker & Ni, 2011)
    | https://doi.org/10.1137/10078356X
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = ["anderson_step", "fixed_point"]


def anderson_step(xs: list[Tensor], fs: list[Tensor], beta: float) -> Tensor:
    """Type-II Anderson mixing on the last iterates ``xs`` and residuals ``fs``, each (n,).

    With one iterate this is the damped plain step x + beta f. Returns the proposal, (n,).
    """
    x, f = xs[-1], fs[-1]
    if len(xs) == 1:
        return x + beta * f
    dx = torch.stack([xs[i + 1] - xs[i] for i in range(len(xs) - 1)], 1)
    df = torch.stack([fs[i + 1] - fs[i] for i in range(len(fs) - 1)], 1)
    # Least squares via the small normal equations with a relative ridge: m <= ~10 columns.
    gram = df.T @ df
    ridge = 1e-10 * gram.diagonal().max().clamp_min(1e-300)
    eye = torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    gamma = torch.linalg.solve(gram + ridge * eye, df.T @ f)
    return x + beta * f - (dx + beta * df) @ gamma


def fixed_point(
    g: Callable[[Tensor], tuple[Tensor, Any]],
    x0: Tensor,
    done: Callable[[Tensor, Tensor, Any], bool],
    project: Callable[[Tensor], Tensor] | None = None,
    accel: Literal["anderson", "none"] = "anderson",
    memory: int = 5,
    damping: float = 1.0,
    max_iter: int = 1000,
) -> tuple[Tensor, Tensor, Any, bool]:
    """Safeguarded Anderson mixing (or damped Picard iteration) for x = g(x) on flat vectors.

    ``g(x)`` returns (g(x), aux); ``done(x, g(x), aux)`` is called once per iterate, in order,
    and stops the iteration when True; ``project`` maps a proposal into the feasible set.
    A mixing step whose residual |g(x) - x| exceeds the current one (or that is not finite) is
    replaced by the damped plain step x + damping (g(x) - x) and the memory restarts: Anderson
    is not monotone on nonlinear maps. Returns (x, g(x), aux) of the last iterate and whether
    ``done`` said so; False after ``max_iter`` iterates.

    Example:
        >>> a, b = torch.tensor([[0.5, 0.1], [0.0, 0.3]]), torch.tensor([1.0, 2.0])
        >>> x, gx, _, ok = fixed_point(lambda x: (a @ x + b, None), torch.zeros(2),
        ...                            lambda x, gx, aux: bool((gx - x).norm() < 1e-12))
        >>> ok, torch.allclose(x, torch.linalg.solve(torch.eye(2) - a, b))
        (True, True)
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
            xs, fs = (xs + [x])[-(memory + 1) :], (fs + [f])[-(memory + 1) :]
            x_new = project(anderson_step(xs, fs, damping))
            if torch.isfinite(x_new).all():
                g_new, aux_new = g(x_new)
                if (g_new - x_new).norm() <= f.norm():
                    x, gx, aux = x_new, g_new, aux_new
                    continue
            xs, fs = [], []
        x = project(x + damping * f)
        gx, aux = g(x)
    return x, gx, aux, False
